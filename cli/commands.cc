#include "cli/commands.h"

#include <fcntl.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "appliance/admin_protocol.h"
#include "cli/client.h"
#include "hsm/public_key.h"
#include "ledger/block.h"
#include "ledger/entry.h"
#include "ledger/merkle.h"
#include "ledger/verifier.h"

namespace medgate::cli {

using nlohmann::json;

int fail(const GlobalOptions& g, const Status& s, std::string_view what) {
  if (g.json) std::cout << admin::error_response(s).dump(2) << "\n";
  std::cerr << what << ": " << s.message() << "\n";
  return admin::exit_code(s.code());
}

Result<json> call(const GlobalOptions& g, std::string_view op, const json& args) {
  MEDGATE_ASSIGN_OR_RETURN(AdminClient client,
                           AdminClient::connect(resolve_socket(g.socket, g.config)));
  return client.call(op, args);
}

std::string read_patient(std::string patient) {
  if (patient == "-") {
    std::getline(std::cin, patient);
    if (!patient.empty() && patient.back() == '\r') patient.pop_back();
  }
  return patient;
}

namespace {

std::string short_hex(const std::string& hex) {
  return hex.size() > 16 ? hex.substr(0, 16) + "…" : hex;
}

std::string age(std::uint64_t seconds) {
  if (seconds < 120) return fmt::format("{} s", seconds);
  if (seconds < 7200) return fmt::format("{} min", seconds / 60);
  return fmt::format("{} h", seconds / 3600);
}

// Checks a signed head sent by the daemon against the public key it reports; used so that what
// medctl prints as "signed" has been checked here, not just claimed.
Status check_signed_head(const json& head, const PublicKey& key) {
  auto bytes = from_base64(head.value("head", ""));
  auto sig = from_base64(head.value("signature", ""));
  if (!bytes || !sig) return Status::VerificationFailed("the signed head is not valid base64");
  MEDGATE_ASSIGN_OR_RETURN(ledger::HeadBody body, ledger::decode_head(*bytes));
  if (body.key_id != key.id())
    return Status::VerificationFailed("the head is signed by another key");
  MEDGATE_RETURN_IF_ERROR(key.verify_digest(ledger::head_digest(*bytes), *sig));
  if (to_hex(body.root) != head.value("root", "") ||
      body.tree_size != head.value("tree_size", 0ULL))
    return Status::VerificationFailed("the head's fields do not match its signed bytes");
  return Status::Ok();
}

Result<PublicKey> daemon_key(const GlobalOptions& g) {
  MEDGATE_ASSIGN_OR_RETURN(json keys, call(g, "keys.show"));
  return PublicKey::from_pem(keys.value("public_key_pem", ""));
}

Result<std::vector<Hash>> parse_hashes(const json& list) {
  std::vector<Hash> out;
  for (const auto& h : list) {
    auto hash = hash_from_hex(h.get<std::string>());
    if (!hash) return Status::VerificationFailed("a proof hash is not 32 bytes of hex");
    out.push_back(*hash);
  }
  return out;
}

bool stderr_is_tty() {
  return ::isatty(STDERR_FILENO) == 1;
}

// The config the Debian package installs (a conffile), for `medctl init` without --data-dir.
constexpr const char* kPackagedConfig = "/etc/medgate/medgated.toml";

}  // namespace

int cmd_init(const GlobalOptions& g, const InitArgs& a) {
  // Only medgated links the key-store backends (DESIGN.md), so init runs `medgated init`: the one
  // found next to this medctl, else $MEDGATED, else PATH.
  std::string medgated = "medgated";
  std::error_code ec;
  auto self = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (const char* env = std::getenv("MEDGATED"); env && *env)
    medgated = env;
  else if (!ec && std::filesystem::exists(self.parent_path() / "medgated"))
    medgated = (self.parent_path() / "medgated").string();
  std::vector<std::string> args = {medgated, "init"};
  if (a.data_dir) {
    args.insert(args.end(), {"--data-dir", *a.data_dir});
    if (g.config) args.insert(args.end(), {"--config-out", *g.config});
  } else {
    args.insert(args.end(), {"--from-config", g.config.value_or(kPackagedConfig)});
  }
  if (a.key_store) args.insert(args.end(), {"--key-store", *a.key_store});
  if (a.ledger_id) args.insert(args.end(), {"--ledger-id", *a.ledger_id});
  if (a.socket) args.insert(args.end(), {"--socket", *a.socket});
  if (a.pin_file) args.insert(args.end(), {"--pin-file", *a.pin_file});
  if (a.pin_env) args.insert(args.end(), {"--pin-env", *a.pin_env});
  if (a.seal_pcrs) args.insert(args.end(), {"--seal-pcrs", *a.seal_pcrs});
  if (a.join) args.insert(args.end(), {"--join", *a.join});
  if (a.member_id) args.insert(args.end(), {"--member-id", *a.member_id});
  if (a.endpoint) args.insert(args.end(), {"--endpoint", *a.endpoint});
  if (a.prefix) args.insert(args.end(), {"--prefix", *a.prefix});
  if (a.trust) args.insert(args.end(), {"--trust", *a.trust});
  if (g.json) args.push_back("--json");
  std::vector<char*> argv;
  for (auto& s : args) argv.push_back(s.data());
  argv.push_back(nullptr);
  ::execvp(argv[0], argv.data());
  return fail(g,
              Status::Unavailable(fmt::format("cannot run {}: {}", medgated, std::strerror(errno))),
              "medctl init");
}

int cmd_status(const GlobalOptions& g) {
  Result<json> r = call(g, "status");
  if (!r.ok()) return fail(g, r.status(), "medctl status");
  const json& s = *r;
  if (g.json) {
    std::cout << s.dump(2) << "\n";
    return 0;
  }
  const json& d = s["daemon"];
  const json& l = s["ledger"];
  const json& k = s["key_store"];
  const json& a = s["admin"];
  if (const json& h = s.value("health", json()); h.is_object()) {
    std::string line = h.value("state", std::string("?")) == "ok" ? "ok" : "DEGRADED";
    for (const json& p : h["problems"]) line += "\n           - " + p.get<std::string>();
    std::cout << "health     " << line << "\n";
  }
  std::cout << fmt::format("medgated   {} (pid {}, up {}), config {}\n",
                           d["version"].get<std::string>(), d["pid"].get<int>(),
                           age(d["uptime_seconds"].get<std::uint64_t>()),
                           d["config"].get<std::string>());
  std::cout << fmt::format("ledger     '{}': {} entries in {} blocks, root {}\n",
                           l["id"].get<std::string>(), l["entries"].get<std::uint64_t>(),
                           l["height"].get<std::uint64_t>() + 1,
                           short_hex(l["root"].get<std::string>()));
  if (s["signed_head"].is_object()) {
    const json& h = s["signed_head"];
    std::cout << fmt::format(
        "signed     head #{} covers {} entries, signed {} ago ({} entries not yet covered)\n",
        h["sequence"].get<std::uint64_t>(), h["tree_size"].get<std::uint64_t>(),
        age(h["age_seconds"].get<std::uint64_t>()), h["unsigned_entries"].get<std::uint64_t>());
  }
  std::cout << fmt::format(
      "key store  {}\n           signing key {}, {} heads signed, {} failures{}\n",
      k["description"].get<std::string>(), short_hex(k["key_id"].get<std::string>()),
      k["heads_signed"].get<std::uint64_t>(), k["sign_failures"].get<std::uint64_t>(),
      k["last_error"].get<std::string>().empty()
          ? ""
          : " (last: " + k["last_error"].get<std::string>() + ")");
  if (k.contains("device") && k["device"].is_object()) {
    const json& dev = k["device"];
    const std::uint64_t errors = dev.value("errors", 0ULL),
                        reconnects = dev.value("reconnects", 0ULL);
    if (!dev.value("reachable", true) || errors > 0 || reconnects > 0)
      std::cout << fmt::format("           device {}: {} errors, {} reconnects{}\n",
                               dev.value("reachable", true) ? "reachable" : "UNREACHABLE", errors,
                               reconnects,
                               dev.value("last_error", std::string()).empty()
                                   ? ""
                                   : " (last: " + dev.value("last_error", std::string()) + ")");
  }
  const json& rc = s["rollback_counter"];
  std::cout << fmt::format(
      "rollback   {} counter {} (signed heads carry {}), {} epochs since "
      "start, every {} s{}\n",
      rc["kind"].get<std::string>(), rc["key_store"].get<std::uint64_t>(),
      rc["signed"].get<std::uint64_t>(), rc["epochs_since_start"].get<std::uint64_t>(),
      rc["interval_seconds"].get<std::int64_t>(),
      rc["last_error"].get<std::string>().empty()
          ? ""
          : " (last: " + rc["last_error"].get<std::string>() + ")");
  std::string writer = l["writer_error"].get<std::string>();
  std::cout << fmt::format(
      "writer     {}; {} appended and {} commits since start, {} failed appends\n",
      writer.empty() ? "healthy" : "STOPPED: " + writer,
      l["appended_since_start"].get<std::uint64_t>(), l["commits_since_start"].get<std::uint64_t>(),
      l["failed_appends"].get<std::uint64_t>());
  std::cout << fmt::format("admin      {}: {} connections, {} requests, {} errors, {} refused\n",
                           a["socket"].get<std::string>(), a["connections"].get<std::uint64_t>(),
                           a["requests"].get<std::uint64_t>(), a["errors"].get<std::uint64_t>(),
                           a["refused"].get<std::uint64_t>());
  const json& in = s["ingest"];
  if (in.is_object() && in.contains("pipeline")) {
    const json& p = in["pipeline"];
    std::cout << fmt::format(
        "ingest     {} batches committed ({} readings), {} failed, {} duplicates, {} busy, {} "
        "queued\n",
        p["committed"].get<std::uint64_t>(), p["observations"].get<std::uint64_t>(),
        p["failed"].get<std::uint64_t>(), p["duplicates"].get<std::uint64_t>(),
        p["busy"].get<std::uint64_t>(), p["queued"].get<std::uint64_t>());
    if (in["hl7"].is_object())
      std::cout << fmt::format(
          "  hl7      MLLP port {}: {} connections open, {} ACKs sent, {} unknown sources, {} "
          "unparseable frames\n",
          in["hl7"]["port"].get<int>(), in["hl7"]["connections_open"].get<std::uint64_t>(),
          in["hl7"]["acks_sent"].get<std::uint64_t>(),
          in["hl7"]["unknown_source"].get<std::uint64_t>(),
          in["hl7"]["unparseable_frames"].get<std::uint64_t>());
    if (in["hl7"].is_object() && in["hl7"].value("tls", false))
      std::cout << fmt::format(
          "           TLS{}: {} handshakes, {} failed, {} timed out\n",
          in["hl7"].value("tls_client_certificates", false) ? ", client certificates required" : "",
          in["hl7"].value("tls_handshakes", 0ULL), in["hl7"].value("tls_handshake_failures", 0ULL),
          in["hl7"].value("tls_handshake_timeouts", 0ULL));
    if (!in["hl7"].is_object()) std::cout << "  hl7      off (no [hl7] section in the config)\n";
    if (in["coap"].is_object())
      std::cout << fmt::format(
          "  coap     DTLS-PSK port {}: {} devices seen, {} unknown identities, {} handshake "
          "errors\n",
          in["coap"]["port"].get<int>(), in["coap"]["devices"].get<std::uint64_t>(),
          in["coap"]["unknown_identity"].get<std::uint64_t>(),
          in["coap"]["handshake_errors"].get<std::uint64_t>());
    else
      std::cout << "  coap     off (no [coap] section in the config)\n";
  }
  if (const json& rates = s.value("rates", json()); rates.is_object())
    std::cout << fmt::format(
        "rates      over the last {} s: {} entries/s, {} readings/s, {} "
        "decisions/s\n",
        rates.value("window_seconds", 0), rates.value("entries_per_s", 0.0),
        rates.value("readings_per_s", 0.0), rates.value("decisions_per_s", 0.0));
  if (const json& c = s["consent"]; c.is_object()) {
    const json& n = c["decisions"];
    std::cout << fmt::format(
        "consent    rules {}, directory {}; {} grants ({} active); since start {} allowed, {} "
        "denied, {} break-glass, {} with policy errors\n",
        c["rules_version"].is_null()
            ? std::string("none deployed (all access denied)")
            : fmt::format("version {} ({} policies)", c["rules_version"].get<std::uint64_t>(),
                          c["policies"].get<std::uint64_t>()),
        c["directory_version"].is_null()
            ? std::string("none")
            : fmt::format("version {}", c["directory_version"].get<std::uint64_t>()),
        c["grants"].get<std::uint64_t>(), c["grants_active"].get<std::uint64_t>(),
        n["allowed"].get<std::uint64_t>(), n["denied"].get<std::uint64_t>(),
        n["break_glass"].get<std::uint64_t>(), n["with_policy_errors"].get<std::uint64_t>());
  }
  if (const json& c = s.value("cluster", json()); c.is_object()) {
    const json& o = c["ordering"];
    std::cout << fmt::format(
        "cluster    member \"{}\" of {} (epoch {}); {}; queue {} entries (oldest {} ms)\n",
        c.value("member_id", ""), c.value("members", 0), c.value("epoch", 0),
        !o.is_object() ? std::string("not ordering")
        : o.value("connected", false)
            ? fmt::format("connected, lag {} blocks", o.value("lag_blocks", 0))
            : std::string("etcd NOT CONNECTED"),
        c["queue"].value("entries", 0), c["queue"].value("oldest_age_ms", 0));
    if (c.contains("shared_key"))
      std::cout << (c["shared_key"].is_string()
                        ? fmt::format("           shared key {}\n",
                                      c["shared_key"].get<std::string>())
                        : std::string("           shared key NOT RECEIVED yet: no patient can be "
                                      "named here\n"));
  }
  if (const json& m = s.value("metrics", json()); m.is_object())
    std::cout << fmt::format("metrics    http://{}:{}/metrics, {} scrapes\n",
                             m.value("address", std::string()), m.value("port", 0),
                             m.value("scrapes", 0ULL));
  if (const json& h = s.value("health", json()); h.is_object() && !h["recent_log"].empty()) {
    // The newest last, as in the log; the time without its date and fraction.
    std::cout << "recent     warnings and errors (newest last):\n";
    const json& recent = h["recent_log"];
    const std::size_t from = recent.size() > 5 ? recent.size() - 5 : 0;
    for (std::size_t i = from; i < recent.size(); ++i) {
      const std::string t = recent[i].value("time", std::string());
      std::cout << fmt::format("           {} {} {}\n", t.size() >= 19 ? t.substr(11, 8) : t,
                               recent[i].value("id", std::string()),
                               recent[i].value("message", std::string()));
    }
  }
  std::cout << fmt::format("you        {} ({})\n", s["caller"]["actor"].get<std::string>(),
                           s["caller"]["role"].get<std::string>());
  return writer.empty() ? 0 : 1;
}

int cmd_ledger_head(const GlobalOptions& g) {
  Result<json> r = call(g, "ledger.head");
  if (!r.ok()) return fail(g, r.status(), "medctl ledger head");
  Result<PublicKey> key = daemon_key(g);
  if (!key.ok()) return fail(g, key.status(), "medctl ledger head");
  Status checked = check_signed_head(*r, *key);
  json h = *r;
  h["signature_checked"] = checked.ok();
  if (g.json)
    std::cout << h.dump(2) << "\n";
  else
    std::cout << fmt::format(
        "ledger     {}\nhead       #{}\nheight     {}\ntree size  {}\nroot       {}\ntime       "
        "{}\nkey id     {}\nsignature  {}\n"
        "checked    {}\n",
        h["ledger_id"].get<std::string>(), h["sequence"].get<std::uint64_t>(),
        h["height"].get<std::uint64_t>(), h["tree_size"].get<std::uint64_t>(),
        h["root"].get<std::string>(), h["time"].get<std::string>(), h["key_id"].get<std::string>(),
        h["signature"].get<std::string>(),
        checked.ok() ? "signature verifies with the daemon's public key"
                     : "SIGNATURE DOES NOT VERIFY: " + checked.message());
  if (!checked.ok()) {
    std::cerr << "medctl ledger head: " << checked.message() << "\n";
    return 1;
  }
  return 0;
}

int cmd_ledger_verify(const GlobalOptions& g, const std::optional<std::string>& db,
                      const std::vector<std::string>& trust) {
  json report;
  if (db) {
    if (trust.empty())
      return fail(
          g,
          Status::InvalidArgument(
              "--db needs --trust PEM: a ledger can only be verified against a key you trust"),
          "medctl ledger verify");
    ledger::VerifyOptions options;
    for (const std::string& file : trust) {
      std::ifstream in(file);
      if (!in)
        return fail(g, Status::InvalidArgument("cannot read trusted key " + file),
                    "medctl ledger verify");
      std::stringstream pem;
      pem << in.rdbuf();
      Result<PublicKey> key = PublicKey::from_pem(pem.str());
      if (!key.ok()) return fail(g, key.status().with_context(file), "medctl ledger verify");
      options.trusted_keys.push_back(*key);
    }
    bool tty = !g.json && stderr_is_tty();
    if (tty)
      options.progress = [](std::uint64_t done, std::uint64_t total) {
        std::cerr << fmt::format("\rverifying {:>12} of {} entries ({:3}%)", done, total,
                                 total ? done * 100 / total : 100)
                  << std::flush;
      };
    Result<ledger::VerifyReport> r = ledger::verify_ledger_file(*db, options);
    if (tty) std::cerr << "\r\033[K" << std::flush;
    if (!r.ok()) return fail(g, r.status(), "medctl ledger verify");
    report = ledger::to_json(*r);
  } else {
    Result<json> r = call(g, "ledger.verify");
    if (!r.ok()) return fail(g, r.status(), "medctl ledger verify");
    report = *r;
  }
  bool ok = report.value("ok", false);
  if (g.json) {
    std::cout << report.dump(2) << "\n";
  } else if (ok) {
    std::cout << fmt::format(
        "ledger '{}' verifies: {} entries, {} blocks, {} signed heads, root {}\n",
        report["ledger_id"].get<std::string>(), report["entries"].get<std::uint64_t>(),
        report["blocks"].get<std::uint64_t>(), report["heads"].get<std::uint64_t>(),
        report["root"].get<std::string>());
    std::string keys;
    for (const auto& k : report["key_ids"])
      keys += (keys.empty() ? "" : " -> ") + k.get<std::string>();
    std::cout << fmt::format(
        "signing keys {}\nrollback counter {} in the latest head{}\n", keys,
        report.value("rollback_counter", 0ULL),
        report.contains("key_store_counter") && report["key_store_counter"].is_number()
            ? fmt::format(" (key store: {})", report["key_store_counter"].get<std::uint64_t>())
            : std::string());
    if (report.value("unsigned_entries", 0ULL) > 0)
      std::cout << fmt::format(
          "note: the last {} entries are committed but not yet covered by a signed head (not "
          "tampering)\n",
          report["unsigned_entries"].get<std::uint64_t>());
  } else {
    std::cout << "VERIFICATION FAILED: " << report.value("problem", "unknown problem") << "\n";
  }
  return ok ? 0 : 1;
}

int cmd_ledger_show(const GlobalOptions& g, std::optional<std::uint64_t> entry,
                    std::optional<std::uint64_t> block) {
  if (entry.has_value() == block.has_value())
    return fail(g, Status::InvalidArgument("give exactly one of --entry N or --block H"),
                "medctl ledger show");
  Result<json> r = entry ? call(g, "ledger.entry", {{"index", *entry}})
                         : call(g, "ledger.block", {{"height", *block}});
  if (!r.ok()) return fail(g, r.status(), "medctl ledger show");
  const json& x = *r;
  if (g.json) {
    std::cout << x.dump(2) << "\n";
  } else if (entry) {
    std::cout << fmt::format(
        "entry      {}\nblock      {}\ntype       {} ({})\ntime       {}\nactor      {}\nleaf hash "
        " {}\nbody       {}\n",
        x["index"].get<std::uint64_t>(), x["block"].get<std::uint64_t>(),
        x["type"].get<std::string>(), x["kind"].get<std::string>(), x["time"].get<std::string>(),
        x["actor"].get<std::string>(), x["leaf_hash"].get<std::string>(), x["body"].dump());
    if (!x["subjects"].empty()) std::cout << "subjects   " << x["subjects"].dump() << "\n";
  } else {
    std::cout << fmt::format(
        "block      {}\nhash       {}\nprevious   {}\nentries    {}..{} ({})\ntree size  {}\nroot  "
        "     {}\ntime       {}\nkey id     {}\n",
        x["height"].get<std::uint64_t>(), x["hash"].get<std::string>(),
        x["previous_hash"].get<std::string>(), x["first_index"].get<std::uint64_t>(),
        x["tree_size"].get<std::uint64_t>() - 1, x["entry_count"].get<std::uint64_t>(),
        x["tree_size"].get<std::uint64_t>(), x["root"].get<std::string>(),
        x["time"].get<std::string>(), x["key_id"].get<std::string>());
  }
  return 0;
}

int cmd_ledger_proof(const GlobalOptions& g, std::uint64_t entry,
                     std::optional<std::uint64_t> size) {
  json args = {{"index", entry}};
  if (size) args["size"] = *size;
  Result<json> r = call(g, "ledger.proof", args);
  if (!r.ok()) return fail(g, r.status(), "medctl ledger proof");
  json p = *r;
  // Check the proof here rather than trust the daemon: leaf + path must give the root, and the
  // root must be the one the signed head vouches for.
  auto leaf = hash_from_hex(p.value("leaf_hash", ""));
  auto root = hash_from_hex(p.value("root", ""));
  Result<std::vector<Hash>> path = parse_hashes(p["proof"]);
  Status checked =
      !leaf || !root || !path.ok()
          ? Status::VerificationFailed("the proof is malformed")
          : ledger::merkle::verify_inclusion(entry, p["tree_size"], *leaf, *path, *root);
  std::string signed_by;
  if (checked.ok() && p.contains("signed_head")) {
    Result<PublicKey> key = daemon_key(g);
    checked = key.ok() ? check_signed_head(p["signed_head"], *key) : key.status();
    if (checked.ok() && p["signed_head"]["root"] != p["root"])
      checked = Status::VerificationFailed("the signed head has another root");
    if (checked.ok())
      signed_by = fmt::format("signed head #{}", p["signed_head"]["sequence"].get<std::uint64_t>());
  }
  p["verified"] = checked.ok();
  if (g.json)
    std::cout << p.dump(2) << "\n";
  else {
    std::cout << fmt::format(
        "entry      {}\ntree size  {}\nleaf hash  {}\nroot       {}\nproof      {} hashes\n", entry,
        p["tree_size"].get<std::uint64_t>(), p["leaf_hash"].get<std::string>(),
        p["root"].get<std::string>(), p["proof"].size());
    for (const auto& h : p["proof"]) std::cout << "           " << h.get<std::string>() << "\n";
    std::cout << "verified   "
              << (checked.ok()
                      ? (signed_by.empty() ? "the path gives the root (no signed head at this size)"
                                           : "the path gives the root of " + signed_by +
                                                 ", whose signature verifies")
                      : "NO: " + checked.message())
              << "\n";
  }
  if (!checked.ok()) std::cerr << "medctl ledger proof: " << checked.message() << "\n";
  return checked.ok() ? 0 : 1;
}

int cmd_ledger_consistency(const GlobalOptions& g, std::uint64_t from,
                           std::optional<std::uint64_t> to) {
  json args = {{"from", from}};
  if (to) args["to"] = *to;
  Result<json> r = call(g, "ledger.consistency", args);
  if (!r.ok()) return fail(g, r.status(), "medctl ledger consistency");
  json p = *r;
  auto a = hash_from_hex(p.value("from_root", ""));
  auto b = hash_from_hex(p.value("to_root", ""));
  Result<std::vector<Hash>> path = parse_hashes(p["proof"]);
  Status checked = !a || !b || !path.ok()
                       ? Status::VerificationFailed("the proof is malformed")
                       : ledger::merkle::verify_consistency(from, p["to"], *a, *b, *path);
  if (checked.ok() && p.contains("signed_head")) {
    Result<PublicKey> key = daemon_key(g);
    checked = key.ok() ? check_signed_head(p["signed_head"], *key) : key.status();
  }
  p["verified"] = checked.ok();
  if (g.json)
    std::cout << p.dump(2) << "\n";
  else {
    std::cout << fmt::format(
        "from       {} entries, root {}\nto         {} entries, root {}\nproof      {} hashes\n",
        from, p["from_root"].get<std::string>(), p["to"].get<std::uint64_t>(),
        p["to_root"].get<std::string>(), p["proof"].size());
    for (const auto& h : p["proof"]) std::cout << "           " << h.get<std::string>() << "\n";
    std::cout << "verified   "
              << (checked.ok() ? "the later tree extends the earlier one"
                               : "NO: " + checked.message())
              << "\n";
  }
  return checked.ok() ? 0 : 1;
}

int cmd_ledger_sign_head(const GlobalOptions& g) {
  Result<json> r = call(g, "ledger.sign_head");
  if (!r.ok()) return fail(g, r.status(), "medctl ledger sign-head");
  if (g.json)
    std::cout << r->dump(2) << "\n";
  else
    std::cout << fmt::format(
        "signed head #{} covers {} entries (root {}); the request is entry {}\n",
        (*r)["sequence"].get<std::uint64_t>(), (*r)["tree_size"].get<std::uint64_t>(),
        (*r)["root"].get<std::string>(), (*r)["recorded_as"].get<std::uint64_t>());
  return 0;
}

int cmd_keys_rotate(const GlobalOptions& g) {
  Result<json> r = call(g, "keys.rotate");
  if (!r.ok()) return fail(g, r.status(), "medctl keys rotate");
  if (g.json) {
    std::cout << r->dump(2) << "\n";
    return 0;
  }
  std::cout << fmt::format(
      "signing key rotated at entry {}\n  old {}\n  new {}\n", (*r)["entry"].get<std::uint64_t>(),
      (*r)["old_key_id"].get<std::string>(), (*r)["new_key_id"].get<std::string>());
  if ((*r)["first_head"].is_object())
    std::cout << fmt::format("head #{} is the first signed by the new key\n",
                             (*r)["first_head"]["sequence"].get<std::uint64_t>());
  std::cout << (*r)["public_key_pem"].get<std::string>()
            << "Verifiers that trust the old key follow the transition; give auditors the new "
               "public key above for ledgers that start after it.\n";
  return 0;
}

int cmd_keys_show(const GlobalOptions& g) {
  Result<json> r = call(g, "keys.show");
  if (!r.ok()) return fail(g, r.status(), "medctl keys show");
  if (g.json)
    std::cout << r->dump(2) << "\n";
  else
    std::cout << (*r)["public_key_pem"].get<std::string>() << "key id     "
              << (*r)["key_id"].get<std::string>()
              << "  (SHA-256 of the DER public key)\nkey store  "
              << (*r)["key_store"].get<std::string>() << "\n";
  return 0;
}

int cmd_patient_erase(const GlobalOptions& g, std::string patient, const std::string& reason,
                      bool yes) {
  const char* what = "medctl patient erase";
  if (patient == "-") {
    std::getline(std::cin, patient);
    if (!patient.empty() && patient.back() == '\r') patient.pop_back();
  }
  if (patient.empty())
    return fail(g, Status::InvalidArgument("the patient identifier is empty"), what);
  if (!yes && ::isatty(STDIN_FILENO) == 1 && ::isatty(STDERR_FILENO) == 1) {
    std::cerr << "Erasing a patient destroys their data key: everything stored for them becomes "
                 "unreadable, for good.\nType 'erase' to go on: "
              << std::flush;
    std::string answer;
    std::getline(std::cin, answer);
    if (answer != "erase") {
      secure_wipe(patient);
      return fail(g, Status::FailedPrecondition("not confirmed; nothing was erased"), what);
    }
  }
  Result<json> r = call(g, "patient.erase", {{"patient", patient}, {"reason", reason}});
  secure_wipe(patient);
  if (!r.ok()) return fail(g, r.status(), what);
  if (g.json)
    std::cout << r->dump(2) << "\n";
  else
    std::cout << fmt::format(
        "patient    {}\nerased at  {}\nledger     entry {}\nthe data key is destroyed: nothing "
        "stored for this patient can be decrypted any more\n",
        (*r)["pseudonym"].get<std::string>(), (*r)["erased_at"].get<std::string>(),
        (*r)["entry"].get<std::uint64_t>());
  return 0;
}

namespace {

// Networks as given on the command line: separate arguments, or one separated by commas/spaces.
json split_networks(const std::vector<std::string>& items) {
  json out = json::array();
  for (const std::string& item : items) {
    std::size_t i = 0;
    while (i < item.size()) {
      const std::size_t end = std::min(item.find_first_of(", \t", i), item.size());
      if (end > i) out.push_back(item.substr(i, end - i));
      i = end + 1;
    }
  }
  return out;
}

void print_device(const json& d) {
  std::cout << fmt::format("device     {} ({}, {})\n", d["id"].get<std::string>(),
                           d["kind"].get<std::string>(), d["state"].get<std::string>());
  if (d["kind"] == "hl7")
    std::cout << fmt::format(
        "hl7 source MSH-3 '{}', MSH-4 '{}'\n", d["hl7_application"].get<std::string>(),
        d["hl7_facility"].get<std::string>().empty() ? "(any)"
                                                     : d["hl7_facility"].get<std::string>());
  if (d["kind"] == "hl7" && d.contains("allow")) {
    std::string networks;
    for (const json& n : d["allow"])
      networks += (networks.empty() ? "" : " ") + n.get<std::string>();
    std::cout << fmt::format("allowed    {}\n",
                             networks.empty() ? "from any address" : "from " + networks);
  }
  if (d["kind"] == "hl7" && d.contains("cert")) {
    const std::string cert = d["cert"].get<std::string>();
    std::cout << fmt::format(
        "client     {}\n",
        cert.empty()              ? std::string("any connection (no client certificate bound)")
        : cert.starts_with("cn:") ? "certificate with subject CN '" + cert.substr(3) + "'"
                                  : "certificate sha256 " + cert.substr(7));
  }
  std::cout << fmt::format("patient    {}\n", d["patient"].is_string()
                                                  ? "pseudonym " + d["patient"].get<std::string>()
                                                  : std::string("(not bound)"));
  std::cout << fmt::format("changed    {} (ledger entry {})\n", d["updated"].get<std::string>(),
                           d["last_entry"].get<std::uint64_t>());
  if (d.contains("traffic") && d["traffic"].is_object()) {
    const json& t = d["traffic"];
    std::string rejected;
    if (t.contains("rejected"))
      for (const auto& [reason, n] : t["rejected"].items())
        if (n.get<std::uint64_t>() > 0)
          rejected +=
              fmt::format("{}{} {}", rejected.empty() ? "" : ", ", n.get<std::uint64_t>(), reason);
    std::cout << fmt::format("traffic    {} received, {} committed{}{}\n",
                             t.value("received", 0ULL), t.value("committed", 0ULL),
                             rejected.empty() ? "" : ", rejected: " + rejected,
                             t.contains("last_seen") && t["last_seen"].is_string()
                                 ? ", last seen " + t["last_seen"].get<std::string>()
                                 : "");
  } else if (d.contains("traffic")) {
    std::cout << "traffic    (its listener is off)\n";
  }
}

// A new PSK is shown once: written to --psk-out (created 0600, never overwritten) or printed.
int hand_out_psk(const GlobalOptions& g, const json& r, const std::optional<std::string>& psk_out,
                 const char* what) {
  if (!r.contains("psk")) return 0;
  std::string psk = r["psk"].get<std::string>();
  if (psk_out) {
    int fd = ::open(psk_out->c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0 || ::write(fd, psk.data(), psk.size()) != static_cast<ssize_t>(psk.size()) ||
        ::fsync(fd) != 0) {
      if (fd >= 0) ::close(fd);
      std::cout << "PSK (write it down now; it is not shown again): " << psk << "\n";
      return fail(g, Status::IOError("cannot write " + *psk_out + ": " + std::strerror(errno)),
                  what);
    }
    ::close(fd);
    std::cout << "PSK written to " << *psk_out << " (0600); it is not shown again\n";
  } else {
    std::cout << "PSK        " << psk << "\n           (shown once: give it to the device now)\n";
  }
  secure_wipe(psk);
  return 0;
}

}  // namespace

int cmd_device_add(const GlobalOptions& g, const std::string& id, const std::string& kind,
                   const std::optional<std::string>& patient, const std::string& hl7_app,
                   const std::string& hl7_facility, const std::optional<std::string>& psk_out,
                   const std::vector<std::string>& allow,
                   const std::optional<std::string>& cert_fingerprint,
                   const std::optional<std::string>& cert_cn) {
  const char* what = "medctl device add";
  if (cert_fingerprint && cert_cn)
    return fail(g,
                Status::InvalidArgument(
                    "give --cert-fingerprint or --cert-cn, not both (one certificate binding)"),
                what);
  json args = {{"id", id}, {"kind", kind}};
  if (patient) {
    std::string p = read_patient(*patient);
    if (p.empty()) return fail(g, Status::InvalidArgument("the patient identifier is empty"), what);
    args["patient"] = p;
    secure_wipe(p);
  }
  if (!hl7_app.empty()) args["hl7_application"] = hl7_app;
  if (!hl7_facility.empty()) args["hl7_facility"] = hl7_facility;
  if (!allow.empty()) args["allow"] = split_networks(allow);
  if (cert_fingerprint) args["cert_sha256"] = *cert_fingerprint;
  if (cert_cn) args["cert_cn"] = *cert_cn;
  if (psk_out && std::filesystem::exists(*psk_out))
    return fail(g, Status::InvalidArgument(*psk_out + " exists; refusing to overwrite it"), what);
  Result<json> r = call(g, "device.add", args);
  if (!r.ok()) return fail(g, r.status(), what);
  if (g.json) {
    json out = *r;
    if (psk_out) out.erase("psk");
    int rc = psk_out ? hand_out_psk(g, *r, psk_out, what) : 0;
    std::cout << out.dump(2) << "\n";
    return rc;
  }
  std::cout << "registered (ledger entry " << (*r)["entry"].get<std::uint64_t>() << ")\n";
  print_device(*r);
  return hand_out_psk(g, *r, psk_out, what);
}

int cmd_device_list(const GlobalOptions& g) {
  Result<json> r = call(g, "device.list");
  if (!r.ok()) return fail(g, r.status(), "medctl device list");
  if (g.json) {
    std::cout << r->dump(2) << "\n";
    return 0;
  }
  if ((*r)["devices"].empty()) std::cout << "no devices registered\n";
  for (const json& d : (*r)["devices"])
    std::cout << fmt::format("{:<24} {:<5} {:<8} {}\n", d["id"].get<std::string>(),
                             d["kind"].get<std::string>(), d["state"].get<std::string>(),
                             d["patient"].is_string()
                                 ? "patient " + short_hex(d["patient"].get<std::string>())
                                 : std::string());
  return 0;
}

int cmd_device_show(const GlobalOptions& g, const std::string& id) {
  Result<json> r = call(g, "device.show", {{"id", id}});
  if (!r.ok()) return fail(g, r.status(), "medctl device show");
  if (g.json)
    std::cout << r->dump(2) << "\n";
  else
    print_device(*r);
  return 0;
}

int cmd_device_allow(const GlobalOptions& g, const std::string& id,
                     const std::vector<std::string>& networks, bool any) {
  const char* what = "medctl device allow";
  if (any == !networks.empty())
    return fail(g,
                Status::InvalidArgument(
                    "give the networks the source may send from (e.g. 10.20.0.0/16 10.1.2.3), or "
                    "--any to allow every address"),
                what);
  Result<json> r = call(g, "device.allow", {{"id", id}, {"allow", split_networks(networks)}});
  if (!r.ok()) return fail(g, r.status(), what);
  if (g.json) {
    std::cout << r->dump(2) << "\n";
    return 0;
  }
  std::cout << "allow-list recorded (ledger entry " << (*r)["entry"].get<std::uint64_t>() << ")\n";
  print_device(*r);
  return 0;
}

int cmd_device_cert(const GlobalOptions& g, const std::string& id,
                    const std::optional<std::string>& fingerprint,
                    const std::optional<std::string>& cn, bool none) {
  const char* what = "medctl device cert";
  if (int given = (fingerprint ? 1 : 0) + (cn ? 1 : 0) + (none ? 1 : 0); given != 1)
    return fail(g,
                Status::InvalidArgument(
                    "give one of --fingerprint HEX (SHA-256 of the client certificate), --cn NAME "
                    "(its subject CN) or --none (any connection)"),
                what);
  json args = {{"id", id}};
  if (fingerprint) args["cert_sha256"] = *fingerprint;
  if (cn) args["cert_cn"] = *cn;
  Result<json> r = call(g, "device.cert", args);
  if (!r.ok()) return fail(g, r.status(), what);
  if (g.json) {
    std::cout << r->dump(2) << "\n";
    return 0;
  }
  std::cout << "certificate binding recorded (ledger entry " << (*r)["entry"].get<std::uint64_t>()
            << ")\n";
  print_device(*r);
  return 0;
}

int cmd_device_change(const GlobalOptions& g, const std::string& op, const std::string& id,
                      const std::optional<std::string>& patient,
                      const std::optional<std::string>& psk_out) {
  std::string what = "medctl device " + op;
  json args = {{"id", id}};
  if (patient) {
    std::string p = read_patient(*patient);
    if (p.empty())
      return fail(g, Status::InvalidArgument("the patient identifier is empty"), what.c_str());
    args["patient"] = p;
    secure_wipe(p);
  }
  if (psk_out && std::filesystem::exists(*psk_out))
    return fail(g, Status::InvalidArgument(*psk_out + " exists; refusing to overwrite it"),
                what.c_str());
  std::string api = op == "rotate-psk" ? "device.rotate_psk" : "device." + op;
  Result<json> r = call(g, api, args);
  if (!r.ok()) return fail(g, r.status(), what.c_str());
  if (g.json) {
    json out = *r;
    if (psk_out) out.erase("psk");
    int rc = psk_out ? hand_out_psk(g, *r, psk_out, what.c_str()) : 0;
    std::cout << out.dump(2) << "\n";
    return rc;
  }
  std::cout << op << " recorded (ledger entry " << (*r)["entry"].get<std::uint64_t>() << ")\n";
  print_device(*r);
  return hand_out_psk(g, *r, psk_out, what.c_str());
}

int cmd_patient_show(const GlobalOptions& g, const std::string& who) {
  const char* what = "medctl patient show";
  json args;
  bool is_pseudonym =
      who.size() == 64 && who.find_first_not_of("0123456789abcdefABCDEF") == std::string::npos;
  if (is_pseudonym) {
    args["pseudonym"] = who;
  } else {
    std::string p = read_patient(who);
    if (p.empty()) return fail(g, Status::InvalidArgument("the patient identifier is empty"), what);
    args["patient"] = p;
    secure_wipe(p);
  }
  Result<json> r = call(g, "patient.show", args);
  if (!r.ok()) return fail(g, r.status(), what);
  if (g.json) {
    std::cout << r->dump(2) << "\n";
    return 0;
  }
  const json& x = *r;
  std::cout << fmt::format("patient    {}\nstate      {}\ncreated    {}\n",
                           x["pseudonym"].get<std::string>(), x["state"].get<std::string>(),
                           x["created"].get<std::string>());
  if (x["identifier"].is_string())
    std::cout << "identifier " << x["identifier"].get<std::string>() << "\n";
  if (x.contains("erased_at"))
    std::cout << fmt::format("erased     {} (ledger entry {})\n", x["erased_at"].get<std::string>(),
                             x.value("erasure_entry", 0ULL));
  std::cout << fmt::format("this look is recorded as ledger entry {}\n",
                           x["recorded_as"].get<std::uint64_t>());
  return 0;
}

}  // namespace medgate::cli
