// medgate's checks on a rules file before it may be deployed, shared by `medctl rules check`
// (offline) and the daemon's `rules deploy`, so both say the same: Cedar parse and validation, ids
// starting with g- or s- reserved for consent grants, and the categories named by
// @requires_signed_consent("a,b") (see appliance/consent.h).
#pragma once

#include <set>
#include <string>
#include <string_view>
#include <vector>

#include "ledger/rules/ast.h"
#include "ledger/rules/parser.h"

namespace medgate::rules {

inline constexpr std::string_view kSignedConsentAnnotation = "requires_signed_consent";

// Consent grants' policy ids: "g-…" (made by an admin) and "s-…" (signed by the patient).
bool is_grant_id(std::string_view id);
// Categories are short names: lower-case letters, digits, '-' and '_', 1..64 characters.
bool valid_category(std::string_view category);
// The categories the policies' @requires_signed_consent annotations name.
std::set<std::string> signed_categories_of(const PolicySet& policies);

struct RulesCheck {
  std::vector<Diagnostic> errors;
  std::vector<Diagnostic> warnings;
  std::size_t policies = 0;
  std::vector<std::string> policy_ids;  // file order
  std::set<std::string> signed_categories;
};
RulesCheck check_rules(std::string_view text);

}  // namespace medgate::rules
