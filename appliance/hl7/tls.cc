#include "appliance/hl7/tls.h"

#include <arpa/inet.h>
#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>
#include <sys/stat.h>

#include <cctype>
#include <system_error>

#include <fmt/format.h>

#include "hsm/tls_key.h"

namespace medgate::appliance::hl7 {
namespace {

template <typename T, void (*Free)(T*)>
struct Freer {
  void operator()(T* p) const { Free(p); }
};
using X509Ptr = std::unique_ptr<X509, Freer<X509, X509_free>>;
using X509ReqPtr = std::unique_ptr<X509_REQ, Freer<X509_REQ, X509_REQ_free>>;
using BioPtr = std::unique_ptr<BIO, Freer<BIO, BIO_free_all>>;

Status readable(const std::filesystem::path& file, const char* key) {
  std::error_code ec;
  if (!std::filesystem::is_regular_file(file, ec))
    return Status::InvalidArgument(fmt::format("[hl7] {} {}: no such file", key, file.string()));
  return Status::Ok();
}

std::string bio_text(BIO* bio) {
  char* data = nullptr;
  long n = BIO_get_mem_data(bio, &data);
  return n > 0 ? std::string(data, static_cast<std::size_t>(n)) : std::string();
}

// "DNS:a.example,IP:10.1.2.3" for subjectAltName, from names given either way.
Result<std::string> alt_name_list(const std::vector<std::string>& names) {
  std::string out;
  for (const std::string& raw : names) {
    std::string name = raw;
    std::string kind;
    if (name.starts_with("DNS:")) {
      kind = "DNS";
      name = name.substr(4);
    } else if (name.starts_with("IP:")) {
      kind = "IP";
      name = name.substr(3);
    }
    unsigned char addr[16];
    bool ip = ::inet_pton(AF_INET, name.c_str(), addr) == 1 ||
              ::inet_pton(AF_INET6, name.c_str(), addr) == 1;
    if (kind.empty()) kind = ip ? "IP" : "DNS";
    if (kind == "IP" && !ip)
      return Status::InvalidArgument(fmt::format("'{}' is not an IPv4 or IPv6 address", name));
    if (kind == "DNS") {
      bool ok = !name.empty() && name.size() <= 253;
      for (char c : name)
        ok =
            ok && (std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '-' || c == '*');
      if (!ok)
        return Status::InvalidArgument(fmt::format(
            "'{}' is not a host name (letters, digits, '.', '-', a leading '*.')", name));
    }
    out += (out.empty() ? "" : ",") + kind + ":" + name;
  }
  return out;
}

Status add_ext(X509* cert, X509V3_CTX* ctx, int nid, const std::string& value) {
  X509_EXTENSION* ext = X509V3_EXT_conf_nid(nullptr, ctx, nid, value.c_str());
  if (ext == nullptr)
    return Status::Internal(fmt::format("cannot make extension {}: {}", value, tls_errors()));
  int ok = X509_add_ext(cert, ext, -1);
  X509_EXTENSION_free(ext);
  if (ok != 1) return Status::Internal("cannot add an extension: " + tls_errors());
  return Status::Ok();
}

}  // namespace

std::string tls_errors() {
  std::string out;
  const char* data = nullptr;
  int flags = 0;
  while (unsigned long e = ERR_get_error_all(nullptr, nullptr, nullptr, &data, &flags)) {
    char buf[256];
    ERR_error_string_n(e, buf, sizeof buf);
    out += (out.empty() ? "" : "; ") + std::string(buf);
    // The detail some errors carry, e.g. why the key store could not sign a handshake.
    if (data != nullptr && *data != '\0' && (flags & ERR_TXT_STRING) != 0)
      out += std::string(" (") + data + ")";
  }
  return out.empty() ? "no detail from OpenSSL" : out;
}

TlsServerContext::~TlsServerContext() {
  SSL_CTX_free(ctx_);
}

Result<std::shared_ptr<TlsServerContext>> TlsServerContext::create(const MllpTlsConfig& config) {
  MEDGATE_RETURN_IF_ERROR(readable(config.cert_file, "tls_cert"));
  if (config.key_file) {
    MEDGATE_RETURN_IF_ERROR(readable(*config.key_file, "tls_key_file"));
    // The fallback key is a secret on disk: like a PIN file, only its owner may read it.
    struct stat st {};
    if (::stat(config.key_file->c_str(), &st) == 0 && (st.st_mode & 077) != 0)
      return Status::InvalidArgument(
          fmt::format("[hl7] tls_key_file {} may be read by others (mode {:04o}); chmod 600 it",
                      config.key_file->string(), st.st_mode & 07777));
  }
  if (config.client_ca) MEDGATE_RETURN_IF_ERROR(readable(*config.client_ca, "tls_client_ca"));

  std::shared_ptr<TlsServerContext> c(new TlsServerContext());
  ERR_clear_error();
  c->ctx_ = SSL_CTX_new(TLS_server_method());
  if (c->ctx_ == nullptr) return Status::Internal("SSL_CTX_new: " + tls_errors());
  SSL_CTX* ctx = c->ctx_;
  SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
  // A peer that closes without close_notify has still sent whole MLLP frames (or not: the
  // deframer decides); no renegotiation, no tickets and no session cache: nothing is written
  // after the handshake but ACKs, and nothing outlives a connection.
  SSL_CTX_set_options(ctx, SSL_OP_IGNORE_UNEXPECTED_EOF | SSL_OP_NO_RENEGOTIATION);
  SSL_CTX_set_num_tickets(ctx, 0);
  SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
  SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);

  if (SSL_CTX_use_certificate_chain_file(ctx, config.cert_file.c_str()) != 1)
    return Status::InvalidArgument(fmt::format("[hl7] tls_cert {}: not a PEM certificate chain: {}",
                                               config.cert_file.string(), tls_errors()));
  // OpenSSL checks the key against the certificate as it takes it.
  auto mismatch = [&config]() {
    return Status::InvalidArgument(
        fmt::format("[hl7] tls_cert {} is not the certificate of the {}'s key (issue it from the "
                    "CSR `medgated tls-key` prints)",
                    config.cert_file.string(), config.key_file ? "tls_key_file" : "key store"));
  };
  auto is_mismatch = [] {
    return ERR_GET_REASON(ERR_peek_last_error()) == X509_R_KEY_VALUES_MISMATCH;
  };
  if (config.key) {
    if (SSL_CTX_use_PrivateKey(ctx, config.key.get()) != 1) {
      if (is_mismatch()) return mismatch();
      return Status::InvalidArgument("[hl7] tls: OpenSSL cannot use the given key: " +
                                     tls_errors());
    }
    c->key_location_ = "given by the caller";
  } else if (config.key_file) {
    if (SSL_CTX_use_PrivateKey_file(ctx, config.key_file->c_str(), SSL_FILETYPE_PEM) != 1) {
      if (is_mismatch()) return mismatch();
      return Status::InvalidArgument(fmt::format("[hl7] tls_key_file {}: not a PEM private key: {}",
                                                 config.key_file->string(), tls_errors()));
    }
    c->key_location_ = "file " + config.key_file->string();
  } else {
    Result<hsm::TlsPrivateKey> key =
        config.open_key_store != nullptr
            ? hsm::open_tls_private_key(config.key_store, *config.open_key_store)
            : hsm::open_tls_private_key(config.key_store);
    if (!key.ok()) return key.status().with_context("[hl7] tls: the TLS key in the key store");
    if (SSL_CTX_use_PrivateKey(ctx, key->get()) != 1) {
      if (is_mismatch()) return mismatch();
      return Status::InvalidArgument("[hl7] tls: OpenSSL cannot use the key store's TLS key: " +
                                     tls_errors());
    }
    // Named as the key store holds it: a token object's label, or the TPM's key file.
    c->key_location_ = config.key_store.uri.rfind("tpm2", 0) == 0
                           ? "key store (TPM, tls-key in " + config.key_store.key_dir.string() + ")"
                           : "key store (" + std::string(hsm::kTlsKeyLabel) + ")";
  }
  if (SSL_CTX_check_private_key(ctx) != 1) return mismatch();

  if (config.client_ca) {
    if (SSL_CTX_load_verify_locations(ctx, config.client_ca->c_str(), nullptr) != 1)
      return Status::InvalidArgument(fmt::format("[hl7] tls_client_ca {}: not PEM certificates: {}",
                                                 config.client_ca->string(), tls_errors()));
    STACK_OF(X509_NAME)* names = SSL_load_client_CA_file(config.client_ca->c_str());
    if (names != nullptr) SSL_CTX_set_client_CA_list(ctx, names);
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, nullptr);
    c->verifies_clients_ = true;
  }
  return c;
}

SSL* TlsServerContext::new_session(int fd) const {
  SSL* ssl = SSL_new(ctx_);
  if (ssl == nullptr) return nullptr;
  if (SSL_set_fd(ssl, fd) != 1) {
    SSL_free(ssl);
    return nullptr;
  }
  SSL_set_accept_state(ssl);
  return ssl;
}

PeerCertificate peer_certificate(SSL* ssl) {
  PeerCertificate out;
  X509* cert = SSL_get0_peer_certificate(ssl);
  if (cert == nullptr) return out;
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int n = 0;
  if (X509_digest(cert, EVP_sha256(), md, &n) == 1) {
    static constexpr char kHex[] = "0123456789abcdef";
    for (unsigned int i = 0; i < n; ++i) {
      out.sha256_hex.push_back(kHex[md[i] >> 4]);
      out.sha256_hex.push_back(kHex[md[i] & 0xf]);
    }
  }
  X509_NAME* subject = X509_get_subject_name(cert);
  int at = X509_NAME_get_index_by_NID(subject, NID_commonName, -1);
  if (at >= 0) {
    ASN1_STRING* data = X509_NAME_ENTRY_get_data(X509_NAME_get_entry(subject, at));
    unsigned char* utf8 = nullptr;
    int len = ASN1_STRING_to_UTF8(&utf8, data);
    if (len > 0)
      out.subject_cn.assign(reinterpret_cast<char*>(utf8), static_cast<std::size_t>(len));
    OPENSSL_free(utf8);
  }
  return out;
}

static Status check_request(const TlsKeyRequest& request) {
  if (request.common_name.empty() || request.common_name.size() > 64)
    return Status::InvalidArgument("the certificate's common name (--cn) is 1-64 characters");
  for (char ch : request.common_name)
    if (static_cast<unsigned char>(ch) < 0x20 || static_cast<unsigned char>(ch) >= 0x7f)
      return Status::InvalidArgument("the common name (--cn) must be printable ASCII");
  if (request.days < 1 || request.days > 3650)
    return Status::InvalidArgument("--days must be between 1 and 3650");
  return alt_name_list(request.alt_names).status();
}

Result<TlsKeyIssue> issue_for_key(EVP_PKEY* key, const TlsKeyRequest& request) {
  MEDGATE_RETURN_IF_ERROR(check_request(request));
  std::vector<std::string> names = request.alt_names;
  if (names.empty()) names.push_back(request.common_name);  // clients check SAN, not CN
  MEDGATE_ASSIGN_OR_RETURN(std::string san, alt_name_list(names));
  ERR_clear_error();

  TlsKeyIssue out;
  {
    BioPtr bio(BIO_new(BIO_s_mem()));
    if (!bio || PEM_write_bio_PUBKEY(bio.get(), key) != 1)
      return Status::Internal("cannot write the public key: " + tls_errors());
    out.public_key_pem = bio_text(bio.get());
  }
  X509_NAME* subject = X509_NAME_new();
  std::unique_ptr<X509_NAME, Freer<X509_NAME, X509_NAME_free>> subject_owner(subject);
  if (X509_NAME_add_entry_by_NID(
          subject, NID_commonName, MBSTRING_ASC,
          reinterpret_cast<const unsigned char*>(request.common_name.c_str()), -1, -1, 0) != 1)
    return Status::Internal("cannot set the subject: " + tls_errors());

  // The CSR: subject, key and the SAN the certificate should carry.
  {
    X509ReqPtr req(X509_REQ_new());
    if (!req || X509_REQ_set_version(req.get(), 0) != 1 ||
        X509_REQ_set_subject_name(req.get(), subject) != 1 ||
        X509_REQ_set_pubkey(req.get(), key) != 1)
      return Status::Internal("cannot build the CSR: " + tls_errors());
    STACK_OF(X509_EXTENSION)* exts = sk_X509_EXTENSION_new_null();
    X509_EXTENSION* ext = X509V3_EXT_conf_nid(nullptr, nullptr, NID_subject_alt_name, san.c_str());
    if (exts == nullptr || ext == nullptr || sk_X509_EXTENSION_push(exts, ext) == 0 ||
        X509_REQ_add_extensions(req.get(), exts) != 1) {
      X509_EXTENSION_free(ext);
      sk_X509_EXTENSION_free(exts);
      return Status::Internal("cannot add subjectAltName to the CSR: " + tls_errors());
    }
    sk_X509_EXTENSION_pop_free(exts, X509_EXTENSION_free);
    if (X509_REQ_sign(req.get(), key, EVP_sha256()) <= 0)
      return Status::Internal("the key store could not sign the CSR: " + tls_errors());
    BioPtr bio(BIO_new(BIO_s_mem()));
    if (!bio || PEM_write_bio_X509_REQ(bio.get(), req.get()) != 1)
      return Status::Internal("cannot write the CSR: " + tls_errors());
    out.csr_pem = bio_text(bio.get());
  }

  // The self-signed certificate: a server certificate, not a CA.
  X509Ptr cert(X509_new());
  unsigned char serial[16];
  if (!cert || RAND_bytes(serial, sizeof serial) != 1)
    return Status::Internal("cannot make a certificate: " + tls_errors());
  serial[0] &= 0x7f;  // a positive INTEGER
  std::unique_ptr<BIGNUM, Freer<BIGNUM, BN_free>> bn(BN_bin2bn(serial, sizeof serial, nullptr));
  if (!bn || BN_to_ASN1_INTEGER(bn.get(), X509_get_serialNumber(cert.get())) == nullptr ||
      X509_set_version(cert.get(), 2) != 1 || X509_set_subject_name(cert.get(), subject) != 1 ||
      X509_set_issuer_name(cert.get(), subject) != 1 ||
      X509_gmtime_adj(X509_getm_notBefore(cert.get()), -300) == nullptr ||
      X509_gmtime_adj(X509_getm_notAfter(cert.get()), 86400L * request.days) == nullptr ||
      X509_set_pubkey(cert.get(), key) != 1)
    return Status::Internal("cannot build the certificate: " + tls_errors());
  X509V3_CTX v3;
  X509V3_set_ctx(&v3, cert.get(), cert.get(), nullptr, nullptr, 0);
  MEDGATE_RETURN_IF_ERROR(add_ext(cert.get(), &v3, NID_basic_constraints, "critical,CA:FALSE"));
  MEDGATE_RETURN_IF_ERROR(add_ext(cert.get(), &v3, NID_key_usage, "critical,digitalSignature"));
  MEDGATE_RETURN_IF_ERROR(add_ext(cert.get(), &v3, NID_ext_key_usage, "serverAuth"));
  MEDGATE_RETURN_IF_ERROR(add_ext(cert.get(), &v3, NID_subject_key_identifier, "hash"));
  MEDGATE_RETURN_IF_ERROR(add_ext(cert.get(), &v3, NID_subject_alt_name, san));
  if (X509_sign(cert.get(), key, EVP_sha256()) <= 0)
    return Status::Internal("the key store could not sign the certificate: " + tls_errors());
  BioPtr bio(BIO_new(BIO_s_mem()));
  if (!bio || PEM_write_bio_X509(bio.get(), cert.get()) != 1)
    return Status::Internal("cannot write the certificate: " + tls_errors());
  out.cert_pem = bio_text(bio.get());
  return out;
}

Result<TlsKeyIssue> issue_tls_key(const hsm::KeyStoreConfig& key_store,
                                  const TlsKeyRequest& request) {
  // Bad names are refused before anything is made on the token.
  MEDGATE_RETURN_IF_ERROR(check_request(request));
  MEDGATE_ASSIGN_OR_RETURN(hsm::StandaloneTlsKey tls,
                           hsm::open_standalone_tls_key(key_store, /*create=*/true));
  MEDGATE_ASSIGN_OR_RETURN(TlsKeyIssue out, issue_for_key(tls.key.get(), request));
  out.created = tls.info.created;
  out.location = tls.info.location;
  out.key_sha256 = to_hex(tls.info.public_key.id());
  return out;
}

}  // namespace medgate::appliance::hl7
