// medctl audit export | verify. `export` asks the daemon for a signed audit bundle
// (ledger/audit_bundle.h) and writes it as FILE and its signature as FILE.sig; `verify` checks a
// bundle offline, with no daemon, no key store and no network, against trusted public keys only.
#include <fstream>
#include <iostream>
#include <sstream>

#include <fmt/format.h>
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "hsm/bytes.h"
#include "hsm/public_key.h"
#include "ledger/audit_bundle.h"

namespace medgate::cli {
namespace {

using nlohmann::json;

struct ExportArgs {
  std::string out;
  std::optional<std::string> from, to, patient, principal, kind;
  std::string format = "bundle";
  bool include_values = false;
};

Result<Bytes> read_file(const std::string& path, std::string_view what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return Status::InvalidArgument(fmt::format("cannot read {} {}", what, path));
  std::ostringstream s;
  s << in.rdbuf();
  return to_bytes(s.str());
}

Status write_file(const std::string& path, ByteView bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(bytes.data()),
            static_cast<std::streamsize>(bytes.size()));
  out.close();
  if (!out) return Status::IOError(fmt::format("cannot write {}", path));
  return Status::Ok();
}

int cmd_audit_export(const GlobalOptions& g, const ExportArgs& a) {
  constexpr std::string_view what = "medctl audit export";
  if (a.format != "bundle")
    return fail(g,
                Status::InvalidArgument(fmt::format(
                    "--format {}: only the signed bundle is written for now (fhir and csv "
                    "renderings are not here yet)",
                    a.format)),
                what);
  json args = json::object();
  if (a.from) args["from"] = *a.from;
  if (a.to) args["to"] = *a.to;
  if (a.patient) args["patient"] = read_patient(*a.patient);
  if (a.principal) args["principal"] = *a.principal;
  if (a.kind) args["kind"] = *a.kind;
  if (a.include_values) args["include_values"] = true;
  Result<json> r = call(g, "audit.export", args);
  if (!r.ok()) return fail(g, r.status(), what);
  std::optional<Bytes> bundle = from_base64(r->value("bundle", ""));
  std::optional<Bytes> signature = from_base64(r->value("signature", ""));
  if (!bundle || !signature)
    return fail(g, Status::Internal("the daemon's answer holds no bundle"), what);
  if (Status s = write_file(a.out, *bundle); !s.ok()) return fail(g, s, what);
  if (Status s = write_file(a.out + ".sig", *signature); !s.ok()) return fail(g, s, what);
  json out = *r;
  out.erase("bundle");
  out.erase("signature");
  out["file"] = a.out;
  out["signature_file"] = a.out + ".sig";
  if (g.json) {
    std::cout << out.dump(2) << "\n";
  } else {
    std::cout << fmt::format(
        "wrote {} ({} entries, {} selected, at tree size {}) and its signature {}\n"
        "sha256 {}\ncheck it offline: medctl audit verify {} --trust signing-key.pem\n",
        a.out, out.value("entries", 0ULL), out.value("selected", 0ULL),
        out.value("tree_size", 0ULL), a.out + ".sig", out.value("sha256", ""), a.out);
  }
  return 0;
}

int cmd_audit_verify(const GlobalOptions& g, const std::string& file,
                     const std::vector<std::string>& trust, std::optional<std::string> sig_file,
                     bool show_entries) {
  constexpr std::string_view what = "medctl audit verify";
  if (trust.empty())
    return fail(
        g,
        Status::InvalidArgument(
            "--trust PEM is required: a bundle can only be verified against a key you trust"),
        what);
  std::vector<PublicKey> keys;
  for (const std::string& pem_file : trust) {
    Result<Bytes> pem = read_file(pem_file, "trusted key");
    if (!pem.ok()) return fail(g, pem.status(), what);
    Result<PublicKey> key = PublicKey::from_pem(to_string(*pem));
    if (!key.ok()) return fail(g, key.status().with_context(pem_file), what);
    keys.push_back(*key);
  }
  Result<Bytes> bundle = read_file(file, "bundle");
  if (!bundle.ok()) return fail(g, bundle.status(), what);
  Bytes signature;
  std::string sig_path = sig_file.value_or(file + ".sig");
  if (Result<Bytes> sig = read_file(sig_path, "bundle signature"); sig.ok())
    signature = std::move(sig).value();
  else if (sig_file)
    return fail(g, sig.status(), what);
  Result<ledger::AuditReport> report = ledger::verify_audit_bundle(*bundle, signature, keys);
  if (!report.ok())
    return fail(g, report.status().with_context(file + " is not an audit bundle"), what);
  const ledger::AuditReport& r = *report;
  if (g.json) {
    json out = ledger::to_json(r);
    if (show_entries) {
      Result<ledger::AuditBundle> b = ledger::decode_audit_bundle(*bundle);
      if (b.ok()) out["selected_entries"] = ledger::bundle_entries_json(*b);
    }
    std::cout << out.dump(2) << "\n";
  }
  if (!r.ok()) {
    for (const std::string& p : r.problems) std::cerr << fmt::format("{}: {}: {}\n", what, file, p);
    if (!g.json)
      std::cerr << fmt::format("{}: {} does NOT verify ({} problem(s))\n", what, file,
                               r.problems.size());
    return 1;
  }
  if (!g.json) {
    std::cout << fmt::format(
        "{} verifies: ledger '{}', exported by {} at {}\n"
        "signed head: tree size {}, {}, root {}, key {}\n"
        "{} entries ({} selected), {} earlier head(s) consistent, key chain of {}\n",
        file, r.ledger_id, r.exported_by, ledger::format_time(r.created_us), r.tree_size,
        ledger::format_time(r.head_time_us), to_hex(r.root), r.signing_key.substr(0, 16), r.entries,
        r.selected, r.earlier_heads, r.key_chain.size());
    if (r.patient_query)
      std::cout << (r.patient_latest
                        ? fmt::format("patient: complete; latest entry {} (by the signed subject "
                                      "map), {} entries on the proved chain\n",
                                      *r.patient_latest, r.chain_entries)
                        : std::string("patient: no entries at the signed head (absence proved)\n"));
    if (r.values_included) std::cout << "the bundle carries decrypted values (PHI)\n";
    for (const std::string& n : r.notes) std::cout << "note: " << n << "\n";
    if (show_entries) {
      Result<ledger::AuditBundle> b = ledger::decode_audit_bundle(*bundle);
      if (b.ok())
        for (const json& e : ledger::bundle_entries_json(*b))
          std::cout << fmt::format("  {:>8}  {}  {:<8} {:<17} {}\n",
                                   e["index"].get<std::uint64_t>(), e["time"].get<std::string>(),
                                   e["kind"].get<std::string>(), e["type"].get<std::string>(),
                                   e["actor"].get<std::string>());
    }
  }
  return 0;
}

}  // namespace

void add_audit_commands(CLI::App& app, const GlobalOptions& g, int& rc) {
  static ExportArgs ex;
  static std::string file;
  static std::vector<std::string> trust;
  static std::optional<std::string> sig;
  static bool show_entries = false;
  auto* audit = app.add_subcommand("audit", "signed audit trails for auditors");
  audit->require_subcommand(1);
  auto* e = audit->add_subcommand("export", "write a signed audit bundle with its proofs");
  e->add_option("--out", ex.out, "the bundle file (its signature goes to FILE.sig)")->required();
  e->add_option("--from", ex.from, "entries at or after this time (RFC 3339)");
  e->add_option("--to", ex.to, "entries at or before this time (RFC 3339)");
  e->add_option("--patient", ex.patient,
                "one patient (identifier, pseudonym, or - for stdin); proves completeness");
  e->add_option("--principal", ex.principal, "entries by or about this actor or Cedar entity");
  e->add_option("--kind", ex.kind, "ingest, access, consent, rules, device, admin, key or erasure");
  e->add_option("--format", ex.format, "bundle (fhir and csv are not here yet)");
  e->add_flag("--include-values", ex.include_values,
              "decrypted readings in the bundle (admins only; recorded on the ledger)");
  e->callback([&rc, &g] { rc = cmd_audit_export(g, ex); });
  auto* v = audit->add_subcommand("verify", "check a bundle offline (no daemon, no HSM)");
  v->add_option("FILE", file)->required();
  v->add_option("--trust", trust, "a trusted public key (PEM); repeatable")->required();
  v->add_option("--signature", sig, "the bundle's signature (default: FILE.sig)");
  v->add_flag("--entries", show_entries, "list the selected entries");
  v->callback([&rc, &g] { rc = cmd_audit_verify(g, file, trust, sig, show_entries); });
}

}  // namespace medgate::cli
