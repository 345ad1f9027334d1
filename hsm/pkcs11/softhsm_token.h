// Provisioning of an embedded SoftHSM token (`medctl init --key-store softhsm`). Private to hsm/:
// callers use hsm::create_softhsm_token() (hsm/key_store_factory.h), whose contract this is.
#pragma once

#include <filesystem>
#include <string>
#include <string_view>

#include "hsm/key_store_factory.h"
#include "hsm/status.h"

namespace medgate::hsm::pkcs11 {

// Debian's SoftHSM module (a symlink into /usr/lib/x86_64-linux-gnu/softhsm/).
inline constexpr std::string_view kSoftHsmModule = "/usr/lib/softhsm/libsofthsm2.so";

// Writes `dir`/softhsm2.conf and `dir`/tokens, initialises a token labelled `label` with random
// SO and user PINs through PKCS#11 and writes the user PIN to `pin_file` (created 0600, must not
// exist). The label must be 1-32 characters of [A-Za-z0-9._-] so that it goes into the URI as is.
Result<KeyStoreConfig> provision_softhsm_token(const std::filesystem::path& dir,
                                               const std::string& label,
                                               const std::filesystem::path& pin_file);

}  // namespace medgate::hsm::pkcs11
