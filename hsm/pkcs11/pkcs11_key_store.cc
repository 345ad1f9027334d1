#include "hsm/pkcs11/pkcs11_key_store.h"

#include <openssl/asn1.h>
#include <openssl/core_names.h>
#include <openssl/evp.h>
#include <openssl/params.h>
#include <openssl/x509.h>
#include <p11-kit/uri.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <string_view>
#include <vector>

#include "hsm/pin.h"
#include "hsm/pkcs11/module.h"

namespace medgate::hsm::pkcs11 {
namespace {

constexpr std::string_view kDefaultObjectLabel = "medgate-signing";
// Where Debian keeps PKCS#11 modules and p11-kit's module registrations.
constexpr std::string_view kModuleDir = "/usr/lib/x86_64-linux-gnu/pkcs11";
constexpr std::array<std::string_view, 2> kModuleConfigDirs = {"/etc/pkcs11/modules",
                                                               "/usr/share/p11-kit/modules"};
// DER of the OID prime256v1 (1.2.840.10045.3.1.7): CKA_EC_PARAMS of a P-256 key.
constexpr std::array<unsigned char, 10> kP256Params = {0x06, 0x08, 0x2a, 0x86, 0x48,
                                                       0xce, 0x3d, 0x03, 0x01, 0x07};
constexpr std::size_t kMaxRandomBytes = 1 << 20;

struct UriFree {
  void operator()(P11KitUri* uri) const { p11_kit_uri_free(uri); }
};
using UriPtr = std::unique_ptr<P11KitUri, UriFree>;

}  // namespace

// What the URI asks for, checked.
struct Pkcs11KeyStore::Request {
  UriPtr uri;
  std::string module_path;
  std::string object_label;
  std::optional<Bytes> id;  // CKA_ID from id=, if given
  PinSource pin;
  std::string token_spec;   // "token=L" (or serial/slot) for messages
  std::string description;  // the URI without pin-source
};

namespace {

std::string fixed_field(const unsigned char* field, std::size_t size) {
  return size > 0 && field[0] != 0 ? trim_field(field, size) : std::string();
}

// The token-selecting attributes of the URI, as a person would write them.
std::string describe_token_selection(P11KitUri* uri) {
  std::string spec;
  auto add = [&spec](std::string_view name, const std::string& value) {
    if (value.empty()) return;
    if (!spec.empty()) spec += ';';
    spec += std::string(name) + "=" + value;
  };
  const CK_TOKEN_INFO* token = p11_kit_uri_get_token_info(uri);
  add("token", fixed_field(token->label, sizeof token->label));
  add("manufacturer", fixed_field(token->manufacturerID, sizeof token->manufacturerID));
  add("serial", fixed_field(token->serialNumber, sizeof token->serialNumber));
  add("model", fixed_field(token->model, sizeof token->model));
  if (CK_SLOT_ID slot = p11_kit_uri_get_slot_id(uri); slot != static_cast<CK_SLOT_ID>(-1))
    add("slot-id", std::to_string(slot));
  return spec.empty() ? "any token" : spec;
}

// The URI as written, minus pin-source (a file name is not a secret, but a description is for
// logs and status pages, where it adds nothing), with the default object label made explicit.
std::string describe_uri(const std::string& text, bool has_object) {
  std::size_t q = text.find('?');
  std::string path = text.substr(0, q);
  if (!has_object)
    path +=
        (path.back() == ':' ? "" : ";") + std::string("object=") + std::string(kDefaultObjectLabel);
  if (q == std::string::npos) return path;
  std::string query;
  std::string_view rest = std::string_view(text).substr(q + 1);
  while (!rest.empty()) {
    std::size_t amp = rest.find('&');
    std::string_view part = rest.substr(0, amp);
    rest = amp == std::string_view::npos ? std::string_view() : rest.substr(amp + 1);
    if (part.starts_with("pin-source=") || part.starts_with("pin-value=") || part.empty()) continue;
    query += (query.empty() ? "?" : "&") + std::string(part);
  }
  return path + query;
}

// The "module:" line of a p11-kit module registration, if the file exists.
std::optional<std::string> module_from_p11kit_config(const std::string& name) {
  for (std::string_view dir : kModuleConfigDirs) {
    std::ifstream in(std::string(dir) + "/" + name + ".module");
    std::string line;
    while (in && std::getline(in, line)) {
      if (!line.starts_with("module:")) continue;
      std::string value = line.substr(7);
      value.erase(0, value.find_first_not_of(" \t"));
      value.erase(value.find_last_not_of(" \t\r") + 1);
      if (value.empty()) continue;
      return value.front() == '/' ? value : std::string(kModuleDir) + "/" + value;
    }
  }
  return std::nullopt;
}

Result<std::string> resolve_module(P11KitUri* uri) {
  const char* path = p11_kit_uri_get_module_path(uri);
  const char* name = p11_kit_uri_get_module_name(uri);
  if (name != nullptr && (*name == '\0' || std::string_view(name).find('/') != std::string::npos))
    return Status::InvalidArgument(std::string("module-name '") + name +
                                   "' must be a plain name (use module-path for a file name)");
  if (path != nullptr) {
    std::filesystem::path p(path);
    if (!p.is_absolute())
      return Status::InvalidArgument(
          std::string("module-path must be an absolute file name, not '") + path + "'");
    std::error_code ec;
    if (!std::filesystem::is_directory(p, ec)) return std::string(path);
    // RFC 7512: module-path may name a directory, to be combined with module-name.
    if (name == nullptr)
      return Status::InvalidArgument(std::string("module-path ") + path +
                                     " is a directory; add module-name or name the file");
    for (const std::string& candidate : {std::string(name) + ".so", std::string(name)})
      if (std::filesystem::is_regular_file(p / candidate, ec)) return (p / candidate).string();
    return Status::InvalidArgument(std::string("no module ") + name + " in " + path);
  }
  if (name != nullptr) {
    if (auto from_config = module_from_p11kit_config(name)) return *from_config;
    std::error_code ec;
    for (const std::string& candidate : {std::string(name) + ".so", std::string(name)}) {
      std::filesystem::path p = std::filesystem::path(kModuleDir) / candidate;
      if (std::filesystem::is_regular_file(p, ec)) return p.string();
    }
    return Status::InvalidArgument(
        std::string("module-name=") + name + " is neither a p11-kit module nor a file in " +
        std::string(kModuleDir) + "; use module-path=/path/to/module.so");
  }
  return Status::InvalidArgument(
      "the pkcs11: URI names no module; add ?module-path=/path/to/module.so");
}

// pin-source from the URI: "file:/path", "file:///path" or an absolute path.
Result<PinSource> pin_source_from_uri(std::string_view source) {
  if (source.starts_with("file://"))
    source.remove_prefix(7);
  else if (source.starts_with("file:"))
    source.remove_prefix(5);
  if (!source.starts_with("/"))
    return Status::InvalidArgument("pin-source '" + std::string(source) +
                                   "' is not supported; use pin-source=file:/path/to/pin");
  return PinSource{PinSource::Kind::kFile, std::string(source)};
}

Result<Pkcs11KeyStore::Request> parse_request(const KeyStoreConfig& config) {
  Pkcs11KeyStore::Request request;
  request.uri.reset(p11_kit_uri_new());
  if (!request.uri) return Status::Internal("out of memory");
  int rc = p11_kit_uri_parse(config.uri.c_str(), P11_KIT_URI_FOR_ANY, request.uri.get());
  if (rc != P11_KIT_URI_OK) {
    // The URI may carry a PIN: say what is wrong without echoing it.
    return Status::InvalidArgument(std::string("malformed pkcs11: URI: ") +
                                   p11_kit_uri_message(rc));
  }
  P11KitUri* uri = request.uri.get();
  if (p11_kit_uri_get_pin_value(uri) != nullptr)
    return Status::InvalidArgument(
        "PIN in the URI is not accepted; use a PIN file, environment variable or systemd "
        "credential");
  if (p11_kit_uri_any_unrecognized(uri))
    return Status::InvalidArgument(
        "the pkcs11: URI has an attribute medgate does not know; only token, manufacturer, "
        "serial, model, slot-*, library-*, object, id and type are understood");
  if (const CK_ATTRIBUTE* cls = p11_kit_uri_get_attribute(uri, CKA_CLASS)) {
    CK_OBJECT_CLASS c = 0;
    if (cls->ulValueLen == sizeof c) std::memcpy(&c, cls->pValue, sizeof c);
    if (c != CKO_PRIVATE_KEY && c != CKO_PUBLIC_KEY)
      return Status::InvalidArgument("the pkcs11: URI names an object type other than a key pair");
  }

  MEDGATE_ASSIGN_OR_RETURN(request.module_path, resolve_module(uri));

  const CK_ATTRIBUTE* label = p11_kit_uri_get_attribute(uri, CKA_LABEL);
  request.object_label =
      label != nullptr ? std::string(static_cast<const char*>(label->pValue), label->ulValueLen)
                       : std::string(kDefaultObjectLabel);
  if (request.object_label.empty())
    return Status::InvalidArgument("the pkcs11: URI has an empty object=");
  if (const CK_ATTRIBUTE* id = p11_kit_uri_get_attribute(uri, CKA_ID)) {
    const auto* begin = static_cast<const std::byte*>(id->pValue);
    request.id = Bytes(begin, begin + id->ulValueLen);
    if (request.id->empty()) return Status::InvalidArgument("the pkcs11: URI has an empty id=");
  }

  request.pin = config.pin;
  if (const char* source = p11_kit_uri_get_pin_source(uri);
      source != nullptr && config.pin.kind == PinSource::Kind::kNone) {
    MEDGATE_ASSIGN_OR_RETURN(request.pin, pin_source_from_uri(source));
  }
  request.token_spec = describe_token_selection(uri);
  request.description = describe_uri(config.uri, label != nullptr);
  return request;
}

struct TokenChoice {
  CK_SLOT_ID slot = 0;
  std::string label;
};

Result<TokenChoice> find_token(const Pkcs11Module& module, P11KitUri* uri,
                               const std::string& token_spec) {
  CK_INFO info{};
  CK_RV rv = module.fn()->C_GetInfo(&info);
  if (rv != CKR_OK)
    return Status::Unavailable("C_GetInfo on " + module.path() + " failed: " + ckr_name(rv));
  if (!p11_kit_uri_match_module_info(uri, &info))
    return Status::Unavailable("module " + module.path() + " (" +
                               trim_field(info.libraryDescription, sizeof info.libraryDescription) +
                               ") does not match the library attributes of the URI");

  MEDGATE_ASSIGN_OR_RETURN(std::vector<CK_SLOT_ID> slots, slots_with_token(module));
  const CK_SLOT_ID wanted_slot = p11_kit_uri_get_slot_id(uri);
  std::vector<TokenChoice> matches;
  std::string seen;
  for (CK_SLOT_ID slot : slots) {
    CK_SLOT_INFO slot_info{};
    CK_TOKEN_INFO token{};
    if (module.fn()->C_GetSlotInfo(slot, &slot_info) != CKR_OK ||
        module.fn()->C_GetTokenInfo(slot, &token) != CKR_OK)
      continue;  // the token went away while we looked
    if ((token.flags & CKF_TOKEN_INITIALIZED) == 0) continue;  // e.g. SoftHSM's free slot
    std::string label = trim_field(token.label, sizeof token.label);
    seen += (seen.empty() ? "'" : ", '") + label + "'";
    if (wanted_slot != static_cast<CK_SLOT_ID>(-1) && slot != wanted_slot) continue;
    if (!p11_kit_uri_match_slot_info(uri, &slot_info) || !p11_kit_uri_match_token_info(uri, &token))
      continue;
    matches.push_back({slot, label});
  }
  if (matches.empty())
    return Status::Unavailable("no token matching " + token_spec + " in module " + module.path() +
                               " (tokens seen: " + (seen.empty() ? "none" : seen) + ")");
  if (matches.size() > 1)
    return Status::InvalidArgument(std::to_string(matches.size()) + " tokens match " + token_spec +
                                   " in module " + module.path() + " (" + seen +
                                   "); name one with token=, serial= or slot-id=");
  return matches.front();
}

Status login(const Pkcs11Module& module, CK_SESSION_HANDLE session, const std::string& token,
             const PinSource& source) {
  MEDGATE_ASSIGN_OR_RETURN(std::string pin, read_pin(source));
  CK_RV rv = module.fn()->C_Login(session, CKU_USER, reinterpret_cast<CK_UTF8CHAR*>(pin.data()),
                                  pin.size());
  secure_wipe(pin);
  switch (rv) {
    case CKR_OK:
    // Login state is per process and token: another key store in this process is logged in.
    case CKR_USER_ALREADY_LOGGED_IN:
      return Status::Ok();
    case CKR_PIN_INCORRECT:
    case CKR_PIN_INVALID:
    case CKR_PIN_LEN_RANGE:
      return Status::PermissionDenied("wrong PIN for token " + token + " (" + source.describe() +
                                      ")");
    case CKR_PIN_LOCKED:
      return Status::PermissionDenied("PIN locked for token " + token +
                                      " after too many wrong PINs; the security officer must "
                                      "reset it, or the token must be re-initialised");
    case CKR_PIN_EXPIRED:
      return Status::PermissionDenied("PIN expired for token " + token);
    case CKR_USER_PIN_NOT_INITIALIZED:
      return Status::FailedPrecondition("token " + token + " has no user PIN set (C_InitPIN)");
    default:
      return Status::Unavailable("logging in to token " + token + " failed: " + ckr_name(rv));
  }
}

// CKA_EC_POINT is a DER OCTET STRING around the uncompressed point (PKCS#11 2.40); some modules
// return the bare point. Either becomes a P-256 SubjectPublicKeyInfo.
Result<PublicKey> public_key_from_ec_point(ByteView ec_point) {
  Bytes point;
  if (ec_point.size() == 65 && ec_point[0] == std::byte{0x04}) {
    point.assign(ec_point.begin(), ec_point.end());
  } else {
    const unsigned char* p = u8(ec_point);
    ASN1_OCTET_STRING* wrapped =
        d2i_ASN1_OCTET_STRING(nullptr, &p, static_cast<long>(ec_point.size()));
    if (wrapped != nullptr && p == u8(ec_point) + ec_point.size()) {
      const auto* data = reinterpret_cast<const std::byte*>(ASN1_STRING_get0_data(wrapped));
      point.assign(data, data + ASN1_STRING_length(wrapped));
    }
    ASN1_OCTET_STRING_free(wrapped);
  }
  if (point.size() != 65 || point[0] != std::byte{0x04})
    return Status::InvalidArgument("CKA_EC_POINT is not an uncompressed P-256 point");

  char group[] = "prime256v1";
  std::array<OSSL_PARAM, 3> params = {
      OSSL_PARAM_construct_utf8_string(OSSL_PKEY_PARAM_GROUP_NAME, group, 0),
      OSSL_PARAM_construct_octet_string(OSSL_PKEY_PARAM_PUB_KEY, point.data(), point.size()),
      OSSL_PARAM_construct_end()};
  std::unique_ptr<EVP_PKEY_CTX, decltype(&EVP_PKEY_CTX_free)> ctx(
      EVP_PKEY_CTX_new_from_name(nullptr, "EC", nullptr), EVP_PKEY_CTX_free);
  EVP_PKEY* raw_key = nullptr;
  if (!ctx || EVP_PKEY_fromdata_init(ctx.get()) != 1 ||
      EVP_PKEY_fromdata(ctx.get(), &raw_key, EVP_PKEY_PUBLIC_KEY, params.data()) != 1)
    return Status::InvalidArgument("CKA_EC_POINT is not a point on P-256");
  std::unique_ptr<EVP_PKEY, decltype(&EVP_PKEY_free)> key(raw_key, EVP_PKEY_free);
  unsigned char* der = nullptr;
  int n = i2d_PUBKEY(key.get(), &der);
  if (n <= 0) return Status::Internal("cannot encode the public key as SubjectPublicKeyInfo");
  Bytes spki(reinterpret_cast<std::byte*>(der), reinterpret_cast<std::byte*>(der) + n);
  OPENSSL_free(der);
  return PublicKey::from_spki_der(spki);
}

// ---- token access ----

// One session's view of the token for the helpers below. A helper whose PKCS#11 call fails
// stores that call's CK_RV in *failed, so that the caller can tell a lost session from other
// errors (see Pkcs11KeyStore::with_session).
struct Token {
  const Pkcs11Module& module;
  CK_SESSION_HANDLE session;
  const std::string& label;
  CK_RV* failed;

  CK_FUNCTION_LIST* fn() const { return module.fn(); }
  // "<what> on token <label> failed: CKR_..." and records rv.
  Status fail(CK_RV rv, std::string_view what) const {
    *failed = rv;
    return Status::Unavailable(std::string(what) + " on token " + label +
                               " failed: " + ckr_name(rv));
  }
};

// The return codes after which the session, the login or the object handles cannot be trusted:
// the token was reset, unplugged or replugged, or every session on the slot was closed. Object
// handles are only valid for the token's current "incarnation", so a stale handle counts too.
bool session_lost(CK_RV rv) {
  switch (rv) {
    case CKR_SESSION_HANDLE_INVALID:
    case CKR_SESSION_CLOSED:
    case CKR_DEVICE_REMOVED:
    case CKR_DEVICE_ERROR:
    case CKR_TOKEN_NOT_PRESENT:
    case CKR_TOKEN_NOT_RECOGNIZED:
    case CKR_USER_NOT_LOGGED_IN:
    case CKR_OBJECT_HANDLE_INVALID:
    case CKR_KEY_HANDLE_INVALID:
      return true;
    default:
      return false;
  }
}

// Whether the old session may still be open after `rv` (then it is closed before the new one is
// opened). After CKR_SESSION_HANDLE_INVALID and the like the handle number may already belong to
// another key store's new session in this process: closing it would close theirs.
bool session_still_open(CK_RV rv) {
  return rv == CKR_USER_NOT_LOGGED_IN || rv == CKR_OBJECT_HANDLE_INVALID ||
         rv == CKR_KEY_HANDLE_INVALID;
}

Result<std::vector<CK_OBJECT_HANDLE>> find_objects(const Token& t, std::span<CK_ATTRIBUTE> match) {
  CK_RV rv = t.fn()->C_FindObjectsInit(t.session, match.data(), match.size());
  if (rv != CKR_OK) return t.fail(rv, "C_FindObjectsInit");
  std::vector<CK_OBJECT_HANDLE> found;
  std::array<CK_OBJECT_HANDLE, 16> batch{};
  CK_ULONG count = 0;
  while ((rv = t.fn()->C_FindObjects(t.session, batch.data(), batch.size(), &count)) == CKR_OK &&
         count > 0)
    found.insert(found.end(), batch.begin(), batch.begin() + static_cast<std::ptrdiff_t>(count));
  CK_RV final_rv = t.fn()->C_FindObjectsFinal(t.session);
  if (rv != CKR_OK) return t.fail(rv, "C_FindObjects");
  if (final_rv != CKR_OK) return t.fail(final_rv, "C_FindObjectsFinal");
  return found;
}

Result<Bytes> attribute(const Token& t, CK_OBJECT_HANDLE object, CK_ATTRIBUTE_TYPE type,
                        std::string_view name) {
  CK_ATTRIBUTE query{type, nullptr, 0};
  CK_RV rv = t.fn()->C_GetAttributeValue(t.session, object, &query, 1);
  if (rv != CKR_OK) return t.fail(rv, "reading " + std::string(name));
  if (query.ulValueLen == CK_UNAVAILABLE_INFORMATION)
    return Status::Unavailable("token " + t.label + " does not reveal " + std::string(name));
  Bytes value(query.ulValueLen);
  query.pValue = value.data();
  rv = t.fn()->C_GetAttributeValue(t.session, object, &query, 1);
  if (rv != CKR_OK) return t.fail(rv, "reading " + std::string(name));
  value.resize(query.ulValueLen);
  return value;
}

Result<Bytes> random_bytes(const Token& t, std::size_t n) {
  Bytes out(n);
  if (n == 0) return out;
  CK_RV rv = t.fn()->C_GenerateRandom(t.session, u8(std::span<std::byte>(out)), n);
  if (rv != CKR_OK) return t.fail(rv, "C_GenerateRandom");
  return out;
}

// Whether the session still answers and is logged in as the user.
bool session_healthy(const Token& t) {
  CK_SESSION_INFO info{};
  return t.fn()->C_GetSessionInfo(t.session, &info) == CKR_OK &&
         (info.state == CKS_RW_USER_FUNCTIONS || info.state == CKS_RO_USER_FUNCTIONS);
}

// PKCS#11 2.40 declares input buffers non-const; modules only read them. Never null: modules
// refuse a null pointer with CKR_ARGUMENTS_BAD even for zero bytes.
CK_BYTE* input(ByteView bytes) {
  static CK_BYTE none = 0;
  return bytes.empty() ? &none : const_cast<CK_BYTE*>(u8(bytes));
}

// At most one object matches: nullopt when none does, kInvalidArgument when several do (the
// token holds duplicates medgate did not make; a person has to choose).
Result<std::optional<CK_OBJECT_HANDLE>> find_unique(const Token& t, std::span<CK_ATTRIBUTE> match,
                                                    std::string_view what) {
  MEDGATE_ASSIGN_OR_RETURN(std::vector<CK_OBJECT_HANDLE> found, find_objects(t, match));
  if (found.empty()) return std::optional<CK_OBJECT_HANDLE>();
  if (found.size() > 1)
    return Status::InvalidArgument("token " + t.label + " holds " + std::to_string(found.size()) +
                                   " " + std::string(what) + " objects; remove all but one");
  return std::optional<CK_OBJECT_HANDLE>(found.front());
}

// ---- signing keys ----

using SigningKey = Pkcs11KeyStore::SigningKey;

// CKA_ID of a signing key: a 4-byte big-endian sequence number, then the first 16 bytes of the
// key id. The sequence number keeps the creation order on the token itself (CKA_START_DATE has
// only day resolution, object handles are not ordered, and a label suffix would break object=
// in the URI); the key-id part tells keys apart for anyone looking with pkcs11-tool.
constexpr std::size_t kSequenceBytes = 4;
constexpr std::size_t kKeyIdPrefixBytes = 16;

Bytes signing_key_ckid(std::uint32_t sequence, const KeyId& key_id) {
  Bytes ckid(kSequenceBytes + kKeyIdPrefixBytes);
  for (std::size_t i = 0; i < kSequenceBytes; ++i)
    ckid[i] = static_cast<std::byte>(sequence >> (8 * (kSequenceBytes - 1 - i)));
  std::copy_n(key_id.begin(), kKeyIdPrefixBytes, ckid.begin() + kSequenceBytes);
  return ckid;
}

// The sequence number in a CKA_ID of medgate's form; 0 for any other CKA_ID (a key made before
// medgate numbered its keys, or named by id= in the URI), which sorts it first.
std::uint32_t sequence_of(ByteView ckid) {
  if (ckid.size() != kSequenceBytes + kKeyIdPrefixBytes) return 0;
  std::uint32_t sequence = 0;
  for (std::size_t i = 0; i < kSequenceBytes; ++i)
    sequence = (sequence << 8) | std::to_integer<std::uint32_t>(ckid[i]);
  return sequence;
}

bool created_before(const SigningKey& a, const SigningKey& b) {
  const std::uint32_t sa = sequence_of(a.ckid);
  const std::uint32_t sb = sequence_of(b.ckid);
  if (sa != sb) return sa < sb;
  return a.ckid < b.ckid;  // only keys medgate did not number tie; any stable order will do
}

std::string describe_object(const Pkcs11KeyStore::Request& request, const std::string& token) {
  std::string s = "object=" + request.object_label;
  if (request.id) s += ";id=" + to_hex(*request.id);
  return s + " on token " + token;
}

Result<PublicKey> read_public_key(const Token& t, CK_OBJECT_HANDLE public_key,
                                  const std::string& what) {
  MEDGATE_ASSIGN_OR_RETURN(Bytes params, attribute(t, public_key, CKA_EC_PARAMS, "CKA_EC_PARAMS"));
  if (!std::equal(params.begin(), params.end(), kP256Params.begin(), kP256Params.end(),
                  [](std::byte a, unsigned char b) { return a == std::byte{b}; }))
    return Status::InvalidArgument("the key " + what + " is not on curve P-256");
  MEDGATE_ASSIGN_OR_RETURN(Bytes point, attribute(t, public_key, CKA_EC_POINT, "CKA_EC_POINT"));
  Result<PublicKey> key = public_key_from_ec_point(point);
  if (!key.ok()) return key.status().with_context("the key " + what);
  return key;
}

// The private key labelled `label` whose CKA_ID is `ckid`; nullopt when there is none.
Result<std::optional<CK_OBJECT_HANDLE>> find_private_key(const Token& t, const std::string& label,
                                                         ByteView ckid) {
  CK_OBJECT_CLASS private_class = CKO_PRIVATE_KEY;
  CK_KEY_TYPE ec = CKK_EC;
  std::string l = label;
  Bytes id(ckid.begin(), ckid.end());
  std::array<CK_ATTRIBUTE, 4> match = {{
      {CKA_CLASS, &private_class, sizeof private_class},
      {CKA_KEY_TYPE, &ec, sizeof ec},
      {CKA_LABEL, l.data(), l.size()},
      {CKA_ID, id.data(), id.size()},
  }};
  return find_unique(t, match, "EC private key '" + label + "' id=" + to_hex(ckid));
}

// Every signing key pair labelled `label`, oldest first, with its public key read.
Result<std::vector<SigningKey>> find_signing_keys(const Token& t, const std::string& label) {
  CK_OBJECT_CLASS private_class = CKO_PRIVATE_KEY;
  CK_KEY_TYPE ec = CKK_EC;
  std::string l = label;
  std::array<CK_ATTRIBUTE, 3> match = {{
      {CKA_CLASS, &private_class, sizeof private_class},
      {CKA_KEY_TYPE, &ec, sizeof ec},
      {CKA_LABEL, l.data(), l.size()},
  }};
  MEDGATE_ASSIGN_OR_RETURN(std::vector<CK_OBJECT_HANDLE> private_keys, find_objects(t, match));

  std::vector<SigningKey> keys;
  for (CK_OBJECT_HANDLE private_key : private_keys) {
    MEDGATE_ASSIGN_OR_RETURN(Bytes ckid, attribute(t, private_key, CKA_ID, "CKA_ID"));
    const std::string what = "object=" + label + ";id=" + to_hex(ckid) + " on token " + t.label;
    for (const SigningKey& seen : keys)
      if (seen.ckid == ckid)
        return Status::InvalidArgument(
            "token " + t.label + " holds several EC private keys labelled " + label +
            " with CKA_ID " + to_hex(ckid) + "; medgate cannot tell which public key is whose");
    // The public half is the one with the same label and CKA_ID.
    CK_OBJECT_CLASS public_class = CKO_PUBLIC_KEY;
    std::array<CK_ATTRIBUTE, 4> public_match = {{
        {CKA_CLASS, &public_class, sizeof public_class},
        {CKA_KEY_TYPE, &ec, sizeof ec},
        {CKA_LABEL, l.data(), l.size()},
        {CKA_ID, ckid.data(), ckid.size()},
    }};
    MEDGATE_ASSIGN_OR_RETURN(std::vector<CK_OBJECT_HANDLE> public_keys,
                             find_objects(t, public_match));
    if (public_keys.empty())
      return Status::NotFound("the signing key " + what + " has no public key object next to it");
    if (public_keys.size() > 1)
      return Status::InvalidArgument(std::to_string(public_keys.size()) + " EC public keys match " +
                                     what);
    MEDGATE_ASSIGN_OR_RETURN(PublicKey public_key, read_public_key(t, public_keys[0], what));
    keys.push_back(SigningKey{std::move(public_key), std::move(ckid), private_key});
  }
  std::sort(keys.begin(), keys.end(), created_before);
  return keys;
}

struct KeyPair {
  CK_OBJECT_HANDLE private_key = CK_INVALID_HANDLE;
  CK_OBJECT_HANDLE public_key = CK_INVALID_HANDLE;
};

// Every signing key is made with this one template: a P-256 pair whose private half is a token
// object, private, sensitive, never extractable and sign-only.
Result<KeyPair> generate_key_pair(const Token& t, const std::string& label, ByteView ckid) {
  Bytes id(ckid.begin(), ckid.end());
  std::string l = label;
  std::array<unsigned char, kP256Params.size()> ec_params = kP256Params;
  CK_BBOOL yes = CK_TRUE;
  CK_BBOOL no = CK_FALSE;
  std::array<CK_ATTRIBUTE, 6> public_template = {{
      {CKA_TOKEN, &yes, sizeof yes},
      {CKA_PRIVATE, &no, sizeof no},  // readable without the PIN, e.g. by pkcs11-tool
      {CKA_VERIFY, &yes, sizeof yes},
      {CKA_EC_PARAMS, ec_params.data(), ec_params.size()},
      {CKA_LABEL, l.data(), l.size()},
      {CKA_ID, id.data(), id.size()},
  }};
  std::array<CK_ATTRIBUTE, 10> private_template = {{
      {CKA_TOKEN, &yes, sizeof yes},
      {CKA_PRIVATE, &yes, sizeof yes},
      {CKA_SENSITIVE, &yes, sizeof yes},
      {CKA_EXTRACTABLE, &no, sizeof no},
      {CKA_SIGN, &yes, sizeof yes},
      {CKA_DECRYPT, &no, sizeof no},
      {CKA_UNWRAP, &no, sizeof no},
      {CKA_DERIVE, &no, sizeof no},
      {CKA_LABEL, l.data(), l.size()},
      {CKA_ID, id.data(), id.size()},
  }};
  CK_MECHANISM mechanism{CKM_EC_KEY_PAIR_GEN, nullptr, 0};
  KeyPair pair;
  CK_RV rv = t.fn()->C_GenerateKeyPair(
      t.session, &mechanism, public_template.data(), public_template.size(),
      private_template.data(), private_template.size(), &pair.public_key, &pair.private_key);
  if (rv != CKR_OK) return t.fail(rv, "generating a signing key '" + label + "'");
  return pair;
}

// Generates a signing key with sequence number `sequence` (and its CKA_ID in medgate's form) or,
// when `fixed_ckid` is set, with that CKA_ID (the URI's id=).
Result<SigningKey> create_signing_key_on(const Token& t, const std::string& label,
                                         std::uint32_t sequence,
                                         const std::optional<Bytes>& fixed_ckid) {
  // The key id is known only once the key exists: generate under the sequence number with a zero
  // key-id part (so a crash before the CKA_ID is set still sorts the key right), then set it.
  Bytes ckid = fixed_ckid.value_or(signing_key_ckid(sequence, KeyId{}));
  MEDGATE_ASSIGN_OR_RETURN(KeyPair pair, generate_key_pair(t, label, ckid));
  auto destroy = [&t, &pair] {
    t.fn()->C_DestroyObject(t.session, pair.private_key);
    t.fn()->C_DestroyObject(t.session, pair.public_key);
  };
  Result<PublicKey> public_key =
      read_public_key(t, pair.public_key, "just generated on " + t.label);
  if (!public_key.ok()) {
    destroy();
    return public_key.status();
  }
  if (!fixed_ckid) {
    ckid = signing_key_ckid(sequence, public_key->id());
    CK_ATTRIBUTE set{CKA_ID, ckid.data(), ckid.size()};
    for (CK_OBJECT_HANDLE object : {pair.private_key, pair.public_key}) {
      CK_RV rv = t.fn()->C_SetAttributeValue(t.session, object, &set, 1);
      if (rv != CKR_OK) {
        destroy();
        return t.fail(rv, "setting CKA_ID of a new signing key");
      }
    }
  }
  return SigningKey{std::move(public_key).value(), std::move(ckid), pair.private_key};
}

// ---- the KEK, the pseudonym key and the counter ----

constexpr std::string_view kKekLabel = "medgate-kek";
constexpr std::string_view kPseudonymLabel = "medgate-pseudonym";
constexpr std::string_view kCounterLabel = "medgate-counter";
constexpr std::string_view kApplication = "medgate";
constexpr std::size_t kKekBytes = 32;
constexpr std::size_t kPseudonymKeyBytes = 32;
constexpr std::size_t kCounterBytes = 8;

// Wrapped data keys: version || IV || ciphertext || tag.
constexpr std::byte kWrapVersion{0x01};
constexpr std::size_t kIvBytes = 12;
constexpr std::size_t kTagBytes = 16;
constexpr std::size_t kMaxDataKeyBytes = 64;
constexpr std::size_t kWrapOverhead = 1 + kIvBytes + kTagBytes;
// CKR_AEAD_DECRYPT_FAILED from PKCS#11 3.0, which p11-kit's 2.40 header lacks.
constexpr CK_RV kCkrAeadDecryptFailed = 0x35;

// A buffer for key material that is wiped on every way out of the scope.
struct ScratchSecret {
  explicit ScratchSecret(std::size_t n) : bytes(n) {}
  ~ScratchSecret() { secure_wipe(bytes); }
  ScratchSecret(const ScratchSecret&) = delete;
  ScratchSecret& operator=(const ScratchSecret&) = delete;
  Bytes bytes;
};

Result<std::optional<CK_OBJECT_HANDLE>> find_secret_key(const Token& t, CK_KEY_TYPE type,
                                                        std::string_view label,
                                                        std::string_view what) {
  CK_OBJECT_CLASS secret = CKO_SECRET_KEY;
  std::string l(label);
  std::array<CK_ATTRIBUTE, 3> match = {{
      {CKA_CLASS, &secret, sizeof secret},
      {CKA_KEY_TYPE, &type, sizeof type},
      {CKA_LABEL, l.data(), l.size()},
  }};
  return find_unique(t, match, std::string(what) + " '" + l + "'");
}

Result<std::optional<CK_OBJECT_HANDLE>> find_kek(const Token& t) {
  return find_secret_key(t, CKK_AES, kKekLabel, "KEK");
}

Result<std::optional<CK_OBJECT_HANDLE>> find_pseudonym_key(const Token& t) {
  return find_secret_key(t, CKK_GENERIC_SECRET, kPseudonymLabel, "pseudonym key");
}

// The counter objects: normally one; two when a process died between creating the successor
// and destroying the predecessor in increment_counter().
Result<std::vector<CK_OBJECT_HANDLE>> find_counters(const Token& t) {
  CK_OBJECT_CLASS data = CKO_DATA;
  std::string label(kCounterLabel);
  std::string application(kApplication);
  std::array<CK_ATTRIBUTE, 3> match = {{
      {CKA_CLASS, &data, sizeof data},
      {CKA_APPLICATION, application.data(), application.size()},
      {CKA_LABEL, label.data(), label.size()},
  }};
  return find_objects(t, match);
}

Result<std::optional<CK_OBJECT_HANDLE>> find_counter(const Token& t) {
  MEDGATE_ASSIGN_OR_RETURN(std::vector<CK_OBJECT_HANDLE> found, find_counters(t));
  if (found.empty()) return std::optional<CK_OBJECT_HANDLE>();
  return std::optional<CK_OBJECT_HANDLE>(found.front());
}

// A secret key on the token that never leaves it, allowed exactly the usages given.
Result<CK_OBJECT_HANDLE> generate_secret_key(const Token& t, CK_MECHANISM_TYPE mechanism_type,
                                             std::string_view label, std::size_t bytes,
                                             bool encrypt, bool sign, std::string_view what) {
  std::string l(label);
  CK_ULONG value_len = bytes;
  CK_BBOOL yes = CK_TRUE;
  CK_BBOOL no = CK_FALSE;
  CK_BBOOL may_encrypt = encrypt ? CK_TRUE : CK_FALSE;
  CK_BBOOL may_sign = sign ? CK_TRUE : CK_FALSE;
  std::array<CK_ATTRIBUTE, 13> key_template = {{
      {CKA_TOKEN, &yes, sizeof yes},
      {CKA_PRIVATE, &yes, sizeof yes},
      {CKA_SENSITIVE, &yes, sizeof yes},
      {CKA_EXTRACTABLE, &no, sizeof no},
      {CKA_ENCRYPT, &may_encrypt, sizeof may_encrypt},
      {CKA_DECRYPT, &may_encrypt, sizeof may_encrypt},
      {CKA_SIGN, &may_sign, sizeof may_sign},
      {CKA_VERIFY, &no, sizeof no},
      {CKA_WRAP, &no, sizeof no},
      {CKA_UNWRAP, &no, sizeof no},
      {CKA_DERIVE, &no, sizeof no},
      {CKA_VALUE_LEN, &value_len, sizeof value_len},
      {CKA_LABEL, l.data(), l.size()},
  }};
  CK_MECHANISM mechanism{mechanism_type, nullptr, 0};
  CK_OBJECT_HANDLE key = CK_INVALID_HANDLE;
  CK_RV rv =
      t.fn()->C_GenerateKey(t.session, &mechanism, key_template.data(), key_template.size(), &key);
  if (rv != CKR_OK) return t.fail(rv, "generating the " + std::string(what) + " '" + l + "'");
  return key;
}

Result<CK_OBJECT_HANDLE> create_kek(const Token& t) {
  return generate_secret_key(t, CKM_AES_KEY_GEN, kKekLabel, kKekBytes, /*encrypt=*/true,
                             /*sign=*/false, "KEK");
}

Result<CK_OBJECT_HANDLE> create_pseudonym_key(const Token& t) {
  return generate_secret_key(t, CKM_GENERIC_SECRET_KEY_GEN, kPseudonymLabel, kPseudonymKeyBytes,
                             /*encrypt=*/false, /*sign=*/true, "pseudonym key");
}

std::array<std::byte, kCounterBytes> encode_counter(std::uint64_t value) {
  std::array<std::byte, kCounterBytes> out{};
  for (std::size_t i = 0; i < kCounterBytes; ++i)
    out[i] = static_cast<std::byte>(value >> (8 * (kCounterBytes - 1 - i)));
  return out;
}

Result<CK_OBJECT_HANDLE> create_counter_object(const Token& t, std::uint64_t initial) {
  CK_OBJECT_CLASS data = CKO_DATA;
  CK_BBOOL yes = CK_TRUE;
  std::string label(kCounterLabel);
  std::string application(kApplication);
  std::array<std::byte, kCounterBytes> value = encode_counter(initial);
  std::array<CK_ATTRIBUTE, 7> object_template = {{
      {CKA_CLASS, &data, sizeof data},
      {CKA_TOKEN, &yes, sizeof yes},
      {CKA_PRIVATE, &yes, sizeof yes},
      {CKA_MODIFIABLE, &yes, sizeof yes},
      {CKA_APPLICATION, application.data(), application.size()},
      {CKA_LABEL, label.data(), label.size()},
      {CKA_VALUE, value.data(), value.size()},
  }};
  CK_OBJECT_HANDLE object = CK_INVALID_HANDLE;
  CK_RV rv =
      t.fn()->C_CreateObject(t.session, object_template.data(), object_template.size(), &object);
  if (rv != CKR_OK) return t.fail(rv, "creating the counter '" + label + "'");
  return object;
}

Result<CK_OBJECT_HANDLE> create_counter(const Token& t) {
  return create_counter_object(t, 1);
}

struct DataObjects {
  CK_OBJECT_HANDLE kek = CK_INVALID_HANDLE;
  CK_OBJECT_HANDLE pseudonym = CK_INVALID_HANDLE;
  CK_OBJECT_HANDLE counter = CK_INVALID_HANDLE;
};

// Finds the KEK, the pseudonym key and the counter; creates the missing ones with
// kCreateIfMissing, names the first missing one with kUseExisting.
Result<DataObjects> find_data_objects(const Token& t, KeyPolicy policy) {
  struct Entry {
    std::string_view what;
    std::string_view label;
    Result<std::optional<CK_OBJECT_HANDLE>> (*find)(const Token&);
    Result<CK_OBJECT_HANDLE> (*create)(const Token&);
    CK_OBJECT_HANDLE* handle;
  };
  DataObjects objects;
  const std::array<Entry, 3> entries = {{
      {"KEK", kKekLabel, find_kek, create_kek, &objects.kek},
      {"pseudonym key", kPseudonymLabel, find_pseudonym_key, create_pseudonym_key,
       &objects.pseudonym},
      {"rollback counter", kCounterLabel, find_counter, create_counter, &objects.counter},
  }};
  for (const Entry& entry : entries) {
    MEDGATE_ASSIGN_OR_RETURN(std::optional<CK_OBJECT_HANDLE> found, entry.find(t));
    if (found) {
      *entry.handle = *found;
      continue;
    }
    switch (policy) {
      case KeyPolicy::kUseExisting:
        return Status::NotFound("token " + t.label + " has no " + std::string(entry.what) + " '" +
                                std::string(entry.label) + "': run medctl init");
      case KeyPolicy::kCreateIfMissing: {
        MEDGATE_ASSIGN_OR_RETURN(*entry.handle, entry.create(t));
        break;
      }
    }
  }
  return objects;
}

// ---- operations ----

Result<Bytes> ecdsa_sign(const Token& t, CK_OBJECT_HANDLE key, const Hash& digest) {
  std::array<unsigned char, 72> raw{};  // room for more than P-256 so an odd reply is seen, not cut
  CK_ULONG raw_size = raw.size();
  CK_MECHANISM mechanism{CKM_ECDSA, nullptr, 0};
  CK_RV rv = t.fn()->C_SignInit(t.session, &mechanism, key);
  if (rv == CKR_OK)
    rv = t.fn()->C_Sign(t.session, input(digest), digest.size(), raw.data(), &raw_size);
  if (rv != CKR_OK) return t.fail(rv, "signing");
  if (raw_size != 64)
    return Status::Unavailable("token " + t.label + " returned a " + std::to_string(raw_size) +
                               "-byte ECDSA signature, not 64 bytes");
  return ecdsa_raw_to_der(std::as_bytes(std::span(raw.data(), raw_size)));
}

Result<std::uint64_t> read_counter_value(const Token& t, CK_OBJECT_HANDLE counter) {
  MEDGATE_ASSIGN_OR_RETURN(Bytes value, attribute(t, counter, CKA_VALUE, "the counter"));
  if (value.size() != kCounterBytes)
    return Status::Corruption("the counter '" + std::string(kCounterLabel) + "' on token " +
                              t.label + " holds " + std::to_string(value.size()) + " bytes, not " +
                              std::to_string(kCounterBytes));
  std::uint64_t n = 0;
  for (std::byte b : value) n = (n << 8) | std::to_integer<std::uint64_t>(b);
  return n;
}

struct CounterState {
  std::uint64_t value = 0;
  std::vector<CK_OBJECT_HANDLE> objects;
};

// The counter is the largest value among its objects (see find_counters).
Result<CounterState> read_counter_state(const Token& t) {
  CounterState state;
  MEDGATE_ASSIGN_OR_RETURN(state.objects, find_counters(t));
  if (state.objects.empty())
    return Status::NotFound("token " + t.label + " has no rollback counter '" +
                            std::string(kCounterLabel) + "': run medctl init");
  for (CK_OBJECT_HANDLE object : state.objects) {
    MEDGATE_ASSIGN_OR_RETURN(std::uint64_t value, read_counter_value(t, object));
    state.value = std::max(state.value, value);
  }
  return state;
}

}  // namespace

// ---- Pkcs11KeyStore ----

Result<std::unique_ptr<Pkcs11KeyStore>> Pkcs11KeyStore::open(const KeyStoreConfig& config,
                                                             KeyPolicy policy) {
  MEDGATE_ASSIGN_OR_RETURN(Request parsed, parse_request(config));
  auto request = std::make_unique<const Request>(std::move(parsed));
  MEDGATE_ASSIGN_OR_RETURN(std::shared_ptr<Pkcs11Module> module,
                           Pkcs11Module::acquire(request->module_path, config.softhsm_conf));
  MEDGATE_ASSIGN_OR_RETURN(TokenChoice token,
                           find_token(*module, request->uri.get(), request->token_spec));
  MEDGATE_ASSIGN_OR_RETURN(Session session, Session::open(*module, token.slot));
  MEDGATE_RETURN_IF_ERROR(login(*module, session.handle(), token.label, request->pin));

  CK_RV failed = CKR_OK;  // open does not reconnect: every failure is reported as it is
  const Token t{*module, session.handle(), token.label, &failed};
  MEDGATE_ASSIGN_OR_RETURN(std::vector<SigningKey> keys,
                           find_signing_keys(t, request->object_label));
  // The active key: the one id= names, else the oldest, so that a key created but never put to
  // use changes nothing at the next open. The ledger chooses with use_signing_key().
  std::optional<std::size_t> active;
  if (request->id) {
    for (std::size_t i = 0; i < keys.size(); ++i)
      if (keys[i].ckid == *request->id) active = i;
  } else if (!keys.empty()) {
    active = 0;
  }
  if (!active) {
    // With id= and other keys present the URI names a key that is not there: creating one would
    // hide a mistake in the config, so that is kNotFound whatever the policy.
    if (policy == KeyPolicy::kUseExisting || !keys.empty()) {
      std::string others;
      if (!keys.empty())
        others = " (it holds " + std::to_string(keys.size()) + " other signing key" +
                 (keys.size() == 1 ? "" : "s") + " labelled " + request->object_label + ")";
      return Status::NotFound("no signing key " + describe_object(*request, token.label) + others);
    }
    MEDGATE_ASSIGN_OR_RETURN(SigningKey first,
                             create_signing_key_on(t, request->object_label, 1, request->id));
    keys.push_back(std::move(first));
    active = 0;
  }
  MEDGATE_ASSIGN_OR_RETURN(DataObjects objects, find_data_objects(t, policy));

  std::string label = token.label;
  const CK_SESSION_HANDLE handle = session.release();
  return std::unique_ptr<Pkcs11KeyStore>(
      new Pkcs11KeyStore(std::move(module), std::move(request), std::move(label), handle,
                         std::move(keys), *active, objects.kek, objects.pseudonym));
}

Pkcs11KeyStore::Pkcs11KeyStore(std::shared_ptr<Pkcs11Module> module,
                               std::unique_ptr<const Request> request, std::string token_label,
                               unsigned long session, std::vector<SigningKey> keys,
                               std::size_t active, unsigned long kek, unsigned long pseudonym)
    : module_(std::move(module)),
      request_(std::move(request)),
      token_label_(std::move(token_label)),
      session_(session),
      keys_(std::move(keys)),
      active_(active),
      kek_(kek),
      pseudonym_(pseudonym) {}

Pkcs11KeyStore::~Pkcs11KeyStore() {
  std::lock_guard lock(mutex_);
  // No C_Logout: login state is shared by every session of this process on the token, and
  // closing the last session logs out anyway.
  if (session_ != CK_INVALID_HANDLE) module_->fn()->C_CloseSession(session_);
}

void Pkcs11KeyStore::note_error_locked(unsigned long rv) {
  ++health_.errors;
  health_.last_error = ckr_name(rv);
}

Status Pkcs11KeyStore::reconnect_locked() {
  // The token may have come back in another slot (a USB token replugged): find it again.
  MEDGATE_ASSIGN_OR_RETURN(TokenChoice token,
                           find_token(*module_, request_->uri.get(), request_->token_spec));
  MEDGATE_ASSIGN_OR_RETURN(Session session, Session::open(*module_, token.slot));
  MEDGATE_RETURN_IF_ERROR(login(*module_, session.handle(), token_label_, request_->pin));

  CK_RV failed = CKR_OK;
  const Token t{*module_, session.handle(), token_label_, &failed};
  // Handles may differ in the new session; CKA_ID and labels do not. Public keys are not read
  // again: a key whose private half has the same label and CKA_ID is the same key.
  std::vector<CK_OBJECT_HANDLE> private_keys;
  for (const SigningKey& key : keys_) {
    MEDGATE_ASSIGN_OR_RETURN(std::optional<CK_OBJECT_HANDLE> found,
                             find_private_key(t, request_->object_label, key.ckid));
    if (!found)
      return Status::NotFound("signing key " + to_hex(key.public_key.id()) +
                              " is no longer on token " + token_label_);
    private_keys.push_back(*found);
  }
  MEDGATE_ASSIGN_OR_RETURN(DataObjects objects, find_data_objects(t, KeyPolicy::kUseExisting));

  session_ = session.release();
  for (std::size_t i = 0; i < keys_.size(); ++i) keys_[i].private_key = private_keys[i];
  kek_ = objects.kek;
  pseudonym_ = objects.pseudonym;
  ++health_.reconnects;
  return Status::Ok();
}

template <typename T, typename Attempt>
Result<T> Pkcs11KeyStore::with_session(Attempt attempt) {
  std::lock_guard lock(mutex_);
  CK_RV failed = CKR_OK;
  Result<T> result = attempt(Token{*module_, session_, token_label_, &failed});
  if (result.ok() || failed == CKR_OK) {
    if (result.ok()) health_.reachable = true;
    return result;
  }
  note_error_locked(failed);
  if (!session_lost(failed)) return result;

  if (session_still_open(failed)) module_->fn()->C_CloseSession(session_);
  session_ = CK_INVALID_HANDLE;  // from here on, a failed reconnect is retried by the next call
  Status reconnected = reconnect_locked();
  if (!reconnected.ok()) {
    health_.reachable = false;
    return Status::Unavailable(result.status().message() + "; reconnecting to token " +
                               token_label_ + " failed: " + reconnected.message());
  }
  failed = CKR_OK;
  result = attempt(Token{*module_, session_, token_label_, &failed});
  if (result.ok()) {
    health_.reachable = true;
    return result;
  }
  if (failed == CKR_OK) return result;
  note_error_locked(failed);
  health_.reachable = false;
  return Status::Unavailable(result.status().message() + " (again after reconnecting to token " +
                             token_label_ + ")");
}

Result<Bytes> Pkcs11KeyStore::sign_digest(const Hash& digest) {
  return with_session<Bytes>(
      [&](const Token& t) { return ecdsa_sign(t, keys_[active_].private_key, digest); });
}

Result<Bytes> Pkcs11KeyStore::sign_digest_with(const KeyId& key, const Hash& digest) {
  return with_session<Bytes>([&](const Token& t) -> Result<Bytes> {
    for (const SigningKey& held : keys_)
      if (held.public_key.id() == key) return ecdsa_sign(t, held.private_key, digest);
    return Status::NotFound("token " + token_label_ + " holds no signing key " + to_hex(key));
  });
}

PublicKey Pkcs11KeyStore::signing_key() const {
  std::lock_guard lock(mutex_);
  return keys_[active_].public_key;
}

std::vector<PublicKey> Pkcs11KeyStore::signing_keys() const {
  std::lock_guard lock(mutex_);
  std::vector<PublicKey> keys;
  keys.reserve(keys_.size());
  for (const SigningKey& key : keys_) keys.push_back(key.public_key);
  return keys;
}

Status Pkcs11KeyStore::use_signing_key(const KeyId& key) {
  std::lock_guard lock(mutex_);
  for (std::size_t i = 0; i < keys_.size(); ++i) {
    if (keys_[i].public_key.id() == key) {
      active_ = i;
      return Status::Ok();
    }
  }
  return Status::NotFound("token " + token_label_ + " holds no signing key " + to_hex(key));
}

Result<PublicKey> Pkcs11KeyStore::create_signing_key() {
  return with_session<PublicKey>([&](const Token& t) -> Result<PublicKey> {
    // Read the token again: another process (medctl while medgated runs) may have added a key.
    MEDGATE_ASSIGN_OR_RETURN(std::vector<SigningKey> on_token,
                             find_signing_keys(t, request_->object_label));
    std::uint32_t last = 0;
    for (const SigningKey& key : on_token) last = std::max(last, sequence_of(key.ckid));
    if (last == UINT32_MAX)
      return Status::FailedPrecondition("token " + token_label_ +
                                        " has no signing key sequence number left");
    MEDGATE_ASSIGN_OR_RETURN(SigningKey created,
                             create_signing_key_on(t, request_->object_label, last + 1, {}));
    PublicKey public_key = created.public_key;
    const KeyId active = keys_[active_].public_key.id();
    on_token.push_back(std::move(created));
    std::sort(on_token.begin(), on_token.end(), created_before);
    // The active key stays active (it is among on_token unless someone deleted it meanwhile).
    std::size_t new_active = on_token.size();
    for (std::size_t i = 0; i < on_token.size(); ++i)
      if (on_token[i].public_key.id() == active) new_active = i;
    if (new_active == on_token.size()) {
      on_token.push_back(keys_[active_]);
      new_active = on_token.size() - 1;
    }
    keys_ = std::move(on_token);
    active_ = new_active;
    return public_key;
  });
}

Result<Bytes> Pkcs11KeyStore::wrap_key(ByteView key, ByteView context) {
  if (key.empty() || key.size() > kMaxDataKeyBytes)
    return Status::InvalidArgument("a data key to wrap must be 1 to " +
                                   std::to_string(kMaxDataKeyBytes) + " bytes, not " +
                                   std::to_string(key.size()));
  return with_session<Bytes>([&](const Token& t) -> Result<Bytes> {
    // A fresh random IV per wrap; at 2^32 wraps under one key the birthday bound on 96-bit IVs
    // is still negligible (NIST SP 800-38D 8.3).
    MEDGATE_ASSIGN_OR_RETURN(Bytes iv, random_bytes(t, kIvBytes));
    CK_GCM_PARAMS params{};
    params.iv_ptr = u8(std::span<std::byte>(iv));
    params.iv_len = iv.size();
    params.iv_bits = iv.size() * 8;
    params.aad_ptr = context.empty() ? nullptr : input(context);
    params.aad_len = context.size();
    params.tag_bits = kTagBytes * 8;
    CK_MECHANISM mechanism{CKM_AES_GCM, &params, sizeof params};
    CK_RV rv = t.fn()->C_EncryptInit(t.session, &mechanism, kek_);
    if (rv != CKR_OK) return t.fail(rv, "wrapping a data key (C_EncryptInit)");

    Bytes out(1 + kIvBytes + key.size() + kTagBytes + 16);  // slack for a module that asks more
    out[0] = kWrapVersion;
    std::copy(iv.begin(), iv.end(), out.begin() + 1);
    std::span<std::byte> sealed = std::span(out).subspan(1 + kIvBytes);
    CK_ULONG sealed_size = sealed.size();
    rv = t.fn()->C_Encrypt(t.session, input(key), key.size(), u8(sealed), &sealed_size);
    if (rv != CKR_OK) return t.fail(rv, "wrapping a data key (C_Encrypt)");
    if (sealed_size != key.size() + kTagBytes)
      return Status::Unavailable("token " + t.label + " returned " + std::to_string(sealed_size) +
                                 " bytes of AES-GCM output for a " + std::to_string(key.size()) +
                                 "-byte key");
    out.resize(1 + kIvBytes + sealed_size);
    return out;
  });
}

Result<SecretBytes> Pkcs11KeyStore::unwrap_key(ByteView wrapped, ByteView context) {
  if (wrapped.empty()) return Status::InvalidArgument("the wrapped data key is empty");
  if (wrapped[0] != kWrapVersion)
    return Status::InvalidArgument("the wrapped data key has format version " +
                                   std::to_string(std::to_integer<int>(wrapped[0])) +
                                   "; this key store reads version 1");
  if (wrapped.size() <= kWrapOverhead || wrapped.size() > kWrapOverhead + kMaxDataKeyBytes)
    return Status::InvalidArgument("the wrapped data key is " + std::to_string(wrapped.size()) +
                                   " bytes; version 1 is " + std::to_string(kWrapOverhead + 1) +
                                   " to " + std::to_string(kWrapOverhead + kMaxDataKeyBytes) +
                                   " bytes");
  const ByteView iv = wrapped.subspan(1, kIvBytes);
  const ByteView sealed = wrapped.subspan(1 + kIvBytes);
  return with_session<SecretBytes>([&](const Token& t) -> Result<SecretBytes> {
    CK_GCM_PARAMS params{};
    params.iv_ptr = input(iv);
    params.iv_len = iv.size();
    params.iv_bits = iv.size() * 8;
    params.aad_ptr = context.empty() ? nullptr : input(context);
    params.aad_len = context.size();
    params.tag_bits = kTagBytes * 8;
    CK_MECHANISM mechanism{CKM_AES_GCM, &params, sizeof params};
    CK_RV rv = t.fn()->C_DecryptInit(t.session, &mechanism, kek_);
    if (rv != CKR_OK) return t.fail(rv, "unwrapping a data key (C_DecryptInit)");
    ScratchSecret plain(sealed.size());
    CK_ULONG plain_size = plain.bytes.size();
    rv = t.fn()->C_Decrypt(t.session, input(sealed), sealed.size(),
                           u8(std::span<std::byte>(plain.bytes)), &plain_size);
    switch (rv) {
      case CKR_OK:
        break;
      // The tag did not verify: the blob was altered, the context differs, or another KEK wrapped
      // it. Not a device error.
      case CKR_ENCRYPTED_DATA_INVALID:
      case CKR_ENCRYPTED_DATA_LEN_RANGE:
      case kCkrAeadDecryptFailed:
        return Status::VerificationFailed(
            "the wrapped data key does not verify under the KEK of token " + t.label +
            " with this context (" + ckr_name(rv) + ")");
      case CKR_GENERAL_ERROR:
        // SoftHSM 2.6 (Debian 12) reports a GCM tag mismatch as CKR_GENERAL_ERROR (later versions
        // say CKR_ENCRYPTED_DATA_INVALID). Read it as a mismatch only when the session is still
        // alive and logged in; otherwise it is the device's failure.
        if (session_healthy(t))
          return Status::VerificationFailed(
              "the wrapped data key does not verify under the KEK of token " + t.label +
              " with this context (" + ckr_name(rv) + ")");
        return t.fail(rv, "unwrapping a data key (C_Decrypt)");
      default:
        return t.fail(rv, "unwrapping a data key (C_Decrypt)");
    }
    if (plain_size != sealed.size() - kTagBytes)
      return Status::Unavailable("token " + t.label + " returned a " + std::to_string(plain_size) +
                                 "-byte data key from " + std::to_string(sealed.size()) +
                                 " bytes of AES-GCM input");
    return SecretBytes(
        Bytes(plain.bytes.begin(), plain.bytes.begin() + static_cast<std::ptrdiff_t>(plain_size)));
  });
}

Result<Hash> Pkcs11KeyStore::keyed_hash(ByteView message) {
  return with_session<Hash>([&](const Token& t) -> Result<Hash> {
    CK_MECHANISM mechanism{CKM_SHA256_HMAC, nullptr, 0};
    CK_RV rv = t.fn()->C_SignInit(t.session, &mechanism, pseudonym_);
    Hash mac{};
    CK_ULONG mac_size = mac.size();
    if (rv == CKR_OK)
      rv = t.fn()->C_Sign(t.session, input(message), message.size(), u8(std::span<std::byte>(mac)),
                          &mac_size);
    if (rv != CKR_OK) return t.fail(rv, "computing a keyed pseudonym");
    if (mac_size != mac.size())
      return Status::Unavailable("token " + t.label + " returned a " + std::to_string(mac_size) +
                                 "-byte HMAC-SHA256");
    return mac;
  });
}

// ---- key agreement ----

namespace {

constexpr std::string_view kAgreementLabel = "medgate-agreement";

// The agreement key pair: nullopt when the token has none yet.
Result<std::optional<KeyPair>> find_agreement_pair(const Token& t) {
  std::string l(kAgreementLabel);
  CK_KEY_TYPE ec = CKK_EC;
  CK_OBJECT_CLASS private_class = CKO_PRIVATE_KEY;
  std::array<CK_ATTRIBUTE, 3> private_match = {{
      {CKA_CLASS, &private_class, sizeof private_class},
      {CKA_KEY_TYPE, &ec, sizeof ec},
      {CKA_LABEL, l.data(), l.size()},
  }};
  MEDGATE_ASSIGN_OR_RETURN(std::optional<CK_OBJECT_HANDLE> private_key,
                           find_unique(t, private_match, "EC private key '" + l + "'"));
  if (!private_key) return std::optional<KeyPair>();
  CK_OBJECT_CLASS public_class = CKO_PUBLIC_KEY;
  std::array<CK_ATTRIBUTE, 3> public_match = {{
      {CKA_CLASS, &public_class, sizeof public_class},
      {CKA_KEY_TYPE, &ec, sizeof ec},
      {CKA_LABEL, l.data(), l.size()},
  }};
  MEDGATE_ASSIGN_OR_RETURN(std::optional<CK_OBJECT_HANDLE> public_key,
                           find_unique(t, public_match, "EC public key '" + l + "'"));
  if (!public_key)
    return Status::NotFound("the key-agreement key '" + l + "' on token " + t.label +
                            " has no public key object next to it");
  return std::optional<KeyPair>(KeyPair{*private_key, *public_key});
}

// A P-256 pair for ECDH only: the private half a private, sensitive, never extractable token
// object that can derive and do nothing else.
Result<KeyPair> generate_agreement_pair(const Token& t) {
  std::string l(kAgreementLabel);
  std::array<unsigned char, kP256Params.size()> ec_params = kP256Params;
  CK_BBOOL yes = CK_TRUE;
  CK_BBOOL no = CK_FALSE;
  std::array<CK_ATTRIBUTE, 5> public_template = {{
      {CKA_TOKEN, &yes, sizeof yes},
      {CKA_PRIVATE, &no, sizeof no},
      {CKA_VERIFY, &no, sizeof no},
      {CKA_EC_PARAMS, ec_params.data(), ec_params.size()},
      {CKA_LABEL, l.data(), l.size()},
  }};
  std::array<CK_ATTRIBUTE, 9> private_template = {{
      {CKA_TOKEN, &yes, sizeof yes},
      {CKA_PRIVATE, &yes, sizeof yes},
      {CKA_SENSITIVE, &yes, sizeof yes},
      {CKA_EXTRACTABLE, &no, sizeof no},
      {CKA_SIGN, &no, sizeof no},
      {CKA_DECRYPT, &no, sizeof no},
      {CKA_UNWRAP, &no, sizeof no},
      {CKA_DERIVE, &yes, sizeof yes},
      {CKA_LABEL, l.data(), l.size()},
  }};
  CK_MECHANISM mechanism{CKM_EC_KEY_PAIR_GEN, nullptr, 0};
  KeyPair pair;
  CK_RV rv = t.fn()->C_GenerateKeyPair(
      t.session, &mechanism, public_template.data(), public_template.size(),
      private_template.data(), private_template.size(), &pair.public_key, &pair.private_key);
  if (rv != CKR_OK) return t.fail(rv, "generating the key-agreement key '" + l + "'");
  return pair;
}

Result<KeyPair> agreement_pair(const Token& t) {
  MEDGATE_ASSIGN_OR_RETURN(std::optional<KeyPair> found, find_agreement_pair(t));
  if (found) return *found;
  return generate_agreement_pair(t);
}

}  // namespace

Result<PublicKey> Pkcs11KeyStore::agreement_key() {
  return with_session<PublicKey>([&](const Token& t) -> Result<PublicKey> {
    MEDGATE_ASSIGN_OR_RETURN(KeyPair pair, agreement_pair(t));
    return read_public_key(t, pair.public_key,
                           std::string(kAgreementLabel) + " on token " + t.label);
  });
}

Result<SecretBytes> Pkcs11KeyStore::agree(const PublicKey& peer) {
  Bytes point = peer.uncompressed_point();
  return with_session<SecretBytes>([&](const Token& t) -> Result<SecretBytes> {
    MEDGATE_ASSIGN_OR_RETURN(KeyPair pair, agreement_pair(t));
    CK_ECDH1_DERIVE_PARAMS params{CKD_NULL, 0, nullptr, point.size(),
                                  u8(std::span<std::byte>(point))};
    CK_MECHANISM mechanism{CKM_ECDH1_DERIVE, &params, sizeof params};
    CK_OBJECT_CLASS secret = CKO_SECRET_KEY;
    CK_KEY_TYPE generic = CKK_GENERIC_SECRET;
    CK_ULONG length = 32;
    CK_BBOOL yes = CK_TRUE;
    CK_BBOOL no = CK_FALSE;
    // A session object that exists only long enough for its value to be read.
    std::array<CK_ATTRIBUTE, 6> derived_template = {{
        {CKA_CLASS, &secret, sizeof secret},
        {CKA_KEY_TYPE, &generic, sizeof generic},
        {CKA_TOKEN, &no, sizeof no},
        {CKA_SENSITIVE, &no, sizeof no},
        {CKA_EXTRACTABLE, &yes, sizeof yes},
        {CKA_VALUE_LEN, &length, sizeof length},
    }};
    CK_OBJECT_HANDLE derived = CK_INVALID_HANDLE;
    CK_RV rv = t.fn()->C_DeriveKey(t.session, &mechanism, pair.private_key, derived_template.data(),
                                   derived_template.size(), &derived);
    if (rv != CKR_OK) return t.fail(rv, "key agreement (C_DeriveKey, CKM_ECDH1_DERIVE)");
    Result<Bytes> value = attribute(t, derived, CKA_VALUE, "CKA_VALUE of the agreed secret");
    rv = t.fn()->C_DestroyObject(t.session, derived);
    if (!value.ok()) return value.status();
    SecretBytes z(std::move(value).value());
    if (rv != CKR_OK) return t.fail(rv, "destroying the agreed secret's session object");
    if (z.size() != length)
      return Status::Unavailable("token " + t.label + " agreed on a " + std::to_string(z.size()) +
                                 "-byte secret instead of 32");
    return z;
  });
}

Result<std::uint64_t> Pkcs11KeyStore::read_counter() {
  return with_session<std::uint64_t>([&](const Token& t) -> Result<std::uint64_t> {
    MEDGATE_ASSIGN_OR_RETURN(CounterState state, read_counter_state(t));
    return state.value;
  });
}

// PKCS#11 does not promise that CKA_VALUE of a data object can be changed, and SoftHSM refuses
// (CKR_ATTRIBUTE_READ_ONLY). So an increment creates the successor object holding value + 1 and
// then destroys the predecessors: a crash in between leaves both, and the counter, the largest of
// them, has still moved forward exactly once. The new value is read back from the token before it
// is returned. Increments from two processes at once may both yield the same value; the key store
// serializes its own callers only.
Result<std::uint64_t> Pkcs11KeyStore::increment_counter() {
  return with_session<std::uint64_t>([&](const Token& t) -> Result<std::uint64_t> {
    MEDGATE_ASSIGN_OR_RETURN(CounterState state, read_counter_state(t));
    if (state.value == UINT64_MAX)
      return Status::FailedPrecondition("the counter on token " + t.label + " is exhausted");
    const std::uint64_t next = state.value + 1;
    MEDGATE_ASSIGN_OR_RETURN(CK_OBJECT_HANDLE successor, create_counter_object(t, next));
    for (CK_OBJECT_HANDLE old : state.objects) {
      CK_RV rv = t.fn()->C_DestroyObject(t.session, old);
      if (rv != CKR_OK) return t.fail(rv, "removing the previous counter object");
    }
    MEDGATE_ASSIGN_OR_RETURN(std::uint64_t stored, read_counter_value(t, successor));
    if (stored != next)
      return Status::Unavailable("the counter on token " + t.label + " reads " +
                                 std::to_string(stored) + " after being set to " +
                                 std::to_string(next));
    return stored;
  });
}

Result<Bytes> Pkcs11KeyStore::random(std::size_t n) {
  if (n > kMaxRandomBytes)
    return Status::InvalidArgument("at most " + std::to_string(kMaxRandomBytes) +
                                   " random bytes per call");
  return with_session<Bytes>([&](const Token& t) { return random_bytes(t, n); });
}

std::string Pkcs11KeyStore::description() const {
  return request_->description;
}

KeyStoreHealth Pkcs11KeyStore::health() const {
  std::lock_guard lock(mutex_);
  return health_;
}

}  // namespace medgate::hsm::pkcs11

namespace medgate::hsm::pkcs11 {
namespace {

// RFC 7512 percent-encoding of an attribute value: everything but unreserved characters.
std::string uri_escape(std::string_view value) {
  std::string out;
  for (char ch : value) {
    auto c = static_cast<unsigned char>(ch);
    if (std::isalnum(c) || c == '-' || c == '.' || c == '_' || c == '~') {
      out.push_back(ch);
    } else {
      constexpr char kHex[] = "0123456789ABCDEF";
      out += {'%', kHex[c >> 4], kHex[c & 0xf]};
    }
  }
  return out;
}

}  // namespace

Result<TokenTlsKey> find_or_create_tls_key(const KeyStoreConfig& config, const std::string& label,
                                           bool create) {
  MEDGATE_ASSIGN_OR_RETURN(Pkcs11KeyStore::Request request, parse_request(config));
  MEDGATE_ASSIGN_OR_RETURN(std::shared_ptr<Pkcs11Module> module,
                           Pkcs11Module::acquire(request.module_path, config.softhsm_conf));
  MEDGATE_ASSIGN_OR_RETURN(TokenChoice token,
                           find_token(*module, request.uri.get(), request.token_spec));
  MEDGATE_ASSIGN_OR_RETURN(Session session, Session::open(*module, token.slot));
  MEDGATE_RETURN_IF_ERROR(login(*module, session.handle(), token.label, request.pin));
  CK_RV failed = CKR_OK;
  const Token t{*module, session.handle(), token.label, &failed};
  // One pair with a fixed CKA_ID: a TLS key is replaced by a person (with its certificate), not
  // rotated by medgate, so there is no sequence to keep.
  const Bytes ckid = to_bytes(label);
  MEDGATE_ASSIGN_OR_RETURN(std::vector<SigningKey> keys, find_signing_keys(t, label));
  if (keys.size() > 1)
    return Status::InvalidArgument("token " + token.label + " holds " +
                                   std::to_string(keys.size()) + " key pairs labelled " + label +
                                   "; remove all but one");
  const bool created = keys.empty();
  std::optional<PublicKey> public_key;
  if (created) {
    if (!create)
      return Status::NotFound("no TLS key object=" + label + " on token " + token.label +
                              "; create it with `medgated tls-key`");
    MEDGATE_ASSIGN_OR_RETURN(KeyPair pair, generate_key_pair(t, label, ckid));
    MEDGATE_ASSIGN_OR_RETURN(public_key, read_public_key(t, pair.public_key, "object=" + label));
  } else {
    public_key = keys.front().public_key;
  }
  std::string key_uri =
      "pkcs11:token=" + uri_escape(token.label) + ";object=" + uri_escape(label) + ";type=private";
  return TokenTlsKey{*public_key,        created,     request.module_path,
                     std::move(key_uri), request.pin, std::move(module)};
}

}  // namespace medgate::hsm::pkcs11
