// See validator.h. Without a schema the only types known are those of literals, of the variables
// (principal, action and resource are entities, context is a record) and of what operators
// return, so misuse is reported only where it is certain: a policy that passes may still meet a
// type error at evaluation (an attribute of the wrong kind), which the authorizer reports then.
#include "ledger/rules/validator.h"

#include <algorithm>
#include <optional>
#include <string>

#include "ledger/rules/lexical.h"

namespace medgate::rules {

namespace {

using Type = std::optional<ValueKind>;  // nullopt: not known without evaluating

// Methods are written with their dot in messages: `.contains`.
std::string method_prefix(BinaryOp op) {
  return op == BinaryOp::kContains || op == BinaryOp::kContainsAll || op == BinaryOp::kContainsAny
             ? "."
             : "";
}

std::string quoted(std::string_view s) {
  return "`" + std::string(s) + "`";
}

class Checker {
 public:
  Checker(const Schema& schema, ValidationResult& result) : schema_(schema), result_(result) {}

  void policy(const Policy& p) {
    policy_id_ = p.id;
    principal_type_ = scope_type(p.principal);
    resource_type_ = scope_type(p.resource);
    entity_scope(p.principal, "principal");
    action_scope(p.action);
    entity_scope(p.resource, "resource");
    for (const Condition& c : p.conditions) {
      if (!c.expr) {
        error(p.location, "a condition has no expression");
        continue;
      }
      check(*c.expr, 0);
      const Expr& e = *c.expr;
      if (e.kind == Expr::Kind::kLiteral && e.literal.is_bool() &&
          e.literal.as_bool() != c.is_when) {
        warning(e.location, std::string("this policy can never apply: its `") +
                                (c.is_when ? "when" : "unless") + "` condition is always " +
                                (c.is_when ? "false" : "true"));
      }
    }
  }

 private:
  void error(SourceLocation location, std::string message) {
    result_.errors.push_back(Diagnostic{location, std::move(message), policy_id_});
  }
  void warning(SourceLocation location, std::string message) {
    result_.warnings.push_back(Diagnostic{location, std::move(message), policy_id_});
  }

  bool checks_entity_types() const { return !schema_.entity_types.empty(); }
  bool checks_actions() const { return !schema_.actions.empty(); }

  // The entity type a scope clause fixes for its variable, or "".
  static std::string scope_type(const ScopeConstraint& s) {
    switch (s.op) {
      case ScopeConstraint::Op::kEq:
        return s.entity.type;
      case ScopeConstraint::Op::kIs:
      case ScopeConstraint::Op::kIsIn:
        return s.entity_type;
      case ScopeConstraint::Op::kAny:
      case ScopeConstraint::Op::kIn:
      case ScopeConstraint::Op::kInSet:
        return "";
    }
    return "";
  }

  void known_type(std::string_view type, SourceLocation location) {
    if (checks_entity_types() && !schema_.entity_types.contains(std::string(type))) {
      error(location, "unknown entity type " + quoted(type));
    }
  }

  void known_action(const EntityUid& uid, SourceLocation location) {
    if (checks_actions() && !schema_.actions.contains(uid)) {
      error(location, "unknown action " + uid.to_text());
    }
  }

  // An entity named anywhere: an action must be one the schema lists, any other entity's type
  // one it knows.
  void known_entity(const EntityUid& uid, SourceLocation location) {
    if (is_action_type(uid.type)) {
      known_action(uid, location);
    } else {
      known_type(uid.type, location);
    }
  }

  void entity_scope(const ScopeConstraint& s, std::string_view variable) {
    switch (s.op) {
      case ScopeConstraint::Op::kAny:
        return;
      case ScopeConstraint::Op::kEq:
      case ScopeConstraint::Op::kIn:
        known_entity(s.entity, s.location);
        return;
      case ScopeConstraint::Op::kIs:
        known_type(s.entity_type, s.location);
        return;
      case ScopeConstraint::Op::kIsIn:
        known_type(s.entity_type, s.location);
        known_entity(s.entity, s.location);
        return;
      case ScopeConstraint::Op::kInSet:
        error(s.location, "only the action scope can be `in` a list of entities, not the " +
                              std::string(variable));
        return;
    }
  }

  void action_entity(const EntityUid& uid, SourceLocation location) {
    if (!is_action_type(uid.type)) {
      error(location, "the action scope names " + uid.to_text() +
                          ", which is not an action (an entity of type `Action`)");
      return;
    }
    known_action(uid, location);
  }

  void action_scope(const ScopeConstraint& s) {
    switch (s.op) {
      case ScopeConstraint::Op::kAny:
        return;
      case ScopeConstraint::Op::kEq:
      case ScopeConstraint::Op::kIn:
        action_entity(s.entity, s.location);
        return;
      case ScopeConstraint::Op::kIs:
      case ScopeConstraint::Op::kIsIn:
        if (!is_action_type(s.entity_type)) {
          error(s.location, "`action is " + s.entity_type +
                                "` can never hold: actions are entities of type `Action`");
        }
        if (s.op == ScopeConstraint::Op::kIsIn) action_entity(s.entity, s.location);
        return;
      case ScopeConstraint::Op::kInSet:
        for (const EntityUid& uid : s.entities) action_entity(uid, s.location);
        return;
    }
  }

  // The operand must have type `want` when its type is known.
  void expect(const Expr* operand, Type type, ValueKind want, std::string_view what) {
    if (operand == nullptr || !type || *type == want) return;
    error(operand->location, std::string(what) + " expects " + std::string(kind_name(want)) +
                                 ", got " + std::string(kind_name(*type)));
  }

  void expect_either(const Expr* operand, Type type, ValueKind a, ValueKind b,
                     std::string_view what) {
    if (operand == nullptr || !type || *type == a || *type == b) return;
    error(operand->location, std::string(what) + " expects " + std::string(kind_name(a)) + " or " +
                                 std::string(kind_name(b)) + ", got " +
                                 std::string(kind_name(*type)));
  }

  // The entity type of an expression whose attributes the schema can check, or "".
  std::string entity_type_of(const Expr* e) const {
    if (e == nullptr) return "";
    if (e->kind == Expr::Kind::kLiteral && e->literal.is_entity())
      return e->literal.as_entity().type;
    if (e->kind == Expr::Kind::kVariable) {
      if (e->variable == Variable::kPrincipal) return principal_type_;
      if (e->variable == Variable::kResource) return resource_type_;
    }
    return "";
  }

  void known_attribute(const Expr& e, const Expr* target) {
    std::string type = entity_type_of(target);
    if (type.empty()) return;
    auto it = schema_.entity_types.find(type);
    if (it == schema_.entity_types.end() || it->second.contains(e.attr)) return;
    warning(e.location, "entity type " + quoted(type) + " has no attribute " + quoted(e.attr) +
                            " in the schema" +
                            (e.kind == Expr::Kind::kHasAttr ? " (so `has` is always false)" : ""));
  }

  Type check_child(const Expr& e, std::size_t i, int depth) {
    if (i >= e.children.size() || !e.children[i]) {
      error(e.location, "malformed expression: a missing operand");
      return std::nullopt;
    }
    return check(*e.children[i], depth + 1);
  }

  static const Expr* child(const Expr& e, std::size_t i) {
    return i < e.children.size() ? e.children[i].get() : nullptr;
  }

  // Reports misuse below e and returns e's type when it is known.
  Type check(const Expr& e, int depth) {
    if (depth > kMaxNesting) {
      error(e.location, "expression nested too deeply (the limit is " +
                            std::to_string(kMaxNesting) + " levels)");
      return std::nullopt;
    }
    switch (e.kind) {
      case Expr::Kind::kLiteral:
        if (e.literal.is_entity()) known_entity(e.literal.as_entity(), e.location);
        return e.literal.kind();
      case Expr::Kind::kVariable:
        return e.variable == Variable::kContext ? ValueKind::kRecord : ValueKind::kEntity;
      case Expr::Kind::kUnary: {
        Type t = check_child(e, 0, depth);
        if (e.unary_op == UnaryOp::kNot) {
          expect(child(e, 0), t, ValueKind::kBool, "`!`");
          return ValueKind::kBool;
        }
        expect(child(e, 0), t, ValueKind::kLong, "`-`");
        return ValueKind::kLong;
      }
      case Expr::Kind::kBinary:
        return check_binary(e, depth);
      case Expr::Kind::kIf: {
        Type condition = check_child(e, 0, depth);
        expect(child(e, 0), condition, ValueKind::kBool, "`if`");
        Type a = check_child(e, 1, depth);
        Type b = check_child(e, 2, depth);
        return a == b ? a : std::nullopt;
      }
      case Expr::Kind::kGetAttr:
      case Expr::Kind::kHasAttr: {
        Type t = check_child(e, 0, depth);
        expect_either(child(e, 0), t, ValueKind::kEntity, ValueKind::kRecord,
                      e.kind == Expr::Kind::kHasAttr ? "`has`" : "attribute access");
        known_attribute(e, child(e, 0));
        if (e.kind == Expr::Kind::kHasAttr) return ValueKind::kBool;
        return std::nullopt;
      }
      case Expr::Kind::kLike: {
        Type t = check_child(e, 0, depth);
        expect(child(e, 0), t, ValueKind::kString, "`like`");
        return ValueKind::kBool;
      }
      case Expr::Kind::kIs: {
        Type t = check_child(e, 0, depth);
        expect(child(e, 0), t, ValueKind::kEntity, "`is`");
        known_type(e.entity_type, e.location);
        return ValueKind::kBool;
      }
      case Expr::Kind::kSet:
        for (std::size_t i = 0; i < e.children.size(); ++i) check_child(e, i, depth);
        return ValueKind::kSet;
      case Expr::Kind::kRecord:
        for (std::size_t i = 0; i < e.children.size(); ++i) check_child(e, i, depth);
        return ValueKind::kRecord;
    }
    return std::nullopt;
  }

  Type check_binary(const Expr& e, int depth) {
    Type a = check_child(e, 0, depth);
    Type b = check_child(e, 1, depth);
    const Expr* lhs = child(e, 0);
    const Expr* rhs = child(e, 1);
    const std::string what =
        "`" + method_prefix(e.binary_op) + std::string(operator_text(e.binary_op)) + "`";
    switch (e.binary_op) {
      case BinaryOp::kEq:
      case BinaryOp::kNe:
        return ValueKind::kBool;
      case BinaryOp::kLt:
      case BinaryOp::kLe:
      case BinaryOp::kGt:
      case BinaryOp::kGe:
        expect(lhs, a, ValueKind::kLong, what);
        expect(rhs, b, ValueKind::kLong, what);
        return ValueKind::kBool;
      case BinaryOp::kAdd:
      case BinaryOp::kSub:
      case BinaryOp::kMul:
        expect(lhs, a, ValueKind::kLong, what);
        expect(rhs, b, ValueKind::kLong, what);
        return ValueKind::kLong;
      case BinaryOp::kIn:
        expect(lhs, a, ValueKind::kEntity, what);
        expect_either(rhs, b, ValueKind::kEntity, ValueKind::kSet, what);
        return ValueKind::kBool;
      case BinaryOp::kAnd:
      case BinaryOp::kOr:
        expect(lhs, a, ValueKind::kBool, what);
        expect(rhs, b, ValueKind::kBool, what);
        return ValueKind::kBool;
      case BinaryOp::kContains:
        expect(lhs, a, ValueKind::kSet, what);
        return ValueKind::kBool;
      case BinaryOp::kContainsAll:
      case BinaryOp::kContainsAny:
        expect(lhs, a, ValueKind::kSet, what);
        expect(rhs, b, ValueKind::kSet, what);
        return ValueKind::kBool;
    }
    return std::nullopt;
  }

  const Schema& schema_;
  ValidationResult& result_;
  std::string policy_id_;
  std::string principal_type_;
  std::string resource_type_;
};

}  // namespace

ValidationResult validate(const PolicySet& policies, const Schema& schema) {
  ValidationResult result;
  std::map<std::string, SourceLocation> ids;
  Checker checker(schema, result);
  for (const Policy& p : policies.policies) {
    auto [it, inserted] = ids.emplace(p.id, p.location);
    if (!inserted) {
      result.errors.push_back(Diagnostic{p.location,
                                         "duplicate policy id " + quoted(p.id) +
                                             " (first used at line " +
                                             std::to_string(it->second.line) + ")",
                                         p.id});
    }
    checker.policy(p);
  }
  return result;
}

}  // namespace medgate::rules
