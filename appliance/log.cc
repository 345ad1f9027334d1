#include "appliance/log.h"

#include <unistd.h>

#include <atomic>
#include <mutex>
#include <string>

namespace medgate::appliance {
namespace {
std::atomic<int> g_level{static_cast<int>(LogLevel::kInfo)};
std::mutex g_mu;
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
}

}  // namespace medgate::appliance
