// The validator: type misuse visible without a schema, the action scope, policies that can never
// apply, duplicate ids, and with a schema unknown entity types, actions and attributes.
#include <catch2/catch.hpp>

#include <string>
#include <vector>

#include "ledger/rules/parser.h"
#include "ledger/rules/validator.h"

using namespace medgate;
using namespace medgate::rules;

namespace {

PolicySet parse_ok(std::string_view text) {
  ParseResult r = parse_policies(text);
  INFO("policies: " << text);
  for (const Diagnostic& d : r.errors) INFO(d.to_text());
  REQUIRE(r.ok());
  return r.policies;
}

std::vector<std::string> texts(const std::vector<Diagnostic>& diagnostics) {
  std::vector<std::string> out;
  for (const Diagnostic& d : diagnostics) out.push_back(d.to_text());
  return out;
}

// The errors for one condition, located in `when { <expr> }` on line 1 (the expression starts
// at column 44).
std::vector<std::string> condition_errors(std::string_view expr, const Schema& schema = {}) {
  std::string text = "permit(principal, action, resource) when { " + std::string(expr) + " };";
  return texts(validate(parse_ok(text), schema).errors);
}

using Lines = std::vector<std::string>;

Schema hospital_schema() {
  Schema s;
  s.entity_types["Practitioner"] = {"role", "ward", "clearance"};
  s.entity_types["Patient"] = {"name"};
  s.entity_types["PatientData"] = {"kind", "patient"};
  s.entity_types["Hospital::Ward"] = {};
  s.actions = {{"Action", "read"}, {"Action", "list"}, {"Action", "export"}};
  return s;
}

}  // namespace

TEST_CASE("well-typed policies validate without errors or warnings", "[rules][validator]") {
  PolicySet set = parse_ok(R"(
@id("ward")
permit (principal is Practitioner in Hospital::Ward::"w7", action in [Action::"read"],
        resource is PatientData)
when { principal.role == "nurse" && resource.kind like "vitals-*" && context.hour + 1 < 20 }
unless { context has emergency && !context.emergency };
forbid (principal, action == Action::"export", resource)
unless { [1, 2].contains(context.level) || (if context.x then 1 else 2) > 1 };
)");
  for (const Schema& schema : {Schema{}, hospital_schema()}) {
    ValidationResult r = validate(set, schema);
    CHECK(r.ok());
    CHECK(texts(r.errors).empty());
    CHECK(texts(r.warnings).empty());
  }
}

TEST_CASE("operators applied to a literal of the wrong type are errors, where the literal is",
          "[rules][validator]") {
  // The examples of validator.h.
  CHECK(condition_errors(R"(1 + "a")") == Lines{"1:48: `+` expects long, got string"});
  CHECK(condition_errors("if 3 then true else false") ==
        Lines{"1:47: `if` expects bool, got long"});
  CHECK(condition_errors(R"("a" < 2)") == Lines{"1:44: `<` expects long, got string"});
  CHECK(condition_errors("!5") == Lines{"1:45: `!` expects bool, got long"});
  CHECK(condition_errors(R"(5 like "x")") == Lines{"1:44: `like` expects string, got long"});
  CHECK(condition_errors(R"("abc".contains("a"))") ==
        Lines{"1:44: `.contains` expects set, got string"});

  // Every other operator.
  CHECK(condition_errors(R"(-"a" == 1)") == Lines{"1:45: `-` expects long, got string"});
  CHECK(condition_errors("true - 1 == 0") == Lines{"1:44: `-` expects long, got bool"});
  CHECK(condition_errors("2 * [] == 0") == Lines{"1:48: `*` expects long, got set"});
  CHECK(condition_errors("{} <= 1") == Lines{"1:44: `<=` expects long, got record"});
  CHECK(condition_errors("1 > true") == Lines{"1:48: `>` expects long, got bool"});
  CHECK(condition_errors("1 >= User::\"a\"") == Lines{"1:49: `>=` expects long, got entity"});
  CHECK(condition_errors("1 && true") == Lines{"1:44: `&&` expects bool, got long"});
  CHECK(condition_errors("true || \"x\"") == Lines{"1:52: `||` expects bool, got string"});
  CHECK(condition_errors("1 in User::\"a\"") == Lines{"1:44: `in` expects entity, got long"});
  CHECK(condition_errors("principal in 5") == Lines{"1:57: `in` expects entity or set, got long"});
  CHECK(condition_errors("[1].containsAll(1)") ==
        Lines{"1:60: `.containsAll` expects set, got long"});
  CHECK(condition_errors("1.containsAny([1])") ==
        Lines{"1:44: `.containsAny` expects set, got long"});
  CHECK(condition_errors("1 has a") == Lines{"1:44: `has` expects entity or record, got long"});
  CHECK(condition_errors("\"s\".a == 1") ==
        Lines{"1:44: attribute access expects entity or record, got string"});
  CHECK(condition_errors("true is User") == Lines{"1:44: `is` expects entity, got bool"});

  // Several in one condition are all reported.
  CHECK(condition_errors("1 + true == \"a\" - 2") ==
        Lines{"1:48: `+` expects long, got bool", "1:56: `-` expects long, got string"});
}

TEST_CASE("types flow through operators and the variables", "[rules][validator]") {
  // An operator's node is located at the operator, so `(1 + 2)` is reported at its `+`.
  CHECK(condition_errors("(1 + 2) like \"3\"") == Lines{"1:47: `like` expects string, got long"});
  CHECK(condition_errors("(1 < 2) + 1 == 2") == Lines{"1:47: `+` expects long, got bool"});
  CHECK(condition_errors("principal + 1 == 2") == Lines{"1:44: `+` expects long, got entity"});
  CHECK(condition_errors("context < 1") == Lines{"1:44: `<` expects long, got record"});
  CHECK(condition_errors("action like \"x\"") == Lines{"1:44: `like` expects string, got entity"});
  CHECK(condition_errors("(if true then 1 else 2) like \"x\"") ==
        Lines{"1:45: `like` expects string, got long"});
  CHECK(condition_errors("[1] has a") == Lines{"1:44: `has` expects entity or record, got set"});
  // Unknown without evaluating: an attribute, or an if whose branches differ.
  CHECK(condition_errors("context.a + 1 == 2").empty());
  CHECK(condition_errors("principal.age < 3").empty());
  CHECK(condition_errors("(if context.a then 1 else \"x\") like \"x\"").empty());
  CHECK(condition_errors("{a: 1}.a + 1 == 2").empty());
  CHECK(condition_errors("principal in [User::\"a\"]").empty());
  CHECK(condition_errors("1 == \"a\"").empty());  // == compares any two values
}

TEST_CASE("the action scope names actions", "[rules][validator]") {
  auto errors = [](std::string_view text) { return texts(validate(parse_ok(text)).errors); };
  CHECK(errors(R"(permit(principal, action == User::"read", resource);)") ==
        Lines{"1:19: the action scope names User::\"read\", which is not an action (an entity of "
              "type `Action`)"});
  CHECK(errors(R"(permit(principal, action in Group::"g", resource);)").size() == 1);
  CHECK(errors(R"(permit(principal, action in [Action::"a", Doc::"b", Action::"c"], resource);)") ==
        Lines{"1:19: the action scope names Doc::\"b\", which is not an action (an entity of type "
              "`Action`)"});
  CHECK(errors(R"(permit(principal, action == Hospital::Action::"read", resource);)").empty());
  CHECK(
      errors(R"(permit(principal, action in [Action::"a", Ns::Action::"b"], resource);)").empty());
  CHECK(errors(R"(permit(principal, action == MyAction::"read", resource);)").size() == 1);

  // The parser refuses `action is T`; a policy built in code can still hold one.
  PolicySet set = parse_ok("permit(principal, action, resource);");
  set.policies[0].action.op = ScopeConstraint::Op::kIs;
  set.policies[0].action.entity_type = "User";
  CHECK(texts(validate(set).errors) ==
        Lines{"1:19: `action is User` can never hold: actions are entities of type `Action`"});
  set.policies[0].action.entity_type = "Action";
  CHECK(validate(set).ok());
  set.policies[0].principal.op = ScopeConstraint::Op::kInSet;
  CHECK(texts(validate(set).errors) ==
        Lines{"1:8: only the action scope can be `in` a list of entities, not the principal"});
}

TEST_CASE("a policy whose condition is the literal false can never apply: a warning",
          "[rules][validator]") {
  ValidationResult r = validate(parse_ok(R"(@id("never")
permit(principal, action, resource) when { false };
permit(principal, action, resource) unless { true };
permit(principal, action, resource) when { true } unless { false };
permit(principal, action, resource) when { !true };)"));
  CHECK(r.ok());
  CHECK(texts(r.warnings) ==
        Lines{"2:44: this policy can never apply: its `when` condition is always false",
              "3:46: this policy can never apply: its `unless` condition is always true"});
  REQUIRE(r.warnings.size() == 2);
  CHECK(r.warnings[0].policy_id == "never");
  CHECK(r.warnings[1].policy_id == "policy1");
}

TEST_CASE("duplicate policy ids in a set built in code are errors", "[rules][validator]") {
  PolicySet set = parse_ok(R"(permit(principal, action, resource);
forbid(principal, action, resource);)");
  set.policies[1].id = "policy0";
  ValidationResult r = validate(set);
  CHECK(texts(r.errors) == Lines{"2:1: duplicate policy id `policy0` (first used at line 1)"});
  REQUIRE(r.errors.size() == 1);
  CHECK(r.errors[0].policy_id == "policy0");
}

TEST_CASE("diagnostics carry the policy id", "[rules][validator]") {
  ValidationResult r = validate(parse_ok(R"(@id("grant-17")
permit(principal, action, resource) when { 1 + "a" == 2 };)"));
  REQUIRE(r.errors.size() == 1);
  CHECK(r.errors[0].policy_id == "grant-17");
  CHECK(r.errors[0].to_text() == "2:48: `+` expects long, got string");
}

TEST_CASE("with a schema: unknown entity types in scopes and literals are errors",
          "[rules][validator]") {
  const Schema schema = hospital_schema();
  auto errors = [&](std::string_view text) {
    return texts(validate(parse_ok(text), schema).errors);
  };
  CHECK(errors(R"(permit(principal == Nurse::"a", action, resource);)") ==
        Lines{"1:8: unknown entity type `Nurse`"});
  CHECK(errors(R"(permit(principal is Nurse, action, resource in Ward::"w");)") ==
        Lines{"1:8: unknown entity type `Nurse`", "1:36: unknown entity type `Ward`"});
  CHECK(errors(R"(permit(principal is Nurse in Ward::"w", action, resource);)") ==
        Lines{"1:8: unknown entity type `Nurse`", "1:8: unknown entity type `Ward`"});
  CHECK(errors(R"(permit(principal is Practitioner in Hospital::Ward::"w", action, resource);)")
            .empty());
  CHECK(errors(R"(permit(principal, action, resource)
when { principal in Team::"t" || resource is Record || principal == Patient::"p" };)") ==
        Lines{"2:21: unknown entity type `Team`", "2:43: unknown entity type `Record`"});
  CHECK(errors(R"(permit(principal, action, resource) when { [{a: Team::"t"}] == [] };)") ==
        Lines{"1:49: unknown entity type `Team`"});
}

TEST_CASE("with a schema: actions it does not list are errors", "[rules][validator]") {
  const Schema schema = hospital_schema();
  auto errors = [&](std::string_view text) {
    return texts(validate(parse_ok(text), schema).errors);
  };
  CHECK(errors(R"(permit(principal, action == Action::"delete", resource);)") ==
        Lines{"1:19: unknown action Action::\"delete\""});
  CHECK(errors(R"(permit(principal, action in [Action::"read", Action::"wipe"], resource);)") ==
        Lines{"1:19: unknown action Action::\"wipe\""});
  CHECK(errors(R"(permit(principal, action, resource) when { action == Action::"wipe" };)") ==
        Lines{"1:54: unknown action Action::\"wipe\""});
  CHECK(errors(R"(permit(principal, action in [Action::"read", Action::"list"], resource);)")
            .empty());
  // Without actions in the schema, actions are not checked; without types, types are not.
  Schema types_only = schema;
  types_only.actions.clear();
  CHECK(
      texts(validate(parse_ok(R"(permit(principal, action == Action::"x", resource);)"), types_only)
                .errors)
          .empty());
  Schema actions_only = schema;
  actions_only.entity_types.clear();
  CHECK(texts(validate(parse_ok(R"(permit(principal == Nurse::"a", action, resource);)"),
                       actions_only)
                  .errors)
            .empty());
}

TEST_CASE("with a schema: attributes it does not know on a known type are warnings",
          "[rules][validator]") {
  const Schema schema = hospital_schema();
  ValidationResult r = validate(parse_ok(R"(permit(principal is Practitioner, action,
resource == PatientData::"d1")
when { principal.role == "nurse" && principal.rank > 2 && resource.kind == "x" &&
       resource has owner && Patient::"p".nme == "x" && context.anything == 1 &&
       principal["ward"] == "w" };)"),
                                schema);
  CHECK(r.ok());
  CHECK(texts(r.warnings) ==
        Lines{"3:47: entity type `Practitioner` has no attribute `rank` in the schema",
              "4:17: entity type `PatientData` has no attribute `owner` in the schema (so `has` "
              "is always false)",
              "4:43: entity type `Patient` has no attribute `nme` in the schema"});

  // The principal's type is not fixed by `in`: nothing to check it against.
  r = validate(parse_ok(R"(permit(principal in Hospital::Ward::"w", action, resource)
when { principal.rank > 2 };)"),
               schema);
  CHECK(r.warnings.empty());
  // An unknown type is an error already; its attributes are not warned about as well.
  r = validate(parse_ok(R"(permit(principal is Nurse, action, resource)
when { principal.rank > 2 };)"),
               schema);
  CHECK(texts(r.errors) == Lines{"1:8: unknown entity type `Nurse`"});
  CHECK(r.warnings.empty());
}

TEST_CASE("the validator does not crash on hand-built trees with missing parts",
          "[rules][validator]") {
  PolicySet set = parse_ok("permit(principal, action, resource) when { true };");
  auto broken = std::make_shared<Expr>();
  broken->kind = Expr::Kind::kBinary;
  broken->binary_op = BinaryOp::kAdd;
  set.policies[0].conditions.push_back(Condition{true, broken});
  set.policies[0].conditions.push_back(Condition{false, nullptr});
  ValidationResult r = validate(set);
  CHECK(texts(r.errors) == Lines{"0:0: malformed expression: a missing operand",
                                 "0:0: malformed expression: a missing operand",
                                 "1:1: a condition has no expression"});

  // A hand-built tree deeper than the parser allows is refused, not recursed into without end.
  ExprPtr deep = std::make_shared<Expr>();
  for (int i = 0; i < 1000; ++i) {
    auto e = std::make_shared<Expr>();
    e->kind = Expr::Kind::kUnary;
    e->unary_op = UnaryOp::kNot;
    e->children = {deep};
    deep = e;
  }
  set.policies[0].conditions = {Condition{true, deep}};
  r = validate(set);
  REQUIRE(r.errors.size() == 1);
  CHECK(r.errors[0].message == "expression nested too deeply (the limit is 200 levels)");
}
