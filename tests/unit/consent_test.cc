// Consent on the ledger against a real SoftHSM token, vault and ledger: the ledger's readers by
// type and subject (and the one-time indexing of older entries), the consent book's decisions,
// withdrawals, expiry, patient-signed documents, rules that require them, the state replayed after
// a reopen, and the verifier's check of patient signatures.
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <sqlite3.h>

#include <thread>

#include <catch2/catch.hpp>

#include "appliance/consent.h"
#include "appliance/vault.h"
#include "ledger/consent_document.h"
#include "ledger/store.h"
#include "ledger/verifier.h"
#include "tests/support/softhsm.h"
#include "tests/support/temp_dir.h"

using namespace medgate;
using namespace medgate::appliance;
using medgate::testing::SoftHsmToken;
using medgate::testing::TempDir;

namespace {

constexpr const char* kRules = R"(
@id("icu-vitals")
@requires_signed_consent("psychiatry")
permit (principal in Ward::"icu", action == Action::"read", resource in Category::"vitals")
when { context.purpose == "TREAT" };
@id("break-glass")
permit (principal in Role::"er", action, resource) when { context.purpose == "ETREAT" };
)";

constexpr const char* kDirectory = R"([
  {"uid": {"type": "Practitioner", "id": "lee"}, "attrs": {}, "parents": []},
  {"uid": {"type": "Practitioner", "id": "kim"}, "attrs": {}, "parents": [{"type": "Ward", "id": "icu"}]},
  {"uid": {"type": "Practitioner", "id": "oka"}, "attrs": {}, "parents": [{"type": "Role", "id": "er"}]}
])";

struct PatientKey {
  EVP_PKEY* key = EVP_PKEY_Q_keygen(nullptr, nullptr, "EC", "P-256");
  ~PatientKey() { EVP_PKEY_free(key); }
  std::string public_pem() const {
    BIO* bio = BIO_new(BIO_s_mem());
    PEM_write_bio_PUBKEY(bio, key);
    char* data = nullptr;
    long n = BIO_get_mem_data(bio, &data);
    std::string out(data, static_cast<std::size_t>(n));
    BIO_free(bio);
    return out;
  }
  Bytes sign(const std::string& document) const {
    EVP_MD_CTX* ctx = EVP_MD_CTX_new();
    std::size_t n = 0;
    EVP_DigestSignInit(ctx, nullptr, EVP_sha256(), nullptr, key);
    EVP_DigestSign(ctx, nullptr, &n, reinterpret_cast<const unsigned char*>(document.data()),
                   document.size());
    Bytes sig(n);
    EVP_DigestSign(ctx, reinterpret_cast<unsigned char*>(sig.data()), &n,
                   reinterpret_cast<const unsigned char*>(document.data()), document.size());
    sig.resize(n);
    EVP_MD_CTX_free(ctx);
    return sig;
  }
};

struct Fixture {
  TempDir dir;
  SoftHsmToken token{dir.path()};
  std::unique_ptr<hsm::KeyStore> keys = token.open_with_key();
  std::unique_ptr<ledger::Ledger> ledger;
  std::unique_ptr<Vault> vault;
  std::unique_ptr<ConsentBook> book;

  Fixture() {
    ledger::LedgerOptions o;
    o.path = dir / "ledger.db";
    o.head_interval = std::chrono::milliseconds(0);
    auto l = ledger::Ledger::create(o, "ward-7", *keys, "user:root");
    REQUIRE(l.ok());
    ledger = std::move(l).value();
    auto v = Vault::open(dir / "vault.db", *keys);
    REQUIRE(v.ok());
    vault = std::move(v).value();
    reopen_book();
  }
  void reopen_book() {
    book.reset();
    auto b = ConsentBook::open(*ledger, *vault);
    REQUIRE(b.ok());
    book = std::move(b).value();
  }
  Pseudonym patient(const char* id) {
    auto p = vault->pseudonym(id);
    REQUIRE(p.ok());
    return *p;
  }
  rules::Response decide(const char* who, const Pseudonym& p, const char* purpose,
                         const char* data = "vitals") {
    AccessRequest r{who, p, purpose, data, std::nullopt};
    if (std::string_view(purpose) == "ETREAT") r.reason = "arrest";
    auto d = book->decide(r);
    REQUIRE(d.ok());
    auto entry = book->record_decision(r, *d, 0, "user:test");
    REQUIRE(entry.ok());
    return d->response;
  }
  ledger::VerifyReport verify() {
    ledger::VerifyOptions options;
    options.trusted_keys = {keys->signing_key()};
    auto r = ledger::verify_ledger_file(dir / "ledger.db", options);
    REQUIRE(r.ok());
    return *r;
  }
};

bool allowed(const rules::Response& r) {
  return r.decision == rules::Decision::kAllow;
}

}  // namespace

TEST_CASE("the ledger finds entries by type and by subject, also those written before the index",
          "[consent][store]") {
  TempDir dir;
  SoftHsmToken token(dir.path());
  auto keys = token.open_with_key();
  ledger::LedgerOptions o;
  o.path = dir / "ledger.db";
  o.head_interval = std::chrono::milliseconds(0);
  Bytes a(32, std::byte{0xaa}), b(32, std::byte{0xbb});
  {
    auto l = ledger::Ledger::create(o, "ward-7", *keys, "user:root");
    REQUIRE(l.ok());
    for (int i = 0; i < 6; ++i) {
      ledger::Entry e;
      e.type = i % 2 ? ledger::EntryType::kPatientEvent : ledger::EntryType::kAdminAction;
      e.time_us = ledger::now_us();
      e.actor = "user:test";
      auto body =
          i % 2 ? ledger::cbor::Value::map(
                      {{ledger::cbor::Value::text("source"), ledger::cbor::Value::text("hl7")},
                       {ledger::cbor::Value::text("device"), ledger::cbor::Value::text("d")},
                       {ledger::cbor::Value::text("message_id"), ledger::cbor::Value::text("")},
                       {ledger::cbor::Value::text("event"), ledger::cbor::Value::text("ADT")}})
                : ledger::cbor::Value::map(
                      {{ledger::cbor::Value::text("op"), ledger::cbor::Value::text("x")}});
      REQUIRE(body.ok());
      e.body = *body;
      if (i % 2) e.subjects = {{i == 3 ? b : a, std::nullopt}};
      REQUIRE((*l)->append(e).ok());
    }
    const ledger::EntryType types[] = {ledger::EntryType::kPatientEvent};
    auto events = (*l)->entries_of_type(types, 0, 100);
    REQUIRE(events.ok());
    REQUIRE(events->size() == 3);
    CHECK((*events)[0].index == 2);
    CHECK((*events)[2].index == 6);
    auto page = (*l)->entries_of_type(types, 3, 1);
    REQUIRE(page.ok());
    REQUIRE(page->size() == 1);
    CHECK((*page)[0].index == 4);
    auto of_a = (*l)->subject_entries(a, 0, 100);
    REQUIRE(of_a.ok());
    CHECK(*of_a == std::vector<std::uint64_t>{2, 6});
  }
  // As if the entries had been written by a build without the subjects index.
  sqlite3* db = nullptr;
  REQUIRE(sqlite3_open((dir / "ledger.db").c_str(), &db) == SQLITE_OK);
  REQUIRE(sqlite3_exec(db,
                       "DELETE FROM subjects; INSERT INTO meta (key, value) VALUES "
                       "('subjects_to_index', x'01');",
                       nullptr, nullptr, nullptr) == SQLITE_OK);
  sqlite3_close(db);
  auto l = ledger::Ledger::open(o, *keys);
  REQUIRE(l.ok());
  auto of_b = (*l)->subject_entries(b, 0, 100);
  REQUIRE(of_b.ok());
  CHECK(*of_b == std::vector<std::uint64_t>{4});
  auto of_a = (*l)->subject_entries(a, 3, 100);
  REQUIRE(of_a.ok());
  CHECK(*of_a == std::vector<std::uint64_t>{6});
}

TEST_CASE("grants and rules decide; withdrawal and expiry take effect at the next decision",
          "[consent]") {
  Fixture f;
  Pseudonym p = f.patient("MRN-1"), q = f.patient("MRN-2");
  CHECK_FALSE(allowed(f.decide("Practitioner::\"kim\"", p, "TREAT")));  // no rules: default deny
  REQUIRE(f.book->import_directory(kDirectory, "user:a").ok());
  auto v = f.book->deploy_rules(kRules, "user:a");
  REQUIRE(v.ok());
  CHECK(v->version == 1);
  CHECK(v->signed_categories == std::set<std::string>{"psychiatry"});
  CHECK(allowed(f.decide("Practitioner::\"kim\"", p, "TREAT")));  // by the rules
  CHECK_FALSE(allowed(f.decide("Practitioner::\"lee\"", p, "TREAT")));

  auto g = f.book->grant({p, "Practitioner::\"lee\"", "vitals", "TREAT", std::nullopt}, "user:a");
  REQUIRE(g.ok());
  auto r = f.decide("Practitioner::\"lee\"", p, "TREAT");
  CHECK(allowed(r));
  CHECK(r.determining == std::vector<std::string>{g->id});
  CHECK_FALSE(allowed(f.decide("Practitioner::\"lee\"", q, "TREAT")));          // another patient
  CHECK_FALSE(allowed(f.decide("Practitioner::\"lee\"", p, "HRESCH")));         // another purpose
  CHECK_FALSE(allowed(f.decide("Practitioner::\"lee\"", p, "TREAT", "labs")));  // another category

  REQUIRE(f.book->revoke(g->id, "user:a").ok());
  CHECK_FALSE(allowed(f.decide("Practitioner::\"lee\"", p, "TREAT")));
  CHECK(f.book->revoke(g->id, "user:a").status().code() == StatusCode::kFailedPrecondition);
  CHECK(f.book->revoke("g-nope", "user:a").status().code() == StatusCode::kNotFound);

  auto shortlived = f.book->grant(
      {p, "Practitioner::\"lee\"", "vitals", "TREAT", ledger::now_us() + 1'500'000}, "user:a");
  REQUIRE(shortlived.ok());
  CHECK(allowed(f.decide("Practitioner::\"lee\"", p, "TREAT")));
  std::this_thread::sleep_for(std::chrono::milliseconds(2100));
  CHECK_FALSE(allowed(f.decide("Practitioner::\"lee\"", p, "TREAT")));
  CHECK(grant_state(f.book->grants(p).back(), ledger::now_us()) == "expired");

  // Refused grants: break-glass purpose, unknown purpose, bad entity, category the rules reserve
  // for patient-signed consent.
  CHECK(f.book->grant({p, "Practitioner::\"lee\"", "vitals", "ETREAT", std::nullopt}, "user:a")
            .status()
            .code() == StatusCode::kInvalidArgument);
  CHECK(f.book->grant({p, "Practitioner::\"lee\"", "vitals", "FUN", std::nullopt}, "user:a")
            .status()
            .code() == StatusCode::kInvalidArgument);
  CHECK(f.book->grant({p, "lee", "vitals", "TREAT", std::nullopt}, "user:a").status().code() ==
        StatusCode::kInvalidArgument);
  CHECK(f.book->grant({p, "Practitioner::\"lee\"", "psychiatry", "TREAT", std::nullopt}, "user:a")
            .status()
            .code() == StatusCode::kPermissionDenied);

  // Break-glass is the rules' business.
  CHECK(allowed(f.decide("Practitioner::\"oka\"", p, "ETREAT")));
  AccessRequest no_reason{"Practitioner::\"oka\"", p, "ETREAT", "vitals", std::nullopt};
  CHECK(f.book->decide(no_reason).status().code() == StatusCode::kInvalidArgument);

  // Everything comes back from the ledger.
  f.reopen_book();
  CHECK(f.book->rules_versions().size() == 1);
  CHECK(f.book->directory()->entities == 3);
  CHECK(f.book->grants(std::nullopt).size() == 2);
  CHECK(grant_state(f.book->grants(p).front(), ledger::now_us()) == "revoked");
  CHECK_FALSE(allowed(f.decide("Practitioner::\"lee\"", p, "TREAT")));
  CHECK(allowed(f.decide("Practitioner::\"kim\"", p, "TREAT")));
  CHECK(f.verify().ok());
}

TEST_CASE("rules that fail to check are not deployed, and name where", "[consent]") {
  Fixture f;
  auto bad = f.book->deploy_rules("permit (principal, action, resource)\nwhen { 1 + };", "user:a");
  REQUIRE_FALSE(bad.ok());
  CHECK(bad.status().code() == StatusCode::kInvalidArgument);
  CHECK_THAT(bad.status().message(), Catch::Contains("2:"));
  auto reserved =
      f.book->deploy_rules("@id(\"g-1\") permit (principal, action, resource);", "user:a");
  CHECK(reserved.status().code() == StatusCode::kInvalidArgument);
  CHECK(f.book->rules_versions().empty());
  CHECK(f.book
            ->import_directory("[{\"uid\": {\"type\": \"Patient\", \"id\": \"x\"}, \"attrs\": {}, "
                               "\"parents\": []}]",
                               "user:a")
            .status()
            .code() == StatusCode::kInvalidArgument);
}

TEST_CASE(
    "patient-signed consent: grants and withdrawals the patient signed, checked again by the "
    "verifier",
    "[consent]") {
  Fixture f;
  Pseudonym p = f.patient("MRN-1");
  REQUIRE(f.book->deploy_rules(kRules, "user:a").ok());
  PatientKey key, other;
  ledger::ConsentDocument d;
  d.ledger_id = "ward-7";
  d.patient = p.bytes;
  d.to = "Practitioner::\"lee\"";
  d.data = "psychiatry";
  d.purpose = "TREAT";
  std::string doc = ledger::format_consent_document(d);
  Bytes sig = key.sign(doc);

  // Without an enrolled key, nothing the patient signed counts.
  CHECK(f.book->grant_signed(as_bytes(doc), sig, "user:a").status().code() ==
        StatusCode::kFailedPrecondition);
  auto id = f.book->enroll_key(p, as_bytes(key.public_pem()), "user:a");
  REQUIRE(id.ok());
  CHECK(f.book->patient_key_id(p) == *id);
  CHECK(f.book->grant_signed(as_bytes(doc), other.sign(doc), "user:a").status().code() ==
        StatusCode::kVerificationFailed);
  std::string altered = doc;
  altered.replace(altered.find("TREAT"), 5, "HRESCH");
  CHECK(f.book->grant_signed(as_bytes(altered), sig, "user:a").status().code() ==
        StatusCode::kVerificationFailed);
  ledger::ConsentDocument foreign = d;
  foreign.ledger_id = "ward-8";
  std::string foreign_doc = ledger::format_consent_document(foreign);
  CHECK(f.book->grant_signed(as_bytes(foreign_doc), key.sign(foreign_doc), "user:a")
            .status()
            .code() == StatusCode::kInvalidArgument);

  auto g = f.book->grant_signed(as_bytes(doc), sig, "user:a");
  REQUIRE(g.ok());
  CHECK(g->id == ledger::signed_grant_id(as_bytes(doc)));
  CHECK(g->patient_signed);
  CHECK(f.book->grant_signed(as_bytes(doc), sig, "user:a").status().code() ==
        StatusCode::kFailedPrecondition);  // a document grants once
  CHECK(allowed(f.decide("Practitioner::\"lee\"", p, "TREAT", "psychiatry")));

  ledger::ConsentDocument w;
  w.kind = ledger::ConsentDocument::Kind::kRevoke;
  w.ledger_id = "ward-7";
  w.patient = p.bytes;
  w.grant = g->id;
  std::string wdoc = ledger::format_consent_document(w);
  REQUIRE(f.book->revoke_signed(as_bytes(wdoc), key.sign(wdoc), "user:a").ok());
  CHECK_FALSE(allowed(f.decide("Practitioner::\"lee\"", p, "TREAT", "psychiatry")));
  CHECK(f.verify().ok());

  // A grant entry claiming a patient signature that does not verify (written around the book, as
  // a compromised admin tool could) is named by the verifier.
  ledger::Entry forged;
  forged.type = ledger::EntryType::kConsentGrant;
  forged.time_us = ledger::now_us();
  forged.actor = "user:mallory";
  auto t = [](const char* s) { return ledger::cbor::Value::text(s); };
  auto body = ledger::cbor::Value::map(
      {{t("grant"), ledger::cbor::Value::text(ledger::signed_grant_id(as_bytes(altered)))},
       {t("to"), t("Practitioner::\"lee\"")},
       {t("data"), t("psychiatry")},
       {t("purpose"), t("HRESCH")},
       {t("policy"), t("permit (principal, action, resource);")},
       {t("document"), ledger::cbor::Value::bytes(as_bytes(altered))},
       {t("signature"), ledger::cbor::Value::bytes(ByteView(sig))}});
  REQUIRE(body.ok());
  forged.body = *body;
  forged.subjects = {{Bytes(p.bytes.begin(), p.bytes.end()), std::nullopt}};
  auto index = f.ledger->append(forged);
  REQUIRE(index.ok());
  ledger::VerifyReport report = f.verify();
  REQUIRE_FALSE(report.ok());
  CHECK(report.problem->number == *index);
  CHECK_THAT(report.problem->describe(), Catch::Contains("signature"));
}

TEST_CASE(
    "two rules versions written with the same number (two members at once) are numbered "
    "by ledger order",
    "[consent]") {
  Fixture f;
  const std::string text = "permit (principal, action, resource);";
  auto racing_entry = [&](const char* actor) {
    ledger::Entry e;
    e.type = ledger::EntryType::kRulesVersion;
    e.time_us = ledger::now_us();
    e.actor = actor;
    const Hash digest = sha256(as_bytes(text));
    e.body = *ledger::cbor::Value::map(
        {{ledger::cbor::Value::text("version"), ledger::cbor::Value::uint(1)},
         {ledger::cbor::Value::text("text"), ledger::cbor::Value::text(text)},
         {ledger::cbor::Value::text("sha256"), ledger::cbor::Value::bytes(ByteView(digest))}});
    return e;
  };
  // Both members computed "version 1"; the ledger orders them.
  const std::uint64_t first = f.ledger->append(racing_entry("member:a")).value();
  const std::uint64_t second = f.ledger->append(racing_entry("member:b")).value();
  f.reopen_book();
  std::vector<RulesVersionInfo> versions = f.book->rules_versions();
  REQUIRE(versions.size() == 2);
  CHECK(versions[0].version == 1);
  CHECK(versions[0].entry == first);
  CHECK(versions[1].version == 2);
  CHECK(versions[1].entry == second);
  CHECK(f.book->rules_version(2).value().actor == "member:b");
  // The next local deploy says which version it became.
  auto third = f.book->deploy_rules(text, "user:c");
  REQUIRE(third.ok());
  CHECK(third->version == 3);
}
