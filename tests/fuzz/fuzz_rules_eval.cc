// Fuzz target: the consent engine past the parser (ledger/rules/): entities_from_json_text (the
// directory an admin imports) and the authorizer over whatever policies parse.
// Input: policy text, optionally followed by a NUL byte and a Cedar JSON entities document.
// Properties: never crashes; a refused directory is kInvalidArgument; every determining policy
// and every reported error names a policy of the set; an allow is determined only by permits and
// a deny with reasons only by forbids; the same request gives the same answer twice.
#include <algorithm>
#include <set>
#include <string>

#include "ledger/rules/authorizer.h"
#include "ledger/rules/parser.h"
#include "tests/fuzz/fuzz_check.h"

using namespace medgate;
using namespace medgate::rules;

namespace {

// A small directory with a cycle, shared parents and attributes of every kind.
Entities base_entities() {
  Entities e;
  auto uid = [](const char* t, const char* i) { return EntityUid{t, i}; };
  e.add({uid("Practitioner", "lee"),
         {{"age", Value(std::int64_t{41})},
          {"name", Value(std::string("Lee"))},
          {"suspended", Value(false)},
          {"wards", Value::set({Value(uid("Ward", "icu")), Value(uid("Ward", "er"))})},
          {"rec", Value::record({{"x", Value(std::int64_t{1})}})}},
         {uid("Role", "physician"), uid("Ward", "icu")}});
  e.add({uid("Role", "physician"), {}, {uid("Role", "staff")}});
  e.add({uid("Role", "staff"), {}, {uid("Role", "physician")}});  // a cycle
  e.add({uid("Ward", "icu"), {{"floor", Value(std::int64_t{3})}}, {uid("Organization", "h")}});
  e.add({uid("PatientData", "p/vitals"),
         {{"category", Value(std::string("vitals"))}, {"signed_consent_required", Value(false)}},
         {uid("Patient", "p"), uid("Category", "vitals")}});
  return e;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size > fuzz::kMaxInput) return 0;
  std::string input(reinterpret_cast<const char*>(data), size);
  std::string policies = input, entities_text;
  if (std::size_t nul = input.find('\0'); nul != std::string::npos) {
    policies = input.substr(0, nul);
    entities_text = input.substr(nul + 1);
  }
  static const Entities kBase = base_entities();
  Entities extra(&kBase);
  if (!entities_text.empty()) {
    Result<Entities> parsed = entities_from_json_text(entities_text);
    if (!parsed.ok()) {
      FUZZ_CHECK(parsed.status().code() == StatusCode::kInvalidArgument, "%s",
                 parsed.status().to_string().c_str());
    } else {
      for (const Entity* e : parsed->all()) extra.add(*e);
    }
  }
  ParseResult parsed = parse_policies(policies);
  if (!parsed.ok()) return 0;
  std::set<std::string> ids;
  std::set<std::string> forbids;
  for (const Policy& p : parsed.policies.policies) {
    ids.insert(p.id);
    if (p.effect == Effect::kForbid) forbids.insert(p.id);
  }
  Authorizer authorizer(std::move(parsed.policies));
  const Request requests[] = {
      {{"Practitioner", "lee"},
       {"Action", "read"},
       {"PatientData", "p/vitals"},
       Value::record(
           {{"purpose", Value(std::string("TREAT"))}, {"now", Value(std::int64_t{1800000000})}})},
      {{"Role", "staff"}, {"Action", "write"}, {"Patient", "p"}, Value::record({})},
      {{"Nobody", ""},
       {"Action", "read"},
       {"PatientData", "q/x"},
       Value::record({{"reason", Value(std::string("*"))}})},
  };
  for (const Request& r : requests) {
    Response a = authorizer.is_authorized(r, extra);
    for (const std::string& id : a.determining) {
      FUZZ_CHECK(ids.count(id), "determining policy %s is not in the set", id.c_str());
      FUZZ_CHECK((a.decision == Decision::kDeny) == (forbids.count(id) > 0),
                 "policy %s determined a %s", id.c_str(),
                 std::string(decision_name(a.decision)).c_str());
    }
    for (const PolicyError& e : a.errors)
      FUZZ_CHECK(ids.count(e.policy_id), "error names unknown policy %s", e.policy_id.c_str());
    Response b = authorizer.is_authorized(r, extra);
    FUZZ_CHECK(a.decision == b.decision && a.determining == b.determining && a.errors == b.errors,
               "the same request answered differently");
  }
  return 0;
}
