// Public keys and signature checks with OpenSSL only: what a verifier on an auditor's machine
// needs, with no HSM, TPM or daemon. Safe to use from any thread.
#pragma once

#include <string>
#include <string_view>

#include "hsm/bytes.h"
#include "hsm/status.h"

namespace medgate {

// A key id is SHA-256 of the key's DER SubjectPublicKeyInfo (the same fingerprint
// `openssl pkey -pubin -outform DER | sha256sum` prints).
using KeyId = Hash;

// An ECDSA P-256 public key, held as DER SubjectPublicKeyInfo.
class PublicKey {
 public:
  // Checks that the DER is a P-256 SubjectPublicKeyInfo with a point on the curve.
  static Result<PublicKey> from_spki_der(ByteView der);
  // Reads the first "-----BEGIN PUBLIC KEY-----" block.
  static Result<PublicKey> from_pem(std::string_view pem);

  const Bytes& spki_der() const { return der_; }
  // The point in SEC 1 uncompressed form (0x04 || x || y, 65 bytes): what PKCS#11's ECDH and a TPM
  // take as the peer's public value.
  Bytes uncompressed_point() const;
  const KeyId& id() const { return id_; }
  std::string pem() const;

  // Checks a DER ECDSA-Sig-Value over a SHA-256 digest. kVerificationFailed when the signature
  // does not match, kInvalidArgument when it is not DER.
  Status verify_digest(const Hash& digest, ByteView der_signature) const;

  friend bool operator==(const PublicKey& a, const PublicKey& b) { return a.der_ == b.der_; }

 private:
  PublicKey(Bytes der, KeyId id) : der_(std::move(der)), id_(id) {}
  Bytes der_;
  KeyId id_{};
};

// Converts a raw r||s signature (what PKCS#11 CKM_ECDSA returns) to DER ECDSA-Sig-Value.
Result<Bytes> ecdsa_raw_to_der(ByteView raw);

}  // namespace medgate
