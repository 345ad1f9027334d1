// The rule engine's entity store (ledger/rules/entities.h): layered lookup, `in` over the parent
// graph (transitive, cycles tolerated), and Cedar's JSON entity and value forms, including every
// way an import can be malformed and the entity and attribute each error names.
#include <catch2/catch.hpp>

#include <cstdint>
#include <limits>
#include <string>

#include <nlohmann/json.hpp>

#include "ledger/rules/entities.h"
#include "tests/unit/rules_test_builders.h"

using namespace medgate;
using namespace medgate::rules;
using namespace medgate::rules::testing;
using nlohmann::json;

namespace {

// The import error of `text`; the test fails if there is none.
std::string import_error(std::string_view text) {
  auto r = entities_from_json_text(text);
  INFO(text);
  REQUIRE_FALSE(r.ok());
  CHECK(r.status().code() == StatusCode::kInvalidArgument);
  return r.status().message();
}

// The error of reading one value; the test fails if there is none.
std::string value_error(const json& v) {
  auto r = value_from_json(v);
  INFO(v.dump());
  REQUIRE_FALSE(r.ok());
  CHECK(r.status().code() == StatusCode::kInvalidArgument);
  return r.status().message();
}

Value value_of(const json& v) {
  auto r = value_from_json(v);
  INFO(v.dump());
  REQUIRE(r.ok());
  return *r;
}

}  // namespace

TEST_CASE("entities: add, find, replace, all", "[rules][entities]") {
  Entities store;
  CHECK(store.size() == 0);
  CHECK(store.find(uid("Patient", "p1")) == nullptr);

  store.add(make_entity(uid("Patient", "p1"), {{"age", num(40)}}, {uid("Ward", "w1")}));
  store.add(make_entity(uid("Ward", "w1")));
  REQUIRE(store.size() == 2);
  const Entity* p1 = store.find(uid("Patient", "p1"));
  REQUIRE(p1 != nullptr);
  CHECK(p1->attrs.at("age") == num(40));
  CHECK(p1->parents == std::vector<EntityUid>{uid("Ward", "w1")});
  // Same id, other type: another entity.
  CHECK(store.find(uid("Ward", "p1")) == nullptr);

  // Replacing drops the old attributes and parents.
  store.add(make_entity(uid("Patient", "p1"), {{"age", num(41)}}));
  CHECK(store.size() == 2);
  CHECK(store.find(uid("Patient", "p1"))->attrs.at("age") == num(41));
  CHECK(store.find(uid("Patient", "p1"))->parents.empty());
  CHECK_FALSE(store.is_in(uid("Patient", "p1"), uid("Ward", "w1")));
  CHECK(store.all().size() == 2);
}

TEST_CASE("entities: a layer over a base sees both, and shadows the base", "[rules][entities]") {
  Entities directory;
  directory.add(make_entity(uid("Patient", "p1"), {{"ward", str("w1")}}, {uid("Ward", "w1")}));
  directory.add(make_entity(uid("Ward", "w1"), {}, {uid("Department", "cardio")}));
  directory.add(make_entity(uid("Patient", "p2"), {{"ward", str("w1")}}));

  Entities request(&directory);
  request.add(
      make_entity(uid("PatientData", "obs-1"), {{"kind", str("hr")}}, {uid("Patient", "p1")}));
  request.add(make_entity(uid("Patient", "p2"), {{"ward", str("w9")}}));

  CHECK(request.size() == 2);
  CHECK(request.all().size() == 2);
  CHECK(directory.size() == 3);
  REQUIRE(request.find(uid("Patient", "p1")) != nullptr);                    // from the base
  CHECK(request.find(uid("Patient", "p2"))->attrs.at("ward") == str("w9"));  // shadowed
  CHECK(directory.find(uid("Patient", "p2"))->attrs.at("ward") == str("w1"));
  CHECK(directory.find(uid("PatientData", "obs-1")) == nullptr);  // the base never sees the layer

  // `in` crosses layers: obs-1 (layer) -> p1 (base) -> w1 -> cardio.
  CHECK(request.is_in(uid("PatientData", "obs-1"), uid("Department", "cardio")));
  CHECK_FALSE(directory.is_in(uid("PatientData", "obs-1"), uid("Patient", "p1")));

  // A three-layer stack.
  Entities top(&request);
  CHECK(top.find(uid("Ward", "w1")) != nullptr);
  CHECK(top.is_in(uid("PatientData", "obs-1"), uid("Ward", "w1")));
}

TEST_CASE("entities: a copied store is independent of its original", "[rules][entities]") {
  Entities store;
  for (int i = 0; i < 100; ++i) {
    store.add(make_entity(uid("Patient", std::to_string(i)), {{"n", num(i)}},
                          {uid("Ward", std::to_string(i % 7))}));
  }
  Entities copy = store;
  copy.add(make_entity(uid("Patient", "5"), {{"n", num(500)}}));
  copy.add(make_entity(uid("Patient", "new")));
  CHECK(store.size() == 100);
  CHECK(copy.size() == 101);
  CHECK(store.find(uid("Patient", "5"))->attrs.at("n") == num(5));
  CHECK(copy.find(uid("Patient", "5"))->attrs.at("n") == num(500));
  CHECK(store.is_in(uid("Patient", "5"), uid("Ward", "5")));
  CHECK_FALSE(copy.is_in(uid("Patient", "5"), uid("Ward", "5")));
  CHECK(copy.is_in(uid("Patient", "12"), uid("Ward", "5")));
  CHECK(store.find(uid("Patient", "new")) == nullptr);
}

TEST_CASE("entities: is_in is reflexive, transitive and tolerates cycles", "[rules][entities]") {
  Entities store;
  // a -> b -> c -> d, plus a diamond a -> x -> d.
  store.add(make_entity(uid("G", "a"), {}, {uid("G", "b"), uid("G", "x")}));
  store.add(make_entity(uid("G", "b"), {}, {uid("G", "c")}));
  store.add(make_entity(uid("G", "c"), {}, {uid("G", "d")}));
  store.add(make_entity(uid("G", "x"), {}, {uid("G", "d")}));
  store.add(make_entity(uid("G", "d")));

  CHECK(store.is_in(uid("G", "a"), uid("G", "a")));
  CHECK(store.is_in(uid("G", "a"), uid("G", "b")));
  CHECK(store.is_in(uid("G", "a"), uid("G", "c")));
  CHECK(store.is_in(uid("G", "a"), uid("G", "d")));
  CHECK_FALSE(store.is_in(uid("G", "d"), uid("G", "a")));
  CHECK_FALSE(store.is_in(uid("G", "b"), uid("G", "x")));
  // Unknown entities: equal to themselves, no parents.
  CHECK(store.is_in(uid("G", "ghost"), uid("G", "ghost")));
  CHECK_FALSE(store.is_in(uid("G", "ghost"), uid("G", "d")));
  // A parent the store does not hold still counts as an ancestor (it just has none of its own).
  store.add(make_entity(uid("G", "e"), {}, {uid("G", "absent")}));
  CHECK(store.is_in(uid("G", "e"), uid("G", "absent")));

  // Cycles: p -> q -> r -> p, and a self-loop s -> s.
  store.add(make_entity(uid("C", "p"), {}, {uid("C", "q")}));
  store.add(make_entity(uid("C", "q"), {}, {uid("C", "r")}));
  store.add(make_entity(uid("C", "r"), {}, {uid("C", "p")}));
  store.add(make_entity(uid("C", "s"), {}, {uid("C", "s")}));
  CHECK(store.is_in(uid("C", "p"), uid("C", "r")));
  CHECK(store.is_in(uid("C", "r"), uid("C", "q")));
  CHECK_FALSE(store.is_in(uid("C", "p"), uid("C", "elsewhere")));
  CHECK_FALSE(store.is_in(uid("C", "s"), uid("C", "p")));
}

TEST_CASE("entities: is_in over a long chain and a wide fan-out", "[rules][entities]") {
  Entities store;
  // A chain of 200 (past the walk's inline capacity) ending in a cycle back to its start.
  constexpr int kChain = 200;
  for (int i = 0; i < kChain; ++i) {
    store.add(make_entity(uid("Chain", std::to_string(i)), {},
                          {uid("Chain", std::to_string((i + 1) % kChain))}));
  }
  CHECK(store.is_in(uid("Chain", "0"), uid("Chain", "199")));
  CHECK(store.is_in(uid("Chain", "150"), uid("Chain", "149")));
  CHECK_FALSE(store.is_in(uid("Chain", "0"), uid("Chain", "200")));

  // One entity with 100 parents, each with its own parent.
  std::vector<EntityUid> parents;
  for (int i = 0; i < 100; ++i) {
    parents.push_back(uid("Group", std::to_string(i)));
    store.add(make_entity(uid("Group", std::to_string(i)), {}, {uid("Top", std::to_string(i))}));
  }
  store.add(make_entity(uid("User", "u"), {}, parents));
  CHECK(store.is_in(uid("User", "u"), uid("Top", "99")));
  CHECK_FALSE(store.is_in(uid("User", "u"), uid("Top", "100")));
}

TEST_CASE("entities: Cedar's JSON entity format", "[rules][entities][json]") {
  auto r = entities_from_json_text(R"([
    {"uid": {"type": "Patient", "id": "p1"},
     "attrs": {"age": 40, "name": "Ann", "consented": true, "tags": ["a", "b", "a"],
               "address": {"city": "Bern", "zip": 3000},
               "gp": {"__entity": {"type": "Practitioner", "id": "dr-lee"}},
               "typeAndId": {"type": "Practitioner", "id": "dr-lee"}},
     "parents": [{"type": "Ward", "id": "w1"}, {"__entity": {"type": "Hospital::Ward", "id": "w2"}}]},
    {"uid": {"__entity": {"type": "Ward", "id": "w1"}}, "attrs": {}, "parents": [], "tags": {}},
    {"uid": {"type": "Hospital::Ward", "id": "w2"}, "attrs": {}, "parents": [], "unknownKey": 1}
  ])");
  REQUIRE(r.ok());
  const Entities& store = *r;
  REQUIRE(store.size() == 3);
  const Entity* p1 = store.find(uid("Patient", "p1"));
  REQUIRE(p1 != nullptr);
  CHECK(p1->attrs.at("age") == num(40));
  CHECK(p1->attrs.at("name") == str("Ann"));
  CHECK(p1->attrs.at("consented") == Value(true));
  CHECK(p1->attrs.at("tags") == Value::set({str("a"), str("b")}));
  CHECK(p1->attrs.at("address") == Value::record({{"city", str("Bern")}, {"zip", num(3000)}}));
  CHECK(p1->attrs.at("gp") == entity("Practitioner", "dr-lee"));
  // Without a schema, Cedar reads {"type", "id"} in an attribute as a record, not an entity.
  CHECK(p1->attrs.at("typeAndId") ==
        Value::record({{"type", str("Practitioner")}, {"id", str("dr-lee")}}));
  CHECK(p1->parents == std::vector<EntityUid>{uid("Ward", "w1"), uid("Hospital::Ward", "w2")});
  CHECK(store.is_in(uid("Patient", "p1"), uid("Hospital::Ward", "w2")));

  // The array form parses the same.
  auto again = entities_from_json(json::parse(R"([{"uid": {"type": "A", "id": ""}, "attrs": {},
                                                   "parents": []}])"));
  REQUIRE(again.ok());
  CHECK(again->find(uid("A", "")) != nullptr);
  auto empty = entities_from_json_text("[]");
  REQUIRE(empty.ok());
  CHECK(empty->size() == 0);
}

TEST_CASE("entities: each malformed import is named", "[rules][entities][json]") {
  CHECK_THAT(import_error("{}"), Catch::Contains("expected a JSON array"));
  CHECK_THAT(import_error("[1]"), Catch::Contains("entry 0") && Catch::Contains("entity object"));
  CHECK_THAT(import_error("[{\"attrs\": {}, \"parents\": []}]"),
             Catch::Contains("missing \"uid\""));
  CHECK_THAT(import_error(R"([{"uid": {"type": "A", "id": "a"}, "parents": []}])"),
             Catch::Contains("entity A::\"a\"") && Catch::Contains("missing \"attrs\""));
  CHECK_THAT(import_error(R"([{"uid": {"type": "A", "id": "a"}, "attrs": {}}])"),
             Catch::Contains("entity A::\"a\"") && Catch::Contains("missing \"parents\""));
  CHECK_THAT(import_error(R"([{"uid": {"type": "A", "id": "a"}, "attrs": [], "parents": []}])"),
             Catch::Contains("\"attrs\" must be an object"));
  CHECK_THAT(import_error(R"([{"uid": {"type": "A", "id": "a"}, "attrs": {}, "parents": {}}])"),
             Catch::Contains("\"parents\" must be an array"));
  CHECK_THAT(import_error(R"([{"uid": {"type": "A"}, "attrs": {}, "parents": []}])"),
             Catch::Contains("uid") && Catch::Contains("\"type\" and \"id\""));
  CHECK_THAT(import_error(R"([{"uid": {"type": "A", "id": 7}, "attrs": {}, "parents": []}])"),
             Catch::Contains("\"id\" must be a string"));
  CHECK_THAT(import_error(R"([{"uid": "A::\"a\"", "attrs": {}, "parents": []}])"),
             Catch::Contains("expected an entity reference object"));
  CHECK_THAT(import_error(R"([{"uid": {"__expr": "A::\"a\""}, "attrs": {}, "parents": []}])"),
             Catch::Contains("__expr"));

  // Floats, nulls, extension values and out-of-range integers name the entity and attribute.
  std::string e = import_error(R"([{"uid": {"type": "Patient", "id": "p1"},
                                    "attrs": {"weight": 71.5}, "parents": []}])");
  CHECK_THAT(e, Catch::Contains("entity Patient::\"p1\"") && Catch::Contains("`weight`") &&
                    Catch::Contains("float"));
  e = import_error(R"([{"uid": {"type": "Patient", "id": "p1"}, "attrs": {"gp": null},
                        "parents": []}])");
  CHECK_THAT(e, Catch::Contains("entity Patient::\"p1\"") && Catch::Contains("`gp`") &&
                    Catch::Contains("null"));
  e = import_error(R"([{"uid": {"type": "Device", "id": "d1"},
                        "attrs": {"ip": {"__extn": {"fn": "ip", "arg": "10.0.0.1"}}},
                        "parents": []}])");
  CHECK_THAT(e, Catch::Contains("entity Device::\"d1\"") && Catch::Contains("`ip`") &&
                    Catch::Contains("extension"));
  e = import_error(R"([{"uid": {"type": "A", "id": "a"}, "attrs": {"n": 9223372036854775808},
                        "parents": []}])");
  CHECK_THAT(e, Catch::Contains("`n`") && Catch::Contains("64-bit"));
  // Nested: the path inside the attribute is named too.
  e = import_error(R"([{"uid": {"type": "A", "id": "a"},
                        "attrs": {"outer": {"list": [1, 2, null]}}, "parents": []}])");
  CHECK_THAT(e, Catch::Contains("`outer`") && Catch::Contains("`list`") &&
                    Catch::Contains("set element 2"));

  // Duplicates.
  e = import_error(R"([{"uid": {"type": "A", "id": "a"}, "attrs": {}, "parents": []},
                       {"uid": {"type": "A", "id": "a"}, "attrs": {}, "parents": []}])");
  CHECK_THAT(e,
             Catch::Contains("entry 1") && Catch::Contains("A::\"a\"") && Catch::Contains("twice"));
  e = import_error(R"([{"uid": {"type": "A", "id": "a"}, "attrs": {"x": 1, "x": 2},
                        "parents": []}])");
  CHECK_THAT(e, Catch::Contains("`x`") && Catch::Contains("twice"));

  // Entity types must be Cedar names.
  for (const char* bad : {"", "Patient ", "Hospital::", "::Ward", "A:B", "9Lives", "if", "A::in::B",
                          "__cedar", "__cedar::X", "Pa-tient"}) {
    std::string text = R"([{"uid": {"type": ")" + std::string(bad) +
                       R"(", "id": "a"}, "attrs": {}, "parents": []}])";
    CHECK_THAT(import_error(text), Catch::Contains("invalid entity type"));
  }
  CHECK_THAT(import_error(R"([{"uid": {"type": "A", "id": "a"},
                               "attrs": {"r": {"__entity": {"type": "not a type", "id": "x"}}},
                               "parents": []}])"),
             Catch::Contains("`r`") && Catch::Contains("invalid entity type"));
  CHECK_THAT(import_error(R"([{"uid": {"type": "A", "id": "a"}, "attrs": {},
                               "parents": [{"type": "B", "id": "b"}, {"type": "B b", "id": "c"}]}])"),
             Catch::Contains("parent 1") && Catch::Contains("invalid entity type"));

  // Tags are outside the subset; broken JSON is refused.
  CHECK_THAT(import_error(R"([{"uid": {"type": "A", "id": "a"}, "attrs": {}, "parents": [],
                               "tags": {"t": 1}}])"),
             Catch::Contains("tags"));
  CHECK_THAT(import_error("[{\"uid\": "), Catch::Contains("not valid JSON"));
}

TEST_CASE("entities: JSON values and their escapes", "[rules][entities][json]") {
  constexpr std::int64_t kMax = std::numeric_limits<std::int64_t>::max();
  constexpr std::int64_t kMin = std::numeric_limits<std::int64_t>::min();
  CHECK(value_of(json(true)) == Value(true));
  CHECK(value_of(json(kMax)) == num(kMax));
  CHECK(value_of(json(kMin)) == num(kMin));
  CHECK(value_of(json::parse("9223372036854775807")) == num(kMax));
  CHECK(value_of(json::parse("-9223372036854775808")) == num(kMin));
  CHECK(value_of(json::parse("-0")) == num(0));
  CHECK_THAT(value_error(json::parse("9223372036854775808")), Catch::Contains("64-bit"));
  CHECK_THAT(value_error(json::parse("1.0")), Catch::Contains("float"));
  CHECK_THAT(value_error(json::parse("1e3")), Catch::Contains("float"));
  CHECK_THAT(value_error(json(nullptr)), Catch::Contains("null"));
  CHECK(value_of(json("text")) == str("text"));
  CHECK(value_of(json::parse("[3, 1, 2, 1]")) == Value::set({num(1), num(2), num(3)}));
  CHECK(value_of(json::parse("[]")) == Value::set({}));
  CHECK(value_of(json::parse("{}")) == Value::record({}));

  // Escapes apply only to single-key objects of the escape's exact shape (as Cedar reads them).
  CHECK(value_of(json::parse(R"({"__entity": {"type": "A", "id": "a"}})")) == entity("A", "a"));
  CHECK(value_of(json::parse(R"({"__entity": {"type": "A", "id": "a", "extra": 1}})")) ==
        entity("A", "a"));
  CHECK(value_of(json::parse(R"({"__entity": {"type": "A"}})")).is_record());
  CHECK(value_of(json::parse(R"({"__entity": {"type": "A", "id": 1}})")).is_record());
  CHECK(value_of(json::parse(R"({"__entity": {"type": "A", "id": "a"}, "x": 1})")).is_record());
  CHECK(value_of(json::parse(R"({"__extn": 1})")).is_record());
  CHECK_THAT(value_error(json::parse(R"({"__extn": {"fn": "decimal", "arg": "1.5"}})")),
             Catch::Contains("decimal") && Catch::Contains("not supported"));
  CHECK_THAT(value_error(json::parse(R"({"__extn": {"fn": "f", "args": [1, 2]}})")),
             Catch::Contains("not supported"));
  CHECK_THAT(value_error(json::parse(R"({"__expr": "1 + 1"})")), Catch::Contains("__expr"));
  CHECK_THAT(value_error(json::parse(R"({"__entity": {"type": "a b", "id": "x"}})")),
             Catch::Contains("invalid entity type"));

  // Too deep is refused, not recursed into.
  std::string deep(500, '[');
  deep += std::string(500, ']');
  CHECK_THAT(value_error(json::parse(deep)), Catch::Contains("nested deeper"));
  std::string ok(100, '[');
  ok += std::string(100, ']');
  CHECK(value_of(json::parse(ok)).is_set());
}

TEST_CASE("entities: values and stores round-trip through JSON", "[rules][entities][json]") {
  Value v = Value::record({
      {"b", Value(false)},
      {"n", num(std::numeric_limits<std::int64_t>::min())},
      {"s", str("quote \" and \xC3\xA9")},
      {"e", entity("Hospital::Ward", "w \"1\"")},
      {"set", Value::set({num(2), str("x"), entity("A", "a"), Value::set({})})},
      {"nested", Value::record({{"inner", Value::set({Value::record({})})}})},
  });
  json j = value_to_json(v);
  CHECK(j["e"] == json::parse(R"({"__entity": {"type": "Hospital::Ward", "id": "w \"1\""}})"));
  CHECK(j["n"] == json(std::numeric_limits<std::int64_t>::min()));
  CHECK(value_of(j) == v);
  CHECK(value_of(json::parse(j.dump())) == v);

  Entities store;
  store.add(make_entity(uid("Patient", "p2"), {{"age", num(3)}}, {uid("Ward", "w1")}));
  store.add(make_entity(uid("Patient", "p1"), {{"gp", entity("Practitioner", "lee")}, {"v", v}},
                        {uid("Ward", "w1"), uid("Ward", "w2")}));
  store.add(make_entity(uid("Ward", "w1")));
  json exported = entities_to_json(store);
  REQUIRE(exported.is_array());
  REQUIRE(exported.size() == 3);
  // Sorted by uid, so the export of a store is one text.
  CHECK(exported[0]["uid"] == json::parse(R"({"type": "Patient", "id": "p1"})"));
  CHECK(exported[1]["uid"] == json::parse(R"({"type": "Patient", "id": "p2"})"));
  CHECK(exported[2]["uid"] == json::parse(R"({"type": "Ward", "id": "w1"})"));

  auto back = entities_from_json_text(exported.dump());
  REQUIRE(back.ok());
  REQUIRE(back->size() == 3);
  for (const Entity* original : store.all()) {
    const Entity* copy = back->find(original->uid);
    REQUIRE(copy != nullptr);
    CHECK(copy->attrs == original->attrs);
    CHECK(copy->parents == original->parents);
  }
  CHECK(entities_to_json(*back) == exported);

  // A layer exports only itself.
  Entities layer(&store);
  layer.add(make_entity(uid("PatientData", "o1")));
  CHECK(entities_to_json(layer).size() == 1);
}

TEST_CASE("entities: an import whose parents form a cycle is refused", "[rules][entities][json]") {
  // As Cedar does when it loads entities; a store built with add() tolerates cycles (see above).
  std::string e = import_error(R"([
    {"uid": {"type": "G", "id": "a"}, "attrs": {}, "parents": [{"type": "G", "id": "b"}]},
    {"uid": {"type": "G", "id": "b"}, "attrs": {}, "parents": [{"type": "G", "id": "c"}]},
    {"uid": {"type": "G", "id": "c"}, "attrs": {}, "parents": [{"type": "G", "id": "a"}]}])");
  CHECK_THAT(e, Catch::Contains("cycle") && Catch::Contains("G::"));
  CHECK_THAT(import_error(R"([{"uid": {"type": "G", "id": "self"}, "attrs": {},
                               "parents": [{"type": "G", "id": "self"}]}])"),
             Catch::Contains("G::\"self\"") && Catch::Contains("cycle"));
  // A diamond and a long chain are not cycles.
  auto diamond = entities_from_json_text(R"([
    {"uid": {"type": "G", "id": "a"}, "attrs": {},
     "parents": [{"type": "G", "id": "b"}, {"type": "G", "id": "c"}]},
    {"uid": {"type": "G", "id": "b"}, "attrs": {}, "parents": [{"type": "G", "id": "d"}]},
    {"uid": {"type": "G", "id": "c"}, "attrs": {}, "parents": [{"type": "G", "id": "d"}]},
    {"uid": {"type": "G", "id": "d"}, "attrs": {}, "parents": [{"type": "G", "id": "outside"}]}])");
  CHECK(diamond.ok());
  json chain = json::array();
  for (int i = 0; i < 100000; ++i) {
    chain.push_back({{"uid", {{"type", "G"}, {"id", std::to_string(i)}}},
                     {"attrs", json::object()},
                     {"parents", json::array({{{"type", "G"}, {"id", std::to_string(i + 1)}}})}});
  }
  auto long_chain = entities_from_json(chain);
  REQUIRE(long_chain.ok());
  CHECK(long_chain->is_in(uid("G", "0"), uid("G", "100000")));
  chain.back()["parents"] = json::array({{{"type", "G"}, {"id", "0"}}});
  CHECK_FALSE(entities_from_json(chain).ok());
}
