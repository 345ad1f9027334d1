// CONSENSUS-CRITICAL (rule semantics): Cedar's authorization over a policy set.
//
//   - A policy is satisfied when its scope matches and every `when` condition is true and every
//     `unless` condition is false (conditions evaluated in order; the first false ends it).
//   - A policy whose evaluation errors (or gives a non-bool condition) is skipped, and the error
//     is reported with its policy id.
//   - Any satisfied forbid -> Deny, determined by the satisfied forbids.
//   - Else any satisfied permit -> Allow, determined by the satisfied permits.
//   - Else Deny (default deny), determined by nothing.
//
// Policies are indexed by their scope (`resource` or else `principal` `==`, `in` or `is T in` an
// entity), so a decision looks only at policies that can apply to the request's principal,
// resource and their ancestors, and the cost does not grow with unrelated grants.
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "ledger/rules/ast.h"
#include "ledger/rules/entities.h"
#include "ledger/rules/evaluator.h"

namespace medgate::rules {

enum class Decision { kAllow, kDeny };
std::string_view decision_name(Decision d);  // "allow" | "deny"

struct PolicyError {
  std::string policy_id;
  std::string message;
  friend bool operator==(const PolicyError&, const PolicyError&) = default;
};

struct Response {
  Decision decision = Decision::kDeny;
  std::vector<std::string> determining;  // sorted policy ids
  std::vector<PolicyError> errors;       // sorted by policy id
};

// True when the scope clause matches (no conditions evaluated).
bool scope_matches(const Policy& policy, const Request& request, const Entities& entities);

// is_authorized() may run on many threads at once; add() and remove() need the authorizer to
// themselves. A moved-from Authorizer is empty and usable.
class Authorizer {
 public:
  Authorizer();
  // Ids should be unique (parse_policies makes them so); a repeated one drops no policy, and
  // remove() of that id removes them all.
  explicit Authorizer(PolicySet policies);
  ~Authorizer();
  Authorizer(Authorizer&&) noexcept;
  Authorizer& operator=(Authorizer&&) noexcept;

  // Adds a policy (its id must be new: kInvalidArgument otherwise) or removes one by id
  // (kNotFound). Used for consent grants, which come and go one at a time.
  Status add(Policy policy);
  Status remove(std::string_view id);
  std::size_t size() const;
  const Policy* find(std::string_view id) const;

  Response is_authorized(const Request& request, const Entities& entities) const;

 private:
  struct Index;
  std::unique_ptr<Index> index_;
};

}  // namespace medgate::rules
