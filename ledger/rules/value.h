// CONSENSUS-CRITICAL (rule semantics): the values of the Cedar subset medgate's rules are written in.
//
// Cedar's value kinds within the subset: Bool, Long (64-bit signed), String, Entity (a typed uid),
// Set and Record. Sets are unordered and hold no duplicates: they are kept sorted by the total
// order below and deduplicated, so equality is set equality. Records are maps from attribute name
// to value. Values are immutable; sets and records are shared, so copying a value is cheap.
#pragma once

#include <compare>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

namespace medgate::rules {

// An entity's uid: `Practitioner::"dr-lee"`, `Action::"read"`. `type` may be namespaced
// ("Hospital::Ward"); `id` is any text.
struct EntityUid {
  std::string type;
  std::string id;
  friend auto operator<=>(const EntityUid&, const EntityUid&) = default;
  friend bool operator==(const EntityUid&, const EntityUid&) = default;
  // Cedar's text form with the id quoted and escaped: Practitioner::"dr-lee".
  std::string to_text() const;
};

struct EntityUidHash {
  std::size_t operator()(const EntityUid& u) const noexcept;
};

class Value;
using ValueSet = std::vector<Value>;              // sorted by Value's order, no duplicates
using ValueRecord = std::map<std::string, Value>;  // attribute -> value

enum class ValueKind { kBool, kLong, kString, kEntity, kSet, kRecord };

class Value {
 public:
  Value() : v_(false) {}
  explicit Value(bool b) : v_(b) {}
  explicit Value(std::int64_t n) : v_(n) {}
  explicit Value(std::string s) : v_(std::move(s)) {}
  explicit Value(EntityUid e) : v_(std::move(e)) {}
  // Sorts and deduplicates.
  static Value set(std::vector<Value> elements);
  static Value record(ValueRecord fields);

  ValueKind kind() const;
  bool is_bool() const { return kind() == ValueKind::kBool; }
  bool is_long() const { return kind() == ValueKind::kLong; }
  bool is_string() const { return kind() == ValueKind::kString; }
  bool is_entity() const { return kind() == ValueKind::kEntity; }
  bool is_set() const { return kind() == ValueKind::kSet; }
  bool is_record() const { return kind() == ValueKind::kRecord; }

  // Each accessor requires the matching kind (checked by assert; callers test the kind first).
  bool as_bool() const;
  std::int64_t as_long() const;
  const std::string& as_string() const;
  const EntityUid& as_entity() const;
  const ValueSet& as_set() const;
  const ValueRecord& as_record() const;

  // A total order: first by kind, then by content. Equality is Cedar's `==` (structural; a set
  // equals a set with the same elements in any order).
  friend std::strong_ordering operator<=>(const Value& a, const Value& b);
  friend bool operator==(const Value& a, const Value& b);

  // Cedar's text form, for messages and the printer: true, 42, "a\"b", T::"x", [1, 2], {"a": 1}.
  std::string to_text() const;

 private:
  std::variant<bool, std::int64_t, std::string, EntityUid, std::shared_ptr<const ValueSet>,
               std::shared_ptr<const ValueRecord>>
      v_;
};

std::string_view kind_name(ValueKind kind);  // "bool", "long", "string", "entity", "set", "record"

// Cedar's string escapes for the text form (\n \r \t \\ \0 \' \" \u{...}).
std::string quote_string(std::string_view s);

}  // namespace medgate::rules
