// libcoap 4.3.1 stays inside this file. How the pieces fit:
//  - One loop thread owns the coap_context_t and everything in it (libcoap is not thread-safe).
//    It polls libcoap's epoll fd (which also carries libcoap's retransmission timer) and an
//    eventfd the sink's threads write to.
//  - A POST that passes every check is registered as a libcoap async with no delay (libcoap
//    sends the empty ACK) and submitted. `done` only queues (id, result) and wakes the loop; the
//    loop stores the result and triggers the async, and libcoap calls the handler again with a
//    copy of the request, which now answers from the stored result (2.04 / 5.00).
//  - The async holds a reference on its session, so the pointer stays valid until it fires.
#include "appliance/coap/server.h"

#include <arpa/inet.h>
#include <poll.h>
#include <pthread.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <deque>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include <coap3/coap.h>

#include "appliance/log.h"

namespace medgate::appliance::coap {

std::string_view reject_reason_name(RejectReason reason) {
  switch (reason) {
    case RejectReason::kUnsupportedFormat:
      return "unsupported_format";
    case RejectReason::kTooLarge:
      return "too_large";
    case RejectReason::kMalformed:
      return "malformed";
    case RejectReason::kRevoked:
      return "revoked";
    case RejectReason::kNoPatient:
      return "no_patient";
    case RejectReason::kBusy:
      return "busy";
    case RejectReason::kFailed:
      return "failed";
  }
  return "unknown";
}

namespace {

constexpr unsigned kSenmlJson = 110;
constexpr unsigned kSenmlCbor = 112;
// After stop() once nothing is pending: how long to keep the loop up for devices to ACK their
// separate responses (libcoap retransmits them meanwhile).
constexpr auto kStopGrace = std::chrono::seconds(2);

std::uint64_t now_us() {
  return static_cast<std::uint64_t>(std::chrono::duration_cast<std::chrono::microseconds>(
                                        std::chrono::system_clock::now().time_since_epoch())
                                        .count());
}

// Results from the sink's threads, for the loop thread. Shared with every `done` so that a
// late call cannot outlive what it writes to; the last owner closes the eventfd.
struct Completions {
  std::mutex mu;
  std::deque<std::pair<std::uint64_t, IngestResult>> queue;
  int wake_fd = -1;

  ~Completions() {
    if (wake_fd >= 0) ::close(wake_fd);
  }
  void push(std::uint64_t id, IngestResult result) {
    {
      std::lock_guard lock(mu);
      queue.emplace_back(id, std::move(result));
    }
    wake();
  }
  void wake() const {
    const std::uint64_t one = 1;
    // EAGAIN only when the counter is saturated, and then the loop is awake anyway.
    [[maybe_unused]] auto n = ::write(wake_fd, &one, sizeof one);
  }
};

std::optional<coap_address_t> make_address(const std::string& text, std::uint16_t port) {
  coap_address_t a;
  coap_address_init(&a);
  if (::inet_pton(AF_INET, text.c_str(), &a.addr.sin.sin_addr) == 1) {
    a.addr.sin.sin_family = AF_INET;
    a.addr.sin.sin_port = htons(port);
    a.size = sizeof(sockaddr_in);
    return a;
  }
  if (::inet_pton(AF_INET6, text.c_str(), &a.addr.sin6.sin6_addr) == 1) {
    a.addr.sin6.sin6_family = AF_INET6;
    a.addr.sin6.sin6_port = htons(port);
    a.size = sizeof(sockaddr_in6);
    return a;
  }
  return std::nullopt;
}

void forward_libcoap_log(coap_log_t level, const char* message) {
  std::string_view m(message);
  while (!m.empty() && (m.back() == '\n' || m.back() == '\r')) m.remove_suffix(1);
  const LogLevel ours = level <= LOG_ERR       ? LogLevel::kError
                        : level == LOG_WARNING ? LogLevel::kWarning
                                               : LogLevel::kDebug;
  log_line(ours, "coap.libcoap", m);
}

std::once_flag g_coap_startup;

}  // namespace

struct CoapServer::Impl {
  struct Pending {
    coap_async_t* async = nullptr;
    std::string device_id;
    std::optional<IngestResult> result;
  };

  CoapServerConfig config;
  const DeviceDirectory* directory = nullptr;
  IngestSink* sink = nullptr;
  coap_context_t* ctx = nullptr;
  std::shared_ptr<Completions> completions;
  std::thread loop;
  std::atomic<bool> stopping{false};

  // Loop thread only.
  std::unordered_map<std::uint64_t, Pending> pending;
  std::uint64_t next_id = 1;
  Bytes handshake_key;  // the key handed to libcoap, which copies it at once
  coap_bin_const_t handshake_key_view{};

  mutable std::mutex counters_mu;
  CoapCounters counters;

  ~Impl() {
    if (ctx) coap_free_context(ctx);
  }

  Status setup();
  void run();
  void drain_completions();

  const coap_bin_const_t* psk_for(const coap_bin_const_t* identity);
  void on_post(coap_session_t* session, const coap_pdu_t* request, const coap_string_t* query,
               coap_pdu_t* response);
  void answer_completion(const Pending& p, coap_pdu_t* response);
  void reject(const std::string& device_id, RejectReason reason, coap_pdu_t* response,
              coap_pdu_code_t code, std::string_view diagnostic);
  void answer_busy(coap_pdu_t* response);
  template <typename F>
  void count(const std::string& device_id, F&& update) {
    std::lock_guard lock(counters_mu);
    update(counters.devices[device_id]);
  }

  static Impl* of(coap_session_t* session) {
    return static_cast<Impl*>(coap_get_app_data(coap_session_get_context(session)));
  }
};

CoapServer::CoapServer() = default;
CoapServer::~CoapServer() {
  stop();
}

Status CoapServer::start(const CoapServerConfig& config, const DeviceDirectory& directory,
                         IngestSink& sink) {
  if (impl_) return Status::FailedPrecondition("a CoapServer starts once");
  std::call_once(g_coap_startup, [] {
    coap_startup();
    coap_set_log_handler(forward_libcoap_log);
    coap_set_log_level(LOG_WARNING);
  });
  auto impl = std::make_unique<Impl>();
  impl->config = config;
  impl->directory = &directory;
  impl->sink = &sink;
  if (Status s = impl->setup(); !s.ok()) return s;
  Impl* raw = impl.get();
  impl->loop = std::thread([raw] {
    pthread_setname_np(pthread_self(), "coap-loop");
    raw->run();
  });
  impl_ = std::move(impl);
  log(LogLevel::kInfo, "coap.start", "CoAP listener on {} port {} (DTLS-PSK){}", config.address,
      config.port,
      config.plain_port ? fmt::format(", plain CoAP on port {}", *config.plain_port) : "");
  return Status::Ok();
}

void CoapServer::stop() {
  // impl_ stays: its counters outlive the listener (and counters() may run meanwhile).
  if (!impl_ || !impl_->loop.joinable()) return;
  impl_->stopping = true;
  impl_->completions->wake();
  impl_->loop.join();
  log(LogLevel::kInfo, "coap.stop", "CoAP listener stopped");
}

CoapCounters CoapServer::counters() const {
  if (!impl_) return {};
  std::lock_guard lock(impl_->counters_mu);
  return impl_->counters;
}

Status CoapServer::Impl::setup() {
  if (!coap_dtls_is_supported()) return Status::Unavailable("libcoap was built without DTLS");
  auto dtls_addr = make_address(config.address, config.port);
  if (!dtls_addr) {
    return Status::InvalidArgument("CoAP listen address '" + config.address +
                                   "' is not a numeric IPv4 or IPv6 address");
  }
  completions = std::make_shared<Completions>();
  completions->wake_fd = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (completions->wake_fd < 0) {
    return Status::Unavailable(std::string("eventfd: ") + std::strerror(errno));
  }
  ctx = coap_new_context(nullptr);
  if (!ctx) return Status::Unavailable("cannot create a libcoap context");
  coap_set_app_data(ctx, this);
  // libcoap reassembles Block1 transfers and hands the handler one body.
  coap_context_set_block_mode(ctx, COAP_BLOCK_USE_LIBCOAP | COAP_BLOCK_SINGLE_BODY);

  coap_dtls_spsk_t psk;
  std::memset(&psk, 0, sizeof psk);
  psk.version = COAP_DTLS_SPSK_SETUP_VERSION;
  psk.validate_id_call_back = [](coap_bin_const_t* identity, coap_session_t* session,
                                 void*) -> const coap_bin_const_t* {
    return of(session)->psk_for(identity);
  };
  if (coap_context_set_psk2(ctx, &psk) != 1) {
    return Status::Unavailable("cannot configure DTLS-PSK in libcoap");
  }
  coap_register_event_handler(ctx, [](coap_session_t* session, const coap_event_t event) {
    if (event == COAP_EVENT_DTLS_ERROR) {
      Impl* self = of(session);
      {
        std::lock_guard lock(self->counters_mu);
        ++self->counters.handshake_errors;
      }
      log(LogLevel::kWarning, "coap.dtls_error",
          "a DTLS session failed (wrong key or broken "
          "handshake)");
    }
    return 0;
  });

  if (!coap_new_endpoint(ctx, &*dtls_addr, COAP_PROTO_DTLS)) {
    return Status::Unavailable(
        fmt::format("cannot listen for coaps on {} port {}", config.address, config.port));
  }
  if (config.plain_port) {
    auto plain_addr = make_address(config.address, *config.plain_port);
    if (!coap_new_endpoint(ctx, &*plain_addr, COAP_PROTO_UDP)) {
      return Status::Unavailable(fmt::format("cannot listen for plain CoAP on {} port {}",
                                             config.address, *config.plain_port));
    }
    log(LogLevel::kWarning, "coap.plain",
        "plain CoAP is on (port {}): devices there are not authenticated", *config.plain_port);
  }

  coap_resource_t* obs = coap_resource_init(coap_make_str_const("obs"), 0);
  if (!obs) return Status::Unavailable("cannot create the /obs resource");
  coap_register_request_handler(
      obs, COAP_REQUEST_POST,
      [](coap_resource_t*, coap_session_t* session, const coap_pdu_t* request,
         const coap_string_t* query,
         coap_pdu_t* response) { of(session)->on_post(session, request, query, response); });
  coap_add_resource(ctx, obs);
  if (coap_context_get_coap_fd(ctx) < 0) {
    return Status::Unavailable("libcoap was built without epoll");
  }
  return Status::Ok();
}

// The DTLS handshake's PSK for `identity`. Unknown identities get none (the handshake fails);
// revoked devices get theirs and are refused 4.03 per request (see server.h).
const coap_bin_const_t* CoapServer::Impl::psk_for(const coap_bin_const_t* identity) {
  if (stopping || !identity) return nullptr;
  std::string_view id(reinterpret_cast<const char*>(identity->s), identity->length);
  auto device = directory->coap_device(id);
  if (!device || device->psk.empty()) {
    {
      std::lock_guard lock(counters_mu);
      ++counters.unknown_identity;
    }
    log(LogLevel::kNotice, "coap.unknown_identity", "DTLS handshake refused: unknown PSK identity");
    return nullptr;
  }
  handshake_key = std::move(device->psk);
  handshake_key_view.s = reinterpret_cast<const uint8_t*>(handshake_key.data());
  handshake_key_view.length = handshake_key.size();
  return &handshake_key_view;
}

void CoapServer::Impl::reject(const std::string& device_id, RejectReason reason,
                              coap_pdu_t* response, coap_pdu_code_t code,
                              std::string_view diagnostic) {
  count(device_id, [&](DeviceCounters& c) { ++c.rejected[static_cast<std::size_t>(reason)]; });
  coap_pdu_set_code(response, code);
  if (!diagnostic.empty()) {
    coap_add_data(response, diagnostic.size(), reinterpret_cast<const uint8_t*>(diagnostic.data()));
  }
}

void CoapServer::Impl::answer_busy(coap_pdu_t* response) {
  coap_pdu_set_code(response, COAP_RESPONSE_CODE_SERVICE_UNAVAILABLE);
  uint8_t buf[4];
  const auto max_age = static_cast<unsigned>(config.busy_max_age.count());
  coap_add_option(response, COAP_OPTION_MAXAGE, coap_encode_var_safe(buf, sizeof buf, max_age),
                  buf);
}

void CoapServer::Impl::answer_completion(const Pending& p, coap_pdu_t* response) {
  const IngestResult& r = *p.result;
  if (r.status.ok()) {
    count(p.device_id, [](DeviceCounters& c) { ++c.committed; });
    coap_pdu_set_code(response, COAP_RESPONSE_CODE_CHANGED);
    return;
  }
  log(LogLevel::kError, "coap.commit_failed", "a batch from device {} was not made durable: {}",
      p.device_id, r.status.to_string());
  // No detail for the device: the failure is ours, not its.
  reject(p.device_id, RejectReason::kFailed, response, COAP_RESPONSE_CODE_INTERNAL_ERROR, "");
}

void CoapServer::Impl::on_post(coap_session_t* session, const coap_pdu_t* request,
                               const coap_string_t* query, coap_pdu_t* response) {
  const coap_bin_const_t token = coap_pdu_get_token(request);
  if (coap_async_t* async = coap_find_async(session, token)) {
    // libcoap calls back with a copy of the request once drain_completions() triggered it.
    const auto id = reinterpret_cast<std::uintptr_t>(coap_async_get_app_data(async));
    auto it = pending.find(id);
    if (it == pending.end() || !it->second.result) {
      // Not ours to fire: only drain_completions() triggers, after storing the result.
      log(LogLevel::kError, "coap.async_lost", "a separate response fired without a result");
      coap_pdu_set_code(response, COAP_RESPONSE_CODE_INTERNAL_ERROR);
      return;
    }
    answer_completion(it->second, response);
    pending.erase(it);
    return;
  }

  // Who is asking: the DTLS PSK identity, or on plain CoAP the "d=" Uri-Query (unauthenticated).
  std::string device_id;
  if (coap_session_get_proto(session) == COAP_PROTO_DTLS) {
    if (const coap_bin_const_t* identity = coap_session_get_psk_identity(session)) {
      device_id.assign(reinterpret_cast<const char*>(identity->s), identity->length);
    }
  } else if (query) {
    std::string_view q(reinterpret_cast<const char*>(query->s), query->length);
    while (!q.empty()) {
      const auto amp = q.find('&');
      std::string_view part = q.substr(0, amp);
      if (part.starts_with("d=")) device_id = std::string(part.substr(2));
      q = amp == std::string_view::npos ? std::string_view{} : q.substr(amp + 1);
    }
  }
  std::optional<DeviceCredentials> device;
  if (!device_id.empty()) device = directory->coap_device(device_id);
  if (!device) {
    {
      std::lock_guard lock(counters_mu);
      ++counters.unknown_identity;
    }
    coap_pdu_set_code(response, COAP_RESPONSE_CODE_UNAUTHORIZED);
    static constexpr std::string_view kUnknown = "unknown device";
    coap_add_data(response, kUnknown.size(), reinterpret_cast<const uint8_t*>(kUnknown.data()));
    return;
  }
  const std::uint64_t now = now_us();
  count(device_id, [&](DeviceCounters& c) {
    ++c.received;
    c.last_seen_us = now;
  });

  if (device->revoked) {
    log(LogLevel::kNotice, "coap.revoked", "refused a reading from revoked device {}", device_id);
    reject(device_id, RejectReason::kRevoked, response, COAP_RESPONSE_CODE_FORBIDDEN,
           "device revoked");
    return;
  }
  if (stopping) {
    count(device_id,
          [](DeviceCounters& c) { ++c.rejected[static_cast<std::size_t>(RejectReason::kBusy)]; });
    answer_busy(response);
    return;
  }

  coap_opt_iterator_t it;
  const coap_opt_t* format_opt = coap_check_option(request, COAP_OPTION_CONTENT_FORMAT, &it);
  const unsigned format =
      format_opt ? coap_decode_var_bytes(coap_opt_value(format_opt), coap_opt_length(format_opt))
                 : 0;
  if (!format_opt || (format != kSenmlJson && format != kSenmlCbor)) {
    reject(device_id, RejectReason::kUnsupportedFormat, response,
           COAP_RESPONSE_CODE_UNSUPPORTED_CONTENT_FORMAT,
           "content-format must be 110 (senml+json) or 112 (senml+cbor)");
    return;
  }

  size_t length = 0, offset = 0, total = 0;
  const uint8_t* data = nullptr;
  if (!coap_get_data_large(request, &length, &data, &offset, &total)) {
    length = 0;
    total = 0;
  }
  if (total > config.max_payload || length > config.max_payload) {
    reject(device_id, RejectReason::kTooLarge, response, COAP_RESPONSE_CODE_REQUEST_TOO_LARGE,
           fmt::format("payload over {} bytes", config.max_payload));
    return;
  }
  const ByteView body(reinterpret_cast<const std::byte*>(data), length);

  auto refuse_senml = [&](const Status& s) {
    if (is_too_large(s)) {
      reject(device_id, RejectReason::kTooLarge, response, COAP_RESPONSE_CODE_REQUEST_TOO_LARGE,
             s.message());
    } else {
      reject(device_id, RejectReason::kMalformed, response, COAP_RESPONSE_CODE_BAD_REQUEST,
             s.message());
    }
  };
  auto records = format == kSenmlJson ? decode_senml_json(body) : decode_senml_cbor(body);
  if (!records.ok()) return refuse_senml(records.status());
  auto resolved = resolve(*records, now);
  if (!resolved.ok()) return refuse_senml(resolved.status());

  if (device->patient_id.empty() && !device->patient_pseudonym) {
    reject(device_id, RejectReason::kNoPatient, response, COAP_RESPONSE_CODE_FORBIDDEN,
           "device not bound to a patient");
    return;
  }
  auto observations = observations_from_senml(*resolved, device_id, device->patient_id);
  if (!observations.ok()) return refuse_senml(observations.status());
  for (Observation& o : *observations) o.patient_pseudonym = device->patient_pseudonym;

  // Hold the answer until the sink says durable: the async keeps the request (and a reference
  // on the session) and libcoap sends the empty ACK when this handler leaves the code unset.
  coap_async_t* async = coap_register_async(session, request, 0);
  if (!async) {
    // The same token is already pending on this session: the device reused it too early.
    count(device_id,
          [](DeviceCounters& c) { ++c.rejected[static_cast<std::size_t>(RejectReason::kBusy)]; });
    answer_busy(response);
    return;
  }
  const std::uint64_t id = next_id++;
  coap_async_set_app_data(async, reinterpret_cast<void*>(static_cast<std::uintptr_t>(id)));
  pending.emplace(id, Pending{async, device_id, std::nullopt});

  IngestBatch batch{SourceKind::kCoap, device_id, "", std::move(*observations), {}, {}};
  const auto admit = sink->submit(std::move(batch), [c = completions, id](IngestResult result) {
    c->push(id, std::move(result));
  });
  switch (admit) {
    case IngestSink::Admit::kAccepted:
      return;
    case IngestSink::Admit::kBusy:
      coap_free_async(session, async);
      pending.erase(id);
      count(device_id,
            [](DeviceCounters& c) { ++c.rejected[static_cast<std::size_t>(RejectReason::kBusy)]; });
      log(LogLevel::kWarning, "coap.busy", "ingest is full: device {} told to retry", device_id);
      answer_busy(response);
      return;
  }
}

void CoapServer::Impl::drain_completions() {
  std::deque<std::pair<std::uint64_t, IngestResult>> ready;
  {
    std::lock_guard lock(completions->mu);
    ready.swap(completions->queue);
  }
  for (auto& [id, result] : ready) {
    auto it = pending.find(id);
    if (it == pending.end()) {
      log(LogLevel::kError, "coap.unknown_completion", "ingest completed batch {} twice", id);
      continue;
    }
    it->second.result = std::move(result);
    coap_async_trigger(it->second.async);
  }
}

void CoapServer::Impl::run() {
  const int coap_fd = coap_context_get_coap_fd(ctx);
  std::optional<std::chrono::steady_clock::time_point> grace_until;
  while (true) {
    pollfd fds[2] = {{coap_fd, POLLIN, 0}, {completions->wake_fd, POLLIN, 0}};
    // libcoap's fd also fires for its own timers; the timeout is a safety net only.
    const int n = ::poll(fds, 2, stopping ? 100 : 1000);
    if (n < 0 && errno != EINTR) {
      log(LogLevel::kError, "coap.poll", "poll failed: {}", std::strerror(errno));
    }
    if (fds[1].revents & POLLIN) {
      std::uint64_t count_ignored;
      [[maybe_unused]] auto r = ::read(completions->wake_fd, &count_ignored, sizeof count_ignored);
    }
    drain_completions();
    if (coap_io_process(ctx, COAP_IO_NO_WAIT) < 0) {
      log(LogLevel::kError, "coap.io", "libcoap I/O processing failed");
    }
    if (stopping && pending.empty()) {
      if (!grace_until) grace_until = std::chrono::steady_clock::now() + kStopGrace;
      if (coap_can_exit(ctx) || std::chrono::steady_clock::now() >= *grace_until) break;
    }
  }
  coap_free_context(ctx);
  ctx = nullptr;
}

}  // namespace medgate::appliance::coap
