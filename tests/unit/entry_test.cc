// Entries, block headers and heads: the canonical encodings round-trip, are stable (golden
// bytes: a change here changes every hash ever signed), and strict decoding names the problem.
#include <catch2/catch.hpp>

#include "ledger/block.h"
#include "ledger/entry.h"
#include "ledger/merkle.h"

using namespace medgate;
using namespace medgate::ledger;

namespace {
Entry admin_entry() {
  Entry e;
  e.type = EntryType::kAdminAction;
  e.time_us = 1764090000000000;
  e.actor = "user:alice";
  e.body = *cbor::Value::map({{cbor::Value::text("op"), cbor::Value::text("sign-head")},
                              {cbor::Value::text("args"), *cbor::Value::map({})}});
  return e;
}
}  // namespace

TEST_CASE("an entry encodes canonically and decodes back", "[entry]") {
  Entry e = admin_entry();
  auto bytes = encode_entry(e);
  REQUIRE(bytes.ok());
  // Golden bytes: format version 2 (key 1 = 2; version 1's golden bytes, which differ only there,
  // are checked in audit_test.cc). If this changes, every ledger breaks.
  CHECK(to_hex(*bytes) ==
        "a600010102020203"
        "1b0006446e35cd4400"
        "046a757365723a616c696365"
        // body: {"op": "sign-head", "args": {}} -- "op" (62 6f70) sorts before "args" (64 ...)
        "05a2626f7069"
        "7369676e2d68656164"
        "6461726773a0");
  auto back = decode_entry(*bytes);
  REQUIRE(back.ok());
  CHECK(*back == e);
}

TEST_CASE("subject links are encoded and decoded", "[entry]") {
  Entry e = admin_entry();
  e.subjects = {{to_bytes("pseudonym-1"), std::nullopt}, {to_bytes("pseudonym-2"), 41}};
  auto bytes = encode_entry(e);
  REQUIRE(bytes.ok());
  auto back = decode_entry(*bytes);
  REQUIRE(back.ok());
  CHECK(back->subjects == e.subjects);
}

TEST_CASE("encode_entry refuses entries that break their type's rules", "[entry]") {
  Entry e = admin_entry();
  e.actor = "";
  CHECK(encode_entry(e).status().code() == StatusCode::kInvalidArgument);
  e = admin_entry();
  e.body = *cbor::Value::map({{cbor::Value::text("args"), *cbor::Value::map({})}});
  CHECK_THAT(encode_entry(e).status().message(), Catch::Contains("\"op\""));
  e = admin_entry();
  e.type = static_cast<EntryType>(999);
  CHECK_THAT(encode_entry(e).status().message(), Catch::Contains("unknown entry type 999"));
  e = admin_entry();
  e.body = cbor::Value::text("not a map");
  CHECK_THAT(encode_entry(e).status().message(), Catch::Contains("not a map"));
  Entry g;
  g.type = EntryType::kGenesis;
  g.actor = "system:test";
  g.body = *cbor::Value::map({{cbor::Value::text("ledger_id"), cbor::Value::text("x")},
                              {cbor::Value::text("key_id"), cbor::Value::bytes(Bytes(31))},
                              {cbor::Value::text("public_key"), cbor::Value::bytes(Bytes(3))}});
  CHECK_THAT(encode_entry(g).status().message(), Catch::Contains("32 bytes"));
}

TEST_CASE("decode_entry refuses other objects, versions, keys and types", "[entry]") {
  Bytes good = *encode_entry(admin_entry());
  auto with = [&](std::size_t at, std::uint8_t value) {
    Bytes b = good;
    b[at] = std::byte(value);
    return decode_entry(b);
  };
  CHECK_THAT(with(2, 2).status().message(), Catch::Contains("not an entry"));           // kind 2
  CHECK_THAT(with(4, 9).status().message(), Catch::Contains("version 9"));              // version
  CHECK_THAT(with(6, 0x17).status().message(), Catch::Contains("type 23 is unknown"));  // type
  // An extra key 7 is not in format 1.
  Bytes extra = good;
  extra[0] = std::byte(0xa7);
  extra.push_back(std::byte(0x07));
  extra.push_back(std::byte(0x00));
  CHECK_THAT(decode_entry(extra).status().message(), Catch::Contains("does not define"));
  CHECK(decode_entry(Bytes{}).status().code() == StatusCode::kCorruption);
}

TEST_CASE("block headers and heads round-trip and check their arithmetic", "[entry]") {
  BlockHeader h;
  h.ledger_id = "icu-1";
  h.height = 7;
  h.previous_hash.fill(std::byte{1});
  h.first_index = 100;
  h.entry_count = 5;
  h.tree_size = 105;
  h.root.fill(std::byte{2});
  h.time_us = 123;
  h.key_id.fill(std::byte{3});
  Bytes b = encode_block_header(h);
  auto back = decode_block_header(b);
  REQUIRE(back.ok());
  CHECK(*back == h);
  h.tree_size = 106;
  CHECK_THAT(decode_block_header(encode_block_header(h)).status().message(),
             Catch::Contains("!= tree size"));
  // An entry's bytes are not a block header.
  CHECK_THAT(decode_block_header(*encode_entry(admin_entry())).status().message(),
             Catch::Contains("fields"));

  HeadBody head{kHeadFormatVersion, "icu-1", 7, block_hash(b), 105, h.root, 456, h.key_id};
  auto hb = decode_head(encode_head(head));
  REQUIRE(hb.ok());
  CHECK(*hb == head);
  CHECK_THAT(decode_head(b).status().message(), Catch::Contains("fields"));
}

TEST_CASE("RFC 3339 times parse and format", "[entry]") {
  CHECK(parse_time("2026-11-25T17:03:04Z") == 1795626184000000ULL);
  CHECK(parse_time("2026-11-25T17:03:04.5Z") == 1795626184500000ULL);
  CHECK(parse_time("2026-11-25T18:03:04+01:00") == 1795626184000000ULL);
  CHECK(format_time(1795626184123456ULL) == "2026-11-25T17:03:04.123456Z");
  CHECK_FALSE(parse_time("2026-11-25"));
  CHECK_FALSE(parse_time("2026-13-25T17:03:04Z"));
  CHECK_FALSE(parse_time("2026-11-25T17:03:04"));
  CHECK_FALSE(parse_time("yesterday"));
}

TEST_CASE("a patient-erasure entry carries a 32-byte pseudonym and a reason", "[entry]") {
  Entry e;
  e.type = EntryType::kPatientErasure;
  e.time_us = 1764090000000000;
  e.actor = "user:alice";
  Bytes pseudonym(32, std::byte{0xab});
  auto body = [&](std::optional<Bytes> p, std::optional<cbor::Value> reason) {
    cbor::Map m;
    if (p) m.emplace_back(cbor::Value::text("pseudonym"), cbor::Value::bytes(*p));
    if (reason) m.emplace_back(cbor::Value::text("reason"), *reason);
    return *cbor::Value::map(std::move(m));
  };
  e.body = body(pseudonym, cbor::Value::text(""));
  e.subjects = {{pseudonym, std::nullopt}};
  auto bytes = encode_entry(e);
  REQUIRE(bytes.ok());
  auto back = decode_entry(*bytes);
  REQUIRE(back.ok());
  CHECK(*back == e);
  CHECK(find_entry_type(4)->name == "patient-erasure");
  CHECK(find_entry_type("patient-erasure")->type == EntryType::kPatientErasure);

  e.body = body(Bytes(31), cbor::Value::text("x"));
  CHECK_THAT(encode_entry(e).status().message(), Catch::Contains("32 bytes"));
  e.body = body(std::nullopt, cbor::Value::text("x"));
  CHECK_THAT(encode_entry(e).status().message(), Catch::Contains("\"pseudonym\""));
  e.body = body(pseudonym, std::nullopt);
  CHECK_THAT(encode_entry(e).status().message(), Catch::Contains("\"reason\""));
  e.body = body(pseudonym, cbor::Value::uint(3));
  CHECK_THAT(encode_entry(e).status().message(), Catch::Contains("\"reason\""));
}

TEST_CASE("a device event may carry a sealed PSK of a plausible size, never anything else",
          "[entry]") {
  auto event = [](std::optional<cbor::Value> sealed) {
    Entry e;
    e.type = EntryType::kDeviceEvent;
    e.time_us = 1;
    e.actor = "user:root";
    cbor::Map m{{cbor::Value::text("event"), cbor::Value::text("add")},
                {cbor::Value::text("device"), cbor::Value::text("pump-1")},
                {cbor::Value::text("kind"), cbor::Value::text("coap")}};
    if (sealed) m.emplace_back(cbor::Value::text("psk_sealed"), std::move(*sealed));
    e.body = *cbor::Value::map(std::move(m));
    return e;
  };
  CHECK(encode_entry(event(std::nullopt)).ok());
  CHECK(encode_entry(event(cbor::Value::bytes(Bytes(60)))).ok());
  for (cbor::Value bad : {cbor::Value::bytes(Bytes(28)), cbor::Value::bytes(Bytes(513)),
                          cbor::Value::text("a PSK in clear")}) {
    Result<Bytes> refused = encode_entry(event(std::move(bad)));
    CHECK(refused.status().code() == StatusCode::kInvalidArgument);
    CHECK_THAT(refused.status().message(), Catch::Contains("psk_sealed"));
  }
}
