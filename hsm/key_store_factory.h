// Opens the key store a config names. The only place outside a backend that knows the backends.
#pragma once

#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <vector>
#include <cstdint>

#include "hsm/key_store.h"
#include "hsm/pin.h"
#include "hsm/status.h"

namespace medgate::hsm {

struct KeyStoreConfig {
  // "pkcs11:token=...;object=...?module-path=..." (RFC 7512), or "tpm2:TCTI" where TCTI is a
  // tctildr string ("device:/dev/tpmrm0", "swtpm:host=127.0.0.1,port=2321"); plain "tpm2" means
  // "tpm2:device:/dev/tpmrm0".
  std::string uri;
  PinSource pin;
  // For the embedded SoftHSM token: its softhsm2.conf, exported as SOFTHSM2_CONF before the module
  // is initialised.
  std::optional<std::filesystem::path> softhsm_conf;
  // TPM only: the directory holding the key blobs (public/private parts of keys created under
  // the primary key, and of the sealed secret). They are useless without the TPM that made them.
  std::filesystem::path key_dir;
  // TPM only: PCRs (SHA-256 bank) the data-key secret is sealed to, e.g. {7}; empty: no policy.
  std::vector<unsigned> seal_pcrs;
  // TPM only: the NV index of the rollback counter (owner range 0x01000000-0x013fffff).
  std::uint32_t counter_nv_index = 0x01504d47;
};

enum class KeyPolicy {
  // Every key and the counter must already exist (medgated).
  kUseExisting,
  // Create whatever is absent: the first signing key, the KEK (TPM: the sealed secret), the
  // pseudonym key and the counter, which starts at 1 (medctl init).
  kCreateIfMissing
};

// kUnavailable: the module cannot be loaded, the token is absent or the TPM does not answer.
// kPermissionDenied: wrong PIN. kInvalidArgument: the URI or PIN source is malformed. kNotFound:
// a key or the counter is missing and kUseExisting. kFailedPrecondition: the TPM refuses to
// unseal the data-key secret because the PCRs it is sealed to changed.
Result<std::unique_ptr<KeyStore>> open_key_store(const KeyStoreConfig& config,
                                                 KeyPolicy policy = KeyPolicy::kUseExisting);

// Makes a fresh SoftHSM token for `medctl init --key-store softhsm`: writes `dir`/softhsm2.conf and
// a token directory under `dir`, initialises a token labelled `label` through PKCS#11
// (C_InitToken/C_InitPIN, so no PIN ever appears on a command line) and returns the
// KeyStoreConfig that opens it. The PINs are random; the user PIN is written to `pin_file` (0600).
Result<KeyStoreConfig> create_softhsm_token(const std::filesystem::path& dir,
                                            const std::string& label,
                                            const std::filesystem::path& pin_file);

}  // namespace medgate::hsm
