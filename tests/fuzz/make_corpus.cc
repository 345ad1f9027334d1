// Writes the generated part of the seed corpus: canonical entries, block headers, signed heads
// and CBOR values made by the project's own encoders (so they are valid by construction), and
// near misses of each (one rule broken) so the fuzzer starts on both sides of every check.
// Run by hand when a format changes: fuzz_make_corpus tests/fuzz/corpus (see README.md). The
// TOML and JSON seeds are written by hand.
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>

#include "ledger/block.h"
#include "ledger/block_record.h"
#include "ledger/membership.h"
#include "ledger/cbor.h"
#include "ledger/entry.h"

using namespace medgate;
using namespace medgate::ledger;

namespace {

std::filesystem::path g_root;

void put(const std::string& dir, const std::string& name, const Bytes& bytes) {
  std::filesystem::create_directories(g_root / dir);
  std::ofstream out(g_root / dir / name, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(bytes.data()),
            static_cast<std::streamsize>(bytes.size()));
}

Bytes hex(std::string_view h) {
  return *from_hex(h);
}

Hash fill(unsigned char c) {
  Hash h;
  h.fill(std::byte(c));
  return h;
}

cbor::Value map(cbor::Map m) {
  return cbor::Value::map(std::move(m)).value();
}
cbor::Value text(std::string s) {
  return cbor::Value::text(std::move(s));
}

Bytes entry_bytes(const Entry& e) {
  return encode_entry(e).value();
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: fuzz_make_corpus CORPUS_ROOT\n");
    return 2;
  }
  g_root = argv[1];

  // ---- entries (format version 1, as these seeds were first written; the fuzzer reaches 2)
  Entry genesis{1,
                EntryType::kGenesis,
                1764090184123456,
                "system:medgated",
                map({{text("ledger_id"), text("ward-7")},
                     {text("key_id"), cbor::Value::bytes(ByteView(fill(0xab)))},
                     {text("public_key"), cbor::Value::bytes(hex("3059301306072a8648ce3d0201"))}}),
                {}};
  Entry admin{
      1,
      EntryType::kAdminAction,
      1764090185000000,
      "user:alice",
      map({{text("op"), text("keys.rotate")},
           {text("args"), map({{text("reason"), text("scheduled")},
                               {text("count"), cbor::Value::integer(-3)},
                               {text("list"), cbor::Value::array({cbor::Value::boolean(true),
                                                                  cbor::Value::null()})}})}}),
      {{hex("0102030405060708"), std::nullopt}, {hex("a0a1a2a3"), 41}}};
  Entry key_event{1,
                  EntryType::kKeyEvent,
                  0,
                  "uid:1234",
                  map({{text("event"), text("registered")},
                       {text("key_id"), cbor::Value::bytes(ByteView(fill(0x01)))}}),
                  {}};
  Bytes g = entry_bytes(genesis), a = entry_bytes(admin), k = entry_bytes(key_event);
  put("entry", "genesis", g);
  put("entry", "admin-action-with-subjects", a);
  put("entry", "key-event", k);
  Bytes bad = g;
  bad[4] = std::byte(0x02);  // format version 2
  put("entry", "bad-version", bad);
  bad = g;
  bad[6] = std::byte(0x09);  // entry type 9
  put("entry", "bad-unknown-type", bad);
  bad = g;
  bad[0] = std::byte(0xa7);  // one more map entry than present
  bad.push_back(std::byte(0x07));
  bad.push_back(std::byte(0xf6));
  put("entry", "bad-extra-key", bad);
  bad = a;
  bad.resize(bad.size() - 1);
  put("entry", "bad-truncated", bad);
  // subjects: [[h'', null]] (an empty pseudonym)
  bad = g;
  bad[0] = std::byte(0xa7);
  for (auto b : hex("06818240f6")) bad.push_back(b);
  put("entry", "bad-empty-subject", bad);

  // ---- block headers and signed heads
  BlockHeader header{kBlockFormatVersion, "ward-7",         3,         fill(0x11), 10, 5, 15,
                     fill(0x22),          1764090186000000, fill(0x33)};
  HeadBody head{kHeadFormatVersion, "ward-7",         3,         fill(0x44), 15,
                fill(0x22),         1764090187000000, fill(0x33)};
  Bytes h = encode_block_header(header), s = encode_head(head);
  put("block", "header", h);
  put("block", "head", s);
  header.height = 0;
  header.previous_hash = Hash{};
  header.first_index = 0;
  header.entry_count = 1;
  header.tree_size = 1;
  put("block", "header-genesis", encode_block_header(header));
  header.tree_size = 2;  // first_index + entry_count != tree_size
  put("block", "bad-header-tree-size", encode_block_header(header));
  header.tree_size = 0;
  header.entry_count = 0;
  put("block", "bad-header-no-entries", encode_block_header(header));
  head.version = kHeadFormatVersion + 1;  // a version this build does not read
  put("block", "bad-head-version", encode_head(head));
  head.version = kHeadFormatVersion;
  head.ledger_id = "";
  put("block", "bad-head-empty-ledger-id", encode_head(head));
  bad = s;
  bad[1] = std::byte(0x00), bad[2] = std::byte(0x02);  // kind 2 under a head's fields
  put("block", "bad-head-wrong-kind", bad);

  // ---- block records and membership statements (replication), in the block corpus
  BlockRecord record;
  record.header_bytes = h;  // the header above counts five entries: give five
  record.header = *decode_block_header(h);
  for (int i = 0; i < 5; ++i) record.entries.push_back(a);
  record.proposer = "ward-3a";
  record.signature = hex("3045022100aa022000bb");
  record.outbox_first = 7;
  record.outbox_count = 5;
  put("block", "record", encode_block_record(record));
  record.entries.pop_back();
  put("block", "bad-record-count", encode_block_record(record));
  MembershipStatement statement;
  statement.ledger_id = "ward-7";
  statement.epoch = 2;
  statement.member_id = "ward-3b";
  // A P-256 public key (test data, generated once with openssl ecparam/ec -pubout -outform DER).
  statement.signing_key = *PublicKey::from_spki_der(hex("3059301306072a8648ce3d020106082a8648ce3d030107034200049c8f03995f3ccabbe51c821c4b590a8c341bb9544104b535921de13fc47a2df8bd071a6346000360e6243748a7e8227b493c60c657aba41a26cd7ef7d34eefab"));
  statement.endpoint = "10.20.0.7:7400";
  put("block", "statement-add", *encode_membership_statement(statement));
  statement.action = MembershipAction::kRemove;
  statement.signing_key.reset();
  statement.endpoint.clear();
  put("block", "statement-remove", *encode_membership_statement(statement));

  // ---- plain CBOR: every type, every length form, and one broken rule each
  put("cbor", "entry", a);
  put("cbor", "header", h);
  cbor::Value all = cbor::Value::array(
      {cbor::Value::uint(0), cbor::Value::uint(23), cbor::Value::uint(24), cbor::Value::uint(255),
       cbor::Value::uint(256), cbor::Value::uint(65536), cbor::Value::uint(1ULL << 32),
       cbor::Value::uint(UINT64_MAX), cbor::Value::integer(-1), cbor::Value::integer(INT64_MIN),
       cbor::Value::bytes(hex("00ff")), text("ü€𝄞"), cbor::Value::boolean(false),
       cbor::Value::boolean(true), cbor::Value::null(),
       map({{cbor::Value::uint(1), text("a")},
            {cbor::Value::integer(-1), text("b")},
            {text("z"), cbor::Value::array({})},
            {cbor::Value::bytes(hex("00")), map({})}})});
  put("cbor", "every-type", cbor::encode(all));
  put("cbor", "negative-2-pow-64", hex("3bffffffffffffffff"));
  put("cbor", "text-300", cbor::encode(text(std::string(300, 'x'))));
  put("cbor", "bad-not-shortest", hex("1805"));
  put("cbor", "bad-float", hex("f93c00"));
  put("cbor", "bad-tag", hex("c001"));
  put("cbor", "bad-indefinite", hex("9f01ff"));
  put("cbor", "bad-unsorted-map", hex("a202000100"));
  put("cbor", "bad-duplicate-key", hex("a201000100"));
  put("cbor", "bad-trailing", hex("0000"));
  put("cbor", "bad-truncated", hex("1a0001"));
  put("cbor", "bad-utf8", hex("62c328"));
  put("cbor", "bad-too-deep", hex("81818181818181818181818181818181818100"));
  put("cbor", "bad-huge-array", hex("9bffffffffffffffff"));
  std::printf("wrote the generated seeds under %s\n", argv[1]);
  return 0;
}
