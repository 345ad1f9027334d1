#include "appliance/log.h"

#include <unistd.h>

#include <atomic>
#include <chrono>
#include <deque>
#include <mutex>
#include <string>

namespace medgate::appliance {
namespace {
std::atomic<int> g_level{static_cast<int>(LogLevel::kInfo)};
std::mutex g_mu;
std::deque<LoggedProblem> g_recent;  // under g_mu
}  // namespace

void set_log_level(LogLevel level) {
  g_level = static_cast<int>(level);
}
bool log_enabled(LogLevel level) {
  return static_cast<int>(level) <= g_level.load();
}

void log_line(LogLevel level, std::string_view id, std::string_view message) {
  std::string line = fmt::format("<{}>{}: {}\n", static_cast<int>(level), id, message);
  // One write per line so that concurrent lines never interleave.
  std::lock_guard lk(g_mu);
  ssize_t ignored = ::write(STDERR_FILENO, line.data(), line.size());
  (void)ignored;
  if (static_cast<int>(level) <= static_cast<int>(LogLevel::kWarning)) {
    const auto now = std::chrono::system_clock::now().time_since_epoch();
    g_recent.push_back({static_cast<std::uint64_t>(
                            std::chrono::duration_cast<std::chrono::microseconds>(now).count()),
                        level, std::string(id), std::string(message)});
    if (g_recent.size() > kRecentProblems) g_recent.pop_front();
  }
}

std::vector<LoggedProblem> recent_problems() {
  std::lock_guard lk(g_mu);
  return {g_recent.begin(), g_recent.end()};
}

}  // namespace medgate::appliance
