// The admin API server: a Unix socket (0660, group admin_group, plus an ACL entry for
// auditor_group) speaking the line-delimited JSON of appliance/admin_protocol.h.
//
// Every connection's caller is identified by SO_PEERCRED, never by anything it says: root and
// members of admin_group may change state, members of auditor_group may only read, anyone else is
// told so and disconnected. Malformed, oversized or unknown requests get an error reply and the
// server carries on. Thread-safe; handlers run on the connection's thread and must be thread-safe.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "appliance/config.h"
#include "hsm/status.h"

namespace medgate::appliance {

enum class Role { kNone = 0, kAuditor = 1, kAdmin = 2 };
std::string_view role_name(Role role);

struct Caller {
  uid_t uid = 0;
  gid_t gid = 0;
  pid_t pid = 0;
  std::string user;  // login name, or empty if the uid has none
  Role role = Role::kNone;
  // How the caller appears on the ledger: "user:alice", or "uid:1234" without a login name.
  std::string actor() const;
};

// The caller's role from its uid and groups (primary and supplementary, from the user database).
Role role_of(uid_t uid, gid_t gid, const AdminConfig& config);

struct Operation {
  std::string name;  // "ledger.head"
  Role required = Role::kAdmin;
  std::function<Result<nlohmann::json>(const Caller& caller, const nlohmann::json& args)> handler;
};

// An operation's text argument `name`: kInvalidArgument "argument "NAME" must be a non-empty
// text" when it is missing, not a string, or empty.
Result<std::string> text_arg(const nlohmann::json& args, const char* name);

struct AdminCounters {
  std::uint64_t connections = 0;
  std::uint64_t requests = 0;
  std::uint64_t errors = 0;   // requests answered with an error
  std::uint64_t refused = 0;  // connections refused (no role, or too many)
};

class AdminServer {
 public:
  // Binds and listens. Refuses if another process answers on the socket path; removes a stale
  // socket file left by a crash.
  static Result<std::unique_ptr<AdminServer>> start(const AdminConfig& config,
                                                    std::vector<Operation> operations);
  ~AdminServer();
  AdminServer(const AdminServer&) = delete;
  AdminServer& operator=(const AdminServer&) = delete;

  // Stops accepting, ends open connections (after their current request), removes the socket.
  void stop();
  AdminCounters counters() const;

  class Impl;

 private:
  explicit AdminServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace medgate::appliance
