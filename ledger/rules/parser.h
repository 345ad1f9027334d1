// CONSENSUS-CRITICAL (rule semantics): Cedar-subset policy text -> PolicySet, and back to text.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "hsm/status.h"
#include "ledger/rules/ast.h"

namespace medgate::rules {

// A located problem in policy text. `message` names what was expected or what is not supported;
// it never quotes more than the offending token.
struct Diagnostic {
  SourceLocation location;
  std::string message;
  std::string policy_id;  // when the problem is inside a policy whose id is known; else empty
  // "line:column: message"
  std::string to_text() const;
};

struct ParseResult {
  PolicySet policies;                  // valid only when errors is empty
  std::vector<Diagnostic> errors;      // every error found (the parser recovers at the next ';')
  bool ok() const { return errors.empty(); }
};

// Parses a file of policies. Never crashes and never recurses without bound: input nested deeper
// than kMaxNesting is an error. Policies get their ids here (the @id annotation, else "policyN");
// a duplicate id is an error.
inline constexpr int kMaxNesting = 200;
ParseResult parse_policies(std::string_view text);

// Parses one expression (for tests and the fuzz target); errors as above.
struct ExprParseResult {
  ExprPtr expr;
  std::vector<Diagnostic> errors;
};
ExprParseResult parse_expression(std::string_view text);

// Parses `Type::"id"` (namespaced types allowed); nullopt-like error Status names the problem.
Result<EntityUid> parse_entity_uid(std::string_view text);

// Cedar text for a policy or an expression: re-parsing it gives the same tree (annotations
// included; the id is written as @id only when the policy had one).
std::string to_text(const Policy& policy);
std::string to_text(const Expr& expr);
std::string to_text(const PolicySet& policies);

}  // namespace medgate::rules
