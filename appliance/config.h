// medgated's configuration: one TOML file (medgated.toml(5)). Unknown keys are errors, so a typo
// is caught at start rather than silently ignored; every error names the file and line.
#pragma once

#include <chrono>
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

#include "appliance/coap/server.h"
#include "appliance/metrics.h"
#include "appliance/hl7/listener.h"
#include "hsm/key_store_factory.h"
#include "hsm/status.h"

namespace medgate::appliance {

enum class LogLevel { kError = 3, kWarning = 4, kNotice = 5, kInfo = 6, kDebug = 7 };

struct AdminConfig {
  std::filesystem::path socket;
  std::string admin_group = "medgate-admin";    // may change state
  std::string auditor_group = "medgate-audit";  // may read and export
  std::size_t max_request_bytes = 1 << 20;
  int max_connections = 32;
  std::chrono::seconds idle_timeout{60};
};

struct Config {
  std::filesystem::path source;  // the file this came from
  std::string ledger_id;
  std::filesystem::path data_dir;
  std::filesystem::path ledger_path;  // default: data_dir/ledger.db
  std::chrono::milliseconds head_interval{1000};
  std::chrono::seconds counter_interval{300};  // rollback-counter epochs (ledger/store.h)
  hsm::KeyStoreConfig key_store;
  AdminConfig admin;
  // Ingest listeners; absent (or `enabled = false`): not started.
  std::optional<hl7::MllpListenerConfig> hl7;
  std::optional<coap::CoapServerConfig> coap;
  LogLevel log_level = LogLevel::kInfo;
  // [network] allow: the networks devices and peers live on ("10.20.0.0/16", "fd00:7::/64",
  // "192.168.7.12", or systemd's "localhost", "link-local", "multicast"), in the order written.
  // medgated does not filter by it itself: `medgated ip-allow` turns it into the unit's
  // IPAddressDeny=any + IPAddressAllow= drop-in, and the kernel filters (cgroup BPF).
  std::vector<std::string> ip_allow;
  // [metrics] listen: the Prometheus endpoint on loopback; absent: off.
  std::optional<MetricsConfig> metrics;
};

// kInvalidArgument "FILE:LINE: ..." for syntax errors, unknown keys, wrong types, missing
// required keys and impossible values. Relative paths are resolved against the file's directory.
Result<Config> load_config(const std::filesystem::path& file);
Result<Config> parse_config(std::string_view text, const std::filesystem::path& source);

// A PCR list as written in [key_store] seal_pcrs and `--seal-pcrs`: "7", "0,7" (SHA-256 bank,
// PCRs 0 to 23, each once); "" is no PCR. kInvalidArgument naming what is wrong.
Result<std::vector<unsigned>> parse_pcr_list(std::string_view text);

// The commented TOML that `medctl init` writes.
std::string render_config(const Config& config);

// The systemd drop-in for medgated.service that `medgated ip-allow` prints: IPAddressDeny=any,
// IPAddressAllow=localhost and the config's [network] allow. kInvalidArgument when the config has
// no [network] allow (there is nothing to restrict to).
Result<std::string> render_ip_allow_dropin(const Config& config);

}  // namespace medgate::appliance
