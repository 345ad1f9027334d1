#include "appliance/metrics.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "appliance/log.h"

namespace medgate::appliance {
namespace {

using nlohmann::json;

constexpr std::size_t kMaxRequestBytes = 8192;
constexpr int kRequestTimeoutMs = 2000;

bool is_loopback(const std::string& address) {
  in_addr v4{};
  if (::inet_pton(AF_INET, address.c_str(), &v4) == 1) return (ntohl(v4.s_addr) >> 24) == 127;
  in6_addr v6{};
  if (::inet_pton(AF_INET6, address.c_str(), &v6) == 1) return IN6_IS_ADDR_LOOPBACK(&v6);
  return false;
}

void write_all(int fd, std::string_view data) {
  while (!data.empty()) {
    const ssize_t n = ::send(fd, data.data(), data.size(), MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;  // the scraper went away: nothing to do about it
    data.remove_prefix(static_cast<std::size_t>(n));
  }
}

void answer(int fd, std::string_view status, std::string_view content_type, std::string_view body) {
  write_all(fd, fmt::format("HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n"
                            "Connection: close\r\n\r\n",
                            status, content_type, body.size()));
  write_all(fd, body);
}

// Prometheus exposition, written in order: one HELP/TYPE pair per family, then its samples.
class Exposition {
 public:
  void family(std::string_view name, std::string_view type, std::string_view help) {
    out_ += fmt::format("# HELP medgate_{} {}\n# TYPE medgate_{} {}\n", name, help, name, type);
  }
  void sample(std::string_view name, const json& value, std::string_view labels = {}) {
    if (!value.is_number()) return;  // a listener that is off has no numbers
    const std::string v =
        value.is_number_float() ? fmt::format("{}", value.get<double>()) : value.dump();
    out_ += labels.empty() ? fmt::format("medgate_{} {}\n", name, v)
                           : fmt::format("medgate_{}{{{}}} {}\n", name, labels, v);
  }
  void metric(std::string_view name, std::string_view type, std::string_view help,
              const json& value) {
    if (!value.is_number()) return;
    family(name, type, help);
    sample(name, value);
  }
  std::string take() { return std::move(out_); }

 private:
  std::string out_;
};

// A label value, escaped as the text format asks (device ids are [A-Za-z0-9._-] anyway).
std::string label(std::string_view key, std::string_view value) {
  std::string v;
  for (char c : value) {
    if (c == '\\' || c == '"') v += '\\';
    if (c == '\n') {
      v += "\\n";
      continue;
    }
    v += c;
  }
  return fmt::format("{}=\"{}\"", key, v);
}

const json& at(const json& j, std::initializer_list<const char*> path) {
  static const json kNull;
  const json* cur = &j;
  for (const char* key : path) {
    if (!cur->is_object() || !cur->contains(key)) return kNull;
    cur = &(*cur)[key];
  }
  return *cur;
}

}  // namespace

Result<MetricsConfig> parse_metrics_listen(std::string_view text) {
  const auto colon = text.rfind(':');
  if (colon == std::string_view::npos || colon + 1 == text.size())
    return Status::InvalidArgument(
        fmt::format("'{}' is not address:port (e.g. 127.0.0.1:9464)", text));
  std::string host(text.substr(0, colon));
  const std::string port(text.substr(colon + 1));
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']')
    host = host.substr(1, host.size() - 2);
  if (host == "localhost") host = "127.0.0.1";
  if (port.size() > 5 || port.find_first_not_of("0123456789") != std::string::npos ||
      std::stoul(port) > 65535)
    return Status::InvalidArgument(fmt::format("'{}': the port is not a number up to 65535", text));
  if (!is_loopback(host))
    return Status::InvalidArgument(fmt::format(
        "'{}': the metrics endpoint listens on loopback only (127.0.0.1 or [::1]); a node agent "
        "on this box scrapes it",
        text));
  return MetricsConfig{host, static_cast<std::uint16_t>(std::stoul(port))};
}

MetricsServer::~MetricsServer() {
  stop();
}

Status MetricsServer::start(const MetricsConfig& config, Render render) {
  render_ = std::move(render);
  const bool v6 = config.address.find(':') != std::string::npos;
  sockaddr_storage ss{};
  socklen_t len = 0;
  if (v6) {
    auto& a = reinterpret_cast<sockaddr_in6&>(ss);
    a.sin6_family = AF_INET6;
    a.sin6_port = htons(config.port);
    if (::inet_pton(AF_INET6, config.address.c_str(), &a.sin6_addr) != 1)
      return Status::InvalidArgument("metrics address " + config.address + " is not IPv6");
    len = sizeof a;
  } else {
    auto& a = reinterpret_cast<sockaddr_in&>(ss);
    a.sin_family = AF_INET;
    a.sin_port = htons(config.port);
    if (::inet_pton(AF_INET, config.address.c_str(), &a.sin_addr) != 1)
      return Status::InvalidArgument("metrics address " + config.address + " is not IPv4");
    len = sizeof a;
  }
  listen_fd_ = ::socket(v6 ? AF_INET6 : AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (listen_fd_ < 0) return Status::Unavailable(std::string("socket: ") + std::strerror(errno));
  int one = 1;
  ::setsockopt(listen_fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (::bind(listen_fd_, reinterpret_cast<sockaddr*>(&ss), len) != 0 ||
      ::listen(listen_fd_, 8) != 0) {
    const std::string why = std::strerror(errno);
    stop();
    return Status::Unavailable(
        fmt::format("cannot listen for metrics on {}:{}: {}", config.address, config.port, why));
  }
  if (::getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&ss), &len) == 0)
    port_ = ntohs(v6 ? reinterpret_cast<sockaddr_in6&>(ss).sin6_port
                     : reinterpret_cast<sockaddr_in&>(ss).sin_port);
  wake_fd_ = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (wake_fd_ < 0) {
    stop();
    return Status::Unavailable(std::string("eventfd: ") + std::strerror(errno));
  }
  thread_ = std::thread([this] { run(); });
  log(LogLevel::kInfo, "metrics.listen", "serving Prometheus metrics on {}:{}/metrics",
      config.address, port_);
  return Status::Ok();
}

void MetricsServer::stop() {
  if (thread_.joinable()) {
    const std::uint64_t one = 1;
    [[maybe_unused]] auto n = ::write(wake_fd_, &one, sizeof one);
    thread_.join();
  }
  if (listen_fd_ >= 0) ::close(listen_fd_);
  if (wake_fd_ >= 0) ::close(wake_fd_);
  listen_fd_ = wake_fd_ = -1;
}

void MetricsServer::run() {
  for (;;) {
    pollfd fds[2] = {{listen_fd_, POLLIN, 0}, {wake_fd_, POLLIN, 0}};
    if (::poll(fds, 2, -1) < 0 && errno != EINTR) return;
    if (fds[1].revents & POLLIN) return;
    if (!(fds[0].revents & POLLIN)) continue;
    const int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) continue;
    serve(fd);
    ::close(fd);
  }
}

// One request per connection, read within kRequestTimeoutMs (a scraper that stalls cannot hold
// the endpoint), answered and closed.
void MetricsServer::serve(int fd) {
  std::string request;
  char buf[1024];
  const auto deadline =
      std::chrono::steady_clock::now() + std::chrono::milliseconds(kRequestTimeoutMs);
  while (request.find("\r\n\r\n") == std::string::npos && request.size() < kMaxRequestBytes) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
                          deadline - std::chrono::steady_clock::now())
                          .count();
    pollfd p{fd, POLLIN, 0};
    if (left <= 0 || ::poll(&p, 1, static_cast<int>(left)) <= 0) break;
    const ssize_t n = ::recv(fd, buf, sizeof buf, 0);
    if (n <= 0) break;
    request.append(buf, static_cast<std::size_t>(n));
  }
  const auto line_end = request.find("\r\n");
  if (request.find("\r\n\r\n") == std::string::npos || line_end == std::string::npos) {
    ++bad_requests_;
    answer(fd, "400 Bad Request", "text/plain", "a complete HTTP request was not received\n");
    return;
  }
  const std::string line = request.substr(0, line_end);
  const auto sp1 = line.find(' ');
  const auto sp2 = line.find(' ', sp1 == std::string::npos ? 0 : sp1 + 1);
  if (sp1 == std::string::npos || sp2 == std::string::npos ||
      line.compare(sp2 + 1, 5, "HTTP/") != 0) {
    ++bad_requests_;
    answer(fd, "400 Bad Request", "text/plain", "not an HTTP request line\n");
    return;
  }
  const std::string method = line.substr(0, sp1);
  std::string target = line.substr(sp1 + 1, sp2 - sp1 - 1);
  if (const auto q = target.find('?'); q != std::string::npos) target.resize(q);
  if (method != "GET" && method != "HEAD") {
    ++bad_requests_;
    answer(fd, "405 Method Not Allowed", "text/plain", "only GET /metrics\n");
    return;
  }
  if (target != "/metrics") {
    ++bad_requests_;
    answer(fd, "404 Not Found", "text/plain", "only /metrics is served here\n");
    return;
  }
  ++scrapes_;
  const std::string body = render_ ? render_() : std::string();
  if (method == "HEAD") {
    write_all(fd, fmt::format("HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
                              "Content-Length: {}\r\nConnection: close\r\n\r\n",
                              body.size()));
    return;
  }
  answer(fd, "200 OK", "text/plain; version=0.0.4", body);
}

std::string render_metrics(const json& status, const json& devices) {
  Exposition e;
  e.metric("up", "gauge", "1 while medgated answers.", 1);
  e.metric("uptime_seconds", "gauge", "Seconds since medgated started.",
           at(status, {"daemon", "uptime_seconds"}));
  // Ledger.
  e.metric("ledger_entries", "gauge", "Entries in the ledger (its Merkle tree size).",
           at(status, {"ledger", "entries"}));
  e.metric("ledger_height", "gauge", "Height of the latest block.",
           at(status, {"ledger", "height"}));
  e.metric("ledger_appended_total", "counter", "Entries appended since start.",
           at(status, {"ledger", "appended_since_start"}));
  e.metric("ledger_commits_total", "counter", "Group commits since start.",
           at(status, {"ledger", "commits_since_start"}));
  e.metric("ledger_failed_appends_total", "counter", "Appends that failed since start.",
           at(status, {"ledger", "failed_appends"}));
  e.metric("ledger_writer_stopped", "gauge",
           "1 when the ledger writer stopped after an I/O error (see medctl status).",
           at(status, {"ledger", "writer_error"}).is_string()
               ? json(at(status, {"ledger", "writer_error"}).get<std::string>().empty() ? 0 : 1)
               : json());
  e.metric("signed_head_age_seconds", "gauge", "Age of the latest signed head.",
           at(status, {"signed_head", "age_seconds"}));
  e.metric("unsigned_entries", "gauge", "Entries not yet covered by a signed head.",
           at(status, {"signed_head", "unsigned_entries"}));
  e.metric("heads_signed_total", "counter", "Heads signed since start.",
           at(status, {"key_store", "heads_signed"}));
  e.metric("sign_failures_total", "counter", "Head signatures that failed since start.",
           at(status, {"key_store", "sign_failures"}));
  e.metric("key_store_reachable", "gauge", "1 while the HSM/TPM answers.",
           at(status, {"key_store", "device", "reachable"}).is_boolean()
               ? json(at(status, {"key_store", "device", "reachable"}).get<bool>() ? 1 : 0)
               : json());
  e.metric("key_store_errors_total", "counter", "Key store errors since start.",
           at(status, {"key_store", "device", "errors"}));
  // Admin channel.
  e.metric("admin_requests_total", "counter", "Admin requests since start.",
           at(status, {"admin", "requests"}));
  e.metric("admin_errors_total", "counter", "Admin requests that failed since start.",
           at(status, {"admin", "errors"}));
  e.metric("admin_refused_total", "counter", "Admin requests refused for their caller's role.",
           at(status, {"admin", "refused"}));
  // Ingest.
  const json& pipeline = at(status, {"ingest", "pipeline"});
  e.metric("ingest_batches_total", "counter", "Ingest batches submitted.",
           at(pipeline, {"batches"}));
  e.metric("ingest_observations_total", "counter", "Readings committed to the ledger.",
           at(pipeline, {"observations"}));
  e.metric("ingest_failed_total", "counter", "Ingest batches that could not be made durable.",
           at(pipeline, {"failed"}));
  e.metric("ingest_duplicates_total", "counter", "Retransmissions not recorded again.",
           at(pipeline, {"duplicates"}));
  e.metric("ingest_busy_total", "counter", "Ingest batches refused while the queue was full.",
           at(pipeline, {"busy"}));
  e.metric("ingest_queued", "gauge", "Ingest batches waiting for the ledger.",
           at(pipeline, {"queued"}));
  e.metric("hl7_connections_open", "gauge", "Open HL7/MLLP connections.",
           at(status, {"ingest", "hl7", "connections_open"}));
  e.metric("hl7_unknown_source_total", "counter", "HL7 messages from unregistered sources.",
           at(status, {"ingest", "hl7", "unknown_source"}));
  e.metric("hl7_unparseable_frames_total", "counter", "HL7 frames answered AR.",
           at(status, {"ingest", "hl7", "unparseable_frames"}));
  e.metric("hl7_tls_handshakes_total", "counter", "MLLP over TLS handshakes completed.",
           at(status, {"ingest", "hl7", "tls_handshakes"}));
  e.metric("hl7_tls_handshake_failures_total", "counter",
           "MLLP over TLS handshakes refused (plain text, a bad or missing certificate).",
           at(status, {"ingest", "hl7", "tls_handshake_failures"}));
  e.metric("hl7_tls_handshake_timeouts_total", "counter",
           "MLLP over TLS handshakes not finished in time.",
           at(status, {"ingest", "hl7", "tls_handshake_timeouts"}));
  e.metric("coap_unknown_identity_total", "counter", "DTLS handshakes with an unknown identity.",
           at(status, {"ingest", "coap", "unknown_identity"}));
  // Replication (absent on a single box).
  e.metric("replication_queue_entries", "gauge",
           "Entries acknowledged here and not yet ordered by the cluster.",
           at(status, {"cluster", "queue", "entries"}));
  e.metric("replication_queue_oldest_age_seconds", "gauge",
           "Age of the oldest entry waiting for the cluster.",
           at(status, {"cluster", "queue", "oldest_age_ms"}).is_number()
               ? json(at(status, {"cluster", "queue", "oldest_age_ms"}).get<double>() / 1000.0)
               : json());
  e.metric("replication_lag_blocks", "gauge", "Blocks in etcd not yet applied here.",
           at(status, {"cluster", "ordering", "lag_blocks"}));
  const json& connected = at(status, {"cluster", "ordering", "connected"});
  e.metric("replication_connected", "gauge", "1 when etcd answered the last request.",
           connected.is_boolean() ? json(connected.get<bool>() ? 1 : 0) : json());
  e.metric("replication_blocks_proposed_total", "counter", "Blocks this member got ordered.",
           at(status, {"cluster", "ordering", "blocks_proposed"}));
  e.metric("replication_claims_lost_total", "counter",
           "Heights another member claimed first (this member's entries went on top).",
           at(status, {"cluster", "ordering", "claims_lost"}));
  e.metric("replication_invalid_blocks_total", "counter",
           "Block records that failed validation here (void; reported and replaced).",
           at(status, {"cluster", "ordering", "invalid_blocks"}));
  // Per device: received, committed, and rejections by reason.
  bool any_traffic = false;
  for (const json& d : devices)
    if (at(d, {"traffic", "received"}).is_number()) any_traffic = true;
  if (any_traffic) {
    e.family("device_received_total", "counter", "Messages received per device.");
    for (const json& d : devices)
      e.sample("device_received_total", at(d, {"traffic", "received"}),
               label("device", d.value("id", "")) + "," + label("kind", d.value("kind", "")));
    e.family("device_committed_total", "counter", "Messages committed per device.");
    for (const json& d : devices)
      e.sample("device_committed_total", at(d, {"traffic", "committed"}),
               label("device", d.value("id", "")) + "," + label("kind", d.value("kind", "")));
    e.family("device_rejected_total", "counter", "Messages refused per device and reason.");
    for (const json& d : devices) {
      const json& rejected = at(d, {"traffic", "rejected"});
      if (!rejected.is_object()) continue;
      for (const auto& [reason, n] : rejected.items())
        e.sample("device_rejected_total", n,
                 label("device", d.value("id", "")) + "," + label("reason", reason));
    }
  }
  // Access decisions.
  const json& decisions = at(status, {"consent", "decisions"});
  if (decisions.is_object()) {
    e.family("decisions_total", "counter", "Access decisions by outcome.");
    e.sample("decisions_total", at(decisions, {"allowed"}), label("decision", "allow"));
    e.sample("decisions_total", at(decisions, {"denied"}), label("decision", "deny"));
    e.metric("break_glass_total", "counter", "Break-glass (ETREAT) accesses.",
             at(decisions, {"break_glass"}));
    e.metric("decisions_with_policy_errors_total", "counter",
             "Decisions in which a policy failed to evaluate.",
             at(decisions, {"with_policy_errors"}));
  }
  e.metric("consent_grants_active", "gauge", "Consent grants in force.",
           at(status, {"consent", "grants_active"}));
  return e.take();
}

}  // namespace medgate::appliance
