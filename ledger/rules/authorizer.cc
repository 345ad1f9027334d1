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
#include <array>
#include <cstdint>
#include <unordered_map>
#include <unordered_set>
#include <utility>

#include "ledger/rules/ancestors.h"
#include "ledger/rules/uid_table.h"

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

// A condition as the index evaluates it: the pool's tree of it (or the policy's own, when the
// pool keeps none), null when the condition has no expression.
struct Check {
  const Expr* tree = nullptr;
  bool is_when = true;
};

// The conditions in order, once the scope matched; the first false one ends it. Evaluation does
// not depend on source locations, so a pooled tree decides exactly as the policy's own would;
// only an error is evaluated again on the policy's own tree, whose locations the message names.
// `error` is set on kError. (A template only because Slot is private to the index.)
template <typename Slot>
Outcome evaluate_conditions(const Slot& slot, const Request& request, const Entities& entities,
                            std::string& error) {
  for (std::size_t i = 0; i < slot.check_count; ++i) {
    const Check& check = slot.check(i);
    if (check.tree == nullptr) {
      error = located(slot.policy.location, "malformed policy: a condition without an expression");
      return Outcome::kError;
    }
    EvalResult result = evaluate(*check.tree, request, entities);
    if (std::holds_alternative<EvalError>(result)) {
      const Expr& own = *slot.policy.conditions[i].expr;
      if (check.tree != &own) result = evaluate(own, request, entities);
    }
    if (const auto* failure = std::get_if<EvalError>(&result)) {
      error = located(failure->location, failure->message);
      return Outcome::kError;
    }
    const Value& value = std::get<Value>(result);
    if (!value.is_bool()) {
      error = located(slot.policy.conditions[i].expr->location,
                      "type error: expected bool, got " + std::string(kind_name(value.kind())));
      return Outcome::kError;
    }
    if (value.as_bool() != check.is_when) return Outcome::kNotSatisfied;
  }
  return Outcome::kSatisfied;
}

// Condition trees, shared between policies wherever they are equal but for source locations:
// consent grants are written from one template, so 100,000 of them hold a handful of distinct
// subtrees (`context.purpose == "TREAT"`, `resource in Category::"labs"`). Evaluating a shared
// tree touches memory that other decisions keep in the cache; each grant's own tree is a few
// kilobytes scattered over the heap, read once per decision from main memory.
class ExprPool {
 public:
  // The pool's tree equal to `e` (null when e is null, or nested deeper than the evaluator
  // would evaluate: such a tree keeps to itself). Every pool node is a copy; `e` is not kept.
  ExprPtr intern(const ExprPtr& e) { return e == nullptr ? nullptr : intern(*e, 0); }

  // Drops the nodes no policy holds any more, once enough policies went to make it worth a pass.
  void released(std::size_t conditions) {
    released_ += conditions;
    if (released_ < 64 + nodes_.size() / 2) return;
    released_ = 0;
    // A node freed here may free its children; passes repeat until none goes.
    for (bool freed = true; freed;) {
      freed = false;
      for (auto it = nodes_.begin(); it != nodes_.end();) {
        if (it->use_count() == 1) {
          it = nodes_.erase(it);
          freed = true;
        } else {
          ++it;
        }
      }
    }
  }

 private:
  // As the evaluator's bound: a deeper tree is an error there, and never recursed into here.
  static constexpr int kMaxDepth = 1000;

  // A node's own fields and its (pooled) children's addresses; never its location.
  struct NodeHash {
    std::size_t operator()(const ExprPtr& e) const noexcept {
      std::size_t h = static_cast<std::size_t>(e->kind);
      auto mix = [&h](std::size_t v) { h ^= v + 0x9e3779b97f4a7c15ULL + (h << 6) + (h >> 2); };
      mix(static_cast<std::size_t>(e->variable));
      mix(static_cast<std::size_t>(e->unary_op));
      mix(static_cast<std::size_t>(e->binary_op));
      mix(std::hash<std::string>{}(e->attr));
      mix(std::hash<std::string>{}(e->entity_type));
      for (const PatternPart& part : e->pattern) {
        mix(part.wildcard ? 1 : 2);
        mix(std::hash<std::string>{}(part.text));
      }
      for (const std::string& key : e->keys) mix(std::hash<std::string>{}(key));
      if (e->kind == Expr::Kind::kLiteral) mix(std::hash<std::string>{}(e->literal.to_text()));
      for (const ExprPtr& child : e->children) mix(std::hash<const Expr*>{}(child.get()));
      return h;
    }
  };
  struct NodeEqual {
    bool operator()(const ExprPtr& a, const ExprPtr& b) const noexcept {
      if (a->kind != b->kind || a->variable != b->variable || a->unary_op != b->unary_op ||
          a->binary_op != b->binary_op || a->attr != b->attr || a->entity_type != b->entity_type ||
          a->pattern != b->pattern || a->keys != b->keys ||
          a->children.size() != b->children.size()) {
        return false;
      }
      // Literals equal as values evaluate alike (the same kind, and sets are kept sorted).
      if (a->kind == Expr::Kind::kLiteral && !(a->literal == b->literal)) return false;
      for (std::size_t i = 0; i < a->children.size(); ++i) {
        if (a->children[i] != b->children[i]) return false;
      }
      return true;
    }
  };

  // Children first, so that a node is compared by its children's addresses.
  ExprPtr intern(const Expr& e, int depth) {
    if (depth > kMaxDepth) return nullptr;
    auto copy = std::make_shared<Expr>(e);
    copy->location = SourceLocation{};
    for (ExprPtr& child : copy->children) {
      if (child == nullptr) continue;
      child = intern(*child, depth + 1);
      if (child == nullptr) return nullptr;
    }
    return *nodes_.insert(std::move(copy)).first;
  }

  std::unordered_set<ExprPtr, NodeHash, NodeEqual> nodes_;
  std::size_t released_ = 0;
};

// A list of a few trivially copyable items, kept inline up to N (a request's handful of ancestor
// ids, bucket lists and satisfied policies), so that a decision allocates nothing for them.
template <typename T, std::size_t N>
class SmallList {
 public:
  void push_back(T item) {
    if (heap_.empty()) {
      if (size_ < N) {
        inline_[size_++] = item;
        return;
      }
      heap_.assign(inline_.begin(), inline_.end());
    }
    heap_.push_back(item);
    ++size_;
  }
  std::size_t size() const { return size_; }
  bool empty() const { return size_ == 0; }
  T* begin() { return heap_.empty() ? inline_.data() : heap_.data(); }
  T* end() { return begin() + size_; }
  const T* begin() const { return heap_.empty() ? inline_.data() : heap_.data(); }
  const T* end() const { return begin() + size_; }
  bool contains(const T& item) const { return std::find(begin(), end(), item) != end(); }

 private:
  std::array<T, N> inline_{};
  std::vector<T> heap_;  // all of them, once past N
  std::size_t size_ = 0;
};

}  // namespace

bool scope_matches(const Policy& policy, const Request& request, const Entities& entities) {
  return clause_matches(policy.principal, request.principal, entities) &&
         clause_matches(policy.action, request.action, entities) &&
         clause_matches(policy.resource, request.resource, entities);
}

// Every uid a policy's scope names is interned once, when the policy is added, to a dense integer
// id. A request resolves its principal, action and resource once: each uid, and each ancestor
// found by one walk up the store, is hashed once and looked up once in the table. After that the
// scope of every candidate policy is decided by comparing integers: `== E` is the uid's id equal
// to E's, `in E` is E's id among the ids of the uid and its ancestors. A uid no policy names has
// no id, and its ancestors that no policy names are not kept: no scope could be decided by them.
struct Authorizer::Index {
  static constexpr std::uint32_t kNoId = 0xffffffff;   // a uid no policy's scope names
  static constexpr std::uint32_t kAnyId = 0xfffffffe;  // a Candidate filter that passes everything

  struct Slot;
  // A bucket's entry: the policy and a first test that needs no access to it. With 100,000
  // policies each one evaluated is a cache miss or three; when a policy's principal or action
  // scope is `== E`, a request whose principal (action) is not E is passed over on the entry.
  struct Candidate {
    Slot* slot = nullptr;
    std::uint32_t principal = kAnyId;  // E's id when the principal scope is `== E`
    std::uint32_t action = kAnyId;     // likewise the action
  };
  using SlotList = std::vector<Candidate>;

  struct Node {
    EntityUid uid;
    std::uint32_t id = kNoId;
    std::uint32_t refs = 0;  // scope clauses naming this uid
    SlotList by_resource;    // policies whose resource scope confines it under this uid
    SlotList by_principal;   // likewise the principal, when the resource scope does not
  };
  // Searched by a uid and its precomputed hash, so a request hashes each uid once.
  using Table = internal::UidTable<Node>;

  // A scope clause with its entities as ids.
  struct Clause {
    ScopeConstraint::Op op = ScopeConstraint::Op::kAny;
    std::uint32_t id = kNoId;        // kEq, kIn, kIsIn
    std::vector<std::uint32_t> ids;  // kInSet
  };
  enum class Bucket { kResource, kPrincipal, kUnindexed };
  // What a decision reads of a policy comes first, in the first cache lines of its slot; the
  // policy itself (its text form, annotations, source locations) is read only for an error.
  struct Slot {
    Clause principal, action, resource;
    Effect effect = Effect::kPermit;
    std::uint32_t check_count = 0;
    std::array<Check, 2> first_checks;  // the conditions, in order; past two in more_checks
    std::vector<Check> more_checks;
    const std::string* id = nullptr;  // &policy.id
    Policy policy;
    std::vector<ExprPtr> pooled;  // holds the pool's trees the checks point into
    Bucket bucket = Bucket::kUnindexed;
    Node* node = nullptr;      // the bucket's owner (kResource, kPrincipal)
    std::size_t position = 0;  // in its bucket's list

    const Check& check(std::size_t i) const {
      return i < first_checks.size() ? first_checks[i] : more_checks[i - first_checks.size()];
    }
  };

  // Owns the policies. A multimap only so that a PolicySet with a repeated id (which the parser
  // refuses) loses no policy; add() keeps ids unique.
  std::unordered_multimap<std::string, std::unique_ptr<Slot>> by_id;
  Table uids;
  std::vector<std::uint32_t> free_ids;  // of uids no policy names any more
  std::uint32_t next_id = 0;
  SlotList unindexed;
  ExprPool conditions;
  // How many policies sit in resource (principal) buckets: a request walks the resource's
  // (principal's) ancestors for buckets only when there are some.
  std::size_t in_resource_buckets = 0;
  std::size_t in_principal_buckets = 0;

  // The node of `uid`, created with a fresh id when no policy named it yet; counts a reference.
  Node& acquire(const EntityUid& uid) {
    const std::size_t hash = EntityUidHash{}(uid);
    Node* node = uids.find(uid, hash);
    if (node == nullptr) {
      auto fresh = std::make_unique<Node>();
      fresh->uid = uid;
      if (free_ids.empty()) {
        fresh->id = next_id++;
      } else {
        fresh->id = free_ids.back();
        free_ids.pop_back();
      }
      node = &uids.insert(std::move(fresh), hash);
    }
    ++node->refs;
    return *node;
  }
  void release(const EntityUid& uid) {
    const std::size_t hash = EntityUidHash{}(uid);
    Node* node = uids.find(uid, hash);
    if (node == nullptr) return;  // not reached: every released uid was acquired
    if (--node->refs == 0) {
      free_ids.push_back(node->id);
      uids.erase(uid, hash);
    }
  }
  Node& node_of(const EntityUid& uid) { return *uids.find(uid, EntityUidHash{}(uid)); }

  Clause intern(const ScopeConstraint& scope) {
    Clause clause;
    clause.op = scope.op;
    switch (scope.op) {
      case ScopeConstraint::Op::kEq:
      case ScopeConstraint::Op::kIn:
      case ScopeConstraint::Op::kIsIn:
        clause.id = acquire(scope.entity).id;
        break;
      case ScopeConstraint::Op::kInSet:
        clause.ids.reserve(scope.entities.size());
        for (const EntityUid& e : scope.entities) clause.ids.push_back(acquire(e).id);
        break;
      case ScopeConstraint::Op::kAny:
      case ScopeConstraint::Op::kIs:
        break;
    }
    return clause;
  }
  void release(const ScopeConstraint& scope) {
    switch (scope.op) {
      case ScopeConstraint::Op::kEq:
      case ScopeConstraint::Op::kIn:
      case ScopeConstraint::Op::kIsIn:
        release(scope.entity);
        break;
      case ScopeConstraint::Op::kInSet:
        for (const EntityUid& e : scope.entities) release(e);
        break;
      case ScopeConstraint::Op::kAny:
      case ScopeConstraint::Op::kIs:
        break;
    }
  }

  SlotList& list_of(const Slot& slot) {
    switch (slot.bucket) {
      case Bucket::kResource:
        return slot.node->by_resource;
      case Bucket::kPrincipal:
        return slot.node->by_principal;
      case Bucket::kUnindexed:
        return unindexed;
    }
    return unindexed;
  }

  void insert(Policy policy) {
    auto slot = std::make_unique<Slot>();
    slot->policy = std::move(policy);
    const Policy& p = slot->policy;
    slot->principal = intern(p.principal);
    slot->action = intern(p.action);
    slot->resource = intern(p.resource);
    slot->effect = p.effect;
    slot->id = &p.id;
    slot->check_count = static_cast<std::uint32_t>(p.conditions.size());
    for (std::size_t i = 0; i < p.conditions.size(); ++i) {
      const Condition& condition = p.conditions[i];
      ExprPtr pooled = conditions.intern(condition.expr);
      Check check{pooled != nullptr ? pooled.get() : condition.expr.get(), condition.is_when};
      if (pooled != nullptr) slot->pooled.push_back(std::move(pooled));
      if (i < slot->first_checks.size()) {
        slot->first_checks[i] = check;
      } else {
        slot->more_checks.push_back(check);
      }
    }
    // The nodes were acquired above; finding them again takes no new reference.
    if (const EntityUid* resource = bucket_entity(p.resource)) {
      slot->bucket = Bucket::kResource;
      slot->node = &node_of(*resource);
      ++in_resource_buckets;
    } else if (const EntityUid* principal = bucket_entity(p.principal)) {
      slot->bucket = Bucket::kPrincipal;
      slot->node = &node_of(*principal);
      ++in_principal_buckets;
    }
    SlotList& list = list_of(*slot);
    slot->position = list.size();
    Candidate candidate{slot.get()};
    if (slot->principal.op == ScopeConstraint::Op::kEq) candidate.principal = slot->principal.id;
    if (slot->action.op == ScopeConstraint::Op::kEq) candidate.action = slot->action.id;
    list.push_back(candidate);
    std::string id = p.id;
    by_id.emplace(std::move(id), std::move(slot));
  }

  // Takes the slot out of its bucket (swap with the last, so removal is O(1)) and drops its
  // references to the uids its scope names.
  void unlink(Slot& slot) {
    SlotList& list = list_of(slot);
    Candidate last = list.back();
    list[slot.position] = last;
    last.slot->position = slot.position;
    list.pop_back();
    if (slot.bucket == Bucket::kResource) --in_resource_buckets;
    if (slot.bucket == Bucket::kPrincipal) --in_principal_buckets;
    release(slot.policy.principal);
    release(slot.policy.action);
    release(slot.policy.resource);
  }
  // After the slot is gone (its trees with it).
  void forgotten(std::size_t condition_count) { conditions.released(condition_count); }

  // One of the request's uids, resolved against the policies' table: its own id, and (walked on
  // first need) the ids of it and its ancestors, with the bucket lists met on the way.
  class Resolved {
   public:
    // `hash` is EntityUidHash{}(uid).
    Resolved(const Index& index, const Entities& entities, const EntityUid& uid, std::size_t hash)
        : index_(index), entities_(entities), uid_(uid), hash_(hash) {
      node_ = lookup(uid, hash_);
      id_ = node_ == nullptr ? kNoId : node_->id;
    }

    const EntityUid& uid() const { return uid_; }
    std::uint32_t id() const { return id_; }
    // Whether the uid is `id` or has it as an ancestor (Cedar's `in`).
    bool in(std::uint32_t id) {
      if (id == id_) return true;
      walk();
      return ancestors_.contains(id);
    }
    // The uid's nodes and its ancestors' nodes, in walk order (the uid first).
    const SmallList<const Node*, 8>& nodes() {
      walk();
      return nodes_;
    }

   private:
    const Node* lookup(const EntityUid& uid, std::size_t hash) const {
      return index_.uids.find(uid, hash);
    }
    void walk() {
      if (walked_) return;
      walked_ = true;
      internal::walk_ancestors(
          entities_, uid_, hash_,
          [&](const EntityUid& uid, std::size_t hash) {
            const Node* node = &uid == &uid_ ? node_ : lookup(uid, hash);
            if (node != nullptr) {
              ancestors_.push_back(node->id);
              nodes_.push_back(node);
              // Its buckets are read once the walks are done.
              if (!node->by_resource.empty()) __builtin_prefetch(node->by_resource.data());
              if (!node->by_principal.empty()) __builtin_prefetch(node->by_principal.data());
            }
            return false;  // walk every ancestor
          },
          [&](std::size_t hash) { index_.uids.prefetch(hash); });
    }

    const Index& index_;
    const Entities& entities_;
    const EntityUid& uid_;
    std::size_t hash_;
    const Node* node_ = nullptr;
    std::uint32_t id_ = kNoId;
    bool walked_ = false;
    SmallList<std::uint32_t, 8> ancestors_;
    SmallList<const Node*, 8> nodes_;
  };

  static bool matches(const Clause& clause, const ScopeConstraint& scope, Resolved& uid) {
    switch (clause.op) {
      case ScopeConstraint::Op::kAny:
        return true;
      case ScopeConstraint::Op::kEq:
        return uid.id() == clause.id;
      case ScopeConstraint::Op::kIn:
        return uid.in(clause.id);
      case ScopeConstraint::Op::kIs:
        return uid.uid().type == scope.entity_type;
      case ScopeConstraint::Op::kIsIn:
        return uid.uid().type == scope.entity_type && uid.in(clause.id);
      case ScopeConstraint::Op::kInSet:
        return std::any_of(clause.ids.begin(), clause.ids.end(),
                           [&](std::uint32_t id) { return uid.in(id); });
    }
    return false;
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
  std::size_t conditions = 0;
  for (auto it = begin; it != end; ++it) {
    index_->unlink(*it->second);
    conditions += it->second->pooled.size();
  }
  index_->by_id.erase(key);
  index_->forgotten(conditions);
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
  const Index& index = *index_;

  // The lookups below mostly miss the cache: start them all before waiting on the first.
  const std::size_t principal_hash = EntityUidHash{}(request.principal);
  const std::size_t action_hash = EntityUidHash{}(request.action);
  const std::size_t resource_hash = EntityUidHash{}(request.resource);
  index.uids.prefetch(principal_hash);
  index.uids.prefetch(resource_hash);
  entities.prefetch(resource_hash);
  entities.prefetch(principal_hash);
  Index::Resolved principal(index, entities, request.principal, principal_hash);
  Index::Resolved action(index, entities, request.action, action_hash);
  Index::Resolved resource(index, entities, request.resource, resource_hash);

  SmallList<const std::string*, 8> permits;
  SmallList<const std::string*, 8> forbids;
  std::string error;
  auto consider = [&](const Index::SlotList& list) {
    for (const Index::Candidate& candidate : list) {
      if (candidate.principal != Index::kAnyId && candidate.principal != principal.id()) continue;
      if (candidate.action != Index::kAnyId && candidate.action != action.id()) continue;
      const Index::Slot& slot = *candidate.slot;
      if (!Index::matches(slot.principal, slot.policy.principal, principal) ||
          !Index::matches(slot.action, slot.policy.action, action) ||
          !Index::matches(slot.resource, slot.policy.resource, resource)) {
        continue;
      }
      switch (evaluate_conditions(slot, request, entities, error)) {
        case Outcome::kSatisfied:
          (slot.effect == Effect::kForbid ? forbids : permits).push_back(slot.id);
          break;
        case Outcome::kNotSatisfied:
          break;
        case Outcome::kError:
          response.errors.push_back(PolicyError{*slot.id, std::move(error)});
          error.clear();
          break;
      }
    }
  };
  // The resource's buckets and its ancestors', then the principal's, then the unindexed.
  if (index.in_resource_buckets != 0) {
    for (const Index::Node* node : resource.nodes()) consider(node->by_resource);
  }
  if (index.in_principal_buckets != 0) {
    for (const Index::Node* node : principal.nodes()) consider(node->by_principal);
  }
  consider(index.unindexed);

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
