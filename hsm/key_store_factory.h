// Opens the key store a config names. The only place outside a backend that knows the backends.
#pragma once

#include <filesystem>
#include <memory>
#include <optional>
#include <string>

#include "hsm/key_store.h"
#include "hsm/pin.h"
#include "hsm/status.h"

namespace medgate::hsm {

struct KeyStoreConfig {
  // "pkcs11:token=...;object=...?module-path=..." (RFC 7512). Later: "tpm2:TCTI".
  std::string uri;
  PinSource pin;
  // For the embedded SoftHSM token: its softhsm2.conf, exported as SOFTHSM2_CONF before the module
  // is initialised.
  std::optional<std::filesystem::path> softhsm_conf;
};

enum class KeyPolicy {
  kUseExisting,     // the signing key must already be on the token (medgated)
  kCreateIfMissing  // generate it on the token when absent (medctl init)
};

// kUnavailable: the module cannot be loaded or the token is absent. kPermissionDenied: wrong
// PIN. kInvalidArgument: the URI or PIN source is malformed. kNotFound: no signing key and
// kUseExisting.
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
