#include "appliance/admin_server.h"

#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <pwd.h>
#include <sys/acl.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <list>
#include <map>
#include <mutex>
#include <thread>

#include "appliance/admin_protocol.h"
#include "appliance/log.h"

namespace medgate::appliance {
namespace {

std::optional<gid_t> group_id(const std::string& name) {
  if (name.empty()) return std::nullopt;
  std::vector<char> buf(16384);
  struct group g {};
  struct group* out = nullptr;
  if (getgrnam_r(name.c_str(), &g, buf.data(), buf.size(), &out) != 0 || !out) return std::nullopt;
  return out->gr_gid;
}

std::string user_name(uid_t uid) {
  std::vector<char> buf(16384);
  struct passwd pw {};
  struct passwd* out = nullptr;
  if (getpwuid_r(uid, &pw, buf.data(), buf.size(), &out) != 0 || !out) return {};
  return out->pw_name;
}

bool in_group(uid_t uid, gid_t primary, gid_t wanted) {
  if (primary == wanted) return true;
  std::string name = user_name(uid);
  if (name.empty()) return false;
  int n = 64;
  std::vector<gid_t> groups(static_cast<std::size_t>(n));
  if (getgrouplist(name.c_str(), primary, groups.data(), &n) < 0) {
    groups.resize(static_cast<std::size_t>(n));
    if (getgrouplist(name.c_str(), primary, groups.data(), &n) < 0) return false;
  }
  groups.resize(static_cast<std::size_t>(n));
  return std::find(groups.begin(), groups.end(), wanted) != groups.end();
}

Status errno_status(const std::string& what) {
  int e = errno;
  if (e == EACCES || e == EPERM) return Status::PermissionDenied(what + ": " + std::strerror(e));
  return Status::IOError(what + ": " + std::strerror(e));
}

bool write_all(int fd, const std::string& data) {
  std::size_t off = 0;
  while (off < data.size()) {
    ssize_t n = ::send(fd, data.data() + off, data.size() - off, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    off += static_cast<std::size_t>(n);
  }
  return true;
}

// Ends a connection after a final error reply without losing that reply: a client still writing
// its (oversized, or unwelcome) request would otherwise get EPIPE and never read the answer. So
// stop sending, discard what still arrives for a moment, then close.
void linger_close(int fd) {
  ::shutdown(fd, SHUT_WR);
  char sink[65536];
  std::size_t discarded = 0;
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(2);
  while (discarded < (64u << 20) && std::chrono::steady_clock::now() < deadline) {
    struct pollfd p = {fd, POLLIN, 0};
    if (::poll(&p, 1, 200) <= 0) continue;
    ssize_t n = ::recv(fd, sink, sizeof sink, 0);
    if (n <= 0) break;
    discarded += static_cast<std::size_t>(n);
  }
}

}  // namespace

std::string_view role_name(Role role) {
  switch (role) {
    case Role::kNone:
      return "none";
    case Role::kAuditor:
      return "auditor";
    case Role::kAdmin:
      return "admin";
  }
  return "none";
}

std::string Caller::actor() const {
  return user.empty() ? "uid:" + std::to_string(uid) : "user:" + user;
}

Role role_of(uid_t uid, gid_t gid, const AdminConfig& config) {
  if (uid == 0) return Role::kAdmin;
  if (auto g = group_id(config.admin_group); g && in_group(uid, gid, *g)) return Role::kAdmin;
  if (auto g = group_id(config.auditor_group); g && in_group(uid, gid, *g)) return Role::kAuditor;
  return Role::kNone;
}

class AdminServer::Impl {
 public:
  Impl(AdminConfig config, std::vector<Operation> ops) : config_(std::move(config)) {
    for (auto& op : ops) ops_.emplace(op.name, std::move(op));
  }

  ~Impl() { stop(); }

  Status start() {
    const std::string path = config_.socket.string();
    struct sockaddr_un addr {};
    addr.sun_family = AF_UNIX;
    if (path.size() >= sizeof addr.sun_path)
      return Status::InvalidArgument("admin socket path is too long: " + path);
    std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);

    struct stat st {};
    if (::lstat(path.c_str(), &st) == 0) {
      if (!S_ISSOCK(st.st_mode))
        return Status::FailedPrecondition("admin socket path " + path +
                                          " exists and is not a socket");
      int probe = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
      bool live = ::connect(probe, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0;
      ::close(probe);
      if (live)
        return Status::FailedPrecondition("admin socket " + path +
                                          " is in use by another running medgated");
      ::unlink(path.c_str());  // stale, from a crash
    }
    std::error_code ec;
    std::filesystem::create_directories(config_.socket.parent_path(), ec);

    listen_fd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (listen_fd_ < 0) return errno_status("socket");
    // Bind with a restrictive umask so the socket is never briefly world-connectable.
    mode_t old = ::umask(0177);
    int rc = ::bind(listen_fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr);
    ::umask(old);
    if (rc != 0) return errno_status("cannot bind admin socket " + path);
    if (::listen(listen_fd_, 64) != 0) return errno_status("listen on " + path);
    set_permissions(path);

    wake_fd_ = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (wake_fd_ < 0) return errno_status("eventfd");
    accept_thread_ = std::thread([this] { accept_loop(); });
    return Status::Ok();
  }

  void stop() {
    if (stopping_.exchange(true)) return;
    if (wake_fd_ >= 0) {
      std::uint64_t one = 1;
      ssize_t ignored = ::write(wake_fd_, &one, sizeof one);
      (void)ignored;
    }
    if (accept_thread_.joinable()) accept_thread_.join();
    std::list<std::thread> threads;
    {
      std::lock_guard lk(mu_);
      threads.swap(threads_);
    }
    for (auto& t : threads) t.join();
    if (listen_fd_ >= 0) {
      ::close(listen_fd_);
      ::unlink(config_.socket.c_str());
    }
    if (wake_fd_ >= 0) ::close(wake_fd_);
    listen_fd_ = wake_fd_ = -1;
  }

  AdminCounters counters() const {
    std::lock_guard lk(mu_);
    return counters_;
  }

 private:
  // 0660, group admin_group, and an ACL entry giving auditor_group the same access. Problems are
  // logged, not fatal: root can always connect, so the box stays administrable.
  void set_permissions(const std::string& path) {
    ::chmod(path.c_str(), 0660);
    auto admin = group_id(config_.admin_group);
    if (!admin) {
      log(LogLevel::kWarning, "admin.socket", "group '{}' does not exist: only root can use {}",
          config_.admin_group, path);
    } else if (::chown(path.c_str(), static_cast<uid_t>(-1), *admin) != 0) {
      log(LogLevel::kWarning, "admin.socket", "cannot give {} to group '{}': {}", path,
          config_.admin_group, std::strerror(errno));
    }
    auto auditor = group_id(config_.auditor_group);
    if (!auditor) {
      log(LogLevel::kWarning, "admin.socket", "group '{}' does not exist: auditors cannot connect",
          config_.auditor_group);
      return;
    }
    std::string text = "u::rw-,g::rw-,g:" + std::to_string(*auditor) + ":rw-,m::rw-,o::---";
    acl_t acl = acl_from_text(text.c_str());
    if (!acl || acl_set_file(path.c_str(), ACL_TYPE_ACCESS, acl) != 0)
      log(LogLevel::kWarning, "admin.socket", "cannot add an ACL for group '{}' on {}: {}",
          config_.auditor_group, path, std::strerror(errno));
    if (acl) acl_free(acl);
  }

  void accept_loop() {
    while (!stopping_) {
      struct pollfd fds[2] = {{listen_fd_, POLLIN, 0}, {wake_fd_, POLLIN, 0}};
      if (::poll(fds, 2, 1000) < 0 && errno != EINTR) break;
      reap();
      if (stopping_) break;
      if (!(fds[0].revents & POLLIN)) continue;
      int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
      if (fd < 0) continue;
      std::lock_guard lk(mu_);
      ++counters_.connections;
      if (active_ >= config_.max_connections) {
        ++counters_.refused;
        write_all(fd, admin::error_response(Status::Unavailable(fmt::format(
                                                "too many admin connections (limit {}); try again",
                                                config_.max_connections)))
                              .dump() +
                          "\n");
        ::close(fd);
        continue;
      }
      ++active_;
      threads_.emplace_back([this, fd] { serve(fd); });
    }
  }

  // Joins connection threads that have finished (they mark themselves done).
  void reap() {
    std::list<std::thread> done;
    {
      std::lock_guard lk(mu_);
      for (auto id : done_ids_) {
        for (auto it = threads_.begin(); it != threads_.end(); ++it)
          if (it->get_id() == id) {
            done.splice(done.end(), threads_, it);
            break;
          }
      }
      done_ids_.clear();
    }
    for (auto& t : done) t.join();
  }

  void serve(int fd) {
    Caller caller;
    struct ucred cred {};
    socklen_t len = sizeof cred;
    if (::getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) == 0) {
      caller.uid = cred.uid;
      caller.gid = cred.gid;
      caller.pid = cred.pid;
      caller.user = user_name(cred.uid);
      caller.role = role_of(cred.uid, cred.gid, config_);
    }
    if (caller.role == Role::kNone) {
      log(LogLevel::kNotice, "admin.refused",
          "refused {} (uid {}, pid {}): not root and not in group {} or {}", caller.actor(),
          caller.uid, caller.pid, config_.admin_group, config_.auditor_group);
      write_all(fd,
                admin::error_response(
                    Status::PermissionDenied(fmt::format(
                        "{} (uid {}) may not use medgate: not root and not in group '{}' or '{}'",
                        caller.actor(), caller.uid, config_.admin_group, config_.auditor_group)))
                        .dump() +
                    "\n");
      count_refused();
      linger_close(fd);
    } else {
      session(fd, caller);
    }
    ::close(fd);
    std::lock_guard lk(mu_);
    --active_;
    done_ids_.push_back(std::this_thread::get_id());
  }

  void session(int fd, const Caller& caller) {
    std::string buffer;
    char chunk[65536];
    auto idle_deadline = std::chrono::steady_clock::now() + config_.idle_timeout;
    while (!stopping_) {
      std::size_t nl;
      while ((nl = buffer.find('\n')) != std::string::npos) {
        std::string line = buffer.substr(0, nl);
        buffer.erase(0, nl + 1);
        if (!write_all(fd, handle(line, caller).dump() + "\n")) return;
        idle_deadline = std::chrono::steady_clock::now() + config_.idle_timeout;
      }
      if (buffer.size() > config_.max_request_bytes) {
        count_error();
        write_all(fd, admin::error_response(
                          Status::InvalidArgument(fmt::format(
                              "request exceeds the limit of {} bytes", config_.max_request_bytes)))
                              .dump() +
                          "\n");
        linger_close(fd);
        return;
      }
      auto remaining = std::chrono::duration_cast<std::chrono::milliseconds>(
          idle_deadline - std::chrono::steady_clock::now());
      if (remaining.count() <= 0) return;  // idle: free the slot
      struct pollfd fds[2] = {{fd, POLLIN, 0}, {wake_fd_, POLLIN, 0}};
      int rc = ::poll(fds, 2, static_cast<int>(std::min<std::int64_t>(remaining.count(), 1000)));
      if (rc < 0 && errno != EINTR) return;
      if (!(fds[0].revents & (POLLIN | POLLHUP | POLLERR))) continue;
      ssize_t n = ::recv(fd, chunk, sizeof chunk, 0);
      if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
      if (n <= 0) return;
      buffer.append(chunk, static_cast<std::size_t>(n));
    }
  }

  nlohmann::json handle(const std::string& line, const Caller& caller) {
    {
      std::lock_guard lk(mu_);
      ++counters_.requests;
    }
    nlohmann::json request = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    auto fail = [&](const Status& s) {
      count_error();
      return admin::error_response(s);
    };
    if (request.is_discarded()) return fail(Status::InvalidArgument("request is not valid JSON"));
    if (!request.is_object()) return fail(Status::InvalidArgument("request must be a JSON object"));
    auto v = request.find("v");
    if (v == request.end() || !v->is_number_integer() || v->get<int>() != admin::kProtocolVersion)
      return fail(Status::InvalidArgument(
          fmt::format("request needs \"v\": {} (the protocol version)", admin::kProtocolVersion)));
    auto op = request.find("op");
    if (op == request.end() || !op->is_string())
      return fail(Status::InvalidArgument("request needs \"op\" as a string"));
    nlohmann::json args = request.value("args", nlohmann::json::object());
    if (!args.is_object())
      return fail(Status::InvalidArgument("request \"args\" must be an object"));
    auto it = ops_.find(op->get<std::string>());
    if (it == ops_.end())
      return fail(
          Status::InvalidArgument(fmt::format("unknown operation '{}'", op->get<std::string>())));
    const Operation& operation = it->second;
    if (caller.role < operation.required)
      return fail(Status::PermissionDenied(
          fmt::format("{} is an {} and '{}' needs the {} role (group '{}')", caller.actor(),
                      role_name(caller.role), operation.name, role_name(operation.required),
                      config_.admin_group)));
    try {
      Result<nlohmann::json> result = operation.handler(caller, args);
      if (!result.ok()) return fail(result.status());
      return admin::ok_response(std::move(result).value());
    } catch (const nlohmann::json::exception& e) {
      return fail(Status::InvalidArgument(
          fmt::format("bad arguments for '{}': {}", operation.name, e.what())));
    }
  }

  void count_error() {
    std::lock_guard lk(mu_);
    ++counters_.errors;
  }
  void count_refused() {
    std::lock_guard lk(mu_);
    ++counters_.refused;
  }

  AdminConfig config_;
  std::map<std::string, Operation, std::less<>> ops_;
  int listen_fd_ = -1, wake_fd_ = -1;
  std::atomic<bool> stopping_{false};
  std::thread accept_thread_;
  mutable std::mutex mu_;
  std::list<std::thread> threads_;
  std::vector<std::thread::id> done_ids_;
  int active_ = 0;
  AdminCounters counters_;
};

AdminServer::AdminServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
AdminServer::~AdminServer() {
  stop();
}

Result<std::string> text_arg(const nlohmann::json& args, const char* name) {
  auto it = args.find(name);
  if (it == args.end() || !it->is_string() || it->get<std::string>().empty())
    return Status::InvalidArgument(fmt::format("argument \"{}\" must be a non-empty text", name));
  return it->get<std::string>();
}

Result<std::unique_ptr<AdminServer>> AdminServer::start(const AdminConfig& config,
                                                        std::vector<Operation> operations) {
  auto impl = std::make_unique<Impl>(config, std::move(operations));
  MEDGATE_RETURN_IF_ERROR(impl->start());
  return std::unique_ptr<AdminServer>(new AdminServer(std::move(impl)));
}

void AdminServer::stop() {
  if (impl_) impl_->stop();
}
AdminCounters AdminServer::counters() const {
  return impl_->counters();
}

}  // namespace medgate::appliance
