#include "appliance/coap/senml.h"

#include <algorithm>
#include <array>
#include <bit>
#include <cctype>
#include <cmath>
#include <cstring>
#include <set>
#include <string_view>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

namespace medgate::appliance::coap {

namespace {

constexpr std::string_view kTooLarge = "pack too large";

// RFC 8428 section 4.5.3: resolved times below 2^28 s are relative to now.
constexpr double kRelativeTimeLimit = 268435456.0;
// The latest time we accept once resolved: 10000-01-01T00:00Z, in µs. Anything later is a
// sender's mistake, and it keeps every conversion to std::uint64_t in range.
constexpr double kMaxTimeUs = 253402300800.0 * 1e6;

enum class Field {
  kBaseName,
  kBaseTime,
  kBaseUnit,
  kBaseValue,
  kBaseSum,
  kVersion,
  kName,
  kUnit,
  kValue,
  kStringValue,
  kBoolValue,
  kDataValue,
  kSum,
  kTime,
  kUpdateTime,
};

struct Label {
  std::string_view json;
  int cbor;
  Field field;
};

// RFC 8428 Table 1 (JSON labels) and Table 4 (CBOR labels), in Table 1's order.
constexpr std::array<Label, 15> kLabels = {{
    {"bn", -2, Field::kBaseName},
    {"bt", -3, Field::kBaseTime},
    {"bu", -4, Field::kBaseUnit},
    {"bv", -5, Field::kBaseValue},
    {"bs", -6, Field::kBaseSum},
    {"bver", -1, Field::kVersion},
    {"n", 0, Field::kName},
    {"u", 1, Field::kUnit},
    {"v", 2, Field::kValue},
    {"vs", 3, Field::kStringValue},
    {"vb", 4, Field::kBoolValue},
    {"vd", 8, Field::kDataValue},
    {"s", 5, Field::kSum},
    {"t", 6, Field::kTime},
    {"ut", 7, Field::kUpdateTime},
}};

const Label* label_by_json(std::string_view key) {
  for (const Label& l : kLabels)
    if (l.json == key) return &l;
  return nullptr;
}
const Label* label_by_cbor(std::int64_t key) {
  for (const Label& l : kLabels)
    if (l.cbor == key) return &l;
  return nullptr;
}
std::string_view label_of(Field f) {
  for (const Label& l : kLabels)
    if (l.field == f) return l.json;
  return "?";
}

Status malformed(std::string message) {
  return Status::InvalidArgument(std::move(message));
}
Status too_large(std::string_view what) {
  return Status::InvalidArgument(fmt::format("{}: {}", kTooLarge, what));
}
Status record_error(std::size_t index, std::string_view what) {
  return malformed(fmt::format("record {}: {}", index, what));
}
Status field_error(std::size_t index, Field f, std::string_view what) {
  return malformed(fmt::format("record {}: '{}' {}", index, label_of(f), what));
}

// An unknown key is echoed in a diagnostic only when it is short and plainly a label; anything
// else could be a value that a confused sender put in key position.
std::string printable_key(std::string_view key) {
  const bool plain =
      !key.empty() && key.size() <= 32 && std::all_of(key.begin(), key.end(), [](char c) {
        return std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '-' || c == '.' ||
               c == ':';
      });
  return plain ? fmt::format("'{}'", key) : std::string("a field");
}

// A number as a decoder saw it; `uint` is set when it was a non-negative integer (bver must be).
struct Number {
  double value = 0;
  std::optional<std::uint64_t> uint;
};
// A value that no defined field can hold (null, array, map, undefined, simple values).
struct Other {};
using FieldValue = std::variant<Other, Number, std::string, bool, Bytes>;

enum class Format { kJson, kCbor };

// Stores one decoded field into its record, checking the type RFC 8428 Table 1 gives it.
Status assign(Record& r, std::size_t index, Field f, FieldValue v, Format format) {
  auto text = [&](std::optional<std::string>& dst) -> Status {
    auto* s = std::get_if<std::string>(&v);
    if (!s)
      return field_error(index, f,
                         format == Format::kJson ? "is not a string" : "is not a text string");
    dst = std::move(*s);
    return Status::Ok();
  };
  auto number = [&](std::optional<double>& dst) -> Status {
    auto* n = std::get_if<Number>(&v);
    if (!n) return field_error(index, f, "is not a number");
    if (!std::isfinite(n->value)) return field_error(index, f, "is not a finite number");
    dst = n->value;
    return Status::Ok();
  };
  switch (f) {
    case Field::kBaseName:
      return text(r.base_name);
    case Field::kBaseTime:
      return number(r.base_time);
    case Field::kBaseUnit:
      return text(r.base_unit);
    case Field::kBaseValue:
      return number(r.base_value);
    case Field::kBaseSum:
      return number(r.base_sum);
    case Field::kVersion: {
      auto* n = std::get_if<Number>(&v);
      if (!n || !n->uint || *n->uint == 0)
        return field_error(index, f, "is not a positive integer");
      r.version = *n->uint;
      return Status::Ok();
    }
    case Field::kName:
      return text(r.name);
    case Field::kUnit:
      return text(r.unit);
    case Field::kValue:
      return number(r.value);
    case Field::kStringValue:
      return text(r.string_value);
    case Field::kBoolValue: {
      auto* b = std::get_if<bool>(&v);
      if (!b) return field_error(index, f, "is not a boolean");
      r.bool_value = *b;
      return Status::Ok();
    }
    case Field::kDataValue: {
      auto* d = std::get_if<Bytes>(&v);
      if (!d)
        return field_error(index, f,
                           format == Format::kJson ? "is not a string" : "is not a byte string");
      r.data_value = std::move(*d);
      return Status::Ok();
    }
    case Field::kSum:
      return number(r.sum);
    case Field::kTime:
      return number(r.time);
    case Field::kUpdateTime:
      return number(r.update_time);
  }
  return Status::Internal("unhandled SenML field");
}

// RFC 4648 section 5 (URL- and filename-safe alphabet), padding omitted as RFC 8428 section 4.3
// requires. Refuses '=', other characters, an impossible length (4k+1) and non-zero leftover
// bits, so each byte string has exactly one accepted spelling.
std::optional<Bytes> from_base64url(std::string_view text) {
  auto sextet = [](char c) -> int {
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '-') return 62;
    if (c == '_') return 63;
    return -1;
  };
  if (text.size() % 4 == 1) return std::nullopt;
  Bytes out;
  out.reserve(text.size() * 3 / 4);
  std::uint32_t acc = 0;
  int bits = 0;
  for (char c : text) {
    int s = sextet(c);
    if (s < 0) return std::nullopt;
    acc = (acc << 6) | static_cast<std::uint32_t>(s);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out.push_back(std::byte((acc >> bits) & 0xff));
    }
  }
  if ((acc & ((1u << bits) - 1)) != 0) return std::nullopt;
  return out;
}

// ---------------------------------------------------------------------------------------------
// JSON: a SAX pass with nlohmann's parser (no exceptions reach us: its SAX parser reports errors
// through parse_error). Building Records straight from the events bounds memory and depth before
// anything is allocated for them, and sees duplicate keys, which nlohmann's DOM would hide.

class JsonPackHandler {
 public:
  using json = nlohmann::json;

  bool null() { return scalar(Other{}); }
  bool boolean(bool b) { return scalar(b); }
  bool number_integer(json::number_integer_t n) {
    return scalar(Number{static_cast<double>(n), std::nullopt});
  }
  bool number_unsigned(json::number_unsigned_t n) {
    return scalar(Number{static_cast<double>(n), n});
  }
  bool number_float(json::number_float_t n, const json::string_t&) {
    return scalar(Number{n, std::nullopt});
  }
  bool string(json::string_t& s) {
    if (depth_ == 2 && field_ == Field::kDataValue) {
      std::optional<Bytes> data = from_base64url(s);
      if (!data) return fail(field_error(records_.size(), Field::kDataValue, "is not base64url"));
      return scalar(std::move(*data));
    }
    return scalar(std::move(s));
  }
  bool binary(json::binary_t&) { return scalar(Other{}); }  // not produced by the JSON parser

  bool start_object(std::size_t) {
    if (depth_ == 0) return fail(malformed("the pack is not a JSON array"));
    if (depth_ == 1) {
      if (records_.size() >= kMaxRecords)
        return fail(too_large(fmt::format("more than {} records", kMaxRecords)));
      record_ = Record{};
      keys_.clear();
      depth_ = 2;
      return true;
    }
    return open_nested();
  }
  bool end_object() {
    if (depth_ == 2) records_.push_back(std::move(record_));
    --depth_;
    return true;
  }
  bool start_array(std::size_t) {
    if (depth_ == 0) {
      depth_ = 1;
      return true;
    }
    if (depth_ == 1)
      return fail(malformed(fmt::format("record {} is not a JSON object", records_.size())));
    return open_nested();
  }
  bool end_array() {
    --depth_;
    return true;
  }
  bool key(json::string_t& k) {
    if (depth_ != 2) return true;  // inside an ignored field's value
    if (!keys_.insert(k).second)
      return fail(record_error(records_.size(), printable_key(k) + " appears twice"));
    field_.reset();
    if (const Label* l = label_by_json(k)) {
      field_ = l->field;
    } else if (k.ends_with('_')) {
      return fail(record_error(records_.size(), printable_key(k) +
                                                    " must be understood (it ends in '_') and is "
                                                    "not a field medgate knows"));
    }
    return true;
  }
  bool parse_error(std::size_t position, const std::string&, const nlohmann::detail::exception&) {
    // The parser's own message quotes the input: say only where it broke.
    if (error_.ok()) error_ = malformed(fmt::format("not valid JSON (at byte {})", position));
    return false;
  }

  Status error() const { return error_; }
  std::vector<Record> take() { return std::move(records_); }

 private:
  bool fail(Status s) {
    error_ = std::move(s);
    return false;
  }
  bool scalar(FieldValue v) {
    if (depth_ == 0) return fail(malformed("the pack is not a JSON array"));
    if (depth_ == 1)
      return fail(malformed(fmt::format("record {} is not a JSON object", records_.size())));
    if (depth_ > 2 || !field_) return true;  // part of an ignored field
    Status s = assign(record_, records_.size(), *field_, std::move(v), Format::kJson);
    return s.ok() ? true : fail(std::move(s));
  }
  // An array or object as a field's value: wrong for every defined field, ignored for others.
  bool open_nested() {
    if (depth_ == 2 && field_) {
      Status s = assign(record_, records_.size(), *field_, Other{}, Format::kJson);
      return fail(std::move(s));
    }
    if (++depth_ > kMaxDepth)
      return fail(malformed(fmt::format("nested deeper than {} levels", kMaxDepth)));
    return true;
  }

  std::vector<Record> records_;
  Record record_;
  std::set<std::string> keys_;
  std::optional<Field> field_;  // the defined field whose value comes next, if any
  int depth_ = 0;               // 1 inside the pack's array, 2 inside a record
  Status error_;
};

// ---------------------------------------------------------------------------------------------
// CBOR: a lenient reader for the SenML subset (RFC 8949 well-formedness, not determinism).

bool valid_utf8(ByteView s) {
  std::size_t i = 0;
  while (i < s.size()) {
    auto c = static_cast<unsigned char>(s[i]);
    std::size_t n;
    std::uint32_t cp;
    if (c < 0x80) {
      ++i;
      continue;
    } else if (c >= 0xc2 && c <= 0xdf) {
      n = 1;
      cp = c & 0x1f;
    } else if (c >= 0xe0 && c <= 0xef) {
      n = 2;
      cp = c & 0x0f;
    } else if (c >= 0xf0 && c <= 0xf4) {
      n = 3;
      cp = c & 0x07;
    } else {
      return false;
    }
    if (s.size() - i - 1 < n) return false;
    for (std::size_t k = 1; k <= n; ++k) {
      auto cc = static_cast<unsigned char>(s[i + k]);
      if ((cc & 0xc0) != 0x80) return false;
      cp = (cp << 6) | (cc & 0x3f);
    }
    if ((n == 2 && cp < 0x800) || (n == 3 && cp < 0x10000) || cp > 0x10ffff ||
        (cp >= 0xd800 && cp <= 0xdfff))
      return false;
    i += n + 1;
  }
  return true;
}

double half_to_double(std::uint16_t h) {
  const int exponent = (h >> 10) & 0x1f;
  const int mantissa = h & 0x3ff;
  double v;
  if (exponent == 0)
    v = std::ldexp(mantissa, -24);
  else if (exponent == 31)
    v = mantissa == 0 ? INFINITY : NAN;
  else
    v = std::ldexp(mantissa + 1024, exponent - 25);
  return (h & 0x8000) ? -v : v;
}

class CborPackReader {
 public:
  explicit CborPackReader(ByteView data) : data_(data) {}

  Result<std::vector<Record>> read_pack() {
    MEDGATE_ASSIGN_OR_RETURN(Head top, head());
    if (top.major != 4) return malformed("the pack is not a CBOR array");
    const bool indefinite = top.info == 31;
    if (!indefinite && top.arg > kMaxRecords)
      return too_large(fmt::format("more than {} records", kMaxRecords));
    std::vector<Record> records;
    for (std::uint64_t i = 0;; ++i) {
      if (indefinite) {
        if (pos_ < data_.size() && data_[pos_] == std::byte{0xff}) {
          ++pos_;
          break;
        }
        if (records.size() >= kMaxRecords)
          return too_large(fmt::format("more than {} records", kMaxRecords));
      } else if (i == top.arg) {
        break;
      }
      MEDGATE_ASSIGN_OR_RETURN(Record r, read_record(records.size()));
      records.push_back(std::move(r));
    }
    if (pos_ != data_.size())
      return malformed(fmt::format("bytes after the pack's array (at byte {})", pos_));
    return records;
  }

 private:
  struct Head {
    int major = 0;
    int info = 0;            // 31: indefinite length (major 2-5) or break (major 7)
    std::uint64_t arg = 0;   // value, length, count, tag number or float bits
    std::size_t offset = 0;  // where the item starts
  };

  Status error_at(std::size_t offset, std::string_view what) const {
    return malformed(fmt::format("CBOR at byte {}: {}", offset, what));
  }
  Status truncated() const { return malformed(fmt::format("CBOR truncated at byte {}", pos_)); }

  Result<Head> head() {
    if (pos_ >= data_.size()) return truncated();
    Head h;
    h.offset = pos_;
    const auto initial = static_cast<std::uint8_t>(data_[pos_++]);
    h.major = initial >> 5;
    h.info = initial & 0x1f;
    if (h.info < 24) {
      h.arg = static_cast<std::uint64_t>(h.info);
    } else if (h.info <= 27) {
      const std::size_t n = std::size_t{1} << (h.info - 24);
      if (data_.size() - pos_ < n) return truncated();
      for (std::size_t k = 0; k < n; ++k)
        h.arg = (h.arg << 8) | static_cast<std::uint8_t>(data_[pos_ + k]);
      pos_ += n;
    } else if (h.info == 31) {
      if (h.major == 0 || h.major == 1 || h.major == 6)
        return error_at(h.offset, "indefinite length on an integer or tag");
      if (h.major == 2 || h.major == 3)
        return error_at(h.offset, "indefinite-length string (RFC 8428 section 6 wants definite)");
    } else {
      return error_at(h.offset, "reserved additional information");
    }
    return h;
  }

  bool at_break() const { return pos_ < data_.size() && data_[pos_] == std::byte{0xff}; }

  Result<ByteView> string_body(const Head& h) {
    if (h.arg > data_.size() - pos_) return truncated();
    ByteView body = data_.subspan(pos_, static_cast<std::size_t>(h.arg));
    pos_ += body.size();
    return body;
  }
  Result<std::string> text_body(const Head& h) {
    MEDGATE_ASSIGN_OR_RETURN(ByteView body, string_body(h));
    if (!valid_utf8(body)) return error_at(h.offset, "text string is not UTF-8");
    return to_string(body);
  }

  // Tag 4: [exponent, mantissa] meaning mantissa * 10^exponent (RFC 8949 section 3.4.4). Bignum
  // mantissas are refused with every other tag.
  Result<FieldValue> decimal_fraction(std::size_t tag_offset) {
    MEDGATE_ASSIGN_OR_RETURN(Head h, head());
    if (h.major != 4 || h.info == 31 || h.arg != 2)
      return error_at(tag_offset, "decimal fraction is not an array of two integers");
    MEDGATE_ASSIGN_OR_RETURN(Head e, head());
    if (e.major != 0 && e.major != 1)
      return error_at(e.offset, "decimal fraction exponent is not an integer");
    if (e.arg > 400) return error_at(e.offset, "decimal fraction exponent out of range");
    const int exponent = e.major == 0 ? static_cast<int>(e.arg) : -1 - static_cast<int>(e.arg);
    MEDGATE_ASSIGN_OR_RETURN(Head m, head());
    if (m.major != 0 && m.major != 1)
      return error_at(m.offset, "decimal fraction mantissa is not an integer");
    const double mantissa =
        m.major == 0 ? static_cast<double>(m.arg) : -1.0 - static_cast<double>(m.arg);
    // Powers of ten up to 1e22 are exact doubles, so one multiplication or division rounds once.
    double v;
    if (exponent >= 0 && exponent <= 22)
      v = mantissa * std::pow(10.0, exponent);
    else if (exponent < 0 && exponent >= -22)
      v = mantissa / std::pow(10.0, -exponent);
    else
      v = mantissa * std::pow(10.0, exponent);
    return FieldValue(Number{v, std::nullopt});
  }

  // Any data item. Containers (depth is theirs) and null/undefined/simple values come back as
  // Other, after checking they are well-formed.
  Result<FieldValue> item(int depth) {
    MEDGATE_ASSIGN_OR_RETURN(Head h, head());
    switch (h.major) {
      case 0:
        return FieldValue(Number{static_cast<double>(h.arg), h.arg});
      case 1:
        return FieldValue(Number{-1.0 - static_cast<double>(h.arg), std::nullopt});
      case 2: {
        MEDGATE_ASSIGN_OR_RETURN(ByteView body, string_body(h));
        return FieldValue(Bytes(body.begin(), body.end()));
      }
      case 3: {
        MEDGATE_ASSIGN_OR_RETURN(std::string text, text_body(h));
        return FieldValue(std::move(text));
      }
      case 4:
      case 5: {
        if (depth > kMaxDepth)
          return error_at(h.offset, fmt::format("nested deeper than {} levels", kMaxDepth));
        const int per_entry = h.major == 5 ? 2 : 1;
        for (std::uint64_t i = 0; h.info == 31 ? !at_break() : i < h.arg; ++i) {
          for (int k = 0; k < per_entry; ++k) MEDGATE_RETURN_IF_ERROR(item(depth + 1).status());
        }
        if (h.info == 31) ++pos_;  // the break
        return FieldValue(Other{});
      }
      case 6:
        if (h.arg == 4) return decimal_fraction(h.offset);
        return error_at(h.offset, fmt::format("tag {} is not supported", h.arg));
      case 7:
        switch (h.info) {
          case 20:
            return FieldValue(false);
          case 21:
            return FieldValue(true);
          case 25:
            return FieldValue(
                Number{half_to_double(static_cast<std::uint16_t>(h.arg)), std::nullopt});
          case 26:
            return FieldValue(
                Number{static_cast<double>(std::bit_cast<float>(static_cast<std::uint32_t>(h.arg))),
                       std::nullopt});
          case 27:
            return FieldValue(Number{std::bit_cast<double>(h.arg), std::nullopt});
          case 31:
            return error_at(h.offset, "break outside an indefinite-length array or map");
          default:
            return FieldValue(Other{});  // null, undefined, simple values
        }
    }
    return Status::Internal("unhandled CBOR major type");
  }

  Result<Record> read_record(std::size_t index) {
    MEDGATE_ASSIGN_OR_RETURN(Head h, head());
    if (h.major != 5) return malformed(fmt::format("record {} is not a CBOR map", index));
    Record r;
    std::set<std::string> keys;  // "i<n>" for integer keys, "t<text>" for text keys
    for (std::uint64_t i = 0; h.info == 31 ? !at_break() : i < h.arg; ++i) {
      MEDGATE_ASSIGN_OR_RETURN(Head k, head());
      std::optional<Field> field;
      std::string key_id;
      std::string shown;
      if (k.major == 0 || k.major == 1) {
        // Labels in Table 4 fit easily; larger integers are simply unknown labels.
        const bool small = k.arg < 1000;
        const std::int64_t label = small ? (k.major == 0 ? static_cast<std::int64_t>(k.arg)
                                                         : -1 - static_cast<std::int64_t>(k.arg))
                                         : 0;
        key_id = fmt::format("i{}{}", k.major == 0 ? "" : "-", k.arg);
        if (small) {
          if (const Label* l = label_by_cbor(label)) field = l->field;
        }
        shown = field   ? fmt::format("'{}'", label_of(*field))
                : small ? fmt::format("label {}", label)
                        : std::string("a field");
      } else if (k.major == 3) {
        MEDGATE_ASSIGN_OR_RETURN(std::string text, text_body(k));
        if (const Label* l = label_by_json(text))
          return record_error(index, fmt::format("'{}' must use the CBOR label {}, not a text key",
                                                 l->json, l->cbor));
        if (text.ends_with('_'))
          return record_error(index, printable_key(text) +
                                         " must be understood (it ends in '_') and is not a "
                                         "field medgate knows");
        shown = printable_key(text);
        key_id = "t" + text;
      } else {
        return error_at(k.offset, fmt::format("record {}: a key is neither an integer nor a text "
                                              "string",
                                              index));
      }
      if (!keys.insert(std::move(key_id)).second)
        return record_error(index, shown + " appears twice");
      MEDGATE_ASSIGN_OR_RETURN(FieldValue v, item(3));
      if (field) MEDGATE_RETURN_IF_ERROR(assign(r, index, *field, std::move(v), Format::kCbor));
    }
    if (h.info == 31) ++pos_;  // the break
    return r;
  }

  ByteView data_;
  std::size_t pos_ = 0;
};

// ---------------------------------------------------------------------------------------------

class CborWriter {
 public:
  void head(int major, std::uint64_t arg) {
    const auto m = static_cast<std::uint8_t>(major << 5);
    if (arg < 24) {
      put(m | arg);
    } else if (arg <= 0xff) {
      put(m | 24);
      be(arg, 1);
    } else if (arg <= 0xffff) {
      put(m | 25);
      be(arg, 2);
    } else if (arg <= 0xffffffff) {
      put(m | 26);
      be(arg, 4);
    } else {
      put(m | 27);
      be(arg, 8);
    }
  }
  void label(int l) {
    if (l >= 0)
      head(0, static_cast<std::uint64_t>(l));
    else
      head(1, static_cast<std::uint64_t>(-1 - l));
  }
  void number(double d) {
    put(0xfb);
    be(std::bit_cast<std::uint64_t>(d), 8);
  }
  void bytes(int major, ByteView b) {
    head(major, b.size());
    out_.insert(out_.end(), b.begin(), b.end());
  }
  void put(std::uint64_t b) { out_.push_back(std::byte(static_cast<std::uint8_t>(b))); }
  void append(const Bytes& b) { out_.insert(out_.end(), b.begin(), b.end()); }
  Bytes take() { return std::move(out_); }

 private:
  void be(std::uint64_t v, int n) {
    for (int k = n - 1; k >= 0; --k) put((v >> (8 * k)) & 0xff);
  }
  Bytes out_;
};

bool name_start_char(char c) {
  return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9');
}
bool name_char(char c) {
  return name_start_char(c) || c == '-' || c == ':' || c == '.' || c == '/' || c == '_';
}

}  // namespace

Result<std::vector<Record>> decode_senml_json(ByteView json) {
  if (json.size() > kMaxPackBytes)
    return too_large(fmt::format("more than {} bytes", kMaxPackBytes));
  JsonPackHandler handler;
  const char* begin = reinterpret_cast<const char*>(json.data());
  bool ok = false;
  try {
    ok = nlohmann::json::sax_parse(begin, begin + json.size(), &handler);
  } catch (const std::exception&) {
    // The SAX parser reports errors through the handler; this is only a guard for the library.
    return malformed("not valid JSON");
  }
  if (!ok) return handler.error().ok() ? malformed("not valid JSON") : handler.error();
  std::vector<Record> records = handler.take();
  if (records.empty()) return malformed("the pack has no records");
  return records;
}

Result<std::vector<Record>> decode_senml_cbor(ByteView cbor) {
  if (cbor.size() > kMaxPackBytes)
    return too_large(fmt::format("more than {} bytes", kMaxPackBytes));
  MEDGATE_ASSIGN_OR_RETURN(std::vector<Record> records, CborPackReader(cbor).read_pack());
  if (records.empty()) return malformed("the pack has no records");
  return records;
}

Bytes encode_senml_cbor(const std::vector<Record>& records) {
  CborWriter w;
  w.head(4, records.size());
  for (const Record& r : records) {
    CborWriter fields;
    std::uint64_t n = 0;
    auto text = [&](const Label& l, const std::optional<std::string>& s) {
      if (!s) return;
      ++n;
      fields.label(l.cbor);
      fields.bytes(3, as_bytes(*s));
    };
    auto number = [&](const Label& l, const std::optional<double>& d) {
      if (!d) return;
      ++n;
      fields.label(l.cbor);
      fields.number(*d);
    };
    for (const Label& l : kLabels) {
      switch (l.field) {
        case Field::kBaseName:
          text(l, r.base_name);
          break;
        case Field::kBaseTime:
          number(l, r.base_time);
          break;
        case Field::kBaseUnit:
          text(l, r.base_unit);
          break;
        case Field::kBaseValue:
          number(l, r.base_value);
          break;
        case Field::kBaseSum:
          number(l, r.base_sum);
          break;
        case Field::kVersion:
          if (r.version) {
            ++n;
            fields.label(l.cbor);
            fields.head(0, *r.version);
          }
          break;
        case Field::kName:
          text(l, r.name);
          break;
        case Field::kUnit:
          text(l, r.unit);
          break;
        case Field::kValue:
          number(l, r.value);
          break;
        case Field::kStringValue:
          text(l, r.string_value);
          break;
        case Field::kBoolValue:
          if (r.bool_value) {
            ++n;
            fields.label(l.cbor);
            fields.put(*r.bool_value ? 0xf5 : 0xf4);
          }
          break;
        case Field::kDataValue:
          if (r.data_value) {
            ++n;
            fields.label(l.cbor);
            fields.bytes(2, *r.data_value);
          }
          break;
        case Field::kSum:
          number(l, r.sum);
          break;
        case Field::kTime:
          number(l, r.time);
          break;
        case Field::kUpdateTime:
          number(l, r.update_time);
          break;
      }
    }
    w.head(5, n);
    w.append(fields.take());
  }
  return w.take();
}

Result<std::vector<ResolvedRecord>> resolve(const std::vector<Record>& pack, std::uint64_t now_us) {
  if (pack.size() > kMaxRecords) return too_large(fmt::format("more than {} records", kMaxRecords));
  std::optional<std::string> base_name;
  std::optional<std::string> base_unit;
  double base_time = 0;
  double base_value = 0;
  std::optional<double> base_sum;
  std::uint64_t version = kSenmlVersion;
  std::vector<ResolvedRecord> out;
  out.reserve(pack.size());

  for (std::size_t i = 0; i < pack.size(); ++i) {
    const Record& r = pack[i];
    if (r.version) {
      if (*r.version == 0) return field_error(i, Field::kVersion, "is not a positive integer");
      if (*r.version > kSenmlVersion)
        return field_error(i, Field::kVersion,
                           fmt::format("is {}, newer than the SenML version {} medgate "
                                       "understands (RFC 8428 section 4.4)",
                                       *r.version, kSenmlVersion));
      // Every record of a pack has one version: a bver after record 0 may only repeat it.
      if (i > 0 && *r.version != version)
        return field_error(i, Field::kVersion, "differs from the version of the records before");
      version = *r.version;
    }
    if (r.base_name) base_name = r.base_name;
    if (r.base_unit) base_unit = r.base_unit;
    if (r.base_time) base_time = *r.base_time;
    if (r.base_value) base_value = *r.base_value;
    if (r.base_sum) base_sum = r.base_sum;

    const bool base_only = !r.name && !r.unit && !r.value && !r.string_value && !r.bool_value &&
                           !r.data_value && !r.sum && !r.time && !r.update_time;
    if (base_only) continue;

    std::vector<std::string_view> values;
    if (r.value) values.push_back("'v'");
    if (r.string_value) values.push_back("'vs'");
    if (r.bool_value) values.push_back("'vb'");
    if (r.data_value) values.push_back("'vd'");
    if (values.size() > 1)
      return record_error(i,
                          fmt::format("more than one value field ({})", fmt::join(values, ", ")));
    if (values.empty() && !r.sum)
      return record_error(i, "no value field ('v', 'vs', 'vb' or 'vd') and no sum ('s')");

    ResolvedRecord out_r;
    out_r.name = base_name.value_or("") + r.name.value_or("");
    if (out_r.name.empty()) return record_error(i, "no name (neither 'bn' nor 'n')");
    if (!name_start_char(out_r.name.front()))
      return record_error(i,
                          "the name ('bn' + 'n') does not start with a letter or digit "
                          "(RFC 8428 section 4.5.1)");
    if (!std::all_of(out_r.name.begin(), out_r.name.end(), name_char))
      return record_error(i,
                          "the name ('bn' + 'n') has a character outside A-Z a-z 0-9 - : . / _ "
                          "(RFC 8428 section 4.5.1)");
    out_r.unit = r.unit ? *r.unit : base_unit.value_or("");

    if (r.value) {
      const double v = base_value + *r.value;
      if (!std::isfinite(v)) return field_error(i, Field::kValue, "plus 'bv' is not finite");
      out_r.value = v;
    } else if (r.string_value) {
      out_r.value = *r.string_value;
    } else if (r.bool_value) {
      out_r.value = *r.bool_value;
    } else if (r.data_value) {
      out_r.value = *r.data_value;
    }
    if (r.sum || base_sum) {
      const double s = base_sum.value_or(0) + r.sum.value_or(0);
      if (!std::isfinite(s)) return field_error(i, Field::kSum, "plus 'bs' is not finite");
      out_r.sum = s;
    }

    const double t = base_time + r.time.value_or(0);
    double us;
    if (t < kRelativeTimeLimit)
      us = static_cast<double>(now_us) + t * 1e6;
    else
      us = t * 1e6;
    if (!(us >= 0 && us <= kMaxTimeUs))
      return field_error(i, Field::kTime,
                         "plus 'bt' is outside the times medgate records (1970 to 9999)");
    out_r.time_us = static_cast<std::uint64_t>(std::llround(us));
    out_r.update_time = r.update_time;
    out_r.version = version;
    out.push_back(std::move(out_r));
  }
  if (out.empty()) return malformed("the pack has no measurement, only base fields");
  return out;
}

Result<std::vector<Observation>> observations_from_senml(const std::vector<ResolvedRecord>& records,
                                                         const std::string& device_id,
                                                         const std::string& patient_id) {
  if (device_id.empty()) return Status::InvalidArgument("no device id for the SenML pack");
  std::vector<Observation> out;
  out.reserve(records.size());
  for (const ResolvedRecord& r : records) {
    Observation o;
    o.patient_id = patient_id;
    o.code = r.name;
    o.code_system = "SenML";
    o.unit = r.unit;
    o.time_us = r.time_us;
    o.device_id = device_id;
    if (r.sum) {
      Observation sum = o;
      sum.display = "s";
      sum.value = *r.sum;
      if (!std::holds_alternative<std::monostate>(r.value)) {
        o.value = r.value;
        out.push_back(std::move(o));
      }
      out.push_back(std::move(sum));
    } else {
      o.value = r.value;
      out.push_back(std::move(o));
    }
  }
  return out;
}

bool is_too_large(const Status& status) {
  return status.code() == StatusCode::kInvalidArgument && status.message().starts_with(kTooLarge);
}

}  // namespace medgate::appliance::coap
