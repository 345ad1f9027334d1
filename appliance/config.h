// medgated's configuration: one TOML file (medgated.toml(5)). Unknown keys are errors, so a typo
// is caught at start rather than silently ignored; every error names the file and line.
#pragma once

#include <chrono>
#include <filesystem>
#include <string>
#include <string_view>

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
  LogLevel log_level = LogLevel::kInfo;
};

// kInvalidArgument "FILE:LINE: ..." for syntax errors, unknown keys, wrong types, missing
// required keys and impossible values. Relative paths are resolved against the file's directory.
Result<Config> load_config(const std::filesystem::path& file);
Result<Config> parse_config(std::string_view text, const std::filesystem::path& source);

// The commented TOML that `medctl init` writes.
std::string render_config(const Config& config);

}  // namespace medgate::appliance
