// medgated's log: one line per event on stderr with a journald priority prefix ("<6>"), a stable
// message id an admin can grep ("ledger.open"), and a message. Never PHI: log identifiers of
// entries, blocks and keys, never payloads or patient identifiers. Thread-safe.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include <fmt/format.h>

#include "appliance/config.h"

namespace medgate::appliance {

void set_log_level(LogLevel level);
bool log_enabled(LogLevel level);
void log_line(LogLevel level, std::string_view id, std::string_view message);

// The latest warnings and errors (newest last, at most kRecentProblems), kept in memory for
// `medctl status`: the same PHI-free lines the log has.
struct LoggedProblem {
  std::uint64_t time_us = 0;
  LogLevel level = LogLevel::kWarning;
  std::string id;
  std::string message;
};
inline constexpr std::size_t kRecentProblems = 8;
std::vector<LoggedProblem> recent_problems();

template <typename... Args>
void log(LogLevel level, std::string_view id, fmt::format_string<Args...> format, Args&&... args) {
  if (log_enabled(level)) log_line(level, id, fmt::format(format, std::forward<Args>(args)...));
}

}  // namespace medgate::appliance
