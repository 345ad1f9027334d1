#include "ledger/rules/deployment.h"

#include <algorithm>

#include <fmt/format.h>

#include "ledger/rules/validator.h"

namespace medgate::rules {

bool is_grant_id(std::string_view id) {
  return id.size() > 2 && (id.starts_with("g-") || id.starts_with("s-"));
}

std::set<std::string> signed_categories_of(const PolicySet& set) {
  std::set<std::string> out;
  for (const Policy& p : set.policies)
    for (const auto& [key, value] : p.annotations) {
      if (key != kSignedConsentAnnotation) continue;
      std::size_t start = 0;
      while (start <= value.size()) {
        std::size_t comma = value.find(',', start);
        std::string item =
            value.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
        item.erase(0, item.find_first_not_of(' '));
        item.erase(item.find_last_not_of(' ') + 1);
        if (!item.empty()) out.insert(item);
        if (comma == std::string::npos) break;
        start = comma + 1;
      }
    }
  return out;
}

bool valid_category(std::string_view c) {
  if (c.empty() || c.size() > 64) return false;
  return std::all_of(c.begin(), c.end(), [](char ch) {
    return (ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') || ch == '-' || ch == '_';
  });
}

RulesCheck check_rules(std::string_view text) {
  RulesCheck out;
  ParseResult parsed = parse_policies(text);
  out.errors = parsed.errors;
  if (!parsed.ok()) return out;
  ValidationResult v = validate(parsed.policies);
  out.errors = v.errors;
  out.warnings = v.warnings;
  for (const Policy& p : parsed.policies.policies)
    if (is_grant_id(p.id))
      out.errors.push_back({p.location,
                            fmt::format("policy id \"{}\" is reserved: ids starting with g- or s- "
                                        "name consent grants",
                                        p.id),
                            p.id});
  out.policies = parsed.policies.policies.size();
  for (const Policy& p : parsed.policies.policies) out.policy_ids.push_back(p.id);
  out.signed_categories = signed_categories_of(parsed.policies);
  for (const std::string& c : out.signed_categories)
    if (!valid_category(c))
      out.errors.push_back({{},
                            fmt::format("@{} names \"{}\", which is not a category name "
                                        "(lower-case letters, digits, - and _)",
                                        kSignedConsentAnnotation, c),
                            ""});
  return out;
}

}  // namespace medgate::rules
