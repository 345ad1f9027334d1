#include "hsm/sealed_box.h"

#include <openssl/evp.h>
#include <openssl/x509.h>

#include <algorithm>
#include <array>
#include <memory>
#include <string>

#include "hsm/aead.h"

namespace medgate::hsm {
namespace {

constexpr std::byte kVersion{0x01};
constexpr std::size_t kKeyIdBytes = 32;
constexpr std::size_t kSpkiBytes = 91;  // a P-256 SubjectPublicKeyInfo, canonical DER
constexpr std::size_t kHeaderBytes = 1 + kKeyIdBytes + kSpkiBytes;
constexpr std::size_t kMaxSecret = 4096;
constexpr std::string_view kInfoLabel{"medgate sealed box v1\0", 22};

using PkeyPtr = std::unique_ptr<EVP_PKEY, decltype(&EVP_PKEY_free)>;
using PkeyCtxPtr = std::unique_ptr<EVP_PKEY_CTX, decltype(&EVP_PKEY_CTX_free)>;

Bytes info_for(std::string_view context) {
  std::string info(kInfoLabel);
  info.append(context);
  ByteView view = as_bytes(info);
  return Bytes(view.begin(), view.end());
}

// The AES key both sides derive from Z.
Result<SecretBytes> box_key(ByteView z, const PublicKey& ephemeral, const PublicKey& recipient,
                            std::string_view context) {
  Bytes salt = ephemeral.spki_der();
  salt.insert(salt.end(), recipient.spki_der().begin(), recipient.spki_der().end());
  Bytes key(32);
  MEDGATE_RETURN_IF_ERROR(hkdf_sha256(z, salt, info_for(context), key));
  return SecretBytes(std::move(key));
}

}  // namespace

Result<Bytes> seal_to(const PublicKey& recipient, ByteView secret, std::string_view context) {
  if (secret.size() > kMaxSecret)
    return Status::InvalidArgument("a sealed secret is at most 4096 bytes, not " +
                                   std::to_string(secret.size()));
  PkeyPtr ephemeral(EVP_PKEY_Q_keygen(nullptr, nullptr, "EC", "P-256"), EVP_PKEY_free);
  const unsigned char* p = u8(recipient.spki_der());
  PkeyPtr peer(d2i_PUBKEY(nullptr, &p, static_cast<long>(recipient.spki_der().size())),
               EVP_PKEY_free);
  if (!ephemeral || !peer) return Status::Internal("OpenSSL cannot make an ephemeral P-256 key");
  PkeyCtxPtr ctx(EVP_PKEY_CTX_new(ephemeral.get(), nullptr), EVP_PKEY_CTX_free);
  std::size_t z_size = 0;
  if (!ctx || EVP_PKEY_derive_init(ctx.get()) != 1 ||
      EVP_PKEY_derive_set_peer(ctx.get(), peer.get()) != 1 ||
      EVP_PKEY_derive(ctx.get(), nullptr, &z_size) != 1 || z_size != 32)
    return Status::Internal("OpenSSL's ECDH with the recipient's key failed");
  Bytes z_bytes(z_size);
  if (EVP_PKEY_derive(ctx.get(), u8(std::span<std::byte>(z_bytes)), &z_size) != 1)
    return Status::Internal("OpenSSL's ECDH with the recipient's key failed");
  SecretBytes z(std::move(z_bytes));

  unsigned char* der = nullptr;
  int n = i2d_PUBKEY(ephemeral.get(), &der);
  if (n <= 0) return Status::Internal("cannot encode the ephemeral public key");
  Result<PublicKey> eph_public =
      PublicKey::from_spki_der(ByteView(reinterpret_cast<std::byte*>(der), std::size_t(n)));
  OPENSSL_free(der);
  if (!eph_public.ok()) return eph_public.status();
  if (eph_public->spki_der().size() != kSpkiBytes)
    return Status::Internal("the ephemeral key's SPKI is not 91 bytes");

  MEDGATE_ASSIGN_OR_RETURN(SecretBytes key, box_key(z.view(), *eph_public, recipient, context));
  MEDGATE_ASSIGN_OR_RETURN(Bytes sealed, gcm_seal(key.view(), info_for(context), secret));
  Bytes box;
  box.reserve(kHeaderBytes + sealed.size());
  box.push_back(kVersion);
  box.insert(box.end(), recipient.id().begin(), recipient.id().end());
  box.insert(box.end(), eph_public->spki_der().begin(), eph_public->spki_der().end());
  box.insert(box.end(), sealed.begin(), sealed.end());
  return box;
}

Result<KeyId> sealed_box_recipient(ByteView box) {
  if (box.size() < kHeaderBytes + kGcmIvBytes + kGcmTagBytes || box[0] != kVersion)
    return Status::Corruption("not a version-1 sealed box (" + std::to_string(box.size()) +
                              " bytes)");
  KeyId id{};
  std::copy_n(box.begin() + 1, kKeyIdBytes, id.begin());
  return id;
}

Result<SecretBytes> open_sealed_box(KeyStore& keys, ByteView box, std::string_view context) {
  MEDGATE_ASSIGN_OR_RETURN(KeyId recipient_id, sealed_box_recipient(box));
  Result<PublicKey> ephemeral = PublicKey::from_spki_der(box.subspan(1 + kKeyIdBytes, kSpkiBytes));
  if (!ephemeral.ok())
    return Status::Corruption("the sealed box's ephemeral key: " + ephemeral.status().message());
  MEDGATE_ASSIGN_OR_RETURN(PublicKey mine, keys.agreement_key());
  if (mine.id() != recipient_id)
    return Status::NotFound("the sealed box is for key-agreement key " +
                            to_hex(ByteView(recipient_id).first(8)) + ", this key store holds " +
                            to_hex(ByteView(mine.id()).first(8)));
  MEDGATE_ASSIGN_OR_RETURN(SecretBytes z, keys.agree(*ephemeral));
  MEDGATE_ASSIGN_OR_RETURN(SecretBytes key, box_key(z.view(), *ephemeral, mine, context));
  Result<Bytes> secret = gcm_open(key.view(), info_for(context), box.subspan(kHeaderBytes));
  if (!secret.ok()) {
    if (secret.status().code() == StatusCode::kVerificationFailed)
      return Status::VerificationFailed(
          "the sealed box does not open: it was altered, or sealed for another purpose");
    return secret.status();
  }
  return SecretBytes(std::move(secret).value());
}

}  // namespace medgate::hsm
