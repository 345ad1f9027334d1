#include "appliance/consent_ops.h"

#include <fmt/format.h>

#include "appliance/consent.h"
#include "appliance/log.h"
#include "appliance/pipeline.h"
#include "appliance/vault.h"
#include "ledger/consent_document.h"
#include "ledger/entry.h"
#include "ledger/store.h"

namespace medgate::appliance {
namespace {

using nlohmann::json;

// Every reading ingest stores is in this category for now (device readings: monitors, pumps,
// sensors); see the README.
constexpr const char* kIngestCategory = "vitals";
// A read returns at most this many observations, the newest.
constexpr std::size_t kMaxReturned = 1000;

std::optional<std::string> optional_text(const json& args, const char* name) {
  auto it = args.find(name);
  if (it == args.end() || !it->is_string() || it->get<std::string>().empty()) return std::nullopt;
  return it->get<std::string>();
}

Result<Bytes> base64_arg(const json& args, const char* name) {
  MEDGATE_ASSIGN_OR_RETURN(std::string text, text_arg(args, name));
  std::optional<Bytes> b = from_base64(text);
  if (!b) return Status::InvalidArgument(fmt::format("argument \"{}\" is not base64", name));
  return *b;
}

Result<std::optional<std::uint64_t>> until_arg(const json& args) {
  std::optional<std::string> until = optional_text(args, "until");
  if (!until) return std::optional<std::uint64_t>();
  std::optional<std::uint64_t> t = ledger::parse_time(*until);
  if (!t && until->size() == 10) t = ledger::parse_time(*until + "T00:00:00Z");
  if (!t)
    return Status::InvalidArgument(
        "--until must be an RFC 3339 time (2027-06-30T00:00:00Z) or a date (2027-06-30)");
  return t;
}

json diagnostics_json(const std::vector<rules::Diagnostic>& ds) {
  json out = json::array();
  for (const auto& d : ds)
    out.push_back({{"line", d.location.line},
                   {"column", d.location.column},
                   {"policy", d.policy_id.empty() ? json(nullptr) : json(d.policy_id)},
                   {"message", d.message}});
  return out;
}

json rules_json(const RulesVersionInfo& v, bool with_text) {
  json out = {{"version", v.version},
              {"sha256", to_hex(v.sha256)},
              {"entry", v.entry},
              {"deployed", ledger::format_time(v.time_us)},
              {"actor", v.actor},
              {"policies", v.policies},
              {"signed_consent_required", v.signed_categories}};
  if (with_text) out["text"] = v.text;
  return out;
}

json grant_json(const ConsentGrant& g) {
  json out = {{"id", g.id},
              {"patient", g.patient.hex()},
              {"to", g.to},
              {"data", g.data},
              {"purpose", g.purpose},
              {"until", g.until_us ? json(ledger::format_time(*g.until_us)) : json(nullptr)},
              {"state", grant_state(g, ledger::now_us())},
              {"patient_signed", g.patient_signed},
              {"entry", g.entry},
              {"granted", ledger::format_time(g.time_us)},
              {"actor", g.actor},
              {"policy", g.policy}};
  if (g.revoked_entry) {
    out["revoked_entry"] = *g.revoked_entry;
    out["revoked"] = ledger::format_time(g.revoked_us.value_or(0));
    out["revoked_by_patient"] = g.revoked_by_patient;
  }
  return out;
}

json observation_json(const Observation& o, std::uint64_t entry) {
  json value;
  if (const double* d = std::get_if<double>(&o.value))
    value = *d;
  else if (const std::string* s = std::get_if<std::string>(&o.value))
    value = *s;
  else if (const bool* b = std::get_if<bool>(&o.value))
    value = *b;
  else if (const Bytes* bytes = std::get_if<Bytes>(&o.value))
    value = {{"base64", to_base64(*bytes)}};
  return {{"entry", entry},
          {"time", o.time_us ? json(ledger::format_time(o.time_us)) : json(nullptr)},
          {"code", o.code},
          {"system", o.code_system},
          {"display", o.display},
          {"value", value},
          {"unit", o.unit},
          {"device", o.device_id},
          {"status", o.status}};
}

// The patient's readings in `category`, newest last, decrypted. Erased patients have none.
Result<json> read_observations(ledger::Ledger& ledger, Vault& vault, const Pseudonym& patient,
                               const std::string& category) {
  json out = json::array();
  if (category != kIngestCategory) return out;
  std::vector<std::uint64_t> indexes;
  for (std::uint64_t from = 0;;) {
    MEDGATE_ASSIGN_OR_RETURN(auto page,
                             ledger.subject_entries(ByteView(patient.bytes), from, 4096));
    if (page.empty()) break;
    indexes.insert(indexes.end(), page.begin(), page.end());
    from = page.back() + 1;
  }
  std::vector<std::pair<std::uint64_t, Observation>> found;
  for (auto it = indexes.rbegin(); it != indexes.rend() && found.size() < kMaxReturned; ++it) {
    MEDGATE_ASSIGN_OR_RETURN(ledger::StoredEntry e, ledger.entry(*it));
    if (e.entry.type != ledger::EntryType::kObservation) continue;
    const Bytes* ciphertext = e.entry.body.find("ciphertext")->as_bytes();
    Result<Bytes> plain = vault.decrypt(patient, *ciphertext, as_bytes(kObservationAad));
    if (!plain.ok()) {
      if (plain.status().code() == StatusCode::kFailedPrecondition) return out;  // erased
      return plain.status().with_context(fmt::format("decrypting entry {}", *it));
    }
    MEDGATE_ASSIGN_OR_RETURN(Observation o, decode_observation(*plain));
    found.emplace_back(*it, std::move(o));
  }
  for (auto it = found.rbegin(); it != found.rend(); ++it)
    out.push_back(observation_json(it->second, it->first));
  return out;
}

}  // namespace

std::vector<Operation> consent_operations(ConsentBook& book, Vault& vault, ledger::Ledger& ledger) {
  std::vector<Operation> ops;
  auto read = [&](std::string name, auto fn) {
    ops.push_back({std::move(name), Role::kAuditor, fn});
  };
  auto change = [&](std::string name, auto fn) {
    ops.push_back({std::move(name), Role::kAdmin, fn});
  };
  // The patient's pseudonym from an identifier argument; creates the vault record on first use
  // (a consent may come before the patient's first reading).
  auto patient_of = [&vault](const json& args) -> Result<Pseudonym> {
    MEDGATE_ASSIGN_OR_RETURN(std::string id, text_arg(args, "patient"));
    return vault.pseudonym(id);
  };

  // ---- rules ----
  change("rules.deploy", [&book](const Caller& c, const json& args) -> Result<json> {
    MEDGATE_ASSIGN_OR_RETURN(std::string text, text_arg(args, "text"));
    rules::RulesCheck check = rules::check_rules(text);
    MEDGATE_ASSIGN_OR_RETURN(RulesVersionInfo v, book.deploy_rules(std::move(text), c.actor()));
    log(LogLevel::kNotice, "rules.deploy",
        "rules version {} ({} policies, sha256 {}) deployed by {} as entry {}", v.version,
        v.policies, to_hex(v.sha256).substr(0, 16), c.actor(), v.entry);
    json out = rules_json(v, false);
    out["warnings"] = diagnostics_json(check.warnings);
    return out;
  });
  read("rules.list", [&book](const Caller&, const json&) -> Result<json> {
    json out = json::array();
    for (const RulesVersionInfo& v : book.rules_versions()) out.push_back(rules_json(v, false));
    return json{{"versions", out}};
  });
  read("rules.show", [&book](const Caller&, const json& args) -> Result<json> {
    std::optional<std::uint64_t> version;
    if (auto it = args.find("version"); it != args.end() && it->is_number_unsigned())
      version = it->get<std::uint64_t>();
    MEDGATE_ASSIGN_OR_RETURN(RulesVersionInfo v, book.rules_version(version));
    return rules_json(v, true);
  });

  // ---- the directory ----
  change("directory.import", [&book](const Caller& c, const json& args) -> Result<json> {
    MEDGATE_ASSIGN_OR_RETURN(std::string text, text_arg(args, "entities"));
    MEDGATE_ASSIGN_OR_RETURN(DirectoryInfo d, book.import_directory(std::move(text), c.actor()));
    log(LogLevel::kNotice, "directory.import",
        "directory version {} ({} entities) imported by {} as entry {}", d.version, d.entities,
        c.actor(), d.entry);
    return json{{"version", d.version},
                {"entities", d.entities},
                {"entry", d.entry},
                {"sha256", to_hex(d.sha256)}};
  });
  read("directory.show", [&book](const Caller&, const json&) -> Result<json> {
    std::optional<DirectoryInfo> d = book.directory();
    if (!d) return Status::NotFound("no directory has been imported");
    json entities = json::parse(d->text, nullptr, false);
    return json{{"version", d->version}, {"entities", d->entities},
                {"entry", d->entry},     {"imported", ledger::format_time(d->time_us)},
                {"actor", d->actor},     {"sha256", to_hex(d->sha256)},
                {"directory", entities}};
  });

  // ---- consent ----
  change("consent.grant", [&book, patient_of](const Caller& c, const json& args) -> Result<json> {
    Result<ConsentGrant> g = Status::Internal("unset");
    if (args.contains("document")) {
      MEDGATE_ASSIGN_OR_RETURN(Bytes doc, base64_arg(args, "document"));
      MEDGATE_ASSIGN_OR_RETURN(Bytes sig, base64_arg(args, "signature"));
      g = book.grant_signed(doc, sig, c.actor());
    } else {
      GrantRequest r;
      MEDGATE_ASSIGN_OR_RETURN(r.patient, patient_of(args));
      MEDGATE_ASSIGN_OR_RETURN(r.to, text_arg(args, "to"));
      MEDGATE_ASSIGN_OR_RETURN(r.data, text_arg(args, "data"));
      MEDGATE_ASSIGN_OR_RETURN(r.purpose, text_arg(args, "purpose"));
      MEDGATE_ASSIGN_OR_RETURN(r.until_us, until_arg(args));
      g = book.grant(r, c.actor());
    }
    if (!g.ok()) return g.status();
    log(LogLevel::kNotice, "consent.grant", "consent {} for patient {} granted{} by {} as entry {}",
        g->id, g->patient.prefix(), g->patient_signed ? " (patient-signed)" : "", c.actor(),
        g->entry);
    return grant_json(*g);
  });
  change("consent.revoke", [&book](const Caller& c, const json& args) -> Result<json> {
    Result<ConsentGrant> g = Status::Internal("unset");
    if (args.contains("document")) {
      MEDGATE_ASSIGN_OR_RETURN(Bytes doc, base64_arg(args, "document"));
      MEDGATE_ASSIGN_OR_RETURN(Bytes sig, base64_arg(args, "signature"));
      g = book.revoke_signed(doc, sig, c.actor());
    } else {
      MEDGATE_ASSIGN_OR_RETURN(std::string id, text_arg(args, "id"));
      g = book.revoke(id, c.actor());
    }
    if (!g.ok()) return g.status();
    log(LogLevel::kNotice, "consent.revoke",
        "consent {} for patient {} withdrawn by {} as entry {}", g->id, g->patient.prefix(),
        c.actor(), g->revoked_entry.value_or(0));
    return grant_json(*g);
  });
  read("consent.list", [&book, &vault](const Caller&, const json& args) -> Result<json> {
    std::optional<Pseudonym> patient;
    if (std::optional<std::string> id = optional_text(args, "patient")) {
      Result<Pseudonym> p = vault.find(*id);
      if (!p.ok()) {
        if (p.status().code() == StatusCode::kNotFound) return json{{"grants", json::array()}};
        return p.status();
      }
      patient = *p;
    }
    json out = json::array();
    for (const ConsentGrant& g : book.grants(patient)) out.push_back(grant_json(g));
    return json{{"grants", out}};
  });
  change("consent.draft", [&book, patient_of](const Caller&, const json& args) -> Result<json> {
    ledger::ConsentDocument d;
    d.ledger_id = book.ledger_id();
    MEDGATE_ASSIGN_OR_RETURN(Pseudonym p, patient_of(args));
    d.patient = p.bytes;
    if (std::optional<std::string> grant = optional_text(args, "grant")) {
      d.kind = ledger::ConsentDocument::Kind::kRevoke;
      d.grant = *grant;
    } else {
      MEDGATE_ASSIGN_OR_RETURN(d.to, text_arg(args, "to"));
      MEDGATE_ASSIGN_OR_RETURN(d.data, text_arg(args, "data"));
      MEDGATE_ASSIGN_OR_RETURN(d.purpose, text_arg(args, "purpose"));
      MEDGATE_ASSIGN_OR_RETURN(d.until_us, until_arg(args));
    }
    return json{{"document", ledger::format_consent_document(d)}};
  });
  change("patient.enroll", [&book, patient_of](const Caller& c, const json& args) -> Result<json> {
    MEDGATE_ASSIGN_OR_RETURN(Pseudonym p, patient_of(args));
    MEDGATE_ASSIGN_OR_RETURN(std::string key, text_arg(args, "public_key"));
    MEDGATE_ASSIGN_OR_RETURN(Hash id, book.enroll_key(p, as_bytes(key), c.actor()));
    log(LogLevel::kNotice, "patient.enroll", "patient {} enrolled key {} (by {})", p.prefix(),
        to_hex(id).substr(0, 16), c.actor());
    return json{{"pseudonym", p.hex()}, {"key_id", to_hex(id)}};
  });

  // ---- access ----
  change("data.read",
         [&book, &vault, &ledger, patient_of](const Caller& c, const json& args) -> Result<json> {
           AccessRequest r;
           MEDGATE_ASSIGN_OR_RETURN(r.principal, text_arg(args, "as"));
           MEDGATE_ASSIGN_OR_RETURN(r.patient, patient_of(args));
           MEDGATE_ASSIGN_OR_RETURN(r.purpose, text_arg(args, "purpose"));
           r.category = optional_text(args, "data").value_or(kIngestCategory);
           r.reason = optional_text(args, "reason");
           MEDGATE_ASSIGN_OR_RETURN(AccessDecision d, book.decide(r));
           json observations = json::array();
           const bool allowed = d.response.decision == rules::Decision::kAllow;
           if (allowed) {
             MEDGATE_ASSIGN_OR_RETURN(observations,
                                      read_observations(ledger, vault, r.patient, r.category));
           }
           // The decision is durable before anything is handed out.
           MEDGATE_ASSIGN_OR_RETURN(std::uint64_t entry,
                                    book.record_decision(r, d, observations.size(), c.actor()));
           log(allowed && d.break_glass ? LogLevel::kWarning : LogLevel::kInfo, "access.decision",
               "{}{} reading {} of patient {} for {}: {} (policies: {}; entry {})",
               d.break_glass ? "BREAK-GLASS: " : "", r.principal, r.category, r.patient.prefix(),
               r.purpose, rules::decision_name(d.response.decision),
               fmt::join(d.response.determining, ","), entry);
           json errors = json::array();
           for (const rules::PolicyError& e : d.response.errors)
             errors.push_back({{"policy", e.policy_id}, {"message", e.message}});
           return json{{"decision", rules::decision_name(d.response.decision)},
                       {"policies", d.response.determining},
                       {"errors", errors},
                       {"break_glass", d.break_glass},
                       {"entry", entry},
                       {"pseudonym", r.patient.hex()},
                       {"data", r.category},
                       {"observations", allowed ? observations : json(nullptr)}};
         });
  return ops;
}

}  // namespace medgate::appliance
