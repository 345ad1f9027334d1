// SenML (appliance/coap/senml.h): the RFC 8428 examples (tests/data/senml, copied from the RFC's
// authoring repository core-wg/senml-spec, see README.txt there) resolve to what the RFC says,
// JSON and CBOR of one pack agree, and every malformed input gets its own error.
#include <catch2/catch.hpp>

#include <cmath>
#include <fstream>
#include <iterator>
#include <string>

#include <nlohmann/json.hpp>

#include "appliance/coap/senml.h"

using namespace medgate;
using namespace medgate::appliance;
using namespace medgate::appliance::coap;

namespace {

// The "now" frozen into the generator's resolved files for ex1, ex2 and ex9 (and ex7's).
constexpr std::uint64_t kFrozenNowUs = 1498780179ull * 1000000;
constexpr std::uint64_t kEx7NowUs = 1499109309ull * 1000000;
constexpr std::uint64_t kNowUs = 1700000000ull * 1000000;

Bytes read_data(const std::string& name) {
  std::ifstream in(std::string(MEDGATE_TEST_DATA) + "/senml/" + name, std::ios::binary);
  REQUIRE(in);
  std::string s((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  return to_bytes(s);
}

Bytes hex(std::string_view h) {
  std::string clean;
  for (char c : h)
    if (c != ' ') clean += c;
  auto b = from_hex(clean);
  REQUIRE(b);
  return *b;
}

Result<std::vector<ResolvedRecord>> resolve_json(std::string_view json,
                                                 std::uint64_t now = kNowUs) {
  auto records = decode_senml_json(as_bytes(json));
  if (!records.ok()) return records.status();
  return resolve(*records, now);
}
Result<std::vector<ResolvedRecord>> resolve_cbor(const Bytes& cbor, std::uint64_t now = kNowUs) {
  auto records = decode_senml_cbor(cbor);
  if (!records.ok()) return records.status();
  return resolve(*records, now);
}

// The error of decoding and resolving `json`; the test fails if there is none.
std::string json_error(std::string_view json) {
  auto r = resolve_json(json);
  INFO(json);
  REQUIRE_FALSE(r.ok());
  CHECK(r.status().code() == StatusCode::kInvalidArgument);
  return r.status().message();
}
std::string cbor_error(std::string_view h) {
  auto r = resolve_cbor(hex(h));
  INFO(h);
  REQUIRE_FALSE(r.ok());
  CHECK(r.status().code() == StatusCode::kInvalidArgument);
  return r.status().message();
}

std::uint64_t us(double seconds) {
  return static_cast<std::uint64_t>(std::llround(seconds * 1e6));
}

// Compares resolved records with a generator's .resolved.json (n, u, t, v/vs/vb).
void check_resolved(const std::vector<ResolvedRecord>& got, const std::string& expected_file,
                    std::size_t count) {
  Bytes raw = read_data(expected_file);
  auto expected = nlohmann::json::parse(to_string(raw));
  REQUIRE(expected.size() >= count);
  REQUIRE(got.size() >= count);
  for (std::size_t i = 0; i < count; ++i) {
    INFO(expected_file << " record " << i);
    const auto& e = expected[i];
    CHECK(got[i].name == e.at("n").get<std::string>());
    CHECK(got[i].unit == e.value("u", std::string()));
    CHECK(got[i].time_us == us(e.at("t").get<double>()));
    if (e.contains("v")) CHECK(got[i].value == SenmlValue(e["v"].get<double>()));
    if (e.contains("vs")) CHECK(got[i].value == SenmlValue(e["vs"].get<std::string>()));
    if (e.contains("vb")) CHECK(got[i].value == SenmlValue(e["vb"].get<bool>()));
  }
}

void check_example(const std::string& stem, std::uint64_t now, std::size_t count) {
  Bytes json = read_data(stem + ".gen.json");
  auto got = resolve_json(to_string(json), now);
  INFO(stem);
  REQUIRE(got.ok());
  CHECK(got->size() == count);
  check_resolved(*got, stem + ".gen.resolved.json", count);
}

}  // namespace

TEST_CASE("RFC 8428 examples resolve to the RFC's resolved records", "[senml]") {
  check_example("ex1", kFrozenNowUs, 1);
  check_example("ex2", kFrozenNowUs, 2);
  check_example("ex3", kNowUs, 7);
  check_example("ex4", kNowUs, 12);
  check_example("ex5", kNowUs, 13);
  check_example("ex6", kNowUs, 4);
  check_example("ex9", kFrozenNowUs, 3);  // the base-only first record yields nothing
  check_example("ex10", kNowUs, 2);
  check_example("ex11", kNowUs, 2);
  check_example("ex12", kNowUs, 2);
}

TEST_CASE("ex3 declares bver 5, and every resolved record carries it", "[senml]") {
  auto got = resolve_json(to_string(read_data("ex3.gen.json")));
  REQUIRE(got.ok());
  for (const auto& r : *got) CHECK(r.version == 5);
  auto ex1 = resolve_json(to_string(read_data("ex1.gen.json")));
  REQUIRE(ex1.ok());
  CHECK((*ex1)[0].version == 10);
}

TEST_CASE("ex7: string, boolean and base64url data values", "[senml]") {
  auto got = resolve_json(to_string(read_data("ex7.gen.json")), kEx7NowUs);
  REQUIRE(got.ok());
  REQUIRE(got->size() == 4);
  // The generator's file lacks the vd record (README.txt): check the first three against it.
  check_resolved(*got, "ex7.gen.resolved.json", 3);
  CHECK((*got)[3].name == "urn:dev:ow:10e2073a01080063:nfv-reader");
  CHECK((*got)[3].value == SenmlValue(to_bytes("hi \n")));
  CHECK((*got)[3].time_us == kEx7NowUs);
}

TEST_CASE("ex13: a relative time on an absolute base time stays absolute", "[senml]") {
  auto got = resolve_json(to_string(read_data("ex13.gen.json")));
  REQUIRE(got.ok());
  REQUIRE(got->size() == 4);
  const char* names[] = {"2001:db8::3", "2001:db8::4", "2001:db8::3", "2001:db8::4"};
  const double values[] = {0.5, 0.5, 0, 0};
  const double times[] = {1320078429, 1320078429, 1320078429.1, 1320078429.1};
  for (int i = 0; i < 4; ++i) {
    INFO(i);
    CHECK((*got)[i].name == names[i]);
    CHECK((*got)[i].unit == "/");
    CHECK((*got)[i].value == SenmlValue(values[i]));
    CHECK((*got)[i].time_us == us(times[i]));
  }
}

TEST_CASE("relative times count from now", "[senml]") {
  auto got = resolve_json(R"([{"n":"x","v":1,"t":-5},{"n":"x","v":2},{"n":"x","v":3,"t":2.5}])");
  REQUIRE(got.ok());
  CHECK((*got)[0].time_us == kNowUs - 5000000);
  CHECK((*got)[1].time_us == kNowUs);
  CHECK((*got)[2].time_us == kNowUs + 2500000);
  // 2^28 - 1 is still relative; 2^28 is absolute (RFC 8428 section 4.5.3).
  auto edge = resolve_json(R"([{"n":"x","v":1,"t":268435455},{"n":"x","v":1,"t":268435456}])");
  REQUIRE(edge.ok());
  CHECK((*edge)[0].time_us == kNowUs + 268435455ull * 1000000);
  CHECK((*edge)[1].time_us == 268435456ull * 1000000);
}

TEST_CASE("base fields persist until replaced; bv and bs add up", "[senml]") {
  auto got = resolve_json(
      R"([{"bn":"dev/","bu":"A","bv":10,"bs":100,"bt":1.5e9,"n":"a","v":1},
          {"n":"b","u":"V","v":2,"s":1},
          {"bn":"other/","n":"c","s":2},
          {"n":"d","vs":"text"}])");
  REQUIRE(got.ok());
  REQUIRE(got->size() == 4);
  CHECK((*got)[0].name == "dev/a");
  CHECK((*got)[0].unit == "A");
  CHECK((*got)[0].value == SenmlValue(11.0));
  CHECK((*got)[0].sum == 100.0);
  CHECK((*got)[1].unit == "V");
  CHECK((*got)[1].value == SenmlValue(12.0));
  CHECK((*got)[1].sum == 101.0);
  CHECK((*got)[2].name == "other/c");
  CHECK(std::holds_alternative<std::monostate>((*got)[2].value));
  CHECK((*got)[2].sum == 102.0);
  CHECK((*got)[3].value == SenmlValue(std::string("text")));  // bv applies to 'v' only
  for (const auto& r : *got) CHECK(r.time_us == 1500000000ull * 1000000);
}

TEST_CASE("JSON and CBOR of the same pack resolve the same", "[senml]") {
  // ex3.gen.cbor is the RFC's section 6 hex dump (1.5 as a half float, t: 0 on the last record).
  for (std::string stem : {"ex3", "ex5"}) {
    INFO(stem);
    auto from_json = resolve_json(to_string(read_data(stem + ".gen.json")));
    auto from_cbor = resolve_cbor(read_data(stem + ".gen.cbor"));
    REQUIRE(from_json.ok());
    REQUIRE(from_cbor.ok());
    CHECK(*from_json == *from_cbor);
  }
}

TEST_CASE("encode_senml_cbor round-trips every example through the CBOR decoder", "[senml]") {
  for (std::string stem :
       {"ex1", "ex2", "ex3", "ex4", "ex5", "ex6", "ex7", "ex9", "ex10", "ex11", "ex12", "ex13"}) {
    INFO(stem);
    auto records = decode_senml_json(read_data(stem + ".gen.json"));
    REQUIRE(records.ok());
    auto back = decode_senml_cbor(encode_senml_cbor(*records));
    REQUIRE(back.ok());
    CHECK(*back == *records);
  }
}

TEST_CASE("lenient CBOR: what SenML senders legitimately send", "[senml]") {
  // Indefinite array and map, value 1.5 as a half float.
  auto a = resolve_cbor(hex("9f bf 00 61 78 02 f9 3e 00 ff ff"));
  REQUIRE(a.ok());
  CHECK((*a)[0].value == SenmlValue(1.5));
  // Single float, non-shortest integer, negative integer.
  auto b =
      resolve_cbor(hex("83 a2 00 61 78 02 fa 3f c0 00 00  a2 00 61 78 02 18 05"
                       "  a2 00 61 78 02 24"));
  REQUIRE(b.ok());
  CHECK((*b)[0].value == SenmlValue(1.5));
  CHECK((*b)[1].value == SenmlValue(5.0));
  CHECK((*b)[2].value == SenmlValue(-5.0));
  // Tag 4 decimal fraction 27315e-2, as RFC 8428 section 6 allows for numbers.
  auto c = resolve_cbor(hex("81 a2 00 61 78 02 c4 82 21 19 6a b3"));
  REQUIRE(c.ok());
  CHECK((*c)[0].value == SenmlValue(273.15));
  // Unknown integer label 99 and unknown text key "foo" (with an array value) are ignored.
  auto d = resolve_cbor(hex("81 a4 00 61 78 02 01 18 63 01 63 66 6f 6f 82 01 02"));
  REQUIRE(d.ok());
  CHECK((*d)[0].value == SenmlValue(1.0));
  // vd as a byte string, vb true, vs text.
  auto e = resolve_cbor(hex("83 a2 00 61 61 08 42 68 69  a2 00 61 62 04 f5  a2 00 61 63 03 61 7a"));
  REQUIRE(e.ok());
  CHECK((*e)[0].value == SenmlValue(to_bytes("hi")));
  CHECK((*e)[1].value == SenmlValue(true));
  CHECK((*e)[2].value == SenmlValue(std::string("z")));
}

TEST_CASE("unknown JSON fields are ignored, must-understand ones refused", "[senml]") {
  auto plain = resolve_json(R"([{"n":"x","v":1}])");
  auto extended = resolve_json(R"([{"n":"x","foo":{"a":[1,{"b":null}]},"v":1,"bar":"z"}])");
  REQUIRE(plain.ok());
  REQUIRE(extended.ok());
  CHECK(*plain == *extended);
  CHECK(json_error(R"([{"n":"x","v":1,"foo_":1}])") ==
        "record 0: 'foo_' must be understood (it ends in '_') and is not a field medgate knows");
  CHECK(cbor_error("81 a3 00 61 78 02 01 62 78 5f 01") ==
        "record 0: 'x_' must be understood (it ends in '_') and is not a field medgate knows");
}

TEST_CASE("malformed SenML JSON: each gets its own error, naming record and field", "[senml]") {
  CHECK(json_error(R"({"n":"x","v":1})") == "the pack is not a JSON array");
  CHECK(json_error("5") == "the pack is not a JSON array");
  CHECK(json_error("[]") == "the pack has no records");
  CHECK(json_error(R"([{"n":"x","v":1}, 1])") == "record 1 is not a JSON object");
  CHECK(json_error(R"([{"n":"x","v":1}, []])") == "record 1 is not a JSON object");
  CHECK(json_error(R"([{"n":"x","v":"23.1"}])") == "record 0: 'v' is not a number");
  CHECK(json_error(R"([{"n":"x","v":{}}])") == "record 0: 'v' is not a number");
  CHECK(json_error(R"([{"n":5,"v":1}])") == "record 0: 'n' is not a string");
  CHECK(json_error(R"([{"n":"x","vb":1}])") == "record 0: 'vb' is not a boolean");
  CHECK(json_error(R"([{"n":"x","vd":5}])") == "record 0: 'vd' is not a string");
  CHECK(json_error(R"([{"n":"x","v":1,"t":"now"}])") == "record 0: 't' is not a number");
  CHECK(json_error(R"([{"n":"x","v":1,"v":2}])") == "record 0: 'v' appears twice");
  CHECK(json_error(R"([{"n":"x","v":1,"vs":"a"}])") ==
        "record 0: more than one value field ('v', 'vs')");
  CHECK(json_error(R"([{"n":"x","v":1}, {"n":"x","u":"Cel"}])") ==
        "record 1: no value field ('v', 'vs', 'vb' or 'vd') and no sum ('s')");
  CHECK(json_error(R"([{"v":1}])") == "record 0: no name (neither 'bn' nor 'n')");
  CHECK(json_error(R"([{"bn":"dev"}])") == "the pack has no measurement, only base fields");
  CHECK(json_error(R"([{"n":"x","v":1,"t":1e300}])") ==
        "record 0: 't' plus 'bt' is outside the times medgate records (1970 to 9999)");
  CHECK(json_error(R"([{"n":"x","v":1,"t":-1e10}])") ==
        "record 0: 't' plus 'bt' is outside the times medgate records (1970 to 9999)");
  CHECK(json_error(R"([{"bv":1e308,"n":"x","v":1e308}])") ==
        "record 0: 'v' plus 'bv' is not finite");
  // Not JSON at all, trailing bytes, invalid UTF-8: the position, never the text.
  CHECK(json_error(R"([{"n":"x","v":1}] x)") == "not valid JSON (at byte 19)");
  CHECK(json_error(R"([{"n":"x","v":1})").find("not valid JSON") == 0);
  CHECK(json_error("[{\"n\":\"x\",\"vs\":\"\xff\"}]").find("not valid JSON") == 0);
  CHECK(json_error("").find("not valid JSON") == 0);
}

TEST_CASE("vd is base64url without padding (RFC 8428 section 4.3)", "[senml]") {
  auto ok = resolve_json(R"([{"n":"x","vd":"_-8"}])");
  REQUIRE(ok.ok());
  CHECK((*ok)[0].value == SenmlValue(Bytes{std::byte{0xff}, std::byte{0xef}}));
  auto empty = resolve_json(R"([{"n":"x","vd":""}])");
  REQUIRE(empty.ok());
  CHECK((*empty)[0].value == SenmlValue(Bytes{}));
  for (const char* bad : {"aGkgCg==", "a+b/", "aGk gCg", "aGkgC", "aGkgCh"}) {
    INFO(bad);
    CHECK(json_error(std::string(R"([{"n":"x","vd":")") + bad + R"("}])") ==
          "record 0: 'vd' is not base64url");
  }
}

TEST_CASE("resolved names keep to RFC 8428 section 4.5.1's characters", "[senml]") {
  CHECK(resolve_json(R"([{"bn":"urn:dev:mac:0024befffe804ff1/","n":"a-b_c.d:e","v":1}])").ok());
  CHECK(json_error(R"([{"n":"a b","v":1}])") ==
        "record 0: the name ('bn' + 'n') has a character outside A-Z a-z 0-9 - : . / _ (RFC 8428 "
        "section 4.5.1)");
  CHECK(json_error(R"([{"bn":"dev/","n":"h\u00e9","v":1}])").find("has a character outside") !=
        std::string::npos);
  CHECK(json_error(R"([{"n":"-x","v":1}])") ==
        "record 0: the name ('bn' + 'n') does not start with a letter or digit (RFC 8428 section "
        "4.5.1)");
  CHECK(json_error(R"([{"bn":"/dev","v":1}])").find("does not start") != std::string::npos);
}

TEST_CASE("bver: a positive integer, at most 10, one per pack (RFC 8428 section 4.4)", "[senml]") {
  CHECK(json_error(R"([{"bver":11,"n":"x","v":1}])") ==
        "record 0: 'bver' is 11, newer than the SenML version 10 medgate understands (RFC 8428 "
        "section 4.4)");
  CHECK(json_error(R"([{"bver":0,"n":"x","v":1}])") ==
        "record 0: 'bver' is not a positive integer");
  CHECK(json_error(R"([{"bver":-1,"n":"x","v":1}])") ==
        "record 0: 'bver' is not a positive integer");
  CHECK(json_error(R"([{"bver":5.5,"n":"x","v":1}])") ==
        "record 0: 'bver' is not a positive integer");
  CHECK(json_error(R"([{"bver":5,"n":"x","v":1},{"bver":6,"n":"x","v":1}])") ==
        "record 1: 'bver' differs from the version of the records before");
  CHECK(json_error(R"([{"n":"x","v":1},{"bver":9,"n":"x","v":1}])") ==
        "record 1: 'bver' differs from the version of the records before");
  CHECK(resolve_json(R"([{"bver":9,"n":"x","v":1},{"bver":9,"n":"x","v":1}])").ok());
  CHECK(resolve_json(R"([{"n":"x","v":1},{"bver":10,"n":"x","v":1}])").ok());
}

TEST_CASE("malformed SenML CBOR: each gets its own error", "[senml]") {
  Bytes ex3 = read_data("ex3.gen.cbor");
  CHECK(cbor_error("a1 00 61 78") == "the pack is not a CBOR array");
  CHECK(cbor_error("80") == "the pack has no records");
  CHECK(cbor_error("82 a2 00 61 78 02 01 01") == "record 1 is not a CBOR map");
  CHECK(cbor_error("81 ff") == "record 0 is not a CBOR map");
  CHECK(cbor_error("81 a2 00 61 78 02 61 31") == "record 0: 'v' is not a number");
  CHECK(cbor_error("81 a2 00 41 78 02 01") == "record 0: 'n' is not a text string");
  CHECK(cbor_error("81 a2 00 61 78 08 61 78") == "record 0: 'vd' is not a byte string");
  CHECK(cbor_error("81 a2 00 61 78 02 f6") == "record 0: 'v' is not a number");  // null
  CHECK(cbor_error("81 a2 00 61 78 02 f9 7c 00") == "record 0: 'v' is not a finite number");
  CHECK(cbor_error("81 a2 00 61 78 02 fb 7f f8 00 00 00 00 00 00") ==
        "record 0: 'v' is not a finite number");
  CHECK(cbor_error("81 a3 20 f9 45 00 00 61 78 02 01") ==
        "record 0: 'bver' is not a positive integer");  // 5.0 as a float
  CHECK(cbor_error("81 a3 00 61 78 02 01 02 02") == "record 0: 'v' appears twice");
  CHECK(cbor_error("81 a3 00 61 78 18 63 01 18 63 02") == "record 0: label 99 appears twice");
  CHECK(cbor_error("81 a2 00 61 78 61 76 01") ==
        "record 0: 'v' must use the CBOR label 2, not a text key");
  CHECK(cbor_error("81 a2 00 61 78 41 76 01") ==
        "CBOR at byte 5: record 0: a key is neither an integer nor a text string");
  CHECK(cbor_error("81 a2 00 62 c3 28 02 01") == "CBOR at byte 3: text string is not UTF-8");
  CHECK(cbor_error("81 a2 00 61 78 02 c1 01") == "CBOR at byte 6: tag 1 is not supported");
  CHECK(cbor_error("81 a2 00 61 78 02 c2 41 01") == "CBOR at byte 6: tag 2 is not supported");
  CHECK(cbor_error("81 a2 00 7f 61 78 ff 02 01") ==
        "CBOR at byte 3: indefinite-length string (RFC 8428 section 6 wants definite)");
  CHECK(cbor_error("81 a2 00 61 78 02 1c") == "CBOR at byte 6: reserved additional information");
  CHECK(cbor_error("81 a2 00 61 78 02 ff") ==
        "CBOR at byte 6: break outside an indefinite-length array or map");
  CHECK(cbor_error("81 a2 00 61 78 02 c4 82 21 41 01") ==
        "CBOR at byte 9: decimal fraction mantissa is not an integer");
  // Truncated anywhere: in a head, a string, a map, the array.
  CHECK(cbor_error("") == "CBOR truncated at byte 0");
  CHECK(cbor_error("81 a2 00 61") == "CBOR truncated at byte 4");
  CHECK(cbor_error("81 a2 00 61 78 02 fb 40 5e") == "CBOR truncated at byte 7");
  CHECK(cbor_error("81 a2 00 61 78") == "CBOR truncated at byte 5");
  CHECK(cbor_error("9f a2 00 61 78 02 01") == "CBOR truncated at byte 7");
  for (std::size_t n = 0; n < ex3.size(); ++n) {
    INFO(n);
    auto r = decode_senml_cbor(ByteView(ex3).first(n));
    REQUIRE_FALSE(r.ok());
    CHECK(r.status().message().find("truncated") != std::string::npos);
  }
  // Trailing bytes after a complete pack.
  Bytes trailing = ex3;
  trailing.push_back(std::byte{0});
  auto t = decode_senml_cbor(trailing);
  REQUIRE_FALSE(t.ok());
  CHECK(t.status().message() == "bytes after the pack's array (at byte 195)");
}

TEST_CASE("nesting, size and record limits", "[senml]") {
  // An ignored field nested past kMaxDepth.
  CHECK(json_error(R"([{"n":"x","v":1,"foo":[[[[[[[1]]]]]]]}])") == "nested deeper than 8 levels");
  CHECK(resolve_json(R"([{"n":"x","v":1,"foo":[[[[[1]]]]]}])").ok());
  CHECK(cbor_error("81 a3 00 61 78 02 01 63 66 6f 6f 81 81 81 81 81 81 81 01") ==
        "CBOR at byte 17: nested deeper than 8 levels");

  // kMaxRecords records are fine; one more is "too large".
  auto pack = [](std::size_t n) {
    std::string s = "[";
    for (std::size_t i = 0; i < n; ++i) s += std::string(i ? "," : "") + R"({"n":"x","v":1})";
    return s + "]";
  };
  CHECK(resolve_json(pack(kMaxRecords)).ok());
  auto over = decode_senml_json(as_bytes(pack(kMaxRecords + 1)));
  REQUIRE_FALSE(over.ok());
  CHECK(is_too_large(over.status()));
  CHECK(over.status().message() == "pack too large: more than 1000 records");
  CHECK_FALSE(is_too_large(decode_senml_json(as_bytes("{}")).status()));

  Record one;
  one.name = "x";
  one.value = 1.0;
  std::vector<Record> many(kMaxRecords + 1, one);
  Bytes cbor_many = encode_senml_cbor(many);
  auto cbor_over = decode_senml_cbor(cbor_many);
  REQUIRE_FALSE(cbor_over.ok());
  CHECK(is_too_large(cbor_over.status()));
  CHECK(is_too_large(resolve(many, kNowUs).status()));
  // An indefinite array is counted as it is read.
  Bytes indefinite = cbor_many;
  indefinite[0] = std::byte{0x9f};
  indefinite.erase(indefinite.begin() + 1, indefinite.begin() + 3);  // the 16-bit count
  indefinite.push_back(std::byte{0xff});
  auto ind_over = decode_senml_cbor(indefinite);
  REQUIRE_FALSE(ind_over.ok());
  CHECK(is_too_large(ind_over.status()));

  // Over kMaxPackBytes, before parsing.
  std::string big = R"([{"n":"x","vs":")" + std::string(kMaxPackBytes, 'a') + R"("}])";
  auto too_big = decode_senml_json(as_bytes(big));
  REQUIRE_FALSE(too_big.ok());
  CHECK(is_too_large(too_big.status()));
  CHECK(is_too_large(decode_senml_cbor(to_bytes(big)).status()));
}

TEST_CASE("Observations from resolved SenML", "[senml]") {
  auto resolved = resolve_json(to_string(read_data("ex2.gen.json")), kFrozenNowUs);
  REQUIRE(resolved.ok());
  auto obs = observations_from_senml(*resolved, "coap-dev-1", "MRN:123");
  REQUIRE(obs.ok());
  REQUIRE(obs->size() == 2);
  Observation expected;
  expected.patient_id = "MRN:123";
  expected.code = "urn:dev:ow:10e2073a01080063:voltage";
  expected.code_system = "SenML";
  expected.value = 120.1;
  expected.unit = "V";
  expected.time_us = kFrozenNowUs;
  expected.device_id = "coap-dev-1";
  CHECK((*obs)[0] == expected);
  CHECK((*obs)[1].code == "urn:dev:ow:10e2073a01080063:current");
  CHECK((*obs)[1].unit == "A");
  CHECK((*obs)[1].value == decltype(expected.value)(1.2));

  // A sum is an Observation of its own, display "s"; a sum-only record gives only that.
  auto sums = resolve_json(R"([{"n":"meter","u":"W","v":5,"s":100},{"n":"meter","u":"W","s":7}])");
  REQUIRE(sums.ok());
  auto sobs = observations_from_senml(*sums, "d", "p");
  REQUIRE(sobs.ok());
  REQUIRE(sobs->size() == 3);
  CHECK((*sobs)[0].value == decltype(expected.value)(5.0));
  CHECK((*sobs)[0].display.empty());
  CHECK((*sobs)[1].value == decltype(expected.value)(100.0));
  CHECK((*sobs)[1].display == "s");
  CHECK((*sobs)[2].value == decltype(expected.value)(7.0));
  CHECK((*sobs)[2].display == "s");

  // Data values stay bytes.
  auto ex7 = resolve_json(to_string(read_data("ex7.gen.json")));
  REQUIRE(ex7.ok());
  auto dobs = observations_from_senml(*ex7, "d", "p");
  REQUIRE(dobs.ok());
  CHECK((*dobs)[3].value == decltype(expected.value)(to_bytes("hi \n")));
  CHECK((*dobs)[2].value == decltype(expected.value)(false));

  CHECK_FALSE(observations_from_senml(*resolved, "", "p").ok());
}

TEST_CASE("error messages never carry values or names", "[senml]") {
  const std::string secret = "PATIENTSECRET";
  for (std::string json : {
           R"([{"n":"PATIENTSECRET","v":"PATIENTSECRET"}])",
           R"([{"n":"PATIENTSECRET x","v":1}])",
           R"([{"n":"x","vd":"PATIENTSECRET!"}])",
           R"([{"n":"x","v":1,"PATIENTSECRET_":1}])",
           R"([{"n":"x","v":1,"PATIENTSECRET PATIENTSECRET_":1}])",
           R"([{"n":"x","v":1}] PATIENTSECRET)",
       }) {
    std::string message = json_error(json);
    INFO(message);
    if (json.find("\"PATIENTSECRET_\"") != std::string::npos) continue;  // a label, shown
    CHECK(message.find(secret) == std::string::npos);
  }
}
