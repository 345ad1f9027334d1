// A real TPM 2.0 for tests: swtpm (libtpms) listening on a loopback TCP port pair, with its state
// in a directory of its own, started and stopped by the test. There is no resource manager in
// front of it: three transient object slots, and whatever a client forgets to flush stays.
#pragma once

#include <sys/types.h>

#include <filesystem>
#include <string>
#include <vector>

namespace medgate::testing {

class Swtpm {
 public:
  // Starts swtpm with its state in `dir`/swtpm-state on a free port pair (P for commands, P+1
  // for control), trying other pairs when a port is taken, and waits until it answers. Throws
  // std::runtime_error when it cannot be started. `dir` must outlive this object.
  explicit Swtpm(const std::filesystem::path& dir);
  ~Swtpm();  // stops it
  Swtpm(const Swtpm&) = delete;
  Swtpm& operator=(const Swtpm&) = delete;

  // "swtpm:host=127.0.0.1,port=P", a tctildr string; uri() is "tpm2:" + tcti().
  std::string tcti() const;
  std::string uri() const { return "tpm2:" + tcti(); }
  int port() const { return port_; }

  // Shuts it down the way its manual says (swtpm_ioctl -s saves the state) and waits; SIGKILL
  // when it has not gone after 5 s. Does nothing when it is not running.
  void stop();
  // stop() and start again on the same ports with the same state: the TPM's NV (counters, seeds)
  // survives, its transient objects and sessions do not (TPM2_Startup(CLEAR)).
  void restart();

  // Runs a tpm2-tools command (e.g. {"tpm2_getcap", "handles-transient"}) against this TPM and
  // returns what it printed (stdout and stderr). Throws std::runtime_error when it fails.
  std::string tool(const std::vector<std::string>& argv) const;
  // Extends SHA-256 PCR `pcr` with `hex` (64 hex digits) through tpm2_pcrextend.
  void extend_pcr(unsigned pcr, const std::string& hex) const;

 private:
  bool start_on(int port);
  static int run(const std::vector<std::string>& argv, const std::vector<std::string>& env = {},
                 const std::filesystem::path* output = nullptr);

  std::filesystem::path state_dir_;
  std::filesystem::path log_;
  std::filesystem::path tool_output_;
  int port_ = 0;
  pid_t pid_ = -1;
};

}  // namespace medgate::testing
