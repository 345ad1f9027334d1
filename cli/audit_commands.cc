// medctl audit export | verify | render. `export` asks the daemon for a signed audit bundle
// (ledger/audit_bundle.h) and writes it as FILE and its signature as FILE.sig, and with --format
// fhir|csv a rendering beside it; `verify` checks a bundle offline, with no daemon, no key store
// and no network, against trusted public keys only; `render` verifies a bundle the same way and
// writes its FHIR or CSV rendering (ledger/audit_render.h). On a terminal, long verifications and
// renderings show a progress bar on stderr; scripts (stderr not a TTY) see none.
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <mutex>
#include <sstream>
#include <thread>

#include <fmt/format.h>
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "hsm/bytes.h"
#include "hsm/public_key.h"
#include "ledger/audit_bundle.h"
#include "ledger/audit_render.h"

namespace medgate::cli {
namespace {

using nlohmann::json;

struct ExportArgs {
  std::string out;
  std::optional<std::string> from, to, patient, principal, kind;
  std::string format = "bundle";
  std::vector<std::string> trust;  // for the rendering's verification (--format fhir|csv)
  bool include_values = false;
  std::optional<std::string> proofs;  // shared (format 2) | per-entry (format 1)
};

struct RenderArgs {
  std::string file;
  std::vector<std::string> trust;
  std::optional<std::string> signature;
  std::string format;
  std::optional<std::string> out;  // default: beside FILE; "-" for stdout
};

// A progress bar on stderr, drawn only when stderr is a terminal (never into a script's or a
// test's output), at most ten times a second, and erased when done.
class ProgressBar {
 public:
  explicit ProgressBar(std::string label)
      : label_(std::move(label)), enabled_(::isatty(STDERR_FILENO) == 1) {}
  ~ProgressBar() { finish(); }
  ProgressBar(const ProgressBar&) = delete;
  ProgressBar& operator=(const ProgressBar&) = delete;

  void update(std::uint64_t done, std::uint64_t total) {
    if (!enabled_ || total == 0) return;
    auto now = std::chrono::steady_clock::now();
    if (drawn_ && done < total && now - last_ < std::chrono::milliseconds(100)) return;
    last_ = now;
    drawn_ = true;
    constexpr int kWidth = 30;
    auto filled = static_cast<int>(kWidth * std::min(done, total) / total);
    std::cerr << fmt::format("\r{} [{:#<{}}{:<{}}] {}/{} entries", label_, "", filled, "",
                             kWidth - filled, done, total)
              << std::flush;
  }
  void finish() {
    if (!drawn_) return;
    std::cerr << "\r\033[K" << std::flush;  // erase the line: what follows is the result
    drawn_ = false;
  }

 private:
  std::string label_;
  bool enabled_;
  bool drawn_ = false;
  std::chrono::steady_clock::time_point last_{};
};

// While the daemon builds a bundle the client cannot count its entries (the admin API answers
// once), so on a terminal it shows that it waits and for how long.
class WaitIndicator {
 public:
  explicit WaitIndicator(std::string label) : label_(std::move(label)) {
    if (::isatty(STDERR_FILENO) != 1) return;
    thread_ = std::thread([this] {
      auto t0 = std::chrono::steady_clock::now();
      std::unique_lock lk(mu_);
      // Nothing for the first second: a quick export needs no indicator.
      while (!cv_.wait_for(lk, std::chrono::seconds(1), [this] { return stop_; })) {
        auto s =
            std::chrono::duration_cast<std::chrono::seconds>(std::chrono::steady_clock::now() - t0)
                .count();
        std::cerr << fmt::format("\r{} ({} s)", label_, s) << std::flush;
        drawn_ = true;
      }
    });
  }
  ~WaitIndicator() {
    if (!thread_.joinable()) return;
    {
      std::lock_guard lk(mu_);
      stop_ = true;
    }
    cv_.notify_one();
    thread_.join();
    if (drawn_) std::cerr << "\r\033[K" << std::flush;
  }
  WaitIndicator(const WaitIndicator&) = delete;
  WaitIndicator& operator=(const WaitIndicator&) = delete;

 private:
  std::string label_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  bool drawn_ = false;  // written by the thread, read after join
  std::thread thread_;
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

Result<std::vector<PublicKey>> read_trusted_keys(const std::vector<std::string>& files) {
  std::vector<PublicKey> keys;
  for (const std::string& pem_file : files) {
    MEDGATE_ASSIGN_OR_RETURN(Bytes pem, read_file(pem_file, "trusted key"));
    Result<PublicKey> key = PublicKey::from_pem(to_string(pem));
    if (!key.ok()) return key.status().with_context(pem_file);
    keys.push_back(*key);
  }
  return keys;
}

Status check_format(const std::string& format, bool bundle_allowed) {
  if (format == "fhir" || format == "csv" || (bundle_allowed && format == "bundle"))
    return Status::Ok();
  return Status::InvalidArgument(
      fmt::format("--format {}: want {}fhir or csv", format, bundle_allowed ? "bundle, " : ""));
}

// Beside the bundle: audit.cbor -> audit.fhir.json / audit.csv (other names get the suffix added).
std::string rendering_path(const std::string& bundle, const std::string& format) {
  std::string base = bundle;
  if (base.size() > 5 && base.ends_with(".cbor")) base.resize(base.size() - 5);
  return base + (format == "fhir" ? ".fhir.json" : ".csv");
}

// Verifies the bundle against `keys` and writes its rendering to `out` ("-": stdout). Returns the
// exit code: 1 with every problem named when the bundle does not verify (nothing is written),
// 2 when it is not a bundle. `summary` gets what was written, for --json.
int render_bundle(const GlobalOptions& g, std::string_view what, const std::string& bundle_path,
                  const Bytes& bundle, const Bytes& signature, const std::vector<PublicKey>& keys,
                  const std::string& format, const std::string& out, json& summary) {
  Result<ledger::AuditBundle> decoded = ledger::decode_audit_bundle(bundle);
  if (!decoded.ok())
    return fail(g, decoded.status().with_context(bundle_path + " is not an audit bundle"), what);
  ledger::AuditReport report;
  {
    ProgressBar bar("verifying");
    report = ledger::verify_decoded_audit_bundle(
        *decoded, bundle, signature, keys,
        [&bar](std::uint64_t done, std::uint64_t total) { bar.update(done, total); });
  }
  if (!report.ok()) {
    for (const std::string& p : report.problems)
      std::cerr << fmt::format("{}: {}: {}\n", what, bundle_path, p);
    return fail(g,
                Status::VerificationFailed(fmt::format(
                    "{} does NOT verify ({} problem(s)): no {} rendering is written from it",
                    bundle_path, report.problems.size(), format)),
                what);
  }
  ledger::BundleSource source{std::filesystem::path(bundle_path).filename().string(),
                              sha256(bundle)};
  std::string text;
  std::uint64_t events = report.selected;
  {
    ProgressBar bar("rendering");
    auto progress = [&bar](std::uint64_t done, std::uint64_t total) { bar.update(done, total); };
    if (format == "fhir") {
      Result<json> fhir = ledger::render_fhir(*decoded, report, source, progress);
      if (!fhir.ok()) return fail(g, fhir.status(), what);
      text = fhir->dump(1) + "\n";
    } else {
      Result<std::string> csv = ledger::render_csv(*decoded, report, source, progress);
      if (!csv.ok()) return fail(g, csv.status(), what);
      text = std::move(csv).value();
    }
  }
  if (out == "-") {
    std::cout << text << std::flush;
  } else if (Status s = write_file(out, as_bytes(text)); !s.ok()) {
    return fail(g, s, what);
  }
  summary = {{"file", out},
             {"format", format},
             {"events", events},
             {"bundle", source.file_name},
             {"bundle_sha256", to_hex(source.sha256)},
             {"tree_size", report.tree_size},
             {"root", to_hex(report.root)}};
  return 0;
}

int cmd_audit_render(const GlobalOptions& g, const RenderArgs& a) {
  constexpr std::string_view what = "medctl audit render";
  if (Status s = check_format(a.format, false); !s.ok()) return fail(g, s, what);
  std::string out = a.out.value_or(rendering_path(a.file, a.format));
  if (out == "-" && g.json)
    return fail(g, Status::InvalidArgument("--json and --out - both want standard output"), what);
  Result<std::vector<PublicKey>> keys = read_trusted_keys(a.trust);
  if (!keys.ok()) return fail(g, keys.status(), what);
  Result<Bytes> bundle = read_file(a.file, "bundle");
  if (!bundle.ok()) return fail(g, bundle.status(), what);
  // The signature is part of what is verified: without one the bundle does not verify.
  Bytes signature;
  std::string sig_path = a.signature.value_or(a.file + ".sig");
  if (Result<Bytes> sig = read_file(sig_path, "bundle signature"); sig.ok())
    signature = std::move(sig).value();
  else if (a.signature)
    return fail(g, sig.status(), what);
  json summary;
  int rc = render_bundle(g, what, a.file, *bundle, signature, *keys, a.format, out, summary);
  if (rc != 0) return rc;
  if (g.json)
    std::cout << summary.dump(2) << "\n";
  else if (out != "-")
    std::cout << fmt::format("{} verifies; wrote {} ({} audit events, {})\n", a.file, out,
                             summary["events"].get<std::uint64_t>(), a.format);
  return 0;
}

int cmd_audit_export(const GlobalOptions& g, const ExportArgs& a) {
  constexpr std::string_view what = "medctl audit export";
  if (Status s = check_format(a.format, true); !s.ok()) return fail(g, s, what);
  if (a.format == "bundle" && !a.trust.empty())
    return fail(g,
                Status::InvalidArgument(
                    "--trust is for the rendering's verification: give it with --format fhir|csv"),
                what);
  std::vector<PublicKey> keys;
  if (!a.trust.empty()) {
    Result<std::vector<PublicKey>> read = read_trusted_keys(a.trust);
    if (!read.ok()) return fail(g, read.status(), what);
    keys = std::move(read).value();
  }
  json args = json::object();
  if (a.from) args["from"] = *a.from;
  if (a.to) args["to"] = *a.to;
  if (a.patient) args["patient"] = read_patient(*a.patient);
  if (a.principal) args["principal"] = *a.principal;
  if (a.kind) args["kind"] = *a.kind;
  if (a.include_values) args["include_values"] = true;
  if (a.proofs) args["proofs"] = *a.proofs;
  Result<json> r = [&] {
    WaitIndicator waiting("medgated is building the bundle");
    return call(g, "audit.export", args);
  }();
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
  std::string anchor_note;
  if (a.format != "bundle") {
    if (keys.empty()) {
      // No key of the auditor's own: anchor on the ledger's genesis key, which the bundle carries.
      // Every proof, signature and the completeness argument are still checked.
      Result<ledger::AuditBundle> decoded = ledger::decode_audit_bundle(*bundle);
      std::optional<PublicKey> genesis =
          decoded.ok() ? ledger::bundle_genesis_key(*decoded) : std::nullopt;
      if (!genesis)
        return fail(g, Status::Internal("the exported bundle names no genesis key"), what);
      keys.push_back(*genesis);
      anchor_note = fmt::format(
          "note: the rendering was verified against the ledger's own genesis key {}; check the "
          "bundle against a key you trust: medctl audit verify {} --trust KEY.pem\n",
          to_hex(genesis->id()).substr(0, 16), a.out);
    }
    json rendering;
    int rc = render_bundle(g, what, a.out, *bundle, *signature, keys, a.format,
                           rendering_path(a.out, a.format), rendering);
    if (rc != 0) return rc;
    out["rendering"] = rendering;
  }
  if (g.json) {
    std::cout << out.dump(2) << "\n";
  } else {
    std::cout << fmt::format(
        "wrote {} ({} entries, {} selected, at tree size {}) and its signature {}\n"
        "sha256 {}\ncheck it offline: medctl audit verify {} --trust signing-key.pem\n",
        a.out, out.value("entries", 0ULL), out.value("selected", 0ULL),
        out.value("tree_size", 0ULL), a.out + ".sig", out.value("sha256", ""), a.out);
    if (out.contains("rendering"))
      std::cout << fmt::format("wrote {} ({} audit events, {}, derived from {})\n",
                               out["rendering"]["file"].get<std::string>(),
                               out["rendering"]["events"].get<std::uint64_t>(), a.format, a.out);
  }
  std::cerr << anchor_note;
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
  Result<std::vector<PublicKey>> keys = read_trusted_keys(trust);
  if (!keys.ok()) return fail(g, keys.status(), what);
  Result<Bytes> bundle = read_file(file, "bundle");
  if (!bundle.ok()) return fail(g, bundle.status(), what);
  Bytes signature;
  std::string sig_path = sig_file.value_or(file + ".sig");
  if (Result<Bytes> sig = read_file(sig_path, "bundle signature"); sig.ok())
    signature = std::move(sig).value();
  else if (sig_file)
    return fail(g, sig.status(), what);
  Result<ledger::AuditBundle> decoded = ledger::decode_audit_bundle(*bundle);
  if (!decoded.ok())
    return fail(g, decoded.status().with_context(file + " is not an audit bundle"), what);
  ledger::AuditReport r;
  {
    ProgressBar bar("verifying");
    r = ledger::verify_decoded_audit_bundle(
        *decoded, *bundle, signature, *keys,
        [&bar](std::uint64_t done, std::uint64_t total) { bar.update(done, total); });
  }
  if (g.json) {
    json out = ledger::to_json(r);
    if (show_entries) out["selected_entries"] = ledger::bundle_entries_json(*decoded);
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
        "{} verifies: ledger '{}', exported by {} at {} (bundle format {})\n"
        "signed head: tree size {}, {}, root {}, key {}\n"
        "{} entries ({} selected), {} earlier head(s) consistent, key chain of {}\n",
        file, r.ledger_id, r.exported_by, ledger::format_time(r.created_us), r.format_version,
        r.tree_size, ledger::format_time(r.head_time_us), to_hex(r.root),
        r.signing_key.substr(0, 16), r.entries, r.selected, r.earlier_heads, r.key_chain.size());
    if (r.patient_query)
      std::cout << (r.patient_latest
                        ? fmt::format("patient: complete; latest entry {} (by the signed subject "
                                      "map), {} entries on the proved chain\n",
                                      *r.patient_latest, r.chain_entries)
                        : std::string("patient: no entries at the signed head (absence proved)\n"));
    if (r.values_included) std::cout << "the bundle carries decrypted values (PHI)\n";
    for (const std::string& n : r.notes) std::cout << "note: " << n << "\n";
    if (show_entries) {
      for (const json& e : ledger::bundle_entries_json(*decoded))
        std::cout << fmt::format("  {:>8}  {}  {:<8} {:<17} {}\n", e["index"].get<std::uint64_t>(),
                                 e["time"].get<std::string>(), e["kind"].get<std::string>(),
                                 e["type"].get<std::string>(), e["actor"].get<std::string>());
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
  e->add_option("--format", ex.format,
                "bundle (default), or fhir|csv: also write a rendering beside FILE "
                "(FILE.fhir.json / FILE.csv, FILE's .cbor dropped)");
  e->add_option("--trust", ex.trust,
                "with --format fhir|csv: verify the bundle against this key (PEM; repeatable) "
                "before rendering it (default: the ledger's genesis key in the bundle)");
  e->add_flag("--include-values", ex.include_values,
              "decrypted readings in the bundle (admins only; recorded on the ledger)");
  e->add_option("--proofs", ex.proofs,
                "shared (default: one multi-leaf proof, format 2) or per-entry (an RFC 9162 audit "
                "path for each entry, format 1, about twice the size)");
  e->callback([&rc, &g] { rc = cmd_audit_export(g, ex); });
  auto* v = audit->add_subcommand("verify", "check a bundle offline (no daemon, no HSM)");
  v->add_option("FILE", file)->required();
  v->add_option("--trust", trust, "a trusted public key (PEM); repeatable")->required();
  v->add_option("--signature", sig, "the bundle's signature (default: FILE.sig)");
  v->add_flag("--entries", show_entries, "list the selected entries");
  v->callback([&rc, &g] { rc = cmd_audit_verify(g, file, trust, sig, show_entries); });
  static RenderArgs ra;
  auto* r = audit->add_subcommand(
      "render", "verify a bundle offline, then write it as FHIR AuditEvents or CSV");
  r->add_option("FILE", ra.file, "the bundle")->required();
  r->add_option("--trust", ra.trust, "a trusted public key (PEM); repeatable")->required();
  r->add_option("--format", ra.format, "fhir (a FHIR R4 Bundle of AuditEvents) or csv")->required();
  r->add_option("--out", ra.out,
                "where to write it (default: beside FILE, FILE.fhir.json or FILE.csv; - for "
                "standard output)");
  r->add_option("--signature", ra.signature, "the bundle's signature (default: FILE.sig)");
  r->callback([&rc, &g] { rc = cmd_audit_render(g, ra); });
}

}  // namespace medgate::cli
