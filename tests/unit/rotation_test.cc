// Signing-key rotation and rollback protection in the ledger store, against real SQLite files and
// both real key stores (SoftHSM and swtpm): the transition entry, heads by the right key on each side of it, the
// verifier following the chain from either end, a retired key's head refused; the rollback
// counter in every head, a restored copy refused, a crash between the two steps of an epoch
// accepted.
#include <catch2/catch.hpp>

#include <openssl/evp.h>
#include <openssl/x509.h>
#include <sqlite3.h>

#include <chrono>
#include <thread>

#include "ledger/block.h"
#include "ledger/sqlite.h"
#include "ledger/store.h"
#include "ledger/verifier.h"
#include "tests/support/entries.h"
#include "tests/support/key_stores.h"
#include "tests/support/temp_dir.h"

using namespace medgate;
using namespace medgate::ledger;
using medgate::testing::note;
using medgate::testing::key_store_backends;
using medgate::testing::TestKeyStore;
using medgate::testing::TempDir;
namespace fs = std::filesystem;

namespace {

LedgerOptions options_for(const fs::path& path) {
  LedgerOptions o;
  o.path = path;
  o.head_interval = std::chrono::milliseconds(0);
  o.counter_interval = std::chrono::seconds(0);
  return o;
}

VerifyReport verify(const fs::path& path, std::vector<PublicKey> trusted) {
  VerifyOptions vo;
  vo.trusted_keys = std::move(trusted);
  auto r = verify_ledger_file(path, vo);
  REQUIRE(r.ok());
  return *r;
}

// Stores a head the way the ledger's signer would, signed by `key` of `keys`.
void store_head(const fs::path& path, hsm::KeyStore& keys, const KeyId& key, HeadBody head) {
  head.key_id = key;
  Bytes bytes = encode_head(head);
  auto sig = keys.sign_digest_with(key, head_digest(bytes));
  REQUIRE(sig.ok());
  auto db = sql::Database::open(path, sql::Database::Mode::kReadWrite);
  REQUIRE(db.ok());
  auto st = db->prepare("INSERT INTO heads (height, tree_size, head, signature) VALUES (?,?,?,?)");
  REQUIRE(st.ok());
  st->bind(1, head.height).bind(2, head.tree_size).bind(3, ByteView(bytes)).bind(4, ByteView(*sig));
  REQUIRE(st->run().ok());
}

// The body of the newest head stored in the file.
HeadBody latest_stored_head(const fs::path& path) {
  auto db = sql::Database::open(path, sql::Database::Mode::kReadOnly);
  REQUIRE(db.ok());
  auto st = db->prepare("SELECT head FROM heads ORDER BY seq DESC LIMIT 1");
  REQUIRE(st.ok());
  REQUIRE(*st->step() == sql::Statement::Step::kRow);
  ByteView b = st->column_blob(0);
  auto head = decode_head(Bytes(b.begin(), b.end()));
  REQUIRE(head.ok());
  return *head;
}

// A P-256 key from no key store of this test: trusted by nobody's ledger.
PublicKey stranger_key() {
  EVP_PKEY* pkey = EVP_EC_gen("P-256");
  REQUIRE(pkey);
  unsigned char* der = nullptr;
  int n = i2d_PUBKEY(pkey, &der);
  REQUIRE(n > 0);
  auto key = PublicKey::from_spki_der(ByteView(reinterpret_cast<std::byte*>(der), n));
  OPENSSL_free(der);
  EVP_PKEY_free(pkey);
  REQUIRE(key.ok());
  return *key;
}

}  // namespace

TEST_CASE("a rotation records a transition signed by both keys and heads switch to the new key",
          "[store][keys]") {
  std::string backend = GENERATE(from_range(key_store_backends()));
  INFO("key store: " << backend);
  TempDir dir;
  TestKeyStore token(backend, dir.path());
  auto keys = token.open();
  auto path = dir / "ledger.db";
  PublicKey old_key = keys->signing_key();
  std::optional<PublicKey> new_key;
  std::uint64_t transition = 0;
  {
    auto ledger = Ledger::create(options_for(path), "ward-7", *keys, "user:root");
    REQUIRE(ledger.ok());
    for (int i = 0; i < 5; ++i) REQUIRE((*ledger)->append(note("before", i)).ok());
    REQUIRE((*ledger)->sign_head_now().ok());
    auto r = (*ledger)->rotate_signing_key("user:alice");
    REQUIRE(r.ok());
    transition = r->entry_index;
    CHECK(r->old_key == old_key);
    CHECK_FALSE(r->new_key == old_key);
    new_key = r->new_key;
    REQUIRE(r->first_head);
    CHECK(r->first_head->head.key_id == new_key->id());
    CHECK(r->first_head->head.tree_size == transition + 1);
    CHECK(keys->signing_key() == *new_key);
    CHECK((*ledger)->stats().active_key == new_key->id());

    auto e = (*ledger)->entry(transition);
    REQUIRE(e.ok());
    CHECK(e->entry.type == EntryType::kKeyTransition);
    CHECK(e->entry.actor == "user:alice");
    Hash digest = sha256(encode_key_transition_statement("ward-7", old_key.id(), new_key->id()));
    CHECK(old_key.verify_digest(digest, *e->entry.body.find("old_signature")->as_bytes()).ok());
    CHECK(new_key->verify_digest(digest, *e->entry.body.find("new_signature")->as_bytes()).ok());

    for (int i = 0; i < 5; ++i) REQUIRE((*ledger)->append(note("after", i)).ok());
  }
  // Reopened with the key store's default (the first key) active, the ledger picks the new key.
  REQUIRE(keys->use_signing_key(old_key.id()).ok());
  {
    auto ledger = Ledger::open(options_for(path), *keys);
    REQUIRE(ledger.ok());
    CHECK(keys->signing_key() == *new_key);
    REQUIRE((*ledger)->append(note("reopened")).ok());
    auto head = (*ledger)->sign_head_now();
    REQUIRE(head.ok());
    CHECK(head->head.key_id == new_key->id());
  }

  SECTION("a verifier trusting the old key follows the transition") {
    VerifyReport r = verify(path, {old_key});
    INFO((r.problem ? r.problem->describe() : "ok"));
    CHECK(r.ok());
    CHECK(r.key_ids == std::vector<std::string>{to_hex(old_key.id()), to_hex(new_key->id())});
  }
  SECTION("a verifier trusting only the new key accepts the old key's earlier range") {
    CHECK(verify(path, {*new_key}).ok());
  }
  SECTION("a verifier trusting neither names the chain") {
    VerifyReport r = verify(path, {stranger_key()});
    REQUIRE_FALSE(r.ok());
    CHECK_THAT(r.problem->reason, Catch::Contains("none of the ledger's signing keys"));
  }
  SECTION("a head signed by the retired key after the transition is refused") {
    store_head(path, *keys, old_key.id(), latest_stored_head(path));
    VerifyReport r = verify(path, {old_key});
    REQUIRE_FALSE(r.ok());
    CHECK(r.problem->where == VerifyProblem::Where::kHead);
    CHECK_THAT(r.problem->reason, Catch::Contains("retired"));
  }
}

TEST_CASE("genesis and key-transition entries cannot be appended from outside", "[store][keys]") {
  std::string backend = GENERATE(from_range(key_store_backends()));
  INFO("key store: " << backend);
  TempDir dir;
  TestKeyStore token(backend, dir.path());
  auto keys = token.open();
  auto ledger = Ledger::create(options_for(dir / "ledger.db"), "ward-7", *keys, "user:root");
  REQUIRE(ledger.ok());
  Entry e = note("x");
  e.type = EntryType::kGenesis;
  e.body = *cbor::Value::map({{cbor::Value::text("ledger_id"), cbor::Value::text("x")},
                              {cbor::Value::text("key_id"), cbor::Value::bytes(Bytes(32))},
                              {cbor::Value::text("public_key"), cbor::Value::bytes(Bytes(1))}});
  auto r = (*ledger)->append(e);
  REQUIRE_FALSE(r.ok());
  CHECK(r.status().code() == StatusCode::kInvalidArgument);
  CHECK((*ledger)->stats().tree_size == 1);
}

TEST_CASE("every head carries the rollback counter and epochs advance the key store's counter",
          "[store][rollback]") {
  std::string backend = GENERATE(from_range(key_store_backends()));
  INFO("key store: " << backend);
  TempDir dir;
  TestKeyStore token(backend, dir.path());
  auto keys = token.open();
  auto start = keys->read_counter();
  REQUIRE(start.ok());
  auto path = dir / "ledger.db";
  {
    auto ledger = Ledger::create(options_for(path), "ward-7", *keys, "user:root");
    REQUIRE(ledger.ok());
    // create() signs genesis with the counter as it was; opening is an epoch.
    CHECK(*keys->read_counter() == *start + 1);
    auto h = (*ledger)->latest_head();
    REQUIRE(h);
    CHECK(h->head.rollback_counter == *start + 1);
    REQUIRE((*ledger)->append(note("a")).ok());
    auto head = (*ledger)->sign_head_now();
    REQUIRE(head.ok());
    CHECK(head->head.rollback_counter == *start + 1);
  }
  // A clean close is an epoch too.
  CHECK(*keys->read_counter() == *start + 2);
  VerifyReport r = verify(path, {keys->signing_key()});
  CHECK(r.ok());
  CHECK(r.rollback_counter == *start + 2);

  SECTION("while running, epochs follow counter_interval when entries arrive") {
    LedgerOptions o = options_for(path);
    o.counter_interval = std::chrono::seconds(1);
    auto ledger = Ledger::open(o, *keys);
    REQUIRE(ledger.ok());
    std::uint64_t opened = *keys->read_counter();
    CHECK(opened == *start + 3);
    // Poll, not time: the test passes however slow the machine is.
    for (int i = 0; i < 200 && *keys->read_counter() == opened; ++i) {
      REQUIRE((*ledger)->append(note("tick", i)).ok());
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    CHECK(*keys->read_counter() > opened);
    // The writer counts the epoch just after the device's increment: wait for it, do not race it.
    for (int i = 0; i < 200 && (*ledger)->stats().counter_epochs < 2; ++i)
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    CHECK((*ledger)->stats().counter_epochs >= 2);
  }
}

TEST_CASE("a restored older copy of the ledger is refused at open", "[store][rollback]") {
  std::string backend = GENERATE(from_range(key_store_backends()));
  INFO("key store: " << backend);
  TempDir dir;
  TestKeyStore token(backend, dir.path());
  auto keys = token.open();
  auto path = dir / "ledger.db";
  auto copy = dir / "backup.db";
  REQUIRE(Ledger::create(options_for(path), "ward-7", *keys, "user:root").ok());
  fs::copy_file(path, copy);  // closed cleanly: the WAL was checkpointed into the file
  {
    auto ledger = Ledger::open(options_for(path), *keys);
    REQUIRE(ledger.ok());
    REQUIRE((*ledger)->append(note("later")).ok());
  }
  fs::copy_file(copy, path, fs::copy_options::overwrite_existing);
  auto reopened = Ledger::open(options_for(path), *keys);
  REQUIRE_FALSE(reopened.ok());
  CHECK(reopened.status().code() == StatusCode::kFailedPrecondition);
  CHECK_THAT(reopened.status().message(), Catch::Contains("rollback detected"));
  // The copy itself still verifies: it is a genuine, older ledger.
  CHECK(verify(path, {keys->signing_key()}).ok());
}

TEST_CASE("a crash between the head and the counter's increment is not taken for a rollback",
          "[store][rollback]") {
  std::string backend = GENERATE(from_range(key_store_backends()));
  INFO("key store: " << backend);
  TempDir dir;
  TestKeyStore token(backend, dir.path());
  auto keys = token.open();
  auto path = dir / "ledger.db";
  REQUIRE(Ledger::create(options_for(path), "ward-7", *keys, "user:root").ok());
  std::uint64_t device = *keys->read_counter();

  // Step one of an epoch without step two: a durable head carrying device + 1.
  std::optional<SignedHead> latest;
  {
    auto ledger = Ledger::open(options_for(path), *keys);
    REQUIRE(ledger.ok());
    latest = (*ledger)->latest_head();
  }
  device = *keys->read_counter();
  REQUIRE(latest);
  HeadBody ahead = latest->head;
  ahead.rollback_counter = device + 1;
  store_head(path, *keys, keys->signing_key().id(), ahead);

  SECTION("one ahead: accepted, and the device catches up") {
    auto ledger = Ledger::open(options_for(path), *keys);
    INFO(ledger.status().to_string());
    REQUIRE(ledger.ok());
    CHECK(*keys->read_counter() == device + 1);
    CHECK((*ledger)->latest_head()->head.rollback_counter == device + 1);
  }
  SECTION("two ahead: another key store's counter, refused") {
    HeadBody further = ahead;
    further.rollback_counter = device + 2;
    store_head(path, *keys, keys->signing_key().id(), further);
    auto ledger = Ledger::open(options_for(path), *keys);
    REQUIRE_FALSE(ledger.ok());
    CHECK_THAT(ledger.status().message(), Catch::Contains("is ahead of the key store's counter"));
  }
}

TEST_CASE("a head whose rollback counter goes down is named by the verifier", "[verifier][rollback]") {
  std::string backend = GENERATE(from_range(key_store_backends()));
  INFO("key store: " << backend);
  TempDir dir;
  TestKeyStore token(backend, dir.path());
  auto keys = token.open();
  auto path = dir / "ledger.db";
  REQUIRE(Ledger::create(options_for(path), "ward-7", *keys, "user:root").ok());
  HeadBody head = latest_stored_head(path);
  REQUIRE(head.rollback_counter > 1);
  HeadBody lower = head;
  lower.rollback_counter = head.rollback_counter - 1;
  store_head(path, *keys, keys->signing_key().id(), lower);
  VerifyReport r = verify(path, {keys->signing_key()});
  REQUIRE_FALSE(r.ok());
  CHECK(r.problem->where == VerifyProblem::Where::kHead);
  CHECK_THAT(r.problem->reason, Catch::Contains("lower than the head before it"));
}
