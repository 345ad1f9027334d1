// CONSENSUS-CRITICAL (rule semantics): the syntax tree of medgate's Cedar subset.
//
// The subset (issue 5; Cedar's grammar, https://docs.cedarpolicy.com/policies/syntax-grammar.html):
//   policy    := annotation* ('permit' | 'forbid') '(' scope ')' condition* ';'
//   scope     := principal [('==' | 'in') entity | 'is' Type ['in' entity]] ','
//                action [('==' entity | 'in' entity | 'in' '[' entity, ... ']')] ','
//                resource [like principal]
//   condition := ('when' | 'unless') '{' expr '}'
//   expr      := if/then/else, || && ! (short-circuit), == != < <= > >= in, + - *, unary - and !,
//                member access (.attr, ["attr"]), has, like, is [in], .contains(x)
//                .containsAll(x) .containsAny(x), literals (bool, long, string, entity), sets
//                [...], records {...}, the variables principal, action, resource, context.
// Not in the subset (the parser names them as unsupported): templates (?principal), extension
// types and functions (ip, decimal, datetime), other methods, namespaces' `__cedar` forms.
//
// One fat node type keeps the tree easy to build in tests and to walk without virtual dispatch.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "ledger/rules/value.h"

namespace medgate::rules {

// 1-based line and column of a token, and its byte offset in the policy text.
struct SourceLocation {
  std::uint32_t line = 0;
  std::uint32_t column = 0;
  std::uint32_t offset = 0;
};

enum class Variable { kPrincipal, kAction, kResource, kContext };

enum class UnaryOp { kNot, kNeg };

enum class BinaryOp {
  kEq,
  kNe,
  kLt,
  kLe,
  kGt,
  kGe,  // == != < <= > >=
  kAdd,
  kSub,
  kMul,  // + - * on Long, overflow is an error
  kIn,   // entity in entity | entity in set of entities
  kAnd,
  kOr,  // short-circuit
  kContains,
  kContainsAll,
  kContainsAny,  // set methods: left.contains(right)
};

// A `like` pattern: literal runs and wildcards, in order. `*` matches any run of characters
// (including none); `\*` in the source is a literal star.
struct PatternPart {
  bool wildcard = false;
  std::string text;  // when !wildcard
  friend bool operator==(const PatternPart&, const PatternPart&) = default;
};

struct Expr;
using ExprPtr = std::shared_ptr<const Expr>;

struct Expr {
  enum class Kind {
    kLiteral,   // literal
    kVariable,  // variable
    kUnary,     // unary_op children[0]
    kBinary,    // children[0] binary_op children[1]
    kIf,        // if children[0] then children[1] else children[2]
    kGetAttr,   // children[0].attr  (or children[0]["attr"])
    kHasAttr,   // children[0] has attr
    kLike,      // children[0] like pattern
    kIs,        // children[0] is entity_type  (`x is T in y` is parsed as (x is T) && (x in y))
    kSet,       // [children...]
    kRecord,    // {keys[i]: children[i]}
  };
  Kind kind = Kind::kLiteral;
  SourceLocation location;
  Value literal;
  Variable variable = Variable::kPrincipal;
  UnaryOp unary_op = UnaryOp::kNot;
  BinaryOp binary_op = BinaryOp::kEq;
  std::string attr;                  // kGetAttr, kHasAttr
  std::string entity_type;           // kIs
  std::vector<PatternPart> pattern;  // kLike
  std::vector<std::string> keys;     // kRecord, parallel to children
  std::vector<ExprPtr> children;
};

// One of the three scope clauses.
struct ScopeConstraint {
  enum class Op {
    kAny,    // principal
    kEq,     // principal == E
    kIn,     // principal in E
    kIs,     // principal is T
    kIsIn,   // principal is T in E
    kInSet,  // action in [E, ...]   (action only)
  };
  Op op = Op::kAny;
  EntityUid entity;                 // kEq, kIn, kIsIn
  std::string entity_type;          // kIs, kIsIn
  std::vector<EntityUid> entities;  // kInSet
  SourceLocation location;
};

enum class Effect { kPermit, kForbid };

struct Condition {
  bool is_when = true;  // when { } or unless { }
  ExprPtr expr;
};

// The operator as Cedar writes it: "==", "+", "in", "&&", "contains" (a method, without its dot).
std::string_view operator_text(BinaryOp op);

struct Policy {
  // The policy's id: its @id annotation when it has one, else "policyN" for the N-th policy
  // (0-based) in its file, as Cedar names policies parsed from text.
  std::string id;
  Effect effect = Effect::kPermit;
  std::vector<std::pair<std::string, std::string>> annotations;  // in source order
  ScopeConstraint principal, action, resource;
  std::vector<Condition> conditions;
  SourceLocation location;  // of the effect keyword (or the first annotation)
};

struct PolicySet {
  std::vector<Policy> policies;  // file order
};

}  // namespace medgate::rules
