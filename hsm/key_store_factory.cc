#include "hsm/key_store_factory.h"

#include <openssl/evp.h>

#include <string_view>

#include "hsm/pkcs11/pkcs11_key_store.h"
#include "hsm/pkcs11/softhsm_token.h"
#include "hsm/pkcs11/tls_engine.h"
#include "hsm/tls_callback_key.h"
#include "hsm/tls_key.h"
#include "hsm/tpm2/tpm2_key_store.h"

namespace medgate::hsm {
namespace {

// The URI scheme, lower-cased ("pkcs11", "tpm2"), or the whole string when it has no colon.
std::string scheme_of(std::string_view uri) {
  std::string scheme(uri.substr(0, uri.find(':')));
  for (char& c : scheme)
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
  return scheme;
}

}  // namespace

// config.softhsm_conf is exported as SOFTHSM2_CONF just before the PKCS#11 module is initialised
// (see hsm/pkcs11/module.h). The environment is process-wide: a process talks to one SoftHSM
// configuration at a time, and opening a second one while the first is in use is refused.
Result<std::unique_ptr<KeyStore>> open_key_store(const KeyStoreConfig& config, KeyPolicy policy) {
  const std::string scheme = scheme_of(config.uri);
  if (scheme == "pkcs11") {
    MEDGATE_ASSIGN_OR_RETURN(std::unique_ptr<pkcs11::Pkcs11KeyStore> store,
                             pkcs11::Pkcs11KeyStore::open(config, policy));
    return std::unique_ptr<KeyStore>(std::move(store));
  }
  if (scheme == "tpm2") {
    if (config.key_dir.empty())
      return Status::InvalidArgument(
          "a tpm2: key store needs key_dir, the directory for its key blobs");
    MEDGATE_ASSIGN_OR_RETURN(std::unique_ptr<tpm2::Tpm2KeyStore> store,
                             tpm2::Tpm2KeyStore::open(config, policy));
    return std::unique_ptr<KeyStore>(std::move(store));
  }
  if (config.uri.empty()) return Status::InvalidArgument("no key store URI configured");
  return Status::InvalidArgument("unknown key store URI scheme '" + scheme +
                                 "' (expected pkcs11: or tpm2:)");
}

Result<KeyStoreConfig> create_softhsm_token(const std::filesystem::path& dir,
                                            const std::string& label,
                                            const std::filesystem::path& pin_file) {
  return pkcs11::provision_softhsm_token(dir, label, pin_file);
}

// ---- the MLLP listener's TLS key (hsm/tls_key.h) ----

namespace {

// The overloads without an open key store reach PKCS#11 tokens only (through the engine).
Status check_tls_key_store(const KeyStoreConfig& config) {
  const std::string scheme = scheme_of(config.uri);
  if (scheme == "pkcs11") return Status::Ok();
  if (scheme == "tpm2")
    return Status::FailedPrecondition(
        "the TLS key inside the TPM is used through the open key store (a tpm2 key store serves "
        "one client)");
  return Status::InvalidArgument("unknown key store URI scheme '" + scheme +
                                 "' (expected pkcs11: or tpm2:)");
}

bool holds_tls_key_itself(const KeyStoreConfig& config) {
  return scheme_of(config.uri) == "tpm2";
}

Result<TlsKeyHolder*> tls_key_holder(KeyStore& store) {
  auto* holder = dynamic_cast<TlsKeyHolder*>(&store);
  if (holder == nullptr)
    return Status::FailedPrecondition("the key store " + store.description() +
                                      " does not hold a TLS key itself");
  return holder;
}

}  // namespace

void EvpPkeyFree::operator()(EVP_PKEY* key) const {
  EVP_PKEY_free(key);
}

Result<TlsKeyInfo> prepare_tls_key(const KeyStoreConfig& config, bool create) {
  MEDGATE_RETURN_IF_ERROR(check_tls_key_store(config));
  MEDGATE_ASSIGN_OR_RETURN(pkcs11::TokenTlsKey key,
                           pkcs11::find_or_create_tls_key(config, kTlsKeyLabel, create));
  return TlsKeyInfo{key.public_key, key.created, key.key_uri};
}

Result<TlsPrivateKey> open_tls_private_key(const KeyStoreConfig& config) {
  MEDGATE_RETURN_IF_ERROR(check_tls_key_store(config));
  MEDGATE_ASSIGN_OR_RETURN(pkcs11::TokenTlsKey key,
                           pkcs11::find_or_create_tls_key(config, kTlsKeyLabel, /*create=*/false));
  MEDGATE_ASSIGN_OR_RETURN(EVP_PKEY * pkey, pkcs11::load_engine_key(key));
  return TlsPrivateKey(pkey);
}

Result<TlsKeyInfo> prepare_tls_key(const KeyStoreConfig& config, KeyStore& store, bool create) {
  if (!holds_tls_key_itself(config)) return prepare_tls_key(config, create);
  MEDGATE_ASSIGN_OR_RETURN(TlsKeyHolder * holder, tls_key_holder(store));
  return holder->tls_key(create);
}

Result<TlsPrivateKey> open_tls_private_key(const KeyStoreConfig& config, KeyStore& store) {
  if (!holds_tls_key_itself(config)) return open_tls_private_key(config);
  MEDGATE_ASSIGN_OR_RETURN(TlsKeyHolder * holder, tls_key_holder(store));
  MEDGATE_ASSIGN_OR_RETURN(TlsKeyInfo info, holder->tls_key(/*create=*/false));
  return key_signing_through(*holder, info.public_key);
}

Result<StandaloneTlsKey> open_standalone_tls_key(const KeyStoreConfig& config, bool create) {
  if (!holds_tls_key_itself(config)) {
    MEDGATE_ASSIGN_OR_RETURN(TlsKeyInfo info, prepare_tls_key(config, create));
    MEDGATE_ASSIGN_OR_RETURN(TlsPrivateKey key, open_tls_private_key(config));
    return StandaloneTlsKey{nullptr, std::move(info), std::move(key)};
  }
  MEDGATE_ASSIGN_OR_RETURN(std::unique_ptr<KeyStore> store,
                           open_key_store(config, KeyPolicy::kUseExisting));
  MEDGATE_ASSIGN_OR_RETURN(TlsKeyInfo info, prepare_tls_key(config, *store, create));
  MEDGATE_ASSIGN_OR_RETURN(TlsPrivateKey key, open_tls_private_key(config, *store));
  return StandaloneTlsKey{std::move(store), std::move(info), std::move(key)};
}

}  // namespace medgate::hsm
