// How an HL7 source's TLS client certificate is recognised: by the SHA-256 fingerprint of the
// certificate (DER), or by its subject CN. The certificate itself must first pass the listener's
// verification against [hl7] tls_client_ca; the binding then says which verified certificate may
// speak for which source, so one ward's central station cannot send as another's.
#pragma once

#include <string>
#include <string_view>

#include "hsm/status.h"

namespace medgate::appliance {

struct CertBinding {
  enum class Kind { kNone, kSha256, kSubjectCn };
  Kind kind = Kind::kNone;
  std::string value;  // 64 lowercase hex digits, or the CN

  bool bound() const { return kind != Kind::kNone; }
  // The stored and recorded form: "" (none), "sha256:<hex>" or "cn:<name>".
  std::string to_string() const;
  // Whether a verified peer certificate with this fingerprint (lowercase hex) and CN matches.
  bool matches(std::string_view sha256_hex, std::string_view subject_cn) const;
  friend bool operator==(const CertBinding&, const CertBinding&) = default;
};

// The stored form back (see to_string()); kInvalidArgument otherwise.
Result<CertBinding> parse_cert_binding(std::string_view text);
// 64 hex digits, upper or lower case, with or without ':' between bytes (as `openssl x509
// -fingerprint -sha256` prints it). kInvalidArgument naming what is wrong.
Result<CertBinding> cert_fingerprint_binding(std::string_view hex);
// 1-64 printable ASCII characters. kInvalidArgument otherwise.
Result<CertBinding> cert_cn_binding(std::string_view cn);

}  // namespace medgate::appliance
