// SenML (RFC 8428): what CoAP devices POST to /obs, decoded, resolved and turned into
// Observations. Pure functions over bytes: no I/O, no clock (the caller passes "now"), no logging.
// Thread-safe: nothing here has state.
//
// Three layers, each with its own tests (tests/unit/senml_test.cc):
//   decode_senml_json / decode_senml_cbor -> Record (one per array element, fields as sent)
//   resolve                               -> ResolvedRecord (RFC 8428 section 4.6)
//   observations_from_senml               -> Observation (appliance/observation.h)
//
// Every refusal is kInvalidArgument with a message for the device's developer, returned in the
// 4.00 diagnostic payload. Messages name the record (0-based index in the pack's array) and the
// field label ('v', 'bn', ...), never a value: readings and names are PHI. is_too_large() tells
// the refusals that deserve 4.13 (pack over kMaxPackBytes or kMaxRecords) from the rest (4.00).
//
// Choices where RFC 8428 leaves room, or where we are stricter than it:
//  - A key given twice in one record is refused (JSON and CBOR alike). JSON parsers differ in
//    which one wins (nlohmann keeps the last); for a clinical reading we would rather say no
//    than guess.
//  - Fields the RFC does not define are ignored, whatever their value, unless the label ends in
//    '_' (must-understand, section 4.4): then the record is refused. In CBOR, a text key that
//    spells a defined label ("v", "bn", ...) is refused: section 6 gives those integer labels
//    only, and ignoring it would silently drop a reading.
//  - A record with only base fields (bn, bt, bu, bv, bs, bver) sets the bases and yields no
//    resolved record: the RFC's own section 5.1.7 example starts with one. Any other record
//    needs exactly one value field (v, vs, vb, vd) or a sum field (s).
//  - Resolved records keep the sender's order. Section 4.6 wants a resolved pack in chronological
//    order; medgate stores each reading with its own time and never re-emits a pack, and keeping
//    the order keeps record indexes in diagnostics meaningful.
//  - CBOR (content-format 112) is read by a lenient reader of its own (senml.cc): the ledger's
//    reader (ledger/cbor.h) is deterministic-only and LEDGER-CRITICAL, and SenML senders use
//    floats of every width, non-shortest integers and indefinite-length arrays and maps. Tags
//    are refused except tag 4 (decimal fraction), which section 6 allows for numbers.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <variant>
#include <vector>

#include "appliance/observation.h"
#include "hsm/bytes.h"
#include "hsm/status.h"

namespace medgate::appliance::coap {

// Limits on what one POST may carry. Over kMaxPackBytes or kMaxRecords: is_too_large() (4.13).
inline constexpr std::size_t kMaxPackBytes = 128 * 1024;
inline constexpr std::size_t kMaxRecords = 1000;
// Arrays and maps nested deeper than this (pack array = 1, record = 2) are refused (4.00). Valid
// SenML needs 3 at most (a decimal fraction inside a record); the rest is room for ignored
// extension fields.
inline constexpr int kMaxDepth = 8;
// The SenML version this code understands; packs declaring a higher bver are refused (4.4).
inline constexpr std::uint64_t kSenmlVersion = 10;

// One SenML record as sent: every field optional, nothing resolved. Numbers are doubles (RFC 8428
// section 5: receivers handle IEEE doubles); NaN and infinities are refused when decoding.
struct Record {
  std::optional<std::string> base_name;     // bn
  std::optional<double> base_time;          // bt, seconds
  std::optional<std::string> base_unit;     // bu
  std::optional<double> base_value;         // bv
  std::optional<double> base_sum;           // bs
  std::optional<std::uint64_t> version;     // bver
  std::optional<std::string> name;          // n
  std::optional<std::string> unit;          // u
  std::optional<double> value;              // v
  std::optional<std::string> string_value;  // vs
  std::optional<bool> bool_value;           // vb
  std::optional<Bytes> data_value;          // vd (JSON: base64url without padding)
  std::optional<double> sum;                // s
  std::optional<double> time;               // t, seconds
  std::optional<double> update_time;        // ut, seconds

  friend bool operator==(const Record&, const Record&) = default;
};

// The value of a resolved record: none (a record with a sum only), a number, a string, a boolean
// or data. The same alternatives as Observation::value.
using SenmlValue = std::variant<std::monostate, double, std::string, bool, Bytes>;

// A record with its pack's base fields applied (RFC 8428 section 4.6) and its time made absolute.
struct ResolvedRecord {
  std::string name;           // bn + n, checked against section 4.5.1's characters
  std::string unit;           // u, else bu, else empty
  SenmlValue value;           // bv + v for numbers
  std::optional<double> sum;  // bs + s when either is present
  std::uint64_t time_us = 0;  // bt + t, µs since the Unix epoch; relative times resolved on now
  std::optional<double> update_time;      // ut, seconds
  std::uint64_t version = kSenmlVersion;  // bver of the pack; 10 when absent

  friend bool operator==(const ResolvedRecord&, const ResolvedRecord&) = default;
};

// application/senml+json: a JSON array of objects. Refuses what is not UTF-8 JSON, what is not
// SenML in shape (not an array, a record not an object, a field of the wrong type, bad base64url
// in vd, a duplicate key, a must-understand field), an empty pack, and packs over the limits.
Result<std::vector<Record>> decode_senml_json(ByteView json);

// application/senml+cbor: a CBOR array (definite or indefinite) of maps with the integer labels of
// RFC 8428 section 6. Refuses the same as decode_senml_json plus truncated input, bytes after the
// pack, tags other than 4, indefinite-length strings and invalid UTF-8 in text strings.
Result<std::vector<Record>> decode_senml_cbor(ByteView cbor);

// Encodes records as SenML CBOR (numbers as 64-bit floats, bver as an unsigned integer, fields in
// RFC 8428 Table 1 order). decode_senml_cbor(encode_senml_cbor(r)) == r for any r that decoding
// produced; tests and the fuzz targets use it to check the decoders against each other.
Bytes encode_senml_cbor(const std::vector<Record>& records);

// Applies base fields and resolves relative times (resolved bt + t below 2^28 s counts from
// now_us, µs since the Unix epoch; section 4.5.3). Refuses: bver above kSenmlVersion, zero, or
// changing within the pack (section 4.4); a resolved name that is empty or has characters outside
// section 4.5.1's set; more than one value field; no value field and no sum (except base-only
// records, above); a value or time that is not finite or not representable once resolved; a pack
// with no measurement in it.
Result<std::vector<ResolvedRecord>> resolve(const std::vector<Record>& pack, std::uint64_t now_us);

// One Observation per value of each resolved record: code = name, code_system "SenML", the
// value, unit and time as resolved, and the given patient and device (device_id is the device
// that authenticated, e.g. its DTLS-PSK identity, not something the payload claims). A record's
// sum becomes an Observation of its own with display "s" (RFC 8428 "Value Sum"; its unit is the
// record's unit times seconds). Refuses an empty device_id.
Result<std::vector<Observation>> observations_from_senml(const std::vector<ResolvedRecord>& records,
                                                         const std::string& device_id,
                                                         const std::string& patient_id);

// True for the refusals that mean "too large" (CoAP 4.13) rather than "malformed" (4.00).
bool is_too_large(const Status& status);

}  // namespace medgate::appliance::coap
