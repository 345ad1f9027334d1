// CONSENSUS-CRITICAL (rule semantics): the entity store the evaluator reads: each entity's
// attributes and parents. `a in b` holds when a == b or b is an ancestor of a (transitively).
//
// Stores can be layered: a request-local store (the PatientData resource being read) over the
// directory imported with `medctl directory import`, without copying the directory.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "hsm/status.h"
#include "ledger/rules/uid_table.h"
#include "ledger/rules/value.h"

namespace medgate::rules {

struct Entity {
  EntityUid uid;
  ValueRecord attrs;
  std::vector<EntityUid> parents;
};

// Const methods may run on many threads at once, while nobody adds to this store or its base.
class Entities {
 public:
  Entities() = default;
  // Looks up in this store first, then in `base` (which must outlive this store).
  explicit Entities(const Entities* base) : base_(base) {}

  // Adds or replaces an entity.
  void add(Entity entity);
  std::size_t size() const { return few_.size() + entities_.size(); }

  const Entity* find(const EntityUid& uid) const;
  // The same, when the caller already has `hash`, which must be EntityUidHash{}(uid): the
  // engine's walks hash each uid once and use it for this store and the authorizer's index.
  const Entity* find(const EntityUid& uid, std::size_t hash) const;
  // A hint that find(uid, hash) follows soon: starts reading where it will look (each layer's
  // table), so that the read overlaps other work. Changes nothing.
  void prefetch(std::size_t hash) const {
    for (const Entities* layer = this; layer != nullptr; layer = layer->base_) {
      layer->entities_.prefetch(hash);
    }
  }
  // Cedar's `in` between two entities: a == b, or b is reachable from a through parents.
  // Unknown entities have no parents. Cycles are tolerated (each entity visited once).
  bool is_in(const EntityUid& a, const EntityUid& b) const;

  // Every entity of this store (not the base), in no particular order.
  std::vector<const Entity*> all() const;

 private:
  // A store of a few entities (the request-local layer: the resource being read) keeps them in a
  // small vector, searched without hashing; past kFew they all move to the hash map.
  static constexpr std::size_t kFew = 4;
  const Entities* base_ = nullptr;
  std::vector<Entity> few_;
  internal::UidTable<Entity> entities_;  // searched by a uid and its precomputed hash
};

// Cedar's JSON entity format: an array of {"uid": {"type": T, "id": I}, "attrs": {...},
// "parents": [{"type":..,"id":..}, ...]}; "uid" and each parent may also be written
// {"__entity": {"type": T, "id": I}}. Attribute values: JSON bool, integer (64-bit), string,
// array (a set), object (a record), and entity references written {"__entity": {"type", "id"}}.
// As in Cedar without a schema, an attribute value {"type": T, "id": I} is a record, not an
// entity. Floats, nulls, extension values ("__extn"), entity tags, a type that is not a Cedar name,
// a repeated key, duplicate uids and a cycle of parents (Cedar refuses those at load too) are
// errors naming the entity and attribute.
Result<Entities> entities_from_json(const nlohmann::json& doc);
Result<Entities> entities_from_json_text(std::string_view text);

// Values from Cedar's JSON value form (as above); used for the request context.
Result<Value> value_from_json(const nlohmann::json& v);
nlohmann::json value_to_json(const Value& v);
nlohmann::json entities_to_json(const Entities& entities);

}  // namespace medgate::rules
