// The offline verifier against a real ledger (real SQLite file, real SoftHSM signatures), attacked
// on purpose: every case copies one pristine ledger, tampers with the copy through SQLite the way
// someone with write access to the file could, and expects the report to name exactly the entry,
// block or head that no longer holds, with the reason an auditor would read.
//
// The pristine ledger is built once per test run (BaseLedger) and only ever copied, so the suite
// stays fast. Only one SoftHSM token directory can be open per process, so the fixture closes the
// first token's key stores before it opens a second token (the "other key" of the forged heads).
#include <catch2/catch.hpp>

#include <algorithm>
#include <atomic>
#include <fstream>
#include <functional>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "ledger/block.h"
#include "ledger/entry.h"
#include "ledger/merkle.h"
#include "ledger/sqlite.h"
#include "ledger/store.h"
#include "ledger/tiles.h"
#include "ledger/verifier.h"
#include "tests/support/entries.h"
#include "tests/support/softhsm.h"
#include "tests/support/temp_dir.h"

using namespace medgate;
using namespace medgate::ledger;
using medgate::testing::SoftHsmToken;
using medgate::testing::TempDir;
using Where = VerifyProblem::Where;
namespace fs = std::filesystem;

namespace {

constexpr std::uint64_t kTailEntries = 12;  // appended after the tail ledger's last head

using medgate::testing::note;

// Runs `body(t)` on `threads` threads and returns how many of its calls failed.
int run_threads(int threads, const std::function<bool(int)>& body) {
  std::atomic<int> failures{0};
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t)
    pool.emplace_back([&, t] {
      if (!body(t)) failures.fetch_add(1);
    });
  for (auto& th : pool) th.join();
  return failures.load();
}

// ---- SQLite access to a copy, the way an attacker with write access would do it ----

sql::Database open_db(const fs::path& path,
                      sql::Database::Mode mode = sql::Database::Mode::kReadWrite) {
  auto db = sql::Database::open(path, mode);
  INFO(db.status().to_string());
  REQUIRE(db.ok());
  // Scratch copies need no durability; without fsyncs the fuzz loop stays fast on a busy disk.
  if (mode != sql::Database::Mode::kReadOnly) REQUIRE(db->exec("PRAGMA synchronous=OFF").ok());
  return std::move(db).value();
}

void exec(const fs::path& path, const std::string& statement) {
  sql::Database db = open_db(path);
  Status s = db.exec(statement);
  INFO(statement << ": " << s.to_string());
  REQUIRE(s.ok());
}

// Runs `statement` with ?1 bound to `blob` (non-empty: an empty span would bind NULL).
void exec_with_blob(const fs::path& path, const std::string& statement, const Bytes& blob) {
  REQUIRE_FALSE(blob.empty());
  sql::Database db = open_db(path);
  auto st = db.prepare(statement);
  REQUIRE(st.ok());
  st->bind(1, ByteView(blob));
  Status s = st->run();
  INFO(statement << ": " << s.to_string());
  REQUIRE(s.ok());
  REQUIRE(sqlite3_changes(db.handle()) >= 1);
}

// `query` stepped to its first row, or nullopt when it has none.
std::optional<sql::Statement> first_row(sql::Database& db, const std::string& query) {
  auto st = db.prepare(query);
  INFO(query << ": " << st.status().to_string());
  REQUIRE(st.ok());
  auto step = st->step();
  REQUIRE(step.ok());
  if (*step != sql::Statement::Step::kRow) return std::nullopt;
  return std::move(st).value();
}

Bytes query_blob(const fs::path& path, const std::string& query) {
  sql::Database db = open_db(path, sql::Database::Mode::kReadOnly);
  auto row = first_row(db, query);
  INFO(query);
  REQUIRE(row);
  ByteView b = row->column_blob(0);
  return Bytes(b.begin(), b.end());
}

std::uint64_t query_uint(const fs::path& path, const std::string& query) {
  sql::Database db = open_db(path, sql::Database::Mode::kReadOnly);
  auto row = first_row(db, query);
  INFO(query);
  REQUIRE(row);
  return row->column_uint(0);
}

// `format` with its "{}" replaced by `a`.
std::string with_number(const std::string& format, std::uint64_t a) {
  std::string out = format;
  auto at = out.find("{}");
  out.replace(at, 2, std::to_string(a));
  return out;
}

// A ledger file and its WAL, if any, copied to `to`.
void copy_ledger(const fs::path& from, const fs::path& to) {
  fs::copy_file(from, to);
  fs::path wal = from, wal_to = to;
  wal += "-wal";
  wal_to += "-wal";
  if (fs::exists(wal)) fs::copy_file(wal, wal_to);
}

// ---- the pristine ledger, built once ----

struct BaseLedger {
  std::unique_ptr<TempDir> dir = std::make_unique<TempDir>("medgate-verifier");
  fs::path path;  // closed and checkpointed
  std::optional<PublicKey> key;
  std::optional<PublicKey> other_key;  // another token's key: trusted by nobody here
  std::uint64_t entries = 0, blocks = 0, heads = 0;
  Hash root{};
  // Head #forged_seq's body re-pointed at other_key and signed by it.
  std::uint64_t forged_seq = 2;
  Bytes forged_head, forged_signature;
  // A copy, taken while the ledger was open, of a ledger with kTailEntries committed after its
  // latest head (the torn tail of a crash).
  fs::path tail_path;
};

LedgerOptions ledger_options(const fs::path& path) {
  LedgerOptions o;
  o.path = path;
  o.head_interval = std::chrono::milliseconds(0);  // heads only on sign_head_now() and close()
  o.max_batch_entries = 64;
  return o;
}

// Appends from two threads in several rounds: single appends (small blocks) and append_all
// batches (one block each), with a head signed after each round.
void fill_ledger(Ledger& ledger) {
  auto singles = [&](int rounds) {
    return run_threads(2, [&](int t) {
      for (int i = 0; i < rounds; ++i)
        if (!ledger.append(note("single-" + std::to_string(t), static_cast<std::uint64_t>(i))).ok())
          return false;
      return true;
    });
  };
  auto batches = [&](int rounds, int size) {
    return run_threads(2, [&](int t) {
      for (int r = 0; r < rounds; ++r) {
        std::vector<Entry> batch;
        for (int i = 0; i < size; ++i)
          batch.push_back(note("batch-" + std::to_string(t), static_cast<std::uint64_t>(i)));
        if (!ledger.append_all(batch).ok()) return false;
      }
      return true;
    });
  };
  REQUIRE(singles(30) == 0);
  REQUIRE(ledger.sign_head_now().ok());
  REQUIRE(batches(3, 40) == 0);
  REQUIRE(ledger.sign_head_now().ok());
  REQUIRE(singles(20) == 0);
  REQUIRE(ledger.sign_head_now().ok());
  for (std::uint64_t i = 0; i < 10; ++i) REQUIRE(ledger.append(note("last", i)).ok());
  // close() signs the final head.
}

void build_tail_ledger(BaseLedger& b, hsm::KeyStore& keys) {
  fs::path live = *b.dir / "tail-live.db";
  auto ledger = Ledger::create(ledger_options(live), "ward-9", keys, "user:root");
  REQUIRE(ledger.ok());
  REQUIRE((*ledger)->append_all(std::vector<Entry>(5, note("tail", 0))).ok());
  for (std::uint64_t i = 5; i < kTailEntries; ++i) REQUIRE((*ledger)->append(note("tail", i)).ok());
  fs::path wal = live;
  wal += "-wal";
  REQUIRE(fs::exists(wal));  // the tail is only in the WAL: the copy must carry it
  b.tail_path = *b.dir / "tail-copy.db";
  copy_ledger(live, b.tail_path);
  (*ledger)->close();
}

void forge_head(BaseLedger& b, hsm::KeyStore& other) {
  Result<HeadBody> head = decode_head(
      query_blob(b.path, with_number("SELECT head FROM heads WHERE seq = {}", b.forged_seq)));
  REQUIRE(head.ok());
  head->key_id = other.signing_key().id();
  b.forged_head = encode_head(*head);
  auto sig = other.sign_digest(head_digest(b.forged_head));
  REQUIRE(sig.ok());
  b.forged_signature = std::move(sig).value();
}

BaseLedger build_base() {
  BaseLedger b;
  b.path = *b.dir / "ledger.db";
  fs::create_directories(*b.dir / "hsm-a");
  fs::create_directories(*b.dir / "hsm-b");
  {
    SoftHsmToken token(*b.dir / "hsm-a", "verifier-a");
    auto keys = token.open_with_key();
    b.key = keys->signing_key();
    auto ledger = Ledger::create(ledger_options(b.path), "ward-7", *keys, "user:root");
    REQUIRE(ledger.ok());
    fill_ledger(**ledger);
    (*ledger)->close();
    auto last = (*ledger)->latest_head();
    REQUIRE(last);
    b.root = last->head.root;
    b.entries = (*ledger)->stats().tree_size;
    build_tail_ledger(b, *keys);
  }  // the first token's key stores are closed here, before the second token is opened
  {
    SoftHsmToken other(*b.dir / "hsm-b", "verifier-b");
    auto keys = other.open_with_key();
    b.other_key = keys->signing_key();
    forge_head(b, *keys);
  }
  b.blocks = query_uint(b.path, "SELECT count(*) FROM blocks");
  b.heads = query_uint(b.path, "SELECT count(*) FROM heads");
  REQUIRE(b.entries == 1 + 2 * 30 + 2 * 3 * 40 + 2 * 20 + 10);
  REQUIRE(b.blocks > 10);
  REQUIRE(b.heads == 6);  // genesis, the open's counter epoch, three sign_head_now, close
  return b;
}

const BaseLedger& base() {
  static BaseLedger b = build_base();
  return b;
}

// A scratch copy of the pristine ledger for one case to tamper with.
struct LedgerCopy {
  TempDir dir{"medgate-verifier-case"};
  fs::path path = dir / "ledger.db";
  explicit LedgerCopy(const fs::path& from = base().path) { copy_ledger(from, path); }
};

Result<VerifyReport> verify_file(const fs::path& path, std::vector<PublicKey> trusted,
                                 std::function<void(std::uint64_t, std::uint64_t)> progress = {}) {
  VerifyOptions options;
  options.trusted_keys = std::move(trusted);
  options.progress = std::move(progress);
  return verify_ledger_file(path, options);
}

VerifyReport verify(const fs::path& path) {
  auto r = verify_file(path, {*base().key});
  INFO(r.status().to_string());
  REQUIRE(r.ok());
  return std::move(r).value();
}

void expect_problem(const VerifyReport& report, Where where, std::uint64_t number,
                    const std::string& words) {
  REQUIRE_FALSE(report.ok());
  const VerifyProblem& p = *report.problem;
  INFO("reported: " << p.describe());
  CHECK(static_cast<int>(p.where) == static_cast<int>(where));
  CHECK(p.number == number);
  CHECK_THAT(p.describe(), Catch::Contains(words));
}

// ---- facts about the pristine ledger, read from its file ----

std::uint64_t block_of(std::uint64_t entry) {
  return query_uint(
      base().path,
      with_number(
          "SELECT height FROM blocks WHERE first_index <= {} ORDER BY first_index DESC LIMIT 1",
          entry));
}
std::uint64_t last_height() {
  return base().blocks - 1;
}
std::uint64_t first_entry_of(std::uint64_t height) {
  return query_uint(base().path,
                    with_number("SELECT first_index FROM blocks WHERE height = {}", height));
}

Bytes entry_bytes(const fs::path& path, std::uint64_t index) {
  return query_blob(path, with_number("SELECT bytes FROM entries WHERE idx = {}", index));
}
void set_entry_bytes(const fs::path& path, std::uint64_t index, const Bytes& bytes) {
  exec_with_blob(path, with_number("UPDATE entries SET bytes = ?1 WHERE idx = {}", index), bytes);
}

// The entry's bytes with one character of its actor ("user:test") changed: still decodable.
Bytes with_actor_edited(Bytes bytes) {
  std::string text = to_string(bytes);
  auto at = text.find("user:test");
  REQUIRE(at != std::string::npos);
  bytes[at + 5] = std::byte{'b'};  // "user:best"
  REQUIRE(decode_entry(bytes).ok());
  return bytes;
}

// One connection kept open for many edits of entry bytes, so that edits do not each restart the
// WAL (whose new header SQLite fsyncs whatever the synchronous setting).
class EntryEditor {
 public:
  explicit EntryEditor(const fs::path& path) : db_(open_db(path)) {
    REQUIRE(db_.exec("PRAGMA wal_autocheckpoint=0").ok());
    auto read = db_.prepare("SELECT bytes FROM entries WHERE idx = ?");
    auto write = db_.prepare("UPDATE entries SET bytes = ? WHERE idx = ?");
    REQUIRE(read.ok());
    REQUIRE(write.ok());
    read_ = std::move(read).value();
    write_ = std::move(write).value();
  }
  Bytes bytes(std::uint64_t index) {
    read_.bind(1, index);
    auto step = read_.step();
    REQUIRE(step.ok());
    REQUIRE(*step == sql::Statement::Step::kRow);
    ByteView b = read_.column_blob(0);
    Bytes out(b.begin(), b.end());
    read_.reset();
    return out;
  }
  void set(std::uint64_t index, const Bytes& bytes) {
    Status s = write_.bind(1, ByteView(bytes)).bind(2, index).run();
    INFO(s.to_string());
    REQUIRE(s.ok());
  }

 private:
  sql::Database db_;  // declared first: outlives its statements
  sql::Statement read_, write_;
};

// Rewrites the level-0 tile so that it holds `leaf` for entry `index`.
void fix_leaf_in_tile(const fs::path& path, std::uint64_t index, const Hash& leaf) {
  std::uint64_t tile = index / kTileWidth, pos = index % kTileWidth;
  Result<std::int64_t> position = tile_position({0, tile});
  REQUIRE(position.ok());
  std::string where = "pos = " + std::to_string(*position);
  Bytes hashes = query_blob(path, "SELECT hashes FROM merkle_tiles WHERE " + where);
  REQUIRE(hashes.size() >= (pos + 1) * 32);
  std::copy(leaf.begin(), leaf.end(), hashes.begin() + static_cast<std::ptrdiff_t>(pos * 32));
  exec_with_blob(path, "UPDATE merkle_tiles SET hashes = ?1 WHERE " + where, hashes);
}

}  // namespace

TEST_CASE("a pristine ledger verifies and the report counts it right", "[verifier]") {
  const BaseLedger& b = base();
  LedgerCopy copy;
  std::vector<std::pair<std::uint64_t, std::uint64_t>> calls;
  auto r = verify_file(copy.path, {*b.key}, [&](std::uint64_t done, std::uint64_t total) {
    calls.emplace_back(done, total);
  });
  REQUIRE(r.ok());
  INFO((r->problem ? r->problem->describe() : ""));
  CHECK(r->ok());
  CHECK(r->ledger_id == "ward-7");
  CHECK(r->entries == b.entries);
  CHECK(r->blocks == b.blocks);
  CHECK(r->heads == b.heads);
  CHECK(r->unsigned_entries == 0);
  CHECK(r->latest_signed_size == b.entries);
  CHECK(r->root == b.root);
  CHECK(r->key_ids == std::vector<std::string>{to_hex(b.key->id())});
  REQUIRE_FALSE(calls.empty());
  CHECK(calls.back().first == calls.back().second);
  CHECK(calls.back().second == b.entries);
}

TEST_CASE("a changed entry is named by the tile hash it no longer matches", "[verifier]") {
  LedgerCopy copy;
  const std::uint64_t i = 150;
  set_entry_bytes(copy.path, i, with_actor_edited(entry_bytes(copy.path, i)));
  expect_problem(verify(copy.path), Where::kEntry, i, "match the hash stored in Merkle tile");
}

TEST_CASE("a changed entry with its tile fixed up fails its block's Merkle root", "[verifier]") {
  LedgerCopy copy;
  for (std::uint64_t i : {std::uint64_t{7}, std::uint64_t{150}, base().entries - 1}) {
    DYNAMIC_SECTION("entry " << i) {
      Bytes edited = with_actor_edited(entry_bytes(copy.path, i));
      set_entry_bytes(copy.path, i, edited);
      // The last partial group's leaf hashes are not stored, so there is no tile to fix there.
      if (i < base().entries / 16 * 16) fix_leaf_in_tile(copy.path, i, merkle::leaf_hash(edited));
      expect_problem(verify(copy.path), Where::kBlock, block_of(i), "Merkle root");
    }
  }
}

TEST_CASE("an entry that does not decode is named", "[verifier]") {
  LedgerCopy copy;
  const std::uint64_t i = 42;
  Bytes bytes = entry_bytes(copy.path, i);
  bytes.resize(bytes.size() - 3);
  set_entry_bytes(copy.path, i, bytes);
  expect_problem(verify(copy.path), Where::kEntry, i, "does not decode");
}

TEST_CASE("an entry's type or time column that disagrees with its bytes is named", "[verifier]") {
  LedgerCopy copy;
  const std::uint64_t i = 200;
  SECTION("type") {
    exec(copy.path, with_number("UPDATE entries SET type = 3 WHERE idx = {}", i));
  }
  SECTION("time") {
    exec(copy.path, with_number("UPDATE entries SET time_us = time_us + 1 WHERE idx = {}", i));
  }
  expect_problem(verify(copy.path), Where::kEntry, i, "column");
}

TEST_CASE("a deleted entry is named as missing", "[verifier]") {
  LedgerCopy copy;
  const std::uint64_t i = 123;
  exec(copy.path, with_number("DELETE FROM entries WHERE idx = {}", i));
  expect_problem(verify(copy.path), Where::kEntry, i, "is missing");
}

TEST_CASE("two entries swapped are named at the first of them", "[verifier]") {
  LedgerCopy copy;
  const std::uint64_t i = 100, j = 200;
  REQUIRE(block_of(i) != block_of(j));
  Bytes a = entry_bytes(copy.path, i), b = entry_bytes(copy.path, j);
  set_entry_bytes(copy.path, i, b);
  set_entry_bytes(copy.path, j, a);
  VerifyReport r = verify(copy.path);
  REQUIRE_FALSE(r.ok());
  INFO(r.problem->describe());
  CHECK(r.problem->where == Where::kEntry);
  CHECK(r.problem->number == i);
}

TEST_CASE("two entries of one append_all swapped are named by their tile hash", "[verifier]") {
  // Same block, same time: only the Merkle leaves tell them apart.
  LedgerCopy copy;
  const std::uint64_t i = 130;
  Bytes a = entry_bytes(copy.path, i), b = entry_bytes(copy.path, i + 1);
  REQUIRE(decode_entry(a)->time_us == decode_entry(b)->time_us);
  set_entry_bytes(copy.path, i, b);
  set_entry_bytes(copy.path, i + 1, a);
  expect_problem(verify(copy.path), Where::kEntry, i, "match the hash stored in Merkle tile");
}

TEST_CASE("a truncated tail is named", "[verifier]") {
  LedgerCopy copy;
  const std::uint64_t last = last_height(), first = first_entry_of(last);
  SECTION("the last block's entries deleted: the first missing entry") {
    exec(copy.path, with_number("DELETE FROM entries WHERE idx >= {}", first));
    expect_problem(verify(copy.path), Where::kEntry, first, "is missing");
  }
  SECTION("the last block and its entries deleted: the head that covers it") {
    exec(copy.path, with_number("DELETE FROM entries WHERE idx >= {}", first));
    exec(copy.path, with_number("DELETE FROM blocks WHERE height = {}", last));
    std::uint64_t head =
        query_uint(base().path, with_number("SELECT min(seq) FROM heads WHERE height = {}", last));
    expect_problem(verify(copy.path), Where::kHead, head, "truncated");
  }
}

TEST_CASE("an entry row beyond the last block is named", "[verifier]") {
  LedgerCopy copy;
  const std::uint64_t n = base().entries;
  exec(copy.path, "INSERT INTO entries (idx, type, time_us, bytes) SELECT " + std::to_string(n) +
                      ", type, time_us, bytes FROM entries WHERE idx = 5");
  expect_problem(verify(copy.path), Where::kEntry, n, "is not covered by any block");
}

TEST_CASE("a missing or unchained block is named", "[verifier]") {
  LedgerCopy copy;
  const std::uint64_t h = base().blocks / 2;
  SECTION("deleted") {
    exec(copy.path, with_number("DELETE FROM blocks WHERE height = {}", h));
    expect_problem(verify(copy.path), Where::kBlock, h, "is missing");
  }
  SECTION("previous hash changed") {
    Result<BlockHeader> header = decode_block_header(
        query_blob(copy.path, with_number("SELECT header FROM blocks WHERE height = {}", h)));
    REQUIRE(header.ok());
    header->previous_hash[0] ^= std::byte{1};
    exec_with_blob(copy.path, with_number("UPDATE blocks SET header = ?1 WHERE height = {}", h),
                   encode_block_header(*header));
    expect_problem(verify(copy.path), Where::kBlock, h, "does not chain");
  }
}

TEST_CASE("a head that is not properly signed is named", "[verifier]") {
  const BaseLedger& b = base();
  LedgerCopy copy;
  SECTION("re-signed by a key the ledger does not know") {
    const std::uint64_t seq = b.forged_seq;
    exec_with_blob(copy.path, with_number("UPDATE heads SET head = ?1 WHERE seq = {}", seq),
                   b.forged_head);
    exec_with_blob(copy.path, with_number("UPDATE heads SET signature = ?1 WHERE seq = {}", seq),
                   b.forged_signature);
    for (bool trust_other : {false, true}) {
      std::vector<PublicKey> trusted{*b.key};
      if (trust_other) trusted.push_back(*b.other_key);
      auto r = verify_file(copy.path, trusted);
      REQUIRE(r.ok());
      REQUIRE_FALSE(r->ok());
      INFO(r->problem->describe());
      CHECK(r->problem->where == Where::kHead);
      CHECK(r->problem->number == seq);
      CHECK_THAT(r->problem->describe(),
                 Catch::Contains("not know") || Catch::Contains("not by the ledger's key"));
    }
  }
  SECTION("signature emptied") {
    exec(copy.path, "UPDATE heads SET signature = x'' WHERE seq = 3");
    expect_problem(verify(copy.path), Where::kHead, 3, "has no signature");
  }
  SECTION("body edited, signature kept") {
    Result<HeadBody> head =
        decode_head(query_blob(copy.path, "SELECT head FROM heads WHERE seq = 4"));
    REQUIRE(head.ok());
    head->time_us += 1;
    exec_with_blob(copy.path, "UPDATE heads SET head = ?1 WHERE seq = 4", encode_head(*head));
    expect_problem(verify(copy.path), Where::kHead, 4, "signature does not verify");
  }
  SECTION("two heads' rows swapped") {
    REQUIRE(query_uint(copy.path, "SELECT height FROM heads WHERE seq = 2") <
            query_uint(copy.path, "SELECT height FROM heads WHERE seq = 3"));
    exec(copy.path,
         "UPDATE heads SET seq = -2 WHERE seq = 2; UPDATE heads SET seq = 2 WHERE seq = 3;"
         "UPDATE heads SET seq = 3 WHERE seq = -2;");
    // Head #2 now covers the later block and checks out there; #3 is out of order.
    expect_problem(verify(copy.path), Where::kHead, 3, "stored after a head for a later block");
  }
}

TEST_CASE("a verifier that trusts only another key refuses the genesis key", "[verifier]") {
  LedgerCopy copy;
  auto r = verify_file(copy.path, {*base().other_key});
  REQUIRE(r.ok());
  expect_problem(*r, Where::kFile, 0, "none of the ledger's signing keys");
}

TEST_CASE("a tail committed after the latest head verifies as unsigned, not tampered",
          "[verifier]") {
  LedgerCopy copy(base().tail_path);
  VerifyReport r = verify(copy.path);
  INFO((r.problem ? r.problem->describe() : ""));
  CHECK(r.ok());
  CHECK(r.ledger_id == "ward-9");
  CHECK(r.entries == kTailEntries + 1);
  CHECK(r.heads == 2);  // genesis, and the open's rollback-counter epoch
  CHECK(r.latest_signed_size == 1u);
  CHECK(r.unsigned_entries == kTailEntries);
}

TEST_CASE("a file that is not a ledger fails the call, with a clear reason", "[verifier]") {
  TempDir dir;
  SECTION("missing") {
    auto r = verify_file(dir / "nope.db", {*base().key});
    REQUIRE_FALSE(r.ok());
    CHECK(r.status().code() == StatusCode::kNotFound);
  }
  SECTION("a text file") {
    std::ofstream(dir / "notes.txt")
        << "this is not a ledger, just some text that is long enough\n";
    auto r = verify_file(dir / "notes.txt", {*base().key});
    REQUIRE_FALSE(r.ok());
    CHECK_THAT(r.status().message(), Catch::Contains("not a database"));
  }
  SECTION("an empty SQLite database") {
    {
      auto db = sql::Database::open(dir / "empty.db", sql::Database::Mode::kCreate);
      REQUIRE(db.ok());
      REQUIRE(db->exec("VACUUM").ok());
    }
    auto r = verify_file(dir / "empty.db", {*base().key});
    REQUIRE_FALSE(r.ok());
    CHECK(r.status().code() == StatusCode::kCorruption);
    CHECK_THAT(r.status().message(), Catch::Contains("not a medgate ledger"));
  }
  SECTION("a ledger schema with no rows") {
    LedgerCopy copy;
    exec(copy.path,
         "DELETE FROM meta; DELETE FROM entries; DELETE FROM blocks; DELETE FROM heads; DELETE "
         "FROM merkle_tiles;");
    VerifyReport r = verify(copy.path);
    REQUIRE_FALSE(r.ok());
    CHECK(r.problem->where == Where::kFile);
    CHECK_THAT(r.problem->describe(), Catch::Contains("no ledger id"));
  }
}

// The last partial group of 16 entries has no stored leaf hashes (store.cc, tile_reader()), so a
// change there is named by its block (whose entry range contains it) rather than by the entry.
TEST_CASE("a random byte flipped in any entry is always named at that entry", "[verifier]") {
  const BaseLedger& b = base();
  LedgerCopy copy;
  EntryEditor editor(copy.path);
  std::mt19937_64 rng(20240611);
  for (int iteration = 0; iteration < 200; ++iteration) {
    std::uint64_t i = std::uniform_int_distribution<std::uint64_t>(0, b.entries - 1)(rng);
    Bytes original = editor.bytes(i), flipped = original;
    std::size_t at = std::uniform_int_distribution<std::size_t>(0, flipped.size() - 1)(rng);
    flipped[at] ^= static_cast<std::byte>(std::uniform_int_distribution<int>(1, 255)(rng));
    editor.set(i, flipped);
    auto r = verify_file(copy.path, {*b.key});
    INFO("iteration " << iteration << ": entry " << i << ", byte " << at);
    REQUIRE(r.ok());
    REQUIRE_FALSE(r->ok());
    INFO("reported: " << r->problem->describe());
    if (i >= b.entries / 16 * 16) {
      bool named_entry = r->problem->where == Where::kEntry && r->problem->number == i;
      bool named_block =
          r->problem->where == Where::kBlock &&
          r->problem->describe().find("Merkle root over entries") != std::string::npos;
      CHECK((named_entry || named_block));
    } else {
      CHECK(r->problem->where == Where::kEntry);
      CHECK(r->problem->number == i);
    }
    editor.set(i, original);
  }
  CHECK(verify(copy.path).ok());  // every flip was undone
}

// Regression: the verifier streams rows upward from 0, so a row at a negative key was never read
// and the file passed. Such rows are now refused up front.
TEST_CASE("a row at a negative index is named as extra", "[verifier]") {
  LedgerCopy copy;
  SECTION("an entry at idx -1") {
    exec(copy.path,
         "INSERT INTO entries (idx, type, time_us, bytes) "
         "SELECT -1, type, time_us, bytes FROM entries WHERE idx = 5");
  }
  SECTION("a block at height -1") {
    exec(copy.path,
         "INSERT INTO blocks (height, first_index, entry_count, header) "
         "SELECT -1, -1, entry_count, header FROM blocks WHERE height = 3");
  }
  VerifyReport r = verify(copy.path);
  INFO((r.problem ? r.problem->describe() : "the verifier passed the file"));
  REQUIRE_FALSE(r.ok());
  CHECK_THAT(r.problem->describe(), Catch::Contains("-1 is stored at a number no ledger writes"));
}

TEST_CASE("a signed head deleted from the middle of the history is named", "[verifier]") {
  LedgerCopy copy;
  exec(copy.path, "DELETE FROM heads WHERE seq = 3");
  VerifyReport r = verify(copy.path);
  REQUIRE_FALSE(r.ok());
  CHECK(r.problem->where == Where::kHead);
  CHECK(r.problem->number == 3);
  CHECK_THAT(r.problem->describe(), Catch::Contains("signed head #3: is missing"));
}

// Regression: the type and time columns were compared through sqlite3_column_int64, which
// converts whatever is stored (a REAL is truncated, a BLOB or TEXT parsed), so 2.5 or the blob '2'
// passed though `WHERE type = 2` no longer finds the entry. Their storage class is now checked.
TEST_CASE("an entry's type or time column stored as a non-integer is named", "[verifier]") {
  LedgerCopy copy;
  const std::uint64_t i = 200;
  SECTION("type 2.5") {
    exec(copy.path, with_number("UPDATE entries SET type = 2.5 WHERE idx = {}", i));
  }
  SECTION("type as the blob '2'") {
    exec(copy.path, with_number("UPDATE entries SET type = CAST('2' AS BLOB) WHERE idx = {}", i));
  }
  SECTION("time + 0.5") {
    exec(copy.path, with_number("UPDATE entries SET time_us = time_us + 0.5 WHERE idx = {}", i));
  }
  REQUIRE(query_uint(copy.path,
                     with_number("SELECT typeof(type) != 'integer' OR typeof(time_us) != 'integer' "
                                 "FROM entries WHERE idx = {}",
                                 i)) == 1);
  VerifyReport r = verify(copy.path);
  CHECK_FALSE(r.ok());
  if (r.problem) {
    CHECK(r.problem->where == Where::kEntry);
    CHECK(r.problem->number == i);
    CHECK_THAT(r.problem->describe(), Catch::Contains("column"));
  }
}

// Schema 5: readers find entries by type through type_runs, which nothing signed covers. A run
// removed or shortened would hide entries from them (consent and key state at start), so the
// verifier checks that every entry lies in a run of its type and names the first that does not.
TEST_CASE("a type run deleted or shortened is named at the first entry it no longer covers",
          "[verifier]") {
  SECTION("deleted") {
    LedgerCopy copy;
    exec(copy.path, "DELETE FROM type_runs WHERE type = 2");
    VerifyReport r = verify(copy.path);
    REQUIRE_FALSE(r.ok());
    CHECK(r.problem->where == Where::kEntry);
    CHECK_THAT(r.problem->describe(), Catch::Contains("no range of type_runs for its type (2)"));
  }
  SECTION("shortened by one entry") {
    LedgerCopy copy;
    const std::uint64_t first =
        query_uint(copy.path, "SELECT min(first_index) FROM type_runs WHERE type = 2");
    exec(copy.path,
         "UPDATE type_runs SET first_index = first_index + 1 WHERE type = 2 AND "
         "first_index = " +
             std::to_string(first));
    expect_problem(verify(copy.path), Where::kEntry, first, "no range of type_runs");
  }
  SECTION("untouched, and widened (harmless: readers scan a little more)") {
    LedgerCopy copy;
    CHECK(verify(copy.path).ok());
    exec(copy.path, "UPDATE type_runs SET first_index = 0 WHERE type = 2");
    CHECK(verify(copy.path).ok());
  }
}
