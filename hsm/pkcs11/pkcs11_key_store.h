// The PKCS#11 key store: the signing key lives on a token (SoftHSM, a smart card, a network HSM)
// named by an RFC 7512 URI. Private to hsm/: the rest of medgate reaches it through
// open_key_store() (hsm/key_store_factory.h).
//
// The URI: path attributes token, manufacturer, serial, model, slot-id, slot-description,
// slot-manufacturer and library-* select the token; object (default "medgate-signing") and id
// select the key pair. Query attributes: module-path (the module's absolute file name) or
// module-name (a p11-kit module name such as "softhsm2", or a file in
// /usr/lib/x86_64-linux-gnu/pkcs11/); pin-source=file:/path is used when the config gives no PIN
// source (the config's PIN source wins otherwise). pin-value is refused: a PIN does not belong in
// a config file or a process listing.
//
// Thread safety: a Pkcs11KeyStore holds one logged-in session and serializes its use with a
// mutex; all methods may be called from any thread. Several key stores may use the same module
// and token at once (see hsm/pkcs11/module.h).
#pragma once

#include <memory>
#include <mutex>
#include <string>

#include "hsm/key_store.h"
#include "hsm/key_store_factory.h"
#include "hsm/public_key.h"
#include "hsm/status.h"

namespace medgate::hsm::pkcs11 {

class Pkcs11Module;

class Pkcs11KeyStore final : public KeyStore {
 public:
  // Loads the module, finds the token, logs in with the PIN from config.pin (which is wiped from
  // memory once used) and looks the key pair up once; with kCreateIfMissing generates it on the
  // token (non-extractable, sign-only) when absent. Errors as documented for open_key_store().
  static Result<std::unique_ptr<Pkcs11KeyStore>> open(const KeyStoreConfig& config,
                                                      KeyPolicy policy);

  ~Pkcs11KeyStore() override;
  Pkcs11KeyStore(const Pkcs11KeyStore&) = delete;
  Pkcs11KeyStore& operator=(const Pkcs11KeyStore&) = delete;

  // CKM_ECDSA over the digest. kUnavailable when the token is gone or the session was lost; the
  // key store does not reconnect (reopen it).
  Result<Bytes> sign_digest(const Hash& digest) override;
  PublicKey signing_key() const override { return public_key_; }
  Result<Bytes> random(std::size_t n) override;
  std::string description() const override { return description_; }

  // Not yet implemented (issue 3, in progress).
  Result<Bytes> sign_digest_with(const KeyId& key, const Hash& digest) override {
    if (key != public_key_.id()) return Status::NotFound("no such signing key");
    return sign_digest(digest);
  }
  std::vector<PublicKey> signing_keys() const override { return {public_key_}; }
  Status use_signing_key(const KeyId& key) override {
    return key == public_key_.id() ? Status::Ok() : Status::NotFound("no such signing key");
  }
  Result<PublicKey> create_signing_key() override { return Status::FailedPrecondition("not implemented yet"); }
  Result<Bytes> wrap_key(ByteView, ByteView) override { return Status::FailedPrecondition("not implemented yet"); }
  Result<SecretBytes> unwrap_key(ByteView, ByteView) override {
    return Status::FailedPrecondition("not implemented yet");
  }
  Result<Hash> keyed_hash(ByteView) override { return Status::FailedPrecondition("not implemented yet"); }
  CounterKind counter_kind() const override { return CounterKind::kTokenObject; }
  Result<std::uint64_t> read_counter() override { return Status::FailedPrecondition("not implemented yet"); }
  Result<std::uint64_t> increment_counter() override { return Status::FailedPrecondition("not implemented yet"); }
  KeyStoreHealth health() const override { return {}; }

 private:
  Pkcs11KeyStore(std::shared_ptr<Pkcs11Module> module, unsigned long session,
                 unsigned long private_key, PublicKey public_key, std::string token_label,
                 std::string description);

  const std::shared_ptr<Pkcs11Module> module_;
  std::mutex mutex_;                 // guards every use of session_
  const unsigned long session_;      // CK_SESSION_HANDLE, logged in as CKU_USER
  const unsigned long private_key_;  // CK_OBJECT_HANDLE of the signing key
  const PublicKey public_key_;
  const std::string token_label_;
  const std::string description_;
};

}  // namespace medgate::hsm::pkcs11
