// The PKCS#11 key store against a real SoftHSM token: provisioning, key generation, signing, the
// key's protection attributes (read back through a separate raw PKCS#11 session) and every error
// the factory promises.
#include <dlfcn.h>
// The test target does not get p11-kit's include directory; the header is self-contained.
#include <p11-kit-1/p11-kit/pkcs11.h>
#include <sys/stat.h>

#include <catch2/catch.hpp>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "hsm/bytes.h"
#include "hsm/key_store.h"
#include "hsm/key_store_factory.h"
#include "hsm/pin.h"
#include "hsm/public_key.h"
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
    REQUIRE(fn_->C_OpenSession(*slot, CKF_SERIAL_SESSION, nullptr, nullptr, &session_) == CKR_OK);
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

 private:
  void* handle_ = nullptr;
  CK_FUNCTION_LIST* fn_ = nullptr;
  CK_SESSION_HANDLE session_ = CK_INVALID_HANDLE;
};

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
    CHECK(id.size() == 16);

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
