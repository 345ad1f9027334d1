// The key-custody interface. Every key medgate uses lives inside a key store (a PKCS#11 token or a
// TPM 2.0); medgate asks it to sign, wrap, unwrap and MAC, never to hand a long-term key out in
// clear at rest.
//
// What a key store holds:
//   - ECDSA P-256 signing keys: one is active (signs heads); older ones stay for the transition
//     entry of a rotation (signed by the old and the new key). Which key is active is the
//     ledger's decision (its genesis entry and key transitions), not the store's: the ledger calls
//     use_signing_key() when it opens.
//   - A key-encryption key (KEK) that wraps per-patient data keys. PKCS#11: a non-extractable AES
//     key on the token (wrap = C_Encrypt with CKM_AES_GCM). TPM: a secret sealed to the TPM
//     (optionally to PCRs), unsealed once at open; the wrap runs in process memory.
//   - A pseudonym key for keyed pseudonyms of patient identifiers (HMAC-SHA256).
//   - A monotonic counter bound into signed heads for rollback detection. TPM: an NV counter.
//     PKCS#11: a private data object on the token (as strong as the token's own rollback
//     resistance; none when the token's files are restored together with the ledger).
//
// Thread safety: every method may be called from any thread; implementations serialize access
// to the device themselves. A KeyStore must outlive every object that was given a reference to it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "hsm/bytes.h"
#include "hsm/public_key.h"
#include "hsm/status.h"

namespace medgate::hsm {

// Key material in process memory (an unwrapped data key); wiped when destroyed.
class SecretBytes {
 public:
  SecretBytes() = default;
  explicit SecretBytes(Bytes bytes) : bytes_(std::move(bytes)) {}
  SecretBytes(SecretBytes&& other) noexcept : bytes_(std::move(other.bytes_)) {
    other.bytes_.clear();
  }
  SecretBytes& operator=(SecretBytes&& other) noexcept {
    if (this != &other) {
      secure_wipe(bytes_);
      bytes_ = std::move(other.bytes_);
      other.bytes_.clear();
    }
    return *this;
  }
  SecretBytes(const SecretBytes&) = delete;
  SecretBytes& operator=(const SecretBytes&) = delete;
  ~SecretBytes() { secure_wipe(bytes_); }

  ByteView view() const { return bytes_; }
  std::size_t size() const { return bytes_.size(); }

 private:
  Bytes bytes_;
};

enum class CounterKind {
  kTpmNv,        // a TPM NV index of type counter: survives any restore of the disk
  kTokenObject,  // a data object on a PKCS#11 token: as strong as the token's own storage
};

// What `medctl status` shows about the device.
struct KeyStoreHealth {
  bool reachable = true;
  std::string last_error;       // the latest device error, e.g. "TPM_RC_RETRY (0x922)", or ""
  std::uint64_t errors = 0;     // device errors since open
  std::uint64_t reconnects = 0; // sessions re-established after the device came back
};

class KeyStore {
 public:
  virtual ~KeyStore() = default;

  // ---- signing ----

  // Signs a SHA-256 digest with the active signing key and returns a DER ECDSA-Sig-Value. May take
  // ~200 ms on a hardware TPM: never call it per ledger entry. kUnavailable when the device cannot
  // be reached.
  virtual Result<Bytes> sign_digest(const Hash& digest) = 0;
  // Signs with a particular key this store holds (a rotation's transition entry is signed by the
  // old and the new key). kNotFound when the store does not hold `key`.
  virtual Result<Bytes> sign_digest_with(const KeyId& key, const Hash& digest) = 0;

  // The active signing key's public half (its id is the SHA-256 fingerprint of the SPKI).
  virtual PublicKey signing_key() const = 0;
  // Every signing key the store holds, oldest first.
  virtual std::vector<PublicKey> signing_keys() const = 0;
  // Makes a held key the active one. kNotFound when the store does not hold it.
  virtual Status use_signing_key(const KeyId& key) = 0;
  // Generates a new signing key inside the device (non-extractable, sign-only). It is not active
  // until use_signing_key(); a key created but never used is harmless.
  virtual Result<PublicKey> create_signing_key() = 0;

  // ---- data keys and pseudonyms ----

  // Wraps a data key (at most 64 bytes) under the KEK with `context` bound as associated data.
  virtual Result<Bytes> wrap_key(ByteView key, ByteView context) = 0;
  // Unwraps; kVerificationFailed when the blob was altered or `context` differs from the one it was
  // wrapped with.
  virtual Result<SecretBytes> unwrap_key(ByteView wrapped, ByteView context) = 0;
  // HMAC-SHA256 of `message` under the pseudonym key.
  virtual Result<Hash> keyed_hash(ByteView message) = 0;

  // ---- key agreement ----

  // The store's key-agreement key: a P-256 key for ECDH only, generated inside the device on the
  // first call and found again afterwards (PKCS#11: CKA_DERIVE only, sensitive, never extractable;
  // TPM: an ECDH-only key under the storage primary, decrypt but not sign, not a restricted key,
  // used through TPM2_ECDH_ZGen). A replicated ledger's members publish its public half so that
  // the secrets the cluster shares can be sealed to each of them (hsm/sealed_box.h); it never
  // signs anything.
  virtual Result<PublicKey> agreement_key() = 0;
  // ECDH of the agreement key with `peer`: the shared secret Z (the x-coordinate, 32 bytes), input
  // to a KDF and never a key itself. Creates the agreement key when there is none yet (there is
  // then nothing sealed to it, and the caller's KDF output will not authenticate).
  virtual Result<SecretBytes> agree(const PublicKey& peer) = 0;

  // ---- rollback counter ----

  virtual CounterKind counter_kind() const = 0;
  // The counter's value.
  virtual Result<std::uint64_t> read_counter() = 0;
  // Adds one and returns the new value. Rate-limited by hardware TPMs: call it rarely.
  virtual Result<std::uint64_t> increment_counter() = 0;

  // ---- misc ----

  // n bytes from the device's random number generator.
  virtual Result<Bytes> random(std::size_t n) = 0;

  // Where the keys are, for status and logs, with no secret in it (e.g. a pkcs11: URI without
  // any PIN attribute).
  virtual std::string description() const = 0;

  virtual KeyStoreHealth health() const = 0;
};

}  // namespace medgate::hsm
