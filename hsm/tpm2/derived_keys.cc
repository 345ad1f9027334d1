#include "hsm/tpm2/derived_keys.h"

#include <openssl/evp.h>
#include <openssl/hmac.h>

#include <string_view>

#include "hsm/aead.h"

namespace medgate::hsm::tpm2 {
namespace {

// The wrapped format is fixed on disk (wrapped data keys live in the vault): these constants and
// the HKDF info strings must never change; hsm/aead.h only does the arithmetic.
constexpr std::byte kVersion{0x01};
constexpr std::string_view kKekInfo = "medgate kek v1";
constexpr std::string_view kPseudonymInfo = "medgate pseudonym v1";
constexpr std::size_t kMinWrapped = 1 + kGcmIvBytes + 1 + kGcmTagBytes;
constexpr std::size_t kMaxWrapped = 1 + kGcmIvBytes + DerivedKeys::kMaxDataKeyBytes + kGcmTagBytes;

}  // namespace

Result<DerivedKeys> DerivedKeys::derive(ByteView secret) {
  DerivedKeys keys;
  // No salt: the secret is 64 uniformly random bytes from the TPM.
  MEDGATE_RETURN_IF_ERROR(hkdf_sha256(secret, {}, as_bytes(kKekInfo), keys.kek_));
  MEDGATE_RETURN_IF_ERROR(hkdf_sha256(secret, {}, as_bytes(kPseudonymInfo), keys.pseudonym_key_));
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
  MEDGATE_ASSIGN_OR_RETURN(Bytes sealed, gcm_seal(kek_, context, key));
  Bytes out;
  out.reserve(1 + sealed.size());
  out.push_back(kVersion);
  out.insert(out.end(), sealed.begin(), sealed.end());
  return out;
}

Result<SecretBytes> DerivedKeys::unwrap(ByteView wrapped, ByteView context) const {
  if (wrapped.size() < kMinWrapped || wrapped.size() > kMaxWrapped)
    return Status::InvalidArgument("a wrapped data key is " + std::to_string(kMinWrapped) + " to " +
                                   std::to_string(kMaxWrapped) + " bytes, not " +
                                   std::to_string(wrapped.size()));
  if (wrapped[0] != kVersion)
    return Status::InvalidArgument("unknown wrapped data key version " +
                                   std::to_string(std::to_integer<unsigned>(wrapped[0])));
  Result<Bytes> plain = gcm_open(kek_, context, wrapped.subspan(1));
  if (!plain.ok()) {
    if (plain.status().code() == StatusCode::kVerificationFailed)
      return Status::VerificationFailed(
          "the wrapped data key does not authenticate: it was altered, or wrapped with another "
          "context or key");
    return plain.status();
  }
  return SecretBytes(std::move(plain).value());
}

Hash DerivedKeys::keyed_hash(ByteView message) const {
  Hash out{};
  unsigned int n = 0;
  HMAC(EVP_sha256(), u8(pseudonym_key_), static_cast<int>(pseudonym_key_.size()), u8(message),
       message.size(), u8(std::span<std::byte>(out)), &n);
  return out;
}

}  // namespace medgate::hsm::tpm2
