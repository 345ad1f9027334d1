// CONSENSUS-CRITICAL (rule semantics): Cedar text for a tree, so that parsing the text gives the
// same tree (see parser.h). Parentheses are written exactly where the grammar needs them to keep
// the tree's shape: a child binding more loosely than its place allows, the right operand of a
// left-associative operator at the same level, any relation under a relation (relations do not
// chain), and an integer literal under `-` (which the parser would fold into the literal).
#include <string>

#include "ledger/rules/lexical.h"
#include "ledger/rules/parser.h"

namespace medgate::rules {

std::string_view operator_text(BinaryOp op) {
  switch (op) {
    case BinaryOp::kEq:
      return "==";
    case BinaryOp::kNe:
      return "!=";
    case BinaryOp::kLt:
      return "<";
    case BinaryOp::kLe:
      return "<=";
    case BinaryOp::kGt:
      return ">";
    case BinaryOp::kGe:
      return ">=";
    case BinaryOp::kAdd:
      return "+";
    case BinaryOp::kSub:
      return "-";
    case BinaryOp::kMul:
      return "*";
    case BinaryOp::kIn:
      return "in";
    case BinaryOp::kAnd:
      return "&&";
    case BinaryOp::kOr:
      return "||";
    case BinaryOp::kContains:
      return "contains";
    case BinaryOp::kContainsAll:
      return "containsAll";
    case BinaryOp::kContainsAny:
      return "containsAny";
  }
  return "?";
}

namespace {

// Cedar's precedence levels, loosest first.
enum Level : int {
  kIfLevel,
  kOrLevel,
  kAndLevel,
  kRelationLevel,
  kAddLevel,
  kMulLevel,
  kUnaryLevel,
  kMemberLevel
};

bool is_long_literal(const Expr& e) {
  return e.kind == Expr::Kind::kLiteral && e.literal.is_long();
}

int level(const Expr& e) {
  switch (e.kind) {
    case Expr::Kind::kLiteral:
      // A negative number is written with its `-`, which binds like a unary operator.
      return is_long_literal(e) && e.literal.as_long() < 0 ? kUnaryLevel : kMemberLevel;
    case Expr::Kind::kVariable:
    case Expr::Kind::kGetAttr:
    case Expr::Kind::kSet:
    case Expr::Kind::kRecord:
      return kMemberLevel;
    case Expr::Kind::kUnary:
      return kUnaryLevel;
    case Expr::Kind::kBinary:
      switch (e.binary_op) {
        case BinaryOp::kEq:
        case BinaryOp::kNe:
        case BinaryOp::kLt:
        case BinaryOp::kLe:
        case BinaryOp::kGt:
        case BinaryOp::kGe:
        case BinaryOp::kIn:
          return kRelationLevel;
        case BinaryOp::kAdd:
        case BinaryOp::kSub:
          return kAddLevel;
        case BinaryOp::kMul:
          return kMulLevel;
        case BinaryOp::kAnd:
          return kAndLevel;
        case BinaryOp::kOr:
          return kOrLevel;
        case BinaryOp::kContains:
        case BinaryOp::kContainsAll:
        case BinaryOp::kContainsAny:
          return kMemberLevel;
      }
      return kMemberLevel;
    case Expr::Kind::kIf:
      return kIfLevel;
    case Expr::Kind::kHasAttr:
    case Expr::Kind::kLike:
    case Expr::Kind::kIs:
      return kRelationLevel;
  }
  return kMemberLevel;
}

std::string_view variable_text(Variable v) {
  switch (v) {
    case Variable::kPrincipal:
      return "principal";
    case Variable::kAction:
      return "action";
    case Variable::kResource:
      return "resource";
    case Variable::kContext:
      return "context";
  }
  return "?";
}

// An attribute name as a bare identifier where Cedar allows one, else as a string.
bool bare_attribute(std::string_view attr) {
  return is_identifier(attr) && !is_reserved_word(attr);
}

std::string pattern_text(const std::vector<PatternPart>& pattern) {
  std::string out = "\"";
  for (const PatternPart& part : pattern) {
    if (part.wildcard) {
      out += '*';
      continue;
    }
    // quote_string never writes a `*` of its own, so every star here is a literal one.
    std::string quoted = quote_string(part.text);
    for (std::size_t i = 1; i + 1 < quoted.size(); ++i) {
      if (quoted[i] == '*') out += '\\';
      out += quoted[i];
    }
  }
  return out + "\"";
}

class Printer {
 public:
  std::string take() { return std::move(out_); }

  // Writes e, in parentheses when it binds more loosely than `min_level`.
  void expr(const Expr* e, int min_level) {
    if (e == nullptr) {
      out_ += "<missing>";  // only a hand-built tree can lack a child
      return;
    }
    bool parens = level(*e) < min_level;
    if (parens) out_ += '(';
    bare(*e);
    if (parens) out_ += ')';
  }

 private:
  static const Expr* child(const Expr& e, std::size_t i) {
    return i < e.children.size() ? e.children[i].get() : nullptr;
  }

  void bare(const Expr& e) {
    switch (e.kind) {
      case Expr::Kind::kLiteral:
        out_ += e.literal.to_text();
        return;
      case Expr::Kind::kVariable:
        out_ += variable_text(e.variable);
        return;
      case Expr::Kind::kUnary: {
        const Expr* operand = child(e, 0);
        out_ += e.unary_op == UnaryOp::kNot ? "!" : "-";
        if (e.unary_op == UnaryOp::kNeg && operand != nullptr && is_long_literal(*operand)) {
          // `-5` would read back as the literal -5, not as the negation of 5.
          out_ += '(';
          expr(operand, kIfLevel);
          out_ += ')';
        } else {
          expr(operand, kMemberLevel);
        }
        return;
      }
      case Expr::Kind::kBinary:
        binary(e);
        return;
      case Expr::Kind::kIf:
        out_ += "if ";
        expr(child(e, 0), kIfLevel);
        out_ += " then ";
        expr(child(e, 1), kIfLevel);
        out_ += " else ";
        expr(child(e, 2), kIfLevel);
        return;
      case Expr::Kind::kGetAttr:
        expr(child(e, 0), kMemberLevel);
        if (bare_attribute(e.attr)) {
          out_ += '.';
          out_ += e.attr;
        } else {
          out_ += '[';
          out_ += quote_string(e.attr);
          out_ += ']';
        }
        return;
      case Expr::Kind::kHasAttr:
        expr(child(e, 0), kAddLevel);
        out_ += " has ";
        out_ += bare_attribute(e.attr) ? e.attr : quote_string(e.attr);
        return;
      case Expr::Kind::kLike:
        expr(child(e, 0), kAddLevel);
        out_ += " like ";
        out_ += pattern_text(e.pattern);
        return;
      case Expr::Kind::kIs:
        expr(child(e, 0), kAddLevel);
        out_ += " is ";
        out_ += e.entity_type;
        return;
      case Expr::Kind::kSet:
        out_ += '[';
        for (std::size_t i = 0; i < e.children.size(); ++i) {
          if (i > 0) out_ += ", ";
          expr(e.children[i].get(), kIfLevel);
        }
        out_ += ']';
        return;
      case Expr::Kind::kRecord:
        out_ += '{';
        for (std::size_t i = 0; i < e.children.size(); ++i) {
          if (i > 0) out_ += ", ";
          out_ += quote_string(i < e.keys.size() ? e.keys[i] : std::string());
          out_ += ": ";
          expr(e.children[i].get(), kIfLevel);
        }
        out_ += '}';
        return;
    }
  }

  void binary(const Expr& e) {
    const Expr* lhs = child(e, 0);
    const Expr* rhs = child(e, 1);
    int left = kMemberLevel;
    int right = kMemberLevel;
    switch (e.binary_op) {
      case BinaryOp::kContains:
      case BinaryOp::kContainsAll:
      case BinaryOp::kContainsAny:
        expr(lhs, kMemberLevel);
        out_ += '.';
        out_ += operator_text(e.binary_op);
        out_ += '(';
        expr(rhs, kIfLevel);
        out_ += ')';
        return;
      case BinaryOp::kOr:
        left = kOrLevel;
        right = kAndLevel;
        break;
      case BinaryOp::kAnd:
        left = kAndLevel;
        right = kRelationLevel;
        break;
      case BinaryOp::kEq:
      case BinaryOp::kNe:
      case BinaryOp::kLt:
      case BinaryOp::kLe:
      case BinaryOp::kGt:
      case BinaryOp::kGe:
      case BinaryOp::kIn:
        left = kAddLevel;
        right = kAddLevel;
        break;
      case BinaryOp::kAdd:
      case BinaryOp::kSub:
        left = kAddLevel;
        right = kMulLevel;
        break;
      case BinaryOp::kMul:
        left = kMulLevel;
        right = kUnaryLevel;
        break;
    }
    expr(lhs, left);
    out_ += ' ';
    out_ += operator_text(e.binary_op);
    out_ += ' ';
    expr(rhs, right);
  }

  std::string out_;
};

std::string scope_text(std::string_view variable, const ScopeConstraint& scope) {
  std::string out(variable);
  switch (scope.op) {
    case ScopeConstraint::Op::kAny:
      break;
    case ScopeConstraint::Op::kEq:
      out += " == " + scope.entity.to_text();
      break;
    case ScopeConstraint::Op::kIn:
      out += " in " + scope.entity.to_text();
      break;
    case ScopeConstraint::Op::kIs:
      out += " is " + scope.entity_type;
      break;
    case ScopeConstraint::Op::kIsIn:
      out += " is " + scope.entity_type + " in " + scope.entity.to_text();
      break;
    case ScopeConstraint::Op::kInSet: {
      out += " in [";
      for (std::size_t i = 0; i < scope.entities.size(); ++i) {
        if (i > 0) out += ", ";
        out += scope.entities[i].to_text();
      }
      out += ']';
      break;
    }
  }
  return out;
}

}  // namespace

std::string to_text(const Expr& expr) {
  Printer printer;
  printer.expr(&expr, kIfLevel);
  return printer.take();
}

std::string to_text(const Policy& policy) {
  std::string out;
  for (const auto& [key, value] : policy.annotations) {
    out += '@' + key + '(' + quote_string(value) + ")\n";
  }
  out += policy.effect == Effect::kPermit ? "permit" : "forbid";
  out += " (\n  " + scope_text("principal", policy.principal) + ",\n  " +
         scope_text("action", policy.action) + ",\n  " + scope_text("resource", policy.resource) +
         "\n)";
  for (const Condition& condition : policy.conditions) {
    out += condition.is_when ? "\nwhen { " : "\nunless { ";
    out += condition.expr ? to_text(*condition.expr) : "<missing>";
    out += " }";
  }
  out += ';';
  return out;
}

std::string to_text(const PolicySet& policies) {
  std::string out;
  for (const Policy& policy : policies.policies) {
    if (!out.empty()) out += "\n\n";
    out += to_text(policy);
  }
  if (!out.empty()) out += '\n';
  return out;
}

}  // namespace medgate::rules
