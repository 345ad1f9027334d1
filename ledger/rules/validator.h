// Checks a parsed policy set for mistakes a privacy officer should hear about before deploying:
// what Cedar's validator would reject that can be seen without a schema, and, when a schema-like
// description of the directory is given, unknown entity types, actions and attributes.
//
// Errors (the set must not be deployed): an operator applied to a literal of the wrong type
// (`1 + "a"`, `if 3 then ...`, `"a" < 2`, `!5`, `x like` on a non-string literal, `.contains` on a
// non-set literal), `action is T`/`action == ` a non-Action entity, a scope entity whose type is
// unknown to the schema, an action the schema does not list, a duplicate policy id.
// Warnings: a policy that can never be satisfied because a condition is the literal false, an
// attribute the schema does not know on a known entity type.
#pragma once

#include <map>
#include <set>
#include <string>
#include <vector>

#include "ledger/rules/ast.h"
#include "ledger/rules/parser.h"

namespace medgate::rules {

struct Schema {
  // entity type -> attribute names it may have; empty map = no schema (only structural checks)
  std::map<std::string, std::set<std::string>> entity_types;
  std::set<EntityUid> actions;  // Action::"read", ...
  bool empty() const { return entity_types.empty() && actions.empty(); }
};

struct ValidationResult {
  std::vector<Diagnostic> errors;
  std::vector<Diagnostic> warnings;
  bool ok() const { return errors.empty(); }
};

ValidationResult validate(const PolicySet& policies, const Schema& schema = {});

}  // namespace medgate::rules
