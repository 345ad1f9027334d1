#include "hsm/public_key.h"

#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/ec.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include <memory>

namespace medgate {
namespace {

struct PkeyFree {
  void operator()(EVP_PKEY* p) const { EVP_PKEY_free(p); }
};
using PkeyPtr = std::unique_ptr<EVP_PKEY, PkeyFree>;

PkeyPtr parse_spki(ByteView der) {
  const unsigned char* p = u8(der);
  PkeyPtr key(d2i_PUBKEY(nullptr, &p, static_cast<long>(der.size())));
  if (key && p != u8(der) + der.size()) return nullptr;  // trailing bytes
  return key;
}

bool is_p256(EVP_PKEY* key) {
  if (EVP_PKEY_get_base_id(key) != EVP_PKEY_EC) return false;
  char group[64] = {};
  std::size_t len = 0;
  if (EVP_PKEY_get_utf8_string_param(key, OSSL_PKEY_PARAM_GROUP_NAME, group, sizeof group, &len) !=
      1)
    return false;
  return std::string_view(group, len) == "prime256v1" || std::string_view(group, len) == "P-256";
}

}  // namespace

Result<PublicKey> PublicKey::from_spki_der(ByteView der) {
  PkeyPtr key = parse_spki(der);
  if (!key) return Status::InvalidArgument("not a DER SubjectPublicKeyInfo");
  if (!is_p256(key.get())) return Status::InvalidArgument("public key is not ECDSA P-256");
  // Re-encode so that the stored DER (and the key id) is the canonical encoding.
  unsigned char* out = nullptr;
  int n = i2d_PUBKEY(key.get(), &out);
  if (n <= 0) return Status::InvalidArgument("public key cannot be encoded");
  Bytes canonical(reinterpret_cast<std::byte*>(out), reinterpret_cast<std::byte*>(out) + n);
  OPENSSL_free(out);
  KeyId id = sha256(canonical);
  return PublicKey(std::move(canonical), id);
}

Bytes PublicKey::uncompressed_point() const {
  // A valid P-256 SPKI (from_spki_der re-encodes it canonically) ends in its 65-byte point.
  constexpr std::size_t kPoint = 65;
  return Bytes(der_.end() - static_cast<std::ptrdiff_t>(kPoint), der_.end());
}

Result<PublicKey> PublicKey::from_pem(std::string_view pem) {
  std::unique_ptr<BIO, decltype(&BIO_free)> bio(
      BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())), BIO_free);
  if (!bio) return Status::Internal("out of memory");
  PkeyPtr key(PEM_read_bio_PUBKEY(bio.get(), nullptr, nullptr, nullptr));
  if (!key) return Status::InvalidArgument("no PEM \"PUBLIC KEY\" block could be read");
  unsigned char* out = nullptr;
  int n = i2d_PUBKEY(key.get(), &out);
  if (n <= 0) return Status::InvalidArgument("public key cannot be encoded");
  Bytes der(reinterpret_cast<std::byte*>(out), reinterpret_cast<std::byte*>(out) + n);
  OPENSSL_free(out);
  return from_spki_der(der);
}

std::string PublicKey::pem() const {
  PkeyPtr key = parse_spki(der_);
  std::unique_ptr<BIO, decltype(&BIO_free)> bio(BIO_new(BIO_s_mem()), BIO_free);
  if (!key || !bio || PEM_write_bio_PUBKEY(bio.get(), key.get()) != 1) return {};
  char* data = nullptr;
  long len = BIO_get_mem_data(bio.get(), &data);
  return std::string(data, static_cast<std::size_t>(len));
}

Status PublicKey::verify_digest(const Hash& digest, ByteView der_signature) const {
  PkeyPtr key = parse_spki(der_);
  if (!key) return Status::Internal("stored public key does not parse");
  std::unique_ptr<EVP_PKEY_CTX, decltype(&EVP_PKEY_CTX_free)> ctx(
      EVP_PKEY_CTX_new(key.get(), nullptr), EVP_PKEY_CTX_free);
  if (!ctx || EVP_PKEY_verify_init(ctx.get()) != 1) return Status::Internal("OpenSSL verify init");
  int rc = EVP_PKEY_verify(ctx.get(), u8(der_signature), der_signature.size(),
                           reinterpret_cast<const unsigned char*>(digest.data()), digest.size());
  if (rc == 1) return Status::Ok();
  if (rc == 0) return Status::VerificationFailed("signature does not match");
  return Status::VerificationFailed("signature is malformed");
}

Result<Bytes> ecdsa_raw_to_der(ByteView raw) {
  if (raw.size() != 64) return Status::InvalidArgument("raw P-256 signature must be 64 bytes");
  std::unique_ptr<ECDSA_SIG, decltype(&ECDSA_SIG_free)> sig(ECDSA_SIG_new(), ECDSA_SIG_free);
  BIGNUM* r = BN_bin2bn(u8(raw.subspan(0, 32)), 32, nullptr);
  BIGNUM* s = BN_bin2bn(u8(raw.subspan(32, 32)), 32, nullptr);
  if (!sig || !r || !s || ECDSA_SIG_set0(sig.get(), r, s) != 1) {
    BN_free(r);
    BN_free(s);
    return Status::Internal("out of memory");
  }
  unsigned char* out = nullptr;
  int n = i2d_ECDSA_SIG(sig.get(), &out);
  if (n <= 0) return Status::Internal("cannot encode ECDSA signature");
  Bytes der(reinterpret_cast<std::byte*>(out), reinterpret_cast<std::byte*>(out) + n);
  OPENSSL_free(out);
  return der;
}

}  // namespace medgate
