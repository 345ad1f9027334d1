// LEDGER-CRITICAL: medgate's one canonical byte encoding. Every byte string that is hashed or
// signed (entries, block headers, signed heads) is deterministic CBOR, written and read here only.
// A change to what this file produces changes every hash: refactors must not change behaviour.
//
// The encoding is RFC 8949 section 4.2.1 "core deterministic encoding" restricted to the types the
// ledger needs: unsigned and negative integers (64-bit), byte strings, UTF-8 text strings, arrays,
// maps, false, true and null. No floats, no tags, no indefinite lengths. Integers and lengths use
// the shortest form; map keys are unique and sorted by the bytewise order of their encodings.
//
// Why deterministic CBOR and not RFC 8785 JSON: hashes, keys and signatures are bytes (JSON would
// need base64 and a rule for it), 64-bit integers (entry indexes, microsecond times) are exact
// (RFC 8785 numbers are IEEE doubles), the rules are few enough to check fully when decoding, and
// the bytes are compact, which keeps hashing and verification fast.
//
// decode() is strict: any input that is not exactly what encode() would have produced is refused
// with an error naming the byte offset, so one value has one encoding and one hash.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "hsm/bytes.h"
#include "hsm/status.h"

namespace medgate::ledger::cbor {

// Nesting deeper than this is refused when decoding (and is a bug when encoding).
inline constexpr int kMaxDepth = 16;

class Value;
using Array = std::vector<Value>;
using Map = std::vector<std::pair<Value, Value>>;  // kept sorted by encoded key

struct Null {
  friend bool operator==(Null, Null) { return true; }
};

// An immutable CBOR data item. Maps are stored in canonical key order, so two equal Values encode
// to the same bytes.
class Value {
 public:
  enum class Type { kUnsigned, kNegative, kBytes, kText, kArray, kMap, kBool, kNull };

  Value() : v_(Null{}) {}
  static Value uint(std::uint64_t v) { return Value(Rep(v)); }
  // A signed integer: unsigned when >= 0, negative otherwise.
  static Value integer(std::int64_t v);
  static Value bytes(Bytes b) { return Value(Rep(std::move(b))); }
  static Value bytes(ByteView b) { return Value(Rep(Bytes(b.begin(), b.end()))); }
  static Value text(std::string s) { return Value(Rep(std::move(s))); }
  static Value array(Array items) { return Value(Rep(std::make_shared<Array>(std::move(items)))); }
  // Sorts the entries into canonical order. kInvalidArgument on a duplicate key.
  static Result<Value> map(Map entries);
  static Value boolean(bool b) { return Value(Rep(b)); }
  static Value null() { return Value(); }

  Type type() const;
  std::optional<std::uint64_t> as_uint() const;
  std::optional<std::int64_t> as_int() const;  // nullopt when out of int64 range
  const Bytes* as_bytes() const { return std::get_if<Bytes>(&v_); }
  const std::string* as_text() const { return std::get_if<std::string>(&v_); }
  const Array* as_array() const;
  const Map* as_map() const;
  std::optional<bool> as_bool() const;
  bool is_null() const { return std::holds_alternative<Null>(v_); }

  // Map lookup by text or unsigned key; nullptr when absent or not a map.
  const Value* find(std::string_view key) const;
  const Value* find(std::uint64_t key) const;

  friend bool operator==(const Value& a, const Value& b);

 private:
  struct Negative {  // the CBOR argument n of major type 1, meaning -1 - n
    std::uint64_t n;
    friend bool operator==(Negative, Negative) = default;
  };
  using Rep = std::variant<std::uint64_t, Negative, Bytes, std::string, std::shared_ptr<Array>,
                           std::shared_ptr<Map>, bool, Null>;
  explicit Value(Rep v) : v_(std::move(v)) {}
  Rep v_;
  template <bool>
  friend class Parser;
  friend void encode_to(const Value&, class Writer&);
};

// Streaming canonical writer for code that emits a fixed shape (entries, headers) without building
// a Value tree. Callers of map_header() must write keys in canonical order: for small unsigned
// keys that is ascending numeric order.
class Writer {
 public:
  void uint(std::uint64_t v) { head(0, v); }
  void integer(std::int64_t v);
  void bytes(ByteView b);
  void text(std::string_view s);
  void array_header(std::uint64_t n) { head(4, n); }
  void map_header(std::uint64_t n) { head(5, n); }
  void boolean(bool b) { out_.push_back(std::byte(b ? 0xf5 : 0xf4)); }
  void null() { out_.push_back(std::byte(0xf6)); }
  void raw(ByteView encoded) { out_.insert(out_.end(), encoded.begin(), encoded.end()); }

  const Bytes& data() const { return out_; }
  Bytes take() { return std::move(out_); }

 private:
  void head(int major, std::uint64_t arg);
  Bytes out_;
};

void encode_to(const Value& value, Writer& out);
Bytes encode(const Value& value);

// Strict decode of exactly one item filling all of `data`. kCorruption naming the byte offset and
// the rule broken (e.g. "at byte 12: integer not in shortest form").
Result<Value> decode(ByteView data);

// The same checks as decode() without building anything: the verifier's path, which must keep up
// with a million entries a second.
Status validate(ByteView data);

// Walks data that validate() accepted, without allocating: the verifier reads entry headers with
// it. Bounds are still checked (an error, never a crash), but canonical form is not re-checked.
class Cursor {
 public:
  explicit Cursor(ByteView data) : data_(data) {}
  struct Head {
    int major = 0;
    std::uint64_t arg = 0;  // the value, length or count; for major 7 the simple value
  };
  Result<Head> head();
  Result<std::uint64_t> read_uint();
  Result<ByteView> read_bytes();
  Result<std::string_view> read_text();
  Result<ByteView> read_item();  // the next item's whole encoding, skipped over
  bool at_end() const { return pos_ >= data_.size(); }

 private:
  Result<ByteView> read_string(int major);
  ByteView data_;
  std::size_t pos_ = 0;
};

// Renders a Value as JSON for people and scripts (byte strings as lowercase hex). Not canonical,
// never hashed.
nlohmann::json to_json(const Value& value);

}  // namespace medgate::ledger::cbor
