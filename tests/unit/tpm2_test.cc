// The TPM 2.0 key store against a real swtpm: keys, rotation, signatures, data keys, pseudonyms,
// the key-agreement key (checked against OpenSSL's ECDH), the TLS key, the NV counter, PCR sealing,
// and the faults a TPM has in the field (unreachable, restarted, damaged blobs, an NV index that is
// not ours). swtpm has no resource manager and three object slots, so a leaked handle shows up as
// TPM_RC_OBJECT_MEMORY within a few calls; the tests also ask the TPM itself (tpm2_getcap) that
// nothing is left loaded.
#include <openssl/evp.h>
#include <openssl/x509.h>
#include <sys/stat.h>

#include <catch2/catch.hpp>

#include <algorithm>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "hsm/bytes.h"
#include "hsm/key_store.h"
#include "hsm/key_store_factory.h"
#include "hsm/public_key.h"
#include "hsm/tls_key.h"
// Only for agree_with_point(): a point OpenSSL would never parse into a PublicKey.
#include "hsm/tpm2/tpm2_key_store.h"
#include "tests/support/swtpm.h"
#include "tests/support/temp_dir.h"

namespace medgate {
namespace {

using hsm::KeyPolicy;
using hsm::KeyStore;
using hsm::KeyStoreConfig;
using hsm::SecretBytes;
using testing::Swtpm;
using testing::TempDir;

constexpr const char* kPcr7Event =
    "0badc0de0badc0de0badc0de0badc0de0badc0de0badc0de0badc0de0badc0de";

struct Fixture {
  TempDir dir{"medgate-tpm2"};
  Swtpm tpm{dir.path()};

  KeyStoreConfig config() const {
    KeyStoreConfig c;
    c.uri = tpm.uri();
    c.key_dir = dir / "keys";
    return c;
  }
  std::unique_ptr<KeyStore> open(const KeyStoreConfig& c,
                                 KeyPolicy policy = KeyPolicy::kUseExisting) const {
    Result<std::unique_ptr<KeyStore>> store = hsm::open_key_store(c, policy);
    INFO(store.status().to_string());
    REQUIRE(store.ok());
    return std::move(store).value();
  }
  std::unique_ptr<KeyStore> create() const { return open(config(), KeyPolicy::kCreateIfMissing); }
  // Transient objects loaded in the TPM right now, as tpm2_getcap lists them (one per line).
  std::size_t transient_handles() const {
    std::string out = tpm.tool({"tpm2_getcap", "handles-transient"});
    std::size_t n = 0;
    for (std::size_t at = out.find("0x80"); at != std::string::npos; at = out.find("0x80", at + 1))
      ++n;
    return n;
  }
};

Hash digest_of(const std::string& text) {
  return sha256(as_bytes(text));
}

void flip_byte(const std::filesystem::path& file, std::size_t from_end) {
  std::fstream f(file, std::ios::in | std::ios::out | std::ios::binary);
  REQUIRE(f);
  f.seekg(0, std::ios::end);
  const auto size = static_cast<std::streamoff>(f.tellg());
  REQUIRE(size > static_cast<std::streamoff>(from_end));
  const std::streamoff at = size - 1 - static_cast<std::streamoff>(from_end);
  f.seekg(at);
  char c = 0;
  f.get(c);
  f.seekp(at);
  f.put(static_cast<char>(c ^ 0x5a));
}

using PkeyPtr = std::unique_ptr<EVP_PKEY, decltype(&EVP_PKEY_free)>;

// An ephemeral P-256 key made by OpenSSL: the other side of an agreement.
PkeyPtr openssl_p256() {
  PkeyPtr key(EVP_EC_gen("P-256"), EVP_PKEY_free);
  REQUIRE(key);
  return key;
}

PublicKey public_half(EVP_PKEY* key) {
  unsigned char* der = nullptr;
  const int n = i2d_PUBKEY(key, &der);
  REQUIRE(n > 0);
  Bytes spki(reinterpret_cast<std::byte*>(der), reinterpret_cast<std::byte*>(der) + n);
  OPENSSL_free(der);
  Result<PublicKey> parsed = PublicKey::from_spki_der(spki);
  REQUIRE(parsed.ok());
  return *parsed;
}

// OpenSSL's ECDH of `mine` with `peer`: Z, the x-coordinate, always 32 bytes for P-256.
Bytes openssl_ecdh(EVP_PKEY* mine, const PublicKey& peer) {
  const unsigned char* p = u8(ByteView(peer.spki_der()));
  PkeyPtr peer_key(d2i_PUBKEY(nullptr, &p, static_cast<long>(peer.spki_der().size())),
                   EVP_PKEY_free);
  REQUIRE(peer_key);
  std::unique_ptr<EVP_PKEY_CTX, decltype(&EVP_PKEY_CTX_free)> ctx(EVP_PKEY_CTX_new(mine, nullptr),
                                                                  EVP_PKEY_CTX_free);
  REQUIRE(ctx);
  REQUIRE(EVP_PKEY_derive_init(ctx.get()) == 1);
  REQUIRE(EVP_PKEY_derive_set_peer(ctx.get(), peer_key.get()) == 1);
  std::size_t n = 0;
  REQUIRE(EVP_PKEY_derive(ctx.get(), nullptr, &n) == 1);
  Bytes z(n);
  REQUIRE(EVP_PKEY_derive(ctx.get(), u8(std::span<std::byte>(z)), &n) == 1);
  z.resize(n);
  return z;
}

Bytes bytes_of(const SecretBytes& secret) {
  return Bytes(secret.view().begin(), secret.view().end());
}

TEST_CASE("tpm2: create, then reopen the same keys; files are private", "[tpm2]") {
  Fixture fx;
  KeyId genesis{};
  {
    auto store = fx.create();
    genesis = store->signing_key().id();
    CHECK(store->description() == "tpm2:" + fx.tpm.tcti());
    CHECK(store->counter_kind() == hsm::CounterKind::kTpmNv);
    CHECK(store->signing_keys().size() == 1);
    CHECK(store->health().reachable);
    CHECK(store->health().errors == 0);
  }
  CHECK(fx.transient_handles() == 0);  // the store flushed the primary and its key
  struct stat st {};
  REQUIRE(::stat((fx.dir / "keys").c_str(), &st) == 0);
  CHECK((st.st_mode & 0777) == 0700);
  for (const auto& entry : std::filesystem::directory_iterator(fx.dir / "keys")) {
    REQUIRE(::stat(entry.path().c_str(), &st) == 0);
    INFO(entry.path());
    CHECK((st.st_mode & 0777) == 0600);
    CHECK(entry.path().extension() != ".tmp");
  }
  CHECK(std::filesystem::exists(fx.dir / "keys" / ("signing-" + to_hex(genesis) + ".pub")));

  auto again = fx.open(fx.config());
  CHECK(again->signing_key().id() == genesis);
  // kCreateIfMissing on a complete directory creates nothing new.
  again.reset();
  auto third = fx.open(fx.config(), KeyPolicy::kCreateIfMissing);
  CHECK(third->signing_key().id() == genesis);
  CHECK(third->signing_keys().size() == 1);
}

TEST_CASE("tpm2: signatures verify with the exported public key; a changed digest does not",
          "[tpm2]") {
  Fixture fx;
  auto store = fx.create();
  const Hash digest = digest_of("signed head #1");
  Result<Bytes> sig = store->sign_digest(digest);
  INFO(sig.status().to_string());
  REQUIRE(sig.ok());
  const PublicKey key = store->signing_key();
  CHECK(key.verify_digest(digest, *sig).ok());
  Hash flipped = digest;
  flipped[0] ^= std::byte{1};
  CHECK(key.verify_digest(flipped, *sig).code() == StatusCode::kVerificationFailed);
  // The SPKI parses back to the same key id.
  Result<PublicKey> reparsed = PublicKey::from_spki_der(key.spki_der());
  REQUIRE(reparsed.ok());
  CHECK(reparsed->id() == key.id());
}

TEST_CASE("tpm2: 200 signatures and 60 random reads in a row leak no handle", "[tpm2]") {
  Fixture fx;
  auto store = fx.create();
  auto second = store->create_signing_key();
  REQUIRE(second.ok());
  const PublicKey key = store->signing_key();
  for (int i = 0; i < 200; ++i) {
    const Hash digest = digest_of("entry " + std::to_string(i));
    Result<Bytes> sig = store->sign_digest(digest);
    INFO(i << ": " << sig.status().to_string());
    REQUIRE(sig.ok());
    if (i % 20 == 0) {
      CHECK(key.verify_digest(digest, *sig).ok());
      // A key that is not the active one is loaded and flushed around each use.
      Result<Bytes> other = store->sign_digest_with(second->id(), digest);
      INFO(other.status().to_string());
      REQUIRE(other.ok());
      CHECK(second->verify_digest(digest, *other).ok());
    }
  }
  for (int i = 0; i < 60; ++i) REQUIRE(store->random(48).ok());
  CHECK(store->health().errors == 0);
  CHECK(fx.transient_handles() == 2);  // the primary and the active key, nothing else
  store.reset();
  CHECK(fx.transient_handles() == 0);
}

TEST_CASE("tpm2: rotation keeps every key, oldest first, and signs with old and new", "[tpm2]") {
  Fixture fx;
  auto store = fx.create();
  const PublicKey genesis = store->signing_key();
  Result<PublicKey> next = store->create_signing_key();
  INFO(next.status().to_string());
  REQUIRE(next.ok());
  CHECK(next->id() != genesis.id());
  CHECK(store->signing_key() == genesis);  // not active until used
  const std::vector<PublicKey> keys = store->signing_keys();
  REQUIRE(keys.size() == 2);
  CHECK(keys[0] == genesis);
  CHECK(keys[1] == *next);

  REQUIRE(store->use_signing_key(next->id()).ok());
  CHECK(store->signing_key() == *next);
  const Hash digest = digest_of("key transition");
  Result<Bytes> by_new = store->sign_digest(digest);
  REQUIRE(by_new.ok());
  CHECK(next->verify_digest(digest, *by_new).ok());
  CHECK(genesis.verify_digest(digest, *by_new).code() == StatusCode::kVerificationFailed);
  Result<Bytes> by_old = store->sign_digest_with(genesis.id(), digest);
  REQUIRE(by_old.ok());
  CHECK(genesis.verify_digest(digest, *by_old).ok());
  Result<Bytes> by_new_explicit = store->sign_digest_with(next->id(), digest);
  REQUIRE(by_new_explicit.ok());
  CHECK(next->verify_digest(digest, *by_new_explicit).ok());

  KeyId unknown = digest_of("no such key");
  CHECK(store->use_signing_key(unknown).code() == StatusCode::kNotFound);
  CHECK(store->sign_digest_with(unknown, digest).status().code() == StatusCode::kNotFound);
  CHECK(store->signing_key() == *next);  // a refused switch changes nothing

  // A third key, then reopen: the order survives and the genesis key is active again.
  Result<PublicKey> third = store->create_signing_key();
  REQUIRE(third.ok());
  store.reset();
  auto reopened = fx.open(fx.config());
  const std::vector<PublicKey> after = reopened->signing_keys();
  REQUIRE(after.size() == 3);
  CHECK(after[0] == genesis);
  CHECK(after[1] == *next);
  CHECK(after[2] == *third);
  CHECK(reopened->signing_key() == genesis);
  REQUIRE(reopened->use_signing_key(third->id()).ok());
  Result<Bytes> sig = reopened->sign_digest(digest);
  REQUIRE(sig.ok());
  CHECK(third->verify_digest(digest, *sig).ok());
}

TEST_CASE("tpm2: data keys wrap and unwrap under the sealed secret", "[tpm2]") {
  Fixture fx;
  auto store = fx.create();
  Result<Bytes> data_key = store->random(32);
  REQUIRE(data_key.ok());
  const Bytes context = to_bytes("patient 42 / key 1");
  Result<Bytes> wrapped = store->wrap_key(*data_key, context);
  INFO(wrapped.status().to_string());
  REQUIRE(wrapped.ok());
  REQUIRE(wrapped->size() == 1 + 12 + 32 + 16);
  CHECK((*wrapped)[0] == std::byte{0x01});
  CHECK(std::search(wrapped->begin(), wrapped->end(), data_key->begin(), data_key->end()) ==
        wrapped->end());  // no plaintext in the blob

  Result<SecretBytes> unwrapped = store->unwrap_key(*wrapped, context);
  REQUIRE(unwrapped.ok());
  CHECK(Bytes(unwrapped->view().begin(), unwrapped->view().end()) == *data_key);

  // Two wraps of the same key differ (random IV) and both unwrap.
  Result<Bytes> again = store->wrap_key(*data_key, context);
  REQUIRE(again.ok());
  CHECK(*again != *wrapped);

  CHECK(store->unwrap_key(*wrapped, to_bytes("patient 43 / key 1")).status().code() ==
        StatusCode::kVerificationFailed);
  for (std::size_t at : {std::size_t{5}, std::size_t{20}, wrapped->size() - 1}) {
    Bytes altered = *wrapped;
    altered[at] ^= std::byte{0x01};
    INFO("byte " << at);
    CHECK(store->unwrap_key(altered, context).status().code() == StatusCode::kVerificationFailed);
  }
  Bytes other_version = *wrapped;
  other_version[0] = std::byte{0x02};
  CHECK(store->unwrap_key(other_version, context).status().code() == StatusCode::kInvalidArgument);
  CHECK(store->unwrap_key(ByteView(*wrapped).first(20), context).status().code() ==
        StatusCode::kInvalidArgument);
  CHECK(store->wrap_key(Bytes(65), context).status().code() == StatusCode::kInvalidArgument);
  CHECK(store->wrap_key(Bytes(), context).status().code() == StatusCode::kInvalidArgument);

  // The KEK comes back from the TPM after a reopen: the old blob still unwraps.
  store.reset();
  auto reopened = fx.open(fx.config());
  Result<SecretBytes> later = reopened->unwrap_key(*wrapped, context);
  INFO(later.status().to_string());
  REQUIRE(later.ok());
  CHECK(Bytes(later->view().begin(), later->view().end()) == *data_key);
}

TEST_CASE("tpm2: keyed pseudonyms are deterministic, per message, and survive a reopen", "[tpm2]") {
  Fixture fx;
  auto store = fx.create();
  Result<Hash> a1 = store->keyed_hash(as_bytes("MRN-0001"));
  Result<Hash> a2 = store->keyed_hash(as_bytes("MRN-0001"));
  Result<Hash> b = store->keyed_hash(as_bytes("MRN-0002"));
  REQUIRE(a1.ok());
  REQUIRE(a2.ok());
  REQUIRE(b.ok());
  CHECK(*a1 == *a2);
  CHECK(*a1 != *b);
  CHECK(*a1 != sha256(as_bytes("MRN-0001")));  // keyed, not a plain hash
  store.reset();
  auto reopened = fx.open(fx.config());
  Result<Hash> a3 = reopened->keyed_hash(as_bytes("MRN-0001"));
  REQUIRE(a3.ok());
  CHECK(*a3 == *a1);

  // Another TPM (another sealed secret) gives other pseudonyms.
  Fixture other;
  auto foreign = other.create();
  Result<Hash> f = foreign->keyed_hash(as_bytes("MRN-0001"));
  REQUIRE(f.ok());
  CHECK(*f != *a1);
}

TEST_CASE("tpm2: the NV counter starts at 1 and only goes up", "[tpm2]") {
  Fixture fx;
  auto store = fx.create();
  Result<std::uint64_t> first = store->read_counter();
  INFO(first.status().to_string());
  REQUIRE(first.ok());
  CHECK(*first == 1);
  Result<std::uint64_t> second = store->increment_counter();
  REQUIRE(second.ok());
  CHECK(*second == 2);
  CHECK(*store->read_counter() == 2);
  store.reset();
  auto reopened = fx.open(fx.config(), KeyPolicy::kCreateIfMissing);  // no second increment
  CHECK(*reopened->read_counter() == 2);
  CHECK(*reopened->increment_counter() == 3);
  // It lives in the TPM, not in the files: a restored key_dir does not roll it back.
  reopened.reset();
  fx.tpm.restart();
  CHECK(*fx.open(fx.config())->read_counter() == 3);
}

TEST_CASE("tpm2: an NV index that is not our counter is refused by name", "[tpm2]") {
  Fixture fx;
  KeyStoreConfig c = fx.config();
  c.counter_nv_index = 0x01500001;
  fx.tpm.tool({"tpm2_nvdefine", "0x01500001", "-C", "o", "-s", "8", "-a", "ownerread|ownerwrite"});
  Result<std::unique_ptr<KeyStore>> store = hsm::open_key_store(c, KeyPolicy::kCreateIfMissing);
  REQUIRE_FALSE(store.ok());
  CHECK(store.status().code() == StatusCode::kFailedPrecondition);
  CHECK_THAT(store.status().message(),
             Catch::Contains("0x01500001") && Catch::Contains("not a medgate rollback counter"));
  CHECK(fx.transient_handles() == 0);  // the failed open flushed what it had loaded

  // kUseExisting without the counter: not found, naming the index.
  KeyStoreConfig fresh = fx.config();
  fresh.counter_nv_index = 0x01500002;
  fresh.key_dir = fx.dir / "keys2";
  fx.open(fresh, KeyPolicy::kCreateIfMissing).reset();
  fresh.counter_nv_index = 0x01500003;
  Result<std::unique_ptr<KeyStore>> missing = hsm::open_key_store(fresh);
  REQUIRE_FALSE(missing.ok());
  CHECK(missing.status().code() == StatusCode::kNotFound);
  CHECK_THAT(missing.status().message(), Catch::Contains("0x01500003"));
}

TEST_CASE("tpm2: a secret sealed to PCR 7 is refused after PCR 7 changes", "[tpm2]") {
  Fixture fx;
  KeyStoreConfig sealed = fx.config();
  sealed.seal_pcrs = {7};
  KeyStoreConfig plain = fx.config();
  plain.key_dir = fx.dir / "plain-keys";
  Hash pseudonym{};
  {
    auto store = fx.open(sealed, KeyPolicy::kCreateIfMissing);
    pseudonym = *store->keyed_hash(as_bytes("x"));
  }
  // One store at a time: swtpm has three object slots and each open store holds two.
  fx.open(plain, KeyPolicy::kCreateIfMissing).reset();
  {
    auto store = fx.open(sealed);  // unchanged PCRs: unseals
    CHECK(*store->keyed_hash(as_bytes("x")) == pseudonym);
  }
  fx.tpm.extend_pcr(7, kPcr7Event);
  Result<std::unique_ptr<KeyStore>> refused = hsm::open_key_store(sealed);
  REQUIRE_FALSE(refused.ok());
  CHECK(refused.status().code() == StatusCode::kFailedPrecondition);
  CHECK_THAT(refused.status().message(),
             Catch::Contains("PCR 7 no longer matches") && Catch::Contains("TPM_RC_POLICY_FAIL"));
  CHECK(fx.transient_handles() == 0);  // nothing left behind by the refusal (sessions included)
  CHECK(fx.tpm.tool({"tpm2_getcap", "handles-loaded-session"}).find("0x") == std::string::npos);
  // A secret sealed without PCRs does not care.
  CHECK(hsm::open_key_store(plain).ok());
}

TEST_CASE("tpm2: an unreachable TPM is kUnavailable naming the TCTI", "[tpm2]") {
  Fixture fx;
  fx.create().reset();
  fx.tpm.stop();
  Result<std::unique_ptr<KeyStore>> store = hsm::open_key_store(fx.config());
  REQUIRE_FALSE(store.ok());
  CHECK(store.status().code() == StatusCode::kUnavailable);
  CHECK_THAT(store.status().message(), Catch::Contains(fx.tpm.tcti()));

  KeyStoreConfig device = fx.config();
  device.uri = "tpm2:device:/nonexistent/tpmrm9";
  Result<std::unique_ptr<KeyStore>> no_device = hsm::open_key_store(device);
  REQUIRE_FALSE(no_device.ok());
  CHECK(no_device.status().code() == StatusCode::kUnavailable);
  CHECK_THAT(no_device.status().message(), Catch::Contains("device:/nonexistent/tpmrm9"));
}

TEST_CASE("tpm2: a TPM that goes away and comes back is reconnected on the next call", "[tpm2]") {
  Fixture fx;
  auto store = fx.create();
  const Hash digest = digest_of("before");
  REQUIRE(store->sign_digest(digest).ok());

  SECTION("restarted between two calls") {
    fx.tpm.restart();
    Result<Bytes> sig = store->sign_digest(digest);
    INFO(sig.status().to_string());
    REQUIRE(sig.ok());
    CHECK(store->signing_key().verify_digest(digest, *sig).ok());
    hsm::KeyStoreHealth h = store->health();
    CHECK(h.reconnects == 1);
    CHECK(h.reachable);
    CHECK(h.errors >= 1);
    CHECK_FALSE(h.last_error.empty());
    CHECK(*store->read_counter() == 1);
    CHECK(store->random(16).ok());
    CHECK(store->health().reconnects == 1);
  }
  SECTION("down for a while: kUnavailable until it is back") {
    fx.tpm.stop();
    Result<Bytes> sig = store->sign_digest(digest);
    REQUIRE_FALSE(sig.ok());
    CHECK(sig.status().code() == StatusCode::kUnavailable);
    CHECK_THAT(sig.status().message(), Catch::Contains(fx.tpm.tcti()));
    CHECK_FALSE(store->health().reachable);
    CHECK(store->increment_counter().status().code() == StatusCode::kUnavailable);
    // Wrapping runs in process memory: it keeps working while the TPM is away.
    CHECK(store->wrap_key(Bytes(32), as_bytes("ctx")).ok());
    fx.tpm.restart();
    Result<Bytes> later = store->sign_digest(digest);
    INFO(later.status().to_string());
    REQUIRE(later.ok());
    CHECK(store->health().reachable);
    CHECK(store->health().reconnects == 1);
    CHECK(store->health().errors >= 2);
  }
  store.reset();
  CHECK(fx.transient_handles() == 0);
}

TEST_CASE("tpm2: a full TPM (TPM_RC_OBJECT_MEMORY) frees the active key and runs once more",
          "[tpm2]") {
  Fixture fx;
  auto store = fx.create();
  Result<PublicKey> second = store->create_signing_key();
  REQUIRE(second.ok());
  // Someone else's object takes the third and last slot (tpm2-tools leaves it loaded).
  fx.tpm.tool({"tpm2_createprimary", "-C", "o", "-c", (fx.dir / "other.ctx").string()});
  REQUIRE(fx.transient_handles() == 3);

  const Hash digest = digest_of("full");
  Result<Bytes> sig = store->sign_digest_with(second->id(), digest);
  INFO(sig.status().to_string());
  REQUIRE(sig.ok());
  CHECK(second->verify_digest(digest, *sig).ok());
  CHECK(store->health().errors == 1);
  CHECK_THAT(store->health().last_error, Catch::Contains("TPM_RC_OBJECT_MEMORY (0x902)"));
  Result<Bytes> active = store->sign_digest(digest);  // reloads the active key
  REQUIRE(active.ok());
  CHECK(fx.transient_handles() == 3);

  // Nothing to free for a second store: a clear kUnavailable, and nothing of it stays loaded.
  Result<std::unique_ptr<KeyStore>> another = hsm::open_key_store(fx.config());
  REQUIRE_FALSE(another.ok());
  CHECK(another.status().code() == StatusCode::kUnavailable);
  CHECK_THAT(another.status().message(), Catch::Contains("TPM_RC_OBJECT_MEMORY"));
  CHECK(fx.transient_handles() == 3);
}

TEST_CASE("tpm2: dictionary-attack lockout is a clear kUnavailable naming TPM_RC_LOCKOUT",
          "[tpm2]") {
  Fixture fx;
  auto store = fx.create();
  // One wrong password on a DA-protected NV index locks the TPM out.
  fx.tpm.tool({"tpm2_dictionarylockout", "-s", "-n", "1", "-t", "600", "-l", "600"});
  fx.tpm.tool({"tpm2_nvdefine", "0x01500020", "-C", "o", "-s", "8", "-a", "authread|authwrite",
               "-p", "secret"});
  CHECK_THROWS(fx.tpm.tool({"tpm2_nvread", "0x01500020", "-C", "0x01500020", "-P", "wrong"}));

  const Hash digest = digest_of("locked");
  Result<Bytes> sig = store->sign_digest(digest);
  REQUIRE_FALSE(sig.ok());
  CHECK(sig.status().code() == StatusCode::kUnavailable);
  CHECK_THAT(sig.status().message(),
             Catch::Contains("TPM_RC_LOCKOUT (0x921)") && Catch::Contains(fx.tpm.tcti()));
  const hsm::KeyStoreHealth h = store->health();
  CHECK(h.errors == 1);
  CHECK_THAT(h.last_error, Catch::Contains("TPM_RC_LOCKOUT"));
  CHECK(h.reconnects == 0);
  // The counter has no DA protection; the in-memory keys need no TPM.
  CHECK(store->increment_counter().ok());
  CHECK(store->keyed_hash(as_bytes("x")).ok());

  fx.tpm.tool({"tpm2_dictionarylockout", "-c"});
  Result<Bytes> after = store->sign_digest(digest);
  INFO(after.status().to_string());
  REQUIRE(after.ok());
  CHECK(store->signing_key().verify_digest(digest, *after).ok());
}

TEST_CASE("tpm2: configuration and key directory errors are clear", "[tpm2]") {
  Fixture fx;
  KeyStoreConfig c = fx.config();
  Result<std::unique_ptr<KeyStore>> missing_dir = hsm::open_key_store(c);
  REQUIRE_FALSE(missing_dir.ok());
  CHECK(missing_dir.status().code() == StatusCode::kNotFound);
  CHECK_THAT(missing_dir.status().message(), Catch::Contains(c.key_dir.string()));

  c.key_dir.clear();
  Result<std::unique_ptr<KeyStore>> no_dir = hsm::open_key_store(c, KeyPolicy::kCreateIfMissing);
  REQUIRE_FALSE(no_dir.ok());
  CHECK(no_dir.status().code() == StatusCode::kInvalidArgument);
  CHECK_THAT(no_dir.status().message(), Catch::Contains("key_dir"));

  c = fx.config();
  c.seal_pcrs = {24};
  CHECK(hsm::open_key_store(c, KeyPolicy::kCreateIfMissing).status().code() ==
        StatusCode::kInvalidArgument);
  c = fx.config();
  c.uri = "tpm2x:foo";
  CHECK(hsm::open_key_store(c).status().code() == StatusCode::kInvalidArgument);

  // An empty directory with kUseExisting: no key, named.
  std::filesystem::create_directories(fx.config().key_dir);
  Result<std::unique_ptr<KeyStore>> empty = hsm::open_key_store(fx.config());
  REQUIRE_FALSE(empty.ok());
  CHECK(empty.status().code() == StatusCode::kNotFound);
  CHECK_THAT(empty.status().message(), Catch::Contains("signing-keys"));
}

TEST_CASE("tpm2: damaged files in key_dir are reported, not crashed on", "[tpm2]") {
  Fixture fx;
  KeyId id{};
  {
    auto store = fx.create();
    id = store->signing_key().id();
  }
  const std::filesystem::path keys = fx.dir / "keys";
  const std::filesystem::path pub = keys / ("signing-" + to_hex(id) + ".pub");
  const std::filesystem::path priv = keys / ("signing-" + to_hex(id) + ".priv");
  auto copy = [&](const std::filesystem::path& from, const std::filesystem::path& to) {
    std::filesystem::copy_file(from, to, std::filesystem::copy_options::overwrite_existing);
  };
  auto expect_refused = [&](const std::string& what, const std::string& names) {
    Result<std::unique_ptr<KeyStore>> store = hsm::open_key_store(fx.config());
    INFO(what << ": " << store.status().to_string());
    REQUIRE_FALSE(store.ok());
    CHECK(store.status().code() == StatusCode::kCorruption);
    CHECK_THAT(store.status().message(), Catch::Contains(names));
    CHECK(fx.transient_handles() == 0);
  };

  SECTION("the private blob's ciphertext altered") {
    copy(priv, fx.dir / "saved");
    flip_byte(priv, 10);
    expect_refused("altered private blob", priv.string());
    copy(fx.dir / "saved", priv);
    CHECK(hsm::open_key_store(fx.config()).ok());
  }
  SECTION("the public blob truncated") {
    std::filesystem::resize_file(pub, 20);
    expect_refused("truncated public blob", pub.string());
  }
  SECTION("the public blob of another key") {
    auto store = fx.open(fx.config());
    Result<PublicKey> other = store->create_signing_key();
    REQUIRE(other.ok());
    store.reset();
    copy(keys / ("signing-" + to_hex(other->id()) + ".pub"), pub);
    expect_refused("swapped public blob", pub.string());
  }
  SECTION("the key list") {
    std::ofstream(keys / "signing-keys") << "not a key id\n";
    expect_refused("garbage key list", "signing-keys:1");
  }
  SECTION("the sealed secret") {
    flip_byte(keys / "data-key-secret.priv", 10);
    expect_refused("altered sealed secret", "data-key-secret.priv");
  }
  SECTION("a blob file that is far too large") {
    std::ofstream(pub, std::ios::app) << std::string(10000, 'x');
    expect_refused("huge blob", pub.string());
  }
}

TEST_CASE("tpm2: the key-agreement key is made on first use, private, ECDH-only, kept on reopen",
          "[tpm2]") {
  Fixture fx;
  const std::filesystem::path keys = fx.dir / "keys";
  PublicKey agreement = [&] {
    auto store = fx.create();
    CHECK_FALSE(std::filesystem::exists(keys / "agreement-key.pub"));  // not before it is asked
    Result<PublicKey> made = store->agreement_key();
    INFO(made.status().to_string());
    REQUIRE(made.ok());
    CHECK(made->id() != store->signing_key().id());
    CHECK(store->agreement_key().value() == *made);  // found again, not a second key
    const std::vector<PublicKey> signing = store->signing_keys();
    CHECK(std::find(signing.begin(), signing.end(), *made) == signing.end());
    CHECK(fx.transient_handles() == 2);  // the primary and the active signing key only
    CHECK(store->health().errors == 0);
    return *made;
  }();
  CHECK(fx.transient_handles() == 0);

  for (const char* name : {"agreement-key.pub", "agreement-key.priv"}) {
    struct stat st {};
    INFO(name);
    REQUIRE(::stat((keys / name).c_str(), &st) == 0);
    CHECK((st.st_mode & 0777) == 0600);
  }
  for (const auto& entry : std::filesystem::directory_iterator(keys))
    CHECK(entry.path().extension() != ".tmp");
  // What the TPM was told the key may do: decrypt (ECDH), never sign, not a storage parent.
  const std::string area =
      fx.tpm.tool({"tpm2_print", "-t", "TPM2B_PUBLIC", (keys / "agreement-key.pub").string()});
  INFO(area);
  CHECK_THAT(area, Catch::Contains("decrypt") && Catch::Contains("fixedtpm") &&
                       Catch::Contains("fixedparent") && Catch::Contains("sensitivedataorigin") &&
                       Catch::Contains("userwithauth"));
  CHECK_THAT(area, !Catch::Contains("sign") && !Catch::Contains("restricted"));
  CHECK_THAT(area, Catch::Contains("ecdh"));

  auto reopened = fx.open(fx.config());
  Result<PublicKey> again = reopened->agreement_key();
  REQUIRE(again.ok());
  CHECK(*again == agreement);
  CHECK(reopened->signing_keys().size() == 1);

  SECTION("agree() alone makes the key too") {
    Fixture other;
    auto store = other.create();
    PkeyPtr peer = openssl_p256();
    Result<SecretBytes> z = store->agree(public_half(peer.get()));
    INFO(z.status().to_string());
    REQUIRE(z.ok());
    CHECK(std::filesystem::exists(other.dir / "keys" / "agreement-key.pub"));
    Result<PublicKey> made = store->agreement_key();
    REQUIRE(made.ok());
    CHECK(bytes_of(*z) == openssl_ecdh(peer.get(), *made));
  }
}

TEST_CASE("tpm2: ECDH_ZGen agrees with OpenSSL's ECDH, 32 bytes, across a TPM restart", "[tpm2]") {
  Fixture fx;
  auto store = fx.create();
  Result<PublicKey> mine = store->agreement_key();
  REQUIRE(mine.ok());
  for (int i = 0; i < 8; ++i) {
    PkeyPtr peer = openssl_p256();
    Result<SecretBytes> z = store->agree(public_half(peer.get()));
    INFO(i << ": " << z.status().to_string());
    REQUIRE(z.ok());
    CHECK(z->size() == 32);
    CHECK(bytes_of(*z) == openssl_ecdh(peer.get(), *mine));
  }

  // A Z whose first byte is zero (one peer in 256): still 32 bytes, the same as OpenSSL's.
  PkeyPtr short_x(nullptr, EVP_PKEY_free);
  Bytes expected;
  for (int tries = 0; tries < 20000 && !short_x; ++tries) {
    PkeyPtr candidate = openssl_p256();
    Bytes z = openssl_ecdh(candidate.get(), *mine);
    if (z.size() == 32 && z[0] == std::byte{0}) {
      short_x = std::move(candidate);
      expected = z;
    }
  }
  REQUIRE(short_x);
  Result<SecretBytes> padded = store->agree(public_half(short_x.get()));
  REQUIRE(padded.ok());
  CHECK(bytes_of(*padded) == expected);

  CHECK(store->health().errors == 0);
  CHECK(fx.transient_handles() == 2);  // the agreement key was flushed after every use

  // swtpm restarted (transient objects gone): the store reconnects and loads the key again.
  fx.tpm.restart();
  PkeyPtr peer = openssl_p256();
  Result<SecretBytes> after = store->agree(public_half(peer.get()));
  INFO(after.status().to_string());
  REQUIRE(after.ok());
  CHECK(bytes_of(*after) == openssl_ecdh(peer.get(), *mine));
  CHECK(store->health().reconnects == 1);
  store.reset();
  CHECK(fx.transient_handles() == 0);
}

TEST_CASE("tpm2: a peer point the TPM refuses is kInvalidArgument naming the peer", "[tpm2]") {
  Fixture fx;
  auto store = fx.create();
  auto* tpm = dynamic_cast<hsm::tpm2::Tpm2KeyStore*>(store.get());
  REQUIRE(tpm != nullptr);
  Result<PublicKey> mine = store->agreement_key();
  REQUIRE(mine.ok());

  // (1, 1) is not on P-256: OpenSSL would not parse it, the TPM must not multiply it.
  Bytes off_curve(65);
  off_curve[0] = std::byte{0x04};
  off_curve[32] = std::byte{0x01};
  off_curve[64] = std::byte{0x01};
  Result<SecretBytes> refused = tpm->agree_with_point(off_curve, "peer key 0123abcd");
  REQUIRE_FALSE(refused.ok());
  CHECK(refused.status().code() == StatusCode::kInvalidArgument);
  CHECK_THAT(refused.status().message(),
             Catch::Contains("peer key 0123abcd") && Catch::Contains("TPM_RC_ECC_POINT"));

  // x and y at 2^256 - 1, above the field prime.
  Bytes too_large(65, std::byte{0xff});
  too_large[0] = std::byte{0x04};
  Result<SecretBytes> large = tpm->agree_with_point(too_large, "peer key ffff");
  INFO(large.status().to_string());
  CHECK(large.status().code() == StatusCode::kInvalidArgument);
  CHECK_THAT(large.status().message(), Catch::Contains("peer key ffff"));

  // Not an uncompressed point at all: refused before the TPM is asked.
  Bytes compressed(off_curve.begin(), off_curve.begin() + 33);
  compressed[0] = std::byte{0x02};
  Result<SecretBytes> wrong_form = tpm->agree_with_point(compressed, "peer key 02");
  CHECK(wrong_form.status().code() == StatusCode::kInvalidArgument);
  CHECK_THAT(wrong_form.status().message(), Catch::Contains("peer key 02"));
  Bytes bad_prefix = off_curve;
  bad_prefix[0] = std::byte{0x05};
  CHECK(tpm->agree_with_point(bad_prefix, "peer").status().code() == StatusCode::kInvalidArgument);

  // A bad peer is not a device fault: nothing counted, nothing leaked, and agreement still works.
  CHECK(store->health().errors == 0);
  CHECK(store->health().reconnects == 0);
  CHECK(fx.transient_handles() == 2);
  PkeyPtr peer = openssl_p256();
  Result<SecretBytes> z = store->agree(public_half(peer.get()));
  REQUIRE(z.ok());
  CHECK(bytes_of(*z) == openssl_ecdh(peer.get(), *mine));
}

TEST_CASE("tpm2: key agreement on a full TPM (TPM_RC_OBJECT_MEMORY) frees the active key",
          "[tpm2]") {
  Fixture fx;
  auto store = fx.create();
  Result<PublicKey> mine = store->agreement_key();
  REQUIRE(mine.ok());
  REQUIRE(store->sign_digest(digest_of("load the active key")).ok());
  fx.tpm.tool({"tpm2_createprimary", "-C", "o", "-c", (fx.dir / "other.ctx").string()});
  REQUIRE(fx.transient_handles() == 3);

  PkeyPtr peer = openssl_p256();
  Result<SecretBytes> z = store->agree(public_half(peer.get()));
  INFO(z.status().to_string());
  REQUIRE(z.ok());
  CHECK(bytes_of(*z) == openssl_ecdh(peer.get(), *mine));
  CHECK(store->health().errors == 1);
  CHECK_THAT(store->health().last_error, Catch::Contains("TPM_RC_OBJECT_MEMORY (0x902)"));
  CHECK(fx.transient_handles() == 2);  // the primary and the other client's object
}

TEST_CASE("tpm2: damaged key-agreement files are reported, not crashed on", "[tpm2]") {
  Fixture fx;
  PublicKey agreement = [&] {
    auto store = fx.create();
    Result<PublicKey> made = store->agreement_key();
    REQUIRE(made.ok());
    return *made;
  }();
  const std::filesystem::path keys = fx.dir / "keys";
  const std::filesystem::path pub = keys / "agreement-key.pub";
  const std::filesystem::path priv = keys / "agreement-key.priv";
  std::filesystem::copy_file(pub, fx.dir / "saved.pub");
  std::filesystem::copy_file(priv, fx.dir / "saved.priv");
  auto expect_refused = [&](const std::string& what, const std::string& names) {
    Result<std::unique_ptr<KeyStore>> store = hsm::open_key_store(fx.config());
    INFO(what << ": " << store.status().to_string());
    REQUIRE_FALSE(store.ok());
    CHECK(store.status().code() == StatusCode::kCorruption);
    CHECK_THAT(store.status().message(), Catch::Contains(names));
    CHECK(fx.transient_handles() == 0);
  };
  auto restore_and_reopen = [&] {
    std::filesystem::copy_file(fx.dir / "saved.pub", pub,
                               std::filesystem::copy_options::overwrite_existing);
    std::filesystem::copy_file(fx.dir / "saved.priv", priv,
                               std::filesystem::copy_options::overwrite_existing);
    auto store = fx.open(fx.config());
    CHECK(store->agreement_key().value() == agreement);
  };

  SECTION("the private blob's ciphertext altered") {
    flip_byte(priv, 10);
    expect_refused("altered private blob", priv.string());
    restore_and_reopen();
  }
  SECTION("the public blob truncated") {
    std::filesystem::resize_file(pub, 20);
    expect_refused("truncated public blob", pub.string());
    restore_and_reopen();
  }
  SECTION("a signing key's public blob in its place") {
    auto store = fx.open(fx.config());
    const KeyId signing = store->signing_key().id();
    store.reset();
    std::filesystem::copy_file(keys / ("signing-" + to_hex(signing) + ".pub"), pub,
                               std::filesystem::copy_options::overwrite_existing);
    expect_refused("signing key's public blob", pub.string() + " is not an ECDH-only");
    restore_and_reopen();
  }
  SECTION("the private blob missing") {
    std::filesystem::remove(priv);
    expect_refused("missing private blob", priv.string());
    restore_and_reopen();
  }
  SECTION("a blob file that is far too large") {
    std::ofstream(priv, std::ios::app) << std::string(10000, 'x');
    expect_refused("huge blob", priv.string());
    restore_and_reopen();
  }
  SECTION("a private blob left without its public half (a crash while it was made)") {
    std::filesystem::remove(pub);
    auto store = fx.open(fx.config());
    Result<PublicKey> made = store->agreement_key();
    REQUIRE(made.ok());
    CHECK(*made != agreement);  // a new key; nothing could have been sealed to a half-written one
    store.reset();
    CHECK(fx.open(fx.config())->agreement_key().value() == *made);
  }
}

// ECDSA over `data` with an EVP_PKEY (digest `md`), as libssl signs a handshake.
Bytes evp_sign(EVP_PKEY* key, const EVP_MD* md, const std::string& data) {
  std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> ctx(EVP_MD_CTX_new(), EVP_MD_CTX_free);
  REQUIRE(ctx);
  REQUIRE(EVP_DigestSignInit(ctx.get(), nullptr, md, nullptr, key) == 1);
  std::size_t n = 0;
  REQUIRE(EVP_DigestSign(ctx.get(), nullptr, &n, u8(as_bytes(data)), data.size()) == 1);
  Bytes sig(n);
  REQUIRE(EVP_DigestSign(ctx.get(), u8(std::span<std::byte>(sig)), &n, u8(as_bytes(data)),
                         data.size()) == 1);
  sig.resize(n);
  return sig;
}

bool evp_verify(const PublicKey& key, const EVP_MD* md, const std::string& data, const Bytes& sig) {
  const unsigned char* p = u8(ByteView(key.spki_der()));
  PkeyPtr pub(d2i_PUBKEY(nullptr, &p, static_cast<long>(key.spki_der().size())), EVP_PKEY_free);
  REQUIRE(pub);
  std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> ctx(EVP_MD_CTX_new(), EVP_MD_CTX_free);
  REQUIRE(EVP_DigestVerifyInit(ctx.get(), nullptr, md, nullptr, pub.get()) == 1);
  return EVP_DigestVerify(ctx.get(), u8(ByteView(sig)), sig.size(), u8(as_bytes(data)),
                          data.size()) == 1;
}

TEST_CASE("tpm2: the TLS key lives in the TPM, apart from the signing keys, and signs for OpenSSL",
          "[tpm2]") {
  Fixture fx;
  auto store = fx.create();
  const KeyStoreConfig config = fx.config();

  Result<hsm::TlsKeyInfo> none = hsm::prepare_tls_key(config, *store, /*create=*/false);
  CHECK(none.status().code() == StatusCode::kNotFound);
  CHECK_THAT(none.status().message(), Catch::Contains("medgated tls-key"));
  CHECK(hsm::open_tls_private_key(config, *store).status().code() == StatusCode::kNotFound);
  // Without the open store there is no way to the TPM's key.
  CHECK(hsm::open_tls_private_key(config).status().code() == StatusCode::kFailedPrecondition);

  Result<hsm::TlsKeyInfo> made = hsm::prepare_tls_key(config, *store, /*create=*/true);
  INFO(made.status().to_string());
  REQUIRE(made.ok());
  CHECK(made->created);
  CHECK_THAT(made->location, Catch::Contains("tls-key.pub"));
  const PublicKey tls = made->public_key;
  CHECK(tls.id() != store->signing_key().id());
  // Never a head-signing key: not listed, not usable, not signable through the KeyStore.
  CHECK(store->signing_keys().size() == 1);
  CHECK(store->use_signing_key(tls.id()).code() == StatusCode::kNotFound);
  CHECK(store->sign_digest_with(tls.id(), digest_of("head")).status().code() ==
        StatusCode::kNotFound);
  Result<hsm::TlsKeyInfo> again = hsm::prepare_tls_key(config, *store, /*create=*/true);
  REQUIRE(again.ok());
  CHECK_FALSE(again->created);
  CHECK(again->public_key == tls);

  Result<hsm::TlsPrivateKey> key = hsm::open_tls_private_key(config, *store);
  INFO(key.status().to_string());
  REQUIRE(key.ok());
  // SHA-256 as TLS 1.3 uses with P-256; SHA-384 and SHA-1 as a TLS 1.2 peer may ask (the digest
  // is cut or padded to 256 bits the way ECDSA itself does it).
  for (const EVP_MD* md : {EVP_sha256(), EVP_sha384(), EVP_sha1()}) {
    INFO(EVP_MD_get0_name(md));
    const Bytes sig = evp_sign(key->get(), md, "a TLS handshake transcript");
    CHECK(evp_verify(tls, md, "a TLS handshake transcript", sig));
    CHECK_FALSE(evp_verify(tls, md, "another transcript", sig));
  }
  CHECK(store->health().errors == 0);
  CHECK(fx.transient_handles() == 2);  // loaded and flushed around every signature

  struct stat st {};
  for (const char* name : {"tls-key.pub", "tls-key.priv"}) {
    INFO(name);
    REQUIRE(::stat((fx.dir / "keys" / name).c_str(), &st) == 0);
    CHECK((st.st_mode & 0777) == 0600);
  }

  // Found again after a reopen; a damaged blob is reported at open, naming the file.
  key = Status::Internal("released");
  store.reset();
  {
    auto reopened = fx.open(config);
    Result<hsm::TlsKeyInfo> found = hsm::prepare_tls_key(config, *reopened, /*create=*/false);
    REQUIRE(found.ok());
    CHECK(found->public_key == tls);
    CHECK(reopened->signing_keys().size() == 1);
  }
  flip_byte(fx.dir / "keys" / "tls-key.priv", 10);
  Result<std::unique_ptr<KeyStore>> damaged = hsm::open_key_store(config);
  REQUIRE_FALSE(damaged.ok());
  CHECK(damaged.status().code() == StatusCode::kCorruption);
  CHECK_THAT(damaged.status().message(), Catch::Contains("tls-key.priv"));
  CHECK(fx.transient_handles() == 0);
}

TEST_CASE("tpm2: random bytes come from the TPM in chunks", "[tpm2]") {
  Fixture fx;
  auto store = fx.create();
  Result<Bytes> a = store->random(100);
  Result<Bytes> b = store->random(100);
  REQUIRE(a.ok());
  REQUIRE(b.ok());
  CHECK(a->size() == 100);
  CHECK(*a != *b);
  CHECK(store->random(0)->empty());
  CHECK(store->random(1 << 20).status().code() == StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace medgate
