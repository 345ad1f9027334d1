// libp11's OpenSSL engine, for the TLS key (hsm/tls_key.h). Private to hsm/.
#pragma once

#include "hsm/pkcs11/pkcs11_key_store.h"
#include "hsm/status.h"

typedef struct evp_pkey_st EVP_PKEY;

namespace medgate::hsm::pkcs11 {

// Loads the private key `key` names through the "pkcs11" engine, logging in with the PIN from
// key.pin. The engine is loaded once per process (for one module) and never unloaded; `key`'s
// module reference is kept as long. The caller owns the returned key (EVP_PKEY_free).
Result<EVP_PKEY*> load_engine_key(const TokenTlsKey& key);

}  // namespace medgate::hsm::pkcs11
