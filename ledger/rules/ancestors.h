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
#include <utility>
#include <vector>

#include "ledger/rules/entities.h"
#include "ledger/rules/value.h"

namespace medgate::rules::internal {

// An insertion-ordered set of uids, compared by value, each with its EntityUidHash (computed once
// on insertion, compared before the strings). Holds pointers: the uids must stay alive (and the
// store unchanged) while the set is in use.
class UidWorklist {
 public:
  // Adds `uid` unless an equal uid is present; returns whether it was added.
  bool insert(const EntityUid& uid) { return insert(uid, EntityUidHash{}(uid)); }
  bool insert(const EntityUid& uid, std::size_t hash) {
    const Item item{&uid, hash};
    if (contains(item)) return false;
    if (size_ < kInline) {
      inline_[size_] = item;
    } else {
      if (size_ == kInline) index_.insert(inline_.begin(), inline_.end());
      overflow_.push_back(item);
      index_.insert(item);
    }
    ++size_;
    return true;
  }
  std::size_t size() const { return size_; }
  const EntityUid& operator[](std::size_t i) const { return *item(i).uid; }
  std::size_t hash(std::size_t i) const { return item(i).hash; }

 private:
  static constexpr std::size_t kInline = 16;
  struct Item {
    const EntityUid* uid;
    std::size_t hash;
  };
  struct ItemHash {
    std::size_t operator()(const Item& i) const noexcept { return i.hash; }
  };
  struct ItemEqual {
    bool operator()(const Item& a, const Item& b) const noexcept {
      return a.hash == b.hash && *a.uid == *b.uid;
    }
  };

  const Item& item(std::size_t i) const {
    return i < kInline ? inline_[i] : overflow_[i - kInline];
  }
  bool contains(const Item& item) const {
    if (size_ > kInline) return index_.count(item) != 0;
    for (std::size_t i = 0; i < size_; ++i) {
      if (ItemEqual{}(inline_[i], item)) return true;
    }
    return false;
  }

  std::array<Item, kInline> inline_;  // the first size_ are set; no need to clear the rest
  std::vector<Item> overflow_;
  std::unordered_set<Item, ItemHash, ItemEqual> index_;  // once past kInline
  std::size_t size_ = 0;
};

// Calls visit(uid, hash) for `start` and then each of its ancestors, breadth first, each once;
// `hash` is EntityUidHash{}(uid). Stops as soon as visit returns true and returns true; returns
// false when the walk is exhausted. discovered(hash) is called as each ancestor is first met,
// before it is visited, so that the caller can prefetch what the visit will read.
template <typename Visit, typename Discovered>
bool walk_ancestors(const Entities& entities, const EntityUid& start, std::size_t start_hash,
                    Visit&& visit, Discovered&& discovered) {
  UidWorklist seen;
  seen.insert(start, start_hash);
  for (std::size_t i = 0; i < seen.size(); ++i) {
    const EntityUid& uid = seen[i];
    const std::size_t hash = seen.hash(i);
    if (visit(uid, hash)) return true;
    if (const Entity* entity = entities.find(uid, hash)) {
      for (const EntityUid& parent : entity->parents) {
        const std::size_t parent_hash = EntityUidHash{}(parent);
        if (seen.insert(parent, parent_hash)) {
          entities.prefetch(parent_hash);
          discovered(parent_hash);
        }
      }
    }
  }
  return false;
}

template <typename Visit>
bool walk_ancestors(const Entities& entities, const EntityUid& start, Visit&& visit) {
  return walk_ancestors(entities, start, EntityUidHash{}(start), std::forward<Visit>(visit),
                        [](std::size_t) {});
}

}  // namespace medgate::rules::internal
