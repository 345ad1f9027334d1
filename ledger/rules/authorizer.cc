// CONSENSUS-CRITICAL (rule semantics): see authorizer.h. The decision is Cedar's; the index only
// decides which policies are worth evaluating, and never one whose scope could match is left out:
//
//   - a policy whose resource scope is `== E`, `in E` or `is T in E` can only match a resource that
//     is E or has E as an ancestor: it is kept in the resource bucket of E;
//   - else one whose principal scope is `== E`, `in E` or `is T in E`, likewise, in the principal
//     bucket of E;
//   - every other policy is evaluated for every request.
//
// A request visits the resource buckets of its resource and each of its ancestors, the principal
// buckets of its principal and each of its ancestors (each ancestor once), and the unindexed
// policies. A policy sits in exactly one bucket, so it is evaluated at most once.
#include "ledger/rules/authorizer.h"

#include <algorithm>
#include <unordered_map>
#include <utility>

#include "ledger/rules/ancestors.h"

namespace medgate::rules {

std::string_view decision_name(Decision d) {
  switch (d) {
    case Decision::kAllow:
      return "allow";
    case Decision::kDeny:
      return "deny";
  }
  return "deny";
}

namespace {

bool clause_matches(const ScopeConstraint& clause, const EntityUid& uid, const Entities& entities) {
  switch (clause.op) {
    case ScopeConstraint::Op::kAny:
      return true;
    case ScopeConstraint::Op::kEq:
      return uid == clause.entity;
    case ScopeConstraint::Op::kIn:
      return entities.is_in(uid, clause.entity);
    case ScopeConstraint::Op::kIs:
      return uid.type == clause.entity_type;
    case ScopeConstraint::Op::kIsIn:
      return uid.type == clause.entity_type && entities.is_in(uid, clause.entity);
    case ScopeConstraint::Op::kInSet:
      return std::any_of(clause.entities.begin(), clause.entities.end(),
                         [&](const EntityUid& e) { return entities.is_in(uid, e); });
  }
  return false;
}

// The scope entity a clause confines its variable under, if any.
const EntityUid* bucket_entity(const ScopeConstraint& clause) {
  switch (clause.op) {
    case ScopeConstraint::Op::kEq:
    case ScopeConstraint::Op::kIn:
    case ScopeConstraint::Op::kIsIn:
      return &clause.entity;
    case ScopeConstraint::Op::kAny:
    case ScopeConstraint::Op::kIs:
    case ScopeConstraint::Op::kInSet:
      return nullptr;
  }
  return nullptr;
}

enum class Outcome { kSatisfied, kNotSatisfied, kError };

std::string located(const SourceLocation& where, std::string message) {
  if (where.line == 0) return message;
  return std::to_string(where.line) + ":" + std::to_string(where.column) + ": " + message;
}

// Scope, then the conditions in order; the first false one ends it. `error` is set on kError.
Outcome evaluate_policy(const Policy& policy, const Request& request, const Entities& entities,
                        std::string& error) {
  if (!scope_matches(policy, request, entities)) return Outcome::kNotSatisfied;
  for (const Condition& condition : policy.conditions) {
    if (condition.expr == nullptr) {
      error = located(policy.location, "malformed policy: a condition without an expression");
      return Outcome::kError;
    }
    EvalResult result = evaluate(*condition.expr, request, entities);
    if (const auto* failure = std::get_if<EvalError>(&result)) {
      error = located(failure->location, failure->message);
      return Outcome::kError;
    }
    const Value& value = std::get<Value>(result);
    if (!value.is_bool()) {
      error = located(condition.expr->location,
                      "type error: expected bool, got " + std::string(kind_name(value.kind())));
      return Outcome::kError;
    }
    if (value.as_bool() != condition.is_when) return Outcome::kNotSatisfied;
  }
  return Outcome::kSatisfied;
}

}  // namespace

bool scope_matches(const Policy& policy, const Request& request, const Entities& entities) {
  return clause_matches(policy.principal, request.principal, entities) &&
         clause_matches(policy.action, request.action, entities) &&
         clause_matches(policy.resource, request.resource, entities);
}

struct Authorizer::Index {
  enum class Bucket { kResource, kPrincipal, kUnindexed };
  struct Slot {
    Policy policy;
    Bucket bucket = Bucket::kUnindexed;
    std::size_t position = 0;  // in its bucket's list
  };
  // A bucket's entry: the policy and a first test that needs no access to it. With 100,000
  // policies each one evaluated is a cache miss or three; when a policy's principal scope is
  // `== E`, a request whose principal hashes differently from E is passed over on the entry alone.
  struct Candidate {
    Slot* slot = nullptr;
    std::size_t principal_hash = 0;
    bool principal_eq = false;
  };
  using SlotList = std::vector<Candidate>;
  using Buckets = std::unordered_map<EntityUid, SlotList, EntityUidHash>;

  // Owns the policies. A multimap only so that a PolicySet with a repeated id (which the parser
  // refuses) loses no policy; add() keeps ids unique.
  std::unordered_multimap<std::string, std::unique_ptr<Slot>> by_id;
  Buckets by_resource;
  Buckets by_principal;
  SlotList unindexed;

  SlotList& list_of(const Slot& slot) {
    switch (slot.bucket) {
      case Bucket::kResource:
        return by_resource[slot.policy.resource.entity];
      case Bucket::kPrincipal:
        return by_principal[slot.policy.principal.entity];
      case Bucket::kUnindexed:
        return unindexed;
    }
    return unindexed;
  }

  void insert(Policy policy) {
    auto slot = std::make_unique<Slot>();
    slot->policy = std::move(policy);
    if (bucket_entity(slot->policy.resource) != nullptr) {
      slot->bucket = Bucket::kResource;
    } else if (bucket_entity(slot->policy.principal) != nullptr) {
      slot->bucket = Bucket::kPrincipal;
    }
    SlotList& list = list_of(*slot);
    slot->position = list.size();
    const ScopeConstraint& principal = slot->policy.principal;
    const bool principal_eq = principal.op == ScopeConstraint::Op::kEq;
    list.push_back(
        Candidate{slot.get(), principal_eq ? EntityUidHash{}(principal.entity) : 0, principal_eq});
    std::string id = slot->policy.id;
    by_id.emplace(std::move(id), std::move(slot));
  }

  // Takes the slot out of its bucket (swap with the last, so removal is O(1)).
  void unlink(Slot& slot) {
    SlotList& list = list_of(slot);
    Candidate last = list.back();
    list[slot.position] = last;
    last.slot->position = slot.position;
    list.pop_back();
    if (list.empty() && slot.bucket != Bucket::kUnindexed) {
      if (slot.bucket == Bucket::kResource) {
        by_resource.erase(slot.policy.resource.entity);
      } else {
        by_principal.erase(slot.policy.principal.entity);
      }
    }
  }
};

Authorizer::Authorizer() : index_(std::make_unique<Index>()) {}

Authorizer::Authorizer(PolicySet policies) : Authorizer() {
  for (Policy& policy : policies.policies) index_->insert(std::move(policy));
}

Authorizer::~Authorizer() = default;
Authorizer::Authorizer(Authorizer&&) noexcept = default;
Authorizer& Authorizer::operator=(Authorizer&&) noexcept = default;

Status Authorizer::add(Policy policy) {
  if (!index_) index_ = std::make_unique<Index>();  // a moved-from Authorizer is empty
  if (index_->by_id.count(policy.id) != 0) {
    return Status::InvalidArgument("policy id " + quote_string(policy.id) + " is already in use");
  }
  index_->insert(std::move(policy));
  return Status::Ok();
}

Status Authorizer::remove(std::string_view id) {
  const std::string key(id);
  if (!index_ || index_->by_id.count(key) == 0) {
    return Status::NotFound("no policy with id " + quote_string(key));
  }
  auto [begin, end] = index_->by_id.equal_range(key);
  for (auto it = begin; it != end; ++it) index_->unlink(*it->second);
  index_->by_id.erase(key);
  return Status::Ok();
}

std::size_t Authorizer::size() const {
  return index_ ? index_->by_id.size() : 0;
}

const Policy* Authorizer::find(std::string_view id) const {
  if (!index_) return nullptr;
  auto it = index_->by_id.find(std::string(id));
  return it == index_->by_id.end() ? nullptr : &it->second->policy;
}

Response Authorizer::is_authorized(const Request& request, const Entities& entities) const {
  Response response;
  if (!index_) return response;  // default deny

  std::vector<const std::string*> permits;
  std::vector<const std::string*> forbids;
  std::string error;
  const std::size_t principal_hash = EntityUidHash{}(request.principal);
  auto consider = [&](const Index::SlotList& list) {
    for (const Index::Candidate& candidate : list) {
      if (candidate.principal_eq && candidate.principal_hash != principal_hash) continue;
      const Policy& policy = candidate.slot->policy;
      switch (evaluate_policy(policy, request, entities, error)) {
        case Outcome::kSatisfied:
          (policy.effect == Effect::kForbid ? forbids : permits).push_back(&policy.id);
          break;
        case Outcome::kNotSatisfied:
          break;
        case Outcome::kError:
          response.errors.push_back(PolicyError{policy.id, std::move(error)});
          error.clear();
          break;
      }
    }
  };
  auto visit_buckets = [&](const Index::Buckets& buckets, const EntityUid& start) {
    if (buckets.empty()) return;
    internal::walk_ancestors(entities, start, [&](const EntityUid& uid) {
      if (auto it = buckets.find(uid); it != buckets.end()) consider(it->second);
      return false;  // walk every ancestor
    });
  };
  visit_buckets(index_->by_resource, request.resource);
  visit_buckets(index_->by_principal, request.principal);
  consider(index_->unindexed);

  // Any satisfied forbid denies; else any satisfied permit allows; else the default deny.
  auto& determining = forbids.empty() ? permits : forbids;
  response.decision = !forbids.empty() || permits.empty() ? Decision::kDeny : Decision::kAllow;
  std::sort(determining.begin(), determining.end(),
            [](const std::string* a, const std::string* b) { return *a < *b; });
  response.determining.reserve(determining.size());
  for (const std::string* id : determining) response.determining.push_back(*id);
  std::sort(response.errors.begin(), response.errors.end(),
            [](const PolicyError& a, const PolicyError& b) { return a.policy_id < b.policy_id; });
  return response;
}

}  // namespace medgate::rules
