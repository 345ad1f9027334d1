// LEDGER-CRITICAL: see consent_document.h.
#include "ledger/consent_document.h"

#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "ledger/entry.h"

namespace medgate::ledger {
namespace {

using nlohmann::json;

struct PkeyFree {
  void operator()(EVP_PKEY* k) const { EVP_PKEY_free(k); }
};
using Pkey = std::unique_ptr<EVP_PKEY, PkeyFree>;

Result<std::string> text_field(const json& doc, const char* name) {
  auto it = doc.find(name);
  if (it == doc.end() || !it->is_string() || it->get<std::string>().empty())
    return Status::InvalidArgument(
        fmt::format("the consent document needs a non-empty text \"{}\"", name));
  return it->get<std::string>();
}

Result<Pkey> load_key(ByteView der) {
  const unsigned char* p = u8(der);
  Pkey key(d2i_PUBKEY(nullptr, &p, static_cast<long>(der.size())));
  if (!key || p != u8(der) + der.size())
    return Status::InvalidArgument("not a public key (SubjectPublicKeyInfo)");
  int id = EVP_PKEY_get_base_id(key.get());
  int bits = EVP_PKEY_get_bits(key.get());
  if (id == EVP_PKEY_EC) {
    if (bits < 256) return Status::InvalidArgument("an EC patient key must be P-256 or larger");
  } else if (id == EVP_PKEY_RSA) {
    if (bits < 2048)
      return Status::InvalidArgument("an RSA patient key must have 2048 bits or more");
  } else {
    return Status::InvalidArgument("a patient key must be an EC or RSA key");
  }
  return key;
}

}  // namespace

Result<ConsentDocument> parse_consent_document(std::string_view text) {
  json doc = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (doc.is_discarded() || !doc.is_object())
    return Status::InvalidArgument("the consent document is not a JSON object");
  ConsentDocument out;
  MEDGATE_ASSIGN_OR_RETURN(std::string kind, text_field(doc, "medgate"));
  if (kind == "consent-grant")
    out.kind = ConsentDocument::Kind::kGrant;
  else if (kind == "consent-revoke")
    out.kind = ConsentDocument::Kind::kRevoke;
  else
    return Status::InvalidArgument(
        "the consent document's \"medgate\" must be \"consent-grant\" or \"consent-revoke\"");
  MEDGATE_ASSIGN_OR_RETURN(out.ledger_id, text_field(doc, "ledger"));
  MEDGATE_ASSIGN_OR_RETURN(std::string patient, text_field(doc, "patient"));
  std::optional<Bytes> p = from_hex(patient);
  if (!p || p->size() != 32)
    return Status::InvalidArgument(
        "the consent document's \"patient\" must be the patient's pseudonym (64 hex digits)");
  std::copy(p->begin(), p->end(), out.patient.begin());
  if (out.kind == ConsentDocument::Kind::kGrant) {
    MEDGATE_ASSIGN_OR_RETURN(out.to, text_field(doc, "to"));
    MEDGATE_ASSIGN_OR_RETURN(out.data, text_field(doc, "data"));
    MEDGATE_ASSIGN_OR_RETURN(out.purpose, text_field(doc, "purpose"));
    if (doc.contains("until")) {
      MEDGATE_ASSIGN_OR_RETURN(std::string until, text_field(doc, "until"));
      out.until_us = parse_time(until);
      if (!out.until_us)
        return Status::InvalidArgument("the consent document's \"until\" is not an RFC 3339 time");
    }
  } else {
    MEDGATE_ASSIGN_OR_RETURN(out.grant, text_field(doc, "grant"));
  }
  return out;
}

std::string format_consent_document(const ConsentDocument& d) {
  // nlohmann's object keeps keys sorted; write the fields in the documented order instead.
  std::string out = "{";
  auto field = [&](const char* key, const std::string& value) {
    if (out.size() > 1) out += ", ";
    out += json(key).dump() + ": " + json(value).dump();
  };
  field("medgate", d.kind == ConsentDocument::Kind::kGrant ? "consent-grant" : "consent-revoke");
  field("ledger", d.ledger_id);
  field("patient", to_hex(d.patient));
  if (d.kind == ConsentDocument::Kind::kGrant) {
    field("to", d.to);
    field("data", d.data);
    field("purpose", d.purpose);
    if (d.until_us) field("until", format_time(*d.until_us));
  } else {
    field("grant", d.grant);
  }
  return out + "}\n";
}

std::string signed_grant_id(ByteView document) {
  return "s-" + to_hex(sha256(document)).substr(0, 16);
}

Result<Bytes> patient_key_der(ByteView pem_or_der) {
  Bytes der(pem_or_der.begin(), pem_or_der.end());
  std::string_view text(reinterpret_cast<const char*>(pem_or_der.data()), pem_or_der.size());
  if (text.find("-----BEGIN") != std::string_view::npos) {
    BIO* bio = BIO_new_mem_buf(u8(pem_or_der), static_cast<int>(pem_or_der.size()));
    Pkey key(PEM_read_bio_PUBKEY(bio, nullptr, nullptr, nullptr));
    BIO_free(bio);
    if (!key) return Status::InvalidArgument("not a PEM public key (BEGIN PUBLIC KEY)");
    unsigned char* out = nullptr;
    int n = i2d_PUBKEY(key.get(), &out);
    if (n <= 0) return Status::InvalidArgument("the public key cannot be encoded");
    der =
        Bytes(reinterpret_cast<const std::byte*>(out), reinterpret_cast<const std::byte*>(out) + n);
    OPENSSL_free(out);
  }
  MEDGATE_ASSIGN_OR_RETURN(Pkey key, load_key(der));
  (void)key;
  return der;
}

Status verify_patient_signature(ByteView key_der, ByteView document, ByteView signature) {
  MEDGATE_ASSIGN_OR_RETURN(Pkey key, load_key(key_der));
  EVP_MD_CTX* ctx = EVP_MD_CTX_new();
  if (!ctx) return Status::Internal("out of memory");
  bool ok =
      EVP_DigestVerifyInit(ctx, nullptr, EVP_sha256(), nullptr, key.get()) == 1 &&
      EVP_DigestVerify(ctx, u8(signature), signature.size(), u8(document), document.size()) == 1;
  EVP_MD_CTX_free(ctx);
  if (!ok)
    return Status::VerificationFailed(
        "the patient's signature over the consent document does not verify");
  return Status::Ok();
}

}  // namespace medgate::ledger
