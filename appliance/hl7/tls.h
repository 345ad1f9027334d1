// MLLP over TLS: the listener's server side, and what `medgated tls-key` issues for it.
//
// The server's private key stays in the key store (hsm/tls_key.h: on the PKCS#11 token, used
// through libp11's engine; in the TPM, signing through the daemon's open key store); [hl7]
// tls_key_file, a PEM key on disk, is an explicit fallback. The certificate chain is a PEM file the
// installer gets signed by the hospital's CA (from the CSR `medgated tls-key` prints) or a
// self-signed one.
//
// With tls_client_ca, every client must present a certificate that verifies against it
// (TLS 1.2 or 1.3; a missing or unverifiable certificate fails the handshake). Which verified
// certificate may speak for which HL7 source is the registry's business (appliance/cert_binding.h).
//
// Thread safety: a TlsServerContext is immutable after create() and may be shared; each SSL made
// from it belongs to one thread.
#pragma once

#include <chrono>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "hsm/key_store_factory.h"
#include "hsm/status.h"

typedef struct ssl_ctx_st SSL_CTX;
typedef struct ssl_st SSL;
typedef struct evp_pkey_st EVP_PKEY;

namespace medgate::appliance::hl7 {

struct MllpTlsConfig {
  std::filesystem::path cert_file;                 // server certificate chain, PEM (leaf first)
  std::optional<std::filesystem::path> key_file;   // fallback: a PEM private key on disk
  std::optional<std::filesystem::path> client_ca;  // require client certificates issued by these
  std::chrono::milliseconds handshake_timeout{10'000};
  hsm::KeyStoreConfig key_store;  // where the key is when key_file is not set
  // The process's open key store for key_store, when it has one: a TPM's TLS key signs through
  // it (hsm/tls_key.h). Must outlive every TlsServerContext made from this config.
  hsm::KeyStore* open_key_store = nullptr;
  // An open key used instead of key_file or the key store. For tests: a key whose signatures
  // can be held, as a hardware TPM's take ~200 ms (the one fault swtpm cannot produce).
  std::shared_ptr<EVP_PKEY> key;
};

class TlsServerContext {
 public:
  // Loads the chain and the key (from the key store, or key_file) and checks that they belong
  // together. kInvalidArgument naming the file for unreadable or mismatched PEM; key-store errors
  // as hsm::open_tls_private_key() (kNotFound: run `medgated tls-key` first).
  static Result<std::shared_ptr<TlsServerContext>> create(const MllpTlsConfig& config);
  ~TlsServerContext();
  TlsServerContext(const TlsServerContext&) = delete;
  TlsServerContext& operator=(const TlsServerContext&) = delete;

  // A server-side SSL on `fd` (non-blocking), or nullptr when OpenSSL is out of memory.
  SSL* new_session(int fd) const;
  bool verifies_clients() const { return verifies_clients_; }
  // Where the key is, for the start-up log: "key store (pkcs11:...)" or "file /etc/...".
  const std::string& key_location() const { return key_location_; }

 private:
  TlsServerContext() = default;
  SSL_CTX* ctx_ = nullptr;
  bool verifies_clients_ = false;
  std::string key_location_;
};

// The verified client certificate of an established session: SHA-256 of its DER (lowercase
// hex) and its subject CN ("" when none). Both empty without a client certificate.
struct PeerCertificate {
  std::string sha256_hex;
  std::string subject_cn;
};
PeerCertificate peer_certificate(SSL* ssl);

// The text of OpenSSL's error queue (and clears it), for logs; never contains message data.
std::string tls_errors();

// ---- `medgated tls-key` ----

struct TlsKeyRequest {
  std::string common_name;             // subject CN
  std::vector<std::string> alt_names;  // "DNS:name", "IP:addr", or a bare name/address
  int days = 825;                      // self-signed certificate validity
};

struct TlsKeyIssue {
  bool created = false;    // the key was generated now (else the existing one was used)
  std::string location;    // where the key is (a pkcs11: URI without PIN, or the TPM and file)
  std::string key_sha256;  // SHA-256 of the public key (SPKI DER), hex
  std::string public_key_pem;
  std::string csr_pem;   // PKCS#10, signed by the key (proof of possession)
  std::string cert_pem;  // self-signed, for a test bench or pinning
};

// Makes a CSR and a self-signed certificate for `key` (signed by it). kInvalidArgument for a bad
// name; kInternal when OpenSSL fails.
Result<TlsKeyIssue> issue_for_key(EVP_PKEY* key, const TlsKeyRequest& request);

// `medgated tls-key`: finds the TLS key in the key store, generating it there (non-extractable
// P-256) when absent, and issues a CSR and a self-signed certificate for it. Running it again
// keeps the key and issues afresh (a renewal). Errors as hsm::prepare_tls_key() and
// issue_for_key().
Result<TlsKeyIssue> issue_tls_key(const hsm::KeyStoreConfig& key_store,
                                  const TlsKeyRequest& request);

}  // namespace medgate::appliance::hl7
