#include "cli/client.h"

#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>

#include <fmt/format.h>
#include <toml++/toml.h>

#include "appliance/admin_protocol.h"

namespace medgate::cli {

std::filesystem::path resolve_socket(const std::optional<std::string>& socket_flag,
                                     const std::optional<std::string>& config_flag) {
  if (socket_flag) return *socket_flag;
  if (const char* env = std::getenv("MEDGATE_SOCKET"); env && *env) return env;
  if (config_flag) {
    // Mirrors medgated's rule (appliance/config.cc): [admin] socket, else <data_dir>/admin.sock,
    // relative paths against the config file's directory. medctl does not link the daemon.
    try {
      std::filesystem::path file = std::filesystem::absolute(*config_flag);
      toml::table t = toml::parse_file(file.string());
      auto resolve = [&](std::string p) {
        std::filesystem::path path(p);
        return path.is_relative() ? file.parent_path() / path : path;
      };
      if (auto s = t["admin"]["socket"].value<std::string>()) return resolve(*s);
      if (auto d = t["ledger"]["data_dir"].value<std::string>()) return resolve(*d) / "admin.sock";
    } catch (const toml::parse_error&) {
      // Fall through to the default; connecting will say where it looked.
    }
  }
  return "/run/medgate/admin.sock";
}

Result<AdminClient> AdminClient::connect(const std::filesystem::path& socket) {
  struct sockaddr_un addr {};
  addr.sun_family = AF_UNIX;
  const std::string path = socket.string();
  if (path.size() >= sizeof addr.sun_path)
    return Status::InvalidArgument("socket path is too long: " + path);
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return Status::Internal(std::string("socket: ") + std::strerror(errno));
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    int e = errno;
    ::close(fd);
    if (e == EACCES || e == EPERM)
      return Status::PermissionDenied(
          fmt::format("permission denied on {}: use medctl as root or as a member of the "
                      "medgate-admin or medgate-audit group",
                      path));
    return Status::Unavailable(
        fmt::format("cannot reach medgated at {}: {} (is it running? try `systemctl status "
                    "medgated`, or give --socket/--config)",
                    path, std::strerror(e)));
  }
  return AdminClient(fd, socket);
}

AdminClient::~AdminClient() {
  if (fd_ >= 0) ::close(fd_);
}

Result<nlohmann::json> AdminClient::call(std::string_view op, const nlohmann::json& args) {
  std::string line = admin::request(op, args).dump() + "\n";
  std::size_t off = 0;
  while (off < line.size()) {
    ssize_t n = ::send(fd_, line.data() + off, line.size() - off, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;  // the daemon may have answered (a refusal) and hung up: read that below
    off += static_cast<std::size_t>(n);
  }
  char chunk[65536];
  std::size_t nl;
  while ((nl = buffer_.find('\n')) == std::string::npos) {
    ssize_t n = ::recv(fd_, chunk, sizeof chunk, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      // The daemon may have answered (e.g. a refusal) and closed before reading our request.
      if (!buffer_.empty()) break;
      return Status::Unavailable(
          fmt::format("medgated at {} closed the connection without answering", path_.string()));
    }
    buffer_.append(chunk, static_cast<std::size_t>(n));
  }
  nl = buffer_.find('\n');
  std::string response = buffer_.substr(0, nl);
  buffer_.erase(0, nl == std::string::npos ? buffer_.size() : nl + 1);
  nlohmann::json parsed = nlohmann::json::parse(response, nullptr, false);
  if (parsed.is_discarded()) return Status::Internal("medgated's response is not JSON");
  return admin::parse_response(parsed);
}

}  // namespace medgate::cli
