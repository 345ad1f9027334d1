// bench_audit: what a filtered audit export and its offline verification cost on a large ledger
// (issue 6: 100,000 entries out of 1,000,000 exported in <= 2 s and verified in <= 1 s on 2
// cores), each beside a baseline measured in the same run. A benchmark, not a test: nothing here
// judges a time; `--smoke` (a ctest) runs it at a small size so that it cannot rot, and fails only
// when an export does not verify or selects the wrong entries.
//
// The ledger: N entries appended with append_all (as bench_ledger fills), one in every K an access
// decision about patient P, the others device readings (observations) about 10,000 other
// patients; heads signed by SoftHSM every second while it fills, as in production. Then:
//
//   export --patient P   build_audit_bundle + encode + the bundle signature (what medgated's
//                         audit.export does, minus the socket), N/K entries selected, with the
//                         completeness chain and the subject-map proof;
//   export --kind access the same N/K entries found through the type index instead;
//   verify               verify_audit_bundle on each bundle against the trusted key;
//   each of them in bundle format 2 (one multi-leaf proof, what medgated writes) and, as the
//   baseline beside it, format 1 (an inclusion proof per entry, what it wrote before);
//   baselines            export: the same entries read from SQLite through the subject index in
//                         one query and leaf-hashed; verify: SHA-256 of the bundle's bytes, a leaf
//                         hash per entry and the proof's hashes (what any verifier must compute,
//                         without decoding anything).
//
// Run a Release build; `bench_audit --help` lists the flags.
#include <sqlite3.h>
#include <stdlib.h>
#include <sys/utsname.h>
#include <time.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include <fmt/format.h>

#include "hsm/key_store_factory.h"
#include "ledger/audit_bundle.h"
#include "ledger/block.h"
#include "ledger/entry.h"
#include "ledger/merkle.h"
#include "ledger/sqlite.h"
#include "ledger/store.h"
#include "tests/bench/bench_util.h"
#include "tests/support/temp_dir.h"

namespace medgate::bench {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;
using ledger::Entry;
using ledger::Ledger;
using ledger::cbor::Value;

constexpr std::uint64_t kFillBatch = 5000;
constexpr int kFillThreads = 2;
constexpr std::uint64_t kOtherPatients = 10'000;
constexpr double kTargetExportSeconds = 2.0;
constexpr double kTargetVerifySeconds = 1.0;

constexpr std::string_view kUsage = R"(usage: bench_audit [flags]

Builds a ledger and times a filtered audit export of one patient's entries (and of one kind's)
through ledger/audit_bundle, and the bundle's offline verification, each beside a baseline.

  --entries N   entries in the ledger (default 1000000)
  --every K     one entry in K is about the exported patient (default 10: 100,000 of 1,000,000)
  --runs R      exports and verifications of each bundle (default 3; the table shows each run)
  --dir PATH    where the ledger goes (default /var/tmp; a scratch directory is made and removed)
  --smoke       20,000 entries, one run (the ctest)
  --help        this text
)";

struct Options {
  std::uint64_t entries = 1'000'000;
  std::uint64_t every = 10;
  int runs = 3;
  bool smoke = false;
  bool help = false;
  fs::path dir = "/var/tmp";
};

Result<std::uint64_t> parse_count(std::string_view flag, std::string_view text) {
  std::uint64_t v = 0;
  if (text.empty()) return Status::InvalidArgument(fmt::format("{} needs a number", flag));
  for (char c : text) {
    if (c == '_' || c == ',') continue;
    if (c < '0' || c > '9')
      return Status::InvalidArgument(fmt::format("{} {}: not a count", flag, text));
    v = v * 10 + static_cast<std::uint64_t>(c - '0');
  }
  return v;
}

Result<Options> parse_args(int argc, char** argv) {
  Options o;
  bool entries_set = false, runs_set = false;
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
    } else if (a == "--entries") {
      MEDGATE_ASSIGN_OR_RETURN(std::string_view v, value());
      MEDGATE_ASSIGN_OR_RETURN(o.entries, parse_count(a, v));
      entries_set = true;
    } else if (a == "--every") {
      MEDGATE_ASSIGN_OR_RETURN(std::string_view v, value());
      MEDGATE_ASSIGN_OR_RETURN(o.every, parse_count(a, v));
    } else if (a == "--runs") {
      MEDGATE_ASSIGN_OR_RETURN(std::string_view v, value());
      MEDGATE_ASSIGN_OR_RETURN(std::uint64_t runs, parse_count(a, v));
      o.runs = static_cast<int>(std::min<std::uint64_t>(runs, 100));
      runs_set = true;
    } else if (a == "--dir") {
      MEDGATE_ASSIGN_OR_RETURN(std::string_view v, value());
      o.dir = fs::path(v);
    } else {
      return Status::InvalidArgument(fmt::format("unknown argument {} (see --help)", a));
    }
  }
  if (o.every == 0) return Status::InvalidArgument("--every must be at least 1");
  if (o.runs == 0) return Status::InvalidArgument("--runs must be at least 1");
  if (o.smoke) {
    if (!entries_set) o.entries = 20'000;
    if (!runs_set) o.runs = 1;
  }
  return o;
}

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// CPU seconds of the whole process (all threads) so far: on a shared machine the wall time of a
// phase includes waiting for a CPU, its CPU time does not.
double cpu_seconds() {
  timespec ts{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) / 1e9;
}

// ---- the ledger ----

Bytes pseudonym(std::uint64_t n) {
  Bytes b(32, std::byte{0});
  for (int i = 0; i < 8; ++i) b[static_cast<std::size_t>(i)] = std::byte((n >> (8 * i)) & 0xff);
  b[31] = std::byte{0x5a};
  return b;
}

const Bytes& the_patient() {
  static const Bytes p = pseudonym(~std::uint64_t{0});
  return p;
}

Result<Entry> make_entry(std::uint64_t n, std::uint64_t every) {
  Entry e;
  e.time_us = ledger::now_us();
  if (n % every == 0) {
    e.type = ledger::EntryType::kAccessDecision;
    e.actor = "user:clinician";
    MEDGATE_ASSIGN_OR_RETURN(
        e.body, Value::map({{Value::text("principal"),
                             Value::text(fmt::format("Practitioner::\"dr-{}\"", n % 200))},
                            {Value::text("action"), Value::text("Action::\"read\"")},
                            {Value::text("purpose"), Value::text("TREAT")},
                            {Value::text("data"), Value::text("vitals")},
                            {Value::text("decision"), Value::text(n % 3 == 0 ? "deny" : "allow")},
                            {Value::text("policies"), Value::array({Value::text("consent-grant")})},
                            {Value::text("errors"), Value::array({})},
                            {Value::text("break_glass"), Value::boolean(false)},
                            {Value::text("state"), Value::uint(n)},
                            {Value::text("returned"), Value::uint(3)}}));
    e.subjects = {{the_patient(), std::nullopt}};
  } else {
    e.type = ledger::EntryType::kObservation;
    e.actor = "system:medgated";
    MEDGATE_ASSIGN_OR_RETURN(
        e.body,
        Value::map({{Value::text("source"), Value::text("hl7")},
                    {Value::text("device"), Value::text(fmt::format("dev-{}", n % 64))},
                    {Value::text("message_id"), Value::text(fmt::format("m{}", n))},
                    {Value::text("ciphertext"), Value::bytes(Bytes(60, std::byte{0x42}))}}));
    e.subjects = {{pseudonym(n % kOtherPatients), std::nullopt}};
  }
  return e;
}

Result<double> fill(Ledger& ledger, const Options& o) {
  std::atomic<std::uint64_t> next{0};
  std::mutex error_mu;
  Status first_error;
  auto t0 = Clock::now();
  std::vector<std::thread> pool;
  for (int t = 0; t < kFillThreads; ++t) {
    pool.emplace_back([&] {
      std::vector<Entry> batch;
      for (;;) {
        std::uint64_t first = next.fetch_add(kFillBatch);
        if (first >= o.entries) break;
        std::uint64_t n = std::min(kFillBatch, o.entries - first);
        batch.clear();
        Status s;
        for (std::uint64_t i = 0; i < n && s.ok(); ++i) {
          Result<Entry> e = make_entry(first + i, o.every);
          if (e.ok())
            batch.push_back(std::move(e).value());
          else
            s = e.status();
        }
        if (s.ok()) s = ledger.append_all(batch).status();
        if (!s.ok()) {
          std::lock_guard lk(error_mu);
          if (first_error.ok()) first_error = s;
          next = o.entries;
          break;
        }
      }
    });
  }
  for (auto& th : pool) th.join();
  if (!first_error.ok()) return first_error.with_context("filling the ledger");
  return seconds_since(t0);
}

// ---- export and verify ----

struct ExportRun {
  double build = 0, encode = 0, sign = 0, verify = 0;
  double export_cpu = 0, verify_cpu = 0;
  std::uint64_t entries = 0, selected = 0;
  Bytes bundle;  // kept for the verification baseline
  double total_export() const { return build + encode + sign; }
};

Result<ExportRun> export_and_verify(Ledger& ledger, hsm::KeyStore& keys,
                                    const ledger::AuditQuery& q, std::uint64_t version,
                                    std::uint64_t expected) {
  ExportRun run;
  ledger::AuditExportOptions options;
  options.format_version = version;
  double cpu0 = cpu_seconds();
  auto t0 = Clock::now();
  MEDGATE_ASSIGN_OR_RETURN(ledger::AuditBundle bundle,
                           ledger::build_audit_bundle(ledger, q, "user:bench", options));
  run.build = seconds_since(t0);
  t0 = Clock::now();
  MEDGATE_ASSIGN_OR_RETURN(Bytes bytes, ledger::encode_audit_bundle(bundle));
  run.encode = seconds_since(t0);
  t0 = Clock::now();
  MEDGATE_ASSIGN_OR_RETURN(ledger::HeadBody head, ledger::decode_head(bundle.head.bytes));
  MEDGATE_ASSIGN_OR_RETURN(Bytes signature, keys.sign_digest_with(head.key_id, sha256(bytes)));
  run.sign = seconds_since(t0);
  run.export_cpu = cpu_seconds() - cpu0;
  run.entries = bundle.entries.size();

  cpu0 = cpu_seconds();
  t0 = Clock::now();
  MEDGATE_ASSIGN_OR_RETURN(ledger::AuditReport report,
                           ledger::verify_audit_bundle(bytes, signature, {keys.signing_key()}));
  run.verify = seconds_since(t0);
  run.verify_cpu = cpu_seconds() - cpu0;
  if (!report.ok())
    return Status::VerificationFailed("the benchmark's bundle does not verify: " +
                                      report.problems.front());
  run.selected = report.selected;
  if (report.selected != expected)
    return Status::Internal(
        fmt::format("the export selected {} entries, expected {}", report.selected, expected));
  run.bundle = std::move(bytes);
  return run;
}

// ---- baselines ----

// Reading the patient's entries from SQLite through the subject index, one query, and hashing each
// as a Merkle leaf: the floor under any export of them.
struct Timing {
  double wall = 0, cpu = 0;
};

Result<Timing> read_and_hash(const fs::path& path, ByteView subject, std::uint64_t expected) {
  double cpu0 = cpu_seconds();
  auto t0 = Clock::now();
  MEDGATE_ASSIGN_OR_RETURN(
      auto db, ledger::sql::Database::open(path, ledger::sql::Database::Mode::kReadOnly));
  MEDGATE_ASSIGN_OR_RETURN(auto st, db.prepare("SELECT e.bytes FROM subjects s JOIN entries e ON "
                                               "e.idx = s.idx WHERE s.subject = ? ORDER BY s.idx"));
  st.bind(1, subject);
  std::uint64_t rows = 0;
  for (;;) {
    MEDGATE_ASSIGN_OR_RETURN(auto step, st.step());
    if (step == ledger::sql::Statement::Step::kDone) break;
    (void)ledger::merkle::leaf_hash(st.column_blob(0));
    ++rows;
  }
  if (rows != expected)
    return Status::Internal(
        fmt::format("the baseline read {} entries, expected {}", rows, expected));
  return Timing{seconds_since(t0), cpu_seconds() - cpu0};
}

// What the per-call Ledger API costs for the same entries: one Ledger::entry() and one
// Ledger::inclusion_proof() per entry, each taking a reader, preparing its statements and opening
// a read transaction (what the export did before it used entries_at() and inclusion_proofs()).
Result<std::pair<Timing, Timing>> ledger_calls(Ledger& ledger, ByteView subject,
                                               std::uint64_t size) {
  std::vector<std::uint64_t> indexes;
  for (std::uint64_t from = 0;;) {
    MEDGATE_ASSIGN_OR_RETURN(auto page, ledger.subject_entries(subject, from, 4096));
    if (page.empty()) break;
    from = page.back() + 1;
    for (std::uint64_t i : page)
      if (i < size) indexes.push_back(i);
  }
  Timing entries, proofs;
  double cpu0 = cpu_seconds();
  auto t0 = Clock::now();
  for (std::uint64_t i : indexes) MEDGATE_RETURN_IF_ERROR(ledger.entry(i).status());
  entries = {seconds_since(t0), cpu_seconds() - cpu0};
  cpu0 = cpu_seconds();
  t0 = Clock::now();
  for (std::uint64_t i : indexes) MEDGATE_RETURN_IF_ERROR(ledger.inclusion_proof(i, size).status());
  proofs = {seconds_since(t0), cpu_seconds() - cpu0};
  return std::pair{entries, proofs};
}

// The same entries through the batch calls the export uses: entries, format 1's proofs, format 2's.
struct BatchTimings {
  Timing entries, proofs, multi_proof;
  std::size_t multi_proof_hashes = 0;
};

Result<BatchTimings> ledger_batches(Ledger& ledger, ByteView subject, std::uint64_t size) {
  std::vector<std::uint64_t> indexes;
  for (std::uint64_t from = 0;;) {
    MEDGATE_ASSIGN_OR_RETURN(auto page, ledger.subject_entries(subject, from, 4096));
    if (page.empty()) break;
    from = page.back() + 1;
    for (std::uint64_t i : page)
      if (i < size) indexes.push_back(i);
  }
  Timing entries, proofs;
  double cpu0 = cpu_seconds();
  auto t0 = Clock::now();
  for (std::size_t k = 0; k < indexes.size(); k += 4096) {
    std::span<const std::uint64_t> page(indexes.data() + k,
                                        std::min<std::size_t>(4096, indexes.size() - k));
    MEDGATE_RETURN_IF_ERROR(ledger.entries_at(page).status());
  }
  entries = {seconds_since(t0), cpu_seconds() - cpu0};
  cpu0 = cpu_seconds();
  t0 = Clock::now();
  MEDGATE_RETURN_IF_ERROR(ledger.inclusion_proofs(indexes, size).status());
  proofs = {seconds_since(t0), cpu_seconds() - cpu0};
  cpu0 = cpu_seconds();
  t0 = Clock::now();
  MEDGATE_ASSIGN_OR_RETURN(std::vector<Hash> multi, ledger.multi_inclusion_proof(indexes, size));
  Timing multi_proof{seconds_since(t0), cpu_seconds() - cpu0};
  return BatchTimings{entries, proofs, multi_proof, multi.size()};
}

// What any verifier of the bundle must compute: SHA-256 over its bytes (the signature's digest),
// a leaf hash per entry and the proof's hashes (format 1: every entry's whole path; format 2: the
// multi-leaf proof). No decoding, no signature check, one thread.
Result<Timing> hash_floor(const ledger::AuditBundle& b, ByteView bytes) {
  double cpu0 = cpu_seconds();
  auto t0 = Clock::now();
  (void)sha256(bytes);
  MEDGATE_ASSIGN_OR_RETURN(ledger::HeadBody head, ledger::decode_head(b.head.bytes));
  if (b.version == 1) {
    for (const ledger::BundleEntry& e : b.entries)
      MEDGATE_RETURN_IF_ERROR(ledger::merkle::verify_inclusion(
          e.index, head.tree_size, ledger::merkle::leaf_hash(e.bytes), e.proof, head.root));
  } else {
    std::vector<ledger::merkle::IndexedLeaf> leaves;
    leaves.reserve(b.entries.size());
    for (const ledger::BundleEntry& e : b.entries)
      leaves.push_back({e.index, ledger::merkle::leaf_hash(e.bytes)});
    MEDGATE_RETURN_IF_ERROR(
        ledger::merkle::verify_multi_inclusion(leaves, head.tree_size, b.multi_proof, head.root));
  }
  return Timing{seconds_since(t0), cpu_seconds() - cpu0};
}

std::string mib(std::uint64_t bytes) {
  return fmt::format("{:.1f}", static_cast<double>(bytes) / (1 << 20));
}

std::string secs(double s) {
  return fmt::format("{:.3f}", s);
}

void print_header(int argc, char** argv, const fs::path& scratch) {
  std::string command;
  for (int i = 0; i < argc; ++i) command += (i ? " " : "") + std::string(argv[i]);
  utsname u{};
  uname(&u);
#ifdef NDEBUG
  const char* build = "assertions off";
#else
  const char* build = "ASSERTIONS ON: not a Release build, the numbers are not representative";
#endif
  fmt::print("medgate audit export benchmark (medgate {}, g++ {}, {}, SQLite {})\n",
             MEDGATE_VERSION, __VERSION__, build, sqlite3_libversion());
  fmt::print("  command:  {}\n", command);
  fmt::print("  date:     {} (load average at start: {})\n", utc_now(), load_average());
  fmt::print("  machine:  {} CPUs (nproc), {}, {} {} {}\n", cpus_available(),
             first_line_with("/proc/cpuinfo", "model name"), u.sysname, u.release, u.machine);
  fmt::print("  ledger:   {}\n\n", scratch.string());
  std::fflush(stdout);
}

struct Phase {
  std::string name;
  ledger::AuditQuery query;
  std::uint64_t version = ledger::kAuditBundleVersion;
};

Status run(int argc, char** argv, const Options& o) {
  std::error_code ec;
  fs::create_directories(o.dir, ec);
  if (!fs::is_directory(o.dir))
    return Status::InvalidArgument(fmt::format("--dir {} is not a directory", o.dir.string()));
  ::setenv("TMPDIR", fs::absolute(o.dir).c_str(), 1);
  testing::TempDir scratch("medgate-bench-audit");
  print_header(argc, argv, scratch.path());

  MEDGATE_ASSIGN_OR_RETURN(
      hsm::KeyStoreConfig config,
      hsm::create_softhsm_token(scratch / "softhsm", "bench", scratch / "pin"));
  MEDGATE_ASSIGN_OR_RETURN(std::unique_ptr<hsm::KeyStore> keys,
                           hsm::open_key_store(config, hsm::KeyPolicy::kCreateIfMissing));
  fs::path path = scratch / "ledger.db";
  ledger::LedgerOptions lo;
  lo.path = path;
  lo.head_interval = std::chrono::milliseconds(1000);  // as in production
  MEDGATE_ASSIGN_OR_RETURN(std::unique_ptr<Ledger> ledger,
                           Ledger::create(lo, "bench-audit", *keys, "user:bench"));
  MEDGATE_ASSIGN_OR_RETURN(double fill_seconds, fill(*ledger, o));
  // Entry n of the fill is at index n + 1 (genesis is 0): the patient's are n % every == 0.
  const std::uint64_t expected = (o.entries + o.every - 1) / o.every;
  fmt::print(
      "Ledger: {} entries + genesis ({} MiB with its WAL) appended in {:.1f} s with append_all x "
      "{}\n"
      "from {} threads; {} of them are access decisions about one patient, the rest device\n"
      "readings about {} other patients. Heads signed every second while filling.\n\n",
      grouped(o.entries),
      mib(fs::file_size(path, ec) + fs::file_size(fs::path(path.string() + "-wal"), ec)),
      fill_seconds, kFillBatch, kFillThreads, grouped(expected), grouped(kOtherPatients));
  std::fflush(stdout);

  // Each export in format 2 and, as its baseline, format 1.
  std::vector<Phase> phases;
  for (std::uint64_t version : {std::uint64_t{2}, std::uint64_t{1}}) {
    Phase patient{fmt::format("export --patient, format {}", version), {}, version};
    patient.query.patient = the_patient();
    Phase kind{fmt::format("export --kind access, format {}", version), {}, version};
    kind.query.kind = "access";
    phases.push_back(std::move(patient));
    phases.push_back(std::move(kind));
  }

  Table table({"run", "selected", "in bundle", "MiB", "build s", "encode s", "sign s", "export s",
               "(cpu s)", "target", "verify s", "(cpu s)", "target"});
  std::vector<ExportRun> last;
  for (const Phase& phase : phases) {
    for (int r = 0; r < o.runs; ++r) {
      MEDGATE_ASSIGN_OR_RETURN(
          ExportRun run, export_and_verify(*ledger, *keys, phase.query, phase.version, expected));
      table.row({fmt::format("{} #{}", phase.name, r + 1), grouped(run.selected),
                 grouped(run.entries), mib(run.bundle.size()), secs(run.build), secs(run.encode),
                 secs(run.sign), secs(run.total_export()), secs(run.export_cpu),
                 fmt::format("<= {:.0f}", kTargetExportSeconds), secs(run.verify),
                 secs(run.verify_cpu), fmt::format("<= {:.0f}", kTargetVerifySeconds)});
      if (r + 1 == o.runs) last.push_back(std::move(run));
    }
  }

  // Baselines, in the same run.
  MEDGATE_ASSIGN_OR_RETURN(Timing read, read_and_hash(path, the_patient(), expected));
  table.row({"baseline: SELECT the patient's entries via the subject index + SHA-256 each",
             grouped(expected), "", "", "", "", "", secs(read.wall), secs(read.cpu), "", "", "",
             ""});
  {
    MEDGATE_ASSIGN_OR_RETURN(ledger::AuditBundle b, ledger::decode_audit_bundle(last[0].bundle));
    MEDGATE_ASSIGN_OR_RETURN(ledger::HeadBody head, ledger::decode_head(b.head.bytes));
    MEDGATE_ASSIGN_OR_RETURN(auto calls, ledger_calls(*ledger, the_patient(), head.tree_size));
    table.row({"  for comparison: Ledger::entry() once per entry (the per-call API)",
               grouped(expected), "", "", "", "", "", secs(calls.first.wall), secs(calls.first.cpu),
               "", "", "", ""});
    table.row({"  for comparison: Ledger::inclusion_proof() once per entry", grouped(expected), "",
               "", "", "", "", secs(calls.second.wall), secs(calls.second.cpu), "", "", "", ""});
    MEDGATE_ASSIGN_OR_RETURN(auto batch, ledger_batches(*ledger, the_patient(), head.tree_size));
    table.row({"  inside the export: Ledger::entries_at() in pages of 4,096", grouped(expected), "",
               "", "", "", "", secs(batch.entries.wall), secs(batch.entries.cpu), "", "", "", ""});
    table.row({"  inside the export, format 1: Ledger::inclusion_proofs(), one call",
               grouped(expected), "", "", "", "", "", secs(batch.proofs.wall),
               secs(batch.proofs.cpu), "", "", "", ""});
    table.row({fmt::format("  inside the export, format 2: Ledger::multi_inclusion_proof() ({} "
                           "hashes)",
                           grouped(batch.multi_proof_hashes)),
               grouped(expected), "", "", "", "", "", secs(batch.multi_proof.wall),
               secs(batch.multi_proof.cpu), "", "", "", ""});
  }
  for (std::size_t k = 0; k < phases.size(); ++k) {
    MEDGATE_ASSIGN_OR_RETURN(ledger::AuditBundle b, ledger::decode_audit_bundle(last[k].bundle));
    MEDGATE_ASSIGN_OR_RETURN(Timing floor, hash_floor(b, last[k].bundle));
    table.row(
        {fmt::format("baseline ({}): SHA-256 of the bundle + leaf hashes + proofs", phases[k].name),
         "", grouped(b.entries.size()), mib(last[k].bundle.size()), "", "", "", "", "", "",
         secs(floor.wall), secs(floor.cpu), ""});
  }
  table.print(true);
  ledger->close();
  return Status::Ok();
}

}  // namespace
}  // namespace medgate::bench

int main(int argc, char** argv) {
  using namespace medgate;
  Result<bench::Options> options = bench::parse_args(argc, argv);
  if (!options.ok()) {
    fmt::print(stderr, "bench_audit: {}\n", options.status().message());
    return 2;
  }
  if (options->help) {
    fmt::print("{}", bench::kUsage);
    return 0;
  }
  Status s = bench::run(argc, argv, *options);
  if (!s.ok()) {
    fmt::print(stderr, "bench_audit: {}\n", s.to_string());
    return 1;
  }
  return 0;
}
