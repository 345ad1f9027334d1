// The Cedar-subset parser and printer: every construct, Cedar's precedence, escapes, ids and
// annotations, every error with its line:column, recovery, nesting limits, and round trips
// through to_text.
#include <catch2/catch.hpp>

#include <cctype>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "ledger/rules/parser.h"

using namespace medgate;
using namespace medgate::rules;

namespace {

ExprPtr parse_ok(std::string_view text) {
  ExprParseResult r = parse_expression(text);
  INFO("expression: " << text);
  for (const Diagnostic& d : r.errors) INFO(d.to_text());
  REQUIRE(r.errors.empty());
  REQUIRE(r.expr != nullptr);
  return r.expr;
}

// The expression as the printer writes it: shows the tree's shape through its parentheses.
std::string shape(std::string_view text) {
  return to_text(*parse_ok(text));
}

// Short test expressions: a lone letter `a` stands for `context.a`.
std::string ctx(std::string_view text) {
  std::string out;
  for (std::size_t i = 0; i < text.size(); ++i) {
    char c = text[i];
    bool alone = c >= 'a' && c <= 'z' &&
                 (i == 0 || !std::isalnum(static_cast<unsigned char>(text[i - 1]))) &&
                 (i + 1 == text.size() || !std::isalnum(static_cast<unsigned char>(text[i + 1])));
    if (alone && (i == 0 || (text[i - 1] != '.' && text[i - 1] != '"'))) out += "context.";
    out += c;
  }
  return out;
}

// "line:column: message" of the first error of an expression.
std::string expr_error(std::string_view text) {
  ExprParseResult r = parse_expression(text);
  INFO("expression: " << text);
  REQUIRE(r.expr == nullptr);
  REQUIRE(!r.errors.empty());
  return r.errors.front().to_text();
}

std::vector<std::string> errors_of(std::string_view text) {
  std::vector<std::string> out;
  for (const Diagnostic& d : parse_policies(text).errors) out.push_back(d.to_text());
  return out;
}

std::string policy_error(std::string_view text) {
  auto errors = errors_of(text);
  INFO("policies: " << text);
  REQUIRE(errors.size() == 1);
  return errors.front();
}

Policy parse_one(std::string_view text) {
  ParseResult r = parse_policies(text);
  INFO("policies: " << text);
  for (const Diagnostic& d : r.errors) INFO(d.to_text());
  REQUIRE(r.ok());
  REQUIRE(r.policies.policies.size() == 1);
  return r.policies.policies.front();
}

// Structural equality of two trees, locations aside.
bool same_tree(const Expr& a, const Expr& b) {
  if (a.kind != b.kind || a.children.size() != b.children.size()) return false;
  switch (a.kind) {
    case Expr::Kind::kLiteral:
      if (!(a.literal == b.literal)) return false;
      break;
    case Expr::Kind::kVariable:
      if (a.variable != b.variable) return false;
      break;
    case Expr::Kind::kUnary:
      if (a.unary_op != b.unary_op) return false;
      break;
    case Expr::Kind::kBinary:
      if (a.binary_op != b.binary_op) return false;
      break;
    case Expr::Kind::kGetAttr:
    case Expr::Kind::kHasAttr:
      if (a.attr != b.attr) return false;
      break;
    case Expr::Kind::kLike:
      if (a.pattern != b.pattern) return false;
      break;
    case Expr::Kind::kIs:
      if (a.entity_type != b.entity_type) return false;
      break;
    case Expr::Kind::kRecord:
      if (a.keys != b.keys) return false;
      break;
    case Expr::Kind::kIf:
    case Expr::Kind::kSet:
      break;
  }
  for (std::size_t i = 0; i < a.children.size(); ++i) {
    if (!same_tree(*a.children[i], *b.children[i])) return false;
  }
  return true;
}

bool same_scope(const ScopeConstraint& a, const ScopeConstraint& b) {
  return a.op == b.op && a.entity == b.entity && a.entity_type == b.entity_type &&
         a.entities == b.entities;
}

bool same_policy(const Policy& a, const Policy& b) {
  if (a.id != b.id || a.effect != b.effect || a.annotations != b.annotations ||
      !same_scope(a.principal, b.principal) || !same_scope(a.action, b.action) ||
      !same_scope(a.resource, b.resource) || a.conditions.size() != b.conditions.size()) {
    return false;
  }
  for (std::size_t i = 0; i < a.conditions.size(); ++i) {
    if (a.conditions[i].is_when != b.conditions[i].is_when ||
        !same_tree(*a.conditions[i].expr, *b.conditions[i].expr)) {
      return false;
    }
  }
  return true;
}

const Expr& child(const ExprPtr& e, std::size_t i) {
  REQUIRE(e->children.size() > i);
  return *e->children[i];
}

const char* kConsentPolicies = R"(// Ward 7's consent rules.
@id("ward7-read")
@description("nurses on ward 7 read vitals of their ward's patients")
permit (
  principal in Hospital::Ward::"ward-7",
  action in [Action::"read", Action::"list"],
  resource is PatientData in Hospital::Ward::"ward-7"
)
when { principal.role == "nurse" && resource.kind like "vitals-*" }
unless { context has emergency && !context.emergency };

forbid (principal, action == Action::"export", resource)
unless { principal is Practitioner && principal.clearance >= 3 };

permit (principal == Practitioner::"dr-lee", action, resource);
)";

}  // namespace

TEST_CASE("a policy file gives its policies with scopes, conditions and annotations",
          "[rules][parser]") {
  ParseResult r = parse_policies(kConsentPolicies);
  for (const Diagnostic& d : r.errors) INFO(d.to_text());
  REQUIRE(r.ok());
  REQUIRE(r.policies.policies.size() == 3);

  const Policy& ward = r.policies.policies[0];
  CHECK(ward.id == "ward7-read");
  CHECK(ward.effect == Effect::kPermit);
  REQUIRE(ward.annotations.size() == 2);
  CHECK(ward.annotations[0] == std::pair<std::string, std::string>("id", "ward7-read"));
  CHECK(ward.annotations[1].first == "description");
  CHECK(ward.location.line == 2);
  CHECK(ward.location.column == 1);
  CHECK(ward.principal.op == ScopeConstraint::Op::kIn);
  CHECK(ward.principal.entity == EntityUid{"Hospital::Ward", "ward-7"});
  CHECK(ward.principal.location.line == 5);
  CHECK(ward.principal.location.column == 3);
  CHECK(ward.action.op == ScopeConstraint::Op::kInSet);
  CHECK(ward.action.entities == std::vector<EntityUid>{{"Action", "read"}, {"Action", "list"}});
  CHECK(ward.resource.op == ScopeConstraint::Op::kIsIn);
  CHECK(ward.resource.entity_type == "PatientData");
  CHECK(ward.resource.entity == EntityUid{"Hospital::Ward", "ward-7"});
  REQUIRE(ward.conditions.size() == 2);
  CHECK(ward.conditions[0].is_when);
  CHECK_FALSE(ward.conditions[1].is_when);
  CHECK(to_text(*ward.conditions[0].expr) ==
        "principal.role == \"nurse\" && resource.kind like \"vitals-*\"");
  CHECK(to_text(*ward.conditions[1].expr) == "context has emergency && !context.emergency");

  const Policy& forbid = r.policies.policies[1];
  CHECK(forbid.id == "policy1");  // by position, counting from 0
  CHECK(forbid.effect == Effect::kForbid);
  CHECK(forbid.annotations.empty());
  CHECK(forbid.principal.op == ScopeConstraint::Op::kAny);
  CHECK(forbid.action.op == ScopeConstraint::Op::kEq);
  CHECK(forbid.action.entity == EntityUid{"Action", "export"});
  CHECK(forbid.resource.op == ScopeConstraint::Op::kAny);
  CHECK(forbid.location.line == 12);

  const Policy& lee = r.policies.policies[2];
  CHECK(lee.id == "policy2");
  CHECK(lee.principal.op == ScopeConstraint::Op::kEq);
  CHECK(lee.principal.entity == EntityUid{"Practitioner", "dr-lee"});
  CHECK(lee.conditions.empty());
}

TEST_CASE("scope clauses: ==, in, is, is-in and the action's list", "[rules][parser]") {
  Policy p =
      parse_one(R"(permit(principal is User, action in Action::"all", resource == A::B::C::"x");)");
  CHECK(p.principal.op == ScopeConstraint::Op::kIs);
  CHECK(p.principal.entity_type == "User");
  CHECK(p.action.op == ScopeConstraint::Op::kIn);
  CHECK(p.action.entity == EntityUid{"Action", "all"});
  CHECK(p.resource.op == ScopeConstraint::Op::kEq);
  CHECK(p.resource.entity == EntityUid{"A::B::C", "x"});

  p = parse_one(
      R"(forbid(principal is Ns::User in Ns::Group::"g", action in [], resource is Doc);)");
  CHECK(p.principal.op == ScopeConstraint::Op::kIsIn);
  CHECK(p.principal.entity_type == "Ns::User");
  CHECK(p.principal.entity == EntityUid{"Ns::Group", "g"});
  CHECK(p.action.op == ScopeConstraint::Op::kInSet);
  CHECK(p.action.entities.empty());
  CHECK(p.resource.op == ScopeConstraint::Op::kIs);

  // Keywords that are not reserved work as names.
  p = parse_one(R"(permit(principal == permit::"when", action, resource in context::"x");)");
  CHECK(p.principal.entity == EntityUid{"permit", "when"});
  CHECK(p.resource.entity == EntityUid{"context", "x"});
}

TEST_CASE("policy ids: @id, else policyN by position, and duplicates are errors",
          "[rules][parser]") {
  ParseResult r = parse_policies(R"(
permit(principal, action, resource);
@id("b") permit(principal, action, resource);
@note("no id") @id("c") forbid(principal, action, resource);
permit(principal, action, resource);
)");
  REQUIRE(r.ok());
  REQUIRE(r.policies.policies.size() == 4);
  CHECK(r.policies.policies[0].id == "policy0");
  CHECK(r.policies.policies[1].id == "b");
  CHECK(r.policies.policies[2].id == "c");
  CHECK(r.policies.policies[2].annotations.size() == 2);
  CHECK(r.policies.policies[3].id == "policy3");

  // An annotation without a value has the empty value (as in Cedar 4).
  Policy p = parse_one("@reviewed permit(principal, action, resource);");
  REQUIRE(p.annotations.size() == 1);
  CHECK(p.annotations[0] == std::pair<std::string, std::string>("reviewed", ""));
  // Reserved words are fine as annotation names.
  CHECK(parse_one("@if(\"x\") permit(principal, action, resource);").annotations[0].first == "if");

  auto dup = parse_policies(R"(@id("x") permit(principal, action, resource);
@id("x") forbid(principal, action, resource);
@id("policy0") permit(principal, action, resource);)");
  REQUIRE(dup.errors.size() == 1);
  CHECK(dup.errors[0].to_text() == "2:1: duplicate policy id `x` (first used at line 1)");
  CHECK(dup.errors[0].policy_id == "x");

  // An @id may collide with a positional id.
  auto clash = parse_policies(R"(permit(principal, action, resource);
@id("policy0") permit(principal, action, resource);)");
  REQUIRE(clash.errors.size() == 1);
  CHECK(clash.errors[0].to_text() == "2:1: duplicate policy id `policy0` (first used at line 1)");

  CHECK(policy_error("@a(\"1\") @a(\"2\") permit(principal, action, resource);") ==
        "1:10: duplicate annotation `@a`");
  CHECK(policy_error("@(\"x\") permit(principal, action, resource);") ==
        "1:2: expected an annotation name after `@`, found `(`");
  CHECK(policy_error("@a(b) permit(principal, action, resource);") ==
        "1:4: expected a string annotation value, found `b`");
}

TEST_CASE("precedence: || below && below relations below + - below * below unary below member",
          "[rules][parser]") {
  CHECK(shape(ctx("a || b && c")) == ctx("a || b && c"));
  CHECK(shape(ctx("(a || b) && c")) == ctx("(a || b) && c"));
  CHECK(shape(ctx("1 + 2 * 3")) == ctx("1 + 2 * 3"));
  CHECK(shape(ctx("(1 + 2) * 3")) == ctx("(1 + 2) * 3"));
  CHECK(shape(ctx("1 - 2 - 3")) == ctx("1 - 2 - 3"));
  CHECK(shape(ctx("1 - (2 - 3)")) == ctx("1 - (2 - 3)"));
  CHECK(shape(ctx("1 + 2 < 3 * 4")) == ctx("1 + 2 < 3 * 4"));
  CHECK(shape(ctx("a == b || c != d && e")) == ctx("a == b || c != d && e"));
  CHECK(shape(ctx("((a))")) == ctx("a"));
  CHECK(shape(ctx("!a.b")) == ctx("!a.b"));
  CHECK(shape(ctx("(!a).b")) == ctx("(!a).b"));
  CHECK(shape(ctx("-a.b * 2")) == ctx("-a.b * 2"));
  CHECK(shape(ctx("a || b || c")) == ctx("a || b || c"));
  CHECK(shape(ctx("a || (b || c)")) == ctx("a || (b || c)"));
  CHECK(shape(ctx("if a then b else c || d")) == ctx("if a then b else c || d"));
  CHECK(shape(ctx("(if a then b else c) || d")) == ctx("(if a then b else c) || d"));
  CHECK(shape(ctx("if if a then b else c then 1 else 2")) ==
        ctx("if if a then b else c then 1 else 2"));

  // Shapes checked on the tree itself.
  ExprPtr e = parse_ok(ctx("a || b && c"));
  CHECK(e->binary_op == BinaryOp::kOr);
  CHECK(child(e, 1).binary_op == BinaryOp::kAnd);
  e = parse_ok(ctx("1 - 2 - 3"));
  CHECK(e->binary_op == BinaryOp::kSub);
  CHECK(child(e, 0).binary_op == BinaryOp::kSub);  // left-associative
  CHECK(child(e, 1).literal == Value(std::int64_t{3}));
  e = parse_ok(ctx("-x.y"));
  CHECK(e->kind == Expr::Kind::kUnary);
  CHECK(e->unary_op == UnaryOp::kNeg);
  CHECK(child(e, 0).kind == Expr::Kind::kGetAttr);
  e = parse_ok(ctx("!!x"));
  CHECK(e->unary_op == UnaryOp::kNot);
  CHECK(child(e, 0).unary_op == UnaryOp::kNot);
  CHECK(shape(ctx("!!!!x")) == ctx("!(!(!(!x)))"));

  // Relations do not chain.
  CHECK(expr_error(ctx("a == b == c")) ==
        "1:24: expected `&&`, `||` or the end of the expression, found `==` (a chain of "
        "comparisons needs parentheses)");
  CHECK(expr_error(ctx("1 < 2 < 3")).starts_with("1:7: expected `&&`"));
  CHECK(expr_error("context.x has a has b").starts_with("1:17: expected `&&`"));
  CHECK(shape(ctx("(a == b) == c")) == ctx("(a == b) == c"));
  CHECK(shape(ctx("a == (b == c)")) == ctx("a == (b == c)"));
  CHECK(expr_error(ctx("1 + if a then 1 else 2")) ==
        "1:5: an `if` inside an operator needs parentheses: `(if ... then ... else ...)`");
}

TEST_CASE("operators: every relation, has, like, is, is-in and the set methods",
          "[rules][parser]") {
  for (auto [text, op] : std::vector<std::pair<std::string, BinaryOp>>{
           {"context.a == context.b", BinaryOp::kEq},
           {"context.a != context.b", BinaryOp::kNe},
           {"context.a < context.b", BinaryOp::kLt},
           {"context.a <= context.b", BinaryOp::kLe},
           {"context.a > context.b", BinaryOp::kGt},
           {"context.a >= context.b", BinaryOp::kGe},
           {"principal in resource", BinaryOp::kIn},
           {"context.a + context.b", BinaryOp::kAdd},
           {"context.a - context.b", BinaryOp::kSub},
           {"context.a * context.b", BinaryOp::kMul},
           {"context.a && context.b", BinaryOp::kAnd},
           {"context.a || context.b", BinaryOp::kOr},
           {"context.a.contains(context.b)", BinaryOp::kContains},
           {"context.a.containsAll(context.b)", BinaryOp::kContainsAll},
           {"context.a.containsAny(context.b)", BinaryOp::kContainsAny}}) {
    INFO(text);
    ExprPtr e = parse_ok(text);
    CHECK(e->kind == Expr::Kind::kBinary);
    CHECK(e->binary_op == op);
    CHECK(to_text(*e) == text);
  }

  ExprPtr has = parse_ok("principal has name");
  CHECK(has->kind == Expr::Kind::kHasAttr);
  CHECK(has->attr == "name");
  CHECK(parse_ok("principal has \"full name\"")->attr == "full name");
  CHECK(parse_ok("principal has \"if\"")->attr == "if");
  CHECK(parse_ok("principal has principal")->attr == "principal");  // not reserved
  CHECK(expr_error("principal has if") ==
        "1:15: `if` is a reserved word; write it as a string: `has \"if\"`");
  CHECK(expr_error("principal has 3") == "1:15: expected an attribute name after `has`, found `3`");
  CHECK(expr_error("principal has a.b") ==
        "1:16: `has` with an attribute path is not supported in medgate's Cedar subset; write "
        "`x has a && x.a has b`");

  ExprPtr is = parse_ok("resource is Hospital::PatientData");
  CHECK(is->kind == Expr::Kind::kIs);
  CHECK(is->entity_type == "Hospital::PatientData");
  CHECK(expr_error("resource is PatientData::\"p\"") ==
        "1:24: `is` takes an entity type, not an entity uid (use `==`)");
  CHECK(expr_error("resource is \"T\"") ==
        "1:13: expected an entity type after `is`, found a string");

  // x is T in y == (x is T) && (x in y)
  ExprPtr is_in = parse_ok("principal is User in Group::\"g\"");
  REQUIRE(is_in->kind == Expr::Kind::kBinary);
  CHECK(is_in->binary_op == BinaryOp::kAnd);
  CHECK(child(is_in, 0).kind == Expr::Kind::kIs);
  CHECK(child(is_in, 0).entity_type == "User");
  CHECK(child(is_in, 1).binary_op == BinaryOp::kIn);
  CHECK(child(is_in, 1).children[0]->variable == Variable::kPrincipal);
  CHECK(child(is_in, 1).children[1]->literal == Value(EntityUid{"Group", "g"}));
  CHECK(to_text(*is_in) == "principal is User && principal in Group::\"g\"");
  CHECK(shape("principal is User in Group::\"g\" || false") ==
        "principal is User && principal in Group::\"g\" || false");

  CHECK(expr_error("[1].contains(1, 2)") == "1:5: `.contains` takes exactly one argument, not 2");
  CHECK(expr_error("[1].containsAny()") == "1:5: `.containsAny` takes exactly one argument, not 0");
  CHECK(shape("[1, 2].contains(1 + 1)") == "[1, 2].contains(1 + 1)");
  CHECK(shape("[1].contains(if true then 1 else 2)") == "[1].contains(if true then 1 else 2)");
}

TEST_CASE("like patterns: * is a wildcard, \\* a literal star", "[rules][parser]") {
  ExprPtr e = parse_ok(R"(context.file like "*.txt\*x*")");
  REQUIRE(e->kind == Expr::Kind::kLike);
  std::vector<PatternPart> want = {{true, ""}, {false, ".txt*x"}, {true, ""}};
  CHECK(e->pattern == want);
  CHECK(to_text(*e) == R"(context.file like "*.txt\*x*")");
  CHECK(parse_ok(R"("a" like "")")->pattern.empty());
  CHECK(parse_ok(R"("a" like "**")")->pattern.size() == 2);
  CHECK(parse_ok(R"("a" like "\n\u{e9}")")->pattern ==
        std::vector<PatternPart>{{false, "\n\xc3\xa9"}});
  CHECK(expr_error("\"a\" like 5") == "1:10: expected a pattern string after `like`, found `5`");
  CHECK(expr_error("\"a\" like context.p") ==
        "1:10: expected a pattern string after `like`, found `context`");
  CHECK(expr_error(R"("a" like "x\q")") == "1:12: invalid escape `\\q`");
}

TEST_CASE("literals: booleans, Longs, strings with every escape, entity uids", "[rules][parser]") {
  CHECK(parse_ok("true")->literal == Value(true));
  CHECK(parse_ok("false")->literal == Value(false));
  CHECK(parse_ok("0")->literal == Value(std::int64_t{0}));
  CHECK(parse_ok("9223372036854775807")->literal ==
        Value(std::numeric_limits<std::int64_t>::max()));

  CHECK(parse_ok(R"("a\nb\rc\td\\e\0f\'g\"h")")->literal ==
        Value(std::string("a\nb\rc\td\\e\0f'g\"h", 15)));
  CHECK(parse_ok(R"("\u{41}\u{e9}\u{1F600}\u{0}\x41\x7f")")->literal ==
        Value(std::string("A\xc3\xa9\xf0\x9f\x98\x80\0A\x7f", 10)));
  CHECK(parse_ok("\"caf\xc3\xa9 \xe2\x9c\x93\"")->literal ==
        Value(std::string("caf\xc3\xa9 \xe2\x9c\x93")));
  CHECK(parse_ok("\"multi\nline\"")->literal == Value(std::string("multi\nline")));
  CHECK(parse_ok("\"\"")->literal == Value(std::string()));

  CHECK(expr_error(R"("a\qb")") == "1:3: invalid escape `\\q`");
  CHECK(expr_error(R"("ab\*")") == "1:4: `\\*` is an escape only in a `like` pattern");
  CHECK(expr_error(R"("\x80")") == "1:2: `\\x` escapes only go up to `\\x7f`; use `\\u{...}`");
  CHECK(expr_error(R"("\x4")") == "1:2: `\\x` needs two hex digits");
  CHECK(expr_error(R"("\u41")") == "1:2: `\\u` needs braces: `\\u{hex digits}`");
  CHECK(expr_error(R"("\u{}")") == "1:2: `\\u{...}` needs 1 to 6 hex digits and a closing `}`");
  CHECK(expr_error(R"("\u{1234567}")") == "1:2: `\\u{...}` takes at most 6 hex digits");
  CHECK(expr_error(R"("\u{110000}")") == "1:2: `\\u{...}` is not a Unicode scalar value");
  CHECK(expr_error(R"("\u{D800}")") == "1:2: `\\u{...}` is not a Unicode scalar value");
  CHECK(expr_error("\"a\nb\\q\"") == "2:2: invalid escape `\\q`");      // located across lines
  CHECK(expr_error("\"\xc3\xa9\\q\"") == "1:3: invalid escape `\\q`");  // é is one column

  ExprPtr uid = parse_ok(R"(Hospital::Ward::"ward \"7\"")");
  CHECK(uid->literal == Value(EntityUid{"Hospital::Ward", "ward \"7\""}));
  CHECK(parse_ok(R"(User::"")")->literal == Value(EntityUid{"User", ""}));
  CHECK(parse_ok(R"(principal::"x")")->literal == Value(EntityUid{"principal", "x"}));
  CHECK(expr_error(R"(if::"x")") == "1:3: expected an expression, found `::`");
  CHECK(expr_error(R"(A::if::"x")") ==
        "1:4: `if` is a reserved word and cannot name an entity type");
  CHECK(expr_error(R"(__cedar::String::"x")") ==
        "1:1: `__cedar` names are not supported in medgate's Cedar subset");
  CHECK(expr_error(R"(A::B)") ==
        "1:5: expected `::` and a quoted id after the entity type, found "
        "end of input");
  CHECK(expr_error(R"(A::5)") == "1:4: expected a quoted entity id after `::`, found `5`");
  CHECK(expr_error(R"(A::{"id": "x"})") ==
        "1:4: entity uids written as records are not supported in medgate's Cedar subset");
  CHECK(expr_error("foo") ==
        "1:1: unknown variable `foo` (the variables are principal, action, resource and context)");
  CHECK(expr_error("then") == "1:1: expected an expression, found `then`");
}

TEST_CASE("Longs: negative literals fold, the minimum Long parses, overflow is an error",
          "[rules][parser]") {
  constexpr auto kMin = std::numeric_limits<std::int64_t>::min();
  ExprPtr min = parse_ok("-9223372036854775808");
  CHECK(min->kind == Expr::Kind::kLiteral);
  CHECK(min->literal == Value(kMin));
  CHECK(to_text(*min) == "-9223372036854775808");
  CHECK(parse_ok("- 5")->literal == Value(std::int64_t{-5}));
  CHECK(parse_ok("1 - -5")->children[1]->literal == Value(std::int64_t{-5}));

  // Only the innermost `-` joins the number; the others negate it (and overflow at evaluation).
  ExprPtr twice = parse_ok("--9223372036854775808");
  CHECK(twice->kind == Expr::Kind::kUnary);
  CHECK(child(twice, 0).literal == Value(kMin));
  CHECK(to_text(*twice) == "-(-9223372036854775808)");
  // `-(5)` and `-5.x` negate an expression, they are not literals.
  ExprPtr paren = parse_ok("-(5)");
  CHECK(paren->kind == Expr::Kind::kUnary);
  CHECK(child(paren, 0).literal == Value(std::int64_t{5}));
  CHECK(to_text(*paren) == "-(5)");
  ExprPtr member = parse_ok("-5.x");
  CHECK(member->kind == Expr::Kind::kUnary);
  CHECK(child(member, 0).kind == Expr::Kind::kGetAttr);
  CHECK(to_text(*parse_ok("(-5).x")) == "(-5).x");

  CHECK(expr_error("9223372036854775808") ==
        "1:1: integer literal `9223372036854775808` does not fit in a Long");
  CHECK(expr_error("-9223372036854775809") ==
        "1:2: integer literal `9223372036854775809` does not fit in a Long");
  CHECK(expr_error("-(9223372036854775808)") ==
        "1:3: integer literal `9223372036854775808` does not fit in a Long");
  CHECK(expr_error("1 + 99999999999999999999999999999999999999999999999999") ==
        "1:5: integer literal `9999999999999999999999999999999999999999...` does not fit in a "
        "Long");
}

TEST_CASE("unary operators: at most 4 in a row, ! and - not mixed", "[rules][parser]") {
  CHECK(parse_ok("!!!!true")->kind == Expr::Kind::kUnary);
  CHECK(parse_ok("----1")->kind == Expr::Kind::kUnary);
  CHECK(expr_error("!!!!!true") == "1:5: more than 4 `!` in a row");
  CHECK(expr_error("-----1") == "1:5: more than 4 `-` in a row");
  CHECK(expr_error("!-1") == "1:2: `!` followed by `-` needs parentheses, as in `!(-x)`");
  CHECK(expr_error("-!x") == "1:2: `-` followed by `!` needs parentheses, as in `-(!x)`");
  CHECK(shape("!(-1)") == "!(-1)");
  CHECK(shape("-(!context.x)") == "-(!context.x)");
  CHECK(shape("!(!(!(!(!true))))") == "!(!(!(!(!true))))");
}

TEST_CASE("member access: .attr, [\"attr\"], reserved words, methods", "[rules][parser]") {
  ExprPtr e = parse_ok(R"(principal.address["post code"].city)");
  CHECK(e->kind == Expr::Kind::kGetAttr);
  CHECK(e->attr == "city");
  CHECK(child(e, 0).attr == "post code");
  CHECK(to_text(*e) == R"(principal.address["post code"].city)");
  CHECK(parse_ok(R"(context["if"])")->attr == "if");
  CHECK(to_text(*parse_ok(R"(context["if"])")) == R"(context["if"])");
  CHECK(to_text(*parse_ok(R"(context["ok"])")) == "context.ok");
  CHECK(parse_ok("context.principal")->attr == "principal");
  CHECK(parse_ok("context.when")->attr == "when");
  CHECK(expr_error("context.if") ==
        "1:9: `if` is a reserved word and cannot follow `.`; write `[\"if\"]`");
  CHECK(expr_error("context.true") ==
        "1:9: `true` is a reserved word and cannot follow `.`; write `[\"true\"]`");
  CHECK(expr_error("context.3") ==
        "1:9: expected an attribute or method name after `.`, found `3`");
  CHECK(expr_error("context[3]") == "1:9: expected a string attribute name in `[...]`, found `3`");
  CHECK(expr_error("context[\"a\"") == "1:12: expected `]`, found end of input");
  CHECK(expr_error("context.tags.isEmpty()") ==
        "1:14: method `.isEmpty()` is not supported in medgate's Cedar subset (only .contains, "
        ".containsAll and .containsAny)");
  CHECK(expr_error("context.ts.lessThan(1)")
            .starts_with("1:12: method `.lessThan()` is not supported in medgate's Cedar subset"));
  CHECK(expr_error("context.tags.getTag(\"x\")").find("not supported in medgate's Cedar subset") !=
        std::string::npos);
}

TEST_CASE("sets and records", "[rules][parser]") {
  ExprPtr set = parse_ok("[1, \"a\", [true], {}]");
  CHECK(set->kind == Expr::Kind::kSet);
  CHECK(set->children.size() == 4);
  CHECK(parse_ok("[]")->children.empty());
  CHECK(parse_ok("[1, 2,]")->children.size() == 2);  // a trailing comma, as Cedar allows

  ExprPtr rec = parse_ok(R"({name: "x", "two words": 2, "if": 3, principal: principal,})");
  CHECK(rec->kind == Expr::Kind::kRecord);
  CHECK(rec->keys == std::vector<std::string>{"name", "two words", "if", "principal"});
  CHECK(to_text(*rec) == R"({"name": "x", "two words": 2, "if": 3, "principal": principal})");
  CHECK(parse_ok("{}")->children.empty());
  CHECK(shape(R"({a: {b: [1, {c: -1}]}}.a.b)") == R"({"a": {"b": [1, {"c": -1}]}}.a.b)");

  CHECK(expr_error("{a: 1, a: 2}") == "1:8: duplicate key `a` in a record");
  CHECK(expr_error(R"({a: 1, "a": 2})") == "1:8: duplicate key `a` in a record");
  CHECK(expr_error("{if: 1}") ==
        "1:2: `if` is a reserved word; write the key as a string: `\"if\"`");
  CHECK(expr_error("{1: 1}") ==
        "1:2: expected a record key (an identifier or a string) or `}`, found `1`");
  CHECK(expr_error("{a 1}") == "1:4: expected `:` after the record key, found `1`");
  CHECK(expr_error("{a: 1 b: 2}") == "1:7: expected `,` or `}`, found `b`");
  CHECK(expr_error("[1 2]") == "1:4: expected `,` or `]`, found `2`");
  CHECK(expr_error("[,]") == "1:2: expected an expression, found `,`");
}

TEST_CASE("features outside the subset are named as not supported, where they are",
          "[rules][parser]") {
  CHECK(policy_error("permit(principal == ?principal, action, resource);") ==
        "1:21: template slots like `?principal` are not supported in medgate's Cedar subset");
  CHECK(policy_error("permit(principal, action, resource in ?resource);") ==
        "1:39: template slots like `?resource` are not supported in medgate's Cedar subset");
  CHECK(expr_error("ip(\"10.0.0.1\")") ==
        "1:1: function `ip(...)` is not supported in medgate's Cedar subset (no extension types)");
  CHECK(expr_error("context.x < decimal(\"1.5\")") ==
        "1:13: function `decimal(...)` is not supported in medgate's Cedar subset (no extension "
        "types)");
  CHECK(expr_error("x::y(1)") ==
        "1:1: function `x::y(...)` is not supported in medgate's Cedar subset (no extension "
        "types)");
  CHECK(expr_error("4 / 2") ==
        "1:3: `/` is not an operator in Cedar (Long has only `+`, `-` and `*`)");
  CHECK(expr_error("4 % 2") ==
        "1:3: `%` is not an operator in Cedar (Long has only `+`, `-` and `*`)");
  CHECK(policy_error("permit(principal, action is Action, resource);") ==
        "1:26: `is` cannot appear in the action scope; move `action is ...` into a `when` "
        "condition");
  CHECK(policy_error("permit(principal in [User::\"a\"], action, resource);") ==
        "1:21: only the action scope can be `in` a list of entities");
  CHECK(policy_error("permit(principal is User == User::\"a\", action, resource);") ==
        "1:26: `is` cannot be used with `==` in the scope; use `is ... in ...`");
  CHECK(policy_error("permit(principal is User::\"a\", action, resource);") ==
        "1:25: `is` takes an entity type, not an entity uid (use `==` for one entity)");
}

TEST_CASE("syntax errors name what was expected and what was found, at line:column",
          "[rules][parser]") {
  CHECK(policy_error("permit(principal, action, resource)") ==
        "1:36: expected `when`, `unless` or `;`, found end of input");
  CHECK(policy_error("allow(principal, action, resource);") ==
        "1:1: expected `permit`, `forbid` or `@`, found `allow`");
  CHECK(policy_error("@id(\"x\") allow(principal, action, resource);") ==
        "1:10: expected `permit` or `forbid`, found `allow`");
  CHECK(policy_error("permit principal, action, resource);") ==
        "1:8: expected `(` after the effect, found `principal`");
  CHECK(policy_error("permit(action, principal, resource);") ==
        "1:8: expected `principal`, found `action`");
  CHECK(policy_error("permit(principal action, resource);") ==
        "1:18: expected `,` after the principal, found `action`");
  CHECK(policy_error("permit(principal, action, resource, context);") ==
        "1:35: expected `)` after the resource, found `,`");
  CHECK(policy_error("permit(principal = User::\"a\", action, resource);") ==
        "1:18: expected `,` after the principal, found `=` (Cedar compares with `==`)");
  CHECK(policy_error("permit(principal == User, action, resource);") ==
        "1:25: expected `::` and a quoted id after the entity type, found `,`");
  CHECK(policy_error("permit(principal == \"a\", action, resource);") ==
        "1:21: expected an entity uid such as `Type::\"id\"`, found a string");
  CHECK(policy_error("permit(principal, action in [Action::\"a\" Action::\"b\"], resource);") ==
        "1:42: expected `,` or `]`, found `Action`");
  CHECK(policy_error("permit(principal, action, resource) when { };") ==
        "1:44: expected an expression, found `}` (a condition cannot be empty)");
  CHECK(policy_error("permit(principal, action, resource) when true;") ==
        "1:42: expected `{`, found `true`");
  CHECK(policy_error("permit(principal, action, resource) when { a = 1 };") ==
        "1:44: unknown variable `a` (the variables are principal, action, resource and context)");
  CHECK(policy_error("permit(principal, action, resource) when { context.a = 1 };") ==
        "1:54: expected an operator, found `=` (Cedar compares with `==`)");
  CHECK(policy_error("permit(principal, action, resource) when { true } otherwise { true };") ==
        "1:51: expected `when`, `unless` or `;`, found `otherwise`");
  CHECK(policy_error("permit(principal, action, resource) when { (true };") ==
        "1:50: expected `)`, found `}`");
  CHECK(policy_error("permit(principal, action, resource) when { true ) };") ==
        "1:49: expected `}` after the condition, found `)`");
  CHECK(policy_error("permit(principal, action, resource) when { if true then 1 };") ==
        "1:59: expected `else`, found `}`");
  CHECK(policy_error("permit(principal, action, resource) when { context.a | true };") ==
        "1:54: unexpected character `|` (Cedar's or is `||`)");
  CHECK(policy_error("permit(principal, action, resource) when { context.a # 1 };") ==
        "1:54: unexpected character `#`");
}

TEST_CASE("lexical errors: unterminated strings, stray characters, invalid UTF-8",
          "[rules][parser]") {
  CHECK(policy_error("permit(principal == User::\"abc, action, resource);") ==
        "1:27: unterminated string: no closing `\"`");
  CHECK(policy_error("permit(principal, action, resource) when { \xc3\xa9 };") ==
        "1:44: unexpected character `\xc3\xa9`");
  CHECK(policy_error("permit(principal, action, resource) when { \xff };") ==
        "1:44: invalid UTF-8");
  CHECK(policy_error("permit(principal == User::\"a\xffz\", action, resource);") ==
        "1:27: invalid UTF-8 in a string");
  CHECK(policy_error("permit(principal, action, resource) when { \x01 };") ==
        "1:44: unexpected control character 0x01");
  CHECK(policy_error("permit(principal, action, resource) when { ? };") ==
        "1:44: unexpected character `?`");
  // Overlong and surrogate encodings are not UTF-8.
  CHECK(policy_error("permit(principal == User::\"\xc0\xaf\", action, resource);") ==
        "1:27: invalid UTF-8 in a string");
  CHECK(policy_error("permit(principal == User::\"\xed\xa0\x80\", action, resource);") ==
        "1:27: invalid UTF-8 in a string");
}

TEST_CASE("columns count characters, not bytes, and lines count from 1", "[rules][parser]") {
  // `é` (2 bytes), `✓` (3 bytes) and `😀` (4 bytes) are one column each.
  CHECK(policy_error("permit(principal == User::\"\xc3\xa9\xe2\x9c\x93\xf0\x9f\x98\x80\" action, "
                     "resource);") == "1:33: expected `,` after the principal, found `action`");
  CHECK(policy_error("// caf\xc3\xa9\n\n   permit(principal, action, resource) when { x };") ==
        "3:47: unknown variable `x` (the variables are principal, action, resource and "
        "context)");
  CHECK(policy_error("permit(principal, action, resource)\r\nwhen { x };") ==
        "2:8: unknown variable `x` (the variables are principal, action, resource and "
        "context)");
  // A tab is one column.
  CHECK(policy_error("\tpermit(principal, action, resource) when { x };") ==
        "1:45: unknown variable `x` (the variables are principal, action, resource and "
        "context)");
}

TEST_CASE(
    "after an error the parser resumes past the next semicolon and reports every broken policy",
    "[rules][parser]") {
  const char* text = R"(permit(principal, action, resource);
@id("broken-1")
permit(principal == , action, resource);
forbid(principal, action, resource) when { 1 + };
permit(principal, action, resource) when { context.a.isEmpty() };
@id("fine") forbid(principal, action, resource);
permit(principal, action, resource) when { "unterminated };
)";
  ParseResult r = parse_policies(text);
  REQUIRE(r.errors.size() == 4);
  CHECK(r.errors[0].to_text() == "3:21: expected an entity uid such as `Type::\"id\"`, found `,`");
  CHECK(r.errors[0].policy_id == "broken-1");
  CHECK(r.errors[1].to_text() == "4:48: expected an expression, found `}`");
  CHECK(r.errors[1].policy_id == "policy2");
  CHECK(r.errors[2].to_text() ==
        "5:54: method `.isEmpty()` is not supported in medgate's Cedar subset (only .contains, "
        ".containsAll and .containsAny)");
  CHECK(r.errors[2].policy_id == "policy3");
  CHECK(r.errors[3].to_text() == "7:44: unterminated string: no closing `\"`");
  CHECK(r.errors[3].policy_id == "policy5");
  // The good ones are still there, with their positional ids.
  REQUIRE(r.policies.policies.size() == 2);
  CHECK(r.policies.policies[0].id == "policy0");
  CHECK(r.policies.policies[1].id == "fine");

  // Stray semicolons and junk are errors too, not silently skipped.
  CHECK(errors_of(";") ==
        std::vector<std::string>{"1:1: expected `permit`, `forbid` or `@`, found `;`"});
  CHECK(errors_of("permit(principal, action, resource);;").size() == 1);
  CHECK(errors_of("").empty());
  CHECK(errors_of("// only a comment").empty());
  CHECK(errors_of("  \n\t ").empty());
  CHECK(errors_of("@id(\"x\")") ==
        std::vector<std::string>{"1:9: expected `permit` or `forbid`, found end of input"});
}

TEST_CASE("comments run to the end of the line, anywhere", "[rules][parser]") {
  Policy p = parse_one(R"(// leading
permit( // after (
  principal, // the principal
  action,
  resource // no comma
) // before a condition
when { context.a // inside an expression
  == "//not a comment" };  // trailing)");
  REQUIRE(p.conditions.size() == 1);
  CHECK(to_text(*p.conditions[0].expr) == R"(context.a == "//not a comment")");
}

TEST_CASE("nesting deeper than kMaxNesting is an error, never a crash", "[rules][parser]") {
  auto nested = [](int n, std::string_view open, std::string_view middle, std::string_view close) {
    std::string s;
    for (int i = 0; i < n; ++i) s += open;
    s += middle;
    for (int i = 0; i < n; ++i) s += close;
    return s;
  };
  const std::string too_deep = "expression nested too deeply (the limit is 200 levels)";

  // Within the limit.
  parse_ok(nested(150, "(", "1", ")"));
  parse_ok(nested(150, "[", "1", "]"));
  parse_ok(nested(150, "!(", "true", ")"));

  // Over it, in each way an expression nests, including very deep input.
  for (const std::string& text :
       {nested(201, "(", "1", ")"), nested(100000, "(", "1", ")"), nested(100000, "[", "", "]"),
        nested(100000, "{a: ", "1", "}"), nested(50000, "!(", "true", ")"),
        nested(50000, "if true then ", "1", " else 2"), nested(50000, "-(", "1", ")"),
        nested(50000, "[1].contains(", "1", ")")}) {
    ExprParseResult r = parse_expression(text);
    CHECK(r.expr == nullptr);
    REQUIRE(r.errors.size() == 1);
    CHECK(r.errors[0].message == too_deep);
  }

  // A long left-associative chain is deep without brackets; every later pass recurses on it.
  std::string chain = "1";
  for (int i = 0; i < 50000; ++i) chain += " + 1";
  ExprParseResult r = parse_expression(chain);
  CHECK(r.expr == nullptr);
  REQUIRE(r.errors.size() == 1);
  // At the 200th `+`, whose tree would be 201 levels deep.
  CHECK(r.errors[0].to_text() == "1:799: " + too_deep);
  std::string attrs = "context";
  for (int i = 0; i < 50000; ++i) attrs += ".a";
  CHECK(parse_expression(attrs).errors.size() == 1);

  // `x is T in y` uses x twice, so nested ones double the tree that printing and evaluation
  // walk: its expanded size is bounded as well.
  auto nested_is_in = [](int n) {
    std::string s = "principal";
    for (int i = 0; i < n; ++i) s = "(" + s + " is T in G::\"g\")";
    return s;
  };
  ExprPtr ten = parse_ok(nested_is_in(10));
  CHECK(to_text(*ten).size() > 20000);  // 2^10 copies of `principal`
  ExprParseResult huge = parse_expression(nested_is_in(40));
  CHECK(huge.expr == nullptr);
  REQUIRE(huge.errors.size() == 1);
  CHECK(huge.errors[0].message ==
        "expression too large: more than 1048576 nodes once each `is ... in` is expanded");

  // Inside a policy, the error is reported and the next policy still parses.
  ParseResult policies =
      parse_policies("permit(principal, action, resource) when { " +
                     nested(5000, "(", "true", ")") + " };\npermit(principal, action, resource);");
  REQUIRE(policies.errors.size() == 1);
  CHECK(policies.errors[0].message == too_deep);
  CHECK(policies.policies.policies.size() == 1);
}

TEST_CASE("to_text writes Cedar that parses back to the same policies", "[rules][printer]") {
  const std::vector<std::string> corpus = {
      kConsentPolicies,
      "permit(principal, action, resource);",
      R"(@id("a\"b\\c") @x("\u{1F600}\n") forbid(principal is A::B, action in [], resource);)",
      R"(permit(principal == User::"\0\t", action == Action::"read", resource in Folder::"f");)",
      R"(permit(principal, action, resource) when { true } unless { false } when { 1 == 1 };)",
      R"(permit(principal, action, resource) when {
           if context.a then context.b || !context.c else -context.d > -5 };)",
      R"(permit(principal, action, resource) when {
           (1 + 2) * (3 - 4) - -5 * --6 + -(7) == -9223372036854775808 };)",
      R"(permit(principal, action, resource) when {
           !(!(!context.x)) && (context.y || context.z) && (context.y && context.z) };)",
      R"(permit(principal, action, resource) when {
           context.s like "a*b\*c**" && context.s like "" && context["q x"] like "\u{e9}*" };)",
      R"(permit(principal, action, resource) when {
           principal is User in Group::"g" && resource is Doc && (principal is User) in [] };)",
      R"(permit(principal, action, resource) when {
           [1, [2, []], {a: {}, "b c": [true]}].contains({x: principal}) &&
           context.tags.containsAll([1]) && context.tags.containsAny(context.other) };)",
      R"(permit(principal, action, resource) when {
           context has "if" && context has ok && (context has a) == true &&
           principal.manager.manager == resource.owner && resource["owner"] in principal };)",
      R"(permit(principal, action, resource) when {
           (if true then 1 else 2) + 3 < 4 && [if true then 1 else 2] == [1] &&
           (-5).x == 1 && -5.x == 1 && (!true).x && (1 == 2).x && (context has a).b };)",
      R"(permit(principal, action, resource) when {
           (context.a == context.b) != (context.c < context.d) && ("a" like "*") == true &&
           (principal is A) == (resource is B) };)",
      R"(permit(principal, action, resource) when { 5.contains(-5) && -(-5) == 5 };)",
      R"(permit(principal, action, resource) when { context.a - (context.b - context.c) == 0 };)",
      R"(permit(principal, action, resource) when { context.a * (context.b * context.c) == 0 };)",
      R"(permit(principal, action, resource) when { if if true then false else true then
           (if true then 1 else 2) else if false then 3 else 4 };)",
  };
  for (const std::string& text : corpus) {
    INFO("policies:\n" << text);
    ParseResult first = parse_policies(text);
    for (const Diagnostic& d : first.errors) INFO(d.to_text());
    REQUIRE(first.ok());
    std::string printed = to_text(first.policies);
    INFO("printed:\n" << printed);
    ParseResult second = parse_policies(printed);
    for (const Diagnostic& d : second.errors) INFO(d.to_text());
    REQUIRE(second.ok());
    REQUIRE(second.policies.policies.size() == first.policies.policies.size());
    for (std::size_t i = 0; i < first.policies.policies.size(); ++i) {
      CHECK(same_policy(first.policies.policies[i], second.policies.policies[i]));
    }
    CHECK(to_text(second.policies) == printed);  // printing is a fixed point
  }
}

TEST_CASE("to_text's layout: annotations first, @id only when written, one clause a line",
          "[rules][printer]") {
  ParseResult r = parse_policies(R"(@note("n") @id("x") permit(principal in G::"g", action,
resource) when { context.a } unless { false };
forbid(principal, action, resource);)");
  REQUIRE(r.ok());
  CHECK(to_text(r.policies.policies[0]) == R"(@note("n")
@id("x")
permit (
  principal in G::"g",
  action,
  resource
)
when { context.a }
unless { false };)");
  CHECK(to_text(r.policies.policies[1]) == "forbid (\n  principal,\n  action,\n  resource\n);");
  CHECK(to_text(r.policies) ==
        to_text(r.policies.policies[0]) + "\n\n" + to_text(r.policies.policies[1]) + "\n");
  CHECK(to_text(PolicySet{}).empty());
}

TEST_CASE("to_text keeps hand-built trees' shapes too", "[rules][printer]") {
  auto lit = [](std::int64_t n) {
    auto e = std::make_shared<Expr>();
    e->kind = Expr::Kind::kLiteral;
    e->literal = Value(n);
    return ExprPtr(e);
  };
  auto neg = [](ExprPtr x) {
    auto e = std::make_shared<Expr>();
    e->kind = Expr::Kind::kUnary;
    e->unary_op = UnaryOp::kNeg;
    e->children = {std::move(x)};
    return ExprPtr(e);
  };
  auto getattr = [](ExprPtr x, std::string attr) {
    auto e = std::make_shared<Expr>();
    e->kind = Expr::Kind::kGetAttr;
    e->attr = std::move(attr);
    e->children = {std::move(x)};
    return ExprPtr(e);
  };
  for (const ExprPtr& e : {neg(lit(5)), neg(lit(-5)), neg(neg(lit(1))), getattr(lit(-1), "a b"),
                           getattr(lit(7), "then"), neg(getattr(lit(3), "x"))}) {
    std::string text = to_text(*e);
    INFO(text);
    ExprPtr back = parse_ok(text);
    CHECK(same_tree(*e, *back));
  }
  // A node missing its children prints without crashing.
  Expr broken;
  broken.kind = Expr::Kind::kBinary;
  CHECK(to_text(broken) == "<missing> == <missing>");
}

TEST_CASE("parse_entity_uid reads Type::\"id\" and names what is wrong", "[rules][parser]") {
  auto uid = parse_entity_uid(R"(Practitioner::"dr-lee")");
  REQUIRE(uid.ok());
  CHECK(*uid == EntityUid{"Practitioner", "dr-lee"});
  uid = parse_entity_uid(R"(  Hospital::Ward::"w \"7\"\u{e9}"  )");
  REQUIRE(uid.ok());
  CHECK(*uid == EntityUid{"Hospital::Ward", "w \"7\"\xc3\xa9"});

  auto bad = parse_entity_uid("Practitioner");
  REQUIRE_FALSE(bad.ok());
  CHECK(bad.status().code() == StatusCode::kInvalidArgument);
  CHECK(bad.status().message() ==
        "entity uid: 1:13: expected `::` and a quoted id after the entity type, found end of "
        "input");
  CHECK(parse_entity_uid("").status().message() ==
        "entity uid: 1:1: expected an entity uid such as `Type::\"id\"`, found end of input");
  CHECK(parse_entity_uid(R"(A::"x" B)").status().message() ==
        "entity uid: 1:8: expected the end of the entity uid, found `B`");
  CHECK(parse_entity_uid(R"(A::"x)").status().message() ==
        "entity uid: 1:4: unterminated string: no closing `\"`");
  CHECK(parse_entity_uid(R"(if::"x")").status().message() ==
        "entity uid: 1:1: `if` is a reserved word and cannot name an entity type");
  CHECK_FALSE(parse_entity_uid(R"(A::"\q")").ok());
}

TEST_CASE("diagnostics print as line:column: message", "[rules][parser]") {
  Diagnostic d{SourceLocation{3, 14, 40}, "expected `;`", "p"};
  CHECK(d.to_text() == "3:14: expected `;`");
  ExprParseResult r = parse_expression("1 +");
  REQUIRE(r.errors.size() == 1);
  CHECK(r.errors[0].location.offset == 3);
  CHECK(r.errors[0].policy_id.empty());
  CHECK(expr_error("1 2") == "1:3: expected an operator or the end of the expression, found `2`");
}
