#include "appliance/cert_binding.h"

#include <cctype>

namespace medgate::appliance {

std::string CertBinding::to_string() const {
  switch (kind) {
    case Kind::kNone:
      return "";
    case Kind::kSha256:
      return "sha256:" + value;
    case Kind::kSubjectCn:
      return "cn:" + value;
  }
  return "";
}

bool CertBinding::matches(std::string_view sha256_hex, std::string_view subject_cn) const {
  switch (kind) {
    case Kind::kNone:
      return true;
    case Kind::kSha256:
      return !sha256_hex.empty() && sha256_hex == value;
    case Kind::kSubjectCn:
      return !subject_cn.empty() && subject_cn == value;
  }
  return false;
}

Result<CertBinding> cert_fingerprint_binding(std::string_view hex) {
  std::string digits;
  for (char ch : hex) {
    if (ch == ':') continue;
    if (!std::isxdigit(static_cast<unsigned char>(ch)))
      return Status::InvalidArgument(
          "a certificate fingerprint is 64 hex digits (SHA-256 of the certificate, as `openssl "
          "x509 -noout -fingerprint -sha256` prints it)");
    digits.push_back(static_cast<char>(std::tolower(static_cast<unsigned char>(ch))));
  }
  if (digits.size() != 64)
    return Status::InvalidArgument(
        "a certificate fingerprint is 64 hex digits (SHA-256 of the certificate), not " +
        std::to_string(digits.size()));
  return CertBinding{CertBinding::Kind::kSha256, std::move(digits)};
}

Result<CertBinding> cert_cn_binding(std::string_view cn) {
  if (cn.empty() || cn.size() > 64)
    return Status::InvalidArgument("a certificate subject CN is 1-64 characters");
  for (char ch : cn)
    if (static_cast<unsigned char>(ch) < 0x20 || static_cast<unsigned char>(ch) >= 0x7f)
      return Status::InvalidArgument("a certificate subject CN must be printable ASCII");
  return CertBinding{CertBinding::Kind::kSubjectCn, std::string(cn)};
}

Result<CertBinding> parse_cert_binding(std::string_view text) {
  if (text.empty()) return CertBinding{};
  if (text.starts_with("sha256:")) return cert_fingerprint_binding(text.substr(7));
  if (text.starts_with("cn:")) return cert_cn_binding(text.substr(3));
  return Status::InvalidArgument("a certificate binding is sha256:HEX or cn:NAME");
}

}  // namespace medgate::appliance
