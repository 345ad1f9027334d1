// LEDGER-CRITICAL: see cbor.h. Behaviour here defines every hash on the ledger.
#include "ledger/cbor.h"

#include <algorithm>
#include <cstring>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

namespace medgate::ledger::cbor {

// ---- Value ----------------------------------------------------------------------------------

Value Value::integer(std::int64_t v) {
  if (v >= 0) return uint(static_cast<std::uint64_t>(v));
  // -1 - n = v  =>  n = -1 - v, computed without overflow for INT64_MIN.
  return Value(Rep(Negative{static_cast<std::uint64_t>(-(v + 1))}));
}

Result<Value> Value::map(Map entries) {
  std::vector<std::pair<Bytes, std::size_t>> keys;
  keys.reserve(entries.size());
  for (std::size_t i = 0; i < entries.size(); ++i) keys.emplace_back(encode(entries[i].first), i);
  std::sort(keys.begin(), keys.end());
  for (std::size_t i = 1; i < keys.size(); ++i)
    if (keys[i].first == keys[i - 1].first)
      return Status::InvalidArgument("duplicate map key " +
                                     to_json(entries[keys[i].second].first).dump());
  auto sorted = std::make_shared<Map>();
  sorted->reserve(entries.size());
  for (auto& [bytes, index] : keys) sorted->push_back(std::move(entries[index]));
  return Value(Rep(std::move(sorted)));
}

Value::Type Value::type() const {
  switch (v_.index()) {
    case 0:
      return Type::kUnsigned;
    case 1:
      return Type::kNegative;
    case 2:
      return Type::kBytes;
    case 3:
      return Type::kText;
    case 4:
      return Type::kArray;
    case 5:
      return Type::kMap;
    case 6:
      return Type::kBool;
    default:
      return Type::kNull;
  }
}

std::optional<std::uint64_t> Value::as_uint() const {
  if (auto* u = std::get_if<std::uint64_t>(&v_)) return *u;
  return std::nullopt;
}

std::optional<std::int64_t> Value::as_int() const {
  if (auto* u = std::get_if<std::uint64_t>(&v_)) {
    if (*u > static_cast<std::uint64_t>(INT64_MAX)) return std::nullopt;
    return static_cast<std::int64_t>(*u);
  }
  if (auto* n = std::get_if<Negative>(&v_)) {
    if (n->n > static_cast<std::uint64_t>(INT64_MAX)) return std::nullopt;
    return -1 - static_cast<std::int64_t>(n->n);
  }
  return std::nullopt;
}

const Array* Value::as_array() const {
  auto* a = std::get_if<std::shared_ptr<Array>>(&v_);
  return a ? a->get() : nullptr;
}

const Map* Value::as_map() const {
  auto* m = std::get_if<std::shared_ptr<Map>>(&v_);
  return m ? m->get() : nullptr;
}

std::optional<bool> Value::as_bool() const {
  if (auto* b = std::get_if<bool>(&v_)) return *b;
  return std::nullopt;
}

const Value* Value::find(std::string_view key) const {
  const Map* m = as_map();
  if (!m) return nullptr;
  for (const auto& [k, v] : *m)
    if (const std::string* t = k.as_text(); t && *t == key) return &v;
  return nullptr;
}

const Value* Value::find(std::uint64_t key) const {
  const Map* m = as_map();
  if (!m) return nullptr;
  for (const auto& [k, v] : *m)
    if (auto u = k.as_uint(); u && *u == key) return &v;
  return nullptr;
}

bool operator==(const Value& a, const Value& b) {
  if (a.v_.index() != b.v_.index()) return false;
  if (const Array* x = a.as_array()) return *x == *b.as_array();
  if (const Map* x = a.as_map()) return *x == *b.as_map();
  return a.v_ == b.v_;
}

// ---- Writer ---------------------------------------------------------------------------------

void Writer::head(int major, std::uint64_t arg) {
  auto m = static_cast<unsigned>(major) << 5;
  auto put = [&](unsigned additional, int nbytes) {
    out_.push_back(std::byte(m | additional));
    for (int i = nbytes - 1; i >= 0; --i) out_.push_back(std::byte((arg >> (8 * i)) & 0xff));
  };
  if (arg < 24)
    put(static_cast<unsigned>(arg), 0);
  else if (arg <= 0xff)
    put(24, 1);
  else if (arg <= 0xffff)
    put(25, 2);
  else if (arg <= 0xffffffffULL)
    put(26, 4);
  else
    put(27, 8);
}

void Writer::integer(std::int64_t v) {
  if (v >= 0)
    head(0, static_cast<std::uint64_t>(v));
  else
    head(1, static_cast<std::uint64_t>(-(v + 1)));
}

void Writer::bytes(ByteView b) {
  head(2, b.size());
  out_.insert(out_.end(), b.begin(), b.end());
}

void Writer::text(std::string_view s) {
  head(3, s.size());
  auto b = as_bytes(s);
  out_.insert(out_.end(), b.begin(), b.end());
}

void encode_to(const Value& value, Writer& out) {
  std::visit(
      [&](const auto& v) {
        using T = std::decay_t<decltype(v)>;
        if constexpr (std::is_same_v<T, std::uint64_t>)
          out.uint(v);
        else if constexpr (std::is_same_v<T, Value::Negative>) {
          // Writer::integer cannot express -2^64..-2^63-1; write the head directly.
          Writer tmp;
          tmp.uint(v.n);
          Bytes b = tmp.take();
          b[0] = std::byte(std::to_integer<unsigned>(b[0]) | 0x20);
          out.raw(b);
        } else if constexpr (std::is_same_v<T, Bytes>)
          out.bytes(v);
        else if constexpr (std::is_same_v<T, std::string>)
          out.text(v);
        else if constexpr (std::is_same_v<T, std::shared_ptr<Array>>) {
          out.array_header(v->size());
          for (const Value& item : *v) encode_to(item, out);
        } else if constexpr (std::is_same_v<T, std::shared_ptr<Map>>) {
          out.map_header(v->size());
          for (const auto& [k, item] : *v) {
            encode_to(k, out);
            encode_to(item, out);
          }
        } else if constexpr (std::is_same_v<T, bool>)
          out.boolean(v);
        else
          out.null();
      },
      value.v_);
}

Bytes encode(const Value& value) {
  Writer w;
  encode_to(value, w);
  return w.take();
}

// ---- Decoder --------------------------------------------------------------------------------

namespace {

// RFC 3629 UTF-8: no overlong forms, no surrogates, nothing above U+10FFFF. ASCII runs are
// checked eight bytes at a time: ledger text is nearly all ASCII and this is on the verifier's
// path.
bool valid_utf8(const unsigned char* s, std::size_t n) {
  std::size_t i = 0;
  while (i < n) {
    while (i + 8 <= n) {
      std::uint64_t word;
      std::memcpy(&word, s + i, 8);
      if (word & 0x8080808080808080ULL) break;
      i += 8;
    }
    if (i >= n) break;
    unsigned c = s[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    std::size_t len;
    unsigned cp;
    if (c >= 0xc2 && c <= 0xdf) {
      len = 2;
      cp = c & 0x1f;
    } else if (c >= 0xe0 && c <= 0xef) {
      len = 3;
      cp = c & 0x0f;
    } else if (c >= 0xf0 && c <= 0xf4) {
      len = 4;
      cp = c & 0x07;
    } else
      return false;
    if (n - i < len) return false;
    for (std::size_t k = 1; k < len; ++k) {
      if ((s[i + k] & 0xc0) != 0x80) return false;
      cp = (cp << 6) | (s[i + k] & 0x3f);
    }
    if ((len == 3 && cp < 0x800) || (len == 4 && (cp < 0x10000 || cp > 0x10ffff)) ||
        (cp >= 0xd800 && cp <= 0xdfff))
      return false;
    i += len;
  }
  return true;
}

struct Nothing {};

}  // namespace

// One strict parser for both uses: Parser<true> builds Values (decode), Parser<false> only checks
// (validate), so the two can never disagree about what is canonical.
template <bool kBuild>
class Parser {
 public:
  using Item = std::conditional_t<kBuild, Value, Nothing>;

  explicit Parser(ByteView data) : data_(data) {}

  Result<Item> item(int depth) {
    if (depth > kMaxDepth) return error(fmt::format("nesting deeper than {}", kMaxDepth));
    std::size_t start = pos_;
    if (pos_ >= data_.size()) return error("unexpected end of data");
    unsigned initial = std::to_integer<unsigned>(data_[pos_++]);
    unsigned major = initial >> 5, additional = initial & 0x1f;
    if (major == 7) {
      switch (additional) {
        case 20:
        case 21:
          if constexpr (kBuild) return Value::boolean(additional == 21);
          return Item{};
        case 22:
          if constexpr (kBuild) return Value::null();
          return Item{};
        default:
          return error_at(start, "floats, undefined and other simple values are not allowed");
      }
    }
    if (major == 6) return error_at(start, "tags are not allowed");
    std::uint64_t arg = 0;
    if (additional < 24) {
      arg = additional;
    } else if (additional <= 27) {
      int nbytes = 1 << (additional - 24);
      if (data_.size() - pos_ < static_cast<std::size_t>(nbytes))
        return error("unexpected end of data");
      for (int i = 0; i < nbytes; ++i) arg = (arg << 8) | std::to_integer<unsigned>(data_[pos_++]);
      std::uint64_t min = additional == 24 ? 24 : (1ULL << (8 * (nbytes / 2)));
      if (arg < min) return error_at(start, "integer or length not in shortest form");
    } else if (additional == 31) {
      return error_at(start, "indefinite lengths are not allowed");
    } else {
      return error_at(start, "reserved additional information value");
    }
    std::size_t remaining = data_.size() - pos_;
    switch (major) {
      case 0:
        if constexpr (kBuild) return Value::uint(arg);
        return Item{};
      case 1:
        if constexpr (kBuild) return Value(Value::Rep(Value::Negative{arg}));
        return Item{};
      case 2:
      case 3: {
        if (arg > remaining) return error_at(start, "string runs past the end of the data");
        auto body = data_.subspan(pos_, static_cast<std::size_t>(arg));
        pos_ += body.size();
        if (major == 3 && !valid_utf8(u8(body), body.size()))
          return error_at(start, "text string is not valid UTF-8");
        if constexpr (kBuild) return major == 2 ? Value::bytes(body) : Value::text(to_string(body));
        return Item{};
      }
      case 4: {
        // Each item takes at least one byte: refuse counts the data cannot hold before allocating.
        if (arg > remaining) return error_at(start, "array is longer than the data");
        Array items;
        if constexpr (kBuild) items.reserve(static_cast<std::size_t>(arg));
        for (std::uint64_t i = 0; i < arg; ++i) {
          MEDGATE_ASSIGN_OR_RETURN(Item v, item(depth + 1));
          if constexpr (kBuild) items.push_back(std::move(v));
        }
        if constexpr (kBuild) return Value::array(std::move(items));
        return Item{};
      }
      case 5: {
        if (arg > remaining / 2) return error_at(start, "map is longer than the data");
        std::shared_ptr<Map> entries;
        if constexpr (kBuild) {
          entries = std::make_shared<Map>();
          entries->reserve(static_cast<std::size_t>(arg));
        }
        ByteView prev_key;
        for (std::uint64_t i = 0; i < arg; ++i) {
          std::size_t key_start = pos_;
          MEDGATE_ASSIGN_OR_RETURN(Item k, item(depth + 1));
          ByteView key = data_.subspan(key_start, pos_ - key_start);
          if (i > 0) {
            bool ascending = std::lexicographical_compare(prev_key.begin(), prev_key.end(),
                                                          key.begin(), key.end());
            if (!ascending)
              return error_at(key_start,
                              std::equal(prev_key.begin(), prev_key.end(), key.begin(), key.end())
                                  ? "duplicate map key"
                                  : "map keys not in canonical order");
          }
          prev_key = key;
          MEDGATE_ASSIGN_OR_RETURN(Item v, item(depth + 1));
          if constexpr (kBuild) entries->emplace_back(std::move(k), std::move(v));
        }
        if constexpr (kBuild) return Value(Value::Rep(std::move(entries)));
        return Item{};
      }
      default:
        return error_at(start, "unknown major type");
    }
  }

  Result<Item> whole() {
    MEDGATE_ASSIGN_OR_RETURN(Item v, item(0));
    if (pos_ != data_.size())
      return Status::Corruption(fmt::format("CBOR at byte {}: {} trailing bytes after the item",
                                            pos_, data_.size() - pos_));
    return v;
  }

 private:
  Status error(const std::string& what) const { return error_at(pos_, what); }
  Status error_at(std::size_t at, const std::string& what) const {
    return Status::Corruption(fmt::format("CBOR at byte {}: {}", at, what));
  }

  ByteView data_;
  std::size_t pos_ = 0;
};

Result<Value> decode(ByteView data) {
  return Parser<true>(data).whole();
}

Status validate(ByteView data) {
  return Parser<false>(data).whole().status();
}

// ---- Cursor ---------------------------------------------------------------------------------

Result<Cursor::Head> Cursor::head() {
  if (pos_ >= data_.size()) return Status::Corruption("CBOR: unexpected end of data");
  unsigned initial = std::to_integer<unsigned>(data_[pos_++]);
  Head h{static_cast<int>(initial >> 5), initial & 0x1f};
  unsigned additional = initial & 0x1f;
  if (h.major == 7 || additional < 24) return h;
  if (additional > 27) return Status::Corruption("CBOR: unsupported length encoding");
  std::size_t nbytes = std::size_t{1} << (additional - 24);
  if (data_.size() - pos_ < nbytes) return Status::Corruption("CBOR: unexpected end of data");
  h.arg = 0;
  for (std::size_t i = 0; i < nbytes; ++i)
    h.arg = (h.arg << 8) | std::to_integer<unsigned>(data_[pos_++]);
  return h;
}

Result<std::uint64_t> Cursor::read_uint() {
  MEDGATE_ASSIGN_OR_RETURN(Head h, head());
  if (h.major != 0) return Status::Corruption("CBOR: expected an unsigned integer");
  return h.arg;
}

Result<ByteView> Cursor::read_string(int major) {
  MEDGATE_ASSIGN_OR_RETURN(Head h, head());
  if (h.major != major)
    return Status::Corruption(major == 2 ? "CBOR: expected bytes" : "CBOR: expected text");
  if (h.arg > data_.size() - pos_)
    return Status::Corruption("CBOR: string runs past the end of the data");
  ByteView out = data_.subspan(pos_, static_cast<std::size_t>(h.arg));
  pos_ += out.size();
  return out;
}

Result<ByteView> Cursor::read_bytes() {
  return read_string(2);
}

Result<std::string_view> Cursor::read_text() {
  MEDGATE_ASSIGN_OR_RETURN(ByteView b, read_string(3));
  return std::string_view(reinterpret_cast<const char*>(b.data()), b.size());
}

Result<ByteView> Cursor::read_item() {
  std::size_t start = pos_;
  // Items to skip: validated data nests at most kMaxDepth deep, so a counter suffices.
  std::uint64_t pending = 1;
  while (pending > 0) {
    --pending;
    MEDGATE_ASSIGN_OR_RETURN(Head h, head());
    switch (h.major) {
      case 2:
      case 3:
        if (h.arg > data_.size() - pos_)
          return Status::Corruption("CBOR: string runs past the end of the data");
        pos_ += static_cast<std::size_t>(h.arg);
        break;
      case 4:
        if (h.arg > data_.size()) return Status::Corruption("CBOR: array is longer than the data");
        pending += h.arg;
        break;
      case 5:
        if (h.arg > data_.size()) return Status::Corruption("CBOR: map is longer than the data");
        pending += 2 * h.arg;
        break;
      default:
        break;
    }
  }
  return data_.subspan(start, pos_ - start);
}

// ---- JSON rendering -------------------------------------------------------------------------

nlohmann::json to_json(const Value& value) {
  switch (value.type()) {
    case Value::Type::kUnsigned:
      return *value.as_uint();
    case Value::Type::kNegative: {
      if (auto i = value.as_int()) return *i;
      return "(integer below -2^63)";
    }
    case Value::Type::kBytes:
      return to_hex(*value.as_bytes());
    case Value::Type::kText:
      return *value.as_text();
    case Value::Type::kArray: {
      nlohmann::json a = nlohmann::json::array();
      for (const Value& v : *value.as_array()) a.push_back(to_json(v));
      return a;
    }
    case Value::Type::kMap: {
      nlohmann::json o = nlohmann::json::object();
      for (const auto& [k, v] : *value.as_map()) {
        std::string key = k.as_text() ? *k.as_text() : to_json(k).dump();
        o[key] = to_json(v);
      }
      return o;
    }
    case Value::Type::kBool:
      return *value.as_bool();
    case Value::Type::kNull:
      return nullptr;
  }
  return nullptr;
}

}  // namespace medgate::ledger::cbor
