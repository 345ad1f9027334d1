// CONSENSUS-CRITICAL (rule semantics): the walk up an entity's parents that `in` and the
// authorizer's index share. Internal to ledger/rules; not part of the engine's interface.
//
// An entity's ancestors are the uids reachable through `parents` in the (layered) store. A uid the
// store does not hold has no parents. Each uid is visited once, so cycles end the walk instead of
// looping. The walk allocates nothing for the first kInline uids, which covers every realistic
// hierarchy (patient -> ward -> department -> hospital).
#pragma once

#include <array>
#include <cstddef>
#include <unordered_set>
#include <vector>

#include "ledger/rules/entities.h"
#include "ledger/rules/value.h"

namespace medgate::rules::internal {

// An insertion-ordered set of uids, compared by value. Holds pointers: the uids must stay alive
// (and the store unchanged) while the set is in use.
class UidWorklist {
 public:
  // Adds `uid` unless an equal uid is present; returns whether it was added.
  bool insert(const EntityUid& uid) {
    if (contains(uid)) return false;
    if (size_ < kInline) {
      inline_[size_] = &uid;
    } else {
      if (size_ == kInline) index_.insert(inline_.begin(), inline_.end());
      overflow_.push_back(&uid);
      index_.insert(&uid);
    }
    ++size_;
    return true;
  }
  std::size_t size() const { return size_; }
  const EntityUid& operator[](std::size_t i) const {
    return i < kInline ? *inline_[i] : *overflow_[i - kInline];
  }

 private:
  static constexpr std::size_t kInline = 16;
  struct DerefHash {
    std::size_t operator()(const EntityUid* u) const noexcept { return EntityUidHash{}(*u); }
  };
  struct DerefEqual {
    bool operator()(const EntityUid* a, const EntityUid* b) const noexcept { return *a == *b; }
  };

  bool contains(const EntityUid& uid) const {
    if (size_ > kInline) return index_.count(&uid) != 0;
    for (std::size_t i = 0; i < size_; ++i) {
      if (*inline_[i] == uid) return true;
    }
    return false;
  }

  std::array<const EntityUid*, kInline> inline_{};
  std::vector<const EntityUid*> overflow_;
  std::unordered_set<const EntityUid*, DerefHash, DerefEqual> index_;  // once past kInline
  std::size_t size_ = 0;
};

// Calls visit(uid) for `start` and then each of its ancestors, breadth first, each once. Stops
// as soon as visit returns true and returns true; returns false when the walk is exhausted.
template <typename Visit>
bool walk_ancestors(const Entities& entities, const EntityUid& start, Visit&& visit) {
  UidWorklist seen;
  seen.insert(start);
  for (std::size_t i = 0; i < seen.size(); ++i) {
    const EntityUid& uid = seen[i];
    if (visit(uid)) return true;
    if (const Entity* entity = entities.find(uid)) {
      for (const EntityUid& parent : entity->parents) seen.insert(parent);
    }
  }
  return false;
}

}  // namespace medgate::rules::internal
