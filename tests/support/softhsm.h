// A fresh SoftHSM token in a test's own directory, provisioned the way `medctl init` does it
// (hsm::create_softhsm_token), so tests exercise the real PKCS#11 path.
//
// SoftHSM reads its configuration once per C_Initialize and a process initialises a module once,
// so only one token directory can be open at a time in a test process: close every key store of
// one SoftHsmToken before opening another's.
#pragma once

#include <filesystem>
#include <memory>
#include <string>

#include "hsm/key_store.h"
#include "hsm/key_store_factory.h"

namespace medgate::testing {

class SoftHsmToken {
 public:
  // Creates `dir`/softhsm (config and token files) and `dir`/pin (the user PIN, 0600). Throws
  // std::runtime_error when provisioning fails. `dir` must outlive this object's use.
  explicit SoftHsmToken(const std::filesystem::path& dir, std::string label = "test");

  const hsm::KeyStoreConfig& config() const { return config_; }
  const std::string& label() const { return label_; }

  // Opens the token, generating the signing key on first use; REQUIREs success.
  std::unique_ptr<hsm::KeyStore> open_with_key();

 private:
  std::string label_;
  hsm::KeyStoreConfig config_;
};

}  // namespace medgate::testing
