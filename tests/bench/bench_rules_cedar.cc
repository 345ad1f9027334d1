// bench_rules_cedar: what one consent decision costs in medgate's Cedar-subset engine, beside
// Cedar's reference implementation (cedar-wasm, run by tests/rules_diff/bench.js under node) on the
// same policies and requests in the same run. A benchmark, not a test: nothing here judges a time;
// `--smoke` (a ctest) runs it with tiny counts and fails only on a wrong decision (medgate's
// against what the workload means, and against cedar-wasm's) or when cedar-wasm cannot be run.
//
// The workload: a hospital directory of practitioners (in Role::"doctor", "nurse" or "auditor"),
// patients and data categories; one active consent grant per policy,
//   permit(principal == Practitioner::"dN", action == Action::"read", resource in Patient::"pM")
//   when { context.purpose == "TREAT" && context.now < 1900000000 };
// and a handful of hospital base policies (a forbid on psychiatric notes unless the purpose is
// ETREAT, role-based permits, a forbid on export). A request reads PatientData::"pM/category",
// whose parents are Patient::"pM" and Category::"category"; it is added to a request-local
// entity store layered over the directory, as the appliance does, inside the timed call.
// Requests are a seeded random mix of permitted and denied ones (granted pairs, pairs without a
// grant, forbidden categories, wrong purposes, role permits, emergencies, exports).
//
// cedar-wasm gets the policy set once (preparsePolicySet; ~50 s for 100,000 policies on this
// kind of machine) and each request through statefulIsAuthorized with the slice of entities that
// request needs (principal, its role, the resource, its patient and category): Cedar takes
// entities per call, so that is its fair best. It evaluates every policy on every request (no
// scope index), so at full size it answers a few requests a second: --cedar-seconds bounds it.
//
// bench_rules (the engine's own benchmark) also times adding and removing grants; this one is
// about the comparison with the reference.
//
// Run a Release (RelWithDebInfo) build; `bench_rules_cedar --help` lists the flags.
#include <sys/utsname.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>
#include <set>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "ledger/rules/authorizer.h"
#include "ledger/rules/entities.h"
#include "ledger/rules/parser.h"
#include "tests/bench/bench_util.h"
#include "tests/support/temp_dir.h"

namespace medgate::bench {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using rules::EntityUid;
using Clock = std::chrono::steady_clock;

constexpr const char* kUsage = R"(usage: bench_rules_cedar [options]
  --patients N         patients in the directory (default 10000)
  --grants N           consent grants, one policy each (default 100000)
  --practitioners N    practitioners (default 2000)
  --requests N         requests timed through medgate (default 200000)
  --cedar-seconds S    at most this long on cedar-wasm's requests (default 20)
  --cedar-requests N   at most this many requests through cedar-wasm (default 500)
  --no-cedar           medgate only
  --cedar-dir DIR      write cedar-wasm's inputs (policies.json, requests.json) here and keep
                       them (default: a temporary directory)
  --smoke              tiny counts; fail on a wrong decision (the ctest)
  --node PATH          node (default: node on PATH)
)";

struct Options {
  int patients = 10000;
  int grants = 100000;
  int practitioners = 2000;
  int requests = 200000;
  double cedar_seconds = 20;
  int cedar_requests = 500;
  bool cedar = true;
  bool smoke = false;
  bool help = false;
  std::string node = "node";
  std::string cedar_dir;
};

Result<Options> parse_args(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto value = [&]() -> Result<std::string> {
      if (i + 1 >= argc) return Status::InvalidArgument(a + " needs a value");
      return std::string(argv[++i]);
    };
    auto number = [&](int& out) -> Status {
      MEDGATE_ASSIGN_OR_RETURN(std::string v, value());
      try {
        out = std::stoi(v);
      } catch (const std::exception&) {
        return Status::InvalidArgument(a + " needs a number, not " + v);
      }
      if (out <= 0) return Status::InvalidArgument(a + " must be positive");
      return Status::Ok();
    };
    if (a == "--patients") {
      MEDGATE_RETURN_IF_ERROR(number(o.patients));
    } else if (a == "--grants") {
      MEDGATE_RETURN_IF_ERROR(number(o.grants));
    } else if (a == "--practitioners") {
      MEDGATE_RETURN_IF_ERROR(number(o.practitioners));
    } else if (a == "--requests") {
      MEDGATE_RETURN_IF_ERROR(number(o.requests));
    } else if (a == "--cedar-requests") {
      MEDGATE_RETURN_IF_ERROR(number(o.cedar_requests));
    } else if (a == "--cedar-seconds") {
      int s = 0;
      MEDGATE_RETURN_IF_ERROR(number(s));
      o.cedar_seconds = s;
    } else if (a == "--no-cedar") {
      o.cedar = false;
    } else if (a == "--cedar-dir") {
      MEDGATE_ASSIGN_OR_RETURN(o.cedar_dir, value());
    } else if (a == "--node") {
      MEDGATE_ASSIGN_OR_RETURN(o.node, value());
    } else if (a == "--smoke") {
      o.smoke = true;
    } else if (a == "-h" || a == "--help") {
      o.help = true;
    } else {
      return Status::InvalidArgument("unknown option " + a + " (try --help)");
    }
  }
  if (o.smoke) {
    o.patients = 100;
    o.grants = 1000;
    o.practitioners = 50;
    o.requests = 2000;
    o.cedar_requests = 300;
    o.cedar_seconds = 30;
  }
  return o;
}

// ---- the workload ----

constexpr const char* kCategories[] = {"vitals", "labs", "notes", "imaging", "psych"};
constexpr std::int64_t kNow = 1700000000;

const char* kBasePolicies = R"(@id("forbid-psych-unless-emergency")
forbid(principal, action, resource in Category::"psych")
unless { context.purpose == "ETREAT" };

@id("nurses-read-vitals")
permit(principal in Role::"nurse", action == Action::"read", resource in Category::"vitals")
when { context.purpose == "TREAT" };

@id("doctors-emergency-read")
permit(principal in Role::"doctor", action == Action::"read", resource)
when { context.purpose == "ETREAT" && context has emergency && context.emergency };

@id("auditors-read")
permit(principal in Role::"auditor", action in [Action::"read"], resource)
when { context.purpose == "AUDIT" };

@id("forbid-export")
forbid(principal, action == Action::"export", resource)
unless { principal in Role::"auditor" };
)";

std::string grant_text(int k, int practitioner, int patient) {
  return fmt::format(
      "@id(\"grant-{}\")\npermit(principal == Practitioner::\"d{}\", action == Action::\"read\", "
      "resource in Patient::\"p{}\")\nwhen {{ context.purpose == \"TREAT\" && context.now < "
      "1900000000 }};\n",
      k, practitioner, patient);
}

const char* role_of(int practitioner) {
  int r = practitioner % 20;
  return r < 16 ? "doctor" : r < 19 ? "nurse" : "auditor";
}

struct BenchRequest {
  rules::Request request;
  rules::Entity resource;  // PatientData::"pM/category", added to the request-local store
  bool intended_allow = false;
  std::string kind;
};

struct Workload {
  std::string policy_text;
  json policy_map;  // id -> text, for cedar-wasm
  rules::Entities directory;
  std::vector<BenchRequest> requests;
};

rules::Entity entity(std::string type, std::string id, std::vector<EntityUid> parents = {}) {
  return {{std::move(type), std::move(id)}, {}, std::move(parents)};
}

Workload make_workload(const Options& o) {
  Workload w;
  std::mt19937_64 rng(20240607);
  auto below = [&](int n) { return static_cast<int>(rng() % static_cast<std::uint64_t>(n)); };

  w.policy_text = kBasePolicies;
  rules::ParseResult base = rules::parse_policies(kBasePolicies);
  for (const auto& p : base.policies.policies) w.policy_map[p.id] = rules::to_text(p);
  std::vector<std::pair<int, int>> grants;
  std::set<std::pair<int, int>> granted;
  for (int k = 0; k < o.grants; ++k) {
    int d = below(o.practitioners), p = below(o.patients);
    grants.emplace_back(d, p);
    granted.emplace(d, p);
    std::string text = grant_text(k, d, p);
    w.policy_text += "\n" + text;
    w.policy_map[fmt::format("grant-{}", k)] = text;
  }

  for (const char* role : {"doctor", "nurse", "auditor"}) w.directory.add(entity("Role", role));
  for (int d = 0; d < o.practitioners; ++d)
    w.directory.add(entity("Practitioner", fmt::format("d{}", d), {{"Role", role_of(d)}}));
  for (int p = 0; p < o.patients; ++p) w.directory.add(entity("Patient", fmt::format("p{}", p)));
  for (const char* c : kCategories) w.directory.add(entity("Category", c));

  auto make = [&](int d, int p, const char* category, const char* action, const char* purpose,
                  bool emergency, bool allow, std::string kind) {
    BenchRequest b;
    b.request.principal = {"Practitioner", fmt::format("d{}", d)};
    b.request.action = {"Action", action};
    std::string data_id = fmt::format("p{}/{}", p, category);
    b.request.resource = {"PatientData", data_id};
    rules::ValueRecord ctx{{"purpose", rules::Value(std::string(purpose))},
                           {"now", rules::Value(kNow)}};
    if (emergency) ctx.emplace("emergency", rules::Value(true));
    b.request.context = rules::Value::record(std::move(ctx));
    b.resource = entity("PatientData", data_id,
                        {{"Patient", fmt::format("p{}", p)}, {"Category", category}});
    b.intended_allow = allow;
    b.kind = std::move(kind);
    w.requests.push_back(std::move(b));
  };
  auto safe_category = [&]() { return kCategories[below(4)]; };  // not psych
  for (int i = 0; i < o.requests; ++i) {
    int roll = below(100);
    auto [gd, gp] = grants[static_cast<std::size_t>(below(static_cast<int>(grants.size())))];
    if (roll < 40) {
      make(gd, gp, safe_category(), "read", "TREAT", false, true, "granted");
    } else if (roll < 50) {
      make(gd, gp, "psych", "read", "TREAT", false, false, "granted, psych forbidden");
    } else if (roll < 58) {
      make(gd, gp, safe_category(), "read", "RESEARCH", false, false, "granted, wrong purpose");
    } else if (roll < 85) {
      int d = below(o.practitioners), p = below(o.patients);
      const char* c = safe_category();
      bool allow = (granted.count({d, p}) > 0) ||
                   (std::string_view(role_of(d)) == "nurse" && std::string_view(c) == "vitals");
      make(d, p, c, "read", "TREAT", false, allow, "no grant");
    } else if (roll < 92) {
      int d = below(o.practitioners / 20 + 1) * 20 + below(16);  // a doctor
      if (d >= o.practitioners) d = 0;
      make(d, below(o.patients), kCategories[below(5)], "read", "ETREAT", true, true, "emergency");
    } else if (roll < 96) {
      int d = below(o.practitioners / 20 + 1) * 20 + 19;  // an auditor
      bool auditor = d < o.practitioners;
      if (!auditor) d = 0;
      const char* c = safe_category();
      make(d, below(o.patients), c, "read", "AUDIT", false, auditor, "audit");
    } else {
      make(gd, gp, safe_category(), "export", "TREAT", false, false, "export forbidden");
    }
  }
  return w;
}

// ---- medgate ----

struct Measured {
  double seconds = 0;
  std::size_t decisions = 0;
  Percentiles latency;  // of single calls
  std::size_t allows = 0, wrong = 0, with_errors = 0;
  std::string first_wrong;
};

// `layered`: each request's resource goes into a request-local store over the directory, inside
// the timed call (the appliance's path); else `directory` already holds every resource.
Measured run_medgate(const rules::Authorizer& authz, const Workload& w,
                     const rules::Entities& directory, bool layered) {
  Measured m;
  auto decide = [&](const BenchRequest& b) {
    if (!layered) return authz.is_authorized(b.request, directory);
    rules::Entities local(&directory);
    local.add(b.resource);
    return authz.is_authorized(b.request, local);
  };
  // Warm-up and check: every decision against what the workload means.
  for (const auto& b : w.requests) {
    rules::Response r = decide(b);
    bool allow = r.decision == rules::Decision::kAllow;
    m.allows += allow;
    m.with_errors += !r.errors.empty();
    if (allow != b.intended_allow && m.wrong++ == 0)
      m.first_wrong = fmt::format("{} {} {} ({}): medgate says {}", b.request.principal.to_text(),
                                  b.request.action.to_text(), b.request.resource.to_text(), b.kind,
                                  rules::decision_name(r.decision));
  }
  // Latency: each call timed alone.
  std::vector<std::int64_t> ns;
  ns.reserve(w.requests.size());
  std::size_t allows = 0;  // used, so no call is optimized away
  for (const auto& b : w.requests) {
    auto t0 = Clock::now();
    rules::Response r = decide(b);
    auto t1 = Clock::now();
    allows += r.decision == rules::Decision::kAllow;
    ns.push_back(std::chrono::duration_cast<std::chrono::nanoseconds>(t1 - t0).count());
  }
  m.latency = percentiles(std::move(ns));
  // Throughput: the same requests back to back, no clock per call.
  auto t0 = Clock::now();
  for (const auto& b : w.requests) allows += decide(b).decision == rules::Decision::kAllow;
  m.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  m.decisions = w.requests.size();
  if (allows != 2 * m.allows) m.wrong += 1;  // the same requests must decide the same way
  return m;
}

// ---- cedar-wasm ----

json uid_json(const EntityUid& u) {
  return {{"type", u.type}, {"id", u.id}};
}

json entity_json(const rules::Entity& e) {
  json parents = json::array();
  for (const auto& p : e.parents) parents.push_back(uid_json(p));
  return {{"uid", uid_json(e.uid)}, {"attrs", json::object()}, {"parents", parents}};
}

// The entities one request needs: the principal and its role, the resource, its patient and
// its category.
json slice(const Workload& w, const BenchRequest& b) {
  json out = json::array();
  auto add = [&](const EntityUid& u) {
    if (const rules::Entity* e = w.directory.find(u)) out.push_back(entity_json(*e));
  };
  add(b.request.principal);
  if (const rules::Entity* p = w.directory.find(b.request.principal))
    for (const auto& r : p->parents) add(r);
  out.push_back(entity_json(b.resource));
  for (const auto& p : b.resource.parents) add(p);
  return out;
}

Result<json> run_cedar(const Options& o, const Workload& w, const fs::path& dir,
                       const rules::Authorizer& authz) {
  {
    std::ofstream(dir / "policies.json") << w.policy_map.dump();
    json requests = json::array();
    std::size_t n = std::min(w.requests.size(), static_cast<std::size_t>(o.cedar_requests));
    for (std::size_t i = 0; i < n; ++i) {
      const BenchRequest& b = w.requests[i];
      rules::Entities local(&w.directory);
      local.add(b.resource);
      rules::Response r = authz.is_authorized(b.request, local);
      requests.push_back({{"principal", uid_json(b.request.principal)},
                          {"action", uid_json(b.request.action)},
                          {"resource", uid_json(b.request.resource)},
                          {"context", rules::value_to_json(b.request.context)},
                          {"entities", slice(w, b)},
                          {"decision", std::string(rules::decision_name(r.decision))}});
    }
    std::ofstream(dir / "requests.json") << requests.dump();
  }
  std::string command = fmt::format(
      "MEDGATE_CEDAR_MODULES='{}' '{}' '{}' '{}' --seconds {} --max {} 2>&1", MEDGATE_CEDAR_MODULES,
      o.node, MEDGATE_RULES_BENCH_JS, dir.string(), o.cedar_seconds, o.cedar_requests);
  std::FILE* pipe = ::popen(command.c_str(), "r");
  if (pipe == nullptr) return Status::Unavailable("cannot run " + command);
  std::string out;
  char buf[4096];
  while (std::size_t n = std::fread(buf, 1, sizeof buf, pipe)) out.append(buf, n);
  int rc = ::pclose(pipe);
  json j = json::parse(out, nullptr, false);
  if (rc != 0 || j.is_discarded() || j.contains("failure"))
    return Status::Unavailable(fmt::format(
        "cedar-wasm could not be run (exit {}): {}\n  (./setup installs node and cedar-wasm)", rc,
        out.substr(0, 2000)));
  return j;
}

// ---- the report ----

std::string us(double ms) {
  return fmt::format("{:.2f}", ms * 1000);
}

Status run(int argc, char** argv, const Options& o) {
  std::string command;
  for (int i = 0; i < argc; ++i) command += (i ? " " : "") + std::string(argv[i]);
  utsname u{};
  uname(&u);
#ifdef NDEBUG
  const char* build = "assertions off";
#else
  const char* build = "ASSERTIONS ON: not a Release build, the numbers are not representative";
#endif
  fmt::print("medgate rules vs cedar-wasm benchmark (medgate {}, g++ {}, {})\n", MEDGATE_VERSION,
             __VERSION__, build);
  fmt::print("  command:  {}\n", command);
  fmt::print("  date:     {} (load average at start: {})\n", utc_now(), load_average());
  fmt::print("  machine:  {} CPUs (nproc), {}, {} {} {}\n", cpus_available(),
             first_line_with("/proc/cpuinfo", "model name"), u.sysname, u.release, u.machine);
  fmt::print(
      "  workload: {} patients, {} practitioners, {} consent grants (one policy each) + 5 "
      "base policies; {} requests, 1 thread\n\n",
      grouped(static_cast<std::uint64_t>(o.patients)),
      grouped(static_cast<std::uint64_t>(o.practitioners)),
      grouped(static_cast<std::uint64_t>(o.grants)),
      grouped(static_cast<std::uint64_t>(o.requests)));
  std::fflush(stdout);

  auto t0 = Clock::now();
  Workload w = make_workload(o);
  auto t1 = Clock::now();
  rules::ParseResult parsed = rules::parse_policies(w.policy_text);
  if (!parsed.ok())
    return Status::Internal("the workload does not parse: " + parsed.errors[0].to_text());
  auto t2 = Clock::now();
  rules::Authorizer authz(std::move(parsed.policies));
  auto t3 = Clock::now();
  auto secs = [](auto a, auto b) { return std::chrono::duration<double>(b - a).count(); };
  fmt::print(
      "medgate: workload made in {:.2f} s; {} KB of policy text parsed in {:.2f} s, "
      "indexed in {:.2f} s ({} policies)\n",
      secs(t0, t1), w.policy_text.size() / 1000, secs(t1, t2), secs(t2, t3), authz.size());
  Measured m = run_medgate(authz, w, w.directory, true);
  double ours_rate = static_cast<double>(m.decisions) / m.seconds;
  rules::Entities full = w.directory;
  for (const auto& b : w.requests) full.add(b.resource);
  Measured core = run_medgate(authz, w, full, false);
  m.wrong += core.wrong;
  fmt::print(
      "medgate: {} allows of {} ({:.0f}%), {} answers with errors, {} decisions the workload "
      "does not mean{}\n\n",
      grouped(m.allows), grouped(m.decisions),
      100.0 * static_cast<double>(m.allows) / static_cast<double>(m.decisions), m.with_errors,
      m.wrong, m.wrong ? " (first: " + m.first_wrong + ")" : "");
  std::fflush(stdout);

  json cedar;
  if (o.cedar) {
    testing::TempDir temp("bench-rules");
    fs::path dir = o.cedar_dir.empty() ? temp.path() : fs::path(o.cedar_dir);
    fs::create_directories(dir);
    Result<json> r = run_cedar(o, w, dir, authz);
    if (!r.ok()) {
      fmt::print("cedar-wasm: {}\n\n", r.status().message());
      if (o.smoke) return r.status();
    } else {
      cedar = *r;
      fmt::print(
          "cedar-wasm {} on node {}: {}; policy set parsed in {:.2f} s, first "
          "call {:.0f} ms (not counted); {} requests (each with its slice of entities), {} "
          "decisions differ from medgate's{}\n\n",
          cedar.value("cedar", "?"), cedar.value("node", "?"), cedar.value("api", "?"),
          cedar.value("parse_ms", 0.0) / 1000, cedar.value("first_call_ms", 0.0),
          cedar.value("requests", 0), cedar.value("mismatches", 0),
          cedar["first_mismatch"].is_null() ? ""
                                            : " (first: " + cedar["first_mismatch"].dump() + ")");
    }
  }

  Table table({"engine", "decisions", "decisions/s", "p50 µs", "p99 µs", "max µs", "x cedar-wasm"});
  std::string ratio;
  if (!cedar.is_null())
    ratio = fmt::format("{:.0f}x", ours_rate / cedar.value("decisions_per_s", 1.0));
  table.row({"medgate", grouped(m.decisions), rate(ours_rate), us(m.latency.p50_ms),
             us(m.latency.p99_ms), us(m.latency.max_ms), ratio});
  double core_rate = static_cast<double>(core.decisions) / core.seconds;
  table.row({"  resources in the directory", grouped(core.decisions), rate(core_rate),
             us(core.latency.p50_ms), us(core.latency.p99_ms), us(core.latency.max_ms),
             cedar.is_null()
                 ? ""
                 : fmt::format("{:.0f}x", core_rate / cedar.value("decisions_per_s", 1.0))});
  if (!cedar.is_null())
    table.row({"cedar-wasm", grouped(cedar.value("requests", std::uint64_t{0})),
               rate(cedar.value("decisions_per_s", 0.0)),
               fmt::format("{:.2f}", cedar.value("p50_us", 0.0)),
               fmt::format("{:.2f}", cedar.value("p99_us", 0.0)), "", "1x"});
  table.print(true);
  fmt::print(
      "\"medgate\" adds each request's resource to a request-local store over the directory "
      "inside\n"
      "the timed call, as the appliance does; the row below it has every resource in the "
      "directory\n"
      "already. targets: medgate p50 <= 2 µs, p99 <= 10 µs, >= 30x cedar-wasm's decisions/s\n");
  fmt::print("load average at end: {}\n", load_average());

  if (o.smoke) {
    if (m.wrong > 0) return Status::Internal(fmt::format("{} wrong decisions", m.wrong));
    if (!cedar.is_null() && cedar.value("mismatches", 0) > 0)
      return Status::Internal("medgate and cedar-wasm decide differently");
  }
  return Status::Ok();
}

}  // namespace
}  // namespace medgate::bench

int main(int argc, char** argv) {
  using namespace medgate;
  Result<bench::Options> options = bench::parse_args(argc, argv);
  if (!options.ok()) {
    fmt::print(stderr, "bench_rules_cedar: {}\n", options.status().message());
    return 2;
  }
  if (options->help) {
    fmt::print("{}", bench::kUsage);
    return 0;
  }
  Status s = bench::run(argc, argv, *options);
  if (!s.ok()) {
    fmt::print(stderr, "bench_rules_cedar: {}\n", s.to_string());
    return 1;
  }
  return 0;
}
