#include "tests/support/swtpm.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <random>
#include <sstream>
#include <stdexcept>
#include <thread>

extern char** environ;

namespace medgate::testing {
namespace {

using Clock = std::chrono::steady_clock;

// True when something accepts TCP connections on 127.0.0.1:port.
bool answers(int port) {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return false;
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<std::uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  bool ok = ::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0;
  ::close(fd);
  return ok;
}

// True when both ports can be bound now (swtpm may still lose a race for them; start_on retries).
bool pair_free(int port) {
  for (int p : {port, port + 1}) {
    int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return false;
    int one = 1;
    ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(static_cast<std::uint16_t>(p));
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    bool ok = ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0;
    ::close(fd);
    if (!ok) return false;
  }
  return true;
}

pid_t spawn(const std::vector<std::string>& argv, const std::vector<std::string>& extra_env,
            const std::filesystem::path* log) {
  std::vector<std::string> env_strings(extra_env);
  for (char** e = environ; *e != nullptr; ++e) env_strings.emplace_back(*e);
  std::vector<char*> env;
  for (auto& s : env_strings) env.push_back(s.data());
  env.push_back(nullptr);
  std::vector<std::string> args(argv);
  std::vector<char*> raw;
  for (auto& s : args) raw.push_back(s.data());
  raw.push_back(nullptr);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  const char* out = log != nullptr ? log->c_str() : "/dev/null";
  posix_spawn_file_actions_addopen(&actions, 1, out, O_WRONLY | O_CREAT | O_APPEND, 0600);
  posix_spawn_file_actions_adddup2(&actions, 1, 2);
  pid_t pid = -1;
  int rc = ::posix_spawnp(&pid, raw[0], &actions, nullptr, raw.data(), env.data());
  posix_spawn_file_actions_destroy(&actions);
  if (rc != 0) throw std::runtime_error("cannot run " + argv[0]);
  return pid;
}

}  // namespace

Swtpm::Swtpm(const std::filesystem::path& dir)
    : state_dir_(dir / "swtpm-state"), log_(dir / "swtpm.log"), tool_output_(dir / "tool.out") {
  std::filesystem::create_directories(state_dir_);
  std::mt19937 rng(std::random_device{}());
  std::uniform_int_distribution<int> ports(20000, 59998);
  for (int attempt = 0; attempt < 20; ++attempt) {
    int port = ports(rng) & ~1;
    if (!pair_free(port)) continue;
    if (start_on(port)) return;
  }
  throw std::runtime_error("cannot start swtpm on any port pair (see " + log_.string() + ")");
}

Swtpm::~Swtpm() {
  stop();
}

std::string Swtpm::tcti() const {
  return "swtpm:host=127.0.0.1,port=" + std::to_string(port_);
}

bool Swtpm::start_on(int port) {
  const std::string p = std::to_string(port), c = std::to_string(port + 1);
  pid_t pid = spawn(
      {"swtpm", "socket", "--tpm2", "--tpmstate", "dir=" + state_dir_.string(), "--server",
       "type=tcp,port=" + p + ",bindaddr=127.0.0.1", "--ctrl",
       "type=tcp,port=" + c + ",bindaddr=127.0.0.1", "--flags", "not-need-init,startup-clear"},
      {}, &log_);
  const auto deadline = Clock::now() + std::chrono::seconds(10);
  while (Clock::now() < deadline) {
    int status = 0;
    if (::waitpid(pid, &status, WNOHANG) == pid) return false;  // e.g. the port was taken
    if (answers(port)) {
      pid_ = pid;
      port_ = port;
      return true;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  ::kill(pid, SIGKILL);
  ::waitpid(pid, nullptr, 0);
  return false;
}

void Swtpm::stop() {
  if (pid_ < 0) return;
  run({"swtpm_ioctl", "--tcp", "127.0.0.1:" + std::to_string(port_ + 1), "-s"});
  const auto deadline = Clock::now() + std::chrono::seconds(5);
  while (Clock::now() < deadline) {
    if (::waitpid(pid_, nullptr, WNOHANG) == pid_) {
      pid_ = -1;
      return;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  ::kill(pid_, SIGKILL);
  ::waitpid(pid_, nullptr, 0);
  pid_ = -1;
}

void Swtpm::restart() {
  stop();
  // The ports were ours a moment ago; give the kernel a little time if it still holds them.
  for (int attempt = 0; attempt < 50; ++attempt) {
    if (start_on(port_)) return;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  throw std::runtime_error("cannot restart swtpm on port " + std::to_string(port_));
}

std::string Swtpm::tool(const std::vector<std::string>& argv) const {
  std::filesystem::remove(tool_output_);
  int rc = run(argv, {"TPM2TOOLS_TCTI=" + tcti()}, &tool_output_);
  std::ifstream in(tool_output_);
  std::stringstream text;
  text << in.rdbuf();
  if (rc != 0)
    throw std::runtime_error(argv[0] + " failed with status " + std::to_string(rc) + ": " +
                             text.str());
  return text.str();
}

void Swtpm::extend_pcr(unsigned pcr, const std::string& hex) const {
  tool({"tpm2_pcrextend", std::to_string(pcr) + ":sha256=" + hex});
}

int Swtpm::run(const std::vector<std::string>& argv, const std::vector<std::string>& env,
               const std::filesystem::path* output) {
  pid_t pid = spawn(argv, env, output);
  int status = 0;
  if (::waitpid(pid, &status, 0) != pid) return -1;
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

}  // namespace medgate::testing
