// medctl rules | directory | consent | data, and patient enroll: the consent smart-rules. `rules
// check` and `rules test` work offline (no daemon, no HSM); the others go through the daemon,
// which records every change and every access decision on the ledger.
#include <fstream>
#include <iostream>
#include <sstream>

#include <fmt/format.h>
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "hsm/bytes.h"
#include "ledger/rules/authorizer.h"
#include "ledger/rules/deployment.h"
#include "ledger/rules/parser.h"
#include "ledger/rules/validator.h"

namespace medgate::cli {
namespace {

using nlohmann::json;

Result<std::string> read_text_file(const std::string& path, std::string_view what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return Status::InvalidArgument(fmt::format("cannot read {} {}", what, path));
  std::ostringstream s;
  s << in.rdbuf();
  if (in.bad()) return Status::InvalidArgument(fmt::format("cannot read {} {}", what, path));
  return s.str();
}

void print_diagnostics(const std::string& file, const std::vector<rules::Diagnostic>& ds,
                       std::string_view kind) {
  for (const auto& d : ds)
    std::cerr << fmt::format("{}:{}:{}: {}: {}{}\n", file, d.location.line, d.location.column, kind,
                             d.message, d.policy_id.empty() ? "" : " (policy " + d.policy_id + ")");
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

int cmd_rules_check(const GlobalOptions& g, const std::string& file) {
  Result<std::string> text = read_text_file(file, "rules file");
  if (!text.ok()) return fail(g, text.status());
  // The same checks as the daemon's deploy.
  rules::RulesCheck check = rules::check_rules(*text);
  const std::vector<rules::Diagnostic>& errors = check.errors;
  const std::vector<rules::Diagnostic>& warnings = check.warnings;
  if (g.json) {
    std::cout << json{{"ok", errors.empty()},
                      {"policies", check.policy_ids},
                      {"errors", diagnostics_json(errors)},
                      {"warnings", diagnostics_json(warnings)}}
                     .dump(2)
              << "\n";
  }
  print_diagnostics(file, errors, "error");
  print_diagnostics(file, warnings, "warning");
  if (!errors.empty()) {
    if (!g.json) std::cerr << fmt::format("{}: {} error(s); not deployable\n", file, errors.size());
    return 1;
  }
  if (!g.json)
    std::cout << fmt::format(
        "{}: {} policies, no errors{}\n", file, check.policies,
        warnings.empty() ? "" : fmt::format(", {} warning(s)", warnings.size()));
  return 0;
}

struct TestArgs {
  std::string policies, principal, action, resource;
  std::optional<std::string> entities, context;
};

int cmd_rules_test(const GlobalOptions& g, const TestArgs& a) {
  Result<std::string> text = read_text_file(a.policies, "policies file");
  if (!text.ok()) return fail(g, text.status());
  rules::ParseResult parsed = rules::parse_policies(*text);
  if (!parsed.ok()) {
    print_diagnostics(a.policies, parsed.errors, "error");
    return fail(g, Status::InvalidArgument(fmt::format("{} does not parse", a.policies)));
  }
  rules::Entities entities;
  if (a.entities) {
    Result<std::string> etext = read_text_file(*a.entities, "entities file");
    if (!etext.ok()) return fail(g, etext.status());
    Result<rules::Entities> e = rules::entities_from_json_text(*etext);
    if (!e.ok()) return fail(g, e.status().with_context(*a.entities));
    entities = std::move(e).value();
  }
  rules::Request request;
  struct Uid {
    const std::string& text;
    rules::EntityUid* out;
    const char* flag;
  };
  for (const Uid& u : {Uid{a.principal, &request.principal, "--principal"},
                       Uid{a.action, &request.action, "--action"},
                       Uid{a.resource, &request.resource, "--resource"}}) {
    Result<rules::EntityUid> uid = rules::parse_entity_uid(u.text);
    if (!uid.ok()) return fail(g, uid.status().with_context(u.flag));
    *u.out = *uid;
  }
  if (a.context) {
    json c = json::parse(*a.context, nullptr, false);
    if (c.is_discarded() || !c.is_object())
      return fail(g, Status::InvalidArgument("--context must be a JSON object"));
    Result<rules::Value> v = rules::value_from_json(c);
    if (!v.ok()) return fail(g, v.status().with_context("--context"));
    request.context = *v;
  }
  rules::Authorizer authorizer(std::move(parsed.policies));
  rules::Response r = authorizer.is_authorized(request, entities);
  if (g.json) {
    json errors = json::array();
    for (const auto& e : r.errors)
      errors.push_back({{"policy", e.policy_id}, {"message", e.message}});
    std::cout << json{{"decision", rules::decision_name(r.decision)},
                      {"policies", r.determining},
                      {"errors", errors}}
                     .dump(2)
              << "\n";
  } else {
    std::cout << fmt::format("decision: {}\n", rules::decision_name(r.decision));
    std::cout << fmt::format("determining policies: {}\n",
                             r.determining.empty()
                                 ? "none (default deny)"
                                 : fmt::format("{}", fmt::join(r.determining, ", ")));
    for (const auto& e : r.errors)
      std::cout << fmt::format("error in {}: {}\n", e.policy_id, e.message);
  }
  return r.decision == rules::Decision::kAllow ? 0 : 1;
}

int cmd_rules_deploy(const GlobalOptions& g, const std::string& file) {
  Result<std::string> text = read_text_file(file, "rules file");
  if (!text.ok()) return fail(g, text.status());
  Result<json> r = call(g, "rules.deploy", {{"text", *text}});
  if (!r.ok()) return fail(g, r.status());
  if (g.json) {
    std::cout << r->dump(2) << "\n";
    return 0;
  }
  for (const auto& w : (*r)["warnings"])
    std::cerr << fmt::format("{}:{}:{}: warning: {}\n", file, w.value("line", 0),
                             w.value("column", 0), w.value("message", ""));
  std::cout << fmt::format("rules version {} deployed: {} policies, sha256 {}, ledger entry {}\n",
                           (*r)["version"].get<std::uint64_t>(),
                           (*r)["policies"].get<std::uint64_t>(), (*r)["sha256"].get<std::string>(),
                           (*r)["entry"].get<std::uint64_t>());
  return 0;
}

int cmd_rules_list(const GlobalOptions& g) {
  Result<json> r = call(g, "rules.list");
  if (!r.ok()) return fail(g, r.status());
  if (g.json) {
    std::cout << r->dump(2) << "\n";
    return 0;
  }
  if ((*r)["versions"].empty()) std::cout << "no rules deployed (every access is denied)\n";
  for (const auto& v : (*r)["versions"])
    std::cout << fmt::format("version {:<4} {}  {:>4} policies  sha256 {}…  by {}  entry {}\n",
                             v["version"].get<std::uint64_t>(), v["deployed"].get<std::string>(),
                             v["policies"].get<std::uint64_t>(),
                             v["sha256"].get<std::string>().substr(0, 16),
                             v["actor"].get<std::string>(), v["entry"].get<std::uint64_t>());
  return 0;
}

int cmd_rules_show(const GlobalOptions& g, std::optional<std::uint64_t> version) {
  json args = json::object();
  if (version) args["version"] = *version;
  Result<json> r = call(g, "rules.show", args);
  if (!r.ok()) return fail(g, r.status());
  if (g.json) {
    std::cout << r->dump(2) << "\n";
    return 0;
  }
  std::cout << fmt::format("// rules version {}, deployed {} by {}, ledger entry {}, sha256 {}\n",
                           (*r)["version"].get<std::uint64_t>(),
                           (*r)["deployed"].get<std::string>(), (*r)["actor"].get<std::string>(),
                           (*r)["entry"].get<std::uint64_t>(), (*r)["sha256"].get<std::string>());
  std::cout << (*r)["text"].get<std::string>();
  return 0;
}

int cmd_directory_import(const GlobalOptions& g, const std::string& file) {
  Result<std::string> text = read_text_file(file, "entities file");
  if (!text.ok()) return fail(g, text.status());
  // Checked here first so that a typo is named before anything is sent.
  Result<rules::Entities> parsed = rules::entities_from_json_text(*text);
  if (!parsed.ok()) return fail(g, parsed.status().with_context(file));
  Result<json> r = call(g, "directory.import", {{"entities", *text}});
  if (!r.ok()) return fail(g, r.status());
  if (g.json) {
    std::cout << r->dump(2) << "\n";
    return 0;
  }
  std::cout << fmt::format("directory version {} imported: {} entities, ledger entry {}\n",
                           (*r)["version"].get<std::uint64_t>(),
                           (*r)["entities"].get<std::uint64_t>(),
                           (*r)["entry"].get<std::uint64_t>());
  return 0;
}

int cmd_directory_show(const GlobalOptions& g) {
  Result<json> r = call(g, "directory.show");
  if (!r.ok()) return fail(g, r.status());
  if (g.json) {
    std::cout << r->dump(2) << "\n";
    return 0;
  }
  std::cout << fmt::format("directory version {} ({} entities), imported {} by {}, entry {}\n",
                           (*r)["version"].get<std::uint64_t>(),
                           (*r)["entities"].get<std::uint64_t>(),
                           (*r)["imported"].get<std::string>(), (*r)["actor"].get<std::string>(),
                           (*r)["entry"].get<std::uint64_t>());
  for (const auto& e : (*r)["directory"]) {
    std::string parents;
    for (const auto& p : e.value("parents", json::array()))
      parents += fmt::format("{}{}::\"{}\"", parents.empty() ? "" : ", ", p.value("type", ""),
                             p.value("id", ""));
    std::cout << fmt::format("  {}::\"{}\"{}\n", e["uid"].value("type", ""),
                             e["uid"].value("id", ""), parents.empty() ? "" : "  in " + parents);
  }
  return 0;
}

void print_grant(const json& gr) {
  std::cout << fmt::format("{}  {:<8} patient {}…  to {}  data {}  purpose {}  until {}{}\n",
                           gr["id"].get<std::string>(), gr["state"].get<std::string>(),
                           gr["patient"].get<std::string>().substr(0, 16),
                           gr["to"].get<std::string>(), gr["data"].get<std::string>(),
                           gr["purpose"].get<std::string>(),
                           gr["until"].is_null() ? "-" : gr["until"].get<std::string>(),
                           gr["patient_signed"].get<bool>() ? "  (patient-signed)" : "");
}

struct GrantArgs {
  std::optional<std::string> patient, to, data, purpose, until, signed_file, signature;
};

Result<json> signed_args(const std::string& file, const std::optional<std::string>& signature) {
  MEDGATE_ASSIGN_OR_RETURN(std::string doc, read_text_file(file, "signed document"));
  std::string sig_path = signature.value_or(file + ".sig");
  MEDGATE_ASSIGN_OR_RETURN(std::string sig, read_text_file(sig_path, "signature file"));
  return json{{"document", to_base64(as_bytes(doc))}, {"signature", to_base64(as_bytes(sig))}};
}

int cmd_consent_grant(const GlobalOptions& g, const GrantArgs& a) {
  json args;
  if (a.signed_file) {
    if (a.patient || a.to || a.data || a.purpose || a.until)
      return fail(g, Status::InvalidArgument(
                         "--signed takes everything from the patient's document: give no "
                         "--patient, --to, --data, --purpose or --until with it"));
    Result<json> s = signed_args(*a.signed_file, a.signature);
    if (!s.ok()) return fail(g, s.status());
    args = *s;
  } else {
    if (!a.patient || !a.to || !a.data || !a.purpose)
      return fail(g, Status::InvalidArgument(
                         "give --patient, --to, --data and --purpose (or --signed FILE)"));
    args = {{"patient", read_patient(*a.patient)},
            {"to", *a.to},
            {"data", *a.data},
            {"purpose", *a.purpose}};
    if (a.until) args["until"] = *a.until;
  }
  Result<json> r = call(g, "consent.grant", args);
  if (!r.ok()) return fail(g, r.status());
  if (g.json) {
    std::cout << r->dump(2) << "\n";
    return 0;
  }
  std::cout << (*r)["id"].get<std::string>() << "\n";
  std::cerr << fmt::format("consent {} granted{}; ledger entry {}\n", (*r)["id"].get<std::string>(),
                           (*r)["patient_signed"].get<bool>() ? " (signed by the patient)" : "",
                           (*r)["entry"].get<std::uint64_t>());
  return 0;
}

int cmd_consent_revoke(const GlobalOptions& g, const std::optional<std::string>& id,
                       const std::optional<std::string>& signed_file,
                       const std::optional<std::string>& signature) {
  json args;
  if (signed_file) {
    Result<json> s = signed_args(*signed_file, signature);
    if (!s.ok()) return fail(g, s.status());
    args = *s;
  } else if (id) {
    args = {{"id", *id}};
  } else {
    return fail(g, Status::InvalidArgument("give the grant ID, or --signed FILE"));
  }
  Result<json> r = call(g, "consent.revoke", args);
  if (!r.ok()) return fail(g, r.status());
  if (g.json) {
    std::cout << r->dump(2) << "\n";
    return 0;
  }
  std::cout << fmt::format("consent {} withdrawn; ledger entry {}\n", (*r)["id"].get<std::string>(),
                           (*r)["revoked_entry"].get<std::uint64_t>());
  return 0;
}

int cmd_consent_list(const GlobalOptions& g, const std::optional<std::string>& patient) {
  json args = json::object();
  if (patient) args["patient"] = read_patient(*patient);
  Result<json> r = call(g, "consent.list", args);
  if (!r.ok()) return fail(g, r.status());
  if (g.json) {
    std::cout << r->dump(2) << "\n";
    return 0;
  }
  if ((*r)["grants"].empty()) std::cout << "no consent grants\n";
  for (const auto& gr : (*r)["grants"]) print_grant(gr);
  return 0;
}

int cmd_consent_draft(const GlobalOptions& g, const GrantArgs& a,
                      const std::optional<std::string>& grant) {
  if (!a.patient) return fail(g, Status::InvalidArgument("--patient is required"));
  json args = {{"patient", read_patient(*a.patient)}};
  if (grant) {
    args["grant"] = *grant;
  } else {
    if (!a.to || !a.data || !a.purpose)
      return fail(g, Status::InvalidArgument(
                         "give --to, --data and --purpose (a grant) or --grant ID (a withdrawal)"));
    args.update({{"to", *a.to}, {"data", *a.data}, {"purpose", *a.purpose}});
    if (a.until) args["until"] = *a.until;
  }
  Result<json> r = call(g, "consent.draft", args);
  if (!r.ok()) return fail(g, r.status());
  if (g.json)
    std::cout << r->dump(2) << "\n";
  else
    std::cout << (*r)["document"].get<std::string>();
  return 0;
}

int cmd_patient_enroll(const GlobalOptions& g, const std::string& patient, const std::string& pem) {
  Result<std::string> key = read_text_file(pem, "public key");
  if (!key.ok()) return fail(g, key.status());
  Result<json> r =
      call(g, "patient.enroll", {{"patient", read_patient(patient)}, {"public_key", *key}});
  if (!r.ok()) return fail(g, r.status());
  if (g.json) {
    std::cout << r->dump(2) << "\n";
    return 0;
  }
  std::cout << fmt::format("patient {}… enrolled key {}\n",
                           (*r)["pseudonym"].get<std::string>().substr(0, 16),
                           (*r)["key_id"].get<std::string>());
  return 0;
}

struct ReadArgs {
  std::string as, patient, purpose;
  std::optional<std::string> data, reason;
};

int cmd_data_read(const GlobalOptions& g, const ReadArgs& a) {
  json args = {{"as", a.as}, {"patient", read_patient(a.patient)}, {"purpose", a.purpose}};
  if (a.data) args["data"] = *a.data;
  if (a.reason) args["reason"] = *a.reason;
  Result<json> r = call(g, "data.read", args);
  if (!r.ok()) return fail(g, r.status());
  const bool allowed = (*r)["decision"] == "allow";
  if (g.json) {
    std::cout << r->dump(2) << "\n";
    return allowed ? 0 : 1;
  }
  std::cerr << fmt::format(
      "{}{}: {} (policies: {}); recorded as ledger entry {}\n",
      (*r)["break_glass"].get<bool>() ? "BREAK-GLASS " : "", a.as, allowed ? "allowed" : "denied",
      (*r)["policies"].empty()
          ? std::string("none, default deny")
          : fmt::format("{}", fmt::join((*r)["policies"].get<std::vector<std::string>>(), ", ")),
      (*r)["entry"].get<std::uint64_t>());
  for (const auto& e : (*r)["errors"])
    std::cerr << fmt::format("  policy {} erred: {}\n", e.value("policy", ""),
                             e.value("message", ""));
  if (!allowed) return 1;
  for (const auto& o : (*r)["observations"])
    std::cout << fmt::format(
        "{}  {} {}  {} {}  device {}\n", o["time"].is_null() ? "-" : o["time"].get<std::string>(),
        o["system"].get<std::string>(), o["code"].get<std::string>(), o["value"].dump(),
        o["unit"].get<std::string>(), o["device"].get<std::string>());
  return 0;
}

}  // namespace

void add_consent_commands(CLI::App& app, const GlobalOptions& g, int& rc) {
  // Arguments live as long as the App: static storage keeps them simple to bind.
  static std::string file;
  static std::optional<std::uint64_t> version;
  static TestArgs test;
  static GrantArgs grant;
  static std::optional<std::string> id, grant_id, list_patient;
  static ReadArgs read;
  static std::string enroll_patient, enroll_pem;

  auto* rules = app.add_subcommand("rules", "consent smart-rules (a Cedar subset)");
  rules->require_subcommand(1);
  auto* check = rules->add_subcommand("check", "parse and validate a rules file (offline)");
  check->add_option("FILE", file, "Cedar policies")->required();
  check->callback([&rc, &g] { rc = cmd_rules_check(g, file); });
  auto* deploy = rules->add_subcommand("deploy", "record the rules as a new version on the ledger");
  deploy->add_option("FILE", file, "Cedar policies")->required();
  deploy->callback([&rc, &g] { rc = cmd_rules_deploy(g, file); });
  rules->add_subcommand("list", "deployed rules versions")->callback([&rc, &g] {
    rc = cmd_rules_list(g);
  });
  auto* show = rules->add_subcommand("show", "a deployed version's text (default: the latest)");
  show->add_option("VERSION", version);
  show->callback([&rc, &g] { rc = cmd_rules_show(g, version); });
  auto* t = rules->add_subcommand(
      "test", "offline what-if: the decision, determining policies and errors for one request");
  t->add_option("--policies", test.policies, "Cedar policies file")->required();
  t->add_option("--entities", test.entities, "Cedar JSON entities file");
  t->add_option("--principal", test.principal, "e.g. Practitioner::\"dr-lee\"")->required();
  t->add_option("--action", test.action, "e.g. Action::\"read\"")->required();
  t->add_option("--resource", test.resource, "e.g. PatientData::\"p/vitals\"")->required();
  t->add_option("--context", test.context, "JSON object, e.g. {\"purpose\": \"TREAT\"}");
  t->callback([&rc, &g] { rc = cmd_rules_test(g, test); });

  auto* dir = app.add_subcommand("directory", "principals, roles, organizations, wards");
  dir->require_subcommand(1);
  auto* import = dir->add_subcommand("import", "replace the directory (Cedar JSON entities)");
  import->add_option("FILE", file)->required();
  import->callback([&rc, &g] { rc = cmd_directory_import(g, file);
});
dir->add_subcommand("show", "the current directory")->callback([&rc, &g] {
  rc = cmd_directory_show(g);
});

auto* consent = app.add_subcommand("consent", "patients' consent grants");
consent->require_subcommand(1);
auto* gr = consent->add_subcommand("grant", "record a consent; prints its id");
gr->add_option("--patient", grant.patient, "the patient's identifier, or - for stdin");
gr->add_option("--to", grant.to, "who may read: a Cedar entity, e.g. Practitioner::\"dr-lee\"");
gr->add_option("--data", grant.data, "data category, e.g. vitals");
gr->add_option("--purpose", grant.purpose, "purpose of use: TREAT, HRESCH, HOPERAT, ...");
gr->add_option("--until", grant.until, "end (RFC 3339 or YYYY-MM-DD)");
gr->add_option("--signed", grant.signed_file, "a consent document the patient signed");
gr->add_option("--signature", grant.signature, "its signature (default: FILE.sig)");
gr->callback([&rc, &g] { rc = cmd_consent_grant(g, grant); });
auto* rv =
    consent->add_subcommand("revoke", "withdraw a consent (effective for the next decision)");
rv->add_option("ID", id, "the grant id");
rv->add_option("--signed", grant.signed_file, "a withdrawal the patient signed");
rv->add_option("--signature", grant.signature, "its signature (default: FILE.sig)");
rv->callback([&rc, &g] { rc = cmd_consent_revoke(g, id, grant.signed_file, grant.signature); });
auto* ls = consent->add_subcommand("list", "grants, with their state");
ls->add_option("--patient", list_patient, "only this patient's (identifier, or - for stdin)");
ls->callback([&rc, &g] { rc = cmd_consent_list(g, list_patient); });
auto* draft = consent->add_subcommand(
    "draft", "print the document a patient signs (a grant, or with --grant a withdrawal)");
draft->add_option("--patient", grant.patient, "the patient's identifier, or - for stdin");
draft->add_option("--to", grant.to);
draft->add_option("--data", grant.data);
draft->add_option("--purpose", grant.purpose);
draft->add_option("--until", grant.until);
draft->add_option("--grant", grant_id, "the grant to withdraw");
draft->callback([&rc, &g] { rc = cmd_consent_draft(g, grant, grant_id); });

CLI::App* patient = app.get_subcommand("patient");
auto* enroll =
    patient->add_subcommand("enroll", "record the patient's public key for signed consent");
enroll->add_option("P", enroll_patient, "the patient's identifier, or - for stdin")->required();
enroll->add_option("--pubkey", enroll_pem, "PEM public key (EC P-256+ or RSA 2048+)")->required();
enroll->callback([&rc, &g] { rc = cmd_patient_enroll(g, enroll_patient, enroll_pem); });

auto* data = app.add_subcommand("data", "patients' data, as the rules allow");
data->require_subcommand(1);
auto* rd = data->add_subcommand(
    "read", "ask the rules; the decision is recorded; data is returned only on allow");
rd->add_option("--as", read.as, "the requester, e.g. Practitioner::\"dr-lee\"")->required();
rd->add_option("--patient", read.patient, "the patient's identifier, or - for stdin")->required();
rd->add_option("--purpose", read.purpose, "purpose of use: TREAT, ETREAT (break-glass), ...")
    ->required();
rd->add_option("--data", read.data, "data category (default: vitals)");
rd->add_option("--reason", read.reason, "why (required for ETREAT); stored encrypted");
rd->callback([&rc, &g] { rc = cmd_data_read(g, read); });
}  // namespace medgate::cli

}  // namespace medgate::cli
