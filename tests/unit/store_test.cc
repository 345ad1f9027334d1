// The ledger store against real SQLite files and a real SoftHSM token: group commit under
// concurrency, reopen, the writer lock, signed heads, proofs, disk full (a real tmpfs), fsync
// failure (an injected VFS fault: the one thing the real parts cannot be made to do on demand),
// kill -9 in the middle of concurrent appends, and the WAL staying bounded during long reads.
#include <catch2/catch.hpp>

#include <signal.h>
#include <sqlite3.h>
#include <sys/mount.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <thread>

#include "ledger/merkle.h"
#include "ledger/store.h"
#include "ledger/verifier.h"
#include "tests/support/entries.h"
#include "tests/support/softhsm.h"
#include "tests/support/temp_dir.h"

using namespace medgate;
using namespace medgate::ledger;
using medgate::testing::SoftHsmToken;
using medgate::testing::TempDir;

namespace {

using medgate::testing::note;

LedgerOptions options_for(const std::filesystem::path& path) {
  LedgerOptions o;
  o.path = path;
  o.head_interval = std::chrono::milliseconds(50);
  return o;
}

VerifyReport verify(const std::filesystem::path& path, const PublicKey& key) {
  VerifyOptions vo;
  vo.trusted_keys = {key};
  auto r = verify_ledger_file(path, vo);
  REQUIRE(r.ok());
  return *r;
}

std::uint64_t size_of(const std::filesystem::path& p) {
  std::error_code ec;
  auto n = std::filesystem::file_size(p, ec);
  return ec ? 0 : n;
}

}  // namespace

TEST_CASE("a new ledger holds the genesis block and a signed head", "[store]") {
  TempDir dir;
  SoftHsmToken token(dir.path());
  auto keys = token.open_with_key();
  auto ledger = Ledger::create(options_for(dir / "ledger.db"), "ward-7", *keys, "user:root");
  REQUIRE(ledger.ok());
  LedgerStats s = (*ledger)->stats();
  CHECK(s.ledger_id == "ward-7");
  CHECK(s.tree_size == 1);
  CHECK(s.height == 0);
  REQUIRE(s.latest_head);
  CHECK(s.latest_head->head.tree_size == 1);
  CHECK(keys->signing_key()
            .verify_digest(head_digest(s.latest_head->bytes), s.latest_head->signature)
            .ok());
  auto genesis = (*ledger)->entry(0);
  REQUIRE(genesis.ok());
  CHECK(genesis->entry.type == EntryType::kGenesis);
  CHECK(*genesis->entry.body.find("ledger_id")->as_text() == "ward-7");

  // A second create on the same path is refused.
  (*ledger)->close();
  auto again = Ledger::create(options_for(dir / "ledger.db"), "ward-7", *keys, "user:root");
  CHECK(again.status().code() == StatusCode::kFailedPrecondition);
}

TEST_CASE("concurrent appends are durable, contiguous, provable and verify", "[store]") {
  TempDir dir;
  SoftHsmToken token(dir.path());
  auto keys = token.open_with_key();
  auto path = dir / "ledger.db";
  auto created = Ledger::create(options_for(path), "ward-7", *keys, "user:root");
  REQUIRE(created.ok());
  auto& ledger = *created;

  constexpr int kThreads = 16, kPerThread = 300;
  std::vector<std::vector<std::uint64_t>> got(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t)
    threads.emplace_back([&, t] {
      for (int i = 0; i < kPerThread; ++i) {
        auto r = ledger->append(note("t" + std::to_string(t), static_cast<std::uint64_t>(i)));
        if (r.ok()) got[static_cast<std::size_t>(t)].push_back(*r);
      }
    });
  for (auto& t : threads) t.join();

  std::set<std::uint64_t> all;
  for (int t = 0; t < kThreads; ++t) {
    REQUIRE(got[static_cast<std::size_t>(t)].size() == kPerThread);
    // Each thread's entries come back in its own order.
    CHECK(std::is_sorted(got[static_cast<std::size_t>(t)].begin(),
                         got[static_cast<std::size_t>(t)].end()));
    all.insert(got[static_cast<std::size_t>(t)].begin(), got[static_cast<std::size_t>(t)].end());
  }
  CHECK(all.size() == kThreads * kPerThread);
  CHECK(*all.begin() == 1);
  CHECK(*all.rbegin() == kThreads * kPerThread);
  LedgerStats s = ledger->stats();
  CHECK(s.tree_size == kThreads * kPerThread + 1);
  CHECK(s.batches < static_cast<std::uint64_t>(kThreads * kPerThread));  // group commit grouped

  // Entry content is what its appender wrote.
  auto e = ledger->entry(got[3][7]);
  REQUIRE(e.ok());
  CHECK(*e->entry.body.find("op")->as_text() == "t3");
  CHECK(e->entry.body.find("args")->find("n")->as_uint() == 7u);

  // A signed head now covers everything; proofs check against it.
  auto head = ledger->sign_head_now();
  REQUIRE(head.ok());
  CHECK(head->head.tree_size == s.tree_size);
  for (std::uint64_t idx : std::vector<std::uint64_t>{0, 1, 1000, s.tree_size - 1}) {
    auto entry = ledger->entry(idx);
    REQUIRE(entry.ok());
    auto proof = ledger->inclusion_proof(idx, head->head.tree_size);
    REQUIRE(proof.ok());
    CHECK(merkle::verify_inclusion(idx, head->head.tree_size, entry->leaf, *proof, head->head.root)
              .ok());
  }
  auto old_root = ledger->root_at(100);
  REQUIRE(old_root.ok());
  auto consistency = ledger->consistency_proof(100, head->head.tree_size);
  REQUIRE(consistency.ok());
  CHECK(merkle::verify_consistency(100, head->head.tree_size, *old_root, head->head.root,
                                   *consistency)
            .ok());
  CHECK(ledger->entry(s.tree_size).status().code() == StatusCode::kNotFound);
  CHECK(ledger->inclusion_proof(0, s.tree_size + 1).status().code() ==
        StatusCode::kInvalidArgument);

  ledger->close();
  VerifyReport report = verify(path, keys->signing_key());
  INFO((report.problem ? report.problem->describe() : ""));
  CHECK(report.ok());
  CHECK(report.entries == s.tree_size);
  CHECK(report.unsigned_entries == 0);
  CHECK(report.root == head->head.root);
}

TEST_CASE("a ledger reopens where it stopped and refuses a second writer", "[store]") {
  TempDir dir;
  SoftHsmToken token(dir.path());
  auto keys = token.open_with_key();
  auto path = dir / "ledger.db";
  Hash root;
  {
    auto ledger = Ledger::create(options_for(path), "ward-7", *keys, "user:root");
    REQUIRE(ledger.ok());
    for (int i = 0; i < 40; ++i)
      REQUIRE((*ledger)->append(note("a", static_cast<std::uint64_t>(i))).ok());

    auto second = Ledger::open(options_for(path), *keys);
    REQUIRE_FALSE(second.ok());
    CHECK(second.status().code() == StatusCode::kFailedPrecondition);
    CHECK_THAT(second.status().message(),
               Catch::Contains("in use by process " + std::to_string(getpid())));
    root = (*ledger)->stats().root;
  }
  auto ledger = Ledger::open(options_for(path), *keys);
  REQUIRE(ledger.ok());
  CHECK((*ledger)->stats().tree_size == 41);
  CHECK((*ledger)->stats().root == root);
  // close() signed a final head covering everything.
  REQUIRE((*ledger)->latest_head());
  CHECK((*ledger)->latest_head()->head.tree_size == 41);
  auto more = (*ledger)->append(note("b"));
  REQUIRE(more.ok());
  CHECK(*more == 41);
}

TEST_CASE("open refuses a ledger whose key store holds another key", "[store]") {
  TempDir dir, other_dir;
  auto path = dir / "ledger.db";
  {
    SoftHsmToken token(dir.path());
    auto keys = token.open_with_key();
    REQUIRE(Ledger::create(options_for(path), "ward-7", *keys, "user:root").ok());
  }
  SoftHsmToken other(other_dir.path(), "other");
  auto other_keys = other.open_with_key();
  auto opened = Ledger::open(options_for(path), *other_keys);
  REQUIRE_FALSE(opened.ok());
  CHECK(opened.status().code() == StatusCode::kFailedPrecondition);
  CHECK_THAT(opened.status().message(), Catch::Contains("does not hold this ledger's signing key"));
}

TEST_CASE("a full disk fails the append loudly and later appends succeed once there is room",
          "[store][disk]") {
  if (geteuid() != 0) {
    WARN("skipped: mounting a small tmpfs needs root");
    return;
  }
  TempDir dir;
  SoftHsmToken token(dir.path());
  auto keys = token.open_with_key();
  auto mnt = dir / "small";
  std::filesystem::create_directory(mnt);
  REQUIRE(::mount("tmpfs", mnt.c_str(), "tmpfs", 0, "size=1m") == 0);
  struct Unmount {
    std::filesystem::path p;
    ~Unmount() { ::umount2(p.c_str(), MNT_DETACH); }
  } unmount{mnt};

  auto path = mnt / "ledger.db";
  auto ledger = Ledger::create(options_for(path), "ward-7", *keys, "user:root");
  REQUIRE(ledger.ok());
  // Fill the disk with a ballast file, then append until the ledger hits the wall.
  {
    std::ofstream ballast(mnt / "ballast", std::ios::binary);
    std::string block(4096, 'x');
    while (ballast.write(block.data(), block.size())) {
    }
  }
  Status failure;
  std::uint64_t acked = 0;
  for (int i = 0; i < 20000 && failure.ok(); ++i) {
    auto r = (*ledger)->append(note(std::string(200, 'p'), static_cast<std::uint64_t>(i)));
    if (r.ok())
      ++acked;
    else
      failure = r.status();
  }
  REQUIRE_FALSE(failure.ok());
  CHECK(failure.code() == StatusCode::kIOError);
  CHECK_THAT(failure.message(), Catch::Contains("disk full"));
  CHECK((*ledger)->stats().failed_appends >= 1);
  CHECK((*ledger)->stats().tree_size == acked + 1);

  std::filesystem::remove(mnt / "ballast");
  auto after = (*ledger)->append(note("after"));
  REQUIRE(after.ok());
  CHECK(*after == acked + 1);
  (*ledger)->close();
  VerifyReport report = verify(path, keys->signing_key());
  INFO((report.problem ? report.problem->describe() : ""));
  CHECK(report.ok());
  CHECK(report.entries == acked + 2);
}

// ---- fsync failure: a VFS shim over the default one that fails xSync on demand ----
namespace {
std::atomic<bool> g_fail_sync{false};
sqlite3_vfs* g_real_vfs = nullptr;
sqlite3_vfs g_shim_vfs;
sqlite3_io_methods g_shim_methods;
const sqlite3_io_methods* g_real_methods = nullptr;

struct ShimFile {
  sqlite3_file base;
  sqlite3_file* real;
};

int shim_sync(sqlite3_file* f, int flags) {
  if (g_fail_sync.load()) return SQLITE_IOERR_FSYNC;
  auto* s = reinterpret_cast<ShimFile*>(f);
  return s->real->pMethods->xSync(s->real, flags);
}

int shim_open(sqlite3_vfs*, sqlite3_filename name, sqlite3_file* file, int flags, int* out_flags) {
  auto* s = reinterpret_cast<ShimFile*>(file);
  s->real = reinterpret_cast<sqlite3_file*>(reinterpret_cast<char*>(file) + sizeof(ShimFile));
  int rc = g_real_vfs->xOpen(g_real_vfs, name, s->real, flags, out_flags);
  if (rc != SQLITE_OK || !s->real->pMethods) {
    s->base.pMethods = nullptr;
    return rc;
  }
  if (!g_real_methods) {
    g_real_methods = s->real->pMethods;
    g_shim_methods = *g_real_methods;
    // Forward everything to the real file except xSync.
#define FWD(name, ...)                                   \
  g_shim_methods.name = [](sqlite3_file* f, auto... a) { \
    auto* r = reinterpret_cast<ShimFile*>(f)->real;      \
    return r->pMethods->name(r, a...);                   \
  };
    FWD(xClose)
    FWD(xRead)
    FWD(xWrite)
    FWD(xTruncate)
    FWD(xFileSize)
    FWD(xLock)
    FWD(xUnlock)
    FWD(xCheckReservedLock)
    FWD(xFileControl)
    FWD(xSectorSize)
    FWD(xDeviceCharacteristics)
    FWD(xShmMap)
    FWD(xShmLock)
    FWD(xShmBarrier)
    FWD(xShmUnmap)
    FWD(xFetch)
    FWD(xUnfetch)
#undef FWD
    g_shim_methods.xSync = shim_sync;
  }
  s->base.pMethods = &g_shim_methods;
  return rc;
}

void install_shim_vfs() {
  if (g_real_vfs) return;
  g_real_vfs = sqlite3_vfs_find(nullptr);
  g_shim_vfs = *g_real_vfs;
  g_shim_vfs.zName = "medgate-fsync-fault";
  g_shim_vfs.szOsFile = static_cast<int>(sizeof(ShimFile)) + g_real_vfs->szOsFile;
  g_shim_vfs.xOpen = shim_open;
  sqlite3_vfs_register(&g_shim_vfs, /*makeDflt=*/1);
}
void remove_shim_vfs() {
  if (!g_real_vfs) return;
  sqlite3_vfs_register(g_real_vfs, 1);
  sqlite3_vfs_unregister(&g_shim_vfs);
  g_real_vfs = nullptr;
  g_real_methods = nullptr;
}
}  // namespace

TEST_CASE("an fsync failure stops the writer for good: nothing is retried as if it were fine",
          "[store][disk]") {
  TempDir dir;
  SoftHsmToken token(dir.path());
  auto keys = token.open_with_key();
  auto path = dir / "ledger.db";
  REQUIRE(Ledger::create(options_for(path), "ward-7", *keys, "user:root").ok());
  install_shim_vfs();
  struct Restore {
    ~Restore() {
      g_fail_sync = false;
      remove_shim_vfs();
    }
  } restore;
  std::uint64_t acked = 0;
  {
    auto ledger = Ledger::open(options_for(path), *keys);
    REQUIRE(ledger.ok());
    for (int i = 0; i < 10; ++i) REQUIRE((*ledger)->append(note("before")).ok());
    acked = 10;
    g_fail_sync = true;
    auto failed = (*ledger)->append(note("during"));
    REQUIRE_FALSE(failed.ok());
    CHECK(failed.status().code() == StatusCode::kIOError);
    g_fail_sync = false;
    // The disk "works" again, but the writer does not pretend the failed state was fine.
    auto later = (*ledger)->append(note("after"));
    REQUIRE_FALSE(later.ok());
    CHECK_THAT(later.status().message(), Catch::Contains("stopped writing"));
    CHECK_FALSE((*ledger)->stats().writer_error.empty());
  }
  remove_shim_vfs();
  auto reopened = Ledger::open(options_for(path), *keys);
  REQUIRE(reopened.ok());
  CHECK((*reopened)->stats().tree_size >= acked + 1);
  REQUIRE((*reopened)->append(note("after reopen")).ok());
  (*reopened)->close();
  VerifyReport report = verify(path, keys->signing_key());
  INFO((report.problem ? report.problem->describe() : ""));
  CHECK(report.ok());
}

TEST_CASE("kill -9 during concurrent appends loses nothing that was acknowledged",
          "[store][crash]") {
  TempDir dir;
  auto path = dir / "ledger.db";
  SoftHsmToken token(dir.path());
  KeyId key_id;
  {
    auto keys = token.open_with_key();
    key_id = keys->signing_key().id();
    REQUIRE(Ledger::create(options_for(path), "ward-7", *keys, "user:root").ok());
  }  // the module is finalised here, so the child initialises its own after fork

  int fds[2];
  REQUIRE(::pipe(fds) == 0);
  pid_t child = ::fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    ::close(fds[0]);
    auto keys = hsm::open_key_store(token.config());
    if (!keys.ok()) _exit(3);
    auto ledger = Ledger::open(options_for(path), **keys);
    if (!ledger.ok()) _exit(4);
    std::mutex out_mu;
    std::vector<std::thread> threads;
    for (int t = 0; t < 8; ++t)
      threads.emplace_back([&, t] {
        for (std::uint64_t i = 0;; ++i) {
          auto r = (*ledger)->append(note("crash-" + std::to_string(t), i));
          if (!r.ok()) _exit(5);
          // Acknowledged: tell the parent which index holds which (thread, i).
          std::string line =
              std::to_string(*r) + " " + std::to_string(t) + " " + std::to_string(i) + "\n";
          std::lock_guard lk(out_mu);
          if (::write(fds[1], line.data(), line.size()) < 0) _exit(6);
        }
      });
    for (auto& t : threads) t.join();
    _exit(0);
  }
  ::close(fds[1]);
  std::map<std::uint64_t, std::pair<int, std::uint64_t>> acked;
  std::string buffer;
  char chunk[4096];
  while (acked.size() < 3000) {
    ssize_t n = ::read(fds[0], chunk, sizeof chunk);
    if (n <= 0) break;
    buffer.append(chunk, static_cast<std::size_t>(n));
    std::size_t nl;
    while ((nl = buffer.find('\n')) != std::string::npos) {
      std::uint64_t idx, i;
      int t;
      if (std::sscanf(buffer.substr(0, nl).c_str(), "%lu %d %lu", &idx, &t, &i) == 3)
        acked[idx] = {t, i};
      buffer.erase(0, nl + 1);
    }
  }
  ::kill(child, SIGKILL);
  int status = 0;
  ::waitpid(child, &status, 0);
  ::close(fds[0]);
  REQUIRE(acked.size() >= 3000);

  auto keys = token.open_with_key();
  REQUIRE(keys->signing_key().id() == key_id);
  auto ledger = Ledger::open(options_for(path), *keys);
  REQUIRE(ledger.ok());
  for (const auto& [idx, who] : acked) {
    auto e = (*ledger)->entry(idx);
    REQUIRE(e.ok());
    CHECK(*e->entry.body.find("op")->as_text() == "crash-" + std::to_string(who.first));
    CHECK(e->entry.body.find("args")->find("n")->as_uint() == who.second);
  }
  (*ledger)->close();
  VerifyReport report = verify(path, keys->signing_key());
  INFO((report.problem ? report.problem->describe() : ""));
  CHECK(report.ok());
  CHECK(report.entries > acked.rbegin()->first);
}

TEST_CASE("the WAL stays bounded while verifications read the live ledger", "[store][wal]") {
  TempDir dir;
  SoftHsmToken token(dir.path());
  auto keys = token.open_with_key();
  auto path = dir / "ledger.db";
  auto wal = path;
  wal += "-wal";
  LedgerOptions o = options_for(path);
  o.wal_limit_bytes = 4 << 20;
  auto ledger = Ledger::create(o, "ward-7", *keys, "user:root");
  REQUIRE(ledger.ok());

  auto write_mib = [&](int mib) {
    std::vector<Entry> batch(200, note(std::string(500, 'w')));
    std::uint64_t max_wal = 0;
    for (int written = 0; written < mib * 1024 * 1024; written += 200 * 560) {
      REQUIRE((*ledger)->append_all(batch).ok());
      max_wal = std::max(max_wal, size_of(wal));
    }
    return max_wal;
  };

  SECTION("chunked verification does not pin the WAL") {
    std::atomic<bool> stop{false};
    std::atomic<int> verifications{0};
    std::mutex problem_mu;
    std::string problem;  // a verification of the live ledger must come out clean
    std::thread reader([&] {
      while (!stop) {
        VerifyOptions vo;
        vo.trusted_keys = {keys->signing_key()};
        auto r = verify_ledger_file(path, vo);
        if (!r.ok()) continue;
        ++verifications;
        std::lock_guard lk(problem_mu);
        if (!r->ok() && problem.empty()) problem = r->problem->describe();
      }
    });
    std::uint64_t max_wal = write_mib(60);
    stop = true;
    reader.join();
    CHECK(verifications > 0);
    CHECK(problem == "");
    CHECK(max_wal < 24u << 20);
  }
  SECTION("a reader that holds one snapshot makes it grow, so the bound above means something") {
    sqlite3* db = nullptr;
    REQUIRE(sqlite3_open_v2(path.c_str(), &db, SQLITE_OPEN_READONLY, nullptr) == SQLITE_OK);
    REQUIRE(sqlite3_exec(db, "BEGIN; SELECT count(*) FROM entries;", nullptr, nullptr, nullptr) ==
            SQLITE_OK);
    std::uint64_t max_wal = write_mib(60);
    sqlite3_exec(db, "COMMIT", nullptr, nullptr, nullptr);
    sqlite3_close(db);
    CHECK(max_wal > 24u << 20);
  }
}

TEST_CASE("asynchronous appends complete once durable, in order, and push back when full",
          "[store]") {
  TempDir dir;
  SoftHsmToken token(dir.path());
  auto keys = token.open_with_key();
  auto path = dir / "ledger.db";
  LedgerOptions o = options_for(path);
  o.max_queued_entries = 64;
  auto ledger = Ledger::create(o, "ward-7", *keys, "user:root");
  REQUIRE(ledger.ok());

  std::mutex mu;
  std::condition_variable cv;
  std::vector<std::uint64_t> indexes;
  int done = 0, busy = 0, failed = 0;
  const int kAppends = 2000;
  for (int i = 0; i < kAppends; ++i) {
    Entry e = note("async", static_cast<std::uint64_t>(i));
    for (;;) {
      Status s = (*ledger)->append_async(std::span(&e, 1), [&](Result<std::uint64_t> r) {
        std::lock_guard lk(mu);  // the writer's thread: no Catch assertions here
        if (r.ok())
          indexes.push_back(*r);
        else
          ++failed;
        ++done;
        cv.notify_all();
      });
      if (s.ok()) break;
      REQUIRE(s.code() == StatusCode::kUnavailable);  // the queue is full: back off
      ++busy;
      std::this_thread::yield();
    }
  }
  {
    std::unique_lock lk(mu);
    cv.wait(lk, [&] { return done == kAppends; });
  }
  REQUIRE(failed == 0);
  std::sort(indexes.begin(), indexes.end());
  for (int i = 0; i < kAppends; ++i) CHECK(indexes[static_cast<std::size_t>(i)] == 1u + i);
  // Every completed append is durable: a fresh reader sees it.
  CHECK((*ledger)->stats().tree_size == 1u + kAppends);
  INFO("queue-full answers: " << busy);
  Entry bad = note("x");
  bad.actor.clear();
  CHECK((*ledger)
            ->append_async(std::span(&bad, 1), [](Result<std::uint64_t>) { std::abort(); })
            .code() == StatusCode::kInvalidArgument);
  (*ledger)->close();
  CHECK(verify(path, keys->signing_key()).ok());
}

namespace {

// One integer from a query on a read-only connection of its own.
std::int64_t query_int(const std::filesystem::path& path, const std::string& sql) {
  sqlite3* db = nullptr;
  REQUIRE(sqlite3_open_v2(path.c_str(), &db, SQLITE_OPEN_READONLY, nullptr) == SQLITE_OK);
  sqlite3_stmt* st = nullptr;
  INFO(sql);
  REQUIRE(sqlite3_prepare_v2(db, sql.c_str(), -1, &st, nullptr) == SQLITE_OK);
  REQUIRE(sqlite3_step(st) == SQLITE_ROW);
  std::int64_t v = sqlite3_column_int64(st, 0);
  sqlite3_finalize(st);
  sqlite3_close(db);
  return v;
}

Entry of_type(EntryType type, std::uint64_t n) {
  using cbor::Value;
  if (type == EntryType::kAdminAction) return medgate::testing::note("op", n);
  Entry e;
  e.type = type;
  e.actor = "user:test";
  if (type == EntryType::kKeyEvent)
    e.body = *Value::map({{Value::text("event"), Value::text("registered")},
                          {Value::text("key_id"), Value::bytes(Bytes(32, std::byte(n & 0xff)))}});
  else
    e.body = *Value::map({{Value::text("event"), Value::text("add")},
                          {Value::text("device"), Value::text("pump-" + std::to_string(n))},
                          {Value::text("kind"), Value::text("coap")}});
  return e;
}

}  // namespace

// Schema 5: type_runs instead of an index row per entry. The readers must see exactly the entries
// a scan would, whatever the mix of types per block, across reopens (open runs end at the tree
// size), and a type that fills consecutive blocks must cost one run, not one row per block.
TEST_CASE("entries of a type are found through the type runs across blocks and reopens",
          "[store][types]") {
  TempDir dir;
  SoftHsmToken token(dir.path());
  auto keys = token.open_with_key();
  auto path = dir / "ledger.db";
  std::vector<EntryType> types = {EntryType::kGenesis};  // by index
  std::mt19937_64 rng(20261126);
  const EntryType kinds[] = {EntryType::kAdminAction, EntryType::kKeyEvent,
                             EntryType::kDeviceEvent};
  auto append_blocks = [&](Ledger& ledger, int blocks, std::function<EntryType()> pick) {
    for (int b = 0; b < blocks; ++b) {
      std::vector<Entry> batch;
      const std::size_t n = 1 + rng() % 9;
      for (std::size_t i = 0; i < n; ++i) batch.push_back(of_type(pick(), types.size() + i));
      auto first = ledger.append_all(batch);
      REQUIRE(first.ok());
      REQUIRE(*first == types.size());
      for (const Entry& e : batch) types.push_back(e.type);
    }
  };
  auto mixed = [&] { return kinds[rng() % 16 == 0 ? 1 + rng() % 2 : 0]; };
  auto admin_only = [] { return EntryType::kAdminAction; };
  {
    auto ledger = Ledger::create(options_for(path), "ward-7", *keys, "user:root");
    REQUIRE(ledger.ok());
    append_blocks(**ledger, 60, mixed);
  }
  std::int64_t admin_runs = 0;
  for (int reopen = 0; reopen < 2; ++reopen) {
    auto ledger = Ledger::open(options_for(path), *keys);
    REQUIRE(ledger.ok());
    append_blocks(**ledger, 30, mixed);
    // 40 blocks of admin actions alone extend one run (open since the last block held the type
    // or starting in the first of them): at most one more row for the type, none for the others.
    admin_runs = query_int(path, "SELECT count(*) FROM type_runs WHERE type = 2");
    const std::int64_t all_runs = query_int(path, "SELECT count(*) FROM type_runs");
    append_blocks(**ledger, 40, admin_only);
    (*ledger)->close();
    CHECK(query_int(path, "SELECT count(*) FROM type_runs WHERE type = 2") <= admin_runs + 1);
    CHECK(query_int(path, "SELECT count(*) FROM type_runs") <= all_runs + 1);
    admin_runs = query_int(path, "SELECT count(*) FROM type_runs WHERE type = 2");
  }
  // Admin actions fill nearly every block: a handful of runs, not one per block or entry.
  const auto total = static_cast<std::int64_t>(types.size());
  CHECK(admin_runs < total / 4);
  // Every entry lies in a run of its type; the runs of a type do not overlap.
  CHECK(query_int(path,
                  "SELECT count(*) FROM entries e WHERE NOT EXISTS (SELECT 1 FROM type_runs "
                  "r WHERE r.type = e.type AND e.idx >= r.first_index AND e.idx < "
                  "r.end_index)") == 0);
  CHECK(query_int(path,
                  "SELECT count(*) FROM type_runs a JOIN type_runs b ON a.type = b.type AND "
                  "a.end_index < b.end_index AND b.first_index < a.end_index") == 0);
  CHECK(query_int(path, "SELECT count(*) FROM entries") == total);

  auto ledger = Ledger::open(options_for(path), *keys);
  REQUIRE(ledger.ok());
  const std::vector<std::vector<EntryType>> queries = {
      {EntryType::kAdminAction},
      {EntryType::kKeyEvent},
      {EntryType::kDeviceEvent},
      {EntryType::kKeyEvent, EntryType::kDeviceEvent},
      {EntryType::kDeviceEvent, EntryType::kGenesis, EntryType::kAdminAction},
      {EntryType::kPatientErasure}};
  for (const auto& q : queries) {
    for (std::uint64_t from : {std::uint64_t{0}, std::uint64_t{1}, rng() % types.size(),
                               rng() % types.size(), std::uint64_t(types.size())}) {
      for (std::size_t limit : {std::size_t{1}, std::size_t{7}, std::size_t{100000}}) {
        std::vector<std::uint64_t> want;
        for (std::uint64_t i = from; i < types.size() && want.size() < limit; ++i)
          if (std::find(q.begin(), q.end(), types[i]) != q.end()) want.push_back(i);
        auto got = (*ledger)->entries_of_type(q, from, limit);
        REQUIRE(got.ok());
        std::vector<std::uint64_t> got_indexes;
        for (const StoredEntry& e : *got) {
          got_indexes.push_back(e.index);
          CHECK(std::find(q.begin(), q.end(), e.entry.type) != q.end());
        }
        INFO("types " << q.size() << " from " << from << " limit " << limit);
        CHECK(got_indexes == want);
      }
    }
  }
}

// Schema 5 stores complete Merkle tiles only; the partial tile at each level's right edge is
// recomputed from the level below (store.cc, tile_reader()). After a reopen at a size with partial
// tiles at three levels, roots and proofs to every size near the edge still come out right.
TEST_CASE("only complete Merkle tiles are stored and the right edge is recomputed on reopen",
          "[store][tiles]") {
  TempDir dir;
  SoftHsmToken token(dir.path());
  auto keys = token.open_with_key();
  auto path = dir / "ledger.db";
  const std::uint64_t size = 4096 + 2 * 256 + 3 * 16 + 5;  // partial tiles at levels 0, 1 and 2
  std::vector<Hash> roots;
  {
    auto ledger = Ledger::create(options_for(path), "ward-7", *keys, "user:root");
    REQUIRE(ledger.ok());
    std::mt19937_64 rng(7);
    while ((*ledger)->stats().tree_size < size) {
      const std::uint64_t n =
          std::min<std::uint64_t>(1 + rng() % 300, size - (*ledger)->stats().tree_size);
      std::vector<Entry> batch;
      for (std::uint64_t i = 0; i < n; ++i) batch.push_back(medgate::testing::note("t", i));
      REQUIRE((*ledger)->append_all(batch).ok());
    }
    for (std::uint64_t s = 1; s <= size; ++s) {
      auto r = (*ledger)->root_at(s);
      REQUIRE(r.ok());
      roots.push_back(*r);
    }
  }
  // Complete tiles only: floor(size / 16^(t+1)) at each level t.
  std::int64_t complete = 0;
  for (std::uint64_t width = 16; width <= size; width *= 16)
    complete += static_cast<std::int64_t>(size / width);
  CHECK(query_int(path, "SELECT count(*) FROM merkle_tiles") == complete);
  CHECK(query_int(path, "SELECT count(*) FROM merkle_tiles WHERE length(hashes) != 512") == 0);

  auto ledger = Ledger::open(options_for(path), *keys);
  REQUIRE(ledger.ok());
  REQUIRE((*ledger)->stats().tree_size == size);
  CHECK((*ledger)->stats().root == roots.back());
  for (std::uint64_t s : {size, size - 1, size - 5, size - 6, size - 53, std::uint64_t{4096},
                          std::uint64_t{4095}, std::uint64_t{4097}, std::uint64_t{17}}) {
    auto r = (*ledger)->root_at(s);
    REQUIRE(r.ok());
    CHECK(*r == roots[s - 1]);
    for (std::uint64_t i : {std::uint64_t{0}, s / 2, s - 1}) {
      auto entry = (*ledger)->entry(i);
      REQUIRE(entry.ok());
      auto proof = (*ledger)->inclusion_proof(i, s);
      REQUIRE(proof.ok());
      CHECK(merkle::verify_inclusion(i, s, entry->leaf, *proof, roots[s - 1]).ok());
    }
  }
  auto consistency = (*ledger)->consistency_proof(4000, size);
  REQUIRE(consistency.ok());
  CHECK(merkle::verify_consistency(4000, size, roots[3999], roots.back(), *consistency).ok());
  // The tiles completed after the reopen are stored as they complete.
  std::vector<Entry> more;
  for (int i = 0; i < 16 * 16; ++i) more.push_back(medgate::testing::note("u", 0));
  REQUIRE((*ledger)->append_all(more).ok());
  (*ledger)->close();
  std::int64_t after = 0;
  for (std::uint64_t width = 16; width <= size + 256; width *= 16)
    after += static_cast<std::int64_t>((size + 256) / width);
  CHECK(query_int(path, "SELECT count(*) FROM merkle_tiles") == after);
  CHECK(verify(path, (*ledger)->active_key()).ok());
}

// A verification of the live ledger reads type_runs while the writer keeps starting runs (a type
// that comes back after a block without it). What the verifier reads later must not be judged by
// an older read of that table: every verification of an untouched ledger comes out clean.
TEST_CASE("verifications of a live ledger whose writer starts new type runs stay clean",
          "[store][types]") {
  TempDir dir;
  SoftHsmToken token(dir.path());
  auto keys = token.open_with_key();
  auto path = dir / "ledger.db";
  auto ledger = Ledger::create(options_for(path), "ward-7", *keys, "user:root");
  REQUIRE(ledger.ok());
  // A ledger long enough that a verification takes a while, with a key event early on so that
  // the verifier starts reading that type's runs long before the end.
  REQUIRE((*ledger)->append_all(std::vector<Entry>{of_type(EntryType::kKeyEvent, 0)}).ok());
  for (int i = 0; i < 100; ++i)
    REQUIRE((*ledger)->append_all(std::vector<Entry>(1000, medgate::testing::note("bulk"))).ok());

  std::atomic<bool> stop{false};
  std::thread writer([&] {
    // Key events and admin actions in alternate blocks: each key event starts a new run.
    for (std::uint64_t n = 1; !stop; ++n) {
      if (!(*ledger)->append_all(std::vector<Entry>{of_type(EntryType::kKeyEvent, n)}).ok()) return;
      if (!(*ledger)->append_all(std::vector<Entry>(50, medgate::testing::note("x"))).ok()) return;
    }
  });
  int clean = 0;
  std::string problem;
  for (int i = 0; i < 6 && problem.empty(); ++i) {
    VerifyOptions vo;
    vo.trusted_keys = {keys->signing_key()};
    auto r = verify_ledger_file(path, vo);
    REQUIRE(r.ok());
    if (r->ok())
      ++clean;
    else
      problem = r->problem->describe();
  }
  stop = true;
  writer.join();
  INFO(problem);
  CHECK(clean == 6);
  CHECK(query_int(path, "SELECT count(*) FROM type_runs WHERE type = 3") > 6);
}
