// The second place outside a backend that knows the backends (after key_store_factory.cc): the
// TLS key lives next to the key store's other keys.
#include "hsm/tls_key.h"

#include <openssl/evp.h>

#include "hsm/pkcs11/pkcs11_key_store.h"
#include "hsm/pkcs11/tls_engine.h"

namespace medgate::hsm {
namespace {

bool is_pkcs11(const std::string& uri) {
  return uri.size() >= 7 &&
         (uri.compare(0, 7, "pkcs11:") == 0 || uri.compare(0, 7, "PKCS11:") == 0);
}

Status tpm_not_supported() {
  return Status::FailedPrecondition(
      "a TLS key inside the TPM is not supported yet (a tpm2 key store); set [hl7] tls_key_file "
      "to a PEM key file (the documented fallback) or use a PKCS#11 key store");
}

}  // namespace

void EvpPkeyFree::operator()(EVP_PKEY* key) const {
  EVP_PKEY_free(key);
}

Result<TlsKeyInfo> prepare_tls_key(const KeyStoreConfig& config, bool create) {
  if (!is_pkcs11(config.uri)) return tpm_not_supported();
  MEDGATE_ASSIGN_OR_RETURN(pkcs11::TokenTlsKey key,
                           pkcs11::find_or_create_tls_key(config, kTlsKeyLabel, create));
  return TlsKeyInfo{key.public_key, key.created, key.key_uri};
}

Result<TlsPrivateKey> open_tls_private_key(const KeyStoreConfig& config) {
  if (!is_pkcs11(config.uri)) return tpm_not_supported();
  MEDGATE_ASSIGN_OR_RETURN(pkcs11::TokenTlsKey key,
                           pkcs11::find_or_create_tls_key(config, kTlsKeyLabel, /*create=*/false));
  MEDGATE_ASSIGN_OR_RETURN(EVP_PKEY * pkey, pkcs11::load_engine_key(key));
  return TlsPrivateKey(pkey);
}

}  // namespace medgate::hsm
