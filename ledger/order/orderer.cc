// LEDGER-CRITICAL (replication): see orderer.h.
#include "ledger/order/orderer.h"

#include <pthread.h>

#include <algorithm>
#include <charconv>
#include <cinttypes>
#include <cstdio>

#include <fmt/format.h>

#include "ledger/block_record.h"

namespace medgate::order {
namespace {

using ledger::BlockRecord;

std::string blocks_prefix(std::string_view prefix) {
  return std::string(prefix) + "blocks/";
}

// The height in a block key, or nullopt for a key that is not one.
std::optional<std::uint64_t> height_of(std::string_view key, std::string_view blocks) {
  if (key.size() != blocks.size() + 20 || key.substr(0, blocks.size()) != blocks)
    return std::nullopt;
  std::uint64_t h = 0;
  std::string_view digits = key.substr(blocks.size());
  auto [end, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), h);
  if (ec != std::errc() || end != digits.data() + digits.size()) return std::nullopt;
  return h;
}

}  // namespace

std::string block_key(std::string_view prefix, std::uint64_t height) {
  return fmt::format("{}blocks/{:020}", prefix, height);
}

Orderer::Orderer(ledger::Ledger& ledger, EtcdClient& etcd, OrdererOptions options)
    : ledger_(ledger), etcd_(etcd), options_(std::move(options)) {}

Orderer::~Orderer() {
  stop();
}

Result<std::unique_ptr<Orderer>> Orderer::start(ledger::Ledger& ledger, EtcdClient& etcd,
                                                OrdererOptions options) {
  if (!ledger.replica())
    return Status::FailedPrecondition("the ledger is not replicated (no cluster member yet)");
  if (options.prefix.empty() || options.prefix.back() != '/')
    return Status::InvalidArgument("the etcd prefix must end with '/'");
  std::unique_ptr<Orderer> o(new Orderer(ledger, etcd, std::move(options)));
  MEDGATE_RETURN_IF_ERROR(o->publish_history());
  MEDGATE_ASSIGN_OR_RETURN(o->watch_, etcd.watch(blocks_prefix(o->options_.prefix),
                                                 o->last_revision_ + 1, o->watch_handlers()));
  // The first compaction one interval from now, to the revision read at start.
  o->next_compaction_ = std::chrono::steady_clock::now() + o->options_.compaction_interval;
  o->compaction_candidate_ = o->last_revision_;
  {
    std::lock_guard lk(o->mu_);
    o->stats_.running = true;
  }
  o->thread_ = std::thread([self = o.get()] {
    pthread_setname_np(pthread_self(), "ledger-orderer");
    self->run();
  });
  return o;
}

WatchHandlers Orderer::watch_handlers() {
  WatchHandlers handlers;
  handlers.on_put = [this](const KeyValue& kv) {
    // A put at a height this replica already holds is a rewrite unless it is the same record
    // (checked on the orderer thread, which may put the applied record back).
    if (auto h = height_of(kv.key, blocks_prefix(options_.prefix))) {
      if (*h <= ledger_.stats().height) {
        std::lock_guard lk(mu_);
        auto known = applied_revisions_.find(*h);
        // The put this replica applied (the watch trails the range reads): nothing to check.
        if (known == applied_revisions_.end() || known->second != kv.mod_revision)
          rewrites_.push_back({*h, kv.mod_revision, kv.value});
      }
    }
    wake();
  };
  // The watch has ended; the orderer thread sees it (EtcdWatch::ended) and starts another.
  handlers.on_compacted = [this](std::int64_t) { wake(); };
  return handlers;
}

void Orderer::stop() {
  {
    std::lock_guard lk(mu_);
    if (stop_) return;
    stop_ = true;
  }
  cv_.notify_all();
  // The thread first: it is the one that replaces watch_ (restart_watch).
  if (thread_.joinable()) thread_.join();
  if (watch_) watch_->stop();
  std::lock_guard lk(mu_);
  stats_.running = false;
}

OrdererStats Orderer::stats() const {
  std::lock_guard lk(mu_);
  OrdererStats s = stats_;
  s.local_height = ledger_.stats().height;
  return s;
}

bool Orderer::wait_for_height(std::uint64_t height, std::chrono::milliseconds timeout) const {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (ledger_.stats().height < height) {
    if (std::chrono::steady_clock::now() >= deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  return true;
}

void Orderer::wake() {
  {
    std::lock_guard lk(mu_);
    woken_ = true;
  }
  cv_.notify_all();
}

void Orderer::note_error(const Status& s) {
  bool was_connected;
  {
    std::lock_guard lk(mu_);
    was_connected = stats_.connected;
    if (s.code() == StatusCode::kUnavailable) stats_.connected = false;
    stats_.last_error = s.message();
  }
  if (was_connected && s.code() == StatusCode::kUnavailable && options_.on_connection)
    options_.on_connection(false, s.message());
}

void Orderer::note_ok() {
  bool was_connected;
  {
    std::lock_guard lk(mu_);
    was_connected = stats_.connected;
    stats_.connected = true;
  }
  if (!was_connected && options_.on_connection) options_.on_connection(true, "");
}

Status Orderer::publish_history() {
  const std::string blocks = blocks_prefix(options_.prefix);
  // How many block keys etcd holds: heights 0..count-1 (block keys are never deleted below a
  // lagging member's height; see docs/replication.md, "Size and compaction").
  MEDGATE_ASSIGN_OR_RETURN(Range r, etcd_.range(blocks, prefix_end(blocks), 1));
  last_revision_ = r.revision;
  const std::uint64_t in_etcd = static_cast<std::uint64_t>(r.count);
  const std::uint64_t local = ledger_.stats().height;
  std::uint64_t published = 0;
  for (std::uint64_t h = in_etcd; h <= local; ++h) {
    MEDGATE_ASSIGN_OR_RETURN(BlockRecord record, ledger_.block_record(h));
    Bytes bytes = ledger::encode_block_record(record);
    MEDGATE_ASSIGN_OR_RETURN(CreateResult c,
                             etcd_.create_if_absent(block_key(options_.prefix, h), bytes));
    if (!c.created && c.existing && c.existing->value != bytes)
      return Status::FailedPrecondition(fmt::format(
          "etcd holds a different block {} under {} than this ledger: the prefix belongs to "
          "another ledger, or this replica diverged",
          h, options_.prefix));
    last_revision_ = std::max(last_revision_, c.revision);
    if (c.created) ++published;
  }
  std::lock_guard lk(mu_);
  stats_.history_published = published;
  stats_.connected = true;
  stats_.cluster_height = std::max(local, in_etcd ? in_etcd - 1 : 0);
  return Status::Ok();
}

bool Orderer::catch_up() {
  const std::string blocks = blocks_prefix(options_.prefix);
  bool applied_any = false;
  for (;;) {
    const std::uint64_t next = ledger_.stats().height + 1;
    Result<Range> r = etcd_.range(block_key(options_.prefix, next), prefix_end(blocks), 64);
    if (!r.ok()) {
      note_error(r.status());
      return applied_any;
    }
    note_ok();
    last_revision_ = std::max(last_revision_, r->revision);
    if (r->kvs.empty()) return applied_any;
    {
      std::lock_guard lk(mu_);
      if (auto h = height_of(r->kvs.back().key, blocks))
        stats_.cluster_height = std::max(stats_.cluster_height, *h);
    }
    for (const KeyValue& kv : r->kvs) {
      const std::uint64_t expected = ledger_.stats().height + 1;
      std::optional<std::uint64_t> h = height_of(kv.key, blocks);
      if (!h || *h != expected) {
        note_error(Status::Corruption(
            fmt::format("etcd lacks block {} (the next key is not it)", expected)));
        return applied_any;
      }
      if (void_revision_ && *void_revision_ == kv.mod_revision) return applied_any;
      Result<BlockRecord> record = ledger::decode_block_record(kv.value);
      Status s = record.ok() ? ledger_.apply_block(*record)
                             : record.status().with_context(fmt::format("block {}", *h));
      if (!s.ok()) {
        const bool invalid =
            s.code() == StatusCode::kVerificationFailed || s.code() == StatusCode::kCorruption;
        if (!invalid) {
          note_error(s);
          return applied_any;
        }
        void_revision_ = kv.mod_revision;
        {
          std::lock_guard lk(mu_);
          ++stats_.invalid_blocks;
          stats_.last_invalid = s.message();
        }
        if (options_.on_invalid) options_.on_invalid(*h, s.message());
        return applied_any;
      }
      void_revision_.reset();
      applied_any = true;
      std::lock_guard lk(mu_);
      ++stats_.blocks_applied;
      remember_applied(*h, kv.mod_revision);
    }
    if (!r->more) return applied_any;
  }
}

bool Orderer::propose() {
  auto replica = ledger_.replica();
  // The turn's clock: when the tip last moved, and whether this member had entries waiting then.
  // It is followed even while there is nothing to send.
  const std::uint64_t height = ledger_.stats().height;
  if (height != progress_height_) {
    progress_height_ = height;
    progress_time_ = std::chrono::steady_clock::now();
    backlog_at_progress_ = replica && replica->outbox_entries > 0;
  }
  if (!replica || replica->outbox_entries == 0) return false;
  // Only a member proposes; a replica that is not one (yet) keeps its queue.
  const ledger::Membership membership = ledger_.membership();
  if (!membership.find(replica->member_id)) return false;
  // Turns: height h is first offered to the member whose rank (by id) is h mod the member count;
  // the others claim it only after options_.turn_timeout without progress. Without turns every
  // member builds, signs and sends a block for every height and all but one are thrown away.
  // Turns are for a busy cluster: a member whose queue was empty when the tip last moved (its
  // entries came after) proposes at once, so a lone entry (an access decision a read waits for)
  // is not held up a whole turn_timeout (it was: 517 ms per read at a member, measured).
  if (options_.turn_timeout.count() > 0 && membership.members().size() > 1 && !void_revision_ &&
      backlog_at_progress_) {
    const std::vector<ledger::Member> members = membership.members();
    const auto rank = static_cast<std::uint64_t>(
        std::find_if(members.begin(), members.end(),
                     [&](const ledger::Member& m) { return m.id == replica->member_id; }) -
        members.begin());
    const bool my_turn = (height + 1) % members.size() == rank;
    if (!my_turn && std::chrono::steady_clock::now() - progress_time_ < options_.turn_timeout)
      return false;
  }
  // A void record at the next height is replaced (compare its mod_revision): every honest
  // replica voids the same record, and exactly one replacement wins.
  const std::optional<std::int64_t> replacing = void_revision_;
  Result<BlockRecord> record =
      ledger_.build_block(options_.max_block_entries, options_.max_block_bytes);
  if (!record.ok()) {
    if (record.status().code() != StatusCode::kNotFound) note_error(record.status());
    return false;
  }
  const Bytes bytes = ledger::encode_block_record(*record);
  const std::string key = block_key(options_.prefix, record->header.height);
  std::chrono::milliseconds backoff{20};
  for (;;) {
    Result<CreateResult> c = replacing ? etcd_.replace_if_revision(key, *replacing, bytes)
                                       : etcd_.create_if_absent(key, bytes);
    if (c.ok()) {
      note_ok();
      last_revision_ = std::max(last_revision_, c->revision);
      const bool ours = c->created || (c->existing && c->existing->value == bytes);
      if (!ours) {
        std::lock_guard lk(mu_);
        ++stats_.claims_lost;
        return false;  // the winner is applied by the next catch_up()
      }
      void_revision_.reset();
      Status s = ledger_.apply_block(*record);
      if (!s.ok()) {
        note_error(s.with_context("applying this member's own block"));
        return false;
      }
      std::lock_guard lk(mu_);
      ++stats_.blocks_proposed;
      remember_applied(record->header.height, c->created ? c->revision : c->existing->mod_revision);
      stats_.cluster_height = std::max(stats_.cluster_height, record->header.height);
      return true;
    }
    note_error(c.status());
    if (c.status().code() != StatusCode::kUnavailable) return false;
    // No answer: the claim may or may not have landed. Ask again with the same bytes until etcd
    // answers, so that it is either found as ours or lost, never proposed twice.
    std::unique_lock lk(mu_);
    if (cv_.wait_for(lk, backoff, [&] { return stop_; })) return false;
    backoff = std::min(backoff * 2, options_.max_backoff);
  }
}

// Under mu_: the etcd revision of the put this replica applied at `height`, for the last 4096
// heights (older puts the watch reports are compared in full; only a rewrite is that late).
void Orderer::remember_applied(std::uint64_t height, std::int64_t mod_revision) {
  applied_revisions_[height] = mod_revision;
  while (applied_revisions_.size() > 4096) applied_revisions_.erase(applied_revisions_.begin());
}

// Puts seen at heights this replica holds: the same record again is harmless; anything else is an
// attempted rewrite of history, reported and replaced by the applied record (compare the
// rewrite's mod_revision, so members racing to restore it write it once).
void Orderer::check_rewrites() {
  std::vector<Rewrite> rewrites;
  {
    std::lock_guard lk(mu_);
    rewrites.swap(rewrites_);
  }
  for (const Rewrite& r : rewrites) {
    Result<BlockRecord> applied = ledger_.block_record(r.height);
    if (!applied.ok()) continue;
    const Bytes bytes = ledger::encode_block_record(*applied);
    if (bytes == r.value) continue;
    const std::string reason = fmt::format(
        "the record at height {} in etcd was replaced by a different one after this replica "
        "applied it; putting the applied record back",
        r.height);
    {
      std::lock_guard lk(mu_);
      ++stats_.rewrites;
      stats_.last_invalid = reason;
    }
    if (options_.on_invalid) options_.on_invalid(r.height, reason);
    Result<CreateResult> c =
        etcd_.replace_if_revision(block_key(options_.prefix, r.height), r.mod_revision, bytes);
    if (!c.ok()) note_error(c.status());
  }
}

std::string seen_key(std::string_view prefix, std::string_view member) {
  return fmt::format("{}members/{}/seen", prefix, member);
}

std::optional<MemberSeen> parse_seen(std::string_view key, std::string_view prefix,
                                     ByteView value) {
  const std::string members = std::string(prefix) + "members/";
  if (key.substr(0, members.size()) != members || !key.ends_with("/seen")) return std::nullopt;
  MemberSeen m;
  m.member_id = std::string(key.substr(members.size(), key.size() - members.size() - 5));
  const std::string text(reinterpret_cast<const char*>(value.data()), value.size());
  std::uint64_t height = 0, time_us = 0;
  if (std::sscanf(text.c_str(), "%" SCNu64 " %" SCNu64, &height, &time_us) != 2)
    return std::nullopt;
  m.height = height;
  m.time_us = time_us;
  return m;
}

// Tells the other members how far this replica is (members/<id>/seen = "HEIGHT TIME_US"), at
// most once a second and at least every 10 s. Display only: nothing trusts it.
void Orderer::report_seen() {
  const auto now = std::chrono::steady_clock::now();
  const std::uint64_t height = ledger_.stats().height;
  if (now - seen_put_ < std::chrono::seconds(1)) return;
  if (height == seen_height_ && now - seen_put_ < std::chrono::seconds(10)) return;
  auto replica = ledger_.replica();
  if (!replica) return;
  const std::string value = fmt::format("{} {}", height, ledger::now_us());
  if (etcd_.put(seen_key(options_.prefix, replica->member_id), as_bytes(value)).ok()) {
    seen_put_ = now;
    seen_height_ = height;
  }
}

// Compacts etcd's history to the revision read one interval ago (compaction_candidate_), then
// takes the latest read's revision as the next candidate. Why this is safe, and why every member
// does it (docs/replication.md, "Size and compaction"):
// - Nothing a replica needs goes. Block keys are never deleted and compaction keeps every live
//   key's latest value, so a replica of any lag catches up by range reads as before. Only values
//   superseded at or before the revision go (void records replaced, rewrites put back, old
//   `seen` heights, deleted keys).
// - A watch less than an interval behind is never cut; one further behind is (it was behind
//   anyway), and restart_watch() reads what it missed.
// - Every member compacts, each to a revision it read itself an interval earlier: no election
//   and no trust in another member's clock or `seen` (which is display only); any member alive
//   keeps history bounded. Compaction is idempotent: a revision another member (or etcd's own
//   --auto-compaction) already passed is refused as compacted, which means the goal holds. With
//   n members etcd gets up to n small requests per interval, each one Raft entry.
// - Not physical: the request returns once the compaction is in Raft, so this thread (which
//   orders the outbox) never waits for etcd to sweep its backend; etcd removes the old values
//   right after, in the background. Its disk space is reused by etcd and returned to the file
//   system only by an operator's `etcdctl defrag`.
void Orderer::maybe_compact() {
  if (options_.compaction_interval.count() <= 0) return;
  const auto now = std::chrono::steady_clock::now();
  if (now < next_compaction_) return;
  next_compaction_ = now + options_.compaction_interval;
  std::int64_t already;
  {
    std::lock_guard lk(mu_);
    already = stats_.compacted_revision;
  }
  const std::int64_t target = compaction_candidate_;
  compaction_candidate_ = last_revision_;
  if (target <= already) return;  // nothing written since the last compaction
  Status s = etcd_.compact(target, /*physical=*/false);
  const bool took = s.ok();
  // Already compacted at or past `target`: by another member, or etcd itself.
  const bool passed = s.code() == StatusCode::kFailedPrecondition &&
                      s.message().find("compacted") != std::string::npos;
  if (!took && !passed) {
    note_error(s);
    return;
  }
  std::lock_guard lk(mu_);
  stats_.compacted_revision = target;
  stats_.compacted_at_us = ledger::now_us();
  if (took) ++stats_.compactions;
}

bool Orderer::restart_watch() {
  // The puts the old watch delivered end at its last revision; anything after may be gone.
  const std::int64_t gap_start = watch_->last_revision() + 1;
  watch_->stop();
  // Rewrites in the gap: the applied heights whose key changed since gap_start. Only their latest
  // values are left, which is all that matters (a rewrite put back since is no longer one). Heights
  // above the tip are not read here: catch_up() reads them, at their latest values. The first
  // page's revision is where the new watch starts, so no put after the read is missed (a put at a
  // height applied later is then either the one applied or reported as a rewrite by on_put). The
  // later pages read as of the first one's revision, so nothing is seen by both.
  const std::string blocks = blocks_prefix(options_.prefix);
  const std::string end = block_key(options_.prefix, ledger_.stats().height + 1);
  std::string from = blocks;
  std::int64_t as_of = 0;
  for (;;) {
    Result<Range> r = etcd_.range(from, end, 64, as_of, gap_start);
    if (!r.ok()) {
      note_error(r.status());
      return false;
    }
    note_ok();
    if (as_of == 0) as_of = r->revision;
    std::lock_guard lk(mu_);
    for (const KeyValue& kv : r->kvs) {
      auto h = height_of(kv.key, blocks);
      if (!h) continue;
      auto known = applied_revisions_.find(*h);
      if (known == applied_revisions_.end() || known->second != kv.mod_revision)
        rewrites_.push_back({*h, kv.mod_revision, kv.value});
    }
    if (!r->more || r->kvs.empty()) break;
    from = r->kvs.back().key + '\0';
  }
  Result<std::unique_ptr<EtcdWatch>> w = etcd_.watch(blocks, as_of + 1, watch_handlers());
  if (!w.ok()) {
    note_error(w.status());
    return false;
  }
  watch_ = std::move(w).value();
  {
    std::lock_guard lk(mu_);
    ++stats_.watch_restarts;
  }
  catch_up();
  return true;
}

void Orderer::run() {
  std::chrono::milliseconds backoff{0};
  auto last_read = std::chrono::steady_clock::now() - options_.poll;
  for (;;) {
    {
      std::lock_guard lk(mu_);
      if (stop_) return;
    }
    bool did = false;
    // A watch cut by a compaction: catch up and watch again (until then the poll reads on).
    if (watch_->ended()) did |= restart_watch();
    const auto now = std::chrono::steady_clock::now();
    bool woken;
    {
      std::lock_guard lk(mu_);
      woken = woken_;
      woken_ = false;
    }
    if (woken || now - last_read >= options_.poll) {
      last_read = now;
      did |= catch_up();
    }
    did |= propose();
    check_rewrites();
    bool connected;
    {
      std::lock_guard lk(mu_);
      connected = stats_.connected;
    }
    if (connected) {
      report_seen();
      maybe_compact();
    }
    if (did) {
      backoff = std::chrono::milliseconds(0);
      continue;
    }
    if (!connected) {
      backoff = std::clamp(backoff * 2, std::chrono::milliseconds(20), options_.max_backoff);
      std::unique_lock lk(mu_);
      cv_.wait_for(lk, backoff, [&] { return stop_; });
      last_read = std::chrono::steady_clock::now() - options_.poll;  // read again after it
      continue;
    }
    // Idle. Entries queued that could not be proposed (another member's turn, not a member
    // yet, a void record ahead): wait for a watch event, the turn to pass, or the poll. Otherwise
    // also for queued entries (the ledger's outbox has its own signal, so wait on it in short
    // slices).
    auto replica = ledger_.replica();
    if (replica && replica->outbox_entries > 0) {
      auto wait = options_.poll;
      if (options_.turn_timeout.count() > 0) wait = std::min(wait, options_.turn_timeout);
      std::unique_lock lk(mu_);
      cv_.wait_for(lk, wait, [&] { return stop_ || woken_; });
      continue;
    }
    for (int i = 0; i < 25; ++i) {
      {
        std::lock_guard lk(mu_);
        if (stop_ || woken_) break;
      }
      if (ledger_.wait_for_outbox(std::chrono::milliseconds(10))) break;
    }
  }
}

}  // namespace medgate::order
