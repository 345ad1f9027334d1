// The PKCS#11 key store: the signing keys, the KEK, the pseudonym key and the rollback counter live
// on a token (SoftHSM, a smart card, a network HSM) named by an RFC 7512 URI. Private to hsm/: the
// rest of medgate reaches it through open_key_store() (hsm/key_store_factory.h).
//
// The URI: path attributes token, manufacturer, serial, model, slot-id, slot-description,
// slot-manufacturer and library-* select the token; object (default "medgate-signing") is the
// label of the signing key pairs and id selects the one that is active at open. Query attributes:
// module-path (the module's absolute file name) or module-name (a p11-kit module name such as
// "softhsm2", or a file in /usr/lib/x86_64-linux-gnu/pkcs11/); pin-source=file:/path is used when
// the config gives no PIN source (the config's PIN source wins otherwise). pin-value is refused: a
// PIN does not belong in a config file or a process listing.
//
// What is on the token (labels are fixed except the signing keys'):
//   - EC P-256 key pairs labelled with the URI's object label, one per signing key; CKA_ID is a
//     4-byte big-endian sequence number (creation order) followed by the first 16 bytes of the
//     key id. The private halves are sensitive, non-extractable and sign-only.
//   - "medgate-kek": an AES-256 secret key (encrypt/decrypt only, sensitive, non-extractable).
//     wrap_key() output: 0x01 || 12-byte IV || AES-GCM ciphertext || 16-byte tag, AAD = context.
//   - "medgate-pseudonym": a 32-byte generic secret for CKM_SHA256_HMAC (sign only).
//   - "medgate-counter": a private CKO_DATA object of application "medgate" whose CKA_VALUE is the
//     counter, 8 bytes big-endian. PKCS#11 does not promise that a data object's value can be
//     changed (SoftHSM refuses), so an increment replaces the object: it creates the successor,
//     then destroys the predecessor, and a reader takes the largest value it finds.
//
// The token going away: when a call fails because the session or the login was lost (the token
// was reset, unplugged, or someone closed every session on the slot), the key store opens a new
// session, logs in again with a PIN read afresh from its PinSource, looks its objects up again by
// label and CKA_ID, and retries the call once; health() counts errors and reconnects.
//
// Thread safety: a Pkcs11KeyStore holds one logged-in session and serializes its use with a
// mutex; all methods may be called from any thread. Several key stores may use the same module
// and token at once (see hsm/pkcs11/module.h).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "hsm/key_store.h"
#include "hsm/key_store_factory.h"
#include "hsm/public_key.h"
#include "hsm/status.h"

namespace medgate::hsm::pkcs11 {

class Pkcs11Module;

class Pkcs11KeyStore final : public KeyStore {
 public:
  // Loads the module, finds the token, logs in with the PIN from the PIN source (read, used and
  // wiped; the source is kept to log in again after a reconnect) and looks every object up once.
  // kUseExisting: a missing object is kNotFound naming it. kCreateIfMissing: generates on the
  // token whatever is missing (the first signing key, the KEK, the pseudonym key, the counter at
  // 1). Other errors as documented for open_key_store().
  static Result<std::unique_ptr<Pkcs11KeyStore>> open(const KeyStoreConfig& config,
                                                      KeyPolicy policy);

  ~Pkcs11KeyStore() override;
  Pkcs11KeyStore(const Pkcs11KeyStore&) = delete;
  Pkcs11KeyStore& operator=(const Pkcs11KeyStore&) = delete;

  // CKM_ECDSA over the digest. kUnavailable when the token stays unreachable after one reconnect.
  Result<Bytes> sign_digest(const Hash& digest) override;
  Result<Bytes> sign_digest_with(const KeyId& key, const Hash& digest) override;
  // At open the key the URI's id= names is active, else the oldest: a key created but never put
  // to use changes nothing when the store is reopened.
  PublicKey signing_key() const override;
  // Oldest first, by the sequence number in CKA_ID.
  std::vector<PublicKey> signing_keys() const override;
  Status use_signing_key(const KeyId& key) override;
  // Generates the pair with the same template as the first key and the next sequence number.
  Result<PublicKey> create_signing_key() override;

  Result<Bytes> wrap_key(ByteView key, ByteView context) override;
  Result<SecretBytes> unwrap_key(ByteView wrapped, ByteView context) override;
  Result<Hash> keyed_hash(ByteView message) override;

  // A P-256 pair labelled "medgate-agreement" (private half: CKA_DERIVE only, sensitive, never
  // extractable), looked up by label on each use (agreement is rare). agree() is
  // C_DeriveKey(CKM_ECDH1_DERIVE, CKD_NULL) into a session object of the generic-secret type,
  // whose value is read once and the object destroyed.
  Result<PublicKey> agreement_key() override;
  Result<SecretBytes> agree(const PublicKey& peer) override;

  CounterKind counter_kind() const override { return CounterKind::kTokenObject; }
  Result<std::uint64_t> read_counter() override;
  Result<std::uint64_t> increment_counter() override;

  Result<Bytes> random(std::size_t n) override;
  std::string description() const override;
  KeyStoreHealth health() const override;

  // Private to pkcs11_key_store.cc (public so that its helpers can name them).
  struct Request;
  struct SigningKey {
    PublicKey public_key;
    Bytes ckid;                 // CKA_ID
    unsigned long private_key;  // CK_OBJECT_HANDLE; looked up again after a reconnect
  };

 private:
  Pkcs11KeyStore(std::shared_ptr<Pkcs11Module> module, std::unique_ptr<const Request> request,
                 std::string token_label, unsigned long session, std::vector<SigningKey> keys,
                 std::size_t active, unsigned long kek, unsigned long pseudonym);

  // Runs `attempt` (a callable taking the session's Token, defined in the .cc) under the lock.
  // `attempt` reports through the Token the CK_RV of a PKCS#11 call that failed; when that says
  // the session, the login or the handles were lost, the store reconnects and runs `attempt`
  // once more, and a second failure is kUnavailable naming the token.
  template <typename T, typename Attempt>
  Result<T> with_session(Attempt attempt);
  // Opens a new session, logs in and finds every object again by label and CKA_ID; on success
  // replaces session_ and the handles. Called with mutex_ held.
  Status reconnect_locked();
  void note_error_locked(unsigned long rv);

  const std::shared_ptr<Pkcs11Module> module_;
  const std::unique_ptr<const Request> request_;  // the parsed URI and the PIN source
  const std::string token_label_;

  mutable std::mutex mutex_;      // guards everything below and every use of session_
  unsigned long session_;         // CK_SESSION_HANDLE, logged in as CKU_USER
  std::vector<SigningKey> keys_;  // oldest first
  std::size_t active_;            // index into keys_
  unsigned long kek_;
  unsigned long pseudonym_;
  // The counter has no cached handle: increment_counter() replaces its object (see the .cc), so
  // it is looked up by label on every use.
  KeyStoreHealth health_;
};

}  // namespace medgate::hsm::pkcs11

namespace medgate::hsm::pkcs11 {

// The TLS server key (hsm/tls_key.h) on the token the key store's URI names: a P-256 pair
// labelled `label` with the signing keys' template (private half sensitive, non-extractable,
// sign-only). `module` keeps the module initialised for as long as the caller holds it.
struct TokenTlsKey {
  PublicKey public_key;
  bool created = false;
  std::string module_path;
  // "pkcs11:token=...;object=...;type=private" for libp11's engine: no PIN, no module.
  std::string key_uri;
  PinSource pin;
  std::shared_ptr<Pkcs11Module> module;
};

// Finds the pair labelled `label`, or generates it when it is absent and `create` is set.
// kNotFound when it is absent and `create` is not set; other errors as Pkcs11KeyStore::open().
Result<TokenTlsKey> find_or_create_tls_key(const KeyStoreConfig& config, const std::string& label,
                                           bool create);

}  // namespace medgate::hsm::pkcs11
