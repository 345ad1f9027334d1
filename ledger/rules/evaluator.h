// CONSENSUS-CRITICAL (rule semantics): evaluates an expression for one request, as Cedar does.
//
// Errors are values of the result, not failures of the call: a type error (`1 + "a"`, `if 3`),
// an overflow, a missing attribute or an unknown entity's attribute make the policy that contains
// the expression error, and the authorizer skips it. Short-circuit: `false && e`, `true || e` and
// the untaken branch of `if` never evaluate e (so its errors do not count). The evaluator never
// crashes on any tree the parser can produce, and bounds its recursion by the tree's depth.
#pragma once

#include <string>
#include <variant>

#include "ledger/rules/ast.h"
#include "ledger/rules/entities.h"
#include "ledger/rules/value.h"

namespace medgate::rules {

struct Request {
  EntityUid principal;
  EntityUid action;
  EntityUid resource;
  Value context = Value::record({});  // a record
};

struct EvalError {
  std::string message;  // "type error: expected long, got string", "attribute `x` not found"
  SourceLocation location;
};

using EvalResult = std::variant<Value, EvalError>;

EvalResult evaluate(const Expr& expr, const Request& request, const Entities& entities);

// Cedar's `like`: `*` matches any run of characters (by Unicode scalar value), others literally.
bool matches_pattern(std::string_view text, const std::vector<PatternPart>& pattern);

}  // namespace medgate::rules
