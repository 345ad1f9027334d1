// CONSENSUS-CRITICAL (rule semantics): see value.h.
#include "ledger/rules/value.h"

#include <algorithm>
#include <cassert>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>

namespace medgate::rules {

namespace {

// Index of each alternative in Value's variant, in ValueKind order.
constexpr ValueKind kKinds[] = {ValueKind::kBool,   ValueKind::kLong, ValueKind::kString,
                                ValueKind::kEntity, ValueKind::kSet,  ValueKind::kRecord};

}  // namespace

std::string quote_string(std::string_view s) {
  std::string out = "\"";
  for (unsigned char c : s) {
    switch (c) {
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      case '\\': out += "\\\\"; break;
      case '\0': out += "\\0"; break;
      case '"': out += "\\\""; break;
      default:
        if (c < 0x20 || c == 0x7f) {
          char buf[12];
          std::snprintf(buf, sizeof buf, "\\u{%x}", c);
          out += buf;
        } else {
          out += static_cast<char>(c);
        }
    }
  }
  out += '"';
  return out;
}

std::string EntityUid::to_text() const { return type + "::" + quote_string(id); }

namespace {

// Eight bytes at a time with a multiply-xorshift step, the length folded in, and Murmur3's
// finalizer so that the low bits (which pick a hash table slot) depend on every input bit. Uids
// are short ("Practitioner", "d1234"): a third of the cost of two std::hash<std::string> calls,
// which matters because a decision hashes each uid it meets. Only ever held in memory.
std::uint64_t hash_step(std::uint64_t h, std::uint64_t v) {
  h = (h ^ v) * 0x9e3779b97f4a7c15ULL;
  return h ^ (h >> 29);
}

std::uint64_t hash_text(std::uint64_t h, std::string_view s) {
  const char* p = s.data();
  std::size_t n = s.size();
  for (; n >= 8; p += 8, n -= 8) {
    std::uint64_t v;
    std::memcpy(&v, p, 8);
    h = hash_step(h, v);
  }
  std::uint64_t tail = 0;
  std::memcpy(&tail, p, n);
  return hash_step(h, tail ^ (static_cast<std::uint64_t>(s.size()) << 56));
}

}  // namespace

std::size_t EntityUidHash::operator()(const EntityUid& u) const noexcept {
  std::uint64_t h = hash_text(hash_text(0x243f6a8885a308d3ULL, u.type), u.id);
  h ^= h >> 33;
  h *= 0xff51afd7ed558ccdULL;
  h ^= h >> 33;
  h *= 0xc4ceb9fe1a85ec53ULL;
  h ^= h >> 33;
  return static_cast<std::size_t>(h);
}

Value Value::set(std::vector<Value> elements) {
  std::sort(elements.begin(), elements.end());
  elements.erase(std::unique(elements.begin(), elements.end()), elements.end());
  Value v;
  v.v_ = std::make_shared<const ValueSet>(std::move(elements));
  return v;
}

Value Value::record(ValueRecord fields) {
  Value v;
  v.v_ = std::make_shared<const ValueRecord>(std::move(fields));
  return v;
}

ValueKind Value::kind() const { return kKinds[v_.index()]; }

bool Value::as_bool() const {
  assert(is_bool());
  return std::get<bool>(v_);
}
std::int64_t Value::as_long() const {
  assert(is_long());
  return std::get<std::int64_t>(v_);
}
const std::string& Value::as_string() const {
  assert(is_string());
  return std::get<std::string>(v_);
}
const EntityUid& Value::as_entity() const {
  assert(is_entity());
  return std::get<EntityUid>(v_);
}
const ValueSet& Value::as_set() const {
  assert(is_set());
  return *std::get<std::shared_ptr<const ValueSet>>(v_);
}
const ValueRecord& Value::as_record() const {
  assert(is_record());
  return *std::get<std::shared_ptr<const ValueRecord>>(v_);
}

std::strong_ordering operator<=>(const Value& a, const Value& b) {
  if (a.v_.index() != b.v_.index()) return a.v_.index() <=> b.v_.index();
  switch (a.kind()) {
    case ValueKind::kBool:
      return a.as_bool() <=> b.as_bool();
    case ValueKind::kLong:
      return a.as_long() <=> b.as_long();
    case ValueKind::kString:
      return a.as_string().compare(b.as_string()) <=> 0;
    case ValueKind::kEntity:
      return a.as_entity() <=> b.as_entity();
    case ValueKind::kSet: {
      const ValueSet& x = a.as_set();
      const ValueSet& y = b.as_set();
      return std::lexicographical_compare_three_way(x.begin(), x.end(), y.begin(), y.end());
    }
    case ValueKind::kRecord: {
      const ValueRecord& x = a.as_record();
      const ValueRecord& y = b.as_record();
      auto xi = x.begin();
      auto yi = y.begin();
      for (; xi != x.end() && yi != y.end(); ++xi, ++yi) {
        if (auto c = xi->first.compare(yi->first) <=> 0; c != 0) return c;
        if (auto c = xi->second <=> yi->second; c != 0) return c;
      }
      return x.size() <=> y.size();
    }
  }
  return std::strong_ordering::equal;
}

bool operator==(const Value& a, const Value& b) { return (a <=> b) == 0; }

std::string_view kind_name(ValueKind kind) {
  switch (kind) {
    case ValueKind::kBool: return "bool";
    case ValueKind::kLong: return "long";
    case ValueKind::kString: return "string";
    case ValueKind::kEntity: return "entity";
    case ValueKind::kSet: return "set";
    case ValueKind::kRecord: return "record";
  }
  return "unknown";
}

std::string Value::to_text() const {
  switch (kind()) {
    case ValueKind::kBool:
      return as_bool() ? "true" : "false";
    case ValueKind::kLong:
      return std::to_string(as_long());
    case ValueKind::kString:
      return quote_string(as_string());
    case ValueKind::kEntity:
      return as_entity().to_text();
    case ValueKind::kSet: {
      std::string out = "[";
      bool first = true;
      for (const Value& e : as_set()) {
        if (!first) out += ", ";
        first = false;
        out += e.to_text();
      }
      return out + "]";
    }
    case ValueKind::kRecord: {
      std::string out = "{";
      bool first = true;
      for (const auto& [k, v] : as_record()) {
        if (!first) out += ", ";
        first = false;
        out += quote_string(k) + ": " + v.to_text();
      }
      return out + "}";
    }
  }
  return "";
}

}  // namespace medgate::rules
