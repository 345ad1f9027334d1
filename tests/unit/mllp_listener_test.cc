// The MLLP listener over real loopback sockets: ACK only after `done`, AE for unknown and revoked
// sources, AR that leaves the connection usable, framing split the ways networks split it, peers
// that vanish mid-frame or go silent, kBusy backpressure, a sink that fails, 64 concurrent
// senders, stop() with a message in flight, the medgate-mllp-send binary against it, and MLLP over
// TLS (handshake failures and timeouts, certificate bindings).
#include <catch2/catch.hpp>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <deque>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <fmt/format.h>

#include "appliance/hl7/listener.h"
#include "appliance/hl7/message.h"
#include "appliance/hl7/mllp.h"
#include "appliance/hl7/sender.h"
#include "appliance/hl7/tls.h"
#include "hsm/tls_callback_key.h"
#include "hsm/tls_key.h"
#include "tests/support/temp_dir.h"

#include <openssl/evp.h>
#include <openssl/pem.h>

using namespace medgate;
using namespace medgate::appliance;
using namespace medgate::appliance::hl7;
using namespace std::chrono_literals;

extern char** environ;

namespace {

const std::filesystem::path kData = std::filesystem::path(MEDGATE_TEST_DATA) / "hl7";

std::string read_data(const std::string& name) {
  std::ifstream in(kData / name, std::ios::binary);
  REQUIRE(in.good());
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

// lab_loinc.hl7 (LABSYS/CENTRAL_LAB, original mode) with MSH-10 replaced.
std::string lab_message(const std::string& control_id) {
  std::string text = read_data("lab_loinc.hl7");
  const std::string original = "LAB-20240316-0042";
  auto at = text.find(original);
  REQUIRE(at != std::string::npos);
  return text.replace(at, original.size(), control_id);
}

Bytes framed(const std::string& message) {
  Result<Bytes> f = encode_frame(as_bytes(message));
  REQUIRE(f.ok());
  return std::move(f).value();
}

// The registry as a map: (MSH-3, MSH-4) -> credentials.
class MapDirectory : public DeviceDirectory {
 public:
  void add(std::string app, std::string facility, std::string device_id, bool revoked = false) {
    std::lock_guard lock(mu_);
    sources_[{std::move(app), std::move(facility)}] =
        DeviceCredentials{device_id, revoked, {}, {}, {}, {}};
  }
  void bind(const std::string& app, const std::string& facility, CertBinding cert) {
    std::lock_guard lock(mu_);
    sources_.at({app, facility}).cert = std::move(cert);
  }
  void allow(const std::string& app, const std::string& facility, const std::string& networks) {
    Result<std::vector<IpNetwork>> parsed = parse_ip_networks(networks);
    REQUIRE(parsed.ok());
    std::lock_guard lock(mu_);
    sources_.at({app, facility}).allow = *parsed;
  }
  std::optional<DeviceCredentials> coap_device(std::string_view) const override {
    return std::nullopt;
  }
  std::optional<DeviceCredentials> hl7_source(std::string_view application,
                                              std::string_view facility) const override {
    std::lock_guard lock(mu_);
    auto it = sources_.find({std::string(application), std::string(facility)});
    if (it == sources_.end()) return std::nullopt;
    return it->second;
  }

 private:
  mutable std::mutex mu_;
  std::map<std::pair<std::string, std::string>, DeviceCredentials> sources_;
};

// A stand-in for the ledger pipeline that the daemon wiring will provide: it records each batch
// and completes it on its own thread after `delay` (or, while held, not until release()). On
// demand it answers kBusy the next N times, or fails the next batch.
class RecordingSink : public IngestSink {
 public:
  explicit RecordingSink(std::chrono::milliseconds delay = 5ms) : delay_(delay) {
    worker_ = std::thread([this] { run(); });
  }
  ~RecordingSink() override {
    {
      std::lock_guard lock(mu_);
      quit_ = true;
      held_ = false;
    }
    cv_.notify_all();
    worker_.join();
  }

  Admit submit(IngestBatch batch, std::function<void(IngestResult)> done) override {
    std::lock_guard lock(mu_);
    if (busy_answers_ > 0) {
      --busy_answers_;
      ++busy_given_;
      return Admit::kBusy;
    }
    batches_.push_back(batch);
    IngestResult result;
    if (fail_next_) {
      fail_next_ = false;
      result.status = Status::IOError("fsync failed (injected)");
    }
    queue_.push_back({std::chrono::steady_clock::now() + delay_, std::move(done), result});
    cv_.notify_all();
    return Admit::kAccepted;
  }

  void hold() {
    std::lock_guard lock(mu_);
    held_ = true;
  }
  void release() {
    {
      std::lock_guard lock(mu_);
      held_ = false;
    }
    cv_.notify_all();
  }
  void answer_busy(int times) {
    std::lock_guard lock(mu_);
    busy_answers_ = times;
  }
  void fail_next() {
    std::lock_guard lock(mu_);
    fail_next_ = true;
  }
  std::vector<IngestBatch> batches() const {
    std::lock_guard lock(mu_);
    return batches_;
  }
  int busy_given() const {
    std::lock_guard lock(mu_);
    return busy_given_;
  }
  std::size_t completed() const {
    std::lock_guard lock(mu_);
    return completed_;
  }

 private:
  struct Item {
    std::chrono::steady_clock::time_point due;
    std::function<void(IngestResult)> done;
    IngestResult result;
  };
  void run() {
    std::unique_lock lock(mu_);
    while (true) {
      cv_.wait(lock, [&] { return quit_ || (!held_ && !queue_.empty()); });
      if (queue_.empty()) {
        if (quit_) return;
        continue;
      }
      auto due = queue_.front().due;
      if (std::chrono::steady_clock::now() < due) {
        cv_.wait_until(lock, due);
        continue;
      }
      Item item = std::move(queue_.front());
      queue_.pop_front();
      lock.unlock();
      item.done(item.result);
      lock.lock();
      ++completed_;
    }
  }

  const std::chrono::milliseconds delay_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Item> queue_;
  std::vector<IngestBatch> batches_;
  bool held_ = false;
  bool quit_ = false;
  bool fail_next_ = false;
  int busy_answers_ = 0;
  int busy_given_ = 0;
  std::size_t completed_ = 0;
  std::thread worker_;
};

// A raw client: writes exactly what it is given, reads ACK frames.
class RawClient {
 public:
  explicit RawClient(std::uint16_t port) {
    fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    REQUIRE(fd_ >= 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(port);
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    REQUIRE(::connect(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0);
  }
  ~RawClient() { close(); }
  RawClient(const RawClient&) = delete;
  RawClient& operator=(const RawClient&) = delete;

  void write(ByteView bytes) {
    std::size_t off = 0;
    while (off < bytes.size()) {
      ssize_t n = ::send(fd_, bytes.data() + off, bytes.size() - off, MSG_NOSIGNAL);
      REQUIRE(n > 0);
      off += static_cast<std::size_t>(n);
    }
  }
  void write(std::string_view text) { write(as_bytes(text)); }
  void close() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

  // The next ACK, or nullopt when none arrives within `timeout` (or the listener closed).
  std::optional<std::string> ack(std::chrono::milliseconds timeout = 5000ms) {
    auto deadline = std::chrono::steady_clock::now() + timeout;
    while (ready_.empty()) {
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
          deadline - std::chrono::steady_clock::now());
      if (left.count() <= 0) return std::nullopt;
      pollfd p{fd_, POLLIN, 0};
      if (::poll(&p, 1, static_cast<int>(left.count())) <= 0) continue;
      std::byte buffer[4096];
      ssize_t n = ::read(fd_, buffer, sizeof buffer);
      if (n <= 0) {
        closed_ = true;
        return std::nullopt;
      }
      for (auto& f : deframer_.feed(ByteView(buffer, static_cast<std::size_t>(n)))) {
        REQUIRE(f.ok());
        ready_.push_back(to_string(*f));
      }
    }
    std::string out = std::move(ready_.front());
    ready_.pop_front();
    return out;
  }
  // True when the listener closed the connection within `timeout`.
  bool closed_by_listener(std::chrono::milliseconds timeout) {
    auto deadline = std::chrono::steady_clock::now() + timeout;
    while (!closed_ && std::chrono::steady_clock::now() < deadline) {
      pollfd p{fd_, POLLIN, 0};
      if (::poll(&p, 1, 50) <= 0) continue;
      std::byte buffer[4096];
      if (::read(fd_, buffer, sizeof buffer) <= 0) closed_ = true;
    }
    return closed_;
  }

 private:
  int fd_ = -1;
  bool closed_ = false;
  MllpDeframer deframer_;
  std::deque<std::string> ready_;
};

AckSummary summary_of(const std::optional<std::string>& ack) {
  REQUIRE(ack.has_value());
  Result<AckSummary> s = summarize_ack(*ack);
  INFO(*ack);
  REQUIRE(s.ok());
  return *s;
}

// ERR-3.1, the table-0357 code.
std::string err_code(const std::string& ack) {
  Result<Message> m = parse_message(ack);
  REQUIRE(m.ok());
  return m->get("ERR", 3, 1, 1);
}

template <typename Predicate>
bool eventually(Predicate p, std::chrono::milliseconds timeout = 5000ms) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < deadline) {
    if (p()) return true;
    std::this_thread::sleep_for(5ms);
  }
  return p();
}

struct Fixture {
  explicit Fixture(MllpListenerConfig config = {}, std::chrono::milliseconds sink_delay = 5ms)
      : sink(sink_delay) {
    directory.add("LABSYS", "CENTRAL_LAB", "lab-1");
    directory.add("PHILIPS_IX", "WARD7", "monitor-7");
    directory.add("ADT_SYS", "HOSP", "adt-1");
    directory.add("NURSE_APP", "WARD3", "nurse-3", /*revoked=*/true);
    config.address = "127.0.0.1";
    config.port = 0;
    Status s = listener.start(config, directory, sink);
    INFO(s.to_string());
    REQUIRE(s.ok());
    REQUIRE(listener.port() != 0);
  }
  MapDirectory directory;
  RecordingSink sink;
  MllpListener listener;  // declared last: stopped before the sink and directory go
};

}  // namespace

TEST_CASE("an accepted ORU is acknowledged AA only after the sink reports it durable", "[mllp]") {
  Fixture f;
  f.sink.hold();
  RawClient client(f.listener.port());
  client.write(framed(lab_message("LAB-1")));
  REQUIRE(eventually([&] { return f.sink.batches().size() == 1; }));
  // Submitted, not yet durable: no ACK may reach the sender.
  CHECK_FALSE(client.ack(300ms).has_value());
  CHECK(f.sink.completed() == 0);
  f.sink.release();
  AckSummary ack = summary_of(client.ack());
  CHECK(ack.code == "AA");
  CHECK(ack.control_id == "LAB-1");
  CHECK(eventually([&] { return f.sink.completed() == 1; }));

  std::vector<IngestBatch> batches = f.sink.batches();
  REQUIRE(batches.size() == 1);
  CHECK(batches[0].kind == SourceKind::kHl7);
  CHECK(batches[0].device_id == "lab-1");
  CHECK(batches[0].message_id == "LAB-1");
  CHECK_FALSE(batches[0].observations.empty());

  MllpListenerCounters c = f.listener.counters();
  CHECK(c.sources["lab-1"].received == 1);
  CHECK(c.sources["lab-1"].committed == 1);
  CHECK(c.sources["lab-1"].last_seen_us > 0);
}

TEST_CASE("enhanced mode gets CA once durable (IHE PCD-01)", "[mllp]") {
  Fixture f;
  RawClient client(f.listener.port());
  client.write(framed(read_data("pcd01_philips.hl7")));
  AckSummary ack = summary_of(client.ack());
  CHECK(ack.code == "CA");
  CHECK(ack.control_id == "MSG00017");
  REQUIRE(f.sink.batches().size() == 1);
  CHECK(f.sink.batches()[0].device_id == "monitor-7");
}

TEST_CASE("an unknown or revoked source gets AE with ERR 204 and nothing is submitted", "[mllp]") {
  Fixture f;
  RawClient client(f.listener.port());
  std::string unknown = lab_message("U-1");
  unknown.replace(unknown.find("CENTRAL_LAB"), 11, "OTHER_LAB");
  client.write(framed(unknown));
  std::optional<std::string> ack = client.ack();
  AckSummary s = summary_of(ack);
  CHECK(s.code == "AE");
  CHECK(s.control_id == "U-1");
  CHECK(err_code(*ack) == "204");
  CHECK_THAT(s.text, Catch::Contains("not registered"));

  client.write(framed(read_data("escapes_latin1.hl7")));  // NURSE_APP/WARD3: revoked
  ack = client.ack();
  s = summary_of(ack);
  CHECK(s.code == "AE");
  CHECK(err_code(*ack) == "204");
  CHECK_THAT(s.text, Catch::Contains("revoked"));

  CHECK(f.sink.batches().empty());
  MllpListenerCounters c = f.listener.counters();
  CHECK(c.unknown_source == 1);
  CHECK(c.sources["nurse-3"].rejected_revoked == 1);
}

TEST_CASE("a source sending from outside its allow-list gets AE 204; inside it, AA", "[mllp]") {
  Fixture f;
  f.directory.allow("LABSYS", "CENTRAL_LAB", "10.20.0.0/16 fd00:7::/64");
  RawClient client(f.listener.port());
  client.write(framed(lab_message("OUT-1")));
  std::optional<std::string> ack = client.ack();
  AckSummary s = summary_of(ack);
  CHECK(s.code == "AE");
  CHECK(s.control_id == "OUT-1");
  CHECK(err_code(*ack) == "204");
  // The same words as an unknown source: the sender learns nothing about the list.
  CHECK_THAT(s.text, Catch::Contains("not registered for this address"));
  CHECK(f.sink.batches().empty());
  CHECK(f.listener.counters().sources["lab-1"].rejected_address == 1);

  // The connection goes on; once loopback is allowed, the next message is taken.
  f.directory.allow("LABSYS", "CENTRAL_LAB", "10.20.0.0/16, 127.0.0.0/8");
  client.write(framed(lab_message("IN-1")));
  s = summary_of(client.ack());
  CHECK(s.code == "AA");
  CHECK(s.control_id == "IN-1");
  CHECK(f.sink.batches().size() == 1);
  CHECK(f.listener.counters().sources["lab-1"].committed == 1);
}

TEST_CASE("garbage is answered AR and the connection takes the next message", "[mllp]") {
  Fixture f;
  RawClient client(f.listener.port());
  client.write(framed("this is not HL7\r"));
  AckSummary s = summary_of(client.ack());
  CHECK(s.code == "AR");
  client.write(framed(lab_message("AFTER-AR")));
  s = summary_of(client.ack());
  CHECK(s.code == "AA");
  CHECK(s.control_id == "AFTER-AR");
  CHECK(f.sink.batches().size() == 1);
  CHECK(f.listener.counters().unparseable_frames == 1);
}

TEST_CASE("an oversize frame is answered AR and the connection resynchronises", "[mllp]") {
  MllpListenerConfig config;
  config.max_frame_bytes = 256;
  Fixture f(config);
  RawClient client(f.listener.port());
  client.write(framed(std::string(1000, 'X')));
  CHECK(summary_of(client.ack()).code == "AR");
  CHECK(f.listener.counters().oversize_frames == 1);
}

TEST_CASE("ADT submits its patient identifiers for the index and is acknowledged AA", "[mllp]") {
  Fixture f;
  RawClient client(f.listener.port());
  client.write(framed(read_data("adt_a01.hl7")));
  CHECK(summary_of(client.ack()).code == "AA");
  auto batches = f.sink.batches();
  REQUIRE(batches.size() == 1);
  CHECK(batches[0].observations.empty());
  CHECK(batches[0].event == "ADT^A01");
  // PID-3 has two repetitions: the MRN and the SSN, each as AUTHORITY:ID.
  CHECK(batches[0].patient_ids.size() == 2);
  CHECK(batches[0].patient_ids[0] == "HOSP_MRN:556677");
  CHECK(f.listener.counters().sources["adt-1"].adt == 1);
}

TEST_CASE("framing as networks split it: one-byte writes, a split trailer, junk", "[mllp]") {
  Fixture f;
  MllpSendOptions options;
  options.port = f.listener.port();
  options.pause = 0ms;
  SECTION("one byte at a time") {
    options.chunk = 1;
  }
  SECTION("0x1C and 0x0D in separate writes") {
    options.split_trailer = true;
    options.pause = 20ms;
  }
  SECTION("junk between frames") {
    options.junk = true;
  }
  SECTION("all at once") {}
  MllpSender sender(options);
  REQUIRE(sender.connect().ok());
  for (int i = 0; i < 3; ++i) {
    std::string id = "SPLIT-" + std::to_string(i);
    REQUIRE(sender.send(lab_message(id)).ok());
    Result<std::string> ack = sender.receive();
    REQUIRE(ack.ok());
    AckSummary s = *summarize_ack(*ack);
    CHECK(s.code == "AA");
    CHECK(s.control_id == id);
  }
  CHECK(f.sink.batches().size() == 3);
  if (options.junk) CHECK(f.listener.counters().junk_bytes > 0);
}

TEST_CASE("several frames in one write are answered in order, one at a time", "[mllp]") {
  Fixture f;
  RawClient client(f.listener.port());
  Bytes all;
  for (int i = 0; i < 5; ++i) {
    Bytes one = framed(lab_message("MULTI-" + std::to_string(i)));
    all.insert(all.end(), one.begin(), one.end());
    all.push_back(std::byte{'\n'});  // a stray LF between frames, as some senders write
  }
  client.write(all);
  for (int i = 0; i < 5; ++i) {
    AckSummary s = summary_of(client.ack());
    CHECK(s.code == "AA");
    CHECK(s.control_id == "MULTI-" + std::to_string(i));
  }
  std::vector<IngestBatch> batches = f.sink.batches();
  REQUIRE(batches.size() == 5);
  for (int i = 0; i < 5; ++i) CHECK(batches[i].message_id == "MULTI-" + std::to_string(i));
}

TEST_CASE("a peer that closes mid-frame is counted and nothing is submitted", "[mllp]") {
  Fixture f;
  {
    RawClient client(f.listener.port());
    Bytes whole = framed(lab_message("TORN"));
    client.write(ByteView(whole).first(whole.size() / 2));
    std::this_thread::sleep_for(50ms);
  }
  REQUIRE(eventually([&] { return f.listener.counters().incomplete_frames == 1; }));
  CHECK(eventually([&] { return f.listener.counters().connections_open == 0; }));
  CHECK(f.sink.batches().empty());
}

TEST_CASE("a silent peer is freed by the read timeout", "[mllp]") {
  MllpListenerConfig config;
  config.read_timeout = 200ms;
  Fixture f(config);
  RawClient silent(f.listener.port());
  RawClient half(f.listener.port());
  half.write(std::string_view("\x0bMSH|^~\\&|LAB"));  // begins a frame, then says nothing
  CHECK(silent.closed_by_listener(3000ms));
  CHECK(half.closed_by_listener(3000ms));
  CHECK(eventually([&] { return f.listener.counters().connections_open == 0; }));
  CHECK(f.listener.counters().read_timeouts == 2);
  CHECK(f.sink.batches().empty());
}

TEST_CASE("kBusy stops the connection and the submit is retried until taken", "[mllp]") {
  MllpListenerConfig config;
  config.busy_retry = 10ms;
  Fixture f(config);
  f.sink.answer_busy(5);
  RawClient client(f.listener.port());
  client.write(framed(lab_message("BUSY-1")));
  AckSummary s = summary_of(client.ack());
  CHECK(s.code == "AA");
  CHECK(s.control_id == "BUSY-1");
  CHECK(f.sink.busy_given() == 5);
  CHECK(f.sink.batches().size() == 1);  // exactly one batch taken
  CHECK(f.listener.counters().sources["lab-1"].busy_retries == 5);
}

TEST_CASE("a sink failure is answered AE and the connection goes on", "[mllp]") {
  Fixture f;
  f.sink.fail_next();
  RawClient client(f.listener.port());
  client.write(framed(lab_message("FAIL-1")));
  std::optional<std::string> ack = client.ack();
  AckSummary s = summary_of(ack);
  CHECK(s.code == "AE");
  CHECK(s.control_id == "FAIL-1");
  CHECK(err_code(*ack) == "207");
  client.write(framed(lab_message("FAIL-1")));  // the sender retransmits
  CHECK(summary_of(client.ack()).code == "AA");
  MllpListenerCounters c = f.listener.counters();
  CHECK(c.sources["lab-1"].failed == 1);
  CHECK(c.sources["lab-1"].committed == 1);
}

TEST_CASE("64 concurrent connections, 20 messages each, all AA in order", "[mllp]") {
  Fixture f({}, 1ms);
  constexpr int kConnections = 64;
  constexpr int kMessages = 20;
  std::string base = lab_message("XXXXXXXX");
  std::vector<std::string> failures(kConnections);
  std::vector<std::thread> threads;
  for (int c = 0; c < kConnections; ++c) {
    threads.emplace_back([&, c] {
      MllpSendOptions options;
      options.port = f.listener.port();
      options.ack_timeout = 20s;
      MllpSender sender(options);
      if (!sender.connect().ok()) {
        failures[c] = "connect";
        return;
      }
      for (int m = 0; m < kMessages; ++m) {
        std::string id = fmt::format("C{:02}M{:02}", c, m);
        std::string text = base;
        text.replace(text.find("XXXXXXXX"), 8, id);
        if (!sender.send(text).ok()) {
          failures[c] = "send " + id;
          return;
        }
        Result<std::string> ack = sender.receive();
        Result<AckSummary> s = ack.ok() ? summarize_ack(*ack) : Result<AckSummary>(ack.status());
        if (!s.ok() || s->code != "AA" || s->control_id != id) {
          failures[c] = "ack for " + id + ": " +
                        (s.ok() ? s->code + " " + s->control_id : s.status().to_string());
          return;
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  for (int c = 0; c < kConnections; ++c) {
    INFO("connection " << c);
    CHECK(failures[c].empty());
  }
  CHECK(f.sink.batches().size() == kConnections * kMessages);
  CHECK(f.listener.counters().sources["lab-1"].committed == kConnections * kMessages);
}

TEST_CASE("stop() finishes the message in flight and sends its ACK", "[mllp]") {
  Fixture f;
  f.sink.hold();
  RawClient client(f.listener.port());
  client.write(framed(lab_message("LAST")));
  REQUIRE(eventually([&] { return f.sink.batches().size() == 1; }));
  std::thread stopper([&] { f.listener.stop(); });
  std::this_thread::sleep_for(100ms);
  f.sink.release();
  AckSummary s = summary_of(client.ack());
  CHECK(s.code == "AA");
  CHECK(s.control_id == "LAST");
  stopper.join();
  CHECK(client.closed_by_listener(2000ms));
  // Nothing listens any more.
  MllpSendOptions late_options;
  late_options.port = f.listener.port();
  MllpSender late(late_options);
  CHECK(late.connect().code() == StatusCode::kUnavailable);
}

TEST_CASE("too many connections are refused and counted", "[mllp]") {
  MllpListenerConfig config;
  config.max_connections = 1;
  Fixture f(config);
  RawClient first(f.listener.port());
  REQUIRE(eventually([&] { return f.listener.counters().connections_open == 1; }));
  RawClient second(f.listener.port());
  CHECK(second.closed_by_listener(2000ms));
  CHECK(f.listener.counters().connections_refused == 1);
  first.write(framed(lab_message("STILL")));
  CHECK(summary_of(first.ack()).code == "AA");
}

TEST_CASE("split_messages takes CR, LF and CRLF and splits on blank lines", "[mllp]") {
  std::vector<std::string> m = split_messages("MSH|a\nPID|b\r\n\r\nMSH|c\rOBX|d\n\n\n");
  REQUIRE(m.size() == 2);
  CHECK(m[0] == "MSH|a\rPID|b\r");
  CHECK(m[1] == "MSH|c\rOBX|d\r");
  CHECK(split_messages("\n\n").empty());
}

namespace {

// Runs medgate-mllp-send with `args`; its exit code.
int run_sender(const std::vector<std::string>& args) {
  std::vector<std::string> all = {MEDGATE_MLLP_SEND};
  all.insert(all.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (auto& a : all) argv.push_back(a.data());
  argv.push_back(nullptr);
  pid_t pid = 0;
  REQUIRE(::posix_spawn(&pid, argv[0], nullptr, nullptr, argv.data(), environ) == 0);
  int status = 0;
  REQUIRE(::waitpid(pid, &status, 0) == pid);
  REQUIRE(WIFEXITED(status));
  return WEXITSTATUS(status);
}

}  // namespace

TEST_CASE("medgate-mllp-send against the listener: exit codes 0, 1 and 3", "[mllp]") {
  Fixture f;
  std::string port = std::to_string(f.listener.port());
  std::string lab = (kData / "lab_loinc.hl7").string();
  std::string pcd = (kData / "pcd01_philips.hl7").string();
  std::string revoked = (kData / "escapes_latin1.hl7").string();
  CHECK(run_sender({"--port", port, lab, pcd}) == 0);
  CHECK(run_sender({"--port", port, "--chunk", "7", "--pause-ms", "0", "--split-trailer", "--junk",
                    lab}) == 0);
  CHECK(run_sender({"--port", port, "--pipeline", lab, pcd, lab}) == 0);
  CHECK(run_sender({"--port", port, lab, revoked}) == 1);
  f.listener.stop();
  CHECK(run_sender({"--port", port, lab}) == 3);
  CHECK(f.sink.batches().size() == 7);  // the revoked source's message is not one
}

// ---- MLLP over TLS (the key from a file here; the key-store path is tests/integration/tls) ----

namespace {

// A self-signed P-256 server certificate for 127.0.0.1 and its key, written to `dir` (key 0600).
MllpTlsConfig tls_files(const medgate::testing::TempDir& dir) {
  EVP_PKEY* key = EVP_EC_gen("P-256");
  REQUIRE(key != nullptr);
  Result<TlsKeyIssue> issue = issue_for_key(key, TlsKeyRequest{"mllp.test", {"127.0.0.1"}, 1});
  INFO(issue.status().to_string());
  REQUIRE(issue.ok());
  MllpTlsConfig tls;
  tls.cert_file = dir / "cert.pem";
  tls.key_file = dir / "key.pem";
  std::ofstream(tls.cert_file) << issue->cert_pem;
  FILE* out = std::fopen(tls.key_file->c_str(), "w");
  REQUIRE(out != nullptr);
  REQUIRE(PEM_write_PrivateKey(out, key, nullptr, nullptr, 0, nullptr, nullptr) == 1);
  std::fclose(out);
  std::filesystem::permissions(
      *tls.key_file, std::filesystem::perms::owner_read | std::filesystem::perms::owner_write);
  EVP_PKEY_free(key);
  return tls;
}

MllpSendOptions tls_sender(std::uint16_t port, const MllpTlsConfig& tls) {
  MllpSendOptions o;
  o.host = "127.0.0.1";
  o.port = port;
  o.tls = true;
  o.ca_file = tls.cert_file.string();
  o.ack_timeout = 5000ms;
  return o;
}

}  // namespace

TEST_CASE("MLLP over TLS: AA, a plain-text client dropped, the connection goes on", "[mllp]") {
  medgate::testing::TempDir dir;
  MllpListenerConfig config;
  config.tls = tls_files(dir);
  Fixture f(config);
  CHECK(f.listener.tls());
  CHECK_FALSE(f.listener.verifies_clients());

  MllpSender sender(tls_sender(f.listener.port(), *config.tls));
  Status connected = sender.connect();
  INFO(connected.to_string());
  REQUIRE(connected.ok());
  REQUIRE(sender.send(lab_message("TLS-1")).ok());
  AckSummary s = summary_of(sender.receive().value());
  CHECK(s.code == "AA");
  CHECK(s.control_id == "TLS-1");
  CHECK(f.sink.batches().size() == 1);

  // HL7 in the clear on the TLS port: never read as HL7, closed, counted.
  RawClient plain(f.listener.port());
  plain.write(framed(lab_message("PLAIN-1")));
  CHECK_FALSE(plain.ack(2000ms).has_value());
  CHECK(plain.closed_by_listener(3000ms));
  CHECK(eventually([&] { return f.listener.counters().tls_handshake_failures == 1; }));
  CHECK(f.sink.batches().size() == 1);

  // The TLS connection was not disturbed: a second message, split into one-byte records.
  REQUIRE(sender.send(lab_message("TLS-2")).ok());
  CHECK(summary_of(sender.receive().value()).code == "AA");
  MllpSendOptions chunked = tls_sender(f.listener.port(), *config.tls);
  chunked.chunk = 1;
  chunked.pause = 0ms;
  chunked.split_trailer = true;
  MllpSender bytewise(chunked);
  REQUIRE(bytewise.connect().ok());
  REQUIRE(bytewise.send(lab_message("TLS-3")).ok());
  CHECK(summary_of(bytewise.receive().value()).code == "AA");
  CHECK(f.listener.counters().tls_handshakes == 2);
}

namespace {

// A TLS key whose signatures can be held: how a hardware TPM looks to the listener (~200 ms per
// handshake signature), which swtpm cannot be made to do. Signs with a software key through the
// same callback path the TPM key store uses (hsm/tls_callback_key.h).
PublicKey public_key_of(EVP_PKEY* key) {
  REQUIRE(key != nullptr);
  unsigned char* der = nullptr;
  int n = i2d_PUBKEY(key, &der);
  REQUIRE(n > 0);
  auto pub = PublicKey::from_spki_der(
      ByteView(reinterpret_cast<std::byte*>(der), static_cast<std::size_t>(n)));
  OPENSSL_free(der);
  REQUIRE(pub.ok());
  return *pub;
}

class HeldTlsKey : public hsm::TlsKeyHolder {
 public:
  HeldTlsKey() : key_(EVP_EC_gen("P-256")), info_{public_key_of(key_), false, "test"} {}
  ~HeldTlsKey() override {
    release();
    EVP_PKEY_free(key_);
  }
  EVP_PKEY* software_key() const { return key_; }

  Result<hsm::TlsKeyInfo> tls_key(bool) override { return info_; }
  Result<Bytes> sign_tls_digest(const Hash& digest) override {
    {
      std::unique_lock lock(mu_);
      if (hold_) {
        ++held_;
        cv_.notify_all();
        cv_.wait(lock, [&] { return !hold_; });
      }
    }
    EVP_PKEY_CTX* ctx = EVP_PKEY_CTX_new(key_, nullptr);
    std::size_t len = 0;
    Bytes sig;
    bool ok =
        ctx != nullptr && EVP_PKEY_sign_init(ctx) == 1 &&
        EVP_PKEY_sign(ctx, nullptr, &len, reinterpret_cast<const unsigned char*>(digest.data()),
                      digest.size()) == 1;
    if (ok) {
      sig.resize(len);
      ok = EVP_PKEY_sign(ctx, reinterpret_cast<unsigned char*>(sig.data()), &len,
                         reinterpret_cast<const unsigned char*>(digest.data()), digest.size()) == 1;
      sig.resize(len);
    }
    EVP_PKEY_CTX_free(ctx);
    if (!ok) return Status::Internal("test key: ECDSA failed");
    return sig;
  }

  void hold() {
    std::lock_guard lock(mu_);
    hold_ = true;
  }
  void release() {
    std::lock_guard lock(mu_);
    hold_ = false;
    cv_.notify_all();
  }
  // Waits (up to `limit`, so that a broken listener fails the test rather than hangs it) until a
  // signature is being held.
  bool wait_until_held(std::chrono::milliseconds limit) {
    std::unique_lock lock(mu_);
    return cv_.wait_for(lock, limit, [&] { return held_ > 0; });
  }

 private:
  EVP_PKEY* key_;
  hsm::TlsKeyInfo info_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool hold_ = false;
  int held_ = 0;
};

}  // namespace

// A handshake whose signature takes long (a hardware TPM) must hold up other handshakes at most,
// never the connections already established: handshakes run on their own thread.
TEST_CASE("MLLP over TLS: a handshake waiting on a slow key store does not hold up others' ACKs",
          "[mllp]") {
  medgate::testing::TempDir dir;
  HeldTlsKey held;  // outlives the listener: released before it stops
  Result<TlsKeyIssue> issue =
      issue_for_key(held.software_key(), TlsKeyRequest{"mllp.test", {"127.0.0.1"}, 1});
  REQUIRE(issue.ok());
  MllpListenerConfig config;
  config.tls.emplace();
  config.tls->cert_file = dir / "cert.pem";
  std::ofstream(config.tls->cert_file) << issue->cert_pem;
  auto key = hsm::key_signing_through(held, held.tls_key(false)->public_key);
  REQUIRE(key.ok());
  config.tls->key = std::shared_ptr<EVP_PKEY>(key->release(), EVP_PKEY_free);
  Fixture f(config);
  struct ReleaseFirst {
    HeldTlsKey& key;
    ~ReleaseFirst() { key.release(); }  // before the listener stops (declared after it)
  } release_first{held};

  MllpSender established(tls_sender(f.listener.port(), *config.tls));
  REQUIRE(established.connect().ok());
  REQUIRE(established.send(lab_message("EST-1")).ok());
  CHECK(summary_of(established.receive().value()).code == "AA");

  held.hold();
  std::atomic<bool> late_ok = false;
  std::thread late_sender([&] {
    MllpSender late(tls_sender(f.listener.port(), *config.tls));
    if (!late.connect().ok() || !late.send(lab_message("LATE-1")).ok()) return;
    Result<std::string> ack = late.receive();
    late_ok = ack.ok() && summary_of(*ack).code == "AA";
  });
  struct JoinLate {  // a failed REQUIRE below still releases the key and joins the thread
    HeldTlsKey& key;
    std::thread& thread;
    ~JoinLate() {
      key.release();
      if (thread.joinable()) thread.join();
    }
  } join_late{held, late_sender};
  REQUIRE(held.wait_until_held(10'000ms));
  // The late handshake is stuck in the key store; the established connection is answered.
  for (int i = 2; i <= 4; ++i) {
    std::string id = fmt::format("EST-{}", i);
    REQUIRE(established.send(lab_message(id)).ok());
    Result<std::string> ack = established.receive();
    INFO(id << ": " << ack.status().to_string());
    REQUIRE(ack.ok());
    CHECK(summary_of(*ack).code == "AA");
  }
  CHECK(f.listener.counters().connections_open == 2);
  held.release();
  late_sender.join();
  CHECK(late_ok);
  CHECK(f.listener.counters().tls_handshakes == 2);
  CHECK(f.sink.batches().size() == 5);
}

TEST_CASE("MLLP over TLS: stalled handshakes are closed at the timeout, others are served",
          "[mllp]") {
  medgate::testing::TempDir dir;
  MllpListenerConfig config;
  config.tls = tls_files(dir);
  config.tls->handshake_timeout = 1500ms;
  Fixture f(config);
  RawClient silent(f.listener.port());
  RawClient half(f.listener.port());
  half.write(std::string_view("\x16\x03\x01\x02\x00\x01\x00\x01", 8));  // a ClientHello's start
  // Meanwhile a sender completes its handshake and its message, while both stalled handshakes
  // are still open: it did not wait behind them.
  MllpSender sender(tls_sender(f.listener.port(), *config.tls));
  REQUIRE(sender.connect().ok());
  REQUIRE(sender.send(lab_message("TLS-4")).ok());
  Result<std::string> ack = sender.receive();
  REQUIRE(ack.ok());
  CHECK(summary_of(*ack).code == "AA");
  CHECK(f.listener.counters().tls_handshake_timeouts == 0);
  CHECK(f.listener.counters().connections_open == 3);
  CHECK(silent.closed_by_listener(5000ms));
  CHECK(half.closed_by_listener(5000ms));
  CHECK(eventually([&] { return f.listener.counters().tls_handshake_timeouts == 2; }));
  CHECK(f.listener.counters().read_timeouts == 0);
  CHECK(f.listener.counters().connections_open == 1);  // the sender's, still connected
}

TEST_CASE("MLLP over TLS: a source bound to a client certificate gets AE 204 without it",
          "[mllp]") {
  medgate::testing::TempDir dir;
  MllpListenerConfig config;
  config.tls = tls_files(dir);
  Fixture f(config);
  {
    Result<CertBinding> cn = cert_cn_binding("lab-analyser");
    REQUIRE(cn.ok());
    f.directory.bind("LABSYS", "CENTRAL_LAB", *cn);
  }
  MllpSender sender(tls_sender(f.listener.port(), *config.tls));
  REQUIRE(sender.connect().ok());
  REQUIRE(sender.send(lab_message("CERT-1")).ok());
  Result<std::string> ack = sender.receive();
  REQUIRE(ack.ok());
  AckSummary s = summary_of(*ack);
  CHECK(s.code == "AE");
  CHECK(s.control_id == "CERT-1");
  CHECK(err_code(*ack) == "204");
  CHECK_THAT(s.text, Catch::Contains("not registered for this client certificate"));
  CHECK(f.sink.batches().empty());
  CHECK(f.listener.counters().sources["lab-1"].rejected_certificate == 1);

  // Plain TCP is no way around it.
  MllpListenerConfig plain_config;
  Fixture plain(plain_config);
  plain.directory.bind("LABSYS", "CENTRAL_LAB", *cert_cn_binding("lab-analyser"));
  RawClient client(plain.listener.port());
  client.write(framed(lab_message("CERT-2")));
  CHECK(summary_of(client.ack()).code == "AE");
  CHECK(plain.listener.counters().sources["lab-1"].rejected_certificate == 1);
}

TEST_CASE("MLLP over TLS: bad files are named at start", "[mllp]") {
  medgate::testing::TempDir dir;
  MllpTlsConfig good = tls_files(dir);
  MapDirectory directory;
  RecordingSink sink;
  auto start_with = [&](MllpTlsConfig tls) {
    MllpListenerConfig config;
    config.address = "127.0.0.1";
    config.port = 0;
    config.tls = std::move(tls);
    MllpListener listener;
    return listener.start(config, directory, sink);
  };
  MllpTlsConfig missing = good;
  missing.cert_file = dir / "nope.pem";
  Status s = start_with(missing);
  CHECK(s.code() == StatusCode::kInvalidArgument);
  CHECK_THAT(s.message(), Catch::Contains("tls_cert") && Catch::Contains("nope.pem: no such file"));

  MllpTlsConfig not_pem = good;
  std::ofstream(dir / "junk.pem") << "not a certificate\n";
  not_pem.cert_file = dir / "junk.pem";
  s = start_with(not_pem);
  CHECK(s.code() == StatusCode::kInvalidArgument);
  CHECK_THAT(s.message(), Catch::Contains("not a PEM certificate chain"));

  MllpTlsConfig other_key = good;
  medgate::testing::TempDir other;
  other_key.key_file = tls_files(other).key_file;
  s = start_with(other_key);
  CHECK(s.code() == StatusCode::kInvalidArgument);
  CHECK_THAT(s.message(), Catch::Contains("is not the certificate of the tls_key_file's key"));

  std::filesystem::permissions(*good.key_file, std::filesystem::perms::group_read,
                               std::filesystem::perm_options::add);
  s = start_with(good);
  CHECK(s.code() == StatusCode::kInvalidArgument);
  CHECK_THAT(s.message(), Catch::Contains("may be read by others (mode 0640)"));

  MllpTlsConfig zero = tls_files(other);
  zero.handshake_timeout = 0ms;
  CHECK(start_with(zero).code() == StatusCode::kInvalidArgument);
}
