// bench_etcd: how many blocks per second etcd can order here. A benchmark, not a test: nothing
// here judges a time; `--smoke` (a ctest) runs every phase with tiny counts and fails only on a
// wrong answer (a fresh key not created, a height with other than one winner, a lost event).
//
// Against a real 3-member etcd cluster on loopback (tests/support/etcd_cluster.h; data in $TMPDIR,
// so etcd's fsyncs hit this machine's disk), through medgate's client (ledger/order):
//   - create_if_absent (the transaction a member claims a block height with) of fresh keys, with
//     plain put of the same values beside it as the baseline, for 64 KiB and 1 MiB values, from
//     1 and 4 threads;
//   - heights ordered per second when 3 members race for every height (one wins, two lose and
//     read the winner's block);
//   - watch delivery latency, put -> on_put callback, p50/p99, beside the put's own latency.
// etcd's history is compacted between phases so the 2 GiB backend quota is never reached.
//
// Run a Release (RelWithDebInfo) build; `bench_etcd --help` lists the flags.
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include <fmt/format.h>

#include "ledger/order/etcd_client.h"
#include "tests/bench/bench_util.h"
#include "tests/support/etcd_cluster.h"
#include "tests/support/temp_dir.h"

using namespace medgate;
using namespace medgate::order;
using Clock = std::chrono::steady_clock;

namespace {

struct Options {
  int ops_64k = 400;  // per phase and thread count
  int ops_1m = 60;
  int heights = 200;  // contended phase, 64 KiB blocks
  int watch_events = 300;
  bool smoke = false;
};

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

std::int64_t ns_since(Clock::time_point t0) {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - t0).count();
}

Bytes filler(std::size_t size, int seed) {
  Bytes v(size);
  for (std::size_t i = 0; i < size; ++i)
    v[i] = std::byte(static_cast<unsigned>((i * 31 + static_cast<std::size_t>(seed)) & 0xff));
  return v;
}

struct Run {
  double seconds = 0;
  std::vector<std::int64_t> latencies_ns;
  bool wrong = false;
  std::string error;
};

// `ops` operations split over `threads` threads; op(thread, i) returns false on a wrong answer.
template <typename Op>
Run run_ops(int threads, int ops, Op op) {
  Run run;
  std::mutex mu;
  std::atomic<int> next{0};
  auto t0 = Clock::now();
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      std::vector<std::int64_t> mine;
      for (int i = next++; i < ops; i = next++) {
        auto s = Clock::now();
        std::string error;
        bool ok = op(t, i, error);
        mine.push_back(ns_since(s));
        if (!ok) {
          std::lock_guard lock(mu);
          run.wrong = true;
          if (run.error.empty()) run.error = error;
        }
      }
      std::lock_guard lock(mu);
      run.latencies_ns.insert(run.latencies_ns.end(), mine.begin(), mine.end());
    });
  }
  for (auto& th : pool) th.join();
  run.seconds = seconds_since(t0);
  return run;
}

std::string size_name(std::size_t size) {
  return size >= (1 << 20) ? fmt::format("{} MiB", size >> 20) : fmt::format("{} KiB", size >> 10);
}

// Drops etcd's history up to now so that the phases do not fill the backend.
void compact(EtcdClient& client, testing::EtcdCluster& cluster) {
  auto r = client.range("bench/none");
  if (r.ok()) cluster.etcdctl({"compact", std::to_string(r->revision)});
}

int run(const Options& o) {
  testing::TempDir dir("medgate-bench-etcd");
  auto fsync = bench::probe_fsync(dir.path(), o.smoke ? 5 : 50);
  auto t_start = Clock::now();
  testing::EtcdCluster cluster(dir.path(), 3);
  const double start_s = seconds_since(t_start);
  EtcdOptions eo;
  eo.endpoints = cluster.endpoints();
  eo.request_timeout = std::chrono::seconds(10);
  eo.attempt_timeout = std::chrono::seconds(5);
  auto opened = EtcdClient::open(eo);
  if (!opened.ok()) {
    fmt::print(stderr, "{}\n", opened.status().to_string());
    return 1;
  }
  EtcdClient& client = **opened;
  auto st = client.status();
  if (!st.ok()) {
    fmt::print(stderr, "{}\n", st.status().to_string());
    return 1;
  }

  fmt::print("etcd: 3 members on loopback (etcd {}, started healthy in {:.2f} s), data in {}\n",
             st->version, start_s, dir.path().string());
  fmt::print(
      "machine: {} CPUs available, load {} at {}; disk 4 KiB write+fdatasync p50 {} ms, "
      "p99 {} ms\n\n",
      bench::cpus_available(), bench::load_average(), bench::utc_now(),
      fsync.ok() ? fmt::format("{:.2f}", fsync->p50_ms) : "?",
      fsync.ok() ? fmt::format("{:.2f}", fsync->p99_ms) : "?");

  bool ok = true;
  int phase = 0;
  bench::Table table({"operation", "value", "threads", "ops", "ops/s", "MB/s", "p50 ms", "p99 ms"});
  auto row = [&](const std::string& what, std::size_t size, int threads, const Run& r) {
    auto p = bench::percentiles(r.latencies_ns);
    const double n = static_cast<double>(r.latencies_ns.size());
    table.row({what, size_name(size), std::to_string(threads),
               bench::grouped(static_cast<std::uint64_t>(n)), fmt::format("{:.1f}", n / r.seconds),
               fmt::format("{:.1f}", n * static_cast<double>(size) / r.seconds / 1e6),
               fmt::format("{:.1f}", p.p50_ms), fmt::format("{:.1f}", p.p99_ms)});
    if (r.wrong) {
      fmt::print("WRONG in {} ({}): {}\n", what, size_name(size), r.error);
      ok = false;
    }
  };

  for (std::size_t size : {std::size_t{64} << 10, std::size_t{1} << 20}) {
    const int ops = size >= (1u << 20) ? o.ops_1m : o.ops_64k;
    const Bytes value = filler(size, static_cast<int>(size));
    for (int threads : {1, 4}) {
      ++phase;
      Run put = run_ops(threads, ops, [&](int, int i, std::string& error) {
        auto r = client.put(fmt::format("bench/put/{}/{}", phase, i), value);
        if (!r.ok()) error = r.status().to_string();
        return r.ok();
      });
      row("put (baseline)", size, threads, put);
      compact(client, cluster);
      Run create = run_ops(threads, ops, [&](int, int i, std::string& error) {
        auto r = client.create_if_absent(fmt::format("bench/blocks/{}/{}", phase, i), value);
        if (!r.ok()) error = r.status().to_string();
        if (r.ok() && !r->created) error = "a fresh key was not created";
        return r.ok() && r->created;
      });
      row("create_if_absent", size, threads, create);
      compact(client, cluster);
    }
  }

  // Three members race for every height: each claims the lowest height it has not seen filled;
  // exactly one create per height may succeed.
  {
    const std::size_t size = 64 << 10;
    std::atomic<int> wins{0}, losses{0};
    std::atomic<bool> wrong{false};
    std::mutex mu;
    std::string error;
    std::vector<std::int64_t> latencies;
    auto t0 = Clock::now();
    std::vector<std::thread> members;
    for (int m = 0; m < 3; ++m) {
      members.emplace_back([&, m] {
        const Bytes block = filler(size, m);
        std::vector<std::int64_t> mine;
        for (int h = 0; h < o.heights; ++h) {
          auto s = Clock::now();
          auto r = client.create_if_absent(fmt::format("bench/race/{:08}", h), block);
          mine.push_back(ns_since(s));
          if (!r.ok() || (!r->created && (!r->existing || r->existing->value.size() != size))) {
            wrong = true;
            std::lock_guard lock(mu);
            if (error.empty())
              error = r.ok() ? "a loser without the winner's block" : r.status().to_string();
            continue;
          }
          (r->created ? wins : losses)++;
        }
        std::lock_guard lock(mu);
        latencies.insert(latencies.end(), mine.begin(), mine.end());
      });
    }
    for (auto& th : members) th.join();
    const double s = seconds_since(t0);
    if (wins.load() != o.heights) {
      wrong = true;
      error = fmt::format("{} winners for {} heights", wins.load(), o.heights);
    }
    auto p = bench::percentiles(latencies);
    table.row({"3 members race per height", size_name(size), "3",
               bench::grouped(static_cast<std::uint64_t>(o.heights)),
               fmt::format("{:.1f}", o.heights / s),
               fmt::format("{:.1f}", o.heights * static_cast<double>(size) / s / 1e6),
               fmt::format("{:.1f}", p.p50_ms), fmt::format("{:.1f}", p.p99_ms)});
    if (wrong) {
      fmt::print("WRONG in the race: {}\n", error);
      ok = false;
    }
    compact(client, cluster);
  }
  table.print();
  fmt::print(
      "  (the race row's ops/s is heights ordered per second; its latencies are per claim)\n\n");

  // Watch latency: the put's start time travels in the value; on_put subtracts it from now.
  bench::Table wt({"watch, value", "events", "put p50 ms", "put p99 ms", "put->event p50 ms",
                   "put->event p99 ms", "max ms"});
  for (std::size_t size : {std::size_t{1} << 10, std::size_t{64} << 10}) {
    auto base = client.range("bench/none");
    if (!base.ok()) return 1;
    std::mutex mu;
    std::condition_variable cv;
    std::vector<std::int64_t> delivery;
    const auto epoch = Clock::now();
    WatchHandlers h;
    h.on_put = [&](const KeyValue& kv) {
      std::int64_t sent = 0;
      if (kv.value.size() >= sizeof sent) std::memcpy(&sent, kv.value.data(), sizeof sent);
      std::int64_t now = ns_since(epoch);
      std::lock_guard lock(mu);
      delivery.push_back(now - sent);
      cv.notify_all();
    };
    h.on_compacted = [&](std::int64_t) {};
    auto w = client.watch(fmt::format("bench/watch/{}/", size), base->revision + 1, h);
    if (!w.ok()) {
      fmt::print(stderr, "{}\n", w.status().to_string());
      return 1;
    }
    Bytes value = filler(size, 1);
    std::vector<std::int64_t> put_ns;
    for (int i = 0; i < o.watch_events; ++i) {
      std::int64_t sent = ns_since(epoch);
      std::memcpy(value.data(), &sent, sizeof sent);
      auto s = Clock::now();
      if (!client.put(fmt::format("bench/watch/{}/{}", size, i), value).ok()) {
        ok = false;
        break;
      }
      put_ns.push_back(ns_since(s));
    }
    {
      std::unique_lock lock(mu);
      cv.wait_for(lock, std::chrono::seconds(30),
                  [&] { return delivery.size() >= static_cast<std::size_t>(o.watch_events); });
    }
    (*w)->stop();
    if (delivery.size() != static_cast<std::size_t>(o.watch_events)) {
      fmt::print("WRONG: the watch delivered {} of {} puts\n", delivery.size(), o.watch_events);
      ok = false;
    }
    auto pp = bench::percentiles(put_ns);
    auto pd = bench::percentiles(delivery);
    wt.row({size_name(size), bench::grouped(delivery.size()), fmt::format("{:.1f}", pp.p50_ms),
            fmt::format("{:.1f}", pp.p99_ms), fmt::format("{:.1f}", pd.p50_ms),
            fmt::format("{:.1f}", pd.p99_ms), fmt::format("{:.1f}", pd.max_ms)});
    compact(client, cluster);
  }
  fmt::print("watch delivery, one put at a time (the put's own latency is the baseline):\n");
  wt.print();
  return ok ? 0 : 1;
}

}  // namespace

int main(int argc, char* argv[]) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    std::string_view a = argv[i];
    auto next = [&]() { return i + 1 < argc ? std::atoi(argv[++i]) : 0; };
    if (a == "--smoke") {
      o = Options{5, 3, 5, 5, true};
    } else if (a == "--ops-64k") {
      o.ops_64k = next();
    } else if (a == "--ops-1m") {
      o.ops_1m = next();
    } else if (a == "--heights") {
      o.heights = next();
    } else if (a == "--watch-events") {
      o.watch_events = next();
    } else {
      std::fputs(
          "bench_etcd [--smoke] [--ops-64k N] [--ops-1m N] [--heights N] "
          "[--watch-events N]\n",
          stderr);
      return a == "--help" ? 0 : 2;
    }
  }
  if (o.ops_64k < 1 || o.ops_1m < 1 || o.heights < 1 || o.watch_events < 1) return 2;
  try {
    return run(o);
  } catch (const std::exception& e) {  // the fixture throws when etcd cannot be started
    std::fprintf(stderr, "bench_etcd: %s\n", e.what());
    return 1;
  }
}
