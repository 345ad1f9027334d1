// The rule engine's authorizer (ledger/rules/authorizer.h): scope matching, Cedar's decision rules
// (forbid overrides, default deny, erroring policies skipped and reported), add/remove, and the
// scope index, which must find exactly the policies a scan of all of them would: by hand for the
// cases that matter (a grant reachable only through an ancestor) and against a plain scan on
// random hierarchies, policy sets and add/remove sequences.
#include <catch2/catch.hpp>

#include <algorithm>
#include <random>
#include <string>
#include <vector>

#include "ledger/rules/authorizer.h"
#include "tests/unit/rules_test_builders.h"

using namespace medgate;
using namespace medgate::rules;
using namespace medgate::rules::testing;

namespace {

const EntityUid kLee = uid("Practitioner", "dr-lee");
const EntityUid kKim = uid("Practitioner", "dr-kim");
const EntityUid kRead = uid("Action", "read");
const EntityUid kWrite = uid("Action", "write");
const EntityUid kObs = uid("PatientData", "obs-1");
const EntityUid kP1 = uid("Patient", "p1");

// dr-lee in Team cardio-team in Department cardiology; dr-kim in no team.
// obs-1 -> Patient p1 -> Ward w1 -> Department cardiology. Action read in Action::"any".
Entities hospital() {
  Entities store;
  store.add(make_entity(kLee, {{"role", str("physician")}}, {uid("Team", "cardio-team")}));
  store.add(make_entity(kKim, {{"role", str("nurse")}}));
  store.add(make_entity(uid("Team", "cardio-team"), {}, {uid("Department", "cardiology")}));
  store.add(make_entity(kP1, {{"age", num(40)}}, {uid("Ward", "w1")}));
  store.add(make_entity(uid("Ward", "w1"), {}, {uid("Department", "cardiology")}));
  store.add(make_entity(kObs, {{"kind", str("hr")}}, {kP1}));
  store.add(make_entity(kRead, {}, {uid("Action", "any")}));
  return store;
}

Request req(EntityUid p, EntityUid a, EntityUid r, Value context = Value::record({})) {
  return Request{std::move(p), std::move(a), std::move(r), std::move(context)};
}

Request treat(EntityUid p = kLee, EntityUid r = kObs) {
  return req(std::move(p), kRead, std::move(r),
             Value::record({{"purpose", str("TREAT")}, {"now", num(1700000000)}}));
}

ExprPtr ctx(const char* name) {
  return attr(context(), name);
}
ExprPtr boom() {
  return bin(BinaryOp::kAdd, lit(1), lit("a"));
}

using Ids = std::vector<std::string>;

// What the authorizer must answer: every policy scanned, no index.
Response scan(const std::vector<Policy>& policies, const Request& request, const Entities& store) {
  Response out;
  Ids permits, forbids;
  for (const Policy& p : policies) {
    if (!scope_matches(p, request, store)) continue;
    bool satisfied = true;
    bool failed = false;
    for (const Condition& c : p.conditions) {
      EvalResult r = evaluate(*c.expr, request, store);
      if (std::holds_alternative<EvalError>(r) || !std::get<Value>(r).is_bool()) {
        failed = true;
        break;
      }
      if (std::get<Value>(r).as_bool() != c.is_when) {
        satisfied = false;
        break;
      }
    }
    if (failed) {
      out.errors.push_back(PolicyError{p.id, ""});
    } else if (satisfied) {
      (p.effect == Effect::kForbid ? forbids : permits).push_back(p.id);
    }
  }
  std::sort(out.errors.begin(), out.errors.end(),
            [](const PolicyError& a, const PolicyError& b) { return a.policy_id < b.policy_id; });
  std::sort(permits.begin(), permits.end());
  std::sort(forbids.begin(), forbids.end());
  out.decision = forbids.empty() && !permits.empty() ? Decision::kAllow : Decision::kDeny;
  out.determining = forbids.empty() ? permits : forbids;
  return out;
}

Ids error_ids(const Response& r) {
  Ids ids;
  for (const PolicyError& e : r.errors) ids.push_back(e.policy_id);
  return ids;
}

}  // namespace

TEST_CASE("authorizer: scope clauses", "[rules][authorizer]") {
  const Entities store = hospital();
  // scope_matches() and the authorizer's index (which decides scopes on interned ids) must agree.
  auto matches = [&](ScopeConstraint p, ScopeConstraint a, ScopeConstraint r,
                     const Request& request = treat()) {
    Policy policy = permit("p", std::move(p), std::move(a), std::move(r));
    const bool scoped = scope_matches(policy, request, store);
    Authorizer az;
    REQUIRE(az.add(std::move(policy)).ok());
    CHECK((az.is_authorized(request, store).decision == Decision::kAllow) == scoped);
    return scoped;
  };
  CHECK(matches(any(), any(), any()));
  CHECK(matches(scope_eq(kLee), any(), any()));
  CHECK_FALSE(matches(scope_eq(kKim), any(), any()));
  CHECK(matches(scope_in(kLee), any(), any()));
  CHECK(matches(scope_in(uid("Department", "cardiology")), any(), any()));
  CHECK_FALSE(matches(scope_in(uid("Ward", "w1")), any(), any()));
  CHECK(matches(scope_is("Practitioner"), any(), any()));
  CHECK_FALSE(matches(scope_is("Patient"), any(), any()));
  CHECK(matches(scope_is_in("Practitioner", uid("Team", "cardio-team")), any(), any()));
  CHECK_FALSE(matches(scope_is_in("Nurse", uid("Team", "cardio-team")), any(), any()));
  CHECK_FALSE(matches(scope_is_in("Practitioner", uid("Team", "other")), any(), any()));

  CHECK(matches(any(), scope_eq(kRead), any()));
  CHECK_FALSE(matches(any(), scope_eq(kWrite), any()));
  CHECK(matches(any(), scope_in(uid("Action", "any")), any()));
  CHECK(matches(any(), scope_in_set({kWrite, uid("Action", "any")}), any()));
  CHECK_FALSE(matches(any(), scope_in_set({kWrite}), any()));
  CHECK_FALSE(matches(any(), scope_in_set({}), any()));

  CHECK(matches(any(), any(), scope_eq(kObs)));
  CHECK(matches(any(), any(), scope_in(kP1)));
  CHECK(matches(any(), any(), scope_in(uid("Department", "cardiology"))));
  CHECK_FALSE(matches(any(), any(), scope_in(uid("Patient", "p2"))));
  CHECK(matches(any(), any(), scope_is("PatientData")));
  CHECK(matches(any(), any(), scope_is_in("PatientData", uid("Ward", "w1"))));
  CHECK_FALSE(matches(any(), any(), scope_is_in("Patient", uid("Ward", "w1"))));
  // Entities the store does not hold match by equality only.
  CHECK(matches(scope_in(uid("Ghost", "g")), any(), any(), req(uid("Ghost", "g"), kRead, kObs)));
  CHECK_FALSE(matches(scope_in(uid("Department", "cardiology")), any(), any(),
                      req(uid("Ghost", "g"), kRead, kObs)));
}

TEST_CASE("authorizer: default deny, permit, and forbid overriding", "[rules][authorizer]") {
  const Entities store = hospital();
  Authorizer empty;
  Response r = empty.is_authorized(treat(), store);
  CHECK(r.decision == Decision::kDeny);
  CHECK(r.determining.empty());
  CHECK(r.errors.empty());
  CHECK(decision_name(r.decision) == "deny");

  Authorizer az;
  REQUIRE(az.add(permit("grant-b", scope_eq(kLee), scope_eq(kRead), scope_in(kP1),
                        {when(eq(ctx("purpose"), lit("TREAT")))}))
              .ok());
  REQUIRE(az.add(permit("grant-a", scope_in(uid("Department", "cardiology")))).ok());
  REQUIRE(az.add(permit("never", scope_eq(kKim))).ok());  // not for dr-lee
  r = az.is_authorized(treat(), store);
  CHECK(r.decision == Decision::kAllow);
  CHECK(decision_name(r.decision) == "allow");
  CHECK(r.determining == Ids{"grant-a", "grant-b"});  // sorted, only the satisfied ones

  // A satisfied forbid wins, and only forbids determine the deny.
  REQUIRE(az.add(forbid("lockdown-2", any(), any(), scope_in(uid("Ward", "w1")),
                        {unless(ctx("emergency"))}))
              .ok());
  REQUIRE(az.add(forbid("lockdown-1", any(), scope_eq(kRead), any())).ok());
  REQUIRE(az.add(forbid("not-me", scope_eq(kKim))).ok());
  Request emergency = treat();
  emergency.context = Value::record({{"purpose", str("TREAT")}, {"emergency", Value(true)}});
  r = az.is_authorized(emergency, store);
  CHECK(r.decision == Decision::kDeny);
  CHECK(r.determining == Ids{"lockdown-1"});
  CHECK(r.errors.empty());
  Request routine = treat();
  routine.context = Value::record({{"purpose", str("TREAT")}, {"emergency", Value(false)}});
  r = az.is_authorized(routine, store);
  CHECK(r.determining == Ids{"lockdown-1", "lockdown-2"});

  // No permit applies: default deny, determined by nothing.
  REQUIRE(az.remove("lockdown-1").ok());
  REQUIRE(az.remove("lockdown-2").ok());
  r = az.is_authorized(req(kKim, kWrite, uid("Patient", "p9")), store);
  CHECK(r.decision == Decision::kDeny);
  CHECK(r.determining == Ids{"not-me"});
  REQUIRE(az.remove("not-me").ok());
  r = az.is_authorized(req(kKim, kWrite, uid("Patient", "p9")), store);
  CHECK(r.decision == Decision::kAllow);
  CHECK(r.determining == Ids{"never"});
  REQUIRE(az.remove("never").ok());
  r = az.is_authorized(req(kKim, kWrite, uid("Patient", "p9")), store);
  CHECK(r.decision == Decision::kDeny);
  CHECK(r.determining.empty());
}

TEST_CASE("authorizer: conditions in order, when and unless", "[rules][authorizer]") {
  const Entities store = hospital();
  auto decide = [&](std::vector<Condition> conditions) {
    Authorizer az;
    REQUIRE(az.add(permit("p", any(), any(), any(), std::move(conditions))).ok());
    return az.is_authorized(treat(), store);
  };
  CHECK(decide({}).decision == Decision::kAllow);
  CHECK(decide({when(lit(true)), unless(lit(false))}).decision == Decision::kAllow);
  CHECK(decide({when(lit(false))}).decision == Decision::kDeny);
  CHECK(decide({unless(lit(true))}).decision == Decision::kDeny);
  // The first false condition ends the policy: a later error is never reached.
  Response r = decide({when(lit(false)), when(boom())});
  CHECK(r.decision == Decision::kDeny);
  CHECK(r.errors.empty());
  r = decide({unless(lit(true)), when(lit(1))});
  CHECK(r.errors.empty());
  // A true one does not: the error after it counts.
  r = decide({when(lit(true)), unless(boom())});
  CHECK(r.decision == Decision::kDeny);
  CHECK(error_ids(r) == Ids{"p"});
  // A scope that does not match ends it before any condition.
  Authorizer az;
  REQUIRE(az.add(permit("p", scope_eq(kKim), any(), any(), {when(boom())})).ok());
  CHECK(az.is_authorized(treat(), store).errors.empty());
}

TEST_CASE("authorizer: an erroring policy is skipped and reported", "[rules][authorizer]") {
  const Entities store = hospital();
  Authorizer az;
  REQUIRE(az.add(permit("z-ok")).ok());
  REQUIRE(az.add(permit("b-type", any(), any(), any(), {when(at(boom(), 3, 14))})).ok());
  REQUIRE(az.add(permit("a-missing", any(), any(), any(), {when(ctx("nope"))})).ok());
  REQUIRE(az.add(permit("c-nonbool", any(), any(), any(), {when(at(lit(1), 5, 7))})).ok());
  REQUIRE(az.add(permit("d-unless-nonbool", any(), any(), any(), {unless(lit("x"))})).ok());
  REQUIRE(az.add(permit("e-overflow", any(), any(), any(),
                        {when(bin(BinaryOp::kLt,
                                  bin(BinaryOp::kMul, bin(BinaryOp::kMul, ctx("now"), ctx("now")),
                                      ctx("now")),
                                  lit(0)))}))
              .ok());
  REQUIRE(az.add(permit("f-ghost", any(), any(), any(),
                        {when(eq(attr(lit(entity("Ghost", "g")), "x"), lit(1)))}))
              .ok());
  Response r = az.is_authorized(treat(), store);
  CHECK(r.decision == Decision::kAllow);
  CHECK(r.determining == Ids{"z-ok"});
  REQUIRE(error_ids(r) ==
          Ids{"a-missing", "b-type", "c-nonbool", "d-unless-nonbool", "e-overflow", "f-ghost"});
  CHECK_THAT(r.errors[0].message, Catch::Contains("`nope`"));
  CHECK(r.errors[1].message == "3:14: type error: expected long, got string");
  CHECK(r.errors[2].message == "5:7: type error: expected bool, got long");
  CHECK(r.errors[3].message == "type error: expected bool, got string");
  CHECK_THAT(r.errors[4].message, Catch::Contains("overflow"));
  CHECK_THAT(r.errors[5].message, Catch::Contains("does not exist"));

  // An erroring forbid is skipped too: it does not deny (Cedar's rule), it is reported.
  Authorizer guarded;
  REQUIRE(guarded.add(permit("allow-all")).ok());
  REQUIRE(guarded.add(forbid("broken-forbid", any(), any(), any(), {when(ctx("missing"))})).ok());
  r = guarded.is_authorized(treat(), store);
  CHECK(r.decision == Decision::kAllow);
  CHECK(r.determining == Ids{"allow-all"});
  CHECK(error_ids(r) == Ids{"broken-forbid"});
  // Only errors: default deny, with the errors.
  REQUIRE(guarded.remove("allow-all").ok());
  r = guarded.is_authorized(treat(), store);
  CHECK(r.decision == Decision::kDeny);
  CHECK(r.determining.empty());
  CHECK(error_ids(r) == Ids{"broken-forbid"});
}

TEST_CASE("authorizer: add, remove, find, size", "[rules][authorizer]") {
  const Entities store = hospital();
  Authorizer az(
      PolicySet{{permit("one", scope_eq(kLee)), forbid("two", any(), any(), scope_eq(kP1))}});
  CHECK(az.size() == 2);
  REQUIRE(az.find("one") != nullptr);
  CHECK(az.find("one")->effect == Effect::kPermit);
  CHECK(az.find("three") == nullptr);

  Status dup = az.add(permit("one"));
  CHECK(dup.code() == StatusCode::kInvalidArgument);
  CHECK_THAT(dup.message(), Catch::Contains("one"));
  CHECK(az.size() == 2);
  Status missing = az.remove("three");
  CHECK(missing.code() == StatusCode::kNotFound);
  CHECK_THAT(missing.message(), Catch::Contains("three"));

  CHECK(az.is_authorized(treat(), store).decision == Decision::kAllow);
  REQUIRE(az.remove("one").ok());
  CHECK(az.size() == 1);
  CHECK(az.find("one") == nullptr);
  CHECK(az.is_authorized(treat(), store).decision == Decision::kDeny);
  CHECK(az.remove("one").code() == StatusCode::kNotFound);
  // The id is free again.
  REQUIRE(az.add(permit("one", any(), any(), scope_in(uid("Ward", "w1")))).ok());
  CHECK(az.is_authorized(treat(), store).determining == Ids{"one"});

  // A set with a repeated id (parse_policies refuses those) loses no policy, forbids included.
  Authorizer repeated(PolicySet{{permit("x"), forbid("x", scope_eq(kLee))}});
  CHECK(repeated.size() == 2);
  Response both = repeated.is_authorized(treat(), store);
  CHECK(both.decision == Decision::kDeny);
  CHECK(both.determining == Ids{"x"});
  REQUIRE(repeated.remove("x").ok());
  CHECK(repeated.size() == 0);

  // Moving leaves a usable, empty authorizer behind.
  Authorizer moved = std::move(az);
  CHECK(moved.size() == 2);
  CHECK(az.size() == 0);  // NOLINT(bugprone-use-after-move): documented as empty
  CHECK(az.find("one") == nullptr);
  CHECK(az.is_authorized(treat(), store).decision == Decision::kDeny);
  CHECK(az.remove("one").code() == StatusCode::kNotFound);
  REQUIRE(az.add(permit("again")).ok());
  CHECK(az.is_authorized(treat(), store).decision == Decision::kAllow);
}

TEST_CASE("authorizer: the index finds grants through ancestors", "[rules][authorizer]") {
  const Entities store = hospital();
  Authorizer az;
  // Resource bucket of an ancestor three levels up (obs-1 -> p1 -> w1 -> cardiology).
  REQUIRE(az.add(permit("dept-resource", any(), any(), scope_in(uid("Department", "cardiology"))))
              .ok());
  // Principal bucket of an ancestor (dr-lee -> cardio-team -> cardiology).
  REQUIRE(az.add(permit("dept-principal", scope_in(uid("Department", "cardiology")))).ok());
  REQUIRE(
      az.add(permit("team-is-in", scope_is_in("Practitioner", uid("Team", "cardio-team")))).ok());
  REQUIRE(az.add(permit("ward-is-in", any(), any(), scope_is_in("PatientData", uid("Ward", "w1"))))
              .ok());
  // Both scopes indexable: it lives in the resource bucket, and still needs the principal.
  REQUIRE(az.add(permit("both", scope_eq(kKim), scope_eq(kRead), scope_in(kP1))).ok());
  REQUIRE(az.add(permit("principal-eq", scope_eq(kLee))).ok());
  REQUIRE(az.add(permit("unindexed-is", scope_is("Practitioner"), any(), scope_is("PatientData")))
              .ok());
  REQUIRE(az.add(permit("unindexed-action", any(), scope_in_set({kRead}), any())).ok());
  REQUIRE(az.add(permit("elsewhere", any(), any(), scope_in(uid("Department", "oncology")))).ok());

  Response r = az.is_authorized(treat(), store);
  CHECK(r.determining == Ids{"dept-principal", "dept-resource", "principal-eq", "team-is-in",
                             "unindexed-action", "unindexed-is", "ward-is-in"});
  r = az.is_authorized(treat(kKim), store);
  CHECK(r.determining ==
        Ids{"both", "dept-resource", "unindexed-action", "unindexed-is", "ward-is-in"});
  // A principal and resource the store does not hold: only themselves.
  r = az.is_authorized(req(uid("Ghost", "g"), kRead, uid("Department", "cardiology")), store);
  CHECK(r.determining == Ids{"dept-resource", "unindexed-action"});

  // A request-local layer over the directory moves the resource under the grant.
  Entities layer(&store);
  layer.add(make_entity(uid("PatientData", "new"), {}, {uid("Ward", "w1")}));
  r = az.is_authorized(req(kKim, kWrite, uid("PatientData", "new")), layer);
  CHECK(r.determining == Ids{"dept-resource", "unindexed-is", "ward-is-in"});

  // Cyclic hierarchies end.
  Entities cyclic;
  cyclic.add(make_entity(uid("G", "a"), {}, {uid("G", "b")}));
  cyclic.add(make_entity(uid("G", "b"), {}, {uid("G", "a")}));
  Authorizer ring;
  REQUIRE(ring.add(permit("to-b", any(), any(), scope_in(uid("G", "b")))).ok());
  REQUIRE(ring.add(permit("to-c", any(), any(), scope_in(uid("G", "c")))).ok());
  CHECK(ring.is_authorized(req(kLee, kRead, uid("G", "a")), cyclic).determining == Ids{"to-b"});
}

TEST_CASE("authorizer: equal conditions share a tree, and each error names its own location",
          "[rules][authorizer]") {
  const Entities store = hospital();
  Authorizer az;
  // The same conditions at different places: the index evaluates one shared tree for them, and
  // an error is still reported where each policy has it.
  REQUIRE(az.add(permit("a", any(), any(), any(), {when(at(boom(), 2, 3))})).ok());
  REQUIRE(az.add(permit("b", any(), any(), any(), {when(at(boom(), 7, 9))})).ok());
  REQUIRE(az.add(permit("c", any(), any(), any(), {when(at(lit(5), 4, 1))})).ok());
  REQUIRE(az.add(permit("d", any(), any(), any(), {when(at(lit(5), 6, 2))})).ok());
  REQUIRE(az.add(permit("e", any(), any(), any(), {when(eq(ctx("purpose"), lit("TREAT")))})).ok());
  REQUIRE(az.add(permit("f", any(), any(), any(), {when(eq(ctx("purpose"), lit("AUDIT")))})).ok());
  REQUIRE(
      az.add(permit("g", any(), any(), any(), {unless(eq(ctx("purpose"), lit("TREAT")))})).ok());
  // Literals equal as values only when of one kind: 1 is not true.
  REQUIRE(az.add(permit("h", any(), any(), any(), {when(eq(lit(1), lit(true)))})).ok());
  REQUIRE(az.add(permit("i", any(), any(), any(), {when(eq(lit(true), lit(true)))})).ok());
  Response r = az.is_authorized(treat(), store);
  CHECK(r.determining == Ids{"e", "i"});
  REQUIRE(error_ids(r) == Ids{"a", "b", "c", "d"});
  CHECK(r.errors[0].message == "2:3: type error: expected long, got string");
  CHECK(r.errors[1].message == "7:9: type error: expected long, got string");
  CHECK(r.errors[2].message == "4:1: type error: expected bool, got long");
  CHECK(r.errors[3].message == "6:2: type error: expected bool, got long");

  // Many grants come and go (the pool drops trees no policy holds); the rest still decide.
  for (int round = 0; round < 300; ++round) {
    const std::string id = "churn-" + std::to_string(round);
    REQUIRE(az.add(permit(id, scope_eq(kLee), any(), any(),
                          {when(eq(ctx("now"), lit(round))), when(ctx("nope"))}))
                .ok());
    if (round % 3 != 0) REQUIRE(az.remove(id).ok());
  }
  // The kept churn grants' first condition (now == round) is false at now = 1700000000.
  r = az.is_authorized(treat(), store);
  CHECK(r.determining == Ids{"e", "i"});
  CHECK(r.errors.size() == 4);
  Request at_round_3 =
      req(kLee, kRead, kObs, Value::record({{"purpose", str("TREAT")}, {"now", num(3)}}));
  r = az.is_authorized(at_round_3, store);
  REQUIRE(error_ids(r) == Ids{"a", "b", "c", "churn-3", "d"});
  CHECK_THAT(r.errors[3].message, Catch::Contains("`nope`"));
}

TEST_CASE("authorizer: a uid no policy names any more is forgotten and its id reused",
          "[rules][authorizer]") {
  const Entities store = hospital();
  Authorizer az;
  // Ward w1 and dr-kim get ids; removing the only policies that name them frees the ids, which
  // the next uids take. A request for the old uids must not match the new policies.
  REQUIRE(az.add(permit("ward", scope_eq(kKim), any(), scope_in(uid("Ward", "w1")))).ok());
  CHECK(az.is_authorized(treat(kKim), store).decision == Decision::kAllow);
  REQUIRE(az.remove("ward").ok());
  CHECK(az.is_authorized(treat(kKim), store).decision == Decision::kDeny);
  REQUIRE(az.add(permit("team", scope_in(uid("Team", "cardio-team")), any(),
                        scope_eq(uid("Patient", "p2"))))
              .ok());
  REQUIRE(
      az.add(permit("other", scope_eq(uid("Practitioner", "dr-new")), any(), scope_in(kP1))).ok());
  CHECK(az.is_authorized(treat(kKim), store).decision == Decision::kDeny);
  CHECK(az.is_authorized(treat(kLee), store).decision == Decision::kDeny);
  CHECK(az.is_authorized(treat(kLee, uid("Patient", "p2")), store).determining == Ids{"team"});
  CHECK(az.is_authorized(treat(uid("Practitioner", "dr-new")), store).determining == Ids{"other"});

  // Two policies naming the same uid: removing one keeps the uid for the other.
  REQUIRE(az.add(permit("lee-1", scope_eq(kLee), scope_eq(kRead), scope_eq(kObs))).ok());
  REQUIRE(az.add(permit("lee-2", scope_in_set({kLee, kLee}), scope_in_set({kRead}))).ok());
  CHECK(az.is_authorized(treat(), store).determining == Ids{"lee-1", "lee-2"});
  REQUIRE(az.remove("lee-1").ok());
  CHECK(az.is_authorized(treat(), store).determining == Ids{"lee-2"});
  REQUIRE(az.remove("lee-2").ok());
  CHECK(az.is_authorized(treat(), store).decision == Decision::kDeny);
  REQUIRE(az.add(permit("lee-3", scope_eq(kLee), scope_in(uid("Action", "any")))).ok());
  CHECK(az.is_authorized(treat(), store).determining == Ids{"lee-3"});
  CHECK(az.is_authorized(req(kLee, kWrite, kObs), store).decision == Decision::kDeny);
}

TEST_CASE("authorizer: thousands of uids come and go from the index's table",
          "[rules][authorizer]") {
  // Each grant names its own patient; removing them in a random order exercises the table's
  // deletion (entries shift back into the gap), and every grant left must still be found, every
  // removed one not.
  const Entities store;
  Authorizer az;
  constexpr int kGrants = 3000;
  auto patient = [](int i) { return uid("Patient", "p" + std::to_string(i)); };
  for (int i = 0; i < kGrants; ++i) {
    REQUIRE(
        az.add(permit("g" + std::to_string(i), scope_eq(kLee), any(), scope_in(patient(i)))).ok());
  }
  std::vector<int> order(kGrants);
  for (int i = 0; i < kGrants; ++i) order[static_cast<std::size_t>(i)] = i;
  std::shuffle(order.begin(), order.end(), std::mt19937(11));
  std::vector<bool> present(kGrants, true);
  for (std::size_t k = 0; k < order.size(); ++k) {
    REQUIRE(az.remove("g" + std::to_string(order[k])).ok());
    present[static_cast<std::size_t>(order[k])] = false;
    if (k % 500 != 0 && k + 1 != order.size()) continue;
    for (int i = 0; i < kGrants; ++i) {
      const bool allowed =
          az.is_authorized(req(kLee, kRead, patient(i)), store).decision == Decision::kAllow;
      INFO("after " << k + 1 << " removals, patient " << i);
      REQUIRE(allowed == present[static_cast<std::size_t>(i)]);
    }
  }
  CHECK(az.size() == 0);
  // Empty again, and usable.
  REQUIRE(az.add(permit("again", scope_eq(kLee), any(), scope_in(patient(7)))).ok());
  CHECK(az.is_authorized(req(kLee, kRead, patient(7)), store).decision == Decision::kAllow);
}

TEST_CASE("authorizer: a principal with more ancestors than a request keeps inline",
          "[rules][authorizer]") {
  // U -> G0 -> G1 -> ... -> G39, each group named by a policy: the ancestor ids overflow the
  // inline storage, and every level is still found.
  Entities store;
  store.add(make_entity(uid("U", "u"), {}, {uid("G", "0")}));
  Authorizer az;
  for (int i = 0; i < 40; ++i) {
    std::vector<EntityUid> parents;
    if (i + 1 < 40) parents.push_back(uid("G", std::to_string(i + 1)));
    store.add(make_entity(uid("G", std::to_string(i)), {}, parents));
    REQUIRE(az.add(permit("in-" + std::to_string(i), any(), any(),
                          scope_in(uid("G", std::to_string(i)))))
                .ok());
    REQUIRE(az.add(forbid("not-" + std::to_string(i), scope_in(uid("G", std::to_string(i))),
                          scope_eq(kWrite)))
                .ok());
  }
  REQUIRE(az.add(permit("deep-principal", scope_is_in("U", uid("G", "39")), scope_eq(kRead))).ok());
  Response r = az.is_authorized(req(uid("U", "u"), kRead, uid("U", "u")), store);
  CHECK(r.decision == Decision::kAllow);
  CHECK(r.determining.size() == 41);
  r = az.is_authorized(req(uid("U", "u"), kWrite, uid("G", "30")), store);
  CHECK(r.decision == Decision::kDeny);
  CHECK(r.determining.size() == 40);
}

TEST_CASE("authorizer: the index agrees with a scan, through adds and removes",
          "[rules][authorizer]") {
  std::mt19937 rng(7);
  auto pick = [&](int n) { return std::uniform_int_distribution<int>(0, n - 1)(rng); };
  auto group = [&]() { return uid("G", std::to_string(pick(12))); };
  auto user = [&]() { return uid("U", std::to_string(pick(8))); };
  auto doc = [&]() { return uid("D", std::to_string(pick(8))); };
  auto some = [&]() { return pick(3) == 0 ? group() : (pick(2) == 0 ? user() : doc()); };
  // Actions: read and write are in Action::"all" (when the store holds them); "other" in none.
  auto act = [&]() {
    switch (pick(4)) {
      case 0:
        return kRead;
      case 1:
        return kWrite;
      case 2:
        return uid("Action", "all");
      default:
        return uid("Action", "other");
    }
  };
  auto action_clause = [&]() {
    switch (pick(4)) {
      case 0:
        return any();
      case 1:
        return scope_eq(act());
      case 2:
        return scope_in(act());
      default:
        return scope_in_set({act(), act()});
    }
  };

  for (int world = 0; world < 20; ++world) {
    // Random parents (cycles included) among groups, users and documents.
    Entities store;
    for (int i = 0; i < 12; ++i) {
      std::vector<EntityUid> parents;
      for (int k = pick(3); k > 0; --k) parents.push_back(group());
      store.add(make_entity(uid("G", std::to_string(i)), {}, parents));
    }
    for (int i = 0; i < 6; ++i) {  // U6, U7, D6, D7 are not in the store
      store.add(make_entity(uid("U", std::to_string(i)), {{"n", num(i)}}, {group()}));
      store.add(make_entity(uid("D", std::to_string(i)), {{"n", num(i)}}, {group(), group()}));
    }
    if (world % 2 == 0) {
      store.add(make_entity(kRead, {}, {uid("Action", "all")}));
      store.add(make_entity(kWrite, {}, {uid("Action", "all")}));
    }
    auto clause = [&]() {
      switch (pick(6)) {
        case 0:
          return any();
        case 1:
          return scope_eq(some());
        case 2:
          return scope_in(some());
        case 3:
          return scope_is(pick(2) == 0 ? "U" : "D");
        case 4:
          return scope_is_in(pick(2) == 0 ? "U" : "D", some());
        default:
          return scope_in_set({some(), some()});
      }
    };
    auto condition = [&]() {
      switch (pick(4)) {
        case 0:
          return when(lit(true));
        case 1:
          return unless(eq(attr(resource(), "n"), lit(pick(6))));
        case 2:
          return when(bin(BinaryOp::kLt, attr(principal(), "n"), lit(pick(8))));
        default:
          return when(in(principal(), lit(Value(group()))));
      }
    };

    std::vector<Policy> policies;
    Authorizer az;
    int next_id = 0;
    for (int step = 0; step < 120; ++step) {
      if (!policies.empty() && pick(4) == 0) {
        std::size_t victim = static_cast<std::size_t>(pick(static_cast<int>(policies.size())));
        REQUIRE(az.remove(policies[victim].id).ok());
        policies.erase(policies.begin() + static_cast<std::ptrdiff_t>(victim));
      } else {
        std::vector<Condition> conditions;
        for (int k = pick(3); k > 0; --k) conditions.push_back(condition());
        Policy p = policy("p" + std::to_string(next_id++),
                          pick(4) == 0 ? Effect::kForbid : Effect::kPermit, clause(),
                          action_clause(), clause(), conditions);
        policies.push_back(p);
        REQUIRE(az.add(p).ok());
      }
      REQUIRE(az.size() == policies.size());
      for (int q = 0; q < 8; ++q) {
        Request request = req(pick(2) == 0 ? user() : some(), act(), pick(2) == 0 ? doc() : some());
        Response expected = scan(policies, request, store);
        Response got = az.is_authorized(request, store);
        INFO("world " << world << " step " << step << " principal " << request.principal.to_text()
                      << " resource " << request.resource.to_text());
        REQUIRE(got.decision == expected.decision);
        REQUIRE(got.determining == expected.determining);
        REQUIRE(error_ids(got) == error_ids(expected));
      }
    }
  }
}
