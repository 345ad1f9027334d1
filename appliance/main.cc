// medgated: the medgate daemon. `medgated --config FILE` runs in the foreground (systemd
// Type=notify); `medgated init ...` is what `medctl init` runs; `medgated ip-allow` prints the
// unit's IP allow-list drop-in from the config.
#include <pwd.h>
#include <signal.h>
#include <systemd/sd-daemon.h>
#include <unistd.h>

#include <fstream>
#include <iostream>

#include <fmt/format.h>
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "appliance/admin_protocol.h"
#include "appliance/config.h"
#include "appliance/daemon.h"
#include "appliance/hl7/tls.h"
#include "appliance/init.h"
#include "appliance/log.h"
#include "appliance/restore.h"

using namespace medgate;
using namespace medgate::appliance;

namespace {

std::string invoking_actor() {
  uid_t uid = ::getuid();
  if (struct passwd* pw = ::getpwuid(uid)) return std::string("user:") + pw->pw_name;
  return "uid:" + std::to_string(uid);
}

int run_daemon(const std::string& config_path) {
  // Block the stop signals in every thread; run_until_signal() waits for them.
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  ::signal(SIGPIPE, SIG_IGN);

  Result<Config> config = load_config(config_path);
  if (!config.ok()) {
    log(LogLevel::kError, "config.invalid", "{}", config.status().message());
    return 2;
  }
  Result<std::unique_ptr<Daemon>> daemon = Daemon::start(*config);
  if (!daemon.ok()) {
    log(LogLevel::kError, "daemon.refused", "not starting: {}", daemon.status().to_string());
    return daemon.status().code() == StatusCode::kUnavailable ? 3 : 1;
  }
  sd_notify(0, "READY=1");
  log(LogLevel::kInfo, "daemon.ready", "ready");
  (*daemon)->run_until_signal();
  log(LogLevel::kInfo, "daemon.exit", "stopped cleanly");
  return 0;
}

int run_init(const InitOptions& options, bool json) {
  Result<InitResult> r = initialize(options);
  if (!r.ok()) {
    if (json) std::cout << admin::error_response(r.status()).dump() << "\n";
    std::cerr << "medctl init: " << r.status().message() << "\n";
    return admin::exit_code(r.status().code());
  }
  if (json) {
    std::cout << nlohmann::json{{"ledger_id", r->ledger_id},
                                {"config", r->config.string()},
                                {"ledger", r->ledger.string()},
                                {"public_key", r->public_key.string()},
                                {"socket", r->socket.string()},
                                {"key_id", to_hex(r->key_id)},
                                {"key_store", r->key_store},
                                {"config_written", r->config_written},
                                {"pin_file", r->pin_file ? r->pin_file->string() : ""},
                                {"joined_as", r->joined_as ? *r->joined_as : ""},
                                {"agreement_key",
                                 r->agreement_key ? r->agreement_key->string() : ""}}
                     .dump(2)
              << "\n";
  } else {
    std::cout << (r->joined_as ? "Joined ledger '" : "Created ledger '") << r->ledger_id << "'"
              << (r->joined_as ? " as member candidate \"" + *r->joined_as + "\"" : "") << "\n"
              << "  ledger      " << r->ledger.string() << "\n"
              << "  key store   " << r->key_store << "\n"
              << "  signing key " << to_hex(r->key_id) << "\n"
              << "  public key  " << r->public_key.string() << "  (give this to auditors)\n"
              << "  config      " << r->config.string()
              << (r->config_written ? "" : "  (used as it is)") << "\n";
    if (r->pin_file) std::cout << "  token PIN   " << r->pin_file->string() << "  (0600)\n";
    if (r->joined_as)
      std::cout << "A member adds it with: medctl member propose add " << *r->joined_as << " --key "
                << r->public_key.string() << " --agreement-key "
                << (r->agreement_key ? r->agreement_key->string() : "") << " --endpoint ENDPOINT\n";
    if (r->config == "/etc/medgate/medgated.toml")
      std::cout << "Start the service with: systemctl enable --now medgated\n";
    else
      std::cout << "Start the daemon with: medgated --config " << r->config.string() << "\n";
  }
  return 0;
}

int run_restore(const RestoreOptions& options, bool json) {
  Result<RestoreResult> r = restore_backup(options);
  if (!r.ok()) {
    if (json) std::cout << admin::error_response(r.status()).dump() << "\n";
    std::cerr << "medctl restore: " << r.status().message() << "\n";
    return admin::exit_code(r.status().code());
  }
  nlohmann::json out = {{"ledger_id", r->ledger_id},
                        {"backup_created", r->backup_created},
                        {"backup_entries", r->backup_entries},
                        {"backup_rollback_counter", r->backup_rollback_counter},
                        {"key_store_counter", r->key_store_counter},
                        {"replaced_entries", r->replaced_entries},
                        {"discarded_entries", r->discarded_entries},
                        {"restore_entry", r->restore_entry},
                        {"erasures_reapplied", r->erasures_reapplied},
                        {"entries", r->entries}};
  if (json) {
    std::cout << out.dump(2) << "\n";
    return 0;
  }
  std::cout << fmt::format(
      "Restored ledger '{}' from a backup of {} ({} entries, rollback counter {})\n"
      "  recorded as entry {}; the ledger now holds {} entries, its latest head carries the key "
      "store's counter again\n",
      r->ledger_id, r->backup_created, r->backup_entries, r->backup_rollback_counter,
      r->restore_entry, r->entries);
  if (r->erasures_reapplied > 0)
    std::cout << fmt::format("  {} patients erased after the backup were erased again\n",
                             r->erasures_reapplied);
  if (r->replaced_entries > 0)
    std::cout << fmt::format(
        "  replaced a ledger of {} entries ({} discarded), kept as *.before-restore\n",
        r->replaced_entries, r->discarded_entries);
  return 0;
}

bool write_text(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
  out.close();
  return static_cast<bool>(out);
}

int run_tls_key(const std::string& config_path, const hl7::TlsKeyRequest& request,
                const std::string& csr_out, const std::string& cert_out) {
  if (csr_out.empty() && cert_out.empty()) {
    std::cerr << "medgated tls-key: give --csr-out FILE (to have the hospital CA sign it) and/or "
                 "--cert-out FILE (self-signed)\n";
    return 2;
  }
  Result<Config> config = load_config(config_path);
  if (!config.ok()) {
    std::cerr << "medgated tls-key: " << config.status().message() << "\n";
    return 2;
  }
  Result<hl7::TlsKeyIssue> issue = hl7::issue_tls_key(config->key_store, request);
  if (!issue.ok()) {
    std::cerr << "medgated tls-key: " << issue.status().message() << "\n";
    return admin::exit_code(issue.status().code());
  }
  for (const auto& [path, text] :
       {std::pair{csr_out, issue->csr_pem}, {cert_out, issue->cert_pem}}) {
    if (path.empty()) continue;
    if (!write_text(path, text)) {
      std::cerr << "medgated tls-key: cannot write " << path << "\n";
      return 2;
    }
  }
  std::cout << (issue->created ? "Created" : "Kept") << " the TLS key in the key store\n"
            << "  key         " << issue->location << "\n"
            << "  public key  sha256 " << issue->key_sha256 << "\n";
  if (!csr_out.empty())
    std::cout << "  CSR         " << csr_out << "  (have the hospital CA sign it)\n";
  if (!cert_out.empty()) std::cout << "  certificate " << cert_out << "  (self-signed)\n";
  std::cout << "Then set [hl7] tls = true and tls_cert = the certificate chain, and restart "
               "medgated.\n";
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"medgated: the medgate appliance daemon"};
  app.set_version_flag("--version", std::string("medgated ") + MEDGATE_VERSION);
  std::string config_path;
  app.add_option("--config", config_path, "configuration file (TOML)");

  InitOptions init;
  bool init_json = false;
  std::string pin_file, pin_env;
  CLI::App* init_cmd =
      app.add_subcommand("init", "create the key store, ledger and config (used by `medctl init`)");
  init_cmd->add_option("--data-dir", init.data_dir, "data directory (init writes the config)");
  init_cmd->add_option("--from-config", init.existing_config,
                       "make what this existing config describes (instead of --data-dir)");
  init_cmd->add_option("--key-store", init.key_store, "softhsm | pkcs11:URI | tpm2[:TCTI]");
  init_cmd->add_option("--ledger-id", init.ledger_id, "the ledger's name (default: the host name)");
  init_cmd->add_option("--config-out", init.config_out,
                       "where to write the config (default: DIR/medgated.toml)");
  init_cmd->add_option("--socket", init.socket, "admin socket path (default: DIR/admin.sock)");
  init_cmd->add_option("--pin-file", pin_file, "file holding the token PIN (pkcs11: key stores)");
  init_cmd->add_option("--pin-env", pin_env, "environment variable holding the token PIN");
  std::string seal_pcrs;
  init_cmd->add_option("--seal-pcrs", seal_pcrs,
                       "tpm2: seal the data-key secret to these PCRs (SHA-256), e.g. 7 or 0,7");
  init_cmd->add_flag("--json", init_json, "print the result as JSON");
  JoinOptions join;
  std::string join_etcd;
  init_cmd->add_option("--join", join_etcd,
                       "join the replicated ledger ordered by this etcd cluster (comma-separated "
                       "client URLs) instead of creating one");
  init_cmd->add_option("--member-id", join.member_id, "with --join: this appliance's member id");
  init_cmd->add_option("--endpoint", join.endpoint,
                       "with --join: host:port other members reach this appliance at");
  init_cmd->add_option("--prefix", join.prefix,
                       "with --join: the ledger's etcd key prefix (default /medgate/LEDGER-ID/)");
  init_cmd->add_option("--trust", join.trust,
                       "with --join: the founding appliance's public key (PEM)");

  std::string allow_config = "/etc/medgate/medgated.toml";
  CLI::App* ip_allow_cmd = app.add_subcommand(
      "ip-allow",
      "print the unit's IP allow-list drop-in (IPAddressDeny=any, IPAddressAllow=) from the "
      "config's [network] allow");
  ip_allow_cmd->add_option("--config", allow_config, "configuration file (TOML)");

  hl7::TlsKeyRequest tls_key;
  std::string tls_config = "/etc/medgate/medgated.toml";
  std::string tls_csr_out, tls_cert_out;
  CLI::App* tls_key_cmd = app.add_subcommand(
      "tls-key",
      "create the MLLP listener's TLS key in the key store (kept if it exists) and write a CSR "
      "and/or a self-signed certificate for it");
  tls_key_cmd->add_option("--config", tls_config, "configuration file (TOML)");
  tls_key_cmd->add_option("--cn", tls_key.common_name, "the certificate's subject CN")->required();
  tls_key_cmd->add_option("--san", tls_key.alt_names,
                          "subjectAltName: DNS:name, IP:address, or a bare name or address "
                          "(repeatable; default: the CN)");
  tls_key_cmd->add_option("--days", tls_key.days, "self-signed certificate validity")
      ->capture_default_str();
  tls_key_cmd->add_option("--csr-out", tls_csr_out, "write the CSR (PEM) here, for the CA");
  tls_key_cmd->add_option("--cert-out", tls_cert_out, "write a self-signed certificate here");

  RestoreOptions restore;
  bool restore_json = false;
  std::string restore_config = "/etc/medgate/medgated.toml";
  CLI::App* restore_cmd = app.add_subcommand(
      "restore", "restore a backup into the stopped appliance (used by `medctl restore`)");
  restore_cmd->add_option("FILE", restore.backup, "the backup file (medctl backup)")->required();
  restore_cmd->add_option("--config", restore_config, "configuration file (TOML)");
  restore_cmd->add_flag("--discard-newer", restore.discard_newer,
                        "drop the current ledger's entries beyond the backup's (recorded)");
  restore_cmd->add_flag("--json", restore_json, "print the result as JSON");

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;
  }
  if (*init_cmd) {
    if (init.data_dir.empty() == !init.existing_config) {
      std::cerr << "medctl init: give either --data-dir DIR (init writes a config there) or an "
                   "existing config to complete\n";
      return 2;
    }
    if (init.existing_config && init_cmd->count("--key-store") > 0) {
      std::cerr << "medctl init: the key store comes from the config's [key_store] section; "
                   "leave out --key-store\n";
      return 2;
    }
    if (!pin_file.empty()) init.pin = {hsm::PinSource::Kind::kFile, pin_file};
    if (!pin_env.empty()) init.pin = {hsm::PinSource::Kind::kEnv, pin_env};
    Result<std::vector<unsigned>> pcrs = parse_pcr_list(seal_pcrs);
    if (!pcrs.ok()) {
      std::cerr << "medctl init: --seal-pcrs: " << pcrs.status().message() << "\n";
      return 2;
    }
    init.seal_pcrs = std::move(pcrs).value();
    if (!join_etcd.empty()) {
      for (std::size_t start = 0; start <= join_etcd.size();) {
        std::size_t comma = join_etcd.find(',', start);
        if (comma == std::string::npos) comma = join_etcd.size();
        if (comma > start) join.etcd.push_back(join_etcd.substr(start, comma - start));
        start = comma + 1;
      }
      if (join.member_id.empty() || join.endpoint.empty() || join.trust.empty()) {
        std::cerr << "medctl init: --join needs --member-id, --endpoint and --trust FOUNDER.pem\n";
        return 2;
      }
      init.join = std::move(join);
    } else if (!join.member_id.empty() || !join.endpoint.empty() || !join.trust.empty() ||
               !join.prefix.empty()) {
      std::cerr << "medctl init: --member-id, --endpoint, --prefix and --trust go with --join\n";
      return 2;
    }
    init.actor = invoking_actor();
    return run_init(init, init_json);
  }
  if (*restore_cmd) {
    restore.config = restore_config;
    restore.actor = invoking_actor();
    return run_restore(restore, restore_json);
  }
  if (*tls_key_cmd) return run_tls_key(tls_config, tls_key, tls_csr_out, tls_cert_out);
  if (*ip_allow_cmd) {
    Result<Config> config = load_config(allow_config);
    Result<std::string> dropin =
        config.ok() ? render_ip_allow_dropin(*config) : Result<std::string>(config.status());
    if (!dropin.ok()) {
      std::cerr << "medgated ip-allow: " << dropin.status().message() << "\n";
      return 2;
    }
    std::cout << *dropin;
    return 0;
  }
  if (config_path.empty()) {
    std::cerr << "medgated: --config FILE is required (see medgated --help)\n";
    return 2;
  }
  return run_daemon(config_path);
}
