#include "appliance/audit_ops.h"

#include <fmt/format.h>

#include "appliance/json_cbor.h"
#include "appliance/log.h"
#include "appliance/pipeline.h"
#include "appliance/vault.h"
#include "hsm/key_store.h"
#include "ledger/audit_bundle.h"
#include "ledger/block.h"
#include "ledger/store.h"

namespace medgate::appliance {
namespace {

using ledger::cbor::Value;
using nlohmann::json;

std::optional<std::string> optional_text(const json& args, const char* name) {
  auto it = args.find(name);
  if (it == args.end() || !it->is_string() || it->get<std::string>().empty()) return std::nullopt;
  return it->get<std::string>();
}

Result<std::optional<std::uint64_t>> time_arg(const json& args, const char* name) {
  std::optional<std::string> text = optional_text(args, name);
  if (!text) return std::optional<std::uint64_t>();
  std::optional<std::uint64_t> t = ledger::parse_time(*text);
  if (!t)
    return Status::InvalidArgument(
        fmt::format("--{} must be an RFC 3339 time (2026-11-25T00:00:00Z)", name));
  return t;
}

// An observation's decrypted reading as canonical CBOR (no floats there: numbers as text).
Result<std::optional<Value>> observation_values(Vault& vault, const ledger::Entry& e) {
  if (e.type != ledger::EntryType::kObservation || e.subjects.empty())
    return std::optional<Value>();
  std::optional<Pseudonym> patient = Pseudonym::from_hex(to_hex(e.subjects[0].subject));
  if (!patient) return std::optional<Value>();
  const Bytes* ciphertext = e.body.find("ciphertext")->as_bytes();
  Result<Bytes> plain = vault.decrypt(*patient, *ciphertext, as_bytes(kObservationAad));
  if (!plain.ok()) {
    // Erased: the key is gone, which is the point. Say so rather than fail the export.
    if (plain.status().code() == StatusCode::kFailedPrecondition)
      return std::optional<Value>(Value::text("erased"));
    return plain.status();
  }
  MEDGATE_ASSIGN_OR_RETURN(Observation o, decode_observation(*plain));
  std::string value;
  if (const double* d = std::get_if<double>(&o.value))
    value = fmt::format("{}", *d);
  else if (const std::string* s = std::get_if<std::string>(&o.value))
    value = *s;
  else if (const bool* b = std::get_if<bool>(&o.value))
    value = *b ? "true" : "false";
  else if (const Bytes* bytes = std::get_if<Bytes>(&o.value))
    value = to_base64(*bytes);
  MEDGATE_ASSIGN_OR_RETURN(
      Value v,
      Value::map({{Value::text("code"), Value::text(o.code)},
                  {Value::text("system"), Value::text(o.code_system)},
                  {Value::text("value"), Value::text(value)},
                  {Value::text("unit"), Value::text(o.unit)},
                  {Value::text("time"),
                   Value::text(o.time_us ? ledger::format_time(o.time_us) : std::string())}}));
  return std::optional<Value>(std::move(v));
}

}  // namespace

std::vector<Operation> audit_operations(ledger::Ledger& ledger, hsm::KeyStore& keys, Vault& vault) {
  std::vector<Operation> ops;
  ops.push_back(
      {"audit.export", Role::kAuditor,
       [&ledger, &keys, &vault](const Caller& c, const json& args) -> Result<json> {
         ledger::AuditQuery q;
         MEDGATE_ASSIGN_OR_RETURN(q.from_us, time_arg(args, "from"));
         MEDGATE_ASSIGN_OR_RETURN(q.to_us, time_arg(args, "to"));
         q.principal = optional_text(args, "principal");
         q.kind = optional_text(args, "kind");
         if (auto it = args.find("include_values"); it != args.end() && it->is_boolean())
           q.include_values = it->get<bool>();
         std::string patient_note;
         if (std::optional<std::string> id = optional_text(args, "patient")) {
           // A pseudonym (64 hex digits) as `medctl patient show` prints it, or an identifier;
           // an erased patient keeps their pseudonym.
           std::optional<Pseudonym> p = Pseudonym::from_hex(*id);
           if (!p) {
             MEDGATE_ASSIGN_OR_RETURN(Pseudonym found, vault.pseudonym(*id));
             p = found;
           }
           q.patient = Bytes(p->bytes.begin(), p->bytes.end());
           patient_note = p->hex();
         }
         if (q.include_values) {
           if (c.role != Role::kAdmin)
             return Status::PermissionDenied(
                 "--include-values exports decrypted readings: only an admin may ask for them");
           // Recorded before anything is decrypted.
           json recorded = json::object();
           for (const char* k : {"from", "to", "principal", "kind"})
             if (auto v = optional_text(args, k)) recorded[k] = *v;
           if (!patient_note.empty()) recorded["patient"] = patient_note;
           recorded["include_values"] = true;
           MEDGATE_ASSIGN_OR_RETURN(Value cbor_args, json_to_cbor(recorded));
           ledger::Entry e;
           e.type = ledger::EntryType::kAdminAction;
           e.actor = c.actor();
           MEDGATE_ASSIGN_OR_RETURN(e.body,
                                    Value::map({{Value::text("op"), Value::text("audit.export")},
                                                {Value::text("args"), std::move(cbor_args)}}));
           MEDGATE_ASSIGN_OR_RETURN(std::uint64_t index, ledger.append(e));
           log(LogLevel::kNotice, "audit.export",
               "export with decrypted values by {} recorded as entry {}", c.actor(), index);
         }
         ledger::AuditExportOptions options;
         // "per-entry": format 1, an RFC 9162 audit path for each entry, for tools that check
         // entries one at a time; "shared" (the default): format 2, one multi-leaf proof.
         if (std::optional<std::string> proofs = optional_text(args, "proofs")) {
           if (*proofs == "per-entry")
             options.format_version = 1;
           else if (*proofs != "shared")
             return Status::InvalidArgument("argument \"proofs\" must be shared or per-entry");
         }
         options.values = [&vault](const ledger::Entry& e) { return observation_values(vault, e); };
         MEDGATE_ASSIGN_OR_RETURN(ledger::AuditBundle bundle,
                                  ledger::build_audit_bundle(ledger, q, c.actor(), options));
         MEDGATE_ASSIGN_OR_RETURN(Bytes bytes, ledger::encode_audit_bundle(bundle));
         MEDGATE_ASSIGN_OR_RETURN(ledger::HeadBody head, ledger::decode_head(bundle.head.bytes));
         MEDGATE_ASSIGN_OR_RETURN(Bytes signature,
                                  keys.sign_digest_with(head.key_id, sha256(bytes)));
         std::uint64_t selected = 0;
         for (const auto& e : bundle.entries) selected += e.selected ? 1 : 0;
         log(LogLevel::kInfo, "audit.export",
             "audit bundle for {}: {} entries ({} selected) at tree size {}, {} bytes", c.actor(),
             bundle.entries.size(), selected, head.tree_size, bytes.size());
         return json{{"bundle", to_base64(bytes)},       {"signature", to_base64(signature)},
                     {"entries", bundle.entries.size()}, {"selected", selected},
                     {"tree_size", head.tree_size},      {"key_id", to_hex(head.key_id)},
                     {"sha256", to_hex(sha256(bytes))}};
       }});
  return ops;
}

}  // namespace medgate::appliance
