// bench_ledger: the ledger's record-worthy numbers, each printed beside a plain-SQLite baseline
// and the issue's target. A benchmark, not a test: nothing here judges a time; `--smoke` (a
// ctest) runs every phase with tiny counts only so that the benchmark cannot rot.
//
//   1. Appends: 1, 8 and 64 threads each call Ledger::append (one entry, durable on return) in a
//      loop; entries/s and p50/p99 of the time spent in append().
//   2. The "traditional centralized" baseline at the same concurrency: the same entry bytes in a
//      plain SQLite table (WAL, synchronous=FULL) behind a group-commit writer of the ledger's
//      shape, so the ratio isolates what the ledger adds (canonical encoding, leaf hashing, Merkle
//      tiles, block headers, signed heads); plus a naive row per thread and connection.
//      The same two again with asynchronous appenders (Ledger::append_async, as medgated's ingest
//      appends: one append in flight per appender, no thread waiting per entry).
//      And the floor under both: the same bytes to a plain file, pwrite + fdatasync, behind a
//      group commit that wakes each batch with one futex call: what any store of one-entry,
//      durable-on-return appends can reach on this disk and these cores.
//   3. verify_ledger_file over N entries, beside a bare scan that SHA-256es every stored entry.
//   4. `--rss`: peak RSS while 10M entries are appended.
//
// Run a Release build; `bench_ledger --help` lists the flags.
#include <fcntl.h>
#include <sched.h>
#include <sqlite3.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/utsname.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <ctime>
#include <deque>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <latch>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include <fmt/format.h>

#include "hsm/key_store_factory.h"
#include "ledger/entry.h"
#include "ledger/merkle.h"
#include "ledger/sqlite.h"
#include "ledger/store.h"
#include "ledger/verifier.h"
#include "tests/bench/bench_util.h"
#include "tests/support/temp_dir.h"

namespace medgate::bench {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;
using ledger::Entry;
using ledger::Ledger;

constexpr std::size_t kEntryBytes = 200;    // canonical size of a benchmark entry
constexpr std::uint64_t kFillBatch = 5000;  // entries per append_all when filling a ledger
constexpr int kFillThreads = 4;             // threads calling append_all when filling
constexpr std::chrono::milliseconds kHeadInterval{1000};  // as in production
constexpr double kTargetRatio = 1.3;                      // ledger / baseline time at 64 appenders
constexpr double kTargetAppendRate = 250'000;             // entries/s at 64 appenders
constexpr double kTargetVerifyRate = 1'000'000;           // entries/s
constexpr double kTargetPeakRssMiB = 64;                  // at 10M entries

constexpr std::string_view kUsage = R"(usage: bench_ledger [flags]

Prints the ledger's append throughput and commit latency at 1, 8 and 64 appender threads beside a
plain SQLite log doing the same group commit, and the verifier's speed beside a bare scan.

  --seconds N          seconds per append phase (default 5; fractions allowed)
  --verify-entries N   entries in the ledger that is verified (default 1000000)
  --only append|verify run only the append phases or only the verification phase
  --rss                instead of the default run: append 10,000,000 entries (append_all batches,
                       a few threads) to a fresh ledger and print peak RSS before, during and
                       after, and the file size. Takes a minute or more; runs alone so that the
                       peak is the writer's.
  --rss-entries N      entries for --rss (default 10000000)
  --dir PATH           where the ledgers go (default /var/tmp, since /tmp may be tmpfs); a
                       scratch directory is made under it and removed at the end
  --smoke              every phase with tiny counts, in a few seconds (the ctest)
  --help               this text
)";

// ---- command line ----

enum class Only { kAll, kAppend, kVerify };

struct Options {
  double seconds = 5;
  std::uint64_t verify_entries = 1'000'000;
  std::uint64_t rss_entries = 10'000'000;
  bool rss = false;
  bool smoke = false;
  bool help = false;
  Only only = Only::kAll;
  fs::path dir = "/var/tmp";
};

Result<std::uint64_t> parse_count(std::string_view flag, std::string_view text) {
  std::uint64_t v = 0;
  if (text.empty()) return Status::InvalidArgument(fmt::format("{} needs a number", flag));
  for (char c : text) {
    if (c == '_' || c == ',') continue;  // 1_000_000 and 1,000,000 read as 1000000
    if (c < '0' || c > '9')
      return Status::InvalidArgument(fmt::format("{} {}: not a count", flag, text));
    v = v * 10 + static_cast<std::uint64_t>(c - '0');
  }
  return v;
}

Result<Options> parse_args(int argc, char** argv) {
  Options o;
  bool seconds_set = false, verify_set = false, rss_entries_set = false;
  for (int i = 1; i < argc; ++i) {
    std::string_view a = argv[i];
    auto value = [&]() -> Result<std::string_view> {
      if (i + 1 >= argc) return Status::InvalidArgument(fmt::format("{} needs a value", a));
      return std::string_view(argv[++i]);
    };
    if (a == "--help" || a == "-h") {
      o.help = true;
    } else if (a == "--smoke") {
      o.smoke = true;
    } else if (a == "--rss") {
      o.rss = true;
    } else if (a == "--seconds") {
      MEDGATE_ASSIGN_OR_RETURN(std::string_view v, value());
      char* end = nullptr;
      std::string s(v);
      o.seconds = std::strtod(s.c_str(), &end);
      if (end != s.c_str() + s.size() || !(o.seconds > 0) || o.seconds > 3600)
        return Status::InvalidArgument(
            fmt::format("--seconds {}: want a number of seconds in (0, 3600]", v));
      seconds_set = true;
    } else if (a == "--verify-entries") {
      MEDGATE_ASSIGN_OR_RETURN(std::string_view v, value());
      MEDGATE_ASSIGN_OR_RETURN(o.verify_entries, parse_count(a, v));
      if (o.verify_entries == 0)
        return Status::InvalidArgument("--verify-entries must be at least 1");
      verify_set = true;
    } else if (a == "--rss-entries") {
      MEDGATE_ASSIGN_OR_RETURN(std::string_view v, value());
      MEDGATE_ASSIGN_OR_RETURN(o.rss_entries, parse_count(a, v));
      if (o.rss_entries == 0) return Status::InvalidArgument("--rss-entries must be at least 1");
      rss_entries_set = true;
    } else if (a == "--only") {
      MEDGATE_ASSIGN_OR_RETURN(std::string_view v, value());
      if (v == "append")
        o.only = Only::kAppend;
      else if (v == "verify")
        o.only = Only::kVerify;
      else
        return Status::InvalidArgument(fmt::format("--only {}: want append or verify", v));
    } else if (a == "--dir") {
      MEDGATE_ASSIGN_OR_RETURN(std::string_view v, value());
      o.dir = fs::path(v);
    } else {
      return Status::InvalidArgument(fmt::format("unknown argument {} (see --help)", a));
    }
  }
  if (o.rss && o.only != Only::kAll)
    return Status::InvalidArgument("--rss runs alone; it does not combine with --only");
  if (o.smoke) {
    if (!seconds_set) o.seconds = 0.25;
    if (!verify_set) o.verify_entries = 20'000;
    if (!rss_entries_set) o.rss_entries = 20'000;
  }
  return o;
}

// ---- formatting ----

std::string mib(std::uint64_t bytes) {
  return fmt::format("{:.1f}", static_cast<double>(bytes) / (1 << 20));
}

// ---- the machine ----

struct MountInfo {
  std::string device, mount_point, type, options;
};

// The mount holding `path`: the longest mount point that is a prefix of it.
MountInfo mount_of(const fs::path& path) {
  std::error_code ec;
  std::string p = fs::canonical(path, ec).string();
  std::ifstream in("/proc/self/mounts");
  MountInfo best;
  std::string device, mount_point, type, options;
  while (in >> device >> mount_point >> type >> options) {
    in.ignore(256, '\n');
    bool under = p == mount_point || mount_point == "/" ||
                 (p.rfind(mount_point, 0) == 0 && p.size() > mount_point.size() &&
                  p[mount_point.size()] == '/');
    if (under && mount_point.size() >= best.mount_point.size())
      best = {device, mount_point, type, options};
  }
  return best;
}

void print_header(int argc, char** argv, const fs::path& scratch, const Percentiles& disk,
                  int fsync_samples, std::size_t entry_size) {
  std::string command;
  for (int i = 0; i < argc; ++i) {
    if (i > 0) command += ' ';
    command += argv[i];
  }
  utsname u{};
  uname(&u);
  MountInfo m = mount_of(scratch);
  std::uint64_t mem_kib = 0;
  (void)std::sscanf(first_line_with("/proc/meminfo", "MemTotal").c_str(), "%lu", &mem_kib);
#ifdef NDEBUG
  const char* build = "assertions off";
#else
  const char* build = "ASSERTIONS ON: not a Release build, the numbers are not representative";
#endif
  fmt::print("medgate ledger benchmark (medgate {}, g++ {}, {}, SQLite {})\n", MEDGATE_VERSION,
             __VERSION__, build, sqlite3_libversion());
  fmt::print("  command:  {}\n", command);
  double load[3] = {0, 0, 0};
  if (std::FILE* f = std::fopen("/proc/loadavg", "r")) {
    (void)std::fscanf(f, "%lf %lf %lf", &load[0], &load[1], &load[2]);
    std::fclose(f);
  }
  fmt::print("  date:     {} (load average at start: {:.2f} {:.2f} {:.2f})\n", utc_now(), load[0],
             load[1], load[2]);
  fmt::print("  machine:  {} CPUs (nproc), {}, {} {} {}, {:.1f} GiB RAM\n", cpus_available(),
             first_line_with("/proc/cpuinfo", "model name"), u.sysname, u.release, u.machine,
             static_cast<double>(mem_kib) / (1 << 20));
  fmt::print("  ledgers:  {} on {} ({}, mounted at {}, {})\n", scratch.string(), m.type, m.device,
             m.mount_point, m.options);
  fmt::print("  fsync:    4 KiB append + fdatasync: p50 {:.3f} ms, p99 {:.3f} ms ({} samples)\n",
             disk.p50_ms, disk.p99_ms, fsync_samples);
  fmt::print(
      "  entries:  admin-action, {} bytes canonical; head_interval {} ms; heads signed by "
      "SoftHSM\n\n",
      entry_size, kHeadInterval.count());
  std::fflush(stdout);
}

// ---- memory ----

struct Memory {
  std::uint64_t hwm_kib = 0, rss_kib = 0;
};

Memory memory_now() {
  Memory m;
  (void)std::sscanf(first_line_with("/proc/self/status", "VmHWM").c_str(), "%lu", &m.hwm_kib);
  (void)std::sscanf(first_line_with("/proc/self/status", "VmRSS").c_str(), "%lu", &m.rss_kib);
  if (m.hwm_kib == 0) {  // no /proc: getrusage has the peak only
    rusage ru{};
    getrusage(RUSAGE_SELF, &ru);
    m.hwm_kib = static_cast<std::uint64_t>(ru.ru_maxrss);
  }
  return m;
}

std::uint64_t size_of(const fs::path& p) {
  std::error_code ec;
  auto n = fs::file_size(p, ec);
  return ec ? 0 : n;
}

fs::path with_suffix(fs::path p, const char* suffix) {
  p += suffix;
  return p;
}

// ---- entries ----

// Builds admin-action entries of kEntryBytes canonical bytes:
// {"op": "bench", "args": {"n": n, "pad": <text>}}.
class EntryMaker {
 public:
  static Result<EntryMaker> create() {
    EntryMaker m;
    for (std::size_t pad = 0; pad < kEntryBytes; ++pad) {
      m.pad_.assign(pad, 'p');
      MEDGATE_ASSIGN_OR_RETURN(Entry e, m.make(1'000'000));
      MEDGATE_ASSIGN_OR_RETURN(Bytes bytes, ledger::encode_entry(e));
      m.size_ = bytes.size();
      if (bytes.size() >= kEntryBytes) break;
    }
    return m;
  }

  Result<Entry> make(std::uint64_t n) const {
    using ledger::cbor::Value;
    MEDGATE_ASSIGN_OR_RETURN(Value args, Value::map({{Value::text("n"), Value::uint(n)},
                                                     {Value::text("pad"), Value::text(pad_)}}));
    MEDGATE_ASSIGN_OR_RETURN(Value body, Value::map({{Value::text("op"), Value::text("bench")},
                                                     {Value::text("args"), std::move(args)}}));
    Entry e;
    e.type = ledger::EntryType::kAdminAction;
    e.time_us = ledger::now_us();
    e.actor = "user:bench";
    e.body = std::move(body);
    return e;
  }

  std::size_t size() const { return size_; }

 private:
  EntryMaker() = default;
  std::string pad_;
  std::size_t size_ = 0;
};

// ---- the append driver ----

// What a store's commits wrote: the frames in its WAL at the end of a row (those of the WAL's
// current generation: the salts match the header's), each frame a page, mapped to the table or
// index the page belongs to with SQLite's dbstat. The write path's I/O, which the ratio to the
// baseline is mostly about.
struct WalProfile {
  std::uint64_t frames = 0, commits = 0;
  std::map<std::string, std::uint64_t> by_table;  // frames per table or index ("?": unknown)
};

std::uint32_t be32(std::string_view b, std::size_t at) {
  std::uint32_t v = 0;
  for (std::size_t k = 0; k < 4; ++k) v = (v << 8) | static_cast<unsigned char>(b[at + k]);
  return v;
}

// The WAL format: a 32-byte header (page size at 8, salts at 16 and 20), then frames of a 24-byte
// header (page number at 0, the database size after a commit at 4, else 0; salts at 8 and 12) and
// one page (https://www.sqlite.org/fileformat.html, "WAL File Format").
Result<WalProfile> wal_profile(const fs::path& db) {
  std::ifstream in(fs::path(db.string() + "-wal"), std::ios::binary);
  std::string wal((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  WalProfile p;
  if (wal.size() < 32) return p;
  const std::size_t page = be32(wal, 8);
  if (page < 512) return Status::Corruption("the WAL header's page size is not one");
  std::map<std::uint32_t, std::uint64_t> pages;  // page number -> frames
  for (std::size_t at = 32; at + 24 + page <= wal.size(); at += 24 + page) {
    if (be32(wal, at + 8) != be32(wal, 16) || be32(wal, at + 12) != be32(wal, 20)) break;
    ++pages[be32(wal, at)];
    ++p.frames;
    if (be32(wal, at + 4) != 0) ++p.commits;
  }
  MEDGATE_ASSIGN_OR_RETURN(auto conn,
                           ledger::sql::Database::open(db, ledger::sql::Database::Mode::kReadOnly));
  MEDGATE_ASSIGN_OR_RETURN(auto st, conn.prepare("SELECT name, pageno FROM dbstat"));
  std::map<std::uint32_t, std::string> owner;
  for (;;) {
    MEDGATE_ASSIGN_OR_RETURN(auto step, st.step());
    if (step != ledger::sql::Statement::Step::kRow) break;
    owner[static_cast<std::uint32_t>(st.column_uint(1))] = st.column_text(0);
  }
  for (const auto& [number, frames] : pages) {
    auto it = owner.find(number);
    p.by_table[it == owner.end() ? "?" : it->second] += frames;
  }
  return p;
}

// "13.8 pages per commit: tiles 5.3, entries 3.9, ..." (largest first).
std::string describe(const WalProfile& p) {
  if (p.commits == 0) return "no commits in the WAL";
  std::vector<std::pair<std::uint64_t, std::string>> order;
  for (const auto& [table, frames] : p.by_table) order.emplace_back(frames, table);
  std::sort(order.rbegin(), order.rend());
  const auto per = [&](std::uint64_t n) {
    return static_cast<double>(n) / static_cast<double>(p.commits);
  };
  std::string out = fmt::format("{:.1f} pages per commit ({} commits):", per(p.frames), p.commits);
  for (const auto& [frames, table] : order) out += fmt::format(" {} {:.1f},", table, per(frames));
  out.pop_back();
  return out;
}

struct AppendRun {
  std::string store;
  int threads = 0;
  std::uint64_t entries = 0;
  double seconds = 0;
  Percentiles latency;
  std::uint64_t commits = 0;  // group commits; 0 where each append is its own
  std::string wal;            // describe(wal_profile()) where measured
  double per_second() const { return seconds > 0 ? static_cast<double>(entries) / seconds : 0; }
};

// Runs `threads` threads for `seconds`, each looping: item = prepare(thread, n) untimed, then
// commit(item) timed. Stops at the first error.
template <typename Prepare, typename Commit>
Result<AppendRun> run_appenders(std::string store, int threads, double seconds, Prepare prepare,
                                Commit commit) {
  std::vector<std::vector<std::int64_t>> latencies(static_cast<std::size_t>(threads));
  std::atomic<bool> stop{false};
  std::latch start(threads + 1);
  std::mutex error_mu;
  Status first_error;
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      auto& mine = latencies[static_cast<std::size_t>(t)];
      mine.reserve(1 << 16);
      start.arrive_and_wait();
      for (std::uint64_t i = 0; !stop.load(std::memory_order_relaxed); ++i) {
        auto item =
            prepare(t, i * static_cast<std::uint64_t>(threads) + static_cast<std::uint64_t>(t));
        Status s = item.status();
        if (s.ok()) {
          auto t0 = Clock::now();
          s = commit(*item);
          if (s.ok())
            mine.push_back(
                std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - t0).count());
        }
        if (!s.ok()) {
          std::lock_guard lk(error_mu);
          if (first_error.ok()) first_error = s;
          stop = true;
          return;
        }
      }
    });
  }
  start.arrive_and_wait();
  auto t0 = Clock::now();
  std::this_thread::sleep_for(std::chrono::duration<double>(seconds));
  stop = true;
  for (auto& th : pool) th.join();
  double elapsed = std::chrono::duration<double>(Clock::now() - t0).count();
  if (!first_error.ok())
    return first_error.with_context(fmt::format("{} with {} threads", store, threads));

  AppendRun run;
  run.store = std::move(store);
  run.threads = threads;
  run.seconds = elapsed;
  std::vector<std::int64_t> all;
  for (auto& v : latencies) {
    all.insert(all.end(), v.begin(), v.end());
    std::vector<std::int64_t>().swap(v);
  }
  run.entries = all.size();
  run.latency = percentiles(all);
  return run;
}

// Asynchronous appenders: each has one append in flight at a time and starts its next as soon as
// the previous one is durable, as medgated's ingest does (appliance/pipeline.cc appends with
// Ledger::append_async and acknowledges from the callback). No thread waits per entry: the
// completion (on the store's writer thread) hands the appender to one of kAsyncDrivers driver
// threads, which makes its next entry and submits it. Latency is from the submit to the
// completion. submit(n, done) starts entry n and arranges done(status) once it is durable.
constexpr int kAsyncDrivers = 2;

template <typename Submit>
Result<AppendRun> run_async_appenders(std::string store, int appenders, double seconds,
                                      Submit submit) {
  struct Driver {
    std::mutex mu;
    std::condition_variable cv;
    std::vector<int> ready;
  };
  std::vector<std::unique_ptr<Driver>> drivers;
  for (int d = 0; d < kAsyncDrivers; ++d) drivers.push_back(std::make_unique<Driver>());
  const auto count = static_cast<std::size_t>(appenders);
  std::vector<Clock::time_point> started(count);
  std::vector<std::vector<std::int64_t>> latencies(count);
  std::vector<std::uint64_t> next(count, 0);
  std::atomic<bool> stop{false};
  std::atomic<int> in_flight{0};
  std::mutex error_mu;
  Status first_error;
  auto fail = [&](Status s) {
    std::lock_guard lk(error_mu);
    if (first_error.ok()) first_error = std::move(s);
    stop = true;
  };
  auto done = [&](int a, Status s) {
    auto now = Clock::now();
    auto i = static_cast<std::size_t>(a);
    if (!s.ok())
      fail(std::move(s));
    else if (!stop.load(std::memory_order_relaxed))
      latencies[i].push_back(
          std::chrono::duration_cast<std::chrono::nanoseconds>(now - started[i]).count());
    Driver& d = *drivers[i % drivers.size()];
    bool was_idle;
    {
      std::lock_guard lk(d.mu);
      was_idle = d.ready.empty();
      d.ready.push_back(a);
    }
    if (was_idle) d.cv.notify_one();
    // Last: once in_flight reaches 0 the caller returns and destroys what this touched.
    in_flight.fetch_sub(1);
  };
  for (int a = 0; a < appenders; ++a)
    drivers[static_cast<std::size_t>(a) % drivers.size()]->ready.push_back(a);
  std::latch start(kAsyncDrivers + 1);
  std::vector<std::thread> pool;
  for (auto& owned : drivers) {
    pool.emplace_back([&, d = owned.get()] {
      start.arrive_and_wait();
      std::vector<int> mine;
      for (;;) {
        {
          std::unique_lock lk(d->mu);
          d->cv.wait(lk, [&] { return !d->ready.empty() || stop.load(); });
          if (stop.load()) return;
          mine.swap(d->ready);
        }
        for (int a : mine) {
          auto i = static_cast<std::size_t>(a);
          std::uint64_t n = next[i]++ * count + i;
          started[i] = Clock::now();
          in_flight.fetch_add(1);
          if (Status s = submit(n, [&done, a](Status st) { done(a, std::move(st)); }); !s.ok()) {
            in_flight.fetch_sub(1);
            fail(std::move(s));
            return;
          }
        }
        mine.clear();
      }
    });
  }
  start.arrive_and_wait();
  auto t0 = Clock::now();
  std::this_thread::sleep_for(std::chrono::duration<double>(seconds));
  stop = true;
  double elapsed = std::chrono::duration<double>(Clock::now() - t0).count();
  for (auto& d : drivers) {
    std::lock_guard lk(d->mu);  // a driver between its check and its wait sees stop
  }
  for (auto& d : drivers) d->cv.notify_all();
  for (auto& th : pool) th.join();
  while (in_flight.load() > 0) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  if (!first_error.ok())
    return first_error.with_context(fmt::format("{} with {} appenders", store, appenders));

  AppendRun run;
  run.store = std::move(store);
  run.threads = appenders;
  run.seconds = elapsed;
  std::vector<std::int64_t> all;
  for (auto& v : latencies) all.insert(all.end(), v.begin(), v.end());
  run.entries = all.size();
  run.latency = percentiles(all);
  return run;
}

ledger::LedgerOptions ledger_options(const fs::path& path) {
  ledger::LedgerOptions o;
  o.path = path;
  o.head_interval = kHeadInterval;
  return o;
}

Result<AppendRun> bench_ledger_appends(const fs::path& dir, hsm::KeyStore& signer,
                                       const EntryMaker& maker, int threads, double seconds) {
  MEDGATE_ASSIGN_OR_RETURN(
      std::unique_ptr<Ledger> ledger,
      Ledger::create(ledger_options(dir / "ledger.db"), "bench-append", signer, "user:bench"));
  MEDGATE_ASSIGN_OR_RETURN(
      AppendRun run,
      run_appenders(
          "ledger", threads, seconds, [&](int, std::uint64_t n) { return maker.make(n); },
          [&](const Entry& e) { return ledger->append(e).status(); }));
  ledger::LedgerStats stats = ledger->stats();
  run.commits = stats.batches;
  Result<WalProfile> wal = wal_profile(dir / "ledger.db");
  run.wal = wal.ok() ? describe(*wal) : wal.status().message();
  ledger->close();
  if (!stats.writer_error.empty()) return Status::IOError("ledger writer: " + stats.writer_error);
  return run;
}

Result<AppendRun> bench_ledger_async(const fs::path& dir, hsm::KeyStore& signer,
                                     const EntryMaker& maker, int appenders, double seconds) {
  MEDGATE_ASSIGN_OR_RETURN(std::unique_ptr<Ledger> ledger,
                           Ledger::create(ledger_options(dir / "ledger-async.db"), "bench-append",
                                          signer, "user:bench"));
  auto submit = [&](std::uint64_t n, std::function<void(Status)> done) -> Status {
    MEDGATE_ASSIGN_OR_RETURN(Entry e, maker.make(n));
    return ledger->append_async(
        std::span(&e, 1), [done = std::move(done)](Result<std::uint64_t> r) { done(r.status()); });
  };
  MEDGATE_ASSIGN_OR_RETURN(AppendRun run,
                           run_async_appenders("ledger, async", appenders, seconds, submit));
  ledger::LedgerStats stats = ledger->stats();
  run.commits = stats.batches;
  ledger->close();
  if (!stats.writer_error.empty()) return Status::IOError("ledger writer: " + stats.writer_error);
  return run;
}

// ---- the baselines ----

Result<ledger::sql::Database> open_plain_log(const fs::path& path,
                                             ledger::sql::Database::Mode mode) {
  MEDGATE_ASSIGN_OR_RETURN(auto db, ledger::sql::Database::open(path, mode));
  MEDGATE_RETURN_IF_ERROR(db.exec("PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;"));
  return db;
}

Status create_plain_log(const fs::path& path) {
  MEDGATE_ASSIGN_OR_RETURN(auto db, open_plain_log(path, ledger::sql::Database::Mode::kCreate));
  return db.exec("CREATE TABLE log(idx INTEGER PRIMARY KEY, bytes BLOB)");
}

// The "traditional centralized" log: rows in one SQLite table, written the way the ledger writes
// (callers queue rows; one writer inserts all queued rows in one IMMEDIATE transaction, commits
// in WAL mode with synchronous=FULL, then wakes them) but with nothing else: no encoding, no
// hashing, no tiles, no block headers. SQLite's default autocheckpoint (1000 pages, on the
// writer) stands in for the ledger's checkpointer thread.
class GroupCommitLog {
 public:
  static Result<std::unique_ptr<GroupCommitLog>> create(const fs::path& path,
                                                        std::size_t max_batch) {
    MEDGATE_RETURN_IF_ERROR(create_plain_log(path));
    MEDGATE_ASSIGN_OR_RETURN(auto db,
                             open_plain_log(path, ledger::sql::Database::Mode::kReadWrite));
    MEDGATE_ASSIGN_OR_RETURN(auto insert, db.prepare("INSERT INTO log(idx, bytes) VALUES (?, ?)"));
    std::unique_ptr<GroupCommitLog> log(
        new GroupCommitLog(std::move(db), std::move(insert), max_batch));
    log->writer_ = std::thread([p = log.get()] { p->writer_loop(); });
    return log;
  }

  ~GroupCommitLog() {
    {
      std::lock_guard lk(mu_);
      stop_ = true;
    }
    writer_cv_.notify_one();
    writer_.join();
  }

  // Returns once the row is durable.
  Status append(ByteView bytes) {
    Row row;
    row.bytes = bytes;
    {
      std::lock_guard lk(mu_);
      queue_.push_back(&row);
    }
    writer_cv_.notify_one();
    std::unique_lock lk(row.mu);
    row.cv.wait(lk, [&] { return row.done; });
    return row.status;
  }

  // Takes the row and calls `done` (on the writer thread) once it is durable.
  Status append_async(Bytes bytes, std::function<void(Status)> done) {
    auto row = std::make_unique<Row>();
    row->owned = std::move(bytes);
    row->bytes = ByteView(row->owned);
    row->on_done = std::move(done);
    {
      std::lock_guard lk(mu_);
      queue_.push_back(row.release());
    }
    writer_cv_.notify_one();
    return Status::Ok();
  }

  std::uint64_t commits() const { return commits_.load(); }

 private:
  // Woken one by one, as the ledger wakes its appenders (store.cc's Job), so that the comparison
  // is of the work done, not of two wake-up schemes.
  struct Row {
    ByteView bytes;
    std::mutex mu;
    std::condition_variable cv;
    bool done = false;
    Status status;
    Bytes owned;                          // an asynchronous row's bytes
    std::function<void(Status)> on_done;  // an asynchronous row: called instead of waking
  };

  GroupCommitLog(ledger::sql::Database db, ledger::sql::Statement insert, std::size_t max_batch)
      : db_(std::move(db)), insert_(std::move(insert)), max_batch_(max_batch) {}

  void writer_loop() {
    std::vector<Row*> batch;
    for (;;) {
      std::unique_lock lk(mu_);
      writer_cv_.wait(lk, [&] { return !queue_.empty() || stop_; });
      if (queue_.empty()) return;
      while (!queue_.empty() && batch.size() < max_batch_) {
        batch.push_back(queue_.front());
        queue_.pop_front();
      }
      lk.unlock();
      Status s = write(batch);
      for (Row* r : batch) {
        if (r->on_done) {
          auto callback = std::move(r->on_done);
          delete r;
          callback(s);
          continue;
        }
        std::lock_guard row_lock(r->mu);
        r->status = s;
        r->done = true;
        r->cv.notify_one();
      }
      batch.clear();
    }
  }

  Status write(const std::vector<Row*>& batch) {
    MEDGATE_ASSIGN_OR_RETURN(auto tx, ledger::sql::Transaction::immediate(db_));
    for (const Row* r : batch) {
      insert_.bind(1, next_index_).bind(2, r->bytes);
      MEDGATE_RETURN_IF_ERROR(insert_.run());
      ++next_index_;
    }
    MEDGATE_RETURN_IF_ERROR(tx.commit());
    commits_.fetch_add(1);
    return Status::Ok();
  }

  ledger::sql::Database db_;  // writer thread only
  ledger::sql::Statement insert_;
  std::size_t max_batch_;
  std::uint64_t next_index_ = 0;
  std::atomic<std::uint64_t> commits_{0};
  std::mutex mu_;
  std::condition_variable writer_cv_;
  std::deque<Row*> queue_;
  bool stop_ = false;
  std::thread writer_;
};

// Both baselines store what the ledger would: the entry's canonical bytes, encoded untimed.
auto baseline_prepare(const EntryMaker& maker) {
  return [&maker](int, std::uint64_t n) -> Result<Bytes> {
    MEDGATE_ASSIGN_OR_RETURN(Entry e, maker.make(n));
    return ledger::encode_entry(e);
  };
}

Result<AppendRun> bench_group_commit(const fs::path& dir, const EntryMaker& maker, int threads,
                                     double seconds) {
  MEDGATE_ASSIGN_OR_RETURN(
      auto log,
      GroupCommitLog::create(dir / "plain.db", ledger::LedgerOptions{}.max_batch_entries));
  MEDGATE_ASSIGN_OR_RETURN(
      AppendRun run,
      run_appenders("sqlite, group commit", threads, seconds, baseline_prepare(maker),
                    [&](const Bytes& b) { return log->append(b); }));
  run.commits = log->commits();
  Result<WalProfile> wal = wal_profile(dir / "plain.db");
  run.wal = wal.ok() ? describe(*wal) : wal.status().message();
  return run;
}

Result<AppendRun> bench_group_commit_async(const fs::path& dir, const EntryMaker& maker,
                                           int appenders, double seconds) {
  MEDGATE_ASSIGN_OR_RETURN(
      auto log,
      GroupCommitLog::create(dir / "plain-async.db", ledger::LedgerOptions{}.max_batch_entries));
  auto encode = baseline_prepare(maker);
  auto submit = [&](std::uint64_t n, std::function<void(Status)> done) -> Status {
    MEDGATE_ASSIGN_OR_RETURN(Bytes b, encode(0, n));
    return log->append_async(std::move(b), std::move(done));
  };
  MEDGATE_ASSIGN_OR_RETURN(AppendRun run, run_async_appenders("sqlite, group commit, async",
                                                              appenders, seconds, submit));
  run.commits = log->commits();
  return run;
}

// The floor under any group commit of one-entry appenders on this disk: no SQLite, no ledger.
// Callers copy their bytes into the open batch; one writer appends it to a plain file with pwrite
// and fdatasync and then wakes all of that batch's callers with one futex call (not one wake per
// caller, as the ledger and the SQLite baseline do). What this reaches at 64 threads bounds what
// any store can reach here when every append waits for its own durability.
class RawGroupCommit {
 public:
  static Result<std::unique_ptr<RawGroupCommit>> create(const fs::path& path) {
    int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) return Status::IOError(fmt::format("cannot create {}", path.string()));
    // Written once up front, so that the appends overwrite allocated blocks (as SQLite's WAL does
    // once it has grown) instead of growing the file, which costs a metadata write each time.
    Bytes zeros(1 << 20);
    for (std::int64_t at = 0; at < kRawFileBytes; at += static_cast<std::int64_t>(zeros.size())) {
      if (::pwrite(fd, zeros.data(), zeros.size(), at) != static_cast<ssize_t>(zeros.size())) {
        ::close(fd);
        return Status::IOError(fmt::format("cannot fill {}", path.string()));
      }
    }
    if (::fsync(fd) != 0) {
      ::close(fd);
      return Status::IOError(fmt::format("fsync on {} failed", path.string()));
    }
    std::unique_ptr<RawGroupCommit> raw(new RawGroupCommit(fd));
    raw->writer_ = std::thread([p = raw.get()] { p->writer_loop(); });
    return raw;
  }

  ~RawGroupCommit() {
    {
      std::lock_guard lk(mu_);
      stop_ = true;
    }
    writer_cv_.notify_one();
    writer_.join();
    ::close(fd_);
  }

  Status append(ByteView bytes) {
    std::shared_ptr<Batch> batch;
    {
      std::lock_guard lk(mu_);
      open_->bytes.insert(open_->bytes.end(), bytes.begin(), bytes.end());
      batch = open_;
    }
    writer_cv_.notify_one();
    while (batch->done.load() == 0) batch->done.wait(0);
    return batch->ok ? Status::Ok() : Status::IOError("pwrite or fdatasync failed");
  }

  std::uint64_t commits() const { return commits_.load(); }

 private:
  static constexpr std::int64_t kRawFileBytes = 64 << 20;

  struct Batch {
    Bytes bytes;
    bool ok = false;  // written before `done` is set
    std::atomic<std::uint32_t> done{0};
  };

  explicit RawGroupCommit(int fd) : fd_(fd), open_(std::make_shared<Batch>()) {}

  void writer_loop() {
    for (;;) {
      std::shared_ptr<Batch> batch;
      {
        std::unique_lock lk(mu_);
        writer_cv_.wait(lk, [&] { return !open_->bytes.empty() || stop_; });
        if (open_->bytes.empty()) return;
        batch = std::exchange(open_, std::make_shared<Batch>());
      }
      const auto size = static_cast<ssize_t>(batch->bytes.size());
      batch->ok = ::pwrite(fd_, batch->bytes.data(), batch->bytes.size(), offset_) == size &&
                  ::fdatasync(fd_) == 0;
      offset_ += size;
      if (offset_ + (1 << 20) > kRawFileBytes) offset_ = 0;  // round and round, like a WAL
      commits_.fetch_add(1);
      batch->done.store(1);
      batch->done.notify_all();
    }
  }

  int fd_;
  off_t offset_ = 0;  // writer thread only
  std::atomic<std::uint64_t> commits_{0};
  std::mutex mu_;
  std::condition_variable writer_cv_;
  std::shared_ptr<Batch> open_;
  bool stop_ = false;
  std::thread writer_;
};

Result<AppendRun> bench_raw_floor(const fs::path& dir, const EntryMaker& maker, int threads,
                                  double seconds) {
  MEDGATE_ASSIGN_OR_RETURN(auto raw, RawGroupCommit::create(dir / "raw.log"));
  MEDGATE_ASSIGN_OR_RETURN(
      AppendRun run,
      run_appenders("floor: file, no SQLite", threads, seconds, baseline_prepare(maker),
                    [&](const Bytes& b) { return raw->append(b); }));
  run.commits = raw->commits();
  return run;
}

// The naive log: each thread has its own connection and commits its own row; SQLite's write lock
// serialises them (the busy handler backs off and retries).
Result<AppendRun> bench_naive(const fs::path& dir, const EntryMaker& maker, int threads,
                              double seconds) {
  fs::path path = dir / "naive.db";
  MEDGATE_RETURN_IF_ERROR(create_plain_log(path));
  struct Connection {
    ledger::sql::Database db;
    ledger::sql::Statement insert;
  };
  std::vector<Connection> connections;
  for (int t = 0; t < threads; ++t) {
    MEDGATE_ASSIGN_OR_RETURN(auto db,
                             open_plain_log(path, ledger::sql::Database::Mode::kReadWrite));
    sqlite3_busy_timeout(db.handle(), 60'000);
    MEDGATE_ASSIGN_OR_RETURN(auto insert, db.prepare("INSERT INTO log(bytes) VALUES (?)"));
    connections.push_back({std::move(db), std::move(insert)});
  }
  // The thread index travels with the item so that commit() uses the thread's own connection.
  auto prepare = [&, encode = baseline_prepare(maker)](
                     int t, std::uint64_t n) -> Result<std::pair<int, Bytes>> {
    MEDGATE_ASSIGN_OR_RETURN(Bytes b, encode(t, n));
    return std::pair<int, Bytes>(t, std::move(b));
  };
  auto commit = [&](const std::pair<int, Bytes>& item) -> Status {
    Connection& c = connections[static_cast<std::size_t>(item.first)];
    MEDGATE_ASSIGN_OR_RETURN(auto tx, ledger::sql::Transaction::immediate(c.db));
    MEDGATE_RETURN_IF_ERROR(c.insert.bind(1, ByteView(item.second)).run());
    return tx.commit();
  };
  return run_appenders("sqlite, naive (own conn)", threads, seconds, prepare, commit);
}

Status run_append_phases(const fs::path& scratch, hsm::KeyStore& signer, const EntryMaker& maker,
                         const Options& options) {
  fmt::print(
      "Appends: each thread calls append() with one entry and waits until it is durable,\n"
      "in a loop for {:.2f} s per row; latency is the time spent in that call. Async rows:\n"
      "each appender has one append_async() in flight and starts its next once the previous\n"
      "is durable ({} driver threads submit, the writer calls back; medgated's ingest path),\n"
      "latency from submit to callback. Baselines\n"
      "write the same entry bytes (encoded outside the timed call) to\n"
      "`log(idx INTEGER PRIMARY KEY, bytes BLOB)`, WAL, synchronous=FULL; a fresh file per row.\n",
      options.seconds, kAsyncDrivers);
  Table table({"store", "threads", "entries", "entries/s", "p50 ms", "p99 ms", "max ms", "commits",
               "entries/commit"});
  Table ratios(
      {"appenders", "ledger entries/s", "baseline entries/s", "ledger/baseline time", "target"});
  std::optional<AppendRun> ledger_at_64, async_at_64;
  std::vector<std::string> wal_lines;
  for (int threads : {1, 8, 64}) {
    auto add = [&](const AppendRun& r) {
      table.row({r.store, std::to_string(r.threads), grouped(r.entries), rate(r.per_second()),
                 fmt::format("{:.3f}", r.latency.p50_ms), fmt::format("{:.3f}", r.latency.p99_ms),
                 fmt::format("{:.1f}", r.latency.max_ms), r.commits ? grouped(r.commits) : "-",
                 r.commits ? fmt::format("{:.1f}", static_cast<double>(r.entries) /
                                                       static_cast<double>(r.commits))
                           : "1"});
    };
    fs::path dir = scratch / fmt::format("append-{}", threads);
    fs::create_directories(dir);
    MEDGATE_ASSIGN_OR_RETURN(AppendRun led,
                             bench_ledger_appends(dir, signer, maker, threads, options.seconds));
    add(led);
    MEDGATE_ASSIGN_OR_RETURN(AppendRun base,
                             bench_group_commit(dir, maker, threads, options.seconds));
    add(base);
    if (threads <= 8) {
      MEDGATE_ASSIGN_OR_RETURN(AppendRun naive, bench_naive(dir, maker, threads, options.seconds));
      add(naive);
    }
    MEDGATE_ASSIGN_OR_RETURN(AppendRun floor,
                             bench_raw_floor(dir, maker, threads, options.seconds));
    add(floor);
    MEDGATE_ASSIGN_OR_RETURN(AppendRun led_async,
                             bench_ledger_async(dir, signer, maker, threads, options.seconds));
    add(led_async);
    MEDGATE_ASSIGN_OR_RETURN(AppendRun base_async,
                             bench_group_commit_async(dir, maker, threads, options.seconds));
    add(base_async);
    fs::remove_all(dir);
    auto ratio_row = [&](std::string label, const AppendRun& l, const AppendRun& b) {
      double ratio = l.per_second() > 0 ? b.per_second() / l.per_second() : 0;
      ratios.row({std::move(label), rate(l.per_second()), rate(b.per_second()),
                  fmt::format("{:.2f}x", ratio),
                  threads == 64 ? fmt::format("<= {:.1f}x", kTargetRatio) : ""});
    };
    ratio_row(fmt::format("{} threads", threads), led, base);
    wal_lines.push_back(fmt::format("ledger, {} threads: {}", threads, led.wal));
    wal_lines.push_back(fmt::format("sqlite baseline, {} threads: {}", threads, base.wal));
    ratio_row(fmt::format("{} async", threads), led_async, base_async);
    if (threads == 64) {
      ledger_at_64 = led;
      async_at_64 = led_async;
    }
  }
  fmt::print("\n");
  table.print();
  fmt::print(
      "\nLedger time per entry over the group-commit baseline's (baseline entries/s / ledger "
      "entries/s):\n\n");
  ratios.print();
  fmt::print(
      "\nWAL pages written per commit, by table or index (the frames in the WAL at the end of "
      "the row,\nmapped with SQLite's dbstat; sqlite_schema is page 1, the file header):\n\n");
  for (const std::string& line : wal_lines) fmt::print("  {}\n", line);
  if (ledger_at_64 && async_at_64)
    fmt::print(
        "\n  ledger at 64 appenders: {} entries/s as threads, {} entries/s async (target >= "
        "{})\n\n",
        rate(ledger_at_64->per_second()), rate(async_at_64->per_second()), rate(kTargetAppendRate));
  return Status::Ok();
}

// ---- filling a ledger ----

struct FillResult {
  std::uint64_t entries = 0;
  double seconds = 0;
};

// Appends `count` entries with append_all in kFillBatch batches from kFillThreads threads. Calls
// `tick(appended so far)` from this thread every 100 ms or so.
Result<FillResult> fill_ledger(Ledger& ledger, const EntryMaker& maker, std::uint64_t count,
                               const std::function<void(std::uint64_t)>& tick) {
  std::atomic<std::uint64_t> next{0};
  std::atomic<int> running{kFillThreads};
  std::mutex error_mu;
  Status first_error;
  auto t0 = Clock::now();
  std::vector<std::thread> pool;
  for (int t = 0; t < kFillThreads; ++t) {
    pool.emplace_back([&] {
      std::vector<Entry> batch;
      for (;;) {
        std::uint64_t first = next.fetch_add(kFillBatch);
        if (first >= count) break;
        std::uint64_t n = std::min(kFillBatch, count - first);
        batch.clear();
        Status s;
        for (std::uint64_t i = 0; i < n && s.ok(); ++i) {
          Result<Entry> e = maker.make(first + i);
          if (e.ok())
            batch.push_back(std::move(e).value());
          else
            s = e.status();
        }
        if (s.ok()) s = ledger.append_all(batch).status();
        if (!s.ok()) {
          std::lock_guard lk(error_mu);
          if (first_error.ok()) first_error = s;
          next = count;
          break;
        }
      }
      running.fetch_sub(1);
    });
  }
  while (running.load() > 0) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    if (tick) tick(ledger.stats().appended);
  }
  for (auto& th : pool) th.join();
  if (!first_error.ok()) return first_error.with_context("filling the ledger");
  return FillResult{count, std::chrono::duration<double>(Clock::now() - t0).count()};
}

// ---- verification ----

// The floor under any verifier: read every stored entry once and hash it as a Merkle leaf.
struct ScanResult {
  std::uint64_t rows = 0;
  double seconds = 0;
};

Result<ScanResult> scan_and_hash(const fs::path& path) {
  auto t0 = Clock::now();
  MEDGATE_ASSIGN_OR_RETURN(
      auto db, ledger::sql::Database::open(path, ledger::sql::Database::Mode::kReadOnly));
  MEDGATE_ASSIGN_OR_RETURN(auto st, db.prepare("SELECT bytes FROM entries"));
  ScanResult scan;
  for (;;) {
    MEDGATE_ASSIGN_OR_RETURN(auto step, st.step());
    if (step == ledger::sql::Statement::Step::kDone) break;
    (void)ledger::merkle::leaf_hash(st.column_blob(0));  // out of line: not optimised away
    ++scan.rows;
  }
  scan.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  return scan;
}

Status run_verify_phase(const fs::path& scratch, hsm::KeyStore& signer, const EntryMaker& maker,
                        const Options& options) {
  fs::path dir = scratch / "verify";
  fs::create_directories(dir);
  fs::path path = dir / "ledger.db";
  FillResult fill;
  {
    MEDGATE_ASSIGN_OR_RETURN(
        std::unique_ptr<Ledger> ledger,
        Ledger::create(ledger_options(path), "bench-verify", signer, "user:bench"));
    MEDGATE_ASSIGN_OR_RETURN(fill, fill_ledger(*ledger, maker, options.verify_entries, nullptr));
    ledger->close();  // signs a final head and checkpoints the WAL into the file
  }
  std::uint64_t total = options.verify_entries + 1;  // with the genesis entry
  fmt::print(
      "Verification: a ledger of {} entries ({} + genesis), {} MiB on disk, built in {:.1f} s\n"
      "({} entries/s via append_all x {} from {} threads), then closed. The page cache is warm\n"
      "(the file was just written), so this is CPU, not disk.\n\n",
      grouped(total), grouped(options.verify_entries),
      mib(size_of(path) + size_of(with_suffix(path, "-wal"))), fill.seconds,
      rate(static_cast<double>(fill.entries) / fill.seconds), kFillBatch, kFillThreads);

  MEDGATE_ASSIGN_OR_RETURN(ScanResult scan, scan_and_hash(path));

  ledger::VerifyOptions vo;
  vo.trusted_keys.push_back(signer.signing_key());
  auto t0 = Clock::now();
  MEDGATE_ASSIGN_OR_RETURN(ledger::VerifyReport report, ledger::verify_ledger_file(path, vo));
  double verify_seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  if (!report.ok())
    return Status::VerificationFailed("the benchmark ledger does not verify: " +
                                      report.problem->describe());
  if (report.entries != total || scan.rows != total)
    return Status::Internal(fmt::format("verified {} and scanned {} entries, expected {}",
                                        report.entries, scan.rows, total));

  double verify_rate = static_cast<double>(report.entries) / verify_seconds;
  double scan_rate = static_cast<double>(scan.rows) / scan.seconds;
  Table table({"pass", "entries", "seconds", "entries/s", "target"});
  table.row({"verify_ledger_file", grouped(report.entries), fmt::format("{:.3f}", verify_seconds),
             rate(verify_rate), fmt::format(">= {}", rate(kTargetVerifyRate))});
  table.row({"baseline: SELECT bytes FROM entries + SHA-256", grouped(scan.rows),
             fmt::format("{:.3f}", scan.seconds), rate(scan_rate), ""});
  table.print();
  fmt::print("\n  verifier time / baseline time: {:.2f}x ({} blocks, {} signed heads checked)\n\n",
             scan_rate / verify_rate, grouped(report.blocks), grouped(report.heads));
  fs::remove_all(dir);
  return Status::Ok();
}

// ---- peak RSS ----

Status run_rss_phase(const fs::path& scratch, hsm::KeyStore& signer, const EntryMaker& maker,
                     const Options& options) {
  fs::path dir = scratch / "rss";
  fs::create_directories(dir);
  fs::path path = dir / "ledger.db";
  fmt::print(
      "Peak RSS: {} entries appended to a fresh ledger with append_all x {} from {} threads\n"
      "(VmHWM is the process's peak resident set; VmRSS is now).\n\n",
      grouped(options.rss_entries), kFillBatch, kFillThreads);
  Table table({"point", "appended", "seconds", "VmHWM MiB", "VmRSS MiB", "file MiB", "WAL MiB"});
  auto t0 = Clock::now();
  auto add = [&](std::string point, std::uint64_t appended) {
    Memory m = memory_now();
    table.row({std::move(point), grouped(appended),
               fmt::format("{:.1f}", std::chrono::duration<double>(Clock::now() - t0).count()),
               mib(m.hwm_kib * 1024), mib(m.rss_kib * 1024), mib(size_of(path)),
               mib(size_of(with_suffix(path, "-wal")))});
  };
  add("before (token open)", 0);
  Memory before = memory_now();
  FillResult fill;
  {
    MEDGATE_ASSIGN_OR_RETURN(
        std::unique_ptr<Ledger> ledger,
        Ledger::create(ledger_options(path), "bench-rss", signer, "user:bench"));
    add("ledger created", 0);
    std::uint64_t step = std::max<std::uint64_t>(options.rss_entries / 10, 1), next_mark = step;
    MEDGATE_ASSIGN_OR_RETURN(
        fill, fill_ledger(*ledger, maker, options.rss_entries, [&](std::uint64_t appended) {
          if (appended < next_mark) return;
          add("appending", appended);
          while (next_mark <= appended) next_mark += step;
        }));
    add("all appended", ledger->stats().appended);
    ledger->close();
    add("closed", fill.entries);
  }
  Memory after = memory_now();
  table.print();
  fmt::print(
      "\n  peak RSS: {} MiB before the ledger, {} MiB after {} entries (target <= {:.0f} MiB)\n"
      "  file: {} MiB for {} entries ({:.0f} bytes/entry); appended at {} entries/s\n\n",
      mib(before.hwm_kib * 1024), mib(after.hwm_kib * 1024), grouped(fill.entries),
      kTargetPeakRssMiB, mib(size_of(path)), grouped(fill.entries + 1),
      static_cast<double>(size_of(path)) / static_cast<double>(fill.entries + 1),
      rate(static_cast<double>(fill.entries) / fill.seconds));
  fs::remove_all(dir);
  return Status::Ok();
}

// ---- the run ----

Status run(int argc, char** argv, const Options& options) {
  std::error_code ec;
  fs::create_directories(options.dir, ec);
  if (!fs::is_directory(options.dir))
    return Status::InvalidArgument(
        fmt::format("--dir {} is not a directory", options.dir.string()));
  // TempDir makes its directory under $TMPDIR: point that at --dir.
  ::setenv("TMPDIR", fs::absolute(options.dir).c_str(), 1);
  testing::TempDir scratch("medgate-bench");

  MEDGATE_ASSIGN_OR_RETURN(EntryMaker maker, EntryMaker::create());
  int fsync_samples = options.smoke ? 5 : 50;
  MEDGATE_ASSIGN_OR_RETURN(Percentiles disk, probe_fsync(scratch.path(), fsync_samples));
  print_header(argc, argv, scratch.path(), disk, fsync_samples, maker.size());

  // One SoftHSM token for the whole run: a process can have only one token directory open.
  MEDGATE_ASSIGN_OR_RETURN(
      hsm::KeyStoreConfig config,
      hsm::create_softhsm_token(scratch / "softhsm", "bench", scratch / "pin"));
  MEDGATE_ASSIGN_OR_RETURN(std::unique_ptr<hsm::KeyStore> signer,
                           hsm::open_key_store(config, hsm::KeyPolicy::kCreateIfMissing));

  if (options.rss) return run_rss_phase(scratch.path(), *signer, maker, options);
  if (options.only != Only::kVerify)
    MEDGATE_RETURN_IF_ERROR(run_append_phases(scratch.path(), *signer, maker, options));
  if (options.only != Only::kAppend)
    MEDGATE_RETURN_IF_ERROR(run_verify_phase(scratch.path(), *signer, maker, options));
  if (options.smoke)
    MEDGATE_RETURN_IF_ERROR(run_rss_phase(scratch.path(), *signer, maker, options));
  return Status::Ok();
}

}  // namespace
}  // namespace medgate::bench

int main(int argc, char** argv) {
  using namespace medgate;
  Result<bench::Options> options = bench::parse_args(argc, argv);
  if (!options.ok()) {
    fmt::print(stderr, "bench_ledger: {}\n", options.status().message());
    return 2;
  }
  if (options->help) {
    fmt::print("{}", bench::kUsage);
    return 0;
  }
  Status s = bench::run(argc, argv, *options);
  if (!s.ok()) {
    fmt::print(stderr, "bench_ledger: {}\n", s.to_string());
    return 1;
  }
  return 0;
}
