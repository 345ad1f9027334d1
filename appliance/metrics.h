// A Prometheus text endpoint on loopback (off by default; [metrics] listen in medgated.toml), for
// a node agent on the box to scrape: ingest, ledger, decision and error counters. It serves
// GET /metrics and nothing else, one short connection at a time, and never anything about a
// patient: the numbers come from the same status the admin channel reports (no identifiers, no
// pseudonyms), labelled by device id at most.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <string>
#include <thread>

#include <nlohmann/json_fwd.hpp>

#include "hsm/status.h"

namespace medgate::appliance {

struct MetricsConfig {
  std::string address = "127.0.0.1";  // loopback only: 127.0.0.0/8 or ::1
  std::uint16_t port = 9464;          // 0: any free port (tests)
};

// "127.0.0.1:9464", "[::1]:9464", "localhost:9464". kInvalidArgument naming the problem, also for
// an address that is not loopback.
Result<MetricsConfig> parse_metrics_listen(std::string_view text);

class MetricsServer {
 public:
  using Render = std::function<std::string()>;
  MetricsServer() = default;
  ~MetricsServer();
  MetricsServer(const MetricsServer&) = delete;
  MetricsServer& operator=(const MetricsServer&) = delete;

  // Binds and starts serving; `render` is called on the server's thread once per scrape.
  // kUnavailable when the port cannot be bound.
  Status start(const MetricsConfig& config, Render render);
  std::uint16_t port() const { return port_; }
  std::uint64_t scrapes() const { return scrapes_.load(); }
  std::uint64_t bad_requests() const { return bad_requests_.load(); }
  void stop();

 private:
  void run();
  void serve(int fd);

  Render render_;
  int listen_fd_ = -1;
  int wake_fd_ = -1;
  std::uint16_t port_ = 0;
  std::thread thread_;
  std::atomic<std::uint64_t> scrapes_{0}, bad_requests_{0};
};

// The exposition text (format 0.0.4) for the daemon's status (the admin channel's "status" answer)
// and its devices (device.list entries with their "traffic").
std::string render_metrics(const nlohmann::json& status, const nlohmann::json& devices);

}  // namespace medgate::appliance
