// The payload vault and the erasure protocol against a real SoftHSM token (its KEK wraps the data
// keys, its pseudonym key makes the pseudonyms), real SQLite files and a real ledger: round trips,
// pseudonyms, altered ciphertexts, erasure and what it leaves in the files, a crash in the middle
// of an erasure, malformed vault files and wrapped keys, and a scan of every file for PHI markers.
#include <catch2/catch.hpp>

#include <sqlite3.h>

#include <atomic>
#include <fstream>
#include <iterator>
#include <random>
#include <thread>

#include <fmt/format.h>

#include "appliance/erasure.h"
#include "appliance/vault.h"
#include "ledger/store.h"
#include "ledger/verifier.h"
#include "tests/support/softhsm.h"
#include "tests/support/temp_dir.h"

using namespace medgate;
using namespace medgate::appliance;
using medgate::testing::SoftHsmToken;
using medgate::testing::TempDir;

namespace {

struct VaultFixture {
  TempDir dir;
  SoftHsmToken token{dir.path()};
  std::unique_ptr<hsm::KeyStore> keys = token.open_with_key();
  std::filesystem::path path = dir / "vault.db";

  std::unique_ptr<Vault> open() {
    Result<std::unique_ptr<Vault>> v = Vault::open(path, *keys);
    INFO(v.status().to_string());
    REQUIRE(v.ok());
    return std::move(v).value();
  }
};

Bytes file_bytes(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::string s((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  return to_bytes(s);
}

bool contains(const Bytes& haystack, ByteView needle) {
  return std::search(haystack.begin(), haystack.end(), needle.begin(), needle.end()) !=
         haystack.end();
}

// Whether `needle` is anywhere in the database file or its WAL.
bool in_files(const std::filesystem::path& db, ByteView needle) {
  std::filesystem::path wal = db;
  wal += "-wal";
  return contains(file_bytes(db), needle) || contains(file_bytes(wal), needle);
}

std::string marker() {
  static std::mt19937_64 rng{std::random_device{}()};
  return fmt::format("MARKER-{:016x}", rng());
}

// A column of the patient's row, read with a second, plain SQLite connection (what an attacker
// with the file would see).
Bytes raw_column(const std::filesystem::path& db, const char* column, const Pseudonym& p) {
  sqlite3* h = nullptr;
  REQUIRE(sqlite3_open_v2(db.c_str(), &h, SQLITE_OPEN_READONLY, nullptr) == SQLITE_OK);
  sqlite3_stmt* st = nullptr;
  std::string q = fmt::format("SELECT {} FROM patients WHERE pseudonym = ?", column);
  REQUIRE(sqlite3_prepare_v2(h, q.c_str(), -1, &st, nullptr) == SQLITE_OK);
  sqlite3_bind_blob(st, 1, p.bytes.data(), static_cast<int>(p.bytes.size()), SQLITE_STATIC);
  Bytes out;
  if (sqlite3_step(st) == SQLITE_ROW && sqlite3_column_type(st, 0) != SQLITE_NULL) {
    auto* b = static_cast<const std::byte*>(sqlite3_column_blob(st, 0));
    out.assign(b, b + sqlite3_column_bytes(st, 0));
  }
  sqlite3_finalize(st);
  sqlite3_close(h);
  return out;
}

void exec_raw(const std::filesystem::path& db, const std::string& sql, ByteView blob = {}) {
  sqlite3* h = nullptr;
  REQUIRE(sqlite3_open_v2(db.c_str(), &h, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE, nullptr) ==
          SQLITE_OK);
  sqlite3_stmt* st = nullptr;
  REQUIRE(sqlite3_prepare_v2(h, sql.c_str(), -1, &st, nullptr) == SQLITE_OK);
  if (!blob.empty())
    sqlite3_bind_blob(st, 1, blob.data(), static_cast<int>(blob.size()), SQLITE_STATIC);
  CHECK(sqlite3_step(st) == SQLITE_DONE);
  sqlite3_finalize(st);
  sqlite3_close(h);
}

ledger::LedgerOptions ledger_options(const std::filesystem::path& path) {
  ledger::LedgerOptions o;
  o.path = path;
  o.head_interval = std::chrono::milliseconds(0);
  return o;
}

}  // namespace

TEST_CASE("vault: a payload encrypts and decrypts for its patient", "[vault]") {
  VaultFixture f;
  auto vault = f.open();
  auto p = vault->pseudonym("MRN-0001");
  REQUIRE(p.ok());
  Bytes plain = to_bytes("heart rate 72/min");
  auto sealed = vault->encrypt(*p, plain, as_bytes("obs:1"));
  REQUIRE(sealed.ok());
  CHECK(sealed->size() == 1 + 12 + plain.size() + 16);
  CHECK((*sealed)[0] == std::byte{0x01});
  auto again = vault->encrypt(*p, plain, as_bytes("obs:1"));
  REQUIRE(again.ok());
  CHECK(*again != *sealed);  // a fresh IV each time
  auto back = vault->decrypt(*p, *sealed, as_bytes("obs:1"));
  REQUIRE(back.ok());
  CHECK(*back == plain);
  auto empty = vault->encrypt(*p, {}, {});
  REQUIRE(empty.ok());
  CHECK(vault->decrypt(*p, *empty, {}).ok());

  // After a reopen the key is unwrapped from the file.
  vault.reset();
  vault = f.open();
  back = vault->decrypt(*p, *sealed, as_bytes("obs:1"));
  REQUIRE(back.ok());
  CHECK(*back == plain);
  auto info = vault->info(*p);
  REQUIRE(info.ok());
  CHECK(info->state == PatientState::kActive);
  CHECK(info->created_us > 0);
}

TEST_CASE("vault: pseudonyms are keyed, deterministic and per identifier", "[vault]") {
  VaultFixture f;
  auto vault = f.open();
  auto a = vault->pseudonym("MRN-0001");
  auto b = vault->pseudonym("MRN-0002");
  REQUIRE(a.ok());
  REQUIRE(b.ok());
  CHECK(*a != *b);
  CHECK(vault->pseudonym("MRN-0001")->bytes == a->bytes);
  CHECK(a->hex().size() == 64);
  CHECK(a->prefix() == a->hex().substr(0, 16));

  // HMAC under the token's pseudonym key with the domain label, not a plain hash.
  std::string message("medgate patient v1\0MRN-0001", 27);
  auto mac = f.keys->keyed_hash(as_bytes(message));
  REQUIRE(mac.ok());
  CHECK(*mac == a->bytes);
  CHECK(sha256(as_bytes("MRN-0001")) != a->bytes);

  // The same after a reopen (no cache), and find() does not create.
  vault.reset();
  vault = f.open();
  auto found = vault->find("MRN-0001");
  REQUIRE(found.ok());
  CHECK(*found == *a);
  auto missing = vault->find("MRN-9999");
  CHECK(missing.status().code() == StatusCode::kNotFound);
  CHECK(missing.status().message().find("MRN-9999") == std::string::npos);
  CHECK(vault->find("MRN-9999").status().code() == StatusCode::kNotFound);

  CHECK(vault->pseudonym("").status().code() == StatusCode::kInvalidArgument);
  CHECK(vault->find("").status().code() == StatusCode::kInvalidArgument);

  auto id = vault->identifier(*a);
  REQUIRE(id.ok());
  CHECK(*id == "MRN-0001");
  CHECK(!in_files(f.path, as_bytes("MRN-0001")));
  CHECK(!in_files(f.path, as_bytes("MRN-0002")));
}

TEST_CASE("vault: an altered or misdirected ciphertext is refused", "[vault]") {
  VaultFixture f;
  auto vault = f.open();
  auto p = vault->pseudonym("MRN-0001");
  auto q = vault->pseudonym("MRN-0002");
  REQUIRE(p.ok());
  REQUIRE(q.ok());
  auto sealed = vault->encrypt(*p, as_bytes("SpO2 97%"), as_bytes("obs:1"));
  REQUIRE(sealed.ok());

  auto other_aad = vault->decrypt(*p, *sealed, as_bytes("obs:2"));
  CHECK(other_aad.status().code() == StatusCode::kVerificationFailed);
  CHECK(other_aad.status().message().find(p->prefix()) != std::string::npos);
  CHECK(vault->decrypt(*q, *sealed, as_bytes("obs:1")).status().code() ==
        StatusCode::kVerificationFailed);

  for (std::size_t i = 0; i < sealed->size(); ++i) {
    Bytes bad = *sealed;
    bad[i] ^= std::byte{0x01};
    INFO("flipped byte " << i);
    CHECK(vault->decrypt(*p, bad, as_bytes("obs:1")).status().code() ==
          StatusCode::kVerificationFailed);
  }
  Bytes truncated(sealed->begin(), sealed->begin() + 20);
  CHECK(vault->decrypt(*p, truncated, as_bytes("obs:1")).status().code() ==
        StatusCode::kVerificationFailed);
  CHECK(vault->decrypt(*p, {}, as_bytes("obs:1")).status().code() ==
        StatusCode::kVerificationFailed);

  Pseudonym unknown;
  unknown.bytes.fill(std::byte{7});
  CHECK(vault->decrypt(unknown, *sealed, {}).status().code() == StatusCode::kNotFound);
  CHECK(vault->encrypt(unknown, *sealed, {}).status().code() == StatusCode::kNotFound);
}

TEST_CASE("vault: erasure shreds the key and the identifier for good", "[vault]") {
  VaultFixture f;
  auto vault = f.open();
  auto p = vault->pseudonym("MRN-0001");
  auto keep = vault->pseudonym("MRN-0002");
  REQUIRE(p.ok());
  REQUIRE(keep.ok());
  auto sealed = vault->encrypt(*p, as_bytes("BP 120/80"), {});
  auto kept = vault->encrypt(*keep, as_bytes("BP 110/70"), {});
  REQUIRE(sealed.ok());
  REQUIRE(kept.ok());
  Bytes wrapped = raw_column(f.path, "wrapped_key", *p);
  Bytes sealed_id = raw_column(f.path, "identifier", *p);
  REQUIRE(wrapped.size() > 32);
  REQUIRE(sealed_id.size() > 16);
  REQUIRE(in_files(f.path, wrapped));

  auto pending = vault->begin_erase(*p, {"user:alice", "patient request", 5});
  REQUIRE(pending.ok());
  // Fail closed from the first step on.
  auto refused = vault->decrypt(*p, *sealed, {});
  CHECK(refused.status().code() == StatusCode::kFailedPrecondition);
  CHECK(refused.status().message().find("is being erased") != std::string::npos);

  auto done = vault->finish_erase(*p, 7);
  REQUIRE(done.ok());
  CHECK(done->state == PatientState::kErased);
  CHECK(done->erasure_entry == std::optional<std::uint64_t>(7));
  REQUIRE(done->erased_us);

  auto gone = vault->decrypt(*p, *sealed, {});
  CHECK(gone.status().code() == StatusCode::kFailedPrecondition);
  const std::string& m = gone.status().message();
  CHECK(m.find("patient " + p->prefix() + " was erased at " +
               ledger::format_time(*done->erased_us)) != std::string::npos);
  CHECK(m.find("the data can no longer be decrypted") != std::string::npos);
  CHECK(m.find("MRN-0001") == std::string::npos);
  CHECK(vault->identifier(*p).status().code() == StatusCode::kFailedPrecondition);
  CHECK(vault->encrypt(*p, as_bytes("x"), {}).status().code() == StatusCode::kFailedPrecondition);
  CHECK(vault->begin_erase(*p, {"user:alice", "", 9}).status().code() ==
        StatusCode::kFailedPrecondition);
  CHECK(vault->finish_erase(*p, 9).status().code() == StatusCode::kFailedPrecondition);

  // Gone from the database and its WAL, not just unreferenced; the WAL is truncated.
  std::filesystem::path wal = f.path;
  wal += "-wal";
  CHECK(std::filesystem::file_size(wal) == 0);
  CHECK(raw_column(f.path, "wrapped_key", *p).empty());
  CHECK(!in_files(f.path, wrapped));
  CHECK(!in_files(f.path, sealed_id));

  // Other patients are untouched.
  auto still = vault->decrypt(*keep, *kept, {});
  REQUIRE(still.ok());
  CHECK(to_string(*still) == "BP 110/70");

  // For good: the same identifier gives the same pseudonym, and no new key.
  vault.reset();
  vault = f.open();
  auto same = vault->pseudonym("MRN-0001");
  REQUIRE(same.ok());
  CHECK(*same == *p);
  CHECK(vault->encrypt(*same, as_bytes("new data"), {}).status().code() ==
        StatusCode::kFailedPrecondition);
  CHECK(vault->info(*p)->state == PatientState::kErased);
  CHECK(raw_column(f.path, "wrapped_key", *p).empty());
  auto pend = vault->pending_erasures();
  REQUIRE(pend.ok());
  CHECK(pend->empty());
}

TEST_CASE("vault: an erasure interrupted by a crash stays pending and can be finished", "[vault]") {
  VaultFixture f;
  Pseudonym p;
  Bytes sealed;
  {
    auto vault = f.open();
    auto made = vault->pseudonym("MRN-0001");
    INFO(made.status().to_string());
    REQUIRE(made.ok());
    p = *made;
    sealed = *vault->encrypt(p, as_bytes("glucose 5.4"), {});
    REQUIRE(vault->begin_erase(p, {"user:alice", "request 42", 12}).ok());
  }  // the process "dies" here: nothing of finish_erase ran
  auto vault = f.open();
  auto pending = vault->pending_erasures();
  REQUIRE(pending.ok());
  REQUIRE(pending->size() == 1);
  CHECK((*pending)[0].pseudonym == p);
  CHECK((*pending)[0].request.actor == "user:alice");
  CHECK((*pending)[0].request.reason == "request 42");
  CHECK((*pending)[0].request.ledger_size == 12);
  CHECK((*pending)[0].requested_us > 0);
  CHECK(vault->decrypt(p, sealed, {}).status().code() == StatusCode::kFailedPrecondition);
  CHECK(vault->info(p)->state == PatientState::kErasePending);
  REQUIRE(vault->finish_erase(p, 13).ok());
  CHECK(vault->pending_erasures()->empty());
}

TEST_CASE("vault: files that are not a vault, wrapped keys that do not unwrap, a second opener",
          "[vault]") {
  VaultFixture f;
  SECTION("another SQLite database") {
    exec_raw(f.path, "CREATE TABLE entries (idx INTEGER PRIMARY KEY)");
    auto v = Vault::open(f.path, *f.keys);
    CHECK(v.status().code() == StatusCode::kCorruption);
    CHECK(v.status().message().find("is not a medgate vault") != std::string::npos);
  }
  SECTION("not SQLite at all") {
    std::ofstream(f.path) << std::string(4096, 'x');
    auto v = Vault::open(f.path, *f.keys);
    CHECK(v.status().code() == StatusCode::kCorruption);
    CHECK(v.status().message().find("is not a medgate vault") != std::string::npos);
  }
  SECTION("a second opener") {
    auto vault = f.open();
    auto v = Vault::open(f.path, *f.keys);
    CHECK(v.status().code() == StatusCode::kFailedPrecondition);
    CHECK(v.status().message().find("in use") != std::string::npos);
  }
  SECTION("a wrapped key that was altered") {
    auto vault = f.open();
    auto p = vault->pseudonym("MRN-0001");
    REQUIRE(p.ok());
    auto sealed = vault->encrypt(*p, as_bytes("temp 37.2"), {});
    REQUIRE(sealed.ok());
    Bytes wrapped = raw_column(f.path, "wrapped_key", *p);
    wrapped[wrapped.size() / 2] ^= std::byte{0x80};
    exec_raw(f.path,
             fmt::format("UPDATE patients SET wrapped_key = ? WHERE pseudonym = x'{}'", p->hex()),
             wrapped);
    // The key was unwrapped once and is cached: the altered blob is not read again.
    CHECK(vault->decrypt(*p, *sealed, {}).ok());
    vault.reset();
    vault = f.open();
    auto r = vault->decrypt(*p, *sealed, {});
    CHECK(r.status().code() == StatusCode::kVerificationFailed);
    CHECK(r.status().message().find(p->prefix()) != std::string::npos);
    CHECK(r.status().message().find("MRN-0001") == std::string::npos);
    CHECK(vault->identifier(*p).status().code() == StatusCode::kVerificationFailed);
  }
}

TEST_CASE("erasure: the ledger records it once, even across a crash", "[vault]") {
  VaultFixture f;
  auto ledger_path = f.dir / "ledger.db";
  auto created =
      ledger::Ledger::create(ledger_options(ledger_path), "ward-7", *f.keys, "user:root");
  INFO(created.status().to_string());
  REQUIRE(created.ok());
  auto ledger = std::move(created).value();
  auto vault = f.open();
  PatientErasure erasure(*vault, *ledger);

  auto p = vault->pseudonym("MRN-0001");
  REQUIRE(p.ok());
  auto erased = erasure.erase("MRN-0001", "patient request", "user:alice");
  REQUIRE(erased.ok());
  CHECK(erased->pseudonym == *p);
  auto e = ledger->entry(erased->entry);
  REQUIRE(e.ok());
  CHECK(e->entry.type == ledger::EntryType::kPatientErasure);
  CHECK(e->entry.actor == "user:alice");
  CHECK(*e->entry.body.find("pseudonym")->as_bytes() == Bytes(p->bytes.begin(), p->bytes.end()));
  CHECK(*e->entry.body.find("reason")->as_text() == "patient request");
  REQUIRE(e->entry.subjects.size() == 1);
  CHECK(e->entry.subjects[0].subject == Bytes(p->bytes.begin(), p->bytes.end()));
  CHECK(vault->info(*p)->erasure_entry == std::optional<std::uint64_t>(erased->entry));

  auto twice = erasure.erase("MRN-0001", "", "user:alice");
  CHECK(twice.status().code() == StatusCode::kFailedPrecondition);
  CHECK(twice.status().message().find("already erased at " +
                                      ledger::format_time(erased->erased_us)) != std::string::npos);
  auto unknown = erasure.erase("MRN-9999", "", "user:alice");
  CHECK(unknown.status().code() == StatusCode::kNotFound);
  CHECK(erasure.erase("", "", "user:alice").status().code() == StatusCode::kInvalidArgument);

  // A crash after begin_erase, before the ledger entry: the entry is appended on recovery.
  auto q = vault->pseudonym("MRN-0002");
  REQUIRE(q.ok());
  REQUIRE(
      vault->begin_erase(*q, {"user:bob", "crash before append", ledger->stats().tree_size}).ok());
  // A crash after the ledger entry, before finish_erase: the entry is found, not appended again.
  auto r = vault->pseudonym("MRN-0003");
  REQUIRE(r.ok());
  auto begun =
      vault->begin_erase(*r, {"user:bob", "crash after append", ledger->stats().tree_size});
  REQUIRE(begun.ok());
  ledger::Entry entry;
  entry.type = ledger::EntryType::kPatientErasure;
  entry.actor = "user:bob";
  entry.body = *ledger::cbor::Value::map(
      {{ledger::cbor::Value::text("pseudonym"), ledger::cbor::Value::bytes(ByteView(r->bytes))},
       {ledger::cbor::Value::text("reason"), ledger::cbor::Value::text("crash after append")}});
  entry.subjects.push_back({Bytes(r->bytes.begin(), r->bytes.end()), std::nullopt});
  auto appended = ledger->append(entry);
  REQUIRE(appended.ok());

  vault.reset();
  vault = f.open();
  PatientErasure recovered(*vault, *ledger);
  std::uint64_t size_before = ledger->stats().tree_size;
  auto finished = recovered.finish_pending();
  REQUIRE(finished.ok());
  REQUIRE(finished->size() == 2);
  CHECK((*finished)[0].pseudonym == *q);
  CHECK((*finished)[0].entry == size_before);  // appended now
  CHECK((*finished)[1].pseudonym == *r);
  CHECK((*finished)[1].entry == *appended);  // found, not appended twice
  CHECK(ledger->stats().tree_size == size_before + 1);
  auto q_entry = ledger->entry((*finished)[0].entry);
  REQUIRE(q_entry.ok());
  CHECK(q_entry->entry.actor == "user:bob");
  CHECK(*q_entry->entry.body.find("reason")->as_text() == "crash before append");
  CHECK(vault->pending_erasures()->empty());
  CHECK(vault->info(*q)->state == PatientState::kErased);
  CHECK(vault->info(*r)->erasure_entry == std::optional<std::uint64_t>(*appended));

  // A pending erasure asked for again is finished, not refused.
  auto s = vault->pseudonym("MRN-0004");
  REQUIRE(s.ok());
  REQUIRE(vault->begin_erase(*s, {"user:bob", "", ledger->stats().tree_size}).ok());
  auto resumed = recovered.erase("MRN-0004", "ignored", "user:carol");
  REQUIRE(resumed.ok());
  CHECK(ledger->entry(resumed->entry)->entry.actor == "user:bob");

  ledger->close();
  ledger::VerifyOptions vo;
  vo.trusted_keys = {f.keys->signing_key()};
  auto report = ledger::verify_ledger_file(ledger_path, vo);
  REQUIRE(report.ok());
  CHECK(report->ok());
}

TEST_CASE("privacy: no identifier and no payload reaches any file in clear", "[vault]") {
  VaultFixture f;
  auto ledger_path = f.dir / "ledger.db";
  auto created =
      ledger::Ledger::create(ledger_options(ledger_path), "ward-7", *f.keys, "user:root");
  INFO(created.status().to_string());
  REQUIRE(created.ok());
  auto ledger = std::move(created).value();
  auto vault = f.open();
  PatientErasure erasure(*vault, *ledger);

  std::vector<std::string> markers;
  std::vector<std::string> ids;
  for (int i = 0; i < 5; ++i) {
    std::string id = marker();
    ids.push_back(id);
    markers.push_back(id);
    auto p = vault->pseudonym(id);
    REQUIRE(p.ok());
    for (int j = 0; j < 3; ++j) {
      std::string payload = "OBX|1|NM|8867-4^Heart rate||" + marker() + "|/min";
      markers.push_back(payload.substr(payload.find("MARKER-"), 23));
      auto sealed = vault->encrypt(*p, as_bytes(payload), as_bytes("obs"));
      REQUIRE(sealed.ok());
      // What ingest will put on the ledger: the ciphertext, under the pseudonym.
      ledger::Entry e;
      e.type = ledger::EntryType::kAdminAction;
      e.actor = "device:monitor-1";
      e.body = *ledger::cbor::Value::map(
          {{ledger::cbor::Value::text("op"), ledger::cbor::Value::text("observation")},
           {ledger::cbor::Value::text("args"),
            *ledger::cbor::Value::map({{ledger::cbor::Value::text("ciphertext"),
                                        ledger::cbor::Value::bytes(*sealed)}})}});
      e.subjects.push_back({Bytes(p->bytes.begin(), p->bytes.end()), std::nullopt});
      REQUIRE(ledger->append(e).ok());
    }
  }
  REQUIRE(erasure.erase(ids[0], "patient request", "user:alice").ok());
  REQUIRE(erasure.erase(ids[1], "", "user:alice").ok());
  REQUIRE(ledger->sign_head_now().ok());

  for (const std::filesystem::path& file : {f.path, ledger_path}) {
    for (const std::string& m : markers) {
      INFO(file.filename().string() << " " << m);
      CHECK(!in_files(file, as_bytes(m)));
      CHECK(!in_files(file, as_bytes("MARKER-")));
    }
  }
}

TEST_CASE("vault: threads share patients, keys and an erasure safely", "[vault]") {
  VaultFixture f;
  auto vault = f.open();
  auto doomed = vault->pseudonym("MRN-0000");
  REQUIRE(doomed.ok());
  std::atomic<int> failures{0}, refused{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 6; ++t)
    threads.emplace_back([&, t] {
      for (int i = 0; i < 40; ++i) {
        // Overlapping identifiers: several threads create the same patients at once.
        std::string id = fmt::format("MRN-{:04}", 1 + (i + t) % 15);
        auto p = vault->pseudonym(id);
        if (!p.ok()) {
          ++failures;
          continue;
        }
        std::string payload = fmt::format("{}:{}:{}", id, t, i);
        auto sealed = vault->encrypt(*p, as_bytes(payload), as_bytes(id));
        auto back = sealed.ok() ? vault->decrypt(*p, *sealed, as_bytes(id)) : sealed;
        if (!back.ok() || to_string(*back) != payload) ++failures;
        // Meanwhile another thread erases MRN-0000: each call either works or is refused.
        auto d = vault->encrypt(*doomed, as_bytes("x"), {});
        if (!d.ok()) {
          if (d.status().code() == StatusCode::kFailedPrecondition)
            ++refused;
          else
            ++failures;
        }
      }
    });
  threads.emplace_back([&] {
    if (!vault->begin_erase(*doomed, {"user:alice", "", 0}).ok() ||
        !vault->finish_erase(*doomed, 1).ok())
      ++failures;
  });
  for (auto& t : threads) t.join();
  CHECK(failures == 0);
  CHECK(vault->info(*doomed)->state == PatientState::kErased);
  CHECK(vault->encrypt(*doomed, as_bytes("x"), {}).status().code() ==
        StatusCode::kFailedPrecondition);
  for (int i = 1; i <= 15; ++i) {
    auto id = fmt::format("MRN-{:04}", i);
    auto p = vault->find(id);
    REQUIRE(p.ok());
    CHECK(*vault->identifier(*p) == id);
  }
}

TEST_CASE("vault: members sharing a cluster secret give a patient the same pseudonym", "[vault]") {
  // Two members' vaults. SoftHSM serves one token configuration per process, so they share a
  // token here; `own` shows what that token's own pseudonym key would give.
  VaultFixture a;
  auto open_at = [&](const std::string& name) {
    std::filesystem::create_directories(a.dir / name);
    Result<std::unique_ptr<Vault>> v = Vault::open(a.dir / name / "vault.db", *a.keys);
    REQUIRE(v.ok());
    return std::move(v).value();
  };
  auto va = open_at("a");
  auto vb = open_at("b");
  CHECK(va->cluster_secret_id().value() == std::nullopt);

  Bytes secret(32);
  for (std::size_t i = 0; i < secret.size(); ++i) secret[i] = std::byte(i * 7 + 1);
  SECTION("the same pseudonyms at both, different from each box's own") {
    // Each box's own key: different pseudonyms (checked on a vault that adopts nothing).
    auto vc = open_at("c");
    const Pseudonym own = vc->pseudonym("HOSP:CL-1").value();

    REQUIRE(va->adopt_cluster_secret(secret).ok());
    REQUIRE(vb->adopt_cluster_secret(secret).ok());
    CHECK(va->cluster_secret_id().value() == secret_id_of(secret));
    const Pseudonym pa = va->pseudonym("HOSP:CL-1").value();
    const Pseudonym pb = vb->pseudonym("HOSP:CL-1").value();
    CHECK(pa == pb);
    CHECK(pa != own);
    CHECK(va->pseudonym("HOSP:CL-2").value() != pa);
    // Adopting it again is nothing; another secret is refused.
    CHECK(va->adopt_cluster_secret(secret).ok());
    Bytes other = secret;
    other[0] ^= std::byte{1};
    Status refused = va->adopt_cluster_secret(other);
    CHECK(refused.code() == StatusCode::kFailedPrecondition);
    CHECK(refused.message().find("another cluster secret") != std::string::npos);
    // Kept wrapped, across a reopen; the secret itself is in no file in clear.
    va.reset();
    va = open_at("a");
    CHECK(va->pseudonym("HOSP:CL-1").value() == pa);
    CHECK(va->cluster_secret().value().view().size() == 32);
    CHECK(!in_files(a.dir / "a" / "vault.db", secret));
  }
  SECTION("a vault that already named patients with its own key cannot adopt one") {
    REQUIRE(va->pseudonym("HOSP:CL-1").ok());
    Status refused = va->adopt_cluster_secret(secret);
    CHECK(refused.code() == StatusCode::kFailedPrecondition);
    CHECK(refused.message().find("1 patient record(s)") != std::string::npos);
    CHECK(va->cluster_secret_id().value() == std::nullopt);
  }
  SECTION("a member that must wait for the secret names nobody until it has it") {
    vb->require_cluster_secret(true);
    CHECK(vb->pseudonym("HOSP:CL-1").status().code() == StatusCode::kUnavailable);
    CHECK(vb->find("HOSP:CL-1").status().code() == StatusCode::kUnavailable);
    CHECK(vb->patient_count().value() == 0);
    REQUIRE(vb->adopt_cluster_secret(secret).ok());
    CHECK(vb->pseudonym("HOSP:CL-1").ok());
    CHECK(vb->patient_count().value() == 1);
  }
  SECTION("a secret of the wrong size is refused") {
    CHECK(va->adopt_cluster_secret(Bytes(16)).code() == StatusCode::kInvalidArgument);
  }
}

TEST_CASE("vault: a member reads another member's readings with its published data key",
          "[vault]") {
  VaultFixture fx;
  auto open_at = [&](const std::string& name) {
    std::filesystem::create_directories(fx.dir / name);
    Result<std::unique_ptr<Vault>> v = Vault::open(fx.dir / name / "vault.db", *fx.keys);
    REQUIRE(v.ok());
    return std::move(v).value();
  };
  auto a = open_at("a");
  auto b = open_at("b");
  Bytes secret(32, std::byte{0x42});
  REQUIRE(a->adopt_cluster_secret(secret).ok());
  REQUIRE(b->adopt_cluster_secret(secret).ok());
  const Bytes aad = to_bytes("observation");
  const Pseudonym p = a->pseudonym("HOSP:SHARED-1").value();
  const Bytes reading = to_bytes("SpO2 97 %");
  Bytes ct = a->encrypt(p, reading, aad).value();
  CHECK(ct[0] == std::byte{0x02});  // carries its key id

  // What a publishes (the etcd of the test); a key source that counts its calls.
  std::map<std::string, Bytes> published;
  int fetched = 0;
  b->set_key_source([&](const Pseudonym& who, const DataKeyId& id) -> Result<std::optional<Bytes>> {
    ++fetched;
    auto it = published.find(who.hex() + to_hex(id));
    if (it == published.end()) return std::optional<Bytes>();
    return std::optional<Bytes>(it->second);
  });
  REQUIRE(b->pseudonym("HOSP:SHARED-1").value() == p);

  // Not published yet: b says so, and keeps nothing.
  CHECK(b->decrypt(p, ct, aad).status().code() == StatusCode::kUnavailable);

  std::vector<DataKeyExport> keys = a->keys_to_publish(10).value();
  REQUIRE(keys.size() == 1);
  CHECK(keys[0].patient == p);
  CHECK(!contains(keys[0].sealed, reading));
  published[p.hex() + to_hex(keys[0].key_id)] = keys[0].sealed;
  REQUIRE(a->mark_published(p, keys[0].key_id).ok());
  CHECK(a->keys_to_publish(10).value().empty());

  Result<Bytes> plain = b->decrypt(p, ct, aad);
  INFO(plain.status().to_string());
  REQUIRE(plain.ok());
  CHECK(*plain == reading);
  const int after_first = fetched;
  CHECK(b->decrypt(p, ct, aad).value() == reading);
  CHECK(fetched == after_first);  // kept, not fetched again
  // b's own readings for the same patient use b's own key; a cannot read them without b's key.
  Bytes ct_b = b->encrypt(p, reading, aad).value();
  CHECK(a->decrypt(p, ct_b, aad).status().code() == StatusCode::kNotFound);

  SECTION("a published key altered in transit is refused") {
    auto c = open_at("c");
    REQUIRE(c->adopt_cluster_secret(secret).ok());
    REQUIRE(c->pseudonym("HOSP:SHARED-1").ok());
    Bytes altered = keys[0].sealed;
    altered.back() ^= std::byte{1};
    c->set_key_source([&](const Pseudonym&, const DataKeyId&) -> Result<std::optional<Bytes>> {
      return std::optional<Bytes>(altered);
    });
    CHECK(c->decrypt(p, ct, aad).status().code() == StatusCode::kVerificationFailed);
  }
  SECTION("an erasure decided elsewhere destroys b's copies; an unknown patient is tombstoned") {
    Result<bool> changed = b->apply_erasure(p, 77);
    REQUIRE(changed.ok());
    CHECK(*changed);
    CHECK(b->info(p).value().state == PatientState::kErased);
    CHECK(b->info(p).value().erasure_entry == std::optional<std::uint64_t>(77));
    CHECK(b->decrypt(p, ct, aad).status().code() == StatusCode::kFailedPrecondition);
    CHECK(b->apply_erasure(p, 77).value() == false);  // again: nothing left to do
    b.reset();
    b = open_at("b");
    CHECK(b->decrypt(p, ct, aad).status().code() == StatusCode::kFailedPrecondition);

    Pseudonym stranger;
    stranger.bytes[0] = std::byte{9};
    CHECK(b->apply_erasure(stranger, 78).value());
    CHECK(b->info(stranger).value().state == PatientState::kErased);
    // A tombstone names nobody: a member that saw erasures before it got the secret still can.
    auto d = open_at("d");
    CHECK(d->apply_erasure(stranger, 78).value());
    CHECK(d->patient_count().value() == 0);
    CHECK(d->adopt_cluster_secret(secret).ok());
  }
}
