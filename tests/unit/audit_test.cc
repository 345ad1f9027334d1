// Per-subject completeness (subject links filled by the writer, the subject map in version-2
// heads, both checked by the full verifier) and audit bundles: export from a real ledger (real
// SQLite, real SoftHSM signatures), verify offline, and every tamper named with its reason.
#include <catch2/catch.hpp>

#include <algorithm>
#include <filesystem>
#include <string>
#include <vector>

#include "ledger/audit_bundle.h"
#include "ledger/block.h"
#include "ledger/entry.h"
#include "ledger/merkle.h"
#include "ledger/store.h"
#include "ledger/subject_map.h"
#include "ledger/verifier.h"
#include "tests/support/entries.h"
#include "tests/support/softhsm.h"
#include "tests/support/temp_dir.h"

using namespace medgate;
using namespace medgate::ledger;
using medgate::testing::note;
using medgate::testing::SoftHsmToken;
using medgate::testing::TempDir;

namespace {

LedgerOptions options_for(const std::filesystem::path& path) {
  LedgerOptions o;
  o.path = path;
  o.head_interval = std::chrono::milliseconds(0);  // heads only when asked: tests decide
  o.counter_interval = std::chrono::seconds(0);
  return o;
}

Bytes patient(char c) {
  return Bytes(32, std::byte(c));
}

// An access decision about `who`, by `principal`.
Entry access(const Bytes& who, const std::string& principal, const std::string& decision) {
  using cbor::Value;
  Entry e;
  e.type = EntryType::kAccessDecision;
  e.actor = "user:clinician";
  e.body = *Value::map({{Value::text("principal"), Value::text(principal)},
                        {Value::text("action"), Value::text("Action::\"read\"")},
                        {Value::text("purpose"), Value::text("TREAT")},
                        {Value::text("data"), Value::text("vitals")},
                        {Value::text("decision"), Value::text(decision)},
                        {Value::text("policies"), Value::array({})},
                        {Value::text("errors"), Value::array({})},
                        {Value::text("break_glass"), Value::boolean(false)},
                        {Value::text("state"), Value::uint(0)},
                        {Value::text("returned"), Value::uint(0)}});
  e.subjects = {{who, std::nullopt}};
  return e;
}

Entry erasure(const Bytes& who) {
  using cbor::Value;
  Entry e;
  e.type = EntryType::kPatientErasure;
  e.actor = "user:admin";
  e.body = *Value::map(
      {{Value::text("pseudonym"), Value::bytes(who)}, {Value::text("reason"), Value::text("")}});
  e.subjects = {{who, std::nullopt}};
  return e;
}

struct Signed {
  Bytes bytes, signature;
};

Signed sign(hsm::KeyStore& keys, const AuditBundle& b) {
  Result<Bytes> bytes = encode_audit_bundle(b);
  REQUIRE(bytes.ok());
  Result<HeadBody> head = decode_head(b.head.bytes);
  REQUIRE(head.ok());
  Result<Bytes> sig = keys.sign_digest_with(head->key_id, sha256(*bytes));
  REQUIRE(sig.ok());
  return {*bytes, *sig};
}

AuditReport verify(const Signed& s, const PublicKey& trusted) {
  Result<AuditReport> r = verify_audit_bundle(s.bytes, s.signature, {trusted});
  INFO(r.status().to_string());
  REQUIRE(r.ok());
  return *r;
}

std::string problems(const AuditReport& r) {
  std::string out;
  for (const std::string& p : r.problems) out += p + "\n";
  return out;
}

bool has_problem(const AuditReport& r, std::string_view text) {
  return std::any_of(r.problems.begin(), r.problems.end(),
                     [&](const std::string& p) { return p.find(text) != std::string::npos; });
}

// A ledger with two patients (a: 4 entries, b: 2), notes in between, and signed heads.
struct Fixture {
  TempDir dir;
  SoftHsmToken token{dir.path()};
  std::unique_ptr<hsm::KeyStore> keys = token.open_with_key();
  std::unique_ptr<Ledger> ledger;
  PublicKey key;
  Bytes a = patient('a'), b = patient('b');

  Fixture() : key(keys->signing_key()) {
    auto created = Ledger::create(options_for(dir / "ledger.db"), "ward-7", *keys, "user:root");
    REQUIRE(created.ok());
    ledger = std::move(created).value();
    REQUIRE(ledger->append(note("setup")).ok());
    REQUIRE(ledger->append(access(a, "Practitioner::\"dr-lee\"", "allow")).ok());
    REQUIRE(ledger->sign_head_now().ok());
    REQUIRE(ledger->append(access(b, "Practitioner::\"dr-kim\"", "deny")).ok());
    Entry both = access(a, "Practitioner::\"dr-kim\"", "allow");
    both.subjects.push_back({b, std::nullopt});
    REQUIRE(ledger->append(both).ok());
    REQUIRE(ledger->append(note("between")).ok());
    REQUIRE(ledger->append(access(a, "Practitioner::\"dr-lee\"", "deny")).ok());
    REQUIRE(ledger->sign_head_now().ok());
    REQUIRE(ledger->append(access(a, "Practitioner::\"dr-lee\"", "allow")).ok());
  }

  AuditBundle build(const AuditQuery& q) {
    Result<AuditBundle> built = build_audit_bundle(*ledger, q, "user:auditor");
    INFO(built.status().to_string());
    REQUIRE(built.ok());
    return std::move(built).value();
  }
};

}  // namespace

TEST_CASE("the writer links each entry to its subject's previous one", "[audit]") {
  Fixture f;
  // Entries: 0 genesis, 1 note, 2 a, 3 b, 4 a+b, 5 note, 6 a, 7 a.
  auto previous = [&](std::uint64_t index, std::size_t link) {
    auto e = f.ledger->entry(index);
    REQUIRE(e.ok());
    CHECK(e->entry.version == 2);
    return e->entry.subjects.at(link).previous;
  };
  CHECK(previous(2, 0) == std::nullopt);
  CHECK(previous(3, 0) == std::nullopt);
  CHECK(previous(4, 0) == 2u);
  CHECK(previous(4, 1) == 3u);
  CHECK(previous(6, 0) == 4u);
  CHECK(previous(7, 0) == 6u);

  // In one block too, and after a reopen (the map is rebuilt from the subjects index).
  std::vector<Entry> batch = {access(f.b, "x", "allow"), access(f.b, "x", "deny")};
  auto first = f.ledger->append_all(batch);
  REQUIRE(first.ok());
  CHECK(previous(*first, 0) == 4u);
  CHECK(previous(*first + 1, 0) == *first);
  f.ledger->close();
  f.ledger.reset();
  auto reopened = Ledger::open(options_for(f.dir / "ledger.db"), *f.keys);
  REQUIRE(reopened.ok());
  f.ledger = std::move(reopened).value();
  auto next = f.ledger->append(access(f.a, "x", "allow"));
  REQUIRE(next.ok());
  CHECK(previous(*next, 0) == 7u);

  // Heads commit to the subject map, and the full verifier recomputes it and every link.
  auto head = f.ledger->sign_head_now();
  REQUIRE(head.ok());
  CHECK(head->head.version == 2);
  CHECK(head->head.subject_count == 2);
  SubjectMap expected;
  expected.update(f.a, *next);
  expected.update(f.b, *first + 1);
  CHECK(head->head.subject_root == expected.root());
  f.ledger->close();
  VerifyOptions vo;
  vo.trusted_keys = {f.key};
  auto report = verify_ledger_file(f.dir / "ledger.db", vo);
  REQUIRE(report.ok());
  INFO((report->problem ? report->problem->describe() : ""));
  CHECK(report->ok());
}

TEST_CASE("subject-map proofs show a subject's latest entry or its absence", "[audit]") {
  SubjectMap map;
  CHECK(map.root() == merkle::empty_root());
  auto empty = verify_subject_map_proof(patient('m'), map.root(), 0, map.prove(patient('m')));
  REQUIRE(empty.ok());
  CHECK(*empty == std::nullopt);
  for (char c : {'c', 'e', 'g', 'i', 'k'}) map.update(patient(c), static_cast<std::uint64_t>(c));
  map.update(patient('e'), 500);
  for (char c : {'a', 'c', 'd', 'e', 'h', 'k', 'z'}) {
    INFO(c);
    SubjectMapProof p = map.prove(patient(c));
    auto latest = verify_subject_map_proof(patient(c), map.root(), map.size(), p);
    REQUIRE(latest.ok());
    CHECK(*latest == map.latest(patient(c)));
  }
  // A proof for another subject, a wrong count or a neighbour pair that is not adjacent fails.
  SubjectMapProof pc = map.prove(patient('c'));
  CHECK_FALSE(verify_subject_map_proof(patient('e'), map.root(), map.size(), pc).ok());
  CHECK_FALSE(verify_subject_map_proof(patient('c'), map.root(), map.size() + 1, pc).ok());
  SubjectMapProof absent = map.prove(patient('h'));  // between g and i
  absent.above = map.prove(patient('k')).match;
  CHECK_THAT(
      verify_subject_map_proof(patient('h'), map.root(), map.size(), absent).status().message(),
      Catch::Contains("not adjacent"));
  // Hiding a subject that is there: claim absence with its neighbours.
  SubjectMapProof hide = map.prove(patient('f'));  // between e and g: shown as absent
  CHECK(verify_subject_map_proof(patient('f'), map.root(), map.size(), hide).ok());
  hide.below = map.prove(patient('c')).match;  // skips e
  CHECK_FALSE(verify_subject_map_proof(patient('f'), map.root(), map.size(), hide).ok());
}

TEST_CASE("old formats stay readable: version-1 entries and heads", "[audit]") {
  // Golden bytes of a version-1 entry (as written before subject links were filled in).
  Entry e;
  e.version = 1;
  e.type = EntryType::kAdminAction;
  e.time_us = 1764090000000000;
  e.actor = "user:alice";
  e.body = *cbor::Value::map({{cbor::Value::text("op"), cbor::Value::text("sign-head")},
                              {cbor::Value::text("args"), *cbor::Value::map({})}});
  Bytes v1 = *from_hex(
      "a600010101020203"
      "1b0006446e35cd4400"
      "046a757365723a616c696365"
      "05a2626f7069"
      "7369676e2d68656164"
      "6461726773a0");
  auto back = decode_entry(v1);
  REQUIRE(back.ok());
  CHECK(back->version == 1);
  CHECK(*back == e);
  CHECK(*encode_entry(e) == v1);

  HeadBody h1{1, "icu-1", 7, Hash{}, 105, Hash{}, 456, KeyId{}, 3};
  Bytes hb = encode_head(h1);
  CHECK(hb[0] == std::byte(0xaa));  // 10 keys
  auto decoded = decode_head(hb);
  REQUIRE(decoded.ok());
  CHECK(*decoded == h1);
  HeadBody h2 = h1;
  h2.version = 2;
  h2.subject_root.fill(std::byte{9});
  h2.subject_count = 4;
  Bytes hb2 = encode_head(h2);
  CHECK(hb2[0] == std::byte(0xac));  // 12 keys
  CHECK(*decode_head(hb2) == h2);
  HeadBody h3 = h2;
  h3.version = 3;
  CHECK_THAT(decode_head(encode_head(h3)).status().message(), Catch::Contains("version 3"));
}

TEST_CASE("an audit bundle exports and verifies offline", "[audit]") {
  Fixture f;
  SECTION("everything") {
    AuditBundle b = f.build({});
    Signed s = sign(*f.keys, b);
    AuditReport r = verify(s, f.key);
    INFO(problems(r));
    CHECK(r.ok());
    CHECK(r.selected == 8);
    CHECK(r.earlier_heads >= 1);
  }
  SECTION("one patient, complete") {
    AuditQuery q;
    q.patient = f.a;
    AuditBundle b = f.build(q);
    AuditReport r = verify(sign(*f.keys, b), f.key);
    INFO(problems(r));
    CHECK(r.ok());
    CHECK(r.patient_latest == 7u);
    CHECK(r.chain_entries == 4);
    CHECK(r.selected == 4);
  }
  SECTION("a patient with no entries: absence is proved") {
    AuditQuery q;
    q.patient = patient('q');
    AuditReport r = verify(sign(*f.keys, f.build(q)), f.key);
    INFO(problems(r));
    CHECK(r.ok());
    CHECK(r.patient_latest == std::nullopt);
    CHECK(r.selected == 0);
  }
  SECTION("filters: kind and principal") {
    AuditQuery q;
    q.kind = "access";
    q.principal = "Practitioner::\"dr-kim\"";
    AuditReport r = verify(sign(*f.keys, f.build(q)), f.key);
    INFO(problems(r));
    CHECK(r.ok());
    CHECK(r.selected == 2);
    q.kind = "nonsense";
    CHECK(build_audit_bundle(*f.ledger, q, "user:auditor").status().code() ==
          StatusCode::kInvalidArgument);
  }
  SECTION("a time range for one patient walks the chain past its start") {
    auto e4 = f.ledger->entry(4);
    REQUIRE(e4.ok());
    AuditQuery q;
    q.patient = f.a;
    q.from_us = e4->entry.time_us;
    AuditBundle b = f.build(q);
    AuditReport r = verify(sign(*f.keys, b), f.key);
    INFO(problems(r));
    CHECK(r.ok());
    CHECK(r.selected == 3);       // entries 4, 6, 7
    CHECK(r.chain_entries == 4);  // 7, 6, 4 (dated at the range start) and 2, dated before it
  }
}

TEST_CASE("every tamper with a bundle is named", "[audit]") {
  Fixture f;
  AuditQuery q;
  q.patient = f.a;
  AuditBundle good = f.build(q);
  auto find = [](AuditBundle& b, std::uint64_t index) -> BundleEntry& {
    auto it = std::find_if(b.entries.begin(), b.entries.end(),
                           [&](const BundleEntry& e) { return e.index == index; });
    REQUIRE(it != b.entries.end());
    return *it;
  };

  SECTION("a changed entry") {
    AuditBundle b = good;
    Entry e = *decode_entry(find(b, 6).bytes);
    e.actor = "user:someone-else";
    find(b, 6).bytes = *encode_entry(e);
    Signed s = sign(*f.keys, b);  // even re-signed by the appliance key
    AuditReport r = verify(s, f.key);
    CHECK(has_problem(r, "entry 6: its inclusion proof does not lead"));
    // Unsigned (an outsider): the bundle signature fails too.
    Signed outsider{s.bytes, sign(*f.keys, good).signature};
    CHECK(has_problem(verify(outsider, f.key), "the bundle signature does not verify"));
  }
  SECTION("an entry removed from a per-patient export") {
    AuditBundle b = good;
    b.entries.erase(std::find_if(b.entries.begin(), b.entries.end(),
                                 [](const BundleEntry& e) { return e.index == 4; }));
    AuditReport r = verify(sign(*f.keys, b), f.key);
    INFO(problems(r));
    CHECK(has_problem(r, "the patient's chain is broken: entry 4"));
    // The latest entry removed: the signed subject map still names it.
    AuditBundle c = good;
    c.entries.pop_back();
    CHECK(has_problem(verify(sign(*f.keys, c), f.key), "the patient's chain is broken: entry 7"));
  }
  SECTION("reordered entries") {
    AuditBundle b = good;
    std::swap(b.entries[1], b.entries[2]);
    CHECK(has_problem(verify(sign(*f.keys, b), f.key), "entries are out of order"));
  }
  SECTION("a changed proof") {
    AuditBundle b = good;
    find(b, 2).proof[0][0] ^= std::byte{1};
    CHECK(has_problem(verify(sign(*f.keys, b), f.key), "entry 2: its inclusion proof"));
    AuditBundle c = good;
    c.subject_proof->match->latest = 6;  // hide the newest entry
    CHECK(has_problem(verify(sign(*f.keys, c), f.key), "subject map"));
  }
  SECTION("a forged bundle signature") {
    Signed s = sign(*f.keys, good);
    s.signature.back() ^= std::byte{1};
    CHECK(has_problem(verify(s, f.key), "the bundle signature does not verify"));
    s.bytes.back() ^= std::byte{1};  // and the bytes, while we are at it: still a bundle?
    auto r = verify_audit_bundle(s.bytes, s.signature, {f.key});
    CHECK((!r.ok() || !r->ok()));
  }
  SECTION("a wrong trust key") {
    auto other = f.keys->create_signing_key();
    REQUIRE(other.ok());
    CHECK(has_problem(verify(sign(*f.keys, good), *other), "is a trusted key"));
  }
  SECTION("not a bundle at all") {
    Bytes junk = to_bytes("hello");
    CHECK(verify_audit_bundle(junk, {}, {f.key}).status().code() == StatusCode::kCorruption);
    CHECK(verify_audit_bundle(good.head.bytes, {}, {f.key}).status().code() ==
          StatusCode::kCorruption);
  }
}

TEST_CASE("a bundle spanning a key rotation and an erasure verifies", "[audit]") {
  Fixture f;
  auto rotation = f.ledger->rotate_signing_key("user:root");
  REQUIRE(rotation.ok());
  REQUIRE(f.ledger->append(access(f.a, "Practitioner::\"dr-lee\"", "allow")).ok());
  REQUIRE(f.ledger->append(erasure(f.a)).ok());
  AuditQuery q;
  q.patient = f.a;
  AuditBundle b = f.build(q);
  Signed s = sign(*f.keys, b);
  // Trusting the old key reaches the new one through the recorded transition, and vice versa.
  for (const PublicKey& trusted : {f.key, rotation->new_key}) {
    AuditReport r = verify(s, trusted);
    INFO(problems(r));
    CHECK(r.ok());
    CHECK(r.key_chain.size() == 2);
    CHECK(r.chain_entries == 6);
  }
  AuditQuery erasures;
  erasures.kind = "erasure";
  AuditReport r = verify(sign(*f.keys, f.build(erasures)), f.key);
  INFO(problems(r));
  CHECK(r.ok());
  CHECK(r.selected == 1);
  // A bundle whose key history lost the transition cannot tie the new key to the trusted one.
  AuditBundle cut = b;
  std::erase_if(cut.entries,
                [&](const BundleEntry& e) { return e.index == rotation->entry_index; });
  CHECK(has_problem(verify(sign(*f.keys, cut), f.key), "the key history says"));
}
