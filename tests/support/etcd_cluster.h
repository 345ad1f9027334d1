// A real etcd cluster for tests: 1 or 3 `etcd` processes on free loopback ports (never 2379/2380,
// where Debian's own etcd.service may listen), each with its data in a directory of its own,
// started and stopped by the test. Heartbeat 50 ms and election timeout 500 ms, so losing the
// leader costs well under a second. Only the processes this object started are ever signalled,
// by PID.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

namespace medgate::testing {

// TLS on the members' client URLs (https; peers stay on loopback http): the members' certificate
// and key, the CA that signed it and, with client_cert_auth, the client certificates members
// accept. client_cert/client_key are what the fixture's own checks (etcdctl) present.
struct EtcdTlsFiles {
  std::filesystem::path ca;
  std::filesystem::path server_cert;
  std::filesystem::path server_key;
  std::filesystem::path client_cert;
  std::filesystem::path client_key;
  bool client_cert_auth = false;
};

class EtcdCluster {
 public:
  // Starts `members` members (1 or 3) with their data under `dir`/etcd-N and waits until every
  // one says it is healthy (10 s at most). Throws std::runtime_error naming the member and the
  // tail of its log when that fails. `dir` must outlive this object.
  EtcdCluster(const std::filesystem::path& dir, int members,
              std::optional<EtcdTlsFiles> tls = std::nullopt);
  ~EtcdCluster();  // SIGTERM to every running member, SIGKILL after 5 s
  EtcdCluster(const EtcdCluster&) = delete;
  EtcdCluster& operator=(const EtcdCluster&) = delete;

  int size() const { return static_cast<int>(members_.size()); }
  // "http://127.0.0.1:P" (https with TLS), the client URL of member i.
  std::string endpoint(int i) const;
  std::vector<std::string> endpoints() const;
  pid_t pid(int i) const { return members_.at(static_cast<std::size_t>(i)).pid; }
  bool running(int i) const { return pid(i) > 0; }

  // kill -9 member i and reap it.
  void kill(int i);
  // Starts member i again on its ports with its data directory and waits until it is healthy.
  void restart(int i);
  // Waits until member i answers /health with true; throws after `timeout`.
  void wait_healthy(int i, std::chrono::milliseconds timeout = std::chrono::seconds(10)) const;
  // Runs etcdctl against the running members (e.g. {"compact", "12"}) and returns its output;
  // throws std::runtime_error with the output when it fails.
  std::string etcdctl(const std::vector<std::string>& args) const;

 private:
  struct Member {
    std::string name;
    int client_port = 0;
    int peer_port = 0;
    std::filesystem::path data_dir;
    std::filesystem::path log;
    pid_t pid = -1;
  };

  bool start_all(int members);
  void spawn_member(Member& m);
  void stop_all();
  std::string log_tail(const Member& m) const;

  bool member_healthy(const Member& m) const;

  std::filesystem::path dir_;
  std::optional<EtcdTlsFiles> tls_;
  std::string initial_cluster_;
  std::string token_;
  std::vector<Member> members_;
};

}  // namespace medgate::testing
