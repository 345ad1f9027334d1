#include "ledger/order/etcd_transport.h"

#include <charconv>
#include <cstdio>
#include <cstring>
#include <thread>

namespace medgate::order {
namespace {

using Clock = std::chrono::steady_clock;
using nlohmann::json;

constexpr std::size_t kPoolSize = 16;

std::size_t append_body(char* data, std::size_t size, std::size_t n, void* user) {
  auto* out = static_cast<std::string*>(user);
  std::size_t bytes = size * n;
  if (out->size() + bytes > kMaxResponseBytes) return 0;  // aborts the transfer: too big
  out->append(data, bytes);
  return bytes;
}

// The first bytes of a body that is not etcd's, for a message saying what came instead.
std::string body_excerpt(const std::string& body) {
  std::string out;
  for (char c : body.substr(0, 60)) {
    auto u = static_cast<unsigned char>(c);
    out += (u >= 0x20 && u < 0x7f) ? c : '.';
  }
  if (body.size() > 60) out += "...";
  return out;
}

std::string millis(std::chrono::milliseconds ms) {
  return std::to_string(ms.count()) + " ms";
}

}  // namespace

std::string printable_key(std::string_view key) {
  std::string out;
  for (char c : key) {
    if (out.size() >= 80) {
      out += "...";
      break;
    }
    auto u = static_cast<unsigned char>(c);
    if (u >= 0x20 && u < 0x7f && c != '\\' && c != '\'') {
      out += c;
    } else {
      char buf[5];
      std::snprintf(buf, sizeof buf, "\\x%02x", u);
      out += buf;
    }
  }
  return out;
}

std::optional<EtcdError> etcd_error_of(const json& j) {
  if (!j.is_object()) return std::nullopt;
  auto it = j.find("error");
  if (it == j.end()) return std::nullopt;
  EtcdError e;
  const json& src = it->is_object() ? *it : j;
  if (auto c = src.find("code"); c != src.end() && c->is_number_integer()) {
    e.code = c->get<int>();
  } else if (auto g = src.find("grpc_code"); g != src.end() && g->is_number_integer()) {
    e.code = g->get<int>();
  }
  if (auto m = src.find("message"); m != src.end() && m->is_string()) {
    e.message = m->get<std::string>();
  } else if (it->is_string()) {
    e.message = it->get<std::string>();
  }
  if (e.message.empty()) e.message = "(no message)";
  return e;
}

namespace {
// gRPC's own size check (etcd allows --max-request-bytes + 512 KiB per message) says
// ResourceExhausted like etcd's "too many requests", but it is an answer: the message is too big.
bool message_too_large(const EtcdError& e) {
  return e.code == 8 && e.message.find("larger than max") != std::string::npos;
}
}  // namespace

bool etcd_error_is_transient(const EtcdError& e) {
  if (message_too_large(e)) return false;
  // gRPC codes: 4 DeadlineExceeded, 8 ResourceExhausted, 10 Aborted, 14 Unavailable.
  return e.code == 4 || e.code == 8 || e.code == 10 || e.code == 14;
}

Status status_of_etcd_error(const EtcdError& e, std::string_view what) {
  std::string m = std::string(what) + ": etcd says: " + e.message;
  if (message_too_large(e)) return Status::InvalidArgument(m);
  switch (e.code) {
    case 3:   // InvalidArgument: e.g. "request is too large"
    case 11:  // OutOfRange is "future revision" or, for a watch, "compacted"
      if (e.message.find("compacted") != std::string::npos) return Status::FailedPrecondition(m);
      return Status::InvalidArgument(m);
    case 5:
      return Status::NotFound(m);
    case 7:
    case 16:
      return Status::PermissionDenied(m);
    case 6:
    case 9:
      return Status::FailedPrecondition(m);
    default:
      return Status::Unavailable(m + " (gRPC code " + std::to_string(e.code) + ")");
  }
}

std::optional<std::int64_t> int64_field(const json& obj, const char* name) {
  auto it = obj.find(name);
  if (it == obj.end() || it->is_null()) return 0;
  if (it->is_number_integer()) return it->get<std::int64_t>();
  if (!it->is_string()) return std::nullopt;
  const auto& s = it->get_ref<const std::string&>();
  std::int64_t v = 0;
  auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (ec != std::errc() || end != s.data() + s.size() || s.empty()) return std::nullopt;
  return v;
}

std::optional<std::uint64_t> uint64_field(const json& obj, const char* name) {
  auto it = obj.find(name);
  if (it == obj.end() || it->is_null()) return 0;
  if (it->is_number_unsigned()) return it->get<std::uint64_t>();
  if (!it->is_string()) return std::nullopt;
  const auto& s = it->get_ref<const std::string&>();
  std::uint64_t v = 0;
  auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (ec != std::errc() || end != s.data() + s.size() || s.empty()) return std::nullopt;
  return v;
}

Result<KeyValue> key_value_of(const json& kv) {
  if (!kv.is_object()) return Status::InvalidArgument("a kv is not an object");
  KeyValue out;
  auto key = kv.find("key");
  if (key == kv.end() || !key->is_string()) return Status::InvalidArgument("a kv has no key");
  auto key_bytes = from_base64(key->get_ref<const std::string&>());
  if (!key_bytes) return Status::InvalidArgument("a kv's key is not base64");
  out.key = to_string(*key_bytes);
  if (auto value = kv.find("value"); value != kv.end()) {
    if (!value->is_string()) return Status::InvalidArgument("a kv's value is not a string");
    auto bytes = from_base64(value->get_ref<const std::string&>());
    if (!bytes) return Status::InvalidArgument("a kv's value is not base64");
    out.value = std::move(*bytes);
  }
  auto create = int64_field(kv, "create_revision");
  auto mod = int64_field(kv, "mod_revision");
  auto version = int64_field(kv, "version");
  if (!create || !mod || !version)
    return Status::InvalidArgument("a kv's revisions are not integers");
  out.create_revision = *create;
  out.mod_revision = *mod;
  out.version = *version;
  return out;
}

EtcdClient::Transport::~Transport() {
  std::lock_guard lock(pool_mu_);
  for (CURL* c : pool_) curl_easy_cleanup(c);
  pool_.clear();
}

CURL* EtcdClient::Transport::take_handle() {
  {
    std::lock_guard lock(pool_mu_);
    if (!pool_.empty()) {
      CURL* c = pool_.back();
      pool_.pop_back();
      // reset keeps the handle's live connections, so the next request skips the TCP handshake.
      curl_easy_reset(c);
      return c;
    }
  }
  return curl_easy_init();
}

void EtcdClient::Transport::give_handle(CURL* curl) {
  if (curl == nullptr) return;
  std::lock_guard lock(pool_mu_);
  if (pool_.size() < kPoolSize) {
    pool_.push_back(curl);
    return;
  }
  curl_easy_cleanup(curl);
}

void EtcdClient::Transport::configure(CURL* curl) const {
  // Threads: no SIGALRM for DNS timeouts.
  curl_easy_setopt(curl, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(curl, CURLOPT_PROTOCOLS_STR, "http,https");
  // A member that vanished without a FIN (power cut, partition) shows up on an idle connection.
  curl_easy_setopt(curl, CURLOPT_TCP_KEEPALIVE, 1L);
  curl_easy_setopt(curl, CURLOPT_TCP_KEEPIDLE, 5L);
  curl_easy_setopt(curl, CURLOPT_TCP_KEEPINTVL, 2L);
  curl_easy_setopt(curl, CURLOPT_TCP_NODELAY, 1L);
  if (!options.ca_file.empty()) curl_easy_setopt(curl, CURLOPT_CAINFO, options.ca_file.c_str());
  if (!options.cert_file.empty()) {
    curl_easy_setopt(curl, CURLOPT_SSLCERT, options.cert_file.c_str());
    curl_easy_setopt(curl, CURLOPT_SSLKEY, options.key_file.c_str());
  }
}

EtcdClient::Transport::Exchange EtcdClient::Transport::exchange(const std::string& url,
                                                                const std::string* post_body,
                                                                std::chrono::milliseconds timeout) {
  Exchange ex;
  CURL* curl = take_handle();
  if (curl == nullptr) {
    ex.failure = "curl_easy_init failed";
    return ex;
  }
  configure(curl);
  char errbuf[CURL_ERROR_SIZE] = {0};
  curl_easy_setopt(curl, CURLOPT_ERRORBUFFER, errbuf);
  curl_easy_setopt(curl, CURLOPT_URL, url.c_str());
  curl_easy_setopt(curl, CURLOPT_TIMEOUT_MS,
                   static_cast<long>(std::max<std::int64_t>(1, timeout.count())));
  curl_easy_setopt(curl, CURLOPT_WRITEFUNCTION, append_body);
  curl_easy_setopt(curl, CURLOPT_WRITEDATA, &ex.body);
  curl_slist* headers = nullptr;
  if (post_body != nullptr) {
    headers = curl_slist_append(headers, "Content-Type: application/json");
    // No "Expect: 100-continue" round trip for big bodies.
    headers = curl_slist_append(headers, "Expect:");
    curl_easy_setopt(curl, CURLOPT_HTTPHEADER, headers);
    curl_easy_setopt(curl, CURLOPT_POSTFIELDS, post_body->data());
    curl_easy_setopt(curl, CURLOPT_POSTFIELDSIZE_LARGE, static_cast<curl_off_t>(post_body->size()));
  }
  CURLcode rc = curl_easy_perform(curl);
  if (rc == CURLE_OK) {
    ex.transferred = true;
    curl_easy_getinfo(curl, CURLINFO_RESPONSE_CODE, &ex.http_status);
  } else if (rc == CURLE_OPERATION_TIMEDOUT) {
    ex.timed_out = true;
    ex.failure = "no answer within " + millis(timeout);
  } else if (rc == CURLE_WRITE_ERROR && ex.body.size() + CURL_MAX_WRITE_SIZE > kMaxResponseBytes) {
    ex.failure = "answer larger than " + std::to_string(kMaxResponseBytes >> 20) + " MiB";
  } else if (long os_errno = 0; rc == CURLE_COULDNT_CONNECT &&
                                curl_easy_getinfo(curl, CURLINFO_OS_ERRNO, &os_errno) == CURLE_OK &&
                                os_errno != 0) {
    ex.failure = std::string("cannot connect: ") + std::strerror(static_cast<int>(os_errno));
  } else {
    ex.failure = errbuf[0] != '\0' ? std::string(errbuf) : std::string(curl_easy_strerror(rc));
  }
  curl_easy_setopt(curl, CURLOPT_HTTPHEADER, nullptr);
  curl_easy_setopt(curl, CURLOPT_ERRORBUFFER, nullptr);
  curl_slist_free_all(headers);
  if (rc == CURLE_OK) {
    give_handle(curl);
  } else {
    // A handle whose transfer failed may hold a half-dead connection; start afresh next time.
    curl_easy_cleanup(curl);
  }
  return ex;
}

Status EtcdClient::Transport::call(std::string_view path, const json& body, std::string_view what,
                                   const std::function<Status(const json&)>& accept) {
  const std::string payload = body.dump();
  const std::size_t n = options.endpoints.size();
  const auto deadline = Clock::now() + options.request_timeout;
  std::vector<std::string> reasons(n);
  std::size_t start = preferred.load() % n;
  auto pause = std::chrono::milliseconds(20);
  for (;;) {
    bool any_transient = false;
    for (std::size_t i = 0; i < n; ++i) {
      const std::size_t idx = (start + i) % n;
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
      if (left.count() <= 0) break;
      const std::string& endpoint = options.endpoints[idx];
      Exchange ex =
          exchange(endpoint + std::string(path), &payload, std::min(left, options.attempt_timeout));
      if (!ex.transferred) {
        reasons[idx] = ex.failure;
        any_transient = true;  // refused or timed out: the member may come back
        continue;
      }
      json j = json::parse(ex.body, nullptr, /*allow_exceptions=*/false);
      if (j.is_discarded()) {
        reasons[idx] = "HTTP " + std::to_string(ex.http_status) +
                       " with an answer that is not JSON ('" + body_excerpt(ex.body) +
                       "'): not etcd's v3 gateway?";
        any_transient = any_transient || ex.http_status >= 500;
        continue;
      }
      if (auto err = etcd_error_of(j)) {
        if (err->code == 0) {  // gRPC's OK is no error: this is not etcd speaking
          reasons[idx] = "HTTP " + std::to_string(ex.http_status) +
                         " with an error that has no gRPC code: not etcd's answer";
          any_transient = any_transient || ex.http_status >= 500;
          continue;
        }
        if (etcd_error_is_transient(*err)) {
          reasons[idx] = "etcd says: " + err->message;
          any_transient = true;
          continue;
        }
        preferred.store(idx);
        return status_of_etcd_error(*err, std::string(what) + " (" + endpoint + ")");
      }
      if (ex.http_status != 200) {
        reasons[idx] = "HTTP " + std::to_string(ex.http_status) + " ('" + body_excerpt(ex.body) +
                       "'): not etcd's v3 gateway?";
        any_transient = any_transient || ex.http_status >= 500;
        continue;
      }
      Status accepted = Status::Ok();
      try {
        accepted = accept(j);
      } catch (const json::exception& e) {
        // A field of the wrong type in an answer: the endpoint does not speak etcd's JSON.
        accepted = Status::InvalidArgument(e.what());
      }
      if (!accepted.ok()) {
        reasons[idx] = "an answer that is not etcd's (" + accepted.message() + ")";
        continue;
      }
      preferred.store(idx);
      return Status::Ok();
    }
    if (!any_transient || Clock::now() + pause >= deadline) break;
    // Every endpoint failed this round; give an election (500 ms timeout) a moment.
    std::this_thread::sleep_for(pause);
    pause = std::min(pause * 2, std::chrono::milliseconds(200));
  }
  std::string m = std::string(what) + ": no etcd endpoint answered within " +
                  millis(options.request_timeout) + "; tried ";
  bool first = true;
  for (std::size_t i = 0; i < n; ++i) {
    const std::size_t idx = (start + i) % n;
    if (reasons[idx].empty()) continue;
    m += (first ? "" : ", ") + options.endpoints[idx] + " (" + reasons[idx] + ")";
    first = false;
  }
  if (first) m += "none (the deadline passed first)";
  return Status::Unavailable(m);
}

}  // namespace medgate::order
