// The etcd client (ledger/order/etcd_client.h) against real etcd: 1- and 3-member clusters on
// loopback (tests/support/etcd_cluster.h). Binary values, racing creators, paged prefix reads,
// watches across a kill -9 and a compaction, status, and every way a request can fail: nothing
// listening, a bad URL, a value over the limit, a server that is not etcd. The one fake here is
// that last server (a socket answering bytes etcd would never send).
#include <catch2/catch.hpp>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <map>
#include <mutex>
#include <set>
#include <thread>

#include "ledger/order/etcd_client.h"
#include "tests/support/etcd_cluster.h"
#include "tests/support/temp_dir.h"

using namespace medgate;
using namespace medgate::order;
using medgate::testing::EtcdCluster;
using medgate::testing::TempDir;
using Clock = std::chrono::steady_clock;

namespace {

std::unique_ptr<EtcdClient> client_for(
    std::vector<std::string> endpoints,
    std::chrono::milliseconds timeout = std::chrono::seconds(5)) {
  EtcdOptions o;
  o.endpoints = std::move(endpoints);
  o.request_timeout = timeout;
  auto c = EtcdClient::open(o);
  INFO(c.status().to_string());
  REQUIRE(c.ok());
  return std::move(c).value();
}

Bytes bytes_of(std::string_view s) {
  return to_bytes(s);
}

// A loopback port with nothing listening on it (bound, then closed: the kernel will not hand it
// to anyone else for a while).
int dead_port() {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  REQUIRE(::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0);
  socklen_t len = sizeof addr;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  ::close(fd);
  return ntohs(addr.sin_port);
}

// Collects a watch's deliveries for a test thread to wait on.
struct Deliveries {
  std::mutex mu;
  std::condition_variable cv;
  std::vector<KeyValue> puts;
  std::optional<std::int64_t> compacted;
  std::vector<std::string> reconnects;

  WatchHandlers handlers() {
    WatchHandlers h;
    h.on_put = [this](const KeyValue& kv) {
      std::lock_guard lock(mu);
      puts.push_back(kv);
      cv.notify_all();
    };
    h.on_compacted = [this](std::int64_t rev) {
      std::lock_guard lock(mu);
      compacted = rev;
      cv.notify_all();
    };
    h.on_reconnect = [this](const Status& why) {
      std::lock_guard lock(mu);
      reconnects.push_back(why.message());
      cv.notify_all();
    };
    return h;
  }
  bool wait_for_puts(std::size_t n, std::chrono::seconds timeout = std::chrono::seconds(15)) {
    std::unique_lock lock(mu);
    return cv.wait_for(lock, timeout, [&] { return puts.size() >= n; });
  }
  bool wait_for_compaction(std::chrono::seconds timeout = std::chrono::seconds(10)) {
    std::unique_lock lock(mu);
    return cv.wait_for(lock, timeout, [&] { return compacted.has_value(); });
  }
  bool wait_for_reconnects(std::size_t n, std::chrono::seconds timeout = std::chrono::seconds(10)) {
    std::unique_lock lock(mu);
    return cv.wait_for(lock, timeout, [&] { return reconnects.size() >= n; });
  }
};

// A TCP server on loopback that answers every connection with the same bytes (or holds it open
// and says nothing), to play a server that is not etcd.
class FakeServer {
 public:
  explicit FakeServer(std::string reply, bool silent = false)
      : reply_(std::move(reply)), silent_(silent) {
    fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    REQUIRE(::bind(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0);
    REQUIRE(::listen(fd_, 16) == 0);
    socklen_t len = sizeof addr;
    ::getsockname(fd_, reinterpret_cast<sockaddr*>(&addr), &len);
    port_ = ntohs(addr.sin_port);
    thread_ = std::thread([this] { serve(); });
  }
  ~FakeServer() {
    stop_ = true;
    thread_.join();
    for (int c : held_) ::close(c);
    ::close(fd_);
  }
  std::string endpoint() const { return "http://127.0.0.1:" + std::to_string(port_); }
  int connections() const { return connections_.load(); }

 private:
  void serve() {
    while (!stop_) {
      pollfd p{fd_, POLLIN, 0};
      if (::poll(&p, 1, 50) <= 0) continue;
      int c = ::accept4(fd_, nullptr, nullptr, SOCK_CLOEXEC);
      if (c < 0) continue;
      ++connections_;
      if (silent_) {
        held_.push_back(c);
        continue;
      }
      // Read the request (headers and a little body) before answering, as a server would.
      std::string request;
      char buf[4096];
      for (int i = 0; i < 20 && request.find("\r\n\r\n") == std::string::npos; ++i) {
        pollfd q{c, POLLIN, 0};
        if (::poll(&q, 1, 50) <= 0) continue;
        ssize_t n = ::recv(c, buf, sizeof buf, 0);
        if (n <= 0) break;
        request.append(buf, static_cast<std::size_t>(n));
      }
      (void)!::send(c, reply_.data(), reply_.size(), MSG_NOSIGNAL);
      ::shutdown(c, SHUT_RDWR);
      ::close(c);
    }
  }

  std::string reply_;
  bool silent_;
  int fd_ = -1;
  int port_ = 0;
  std::atomic<bool> stop_{false};
  std::atomic<int> connections_{0};
  std::vector<int> held_;
  std::thread thread_;
};

std::string http_reply(int status, std::string_view body) {
  return "HTTP/1.1 " + std::to_string(status) + " X\r\nContent-Type: application/json\r\n" +
         "Content-Length: " + std::to_string(body.size()) + "\r\nConnection: close\r\n\r\n" +
         std::string(body);
}

}  // namespace

TEST_CASE("prefix_end gives the first key past a prefix", "[etcd]") {
  CHECK(prefix_end("blocks/") == "blocks0");
  CHECK(prefix_end("a") == "b");
  CHECK(prefix_end(std::string("a\xff", 2)) == "b");
  CHECK(prefix_end(std::string("\xff\xff", 2)) == std::string(1, '\0'));
  CHECK(prefix_end("") == std::string(1, '\0'));
}

TEST_CASE("options are checked without a cluster and a bad one is named", "[etcd]") {
  auto open_with = [](EtcdOptions o) { return EtcdClient::open(o); };
  EtcdOptions good;
  good.endpoints = {"http://127.0.0.1:1", "https://[::1]:2379/"};
  CHECK(open_with(good).ok());

  for (std::string bad :
       {"127.0.0.1:2379", "ftp://127.0.0.1:2379", "http://127.0.0.1", "http://127.0.0.1:2379/v3",
        "http://", "http://u@127.0.0.1:1", "http://127.0.0.1:1?x=1", "not a url at all", ""}) {
    EtcdOptions o;
    o.endpoints = {"http://127.0.0.1:1", bad};
    auto r = open_with(o);
    INFO(bad);
    REQUIRE(!r.ok());
    CHECK(r.status().code() == StatusCode::kInvalidArgument);
    CHECK(r.status().message().find("'" + bad + "'") != std::string::npos);
  }

  EtcdOptions none;
  CHECK(open_with(none).status().code() == StatusCode::kInvalidArgument);

  EtcdOptions zero = good;
  zero.request_timeout = std::chrono::milliseconds(0);
  CHECK(open_with(zero).status().code() == StatusCode::kInvalidArgument);

  EtcdOptions half_tls = good;
  half_tls.cert_file = "/etc/hostname";
  auto r = open_with(half_tls);
  CHECK(r.status().code() == StatusCode::kInvalidArgument);
  CHECK(r.status().message().find("both") != std::string::npos);

  EtcdOptions tls_on_http;
  tls_on_http.endpoints = {"http://127.0.0.1:1"};
  tls_on_http.ca_file = "/etc/hostname";
  CHECK(open_with(tls_on_http).status().code() == StatusCode::kInvalidArgument);

  EtcdOptions missing_ca = good;
  missing_ca.ca_file = "/nonexistent/ca.pem";
  r = open_with(missing_ca);
  CHECK(r.status().code() == StatusCode::kInvalidArgument);
  CHECK(r.status().message().find("/nonexistent/ca.pem") != std::string::npos);

  EtcdOptions tiny = good;
  tiny.max_request_bytes = 10;
  CHECK(open_with(tiny).status().code() == StatusCode::kInvalidArgument);
}

TEST_CASE("nothing listening: kUnavailable naming every endpoint, within the timeout", "[etcd]") {
  const std::string a = "http://127.0.0.1:" + std::to_string(dead_port());
  const std::string b = "http://127.0.0.1:" + std::to_string(dead_port());
  auto client = client_for({a, b}, std::chrono::milliseconds(600));
  auto t0 = Clock::now();
  auto r = client->put("k", as_bytes("secret-value"));
  auto elapsed = Clock::now() - t0;
  REQUIRE(!r.ok());
  CHECK(r.status().code() == StatusCode::kUnavailable);
  const std::string& m = r.status().message();
  INFO(m);
  CHECK(m.find(a) != std::string::npos);
  CHECK(m.find(b) != std::string::npos);
  CHECK(m.find("refused") != std::string::npos);
  CHECK(m.find("secret-value") == std::string::npos);  // values never appear in messages
  // Loose: the deadline is 600 ms; this only catches a client that ignores it.
  CHECK(elapsed < std::chrono::seconds(5));

  auto range = client->range("k");
  CHECK(range.status().code() == StatusCode::kUnavailable);
  auto status = client->status();
  CHECK(status.status().code() == StatusCode::kUnavailable);
}

TEST_CASE("a value over the request limit is refused before it is sent", "[etcd]") {
  // Nothing listens: the refusal cannot have come from a server.
  EtcdOptions o;
  o.endpoints = {"http://127.0.0.1:" + std::to_string(dead_port())};
  auto client = EtcdClient::open(o).value();
  Bytes big(kEtcdDefaultMaxRequestBytes, std::byte{7});
  auto r = client->put("blocks/1", big);
  REQUIRE(!r.ok());
  CHECK(r.status().code() == StatusCode::kInvalidArgument);
  CHECK(r.status().message().find("max_request_bytes") != std::string::npos);
  CHECK(r.status().message().find("blocks/1") != std::string::npos);
  auto c = client->create_if_absent("blocks/1", big);
  CHECK(c.status().code() == StatusCode::kInvalidArgument);

  o.max_request_bytes = 4096;
  auto small = EtcdClient::open(o).value();
  CHECK(small->put("k", Bytes(4000)).status().code() == StatusCode::kInvalidArgument);
}

TEST_CASE("a server that is not etcd gets a clear error, never a crash", "[etcd]") {
  struct Case {
    const char* what;
    std::string reply;
    const char* expect;       // in the message
    bool put_answer = false;  // the reply would do as an answer to a put (a header, a revision)
  };
  const std::vector<Case> cases = {
      {"HTML 404", http_reply(404, "<html>no such page</html>"), "HTTP 404"},
      {"200 and not JSON", http_reply(200, "hello \x01\x02 world"), "not JSON"},
      {"200 and some other JSON", http_reply(200, R"({"ok":true})"), "not etcd's"},
      {"a header with a bad revision", http_reply(200, R"({"header":{"revision":"x1"}})"),
       "not etcd's"},
      {"a kvs of the wrong type", http_reply(200, R"({"header":{"revision":"3"},"kvs":7})"),
       "not etcd's", true},
      {"a kv whose key is not base64",
       http_reply(200, R"({"header":{"revision":"3"},"kvs":[{"key":"!!"}]})"), "not etcd's", true},
      {"a header of the wrong type", http_reply(200, R"({"header":[1,2]})"), "not etcd's"},
      {"an error object without a code", http_reply(500, R"({"error":{}})"), "not etcd's"},
      {"not HTTP at all", std::string("\x00\x01garbage\r\n\r\n", 15), ""},
      {"an empty answer", "", ""},
  };
  for (const Case& c : cases) {
    FakeServer server(c.reply);
    auto client = client_for({server.endpoint()}, std::chrono::milliseconds(700));
    auto r = client->range("blocks/", prefix_end("blocks/"));
    INFO(c.what << ": " << r.status().to_string());
    REQUIRE(!r.ok());
    CHECK(r.status().code() == StatusCode::kUnavailable);
    CHECK(r.status().message().find(server.endpoint()) != std::string::npos);
    CHECK(r.status().message().find(c.expect) != std::string::npos);
    if (!c.put_answer) CHECK(!client->put("k", as_bytes("v")).ok());
    CHECK(!client->create_if_absent("k", as_bytes("v")).ok());
    CHECK(!client->status().ok());
  }
}

TEST_CASE("a watch on a server that is not etcd reconnects and stops promptly", "[etcd]") {
  for (bool silent : {false, true}) {
    FakeServer server(http_reply(200, "{\"result\": not json}\n"), silent);
    auto client = client_for({server.endpoint()}, std::chrono::milliseconds(300));
    Deliveries d;
    auto w = client->watch("blocks/", 1, d.handlers());
    REQUIRE(w.ok());
    REQUIRE(d.wait_for_reconnects(2));
    {
      std::lock_guard lock(d.mu);
      INFO(d.reconnects[0]);
      CHECK(d.reconnects[0].find(server.endpoint()) != std::string::npos);
      CHECK(d.puts.empty());
    }
    auto t0 = Clock::now();
    (*w)->stop();
    CHECK(Clock::now() - t0 < std::chrono::seconds(2));
    CHECK(server.connections() >= 2);
  }
}

TEST_CASE("put and range round-trip binary keys and values", "[etcd][cluster]") {
  TempDir dir("medgate-etcd");
  EtcdCluster cluster(dir.path(), 1);
  auto client = client_for(cluster.endpoints());

  Bytes every_byte(256);
  for (int i = 0; i < 256; ++i) every_byte[static_cast<std::size_t>(i)] = std::byte(i);
  const std::string key("bin/\x00\xff\x80key", 11);
  auto rev = client->put(key, every_byte);
  REQUIRE(rev.ok());
  CHECK(*rev > 0);

  auto r = client->range(key);
  REQUIRE(r.ok());
  REQUIRE(r->kvs.size() == 1);
  CHECK(r->kvs[0].key == key);
  CHECK(r->kvs[0].value == every_byte);
  CHECK(r->kvs[0].create_revision == *rev);
  CHECK(r->kvs[0].mod_revision == *rev);
  CHECK(r->kvs[0].version == 1);
  CHECK(r->revision >= *rev);
  CHECK(!r->more);

  // An empty value (left out of etcd's JSON) and a second version.
  auto rev2 = client->put(key, Bytes{});
  REQUIRE(rev2.ok());
  CHECK(*rev2 == *rev + 1);
  r = client->range(key);
  REQUIRE(r.ok());
  REQUIRE(r->kvs.size() == 1);
  CHECK(r->kvs[0].value.empty());
  CHECK(r->kvs[0].version == 2);
  CHECK(r->kvs[0].create_revision == *rev);

  // The old version is still there at its revision, until compacted.
  auto old = client->range(key, "", 0, *rev);
  REQUIRE(old.ok());
  REQUIRE(old->kvs.size() == 1);
  CHECK(old->kvs[0].value == every_byte);

  // A missing key is an empty range, not an error.
  auto missing = client->range("no/such/key");
  REQUIRE(missing.ok());
  CHECK(missing->kvs.empty());

  // remove: one key, then a prefix; a second remove finds nothing.
  REQUIRE(client->put("dk/p1/a", Bytes{std::byte{1}}).ok());
  REQUIRE(client->put("dk/p1/b", Bytes{std::byte{2}}).ok());
  REQUIRE(client->put("dk/p2/a", Bytes{std::byte{3}}).ok());
  CHECK(client->remove("dk/p2/a").value() == 1);
  CHECK(client->remove("dk/p1/", prefix_end("dk/p1/")).value() == 2);
  CHECK(client->remove("dk/p1/", prefix_end("dk/p1/")).value() == 0);
  CHECK(client->range("dk/", prefix_end("dk/")).value().kvs.empty());

  // A future revision is etcd's answer, not a failover.
  auto future = client->range(key, "", 0, *rev2 + 1000);
  CHECK(future.status().code() == StatusCode::kInvalidArgument);
  CHECK(future.status().message().find("future revision") != std::string::npos);

  // A 1 MiB value (a block at its largest) goes through; with the client's limit raised above
  // etcd's, etcd's own refusal comes back as kInvalidArgument.
  Bytes mib(1 << 20, std::byte{0x5a});
  REQUIRE(client->put("big", mib).ok());
  auto big = client->range("big");
  REQUIRE(big.ok());
  CHECK(big->kvs.at(0).value == mib);
  EtcdOptions loose;
  loose.endpoints = cluster.endpoints();
  loose.max_request_bytes = 8 << 20;
  auto lax = EtcdClient::open(loose).value();
  auto too_big = lax->put("big", Bytes(2 << 20));
  CHECK(too_big.status().code() == StatusCode::kInvalidArgument);
  // etcd's check ("request is too large") or gRPC's before it ("larger than max").
  CHECK(too_big.status().message().find("etcd says") != std::string::npos);
}

TEST_CASE("create_if_absent: of racing creators exactly one wins, the others see its value",
          "[etcd][cluster]") {
  TempDir dir("medgate-etcd");
  EtcdCluster cluster(dir.path(), 1);
  auto client = client_for(cluster.endpoints());

  constexpr int kThreads = 6;
  constexpr int kHeights = 20;
  for (int h = 0; h < kHeights; ++h) {
    const std::string key = "blocks/" + std::to_string(h);
    std::vector<Result<CreateResult>> results(kThreads, Status::Internal("not run"));
    std::atomic<int> ready{0};
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; ++t) {
      threads.emplace_back([&, t] {
        ++ready;
        while (ready.load() < kThreads) std::this_thread::yield();
        results[static_cast<std::size_t>(t)] =
            client->create_if_absent(key, bytes_of("member-" + std::to_string(t)));
      });
    }
    for (auto& th : threads) th.join();
    int winners = 0;
    std::string winner_value;
    std::int64_t winner_rev = 0;
    for (auto& r : results) {
      REQUIRE(r.ok());
      if (r->created) {
        ++winners;
        winner_rev = r->revision;
      }
    }
    REQUIRE(winners == 1);
    auto stored = client->range(key);
    REQUIRE(stored.ok());
    REQUIRE(stored->kvs.size() == 1);
    winner_value = to_string(stored->kvs[0].value);
    CHECK(stored->kvs[0].create_revision == winner_rev);
    for (int t = 0; t < kThreads; ++t) {
      auto& r = results[static_cast<std::size_t>(t)];
      if (r->created) {
        CHECK(winner_value == "member-" + std::to_string(t));
        CHECK(!r->existing.has_value());
      } else {
        REQUIRE(r->existing.has_value());
        CHECK(to_string(r->existing->value) == winner_value);
        CHECK(r->existing->create_revision == winner_rev);
        CHECK(r->existing->key == key);
      }
    }
  }
}

TEST_CASE("a prefix range pages with limit and more", "[etcd][cluster]") {
  TempDir dir("medgate-etcd");
  EtcdCluster cluster(dir.path(), 1);
  auto client = client_for(cluster.endpoints());
  for (int i = 0; i < 5; ++i)
    REQUIRE(client->put("p/" + std::to_string(i), as_bytes("v" + std::to_string(i))).ok());
  REQUIRE(client->put("p", as_bytes("outside")).ok());  // the prefix without its slash
  REQUIRE(client->put("q/0", as_bytes("outside")).ok());
  REQUIRE(client->put("o/9", as_bytes("outside")).ok());

  auto all = client->range("p/", prefix_end("p/"));
  REQUIRE(all.ok());
  CHECK(all->kvs.size() == 5);
  CHECK(!all->more);
  CHECK(all->count == 5);

  std::vector<std::string> seen;
  std::string from = "p/";
  const std::int64_t at = all->revision;  // page at one revision: a consistent snapshot
  for (int page = 0; page < 10; ++page) {
    auto r = client->range(from, prefix_end("p/"), 2, at);
    REQUIRE(r.ok());
    CHECK(r->kvs.size() <= 2);
    for (const auto& kv : r->kvs) seen.push_back(kv.key);
    if (!r->more) break;
    CHECK(r->kvs.size() == 2);
    from = r->kvs.back().key + std::string(1, '\0');
  }
  CHECK(seen == std::vector<std::string>{"p/0", "p/1", "p/2", "p/3", "p/4"});

  auto first = client->range("p/", prefix_end("p/"), 2);
  REQUIRE(first.ok());
  CHECK(first->more);
  CHECK(first->count == 5);
}

TEST_CASE("a watch delivers puts under its prefix in revision order", "[etcd][cluster]") {
  TempDir dir("medgate-etcd");
  EtcdCluster cluster(dir.path(), 1);
  auto client = client_for(cluster.endpoints());
  auto before = client->put("blocks/before", as_bytes("x"));
  REQUIRE(before.ok());

  Deliveries d;
  auto w = client->watch("blocks/", *before + 1, d.handlers());
  REQUIRE(w.ok());
  std::vector<std::int64_t> revisions;
  for (int i = 0; i < 40; ++i) {
    auto r = client->put("blocks/" + std::to_string(i % 7), as_bytes("value " + std::to_string(i)));
    REQUIRE(r.ok());
    revisions.push_back(*r);
    if (i % 10 == 0) REQUIRE(client->put("other/" + std::to_string(i), as_bytes("-")).ok());
  }
  REQUIRE(d.wait_for_puts(40));
  std::this_thread::sleep_for(std::chrono::milliseconds(200));  // nothing more may come
  (*w)->stop();
  REQUIRE(d.puts.size() == 40);
  for (std::size_t i = 0; i < d.puts.size(); ++i) {
    CHECK(d.puts[i].mod_revision == revisions[i]);
    CHECK(to_string(d.puts[i].value) == "value " + std::to_string(i));
    CHECK(d.puts[i].key.rfind("blocks/", 0) == 0);
  }
  CHECK((*w)->last_revision() == revisions.back());
  CHECK(d.reconnects.empty());
  CHECK(!d.compacted);

  SECTION("a watch from an earlier revision replays history first") {
    Deliveries replay;
    auto w2 = client->watch("blocks/", 1, replay.handlers());
    REQUIRE(w2.ok());
    REQUIRE(replay.wait_for_puts(41));
    (*w2)->stop();
    CHECK(replay.puts.front().key == "blocks/before");
    CHECK(std::is_sorted(
        replay.puts.begin(), replay.puts.end(),
        [](const KeyValue& a, const KeyValue& b) { return a.mod_revision < b.mod_revision; }));
  }
}

TEST_CASE("a compacted start revision is reported, never skipped", "[etcd][cluster]") {
  TempDir dir("medgate-etcd");
  EtcdCluster cluster(dir.path(), 1);
  auto client = client_for(cluster.endpoints());
  std::int64_t last = 0;
  for (int i = 0; i < 10; ++i) last = client->put("blocks/0", as_bytes(std::to_string(i))).value();
  cluster.etcdctl({"compact", std::to_string(last)});

  Deliveries d;
  auto w = client->watch("blocks/", 2, d.handlers());
  REQUIRE(w.ok());
  REQUIRE(d.wait_for_compaction());
  CHECK(*d.compacted == last);
  CHECK(d.puts.empty());
  CHECK((*w)->ended());
  (*w)->stop();

  // The range read the caller catches up with; older revisions are gone, and say so.
  auto old = client->range("blocks/0", "", 0, last - 1);
  CHECK(old.status().code() == StatusCode::kFailedPrecondition);
  CHECK(old.status().message().find("compacted") != std::string::npos);
  auto now = client->range("blocks/", prefix_end("blocks/"), 0, last);
  REQUIRE(now.ok());
  CHECK(to_string(now->kvs.at(0).value) == "9");

  // From the compact revision on, a watch works again.
  Deliveries again;
  auto w2 = client->watch("blocks/", last, again.handlers());
  REQUIRE(w2.ok());
  REQUIRE(again.wait_for_puts(1));
  CHECK(again.puts[0].mod_revision == last);
  (*w2)->stop();
}

TEST_CASE("compact: superseded and deleted values go, latest values stay, refusals say why",
          "[etcd][cluster]") {
  TempDir dir("medgate-etcd");
  EtcdCluster cluster(dir.path(), 1);
  auto client = client_for(cluster.endpoints());
  std::int64_t first = 0, last = 0;
  for (int i = 0; i < 5; ++i) {
    last = client->put("blocks/0", as_bytes("v" + std::to_string(i))).value();
    if (first == 0) first = last;
  }
  const std::int64_t erased = client->put("data/erased", as_bytes("secret")).value();
  REQUIRE(client->remove("data/erased").value() == 1);
  const std::int64_t mark = client->put("blocks/1", as_bytes("kept")).value();
  // Before: history holds the superseded and the deleted values.
  CHECK(to_string(client->range("blocks/0", "", 0, first).value().kvs.at(0).value) == "v0");
  CHECK(to_string(client->range("data/erased", "", 0, erased).value().kvs.at(0).value) == "secret");

  // Bad input is refused before anything is sent; a revision not reached yet by etcd.
  CHECK(client->compact(0, false).code() == StatusCode::kInvalidArgument);
  CHECK(client->compact(-3, true).code() == StatusCode::kInvalidArgument);
  Status future = client->compact(mark + 1000, false);
  CHECK(future.code() == StatusCode::kInvalidArgument);
  CHECK(future.message().find("future") != std::string::npos);
  CHECK(future.message().find(std::to_string(mark + 1000)) != std::string::npos);

  // A watch that starts before the compaction and keeps up is not cut by it.
  Deliveries live;
  auto w_live = client->watch("blocks/", mark + 1, live.handlers());
  REQUIRE(w_live.ok());

  // Logical first, then physical (waits for the backend): each leaves the older revisions
  // unreadable.
  REQUIRE(client->compact(erased, false).ok());
  CHECK(client->range("blocks/0", "", 0, first).status().code() == StatusCode::kFailedPrecondition);
  CHECK(to_string(client->range("data/erased", "", 0, erased).value().kvs.at(0).value) ==
        "secret");  // the compaction revision itself stays readable
  REQUIRE(client->compact(mark, true).ok());
  auto gone = client->range("data/erased", "", 0, erased);
  CHECK(gone.status().code() == StatusCode::kFailedPrecondition);
  CHECK(gone.status().message().find("compacted") != std::string::npos);
  // Latest values stay; the deleted key stays deleted.
  auto now = client->range("blocks/", prefix_end("blocks/"));
  REQUIRE(now.ok());
  REQUIRE(now->kvs.size() == 2);
  CHECK(to_string(now->kvs[0].value) == "v4");
  CHECK(to_string(now->kvs[1].value) == "kept");
  CHECK(client->range("data/", prefix_end("data/")).value().kvs.empty());

  // Again, or lower: refused as already compacted (the goal holds).
  Status again = client->compact(mark, false);
  CHECK(again.code() == StatusCode::kFailedPrecondition);
  CHECK(again.message().find("compacted") != std::string::npos);
  CHECK(client->compact(first, true).code() == StatusCode::kFailedPrecondition);

  // A watch from below the compaction reports it and ends; the live one goes on.
  Deliveries d;
  auto w = client->watch("blocks/", first, d.handlers());
  REQUIRE(w.ok());
  REQUIRE(d.wait_for_compaction());
  CHECK(*d.compacted == mark);
  CHECK(d.puts.empty());
  CHECK((*w)->ended());
  (*w)->stop();
  const std::int64_t after = client->put("blocks/2", as_bytes("after")).value();
  REQUIRE(live.wait_for_puts(1));
  (*w_live)->stop();
  CHECK(live.puts.at(0).mod_revision == after);
  CHECK(!live.compacted);
}

TEST_CASE("range with min_mod_revision: what changed since a revision, past a compaction",
          "[etcd][cluster]") {
  TempDir dir("medgate-etcd");
  EtcdCluster cluster(dir.path(), 1);
  auto client = client_for(cluster.endpoints());
  for (int i = 0; i < 6; ++i) REQUIRE(client->put("k/" + std::to_string(i), as_bytes("a")).ok());
  const std::int64_t since = client->put("k/2", as_bytes("b")).value();
  REQUIRE(client->put("k/4", as_bytes("b")).ok());
  REQUIRE(client->put("k/4", as_bytes("c")).ok());
  REQUIRE(client->compact(since + 1, false).ok());
  // Filtered before the limit: two pages of one, and count still counts the whole range.
  auto page = client->range("k/", prefix_end("k/"), 1, 0, since);
  REQUIRE(page.ok());
  REQUIRE(page->kvs.size() == 1);
  CHECK(page->kvs[0].key == "k/2");
  CHECK(page->more);
  CHECK(page->count == 6);
  auto rest = client->range("k/3", prefix_end("k/"), 1, 0, since);
  REQUIRE(rest.ok());
  REQUIRE(rest->kvs.size() == 1);
  CHECK(rest->kvs[0].key == "k/4");
  CHECK(to_string(rest->kvs[0].value) == "c");
  CHECK(client->range("k/", prefix_end("k/"), 0, 0, -1).status().code() ==
        StatusCode::kInvalidArgument);
}

TEST_CASE("3 members: status, and a watch and writes survive kill -9 of their member",
          "[etcd][cluster]") {
  TempDir dir("medgate-etcd");
  EtcdCluster cluster(dir.path(), 3);
  auto client = client_for(cluster.endpoints(), std::chrono::seconds(5));

  auto st = client->status();
  REQUIRE(st.ok());
  CHECK(st->leader != 0);
  CHECK(st->raft_term > 0);
  CHECK(st->version.rfind("3.", 0) == 0);
  CHECK(st->db_size > 0);
  CHECK(st->endpoint == cluster.endpoint(0));
  REQUIRE(st->member_health.size() == 3);
  for (const auto& h : st->member_health) CHECK(h.healthy);

  Deliveries d;
  auto w = client->watch("blocks/", 1, d.handlers());
  REQUIRE(w.ok());
  // The client starts on the first endpoint: the watch is on member 0, which is killed below.
  CHECK((*w)->endpoint() == cluster.endpoint(0));

  std::vector<std::int64_t> revisions;
  int next = 0;
  auto put_some = [&](int n) {
    for (int i = 0; i < n; ++i, ++next) {
      auto r = client->put("blocks/" + std::to_string(next), as_bytes(std::to_string(next)));
      INFO(r.status().to_string());
      REQUIRE(r.ok());
      revisions.push_back(*r);
    }
  };
  put_some(10);
  REQUIRE(d.wait_for_puts(10));

  cluster.kill(0);
  put_some(10);  // fails over to member 1 or 2
  REQUIRE(d.wait_for_puts(20));
  CHECK((*w)->endpoint() != cluster.endpoint(0));
  CHECK(!d.reconnects.empty());

  auto down = client->status();
  REQUIRE(down.ok());
  CHECK(down->leader != 0);
  CHECK(!down->member_health[0].healthy);
  CHECK(!down->member_health[0].error.empty());

  cluster.restart(0);
  put_some(10);
  REQUIRE(d.wait_for_puts(30));
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  (*w)->stop();
  REQUIRE(d.puts.size() == 30);  // none lost, none twice
  for (std::size_t i = 0; i < 30; ++i) {
    CHECK(d.puts[i].mod_revision == revisions[i]);
    CHECK(to_string(d.puts[i].value) == std::to_string(i));
  }

  // A create after the failover still has exactly one winner.
  auto a = client->create_if_absent("blocks/claimed", as_bytes("a"));
  auto b = client->create_if_absent("blocks/claimed", as_bytes("b"));
  REQUIRE(a.ok());
  REQUIRE(b.ok());
  CHECK(a->created);
  CHECK(!b->created);
  CHECK(to_string(b->existing->value) == "a");

  auto healed = client->status();
  REQUIRE(healed.ok());
  for (const auto& h : healed->member_health) CHECK(h.healthy);
}

TEST_CASE("TLS: a member that asks for client certificates, and the ways to get it wrong",
          "[etcd][cluster]") {
  TempDir dir("medgate-etcd-tls");
  // A throwaway CA, a member certificate for 127.0.0.1 and a client certificate (openssl CLI).
  const std::string script = R"(set -e
cd ")" + dir.path().string() +
                             R"("
key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
key ca.key; key server.key; key client.key; key rogue.key
openssl req -x509 -new -key ca.key -subj /CN=medgate-test-ca -days 1 -out ca.pem
openssl req -x509 -new -key rogue.key -subj /CN=rogue-ca -days 1 -out rogue.pem
openssl req -new -key server.key -subj /CN=etcd -out server.csr
openssl req -new -key client.key -subj /CN=medgate-member -out client.csr
printf 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n' > server.ext
printf 'extendedKeyUsage=clientAuth\n' > client.ext
openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 -extfile server.ext -out server.pem 2>/dev/null
openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 -extfile client.ext -out client.pem 2>/dev/null
)";
  REQUIRE(std::system(("bash -c '" +
                       [&] {
                         std::string quoted;
                         for (char c : script)
                           quoted += c == '\'' ? std::string("'\\''") : std::string(1, c);
                         return quoted;
                       }() +
                       "'")
                          .c_str()) == 0);
  testing::EtcdTlsFiles files{dir / "ca.pem",     dir / "server.pem", dir / "server.key",
                              dir / "client.pem", dir / "client.key", true};
  EtcdCluster cluster(dir.path(), 1, files);
  REQUIRE(cluster.endpoint(0).rfind("https://", 0) == 0);

  EtcdOptions o;
  o.endpoints = cluster.endpoints();
  o.request_timeout = std::chrono::milliseconds(1500);
  o.ca_file = files.ca.string();
  o.cert_file = files.client_cert.string();
  o.key_file = files.client_key.string();
  auto client = EtcdClient::open(o).value();
  auto rev = client->put("tls/k", as_bytes("over TLS"));
  REQUIRE(rev.ok());
  auto c = client->create_if_absent("tls/k", as_bytes("other"));
  REQUIRE(c.ok());
  CHECK(!c->created);
  CHECK(to_string(c->existing->value) == "over TLS");
  auto st = client->status();
  REQUIRE(st.ok());
  CHECK(st->member_health.at(0).healthy);
  Deliveries d;
  auto w = client->watch("tls/", *rev, d.handlers());
  REQUIRE(w.ok());
  REQUIRE(d.wait_for_puts(1));
  (*w)->stop();
  CHECK(to_string(d.puts[0].value) == "over TLS");

  // Without a client certificate the member hangs up; with another CA the member is not trusted.
  EtcdOptions no_cert = o;
  no_cert.cert_file.clear();
  no_cert.key_file.clear();
  auto r = EtcdClient::open(no_cert).value()->range("tls/k");
  CHECK(r.status().code() == StatusCode::kUnavailable);
  CHECK(r.status().message().find(cluster.endpoint(0)) != std::string::npos);

  EtcdOptions wrong_ca = o;
  wrong_ca.ca_file = (dir / "rogue.pem").string();
  r = EtcdClient::open(wrong_ca).value()->range("tls/k");
  INFO(r.status().to_string());
  CHECK(r.status().code() == StatusCode::kUnavailable);
  CHECK(r.status().message().find("certificate") != std::string::npos);
}
