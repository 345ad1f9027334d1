// Inside ledger/order: the HTTP side of EtcdClient (libcurl), shared by the unary calls and the
// watch. Not part of the library's interface.
#pragma once

#include <curl/curl.h>

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "hsm/status.h"
#include "ledger/order/etcd_client.h"

namespace medgate::order {

// Bytes of a request that are not key or value (protobuf framing, the txn's compare, the raft
// header etcd adds before it measures): generous, so a request under the check is under etcd's.
inline constexpr std::size_t kRequestOverheadBytes = 512;
// A response bigger than this is not believed (a runaway or hostile server must not exhaust
// memory); a range read that would be bigger must use a limit.
inline constexpr std::size_t kMaxResponseBytes = std::size_t{256} << 20;

// "key" escaped for a message: printable ASCII as is, other bytes as \xNN, at most 80 characters.
std::string printable_key(std::string_view key);

// What one endpoint did with one request.
struct Attempt {
  enum class Kind {
    kAnswer,     // etcd's JSON, `json` holds it
    kEtcdError,  // etcd answered with an error that is the answer (not to be retried elsewhere)
    kFailed,     // this endpoint did not answer usefully; `transient` says whether to come back
  };
  Kind kind = Kind::kFailed;
  nlohmann::json json;
  Status error;        // kEtcdError: the mapped status
  std::string reason;  // kFailed: why, for the message that lists endpoints
  bool transient = false;
};

// Reads the gateway's error shapes: {"error": "...", "message", "code"} from a unary call and
// {"error": {"grpc_code", "message", ...}} from a stream. nullopt when `j` is not an error.
struct EtcdError {
  int code = 0;  // gRPC status code
  std::string message;
};
std::optional<EtcdError> etcd_error_of(const nlohmann::json& j);
// Whether an etcd error means "not now, maybe another member" (Unavailable, DeadlineExceeded,
// Aborted, ResourceExhausted) rather than an answer.
bool etcd_error_is_transient(const EtcdError& e);
// The Status an answering etcd error maps to.
Status status_of_etcd_error(const EtcdError& e, std::string_view what);

// int64 fields come as strings ("12"); absent means 0. nullopt when present but not an integer.
std::optional<std::int64_t> int64_field(const nlohmann::json& obj, const char* name);
std::optional<std::uint64_t> uint64_field(const nlohmann::json& obj, const char* name);
// A kv object of a range or watch answer; an error message when it is malformed.
Result<KeyValue> key_value_of(const nlohmann::json& kv);

struct EtcdClient::Transport {
  explicit Transport(EtcdOptions o) : options(std::move(o)) {}
  ~Transport();

  EtcdOptions options;
  // Index of the endpoint that answered last; requests start there.
  std::atomic<std::size_t> preferred{0};

  // POSTs `body` to `path` ("/v3/kv/put") on the endpoints in turn until one answers or
  // request_timeout has passed. `accept` checks and reads the answer; when it refuses, the
  // endpoint counts as one that does not speak etcd (and the next is tried). `what` names the
  // request in messages ("put of key 'k'").
  Status call(std::string_view path, const nlohmann::json& body, std::string_view what,
              const std::function<Status(const nlohmann::json&)>& accept);

  // One GET or POST to one endpoint; the raw HTTP status and body, or a failure reason.
  struct Exchange {
    bool transferred = false;
    long http_status = 0;
    std::string body;
    std::string failure;  // when !transferred
    bool timed_out = false;
  };
  Exchange exchange(const std::string& url, const std::string* post_body,
                    std::chrono::milliseconds timeout);

  // Sets what every handle needs: TLS files, no signals, keepalive.
  void configure(CURL* curl) const;

  CURL* take_handle();
  void give_handle(CURL* curl);

 private:
  std::mutex pool_mu_;
  std::vector<CURL*> pool_;  // idle easy handles, each with its live connections
};

}  // namespace medgate::order
