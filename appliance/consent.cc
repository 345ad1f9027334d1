#include "appliance/consent.h"

#include <openssl/rand.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <map>
#include <mutex>
#include <shared_mutex>

#include <fmt/format.h>

#include "appliance/log.h"
#include "ledger/consent_document.h"
#include "ledger/entry.h"
#include "ledger/rules/deployment.h"
#include "ledger/rules/parser.h"
#include "ledger/store.h"

namespace medgate::appliance {
namespace {

using ledger::cbor::Value;
namespace cbor = ledger::cbor;

constexpr std::string_view kPurposes[] = {
    "TREAT",    "ETREAT",   "HPAYMT", "HOPERAT",  "HRESCH",  "PUBHLTH", "CAREMGT",
    "CLINTRCH", "COVERAGE", "FAMRQT", "PATRQT",   "PWATRNY", "HMARKT",  "HSYSADMIN",
    "HDIRECT",  "HLEGAL",   "TRAIN",  "DISASTER", "THREAT",
};
constexpr std::string_view kBreakGlass = "ETREAT";

std::string random_grant_id() {
  unsigned char b[8];
  if (RAND_bytes(b, sizeof b) != 1) return {};
  return "g-" + to_hex(ByteView(reinterpret_cast<const std::byte*>(b), sizeof b));
}

// The Cedar policy a grant becomes (see consent.h). Everything interpolated was checked: the
// grantee re-printed from its parsed uid, category and purpose from restricted alphabets.
std::string grant_policy(const std::string& id, const rules::EntityUid& to,
                         const Pseudonym& patient, const std::string& data,
                         const std::string& purpose, std::optional<std::uint64_t> until_us,
                         bool patient_signed) {
  std::string when =
      fmt::format("resource in Category::\"{}\" && context.purpose == \"{}\"", data, purpose);
  if (until_us) when += fmt::format(" && context.now < {}", *until_us / 1000000);
  if (!patient_signed) when += " && !resource.signed_consent_required";
  return fmt::format(
      "@id(\"{0}\")\n@consent(\"{0}\")\npermit (\n  principal in {1},\n  action == "
      "Action::\"{2}\",\n  resource in Patient::\"{3}\"\n)\nwhen {{ {4} }};\n",
      id, to.to_text(), kReadAction, patient.hex(), when);
}

Value text(std::string_view s) {
  return Value::text(std::string(s));
}

cbor::Value body_map(std::vector<std::pair<cbor::Value, cbor::Value>> fields) {
  Result<cbor::Value> m = cbor::Value::map(std::move(fields));
  return m.ok() ? std::move(m).value() : cbor::Value::null();
}

const std::string& body_text(const ledger::Entry& e, std::string_view key) {
  static const std::string kEmpty;
  const cbor::Value* v = e.body.find(key);
  const std::string* s = v ? v->as_text() : nullptr;
  return s ? *s : kEmpty;
}

Hash hash_of(const Bytes& b) {
  Hash h{};
  if (b.size() == h.size()) std::copy(b.begin(), b.end(), h.begin());
  return h;
}

}  // namespace

bool known_purpose(std::string_view code) {
  return std::find(std::begin(kPurposes), std::end(kPurposes), code) != std::end(kPurposes);
}

std::string_view grant_state(const ConsentGrant& g, std::uint64_t now) {
  if (g.revoked_entry) return "revoked";
  if (g.until_us && now / 1000000 >= *g.until_us / 1000000) return "expired";
  return "active";
}

class ConsentBook::Impl {
 public:
  Impl(ledger::Ledger& ledger, Vault& vault) : ledger_(ledger), vault_(vault) {}

  Status replay() {
    const ledger::EntryType types[] = {
        ledger::EntryType::kRulesVersion, ledger::EntryType::kDirectoryImport,
        ledger::EntryType::kConsentGrant, ledger::EntryType::kConsentRevoke,
        ledger::EntryType::kPatientKey};
    std::uint64_t from = 0;
    for (;;) {
      MEDGATE_ASSIGN_OR_RETURN(auto page, ledger_.entries_of_type(types, from, 4096));
      if (page.empty()) break;
      for (const ledger::StoredEntry& e : page) {
        Status s = apply(e.index, e.entry);
        if (!s.ok())
          return Status::Corruption(
              fmt::format("replaying entry {} ({}): {}", e.index,
                          ledger::find_entry_type(static_cast<std::uint64_t>(e.entry.type))->name,
                          s.message()));
      }
      from = page.back().index + 1;
    }
    return Status::Ok();
  }

  // Applies one durable entry to the state. Called with state_mu_ held exclusively (or before
  // the book is shared).
  Status apply(std::uint64_t index, const ledger::Entry& e) {
    switch (e.type) {
      case ledger::EntryType::kRulesVersion: {
        RulesVersionInfo v;
        v.text = body_text(e, "text");
        rules::ParseResult parsed = rules::parse_policies(v.text);
        if (!parsed.ok()) return Status::Corruption(parsed.errors.front().to_text());
        // A version is its place in ledger order. Two members of a cluster that deploy at once
        // both write the next number; the later one becomes the number after it, everywhere alike.
        v.version = versions_.size() + 1;
        if (const std::uint64_t written = e.body.find("version")->as_uint().value_or(0);
            written != v.version)
          log(LogLevel::kWarning, "consent.rules",
              "entry {} was written as rules version {}; in ledger order it is version {} (two "
              "members deployed at once)",
              index, written, v.version);
        v.sha256 = hash_of(*e.body.find("sha256")->as_bytes());
        v.entry = index;
        v.time_us = e.time_us;
        v.actor = e.actor;
        v.policies = parsed.policies.policies.size();
        v.signed_categories = rules::signed_categories_of(parsed.policies);
        for (const std::string& id : rule_ids_) (void)authorizer_.remove(id);
        rule_ids_.clear();
        for (rules::Policy& p : parsed.policies.policies) {
          std::string id = p.id;
          MEDGATE_RETURN_IF_ERROR(authorizer_.add(std::move(p)));
          rule_ids_.push_back(std::move(id));
        }
        versions_.push_back(std::move(v));
        break;
      }
      case ledger::EntryType::kDirectoryImport: {
        DirectoryInfo d;
        d.text = body_text(e, "entities");
        MEDGATE_ASSIGN_OR_RETURN(rules::Entities entities, rules::entities_from_json_text(d.text));
        // As for rules: the version is the import's place in ledger order.
        d.version = directory_ ? directory_->version + 1 : 1;
        if (const std::uint64_t written = e.body.find("version")->as_uint().value_or(0);
            written != d.version)
          log(LogLevel::kWarning, "consent.directory",
              "entry {} was written as directory version {}; in ledger order it is version {} "
              "(two members imported at once)",
              index, written, d.version);
        d.sha256 = hash_of(*e.body.find("sha256")->as_bytes());
        d.entry = index;
        d.time_us = e.time_us;
        d.actor = e.actor;
        d.entities = entities.size();
        directory_entities_ = std::make_unique<rules::Entities>(std::move(entities));
        directory_ = std::move(d);
        break;
      }
      case ledger::EntryType::kConsentGrant: {
        if (e.subjects.size() != 1) return Status::Corruption("a grant must name one patient");
        ConsentGrant g;
        g.id = body_text(e, "grant");
        g.patient.bytes = hash_of(e.subjects[0].subject);
        g.to = body_text(e, "to");
        g.data = body_text(e, "data");
        g.purpose = body_text(e, "purpose");
        if (const cbor::Value* u = e.body.find("until")) g.until_us = u->as_uint();
        g.patient_signed = e.body.find("signature") != nullptr;
        g.policy = body_text(e, "policy");
        g.entry = index;
        g.time_us = e.time_us;
        g.actor = e.actor;
        rules::ParseResult parsed = rules::parse_policies(g.policy);
        if (!parsed.ok() || parsed.policies.policies.size() != 1 ||
            parsed.policies.policies[0].id != g.id)
          return Status::Corruption("the grant's policy does not parse as its one policy");
        MEDGATE_RETURN_IF_ERROR(authorizer_.add(std::move(parsed.policies.policies[0])));
        grants_[g.id] = std::move(g);
        break;
      }
      case ledger::EntryType::kConsentRevoke: {
        auto it = grants_.find(body_text(e, "grant"));
        if (it == grants_.end()) return Status::Corruption("withdraws a grant that does not exist");
        it->second.revoked_entry = index;
        it->second.revoked_us = e.time_us;
        it->second.revoked_by_patient = e.body.find("signature") != nullptr;
        (void)authorizer_.remove(it->first);
        break;
      }
      case ledger::EntryType::kPatientKey: {
        if (e.subjects.size() != 1) return Status::Corruption("a key must name one patient");
        Pseudonym p;
        p.bytes = hash_of(e.subjects[0].subject);
        patient_keys_[p] = *e.body.find("public_key")->as_bytes();
        break;
      }
      default:
        return Status::Internal("not a consent entry");
    }
    state_ = std::max(state_, index);
    return Status::Ok();
  }

  // A replicated ledger: entries from every member's blocks, in ledger order (the cluster's
  // follower thread). The only way state changes then: a local change waits for it (commit).
  Status apply_replicated(std::uint64_t index, const ledger::Entry& e) {
    std::unique_lock lk(state_mu_);
    if (index <= state_) return Status::Ok();  // replayed at open already
    Status s = apply(index, e);
    // A member's entry that does not apply here (a withdrawal of a grant this replica refused)
    // must not stop the others: the watermark moves on and the problem is named.
    state_ = std::max(state_, index);
    lk.unlock();
    applied_cv_.notify_all();
    return s;
  }

  // Appends one entry and applies it once durable; changes are serialised by change_mu_. On a
  // replicated ledger the entry is applied when its block comes back in ledger order
  // (apply_replicated), after every entry before it; commit waits for that.
  Result<std::uint64_t> commit(const ledger::Entry& e) {
    MEDGATE_ASSIGN_OR_RETURN(std::uint64_t index, ledger_.append(e));
    if (ledger_.replica()) {
      std::unique_lock lk(state_mu_);
      if (!applied_cv_.wait_for(lk, std::chrono::seconds(10), [&] { return state_ >= index; }))
        return Status::Unavailable(fmt::format(
            "entry {} is on the ledger but not applied here yet (the cluster's follower is "
            "behind); it takes effect when it is",
            index));
      return index;
    }
    std::unique_lock lk(state_mu_);
    Status s = apply(index, e);
    if (!s.ok()) {
      // The entry is on the ledger but could not be applied: a bug, since it was checked first.
      log(LogLevel::kError, "consent.apply", "entry {} is durable but was not applied: {}", index,
          s.message());
      return s;
    }
    return index;
  }

  ledger::Entry make_entry(ledger::EntryType type, const std::string& actor, cbor::Value body,
                           const Pseudonym* subject) {
    ledger::Entry e;
    e.type = type;
    e.time_us = ledger::now_us();
    e.actor = actor;
    e.body = std::move(body);
    if (subject) e.subjects.push_back({Bytes(subject->bytes.begin(), subject->bytes.end()), {}});
    return e;
  }

  Result<RulesVersionInfo> deploy_rules(std::string text, const std::string& actor) {
    rules::RulesCheck check = rules::check_rules(text);
    if (!check.errors.empty()) {
      std::string msg = "the rules do not check:";
      for (const auto& d : check.errors) msg += "\n  " + d.to_text();
      return Status::InvalidArgument(msg);
    }
    std::lock_guard change(change_mu_);
    std::uint64_t version;
    {
      std::shared_lock lk(state_mu_);
      version = versions_.empty() ? 1 : versions_.back().version + 1;
    }
    Hash digest = sha256(as_bytes(text));
    MEDGATE_ASSIGN_OR_RETURN(
        std::uint64_t index,
        commit(make_entry(ledger::EntryType::kRulesVersion, actor,
                          body_map({{text_key("version"), Value::uint(version)},
                                    {text_key("text"), Value::text(text)},
                                    {text_key("sha256"), Value::bytes(ByteView(digest))}}),
                          nullptr)));
    std::shared_lock lk(state_mu_);
    for (auto it = versions_.rbegin(); it != versions_.rend(); ++it)
      if (it->entry == index) return *it;
    return Status::Internal(fmt::format("rules entry {} is not among the versions", index));
  }

  static Value text_key(std::string_view k) { return text(k); }

  Result<DirectoryInfo> import_directory(std::string json_text, const std::string& actor) {
    MEDGATE_ASSIGN_OR_RETURN(rules::Entities entities, rules::entities_from_json_text(json_text));
    for (const rules::Entity* ent : entities.all())
      if (ent->uid.type == "Patient" || ent->uid.type == "PatientData")
        return Status::InvalidArgument(fmt::format(
            "the directory holds a {} entity: patients are not part of the directory (their "
            "identifiers are PHI; medgate refers to them by pseudonym)",
            ent->uid.type));
    std::lock_guard change(change_mu_);
    std::uint64_t version;
    {
      std::shared_lock lk(state_mu_);
      version = directory_ ? directory_->version + 1 : 1;
    }
    Hash digest = sha256(as_bytes(json_text));
    MEDGATE_ASSIGN_OR_RETURN(
        std::uint64_t index,
        commit(make_entry(ledger::EntryType::kDirectoryImport, actor,
                          body_map({{text_key("version"), Value::uint(version)},
                                    {text_key("entities"), Value::text(json_text)},
                                    {text_key("sha256"), Value::bytes(ByteView(digest))}}),
                          nullptr)));
    std::shared_lock lk(state_mu_);
    // Another member's import ordered right after this one is the newest: say which is ours.
    if (!directory_ || directory_->entry != index)
      return Status::Unavailable(fmt::format(
          "directory import recorded as entry {}, but another member's import came right after "
          "it and is the directory now (medctl directory show)",
          index));
    return *directory_;
  }

  Status check_grant_fields(const std::string& to, const std::string& data,
                            const std::string& purpose, rules::EntityUid& to_uid) {
    Result<rules::EntityUid> uid = rules::parse_entity_uid(to);
    if (!uid.ok())
      return Status::InvalidArgument(
          "--to must be a Cedar entity such as Practitioner::\"dr-lee\": " +
          uid.status().message());
    to_uid = *uid;
    if (!rules::valid_category(data))
      return Status::InvalidArgument(
          "the data category must be a short name of lower-case letters, digits, - and _");
    if (purpose == kBreakGlass)
      return Status::InvalidArgument(
          "ETREAT (emergency treatment) is break-glass: only the deployed rules can permit it, "
          "never a consent grant");
    if (!known_purpose(purpose))
      return Status::InvalidArgument(fmt::format(
          "purpose \"{}\" is not a known purpose-of-use code (TREAT, HPAYMT, HOPERAT, HRESCH, "
          "PUBHLTH, CAREMGT, CLINTRCH, ...)",
          purpose));
    return Status::Ok();
  }

  Result<ConsentGrant> add_grant(const std::string& id, const GrantRequest& r,
                                 const rules::EntityUid& to, const Bytes* document,
                                 const Bytes* signature, const std::string& actor) {
    const bool patient_signed = document != nullptr;
    std::string policy =
        grant_policy(id, to, r.patient, r.data, r.purpose, r.until_us, patient_signed);
    std::vector<std::pair<cbor::Value, cbor::Value>> body = {
        {text_key("grant"), text(id)},
        {text_key("to"), text(r.to)},
        {text_key("data"), text(r.data)},
        {text_key("purpose"), text(r.purpose)},
        {text_key("policy"), Value::text(policy)}};
    if (r.until_us) body.push_back({text_key("until"), Value::uint(*r.until_us)});
    if (document) {
      body.push_back({text_key("document"), Value::bytes(ByteView(*document))});
      body.push_back({text_key("signature"), Value::bytes(ByteView(*signature))});
    }
    MEDGATE_RETURN_IF_ERROR(commit(make_entry(ledger::EntryType::kConsentGrant, actor,
                                              body_map(std::move(body)), &r.patient))
                                .status());
    std::shared_lock lk(state_mu_);
    return grants_.at(id);
  }

  Result<ConsentGrant> grant(const GrantRequest& r, const std::string& actor) {
    rules::EntityUid to;
    MEDGATE_RETURN_IF_ERROR(check_grant_fields(r.to, r.data, r.purpose, to));
    if (r.until_us && *r.until_us <= ledger::now_us())
      return Status::InvalidArgument("--until is in the past");
    std::lock_guard change(change_mu_);
    {
      std::shared_lock lk(state_mu_);
      if (!versions_.empty() && versions_.back().signed_categories.count(r.data))
        return Status::PermissionDenied(fmt::format(
            "the deployed rules (version {}) require the patient's own signed consent for "
            "category \"{}\": use medctl consent grant --signed FILE",
            versions_.back().version, r.data));
    }
    std::string id = random_grant_id();
    if (id.empty()) return Status::Internal("no random bytes for a grant id");
    return add_grant(id, r, to, nullptr, nullptr, actor);
  }

  Result<ledger::ConsentDocument> check_signed(ByteView document, ByteView signature,
                                               ledger::ConsentDocument::Kind kind) {
    MEDGATE_ASSIGN_OR_RETURN(ledger::ConsentDocument doc,
                             ledger::parse_consent_document(to_string(document)));
    if (doc.kind != kind)
      return Status::InvalidArgument(kind == ledger::ConsentDocument::Kind::kGrant
                                         ? "the document is a withdrawal, not a grant"
                                         : "the document is a grant, not a withdrawal");
    if (doc.ledger_id != ledger_id_)
      return Status::InvalidArgument(fmt::format(
          "the document is for ledger \"{}\", not this one (\"{}\")", doc.ledger_id, ledger_id_));
    Pseudonym p;
    p.bytes = doc.patient;
    Bytes key;
    {
      std::shared_lock lk(state_mu_);
      auto it = patient_keys_.find(p);
      if (it == patient_keys_.end())
        return Status::FailedPrecondition(
            fmt::format("patient {} has enrolled no key (medctl patient enroll)", p.prefix()));
      key = it->second;
    }
    MEDGATE_RETURN_IF_ERROR(ledger::verify_patient_signature(key, document, signature));
    return doc;
  }

  Result<ConsentGrant> grant_signed(ByteView document, ByteView signature,
                                    const std::string& actor) {
    std::lock_guard change(change_mu_);
    MEDGATE_ASSIGN_OR_RETURN(
        ledger::ConsentDocument doc,
        check_signed(document, signature, ledger::ConsentDocument::Kind::kGrant));
    GrantRequest r;
    r.patient.bytes = doc.patient;
    r.to = doc.to;
    r.data = doc.data;
    r.purpose = doc.purpose;
    r.until_us = doc.until_us;
    rules::EntityUid to;
    MEDGATE_RETURN_IF_ERROR(check_grant_fields(r.to, r.data, r.purpose, to));
    std::string id = ledger::signed_grant_id(document);
    {
      std::shared_lock lk(state_mu_);
      if (grants_.count(id))
        return Status::FailedPrecondition(
            fmt::format("this signed document was already recorded as grant {}", id));
    }
    Bytes doc_bytes(document.begin(), document.end()), sig(signature.begin(), signature.end());
    return add_grant(id, r, to, &doc_bytes, &sig, actor);
  }

  Result<ConsentGrant> revoke(std::string_view id, const std::string& actor, const Bytes* document,
                              const Bytes* signature) {
    Pseudonym patient;
    {
      std::shared_lock lk(state_mu_);
      auto it = grants_.find(std::string(id));
      if (it == grants_.end())
        return Status::NotFound(fmt::format("there is no consent grant \"{}\"", id));
      if (it->second.revoked_entry)
        return Status::FailedPrecondition(fmt::format("grant {} was already withdrawn (entry {})",
                                                      id, *it->second.revoked_entry));
      patient = it->second.patient;
    }
    std::vector<std::pair<cbor::Value, cbor::Value>> body = {{text_key("grant"), text(id)}};
    if (document) {
      body.push_back({text_key("document"), Value::bytes(ByteView(*document))});
      body.push_back({text_key("signature"), Value::bytes(ByteView(*signature))});
    }
    MEDGATE_RETURN_IF_ERROR(commit(make_entry(ledger::EntryType::kConsentRevoke, actor,
                                              body_map(std::move(body)), &patient))
                                .status());
    std::shared_lock lk(state_mu_);
    return grants_.at(std::string(id));
  }

  Result<ConsentGrant> revoke_signed(ByteView document, ByteView signature,
                                     const std::string& actor) {
    std::lock_guard change(change_mu_);
    MEDGATE_ASSIGN_OR_RETURN(
        ledger::ConsentDocument doc,
        check_signed(document, signature, ledger::ConsentDocument::Kind::kRevoke));
    {
      std::shared_lock lk(state_mu_);
      auto it = grants_.find(doc.grant);
      if (it != grants_.end() && it->second.patient.bytes != doc.patient)
        return Status::PermissionDenied(
            "the withdrawal is signed by another patient than the grant's");
    }
    Bytes doc_bytes(document.begin(), document.end()), sig(signature.begin(), signature.end());
    return revoke(doc.grant, actor, &doc_bytes, &sig);
  }

  Result<Hash> enroll_key(const Pseudonym& patient, ByteView key, const std::string& actor) {
    MEDGATE_ASSIGN_OR_RETURN(Bytes der, ledger::patient_key_der(key));
    Hash id = sha256(der);
    std::lock_guard change(change_mu_);
    MEDGATE_RETURN_IF_ERROR(
        commit(make_entry(ledger::EntryType::kPatientKey, actor,
                          body_map({{text_key("public_key"), Value::bytes(ByteView(der))},
                                    {text_key("key_id"), Value::bytes(ByteView(id))}}),
                          &patient))
            .status());
    return id;
  }

  Result<AccessDecision> decide(const AccessRequest& r) {
    MEDGATE_ASSIGN_OR_RETURN(rules::EntityUid principal, rules::parse_entity_uid(r.principal));
    if (!rules::valid_category(r.category))
      return Status::InvalidArgument(
          "the data category must be a short name of lower-case letters, digits, - and _");
    if (!known_purpose(r.purpose))
      return Status::InvalidArgument(
          fmt::format("purpose \"{}\" is not a known purpose-of-use code", r.purpose));
    AccessDecision out;
    out.break_glass = r.purpose == kBreakGlass;
    if (out.break_glass && (!r.reason || r.reason->empty()))
      return Status::InvalidArgument("break-glass access (purpose ETREAT) needs --reason");
    rules::Request req;
    req.principal = std::move(principal);
    req.action = {"Action", kReadAction};
    req.resource = {"PatientData", r.patient.hex() + "/" + r.category};
    rules::ValueRecord context = {
        {"purpose", rules::Value(r.purpose)},
        {"now", rules::Value(static_cast<std::int64_t>(ledger::now_us() / 1000000))},
        {"break_glass", rules::Value(out.break_glass)}};
    if (r.reason) context.emplace("reason", rules::Value(*r.reason));
    req.context = rules::Value::record(std::move(context));

    std::shared_lock lk(state_mu_);
    bool signed_required =
        !versions_.empty() && versions_.back().signed_categories.count(r.category) > 0;
    rules::Entities request_entities(directory_entities_.get());
    rules::Entity resource;
    resource.uid = req.resource;
    resource.parents = {{"Patient", r.patient.hex()}, {"Category", r.category}};
    resource.attrs = {{"category", rules::Value(r.category)},
                      {"signed_consent_required", rules::Value(signed_required)}};
    request_entities.add(std::move(resource));
    out.response = authorizer_.is_authorized(req, request_entities);
    out.state = state_;
    return out;
  }

  Result<std::uint64_t> record_decision(const AccessRequest& r, const AccessDecision& d,
                                        std::uint64_t returned, const std::string& actor) {
    cbor::Array policies, errors;
    for (const std::string& id : d.response.determining) policies.push_back(text(id));
    for (const rules::PolicyError& e : d.response.errors) errors.push_back(text(e.policy_id));
    std::vector<std::pair<cbor::Value, cbor::Value>> body = {
        {text_key("principal"), text(r.principal)},
        {text_key("action"), text(fmt::format("Action::\"{}\"", kReadAction))},
        {text_key("purpose"), text(r.purpose)},
        {text_key("data"), text(r.category)},
        {text_key("decision"), text(rules::decision_name(d.response.decision))},
        {text_key("policies"), Value::array(std::move(policies))},
        {text_key("errors"), Value::array(std::move(errors))},
        {text_key("break_glass"), Value::boolean(d.break_glass)},
        {text_key("state"), Value::uint(d.state)},
        {text_key("returned"), Value::uint(returned)}};
    // The requester's reason may name the patient or their condition: it is kept encrypted under
    // the patient's data key (and gone with it when the patient is erased).
    if (r.reason && !r.reason->empty()) {
      Result<Bytes> sealed =
          vault_.encrypt(r.patient, as_bytes(*r.reason), as_bytes("medgate access reason v1"));
      if (sealed.ok()) body.push_back({text_key("reason"), Value::bytes(ByteView(*sealed))});
    }
    Result<std::uint64_t> index = ledger_.append(make_entry(
        ledger::EntryType::kAccessDecision, actor, body_map(std::move(body)), &r.patient));
    if (index.ok()) {
      (d.response.decision == rules::Decision::kAllow ? allowed_ : denied_)++;
      if (d.break_glass) break_glass_++;
      if (!d.response.errors.empty()) policy_errors_++;
    }
    return index;
  }

  std::atomic<std::uint64_t> allowed_{0}, denied_{0}, break_glass_{0}, policy_errors_{0};

  ledger::Ledger& ledger_;
  Vault& vault_;
  std::string ledger_id_;
  std::mutex change_mu_;                    // serialises changes (check, append, apply)
  mutable std::shared_mutex state_mu_;      // guards everything below
  std::condition_variable_any applied_cv_;  // state_ moved (replicated ledgers)
  rules::Authorizer authorizer_;
  std::vector<std::string> rule_ids_;  // ids of the deployed rules' policies
  std::vector<RulesVersionInfo> versions_;
  std::optional<DirectoryInfo> directory_;
  std::unique_ptr<rules::Entities> directory_entities_ = std::make_unique<rules::Entities>();
  std::map<std::string, ConsentGrant> grants_;
  std::map<Pseudonym, Bytes> patient_keys_;
  std::uint64_t state_ = 0;
};

Result<std::unique_ptr<ConsentBook>> ConsentBook::open(ledger::Ledger& ledger, Vault& vault) {
  auto impl = std::make_unique<Impl>(ledger, vault);
  impl->ledger_id_ = ledger.ledger_id();
  MEDGATE_RETURN_IF_ERROR(impl->replay());
  return std::unique_ptr<ConsentBook>(new ConsentBook(std::move(impl)));
}

ConsentBook::ConsentBook(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
ConsentBook::~ConsentBook() = default;

Result<RulesVersionInfo> ConsentBook::deploy_rules(std::string text, const std::string& actor) {
  return impl_->deploy_rules(std::move(text), actor);
}
std::vector<RulesVersionInfo> ConsentBook::rules_versions() const {
  std::shared_lock lk(impl_->state_mu_);
  return impl_->versions_;
}
Result<RulesVersionInfo> ConsentBook::rules_version(std::optional<std::uint64_t> version) const {
  std::shared_lock lk(impl_->state_mu_);
  if (impl_->versions_.empty()) return Status::NotFound("no rules have been deployed");
  if (!version) return impl_->versions_.back();
  for (const RulesVersionInfo& v : impl_->versions_)
    if (v.version == *version) return v;
  return Status::NotFound(fmt::format("there is no rules version {}", *version));
}
Result<DirectoryInfo> ConsentBook::import_directory(std::string json_text,
                                                    const std::string& actor) {
  return impl_->import_directory(std::move(json_text), actor);
}
std::optional<DirectoryInfo> ConsentBook::directory() const {
  std::shared_lock lk(impl_->state_mu_);
  return impl_->directory_;
}
Result<ConsentGrant> ConsentBook::grant(const GrantRequest& request, const std::string& actor) {
  return impl_->grant(request, actor);
}
Result<ConsentGrant> ConsentBook::grant_signed(ByteView document, ByteView signature,
                                               const std::string& actor) {
  return impl_->grant_signed(document, signature, actor);
}
Result<ConsentGrant> ConsentBook::revoke(std::string_view id, const std::string& actor) {
  std::lock_guard change(impl_->change_mu_);
  return impl_->revoke(id, actor, nullptr, nullptr);
}
Result<ConsentGrant> ConsentBook::revoke_signed(ByteView document, ByteView signature,
                                                const std::string& actor) {
  return impl_->revoke_signed(document, signature, actor);
}
std::vector<ConsentGrant> ConsentBook::grants(const std::optional<Pseudonym>& patient) const {
  std::shared_lock lk(impl_->state_mu_);
  std::vector<ConsentGrant> out;
  for (const auto& [id, g] : impl_->grants_)
    if (!patient || g.patient == *patient) out.push_back(g);
  std::sort(out.begin(), out.end(),
            [](const ConsentGrant& a, const ConsentGrant& b) { return a.entry < b.entry; });
  return out;
}
Result<Hash> ConsentBook::enroll_key(const Pseudonym& patient, ByteView key,
                                     const std::string& actor) {
  return impl_->enroll_key(patient, key, actor);
}
std::optional<Hash> ConsentBook::patient_key_id(const Pseudonym& patient) const {
  std::shared_lock lk(impl_->state_mu_);
  auto it = impl_->patient_keys_.find(patient);
  if (it == impl_->patient_keys_.end()) return std::nullopt;
  return sha256(it->second);
}
Result<AccessDecision> ConsentBook::decide(const AccessRequest& request) {
  return impl_->decide(request);
}
Result<std::uint64_t> ConsentBook::record_decision(const AccessRequest& request,
                                                   const AccessDecision& decision,
                                                   std::uint64_t returned,
                                                   const std::string& actor) {
  return impl_->record_decision(request, decision, returned, actor);
}
Status ConsentBook::apply_replicated(std::uint64_t index, const ledger::Entry& entry) {
  return impl_->apply_replicated(index, entry);
}

const std::string& ConsentBook::ledger_id() const {
  return impl_->ledger_id_;
}
ConsentBook::Counters ConsentBook::counters() const {
  return {impl_->allowed_.load(), impl_->denied_.load(), impl_->break_glass_.load(),
          impl_->policy_errors_.load()};
}

}  // namespace medgate::appliance
