#include "appliance/hl7/listener.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <pthread.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <deque>
#include <limits>
#include <mutex>
#include <optional>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include "appliance/hl7/receiver.h"
#include "appliance/log.h"

namespace medgate::appliance::hl7 {
namespace {

using Clock = std::chrono::steady_clock;

std::uint64_t wall_now_us() {
  using namespace std::chrono;
  return static_cast<std::uint64_t>(
      duration_cast<microseconds>(system_clock::now().time_since_epoch()).count());
}

std::string errno_text(int error) {
  return std::strerror(error);
}

// Owns a file descriptor.
class Fd {
 public:
  Fd() = default;
  explicit Fd(int fd) : fd_(fd) {}
  ~Fd() { reset(); }
  Fd(Fd&& other) noexcept : fd_(std::exchange(other.fd_, -1)) {}
  Fd& operator=(Fd&& other) noexcept {
    if (this != &other) {
      reset();
      fd_ = std::exchange(other.fd_, -1);
    }
    return *this;
  }
  int get() const { return fd_; }
  bool valid() const { return fd_ >= 0; }
  void reset() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

 private:
  int fd_ = -1;
};

// What the sink said about one connection's message, on its way to the epoll thread.
struct Completion {
  std::uint64_t connection = 0;
  std::string device_id;  // for counting when the connection is gone by then
  IngestResult result;
};

// The sink's `done` runs on the sink's threads; the epoll thread owns every connection. This is
// the hand-over: a locked queue plus an eventfd that wakes epoll_wait. Each `done` holds a
// shared_ptr to it, so a completion that arrives after stop() finds it alive and is ignored.
class CompletionQueue {
 public:
  explicit CompletionQueue(Fd wake) : wake_(std::move(wake)) {}
  int fd() const { return wake_.get(); }

  void push(Completion completion) {
    {
      std::lock_guard lock(mu_);
      items_.push_back(std::move(completion));
    }
    wake();
  }
  // Also how stop() interrupts epoll_wait.
  void wake() {
    std::uint64_t one = 1;
    // EAGAIN means the counter is already far from zero: the loop is woken either way.
    [[maybe_unused]] ssize_t n = ::write(wake_.get(), &one, sizeof one);
  }
  std::vector<Completion> take() {
    std::uint64_t count = 0;
    [[maybe_unused]] ssize_t n = ::read(wake_.get(), &count, sizeof count);
    std::lock_guard lock(mu_);
    return std::exchange(items_, {});
  }

 private:
  Fd wake_;
  std::mutex mu_;
  std::vector<Completion> items_;
};

// Where a connection's current message is.
enum class Stage {
  kReading,    // no message in flight: frames are processed and the socket read
  kSubmitted,  // the sink took the batch; waiting for `done`
  kBusy,       // the sink said kBusy; submitting again at retry_at
};

// The accepted ORU a connection is waiting on.
struct Pending {
  MessageInfo info;
  std::string device_id;
  IngestBatch batch;       // kept until the sink takes it (kBusy leaves it with us)
  std::string accept_ack;  // the AA/CA, sent once durable
  bool send_accept_ack = true;
};

struct SslFree {
  void operator()(SSL* ssl) const { SSL_free(ssl); }
};

struct Connection {
  Connection(std::uint64_t connection_id, Fd socket, const sockaddr_storage& peer_address,
             std::string peer_name, std::size_t max_frame)
      : id(connection_id),
        fd(std::move(socket)),
        address(peer_address),
        peer(std::move(peer_name)),
        deframer(max_frame) {}

  std::uint64_t id;
  Fd fd;
  sockaddr_storage address;  // the peer's, for sources' address allow-lists
  std::string peer;          // "address:port", for logs
  MllpDeframer deframer;
  std::deque<Result<Bytes>> frames;  // deframed, not yet begun (a pipelining sender)
  Stage stage = Stage::kReading;
  std::optional<Pending> pending;
  Clock::time_point retry_at{};
  Bytes out;  // framed ACK bytes the socket has not taken yet
  std::size_t out_sent = 0;
  Clock::time_point last_io = Clock::now();
  bool peer_eof = false;           // the peer shut down its side; answer what it sent, then close
  bool dead = false;               // to be closed once the current handler returns
  std::uint32_t events = EPOLLIN;  // the epoll interest as registered
  // TLS (declared after fd: freed before the socket closes). Without TLS, ssl is null.
  std::unique_ptr<SSL, SslFree> ssl;
  bool handshaking = false;
  Clock::time_point handshake_deadline{};
  std::uint32_t handshake_wants = EPOLLIN;  // what SSL_do_handshake waits for
  bool read_wants_write = false;            // SSL_read needs the socket writable (a key update)
  bool write_wants_read = false;            // SSL_write needs the socket readable
  bool tls_failed = false;                  // a fatal TLS error: no close_notify may be sent
  PeerCertificate peer_cert;                // the verified client certificate, once established
};

constexpr std::uint64_t kListenKey = 0;
constexpr std::uint64_t kWakeKey = 1;
constexpr std::size_t kReadChunk = 64 * 1024;
constexpr auto kAcceptPause = std::chrono::milliseconds(100);

std::string peer_name(const sockaddr_storage& ss) {
  char host[INET6_ADDRSTRLEN] = {};
  std::uint16_t port = 0;
  if (ss.ss_family == AF_INET) {
    const auto* in = reinterpret_cast<const sockaddr_in*>(&ss);
    ::inet_ntop(AF_INET, &in->sin_addr, host, sizeof host);
    port = ntohs(in->sin_port);
  } else if (ss.ss_family == AF_INET6) {
    const auto* in6 = reinterpret_cast<const sockaddr_in6*>(&ss);
    ::inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof host);
    port = ntohs(in6->sin6_port);
    return fmt::format("[{}]:{}", host, port);
  }
  return fmt::format("{}:{}", host, port);
}

// A certificate's CN for a log line: its CA vouched for it, but a log line ends at a newline.
std::string printable(std::string_view text) {
  std::string out;
  for (char ch : text)
    out.push_back(
        static_cast<unsigned char>(ch) < 0x20 || static_cast<unsigned char>(ch) >= 0x7f ? '?' : ch);
  return out;
}

}  // namespace

class MllpListener::Loop {
 public:
  Loop(MllpListenerConfig config, const DeviceDirectory& directory, IngestSink& sink, Fd listen,
       Fd epoll, std::shared_ptr<CompletionQueue> completions, std::uint16_t port,
       std::shared_ptr<const TlsServerContext> tls, Fd handshake_epoll, Fd handshake_wake)
      : config_(std::move(config)),
        tls_(std::move(tls)),
        directory_(directory),
        sink_(sink),
        listen_(std::move(listen)),
        epoll_(std::move(epoll)),
        completions_(std::move(completions)),
        port_(port),
        id_prefix_(static_cast<std::uint32_t>(wall_now_us() / 1'000'000)),
        handshake_epoll_(std::move(handshake_epoll)),
        handshake_wake_(std::move(handshake_wake)),
        read_buffer_(kReadChunk) {}

  std::uint16_t port() const { return port_; }
  bool tls() const { return tls_ != nullptr; }
  bool verifies_clients() const { return tls_ && tls_->verifies_clients(); }

  void start_thread() {
    if (tls_) {
      handshake_thread_ = std::thread([this] {
        pthread_setname_np(pthread_self(), "mllp-tls");
        handshake_run();
      });
    }
    thread_ = std::thread([this] {
      pthread_setname_np(pthread_self(), "mllp-loop");
      run();
    });
  }

  void stop() {
    if (thread_.joinable()) {
      stop_requested_ = true;
      completions_->wake();
      thread_.join();
    }
    stop_handshakes();
  }

  MllpListenerCounters counters() const {
    std::lock_guard lock(counters_mu_);
    MllpListenerCounters c = counters_;
    c.connections_open = open_connections();
    return c;
  }

 private:
  void run();
  void accept_all();
  void on_event(Connection& conn, std::uint32_t events);
  void read_some(Connection& conn);
  void handshake(Connection& conn);
  void hand_to_handshakes(std::unique_ptr<Connection> conn);
  void wake_handshakes();
  void stop_handshakes();
  void handshake_run();
  void handshake_step(std::uint64_t id);
  void adopt_handshaken();
  // Both threads' connections; from any thread.
  std::size_t open_connections() const { return established_.load() + handed_off_.load(); }
  void take_bytes(Connection& conn, std::size_t n);
  void peer_closed(Connection& conn);
  void read_failed(Connection& conn, const std::string& why);
  void advance(Connection& conn);
  void handle_frame(Connection& conn, Result<Bytes> frame);
  void submit(Connection& conn);
  void handle_completions();
  void send_ack(Connection& conn, std::string_view ack);
  void flush(Connection& conn);
  void update_interest(Connection& conn);
  void sweep(Clock::time_point now);
  void begin_drain();
  void reap(std::uint64_t id);
  void note_deadline(Clock::time_point at) { next_deadline_ = std::min(next_deadline_, at); }
  int epoll_timeout_ms(Clock::time_point now) const;
  std::string next_control_id() { return fmt::format("MG{:08X}{:08X}", id_prefix_, ++acks_made_); }

  template <typename F>
  void with_counters(F&& f) {
    std::lock_guard lock(counters_mu_);
    f(counters_);
  }
  template <typename F>
  void with_source(const std::string& device_id, F&& f) {
    std::lock_guard lock(counters_mu_);
    f(counters_.sources[device_id]);
  }

  const MllpListenerConfig config_;
  const std::shared_ptr<const TlsServerContext> tls_;
  const DeviceDirectory& directory_;
  IngestSink& sink_;
  Fd listen_;
  Fd epoll_;
  std::shared_ptr<CompletionQueue> completions_;
  const std::uint16_t port_;
  const std::uint32_t id_prefix_;
  std::thread thread_;
  std::atomic<bool> stop_requested_ = false;

  // TLS handshakes run on a thread of their own (handshake_run()): the server's signature is made
  // by the key store, ~200 ms on a hardware TPM, and on the epoll thread it would stall every
  // established connection for that long. A connection is handed over at accept and handed back
  // once established; a failed or timed-out handshake is closed there.
  std::thread handshake_thread_;
  Fd handshake_epoll_, handshake_wake_;  // the handshake thread's epoll and eventfd (TLS only)
  std::mutex handoff_mu_;
  std::vector<std::unique_ptr<Connection>> to_handshake_;  // accepted, not yet taken
  std::vector<std::unique_ptr<Connection>> handshaken_;    // established, not yet adopted
  bool handshake_stop_ = false;                            // guarded by handoff_mu_
  std::atomic<std::size_t> handed_off_ = 0;       // connections the epoll thread does not hold
  std::atomic<std::size_t> established_ = 0;      // connections_.size(), readable from any thread
  std::atomic<bool> handshakes_stopped_ = false;  // the handshake thread has ended
  // The handshake thread's own.
  std::unordered_map<std::uint64_t, std::unique_ptr<Connection>> handshakes_;

  // Everything below belongs to the epoll thread.
  std::unordered_map<std::uint64_t, std::unique_ptr<Connection>> connections_;
  std::uint64_t next_connection_ = kWakeKey + 1;
  std::uint64_t acks_made_ = 0;
  Bytes read_buffer_;
  Clock::time_point next_deadline_ = Clock::time_point::max();
  std::optional<Clock::time_point> accept_paused_until_;
  bool draining_ = false;
  Clock::time_point drain_deadline_{};

  mutable std::mutex counters_mu_;
  MllpListenerCounters counters_;
};

void MllpListener::Loop::run() {
  log(LogLevel::kNotice, "mllp.listen", "listening for HL7/MLLP{} on port {}",
      tls_ ? fmt::format(" over TLS (key: {}; client certificates {})", tls_->key_location(),
                         tls_->verifies_clients() ? "required" : "not asked for")
           : std::string(),
      port_);
  std::vector<epoll_event> events(64);
  while (true) {
    if (stop_requested_ && !draining_) begin_drain();
    if (draining_) {
      if (connections_.empty()) break;
      if (Clock::now() >= drain_deadline_) {
        log(LogLevel::kWarning, "mllp.stop",
            "{} connection(s) still had a message in flight or an unsent ACK after {} ms; "
            "closing them unacknowledged (the senders will send again)",
            connections_.size(), config_.stop_grace.count());
        break;
      }
    }
    int n = ::epoll_wait(epoll_.get(), events.data(), static_cast<int>(events.size()),
                         epoll_timeout_ms(Clock::now()));
    if (n < 0) {
      if (errno == EINTR) continue;
      log(LogLevel::kError, "mllp.epoll", "epoll_wait failed: {}", errno_text(errno));
      break;
    }
    for (int i = 0; i < n; ++i) {
      std::uint64_t key = events[static_cast<std::size_t>(i)].data.u64;
      if (key == kListenKey) {
        accept_all();
      } else if (key == kWakeKey) {
        handle_completions();
      } else if (auto it = connections_.find(key); it != connections_.end()) {
        on_event(*it->second, events[static_cast<std::size_t>(i)].events);
        reap(key);
      }
    }
    Clock::time_point now = Clock::now();
    if (now >= next_deadline_) sweep(now);
  }
  std::size_t unanswered = 0;
  for (auto& [id, conn] : connections_) {
    if (conn->stage != Stage::kReading) ++unanswered;
  }
  connections_.clear();
  established_ = 0;
  {
    // Handed back by the handshake thread but not taken: nothing was read from them.
    std::lock_guard lock(handoff_mu_);
    handed_off_ -= handshaken_.size();
    handshaken_.clear();
  }
  with_counters([&](MllpListenerCounters& c) { c.acks_unsent += unanswered; });
  listen_.reset();
  log(LogLevel::kNotice, "mllp.stopped", "HL7/MLLP listener on port {} stopped", port_);
}

int MllpListener::Loop::epoll_timeout_ms(Clock::time_point now) const {
  Clock::time_point until = next_deadline_;
  if (draining_) until = std::min(until, drain_deadline_);
  if (until == Clock::time_point::max()) return -1;
  if (until <= now) return 0;
  auto ms = std::chrono::ceil<std::chrono::milliseconds>(until - now).count();
  return static_cast<int>(std::min<std::int64_t>(ms, std::numeric_limits<int>::max()));
}

void MllpListener::Loop::accept_all() {
  while (true) {
    sockaddr_storage ss{};
    socklen_t len = sizeof ss;
    int fd = ::accept4(listen_.get(), reinterpret_cast<sockaddr*>(&ss), &len,
                       SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno == EINTR || errno == ECONNABORTED) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) return;
      // Out of descriptors or memory: leave the peers in the backlog for a moment rather than
      // spin on a listening socket that stays readable.
      log(LogLevel::kWarning, "mllp.accept", "accept failed: {}; pausing accepts for {} ms",
          errno_text(errno), kAcceptPause.count());
      epoll_event ev{};
      ev.events = 0;
      ev.data.u64 = kListenKey;
      ::epoll_ctl(epoll_.get(), EPOLL_CTL_MOD, listen_.get(), &ev);
      accept_paused_until_ = Clock::now() + kAcceptPause;
      note_deadline(*accept_paused_until_);
      return;
    }
    Fd socket(fd);
    std::string peer = peer_name(ss);
    if (open_connections() >= config_.max_connections) {
      with_counters([](MllpListenerCounters& c) { ++c.connections_refused; });
      log(LogLevel::kWarning, "mllp.refused", "refused {}: already {} connections (the limit)",
          peer, open_connections());
      continue;
    }
    int one = 1;
    ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);  // ACKs are small and awaited
    std::uint64_t id = next_connection_++;
    auto conn = std::make_unique<Connection>(id, std::move(socket), ss, std::move(peer),
                                             config_.max_frame_bytes);
    if (tls_) {
      conn->ssl.reset(tls_->new_session(fd));
      if (!conn->ssl) {
        log(LogLevel::kError, "mllp.tls", "cannot make a TLS session for {}: {}", conn->peer,
            tls_errors());
        continue;
      }
      conn->handshaking = true;
      conn->handshake_deadline = Clock::now() + config_.tls->handshake_timeout;
      log(LogLevel::kInfo, "mllp.connect", "connection from {}", conn->peer);
      if (handshakes_stopped_) {
        log(LogLevel::kError, "mllp.tls", "refused {}: the TLS handshake thread has stopped",
            conn->peer);
        continue;
      }
      ++handed_off_;
      with_counters([](MllpListenerCounters& c) { ++c.connections_accepted; });
      hand_to_handshakes(std::move(conn));
      continue;
    }
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.u64 = id;
    if (::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, fd, &ev) != 0) {
      log(LogLevel::kError, "mllp.accept", "cannot watch the connection from {}: {}", conn->peer,
          errno_text(errno));
      continue;
    }
    note_deadline(conn->last_io + config_.read_timeout);
    log(LogLevel::kInfo, "mllp.connect", "connection from {}", conn->peer);
    connections_.emplace(id, std::move(conn));
    established_ = connections_.size();
    with_counters([](MllpListenerCounters& c) { ++c.connections_accepted; });
  }
}

void MllpListener::Loop::on_event(Connection& conn, std::uint32_t events) {
  if ((events & EPOLLOUT) != 0 && conn.read_wants_write && !conn.dead) {
    conn.read_wants_write = false;
    read_some(conn);
  }
  if ((events & EPOLLIN) != 0 && conn.write_wants_read && !conn.dead) {
    conn.write_wants_read = false;
    flush(conn);
  }
  if ((events & EPOLLOUT) != 0 && !conn.dead) flush(conn);
  if ((events & EPOLLIN) != 0 && !conn.dead) read_some(conn);
  if ((events & (EPOLLERR | EPOLLHUP)) != 0 && (events & EPOLLIN) == 0) {
    // Reset, or gone both ways: nothing more can be read or answered.
    if (conn.deframer.pending()) {
      with_counters([](MllpListenerCounters& c) { ++c.incomplete_frames; });
    }
    log(LogLevel::kInfo, "mllp.reset", "connection from {} reset", conn.peer);
    conn.dead = true;
  }
  advance(conn);
}

void MllpListener::Loop::read_some(Connection& conn) {
  if (conn.ssl) {
    // One SSL_read returns at most one record (16 KiB, less than the buffer); what OpenSSL has
    // decrypted beyond it is taken now, since epoll only reports bytes still in the socket.
    do {
      ERR_clear_error();
      int n = SSL_read(conn.ssl.get(), read_buffer_.data(), static_cast<int>(read_buffer_.size()));
      if (n > 0) {
        take_bytes(conn, static_cast<std::size_t>(n));
        continue;
      }
      switch (SSL_get_error(conn.ssl.get(), n)) {
        case SSL_ERROR_WANT_READ:
          return;
        case SSL_ERROR_WANT_WRITE:
          conn.read_wants_write = true;
          return;
        case SSL_ERROR_ZERO_RETURN:  // close_notify, or EOF (SSL_OP_IGNORE_UNEXPECTED_EOF)
          peer_closed(conn);
          return;
        default:
          conn.tls_failed = true;
          read_failed(conn, "TLS: " + tls_errors());
          return;
      }
    } while (SSL_pending(conn.ssl.get()) > 0);
    return;
  }
  ssize_t n = ::read(conn.fd.get(), read_buffer_.data(), read_buffer_.size());
  if (n < 0) {
    if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return;
    read_failed(conn, errno_text(errno));
    return;
  }
  if (n == 0) {
    peer_closed(conn);
    return;
  }
  take_bytes(conn, static_cast<std::size_t>(n));
}

void MllpListener::Loop::read_failed(Connection& conn, const std::string& why) {
  if (conn.deframer.pending()) {
    with_counters([](MllpListenerCounters& c) { ++c.incomplete_frames; });
  }
  log(LogLevel::kInfo, "mllp.reset", "connection from {}: {}", conn.peer, why);
  conn.dead = true;
}

void MllpListener::Loop::peer_closed(Connection& conn) {
  conn.last_io = Clock::now();
  conn.peer_eof = true;
  if (Status lost = conn.deframer.finish(); !lost.ok()) {
    with_counters([](MllpListenerCounters& c) { ++c.incomplete_frames; });
    log(LogLevel::kNotice, "mllp.incomplete", "{} closed mid-frame: {}", conn.peer, lost.message());
  }
}

void MllpListener::Loop::take_bytes(Connection& conn, std::size_t n) {
  conn.last_io = Clock::now();
  const MllpDeframer& d = conn.deframer;
  std::uint64_t junk = d.junk_bytes(), oversize = d.oversize_frames(),
                abandoned = d.abandoned_frames();
  for (Result<Bytes>& frame : conn.deframer.feed(ByteView(read_buffer_.data(), n))) {
    conn.frames.push_back(std::move(frame));
  }
  if (d.junk_bytes() != junk || d.oversize_frames() != oversize ||
      d.abandoned_frames() != abandoned) {
    with_counters([&](MllpListenerCounters& c) {
      c.junk_bytes += d.junk_bytes() - junk;
      c.oversize_frames += d.oversize_frames() - oversize;
      c.abandoned_frames += d.abandoned_frames() - abandoned;
    });
  }
}

// Runs the server side of the handshake as far as the socket allows. Failures are the peer's:
// a plain-text client, a certificate that does not verify or is missing, no shared protocol.
void MllpListener::Loop::handshake(Connection& conn) {
  ERR_clear_error();
  int rc = SSL_do_handshake(conn.ssl.get());
  if (rc == 1) {
    conn.handshaking = false;
    conn.last_io = Clock::now();
    conn.peer_cert = peer_certificate(conn.ssl.get());
    with_counters([](MllpListenerCounters& c) { ++c.tls_handshakes; });
    log(LogLevel::kInfo, "mllp.tls", "{}: {} {}{}", conn.peer, SSL_get_version(conn.ssl.get()),
        SSL_get_cipher_name(conn.ssl.get()),
        conn.peer_cert.sha256_hex.empty()
            ? std::string(", no client certificate")
            : fmt::format(", client certificate CN '{}' sha256 {}",
                          printable(conn.peer_cert.subject_cn), conn.peer_cert.sha256_hex));
    return;
  }
  switch (SSL_get_error(conn.ssl.get(), rc)) {
    case SSL_ERROR_WANT_READ:
      conn.handshake_wants = EPOLLIN;
      return;
    case SSL_ERROR_WANT_WRITE:
      conn.handshake_wants = EPOLLOUT;
      return;
    default:
      break;
  }
  conn.tls_failed = true;
  conn.dead = true;
  with_counters([](MllpListenerCounters& c) { ++c.tls_handshake_failures; });
  std::string why = tls_errors();
  if (why == "no detail from OpenSSL") why = "the peer closed the connection";
  log(LogLevel::kNotice, "mllp.tls_handshake_failed", "{}: TLS handshake failed: {}", conn.peer,
      why);
}

// Begins the connection's queued frames one at a time, as long as none is in flight, then
// decides what the connection waits for.
void MllpListener::Loop::advance(Connection& conn) {
  if (draining_) conn.frames.clear();  // not begun: never acknowledged, the sender sends again
  while (!conn.dead && conn.stage == Stage::kReading && !conn.frames.empty()) {
    Result<Bytes> frame = std::move(conn.frames.front());
    conn.frames.pop_front();
    handle_frame(conn, std::move(frame));
  }
  if (conn.dead) return;
  bool idle = conn.stage == Stage::kReading && conn.frames.empty();
  if (idle && conn.out.empty() && (conn.peer_eof || draining_)) {
    conn.dead = true;  // everything it sent has been answered
    return;
  }
  if (idle && !draining_) note_deadline(conn.last_io + config_.read_timeout);
  update_interest(conn);
}

void MllpListener::Loop::handle_frame(Connection& conn, Result<Bytes> frame) {
  std::string control_id = next_control_id();
  std::uint64_t now = wall_now_us();
  if (!frame.ok()) {  // over max_frame_bytes (counted when deframed)
    log(LogLevel::kNotice, "mllp.oversize", "{}: {}", conn.peer, frame.status().message());
    Received r = reject_frame(frame.status(), control_id, now);
    send_ack(conn, r.ack);
    return;
  }
  Received r = process(*frame, control_id, now);
  if (!r.info) {
    with_counters([](MllpListenerCounters& c) { ++c.unparseable_frames; });
    log(LogLevel::kNotice, "mllp.reject", "{}: AR, no usable MSH: {}", conn.peer,
        r.error ? r.error->text : std::string("?"));
    if (r.send_ack) send_ack(conn, r.ack);
    return;
  }
  const MessageInfo& info = *r.info;
  std::optional<DeviceCredentials> source =
      directory_.hl7_source(info.sending_application, info.sending_facility);
  std::uint64_t seen = wall_now_us();
  if (source) {
    with_source(source->device_id, [&](MllpSourceCounters& s) {
      ++s.received;
      s.last_seen_us = seen;
    });
  }
  if (r.disposition == Disposition::kReject) {
    if (source) {
      with_source(source->device_id, [](MllpSourceCounters& s) { ++s.rejected_unparseable; });
    } else {
      with_counters([](MllpListenerCounters& c) { ++c.unparseable_frames; });
    }
    log(LogLevel::kNotice, "mllp.reject", "{} from {}/{} (control id {}): AR: {}", conn.peer,
        info.sending_application, info.sending_facility, info.control_id,
        r.error ? r.error->text : std::string("?"));
    if (r.send_ack) send_ack(conn, r.ack);
    return;
  }
  if (!source || source->revoked) {
    if (source) {
      with_source(source->device_id, [](MllpSourceCounters& s) { ++s.rejected_revoked; });
    } else {
      with_counters([](MllpListenerCounters& c) { ++c.unknown_source; });
    }
    Hl7Error error{ErrorCode::kUnknownKey,
                   {"MSH", 1, 3},
                   source ? "the sending application/facility (MSH-3/MSH-4) is revoked"
                          : "the sending application/facility (MSH-3/MSH-4) is not registered"};
    log(LogLevel::kWarning, "mllp.unknown_source", "{} from {}/{} (control id {}): AE: {}",
        conn.peer, info.sending_application, info.sending_facility, info.control_id, error.text);
    if (wants_ack(info, Disposition::kError)) {
      send_ack(conn,
               build_ack(info, ack_code_for(info, Disposition::kError), control_id, now, &error));
    }
    return;
  }
  if (!allowed_from(source->allow, conn.address)) {
    // The same answer as an unknown source: the sender learns nothing about the allow-list.
    with_source(source->device_id, [](MllpSourceCounters& s) { ++s.rejected_address; });
    Hl7Error error{ErrorCode::kUnknownKey,
                   {"MSH", 1, 3},
                   "the sending application/facility (MSH-3/MSH-4) is not registered for this "
                   "address"};
    log(LogLevel::kWarning, "mllp.address_refused",
        "{} from {} (control id {}): AE: the address is not in the source's allow-list", conn.peer,
        source->device_id, info.control_id);
    if (wants_ack(info, Disposition::kError)) {
      send_ack(conn,
               build_ack(info, ack_code_for(info, Disposition::kError), control_id, now, &error));
    }
    return;
  }
  if (!source->cert.matches(conn.peer_cert.sha256_hex, conn.peer_cert.subject_cn)) {
    // Also the answer an unknown source gets: nothing about the binding is revealed.
    with_source(source->device_id, [](MllpSourceCounters& s) { ++s.rejected_certificate; });
    Hl7Error error{ErrorCode::kUnknownKey,
                   {"MSH", 1, 3},
                   "the sending application/facility (MSH-3/MSH-4) is not registered for this "
                   "client certificate"};
    const char* why = !conn.ssl ? "the connection is not TLS"
                      : conn.peer_cert.sha256_hex.empty()
                          ? "the connection has no client certificate"
                          : "the client certificate is another one";
    log(LogLevel::kWarning, "mllp.certificate_refused",
        "{} from {} (control id {}): AE: the source is bound to a client certificate and {}",
        conn.peer, source->device_id, info.control_id, why);
    if (wants_ack(info, Disposition::kError)) {
      send_ack(conn,
               build_ack(info, ack_code_for(info, Disposition::kError), control_id, now, &error));
    }
    return;
  }
  if (r.disposition == Disposition::kError) {
    with_source(source->device_id, [](MllpSourceCounters& s) { ++s.rejected_unprocessable; });
    log(LogLevel::kNotice, "mllp.error", "{} from {} (control id {}): AE: {}", conn.peer,
        source->device_id, info.control_id, r.error ? r.error->text : std::string("?"));
    if (r.send_ack) send_ack(conn, r.ack);
    return;
  }
  IngestBatch batch{
      SourceKind::kHl7, source->device_id, info.control_id, std::move(r.observations), {}, {}};
  if (info.message_type != "ORU") {
    // ADT: the patients it names are indexed (pseudonym and vault record) and the event recorded;
    // acknowledged, like an ORU, once that is durable.
    with_source(source->device_id, [](MllpSourceCounters& s) { ++s.adt; });
    for (const PatientIdentifier& p : r.patients) batch.patient_ids.push_back(p.qualified());
    batch.event = info.message_type + "^" + info.trigger_event;
  } else if (batch.observations.empty()) {
    // An ORU without OBX has nothing to record.
    with_source(source->device_id, [](MllpSourceCounters& s) { ++s.committed; });
    if (r.send_ack) send_ack(conn, r.ack);
    return;
  }
  conn.pending = Pending{info, source->device_id, std::move(batch), std::move(r.ack), r.send_ack};
  submit(conn);
}

void MllpListener::Loop::submit(Connection& conn) {
  Pending& p = *conn.pending;
  // A copy: on kBusy the sink does not take the batch, and it must be there for the retry.
  IngestSink::Admit admit = sink_.submit(
      p.batch, [queue = completions_, id = conn.id, device = p.device_id](IngestResult result) {
        queue->push(Completion{id, device, std::move(result)});
      });
  switch (admit) {
    case IngestSink::Admit::kAccepted:
      conn.stage = Stage::kSubmitted;
      p.batch.observations = {};  // the sink has its own copy now
      return;
    case IngestSink::Admit::kBusy:
      if (conn.stage != Stage::kBusy) {
        log(LogLevel::kInfo, "mllp.busy",
            "the ledger pipeline is full; {} waits (control id {}), not reading it", conn.peer,
            p.info.control_id);
      }
      with_source(p.device_id, [](MllpSourceCounters& s) { ++s.busy_retries; });
      conn.stage = Stage::kBusy;
      conn.retry_at = Clock::now() + config_.busy_retry;
      note_deadline(conn.retry_at);
      return;
  }
}

void MllpListener::Loop::handle_completions() {
  // Taken before the handshake thread's hand-backs: one handed back after this take() wrote the
  // eventfd after it, so the loop wakes for it again.
  std::vector<Completion> completed = completions_->take();
  adopt_handshaken();
  for (Completion& done : completed) {
    const bool durable = done.result.status.ok();
    with_source(done.device_id, [&](MllpSourceCounters& s) {
      if (durable) {
        ++s.committed;
        if (done.result.duplicate) ++s.duplicates;
      } else {
        ++s.failed;
      }
    });
    if (!durable) {
      log(LogLevel::kWarning, "mllp.failed", "a message from {} was not made durable: {}",
          done.device_id, done.result.status.to_string());
    }
    auto it = connections_.find(done.connection);
    if (it == connections_.end()) {
      with_counters([](MllpListenerCounters& c) { ++c.acks_unsent; });
      log(LogLevel::kNotice, "mllp.unanswered",
          "a message from {} completed after its connection closed; no ACK sent", done.device_id);
      continue;
    }
    Connection& conn = *it->second;
    if (conn.stage != Stage::kSubmitted || !conn.pending) {
      // The sink called `done` twice or for a batch it never took: a bug in the sink.
      log(LogLevel::kError, "mllp.completion", "unexpected completion for {}; ignored", conn.peer);
      continue;
    }
    Pending p = std::move(*conn.pending);
    conn.pending.reset();
    conn.stage = Stage::kReading;
    conn.last_io = Clock::now();
    if (durable) {
      if (p.send_accept_ack) send_ack(conn, p.accept_ack);
    } else if (wants_ack(p.info, Disposition::kError)) {
      Hl7Error error{
          ErrorCode::kInternal, {}, "the message could not be recorded durably; send it again"};
      send_ack(conn, build_ack(p.info, ack_code_for(p.info, Disposition::kError), next_control_id(),
                               wall_now_us(), &error));
    }
    advance(conn);
    reap(done.connection);
  }
}

void MllpListener::Loop::send_ack(Connection& conn, std::string_view ack) {
  Result<Bytes> framed = encode_frame(as_bytes(ack));
  if (!framed.ok()) {
    // build_ack escapes every control byte, so this is a bug; say so rather than send garbage.
    log(LogLevel::kError, "mllp.ack", "cannot frame an ACK for {}: {}", conn.peer,
        framed.status().to_string());
    conn.dead = true;
    return;
  }
  conn.out.insert(conn.out.end(), framed->begin(), framed->end());
  with_counters([](MllpListenerCounters& c) { ++c.acks_sent; });
  flush(conn);
}

void MllpListener::Loop::flush(Connection& conn) {
  while (conn.ssl && conn.out_sent < conn.out.size()) {
    ERR_clear_error();
    int n = SSL_write(conn.ssl.get(), conn.out.data() + conn.out_sent,
                      static_cast<int>(std::min<std::size_t>(conn.out.size() - conn.out_sent,
                                                             std::numeric_limits<int>::max())));
    if (n > 0) {
      conn.out_sent += static_cast<std::size_t>(n);
      conn.last_io = Clock::now();
      continue;
    }
    switch (SSL_get_error(conn.ssl.get(), n)) {
      case SSL_ERROR_WANT_WRITE:
        return;  // EPOLLOUT resumes
      case SSL_ERROR_WANT_READ:
        conn.write_wants_read = true;
        return;
      default:
        conn.tls_failed = true;
        log(LogLevel::kInfo, "mllp.reset", "cannot send to {}: TLS: {}", conn.peer, tls_errors());
        conn.dead = true;
        return;
    }
  }
  while (!conn.ssl && conn.out_sent < conn.out.size()) {
    ssize_t n = ::send(conn.fd.get(), conn.out.data() + conn.out_sent,
                       conn.out.size() - conn.out_sent, MSG_NOSIGNAL);
    if (n > 0) {
      conn.out_sent += static_cast<std::size_t>(n);
      conn.last_io = Clock::now();
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;  // EPOLLOUT resumes
    log(LogLevel::kInfo, "mllp.reset", "cannot send to {}: {}", conn.peer, errno_text(errno));
    conn.dead = true;
    return;
  }
  conn.out.clear();
  conn.out_sent = 0;
}

void MllpListener::Loop::update_interest(Connection& conn) {
  std::uint32_t want = 0;
  if (!conn.out.empty() || conn.read_wants_write) want |= EPOLLOUT;
  if (conn.write_wants_read) want |= EPOLLIN;
  // Read only between messages, with the previous ACK written: one message in flight per
  // connection, and a sender that does not read its ACKs is not read either.
  if (conn.stage == Stage::kReading && conn.frames.empty() && conn.out.empty() && !conn.peer_eof &&
      !draining_) {
    want |= EPOLLIN;
  }
  if (want == conn.events) return;
  epoll_event ev{};
  ev.events = want;
  ev.data.u64 = conn.id;
  if (::epoll_ctl(epoll_.get(), EPOLL_CTL_MOD, conn.fd.get(), &ev) != 0) {
    log(LogLevel::kError, "mllp.epoll", "cannot watch {}: {}", conn.peer, errno_text(errno));
    conn.dead = true;
    return;
  }
  conn.events = want;
}

void MllpListener::Loop::sweep(Clock::time_point now) {
  next_deadline_ = Clock::time_point::max();
  if (accept_paused_until_) {
    if (now >= *accept_paused_until_ && listen_.valid()) {
      epoll_event ev{};
      ev.events = EPOLLIN;
      ev.data.u64 = kListenKey;
      ::epoll_ctl(epoll_.get(), EPOLL_CTL_MOD, listen_.get(), &ev);
      accept_paused_until_.reset();
    } else {
      note_deadline(*accept_paused_until_);
    }
  }
  std::vector<std::uint64_t> ids;
  ids.reserve(connections_.size());
  for (auto& [id, conn] : connections_) ids.push_back(id);
  for (std::uint64_t id : ids) {
    Connection& conn = *connections_.at(id);
    if (conn.stage == Stage::kBusy) {
      if (now >= conn.retry_at) {
        submit(conn);
        advance(conn);
      } else {
        note_deadline(conn.retry_at);
      }
    } else if (conn.stage == Stage::kReading && conn.frames.empty() && !draining_) {
      Clock::time_point deadline = conn.last_io + config_.read_timeout;
      if (now >= deadline) {
        with_counters([](MllpListenerCounters& c) { ++c.read_timeouts; });
        log(LogLevel::kInfo, "mllp.timeout", "{} silent for {} ms; closing", conn.peer,
            config_.read_timeout.count());
        conn.dead = true;
      } else {
        note_deadline(deadline);
      }
    }
    reap(id);
  }
}

void MllpListener::Loop::begin_drain() {
  draining_ = true;
  stop_handshakes();  // connections still in their handshake have sent nothing to answer
  drain_deadline_ = Clock::now() + config_.stop_grace;
  if (listen_.valid()) {
    ::epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, listen_.get(), nullptr);
    listen_.reset();
  }
  std::vector<std::uint64_t> ids;
  for (auto& [id, conn] : connections_) ids.push_back(id);
  for (std::uint64_t id : ids) {
    advance(*connections_.at(id));
    reap(id);
  }
  log(LogLevel::kNotice, "mllp.stop", "stopping: {} connection(s) finishing their message",
      connections_.size());
}

void MllpListener::Loop::reap(std::uint64_t id) {
  auto it = connections_.find(id);
  if (it == connections_.end() || !it->second->dead) return;
  Connection& conn = *it->second;
  ::epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, conn.fd.get(), nullptr);
  log(LogLevel::kDebug, "mllp.close", "closing the connection from {}", conn.peer);
  if (conn.ssl && !conn.handshaking && !conn.tls_failed) {
    ERR_clear_error();
    SSL_shutdown(conn.ssl.get());  // close_notify, best effort: the socket is non-blocking
    ERR_clear_error();
  }
  // A message in flight stays with the sink; its completion finds no connection and is counted.
  connections_.erase(it);
  established_ = connections_.size();
}

// ---- TLS handshakes, on their own thread (see the members) ----

void MllpListener::Loop::hand_to_handshakes(std::unique_ptr<Connection> conn) {
  {
    std::lock_guard lock(handoff_mu_);
    // The thread sets handshakes_stopped_ before it empties to_handshake_ for the last time.
    if (handshakes_stopped_) {
      --handed_off_;
      return;  // closed: the thread is gone
    }
    to_handshake_.push_back(std::move(conn));
  }
  wake_handshakes();
}

void MllpListener::Loop::wake_handshakes() {
  std::uint64_t one = 1;
  // EAGAIN means the counter is already far from zero: the thread is woken either way.
  [[maybe_unused]] ssize_t n = ::write(handshake_wake_.get(), &one, sizeof one);
}

void MllpListener::Loop::stop_handshakes() {
  if (!handshake_thread_.joinable()) return;
  {
    std::lock_guard lock(handoff_mu_);
    handshake_stop_ = true;
  }
  wake_handshakes();
  handshake_thread_.join();
}

void MllpListener::Loop::handshake_run() {
  std::vector<epoll_event> events(64);
  while (true) {
    std::vector<std::unique_ptr<Connection>> arrived;
    {
      std::lock_guard lock(handoff_mu_);
      if (handshake_stop_) break;
      arrived.swap(to_handshake_);
    }
    for (std::unique_ptr<Connection>& conn : arrived) {
      epoll_event ev{};
      ev.events = EPOLLIN;
      ev.data.u64 = conn->id;
      if (::epoll_ctl(handshake_epoll_.get(), EPOLL_CTL_ADD, conn->fd.get(), &ev) != 0) {
        log(LogLevel::kError, "mllp.accept", "cannot watch the connection from {}: {}", conn->peer,
            errno_text(errno));
        --handed_off_;
        continue;
      }
      conn->events = EPOLLIN;
      const std::uint64_t id = conn->id;
      handshakes_.emplace(id, std::move(conn));
      handshake_step(id);  // the ClientHello may be in already
    }
    Clock::time_point next = Clock::time_point::max();
    for (const auto& [id, conn] : handshakes_) next = std::min(next, conn->handshake_deadline);
    int timeout = -1;
    if (next != Clock::time_point::max()) {
      auto ms = std::chrono::ceil<std::chrono::milliseconds>(next - Clock::now()).count();
      timeout = static_cast<int>(std::clamp<std::int64_t>(ms, 0, 60'000));
    }
    int n = ::epoll_wait(handshake_epoll_.get(), events.data(), static_cast<int>(events.size()),
                         timeout);
    if (n < 0) {
      if (errno == EINTR) continue;
      log(LogLevel::kError, "mllp.epoll", "epoll_wait (TLS handshakes) failed: {}",
          errno_text(errno));
      break;
    }
    for (int i = 0; i < n; ++i) {
      std::uint64_t key = events[static_cast<std::size_t>(i)].data.u64;
      if (key == kWakeKey) {
        std::uint64_t count = 0;
        [[maybe_unused]] ssize_t r = ::read(handshake_wake_.get(), &count, sizeof count);
      } else {
        handshake_step(key);
      }
    }
    Clock::time_point now = Clock::now();
    for (auto it = handshakes_.begin(); it != handshakes_.end();) {
      Connection& conn = *it->second;
      if (now < conn.handshake_deadline) {
        ++it;
        continue;
      }
      with_counters([](MllpListenerCounters& c) { ++c.tls_handshake_timeouts; });
      log(LogLevel::kNotice, "mllp.tls_handshake_timeout",
          "{}: no TLS handshake within {} ms; closing", conn.peer,
          config_.tls->handshake_timeout.count());
      ::epoll_ctl(handshake_epoll_.get(), EPOLL_CTL_DEL, conn.fd.get(), nullptr);
      it = handshakes_.erase(it);  // no close_notify: nothing to say goodbye to
      --handed_off_;
    }
  }
  // Stopping: the handshakes still running, and those not begun, are closed (their peers have
  // sent nothing to answer). From now on accept_all() refuses TLS connections.
  handshakes_stopped_ = true;
  for (const auto& [id, conn] : handshakes_)
    ::epoll_ctl(handshake_epoll_.get(), EPOLL_CTL_DEL, conn->fd.get(), nullptr);
  handed_off_ -= handshakes_.size();
  handshakes_.clear();
  std::lock_guard lock(handoff_mu_);
  handed_off_ -= to_handshake_.size();
  to_handshake_.clear();
}

// Runs the handshake as far as the socket allows; hands the connection back to the epoll thread
// once it is established, or closes it when it failed.
void MllpListener::Loop::handshake_step(std::uint64_t id) {
  auto it = handshakes_.find(id);
  if (it == handshakes_.end()) return;
  Connection& conn = *it->second;
  handshake(conn);
  if (!conn.dead && conn.handshaking) {
    if (conn.handshake_wants != conn.events) {
      epoll_event ev{};
      ev.events = conn.handshake_wants;
      ev.data.u64 = id;
      ::epoll_ctl(handshake_epoll_.get(), EPOLL_CTL_MOD, conn.fd.get(), &ev);
      conn.events = conn.handshake_wants;
    }
    return;
  }
  ::epoll_ctl(handshake_epoll_.get(), EPOLL_CTL_DEL, conn.fd.get(), nullptr);
  std::unique_ptr<Connection> owned = std::move(it->second);
  handshakes_.erase(it);
  if (owned->dead) {  // failed (handshake() said why): closed here, without close_notify
    --handed_off_;
    return;
  }
  {
    std::lock_guard lock(handoff_mu_);
    handshaken_.push_back(std::move(owned));
  }
  completions_->wake();
}

// On the epoll thread: takes the connections whose handshake finished.
void MllpListener::Loop::adopt_handshaken() {
  std::vector<std::unique_ptr<Connection>> established;
  {
    std::lock_guard lock(handoff_mu_);
    established.swap(handshaken_);
  }
  for (std::unique_ptr<Connection>& owned : established) {
    const std::uint64_t id = owned->id;
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.u64 = id;
    if (::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, owned->fd.get(), &ev) != 0) {
      log(LogLevel::kError, "mllp.epoll", "cannot watch {}: {}", owned->peer, errno_text(errno));
      --handed_off_;
      continue;
    }
    Connection& conn = *owned;
    conn.events = EPOLLIN;
    connections_.emplace(id, std::move(owned));
    established_ = connections_.size();
    --handed_off_;
    // The first frames may have come right behind the client's Finished.
    if (!draining_) read_some(conn);
    advance(conn);
    reap(id);
  }
}

MllpListener::MllpListener() = default;
MllpListener::~MllpListener() {
  stop();
}

Status MllpListener::start(MllpListenerConfig config, const DeviceDirectory& directory,
                           IngestSink& sink) {
  if (loop_) return Status::FailedPrecondition("the MLLP listener was already started");
  std::shared_ptr<const TlsServerContext> tls;
  if (config.tls) {
    if (config.tls->handshake_timeout.count() <= 0)
      return Status::InvalidArgument("MLLP listener: the TLS handshake timeout must be positive");
    MEDGATE_ASSIGN_OR_RETURN(tls, TlsServerContext::create(*config.tls));
  }
  if (config.max_connections == 0 || config.max_frame_bytes == 0 ||
      config.read_timeout.count() <= 0 || config.busy_retry.count() <= 0 ||
      config.stop_grace.count() < 0) {
    return Status::InvalidArgument(
        "MLLP listener: max_connections, max_frame_bytes, read_timeout and busy_retry must be "
        "positive");
  }
  sockaddr_storage ss{};
  socklen_t len = 0;
  auto* in = reinterpret_cast<sockaddr_in*>(&ss);
  auto* in6 = reinterpret_cast<sockaddr_in6*>(&ss);
  if (::inet_pton(AF_INET, config.address.c_str(), &in->sin_addr) == 1) {
    in->sin_family = AF_INET;
    in->sin_port = htons(config.port);
    len = sizeof(sockaddr_in);
  } else if (::inet_pton(AF_INET6, config.address.c_str(), &in6->sin6_addr) == 1) {
    in6->sin6_family = AF_INET6;
    in6->sin6_port = htons(config.port);
    len = sizeof(sockaddr_in6);
  } else {
    return Status::InvalidArgument(
        fmt::format("MLLP listener: '{}' is not an IPv4 or IPv6 address", config.address));
  }
  std::string where = fmt::format("{} port {}", config.address, config.port);

  Fd listen(::socket(ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (!listen.valid()) {
    return Status::Unavailable(fmt::format("MLLP listener: socket: {}", errno_text(errno)));
  }
  int one = 1;
  ::setsockopt(listen.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (::bind(listen.get(), reinterpret_cast<sockaddr*>(&ss), len) != 0) {
    return Status::Unavailable(
        fmt::format("MLLP listener: cannot bind {}: {}", where, errno_text(errno)));
  }
  if (::listen(listen.get(), SOMAXCONN) != 0) {
    return Status::Unavailable(
        fmt::format("MLLP listener: cannot listen on {}: {}", where, errno_text(errno)));
  }
  sockaddr_storage bound{};
  socklen_t bound_len = sizeof bound;
  ::getsockname(listen.get(), reinterpret_cast<sockaddr*>(&bound), &bound_len);
  std::uint16_t port =
      ntohs(bound.ss_family == AF_INET6 ? reinterpret_cast<sockaddr_in6*>(&bound)->sin6_port
                                        : reinterpret_cast<sockaddr_in*>(&bound)->sin_port);

  Fd epoll(::epoll_create1(EPOLL_CLOEXEC));
  Fd wake(::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
  if (!epoll.valid() || !wake.valid()) {
    return Status::Unavailable(fmt::format("MLLP listener: epoll/eventfd: {}", errno_text(errno)));
  }
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.u64 = kListenKey;
  int listen_fd = listen.get();
  if (::epoll_ctl(epoll.get(), EPOLL_CTL_ADD, listen_fd, &ev) != 0) {
    return Status::Unavailable(fmt::format("MLLP listener: epoll_ctl: {}", errno_text(errno)));
  }
  ev.data.u64 = kWakeKey;
  if (::epoll_ctl(epoll.get(), EPOLL_CTL_ADD, wake.get(), &ev) != 0) {
    return Status::Unavailable(fmt::format("MLLP listener: epoll_ctl: {}", errno_text(errno)));
  }
  Fd handshake_epoll, handshake_wake;
  if (tls) {
    handshake_epoll = Fd(::epoll_create1(EPOLL_CLOEXEC));
    handshake_wake = Fd(::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
    ev.events = EPOLLIN;
    ev.data.u64 = kWakeKey;
    if (!handshake_epoll.valid() || !handshake_wake.valid() ||
        ::epoll_ctl(handshake_epoll.get(), EPOLL_CTL_ADD, handshake_wake.get(), &ev) != 0) {
      return Status::Unavailable(
          fmt::format("MLLP listener: epoll/eventfd for TLS handshakes: {}", errno_text(errno)));
    }
  }
  auto completions = std::make_shared<CompletionQueue>(std::move(wake));
  loop_ = std::make_unique<Loop>(std::move(config), directory, sink, std::move(listen),
                                 std::move(epoll), std::move(completions), port, std::move(tls),
                                 std::move(handshake_epoll), std::move(handshake_wake));
  loop_->start_thread();
  return Status::Ok();
}

std::uint16_t MllpListener::port() const {
  return loop_ ? loop_->port() : 0;
}

bool MllpListener::tls() const {
  return loop_ && loop_->tls();
}

bool MllpListener::verifies_clients() const {
  return loop_ && loop_->verifies_clients();
}

void MllpListener::stop() {
  if (loop_) loop_->stop();
}

MllpListenerCounters MllpListener::counters() const {
  return loop_ ? loop_->counters() : MllpListenerCounters{};
}

}  // namespace medgate::appliance::hl7
