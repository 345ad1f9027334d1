#include "hsm/pkcs11/pkcs11_key_store.h"

#include <openssl/asn1.h>
#include <openssl/core_names.h>
#include <openssl/evp.h>
#include <openssl/params.h>
#include <openssl/x509.h>
#include <p11-kit/uri.h>

#include <algorithm>
#include <array>
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

// What the URI asks for, checked.
struct KeyRequest {
  UriPtr uri;
  std::string module_path;
  std::string object_label;
  std::optional<Bytes> id;  // CKA_ID from id=, if given
  PinSource pin;
  std::string token_spec;   // "token=L" (or serial/slot) for messages
  std::string description;  // the URI without pin-source
};

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

Result<KeyRequest> parse_request(const KeyStoreConfig& config) {
  KeyRequest request;
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

Result<std::vector<CK_OBJECT_HANDLE>> find_objects(const Pkcs11Module& module,
                                                   CK_SESSION_HANDLE session,
                                                   std::span<CK_ATTRIBUTE> match) {
  CK_RV rv = module.fn()->C_FindObjectsInit(session, match.data(), match.size());
  if (rv != CKR_OK) return Status::Unavailable("C_FindObjectsInit failed: " + ckr_name(rv));
  std::vector<CK_OBJECT_HANDLE> found;
  std::array<CK_OBJECT_HANDLE, 16> batch{};
  CK_ULONG count = 0;
  while ((rv = module.fn()->C_FindObjects(session, batch.data(), batch.size(), &count)) == CKR_OK &&
         count > 0)
    found.insert(found.end(), batch.begin(), batch.begin() + static_cast<std::ptrdiff_t>(count));
  CK_RV final_rv = module.fn()->C_FindObjectsFinal(session);
  if (rv != CKR_OK) return Status::Unavailable("C_FindObjects failed: " + ckr_name(rv));
  if (final_rv != CKR_OK)
    return Status::Unavailable("C_FindObjectsFinal failed: " + ckr_name(final_rv));
  return found;
}

Result<Bytes> attribute(const Pkcs11Module& module, CK_SESSION_HANDLE session,
                        CK_OBJECT_HANDLE object, CK_ATTRIBUTE_TYPE type, std::string_view name) {
  CK_ATTRIBUTE query{type, nullptr, 0};
  CK_RV rv = module.fn()->C_GetAttributeValue(session, object, &query, 1);
  if (rv != CKR_OK || query.ulValueLen == CK_UNAVAILABLE_INFORMATION)
    return Status::Unavailable("cannot read " + std::string(name) + ": " + ckr_name(rv));
  Bytes value(query.ulValueLen);
  query.pValue = value.data();
  rv = module.fn()->C_GetAttributeValue(session, object, &query, 1);
  if (rv != CKR_OK)
    return Status::Unavailable("cannot read " + std::string(name) + ": " + ckr_name(rv));
  value.resize(query.ulValueLen);
  return value;
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

struct KeyPair {
  CK_OBJECT_HANDLE private_key = CK_INVALID_HANDLE;
  CK_OBJECT_HANDLE public_key = CK_INVALID_HANDLE;
};

std::string describe_object(const KeyRequest& request, const std::string& token) {
  std::string s = "object=" + request.object_label;
  if (request.id) s += ";id=" + to_hex(*request.id);
  return s + " on token " + token;
}

// Looks the key pair up by label (and id). nullopt when there is no private key.
Result<std::optional<KeyPair>> find_key_pair(const Pkcs11Module& module, CK_SESSION_HANDLE session,
                                             const KeyRequest& request, const std::string& token) {
  CK_OBJECT_CLASS private_class = CKO_PRIVATE_KEY;
  CK_KEY_TYPE ec = CKK_EC;
  std::string label = request.object_label;
  Bytes id = request.id.value_or(Bytes{});
  std::vector<CK_ATTRIBUTE> match = {
      {CKA_CLASS, &private_class, sizeof private_class},
      {CKA_KEY_TYPE, &ec, sizeof ec},
      {CKA_LABEL, label.data(), label.size()},
  };
  if (request.id) match.push_back({CKA_ID, id.data(), id.size()});
  MEDGATE_ASSIGN_OR_RETURN(std::vector<CK_OBJECT_HANDLE> private_keys,
                           find_objects(module, session, match));
  if (private_keys.empty()) return std::optional<KeyPair>();
  if (private_keys.size() > 1)
    return Status::InvalidArgument(std::to_string(private_keys.size()) + " EC private keys match " +
                                   describe_object(request, token) + "; add id= to the URI");

  // The public half is the one with the same label and the private key's CKA_ID.
  if (!request.id) {
    MEDGATE_ASSIGN_OR_RETURN(id, attribute(module, session, private_keys[0], CKA_ID, "CKA_ID"));
    if (!id.empty()) match.push_back({CKA_ID, id.data(), id.size()});
  }
  CK_OBJECT_CLASS public_class = CKO_PUBLIC_KEY;
  match[0] = {CKA_CLASS, &public_class, sizeof public_class};
  MEDGATE_ASSIGN_OR_RETURN(std::vector<CK_OBJECT_HANDLE> public_keys,
                           find_objects(module, session, match));
  if (public_keys.empty())
    return Status::NotFound("the signing key " + describe_object(request, token) +
                            " has no public key object next to it");
  if (public_keys.size() > 1)
    return Status::InvalidArgument(std::to_string(public_keys.size()) + " EC public keys match " +
                                   describe_object(request, token) + "; add id= to the URI");
  return std::optional<KeyPair>(KeyPair{private_keys[0], public_keys[0]});
}

Result<KeyPair> generate_key_pair(const Pkcs11Module& module, CK_SESSION_HANDLE session,
                                  const KeyRequest& request, const std::string& token) {
  Bytes id;
  if (request.id) {
    id = *request.id;
  } else {
    MEDGATE_ASSIGN_OR_RETURN(id, generate_random(module, session, 16));
  }
  std::string label = request.object_label;
  std::array<unsigned char, kP256Params.size()> ec_params = kP256Params;
  CK_BBOOL yes = CK_TRUE;
  CK_BBOOL no = CK_FALSE;
  std::array<CK_ATTRIBUTE, 6> public_template = {{
      {CKA_TOKEN, &yes, sizeof yes},
      {CKA_PRIVATE, &no, sizeof no},  // readable without the PIN, e.g. by pkcs11-tool
      {CKA_VERIFY, &yes, sizeof yes},
      {CKA_EC_PARAMS, ec_params.data(), ec_params.size()},
      {CKA_LABEL, label.data(), label.size()},
      {CKA_ID, id.data(), id.size()},
  }};
  // Sign-only and never leaves the token.
  std::array<CK_ATTRIBUTE, 10> private_template = {{
      {CKA_TOKEN, &yes, sizeof yes},
      {CKA_PRIVATE, &yes, sizeof yes},
      {CKA_SENSITIVE, &yes, sizeof yes},
      {CKA_EXTRACTABLE, &no, sizeof no},
      {CKA_SIGN, &yes, sizeof yes},
      {CKA_DECRYPT, &no, sizeof no},
      {CKA_UNWRAP, &no, sizeof no},
      {CKA_DERIVE, &no, sizeof no},
      {CKA_LABEL, label.data(), label.size()},
      {CKA_ID, id.data(), id.size()},
  }};
  CK_MECHANISM mechanism{CKM_EC_KEY_PAIR_GEN, nullptr, 0};
  KeyPair pair;
  CK_RV rv = module.fn()->C_GenerateKeyPair(
      session, &mechanism, public_template.data(), public_template.size(), private_template.data(),
      private_template.size(), &pair.public_key, &pair.private_key);
  if (rv != CKR_OK)
    return Status::Unavailable("generating the signing key " + describe_object(request, token) +
                               " failed: " + ckr_name(rv));
  return pair;
}

Result<PublicKey> read_public_key(const Pkcs11Module& module, CK_SESSION_HANDLE session,
                                  CK_OBJECT_HANDLE public_key, const std::string& what) {
  MEDGATE_ASSIGN_OR_RETURN(Bytes params,
                           attribute(module, session, public_key, CKA_EC_PARAMS, "CKA_EC_PARAMS"));
  if (!std::equal(params.begin(), params.end(), kP256Params.begin(), kP256Params.end(),
                  [](std::byte a, unsigned char b) { return a == std::byte{b}; }))
    return Status::InvalidArgument("the key " + what + " is not on curve P-256");
  MEDGATE_ASSIGN_OR_RETURN(Bytes point,
                           attribute(module, session, public_key, CKA_EC_POINT, "CKA_EC_POINT"));
  Result<PublicKey> key = public_key_from_ec_point(point);
  if (!key.ok()) return key.status().with_context("the key " + what);
  return key;
}

}  // namespace

Result<std::unique_ptr<Pkcs11KeyStore>> Pkcs11KeyStore::open(const KeyStoreConfig& config,
                                                             KeyPolicy policy) {
  MEDGATE_ASSIGN_OR_RETURN(KeyRequest request, parse_request(config));
  MEDGATE_ASSIGN_OR_RETURN(std::shared_ptr<Pkcs11Module> module,
                           Pkcs11Module::acquire(request.module_path, config.softhsm_conf));
  MEDGATE_ASSIGN_OR_RETURN(TokenChoice token,
                           find_token(*module, request.uri.get(), request.token_spec));
  MEDGATE_ASSIGN_OR_RETURN(Session session, Session::open(*module, token.slot));
  MEDGATE_RETURN_IF_ERROR(login(*module, session.handle(), token.label, request.pin));

  MEDGATE_ASSIGN_OR_RETURN(std::optional<KeyPair> found,
                           find_key_pair(*module, session.handle(), request, token.label));
  KeyPair pair;
  if (found) {
    pair = *found;
  } else {
    switch (policy) {
      case KeyPolicy::kUseExisting:
        return Status::NotFound("no signing key " + describe_object(request, token.label));
      case KeyPolicy::kCreateIfMissing: {
        MEDGATE_ASSIGN_OR_RETURN(
            pair, generate_key_pair(*module, session.handle(), request, token.label));
        break;
      }
    }
  }
  MEDGATE_ASSIGN_OR_RETURN(PublicKey public_key,
                           read_public_key(*module, session.handle(), pair.public_key,
                                           describe_object(request, token.label)));
  return std::unique_ptr<Pkcs11KeyStore>(new Pkcs11KeyStore(std::move(module), session.release(),
                                                            pair.private_key, std::move(public_key),
                                                            token.label, request.description));
}

Pkcs11KeyStore::Pkcs11KeyStore(std::shared_ptr<Pkcs11Module> module, unsigned long session,
                               unsigned long private_key, PublicKey public_key,
                               std::string token_label, std::string description)
    : module_(std::move(module)),
      session_(session),
      private_key_(private_key),
      public_key_(std::move(public_key)),
      token_label_(std::move(token_label)),
      description_(std::move(description)) {}

Pkcs11KeyStore::~Pkcs11KeyStore() {
  std::lock_guard lock(mutex_);
  // No C_Logout: login state is shared by every session of this process on the token, and
  // closing the last session logs out anyway.
  module_->fn()->C_CloseSession(session_);
}

Result<Bytes> Pkcs11KeyStore::sign_digest(const Hash& digest) {
  std::array<unsigned char, 72> raw{};  // room for more than P-256 so an odd reply is seen, not cut
  CK_ULONG raw_size = raw.size();
  {
    std::lock_guard lock(mutex_);
    CK_MECHANISM mechanism{CKM_ECDSA, nullptr, 0};
    CK_RV rv = module_->fn()->C_SignInit(session_, &mechanism, private_key_);
    if (rv == CKR_OK) {
      Hash input = digest;
      rv = module_->fn()->C_Sign(session_, reinterpret_cast<CK_BYTE*>(input.data()), input.size(),
                                 raw.data(), &raw_size);
    }
    if (rv != CKR_OK)
      return Status::Unavailable("signing on token " + token_label_ + " failed: " + ckr_name(rv));
  }
  if (raw_size != 64)
    return Status::Unavailable("token " + token_label_ + " returned a " + std::to_string(raw_size) +
                               "-byte ECDSA signature, not 64 bytes");
  return ecdsa_raw_to_der(std::as_bytes(std::span(raw.data(), raw_size)));
}

Result<Bytes> Pkcs11KeyStore::random(std::size_t n) {
  if (n > kMaxRandomBytes)
    return Status::InvalidArgument("at most " + std::to_string(kMaxRandomBytes) +
                                   " random bytes per call");
  std::lock_guard lock(mutex_);
  Result<Bytes> bytes = generate_random(*module_, session_, n);
  if (!bytes.ok()) return bytes.status().with_context("token " + token_label_);
  return bytes;
}

}  // namespace medgate::hsm::pkcs11
