// LEDGER-CRITICAL: consent documents a patient signs offline, and their signatures.
//
// A patient who enrolled a public key (`medctl patient enroll`) can grant or withdraw consent by
// signing a small JSON document with their own key, e.g. with stock OpenSSL:
//
//   openssl dgst -sha256 -sign patient-key.pem -out consent.sig consent.json
//
// The signature covers the document's exact bytes (no canonicalisation: what was signed is what
// the ledger stores). ECDSA (P-256, P-384, P-521) and RSA (2048 bits or more, PKCS#1 v1.5) keys
// are accepted. The document names the patient by pseudonym (`medctl consent draft` prints it),
// never by identifier, so it can sit on the ledger in plaintext:
//
//   {"medgate": "consent-grant", "ledger": "<ledger id>", "patient": "<pseudonym, 64 hex>",
//    "to": "Practitioner::\"dr-lee\"", "data": "vitals", "purpose": "TREAT",
//    "until": "2027-06-30T00:00:00Z"}                       ("until" optional)
//   {"medgate": "consent-revoke", "ledger": "<ledger id>", "patient": "<pseudonym>",
//    "grant": "<grant id>"}
//
// A signed grant's id is "s-" and the first 16 hex digits of SHA-256(document), so a document
// grants at most once, and the patient can name the grant in a withdrawal they sign.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "hsm/bytes.h"
#include "hsm/status.h"

namespace medgate::ledger {

struct ConsentDocument {
  enum class Kind { kGrant, kRevoke };
  Kind kind = Kind::kGrant;
  std::string ledger_id;
  Hash patient{};  // the pseudonym
  // kGrant
  std::string to;
  std::string data;
  std::string purpose;
  std::optional<std::uint64_t> until_us;
  // kRevoke
  std::string grant;
};

// kInvalidArgument naming the field that is missing or malformed.
Result<ConsentDocument> parse_consent_document(std::string_view text);
// The document text medctl consent draft prints (one line, fields in the order above).
std::string format_consent_document(const ConsentDocument& doc);
// "s-" + 16 hex digits of SHA-256(document bytes).
std::string signed_grant_id(ByteView document);

// A patient's public key from PEM or DER (SubjectPublicKeyInfo): returns its DER. Rejects key
// types and sizes not listed above.
Result<Bytes> patient_key_der(ByteView pem_or_der);
// kVerificationFailed when `signature` (DER, as openssl dgst -sign writes it) does not verify.
Status verify_patient_signature(ByteView key_der, ByteView document, ByteView signature);

}  // namespace medgate::ledger
