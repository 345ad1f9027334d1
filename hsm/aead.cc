#include "hsm/aead.h"

#include <openssl/core_names.h>
#include <openssl/evp.h>
#include <openssl/kdf.h>
#include <openssl/params.h>
#include <openssl/rand.h>

#include <array>
#include <memory>
#include <string>

namespace medgate::hsm {
namespace {

constexpr std::size_t kKeyBytes = 32;
// OpenSSL's EVP calls take int lengths.
constexpr std::size_t kMaxInput = std::size_t{1} << 30;

using CipherCtx = std::unique_ptr<EVP_CIPHER_CTX, decltype(&EVP_CIPHER_CTX_free)>;

Status check_sizes(ByteView key, ByteView aad, std::size_t text) {
  if (key.size() != kKeyBytes)
    return Status::InvalidArgument("an AES-256-GCM key is 32 bytes, not " +
                                   std::to_string(key.size()));
  if (aad.size() > kMaxInput || text > kMaxInput + kGcmIvBytes + kGcmTagBytes)
    return Status::InvalidArgument("AES-256-GCM input over 1 GiB");
  return Status::Ok();
}

}  // namespace

Status hkdf_sha256(ByteView secret, ByteView salt, ByteView info, std::span<std::byte> out) {
  std::unique_ptr<EVP_KDF, decltype(&EVP_KDF_free)> kdf(EVP_KDF_fetch(nullptr, "HKDF", nullptr),
                                                        EVP_KDF_free);
  if (!kdf) return Status::Internal("OpenSSL has no HKDF");
  std::unique_ptr<EVP_KDF_CTX, decltype(&EVP_KDF_CTX_free)> ctx(EVP_KDF_CTX_new(kdf.get()),
                                                                EVP_KDF_CTX_free);
  char digest[] = "SHA256";
  std::array<OSSL_PARAM, 5> params{};
  std::size_t n = 0;
  params[n++] = OSSL_PARAM_construct_utf8_string(OSSL_KDF_PARAM_DIGEST, digest, 0);
  params[n++] = OSSL_PARAM_construct_octet_string(
      OSSL_KDF_PARAM_KEY, const_cast<std::byte*>(secret.data()), secret.size());
  if (!salt.empty())
    params[n++] = OSSL_PARAM_construct_octet_string(
        OSSL_KDF_PARAM_SALT, const_cast<std::byte*>(salt.data()), salt.size());
  params[n++] = OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_INFO,
                                                  const_cast<std::byte*>(info.data()), info.size());
  params[n] = OSSL_PARAM_construct_end();
  if (!ctx || EVP_KDF_derive(ctx.get(), u8(out), out.size(), params.data()) != 1)
    return Status::Internal("HKDF-SHA256 failed");
  return Status::Ok();
}

Result<Bytes> gcm_seal(ByteView key, ByteView aad, ByteView plaintext) {
  MEDGATE_RETURN_IF_ERROR(check_sizes(key, aad, plaintext.size()));
  Bytes out(kGcmIvBytes + plaintext.size() + kGcmTagBytes);
  std::span<std::byte> iv(out.data(), kGcmIvBytes);
  std::span<std::byte> ct(out.data() + kGcmIvBytes, plaintext.size());
  std::span<std::byte> tag(out.data() + kGcmIvBytes + plaintext.size(), kGcmTagBytes);
  if (RAND_bytes(u8(iv), static_cast<int>(iv.size())) != 1)
    return Status::Internal("OpenSSL's random generator failed");
  CipherCtx c(EVP_CIPHER_CTX_new(), EVP_CIPHER_CTX_free);
  int n = 0;
  if (!c || EVP_EncryptInit_ex(c.get(), EVP_aes_256_gcm(), nullptr, u8(key), u8(iv)) != 1 ||
      EVP_EncryptUpdate(c.get(), nullptr, &n, u8(aad), static_cast<int>(aad.size())) != 1 ||
      EVP_EncryptUpdate(c.get(), u8(ct), &n, u8(plaintext), static_cast<int>(plaintext.size())) !=
          1 ||
      EVP_EncryptFinal_ex(c.get(), u8(ct) + n, &n) != 1 ||
      EVP_CIPHER_CTX_ctrl(c.get(), EVP_CTRL_GCM_GET_TAG, static_cast<int>(tag.size()), u8(tag)) !=
          1)
    return Status::Internal("AES-256-GCM encryption failed in OpenSSL");
  return out;
}

Result<Bytes> gcm_open(ByteView key, ByteView aad, ByteView sealed) {
  MEDGATE_RETURN_IF_ERROR(check_sizes(key, aad, sealed.size()));
  if (sealed.size() < kGcmIvBytes + kGcmTagBytes)
    return Status::VerificationFailed("AES-256-GCM input of " + std::to_string(sealed.size()) +
                                      " bytes is shorter than an IV and a tag");
  ByteView iv = sealed.first(kGcmIvBytes);
  ByteView ct = sealed.subspan(kGcmIvBytes, sealed.size() - kGcmIvBytes - kGcmTagBytes);
  Bytes tag(sealed.end() - kGcmTagBytes, sealed.end());
  Bytes out(ct.size());
  CipherCtx c(EVP_CIPHER_CTX_new(), EVP_CIPHER_CTX_free);
  int n = 0;
  if (!c || EVP_DecryptInit_ex(c.get(), EVP_aes_256_gcm(), nullptr, u8(key), u8(iv)) != 1 ||
      EVP_DecryptUpdate(c.get(), nullptr, &n, u8(aad), static_cast<int>(aad.size())) != 1 ||
      EVP_DecryptUpdate(c.get(), u8(std::span<std::byte>(out)), &n, u8(ct),
                        static_cast<int>(ct.size())) != 1 ||
      EVP_CIPHER_CTX_ctrl(c.get(), EVP_CTRL_GCM_SET_TAG, static_cast<int>(tag.size()),
                          tag.data()) != 1)
    return Status::Internal("AES-256-GCM decryption failed in OpenSSL");
  if (EVP_DecryptFinal_ex(c.get(), u8(std::span<std::byte>(out)) + n, &n) != 1) {
    secure_wipe(out);
    return Status::VerificationFailed("AES-256-GCM ciphertext does not authenticate");
  }
  return out;
}

}  // namespace medgate::hsm
