// The PKCS#11 key store against a real SoftHSM token: provisioning, key generation, signing, the
// key's protection attributes (read back through a separate raw PKCS#11 session) and every error
// the factory promises.
#include <dlfcn.h>
// The test target does not get p11-kit's include directory; the header is self-contained.
#include <p11-kit-1/p11-kit/pkcs11.h>
#include <sys/stat.h>

#include <catch2/catch.hpp>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "hsm/bytes.h"
#include "hsm/key_store.h"
#include "hsm/key_store_factory.h"
#include "hsm/pin.h"
#include "hsm/public_key.h"
#include "hsm/tls_key.h"
#include "tests/support/softhsm.h"
#include "tests/support/temp_dir.h"

namespace medgate {
namespace {

using hsm::KeyPolicy;
using hsm::KeyStoreConfig;
using testing::SoftHsmToken;
using testing::TempDir;

constexpr const char* kSoftHsm = "/usr/lib/softhsm/libsofthsm2.so";

Hash digest_of(const std::string& text) {
  return sha256(as_bytes(text));
}

KeyStoreConfig with_uri(KeyStoreConfig config, std::string uri) {
  config.uri = std::move(uri);
  return config;
}

std::string read_file(const std::filesystem::path& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

void write_file(const std::filesystem::path& path, const std::string& text, mode_t mode) {
  std::ofstream(path) << text;
  REQUIRE(::chmod(path.c_str(), mode) == 0);
}

// The user PIN that create_softhsm_token wrote (without its newline).
std::string user_pin(const SoftHsmToken& token) {
  Result<std::string> pin = hsm::read_pin(token.config().pin);
  REQUIRE(pin.ok());
  return pin.value();
}

// A PKCS#11 session of the test's own, independent of medgate's module code, to read back what
// the key store put on the token. Only use it while no key store is open: it initialises and
// finalises the module itself.
class RawSession {
 public:
  explicit RawSession(const SoftHsmToken& token) {
    REQUIRE(::setenv("SOFTHSM2_CONF", token.config().softhsm_conf->c_str(), 1) == 0);
    handle_ = ::dlopen(kSoftHsm, RTLD_NOW | RTLD_LOCAL);
    REQUIRE(handle_ != nullptr);
    auto get_list = reinterpret_cast<CK_C_GetFunctionList>(::dlsym(handle_, "C_GetFunctionList"));
    REQUIRE(get_list != nullptr);
    REQUIRE(get_list(&fn_) == CKR_OK);
    REQUIRE(fn_->C_Initialize(nullptr) == CKR_OK);  // nobody else holds the module
    CK_ULONG count = 16;
    std::vector<CK_SLOT_ID> slots(count);
    REQUIRE(fn_->C_GetSlotList(CK_TRUE, slots.data(), &count) == CKR_OK);
    std::optional<CK_SLOT_ID> slot;
    for (CK_ULONG i = 0; i < count; ++i) {
      CK_TOKEN_INFO info{};
      REQUIRE(fn_->C_GetTokenInfo(slots[i], &info) == CKR_OK);
      std::string label(reinterpret_cast<const char*>(info.label), sizeof info.label);
      if (label.substr(0, label.find_last_not_of(' ') + 1) == token.label()) slot = slots[i];
    }
    REQUIRE(slot.has_value());
    REQUIRE(fn_->C_OpenSession(*slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, nullptr, nullptr,
                               &session_) == CKR_OK);
    std::string pin = user_pin(token);
    REQUIRE(fn_->C_Login(session_, CKU_USER, reinterpret_cast<CK_UTF8CHAR*>(pin.data()),
                         pin.size()) == CKR_OK);
  }
  ~RawSession() {
    fn_->C_CloseSession(session_);
    fn_->C_Finalize(nullptr);
    ::dlclose(handle_);
  }

  std::vector<CK_OBJECT_HANDLE> find(CK_OBJECT_CLASS cls, const std::string& label) {
    std::string l = label;
    CK_ATTRIBUTE match[] = {{CKA_CLASS, &cls, sizeof cls}, {CKA_LABEL, l.data(), l.size()}};
    REQUIRE(fn_->C_FindObjectsInit(session_, match, 2) == CKR_OK);
    std::vector<CK_OBJECT_HANDLE> found(16);
    CK_ULONG n = 0;
    REQUIRE(fn_->C_FindObjects(session_, found.data(), found.size(), &n) == CKR_OK);
    REQUIRE(fn_->C_FindObjectsFinal(session_) == CKR_OK);
    found.resize(n);
    return found;
  }

  // The attribute, or the CK_RV that refused it.
  std::pair<CK_RV, Bytes> get(CK_OBJECT_HANDLE object, CK_ATTRIBUTE_TYPE type) {
    CK_ATTRIBUTE query{type, nullptr, 0};
    CK_RV rv = fn_->C_GetAttributeValue(session_, object, &query, 1);
    if (rv != CKR_OK) return {rv, {}};
    Bytes value(query.ulValueLen);
    query.pValue = value.data();
    rv = fn_->C_GetAttributeValue(session_, object, &query, 1);
    return {rv, value};
  }
  bool flag(CK_OBJECT_HANDLE object, CK_ATTRIBUTE_TYPE type) {
    auto [rv, value] = get(object, type);
    REQUIRE(rv == CKR_OK);
    REQUIRE(value.size() == 1);
    return value[0] != std::byte{0};
  }
  CK_ULONG number(CK_OBJECT_HANDLE object, CK_ATTRIBUTE_TYPE type) {
    auto [rv, value] = get(object, type);
    REQUIRE(rv == CKR_OK);
    REQUIRE(value.size() == sizeof(CK_ULONG));
    CK_ULONG n = 0;
    std::memcpy(&n, value.data(), sizeof n);
    return n;
  }
  void destroy(CK_OBJECT_HANDLE object) {
    REQUIRE(fn_->C_DestroyObject(session_, object) == CKR_OK);
  }
  // A counter object as medgate makes it, holding `value`.
  void create_counter(std::uint64_t value) {
    CK_OBJECT_CLASS data = CKO_DATA;
    CK_BBOOL yes = CK_TRUE;
    std::string label = "medgate-counter";
    std::string application = "medgate";
    std::array<unsigned char, 8> be{};
    for (int i = 0; i < 8; ++i) be[7 - i] = static_cast<unsigned char>(value >> (8 * i));
    CK_ATTRIBUTE object_template[] = {
        {CKA_CLASS, &data, sizeof data},
        {CKA_TOKEN, &yes, sizeof yes},
        {CKA_PRIVATE, &yes, sizeof yes},
        {CKA_APPLICATION, application.data(), application.size()},
        {CKA_LABEL, label.data(), label.size()},
        {CKA_VALUE, be.data(), be.size()},
    };
    CK_OBJECT_HANDLE object = CK_INVALID_HANDLE;
    REQUIRE(fn_->C_CreateObject(session_, object_template, 6, &object) == CKR_OK);
  }

 private:
  void* handle_ = nullptr;
  CK_FUNCTION_LIST* fn_ = nullptr;
  CK_SESSION_HANDLE session_ = CK_INVALID_HANDLE;
};

// The SoftHSM module as the key store loaded and initialised it in this process: dlopen of a
// loaded library returns the same instance, and C_Initialize is not called again. The test uses
// it to do to the token what a reset or an unplugged token does to the key store's session.
class LoadedModule {
 public:
  explicit LoadedModule(const std::string& token_label) {
    handle_ = ::dlopen(kSoftHsm, RTLD_NOW | RTLD_LOCAL | RTLD_NOLOAD);
    REQUIRE(handle_ != nullptr);
    auto get_list = reinterpret_cast<CK_C_GetFunctionList>(::dlsym(handle_, "C_GetFunctionList"));
    REQUIRE(get_list != nullptr);
    REQUIRE(get_list(&fn_) == CKR_OK);
    CK_ULONG count = 16;
    std::vector<CK_SLOT_ID> slots(count);
    REQUIRE(fn_->C_GetSlotList(CK_TRUE, slots.data(), &count) == CKR_OK);
    for (CK_ULONG i = 0; i < count; ++i) {
      CK_TOKEN_INFO info{};
      REQUIRE(fn_->C_GetTokenInfo(slots[i], &info) == CKR_OK);
      std::string label(reinterpret_cast<const char*>(info.label), sizeof info.label);
      if (label.substr(0, label.find_last_not_of(' ') + 1) == token_label) slot_ = slots[i];
    }
    REQUIRE(slot_.has_value());
  }
  ~LoadedModule() { ::dlclose(handle_); }

  // Closes every session of this process on the token, the key store's included; that also logs
  // the token out.
  void close_all_sessions() { REQUIRE(fn_->C_CloseAllSessions(*slot_) == CKR_OK); }
  // Logs the process out of the token through a session of its own; the key store's session
  // stays open but loses its login.
  void log_out() {
    CK_SESSION_HANDLE session = CK_INVALID_HANDLE;
    REQUIRE(fn_->C_OpenSession(*slot_, CKF_SERIAL_SESSION, nullptr, nullptr, &session) == CKR_OK);
    REQUIRE(fn_->C_Logout(session) == CKR_OK);
    REQUIRE(fn_->C_CloseSession(session) == CKR_OK);
  }

 private:
  void* handle_ = nullptr;
  CK_FUNCTION_LIST* fn_ = nullptr;
  std::optional<CK_SLOT_ID> slot_;
};

// "%01%02..." for a pkcs11: URI's id=.
std::string percent_encoded(ByteView bytes) {
  std::string out;
  for (std::byte b : bytes) out += "%" + to_hex(ByteView(&b, 1));
  return out;
}

}  // namespace

TEST_CASE("create_softhsm_token writes a config, a 0600 PIN file and an openable URI", "[pkcs11]") {
  TempDir dir;
  Result<KeyStoreConfig> config =
      hsm::create_softhsm_token(dir / "hsm", "appliance-1", dir / "pin");
  INFO(config.status().to_string());
  REQUIRE(config.ok());
  CHECK(config->uri ==
        "pkcs11:token=appliance-1;object=medgate-signing?module-path=" + std::string(kSoftHsm));
  CHECK(config->pin.kind == hsm::PinSource::Kind::kFile);
  CHECK(config->pin.name == (dir / "pin").string());
  REQUIRE(config->softhsm_conf.has_value());
  CHECK(*config->softhsm_conf == dir / "hsm" / "softhsm2.conf");

  const std::string conf = read_file(*config->softhsm_conf);
  CHECK(conf.find("directories.tokendir = " + (dir / "hsm" / "tokens").string()) !=
        std::string::npos);
  CHECK(conf.find("objectstore.backend = file") != std::string::npos);

  struct stat st {};
  REQUIRE(::stat((dir / "pin").c_str(), &st) == 0);
  CHECK((st.st_mode & 0777) == 0600);
  REQUIRE(::stat((dir / "hsm" / "tokens").c_str(), &st) == 0);
  CHECK((st.st_mode & 0777) == 0700);
  Result<std::string> pin = hsm::read_pin(config->pin);
  REQUIRE(pin.ok());
  CHECK(pin->size() == 16);
  CHECK(conf.find(*pin) == std::string::npos);

  SECTION("the PIN file is never overwritten") {
    Result<KeyStoreConfig> again = hsm::create_softhsm_token(dir / "hsm2", "other", dir / "pin");
    CHECK(again.status().code() == StatusCode::kInvalidArgument);
    CHECK(again.status().message().find("already exists") != std::string::npos);
    CHECK(hsm::read_pin(config->pin).value() == *pin);
  }
  SECTION("a second token with the same label in the same directory is refused") {
    Result<KeyStoreConfig> again =
        hsm::create_softhsm_token(dir / "hsm", "appliance-1", dir / "pin2");
    CHECK(again.status().code() == StatusCode::kFailedPrecondition);
    CHECK_FALSE(std::filesystem::exists(dir / "pin2"));  // removed again on failure
  }
}

TEST_CASE("create_softhsm_token refuses labels that would need percent-encoding", "[pkcs11]") {
  TempDir dir;
  for (const std::string& label : std::vector<std::string>{"", "a b", "semi;colon", "slash/",
                                                           "per%cent", std::string(33, 'x')}) {
    Result<KeyStoreConfig> config = hsm::create_softhsm_token(dir / "hsm", label, dir / "pin");
    INFO(label);
    CHECK(config.status().code() == StatusCode::kInvalidArgument);
    CHECK_FALSE(std::filesystem::exists(dir / "pin"));
  }
}

TEST_CASE("a generated key signs digests that its public key verifies", "[pkcs11]") {
  TempDir dir;
  SoftHsmToken token(dir.path());
  auto store = token.open_with_key();

  const Hash digest = digest_of("entry 1");
  Result<Bytes> signature = store->sign_digest(digest);
  INFO(signature.status().to_string());
  REQUIRE(signature.ok());
  CHECK(store->signing_key().verify_digest(digest, *signature).ok());

  Hash flipped = digest;
  flipped[0] ^= std::byte{0x01};
  CHECK(store->signing_key().verify_digest(flipped, *signature).code() ==
        StatusCode::kVerificationFailed);

  // ECDSA is randomised: two signatures differ and both verify.
  Result<Bytes> second = store->sign_digest(digest);
  REQUIRE(second.ok());
  CHECK(*second != *signature);
  CHECK(store->signing_key().verify_digest(digest, *second).ok());

  // The public key is a canonical P-256 SPKI that OpenSSL reads back.
  Result<PublicKey> reparsed = PublicKey::from_pem(store->signing_key().pem());
  REQUIRE(reparsed.ok());
  CHECK(*reparsed == store->signing_key());
}

TEST_CASE("reopening with kUseExisting finds the same key", "[pkcs11]") {
  TempDir dir;
  SoftHsmToken token(dir.path());
  KeyId first;
  {
    auto store = token.open_with_key();
    first = store->signing_key().id();
  }
  Result<std::unique_ptr<hsm::KeyStore>> store =
      hsm::open_key_store(token.config(), KeyPolicy::kUseExisting);
  INFO(store.status().to_string());
  REQUIRE(store.ok());
  CHECK((*store)->signing_key().id() == first);
  // kCreateIfMissing does not make a second key when one is there.
  store = hsm::open_key_store(token.config(), KeyPolicy::kCreateIfMissing);
  REQUIRE(store.ok());
  CHECK((*store)->signing_key().id() == first);
  CHECK((*store)->description() == token.config().uri);
}

TEST_CASE("the private key is sensitive, not extractable and sign-only", "[pkcs11]") {
  TempDir dir;
  SoftHsmToken token(dir.path());
  token.open_with_key();  // generates the key, then closes: RawSession owns the module below

  {
    RawSession raw(token);
    std::vector<CK_OBJECT_HANDLE> keys = raw.find(CKO_PRIVATE_KEY, "medgate-signing");
    REQUIRE(keys.size() == 1);
    const CK_OBJECT_HANDLE key = keys[0];
    CHECK(raw.flag(key, CKA_TOKEN));
    CHECK(raw.flag(key, CKA_PRIVATE));
    CHECK(raw.flag(key, CKA_SENSITIVE));
    CHECK(raw.flag(key, CKA_ALWAYS_SENSITIVE));
    CHECK_FALSE(raw.flag(key, CKA_EXTRACTABLE));
    CHECK(raw.flag(key, CKA_NEVER_EXTRACTABLE));
    CHECK(raw.flag(key, CKA_SIGN));
    CHECK_FALSE(raw.flag(key, CKA_DECRYPT));
    CHECK_FALSE(raw.flag(key, CKA_UNWRAP));
    CHECK_FALSE(raw.flag(key, CKA_DERIVE));
    CHECK(raw.get(key, CKA_VALUE).first == CKR_ATTRIBUTE_SENSITIVE);
    auto [rv, id] = raw.get(key, CKA_ID);
    CHECK(rv == CKR_OK);
    REQUIRE(id.size() == 20);  // sequence number (4) and key-id prefix (16)

    std::vector<CK_OBJECT_HANDLE> publics = raw.find(CKO_PUBLIC_KEY, "medgate-signing");
    REQUIRE(publics.size() == 1);
    CHECK(raw.flag(publics[0], CKA_VERIFY));
    CHECK_FALSE(raw.flag(publics[0], CKA_PRIVATE));
    CHECK(raw.get(publics[0], CKA_ID).second == id);
  }

  // Cross-check with OpenSC's tool, without a PIN (so none on its command line): the public half
  // is visible to anyone, the private half is not listed.
  const std::string command = "SOFTHSM2_CONF='" + token.config().softhsm_conf->string() +
                              "' pkcs11-tool --module " + kSoftHsm + " --token-label " +
                              token.label() + " --list-objects 2>&1";
  FILE* pipe = ::popen(command.c_str(), "r");
  REQUIRE(pipe != nullptr);
  std::string output;
  char buffer[512];
  while (std::fgets(buffer, sizeof buffer, pipe) != nullptr) output += buffer;
  CHECK(::pclose(pipe) == 0);
  INFO(output);
  CHECK(output.find("Public Key Object; EC") != std::string::npos);
  CHECK(output.find("label:      medgate-signing") != std::string::npos);
  CHECK(output.find("Private Key Object") == std::string::npos);
}

TEST_CASE("a wrong PIN is refused without echoing any PIN", "[pkcs11]") {
  TempDir dir;
  SoftHsmToken token(dir.path());
  const std::string right = user_pin(token);
  const std::string wrong = "Wr0ngPinWr0ngPin";
  write_file(dir / "wrong-pin", wrong + "\n", 0600);
  KeyStoreConfig config = token.config();
  config.pin = {hsm::PinSource::Kind::kFile, (dir / "wrong-pin").string()};

  Result<std::unique_ptr<hsm::KeyStore>> store =
      hsm::open_key_store(config, KeyPolicy::kCreateIfMissing);
  CHECK(store.status().code() == StatusCode::kPermissionDenied);
  const std::string& message = store.status().message();
  CHECK(message.find("wrong PIN for token test") != std::string::npos);
  CHECK(message.find(wrong) == std::string::npos);
  CHECK(message.find(right) == std::string::npos);

  SECTION("also from an environment variable") {
    REQUIRE(::setenv("MEDGATE_TEST_PIN", "123456", 1) == 0);
    config.pin = {hsm::PinSource::Kind::kEnv, "MEDGATE_TEST_PIN"};
    store = hsm::open_key_store(config, KeyPolicy::kCreateIfMissing);
    CHECK(store.status().code() == StatusCode::kPermissionDenied);
    CHECK(store.status().message().find("123456") == std::string::npos);
    ::unsetenv("MEDGATE_TEST_PIN");
  }
  SECTION("the right PIN still works afterwards") {
    CHECK(token.open_with_key() != nullptr);
  }
}

TEST_CASE("a PIN file others may read is refused", "[pkcs11]") {
  TempDir dir;
  SoftHsmToken token(dir.path());
  REQUIRE(::chmod(token.config().pin.name.c_str(), 0644) == 0);
  Result<std::unique_ptr<hsm::KeyStore>> store =
      hsm::open_key_store(token.config(), KeyPolicy::kCreateIfMissing);
  CHECK(store.status().code() == StatusCode::kInvalidArgument);
  CHECK(store.status().message().find("chmod") != std::string::npos);
}

TEST_CASE("an unknown token label is unavailable and named", "[pkcs11]") {
  TempDir dir;
  SoftHsmToken token(dir.path());
  Result<std::unique_ptr<hsm::KeyStore>> store = hsm::open_key_store(
      with_uri(token.config(),
               "pkcs11:token=nosuch;object=medgate-signing?module-path=" + std::string(kSoftHsm)));
  CHECK(store.status().code() == StatusCode::kUnavailable);
  const std::string& message = store.status().message();
  CHECK(message.find("no token matching token=nosuch") != std::string::npos);
  CHECK(message.find(kSoftHsm) != std::string::npos);
  CHECK(message.find("'test'") != std::string::npos);  // the labels it did see
}

TEST_CASE("a module that cannot be loaded is unavailable", "[pkcs11]") {
  TempDir dir;
  SoftHsmToken token(dir.path());
  Result<std::unique_ptr<hsm::KeyStore>> store = hsm::open_key_store(
      with_uri(token.config(), "pkcs11:token=test?module-path=/nonexistent/libnothing.so"));
  CHECK(store.status().code() == StatusCode::kUnavailable);
  CHECK(store.status().message().find("cannot load PKCS#11 module /nonexistent/libnothing.so") !=
        std::string::npos);

  SECTION("a library that is not a PKCS#11 module") {
    store = hsm::open_key_store(
        with_uri(token.config(), "pkcs11:token=test?module-path=/lib/x86_64-linux-gnu/libz.so.1"));
    CHECK(store.status().code() == StatusCode::kUnavailable);
    CHECK(store.status().message().find("C_GetFunctionList") != std::string::npos);
  }
  SECTION("a URI without a module") {
    store = hsm::open_key_store(with_uri(token.config(), "pkcs11:token=test"));
    CHECK(store.status().code() == StatusCode::kInvalidArgument);
    CHECK(store.status().message().find("module-path") != std::string::npos);
  }
  SECTION("an unknown module-name") {
    store = hsm::open_key_store(with_uri(token.config(), "pkcs11:token=test?module-name=nosuch"));
    CHECK(store.status().code() == StatusCode::kInvalidArgument);
    CHECK(store.status().message().find("nosuch") != std::string::npos);
  }
}

TEST_CASE("URIs medgate refuses", "[pkcs11]") {
  TempDir dir;
  SoftHsmToken token(dir.path());
  const std::string base = token.config().uri;

  Result<std::unique_ptr<hsm::KeyStore>> store =
      hsm::open_key_store(with_uri(token.config(), base + "&pin-value=S3cretPin"));
  CHECK(store.status().code() == StatusCode::kInvalidArgument);
  CHECK(store.status().message().find("PIN in the URI is not accepted") != std::string::npos);
  CHECK(store.status().message().find("S3cretPin") == std::string::npos);

  store = hsm::open_key_store(
      with_uri(token.config(), "pkcs11:token=test;bogus=1?module-path=" + std::string(kSoftHsm)));
  CHECK(store.status().code() == StatusCode::kInvalidArgument);

  store = hsm::open_key_store(with_uri(token.config(), "pkcs11:token=%zz"));
  CHECK(store.status().code() == StatusCode::kInvalidArgument);

  store = hsm::open_key_store(
      with_uri(token.config(), "pkcs11:token=test?module-path=lib/relative.so"));
  CHECK(store.status().code() == StatusCode::kInvalidArgument);
}

TEST_CASE("key store URI schemes", "[pkcs11]") {
  KeyStoreConfig config;
  for (const char* uri : {"tpm2:device:/dev/tpmrm0", "tpm2", "TPM2:swtpm:port=2321"}) {
    config.uri = uri;
    Result<std::unique_ptr<hsm::KeyStore>> store = hsm::open_key_store(config);
    INFO(uri);
    CHECK(store.status().code() == StatusCode::kInvalidArgument);
    // Routed to the TPM backend, which needs a key directory before it touches a TPM.
    CHECK(store.status().message().find("needs key_dir") != std::string::npos);
  }
  config.uri = "file:/etc/key.pem";
  Result<std::unique_ptr<hsm::KeyStore>> store = hsm::open_key_store(config);
  CHECK(store.status().code() == StatusCode::kInvalidArgument);
  CHECK(store.status().message().find("'file'") != std::string::npos);
}

TEST_CASE("kUseExisting on a token without the key is not found", "[pkcs11]") {
  TempDir dir;
  SoftHsmToken token(dir.path());
  Result<std::unique_ptr<hsm::KeyStore>> store =
      hsm::open_key_store(token.config(), KeyPolicy::kUseExisting);
  CHECK(store.status().code() == StatusCode::kNotFound);
  CHECK(store.status().message() == "no signing key object=medgate-signing on token test");

  // A key under another label is not it.
  {
    auto other =
        hsm::open_key_store(with_uri(token.config(), "pkcs11:token=test;object=other?module-path=" +
                                                         std::string(kSoftHsm)),
                            KeyPolicy::kCreateIfMissing);
    REQUIRE(other.ok());
  }
  store = hsm::open_key_store(token.config(), KeyPolicy::kUseExisting);
  CHECK(store.status().code() == StatusCode::kNotFound);
}

TEST_CASE("URI forms that select the same key", "[pkcs11]") {
  TempDir dir;
  SoftHsmToken token(dir.path());
  KeyId id = token.open_with_key()->signing_key().id();

  SECTION("module-name resolved through p11-kit's module registration") {
    auto store = hsm::open_key_store(
        with_uri(token.config(), "pkcs11:token=test;object=medgate-signing?module-name=softhsm2"));
    INFO(store.status().to_string());
    REQUIRE(store.ok());
    CHECK((*store)->signing_key().id() == id);
  }
  SECTION("the default object label") {
    auto store = hsm::open_key_store(
        with_uri(token.config(), "pkcs11:token=test?module-path=" + std::string(kSoftHsm)));
    REQUIRE(store.ok());
    CHECK((*store)->signing_key().id() == id);
    CHECK((*store)->description() == token.config().uri);
  }
  SECTION("pin-source in the URI when the config has no PIN source") {
    KeyStoreConfig config = with_uri(
        token.config(), token.config().uri + "&pin-source=file:" + token.config().pin.name);
    config.pin = {};
    auto store = hsm::open_key_store(config);
    INFO(store.status().to_string());
    REQUIRE(store.ok());
    CHECK((*store)->signing_key().id() == id);
    CHECK((*store)->description().find("pin-source") == std::string::npos);
  }
  SECTION("no PIN source at all") {
    KeyStoreConfig config = token.config();
    config.pin = {};
    auto store = hsm::open_key_store(config);
    CHECK(store.status().code() == StatusCode::kInvalidArgument);
  }
}

TEST_CASE("random bytes come from the token", "[pkcs11]") {
  TempDir dir;
  SoftHsmToken token(dir.path());
  auto store = token.open_with_key();
  Result<Bytes> a = store->random(32);
  Result<Bytes> b = store->random(32);
  REQUIRE(a.ok());
  REQUIRE(b.ok());
  CHECK(a->size() == 32);
  CHECK(b->size() == 32);
  CHECK(*a != *b);
  CHECK(store->random(0).value().empty());
  CHECK(store->random(std::size_t{1} << 30).status().code() == StatusCode::kInvalidArgument);
}

TEST_CASE("signing fails as unavailable when the key vanishes from the token", "[pkcs11]") {
  TempDir dir;
  SoftHsmToken token(dir.path());
  auto store = token.open_with_key();
  REQUIRE(store->sign_digest(digest_of("before")).ok());
  // SoftHSM notices that the object files are gone on the next use of the cached key handle.
  std::filesystem::remove_all(dir / "softhsm" / "tokens");
  Result<Bytes> signature = store->sign_digest(digest_of("after"));
  CHECK(signature.status().code() == StatusCode::kUnavailable);
  CHECK(signature.status().message().find("signing on token test failed: CKR_") !=
        std::string::npos);
}

TEST_CASE("two key stores on the same module coexist", "[pkcs11]") {
  TempDir dir;
  SoftHsmToken token(dir.path());
  auto first = token.open_with_key();
  auto second_or = hsm::open_key_store(token.config(), KeyPolicy::kUseExisting);
  REQUIRE(second_or.ok());
  auto second = std::move(second_or).value();
  CHECK(first->signing_key() == second->signing_key());

  const Hash digest = digest_of("both");
  for (hsm::KeyStore* store : {first.get(), second.get()}) {
    Result<Bytes> signature = store->sign_digest(digest);
    REQUIRE(signature.ok());
    CHECK(second->signing_key().verify_digest(digest, *signature).ok());
  }
  // Closing one leaves the module initialised for the other.
  first.reset();
  Result<Bytes> signature = second->sign_digest(digest);
  INFO(signature.status().to_string());
  REQUIRE(signature.ok());
  CHECK(second->signing_key().verify_digest(digest, *signature).ok());
}

TEST_CASE("one SoftHSM configuration at a time per process", "[pkcs11]") {
  TempDir dir_a;
  TempDir dir_b;
  SoftHsmToken a(dir_a.path(), "token-a");
  SoftHsmToken b(dir_b.path(), "token-b");
  {
    auto store_a = a.open_with_key();
    Result<std::unique_ptr<hsm::KeyStore>> store_b =
        hsm::open_key_store(b.config(), KeyPolicy::kCreateIfMissing);
    CHECK(store_b.status().code() == StatusCode::kFailedPrecondition);
    CHECK(store_b.status().message().find("SOFTHSM2_CONF") != std::string::npos);
  }
  // Once the first is closed the module is finalised and reads the other configuration.
  auto store_b = b.open_with_key();
  CHECK(store_b->description().find("token=token-b") != std::string::npos);
}

TEST_CASE("concurrent signing from many threads", "[pkcs11]") {
  TempDir dir;
  SoftHsmToken token(dir.path());
  auto store = token.open_with_key();
  constexpr int kThreads = 8;
  constexpr int kSignsPerThread = 200;
  std::atomic<int> verified{0};
  std::atomic<int> failed{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kSignsPerThread; ++i) {
        Hash digest = digest_of("thread " + std::to_string(t) + " entry " + std::to_string(i));
        Result<Bytes> signature = store->sign_digest(digest);
        if (signature.ok() && store->signing_key().verify_digest(digest, *signature).ok())
          ++verified;
        else
          ++failed;
      }
    });
  }
  for (auto& thread : threads) thread.join();
  CHECK(failed == 0);
  CHECK(verified == kThreads * kSignsPerThread);
}

TEST_CASE("the KEK, the pseudonym key and the counter are on the token as specified", "[pkcs11]") {
  TempDir dir;
  SoftHsmToken token(dir.path());
  token.open_with_key();

  RawSession raw(token);
  std::vector<CK_OBJECT_HANDLE> keks = raw.find(CKO_SECRET_KEY, "medgate-kek");
  REQUIRE(keks.size() == 1);
  const CK_OBJECT_HANDLE kek = keks[0];
  CHECK(raw.number(kek, CKA_KEY_TYPE) == CKK_AES);
  CHECK(raw.number(kek, CKA_VALUE_LEN) == 32);
  CHECK(raw.flag(kek, CKA_TOKEN));
  CHECK(raw.flag(kek, CKA_PRIVATE));
  CHECK(raw.flag(kek, CKA_SENSITIVE));
  CHECK(raw.flag(kek, CKA_ALWAYS_SENSITIVE));
  CHECK_FALSE(raw.flag(kek, CKA_EXTRACTABLE));
  CHECK(raw.flag(kek, CKA_NEVER_EXTRACTABLE));
  CHECK(raw.flag(kek, CKA_ENCRYPT));
  CHECK(raw.flag(kek, CKA_DECRYPT));
  CHECK_FALSE(raw.flag(kek, CKA_WRAP));
  CHECK_FALSE(raw.flag(kek, CKA_UNWRAP));
  CHECK_FALSE(raw.flag(kek, CKA_SIGN));
  CHECK_FALSE(raw.flag(kek, CKA_DERIVE));
  CHECK(raw.get(kek, CKA_VALUE).first == CKR_ATTRIBUTE_SENSITIVE);

  std::vector<CK_OBJECT_HANDLE> pseudonym_keys = raw.find(CKO_SECRET_KEY, "medgate-pseudonym");
  REQUIRE(pseudonym_keys.size() == 1);
  const CK_OBJECT_HANDLE pseudonym = pseudonym_keys[0];
  CHECK(raw.number(pseudonym, CKA_KEY_TYPE) == CKK_GENERIC_SECRET);
  CHECK(raw.number(pseudonym, CKA_VALUE_LEN) == 32);
  CHECK(raw.flag(pseudonym, CKA_TOKEN));
  CHECK(raw.flag(pseudonym, CKA_PRIVATE));
  CHECK(raw.flag(pseudonym, CKA_SENSITIVE));
  CHECK_FALSE(raw.flag(pseudonym, CKA_EXTRACTABLE));
  CHECK(raw.flag(pseudonym, CKA_NEVER_EXTRACTABLE));
  CHECK(raw.flag(pseudonym, CKA_SIGN));
  CHECK_FALSE(raw.flag(pseudonym, CKA_ENCRYPT));
  CHECK_FALSE(raw.flag(pseudonym, CKA_DECRYPT));
  CHECK_FALSE(raw.flag(pseudonym, CKA_DERIVE));
  CHECK(raw.get(pseudonym, CKA_VALUE).first == CKR_ATTRIBUTE_SENSITIVE);

  std::vector<CK_OBJECT_HANDLE> counters = raw.find(CKO_DATA, "medgate-counter");
  REQUIRE(counters.size() == 1);
  CHECK(raw.flag(counters[0], CKA_TOKEN));
  CHECK(raw.flag(counters[0], CKA_PRIVATE));
  CHECK(raw.get(counters[0], CKA_APPLICATION).second == to_bytes("medgate"));
  CHECK(raw.get(counters[0], CKA_VALUE).second == Bytes{std::byte{0}, std::byte{0}, std::byte{0},
                                                        std::byte{0}, std::byte{0}, std::byte{0},
                                                        std::byte{0}, std::byte{1}});
}

TEST_CASE("rotated signing keys carry their sequence number and key id in CKA_ID", "[pkcs11]") {
  TempDir dir;
  SoftHsmToken token(dir.path());
  std::vector<PublicKey> keys;
  {
    auto store = token.open_with_key();
    REQUIRE(store->create_signing_key().ok());
    REQUIRE(store->create_signing_key().ok());
    keys = store->signing_keys();
    REQUIRE(keys.size() == 3);
  }
  std::vector<Bytes> ids;
  {
    RawSession raw(token);
    std::vector<CK_OBJECT_HANDLE> privates = raw.find(CKO_PRIVATE_KEY, "medgate-signing");
    REQUIRE(privates.size() == 3);
    for (CK_OBJECT_HANDLE key : privates) {
      // Every key has the first key's protection.
      CHECK(raw.flag(key, CKA_SENSITIVE));
      CHECK_FALSE(raw.flag(key, CKA_EXTRACTABLE));
      CHECK(raw.flag(key, CKA_SIGN));
      CHECK_FALSE(raw.flag(key, CKA_DECRYPT));
      ids.push_back(raw.get(key, CKA_ID).second);
    }
    CHECK(raw.find(CKO_PUBLIC_KEY, "medgate-signing").size() == 3);
  }
  std::sort(ids.begin(), ids.end());
  for (std::size_t i = 0; i < 3; ++i) {
    INFO("key " << i);
    REQUIRE(ids[i].size() == 20);
    CHECK(ids[i][3] == std::byte(i + 1));  // sequence number 1, 2, 3 (big-endian)
    CHECK(std::equal(ids[i].begin() + 4, ids[i].end(), keys[i].id().begin()));
  }

  SECTION("id= in the URI selects the active key") {
    const std::string uri =
        "pkcs11:token=test;object=medgate-signing;id=" + percent_encoded(ids[1]) +
        "?module-path=" + kSoftHsm;
    auto store = hsm::open_key_store(with_uri(token.config(), uri), KeyPolicy::kUseExisting);
    INFO(store.status().to_string());
    REQUIRE(store.ok());
    CHECK((*store)->signing_key() == keys[1]);
    CHECK((*store)->signing_keys() == keys);
  }
  SECTION("without id= the oldest key is active") {
    auto store = hsm::open_key_store(token.config(), KeyPolicy::kUseExisting);
    REQUIRE(store.ok());
    CHECK((*store)->signing_key() == keys[0]);
  }
  SECTION("id= naming a key that is not there is not found, even with kCreateIfMissing") {
    Bytes other = ids[1];
    other[19] ^= std::byte{0x01};
    const std::string uri =
        "pkcs11:token=test;object=medgate-signing;id=" + percent_encoded(other) +
        "?module-path=" + kSoftHsm;
    auto store = hsm::open_key_store(with_uri(token.config(), uri), KeyPolicy::kCreateIfMissing);
    CHECK(store.status().code() == StatusCode::kNotFound);
    CHECK(store.status().message().find("3 other signing keys labelled medgate-signing") !=
          std::string::npos);
  }
}

TEST_CASE("kUseExisting names the object that is missing", "[pkcs11]") {
  TempDir dir;
  SoftHsmToken token(dir.path());
  token.open_with_key();

  struct Missing {
    CK_OBJECT_CLASS object_class;
    std::string label;
    std::string message;
  };
  const Missing missing =
      GENERATE(Missing{CKO_SECRET_KEY, "medgate-kek",
                       "token test has no KEK 'medgate-kek': run medctl init"},
               Missing{CKO_SECRET_KEY, "medgate-pseudonym",
                       "token test has no pseudonym key 'medgate-pseudonym': run medctl init"},
               Missing{CKO_DATA, "medgate-counter",
                       "token test has no rollback counter 'medgate-counter': run medctl init"});
  INFO(missing.label);
  {
    RawSession raw(token);
    std::vector<CK_OBJECT_HANDLE> objects = raw.find(missing.object_class, missing.label);
    REQUIRE(objects.size() == 1);
    raw.destroy(objects[0]);
  }
  Result<std::unique_ptr<hsm::KeyStore>> store =
      hsm::open_key_store(token.config(), KeyPolicy::kUseExisting);
  CHECK(store.status().code() == StatusCode::kNotFound);
  CHECK(store.status().message() == missing.message);

  // kCreateIfMissing makes it again (a new key: what it wrapped before is lost, which is why
  // medgated opens with kUseExisting).
  store = hsm::open_key_store(token.config(), KeyPolicy::kCreateIfMissing);
  INFO(store.status().to_string());
  REQUIRE(store.ok());
  store = hsm::open_key_store(token.config(), KeyPolicy::kUseExisting);
  CHECK(store.ok());
}

TEST_CASE("malformed wrapped keys are refused with the reason", "[pkcs11]") {
  TempDir dir;
  SoftHsmToken token(dir.path());
  auto store = token.open_with_key();
  Result<Bytes> wrapped = store->wrap_key(to_bytes("0123456789abcdef0123456789abcdef"), {});
  REQUIRE(wrapped.ok());
  CHECK(wrapped->size() == 1 + 12 + 32 + 16);
  CHECK((*wrapped)[0] == std::byte{0x01});

  Bytes version_2 = *wrapped;
  version_2[0] = std::byte{0x02};
  Result<hsm::SecretBytes> result = store->unwrap_key(version_2, {});
  CHECK(result.status().code() == StatusCode::kInvalidArgument);
  CHECK(result.status().message().find("format version 2") != std::string::npos);

  Bytes too_long = *wrapped;
  too_long.resize(1 + 12 + 65 + 16);
  result = store->unwrap_key(too_long, {});
  CHECK(result.status().code() == StatusCode::kInvalidArgument);
  CHECK(result.status().message().find("94 bytes") != std::string::npos);

  result = store->unwrap_key(ByteView(*wrapped).first(29), {});
  CHECK(result.status().code() == StatusCode::kInvalidArgument);
  CHECK(result.status().message().find("30 to 93 bytes") != std::string::npos);

  // A tag failure is a verdict, not a device error.
  Bytes altered = *wrapped;
  altered.back() ^= std::byte{0x01};
  CHECK(store->unwrap_key(altered, {}).status().code() == StatusCode::kVerificationFailed);
  CHECK(store->health().errors == 0);
  CHECK(store->health().reconnects == 0);
}

TEST_CASE("a counter left twice by an interrupted increment reads as the larger", "[pkcs11]") {
  TempDir dir;
  SoftHsmToken token(dir.path());
  token.open_with_key();  // the counter at 1
  {
    RawSession raw(token);
    raw.create_counter(7);  // as if an increment from 6 stopped before removing its predecessor
  }
  auto store = token.open_with_key();
  CHECK(store->read_counter().value() == 7);
  CHECK(store->increment_counter().value() == 8);
  store.reset();
  RawSession raw(token);
  CHECK(raw.find(CKO_DATA, "medgate-counter").size() == 1);
}

TEST_CASE("the key store reconnects when its session is lost", "[pkcs11]") {
  TempDir dir;
  SoftHsmToken token(dir.path());
  auto store = token.open_with_key();
  const Bytes context = to_bytes("patient:1");
  Result<Bytes> wrapped = store->wrap_key(to_bytes("a data key of 32 bytes, exactly!"), context);
  REQUIRE(wrapped.ok());
  const Hash pseudonym = store->keyed_hash(as_bytes("MRN 1")).value();
  REQUIRE(store->sign_digest(digest_of("before")).ok());
  CHECK(store->health().reconnects == 0);

  LoadedModule module(token.label());

  SECTION("every session on the slot closed (as by a token reset)") {
    module.close_all_sessions();
    const Hash digest = digest_of("after");
    Result<Bytes> signature = store->sign_digest(digest);
    INFO(signature.status().to_string());
    REQUIRE(signature.ok());
    CHECK(store->signing_key().verify_digest(digest, *signature).ok());
    hsm::KeyStoreHealth health = store->health();
    CHECK(health.reachable);
    CHECK(health.reconnects == 1);
    CHECK(health.errors == 1);
    CHECK(health.last_error == "CKR_SESSION_HANDLE_INVALID");

    // Every kind of operation comes back the same way, with the objects found again.
    module.close_all_sessions();
    Result<hsm::SecretBytes> key = store->unwrap_key(*wrapped, context);
    INFO(key.status().to_string());
    REQUIRE(key.ok());
    CHECK(to_string(key->view()) == "a data key of 32 bytes, exactly!");
    module.close_all_sessions();
    CHECK(store->keyed_hash(as_bytes("MRN 1")).value() == pseudonym);
    module.close_all_sessions();
    CHECK(store->increment_counter().value() == 2);
    module.close_all_sessions();
    Result<PublicKey> created = store->create_signing_key();
    REQUIRE(created.ok());
    module.close_all_sessions();
    CHECK(store->sign_digest_with(created->id(), digest).ok());
    CHECK(store->health().reconnects == 6);
  }
  SECTION("logged out while the session stays open") {
    module.log_out();
    Result<Bytes> signature = store->sign_digest(digest_of("after"));
    INFO(signature.status().to_string());
    REQUIRE(signature.ok());
    hsm::KeyStoreHealth health = store->health();
    CHECK(health.reconnects == 1);
    CHECK(health.errors == 1);
    INFO(health.last_error);
    CHECK((health.last_error == "CKR_USER_NOT_LOGGED_IN" ||
           health.last_error == "CKR_KEY_HANDLE_INVALID" ||
           health.last_error == "CKR_OBJECT_HANDLE_INVALID"));
  }
  SECTION("the PIN is read again from its source; a wrong one leaves the token unavailable") {
    const std::string pin = user_pin(token);
    write_file(token.config().pin.name, "Wr0ngPinWr0ngPin\n", 0600);
    module.close_all_sessions();
    Result<Bytes> signature = store->sign_digest(digest_of("after"));
    CHECK(signature.status().code() == StatusCode::kUnavailable);
    const std::string& message = signature.status().message();
    CHECK(message.find("signing on token test failed: CKR_SESSION_HANDLE_INVALID") !=
          std::string::npos);
    CHECK(message.find("reconnecting to token test failed: wrong PIN for token test") !=
          std::string::npos);
    CHECK(message.find("Wr0ngPin") == std::string::npos);
    hsm::KeyStoreHealth health = store->health();
    CHECK_FALSE(health.reachable);
    CHECK(health.reconnects == 0);

    // Once the PIN is right again the next call reconnects.
    write_file(token.config().pin.name, pin + "\n", 0600);
    signature = store->sign_digest(digest_of("later"));
    INFO(signature.status().to_string());
    REQUIRE(signature.ok());
    health = store->health();
    CHECK(health.reachable);
    CHECK(health.reconnects == 1);
    CHECK(health.errors == 2);
  }
}

TEST_CASE("PKCS#11 signing rate", "[.][pkcs11][timing]") {
  {
    TempDir dir;
    SoftHsmToken token(dir.path());
    auto store = token.open_with_key();
    const Hash digest = digest_of("timing");
    constexpr int kSigns = 5000;
    auto start = std::chrono::steady_clock::now();
    for (int i = 0; i < kSigns; ++i) REQUIRE(store->sign_digest(digest).ok());
    std::chrono::duration<double> elapsed = std::chrono::steady_clock::now() - start;
    WARN("SoftHSM P-256 sign_digest: " << static_cast<int>(kSigns / elapsed.count())
                                       << " signs/s (one thread, cached session and key handle)");
  }

  auto provision_start = std::chrono::steady_clock::now();
  for (int i = 0; i < 10; ++i) {
    TempDir d;
    SoftHsmToken t(d.path());
    t.open_with_key();
  }
  std::chrono::duration<double, std::milli> provision =
      std::chrono::steady_clock::now() - provision_start;
  WARN("provision a token and generate its key: " << provision.count() / 10 << " ms");
}

}  // namespace medgate

namespace medgate {

// The MLLP listener's TLS key (hsm/tls_key.h). Only prepare_tls_key() here: loading it through
// libp11's engine keeps the module initialised for the life of the process (by design, see
// tls_key.h), which would pin this test process to one SoftHSM directory;
// tests/integration/tls_test.sh does the TLS handshakes with it.
TEST_CASE("the TLS key: generated on the token once, kept after; a TPM's needs the open store",
          "[pkcs11]") {
  testing::TempDir dir;
  testing::SoftHsmToken token(dir.path());
  {
    auto keys = token.open_with_key();  // the signing key must not be mistaken for it
    CHECK(hsm::prepare_tls_key(token.config(), /*create=*/false).status().code() ==
          StatusCode::kNotFound);
    auto made = hsm::prepare_tls_key(token.config(), /*create=*/true);
    INFO(made.status().to_string());
    REQUIRE(made.ok());
    CHECK(made->created);
    CHECK(made->location == "pkcs11:token=test;object=medgate-tls;type=private");
    CHECK_FALSE(made->public_key == keys->signing_key());
    auto again = hsm::prepare_tls_key(token.config(), /*create=*/true);
    REQUIRE(again.ok());
    CHECK_FALSE(again->created);
    CHECK(again->public_key == made->public_key);
    // With the open store passed along (as medgated does), a token's key is still the engine's.
    auto through_store = hsm::prepare_tls_key(token.config(), *keys, /*create=*/false);
    REQUIRE(through_store.ok());
    CHECK(through_store->public_key == made->public_key);
    // The key store still has its one signing key: the TLS key is not one of them.
    CHECK(keys->signing_keys().size() == 1);
  }
  auto reopened = hsm::open_key_store(token.config());
  REQUIRE(reopened.ok());
  CHECK((*reopened)->signing_keys().size() == 1);

  hsm::KeyStoreConfig tpm;
  tpm.uri = "tpm2:swtpm:host=127.0.0.1,port=1";
  for (const Status& s : {hsm::prepare_tls_key(tpm, true).status(),
                          hsm::open_tls_private_key(tpm).status()}) {
    CHECK(s.code() == StatusCode::kFailedPrecondition);
    CHECK_THAT(s.message(), Catch::Contains("open key store"));
  }
}

}  // namespace medgate
