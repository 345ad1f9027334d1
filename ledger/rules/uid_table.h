// The hash table the entity store and the authorizer's index keep their uids in. Internal to
// ledger/rules; not part of the engine's interface.
//
// Open addressing with linear probing over a power-of-two array of {hash, value} slots, at most
// half full. A lookup with a known hash reads one slot (usually) and the value it points to, to
// compare the uid: two memory reads where std::unordered_map needs three dependent ones (bucket,
// the node before, the node). At 100,000 grants and 10,000 patients those reads miss the cache
// and are most of what a decision costs. Values are held by pointer, so they never move.
#pragma once

#include <cstddef>
#include <memory>
#include <utility>
#include <vector>

#include "ledger/rules/value.h"

namespace medgate::rules::internal {

// V has a member `EntityUid uid`, its key. `hash` arguments must be EntityUidHash{}(uid).
template <typename V>
class UidTable {
 public:
  UidTable() = default;
  UidTable(const UidTable& other) : slots_(other.slots_.size()), mask_(other.mask_) {
    for (std::size_t i = 0; i < other.slots_.size(); ++i) {
      const Slot& s = other.slots_[i];
      if (s.value) slots_[i] = Slot{s.hash, std::make_unique<V>(*s.value)};
    }
    size_ = other.size_;
  }
  UidTable& operator=(const UidTable& other) {
    if (this != &other) *this = UidTable(other);
    return *this;
  }
  UidTable(UidTable&&) noexcept = default;
  UidTable& operator=(UidTable&&) noexcept = default;
  ~UidTable() = default;

  std::size_t size() const { return size_; }
  bool empty() const { return size_ == 0; }

  V* find(const EntityUid& uid, std::size_t hash) const {
    if (size_ == 0) return nullptr;
    for (std::size_t i = hash & mask_;; i = (i + 1) & mask_) {
      const Slot& s = slots_[i];
      if (!s.value) return nullptr;
      if (s.hash == hash && s.value->uid == uid) return s.value.get();
    }
  }

  // Asks the CPU to start reading the slot `hash` lands on, while other work goes on.
  void prefetch(std::size_t hash) const {
    if (!slots_.empty()) __builtin_prefetch(&slots_[hash & mask_]);
  }

  // Adds `value`, whose uid must not be present yet; returns it.
  V& insert(std::unique_ptr<V> value, std::size_t hash) {
    if ((size_ + 1) * 2 > slots_.size()) grow();
    V& out = *value;
    place(Slot{hash, std::move(value)});
    ++size_;
    return out;
  }

  // Removes the uid's value, if there is one. Backward-shift deletion: the entries after it move
  // back into the gap when that is nearer their home slot, so no tombstones accumulate.
  void erase(const EntityUid& uid, std::size_t hash) {
    if (size_ == 0) return;
    std::size_t i = hash & mask_;
    for (;; i = (i + 1) & mask_) {
      const Slot& s = slots_[i];
      if (!s.value) return;
      if (s.hash == hash && s.value->uid == uid) break;
    }
    slots_[i] = Slot{};
    --size_;
    for (std::size_t j = (i + 1) & mask_; slots_[j].value; j = (j + 1) & mask_) {
      const std::size_t home = slots_[j].hash & mask_;
      // The entry at j stays when its home lies cyclically in (i, j].
      const bool stays = i <= j ? (i < home && home <= j) : (i < home || home <= j);
      if (!stays) {
        slots_[i] = std::move(slots_[j]);
        i = j;
      }
    }
  }

  template <typename F>
  void for_each(F&& f) const {
    for (const Slot& s : slots_) {
      if (s.value) f(*s.value);
    }
  }

 private:
  struct Slot {
    std::size_t hash = 0;
    std::unique_ptr<V> value;  // null: empty
  };

  void place(Slot slot) {
    std::size_t i = slot.hash & mask_;
    while (slots_[i].value) i = (i + 1) & mask_;
    slots_[i] = std::move(slot);
  }
  void grow() {
    std::vector<Slot> old = std::move(slots_);
    const std::size_t capacity = old.empty() ? 16 : old.size() * 2;
    slots_ = std::vector<Slot>(capacity);
    mask_ = capacity - 1;
    for (Slot& s : old) {
      if (s.value) place(std::move(s));
    }
  }

  std::vector<Slot> slots_;
  std::size_t mask_ = 0;
  std::size_t size_ = 0;
};

}  // namespace medgate::rules::internal
