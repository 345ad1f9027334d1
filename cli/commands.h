// medctl's commands. Each returns medctl's exit code (../shared/CLI.md): 0 success, 1 a negative
// answer (verification failed, permission denied), 2 bad usage or input, 3 a part unreachable.
// With --json each prints exactly one JSON document on stdout; messages go to stderr.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "hsm/status.h"

namespace CLI {
class App;
}

namespace medgate::cli {

struct GlobalOptions {
  std::optional<std::string> socket;
  std::optional<std::string> config;
  bool json = false;
};

// Reports a failure the way every command does: a message on stderr, and with --json the error
// document on stdout too. Returns the exit code.
int fail(const GlobalOptions& g, const Status& s, std::string_view what = "medctl");
// One request to the daemon.
Result<nlohmann::json> call(const GlobalOptions& g, std::string_view op,
                            const nlohmann::json& args = nlohmann::json::object());
// A patient argument: "-" reads the identifier from stdin, keeping it out of the process list and
// the shell's history.
std::string read_patient(std::string patient);

// medctl rules|directory|consent|data and patient enroll (cli/consent_commands.cc).
void add_consent_commands(CLI::App& app, const GlobalOptions& g, int& rc);
// medctl audit export|verify (cli/audit_commands.cc).
void add_audit_commands(CLI::App& app, const GlobalOptions& g, int& rc);
// medctl backup | restore (cli/backup_commands.cc).
void add_backup_commands(CLI::App& app, const GlobalOptions& g, int& rc);
// cluster_commands.cc: medctl cluster init|status, member propose|remove|approve|list.
void add_cluster_commands(CLI::App& app, const GlobalOptions& g, int& rc);

struct InitArgs {
  // Without a data dir, init completes an existing config: --config FILE, else the package's
  // /etc/medgate/medgated.toml.
  std::optional<std::string> data_dir;
  std::optional<std::string> key_store;  // default (with a data dir): softhsm
  std::optional<std::string> ledger_id;
  std::optional<std::string> socket;
  std::optional<std::string> pin_file;
  std::optional<std::string> pin_env;
  std::optional<std::string> seal_pcrs;  // tpm2: "7", "0,7"
  // Joining a replicated ledger (docs/replication.md): etcd URLs, then who this appliance is and
  // whom it trusts.
  std::optional<std::string> join, member_id, endpoint, prefix, trust;
};

int cmd_init(const GlobalOptions& g, const InitArgs& args);
int cmd_status(const GlobalOptions& g);
int cmd_ledger_head(const GlobalOptions& g);
// Online through the daemon, or offline when `db` is given (then `trust` is required).
int cmd_ledger_verify(const GlobalOptions& g, const std::optional<std::string>& db,
                      const std::vector<std::string>& trust);
int cmd_ledger_show(const GlobalOptions& g, std::optional<std::uint64_t> entry,
                    std::optional<std::uint64_t> block);
int cmd_ledger_proof(const GlobalOptions& g, std::uint64_t entry,
                     std::optional<std::uint64_t> size);
int cmd_ledger_consistency(const GlobalOptions& g, std::uint64_t from,
                           std::optional<std::uint64_t> to);
int cmd_ledger_sign_head(const GlobalOptions& g);
int cmd_keys_show(const GlobalOptions& g);
int cmd_keys_rotate(const GlobalOptions& g);
int cmd_device_add(const GlobalOptions& g, const std::string& id, const std::string& kind,
                   const std::optional<std::string>& patient, const std::string& hl7_app,
                   const std::string& hl7_facility, const std::optional<std::string>& psk_out,
                   const std::vector<std::string>& allow,
                   const std::optional<std::string>& cert_fingerprint = std::nullopt,
                   const std::optional<std::string>& cert_cn = std::nullopt);
int cmd_device_list(const GlobalOptions& g);
// WHO: a pseudonym (64 hex digits), an identifier, or - to read the identifier from stdin.
int cmd_patient_show(const GlobalOptions& g, const std::string& who);
int cmd_device_show(const GlobalOptions& g, const std::string& id);
// op: bind (patient), revoke, rotate-psk (psk_out)
// An HL7 source's address allow-list: the networks it may send from; empty: any address.
int cmd_device_allow(const GlobalOptions& g, const std::string& id,
                     const std::vector<std::string>& networks, bool any);
// An HL7 source's TLS client certificate: its SHA-256 fingerprint or subject CN; `none`: any
// connection (exactly one of the three).
int cmd_device_cert(const GlobalOptions& g, const std::string& id,
                    const std::optional<std::string>& fingerprint,
                    const std::optional<std::string>& cn, bool none);
int cmd_device_change(const GlobalOptions& g, const std::string& op, const std::string& id,
                      const std::optional<std::string>& patient,
                      const std::optional<std::string>& psk_out);
// Crypto-shreds a patient's data key (recorded on the ledger). `patient` "-" reads the identifier
// from stdin, which keeps it out of the process list and the shell's history. On a terminal the
// admin is asked to confirm unless `yes`.
int cmd_patient_erase(const GlobalOptions& g, std::string patient, const std::string& reason,
                      bool yes);

}  // namespace medgate::cli
