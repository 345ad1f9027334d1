// medctl's side of the admin API: one connection to medgated's Unix socket, requests in order.
#pragma once

#include <filesystem>
#include <optional>
#include <string>

#include <nlohmann/json.hpp>

#include "hsm/status.h"

namespace medgate::cli {

// Where the admin socket is: --socket, else $MEDGATE_SOCKET, else the socket named by the config
// file (--config), else /run/medgate/admin.sock.
std::filesystem::path resolve_socket(const std::optional<std::string>& socket_flag,
                                     const std::optional<std::string>& config_flag);

class AdminClient {
 public:
  // kUnavailable when nothing listens (with a hint), kPermissionDenied when the socket's
  // permissions refuse this user.
  static Result<AdminClient> connect(const std::filesystem::path& socket);
  AdminClient(AdminClient&& o) noexcept : fd_(o.fd_), path_(std::move(o.path_)) { o.fd_ = -1; }
  ~AdminClient();

  // Sends one request and waits for its response; the daemon's error comes back as a Status.
  Result<nlohmann::json> call(std::string_view op,
                              const nlohmann::json& args = nlohmann::json::object());

 private:
  AdminClient(int fd, std::filesystem::path path) : fd_(fd), path_(std::move(path)) {}
  int fd_;
  std::filesystem::path path_;
  std::string buffer_;
};

}  // namespace medgate::cli
