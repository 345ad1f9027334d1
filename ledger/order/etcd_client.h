// A small client of etcd's v3 JSON gateway (etcd 3.4, HTTP/1.1 POST to /v3/...), the transport
// under the replicated ledger's ordering: members claim block heights with one transaction each
// and follow the block keys with a watch. medgate writes no consensus: etcd (Raft) orders.
//
// What the gateway speaks: JSON bodies in which keys and values are base64 and int64 fields are
// strings; a transaction whose compare failed omits "succeeded"; a watch is one long POST whose
// response streams one {"result": ...} object per line. An etcd error comes back as
// {"error", "message", "code"} where code is a gRPC status code.
//
// Failover. Every request tries the endpoints in turn, starting from the one that last answered,
// and keeps going round until EtcdOptions::request_timeout has passed. It moves on after a
// connection failure, no answer within attempt_timeout, an HTTP 5xx, an answer that is not etcd's
// JSON, or an etcd error that says "try again" (Unavailable: no leader, leader changed, request
// timed out). An etcd error that is an answer (request too large, revision compacted, bad argument)
// is returned at once. When no endpoint answers, the result is kUnavailable and its message names
// every endpoint tried and why each failed. A write whose endpoint failed after the request was
// sent may or may not have been applied; a retry on the next endpoint may then find its own write
// (see create_if_absent).
//
// Size. etcd refuses requests over --max-request-bytes (1.5 MiB by default). The client refuses a
// write that would exceed EtcdOptions::max_request_bytes before sending it (kInvalidArgument), so
// the caller, who keeps blocks under it, learns at once and without a round trip.
//
// Privacy. Values will hold ledger entries: they never appear in a log line or an error message.
// Keys do (they are block heights and member ids, not patient data), escaped and shortened.
//
// Thread safety: EtcdClient's methods may be called from any number of threads at once; each call
// uses its own curl handle (kept in a pool so connections are reused). An EtcdWatch runs on a
// thread of its own and calls its handlers there, one at a time, in revision order.
#pragma once

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "hsm/bytes.h"
#include "hsm/status.h"

namespace medgate::order {

// etcd's default --max-request-bytes.
inline constexpr std::size_t kEtcdDefaultMaxRequestBytes = 1572864;  // 1.5 MiB

struct EtcdOptions {
  // Client URLs of the cluster's members: "http://127.0.0.1:2379" or "https://host:port"; an
  // explicit port, no path. At least one.
  std::vector<std::string> endpoints;
  // The longest a request may take, over all endpoints tried, and the longest one endpoint gets
  // before the next is tried. A member whose leader just died holds a write until etcd's own
  // timeout (seconds) while another member may already answer; hence the shorter attempt.
  std::chrono::milliseconds request_timeout{2000};
  std::chrono::milliseconds attempt_timeout{1000};
  // TLS for https endpoints: the CA that signed the members' certificates (empty: the system's),
  // and a client certificate and key when the members ask for one (both or neither).
  std::string ca_file;
  std::string cert_file;
  std::string key_file;
  // Writes bigger than this are refused before they are sent; set it to the cluster's
  // --max-request-bytes.
  std::size_t max_request_bytes = kEtcdDefaultMaxRequestBytes;
};

struct KeyValue {
  std::string key;  // binary-safe
  Bytes value;
  std::int64_t create_revision = 0;
  std::int64_t mod_revision = 0;
  std::int64_t version = 0;
};

// A range read: the pairs in key order, the store's revision the read saw, and whether more pairs
// matched than `limit` let through.
struct Range {
  std::vector<KeyValue> kvs;
  std::int64_t revision = 0;
  bool more = false;
  std::int64_t count = 0;  // how many keys matched in all
};

// The answer to create_if_absent: either this call created the key (created, at `revision`) or
// the key was already there and `existing` is what it holds.
struct CreateResult {
  bool created = false;
  std::int64_t revision = 0;  // the store's revision after the transaction
  std::optional<KeyValue> existing;
};

struct EndpointHealth {
  std::string endpoint;
  bool healthy = false;
  std::string error;  // why not, when not
};

struct EtcdStatus {
  std::string endpoint;         // the endpoint that answered
  std::uint64_t member_id = 0;  // of the member that answered
  std::uint64_t leader = 0;     // member id of the leader; 0 when there is none
  std::uint64_t raft_term = 0;
  std::int64_t revision = 0;
  std::int64_t db_size = 0;                   // bytes
  std::string version;                        // the answering member's etcd version
  std::vector<EndpointHealth> member_health;  // one per configured endpoint, in order
};

// The smallest key greater than every key starting with `prefix`, for range(prefix,
// prefix_end(prefix)). A prefix of only 0xff bytes (or an empty one) gives "\0": every key.
std::string prefix_end(std::string_view prefix);

class EtcdWatch;

struct WatchHandlers {
  // Each put under the watched prefix, in revision order, exactly once while the watch lives.
  // Deletes are not reported. Called on the watch's thread.
  std::function<void(const KeyValue&)> on_put;
  // The revision the watch had to resume from has been compacted away: events between it and
  // `compact_revision` are gone from the watch history. The watch has ended; the caller catches up
  // with a range read at or after `compact_revision` and starts a new watch. Called once.
  std::function<void(std::int64_t compact_revision)> on_compacted;
  // Optional: a connection was lost or refused and the watch is reconnecting (for a log line or a
  // counter). The watch keeps trying until stop(); it never skips a revision.
  std::function<void(const Status&)> on_reconnect;
};

class EtcdClient {
 public:
  // Checks the options (endpoint URLs, TLS files) without contacting the cluster, which need not
  // be up. kInvalidArgument names the offending option.
  static Result<std::unique_ptr<EtcdClient>> open(const EtcdOptions& options);
  ~EtcdClient();
  EtcdClient(const EtcdClient&) = delete;
  EtcdClient& operator=(const EtcdClient&) = delete;

  // Sets `key` to `value`; returns the store's revision of the write.
  Result<std::int64_t> put(std::string_view key, ByteView value);

  // Deletes the pairs with key in [key, range_end) ("" deletes the single key `key`); returns how
  // many there were. The values stay in etcd's history until the revisions are compacted.
  Result<std::int64_t> remove(std::string_view key, std::string_view range_end = {});

  // The pairs with key in [key, range_end) ("" reads the single key `key`), at most `limit` of
  // them (0: no limit), as of `revision` (0: the latest). A compacted `revision` is
  // kFailedPrecondition. `min_mod_revision` (0: none) keeps only pairs last written at or after
  // it (etcd filters before it applies the limit; `count` still counts every key in the range):
  // what changed since a revision, even once the revisions in between are compacted.
  Result<Range> range(std::string_view key, std::string_view range_end = {}, std::int64_t limit = 0,
                      std::int64_t revision = 0, std::int64_t min_mod_revision = 0);

  // One transaction: if `key` does not exist (create_revision == 0), put `value`; otherwise read
  // it. This is how a member claims a block height: of any number of racing callers exactly one
  // gets created == true, and the others get the winner's pair. After a failover a retried
  // request may find the caller's own earlier write (created == false, existing->value ==
  // value): the caller tells by comparing values.
  Result<CreateResult> create_if_absent(std::string_view key, ByteView value);

  // One transaction: if `key` was last written at `mod_revision`, put `value` (created == true);
  // otherwise read it (`existing`, absent if the key is gone). How a void block record is
  // replaced: of the members racing to replace it, exactly one succeeds.
  Result<CreateResult> replace_if_revision(std::string_view key, std::int64_t mod_revision,
                                           ByteView value);

  // Compacts etcd's history up to `revision`: every value superseded or deleted at or before it
  // is gone, for every key in the cluster (compaction is cluster-wide, not per prefix); the
  // latest value of each live key stays. Afterwards a range read or a watch from a revision below
  // `revision` is refused as compacted. kFailedPrecondition (message saying "compacted") when
  // history is already compacted at or past `revision` (another member, or etcd's own
  // --auto-compaction, got there first: the goal holds); kInvalidArgument for a revision the store
  // has not reached yet. `physical`: wait until etcd has also removed the old values from its
  // backend, not only made them unreadable (it then takes as long as etcd's compaction of that
  // history); the disk space is reused by etcd, and given back only by an operator's defrag.
  Status compact(std::int64_t revision, bool physical);

  // The status of the endpoint that answers (leader, term, revision, size, version), and the
  // health of every configured endpoint (GET /health on each, request_timeout each at most).
  Result<EtcdStatus> status();

  // Starts a watch of every key under `prefix` from `start_revision` (1 or more) on its own
  // thread. The watch reconnects (next endpoint) on a lost connection, resuming from the last
  // revision it delivered + 1. This client must outlive the watch.
  Result<std::unique_ptr<EtcdWatch>> watch(std::string_view prefix, std::int64_t start_revision,
                                           WatchHandlers handlers);

  const EtcdOptions& options() const { return options_; }

  struct Transport;  // the curl side, in etcd_transport.h

 private:
  explicit EtcdClient(EtcdOptions options);
  Result<CreateResult> put_if(std::string_view key, ByteView value, std::int64_t mod_revision);

  EtcdOptions options_;
  std::unique_ptr<Transport> transport_;
};

// A running watch; see EtcdClient::watch. Destroying it stops it.
class EtcdWatch {
 public:
  ~EtcdWatch();
  EtcdWatch(const EtcdWatch&) = delete;
  EtcdWatch& operator=(const EtcdWatch&) = delete;

  // Ends the watch promptly (it does not wait for etcd) and joins its thread; no handler runs
  // after it returns. Must not be called from a handler. Idempotent.
  void stop();

  // The revision of the last put delivered (start_revision - 1 before the first).
  std::int64_t last_revision() const { return last_revision_.load(); }
  // The endpoint the watch is connected (or connecting) to.
  std::string endpoint() const;
  // True once the watch has ended by itself (compaction); stop() is still needed to join.
  bool ended() const { return ended_.load(); }

 private:
  friend class EtcdClient;
  EtcdWatch(EtcdClient::Transport& transport, std::string prefix, std::int64_t start_revision,
            WatchHandlers handlers);
  void run();

  EtcdClient::Transport& transport_;
  std::string prefix_;
  WatchHandlers handlers_;
  std::atomic<std::int64_t> last_revision_;
  std::atomic<bool> stopping_{false};
  std::atomic<bool> ended_{false};
  mutable std::mutex mu_;
  std::string endpoint_;   // guarded by mu_
  void* multi_ = nullptr;  // CURLM*, guarded by mu_ for wakeups from stop()
  std::thread thread_;
};

}  // namespace medgate::order
