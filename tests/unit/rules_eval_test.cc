// The rule engine's evaluator (ledger/rules/evaluator.h): Cedar's semantics for each operator of
// the subset, its type errors and overflows, short-circuiting that skips errors, the location an
// error carries, the depth guard, and `like` against a plain reference matcher.
#include <catch2/catch.hpp>

#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "ledger/rules/evaluator.h"
#include "tests/unit/rules_test_builders.h"

using namespace medgate;
using namespace medgate::rules;
using namespace medgate::rules::testing;

namespace {

constexpr std::int64_t kMax = std::numeric_limits<std::int64_t>::max();
constexpr std::int64_t kMin = std::numeric_limits<std::int64_t>::min();

// A small hospital: Practitioner dr-lee in Team cardio-team; Patient p1 in Ward w1 in Department
// cardiology; PatientData obs-1 belongs to p1.
Entities hospital() {
  Entities store;
  store.add(make_entity(uid("Practitioner", "dr-lee"),
                        {{"name", str("Lee")}, {"role", str("physician")}, {"level", num(3)}},
                        {uid("Team", "cardio-team")}));
  store.add(make_entity(uid("Team", "cardio-team"), {}, {uid("Department", "cardiology")}));
  store.add(make_entity(uid("Patient", "p1"),
                        {{"age", num(40)},
                         {"gp", entity("Practitioner", "dr-lee")},
                         {"address", Value::record({{"city", str("Bern")}})},
                         {"flags", Value::set({str("vip"), str("minor")})}},
                        {uid("Ward", "w1")}));
  store.add(make_entity(uid("Ward", "w1"), {}, {uid("Department", "cardiology")}));
  store.add(make_entity(uid("Department", "cardiology")));
  store.add(
      make_entity(uid("PatientData", "obs-1"), {{"kind", str("hr")}}, {uid("Patient", "p1")}));
  return store;
}

Request request() {
  Request r;
  r.principal = uid("Practitioner", "dr-lee");
  r.action = uid("Action", "read");
  r.resource = uid("PatientData", "obs-1");
  r.context = Value::record({{"purpose", str("TREAT")},
                             {"now", num(1700000000)},
                             {"emergency", Value(false)},
                             {"nested", Value::record({{"deep", Value::set({num(1)})}})}});
  return r;
}

const Entities& store() {
  static const Entities s = hospital();
  return s;
}

// The value of `e`; the test fails on an error.
Value value(const ExprPtr& e) {
  EvalResult r = evaluate(*e, request(), store());
  if (const auto* error = std::get_if<EvalError>(&r)) FAIL("unexpected error: " << error->message);
  return std::get<Value>(r);
}

// The error of `e`; the test fails on a value.
EvalError error(const ExprPtr& e) {
  EvalResult r = evaluate(*e, request(), store());
  if (const auto* v = std::get_if<Value>(&r)) FAIL("unexpected value: " << v->to_text());
  return std::get<EvalError>(r);
}
std::string message(const ExprPtr& e) {
  return error(e).message;
}

// A poisoned operand: evaluating it is a type error.
ExprPtr boom() {
  return bin(BinaryOp::kAdd, lit(1), lit("a"));
}

}  // namespace

TEST_CASE("eval: literals, variables and the context", "[rules][eval]") {
  CHECK(value(lit(true)) == Value(true));
  CHECK(value(lit(kMin)) == num(kMin));
  CHECK(value(lit("x")) == str("x"));
  CHECK(value(lit(entity("A", "a"))) == entity("A", "a"));
  CHECK(value(principal()) == entity("Practitioner", "dr-lee"));
  CHECK(value(action()) == entity("Action", "read"));
  CHECK(value(resource()) == entity("PatientData", "obs-1"));
  CHECK(value(context()).is_record());
  CHECK(value(attr(context(), "purpose")) == str("TREAT"));
  CHECK(value(attr(attr(context(), "nested"), "deep")) == Value::set({num(1)}));
}

TEST_CASE("eval: == and != compare any two values and never fail", "[rules][eval]") {
  CHECK(value(eq(lit(1), lit(1))) == Value(true));
  CHECK(value(eq(lit(1), lit("1"))) == Value(false));
  CHECK(value(eq(lit(true), lit(1))) == Value(false));
  CHECK(value(eq(lit(entity("A", "a")), lit(entity("A", "a")))) == Value(true));
  CHECK(value(eq(lit(entity("A", "a")), lit(entity("B", "a")))) == Value(false));
  CHECK(value(eq(lit(entity("A", "a")), lit("A::\"a\""))) == Value(false));
  CHECK(value(eq(principal(), lit(entity("Practitioner", "dr-lee")))) == Value(true));
  // Sets compare as sets: order and repeats do not matter.
  CHECK(value(eq(set({lit(1), lit(2), lit(2)}), set({lit(2), lit(1)}))) == Value(true));
  CHECK(value(eq(set({lit(1)}), set({lit(1), lit(2)}))) == Value(false));
  CHECK(value(eq(rec({{"a", lit(1)}, {"b", lit("x")}}), rec({{"b", lit("x")}, {"a", lit(1)}}))) ==
        Value(true));
  CHECK(value(eq(rec({{"a", lit(1)}}), rec({{"a", lit(2)}}))) == Value(false));
  CHECK(value(eq(rec({}), set({}))) == Value(false));
  CHECK(value(bin(BinaryOp::kNe, lit(1), lit("1"))) == Value(true));
  CHECK(value(bin(BinaryOp::kNe, lit("a"), lit("a"))) == Value(false));
  // Errors in either operand still propagate.
  CHECK_THAT(message(eq(lit(1), boom())), Catch::Contains("type error"));
}

TEST_CASE("eval: comparisons take longs only", "[rules][eval]") {
  CHECK(value(bin(BinaryOp::kLt, lit(1), lit(2))) == Value(true));
  CHECK(value(bin(BinaryOp::kLt, lit(2), lit(2))) == Value(false));
  CHECK(value(bin(BinaryOp::kLe, lit(2), lit(2))) == Value(true));
  CHECK(value(bin(BinaryOp::kGt, lit(kMax), lit(kMin))) == Value(true));
  CHECK(value(bin(BinaryOp::kGe, lit(kMin), lit(kMin))) == Value(true));
  CHECK(value(bin(BinaryOp::kGe, lit(-1), lit(0))) == Value(false));
  CHECK(value(bin(BinaryOp::kLt, attr(context(), "now"), lit(1900000000))) == Value(true));

  CHECK(message(bin(BinaryOp::kLt, lit("a"), lit("b"))) == "type error: expected long, got string");
  CHECK(message(bin(BinaryOp::kLe, lit(1), lit(true))) == "type error: expected long, got bool");
  CHECK(message(bin(BinaryOp::kGt, lit(entity("A", "a")), lit(1))) ==
        "type error: expected long, got entity");
  CHECK(message(bin(BinaryOp::kGe, lit(1), set({}))) == "type error: expected long, got set");
}

TEST_CASE("eval: arithmetic on longs, overflow is an error", "[rules][eval]") {
  CHECK(value(bin(BinaryOp::kAdd, lit(2), lit(3))) == num(5));
  CHECK(value(bin(BinaryOp::kSub, lit(2), lit(3))) == num(-1));
  CHECK(value(bin(BinaryOp::kMul, lit(-4), lit(3))) == num(-12));
  CHECK(value(bin(BinaryOp::kAdd, lit(kMax), lit(0))) == num(kMax));
  CHECK(value(bin(BinaryOp::kAdd, lit(kMax), lit(kMin))) == num(-1));
  CHECK(value(bin(BinaryOp::kSub, lit(kMin), lit(0))) == num(kMin));
  CHECK(value(bin(BinaryOp::kSub, lit(-1), lit(kMax))) == num(kMin));
  CHECK(value(bin(BinaryOp::kMul, lit(kMin), lit(1))) == num(kMin));
  CHECK(value(neg(lit(kMax))) == num(-kMax));
  CHECK(value(neg(lit(0))) == num(0));

  CHECK_THAT(message(bin(BinaryOp::kAdd, lit(kMax), lit(1))),
             Catch::StartsWith("integer overflow"));
  CHECK_THAT(message(bin(BinaryOp::kAdd, lit(kMin), lit(-1))),
             Catch::StartsWith("integer overflow"));
  CHECK_THAT(message(bin(BinaryOp::kSub, lit(kMin), lit(1))),
             Catch::StartsWith("integer overflow"));
  CHECK_THAT(message(bin(BinaryOp::kSub, lit(0), lit(kMin))),
             Catch::StartsWith("integer overflow"));
  CHECK_THAT(message(bin(BinaryOp::kMul, lit(kMin), lit(-1))),
             Catch::StartsWith("integer overflow"));
  CHECK_THAT(message(bin(BinaryOp::kMul, lit(kMax), lit(2))),
             Catch::StartsWith("integer overflow"));
  CHECK_THAT(message(bin(BinaryOp::kMul, lit(std::int64_t{1} << 32), lit(std::int64_t{1} << 31))),
             Catch::StartsWith("integer overflow"));
  CHECK_THAT(message(neg(lit(kMin))), Catch::StartsWith("integer overflow"));

  CHECK(message(bin(BinaryOp::kAdd, lit(1), lit("a"))) == "type error: expected long, got string");
  CHECK(message(bin(BinaryOp::kMul, lit(true), lit(1))) == "type error: expected long, got bool");
  CHECK(message(neg(lit("1"))) == "type error: expected long, got string");
}

TEST_CASE("eval: ! takes a bool", "[rules][eval]") {
  CHECK(value(not_(lit(true))) == Value(false));
  CHECK(value(not_(not_(lit(true)))) == Value(true));
  CHECK(message(not_(lit(0))) == "type error: expected bool, got long");
  CHECK(message(not_(set({}))) == "type error: expected bool, got set");
}

TEST_CASE("eval: && and || short-circuit and check their operands", "[rules][eval]") {
  CHECK(value(and_(lit(true), lit(true))) == Value(true));
  CHECK(value(and_(lit(true), lit(false))) == Value(false));
  CHECK(value(or_(lit(false), lit(false))) == Value(false));
  CHECK(value(or_(lit(false), lit(true))) == Value(true));

  // The right operand is never evaluated when the left decides: its errors do not count.
  CHECK(value(and_(lit(false), boom())) == Value(false));
  CHECK(value(or_(lit(true), boom())) == Value(true));
  CHECK(value(and_(lit(false), lit(7))) == Value(false));
  CHECK(value(or_(lit(true), lit("x"))) == Value(true));
  CHECK(value(and_(lit(false), attr(lit(entity("Nobody", "x")), "a"))) == Value(false));

  // When it is evaluated, it must be a bool and its errors count.
  CHECK(message(and_(lit(true), lit(7))) == "type error: expected bool, got long");
  CHECK(message(or_(lit(false), lit("x"))) == "type error: expected bool, got string");
  CHECK(message(and_(lit(true), boom())) == "type error: expected long, got string");
  // The left operand must be a bool.
  CHECK(message(and_(lit(1), lit(false))) == "type error: expected bool, got long");
  CHECK(message(or_(lit("true"), lit(true))) == "type error: expected bool, got string");
  CHECK(message(or_(boom(), lit(true))) == "type error: expected long, got string");
}

TEST_CASE("eval: if evaluates only the taken branch", "[rules][eval]") {
  CHECK(value(ite(lit(true), lit(1), boom())) == num(1));
  CHECK(value(ite(lit(false), boom(), lit("no"))) == str("no"));
  CHECK(value(ite(eq(attr(context(), "purpose"), lit("TREAT")), lit(1), lit(2))) == num(1));
  CHECK(message(ite(lit(1), lit(1), lit(2))) == "type error: expected bool, got long");
  CHECK_THAT(message(ite(lit(true), boom(), lit(2))), Catch::Contains("type error"));
  CHECK_THAT(message(ite(boom(), lit(1), lit(2))), Catch::Contains("type error"));
}

TEST_CASE("eval: in follows the entity hierarchy", "[rules][eval]") {
  auto e = [](const char* type, const char* id) { return lit(entity(type, id)); };
  CHECK(value(in(resource(), e("PatientData", "obs-1"))) == Value(true));
  CHECK(value(in(resource(), e("Patient", "p1"))) == Value(true));
  CHECK(value(in(resource(), e("Department", "cardiology"))) == Value(true));
  CHECK(value(in(principal(), e("Department", "cardiology"))) == Value(true));
  CHECK(value(in(principal(), e("Ward", "w1"))) == Value(false));
  CHECK(value(in(e("Patient", "p1"), e("PatientData", "obs-1"))) == Value(false));
  // An entity the store lacks is in itself only.
  CHECK(value(in(e("Ghost", "g"), e("Ghost", "g"))) == Value(true));
  CHECK(value(in(e("Ghost", "g"), e("Department", "cardiology"))) == Value(false));
  // Against a set: any element.
  CHECK(value(in(resource(), set({e("Ward", "w9"), e("Ward", "w1")}))) == Value(true));
  CHECK(value(in(resource(), set({e("Ward", "w9")}))) == Value(false));
  CHECK(value(in(resource(), set({}))) == Value(false));
  CHECK(value(in(principal(), attr(lit(entity("Patient", "p1")), "gp"))) == Value(true));

  // Type errors: left not an entity; right neither entity nor set; a set element not an entity
  // (even when another element matches).
  CHECK(message(in(lit("Patient::\"p1\""), e("Patient", "p1"))) ==
        "type error: expected entity, got string");
  CHECK_THAT(message(in(resource(), lit(1))), Catch::Contains("expected entity or set"));
  CHECK_THAT(message(in(resource(), set({e("Patient", "p1"), lit(1)}))),
             Catch::Contains("expected entity") && Catch::Contains("got long"));
  CHECK_THAT(message(in(set({e("Patient", "p1")}), e("Patient", "p1"))),
             Catch::Contains("expected entity, got set"));
}

TEST_CASE("eval: has on records and entities", "[rules][eval]") {
  CHECK(value(has(context(), "purpose")) == Value(true));
  CHECK(value(has(context(), "missing")) == Value(false));
  CHECK(value(has(principal(), "role")) == Value(true));
  CHECK(value(has(principal(), "salary")) == Value(false));
  CHECK(value(has(lit(entity("Patient", "p1")), "age")) == Value(true));
  CHECK(value(has(attr(lit(entity("Patient", "p1")), "address"), "city")) == Value(true));
  // An entity the store does not hold has no attributes (no error).
  CHECK(value(has(lit(entity("Ghost", "g")), "age")) == Value(false));
  CHECK(value(has(action(), "anything")) == Value(false));
  CHECK(message(has(lit(1), "a")) == "type error: expected entity or record, got long");
  CHECK(message(has(set({}), "a")) == "type error: expected entity or record, got set");
}

TEST_CASE("eval: attribute access", "[rules][eval]") {
  CHECK(value(attr(principal(), "name")) == str("Lee"));
  CHECK(value(attr(lit(entity("Patient", "p1")), "age")) == num(40));
  CHECK(value(attr(attr(lit(entity("Patient", "p1")), "address"), "city")) == str("Bern"));
  CHECK(value(attr(attr(lit(entity("Patient", "p1")), "gp"), "level")) == num(3));
  // Computed records: the field outlives the record it came from.
  CHECK(value(attr(attr(rec({{"a", rec({{"b", lit("deep")}})}}), "a"), "b")) == str("deep"));
  CHECK(value(attr(ite(lit(true), rec({{"a", lit(1)}}), rec({})), "a")) == num(1));

  CHECK(message(attr(context(), "missing")) == "record does not have the attribute `missing`");
  CHECK(message(attr(rec({}), "a")) == "record does not have the attribute `a`");
  CHECK(message(attr(principal(), "salary")) ==
        "entity Practitioner::\"dr-lee\" does not have the attribute `salary`");
  CHECK(message(attr(lit(entity("Ghost", "g")), "age")) == "entity Ghost::\"g\" does not exist");
  CHECK(message(attr(action(), "x")) == "entity Action::\"read\" does not exist");
  CHECK(message(attr(lit("text"), "length")) ==
        "type error: expected entity or record, got string");
}

TEST_CASE("eval: like, is, and the set methods", "[rules][eval]") {
  CHECK(value(like(attr(context(), "purpose"), "TR*")) == Value(true));
  CHECK(value(like(attr(context(), "purpose"), "*EAT")) == Value(true));
  CHECK(value(like(attr(context(), "purpose"), "tr*")) == Value(false));
  CHECK(message(like(lit(1), "*")) == "type error: expected string, got long");

  CHECK(value(is(principal(), "Practitioner")) == Value(true));
  CHECK(value(is(principal(), "Patient")) == Value(false));
  CHECK(value(is(lit(entity("Hospital::Ward", "w")), "Hospital::Ward")) == Value(true));
  CHECK(value(is(lit(entity("Hospital::Ward", "w")), "Ward")) == Value(false));
  CHECK(value(is(attr(lit(entity("Patient", "p1")), "gp"), "Practitioner")) == Value(true));
  CHECK(message(is(lit("Practitioner"), "Practitioner")) ==
        "type error: expected entity, got string");

  auto s = [](std::vector<ExprPtr> v) { return set(std::move(v)); };
  CHECK(value(bin(BinaryOp::kContains, s({lit(1), lit("a")}), lit("a"))) == Value(true));
  CHECK(value(bin(BinaryOp::kContains, s({lit(1), lit("a")}), lit(2))) == Value(false));
  CHECK(value(bin(BinaryOp::kContains, s({s({lit(1)})}), s({lit(1), lit(1)}))) == Value(true));
  CHECK(value(bin(BinaryOp::kContains, attr(lit(entity("Patient", "p1")), "flags"), lit("vip"))) ==
        Value(true));
  CHECK(message(bin(BinaryOp::kContains, lit("abc"), lit("a"))) ==
        "type error: expected set, got string");

  CHECK(value(bin(BinaryOp::kContainsAll, s({lit(1), lit(2), lit(3)}), s({lit(3), lit(1)}))) ==
        Value(true));
  CHECK(value(bin(BinaryOp::kContainsAll, s({lit(1), lit(2)}), s({lit(3), lit(1)}))) ==
        Value(false));
  CHECK(value(bin(BinaryOp::kContainsAll, s({}), s({}))) == Value(true));
  CHECK(value(bin(BinaryOp::kContainsAny, s({lit(1), lit("x")}), s({lit(true), lit("x")}))) ==
        Value(true));
  CHECK(value(bin(BinaryOp::kContainsAny, s({lit(1), lit(2)}), s({lit(3)}))) == Value(false));
  CHECK(value(bin(BinaryOp::kContainsAny, s({lit(1)}), s({}))) == Value(false));
  CHECK(message(bin(BinaryOp::kContainsAll, s({}), lit(1))) ==
        "type error: expected set, got long");
  CHECK(message(bin(BinaryOp::kContainsAny, rec({}), s({}))) ==
        "type error: expected set, got record");
}

TEST_CASE("eval: set and record literals", "[rules][eval]") {
  CHECK(value(set({lit(3), lit(1), lit(3)})) == Value::set({num(1), num(3)}));
  CHECK(value(set({principal(), attr(context(), "now")})) ==
        Value::set({entity("Practitioner", "dr-lee"), num(1700000000)}));
  CHECK(value(rec({{"who", principal()}, {"n", bin(BinaryOp::kAdd, lit(1), lit(1))}})) ==
        Value::record({{"who", entity("Practitioner", "dr-lee")}, {"n", num(2)}}));
  // Any element's error is the literal's error; the first one (in order) is reported.
  EvalError first = error(set({lit(1), at(boom(), 2, 5), at(neg(lit(kMin)), 3, 1)}));
  CHECK(first.location.line == 2);
  CHECK(first.location.column == 5);
  EvalError field = error(rec({{"a", lit(1)}, {"b", at(not_(lit(1)), 4, 9)}}));
  CHECK(field.message == "type error: expected bool, got long");
  CHECK(field.location.line == 4);
}

TEST_CASE("eval: errors carry the failing node's location", "[rules][eval]") {
  auto failing = at(bin(BinaryOp::kAdd, lit(kMax), lit(1)), 7, 12);
  auto tree = at(and_(lit(true), eq(failing, lit(0))), 7, 1);
  EvalError e = error(tree);
  CHECK(e.location.line == 7);
  CHECK(e.location.column == 12);
  EvalError missing = error(at(attr(context(), "nope"), 3, 4));
  CHECK(missing.location.line == 3);
  CHECK(missing.location.column == 4);
}

TEST_CASE("eval: malformed trees and deep trees are errors, not crashes", "[rules][eval]") {
  auto broken = std::make_shared<Expr>();
  broken->kind = Expr::Kind::kBinary;
  broken->binary_op = BinaryOp::kAdd;
  broken->children = {lit(1)};
  CHECK_THAT(message(broken), Catch::Contains("malformed"));
  auto hole = std::make_shared<Expr>();
  hole->kind = Expr::Kind::kIf;
  hole->children = {lit(true), nullptr, lit(1)};
  CHECK_THAT(message(hole), Catch::Contains("malformed"));
  auto record = std::make_shared<Expr>();
  record->kind = Expr::Kind::kRecord;
  record->keys = {"a", "b"};
  record->children = {lit(1)};
  CHECK_THAT(message(record), Catch::Contains("malformed"));

  auto nest = [](int depth) {
    ExprPtr e = lit(true);
    for (int i = 0; i < depth; ++i) e = not_(e);
    return e;
  };
  CHECK(value(nest(500)) == Value(true));
  CHECK_THAT(message(nest(5000)), Catch::Contains("nested deeper"));
  ExprPtr sum = lit(0);
  for (int i = 0; i < 3000; ++i) sum = bin(BinaryOp::kAdd, sum, lit(1));
  CHECK_THAT(message(sum), Catch::Contains("nested deeper"));
}

// ---- like ---------------------------------------------------------------------------------------

namespace {

// Decodes UTF-8 into scalar values (inputs here are valid).
std::u32string decode(std::string_view s) {
  std::u32string out;
  for (std::size_t i = 0; i < s.size();) {
    unsigned char c = static_cast<unsigned char>(s[i]);
    int n = c < 0x80 ? 1 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4;
    char32_t v = n == 1 ? c : n == 2 ? (c & 0x1F) : n == 3 ? (c & 0x0F) : (c & 0x07);
    for (int k = 1; k < n; ++k) v = (v << 6) | (static_cast<unsigned char>(s[i + k]) & 0x3F);
    out.push_back(v);
    i += n;
  }
  return out;
}

// The obvious dynamic program over scalar values: the reference for matches_pattern.
bool reference_match(std::string_view text, const std::vector<PatternPart>& pattern) {
  std::vector<std::pair<bool, char32_t>> items;  // (wildcard, char)
  for (const PatternPart& p : pattern) {
    if (p.wildcard) {
      items.push_back({true, 0});
    } else {
      for (char32_t c : decode(p.text)) items.push_back({false, c});
    }
  }
  std::u32string t = decode(text);
  std::vector<std::vector<bool>> m(items.size() + 1, std::vector<bool>(t.size() + 1, false));
  m[0][0] = true;
  for (std::size_t i = 1; i <= items.size(); ++i) {
    for (std::size_t j = 0; j <= t.size(); ++j) {
      if (items[i - 1].first) {
        m[i][j] = m[i - 1][j] || (j > 0 && m[i][j - 1]);
      } else {
        m[i][j] = j > 0 && m[i - 1][j - 1] && items[i - 1].second == t[j - 1];
      }
    }
  }
  return m[items.size()][t.size()];
}

}  // namespace

TEST_CASE("eval: like patterns", "[rules][eval][like]") {
  auto m = [](std::string_view text, std::string_view p) {
    return matches_pattern(text, pattern(p));
  };
  CHECK(m("", ""));
  CHECK_FALSE(m("a", ""));
  CHECK(m("", "*"));
  CHECK(m("anything", "*"));
  CHECK(m("abc", "abc"));
  CHECK_FALSE(m("abc", "ab"));
  CHECK_FALSE(m("ab", "abc"));
  CHECK(m("abc", "a*"));
  CHECK(m("abc", "*c"));
  CHECK(m("abc", "a*c"));
  CHECK(m("ac", "a*c"));
  CHECK_FALSE(m("a", "a*a"));
  CHECK(m("aa", "a*a"));
  CHECK(m("abcabc", "*bc*bc"));
  CHECK_FALSE(m("abcab", "*bc*bc"));
  CHECK(m("xaybzc", "*a*b*c"));
  CHECK_FALSE(m("xaybz", "*a*b*c"));
  CHECK(m("aXbXc", "a**b***c"));
  CHECK(m("mississippi", "m*issip*"));
  CHECK_FALSE(m("mississippi", "m*issipx*"));
  // A literal star (the parser's `\*`) is matched as itself.
  std::vector<PatternPart> star_literal{{false, "a"}, {false, "*"}, {true, ""}};
  CHECK(matches_pattern("a*b", star_literal));
  CHECK_FALSE(matches_pattern("ab", star_literal));
  // Adjacent literal parts and empty ones behave as their concatenation.
  std::vector<PatternPart> split{{false, "ab"}, {false, ""},  {false, "c"},
                                 {true, ""},    {false, "d"}, {false, "e"}};
  CHECK(matches_pattern("abcXde", split));
  CHECK(matches_pattern("abcde", split));
  CHECK_FALSE(matches_pattern("abXcde", split));
  // By character, not byte: é is one character.
  CHECK(m("caf\xC3\xA9", "caf*"));
  CHECK(m("\xC3\xA9t\xC3\xA9", "*t*"));
  CHECK(m("\xF0\x9F\x98\x80x", "*x"));
  CHECK_FALSE(m("\xC3\xA9", "\xC3\xA9\xC3\xA9"));
}

TEST_CASE("eval: like agrees with a reference matcher on random inputs", "[rules][eval][like]") {
  const std::vector<std::string> alphabet{"a", "b", "\xC3\xA9", "\xF0\x9F\x98\x80", "*"};
  std::mt19937 rng(20240601);
  auto pick = [&](std::size_t n) { return std::uniform_int_distribution<std::size_t>(0, n)(rng); };
  for (int round = 0; round < 20000; ++round) {
    std::string text;
    for (std::size_t i = pick(8); i > 0; --i) text += alphabet[pick(3)];
    std::vector<PatternPart> p;
    for (std::size_t i = pick(6); i > 0; --i) {
      std::size_t k = pick(4);
      if (k == 4) {
        p.push_back(PatternPart{true, ""});
      } else {
        std::string piece = alphabet[k];
        if (pick(3) == 0) piece += alphabet[pick(3)];
        p.push_back(PatternPart{false, piece});
      }
    }
    INFO("text " << text << " round " << round);
    REQUIRE(matches_pattern(text, p) == reference_match(text, p));
  }
}

TEST_CASE("eval: like takes no exponential time", "[rules][eval][like]") {
  // A backtracking matcher takes ~n^12 steps here; this one is linear per literal run (a hang
  // would trip the test's timeout).
  std::string text(20000, 'a');
  CHECK_FALSE(matches_pattern(text, pattern("*a*a*a*a*a*a*a*a*a*a*a*a*b*")));
  CHECK(matches_pattern(text + "b", pattern("*a*a*a*a*a*a*a*a*a*a*a*a*b*")));
  CHECK_FALSE(matches_pattern(text, pattern("*aaaaaaaaab*a")));
}
