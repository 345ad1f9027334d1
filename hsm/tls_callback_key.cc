// EC_KEY_METHOD is deprecated in OpenSSL 3 but still the short way to a key whose signature runs
// elsewhere: a key with a method of its own stays a "foreign" legacy key that libssl signs with
// through that method (the route libp11's engine keys take too). A provider would do the same
// in several hundred lines.
#define OPENSSL_SUPPRESS_DEPRECATED 1

#include "hsm/tls_callback_key.h"

#include <openssl/ec.h>
#include <openssl/ecdsa.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/x509.h>

#include <algorithm>
#include <cstring>
#include <mutex>

namespace medgate::hsm {
namespace {

struct Method {
  EC_KEY_METHOD* method = nullptr;
  int holder_index = -1;
};

ECDSA_SIG* sign_through_holder(const unsigned char* dgst, int dlen, const BIGNUM*, const BIGNUM*,
                               EC_KEY* ec_key);

// One method and ex_data slot for the process, made on first use and kept (OpenSSL keeps
// pointers to the method in every key made with it).
const Method& method() {
  static Method m;
  static std::once_flag once;
  std::call_once(once, [] {
    EC_KEY_METHOD* meth = EC_KEY_METHOD_new(EC_KEY_get_default_method());
    if (meth == nullptr) return;
    int (*sign)(int, const unsigned char*, int, unsigned char*, unsigned int*, const BIGNUM*,
                const BIGNUM*, EC_KEY*) = nullptr;
    int (*sign_setup)(EC_KEY*, BN_CTX*, BIGNUM**, BIGNUM**) = nullptr;
    EC_KEY_METHOD_get_sign(meth, &sign, &sign_setup, nullptr);
    // The default sign() encodes what sign_sig() returns as DER; sign_sig is ours.
    EC_KEY_METHOD_set_sign(meth, sign, sign_setup, sign_through_holder);
    m.method = meth;
    m.holder_index = EC_KEY_get_ex_new_index(0, nullptr, nullptr, nullptr, nullptr);
  });
  return m;
}

ECDSA_SIG* sign_through_holder(const unsigned char* dgst, int dlen, const BIGNUM*, const BIGNUM*,
                               EC_KEY* ec_key) {
  auto* holder = static_cast<TlsKeyHolder*>(EC_KEY_get_ex_data(ec_key, method().holder_index));
  if (holder == nullptr || dgst == nullptr || dlen <= 0) {
    ERR_raise_data(ERR_LIB_USER, ERR_R_PASSED_NULL_PARAMETER, "no key store behind this TLS key");
    return nullptr;
  }
  // ECDSA on P-256 takes the digest's leftmost 256 bits as a number.
  Hash digest{};
  const auto n = static_cast<std::size_t>(dlen);
  if (n >= digest.size())
    std::memcpy(digest.data(), dgst, digest.size());
  else
    std::memcpy(digest.data() + digest.size() - n, dgst, n);
  Result<Bytes> der = holder->sign_tls_digest(digest);
  if (!der.ok()) {
    ERR_raise_data(ERR_LIB_USER, ERR_R_OPERATION_FAIL, "the key store's TLS key: %s",
                   der.status().message().c_str());
    return nullptr;
  }
  const unsigned char* p = u8(ByteView(*der));
  ECDSA_SIG* sig = d2i_ECDSA_SIG(nullptr, &p, static_cast<long>(der->size()));
  if (sig == nullptr)
    ERR_raise_data(ERR_LIB_USER, ERR_R_OPERATION_FAIL, "the key store's signature is not DER");
  return sig;
}

}  // namespace

Result<TlsPrivateKey> key_signing_through(TlsKeyHolder& holder, const PublicKey& public_key) {
  const Method& m = method();
  if (m.method == nullptr || m.holder_index < 0)
    return Status::Internal("OpenSSL cannot make an EC key method for the key store's TLS key");
  const unsigned char* p = u8(ByteView(public_key.spki_der()));
  std::unique_ptr<EC_KEY, decltype(&EC_KEY_free)> ec(
      d2i_EC_PUBKEY(nullptr, &p, static_cast<long>(public_key.spki_der().size())), EC_KEY_free);
  if (!ec) return Status::Internal("OpenSSL cannot read the TLS key's public half");
  if (EC_KEY_set_method(ec.get(), m.method) != 1 ||
      EC_KEY_set_ex_data(ec.get(), m.holder_index, &holder) != 1)
    return Status::Internal("OpenSSL cannot attach the key store to the TLS key");
  TlsPrivateKey key(EVP_PKEY_new());
  if (!key || EVP_PKEY_assign_EC_KEY(key.get(), ec.get()) != 1)
    return Status::Internal("OpenSSL cannot make an EVP_PKEY of the TLS key");
  ec.release();  // owned by the EVP_PKEY now
  return key;
}

}  // namespace medgate::hsm
