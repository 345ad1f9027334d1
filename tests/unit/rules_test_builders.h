// Small builders for rule-engine syntax trees, policies and entities, so the evaluator and
// authorizer tests read like the Cedar they stand for without needing the parser:
//   bin(BinaryOp::kAnd, lit(true), attr(var(Variable::kContext), "purpose"))
// is `true && context.purpose`.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "ledger/rules/ast.h"
#include "ledger/rules/entities.h"
#include "ledger/rules/value.h"

namespace medgate::rules::testing {

inline EntityUid uid(std::string type, std::string id) {
  return EntityUid{std::move(type), std::move(id)};
}
inline Value entity(std::string type, std::string id) {
  return Value(uid(std::move(type), std::move(id)));
}
inline Value str(std::string s) {
  return Value(std::move(s));
}
inline Value num(std::int64_t n) {
  return Value(n);
}

inline std::shared_ptr<Expr> node(Expr::Kind kind) {
  auto e = std::make_shared<Expr>();
  e->kind = kind;
  return e;
}

inline ExprPtr lit(Value v) {
  auto e = node(Expr::Kind::kLiteral);
  e->literal = std::move(v);
  return e;
}
inline ExprPtr lit(bool b) {
  return lit(Value(b));
}
inline ExprPtr lit(std::int64_t n) {
  return lit(Value(n));
}
inline ExprPtr lit(int n) {
  return lit(Value(std::int64_t{n}));
}
inline ExprPtr lit(const char* s) {
  return lit(Value(std::string(s)));
}

inline ExprPtr var(Variable v) {
  auto e = node(Expr::Kind::kVariable);
  e->variable = v;
  return e;
}
inline ExprPtr principal() {
  return var(Variable::kPrincipal);
}
inline ExprPtr action() {
  return var(Variable::kAction);
}
inline ExprPtr resource() {
  return var(Variable::kResource);
}
inline ExprPtr context() {
  return var(Variable::kContext);
}

inline ExprPtr un(UnaryOp op, ExprPtr operand) {
  auto e = node(Expr::Kind::kUnary);
  e->unary_op = op;
  e->children = {std::move(operand)};
  return e;
}
inline ExprPtr not_(ExprPtr operand) {
  return un(UnaryOp::kNot, std::move(operand));
}
inline ExprPtr neg(ExprPtr operand) {
  return un(UnaryOp::kNeg, std::move(operand));
}

inline ExprPtr bin(BinaryOp op, ExprPtr left, ExprPtr right) {
  auto e = node(Expr::Kind::kBinary);
  e->binary_op = op;
  e->children = {std::move(left), std::move(right)};
  return e;
}
inline ExprPtr and_(ExprPtr l, ExprPtr r) {
  return bin(BinaryOp::kAnd, std::move(l), std::move(r));
}
inline ExprPtr or_(ExprPtr l, ExprPtr r) {
  return bin(BinaryOp::kOr, std::move(l), std::move(r));
}
inline ExprPtr eq(ExprPtr l, ExprPtr r) {
  return bin(BinaryOp::kEq, std::move(l), std::move(r));
}
inline ExprPtr in(ExprPtr l, ExprPtr r) {
  return bin(BinaryOp::kIn, std::move(l), std::move(r));
}

inline ExprPtr ite(ExprPtr test, ExprPtr then_branch, ExprPtr else_branch) {
  auto e = node(Expr::Kind::kIf);
  e->children = {std::move(test), std::move(then_branch), std::move(else_branch)};
  return e;
}

inline ExprPtr attr(ExprPtr of, std::string name) {
  auto e = node(Expr::Kind::kGetAttr);
  e->attr = std::move(name);
  e->children = {std::move(of)};
  return e;
}
inline ExprPtr has(ExprPtr of, std::string name) {
  auto e = node(Expr::Kind::kHasAttr);
  e->attr = std::move(name);
  e->children = {std::move(of)};
  return e;
}

// A `like` pattern from text where `*` is the wildcard (no escapes: build parts by hand for a
// literal star).
inline std::vector<PatternPart> pattern(std::string_view text) {
  std::vector<PatternPart> parts;
  std::string run;
  for (char c : text) {
    if (c == '*') {
      if (!run.empty()) parts.push_back(PatternPart{false, std::move(run)});
      run.clear();
      parts.push_back(PatternPart{true, ""});
    } else {
      run += c;
    }
  }
  if (!run.empty()) parts.push_back(PatternPart{false, std::move(run)});
  return parts;
}
inline ExprPtr like(ExprPtr of, std::string_view pattern_text) {
  auto e = node(Expr::Kind::kLike);
  e->pattern = pattern(pattern_text);
  e->children = {std::move(of)};
  return e;
}

inline ExprPtr is(ExprPtr of, std::string type) {
  auto e = node(Expr::Kind::kIs);
  e->entity_type = std::move(type);
  e->children = {std::move(of)};
  return e;
}

inline ExprPtr set(std::vector<ExprPtr> elements) {
  auto e = node(Expr::Kind::kSet);
  e->children = std::move(elements);
  return e;
}
inline ExprPtr rec(std::vector<std::pair<std::string, ExprPtr>> fields) {
  auto e = node(Expr::Kind::kRecord);
  for (auto& [key, value] : fields) {
    e->keys.push_back(key);
    e->children.push_back(std::move(value));
  }
  return e;
}

// A copy of `e` that claims to sit at line:column.
inline ExprPtr at(const ExprPtr& e, std::uint32_t line, std::uint32_t column) {
  auto copy = std::make_shared<Expr>(*e);
  copy->location = SourceLocation{line, column, 0};
  return copy;
}

// ---- policies ----------------------------------------------------------------------------------

inline ScopeConstraint any() {
  return ScopeConstraint{};
}
inline ScopeConstraint scope_eq(EntityUid e) {
  ScopeConstraint c;
  c.op = ScopeConstraint::Op::kEq;
  c.entity = std::move(e);
  return c;
}
inline ScopeConstraint scope_in(EntityUid e) {
  ScopeConstraint c;
  c.op = ScopeConstraint::Op::kIn;
  c.entity = std::move(e);
  return c;
}
inline ScopeConstraint scope_is(std::string type) {
  ScopeConstraint c;
  c.op = ScopeConstraint::Op::kIs;
  c.entity_type = std::move(type);
  return c;
}
inline ScopeConstraint scope_is_in(std::string type, EntityUid e) {
  ScopeConstraint c;
  c.op = ScopeConstraint::Op::kIsIn;
  c.entity_type = std::move(type);
  c.entity = std::move(e);
  return c;
}
inline ScopeConstraint scope_in_set(std::vector<EntityUid> es) {
  ScopeConstraint c;
  c.op = ScopeConstraint::Op::kInSet;
  c.entities = std::move(es);
  return c;
}

inline Condition when(ExprPtr e) {
  return Condition{true, std::move(e)};
}
inline Condition unless(ExprPtr e) {
  return Condition{false, std::move(e)};
}

inline Policy policy(std::string id, Effect effect, ScopeConstraint p = any(),
                     ScopeConstraint a = any(), ScopeConstraint r = any(),
                     std::vector<Condition> conditions = {}) {
  Policy out;
  out.id = std::move(id);
  out.effect = effect;
  out.principal = std::move(p);
  out.action = std::move(a);
  out.resource = std::move(r);
  out.conditions = std::move(conditions);
  return out;
}
inline Policy permit(std::string id, ScopeConstraint p = any(), ScopeConstraint a = any(),
                     ScopeConstraint r = any(), std::vector<Condition> conditions = {}) {
  return policy(std::move(id), Effect::kPermit, std::move(p), std::move(a), std::move(r),
                std::move(conditions));
}
inline Policy forbid(std::string id, ScopeConstraint p = any(), ScopeConstraint a = any(),
                     ScopeConstraint r = any(), std::vector<Condition> conditions = {}) {
  return policy(std::move(id), Effect::kForbid, std::move(p), std::move(a), std::move(r),
                std::move(conditions));
}

// ---- entities ----------------------------------------------------------------------------------

inline Entity make_entity(EntityUid id, ValueRecord attrs = {},
                          std::vector<EntityUid> parents = {}) {
  return Entity{std::move(id), std::move(attrs), std::move(parents)};
}

}  // namespace medgate::rules::testing
