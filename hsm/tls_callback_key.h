// An OpenSSL key whose ECDSA signatures are made by a TlsKeyHolder (hsm/tls_key.h): how a TPM's
// TLS key reaches libssl through the key store's own connection. Private to hsm/ (the factory);
// tests use it for a key whose signatures they hold (a slow TPM, tests/unit/mllp_listener_test.cc).
#pragma once

#include "hsm/public_key.h"
#include "hsm/status.h"
#include "hsm/tls_key.h"

namespace medgate::hsm {

// An EC EVP_PKEY holding `public_key` whose private operation (ECDSA sign) calls
// holder.sign_tls_digest(). `holder` must outlive the key. libssl hands the callback the digest
// of the signature algorithm it negotiated; ECDSA uses the digest's leftmost 256 bits on P-256,
// so a longer one (SHA-384) is cut and a shorter one (SHA-1) left-padded to the 32 bytes the TPM
// signs, which gives the same signature the digest itself would. A failed signature fails that
// handshake, with the key store's error on OpenSSL's error queue.
Result<TlsPrivateKey> key_signing_through(TlsKeyHolder& holder, const PublicKey& public_key);

}  // namespace medgate::hsm
