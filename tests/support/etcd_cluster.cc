#include "tests/support/etcd_cluster.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fstream>
#include <random>
#include <set>
#include <sstream>
#include <stdexcept>
#include <thread>

extern char** environ;

namespace medgate::testing {
namespace {

using Clock = std::chrono::steady_clock;

// True when `port` on 127.0.0.1 can be bound now (etcd may still lose a race for it; the
// constructor then starts over on other ports).
bool port_free(int port) {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return false;
  int one = 1;
  ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<std::uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  bool ok = ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0;
  ::close(fd);
  return ok;
}

// GET /health on 127.0.0.1:port over a plain socket (the fixture needs no HTTP library): true
// when etcd says {"health":"true"}.
bool healthy(int port) {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return false;
  timeval tv{1, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<std::uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  std::string answer;
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0) {
    const std::string request = "GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n";
    if (::send(fd, request.data(), request.size(), MSG_NOSIGNAL) ==
        static_cast<ssize_t>(request.size())) {
      char buf[1024];
      ssize_t n;
      while ((n = ::recv(fd, buf, sizeof buf, 0)) > 0)
        answer.append(buf, static_cast<std::size_t>(n));
    }
  }
  ::close(fd);
  return answer.find("\"health\":\"true\"") != std::string::npos;
}

pid_t spawn(const std::vector<std::string>& argv, const std::filesystem::path& output) {
  std::vector<std::string> args(argv);
  std::vector<char*> raw;
  for (auto& s : args) raw.push_back(s.data());
  raw.push_back(nullptr);
  // etcd reads ETCD_* variables as flags; a developer's environment must not change the cluster.
  std::vector<std::string> env_strings;
  for (char** e = environ; *e != nullptr; ++e)
    if (std::string_view(*e).rfind("ETCD", 0) != 0) env_strings.emplace_back(*e);
  std::vector<char*> env;
  for (auto& s : env_strings) env.push_back(s.data());
  env.push_back(nullptr);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_addopen(&actions, 1, output.c_str(), O_WRONLY | O_CREAT | O_APPEND,
                                   0600);
  posix_spawn_file_actions_adddup2(&actions, 1, 2);
  pid_t pid = -1;
  int rc = ::posix_spawnp(&pid, raw[0], &actions, nullptr, raw.data(), env.data());
  posix_spawn_file_actions_destroy(&actions);
  if (rc != 0) throw std::runtime_error("cannot run " + argv[0] + " (is etcd-server installed?)");
  return pid;
}

bool exited(pid_t pid) {
  int status = 0;
  return ::waitpid(pid, &status, WNOHANG) == pid;
}

void terminate(pid_t pid) {
  if (pid <= 0) return;
  ::kill(pid, SIGTERM);
  const auto deadline = Clock::now() + std::chrono::seconds(5);
  while (Clock::now() < deadline) {
    if (exited(pid)) return;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  ::kill(pid, SIGKILL);
  ::waitpid(pid, nullptr, 0);
}

}  // namespace

EtcdCluster::EtcdCluster(const std::filesystem::path& dir, int members,
                         std::optional<EtcdTlsFiles> tls)
    : dir_(dir), tls_(std::move(tls)) {
  if (members != 1 && members != 3)
    throw std::invalid_argument("EtcdCluster: 1 or 3 members, not " + std::to_string(members));
  for (int attempt = 0; attempt < 3; ++attempt)
    if (start_all(members)) return;
  std::string tails;
  for (const Member& m : members_) tails += "\n--- " + m.name + ":\n" + log_tail(m);
  stop_all();
  throw std::runtime_error("cannot start a healthy " + std::to_string(members) +
                           "-member etcd cluster within 10 s (3 attempts)" + tails);
}

EtcdCluster::~EtcdCluster() {
  stop_all();
}

bool EtcdCluster::start_all(int members) {
  stop_all();
  members_.clear();
  std::mt19937 rng(std::random_device{}());
  // Far from 2379/2380 and from the kernel's ephemeral range (32768+).
  std::uniform_int_distribution<int> ports(20000, 32000);
  std::set<int> taken;
  auto pick = [&] {
    for (;;) {
      int p = ports(rng);
      if (taken.count(p) == 0 && port_free(p)) {
        taken.insert(p);
        return p;
      }
    }
  };
  token_ = "medgate-test-" + std::to_string(rng());
  initial_cluster_.clear();
  for (int i = 0; i < members; ++i) {
    Member m;
    m.name = "m" + std::to_string(i);
    m.client_port = pick();
    m.peer_port = pick();
    // A fresh data dir per attempt: a half-started member's WAL names the old ports.
    m.data_dir = dir_ / ("etcd-" + std::to_string(i));
    std::filesystem::remove_all(m.data_dir);
    m.log = dir_ / ("etcd-" + std::to_string(i) + ".log");
    if (!initial_cluster_.empty()) initial_cluster_ += ",";
    initial_cluster_ += m.name + "=http://127.0.0.1:" + std::to_string(m.peer_port);
    members_.push_back(std::move(m));
  }
  for (Member& m : members_) spawn_member(m);
  const auto deadline = Clock::now() + std::chrono::seconds(10);
  std::vector<bool> up(members_.size(), false);
  while (Clock::now() < deadline) {
    bool all = true;
    for (std::size_t i = 0; i < members_.size(); ++i) {
      if (up[i]) continue;
      if (exited(members_[i].pid)) {  // e.g. a port was taken after we looked
        members_[i].pid = -1;
        return false;
      }
      up[i] = member_healthy(members_[i]);
      all = all && up[i];
    }
    if (all) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return false;
}

void EtcdCluster::spawn_member(Member& m) {
  std::filesystem::create_directories(m.data_dir);
  std::filesystem::permissions(m.data_dir, std::filesystem::perms::owner_all,
                               std::filesystem::perm_options::replace);
  const std::string client =
      (tls_ ? "https" : "http") + std::string("://127.0.0.1:") + std::to_string(m.client_port);
  const std::string peer = "http://127.0.0.1:" + std::to_string(m.peer_port);
  std::vector<std::string> argv = {"etcd",
                                   "--name",
                                   m.name,
                                   "--data-dir",
                                   m.data_dir.string(),
                                   "--listen-client-urls",
                                   client,
                                   "--advertise-client-urls",
                                   client,
                                   "--listen-peer-urls",
                                   peer,
                                   "--initial-advertise-peer-urls",
                                   peer,
                                   "--initial-cluster",
                                   initial_cluster_,
                                   "--initial-cluster-state",
                                   "new",
                                   "--initial-cluster-token",
                                   token_,
                                   "--heartbeat-interval",
                                   "50",
                                   "--election-timeout",
                                   "500",
                                   "--logger",
                                   "zap",
                                   "--log-level",
                                   "warn"};
  if (tls_) {
    argv.insert(argv.end(), {"--cert-file", tls_->server_cert.string(), "--key-file",
                             tls_->server_key.string(), "--trusted-ca-file", tls_->ca.string()});
    if (tls_->client_cert_auth) argv.push_back("--client-cert-auth");
  }
  m.pid = spawn(argv, m.log);
}

void EtcdCluster::stop_all() {
  for (Member& m : members_) {
    terminate(m.pid);
    m.pid = -1;
  }
}

std::string EtcdCluster::endpoint(int i) const {
  return (tls_ ? "https" : "http") + std::string("://127.0.0.1:") +
         std::to_string(members_.at(static_cast<std::size_t>(i)).client_port);
}

bool EtcdCluster::member_healthy(const Member& m) const {
  if (!tls_) return healthy(m.client_port);
  // Over TLS the plain-socket check cannot speak; etcdctl can (and checks the certificates).
  std::vector<std::string> argv = {"etcdctl",
                                   "--endpoints=https://127.0.0.1:" + std::to_string(m.client_port),
                                   "--command-timeout=1s", "--cacert=" + tls_->ca.string()};
  if (!tls_->client_cert.empty())
    argv.insert(argv.end(),
                {"--cert=" + tls_->client_cert.string(), "--key=" + tls_->client_key.string()});
  argv.insert(argv.end(), {"endpoint", "health"});
  pid_t pid = spawn(argv, dir_ / "etcdctl-health.out");
  int status = 0;
  ::waitpid(pid, &status, 0);
  return WIFEXITED(status) && WEXITSTATUS(status) == 0;
}

std::vector<std::string> EtcdCluster::endpoints() const {
  std::vector<std::string> out;
  for (int i = 0; i < size(); ++i) out.push_back(endpoint(i));
  return out;
}

void EtcdCluster::kill(int i) {
  Member& m = members_.at(static_cast<std::size_t>(i));
  if (m.pid <= 0) return;
  ::kill(m.pid, SIGKILL);
  ::waitpid(m.pid, nullptr, 0);
  m.pid = -1;
}

void EtcdCluster::restart(int i) {
  Member& m = members_.at(static_cast<std::size_t>(i));
  if (m.pid > 0) terminate(m.pid);
  m.pid = -1;
  // The ports were this member's a moment ago; nothing else in the tests picks from our set.
  spawn_member(m);
  wait_healthy(i);
}

void EtcdCluster::wait_healthy(int i, std::chrono::milliseconds timeout) const {
  const Member& m = members_.at(static_cast<std::size_t>(i));
  const auto deadline = Clock::now() + timeout;
  while (Clock::now() < deadline) {
    if (m.pid > 0 && member_healthy(m)) return;
    if (m.pid > 0 && ::kill(m.pid, 0) != 0)
      throw std::runtime_error("etcd member " + m.name + " exited:\n" + log_tail(m));
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  throw std::runtime_error("etcd member " + m.name + " is not healthy after " +
                           std::to_string(timeout.count()) + " ms:\n" + log_tail(m));
}

std::string EtcdCluster::etcdctl(const std::vector<std::string>& args) const {
  std::string list;
  for (int i = 0; i < size(); ++i) {
    if (!running(i)) continue;
    if (!list.empty()) list += ",";
    list += endpoint(i);
  }
  std::vector<std::string> argv = {"etcdctl", "--endpoints=" + list, "--command-timeout=5s"};
  if (tls_) {
    argv.push_back("--cacert=" + tls_->ca.string());
    if (!tls_->client_cert.empty())
      argv.insert(argv.end(),
                  {"--cert=" + tls_->client_cert.string(), "--key=" + tls_->client_key.string()});
  }
  argv.insert(argv.end(), args.begin(), args.end());
  const std::filesystem::path out = dir_ / "etcdctl.out";
  std::filesystem::remove(out);
  pid_t pid = spawn(argv, out);
  int status = 0;
  ::waitpid(pid, &status, 0);
  std::ifstream in(out);
  std::stringstream text;
  text << in.rdbuf();
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
    throw std::runtime_error("etcdctl " + (args.empty() ? std::string() : args[0]) +
                             " failed: " + text.str());
  return text.str();
}

std::string EtcdCluster::log_tail(const Member& m) const {
  std::ifstream in(m.log);
  std::vector<std::string> lines;
  std::string line;
  while (std::getline(in, line)) {
    lines.push_back(line);
    if (lines.size() > 15) lines.erase(lines.begin());
  }
  std::string out;
  for (const auto& l : lines) out += l + "\n";
  return out.empty() ? "(empty log " + m.log.string() + ")" : out;
}

}  // namespace medgate::testing
