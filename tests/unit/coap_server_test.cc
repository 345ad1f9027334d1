// The CoAP listener against the real libcoap client (coap-client-openssl) over DTLS-PSK on
// loopback. Note the client exits 0 even when the DTLS handshake fails, so every check reads the
// response code it prints (-v 6 shows each received PDU as "c:2.04"; error classes also print
// "4.00 diagnostic" on stderr).
#include <catch2/catch.hpp>

#include <fcntl.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <condition_variable>
#include <deque>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <regex>
#include <string>
#include <thread>
#include <vector>

#include "appliance/coap/server.h"
#include "tests/support/temp_dir.h"

using namespace medgate;
using namespace medgate::appliance;
using namespace medgate::appliance::coap;
using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

namespace {

const std::filesystem::path kData = std::filesystem::path(MEDGATE_TEST_DATA) / "senml";

// A port nothing listens on right now (the kernel's pick for an ephemeral UDP bind).
std::uint16_t free_udp_port() {
  int fd = ::socket(AF_INET, SOCK_DGRAM, 0);
  REQUIRE(fd >= 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  REQUIRE(::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);
  socklen_t len = sizeof a;
  REQUIRE(::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) == 0);
  ::close(fd);
  return ntohs(a.sin_port);
}

class MapDirectory : public DeviceDirectory {
 public:
  void put(DeviceCredentials d) {
    std::lock_guard lock(mu_);
    devices_[d.device_id] = std::move(d);
  }
  std::optional<DeviceCredentials> coap_device(std::string_view identity) const override {
    std::lock_guard lock(mu_);
    auto it = devices_.find(std::string(identity));
    if (it == devices_.end()) return std::nullopt;
    return it->second;
  }
  std::optional<DeviceCredentials> hl7_source(std::string_view, std::string_view) const override {
    return std::nullopt;
  }

 private:
  mutable std::mutex mu_;
  std::map<std::string, DeviceCredentials> devices_;
};

// A stand-in for the ledger pipeline (vault + ledger writer), which the daemon wires in later: it
// records every batch and reports it durable (or failed) from its own thread after a delay, or
// refuses it with kBusy, as the test asks.
class TestSink : public IngestSink {
 public:
  enum class Mode { kCommit, kBusy, kFail };

  explicit TestSink(std::chrono::milliseconds delay) : delay_(delay), worker_([this] { run(); }) {}
  ~TestSink() override {
    {
      std::lock_guard lock(mu_);
      quit_ = true;
    }
    cv_.notify_all();
    worker_.join();
  }

  void set_mode(Mode m) { mode_ = m; }

  Admit submit(IngestBatch batch, std::function<void(IngestResult)> done) override {
    if (mode_ == Mode::kBusy) return Admit::kBusy;
    std::lock_guard lock(mu_);
    batches_.push_back(std::move(batch));
    durable_at_.emplace_back();
    queue_.push_back(
        {Clock::now() + delay_, batches_.size() - 1, std::move(done), mode_ == Mode::kFail});
    cv_.notify_all();
    return Admit::kAccepted;
  }

  std::vector<IngestBatch> batches() const {
    std::lock_guard lock(mu_);
    return batches_;
  }
  // When each batch was reported (nullopt: not yet).
  std::vector<std::optional<Clock::time_point>> durable_at() const {
    std::lock_guard lock(mu_);
    return durable_at_;
  }

 private:
  struct Item {
    Clock::time_point due;
    std::size_t index;
    std::function<void(IngestResult)> done;
    bool fail;
  };

  void run() {
    std::unique_lock lock(mu_);
    while (true) {
      cv_.wait(lock, [&] { return quit_ || !queue_.empty(); });
      if (queue_.empty()) return;  // quit, and nothing is owed an answer
      if (cv_.wait_until(lock, queue_.front().due, [&] { return false; })) continue;
      Item item = std::move(queue_.front());
      queue_.pop_front();
      durable_at_[item.index] = Clock::now();
      lock.unlock();
      IngestResult r;
      if (item.fail) r.status = Status::IOError("fsync failed (test)");
      item.done(std::move(r));
      lock.lock();
    }
  }

  const std::chrono::milliseconds delay_;
  std::atomic<Mode> mode_{Mode::kCommit};
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Item> queue_;
  std::vector<IngestBatch> batches_;
  std::vector<std::optional<Clock::time_point>> durable_at_;
  bool quit_ = false;
  std::thread worker_;
};

struct ClientRun {
  std::string output;  // stdout and stderr
  Clock::time_point finished;
  std::string error;  // non-empty when the client could not be run (see spawn_client)
  // The last response code the client received ("2.04", "4.00", ...), empty if none.
  std::string code() const {
    static const std::regex re("c:([0-9]\\.[0-9]{2})");
    std::string last;
    for (std::sregex_iterator it(output.begin(), output.end(), re), end; it != end; ++it) {
      if ((*it)[1] != "0.00") last = (*it)[1];
    }
    return last;
  }
};

// `wait_s`: the client's -B, how long it waits for an answer. A failed handshake is only seen as
// silence (DTLS drops records it cannot authenticate), so those tests wait briefly.
//
// Runs from the tests' own threads too, so it uses no Catch2 macro (Catch2 v2's assertions and
// INFO are not thread-safe): a failure to start or a crash is told in `error`, and callers assert
// on the main thread. The pipe is close-on-exec so that a client started by another thread at the
// same moment does not inherit this one's write end (and hold its reader open).
ClientRun spawn_client(const std::vector<std::string>& args, int wait_s = 10) {
  std::vector<std::string> full = {"coap-client-openssl", "-v", "6", "-B", std::to_string(wait_s)};
  full.insert(full.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (auto& a : full) argv.push_back(a.data());
  argv.push_back(nullptr);
  ClientRun run;
  int out[2];
  if (::pipe2(out, O_CLOEXEC) != 0) {
    run.error = std::string("pipe: ") + std::strerror(errno);
    return run;
  }
  pid_t pid = ::fork();
  if (pid < 0) {
    run.error = std::string("fork: ") + std::strerror(errno);
    ::close(out[0]);
    ::close(out[1]);
    return run;
  }
  if (pid == 0) {
    ::dup2(out[1], 1);  // dup2's copies are not close-on-exec
    ::dup2(out[1], 2);
    ::execvp(argv[0], argv.data());
    ::_exit(127);
  }
  ::close(out[1]);
  char buf[4096];
  ssize_t n;
  while ((n = ::read(out[0], buf, sizeof buf)) > 0 || (n < 0 && errno == EINTR)) {
    if (n > 0) run.output.append(buf, static_cast<size_t>(n));
  }
  ::close(out[0]);
  int wstatus = 0;
  while (::waitpid(pid, &wstatus, 0) < 0 && errno == EINTR) {
  }
  run.finished = Clock::now();
  if (!WIFEXITED(wstatus)) {
    run.error = "coap-client-openssl did not exit normally";
  } else if (WEXITSTATUS(wstatus) == 127) {
    run.error = "coap-client-openssl could not be started";
  }
  return run;
}

// spawn_client for the main thread, asserting that the client ran.
ClientRun run_client(const std::vector<std::string>& args, int wait_s = 10) {
  ClientRun run = spawn_client(args, wait_s);
  INFO(run.output);
  REQUIRE(run.error.empty());
  return run;
}

struct Harness {
  explicit Harness(std::size_t max_payload = kMaxPackBytes, std::chrono::milliseconds delay = 300ms)
      : sink(delay) {
    directory.put({"pulse-ox-1", false, "PAT-1", to_bytes("right-key-1"), {}, {}});
    directory.put({"revoked-1", true, "PAT-2", to_bytes("revoked-key"), {}, {}});
    directory.put({"unbound-1", false, "", to_bytes("unbound-key"), {}, {}});
    CoapServerConfig config;
    config.address = "127.0.0.1";
    config.port = free_udp_port();
    config.plain_port = free_udp_port();
    config.max_payload = max_payload;
    port = config.port;
    plain_port = *config.plain_port;
    Status s = server.start(config, directory, sink);
    INFO(s.to_string());
    REQUIRE(s.ok());
  }

  ClientRun post(const std::string& identity, const std::string& key,
                 const std::filesystem::path& file, int format = 110, int wait_s = 10) {
    // No assertion here: tests call this from their own threads. A client that did not run has
    // no response code, so every caller's check on code() fails, and its error is in the output.
    ClientRun run = spawn_client({"-m", "post", "-t", std::to_string(format), "-f", file.string(),
                                  "-u", identity, "-k", key,
                                  "coaps://127.0.0.1:" + std::to_string(port) + "/obs"},
                                 wait_s);
    if (!run.error.empty()) run.output += "\n[test] " + run.error;
    return run;
  }
  std::filesystem::path write(const std::string& name, const std::string& content) {
    auto p = dir / name;
    std::ofstream(p, std::ios::binary) << content;
    return p;
  }
  std::uint64_t rejected(const std::string& device, RejectReason r) {
    return server.counters().devices[device].rejected[static_cast<std::size_t>(r)];
  }

  testing::TempDir dir{"medgate-coap"};
  MapDirectory directory;
  TestSink sink;
  CoapServer server;
  std::uint16_t port = 0;
  std::uint16_t plain_port = 0;
};

}  // namespace

TEST_CASE("coap: the right key gets 2.04, and only once the sink reported the batch durable",
          "[coap]") {
  Harness h;
  const auto sent = Clock::now();
  ClientRun r = h.post("pulse-ox-1", "right-key-1", kData / "ex2.gen.json");
  INFO(r.output);
  CHECK(r.code() == "2.04");
  auto batches = h.sink.batches();
  REQUIRE(batches.size() == 1);
  CHECK(batches[0].kind == SourceKind::kCoap);
  CHECK(batches[0].device_id == "pulse-ox-1");
  CHECK(batches[0].message_id.empty());
  REQUIRE(batches[0].observations.size() == 2);
  CHECK(batches[0].observations[0].patient_id == "PAT-1");
  CHECK(batches[0].observations[0].code == "urn:dev:ow:10e2073a01080063:voltage");
  CHECK(batches[0].observations[0].device_id == "pulse-ox-1");
  auto durable = h.sink.durable_at();
  REQUIRE(durable[0].has_value());
  CHECK(*durable[0] <= r.finished);   // the device heard 2.04 after done, not before
  CHECK(r.finished - sent >= 300ms);  // the sink's delay was waited out
  auto c = h.server.counters().devices["pulse-ox-1"];
  CHECK(c.received == 1);
  CHECK(c.committed == 1);
  CHECK(c.last_seen_us > 0);
}

TEST_CASE("coap: SenML CBOR (112) is accepted", "[coap]") {
  Harness h;
  ClientRun r = h.post("pulse-ox-1", "right-key-1", kData / "ex3.gen.cbor", 112);
  INFO(r.output);
  CHECK(r.code() == "2.04");
  auto batches = h.sink.batches();
  REQUIRE(batches.size() == 1);
  CHECK(batches[0].observations.size() == 7);
}

TEST_CASE("coap: a wrong key fails the handshake: no 2.04, nothing submitted", "[coap]") {
  Harness h;
  ClientRun r = h.post("pulse-ox-1", "wrong-key", kData / "ex1.gen.json", 110, 3);
  INFO(r.output);
  CHECK(r.code().empty());
  CHECK(h.sink.batches().empty());
  CHECK(h.server.counters().devices["pulse-ox-1"].received == 0);
}

TEST_CASE("coap: an unknown identity fails the handshake; on plain CoAP it is 4.01", "[coap]") {
  Harness h;
  ClientRun r = h.post("nobody", "whatever", kData / "ex1.gen.json", 110, 3);
  INFO(r.output);
  CHECK(r.code().empty());
  CHECK(h.sink.batches().empty());
  CHECK(h.server.counters().unknown_identity >= 1);
  CHECK(h.server.counters().devices.count("nobody") == 0);

  ClientRun plain =
      run_client({"-m", "post", "-t", "110", "-f", (kData / "ex1.gen.json").string(),
                  "coap://127.0.0.1:" + std::to_string(h.plain_port) + "/obs?d=nobody"});
  INFO(plain.output);
  CHECK(plain.code() == "4.01");
  CHECK(h.sink.batches().empty());
}

TEST_CASE("coap: plain CoAP, when configured, names the device in the query", "[coap]") {
  Harness h;
  ClientRun plain =
      run_client({"-m", "post", "-t", "110", "-f", (kData / "ex1.gen.json").string(),
                  "coap://127.0.0.1:" + std::to_string(h.plain_port) + "/obs?d=pulse-ox-1"});
  INFO(plain.output);
  CHECK(plain.code() == "2.04");
  CHECK(h.sink.batches().size() == 1);
}

TEST_CASE("coap: a revoked device completes the handshake and is refused 4.03", "[coap]") {
  Harness h;
  ClientRun r = h.post("revoked-1", "revoked-key", kData / "ex1.gen.json");
  INFO(r.output);
  CHECK(r.code() == "4.03");
  CHECK(r.output.find("device revoked") != std::string::npos);
  CHECK(h.sink.batches().empty());
  CHECK(h.rejected("revoked-1", RejectReason::kRevoked) == 1);
}

TEST_CASE("coap: a device not bound to a patient is refused 4.03", "[coap]") {
  Harness h;
  ClientRun r = h.post("unbound-1", "unbound-key", kData / "ex1.gen.json");
  INFO(r.output);
  CHECK(r.code() == "4.03");
  CHECK(r.output.find("not bound to a patient") != std::string::npos);
  CHECK(h.sink.batches().empty());
  CHECK(h.rejected("unbound-1", RejectReason::kNoPatient) == 1);
}

TEST_CASE("coap: malformed SenML is 4.00 with a diagnostic that carries no value", "[coap]") {
  Harness h;
  auto file = h.write("bad.json", R"([{"n":"secret-name-77","v":"not-a-number-SECRET"}])");
  ClientRun r = h.post("pulse-ox-1", "right-key-1", file);
  INFO(r.output);
  CHECK(r.code() == "4.00");
  CHECK(r.output.find("SECRET") == std::string::npos);
  CHECK(r.output.find("secret-name-77") == std::string::npos);
  CHECK(h.sink.batches().empty());
  CHECK(h.rejected("pulse-ox-1", RejectReason::kMalformed) == 1);

  auto not_json = h.write("junk.json", "this is not json");
  CHECK(h.post("pulse-ox-1", "right-key-1", not_json).code() == "4.00");
}

TEST_CASE("coap: a content-format other than 110/112 is 4.15", "[coap]") {
  Harness h;
  ClientRun r = h.post("pulse-ox-1", "right-key-1", kData / "ex1.gen.json", 0);
  INFO(r.output);
  CHECK(r.code() == "4.15");
  CHECK(h.sink.batches().empty());
  CHECK(h.rejected("pulse-ox-1", RejectReason::kUnsupportedFormat) == 1);
}

namespace {
// A valid pack of `records` records, about 60 bytes each.
std::string big_pack(int records) {
  std::string s = R"([{"bn":"urn:dev:mac:0024befffe804ff1:","bu":"Cel","bt":1700000000})";
  for (int i = 0; i < records; ++i) {
    s += R"(,{"n":"temp","v":)" + std::to_string(36 + i % 3) + R"(.5,"t":)" + std::to_string(i) +
         "}";
  }
  return s + "]";
}
}  // namespace

TEST_CASE("coap: over max_payload is 4.13, after libcoap reassembled the blocks", "[coap]") {
  Harness h(/*max_payload=*/2048);
  auto file = h.write("big.json", big_pack(100));  // ~3.5 KB: Block1 from the client
  ClientRun r = h.post("pulse-ox-1", "right-key-1", file);
  INFO(r.output);
  CHECK(r.code() == "4.13");
  CHECK(h.sink.batches().empty());
  CHECK(h.rejected("pulse-ox-1", RejectReason::kTooLarge) == 1);
}

TEST_CASE("coap: a block-wise POST under the limit is committed and answered 2.04", "[coap]") {
  Harness h(/*max_payload=*/16 * 1024);
  auto file = h.write("big.json", big_pack(100));
  ClientRun r = h.post("pulse-ox-1", "right-key-1", file);
  INFO(r.output);
  CHECK(r.code() == "2.04");
  auto batches = h.sink.batches();
  REQUIRE(batches.size() == 1);
  CHECK(batches[0].observations.size() == 100);
}

TEST_CASE("coap: over the SenML record limit is 4.13", "[coap]") {
  Harness h;
  auto file = h.write("many.json", big_pack(static_cast<int>(kMaxRecords) + 5));
  ClientRun r = h.post("pulse-ox-1", "right-key-1", file);
  INFO(r.output);
  CHECK(r.code() == "4.13");
  CHECK(h.sink.batches().empty());
  CHECK(h.rejected("pulse-ox-1", RejectReason::kTooLarge) == 1);  // ours, not libcoap's
}

TEST_CASE("coap: a full sink is 5.03 with Max-Age; a failed commit is 5.00", "[coap]") {
  Harness h;
  h.sink.set_mode(TestSink::Mode::kBusy);
  ClientRun busy = h.post("pulse-ox-1", "right-key-1", kData / "ex1.gen.json");
  INFO(busy.output);
  CHECK(busy.code() == "5.03");
  CHECK(busy.output.find("Max-Age:1") != std::string::npos);
  CHECK(h.sink.batches().empty());
  CHECK(h.rejected("pulse-ox-1", RejectReason::kBusy) == 1);

  h.sink.set_mode(TestSink::Mode::kFail);
  ClientRun failed = h.post("pulse-ox-1", "right-key-1", kData / "ex1.gen.json");
  INFO(failed.output);
  CHECK(failed.code() == "5.00");
  CHECK(failed.output.find("fsync") == std::string::npos);  // no detail for the device
  CHECK(h.sink.batches().size() == 1);
  CHECK(h.rejected("pulse-ox-1", RejectReason::kFailed) == 1);
  CHECK(h.server.counters().devices["pulse-ox-1"].committed == 0);
}

TEST_CASE("coap: 20 clients in parallel all get 2.04 and the sink has 20 batches", "[coap]") {
  Harness h(kMaxPackBytes, 200ms);
  std::vector<ClientRun> runs(20);
  std::vector<std::thread> clients;
  for (std::size_t i = 0; i < runs.size(); ++i) {
    clients.emplace_back(
        [&, i] { runs[i] = h.post("pulse-ox-1", "right-key-1", kData / "ex1.gen.json"); });
  }
  for (auto& t : clients) t.join();
  for (std::size_t i = 0; i < runs.size(); ++i) {
    INFO("client " << i << ": " << runs[i].output);
    CHECK(runs[i].code() == "2.04");
  }
  CHECK(h.sink.batches().size() == 20);
  CHECK(h.server.counters().devices["pulse-ox-1"].committed == 20);
}

TEST_CASE("coap: stop() answers what is in flight before it returns", "[coap]") {
  Harness h(kMaxPackBytes, 1500ms);
  ClientRun r;
  std::thread client([&] { r = h.post("pulse-ox-1", "right-key-1", kData / "ex1.gen.json"); });
  // Wait until the batch is with the sink, then stop while it is not yet durable.
  for (int i = 0; i < 500 && h.sink.batches().empty(); ++i) std::this_thread::sleep_for(10ms);
  REQUIRE(h.sink.batches().size() == 1);
  h.server.stop();
  REQUIRE(h.sink.durable_at()[0].has_value());  // stop() waited for done
  client.join();
  INFO(r.output);
  CHECK(r.code() == "2.04");
}

TEST_CASE("coap: start() reports a port it cannot bind, and a bad address", "[coap]") {
  int fd = ::socket(AF_INET, SOCK_DGRAM, 0);
  REQUIRE(fd >= 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  REQUIRE(::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);
  socklen_t len = sizeof a;
  REQUIRE(::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) == 0);

  MapDirectory directory;
  TestSink sink(10ms);
  CoapServerConfig config;
  config.address = "127.0.0.1";
  config.port = ntohs(a.sin_port);
  CoapServer taken;
  Status s = taken.start(config, directory, sink);
  CHECK(s.code() == StatusCode::kUnavailable);
  ::close(fd);

  config.address = "localhost";  // names are not resolved: numeric addresses only
  CoapServer bad_address;
  CHECK(bad_address.start(config, directory, sink).code() == StatusCode::kInvalidArgument);
}

TEST_CASE("coap: counters survive stop(), and a stopped server does not start again", "[coap]") {
  Harness h;
  CHECK(h.post("pulse-ox-1", "right-key-1", kData / "ex1.gen.json").code() == "2.04");
  h.server.stop();
  h.server.stop();  // idempotent
  CHECK(h.server.counters().devices["pulse-ox-1"].committed == 1);
  CoapServerConfig config;
  config.address = "127.0.0.1";
  config.port = free_udp_port();
  CHECK(h.server.start(config, h.directory, h.sink).code() == StatusCode::kFailedPrecondition);
}
