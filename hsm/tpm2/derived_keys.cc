#include "hsm/tpm2/derived_keys.h"

#include <openssl/core_names.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/kdf.h>
#include <openssl/params.h>
#include <openssl/rand.h>

#include <memory>
#include <string_view>

namespace medgate::hsm::tpm2 {
namespace {

constexpr std::byte kVersion{0x01};
constexpr std::size_t kIvBytes = 12;
constexpr std::size_t kTagBytes = 16;
constexpr std::string_view kKekInfo = "medgate kek v1";
constexpr std::string_view kPseudonymInfo = "medgate pseudonym v1";

using CipherCtx = std::unique_ptr<EVP_CIPHER_CTX, decltype(&EVP_CIPHER_CTX_free)>;

Status hkdf_sha256(ByteView secret, std::string_view info, std::span<std::byte> out) {
  std::unique_ptr<EVP_KDF, decltype(&EVP_KDF_free)> kdf(EVP_KDF_fetch(nullptr, "HKDF", nullptr),
                                                        EVP_KDF_free);
  if (!kdf) return Status::Internal("OpenSSL has no HKDF");
  std::unique_ptr<EVP_KDF_CTX, decltype(&EVP_KDF_CTX_free)> ctx(EVP_KDF_CTX_new(kdf.get()),
                                                                EVP_KDF_CTX_free);
  char digest[] = "SHA256";
  std::array<OSSL_PARAM, 4> params = {
      OSSL_PARAM_construct_utf8_string(OSSL_KDF_PARAM_DIGEST, digest, 0),
      OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_KEY, const_cast<std::byte*>(secret.data()),
                                        secret.size()),
      OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_INFO, const_cast<char*>(info.data()),
                                        info.size()),
      OSSL_PARAM_construct_end()};
  if (!ctx || EVP_KDF_derive(ctx.get(), u8(out), out.size(), params.data()) != 1)
    return Status::Internal("HKDF-SHA256 failed");
  return Status::Ok();
}

}  // namespace

Result<DerivedKeys> DerivedKeys::derive(ByteView secret) {
  DerivedKeys keys;
  MEDGATE_RETURN_IF_ERROR(hkdf_sha256(secret, kKekInfo, keys.kek_));
  MEDGATE_RETURN_IF_ERROR(hkdf_sha256(secret, kPseudonymInfo, keys.pseudonym_key_));
  return keys;
}

DerivedKeys::DerivedKeys(DerivedKeys&& other) noexcept
    : kek_(other.kek_), pseudonym_key_(other.pseudonym_key_) {
  secure_wipe(other.kek_);
  secure_wipe(other.pseudonym_key_);
}

DerivedKeys& DerivedKeys::operator=(DerivedKeys&& other) noexcept {
  if (this != &other) {
    kek_ = other.kek_;
    pseudonym_key_ = other.pseudonym_key_;
    secure_wipe(other.kek_);
    secure_wipe(other.pseudonym_key_);
  }
  return *this;
}

DerivedKeys::~DerivedKeys() {
  secure_wipe(kek_);
  secure_wipe(pseudonym_key_);
}

Result<Bytes> DerivedKeys::wrap(ByteView key, ByteView context) const {
  if (key.empty() || key.size() > kMaxDataKeyBytes)
    return Status::InvalidArgument("a data key to wrap must be 1 to " +
                                   std::to_string(kMaxDataKeyBytes) + " bytes, not " +
                                   std::to_string(key.size()));
  Bytes out(1 + kIvBytes + key.size() + kTagBytes);
  out[0] = kVersion;
  std::span<std::byte> iv(out.data() + 1, kIvBytes);
  if (RAND_bytes(u8(iv), static_cast<int>(iv.size())) != 1)
    return Status::Internal("OpenSSL's random generator failed");
  CipherCtx ctx(EVP_CIPHER_CTX_new(), EVP_CIPHER_CTX_free);
  int n = 0;
  bool ok = ctx && EVP_EncryptInit_ex(ctx.get(), EVP_aes_256_gcm(), nullptr, u8(kek_), u8(iv)) == 1;
  if (ok && !context.empty())
    ok = EVP_EncryptUpdate(ctx.get(), nullptr, &n, u8(context), static_cast<int>(context.size())) ==
         1;
  unsigned char* ciphertext = u8(std::span<std::byte>(out)) + 1 + kIvBytes;
  ok = ok &&
       EVP_EncryptUpdate(ctx.get(), ciphertext, &n, u8(key), static_cast<int>(key.size())) == 1;
  ok = ok && EVP_EncryptFinal_ex(ctx.get(), ciphertext + n, &n) == 1;
  ok = ok && EVP_CIPHER_CTX_ctrl(ctx.get(), EVP_CTRL_GCM_GET_TAG, static_cast<int>(kTagBytes),
                                 ciphertext + key.size()) == 1;
  if (!ok) return Status::Internal("AES-256-GCM encryption failed");
  return out;
}

Result<SecretBytes> DerivedKeys::unwrap(ByteView wrapped, ByteView context) const {
  if (wrapped.size() < 1 + kIvBytes + 1 + kTagBytes ||
      wrapped.size() > 1 + kIvBytes + kMaxDataKeyBytes + kTagBytes)
    return Status::InvalidArgument("a wrapped data key is " +
                                   std::to_string(1 + kIvBytes + 1 + kTagBytes) + " to " +
                                   std::to_string(1 + kIvBytes + kMaxDataKeyBytes + kTagBytes) +
                                   " bytes, not " + std::to_string(wrapped.size()));
  if (wrapped[0] != kVersion)
    return Status::InvalidArgument("unknown wrapped data key version " +
                                   std::to_string(std::to_integer<unsigned>(wrapped[0])));
  ByteView iv = wrapped.subspan(1, kIvBytes);
  ByteView ciphertext = wrapped.subspan(1 + kIvBytes, wrapped.size() - 1 - kIvBytes - kTagBytes);
  Bytes tag(wrapped.end() - kTagBytes, wrapped.end());
  Bytes plain(ciphertext.size());
  CipherCtx ctx(EVP_CIPHER_CTX_new(), EVP_CIPHER_CTX_free);
  int n = 0;
  bool ok = ctx && EVP_DecryptInit_ex(ctx.get(), EVP_aes_256_gcm(), nullptr, u8(kek_), u8(iv)) == 1;
  if (ok && !context.empty())
    ok = EVP_DecryptUpdate(ctx.get(), nullptr, &n, u8(context), static_cast<int>(context.size())) ==
         1;
  ok = ok && EVP_DecryptUpdate(ctx.get(), u8(std::span<std::byte>(plain)), &n, u8(ciphertext),
                               static_cast<int>(ciphertext.size())) == 1;
  ok = ok && EVP_CIPHER_CTX_ctrl(ctx.get(), EVP_CTRL_GCM_SET_TAG, static_cast<int>(kTagBytes),
                                 tag.data()) == 1;
  if (!ok) {
    secure_wipe(plain);
    return Status::Internal("AES-256-GCM decryption could not run");
  }
  int final_n = 0;
  if (EVP_DecryptFinal_ex(ctx.get(), u8(std::span<std::byte>(plain)) + n, &final_n) != 1) {
    secure_wipe(plain);
    return Status::VerificationFailed(
        "the wrapped data key does not authenticate: it was altered, or wrapped with another "
        "context or key");
  }
  return SecretBytes(std::move(plain));
}

Hash DerivedKeys::keyed_hash(ByteView message) const {
  Hash out{};
  unsigned int n = 0;
  HMAC(EVP_sha256(), u8(pseudonym_key_), static_cast<int>(pseudonym_key_.size()), u8(message),
       message.size(), u8(std::span<std::byte>(out)), &n);
  return out;
}

}  // namespace medgate::hsm::tpm2
