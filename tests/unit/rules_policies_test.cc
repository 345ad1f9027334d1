// The rule engine end to end from text: policies through parse_policies, entities and context
// through Cedar's JSON, decisions through the authorizer; and single expressions through
// parse_expression and the evaluator, each with the value Cedar gives (written as Cedar text) or
// the error it raises.
#include <catch2/catch.hpp>

#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "ledger/rules/authorizer.h"
#include "ledger/rules/parser.h"

using namespace medgate;
using namespace medgate::rules;

namespace {

constexpr std::string_view kDirectory = R"([
  {"uid": {"type": "Practitioner", "id": "dr-lee"},
   "attrs": {"role": "physician", "level": 3, "teams": ["cardio", "icu"]},
   "parents": [{"type": "Team", "id": "cardio-team"}]},
  {"uid": {"type": "Practitioner", "id": "dr-kim"}, "attrs": {"role": "nurse", "level": 1},
   "parents": []},
  {"uid": {"type": "Team", "id": "cardio-team"}, "attrs": {},
   "parents": [{"type": "Department", "id": "cardiology"}]},
  {"uid": {"type": "Patient", "id": "p1"},
   "attrs": {"age": 40, "gp": {"__entity": {"type": "Practitioner", "id": "dr-lee"}},
             "optOut": false, "ward": "w1"},
   "parents": [{"type": "Ward", "id": "w1"}]},
  {"uid": {"type": "Patient", "id": "p2"}, "attrs": {"age": 12, "optOut": true, "ward": "w2"},
   "parents": [{"type": "Ward", "id": "w2"}]},
  {"uid": {"type": "Ward", "id": "w1"}, "attrs": {},
   "parents": [{"type": "Department", "id": "cardiology"}]},
  {"uid": {"type": "Ward", "id": "w2"}, "attrs": {}, "parents": []},
  {"uid": {"type": "Action", "id": "read"}, "attrs": {},
   "parents": [{"type": "Action", "id": "any"}]},
  {"uid": {"type": "Action", "id": "write"}, "attrs": {},
   "parents": [{"type": "Action", "id": "any"}]}
])";

constexpr std::string_view kPolicies = R"(
// The grant form the index is built for.
@id("grant-lee-p1")
permit (principal == Practitioner::"dr-lee", action == Action::"read", resource in Patient::"p1")
when { context.purpose == "TREAT" && context.now < 1900000000 };

// A department-wide rule: anyone of the cardiology department may read its patients' data
// during working hours, unless the patient opted out.
@id("cardiology-hours")
permit (principal in Department::"cardiology", action in [Action::"read"],
        resource is PatientData in Department::"cardiology")
when { context.hour >= 8 && context.hour < 18 }
unless { resource.owner.optOut };

// A patient's GP may do anything with the patient's data.
@id("gp")
permit (principal is Practitioner, action in Action::"any", resource is PatientData)
when { resource has owner && resource.owner has gp && resource.owner.gp == principal };

// Nobody touches minors' data outside an emergency.
@id("minors")
forbid (principal, action, resource is PatientData)
when { resource.owner.age < 18 } unless { context has emergency && context.emergency };

// Broken on purpose: an attribute nobody has.
@id("broken")
permit (principal == Practitioner::"dr-kim", action, resource)
when { principal.shoeSize > 40 };

// No @id: policy5.
permit (principal, action == Action::"write", resource)
when { context.purpose like "AUDIT-*" && principal.role != "nurse" };
)";

struct World {
  Entities directory;
  Authorizer authorizer;
};

const World& world() {
  static const World w = [] {
    World out;
    auto entities = entities_from_json_text(kDirectory);
    REQUIRE(entities.ok());
    out.directory = std::move(entities).value();
    ParseResult parsed = parse_policies(kPolicies);
    for (const Diagnostic& d : parsed.errors) FAIL(d.to_text());
    out.authorizer = Authorizer(std::move(parsed.policies));
    return out;
  }();
  return w;
}

// A decision for practitioner `who` doing `what` to data `data` owned by `patient`, with the
// context given as JSON. The data entity lives in a request-local layer, as the access service
// builds it.
Response decide(std::string_view who, std::string_view what, std::string_view patient,
                std::string_view context_json) {
  const World& w = world();
  Entities request_layer(&w.directory);
  request_layer.add(Entity{EntityUid{"PatientData", "obs-1"},
                           {{"owner", Value(EntityUid{"Patient", std::string(patient)})}},
                           {EntityUid{"Patient", std::string(patient)}}});
  auto context = value_from_json(nlohmann::json::parse(context_json));
  REQUIRE(context.ok());
  Request r{EntityUid{"Practitioner", std::string(who)}, EntityUid{"Action", std::string(what)},
            EntityUid{"PatientData", "obs-1"}, *context};
  return w.authorizer.is_authorized(r, request_layer);
}

std::vector<std::string> error_ids(const Response& r) {
  std::vector<std::string> ids;
  for (const PolicyError& e : r.errors) ids.push_back(e.policy_id);
  return ids;
}

using Ids = std::vector<std::string>;

}  // namespace

TEST_CASE("policies from text: consent decisions", "[rules][policies]") {
  REQUIRE(world().authorizer.size() == 6);
  REQUIRE(world().authorizer.find("policy5") != nullptr);

  // The grant (and the GP rule: dr-lee is p1's GP).
  Response r =
      decide("dr-lee", "read", "p1", R"({"purpose": "TREAT", "now": 1700000000, "hour": 20})");
  CHECK(r.decision == Decision::kAllow);
  CHECK(r.determining == Ids{"gp", "grant-lee-p1"});
  CHECK(r.errors.empty());

  // Outside the grant's time: the GP rule still allows; cardiology-hours needs an hour.
  r = decide("dr-lee", "read", "p1", R"({"purpose": "TREAT", "now": 1900000000, "hour": 9})");
  CHECK(r.determining == Ids{"cardiology-hours", "gp"});

  // dr-kim: not in cardiology, not a GP; "broken" errors (no shoeSize) and is skipped.
  r = decide("dr-kim", "read", "p1", R"({"purpose": "TREAT", "now": 1700000000, "hour": 9})");
  CHECK(r.decision == Decision::kDeny);
  CHECK(r.determining.empty());
  CHECK(error_ids(r) == Ids{"broken"});
  CHECK_THAT(r.errors[0].message, Catch::Contains("shoeSize"));

  // The minor p2 (opted out, ward w2 outside cardiology): the forbid wins unless an emergency.
  r = decide("dr-lee", "read", "p2", R"({"purpose": "TREAT", "now": 1, "hour": 9})");
  CHECK(r.decision == Decision::kDeny);
  CHECK(r.determining == Ids{"minors"});
  r = decide("dr-lee", "read", "p2", R"({"purpose": "TREAT", "now": 1, "emergency": true})");
  CHECK(r.decision == Decision::kDeny);  // nothing permits dr-lee on p2
  CHECK(r.determining.empty());

  // A write for an audit: policy5, unless a nurse.
  r = decide("dr-lee", "write", "p1", R"({"purpose": "AUDIT-2024"})");
  CHECK(r.determining == Ids{"gp", "policy5"});
  r = decide("dr-kim", "write", "p1", R"({"purpose": "AUDIT-2024"})");
  CHECK(r.decision == Decision::kDeny);
  CHECK(error_ids(r) == Ids{"broken"});
  // A context without purpose: policy5 errors too (record attribute missing), reported by id.
  r = decide("dr-kim", "write", "p1", R"({})");
  CHECK(error_ids(r) == Ids{"broken", "policy5"});
}

TEST_CASE("policies from text: grants come and go", "[rules][policies]") {
  Entities directory = std::move(entities_from_json_text(kDirectory)).value();
  Authorizer az;
  auto grant = [&](const std::string& text) {
    ParseResult parsed = parse_policies(text);
    REQUIRE(parsed.ok());
    REQUIRE(parsed.policies.policies.size() == 1);
    return az.add(std::move(parsed.policies.policies.front()));
  };
  REQUIRE(grant(R"(@id("g1") permit (principal == Practitioner::"dr-kim", action,
                    resource in Ward::"w2");)")
              .ok());
  Request r{EntityUid{"Practitioner", "dr-kim"}, EntityUid{"Action", "read"},
            EntityUid{"Patient", "p2"}, Value::record({})};
  CHECK(az.is_authorized(r, directory).determining == Ids{"g1"});
  CHECK(grant(R"(@id("g1") permit (principal, action, resource);)").code() ==
        StatusCode::kInvalidArgument);
  REQUIRE(az.remove("g1").ok());
  CHECK(az.is_authorized(r, directory).decision == Decision::kDeny);
}

namespace {

// The value of an expression written in Cedar, for the request below.
EvalResult eval_text(std::string_view text) {
  static const Entities directory = std::move(entities_from_json_text(kDirectory)).value();
  ExprParseResult parsed = parse_expression(text);
  INFO("expression: " << text);
  for (const Diagnostic& d : parsed.errors) FAIL(d.to_text());
  REQUIRE(parsed.expr != nullptr);
  Request r{
      EntityUid{"Practitioner", "dr-lee"}, EntityUid{"Action", "read"}, EntityUid{"Patient", "p1"},
      Value::record({{"purpose", Value(std::string("TREAT"))}, {"n", Value(std::int64_t{5})}})};
  return evaluate(*parsed.expr, r, directory);
}

}  // namespace

TEST_CASE("expressions from text: Cedar's values", "[rules][policies]") {
  struct Case {
    const char* expression;
    const char* expected;  // Cedar text of the value
  };
  const Case cases[] = {
      {"1 + 2 * 3", "7"},
      {"-9223372036854775808", "-9223372036854775808"},
      {"9223372036854775807 - 1 + 1", "9223372036854775807"},
      {"-(-9223372036854775807)", "9223372036854775807"},
      {"1 == \"1\"", "false"},
      {"1 != true", "true"},
      {"3 > 2 && 2 >= 2 && 1 < 2 && 2 <= 2", "true"},
      {"[1, 2, 2] == [2, 1]", "true"},
      {"{a: 1, b: [true]} == {b: [true], a: 1}", "true"},
      {"{a: {b: \"deep\"}}.a.b", "\"deep\""},
      {"{\"a b\": 1}[\"a b\"]", "1"},
      {"if context.n > 3 then \"big\" else 1 + \"never\"", "\"big\""},
      {"false && 1 + \"a\" == 2", "false"},
      {"true || principal.missing", "true"},
      {"\"abc\" like \"a*c\"", "true"},
      {"\"a*c\" like \"a\\*c\"", "true"},
      {"\"abc\" like \"a\\*c\"", "false"},
      {"\"caf\\u{e9}\" like \"caf?\"", "false"},
      {"\"caf\\u{e9}\" like \"caf*\"", "true"},
      {"[1, \"a\", Patient::\"p1\"].contains(Patient::\"p1\")", "true"},
      {"[1, 2].containsAll([])", "true"},
      {"[1, 2].containsAny([3, \"1\"])", "false"},
      {"principal in Department::\"cardiology\"", "true"},
      {"principal in [Ward::\"w1\", Team::\"cardio-team\"]", "true"},
      {"resource in Department::\"cardiology\"", "true"},
      {"Patient::\"p2\" in Department::\"cardiology\"", "false"},
      {"Nobody::\"x\" in Nobody::\"x\"", "true"},
      {"principal is Practitioner in Team::\"cardio-team\"", "true"},
      {"resource is Practitioner in Team::\"cardio-team\"", "false"},
      {"resource.gp == principal", "true"},
      {"resource.gp.teams.contains(\"icu\")", "true"},
      {"resource has gp && Patient::\"p2\" has gp", "false"},
      {"Nobody::\"x\" has anything", "false"},
      {"context has purpose && context.purpose == \"TREAT\"", "true"},
      {"action == Action::\"read\" && action in Action::\"any\"", "true"},
  };
  for (const Case& c : cases) {
    EvalResult got = eval_text(c.expression);
    EvalResult want = eval_text(c.expected);
    INFO(c.expression);
    if (const auto* e = std::get_if<EvalError>(&got)) FAIL("error: " << e->message);
    REQUIRE(std::holds_alternative<Value>(want));
    CHECK(std::get<Value>(got).to_text() == std::get<Value>(want).to_text());
  }
}

TEST_CASE("expressions from text: Cedar's errors", "[rules][policies]") {
  struct Case {
    const char* expression;
    const char* message;  // a part of the error
  };
  const Case cases[] = {
      {"9223372036854775807 + 1", "overflow"},
      {"-9223372036854775807 - 2", "overflow"},
      {"4611686018427387904 * 2", "overflow"},
      {"-(-9223372036854775808)", "overflow"},
      {"1 + \"a\"", "expected long, got string"},
      {"\"a\" < \"b\"", "expected long, got string"},
      {"!1", "expected bool, got long"},
      {"1 && true", "expected bool, got long"},
      {"true && 1", "expected bool, got long"},
      {"false || \"x\"", "expected bool, got string"},
      {"if 1 then 2 else 3", "expected bool, got long"},
      {"1 like \"*\"", "expected string, got long"},
      {"1 is Patient", "expected entity, got long"},
      {"\"p1\" in Patient::\"p1\"", "expected entity, got string"},
      {"principal in [Team::\"cardio-team\", 1]", "got long"},
      {"principal in 1", "expected entity or set"},
      {"\"abc\".contains(\"a\")", "expected set, got string"},
      {"[1].containsAll(1)", "expected set, got long"},
      {"{a: 1}.b", "record does not have the attribute `b`"},
      {"principal.shoeSize", "does not have the attribute `shoeSize`"},
      {"Nobody::\"x\".name", "does not exist"},
      {"action.anything", "does not have the attribute"},
      {"1 has a", "expected entity or record, got long"},
      {"[1, 1 + \"a\"]", "expected long"},
      {"{a: 1, b: !2}", "expected bool"},
  };
  for (const Case& c : cases) {
    EvalResult got = eval_text(c.expression);
    INFO(c.expression);
    if (const auto* v = std::get_if<Value>(&got)) FAIL("value: " << v->to_text());
    const EvalError& e = std::get<EvalError>(got);
    CHECK_THAT(e.message, Catch::Contains(c.message));
    CHECK(e.location.line == 1);
  }
}
