// Deterministic CBOR: known encodings (RFC 8949 appendix A), canonical ordering, and the strict
// decoder refusing every non-canonical form.
#include <catch2/catch.hpp>

#include <random>

#include <nlohmann/json.hpp>

#include "ledger/cbor.h"

using namespace medgate;
using namespace medgate::ledger;

namespace {
Bytes hex(std::string_view h) {
  return *from_hex(h);
}
std::string enc(const cbor::Value& v) {
  return to_hex(cbor::encode(v));
}
}  // namespace

TEST_CASE("CBOR encodes integers in shortest form (RFC 8949 appendix A)", "[cbor]") {
  CHECK(enc(cbor::Value::uint(0)) == "00");
  CHECK(enc(cbor::Value::uint(23)) == "17");
  CHECK(enc(cbor::Value::uint(24)) == "1818");
  CHECK(enc(cbor::Value::uint(100)) == "1864");
  CHECK(enc(cbor::Value::uint(1000)) == "1903e8");
  CHECK(enc(cbor::Value::uint(1000000)) == "1a000f4240");
  CHECK(enc(cbor::Value::uint(1000000000000)) == "1b000000e8d4a51000");
  CHECK(enc(cbor::Value::uint(18446744073709551615ULL)) == "1bffffffffffffffff");
  CHECK(enc(cbor::Value::integer(-1)) == "20");
  CHECK(enc(cbor::Value::integer(-100)) == "3863");
  CHECK(enc(cbor::Value::integer(-1000)) == "3903e7");
  CHECK(enc(cbor::Value::integer(INT64_MIN)) == "3b7fffffffffffffff");
  CHECK(enc(cbor::Value::boolean(false)) == "f4");
  CHECK(enc(cbor::Value::boolean(true)) == "f5");
  CHECK(enc(cbor::Value::null()) == "f6");
  CHECK(enc(cbor::Value::text("IETF")) == "6449455446");
  CHECK(enc(cbor::Value::text("\xc3\xbc")) == "62c3bc");
  CHECK(enc(cbor::Value::bytes(hex("01020304"))) == "4401020304");
  CHECK(enc(cbor::Value::array({cbor::Value::uint(1), cbor::Value::uint(2)})) == "820102");
}

TEST_CASE("CBOR maps are sorted by encoded key and reject duplicates", "[cbor]") {
  auto m = cbor::Value::map({{cbor::Value::text("b"), cbor::Value::uint(2)},
                             {cbor::Value::text("a"), cbor::Value::uint(1)},
                             {cbor::Value::uint(10), cbor::Value::uint(0)},
                             {cbor::Value::text("aa"), cbor::Value::uint(3)}});
  REQUIRE(m.ok());
  // 0a < 6161 < 6162 < 626161 (bytewise on encodings: shorter text sorts first).
  CHECK(enc(*m) ==
        "a40a00616101616202626161"
        "03");
  CHECK(m->find("a")->as_uint() == 1u);
  CHECK(m->find(10)->as_uint() == 0u);
  CHECK(m->find("zz") == nullptr);

  auto dup = cbor::Value::map({{cbor::Value::text("a"), cbor::Value::uint(1)},
                               {cbor::Value::text("a"), cbor::Value::uint(2)}});
  CHECK(dup.status().code() == StatusCode::kInvalidArgument);
}

TEST_CASE("CBOR decode round-trips what encode wrote", "[cbor]") {
  auto inner = cbor::Value::map({{cbor::Value::text("x"), cbor::Value::bytes(hex("00ff"))}});
  auto v = cbor::Value::array({cbor::Value::uint(0), cbor::Value::integer(-5),
                               cbor::Value::text("héllo"), *inner, cbor::Value::null(),
                               cbor::Value::boolean(true), cbor::Value::array({})});
  Bytes bytes = cbor::encode(v);
  auto back = cbor::decode(bytes);
  REQUIRE(back.ok());
  CHECK(*back == v);
  CHECK(cbor::encode(*back) == bytes);
}

TEST_CASE("CBOR decode refuses every non-canonical or unsupported form, naming the offset",
          "[cbor]") {
  struct Case {
    const char* hex;
    const char* why;
  };
  const Case cases[] = {
      {"1817", "shortest form"},        // 23 written with one extra byte
      {"190017", "shortest form"},      // 23 in two bytes
      {"1a0000ffff", "shortest form"},  // fits in two bytes
      {"1b00000000ffffffff", "shortest form"},
      {"5f4101ff", "indefinite"},             // indefinite byte string
      {"9f01ff", "indefinite"},               // indefinite array
      {"a2616201616101", "canonical order"},  // {"b":1,"a":1}
      {"a2616101616102", "duplicate"},        // {"a":1,"a":2}
      {"f93c00", "floats"},                   // half float
      {"fb3ff199999999999a", "floats"},       // double
      {"f7", "floats"},                       // undefined
      {"c11a514b67b0", "tags"},               // tag 1
      {"62c328", "UTF-8"},                    // invalid UTF-8
      {"63eda080", "UTF-8"},                  // a surrogate
      {"c0", "tags"},
      {"1c", "reserved"},
      {"", "end of data"},
      {"0102", "trailing"},
      {"43010203ff", "trailing"},
      {"45010203", "past the end"},                    // length beyond data
      {"9bffffffffffffffff", "longer than the data"},  // huge array count
      {"bbffffffffffffffff", "longer than the data"},
      {"7bffffffffffffffff", "past the end"},
  };
  for (const Case& c : cases) {
    INFO(c.hex);
    auto r = cbor::decode(hex(c.hex));
    REQUIRE_FALSE(r.ok());
    CHECK(r.status().code() == StatusCode::kCorruption);
    CHECK_THAT(r.status().message(), Catch::Contains(c.why));
    CHECK_THAT(r.status().message(), Catch::Contains("at byte"));
  }
}

TEST_CASE("CBOR decode limits nesting depth instead of overflowing the stack", "[cbor]") {
  Bytes deep(100000, std::byte{0x81});  // [[[[...
  deep.push_back(std::byte{0x00});
  auto r = cbor::decode(deep);
  REQUIRE_FALSE(r.ok());
  CHECK_THAT(r.status().message(), Catch::Contains("nesting"));
}

TEST_CASE("CBOR decode never crashes on random bytes and accepts only canonical input", "[cbor]") {
  std::mt19937_64 rng(42);
  for (int i = 0; i < 20000; ++i) {
    Bytes b(rng() % 24);
    for (auto& x : b) x = std::byte(rng() & 0xff);
    auto r = cbor::decode(b);
    if (r.ok()) CHECK(cbor::encode(*r) == b);  // whatever is accepted is exactly canonical
  }
}

TEST_CASE("CBOR renders as JSON for people", "[cbor]") {
  auto m = cbor::Value::map({{cbor::Value::text("k"), cbor::Value::bytes(hex("abcd"))},
                             {cbor::Value::text("n"), cbor::Value::integer(-3)}});
  CHECK(cbor::to_json(*m).dump() == R"({"k":"abcd","n":-3})");
}
