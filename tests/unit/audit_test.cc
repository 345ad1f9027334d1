// Per-subject completeness (subject links filled by the writer, the subject map in version-2
// heads, both checked by the full verifier) and audit bundles: export from a real ledger (real
// SQLite, real SoftHSM signatures), verify offline, and every tamper named with its reason.
#include <catch2/catch.hpp>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <string>
#include <vector>

#include "ledger/audit_bundle.h"
#include "ledger/audit_render.h"
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

  AuditBundle build(const AuditQuery& q, std::uint64_t version = kAuditBundleVersion) {
    AuditExportOptions options;
    options.format_version = version;
    Result<AuditBundle> built = build_audit_bundle(*ledger, q, "user:auditor", options);
    INFO(built.status().to_string());
    REQUIRE(built.ok());
    REQUIRE(built->version == version);
    return std::move(built).value();
  }
};

// What the verifier says when an entry or a proof was changed: format 1 names the entry whose own
// proof fails; format 2's one proof for all entries cannot say which entry it was.
std::string proof_failure(std::uint64_t version, std::uint64_t index) {
  if (version == 1) return fmt::format("entry {}: its inclusion proof does not lead", index);
  return "the entries' multi-leaf inclusion proof does not lead to the signed head's root";
}

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
  const std::uint64_t version = GENERATE(std::uint64_t{2}, std::uint64_t{1});
  INFO("format " << version);
  Fixture f;
  AuditQuery q;
  q.patient = f.a;
  AuditBundle good = f.build(q, version);
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
    INFO(problems(r));
    CHECK(has_problem(r, proof_failure(version, 6)));
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
    if (version == 2) {
      // A dishonest exporter holding the ledger recomputes the proof for what is left: the proof
      // then holds, and the chain alone shows the removal.
      CHECK(has_problem(r, proof_failure(2, 4)));
      std::vector<std::uint64_t> left;
      for (const BundleEntry& e : b.entries) left.push_back(e.index);
      Result<HeadBody> head = decode_head(b.head.bytes);
      REQUIRE(head.ok());
      Result<std::vector<Hash>> proof = f.ledger->multi_inclusion_proof(left, head->tree_size);
      REQUIRE(proof.ok());
      b.multi_proof = *proof;
      AuditReport recomputed = verify(sign(*f.keys, b), f.key);
      INFO(problems(recomputed));
      CHECK(recomputed.problems.size() == 1);
      CHECK(has_problem(recomputed, "the patient's chain is broken: entry 4"));
    }
    // The latest entry removed: the signed subject map still names it.
    AuditBundle c = good;
    c.entries.pop_back();
    CHECK(has_problem(verify(sign(*f.keys, c), f.key), "the patient's chain is broken: entry 7"));
  }
  SECTION("reordered entries") {
    AuditBundle b = good;
    std::swap(b.entries[1], b.entries[2]);
    AuditReport r = verify(sign(*f.keys, b), f.key);
    INFO(problems(r));
    CHECK(has_problem(r, "entries are out of order"));
    // Reordering changes no entry: the proofs still hold, and only the order is named.
    CHECK(r.problems.size() == 1);
    // An entry given twice.
    AuditBundle twice = good;
    twice.entries.insert(twice.entries.begin() + 2, twice.entries[1]);
    AuditReport t = verify(sign(*f.keys, twice), f.key);
    CHECK(has_problem(t, "entries are out of order"));
    if (version == 2) CHECK(has_problem(t, "is in the bundle more than once"));
  }
  SECTION("a changed proof") {
    if (version == 1) {
      AuditBundle b = good;
      find(b, 2).proof[0][0] ^= std::byte{1};
      CHECK(has_problem(verify(sign(*f.keys, b), f.key), "entry 2: its inclusion proof"));
      // Proofs to one head share their upper hashes, which the verifier compares with the
      // previous entry's rather than hashing again: a change to any hash of any entry's proof is
      // still named.
      for (const BundleEntry& e : good.entries)
        for (std::size_t k = 0; k < e.proof.size(); ++k) {
          AuditBundle t = good;
          find(t, e.index).proof[k][31] ^= std::byte{0x80};
          INFO("entry " << e.index << ", proof hash " << k);
          CHECK(has_problem(verify(sign(*f.keys, t), f.key),
                            fmt::format("entry {}: its inclusion proof", e.index)));
        }
    } else {
      // Each hash of the one proof changed, left out, repeated; two of them swapped; one added.
      REQUIRE(good.multi_proof.size() >= 2);
      auto fails = [&](const AuditBundle& t) {
        AuditReport r = verify(sign(*f.keys, t), f.key);
        INFO(problems(r));
        CHECK(has_problem(r, proof_failure(2, 0)));
      };
      for (std::size_t k = 0; k < good.multi_proof.size(); ++k) {
        INFO("proof hash " << k);
        AuditBundle t = good;
        t.multi_proof[k][31] ^= std::byte{0x80};
        fails(t);
        t = good;
        t.multi_proof.erase(t.multi_proof.begin() + static_cast<std::ptrdiff_t>(k));
        fails(t);
        t = good;
        t.multi_proof.insert(t.multi_proof.begin() + static_cast<std::ptrdiff_t>(k),
                             t.multi_proof[k]);
        fails(t);
        if (k + 1 < good.multi_proof.size()) {
          t = good;
          std::swap(t.multi_proof[k], t.multi_proof[k + 1]);
          fails(t);
        }
      }
      AuditBundle more = good;
      more.multi_proof.push_back(more.multi_proof.front());
      fails(more);
      AuditBundle none = good;
      none.multi_proof.clear();
      fails(none);
      // An entry left out, and its leaf's place in the proof not filled in: the proof fails too.
      AuditBundle fewer = good;
      fewer.entries.erase(fewer.entries.begin() + 1);
      fails(fewer);
      // An entry claiming an index the signed head does not cover.
      AuditBundle beyond = good;
      beyond.entries.back().index = decode_head(good.head.bytes)->tree_size;
      AuditReport r = verify(sign(*f.keys, beyond), f.key);
      INFO(problems(r));
      CHECK(has_problem(r, fmt::format("leaf index {} is not below tree size {}",
                                       beyond.entries.back().index, beyond.entries.back().index)));
    }
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

namespace {

Bytes read_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  INFO(path.string());
  REQUIRE(in.good());
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  return to_bytes(text);
}

}  // namespace

// tests/data/audit: a format-1 bundle written by the exporter before format 2 existed (its
// README says how). Bundles auditors already hold must keep verifying.
TEST_CASE("a format-1 bundle exported before format 2 still verifies", "[audit]") {
  const std::filesystem::path dir = std::filesystem::path(MEDGATE_TEST_DATA) / "audit";
  const Bytes bytes = read_file(dir / "patient-a.v1.cbor");
  const Bytes signature = read_file(dir / "patient-a.v1.cbor.sig");
  const nlohmann::json expected =
      nlohmann::json::parse(to_string(read_file(dir / "expected.json")))["report"];
  for (const char* pem : {"first-key.pem", "second-key.pem"}) {
    INFO(pem);
    Result<PublicKey> key = PublicKey::from_pem(to_string(read_file(dir / pem)));
    REQUIRE(key.ok());
    AuditReport r = verify({bytes, signature}, *key);
    INFO(problems(r));
    CHECK(r.ok());
    nlohmann::json report = to_json(r);
    CHECK(report["format_version"] == 1);
    report.erase("format_version");  // reported since format 2
    CHECK(report == expected);       // otherwise word for word what format 1's verifier said
  }
  Result<PublicKey> first = PublicKey::from_pem(to_string(read_file(dir / "first-key.pem")));
  REQUIRE(first.ok());
  Result<AuditBundle> decoded = decode_audit_bundle(bytes);
  REQUIRE(decoded.ok());
  CHECK(decoded->version == 1);
  CHECK(decoded->multi_proof.empty());
  // The format-1 encoder is unchanged: the same bundle encodes to the same bytes.
  Result<Bytes> again = encode_audit_bundle(*decoded);
  REQUIRE(again.ok());
  CHECK(*again == bytes);

  // Tampers are still named as format 1 names them (the signing key is not at hand, so the bundle
  // signature fails as well).
  AuditBundle changed = *decoded;
  BundleEntry& target = changed.entries.at(3);
  target.proof.at(0)[0] ^= std::byte{1};
  AuditReport r = verify({*encode_audit_bundle(changed), signature}, *first);
  CHECK(has_problem(r, fmt::format("entry {}: its inclusion proof does not lead", target.index)));
  CHECK(has_problem(r, "the bundle signature does not verify"));
  AuditBundle removed = *decoded;
  const std::uint64_t gone = removed.entries.at(3).index;
  removed.entries.erase(removed.entries.begin() + 3);
  CHECK(has_problem(verify({*encode_audit_bundle(removed), signature}, *first),
                    fmt::format("the patient's chain is broken: entry {}", gone)));
  // A format-1 bundle cannot carry a multi-leaf proof, nor a format-2 one per-entry proofs.
  AuditBundle mixed = *decoded;
  mixed.multi_proof.push_back(Hash{});
  CHECK(encode_audit_bundle(mixed).status().code() == StatusCode::kInvalidArgument);
  mixed = *decoded;
  mixed.version = 2;
  CHECK(encode_audit_bundle(mixed).status().code() == StatusCode::kInvalidArgument);
  mixed.version = 3;
  CHECK(encode_audit_bundle(mixed).status().code() == StatusCode::kInvalidArgument);
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

// ---- renderings (ledger/audit_render.h) ----

namespace {

// An access decision with everything a rendering shows: purpose, policies, errors, break-glass.
Entry decision(const Bytes& who, const std::string& principal, const std::string& purpose,
               const std::string& verdict, std::vector<std::string> policies,
               std::vector<std::string> errors, bool break_glass) {
  using cbor::Value;
  auto texts = [](const std::vector<std::string>& items) {
    cbor::Array a;
    for (const std::string& i : items) a.push_back(Value::text(i));
    return Value::array(std::move(a));
  };
  Entry e = access(who, principal, verdict);
  e.body = *Value::map({{Value::text("principal"), Value::text(principal)},
                        {Value::text("action"), Value::text("Action::\"read\"")},
                        {Value::text("purpose"), Value::text(purpose)},
                        {Value::text("data"), Value::text("vitals")},
                        {Value::text("decision"), Value::text(verdict)},
                        {Value::text("policies"), texts(policies)},
                        {Value::text("errors"), texts(errors)},
                        {Value::text("break_glass"), Value::boolean(break_glass)},
                        {Value::text("state"), Value::uint(0)},
                        {Value::text("returned"), Value::uint(verdict == "allow" ? 3 : 0)}});
  return e;
}

// A ledger whose entries 1..4 are, in order: an allow for TREAT by dr-lee (policy "p-treat"), a
// deny for HRESCH, a break-glass allow (ETREAT), and a deny whose policies errored; all about
// patient 'c'. Then a note about nobody. Its principal names hold a comma, a quote and a newline
// for the CSV's quoting.
struct RenderFixture {
  TempDir dir;
  SoftHsmToken token{dir.path()};
  std::unique_ptr<hsm::KeyStore> keys = token.open_with_key();
  std::unique_ptr<Ledger> ledger;
  PublicKey key;
  Bytes c = patient('c');
  std::string odd = "Practitioner::\"lee, \"jr\"\nward 7\"";

  RenderFixture() : key(keys->signing_key()) {
    auto created = Ledger::create(options_for(dir / "ledger.db"), "ward-7", *keys, "user:root");
    REQUIRE(created.ok());
    ledger = std::move(created).value();
    REQUIRE(ledger
                ->append(decision(c, "Practitioner::\"dr-lee\"", "TREAT", "allow", {"p-treat"}, {},
                                  false))
                .ok());
    REQUIRE(ledger->append(decision(c, odd, "HRESCH", "deny", {}, {}, false)).ok());
    REQUIRE(ledger
                ->append(decision(c, "Practitioner::\"dr-kim\"", "ETREAT", "allow",
                                  {"break-glass", "p-er"}, {}, true))
                .ok());
    REQUIRE(ledger
                ->append(decision(c, "Practitioner::\"dr-kim\"", "TREAT", "deny", {}, {"p-broken"},
                                  false))
                .ok());
    REQUIRE(ledger->append(note("after")).ok());
  }

  struct Verified {
    Signed signed_bundle;
    AuditBundle bundle;
    AuditReport report;
    BundleSource source;
  };

  Verified export_patient() {
    AuditQuery q;
    q.patient = c;
    Result<AuditBundle> built = build_audit_bundle(*ledger, q, "user:auditor");
    REQUIRE(built.ok());
    Signed s = sign(*keys, *built);
    AuditReport r = verify(s, key);
    INFO(problems(r));
    REQUIRE(r.ok());
    Result<AuditBundle> decoded = decode_audit_bundle(s.bytes);
    REQUIRE(decoded.ok());
    return {s, *decoded, r, {"p.cbor", sha256(s.bytes)}};
  }
};

// Splits RFC 4180 CSV (CRLF rows, quoted fields) into rows of fields.
std::vector<std::vector<std::string>> parse_csv(const std::string& text) {
  std::vector<std::vector<std::string>> rows(1, std::vector<std::string>(1));
  bool quoted = false;
  for (std::size_t i = 0; i < text.size(); ++i) {
    char ch = text[i];
    std::string& cell = rows.back().back();
    if (quoted) {
      if (ch == '"' && i + 1 < text.size() && text[i + 1] == '"') {
        cell += '"';
        ++i;
      } else if (ch == '"') {
        quoted = false;
      } else {
        cell += ch;
      }
    } else if (ch == '"') {
      quoted = true;
    } else if (ch == ',') {
      rows.back().emplace_back();
    } else if (ch == '\r' && i + 1 < text.size() && text[i + 1] == '\n') {
      ++i;
      rows.emplace_back(1);
    } else {
      cell += ch;
    }
  }
  if (rows.back().size() == 1 && rows.back()[0].empty()) rows.pop_back();
  return rows;
}

const nlohmann::json* entity_with_system(const nlohmann::json& event, const std::string& system) {
  for (const nlohmann::json& e : event["entity"])
    if (e.contains("what") && e["what"]["identifier"]["system"] == system) return &e;
  return nullptr;
}

std::string detail_of(const nlohmann::json& entity, const std::string& type) {
  for (const nlohmann::json& d : entity["detail"])
    if (d["type"] == type) return d["valueString"].get<std::string>();
  return "(none)";
}

}  // namespace

TEST_CASE("csv fields are quoted as RFC 4180 says", "[audit][render]") {
  CHECK(csv_field("plain") == "plain");
  CHECK(csv_field("") == "");
  CHECK(csv_field("a,b") == "\"a,b\"");
  CHECK(csv_field("say \"hi\"") == "\"say \"\"hi\"\"\"");
  CHECK(csv_field("two\nlines") == "\"two\nlines\"");
  CHECK(csv_field("cr\rhere") == "\"cr\rhere\"");
}

TEST_CASE("a verified bundle renders as FHIR AuditEvents following BALP", "[audit][render]") {
  RenderFixture f;
  auto v = f.export_patient();
  Result<nlohmann::json> rendered = render_fhir(v.bundle, v.report, v.source);
  REQUIRE(rendered.ok());
  const nlohmann::json& b = *rendered;
  CHECK(b["resourceType"] == "Bundle");
  CHECK(b["type"] == "collection");
  CHECK(b["identifier"]["system"] == "urn:medgate:audit-bundle:sha256");
  CHECK(b["identifier"]["value"] == to_hex(sha256(v.signed_bundle.bytes)));
  CHECK(b["timestamp"] == format_time(v.report.created_us));

  // The reference to the signed bundle: file, SHA-256, the head's tree size and root.
  const nlohmann::json& ref = b["meta"]["extension"].at(0);
  CHECK(ref["url"] == "urn:medgate:fhir:audit-bundle-source");
  std::map<std::string, nlohmann::json> fields;
  for (const nlohmann::json& x : ref["extension"]) fields[x["url"]] = x;
  CHECK(fields["file"]["valueString"] == "p.cbor");
  CHECK(fields["sha256"]["valueString"] == to_hex(sha256(v.signed_bundle.bytes)));
  CHECK(fields["ledgerId"]["valueString"] == "ward-7");
  CHECK(fields["treeSize"]["valueUnsignedInt"] == v.report.tree_size);
  CHECK(fields["root"]["valueString"] == to_hex(v.report.root));

  // One AuditEvent per selected entry (the four decisions; not genesis, not the note).
  REQUIRE(b["entry"].size() == 4);
  REQUIRE(v.report.selected == 4);
  std::vector<nlohmann::json> events;
  for (const nlohmann::json& e : b["entry"]) {
    CHECK(e["fullUrl"].get<std::string>().rfind("urn:uuid:", 0) == 0);
    events.push_back(e["resource"]);
  }

  const nlohmann::json& allow = events[0];
  CHECK(allow["resourceType"] == "AuditEvent");
  CHECK(allow["id"] == "ledger-1");
  CHECK(allow["meta"]["profile"][0] ==
        "https://profiles.ihe.net/ITI/BALP/StructureDefinition/IHE.BasicAudit.AuthZconsent");
  CHECK(allow["type"]["system"] == "http://dicom.nema.org/resources/ontology/DCM");
  CHECK(allow["type"]["code"] == "110113");
  CHECK(allow["subtype"][0]["code"] == "AuthZ-Consent");
  CHECK(allow["subtype"].size() == 1);
  CHECK(allow["action"] == "E");
  CHECK(allow["outcome"] == "0");
  CHECK(allow["outcomeDesc"] == "allow; determining policies: p-treat");
  Result<StoredEntry> stored = f.ledger->entry(1);
  REQUIRE(stored.ok());
  CHECK(allow["recorded"] == format_time(stored->entry.time_us));
  CHECK(allow["purposeOfEvent"][0]["coding"][0]["system"] ==
        "http://terminology.hl7.org/CodeSystem/v3-ActReason");
  CHECK(allow["purposeOfEvent"][0]["coding"][0]["code"] == "TREAT");
  // Agents: the principal asked (requestor, role from its entity type), the actor carried the
  // request, the appliance decided (with the determining policy).
  REQUIRE(allow["agent"].size() == 3);
  CHECK(allow["agent"][0]["who"]["identifier"]["value"] == "Practitioner::\"dr-lee\"");
  CHECK(allow["agent"][0]["requestor"] == true);
  CHECK(allow["agent"][0]["role"][0]["text"] == "Practitioner");
  CHECK(allow["agent"][0]["purposeOfUse"][0]["coding"][0]["code"] == "TREAT");
  CHECK(allow["agent"][1]["who"]["identifier"]["value"] == "user:clinician");
  CHECK(allow["agent"][1]["requestor"] == false);
  CHECK(allow["agent"][2]["type"]["coding"][0]["code"] == "authserver");
  CHECK(allow["agent"][2]["policy"][0] == "urn:medgate:policy:p-treat");
  CHECK(allow["source"]["observer"]["identifier"]["value"] == "ward-7");
  // The patient by pseudonym, and the ledger entry by index and leaf hash.
  const nlohmann::json* who = entity_with_system(allow, "urn:medgate:pseudonym");
  REQUIRE(who);
  CHECK((*who)["what"]["identifier"]["value"] == to_hex(f.c));
  CHECK((*who)["role"]["code"] == "1");
  const nlohmann::json* entry = entity_with_system(allow, "urn:medgate:ledger-entry");
  REQUIRE(entry);
  CHECK((*entry)["what"]["identifier"]["value"] == "1");
  CHECK(detail_of(*entry, "leaf-hash") == to_hex(stored->leaf));

  const nlohmann::json& deny = events[1];
  CHECK(deny["outcome"] == "4");  // denied: a minor failure
  CHECK(deny["purposeOfEvent"][0]["coding"][0]["code"] == "HRESCH");
  CHECK(deny["agent"][0]["who"]["identifier"]["value"] == f.odd);

  const nlohmann::json& glass = events[2];
  CHECK(glass["outcome"] == "0");
  CHECK(glass["purposeOfEvent"][0]["coding"][0]["code"] == "ETREAT");
  REQUIRE(glass["subtype"].size() == 2);
  CHECK(glass["subtype"][1]["code"] == "110127");  // Emergency Override Started
  CHECK(glass["outcomeDesc"] == "allow (break-glass); determining policies: break-glass, p-er");

  const nlohmann::json& errored = events[3];
  CHECK(errored["outcome"] == "8");  // denied because policies failed: a serious failure
  CHECK(errored["outcomeDesc"] == "deny; policies in error: p-broken");

  // Nothing in it is a value: the bundle holds none.
  CHECK(b.dump().find("\"values\"") == std::string::npos);
}

TEST_CASE("a verified bundle renders as CSV, one row per entry", "[audit][render]") {
  RenderFixture f;
  auto v = f.export_patient();
  Result<std::string> rendered = render_csv(v.bundle, v.report, v.source);
  REQUIRE(rendered.ok());
  auto rows = parse_csv(*rendered);
  REQUIRE(rows.size() == 5);  // header and four decisions
  REQUIRE(rows[0] == std::vector<std::string>(std::begin(kCsvColumns), std::end(kCsvColumns)));
  auto col = [&](std::size_t row, std::string_view name) {
    auto it = std::find(std::begin(kCsvColumns), std::end(kCsvColumns), name);
    REQUIRE(it != std::end(kCsvColumns));
    REQUIRE(rows[row].size() == std::size(kCsvColumns));
    return rows[row][static_cast<std::size_t>(it - std::begin(kCsvColumns))];
  };
  for (std::size_t r = 1; r < rows.size(); ++r) {
    CHECK(col(r, "bundle_file") == "p.cbor");
    CHECK(col(r, "bundle_sha256") == to_hex(sha256(v.signed_bundle.bytes)));
    CHECK(col(r, "head_tree_size") == std::to_string(v.report.tree_size));
    CHECK(col(r, "head_root") == to_hex(v.report.root));
    CHECK(col(r, "kind") == "access");
    CHECK(col(r, "type") == "access-decision");
    CHECK(col(r, "subjects") == to_hex(f.c));
    CHECK(col(r, "values").empty());
  }
  Result<StoredEntry> stored = f.ledger->entry(1);
  REQUIRE(stored.ok());
  CHECK(col(1, "index") == "1");
  CHECK(col(1, "time") == format_time(stored->entry.time_us));
  CHECK(col(1, "actor") == "user:clinician");
  CHECK(col(1, "principal") == "Practitioner::\"dr-lee\"");
  CHECK(col(1, "purpose") == "TREAT");
  CHECK(col(1, "decision") == "allow");
  CHECK(col(1, "outcome") == "0");
  CHECK(col(1, "policies") == "p-treat");
  CHECK(col(1, "leaf_hash") == to_hex(stored->leaf));
  // The principal with a comma, quotes and a newline comes back whole.
  CHECK(col(2, "principal") == f.odd);
  CHECK(col(2, "decision") == "deny");
  CHECK(col(2, "outcome") == "4");
  CHECK(rendered->find("\"Practitioner::\"\"lee, \"\"jr\"\"\nward 7\"\"\"") != std::string::npos);
  CHECK(col(3, "purpose") == "ETREAT");
  CHECK(col(3, "break_glass") == "true");
  CHECK(col(3, "policies") == "break-glass;p-er");
  CHECK(col(4, "outcome") == "8");
  CHECK(rendered->find("\r\n") != std::string::npos);
}

TEST_CASE("a bundle that does not verify is not rendered", "[audit][render]") {
  RenderFixture f;
  auto v = f.export_patient();
  // Change one entry's bytes (a tamper the inclusion proof catches) and re-sign it, as a dishonest
  // exporter could: verification names the problem and neither renderer writes anything.
  AuditBundle tampered = v.bundle;
  auto it = std::find_if(tampered.entries.begin(), tampered.entries.end(),
                         [](const BundleEntry& e) { return e.index == 2; });
  REQUIRE(it != tampered.entries.end());
  Entry changed = decision(f.c, "Practitioner::\"dr-lee\"", "HRESCH", "allow", {}, {}, false);
  changed.subjects = {{f.c, 1}};
  Result<Bytes> bytes = encode_entry(changed);
  REQUIRE(bytes.ok());
  it->bytes = *bytes;
  Signed s = sign(*f.keys, tampered);
  AuditReport r = verify(s, f.key);
  REQUIRE_FALSE(r.ok());
  CHECK(has_problem(r, proof_failure(kAuditBundleVersion, 2)));
  Result<AuditBundle> decoded = decode_audit_bundle(s.bytes);
  REQUIRE(decoded.ok());
  BundleSource source{"t.cbor", sha256(s.bytes)};
  Result<nlohmann::json> fhir = render_fhir(*decoded, r, source);
  REQUIRE_FALSE(fhir.ok());
  CHECK(fhir.status().code() == StatusCode::kFailedPrecondition);
  CHECK_THAT(fhir.status().message(), Catch::Contains("does not verify"));
  Result<std::string> csv = render_csv(*decoded, r, source);
  REQUIRE_FALSE(csv.ok());
  CHECK_THAT(csv.status().message(), Catch::Contains(proof_failure(kAuditBundleVersion, 2)));

  // A bundle verified against a key the ledger never used is refused the same way.
  Result<AuditReport> untrusted =
      verify_audit_bundle(v.signed_bundle.bytes, v.signed_bundle.signature, {});
  REQUIRE(untrusted.ok());
  CHECK_FALSE(render_csv(v.bundle, *untrusted, v.source).ok());
}

TEST_CASE("the genesis key of a bundle anchors a rendering without --trust", "[audit][render]") {
  RenderFixture f;
  auto v = f.export_patient();
  std::optional<PublicKey> genesis = bundle_genesis_key(v.bundle);
  REQUIRE(genesis);
  CHECK(genesis->id() == f.key.id());
  AuditBundle no_genesis = v.bundle;
  no_genesis.entries.erase(no_genesis.entries.begin());
  CHECK_FALSE(bundle_genesis_key(no_genesis));
}

TEST_CASE("the verifier reports its progress", "[audit][render]") {
  RenderFixture f;
  auto v = f.export_patient();
  std::uint64_t last_done = 0, last_total = 0;
  Result<AuditReport> r =
      verify_audit_bundle(v.signed_bundle.bytes, v.signed_bundle.signature, {f.key},
                          [&](std::uint64_t done, std::uint64_t total) {
                            last_done = done;
                            last_total = total;
                          });
  REQUIRE(r.ok());
  CHECK(r->ok());
  CHECK(last_total == v.bundle.entries.size());
  CHECK(last_done == last_total);
}

TEST_CASE("a malformed entry record is not a bundle, and says what is wrong", "[audit]") {
  const std::uint64_t version = GENERATE(std::uint64_t{2}, std::uint64_t{1});
  INFO("format " << version);
  Fixture f;
  AuditQuery q;
  q.patient = f.a;
  Result<Bytes> good = encode_audit_bundle(f.build(q, version));
  REQUIRE(good.ok());
  REQUIRE(decode_audit_bundle(*good).ok());
  Result<cbor::Value> tree = cbor::decode(*good);
  REQUIRE(tree.ok());

  // Re-encodes the bundle with entry record 1 changed by `change` (a map edited as a list).
  auto with_record = [&](const std::function<void(cbor::Map&)>& change) {
    cbor::Map top = *tree->as_map();
    for (auto& [k, v] : top) {
      if (k.as_uint() != std::uint64_t{8}) continue;
      cbor::Array entries = *v.as_array();
      cbor::Map record = *entries.at(1).as_map();
      change(record);
      Result<cbor::Value> r = cbor::Value::map(std::move(record));
      REQUIRE(r.ok());
      entries[1] = *r;
      v = cbor::Value::array(std::move(entries));
    }
    Result<cbor::Value> all = cbor::Value::map(std::move(top));
    REQUIRE(all.ok());
    return decode_audit_bundle(cbor::encode(*all));
  };
  auto drop = [](std::string_view key) {
    return [key](cbor::Map& m) {
      std::erase_if(
          m, [&](const auto& kv) { return kv.first.as_text() && *kv.first.as_text() == key; });
    };
  };
  auto set = [](std::string_view key, cbor::Value v) {
    return [key, v](cbor::Map& m) {
      for (auto& [k, value] : m)
        if (k.as_text() && *k.as_text() == key) value = v;
    };
  };
  auto expect = [](const Result<AuditBundle>& r, std::string_view text) {
    REQUIRE_FALSE(r.ok());
    CHECK(r.status().code() == StatusCode::kCorruption);
    CHECK_THAT(r.status().message(), Catch::Contains(std::string(text)));
  };
  // Nothing changed: still a bundle (the harness itself is sound).
  CHECK(with_record([](cbor::Map&) {}).ok());
  for (const char* key : {"index", "bytes", "selected", "meta"})
    expect(with_record(drop(key)), fmt::format("an entry record has no \"{}\"", key));
  expect(with_record([](cbor::Map& m) {
           m.emplace_back(cbor::Value::text("extra"), cbor::Value::uint(1));
         }),
         "an entry record has an unknown key \"extra\"");
  expect(with_record(set("index", cbor::Value::text("1"))), "\"index\" is not an unsigned integer");
  expect(with_record(set("bytes", cbor::Value::text("x"))), "\"bytes\" is not bytes");
  if (version == 1) {
    expect(with_record(drop("proof")), "an entry record has no \"proof\"");
    expect(with_record(set("proof", cbor::Value::uint(3))), "\"proof\" is not an array");
    expect(with_record(set("proof", cbor::Value::array({cbor::Value::bytes(Bytes(31))}))),
           "\"proof\" holds a non-hash");
  } else {
    // Format 2 proves every entry with one proof: a record's own proof is another format's.
    expect(with_record([](cbor::Map& m) {
             m.emplace_back(cbor::Value::text("proof"), cbor::Value::array({}));
           }),
           "an entry record has an unknown key \"proof\"");
  }
  // The top level's multi-leaf proof (key 10): format 2 needs it, whole hashes only; format 1
  // has no key 10.
  auto with_top = [&](const std::function<void(cbor::Map&)>& change) {
    cbor::Map top = *tree->as_map();
    change(top);
    Result<cbor::Value> all = cbor::Value::map(std::move(top));
    REQUIRE(all.ok());
    return decode_audit_bundle(cbor::encode(*all));
  };
  auto drop_top = [](std::uint64_t key) {
    return [key](cbor::Map& m) {
      std::erase_if(m, [&](const auto& kv) { return kv.first.as_uint() == key; });
    };
  };
  auto set_top = [](std::uint64_t key, cbor::Value v) {
    return [key, v](cbor::Map& m) {
      std::erase_if(m, [&](const auto& kv) { return kv.first.as_uint() == key; });
      m.emplace_back(cbor::Value::uint(key), v);
    };
  };
  if (version == 2) {
    expect(with_top(drop_top(10)), "no multi-leaf inclusion proof (key 10)");
    expect(with_top(set_top(10, cbor::Value::bytes(Bytes(33)))), "not a whole number of hashes");
    expect(with_top(set_top(10, cbor::Value::array({}))), "no multi-leaf inclusion proof (key 10)");
    expect(with_top(set_top(11, cbor::Value::uint(0))), "a key format 2 does not define");
    CHECK(with_top(set_top(10, cbor::Value::bytes(Bytes(64))))->multi_proof.size() == 2);
  } else {
    expect(with_top(set_top(10, cbor::Value::bytes(Bytes(32)))), "a key format 1 does not define");
  }
  expect(with_top(set_top(1, cbor::Value::uint(3))), "version is not one this build reads (1, 2)");
  expect(with_record(set("selected", cbor::Value::uint(1))), "\"selected\" is not a bool");
  // A record whose metadata copy disagrees with its bytes decodes, and verification names it (the
  // encoder derives the copy from the bytes, so this is a forger's edit, signed here by the key).
  Result<AuditBundle> lying = with_record(set(
      "meta", *cbor::Value::map({{cbor::Value::text("kind"), cbor::Value::text("access")},
                                 {cbor::Value::text("time"), cbor::Value::text("x")},
                                 {cbor::Value::text("type"), cbor::Value::text("access-decision")},
                                 {cbor::Value::text("actor"), cbor::Value::text("user:nobody")}})));
  REQUIRE(lying.ok());
  {
    cbor::Map top = *tree->as_map();
    for (auto& [k, v] : top) {
      if (k.as_uint() != std::uint64_t{8}) continue;
      cbor::Array entries = *v.as_array();
      cbor::Map record = *entries.at(1).as_map();
      for (auto& [rk, rv] : record)
        if (rk.as_text() && *rk.as_text() == "meta") rv = lying->entries.at(1).meta;
      entries[1] = *cbor::Value::map(std::move(record));
      v = cbor::Value::array(std::move(entries));
    }
    Bytes bytes = cbor::encode(*cbor::Value::map(std::move(top)));
    Result<HeadBody> head = decode_head(lying->head.bytes);
    REQUIRE(head.ok());
    Result<Bytes> sig = f.keys->sign_digest_with(head->key_id, sha256(bytes));
    REQUIRE(sig.ok());
    AuditReport r = verify({bytes, *sig}, f.key);
    CHECK(has_problem(r, fmt::format("entry {}: its metadata does not match its bytes",
                                     lying->entries.at(1).index)));
  }
  // Not canonical at all (a map key repeated by hand): refused before anything is read.
  Bytes twice = *good;
  twice.push_back(std::byte{0});
  expect(decode_audit_bundle(twice), "not canonical CBOR");
}

TEST_CASE("batch proofs and reads give what one call per entry gives", "[audit]") {
  Fixture f;
  for (int i = 0; i < 300; ++i) REQUIRE(f.ledger->append(note("more", i)).ok());
  REQUIRE(f.ledger->sign_head_now().ok());
  std::uint64_t tree = f.ledger->stats().tree_size;
  for (std::uint64_t size : {tree, tree - 1, std::uint64_t{17}, std::uint64_t{8}}) {
    std::vector<std::uint64_t> indexes;
    for (std::uint64_t i = 0; i < size; i += 3) indexes.push_back(i);
    indexes.push_back(size - 1);
    indexes.push_back(0);  // any order, repeats allowed
    Result<std::vector<std::vector<Hash>>> batch = f.ledger->inclusion_proofs(indexes, size);
    REQUIRE(batch.ok());
    REQUIRE(batch->size() == indexes.size());
    for (std::size_t k = 0; k < indexes.size(); ++k) {
      Result<std::vector<Hash>> one = f.ledger->inclusion_proof(indexes[k], size);
      REQUIRE(one.ok());
      INFO("size " << size << ", entry " << indexes[k]);
      CHECK((*batch)[k] == *one);
    }
  }
  CHECK_FALSE(f.ledger->inclusion_proofs(std::vector<std::uint64_t>{0}, tree + 1).ok());
  // The multi-leaf proof from the store's tiles leads to the store's root, for sizes inside and at
  // the edge of tiles, sparse and dense sets, with the partial tile at the right edge.
  for (std::uint64_t size :
       {tree, tree - 1, std::uint64_t{17}, std::uint64_t{16}, std::uint64_t{8}}) {
    for (std::uint64_t step : {std::uint64_t{1}, std::uint64_t{3}, std::uint64_t{37}}) {
      std::vector<std::uint64_t> indexes;
      std::vector<merkle::IndexedLeaf> leaves;
      for (std::uint64_t i = step / 2; i < size; i += step) {
        indexes.push_back(i);
        leaves.push_back({i, f.ledger->entry(i)->leaf});
      }
      INFO("size " << size << ", every " << step);
      if (indexes.empty()) continue;
      Result<std::vector<Hash>> proof = f.ledger->multi_inclusion_proof(indexes, size);
      REQUIRE(proof.ok());
      Result<Hash> root = f.ledger->root_at(size);
      REQUIRE(root.ok());
      CHECK(merkle::verify_multi_inclusion(leaves, size, *proof, *root).ok());
      if (step == 1) CHECK(proof->empty());
    }
  }
  CHECK(f.ledger->multi_inclusion_proof(std::vector<std::uint64_t>{3, 2}, tree).status().code() ==
        StatusCode::kInvalidArgument);
  CHECK_FALSE(f.ledger->multi_inclusion_proof(std::vector<std::uint64_t>{0}, tree + 1).ok());
  std::vector<std::uint64_t> some{7, 2, 150, 0};
  Result<std::vector<StoredEntry>> read = f.ledger->entries_at(some);
  REQUIRE(read.ok());
  REQUIRE(read->size() == some.size());
  for (std::size_t k = 0; k < some.size(); ++k) {
    Result<StoredEntry> one = f.ledger->entry(some[k]);
    REQUIRE(one.ok());
    CHECK((*read)[k].index == some[k]);
    CHECK((*read)[k].bytes == one->bytes);
    CHECK((*read)[k].leaf == one->leaf);
  }
  Result<std::vector<StoredEntry>> beyond =
      f.ledger->entries_at(std::vector<std::uint64_t>{1, tree});
  REQUIRE_FALSE(beyond.ok());
  CHECK(beyond.status().code() == StatusCode::kNotFound);
}

TEST_CASE("a large bundle is checked on two threads and reports as one would", "[audit]") {
  const std::uint64_t version = GENERATE(std::uint64_t{1}, std::uint64_t{2});
  INFO("format " << version);
  Fixture f;
  std::vector<Entry> notes;
  for (int i = 0; i < 9000; ++i) notes.push_back(note("bulk", i));
  REQUIRE(f.ledger->append_all(notes).ok());
  AuditQuery q;
  q.kind = "admin";
  AuditBundle good = f.build(q, version);
  REQUIRE(good.entries.size() > 8192);  // past the threshold for two threads
  std::uint64_t progress_done = 0, progress_total = 0;
  Signed s = sign(*f.keys, good);
  Result<AuditReport> clean = verify_audit_bundle(s.bytes, s.signature, {f.key},
                                                  [&](std::uint64_t done, std::uint64_t total) {
                                                    CHECK(done <= total);
                                                    progress_done = done;
                                                    progress_total = total;
                                                  });
  REQUIRE(clean.ok());
  INFO(problems(*clean));
  CHECK(clean->ok());
  CHECK(progress_done == good.entries.size());
  CHECK(progress_total == good.entries.size());
  // Encoded (and decoded) in two halves on two threads: the same records, in order, and the same
  // bytes again.
  Result<AuditBundle> decoded = decode_audit_bundle(s.bytes);
  REQUIRE(decoded.ok());
  REQUIRE(decoded->entries.size() == good.entries.size());
  for (std::size_t k = 0; k < good.entries.size(); ++k) {
    CHECK(decoded->entries[k].index == good.entries[k].index);
    CHECK(decoded->entries[k].bytes == good.entries[k].bytes);
  }
  CHECK(*encode_audit_bundle(*decoded) == s.bytes);

  // Damage in both halves: each named, in bundle order.
  AuditBundle bad = good;
  const std::uint64_t early = bad.entries[100].index, late = bad.entries[7000].index;
  std::vector<std::string> expected;
  if (version == 1) {
    bad.entries[100].proof.back()[0] ^= std::byte{1};
    bad.entries[7000].proof.front()[0] ^= std::byte{1};
    expected = {fmt::format("entry {}: its inclusion proof", early),
                fmt::format("entry {}: its inclusion proof", late), "entries are out of order"};
  } else {
    // Entries changed in both halves: the one proof fails (once, after the entries' own
    // problems; it cannot say which entries).
    for (std::size_t k : {100, 7000}) {
      Entry changed = *decode_entry(bad.entries[k].bytes);
      changed.actor = "user:forger";
      bad.entries[k].bytes = *encode_entry(changed);
    }
    expected = {"entries are out of order", proof_failure(2, late)};
  }
  std::swap(bad.entries[8000], bad.entries[8001]);
  AuditReport r = verify(sign(*f.keys, bad), f.key);
  INFO(problems(r));
  for (const std::string& text : expected) CHECK(has_problem(r, text));
  auto position = [&](std::string_view text) {
    return std::find_if(r.problems.begin(), r.problems.end(),
                        [&](const std::string& p) { return p.find(text) != std::string::npos; }) -
           r.problems.begin();
  };
  for (std::size_t k = 1; k < expected.size(); ++k)
    CHECK(position(expected[k - 1]) < position(expected[k]));

  // A malformed record in the half that the decoder reads on its second thread is still found.
  Result<cbor::Value> tree = cbor::decode(s.bytes);
  REQUIRE(tree.ok());
  cbor::Map top = *tree->as_map();
  for (auto& [k, v] : top) {
    if (k.as_uint() != std::uint64_t{8}) continue;
    cbor::Array records = *v.as_array();
    cbor::Map record = *records.at(8500).as_map();
    std::erase_if(record, [](const auto& kv) { return *kv.first.as_text() == "selected"; });
    records[8500] = *cbor::Value::map(std::move(record));
    v = cbor::Value::array(std::move(records));
  }
  Result<AuditBundle> broken = decode_audit_bundle(cbor::encode(*cbor::Value::map(std::move(top))));
  REQUIRE_FALSE(broken.ok());
  CHECK_THAT(broken.status().message(), Catch::Contains("an entry record has no \"selected\""));
}

TEST_CASE("a large export reads its entries on two threads and selects what one thread would",
          "[audit]") {
  Fixture f;  // entries 0..7; patient a at 2, 4, 6, 7
  std::vector<std::uint64_t> about_a{2, 4, 6, 7}, access_entries{2, 3, 4, 6, 7};
  std::vector<Entry> batch;
  std::uint64_t next = f.ledger->stats().tree_size;
  for (int i = 0; i < 18000; ++i, ++next) {
    if (i % 2 == 0) {
      batch.push_back(access(f.a, "Practitioner::\"dr-lee\"", i % 4 == 0 ? "allow" : "deny"));
      about_a.push_back(next);
      access_entries.push_back(next);
    } else {
      batch.push_back(note("filler", i));
    }
    if (batch.size() == 6000) {
      REQUIRE(f.ledger->append_all(batch).ok());
      batch.clear();
    }
  }
  auto selected_indexes = [](const AuditBundle& b) {
    std::vector<std::uint64_t> out;
    for (const BundleEntry& e : b.entries)
      if (e.selected) out.push_back(e.index);
    return out;
  };
  SECTION("one patient: the chain's next page is read ahead") {
    AuditQuery q;
    q.patient = f.a;
    AuditBundle b = f.build(q);
    CHECK(selected_indexes(b) == about_a);
    AuditReport r = verify(sign(*f.keys, b), f.key);
    INFO(problems(r));
    CHECK(r.ok());
    CHECK(r.chain_entries == about_a.size());
  }
  SECTION("one kind: the second half of the range on a second thread") {
    AuditQuery q;
    q.kind = "access";
    AuditBundle b = f.build(q);
    CHECK(selected_indexes(b) == access_entries);
    AuditReport r = verify(sign(*f.keys, b), f.key);
    INFO(problems(r));
    CHECK(r.ok());
    // With values, each selected entry of both halves gets its own.
    q.include_values = true;
    AuditExportOptions options;
    options.values = [](const Entry& e) -> Result<std::optional<cbor::Value>> {
      const cbor::Value* decision = e.body.find("decision");
      if (!decision) return std::optional<cbor::Value>();
      return std::optional<cbor::Value>(*decision);
    };
    Result<AuditBundle> with_values = build_audit_bundle(*f.ledger, q, "user:admin", options);
    REQUIRE(with_values.ok());
    for (const BundleEntry& e : with_values->entries) {
      if (!e.selected) continue;
      INFO("entry " << e.index);
      REQUIRE(e.values);
      CHECK(*e.values == *decode_entry(e.bytes)->body.find("decision"));
    }
    AuditReport rv = verify(sign(*f.keys, *with_values), f.key);
    INFO(problems(rv));
    CHECK(rv.ok());
  }
}
