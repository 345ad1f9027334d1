// Real key stores for backend-generic tests: each backend name stands for a real device in the
// test's own directory ("softhsm": a SoftHSM token provisioned like `medctl init` does it).
//
// To add a backend: give it a name in key_store_backends() and a TestKeyStore::Backend subclass in
// key_stores.cc that brings the device up in `dir` (and down again in its destructor) and returns
// the KeyStoreConfig that opens it.
//
// One TestKeyStore at a time per process: SoftHSM reads its configuration once per process (see
// tests/support/softhsm.h). Close every key store opened from one before creating the next.
#pragma once

#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "hsm/key_store.h"
#include "hsm/key_store_factory.h"
#include "hsm/status.h"

namespace medgate::testing {

// The backends every key-store contract test runs on.
std::vector<std::string> key_store_backends();

class TestKeyStore {
 public:
  // Brings up a fresh device of `backend` under `dir`, which must outlive this object. Throws
  // std::runtime_error for an unknown backend or when the device cannot be provisioned.
  TestKeyStore(const std::string& backend, const std::filesystem::path& dir);
  ~TestKeyStore();
  TestKeyStore(const TestKeyStore&) = delete;
  TestKeyStore& operator=(const TestKeyStore&) = delete;

  const std::string& backend() const { return name_; }
  const hsm::KeyStoreConfig& config() const;

  // Opens the key store; REQUIREs success.
  std::unique_ptr<hsm::KeyStore> open(hsm::KeyPolicy policy = hsm::KeyPolicy::kCreateIfMissing);
  // Opens the key store and returns what open_key_store() returned.
  Result<std::unique_ptr<hsm::KeyStore>> try_open(hsm::KeyPolicy policy);

  // One backend's device; see the file comment.
  class Backend {
   public:
    virtual ~Backend() = default;
    virtual const hsm::KeyStoreConfig& config() const = 0;
  };

 private:
  std::string name_;
  std::unique_ptr<Backend> backend_;
};

}  // namespace medgate::testing
