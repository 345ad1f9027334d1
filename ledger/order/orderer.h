// The orderer of a replicated ledger (docs/replication.md, "Blocks through etcd"): one thread per
// member that keeps the local replica in step with the block keys in etcd and proposes the
// member's queued entries as blocks.
//
// Its loop:
//   1. Catch up: read the block keys above the local tip from etcd (a range read, woken by a
//      watch) and apply each, in height order, through Ledger::apply_block, which validates it.
//   2. If the outbox holds entries: build the next block on the tip (Ledger::build_block, signed
//      by this member's key) and claim its height with one etcd transaction (create_if_absent).
//      Won: apply it. Lost: the winner's block is applied in step 1 and these entries go into a
//      block on top of it. No answer (etcd unreachable): the SAME claim is retried until etcd
//      answers, so a claim that did land is found as this member's own (same bytes) and never
//      proposed twice.
//
// A put at a height already applied (found by the watch) is the same record, harmless, or an
// attempted rewrite of history: reported (stats().rewrites, on_invalid) and replaced by the
// applied record, so a member that joins later reads history as it was.
//
// A block that fails validation is void: it is reported (stats().invalid_blocks, last_invalid,
// and the on_invalid callback, once per record) and not applied; the replica does not go past it
// until the key holds a valid record. The next member with entries to propose replaces it
// (replace_if_revision, comparing the void record's mod_revision: exactly one replacement wins).
//
// Store-and-forward: the ledger acknowledges appends once they are durable in the outbox; the
// orderer never holds an append up. While etcd is unreachable it retries with a backoff (at most
// OrdererOptions::max_backoff) and the outbox grows; when etcd returns it catches up in order and
// proposes the queue.
//
// Compaction (docs/replication.md, "Size and compaction"): every `compaction_interval` the orderer
// compacts etcd's history up to the revision it had read one interval earlier. Block keys are never
// deleted and their latest values survive compaction, so a lagging replica loses nothing it needs:
// it catches up by range reads, which read latest values. What goes are superseded values (void
// records, rewrites put back, old `seen` heights) and deleted keys' values. A watch more than an
// interval behind may be cut: it reports the compaction, and the orderer looks for rewrites in the
// gap (a range read of the applied heights changed since the watch's last revision), starts a new
// watch after that read, and catches up by range reads as always.
//
// Publishing the history: at start, block heights the local ledger has but etcd lacks (the
// founder's blocks from before the cluster, or blocks etcd lost) are put with create_if_absent
// from Ledger::block_record; a different record already at such a height means etcd's prefix
// belongs to another ledger (kFailedPrecondition, and the orderer does not start).
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "hsm/status.h"
#include "ledger/order/etcd_client.h"
#include "ledger/store.h"

namespace medgate::order {

struct OrdererOptions {
  // The ledger's key prefix in etcd: "/medgate/<ledger id>/" (block_key below).
  std::string prefix;
  // A block closes at this many entries or entry bytes, whichever comes first. The record is
  // base64 in etcd's JSON gateway (4/3), so 1,000,000 bytes stays under etcd's 1.5 MiB default.
  std::size_t max_block_entries = 8192;
  std::size_t max_block_bytes = 1000000;
  // How often etcd is read even without a watch event (a lost watch, a compaction).
  std::chrono::milliseconds poll{250};
  // The longest wait between attempts while etcd is unreachable.
  std::chrono::milliseconds max_backoff{1000};
  // Turns (see orderer.cc, propose()): how long a member with entries waits for the member whose
  // turn the next height is before claiming it itself. 0: no turns, every member races.
  std::chrono::milliseconds turn_timeout{500};
  // How often this member compacts etcd's history, and how old (at least) the revision it compacts
  // to is: the revision of its read one interval earlier. 0: never (an etcd shared with others
  // whose history must stay, or compacted by its own --auto-compaction). Every member compacts;
  // compaction is idempotent (see orderer.cc, maybe_compact()).
  std::chrono::milliseconds compaction_interval{60000};
  // Called on the orderer thread for each void record (height, reason), once per record.
  std::function<void(std::uint64_t height, const std::string& reason)> on_invalid;
  // Called on the orderer thread when etcd stops or starts answering.
  std::function<void(bool connected, const std::string& error)> on_connection;
};

struct OrdererStats {
  bool running = false;
  bool connected = false;               // etcd answered the last request
  std::uint64_t local_height = 0;       // the replica's latest block
  std::uint64_t cluster_height = 0;     // the highest block key seen in etcd
  std::uint64_t blocks_proposed = 0;    // claims this member won
  std::uint64_t claims_lost = 0;        // heights another member won first
  std::uint64_t blocks_applied = 0;     // from etcd, any proposer (including own, after a crash)
  std::uint64_t invalid_blocks = 0;     // void records seen
  std::string last_invalid;             // the latest void record's reason
  std::string last_error;               // the latest etcd or ledger error
  std::uint64_t history_published = 0;  // blocks put at start (history)
  std::uint64_t rewrites = 0;           // puts of a different record at a height already applied
  std::int64_t compacted_revision = 0;  // the last etcd revision this member compacted to (or
                                        // found already compacted)
  std::uint64_t compacted_at_us = 0;    // when (Unix time, microseconds); 0: not yet
  std::uint64_t compactions = 0;        // compactions this member asked for that etcd took
  std::uint64_t watch_restarts = 0;     // watches cut by a compaction and started again
};

// "<prefix>blocks/<height, 20 digits>": zero-padded so that key order is height order.
std::string block_key(std::string_view prefix, std::uint64_t height);

// "<prefix>members/<member id>/seen": the height a member last applied and when ("HEIGHT
// TIME_US"), which its orderer puts at most once a second. Display only (cluster status); nothing
// trusts it.
struct MemberSeen {
  std::string member_id;
  std::uint64_t height = 0;
  std::uint64_t time_us = 0;
};
std::string seen_key(std::string_view prefix, std::string_view member);
// nullopt for a key or value that is not one.
std::optional<MemberSeen> parse_seen(std::string_view key, std::string_view prefix, ByteView value);

class Orderer {
 public:
  // Publishes the history (see above) and starts the thread. `ledger` must be replicated
  // (Ledger::replica()), and it and `etcd` must outlive the orderer.
  static Result<std::unique_ptr<Orderer>> start(ledger::Ledger& ledger, EtcdClient& etcd,
                                                OrdererOptions options);
  ~Orderer();
  Orderer(const Orderer&) = delete;
  Orderer& operator=(const Orderer&) = delete;

  // Stops the thread (an unanswered claim is abandoned: its entries stay queued). Idempotent.
  void stop();
  OrdererStats stats() const;
  // Waits until the local replica holds block `height`; false after `timeout`.
  bool wait_for_height(std::uint64_t height, std::chrono::milliseconds timeout) const;

 private:
  Orderer(ledger::Ledger& ledger, EtcdClient& etcd, OrdererOptions options);
  Status publish_history();
  void run();
  // One pass of step 1; true if anything was applied.
  bool catch_up();
  // Step 2 for one block; true if a block was proposed.
  bool propose();
  void report_seen();
  void check_rewrites();
  // Compaction (see above): at most once per options_.compaction_interval.
  void maybe_compact();
  // After the watch reported a compaction: find rewrites in the gap, watch again from that read,
  // catch up. False when etcd did not answer (tried again on the next pass).
  bool restart_watch();
  WatchHandlers watch_handlers();
  void remember_applied(std::uint64_t height, std::int64_t mod_revision);
  void note_error(const Status& s);
  void note_ok();
  void wake();

  ledger::Ledger& ledger_;
  EtcdClient& etcd_;
  OrdererOptions options_;
  // Replaced only on the orderer thread (restart_watch); stop() joins that thread first.
  std::unique_ptr<EtcdWatch> watch_;

  mutable std::mutex mu_;
  mutable std::condition_variable cv_;
  bool stop_ = false;
  bool woken_ = false;
  OrdererStats stats_;  // guarded by mu_
  // The void record at the next height, if any: its key's mod_revision, so it is reported once
  // and retried only when the key changes.
  std::optional<std::int64_t> void_revision_;
  std::int64_t last_revision_ = 0;  // the etcd revision of the last read
  // When the local tip last moved (turns).
  std::uint64_t progress_height_ = 0;
  std::chrono::steady_clock::time_point progress_time_{};
  bool backlog_at_progress_ = false;  // entries were queued here when the tip last moved
  // Puts the watch saw at heights already applied, for check_rewrites (guarded by mu_).
  struct Rewrite {
    std::uint64_t height;
    std::int64_t mod_revision;
    Bytes value;
  };
  std::vector<Rewrite> rewrites_;
  std::map<std::uint64_t, std::int64_t> applied_revisions_;  // height -> mod_revision applied
  // The last members/<id>/seen put (report_seen).
  std::chrono::steady_clock::time_point seen_put_{};
  std::uint64_t seen_height_ = ~std::uint64_t{0};
  // Compaction: when to compact next, and the revision read at the previous tick (compacted at
  // the next one, so that it is at least an interval old).
  std::chrono::steady_clock::time_point next_compaction_{};
  std::int64_t compaction_candidate_ = 0;
  std::thread thread_;
};

}  // namespace medgate::order
