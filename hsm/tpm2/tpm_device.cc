#include "hsm/tpm2/tpm_device.h"

#include <cstdlib>

#include <tss2/tss2_rc.h>
#include <tss2/tss2_tctildr.h>

#include <array>
#include <cstdio>
#include <ctime>
#include <utility>

namespace medgate::hsm::tpm2 {
namespace {

struct RcName {
  TSS2_RC rc;
  const char* name;
};
// The codes an operator is likely to meet, by their names in the TPM 2.0 specification (Part 2).
constexpr std::array<RcName, 20> kRcNames = {{
    {TPM2_RC_RETRY, "TPM_RC_RETRY"},
    {TPM2_RC_YIELDED, "TPM_RC_YIELDED"},
    {TPM2_RC_TESTING, "TPM_RC_TESTING"},
    {TPM2_RC_LOCKOUT, "TPM_RC_LOCKOUT"},
    {TPM2_RC_OBJECT_MEMORY, "TPM_RC_OBJECT_MEMORY"},
    {TPM2_RC_SESSION_MEMORY, "TPM_RC_SESSION_MEMORY"},
    {TPM2_RC_MEMORY, "TPM_RC_MEMORY"},
    {TPM2_RC_NV_RATE, "TPM_RC_NV_RATE"},
    {TPM2_RC_NV_UNAVAILABLE, "TPM_RC_NV_UNAVAILABLE"},
    {TPM2_RC_POLICY_FAIL, "TPM_RC_POLICY_FAIL"},
    {TPM2_RC_HANDLE, "TPM_RC_HANDLE"},
    {TPM2_RC_INTEGRITY, "TPM_RC_INTEGRITY"},
    {TPM2_RC_AUTH_FAIL, "TPM_RC_AUTH_FAIL"},
    {TPM2_RC_BAD_AUTH, "TPM_RC_BAD_AUTH"},
    {TPM2_RC_NV_UNINITIALIZED, "TPM_RC_NV_UNINITIALIZED"},
    {TPM2_RC_NV_DEFINED, "TPM_RC_NV_DEFINED"},
    {TPM2_RC_FAILURE, "TPM_RC_FAILURE"},
    {TPM2_RC_INITIALIZE, "TPM_RC_INITIALIZE"},
    {TPM2_RC_ECC_POINT, "TPM_RC_ECC_POINT"},
    {TPM2_RC_NO_RESULT, "TPM_RC_NO_RESULT"},
}};

TSS2_RC layer_of(TSS2_RC rc) {
  return rc & TSS2_RC_LAYER_MASK;
}

// An ECC P-256 storage key in the owner hierarchy (the TCG's "SRK" template): the same seed and
// template always give the same key, so it is re-created at each connect instead of persisted.
TPM2B_PUBLIC primary_template() {
  TPM2B_PUBLIC in{};
  TPMT_PUBLIC& p = in.publicArea;
  p.type = TPM2_ALG_ECC;
  p.nameAlg = TPM2_ALG_SHA256;
  p.objectAttributes = TPMA_OBJECT_FIXEDTPM | TPMA_OBJECT_FIXEDPARENT |
                       TPMA_OBJECT_SENSITIVEDATAORIGIN | TPMA_OBJECT_USERWITHAUTH |
                       TPMA_OBJECT_RESTRICTED | TPMA_OBJECT_DECRYPT | TPMA_OBJECT_NODA;
  p.parameters.eccDetail.symmetric.algorithm = TPM2_ALG_AES;
  p.parameters.eccDetail.symmetric.keyBits.aes = 128;
  p.parameters.eccDetail.symmetric.mode.aes = TPM2_ALG_CFB;
  p.parameters.eccDetail.scheme.scheme = TPM2_ALG_NULL;
  p.parameters.eccDetail.curveID = TPM2_ECC_NIST_P256;
  p.parameters.eccDetail.kdf.scheme = TPM2_ALG_NULL;
  return in;
}

}  // namespace

TSS2_RC rc_base(TSS2_RC rc) {
  TSS2_RC layer = layer_of(rc);
  if (layer != 0 && layer != TSS2_RESMGR_TPM_RC_LAYER) return rc;
  TSS2_RC code = rc & 0xFFFF;
  if (code & TPM2_RC_FMT1) return code & (TPM2_RC_FMT1 | 0x3F);
  return code;
}

bool rc_connection_lost(TSS2_RC rc) {
  TSS2_RC layer = layer_of(rc);
  if (layer == 0 || layer == TSS2_RESMGR_TPM_RC_LAYER) return false;
  switch (rc & 0xFFFF) {
    case TSS2_BASE_RC_IO_ERROR:
    case TSS2_BASE_RC_NO_CONNECTION:
    case TSS2_BASE_RC_MALFORMED_RESPONSE:
    case TSS2_BASE_RC_INSUFFICIENT_RESPONSE:
      return true;
    default:
      return false;
  }
}

bool rc_stale_handle(TSS2_RC rc) {
  TSS2_RC base = rc_base(rc);
  return (base >= TPM2_RC_REFERENCE_H0 && base <= TPM2_RC_REFERENCE_H6) ||
         (base >= TPM2_RC_REFERENCE_S0 && base <= TPM2_RC_REFERENCE_S6);
}

std::string rc_text(TSS2_RC rc) {
  const TSS2_RC base = rc_base(rc);
  const char* name = nullptr;
  if (layer_of(rc) == 0 || layer_of(rc) == TSS2_RESMGR_TPM_RC_LAYER)
    for (const RcName& known : kRcNames)
      if (known.rc == base) name = known.name;
  std::array<char, 16> hex{};
  std::snprintf(hex.data(), hex.size(), "0x%X", rc);
  std::string text = name != nullptr ? std::string(name) + " (" + hex.data() + ")" : hex.data();
  if (const char* decoded = Tss2_RC_Decode(rc)) text += std::string(": ") + decoded;
  return text;
}

SigpipeBlock::SigpipeBlock() {
  sigset_t pipe;
  sigemptyset(&pipe);
  sigaddset(&pipe, SIGPIPE);
  pthread_sigmask(SIG_BLOCK, &pipe, &old_mask_);
  sigset_t pending;
  sigemptyset(&pending);
  was_pending_ = sigpending(&pending) == 0 && sigismember(&pending, SIGPIPE) == 1;
}

SigpipeBlock::~SigpipeBlock() {
  sigset_t pending;
  sigemptyset(&pending);
  if (!was_pending_ && sigpending(&pending) == 0 && sigismember(&pending, SIGPIPE) == 1) {
    sigset_t pipe;
    sigemptyset(&pipe);
    sigaddset(&pipe, SIGPIPE);
    timespec no_wait{};
    sigtimedwait(&pipe, nullptr, &no_wait);
  }
  pthread_sigmask(SIG_SETMASK, &old_mask_, nullptr);
}

bool Device::rc_transient(TSS2_RC rc) {
  return rc == TPM2_RC_RETRY || rc == TPM2_RC_YIELDED || rc == TPM2_RC_TESTING;
}

Result<std::unique_ptr<Device>> Device::connect(const std::string& tcti) {
  // tpm2-tss logs to stderr on its own, without journald priorities, and calls some expected
  // answers ERROR (a counter read before its first increment). Every error reaches medgate's log
  // through the Status it returns; TSS2_LOG set in the environment still wins.
  ::setenv("TSS2_LOG", "all+NONE", /*overwrite=*/0);
  SigpipeBlock no_sigpipe;
  TSS2_TCTI_CONTEXT* tcti_context = nullptr;
  TSS2_RC rc = Tss2_TctiLdr_Initialize(tcti.c_str(), &tcti_context);
  if (rc != TSS2_RC_SUCCESS)
    return Status::Unavailable("cannot reach the TPM at " + tcti + ": " + rc_text(rc));
  ESYS_CONTEXT* esys = nullptr;
  rc = Esys_Initialize(&esys, tcti_context, nullptr);
  if (rc != TSS2_RC_SUCCESS) {
    Tss2_TctiLdr_Finalize(&tcti_context);
    return Status::Unavailable("cannot start ESYS on the TPM at " + tcti + ": " + rc_text(rc));
  }
  std::unique_ptr<Device> device(new Device(tcti, tcti_context, esys));

  const TPM2B_PUBLIC in_public = primary_template();
  const TPM2B_SENSITIVE_CREATE in_sensitive{};
  const TPM2B_DATA outside_info{};
  const TPML_PCR_SELECTION creation_pcrs{};
  rc = device->call([&] {
    return Esys_CreatePrimary(esys, ESYS_TR_RH_OWNER, ESYS_TR_PASSWORD, ESYS_TR_NONE, ESYS_TR_NONE,
                              &in_sensitive, &in_public, &outside_info, &creation_pcrs,
                              &device->primary_, nullptr, nullptr, nullptr, nullptr);
  });
  if (rc != TSS2_RC_SUCCESS) {
    device->primary_ = ESYS_TR_NONE;
    return device->fail("creating the primary storage key", rc);
  }
  return device;
}

Device::~Device() {
  if (primary_ != ESYS_TR_NONE) flush(primary_);
  SigpipeBlock no_sigpipe;
  Esys_Finalize(&esys_);
  Tss2_TctiLdr_Finalize(&tcti_context_);
}

Status Device::fail(std::string_view what, TSS2_RC rc, StatusCode code) {
  last_rc_ = rc;
  return Status(code, std::string(what) + " failed on the TPM at " + tcti_ + ": " + rc_text(rc));
}

void Device::flush(ESYS_TR handle) {
  if (handle == ESYS_TR_NONE) return;
  SigpipeBlock no_sigpipe;
  Esys_FlushContext(esys_, handle);
}

}  // namespace medgate::hsm::tpm2
