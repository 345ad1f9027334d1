#include "ledger/audit_render.h"

#include <algorithm>
#include <limits>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "ledger/merkle.h"

namespace medgate::ledger {
namespace {

using cbor::Value;
using nlohmann::json;

// Code systems (FHIR R4 and THO names; BALP's own for the authorization subtype).
constexpr const char* kDicom = "http://dicom.nema.org/resources/ontology/DCM";
constexpr const char* kBalpAuthZ = "https://profiles.ihe.net/ITI/BALP/CodeSystem/AuthZsubType";
constexpr const char* kRestType = "http://terminology.hl7.org/CodeSystem/audit-event-type";
constexpr const char* kRestInteraction = "http://hl7.org/fhir/restful-interaction";
constexpr const char* kActReason = "http://terminology.hl7.org/CodeSystem/v3-ActReason";
constexpr const char* kParticipation = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType";
constexpr const char* kSecurityRole =
    "http://terminology.hl7.org/CodeSystem/extra-security-role-type";
constexpr const char* kSourceType = "http://terminology.hl7.org/CodeSystem/security-source-type";
constexpr const char* kEntityType = "http://terminology.hl7.org/CodeSystem/audit-entity-type";
constexpr const char* kObjectRole = "http://terminology.hl7.org/CodeSystem/object-role";
constexpr const char* kResourceTypes = "http://hl7.org/fhir/resource-types";
constexpr const char* kBalpProfiles = "https://profiles.ihe.net/ITI/BALP/StructureDefinition/";

// medgate's own identifier systems and the extension that names the signed bundle.
constexpr const char* kSourceExtension = "urn:medgate:fhir:audit-bundle-source";
constexpr const char* kBundleIdSystem = "urn:medgate:audit-bundle:sha256";

json coding(const char* system, std::string code, std::string display = {}) {
  json c = {{"system", system}, {"code", std::move(code)}};
  if (!display.empty()) c["display"] = std::move(display);
  return c;
}

json codeable(json coding_value) {
  return {{"coding", json::array({std::move(coding_value)})}};
}

json identifier(const char* system, std::string value) {
  return {{"system", system}, {"value", std::move(value)}};
}

const std::string* text_of(const Value& body, std::string_view key) {
  const Value* v = body.find(key);
  return v ? v->as_text() : nullptr;
}

std::string text_or_empty(const Value& body, std::string_view key) {
  const std::string* t = text_of(body, key);
  return t ? *t : std::string();
}

std::vector<std::string> texts_of(const Value& body, std::string_view key) {
  std::vector<std::string> out;
  const Value* v = body.find(key);
  if (!v || !v->as_array()) return out;
  for (const Value& item : *v->as_array())
    if (const std::string* t = item.as_text()) out.push_back(*t);
  return out;
}

std::string joined(const std::vector<std::string>& items, std::string_view sep) {
  std::string out;
  for (const std::string& s : items) {
    if (!out.empty()) out += sep;
    out += s;
  }
  return out;
}

bool is_break_glass(const Entry& e) {
  const Value* v = e.body.find("break_glass");
  return e.type == EntryType::kAccessDecision && v && v->as_bool().value_or(false);
}

// The purpose of use an entry states: an access decision's requested purpose, a consent grant's
// permitted one.
std::string purpose_of(const Entry& e) {
  if (e.type == EntryType::kAccessDecision || e.type == EntryType::kConsentGrant)
    return text_or_empty(e.body, "purpose");
  return {};
}

// The Cedar entity an entry is about as a principal: who asked (access) or who was granted
// (consent).
std::string principal_of(const Entry& e) {
  if (e.type == EntryType::kAccessDecision) return text_or_empty(e.body, "principal");
  if (e.type == EntryType::kConsentGrant) return text_or_empty(e.body, "to");
  return {};
}

// "Practitioner::\"dr-lee\"" -> "Practitioner"; namespaced types keep their namespace.
std::string entity_type_of(std::string_view entity) {
  std::size_t quote = entity.find("::\"");
  return quote == std::string_view::npos ? std::string() : std::string(entity.substr(0, quote));
}

// FHIR R4 unsignedInt stops at 2^31 - 1; past it, a decimal carries the exact value.
json count_extension(const char* url, std::uint64_t v) {
  if (v <= static_cast<std::uint64_t>(std::numeric_limits<std::int32_t>::max()))
    return {{"url", url}, {"valueUnsignedInt", v}};
  return {{"url", url}, {"valueDecimal", v}};
}

struct EventCode {
  json type;
  json subtypes = json::array();
  const char* action;  // C R U D E
  const char* profile = nullptr;
};

// How each entry type maps onto AuditEvent.type/subtype/action (docs/audit-bundle.md,
// "Renderings"). A switch over every type, so a new entry type does not build until it is mapped.
EventCode event_code(const Entry& e) {
  auto dicom = [](const char* code, const char* display) { return coding(kDicom, code, display); };
  auto rest = [](const char* interaction) {
    EventCode c{coding(kRestType, "rest", "Restful Operation"), json::array(), ""};
    c.subtypes.push_back(coding(kRestInteraction, interaction));
    return c;
  };
  switch (e.type) {
    case EntryType::kGenesis: {
      EventCode c{dicom("110100", "Application Activity"), json::array(), "E"};
      c.subtypes.push_back(dicom("110120", "Application Start"));
      return c;
    }
    case EntryType::kAdminAction:
      if (text_or_empty(e.body, "op") == "audit.export")
        return {dicom("110106", "Export"), json::array(), "R"};
      return {dicom("110100", "Application Activity"), json::array(), "E"};
    case EntryType::kKeyEvent:
    case EntryType::kKeyTransition: {
      EventCode c{dicom("110113", "Security Alert"), json::array(), "U"};
      c.subtypes.push_back(dicom("110129", "Security Configuration"));
      return c;
    }
    case EntryType::kPatientErasure: {
      EventCode c = rest("delete");
      c.action = "D";
      c.profile = "IHE.BasicAudit.PatientDelete";
      return c;
    }
    case EntryType::kObservation:
      return {dicom("110107", "Import"), json::array(), "C"};
    case EntryType::kDeviceEvent: {
      std::string event = text_or_empty(e.body, "event");
      EventCode c{dicom("110113", "Security Alert"), json::array(),
                  event == "add"      ? "C"
                  : event == "revoke" ? "D"
                                      : "U"};
      c.subtypes.push_back(dicom("110130", "Hardware Configuration"));
      return c;
    }
    case EntryType::kPatientEvent:
      return {dicom("110110", "Patient Record"), json::array(), "U"};
    case EntryType::kMemberProposal:  // who may write the replicated ledger changes
    case EntryType::kMemberApproval:
    case EntryType::kKeyShare:
    case EntryType::kRulesVersion: {
      EventCode c{dicom("110113", "Security Alert"), json::array(), "U"};
      c.subtypes.push_back(dicom("110129", "Security Configuration"));
      return c;
    }
    case EntryType::kDirectoryImport: {
      EventCode c{dicom("110113", "Security Alert"), json::array(), "U"};
      c.subtypes.push_back(dicom("110136", "Security Roles Changed"));
      return c;
    }
    case EntryType::kConsentGrant:
    case EntryType::kPatientKey: {
      EventCode c = rest("create");
      c.action = "C";
      c.profile = "IHE.BasicAudit.PatientCreate";
      return c;
    }
    case EntryType::kConsentRevoke: {
      EventCode c = rest("delete");
      c.action = "D";
      c.profile = "IHE.BasicAudit.PatientDelete";
      return c;
    }
    case EntryType::kAccessDecision: {
      // BALP's consent-based authorization decision: Security Alert / AuthZ-Consent, Execute.
      EventCode c{dicom("110113", "Security Alert"), json::array(), "E",
                  "IHE.BasicAudit.AuthZconsent"};
      c.subtypes.push_back(
          coding(kBalpAuthZ, "AuthZ-Consent", "Authorization Decision using Roles and Consent"));
      if (is_break_glass(e)) c.subtypes.push_back(dicom("110127", "Emergency Override Started"));
      return c;
    }
  }
  return {dicom("110100", "Application Activity"), json::array(), "E"};
}

// The agent for an entry's actor ("user:alice", "uid:1234", "system:medgated").
json actor_agent(const std::string& actor, bool requestor) {
  bool system = actor.rfind("system:", 0) == 0;
  json agent = {
      {"type", codeable(system ? coding(kDicom, "110150", "Application")
                               : coding(kSecurityRole, "humanuser", "human user"))},
      {"who", {{"identifier", identifier("urn:medgate:actor", actor)}, {"display", actor}}},
      {"requestor", requestor}};
  return agent;
}

json purpose_concept(const std::string& purpose) {
  return codeable(coding(kActReason, purpose));
}

json detail(const char* type, std::string value) {
  return {{"type", type}, {"valueString", std::move(value)}};
}

struct Rendered {
  const BundleEntry& record;
  Entry entry;
  Hash leaf;
};

json audit_event(const Rendered& r, const std::string& ledger_id) {
  const Entry& e = r.entry;
  const EntryTypeInfo* info = find_entry_type(static_cast<std::uint64_t>(e.type));
  EventCode code = event_code(e);
  json ev = {{"resourceType", "AuditEvent"}, {"id", fmt::format("ledger-{}", r.record.index)}};
  if (code.profile)
    ev["meta"] = {{"profile", json::array({std::string(kBalpProfiles) + code.profile})}};
  ev["type"] = std::move(code.type);
  if (!code.subtypes.empty()) ev["subtype"] = std::move(code.subtypes);
  ev["action"] = code.action;
  ev["recorded"] = format_time(e.time_us);
  ev["outcome"] = std::string(audit_event_outcome(e));

  std::string purpose = purpose_of(e);
  json agents = json::array();
  if (e.type == EntryType::kAccessDecision) {
    std::string decision = text_or_empty(e.body, "decision");
    std::vector<std::string> policies = texts_of(e.body, "policies");
    std::vector<std::string> errors = texts_of(e.body, "errors");
    std::string desc = decision;
    if (is_break_glass(e)) desc += " (break-glass)";
    if (!policies.empty()) desc += "; determining policies: " + joined(policies, ", ");
    if (!errors.empty()) desc += "; policies in error: " + joined(errors, ", ");
    ev["outcomeDesc"] = desc;
    if (!purpose.empty()) ev["purposeOfEvent"] = json::array({purpose_concept(purpose)});
    // BALP AuthZconsent: the user who asked (the requestor, with their purpose of use), the
    // client that carried the request (the entry's actor), and the authorizer (the appliance).
    std::string principal = principal_of(e);
    json user = {{"type", codeable(coding(kParticipation, "IRCP", "information recipient"))},
                 {"who",
                  {{"identifier", identifier("urn:medgate:cedar-entity", principal)},
                   {"display", principal}}},
                 {"requestor", true}};
    if (std::string role = entity_type_of(principal); !role.empty())
      user["role"] = json::array({{{"text", role}}});
    if (!purpose.empty()) user["purposeOfUse"] = json::array({purpose_concept(purpose)});
    agents.push_back(std::move(user));
    agents.push_back(actor_agent(e.actor, false));
    json authorizer = {
        {"type", codeable(coding(kSecurityRole, "authserver", "authorization server"))},
        {"who",
         {{"identifier", identifier("urn:medgate:ledger", ledger_id)},
          {"display", "medgate " + ledger_id}}},
        {"requestor", false}};
    if (!policies.empty()) {
      json uris = json::array();
      for (const std::string& p : policies) uris.push_back("urn:medgate:policy:" + p);
      authorizer["policy"] = std::move(uris);
    }
    agents.push_back(std::move(authorizer));
  } else {
    if (!purpose.empty()) ev["purposeOfEvent"] = json::array({purpose_concept(purpose)});
    agents.push_back(actor_agent(e.actor, true));
  }
  ev["agent"] = std::move(agents);
  ev["source"] = {{"site", ledger_id},
                  {"observer",
                   {{"identifier", identifier("urn:medgate:ledger", ledger_id)},
                    {"display", "medgate " + ledger_id}}},
                  {"type", json::array({coding(kSourceType, "4", "Application Server")})}};

  json entities = json::array();
  // The patients, by pseudonym: what the bundle holds (never an identifier).
  for (const SubjectLink& l : e.subjects)
    entities.push_back(
        {{"what", {{"identifier", identifier("urn:medgate:pseudonym", to_hex(l.subject))}}},
         {"type", coding(kEntityType, "1", "Person")},
         {"role", coding(kObjectRole, "1", "Patient")}});
  // What the event acted on, where the entry names it.
  if (e.type == EntryType::kAccessDecision) {
    json data = {
        {"what",
         {{"identifier", identifier("urn:medgate:data-category", text_or_empty(e.body, "data"))}}},
        {"type", coding(kEntityType, "2", "System Object")},
        {"name", text_or_empty(e.body, "data")}};
    json details = json::array({detail("decision", text_or_empty(e.body, "decision")),
                                detail("policies", joined(texts_of(e.body, "policies"), ","))});
    if (const Value* returned = e.body.find("returned"); returned && returned->as_uint())
      details.push_back(detail("returned", std::to_string(*returned->as_uint())));
    data["detail"] = std::move(details);
    entities.push_back(std::move(data));
  } else if (e.type == EntryType::kConsentGrant || e.type == EntryType::kConsentRevoke) {
    json consent = {
        {"what",
         {{"identifier", identifier("urn:medgate:consent-grant", text_or_empty(e.body, "grant"))}}},
        {"type", coding(kResourceTypes, "Consent", "Consent")},
        {"role", coding(kObjectRole, "4", "Domain Resource")}};
    if (e.type == EntryType::kConsentGrant)
      consent["detail"] =
          json::array({detail("to", text_or_empty(e.body, "to")),
                       detail("data", text_or_empty(e.body, "data")), detail("purpose", purpose)});
    entities.push_back(std::move(consent));
  } else if (e.type == EntryType::kDeviceEvent || e.type == EntryType::kObservation ||
             e.type == EntryType::kPatientEvent) {
    json device = {
        {"what",
         {{"identifier", identifier("urn:medgate:device", text_or_empty(e.body, "device"))}}},
        {"type", coding(kResourceTypes, "Device", "Device")}};
    if (e.type == EntryType::kDeviceEvent)
      device["detail"] = json::array({detail("event", text_or_empty(e.body, "event"))});
    entities.push_back(std::move(device));
  } else if (e.type == EntryType::kAdminAction) {
    entities.push_back(
        {{"type", coding(kEntityType, "2", "System Object")},
         {"name", text_or_empty(e.body, "op")},
         {"detail", json::array({detail("operation", text_or_empty(e.body, "op"))})}});
  }
  // The ledger entry itself: its index and leaf hash tie this event to the signed bundle.
  json ledger_entry = {
      {"what",
       {{"identifier", identifier("urn:medgate:ledger-entry", std::to_string(r.record.index))}}},
      {"type", coding(kEntityType, "2", "System Object")},
      {"name", std::string(info ? info->name : "unknown")},
      {"detail", json::array({detail("ledger-index", std::to_string(r.record.index)),
                              detail("leaf-hash", to_hex(r.leaf)),
                              detail("audit-kind", std::string(info ? info->audit_kind : ""))})}};
  if (r.record.values)
    ledger_entry["detail"].push_back(detail("values", cbor::to_json(*r.record.values).dump()));
  entities.push_back(std::move(ledger_entry));
  ev["entity"] = std::move(entities);
  return ev;
}

Status require_verified(const AuditReport& report) {
  if (report.ok()) return Status::Ok();
  return Status::FailedPrecondition(fmt::format(
      "the bundle does not verify ({} problem(s), the first: {}): nothing is rendered from it",
      report.problems.size(), report.problems.front()));
}

// The selected entries decoded, in index order. The bundle verified, so they decode; one that
// does not is reported rather than skipped.
Result<std::vector<Rendered>> selected_entries(const AuditBundle& bundle) {
  std::vector<Rendered> out;
  for (const BundleEntry& record : bundle.entries) {
    if (!record.selected) continue;
    Result<Entry> e = decode_entry(record.bytes);
    if (!e.ok())
      return e.status().with_context(fmt::format("entry {} of the bundle", record.index));
    out.push_back({record, std::move(e).value(), merkle::leaf_hash(record.bytes)});
  }
  return out;
}

constexpr std::uint64_t kProgressEvery = 4096;

}  // namespace

std::string_view audit_event_outcome(const Entry& e) {
  if (e.type != EntryType::kAccessDecision) return "0";
  if (text_or_empty(e.body, "decision") != "deny") return "0";
  return texts_of(e.body, "errors").empty() ? "4" : "8";
}

std::string csv_field(std::string_view text) {
  if (text.find_first_of(",\"\r\n") == std::string_view::npos) return std::string(text);
  std::string out = "\"";
  for (char c : text) {
    if (c == '"') out += '"';
    out += c;
  }
  out += '"';
  return out;
}

std::optional<PublicKey> bundle_genesis_key(const AuditBundle& bundle) {
  for (const BundleEntry& record : bundle.entries) {
    if (record.index != 0) continue;
    Result<Entry> e = decode_entry(record.bytes);
    if (!e.ok() || e->type != EntryType::kGenesis) return std::nullopt;
    const Value* der = e->body.find("public_key");
    if (!der || !der->as_bytes()) return std::nullopt;
    Result<PublicKey> key = PublicKey::from_spki_der(*der->as_bytes());
    if (!key.ok()) return std::nullopt;
    return *key;
  }
  return std::nullopt;
}

Result<nlohmann::json> render_fhir(const AuditBundle& bundle, const AuditReport& report,
                                   const BundleSource& source, const RenderProgress& progress) {
  MEDGATE_RETURN_IF_ERROR(require_verified(report));
  MEDGATE_ASSIGN_OR_RETURN(std::vector<Rendered> selected, selected_entries(bundle));
  json query = to_json(report)["query"];
  json reference = {
      {"url", kSourceExtension},
      {"extension",
       json::array({{{"url", "file"}, {"valueString", source.file_name}},
                    {{"url", "sha256"}, {"valueString", to_hex(source.sha256)}},
                    {{"url", "ledgerId"}, {"valueString", report.ledger_id}},
                    count_extension("treeSize", report.tree_size),
                    {{"url", "root"}, {"valueString", to_hex(report.root)}},
                    {{"url", "headTime"}, {"valueInstant", format_time(report.head_time_us)}},
                    {{"url", "signingKey"}, {"valueString", report.signing_key}},
                    {{"url", "exportedBy"}, {"valueString", report.exported_by}},
                    {{"url", "query"}, {"valueString", query.dump()}}})}};
  json out = {{"resourceType", "Bundle"},
              {"meta", {{"extension", json::array({std::move(reference)})}}},
              {"identifier", identifier(kBundleIdSystem, to_hex(source.sha256))},
              {"type", "collection"},
              {"timestamp", format_time(report.created_us)}};
  json entries = json::array();
  std::uint64_t done = 0;
  for (const Rendered& r : selected) {
    // The fullUrl is a name derived from the leaf hash: stable across renderings of the bundle.
    std::string h = to_hex(r.leaf);
    entries.push_back(
        {{"fullUrl", fmt::format("urn:uuid:{}-{}-{}-{}-{}", h.substr(0, 8), h.substr(8, 4),
                                 h.substr(12, 4), h.substr(16, 4), h.substr(20, 12))},
         {"resource", audit_event(r, report.ledger_id)}});
    if (progress && ++done % kProgressEvery == 0) progress(done, selected.size());
  }
  if (progress) progress(selected.size(), selected.size());
  out["entry"] = std::move(entries);
  return out;
}

Result<std::string> render_csv(const AuditBundle& bundle, const AuditReport& report,
                               const BundleSource& source, const RenderProgress& progress) {
  MEDGATE_RETURN_IF_ERROR(require_verified(report));
  MEDGATE_ASSIGN_OR_RETURN(std::vector<Rendered> selected, selected_entries(bundle));
  std::string out;
  auto row = [&out](const std::vector<std::string>& cells) {
    for (std::size_t i = 0; i < cells.size(); ++i) {
      if (i > 0) out += ',';
      out += csv_field(cells[i]);
    }
    out += "\r\n";
  };
  row(std::vector<std::string>(std::begin(kCsvColumns), std::end(kCsvColumns)));
  const std::string file = source.file_name, sha = to_hex(source.sha256),
                    size = std::to_string(report.tree_size), root = to_hex(report.root);
  std::uint64_t done = 0;
  for (const Rendered& r : selected) {
    const Entry& e = r.entry;
    const EntryTypeInfo* info = find_entry_type(static_cast<std::uint64_t>(e.type));
    std::vector<std::string> subjects;
    for (const SubjectLink& l : e.subjects) subjects.push_back(to_hex(l.subject));
    bool access = e.type == EntryType::kAccessDecision;
    row({file, sha, size, root, std::to_string(r.record.index), format_time(e.time_us),
         std::string(info ? info->audit_kind : ""), std::string(info ? info->name : ""), e.actor,
         joined(subjects, ";"), principal_of(e), purpose_of(e),
         access ? (is_break_glass(e) ? "true" : "false") : "",
         access ? text_or_empty(e.body, "decision") : "", std::string(audit_event_outcome(e)),
         joined(texts_of(e.body, "policies"), ";"), to_hex(r.leaf),
         r.record.values ? cbor::to_json(*r.record.values).dump() : ""});
    if (progress && ++done % kProgressEvery == 0) progress(done, selected.size());
  }
  if (progress) progress(selected.size(), selected.size());
  return out;
}

}  // namespace medgate::ledger
