#include "tests/support/key_stores.h"

#include <catch2/catch.hpp>

#include <stdexcept>

#include "tests/support/softhsm.h"

namespace medgate::testing {
namespace {

class SoftHsmBackend final : public TestKeyStore::Backend {
 public:
  explicit SoftHsmBackend(const std::filesystem::path& dir) : token_(dir) {}
  const hsm::KeyStoreConfig& config() const override { return token_.config(); }

 private:
  SoftHsmToken token_;
};

}  // namespace

std::vector<std::string> key_store_backends() {
  return {"softhsm"};
}

TestKeyStore::TestKeyStore(const std::string& backend, const std::filesystem::path& dir)
    : name_(backend) {
  if (backend == "softhsm")
    backend_ = std::make_unique<SoftHsmBackend>(dir);
  else
    throw std::runtime_error("unknown key store backend '" + backend + "'");
}

TestKeyStore::~TestKeyStore() = default;

const hsm::KeyStoreConfig& TestKeyStore::config() const {
  return backend_->config();
}

Result<std::unique_ptr<hsm::KeyStore>> TestKeyStore::try_open(hsm::KeyPolicy policy) {
  return hsm::open_key_store(config(), policy);
}

std::unique_ptr<hsm::KeyStore> TestKeyStore::open(hsm::KeyPolicy policy) {
  Result<std::unique_ptr<hsm::KeyStore>> store = try_open(policy);
  INFO(name_ << ": " << store.status().to_string());
  REQUIRE(store.ok());
  return std::move(store).value();
}

}  // namespace medgate::testing
