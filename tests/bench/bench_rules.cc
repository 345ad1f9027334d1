// bench_rules: what one consent decision costs. A benchmark, not a test: nothing here judges a
// time; `--smoke` (a ctest) runs every phase with tiny counts so that the benchmark cannot rot,
// and fails only when a decision is wrong.
//
// The shape of the target: P practitioners, N patients (each in one of 50 wards), and
// G grants `permit(principal == Practitioner::"dK", action == Action::"read",
// resource in Patient::"pM") when { context.purpose == "TREAT" && context.now < 1900000000 };`,
// G/N per patient. Requests, in a fixed random order, half for a granted pair:
//   - resource = the patient itself;
//   - resource = PatientData::"obs" in a request-local layer whose parent is the patient (how the
//     access service asks);
// and the cost of adding and removing one grant.
//
// Run a Release (RelWithDebInfo) build; `bench_rules --help` lists the flags.
#include <time.h>

#include <chrono>
#include <cstdio>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include <fmt/format.h>

#include "ledger/rules/authorizer.h"
#include "tests/bench/bench_util.h"
#include "tests/unit/rules_test_builders.h"

using namespace medgate;
using namespace medgate::rules;
using namespace medgate::rules::testing;

namespace {

struct Options {
  int practitioners = 1000;
  int patients = 10000;
  int grants = 100000;
  int decisions = 1000000;
  bool smoke = false;
};

std::string practitioner_id(int k) {
  return "d" + std::to_string(k);
}
std::string patient_id(int m) {
  return "p" + std::to_string(m);
}

// Grant i: patient i % N, practitioner (i / N * 7919 + i) % P; a grant for every patient first.
std::pair<int, int> grant_pair(int i, const Options& o) {
  return {(i / o.patients * 7919 + i) % o.practitioners, i % o.patients};
}

Policy grant(int i, const Options& o) {
  auto [d, p] = grant_pair(i, o);
  return permit("grant-" + std::to_string(i), scope_eq(uid("Practitioner", practitioner_id(d))),
                scope_eq(uid("Action", "read")), scope_in(uid("Patient", patient_id(p))),
                {when(and_(eq(attr(context(), "purpose"), lit("TREAT")),
                           bin(BinaryOp::kLt, attr(context(), "now"), lit(1900000000))))});
}

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// This thread's CPU time: on a shared machine, wall time also counts the other tenants' turns.
double cpu_seconds() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) * 1e-9;
}

int run(const Options& o) {
  Entities directory;
  for (int m = 0; m < o.patients; ++m) {
    directory.add(make_entity(uid("Patient", patient_id(m)), {},
                              {uid("Ward", "w" + std::to_string(m % 50))}));
  }
  for (int k = 0; k < o.practitioners; ++k) {
    directory.add(make_entity(uid("Practitioner", practitioner_id(k)), {}, {uid("Team", "t")}));
  }

  auto start = std::chrono::steady_clock::now();
  Authorizer az;
  for (int i = 0; i < o.grants; ++i) {
    if (!az.add(grant(i, o)).ok()) return 1;
  }
  double load = seconds_since(start);

  // Requests: even ones for a granted pair (allow), odd ones for a random pair (mostly deny).
  std::mt19937 rng(1);
  struct Ask {
    EntityUid principal, resource;
    bool granted;
  };
  std::vector<Ask> asks;
  for (int q = 0; q < 4096; ++q) {
    if (q % 2 == 0) {
      auto [d, p] = grant_pair(static_cast<int>(rng() % o.grants), o);
      asks.push_back(
          {uid("Practitioner", practitioner_id(d)), uid("Patient", patient_id(p)), true});
    } else {
      asks.push_back(
          {uid("Practitioner", practitioner_id(static_cast<int>(rng() % o.practitioners))),
           uid("Patient", patient_id(static_cast<int>(rng() % o.patients))), false});
    }
  }
  const Value context = Value::record(
      {{"purpose", Value(std::string("TREAT"))}, {"now", Value(std::int64_t{1700000000})}});

  bench::Table table({"decision", "decisions", "ns/decision (wall)", "ns/decision (cpu)",
                      "decisions/s", "allowed"});
  auto measure = [&](const char* name, bool layered) {
    std::vector<Request> requests;
    std::vector<Entities> layers;
    layers.reserve(asks.size());
    for (const Ask& a : asks) {
      Request r{a.principal, uid("Action", "read"), a.resource, context};
      if (layered) {
        layers.emplace_back(&directory);
        layers.back().add(make_entity(uid("PatientData", "obs"), {}, {a.resource}));
        r.resource = uid("PatientData", "obs");
      }
      requests.push_back(std::move(r));
    }
    std::size_t allowed = 0;
    bool wrong = false;
    auto t0 = std::chrono::steady_clock::now();
    const double cpu0 = cpu_seconds();
    for (int n = 0; n < o.decisions; ++n) {
      std::size_t q = static_cast<std::size_t>(n) % requests.size();
      Response r = az.is_authorized(requests[q], layered ? layers[q] : directory);
      bool allow = r.decision == Decision::kAllow;
      allowed += allow ? 1 : 0;
      if (asks[q].granted && !allow) wrong = true;
      if (!r.errors.empty()) wrong = true;
    }
    double s = seconds_since(t0);
    double cpu = cpu_seconds() - cpu0;
    table.row({name, bench::grouped(static_cast<std::uint64_t>(o.decisions)),
               fmt::format("{:.0f}", s * 1e9 / o.decisions),
               fmt::format("{:.0f}", cpu * 1e9 / o.decisions), bench::rate(o.decisions / s),
               fmt::format("{:.1f}%", 100.0 * static_cast<double>(allowed) / o.decisions)});
    return !wrong;
  };
  bool ok = measure("resource = patient", false);
  ok = measure("resource = data in a request layer", true) && ok;

  // Add and remove one grant, many times.
  const int churn = o.smoke ? 100 : 100000;
  auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < churn; ++i) {
    Policy p = grant(i, o);
    p.id = "churn";
    if (!az.add(std::move(p)).ok() || !az.remove("churn").ok()) return 1;
  }
  double churn_s = seconds_since(t0);

  fmt::print("rules: {} grants over {} patients and {} practitioners (loaded in {:.2f} s)\n",
             bench::grouped(static_cast<std::uint64_t>(o.grants)),
             bench::grouped(static_cast<std::uint64_t>(o.patients)),
             bench::grouped(static_cast<std::uint64_t>(o.practitioners)), load);
  table.print();
  fmt::print("  add + remove one grant: {:.0f} ns\n", churn_s * 1e9 / churn);
  if (!ok) fmt::print("WRONG: a granted request was denied or a policy errored\n");
  return ok ? 0 : 1;
}

}  // namespace

int main(int argc, char* argv[]) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    std::string_view a = argv[i];
    auto next = [&]() { return i + 1 < argc ? std::stoi(argv[++i]) : 0; };
    if (a == "--smoke") {
      o = Options{20, 100, 1000, 2000, true};
    } else if (a == "--grants") {
      o.grants = next();
    } else if (a == "--patients") {
      o.patients = next();
    } else if (a == "--practitioners") {
      o.practitioners = next();
    } else if (a == "--decisions") {
      o.decisions = next();
    } else {
      std::fputs(
          "bench_rules [--smoke] [--grants N] [--patients N] [--practitioners N] [--decisions N]\n",
          stderr);
      return a == "--help" ? 0 : 2;
    }
  }
  if (o.grants < 1 || o.patients < 1 || o.practitioners < 1 || o.decisions < 1) return 2;
  return run(o);
}
