// bench_cluster: what the replicated ledger orders here (docs/replication.md). A benchmark, not a
// test: nothing judges a time; `--smoke` (a ctest) runs every phase with tiny counts and fails only
// when the replicas do not converge to the same root.
//
// A real 3-member etcd cluster on loopback (data in $TMPDIR) and three ledgers in this process,
// each with its own signing key in one SoftHSM token and its own orderer (ledger/order/orderer.h)
// -- everything on this one machine, as the issue asks:
//   - baseline: the same entries appended to a single box's ledger (no cluster), same writers;
//   - floors: one member's outbox alone (acknowledging, nothing ordered) and one replica storing
//     block-sized batches alone, and the bound they set: every entry is acknowledged once and
//     stored by three replicas, so the cluster commits at most 1 / (1/outbox + 3/store) per second;
//   - cluster: W writer threads at each of the 3 members append ~300-byte entries without waiting
//     for the cluster (store-and-forward); committed entries/s cluster-wide = all entries / time
//     until every replica holds all of them and every queue is empty;
//   - replication lag: for each height, the time from the first replica holding it to each other
//     replica holding it (sampled every 0.5 ms), p50/p99;
//   - resume after losing the etcd leader: under a steady load, kill -9 the leader and time until
//     a block claimed after the kill is applied at all three replicas.
//
// Run a RelWithDebInfo build; `bench_cluster --help` lists the flags.
#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include <fmt/format.h>

#include "hsm/key_store.h"
#include "hsm/key_store_factory.h"
#include "ledger/block_record.h"
#include "ledger/membership.h"
#include "ledger/order/etcd_client.h"
#include "ledger/order/orderer.h"
#include "ledger/store.h"
#include "tests/bench/bench_util.h"
#include "tests/support/entries.h"
#include "tests/support/etcd_cluster.h"
#include "tests/support/temp_dir.h"

using namespace medgate;
using namespace medgate::ledger;
using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

namespace {

struct Options {
  int entries = 100000;  // per member
  int writers = 8;       // per member
  std::size_t block_entries = 8192;
  int resume_runs = 3;
  bool smoke = false;
};

const std::string kLedgerId = "bench-ward";
const std::string kPrefix = "/medgate/bench-ward/";

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

Entry reading(int member, int n) {
  Entry e = testing::note("reading", static_cast<std::uint64_t>(n));
  // About the size of an HL7 observation entry (a ciphertext and a pseudonym).
  e.body = *cbor::Value::map(
      {{cbor::Value::text("op"), cbor::Value::text("reading")},
       {cbor::Value::text("args"),
        *cbor::Value::map(
            {{cbor::Value::text("n"), cbor::Value::uint(static_cast<std::uint64_t>(n))},
             {cbor::Value::text("ciphertext"), cbor::Value::bytes(Bytes(200, std::byte{7}))}})}});
  Bytes subject(32, std::byte{static_cast<unsigned char>(member)});
  subject[1] = std::byte{static_cast<unsigned char>(n % 251)};
  e.subjects.push_back({subject, std::nullopt});
  return e;
}

struct Replica {
  std::string id;
  std::unique_ptr<hsm::KeyStore> keys;
  std::unique_ptr<Ledger> ledger;
  std::unique_ptr<order::EtcdClient> etcd;
  std::unique_ptr<order::Orderer> orderer;
  ~Replica() {
    if (orderer) orderer->stop();
    if (ledger) ledger->close();
  }
};

LedgerOptions ledger_options(const std::filesystem::path& p) {
  LedgerOptions o;
  o.path = p;
  o.head_interval = 1000ms;
  o.order_timeout = 30s;
  return o;
}

Status start_orderer(Replica& r, const testing::EtcdCluster& cluster, const Options& o) {
  order::EtcdOptions eo;
  eo.endpoints = cluster.endpoints();
  MEDGATE_ASSIGN_OR_RETURN(r.etcd, order::EtcdClient::open(eo));
  order::OrdererOptions oo;
  oo.prefix = kPrefix;
  oo.max_block_entries = o.block_entries;
  MEDGATE_ASSIGN_OR_RETURN(r.orderer, order::Orderer::start(*r.ledger, *r.etcd, oo));
  return Status::Ok();
}

Bytes statement(std::uint64_t epoch, const std::string& id, const PublicKey& key) {
  MembershipStatement s;
  s.ledger_id = kLedgerId;
  s.epoch = epoch;
  s.member_id = id;
  s.signing_key = key;
  s.endpoint = "127.0.0.1:1";
  return *encode_membership_statement(s);
}

Status sign_and_append(Replica& by, bool approval, ByteView st) {
  MEDGATE_ASSIGN_OR_RETURN(Bytes sig, by.keys->sign_digest(sha256(st)));
  MEDGATE_ASSIGN_OR_RETURN(Entry e, approval ? member_approval_entry(st, by.id, sig, "user:bench")
                                             : member_proposal_entry(st, by.id, sig, "user:bench"));
  return by.ledger->append_membership(e).status();
}

// Appends `n` entries from `writers` threads without waiting for the cluster.
void load(Replica& r, int member, int n, int writers, std::atomic<int>& acked) {
  std::vector<std::thread> threads;
  for (int w = 0; w < writers; ++w)
    threads.emplace_back([&, w] {
      std::atomic<int> inflight{0};
      for (int i = w; i < n; i += writers) {
        Entry e = reading(member, i);
        while (inflight > 256) std::this_thread::sleep_for(50us);
        ++inflight;
        for (;;) {
          Status s = r.ledger->append_async(std::span(&e, 1), [&](Result<std::uint64_t> res) {
            if (res.ok()) ++acked;
            --inflight;
          });
          if (s.ok()) break;
          std::this_thread::sleep_for(1ms);  // the ledger's queue is full
        }
      }
      while (inflight > 0) std::this_thread::sleep_for(100us);
    });
  for (auto& t : threads) t.join();
}

bool converged(std::vector<Replica*> rs, std::uint64_t tree_size) {
  auto first = rs[0]->ledger->stats();
  if (first.tree_size < tree_size) return false;
  for (Replica* r : rs) {
    auto s = r->ledger->stats();
    if (s.root != first.root || r->ledger->replica()->outbox_entries != 0) return false;
  }
  return true;
}

int run(const Options& o) {
  testing::TempDir dir("medgate-bench-cluster");
  fmt::print(
      "bench_cluster: {} entries per member from {} writers each, blocks of at most {} "
      "entries / 1,000,000 bytes\n",
      bench::grouped(static_cast<std::uint64_t>(o.entries)), o.writers, o.block_entries);
  auto fsync = bench::probe_fsync(dir.path(), 50);
  fmt::print(
      "machine: {} CPUs available, load {} at {}; disk 4 KiB write+fdatasync p50 {:.2f} ms\n\n",
      bench::cpus_available(), bench::load_average(), bench::utc_now(),
      fsync.ok() ? fsync->p50_ms : -1.0);
  // One SoftHSM token for the whole run (a process opens one token directory); each member's key
  // store is its own session on it with its own signing key.
  auto token_config = hsm::create_softhsm_token(dir / "softhsm", "bench", dir / "pin");
  if (!token_config.ok())
    return fmt::print(stderr, "softhsm: {}\n", token_config.status().message()), 1;
  auto open_keys = [&]() -> std::unique_ptr<hsm::KeyStore> {
    auto k = hsm::open_key_store(*token_config, hsm::KeyPolicy::kCreateIfMissing);
    if (!k.ok()) throw std::runtime_error("key store: " + k.status().message());
    return std::move(k).value();
  };

  // ---- baseline: one box, no cluster ----
  double baseline_rate = 0;
  {
    Replica single;
    single.keys = open_keys();
    auto created =
        Ledger::create(ledger_options(dir / "single.db"), "single", *single.keys, "user:bench");
    if (!created.ok()) return 1;
    single.ledger = std::move(created).value();
    std::atomic<int> acked{0};
    auto t0 = Clock::now();
    load(single, 9, o.entries * 3, o.writers * 3, acked);
    baseline_rate = acked / seconds_since(t0);
  }

  // ---- floors: the cluster's work per entry, each part alone on the whole machine ----
  // Every entry committed cluster-wide is acknowledged once (a durable write to its member's
  // outbox) and stored by each of the three replicas (a block at a time). Measured alone, with
  // nothing else running, they bound what the cluster can commit here: each entry costs the
  // machine at least 1/outbox + 3/store seconds, before etcd, block validation, signing and the
  // replicas' competition for the same two cores add anything.
  double outbox_rate = 0, store_rate = 0;
  {
    Replica solo;
    solo.id = "a";
    solo.keys = open_keys();
    auto created =
        Ledger::create(ledger_options(dir / "outbox.db"), kLedgerId, *solo.keys, "user:bench");
    if (!created.ok()) return 1;
    solo.ledger = std::move(created).value();
    Status s = sign_and_append(solo, false, statement(0, "a", solo.keys->signing_key()));
    if (s.ok()) s = solo.ledger->start_replication("a");
    if (!s.ok()) return fmt::print(stderr, "outbox floor: {}\n", s.message()), 1;
    // No orderer: appends are acknowledged once durable in the outbox, and stay queued.
    std::atomic<int> acked{0};
    auto t0 = Clock::now();
    load(solo, 9, o.entries * 3, o.writers * 3, acked);
    outbox_rate = acked / seconds_since(t0);
  }
  {
    Replica solo;
    solo.keys = open_keys();
    auto created =
        Ledger::create(ledger_options(dir / "store.db"), "store", *solo.keys, "user:bench");
    if (!created.ok()) return 1;
    solo.ledger = std::move(created).value();
    // One thread appends block-sized batches: a replica applies one block at a time. Entries are
    // made outside the timed calls (a replica decodes them from the block record instead).
    double seconds = 0;
    const int total = o.entries * 3;
    const int per_block = static_cast<int>(o.block_entries);
    std::vector<Entry> block;
    for (int first = 0; first < total; first += per_block) {
      block.clear();
      for (int i = first; i < std::min(total, first + per_block); ++i)
        block.push_back(reading(i % 3, i));
      auto t0 = Clock::now();
      if (Status s = solo.ledger->append_all(block).status(); !s.ok())
        return fmt::print(stderr, "store floor: {}\n", s.message()), 1;
      seconds += seconds_since(t0);
    }
    store_rate = total / seconds;
  }
  const double bound = 1.0 / (1.0 / outbox_rate + 3.0 / store_rate);

  testing::EtcdCluster cluster(dir.path(), 3);
  Replica a, b, c;
  a.id = "a", b.id = "b", c.id = "c";
  a.keys = open_keys();
  {
    auto created = Ledger::create(ledger_options(dir / "a.db"), kLedgerId, *a.keys, "user:bench");
    if (!created.ok()) return 1;
    a.ledger = std::move(created).value();
  }
  if (Status s = sign_and_append(a, false, statement(0, "a", a.keys->signing_key())); !s.ok())
    return fmt::print(stderr, "founding: {}\n", s.message()), 1;
  if (Status s = a.ledger->start_replication("a"); !s.ok()) return 1;
  if (Status s = start_orderer(a, cluster, o); !s.ok())
    return fmt::print(stderr, "orderer a: {}\n", s.message()), 1;
  for (Replica* r : {&b, &c}) {
    r->keys = open_keys();
    auto key = r->keys->create_signing_key();
    if (!key.ok() || !r->keys->use_signing_key(key->id()).ok()) return 1;
    auto genesis = a.etcd->range(order::block_key(kPrefix, 0));
    if (!genesis.ok() || genesis->kvs.empty()) return 1;
    auto record = decode_block_record(genesis->kvs[0].value);
    auto ledger = Ledger::create_replica(ledger_options(dir / (r->id + ".db")), *record,
                                         a.keys->signing_key(), r->id, *r->keys);
    if (!ledger.ok())
      return fmt::print(stderr, "join {}: {}\n", r->id, ledger.status().message()), 1;
    r->ledger = std::move(ledger).value();
    if (Status s = start_orderer(*r, cluster, o); !s.ok()) return 1;
  }
  if (!sign_and_append(a, false, statement(1, "b", b.keys->signing_key())).ok()) return 1;
  Bytes add_c = statement(2, "c", c.keys->signing_key());
  if (!sign_and_append(a, false, add_c).ok()) return 1;
  b.orderer->wait_for_height(a.ledger->stats().height, 10s);
  if (Status s = sign_and_append(b, true, add_c); !s.ok())
    return fmt::print(stderr, "approve c: {}\n", s.message()), 1;
  std::vector<Replica*> all{&a, &b, &c};

  // ---- cluster throughput, with the lag sampler ----
  std::atomic<bool> sampling{true};
  std::map<std::uint64_t, std::array<Clock::time_point, 3>> reached;
  std::mutex reached_mu;
  std::thread sampler([&] {
    std::array<std::uint64_t, 3> last{};
    while (sampling) {
      for (int i = 0; i < 3; ++i) {
        std::uint64_t h = all[static_cast<std::size_t>(i)]->ledger->stats().height;
        if (h > last[static_cast<std::size_t>(i)]) {
          auto now = Clock::now();
          std::lock_guard lk(reached_mu);
          for (std::uint64_t x = last[static_cast<std::size_t>(i)] + 1; x <= h; ++x)
            reached[x][static_cast<std::size_t>(i)] = now;
          last[static_cast<std::size_t>(i)] = h;
        }
      }
      std::this_thread::sleep_for(500us);
    }
  });
  const std::uint64_t start_size = a.ledger->stats().tree_size;
  const std::uint64_t start_height = a.ledger->stats().height;
  std::atomic<int> acked{0};
  auto t0 = Clock::now();
  {
    std::vector<std::thread> members;
    for (int m = 0; m < 3; ++m)
      members.emplace_back(
          [&, m] { load(*all[static_cast<std::size_t>(m)], m, o.entries, o.writers, acked); });
    for (auto& t : members) t.join();
  }
  const double ack_time = seconds_since(t0);
  const std::uint64_t total = start_size + static_cast<std::uint64_t>(3 * o.entries);
  while (!converged(all, total)) {
    if (seconds_since(t0) > 600) return fmt::print(stderr, "no convergence in 600 s\n"), 1;
    std::this_thread::sleep_for(1ms);
  }
  const double commit_time = seconds_since(t0);
  sampling = false;
  sampler.join();
  std::vector<std::int64_t> lags;
  {
    std::lock_guard lk(reached_mu);
    for (auto& [h, times] : reached) {
      if (h <= start_height) continue;
      Clock::time_point first = Clock::time_point::max();
      for (auto t : times)
        if (t != Clock::time_point{}) first = std::min(first, t);
      for (auto t : times)
        if (t != Clock::time_point{})
          lags.push_back(std::chrono::duration_cast<std::chrono::nanoseconds>(t - first).count());
    }
  }
  const auto lag = bench::percentiles(lags);
  const std::uint64_t blocks = a.ledger->stats().height - start_height;
  std::uint64_t lost = 0;
  for (Replica* r : all) lost += r->orderer->stats().claims_lost;
  bench::Table t({"", "entries", "seconds", "entries/s"});
  t.row({"baseline: one box, no cluster", bench::grouped(static_cast<std::uint64_t>(3 * o.entries)),
         "", bench::rate(baseline_rate)});
  t.row({"floor: one member's outbox alone (acknowledge, no cluster)",
         bench::grouped(static_cast<std::uint64_t>(3 * o.entries)), "", bench::rate(outbox_rate)});
  t.row({fmt::format("floor: one replica storing {}-entry blocks alone", o.block_entries),
         bench::grouped(static_cast<std::uint64_t>(3 * o.entries)), "", bench::rate(store_rate)});
  t.row({"bound: acknowledged once + stored 3 times", "", "", bench::rate(bound)});
  t.row({"acknowledged at the 3 members (outbox)",
         bench::grouped(static_cast<std::uint64_t>(acked)), fmt::format("{:.2f}", ack_time),
         bench::rate(acked / ack_time)});
  t.row({"committed cluster-wide (all 3 replicas)",
         bench::grouped(static_cast<std::uint64_t>(3 * o.entries)),
         fmt::format("{:.2f}", commit_time), bench::rate(3.0 * o.entries / commit_time)});
  t.print();
  fmt::print(
      "  bound = 1 / (1/outbox + 3/store): the most this machine could commit cluster-wide if\n"
      "  ordering, validation and signing cost nothing and the parts did not compete\n");
  fmt::print("  {} blocks ({} entries per block on average), {} claims lost to another member\n",
             bench::grouped(blocks), blocks ? 3 * o.entries / static_cast<int>(blocks) : 0, lost);
  fmt::print(
      "  replication lag (first replica holding a block -> each other replica): p50 {:.1f} "
      "ms, p99 {:.1f} ms, max {:.1f} ms\n\n",
      lag.p50_ms, lag.p99_ms, lag.max_ms);
  bool ok = true;
  for (Replica* r : all) ok &= r->ledger->stats().root == a.ledger->stats().root;

  // ---- resume after losing the etcd leader ----
  std::vector<double> resumes;
  for (int run_no = 0; run_no < o.resume_runs; ++run_no) {
    int leader = -1;
    for (int i = 0; i < cluster.size(); ++i) {
      if (!cluster.running(i)) continue;
      order::EtcdOptions eo;
      eo.endpoints = {cluster.endpoint(i)};
      auto one = order::EtcdClient::open(eo);
      auto st = one.ok() ? (*one)->status() : Result<order::EtcdStatus>(one.status());
      if (st.ok() && st->leader != 0 && st->leader == st->member_id) leader = i;
    }
    if (leader < 0) break;
    std::atomic<bool> loading{true};
    std::atomic<int> steady{0};
    std::thread writer([&] {
      int n = 0;
      while (loading) {
        for (Replica* r : all) {
          Entry e = reading(7, n++);
          (void)r->ledger->append_async(std::span(&e, 1), [&](Result<std::uint64_t>) { ++steady; });
        }
        std::this_thread::sleep_for(2ms);
      }
    });
    std::this_thread::sleep_for(500ms);
    cluster.kill(leader);
    const auto killed = Clock::now();
    const std::uint64_t at_kill = a.ledger->stats().height;
    // Resumed: every replica holds a block beyond the ones claimed before the kill (+1: a claim
    // in flight at the kill may still land).
    double resumed = -1;
    while (seconds_since(killed) < 30) {
      bool all_past = true;
      for (Replica* r : all) all_past &= r->ledger->stats().height >= at_kill + 2;
      if (all_past) {
        resumed = seconds_since(killed);
        break;
      }
      std::this_thread::sleep_for(1ms);
    }
    loading = false;
    writer.join();
    resumes.push_back(resumed);
    cluster.restart(leader);
    std::this_thread::sleep_for(1s);
  }
  std::string list;
  for (double r : resumes) list += (list.empty() ? "" : ", ") + fmt::format("{:.2f} s", r);
  fmt::print(
      "resume after kill -9 of the etcd leader (every replica past the height at the kill "
      "+ 1): {}\n",
      list);
  std::uint64_t total_now = 0;
  while (true) {
    total_now = a.ledger->stats().tree_size;
    bool same = true;
    for (Replica* r : all)
      same &=
          r->ledger->stats().tree_size == total_now && r->ledger->replica()->outbox_entries == 0;
    if (same) break;
    if (seconds_since(t0) > 900) break;
    std::this_thread::sleep_for(5ms);
  }
  for (Replica* r : all) ok &= r->ledger->stats().root == a.ledger->stats().root;
  fmt::print("replicas agree at the end: {}\n", ok ? "yes (same root)" : "NO");
  return ok ? 0 : 1;
}

}  // namespace

int main(int argc, char* argv[]) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    std::string_view a = argv[i];
    auto next = [&]() { return i + 1 < argc ? std::atoi(argv[++i]) : 0; };
    if (a == "--smoke") {
      o.entries = 300;
      o.writers = 2;
      o.resume_runs = 1;
      o.block_entries = 64;
      o.smoke = true;
    } else if (a == "--entries") {
      o.entries = next();
    } else if (a == "--writers") {
      o.writers = next();
    } else if (a == "--block-entries") {
      o.block_entries = static_cast<std::size_t>(next());
    } else if (a == "--resume-runs") {
      o.resume_runs = next();
    } else {
      std::fputs(
          "bench_cluster [--smoke] [--entries N] [--writers N] [--block-entries N] "
          "[--resume-runs N]\n",
          stderr);
      return a == "--help" ? 0 : 2;
    }
  }
  if (o.entries < 1 || o.writers < 1 || o.block_entries < 1) return 2;
  try {
    return run(o);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_cluster: %s\n", e.what());
    return 1;
  }
}
