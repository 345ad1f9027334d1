// One connection to a TPM 2.0 through tpm2-tss: the TCTI (tctildr), the ESYS context and the
// primary storage key, re-created from a fixed template each time (deterministic, never
// persisted). Private to hsm/tpm2.
//
// Transient handles: a TPM without a resource manager in front of it (swtpm; some boards) has
// three object slots and keeps whatever a process forgot to flush, even after the process is
// gone. Every handle made through a Device is flushed: the primary by ~Device, everything else
// by a FlushGuard on every path.
//
// Thread safety: none; the key store serializes every use of a Device with its mutex.
#pragma once

#include <signal.h>
#include <tss2/tss2_esys.h>

#include <chrono>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <utility>

#include "hsm/bytes.h"
#include "hsm/status.h"

namespace medgate::hsm::tpm2 {

// "TPM_RC_LOCKOUT (0x921): tpm:warn(2.0): authorizations for objects ..." for a person and a log:
// the TPM's name for well-known codes, the hex value and Tss2_RC_Decode's text.
std::string rc_text(TSS2_RC rc);
// A TPM-layer RC without the handle, session or parameter number of a format-one error (0x99D
// -> 0x09D, TPM_RC_POLICY_FAIL); other RCs unchanged.
TSS2_RC rc_base(TSS2_RC rc);
// The connection to the TPM is gone (the TCTI reports an I/O or connection error, the reply is
// malformed): the context must be rebuilt.
bool rc_connection_lost(TSS2_RC rc);
// The TPM no longer has an object or session the context refers to (TPM_RC_REFERENCE_*: it was
// reset under us, or someone flushed our handles): the context must be rebuilt.
bool rc_stale_handle(TSS2_RC rc);

// Blocks SIGPIPE in this thread while it lives and swallows one raised meanwhile: a TCTI writing
// to a socket whose TPM went away must yield an error, not kill the process.
class SigpipeBlock {
 public:
  SigpipeBlock();
  ~SigpipeBlock();
  SigpipeBlock(const SigpipeBlock&) = delete;
  SigpipeBlock& operator=(const SigpipeBlock&) = delete;

 private:
  sigset_t old_mask_{};
  bool was_pending_ = false;
};

class Device {
 public:
  // Loads the TCTI named by `tcti` (a tctildr string such as "device:/dev/tpmrm0" or
  // "swtpm:host=127.0.0.1,port=2321"), starts ESYS and creates the primary storage key.
  // kUnavailable naming the TCTI when the TPM cannot be reached or refuses.
  static Result<std::unique_ptr<Device>> connect(const std::string& tcti);

  ~Device();
  Device(const Device&) = delete;
  Device& operator=(const Device&) = delete;

  ESYS_CONTEXT* esys() const { return esys_; }
  ESYS_TR primary() const { return primary_; }
  const std::string& tcti() const { return tcti_; }

  // Runs one ESYS call. TPM_RC_RETRY, TPM_RC_YIELDED and TPM_RC_TESTING are retried with a short
  // backoff, five tries in all (ESYS itself resubmits a few times without waiting).
  template <typename Call>
  TSS2_RC call(Call&& esys_call) {
    SigpipeBlock no_sigpipe;
    TSS2_RC rc = TSS2_RC_SUCCESS;
    for (int attempt = 0; attempt < kMaxTries; ++attempt) {
      if (attempt > 0) std::this_thread::sleep_for(std::chrono::milliseconds(10 << attempt));
      rc = esys_call();
      if (!rc_transient(rc)) break;
    }
    return rc;
  }

  // A failed call as a Status: "`what` failed on the TPM at <tcti>: <rc_text>". Remembers `rc`
  // for the caller's fault handling (last_rc()).
  Status fail(std::string_view what, TSS2_RC rc, StatusCode code = StatusCode::kUnavailable);
  // Remembers `rc` for a failure the caller words itself.
  void note_rc(TSS2_RC rc) { last_rc_ = rc; }
  TSS2_RC last_rc() const { return last_rc_; }
  void clear_last_rc() { last_rc_ = TSS2_RC_SUCCESS; }

  // Flushes a transient object or session; errors are ignored (it may already be gone).
  void flush(ESYS_TR handle);

 private:
  static constexpr int kMaxTries = 5;
  static bool rc_transient(TSS2_RC rc);

  Device(std::string tcti, TSS2_TCTI_CONTEXT* tcti_context, ESYS_CONTEXT* esys)
      : tcti_(std::move(tcti)), tcti_context_(tcti_context), esys_(esys) {}

  std::string tcti_;
  TSS2_TCTI_CONTEXT* tcti_context_ = nullptr;
  ESYS_CONTEXT* esys_ = nullptr;
  ESYS_TR primary_ = ESYS_TR_NONE;
  TSS2_RC last_rc_ = TSS2_RC_SUCCESS;
};

// Flushes a transient object or session handle when it goes out of scope, on every path.
class FlushGuard {
 public:
  explicit FlushGuard(Device& device) : device_(device) {}
  ~FlushGuard() {
    if (handle_ != ESYS_TR_NONE) device_.flush(handle_);
  }
  FlushGuard(const FlushGuard&) = delete;
  FlushGuard& operator=(const FlushGuard&) = delete;

  // For ESYS output parameters. Only for a guard that holds nothing yet.
  ESYS_TR* out() { return &handle_; }
  ESYS_TR get() const { return handle_; }
  // The caller keeps the handle (and must flush it).
  ESYS_TR release() { return std::exchange(handle_, ESYS_TR_NONE); }

 private:
  Device& device_;
  ESYS_TR handle_ = ESYS_TR_NONE;
};

// Frees memory ESYS returned (Esys_Free) when it goes out of scope.
template <typename T>
struct EsysFree {
  void operator()(T* p) const { Esys_Free(p); }
};
template <typename T>
using EsysPtr = std::unique_ptr<T, EsysFree<T>>;

// Like EsysPtr, for replies that carry a secret (an ECDH Z): the memory is wiped before it is
// freed.
template <typename T>
struct EsysWipeFree {
  void operator()(T* p) const {
    secure_wipe(std::as_writable_bytes(std::span<T, 1>(p, 1)));
    Esys_Free(p);
  }
};
template <typename T>
using EsysSecretPtr = std::unique_ptr<T, EsysWipeFree<T>>;

}  // namespace medgate::hsm::tpm2
