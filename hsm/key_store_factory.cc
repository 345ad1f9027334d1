#include "hsm/key_store_factory.h"

#include <openssl/evp.h>

#include <string_view>

#include "hsm/pkcs11/pkcs11_key_store.h"
#include "hsm/pkcs11/softhsm_token.h"
#include "hsm/pkcs11/tls_engine.h"
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

// Only PKCS#11 tokens hold the TLS key so far.
Status check_tls_key_store(const KeyStoreConfig& config) {
  const std::string scheme = scheme_of(config.uri);
  if (scheme == "pkcs11") return Status::Ok();
  if (scheme == "tpm2")
    return Status::FailedPrecondition(
        "a TLS key inside the TPM is not supported yet (a tpm2 key store); set [hl7] "
        "tls_key_file to a PEM key file (the documented fallback) or use a PKCS#11 key store");
  return Status::InvalidArgument("unknown key store URI scheme '" + scheme +
                                 "' (expected pkcs11: or tpm2:)");
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

}  // namespace medgate::hsm
