// What the benchmarks share: number formatting, a plain-text table, what the machine is, latency
// percentiles and the disk's fsync floor. Benchmarks print numbers; nothing here judges them.
#pragma once

#include <fcntl.h>
#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include <fmt/format.h>

#include "hsm/status.h"

namespace medgate::bench {

// 1234567 -> "1,234,567"
inline std::string grouped(std::uint64_t v) {
  std::string digits = std::to_string(v), out;
  for (std::size_t i = 0; i < digits.size(); ++i) {
    if (i > 0 && (digits.size() - i) % 3 == 0) out += ',';
    out += digits[i];
  }
  return out;
}

inline std::string rate(double per_second) {
  return grouped(static_cast<std::uint64_t>(per_second + 0.5));
}

// A plain-text table: the first column left-aligned, the others right-aligned, widths from content.
class Table {
 public:
  explicit Table(std::vector<std::string> headers) { rows_.push_back(std::move(headers)); }
  void row(std::vector<std::string> cells) { rows_.push_back(std::move(cells)); }
  void print(bool blank_line_after = false) const {
    std::vector<std::size_t> width;
    for (const auto& r : rows_) {
      if (width.size() < r.size()) width.resize(r.size(), 0);
      for (std::size_t c = 0; c < r.size(); ++c) width[c] = std::max(width[c], r[c].size());
    }
    for (const auto& r : rows_) {
      std::string line;
      for (std::size_t c = 0; c < r.size(); ++c) {
        if (c == 0)
          line += fmt::format("{:<{}}", r[c], width[c]);
        else
          line += fmt::format("  {:>{}}", r[c], width[c]);
      }
      while (!line.empty() && line.back() == ' ') line.pop_back();
      fmt::print("  {}\n", line);
    }
    if (blank_line_after) fmt::print("\n");
    std::fflush(stdout);
  }

 private:
  std::vector<std::vector<std::string>> rows_;
};

// ---- the machine ----

// The value after the colon of the first line of `file` that starts with `key` ("?" if none).
inline std::string first_line_with(const std::filesystem::path& file, std::string_view key) {
  std::ifstream in(file);
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(key, 0) != 0) continue;
    std::size_t colon = line.find(':');
    std::string v = colon == std::string::npos ? line : line.substr(colon + 1);
    v.erase(0, v.find_first_not_of(" \t"));
    return v;
  }
  return "?";
}

inline int cpus_available() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof set, &set) != 0)
    return static_cast<int>(std::thread::hardware_concurrency());
  return CPU_COUNT(&set);
}

inline std::string utc_now() {
  std::time_t t = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%d %H:%M:%SZ", &tm);
  return buf;
}

inline std::string load_average() {
  double load[3] = {0, 0, 0};
  if (std::FILE* f = std::fopen("/proc/loadavg", "r")) {
    if (std::fscanf(f, "%lf %lf %lf", &load[0], &load[1], &load[2]) != 3) load[0] = -1;
    std::fclose(f);
  }
  return fmt::format("{:.2f} {:.2f} {:.2f}", load[0], load[1], load[2]);
}

// ---- latencies ----

struct Percentiles {
  double p50_ms = 0, p99_ms = 0, max_ms = 0, mean_ms = 0;
};

// Of latencies in nanoseconds.
inline Percentiles percentiles(std::vector<std::int64_t> ns) {
  if (ns.empty()) return {};
  auto at = [&](double q) {
    auto k = static_cast<std::size_t>(q * static_cast<double>(ns.size() - 1));
    std::nth_element(ns.begin(), ns.begin() + static_cast<std::ptrdiff_t>(k), ns.end());
    return static_cast<double>(ns[k]) / 1e6;
  };
  double sum = 0;
  for (std::int64_t v : ns) sum += static_cast<double>(v);
  return {at(0.50), at(0.99), at(1.0), sum / static_cast<double>(ns.size()) / 1e6};
}

// What one durable commit costs the disk at the least: a 4 KiB append and fdatasync (what SQLite
// does to its WAL per commit with synchronous=FULL), timed `n` times in `dir`.
inline Result<Percentiles> probe_fsync(const std::filesystem::path& dir, int n) {
  using Clock = std::chrono::steady_clock;
  std::filesystem::path file = dir / "fsync-probe";
  int fd = ::open(file.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) return Status::IOError(fmt::format("cannot create {}", file.string()));
  std::vector<char> page(4096, 'x');
  std::vector<std::int64_t> ns;
  for (int i = 0; i < n; ++i) {
    auto t0 = Clock::now();
    bool ok = ::write(fd, page.data(), page.size()) == static_cast<ssize_t>(page.size()) &&
              ::fdatasync(fd) == 0;
    if (!ok) {
      ::close(fd);
      return Status::IOError(fmt::format("write or fdatasync on {} failed", file.string()));
    }
    ns.push_back(std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - t0).count());
  }
  ::close(fd);
  std::filesystem::remove(file);
  return percentiles(std::move(ns));
}

}  // namespace medgate::bench
