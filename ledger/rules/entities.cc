// CONSENSUS-CRITICAL (rule semantics): see entities.h. The JSON forms follow Cedar 4's entity and
// value parsers without a schema (cedar-policy-core, entities/json): what Cedar reads as a record,
// this reads as a record; what Cedar rejects, this rejects.
#include "ledger/rules/entities.h"

#include <algorithm>
#include <cstdint>
#include <limits>
#include <memory>
#include <set>
#include <string>
#include <unordered_map>
#include <utility>

#include "ledger/rules/ancestors.h"

namespace medgate::rules {

namespace {

using nlohmann::json;

// Deeper values are refused rather than recursed into (the directory is outside input). Cedar's
// own JSON reader stops at 128 levels too.
constexpr int kMaxValueDepth = 128;

std::string quote_key(std::string_view key) {
  return "`" + std::string(key) + "`";
}

// Cedar's identifiers: [_a-zA-Z][_a-zA-Z0-9]*, minus the words its grammar reserves.
bool is_identifier(std::string_view s) {
  if (s.empty()) return false;
  auto is_start = [](char c) {
    return c == '_' || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
  };
  if (!is_start(s[0])) return false;
  for (char c : s.substr(1)) {
    if (!is_start(c) && !(c >= '0' && c <= '9')) return false;
  }
  static constexpr std::string_view kReserved[] = {"true", "false", "if",   "then", "else",
                                                   "in",   "is",    "like", "has",  "__cedar"};
  return std::find(std::begin(kReserved), std::end(kReserved), s) == std::end(kReserved);
}

// An entity type: identifiers joined by "::", with no whitespace (Cedar's normalized Name).
bool is_entity_type(std::string_view s) {
  while (true) {
    std::size_t sep = s.find("::");
    if (!is_identifier(s.substr(0, sep))) return false;
    if (sep == std::string_view::npos) return true;
    s.remove_prefix(sep + 2);
  }
}

std::string json_kind(const json& v) {
  switch (v.type()) {
    case json::value_t::null:
      return "null";
    case json::value_t::boolean:
      return "a boolean";
    case json::value_t::number_integer:
    case json::value_t::number_unsigned:
      return "an integer";
    case json::value_t::number_float:
      return "a float";
    case json::value_t::string:
      return "a string";
    case json::value_t::array:
      return "an array";
    case json::value_t::object:
      return "an object";
    case json::value_t::binary:
      return "binary data";
    case json::value_t::discarded:
      return "nothing";
  }
  return "an unknown JSON value";
}

Result<EntityUid> uid_from_type_and_id(const json& type, const json& id) {
  if (!type.is_string()) return Status::InvalidArgument("entity \"type\" must be a string");
  if (!id.is_string()) return Status::InvalidArgument("entity \"id\" must be a string");
  EntityUid uid{type.get<std::string>(), id.get<std::string>()};
  if (!is_entity_type(uid.type)) {
    return Status::InvalidArgument("invalid entity type " + quote_string(uid.type));
  }
  return uid;
}

// A uid as written in "uid" and "parents": {"type": T, "id": I} or {"__entity": {...}}.
Result<EntityUid> uid_from_json(const json& v) {
  if (!v.is_object()) {
    return Status::InvalidArgument("expected an entity reference object, got " + json_kind(v));
  }
  if (v.contains("__expr")) {
    return Status::InvalidArgument("the __expr escape is not supported");
  }
  const json* body = &v;
  if (auto escape = v.find("__entity"); escape != v.end()) {
    if (!escape->is_object()) {
      return Status::InvalidArgument("__entity must be an object, got " + json_kind(*escape));
    }
    body = &*escape;
  }
  auto type = body->find("type");
  auto id = body->find("id");
  if (type == body->end() || id == body->end()) {
    return Status::InvalidArgument("an entity reference needs \"type\" and \"id\"");
  }
  return uid_from_type_and_id(*type, *id);
}

// Cedar reads an object as an escape only when it has exactly one key and the body has the
// escape's shape; anything else is a record, even with a key named "__entity".
Result<Value> value_from_json_at(const json& v, int depth);

Result<Value> object_from_json(const json& v, int depth) {
  if (v.size() == 1) {
    const std::string& key = v.begin().key();
    const json& body = v.begin().value();
    if (key == "__entity" && body.is_object() && body.size() >= 2) {
      auto type = body.find("type");
      auto id = body.find("id");
      if (type != body.end() && id != body.end() && type->is_string() && id->is_string()) {
        MEDGATE_ASSIGN_OR_RETURN(EntityUid uid, uid_from_type_and_id(*type, *id));
        return Value(std::move(uid));
      }
    }
    if (key == "__extn" && body.is_object() && body.size() >= 2) {
      auto fn = body.find("fn");
      if (fn != body.end() && fn->is_string() &&
          (body.contains("arg") || (body.contains("args") && body["args"].is_array()))) {
        return Status::InvalidArgument("extension values (__extn " +
                                       quote_string(fn->get<std::string>()) +
                                       ") are not supported");
      }
    }
    if (key == "__expr" && body.is_string()) {
      return Status::InvalidArgument("the __expr escape is not supported");
    }
  }
  ValueRecord fields;
  for (const auto& [key, field] : v.items()) {
    auto value = value_from_json_at(field, depth + 1);
    if (!value.ok()) return value.status().with_context("attribute " + quote_key(key));
    fields.emplace(key, std::move(value).value());
  }
  return Value::record(std::move(fields));
}

Result<Value> value_from_json_at(const json& v, int depth) {
  if (depth > kMaxValueDepth) {
    return Status::InvalidArgument("value nested deeper than " + std::to_string(kMaxValueDepth) +
                                   " levels");
  }
  switch (v.type()) {
    case json::value_t::boolean:
      return Value(v.get<bool>());
    case json::value_t::number_integer:
      return Value(v.get<std::int64_t>());
    case json::value_t::number_unsigned: {
      auto n = v.get<std::uint64_t>();
      if (n > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max())) {
        return Status::InvalidArgument("integer " + std::to_string(n) +
                                       " does not fit a 64-bit signed long");
      }
      return Value(static_cast<std::int64_t>(n));
    }
    case json::value_t::string:
      return Value(v.get<std::string>());
    case json::value_t::array: {
      std::vector<Value> elements;
      elements.reserve(v.size());
      std::size_t index = 0;
      for (const json& element : v) {
        auto value = value_from_json_at(element, depth + 1);
        if (!value.ok()) {
          return value.status().with_context("set element " + std::to_string(index));
        }
        elements.push_back(std::move(value).value());
        ++index;
      }
      return Value::set(std::move(elements));
    }
    case json::value_t::object:
      return object_from_json(v, depth);
    case json::value_t::number_float:
      return Status::InvalidArgument("floats are not supported (" + v.dump() + ")");
    case json::value_t::null:
      return Status::InvalidArgument("null is not a value");
    case json::value_t::binary:
    case json::value_t::discarded:
      return Status::InvalidArgument(json_kind(v) + " is not a value");
  }
  return Status::InvalidArgument("unknown JSON value");
}

Result<Entity> entity_from_json(const json& item) {
  if (!item.is_object()) {
    return Status::InvalidArgument("expected an entity object, got " + json_kind(item));
  }
  auto uid_json = item.find("uid");
  if (uid_json == item.end()) return Status::InvalidArgument("missing \"uid\"");
  auto uid = uid_from_json(*uid_json);
  if (!uid.ok()) return uid.status().with_context("uid");

  Entity entity;
  entity.uid = std::move(uid).value();
  const std::string name = "entity " + entity.uid.to_text();

  auto attrs = item.find("attrs");
  if (attrs == item.end()) return Status::InvalidArgument(name + ": missing \"attrs\"");
  if (!attrs->is_object()) {
    return Status::InvalidArgument(name + ": \"attrs\" must be an object, got " +
                                   json_kind(*attrs));
  }
  for (const auto& [key, field] : attrs->items()) {
    auto value = value_from_json_at(field, 1);
    if (!value.ok()) {
      return value.status().with_context(name + ": attribute " + quote_key(key));
    }
    entity.attrs.emplace(key, std::move(value).value());
  }

  auto parents = item.find("parents");
  if (parents == item.end()) return Status::InvalidArgument(name + ": missing \"parents\"");
  if (!parents->is_array()) {
    return Status::InvalidArgument(name + ": \"parents\" must be an array, got " +
                                   json_kind(*parents));
  }
  std::size_t index = 0;
  for (const json& p : *parents) {
    auto parent = uid_from_json(p);
    if (!parent.ok()) {
      return parent.status().with_context(name + ": parent " + std::to_string(index));
    }
    // Parents are a set in Cedar; a repeat changes nothing.
    if (std::find(entity.parents.begin(), entity.parents.end(), *parent) == entity.parents.end()) {
      entity.parents.push_back(std::move(parent).value());
    }
    ++index;
  }

  // Entity tags (Cedar 4) are outside medgate's subset; an empty "tags" is harmless.
  if (auto tags = item.find("tags"); tags != item.end() && !(tags->is_object() && tags->empty())) {
    return Status::InvalidArgument(name + ": entity tags are not supported");
  }
  return entity;
}

// Cedar refuses an entity graph with a cycle when it loads it (it computes each entity's
// ancestors then, and an entity may not be its own). Depth-first over the parents, iteratively
// (an imported chain can be long); names an entity on the cycle.
Status check_acyclic(const Entities& entities) {
  enum class Mark { kOpen, kDone };
  std::unordered_map<const Entity*, Mark> marks;
  struct Frame {
    const Entity* entity;
    std::size_t next_parent;
  };
  std::vector<Frame> stack;
  for (const Entity* root : entities.all()) {
    if (marks.count(root) != 0) continue;
    marks.emplace(root, Mark::kOpen);
    stack.push_back(Frame{root, 0});
    while (!stack.empty()) {
      Frame& top = stack.back();
      if (top.next_parent == top.entity->parents.size()) {
        marks[top.entity] = Mark::kDone;
        stack.pop_back();
        continue;
      }
      const Entity* parent = entities.find(top.entity->parents[top.next_parent++]);
      if (parent == nullptr) continue;  // not in the store: no parents of its own
      auto [it, fresh] = marks.emplace(parent, Mark::kOpen);
      if (fresh) {
        stack.push_back(Frame{parent, 0});
      } else if (it->second == Mark::kOpen) {
        return Status::InvalidArgument("entities: entity " + parent->uid.to_text() +
                                       " is its own ancestor (its parents form a cycle)");
      }
    }
  }
  return Status::Ok();
}

json uid_to_json(const EntityUid& uid) {
  return json{{"type", uid.type}, {"id", uid.id}};
}

}  // namespace

// ---- the store ------------------------------------------------------------------------------

void Entities::add(Entity entity) {
  if (entities_.empty()) {
    for (Entity& e : few_) {
      if (e.uid == entity.uid) {
        e = std::move(entity);
        return;
      }
    }
    if (few_.size() < kFew) {
      if (few_.empty()) few_.reserve(kFew);
      few_.push_back(std::move(entity));
      return;
    }
    for (Entity& e : few_) {
      const std::size_t hash = EntityUidHash{}(e.uid);
      entities_.insert(std::make_unique<Entity>(std::move(e)), hash);
    }
    few_.clear();
  }
  const std::size_t hash = EntityUidHash{}(entity.uid);
  if (Entity* present = entities_.find(entity.uid, hash)) {
    *present = std::move(entity);
  } else {
    entities_.insert(std::make_unique<Entity>(std::move(entity)), hash);
  }
}

const Entity* Entities::find(const EntityUid& uid) const {
  // The request-local layer (a few entities, no hashing) is searched before anything is hashed.
  const Entities* layer = this;
  for (; layer != nullptr && layer->entities_.empty(); layer = layer->base_) {
    for (const Entity& e : layer->few_) {
      if (e.uid == uid) return &e;
    }
  }
  if (layer == nullptr) return nullptr;
  return layer->find(uid, EntityUidHash{}(uid));
}

const Entity* Entities::find(const EntityUid& uid, std::size_t hash) const {
  for (const Entities* layer = this; layer != nullptr; layer = layer->base_) {
    for (const Entity& e : layer->few_) {
      if (e.uid == uid) return &e;
    }
    if (layer->entities_.empty()) continue;
    if (const Entity* e = layer->entities_.find(uid, hash)) return e;
  }
  return nullptr;
}

bool Entities::is_in(const EntityUid& a, const EntityUid& b) const {
  if (a == b) return true;
  const Entity* entity = find(a);
  if (entity == nullptr) return false;
  // The common case (a direct parent) needs no walk.
  for (const EntityUid& parent : entity->parents) {
    if (parent == b) return true;
  }
  return internal::walk_ancestors(*this, a,
                                  [&](const EntityUid& uid, std::size_t) { return uid == b; });
}

std::vector<const Entity*> Entities::all() const {
  std::vector<const Entity*> out;
  out.reserve(size());
  for (const Entity& entity : few_) out.push_back(&entity);
  entities_.for_each([&](const Entity& entity) { out.push_back(&entity); });
  return out;
}

// ---- JSON ---------------------------------------------------------------------------------------

Result<Value> value_from_json(const nlohmann::json& v) {
  return value_from_json_at(v, 1);
}

nlohmann::json value_to_json(const Value& v) {
  switch (v.kind()) {
    case ValueKind::kBool:
      return v.as_bool();
    case ValueKind::kLong:
      return v.as_long();
    case ValueKind::kString:
      return v.as_string();
    case ValueKind::kEntity:
      return json{{"__entity", uid_to_json(v.as_entity())}};
    case ValueKind::kSet: {
      json out = json::array();
      for (const Value& e : v.as_set()) out.push_back(value_to_json(e));
      return out;
    }
    case ValueKind::kRecord: {
      json out = json::object();
      for (const auto& [key, field] : v.as_record()) out[key] = value_to_json(field);
      return out;
    }
  }
  return nullptr;
}

Result<Entities> entities_from_json(const nlohmann::json& doc) {
  if (!doc.is_array()) {
    return Status::InvalidArgument("entities: expected a JSON array, got " + json_kind(doc));
  }
  Entities entities;
  std::size_t index = 0;
  for (const json& item : doc) {
    auto entity = entity_from_json(item);
    if (!entity.ok()) {
      return entity.status().with_context("entities: entry " + std::to_string(index));
    }
    if (entities.find(entity->uid) != nullptr) {
      return Status::InvalidArgument("entities: entry " + std::to_string(index) + ": entity " +
                                     entity->uid.to_text() + " appears twice");
    }
    entities.add(std::move(entity).value());
    ++index;
  }
  MEDGATE_RETURN_IF_ERROR(check_acyclic(entities));
  return entities;
}

Result<Entities> entities_from_json_text(std::string_view text) {
  // Cedar refuses an object with a repeated key; nlohmann would silently keep one of them, so
  // the keys are watched while parsing.
  std::vector<std::set<std::string>> open_objects;
  std::string repeated_key;
  auto watch = [&](int /*depth*/, json::parse_event_t event, json& parsed) {
    switch (event) {
      case json::parse_event_t::object_start:
        open_objects.emplace_back();
        break;
      case json::parse_event_t::key:
        if (!open_objects.empty() && repeated_key.empty() &&
            !open_objects.back().insert(parsed.get<std::string>()).second) {
          repeated_key = parsed.get<std::string>();
        }
        break;
      case json::parse_event_t::object_end:
        if (!open_objects.empty()) open_objects.pop_back();
        break;
      case json::parse_event_t::array_start:
      case json::parse_event_t::array_end:
      case json::parse_event_t::value:
        break;
    }
    return true;
  };
  json doc = json::parse(text.begin(), text.end(), watch, /*allow_exceptions=*/false);
  if (doc.is_discarded()) return Status::InvalidArgument("entities: not valid JSON");
  if (!repeated_key.empty()) {
    return Status::InvalidArgument("entities: key " + quote_key(repeated_key) +
                                   " appears twice in one object");
  }
  return entities_from_json(doc);
}

nlohmann::json entities_to_json(const Entities& entities) {
  std::vector<const Entity*> all = entities.all();
  std::sort(all.begin(), all.end(),
            [](const Entity* a, const Entity* b) { return a->uid < b->uid; });
  json out = json::array();
  for (const Entity* entity : all) {
    json attrs = json::object();
    for (const auto& [key, value] : entity->attrs) attrs[key] = value_to_json(value);
    json parents = json::array();
    for (const EntityUid& parent : entity->parents) parents.push_back(uid_to_json(parent));
    out.push_back(json{{"uid", uid_to_json(entity->uid)},
                       {"attrs", std::move(attrs)},
                       {"parents", std::move(parents)}});
  }
  return out;
}

}  // namespace medgate::rules
