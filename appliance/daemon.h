// medgated itself: opens the key store and the ledger named by the config, serves the admin API,
// and on stop commits what it accepted and signs a final head.
#pragma once

#include <memory>

#include "appliance/config.h"
#include "hsm/status.h"

namespace medgate::appliance {

class Daemon {
 public:
  // Refuses to start, with a Status naming the cause, on: an unreachable token or wrong PIN
  // (kUnavailable / kPermissionDenied), a ledger that is missing, in use, or whose latest head
  // does not verify, an admin socket in use.
  static Result<std::unique_ptr<Daemon>> start(const Config& config);
  ~Daemon();

  // Blocks until SIGTERM or SIGINT (which the caller must have blocked in every thread), then
  // stops cleanly.
  void run_until_signal();
  void stop();

  class Impl;

 private:
  explicit Daemon(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace medgate::appliance
