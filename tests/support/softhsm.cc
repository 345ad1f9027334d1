#include "tests/support/softhsm.h"

#include <catch2/catch.hpp>

#include <stdexcept>

namespace medgate::testing {

SoftHsmToken::SoftHsmToken(const std::filesystem::path& dir, std::string label)
    : label_(std::move(label)) {
  Result<hsm::KeyStoreConfig> config =
      hsm::create_softhsm_token(dir / "softhsm", label_, dir / "pin");
  if (!config.ok())
    throw std::runtime_error("cannot provision SoftHSM token " + label_ + ": " +
                             config.status().to_string());
  config_ = std::move(config).value();
}

std::unique_ptr<hsm::KeyStore> SoftHsmToken::open_with_key() {
  Result<std::unique_ptr<hsm::KeyStore>> store =
      hsm::open_key_store(config_, hsm::KeyPolicy::kCreateIfMissing);
  INFO(store.status().to_string());
  REQUIRE(store.ok());
  return std::move(store).value();
}

}  // namespace medgate::testing
