// EtcdWatch: one long POST to /v3/watch per connection, read line by line as etcd streams it.
//
// The transfer runs in a curl multi handle so that stop() can wake the thread at once
// (curl_multi_wakeup) instead of waiting for etcd to say something. A connection that ends for any
// reason other than stop() or compaction is reopened on the next endpoint, from the revision after
// the last one delivered, so nothing is skipped or repeated.
#include <curl/curl.h>

#include <nlohmann/json.hpp>

#include "ledger/order/etcd_client.h"
#include "ledger/order/etcd_transport.h"

namespace medgate::order {
namespace {

using Clock = std::chrono::steady_clock;
using nlohmann::json;

// What one connection ended with.
struct StreamEnd {
  enum class Kind { kStopped, kCompacted, kLost };
  Kind kind = Kind::kLost;
  std::int64_t compact_revision = 0;
  Status why;
};

// The state of one connection, seen by curl's write callback.
struct Stream {
  const std::atomic<bool>* stopping = nullptr;
  std::atomic<std::int64_t>* last_revision = nullptr;
  const WatchHandlers* handlers = nullptr;
  std::string endpoint;
  std::string pending;           // bytes after the last newline
  bool created = false;          // etcd confirmed the watch
  std::optional<StreamEnd> end;  // set when a line ends the stream

  // Handles one JSON line; false to end the transfer.
  bool line(std::string_view text) {
    json j = json::parse(text, nullptr, false);
    if (j.is_discarded() || !j.is_object()) {
      end = StreamEnd{
          StreamEnd::Kind::kLost, 0,
          Status::Unavailable("etcd watch on " + endpoint + ": a line of the stream is not JSON")};
      return false;
    }
    if (auto err = etcd_error_of(j)) {
      end = StreamEnd{StreamEnd::Kind::kLost, 0,
                      status_of_etcd_error(*err, "etcd watch on " + endpoint)};
      return false;
    }
    auto result = j.find("result");
    if (result == j.end() || !result->is_object()) {
      end = StreamEnd{StreamEnd::Kind::kLost, 0,
                      Status::Unavailable("etcd watch on " + endpoint + ": a line without result")};
      return false;
    }
    const json& r = *result;
    auto compact = int64_field(r, "compact_revision");
    if (compact && *compact > 0) {
      end = StreamEnd{StreamEnd::Kind::kCompacted, *compact, Status::Ok()};
      return false;
    }
    if (auto c = r.find("canceled"); c != r.end() && c->is_boolean() && c->get<bool>()) {
      std::string reason = "etcd canceled the watch";
      if (auto why = r.find("cancel_reason"); why != r.end() && why->is_string())
        reason += ": " + why->get<std::string>();
      end = StreamEnd{StreamEnd::Kind::kLost, 0,
                      Status::Unavailable("etcd watch on " + endpoint + ": " + reason)};
      return false;
    }
    if (auto c = r.find("created"); c != r.end() && c->is_boolean() && c->get<bool>())
      created = true;
    auto events = r.find("events");
    if (events == r.end()) return true;  // created, or a progress notification
    if (!events->is_array()) {
      end = StreamEnd{StreamEnd::Kind::kLost, 0,
                      Status::Unavailable("etcd watch on " + endpoint + ": events not a list")};
      return false;
    }
    for (const json& event : *events) {
      if (stopping->load()) return false;
      if (!event.is_object()) continue;
      auto type = event.find("type");
      // PUT is the protobuf default and so is left out; the filter keeps DELETEs away anyway.
      if (type != event.end() && !(type->is_string() && type->get<std::string>() == "PUT"))
        continue;
      auto kv = event.find("kv");
      Result<KeyValue> pair = kv == event.end() ? Result<KeyValue>(Status::InvalidArgument("no kv"))
                                                : key_value_of(*kv);
      if (!pair.ok()) {
        end = StreamEnd{StreamEnd::Kind::kLost, 0,
                        Status::Unavailable("etcd watch on " + endpoint + ": a malformed event (" +
                                            pair.status().message() + ")")};
        return false;
      }
      if (pair->mod_revision <= 0) {
        end = StreamEnd{
            StreamEnd::Kind::kLost, 0,
            Status::Unavailable("etcd watch on " + endpoint + ": an event without a revision")};
        return false;
      }
      if (handlers->on_put) handlers->on_put(*pair);
      // A transaction's puts share one revision: resuming at last + 1 after all of them is exact.
      if (pair->mod_revision > last_revision->load()) last_revision->store(pair->mod_revision);
    }
    return true;
  }

  static std::size_t write(char* data, std::size_t size, std::size_t n, void* user) {
    auto* s = static_cast<Stream*>(user);
    std::size_t bytes = size * n;
    if (s->stopping->load()) return 0;
    s->pending.append(data, bytes);
    std::size_t start = 0;
    for (;;) {
      std::size_t nl = s->pending.find('\n', start);
      if (nl == std::string::npos) break;
      std::string_view text(s->pending.data() + start, nl - start);
      start = nl + 1;
      if (text.find_first_not_of(" \r\t") == std::string_view::npos) continue;
      if (!s->line(text)) return 0;
    }
    s->pending.erase(0, start);
    if (s->pending.size() > kMaxResponseBytes) {
      s->end = StreamEnd{StreamEnd::Kind::kLost, 0,
                         Status::Unavailable("etcd watch on " + s->endpoint +
                                             ": a line longer than the answer limit")};
      return 0;
    }
    return bytes;
  }
};

}  // namespace

Result<std::unique_ptr<EtcdWatch>> EtcdClient::watch(std::string_view prefix,
                                                     std::int64_t start_revision,
                                                     WatchHandlers handlers) {
  if (start_revision < 1)
    return Status::InvalidArgument("etcd watch start revision must be 1 or more, not " +
                                   std::to_string(start_revision));
  if (!handlers.on_put || !handlers.on_compacted)
    return Status::InvalidArgument("etcd watch needs an on_put and an on_compacted handler");
  auto w = std::unique_ptr<EtcdWatch>(
      new EtcdWatch(*transport_, std::string(prefix), start_revision, std::move(handlers)));
  w->endpoint_ =
      transport_->options
          .endpoints[transport_->preferred.load() % transport_->options.endpoints.size()];
  CURLM* multi = curl_multi_init();
  if (multi == nullptr) return Status::Internal("curl_multi_init failed");
  w->multi_ = multi;
  w->thread_ = std::thread([raw = w.get()] { raw->run(); });
  return w;
}

EtcdWatch::EtcdWatch(EtcdClient::Transport& transport, std::string prefix,
                     std::int64_t start_revision, WatchHandlers handlers)
    : transport_(transport),
      prefix_(std::move(prefix)),
      handlers_(std::move(handlers)),
      last_revision_(start_revision - 1) {}

EtcdWatch::~EtcdWatch() {
  stop();
  if (multi_ != nullptr) curl_multi_cleanup(static_cast<CURLM*>(multi_));
}

void EtcdWatch::stop() {
  stopping_.store(true);
  {
    std::lock_guard lock(mu_);
    if (multi_ != nullptr) curl_multi_wakeup(static_cast<CURLM*>(multi_));
  }
  if (thread_.joinable()) thread_.join();
}

std::string EtcdWatch::endpoint() const {
  std::lock_guard lock(mu_);
  return endpoint_;
}

void EtcdWatch::run() {
  auto* multi = static_cast<CURLM*>(multi_);
  const auto& options = transport_.options;
  const std::size_t n = options.endpoints.size();
  std::size_t idx = 0;
  {
    std::lock_guard lock(mu_);  // the endpoint watch() chose
    for (std::size_t i = 0; i < n; ++i)
      if (options.endpoints[i] == endpoint_) idx = i;
  }
  const std::string key = to_base64(as_bytes(prefix_));
  const std::string range_end = to_base64(as_bytes(prefix_end(prefix_)));
  auto pause = std::chrono::milliseconds(20);

  // Waits up to `d` unless stop() wakes us.
  auto nap = [&](std::chrono::milliseconds d) {
    curl_multi_poll(multi, nullptr, 0, static_cast<int>(d.count()), nullptr);
  };

  while (!stopping_.load()) {
    const std::string endpoint = options.endpoints[idx];
    {
      std::lock_guard lock(mu_);
      endpoint_ = endpoint;
    }
    json body = {{"create_request",
                  {{"key", key},
                   {"range_end", range_end},
                   {"start_revision", std::to_string(last_revision_.load() + 1)},
                   {"filters", json::array({"NODELETE"})},
                   {"progress_notify", true}}}};
    const std::string payload = body.dump();
    Stream stream;
    stream.stopping = &stopping_;
    stream.last_revision = &last_revision_;
    stream.handlers = &handlers_;
    stream.endpoint = endpoint;

    CURL* curl = curl_easy_init();
    if (curl == nullptr) {
      nap(std::chrono::milliseconds(200));
      continue;
    }
    transport_.configure(curl);
    char errbuf[CURL_ERROR_SIZE] = {0};
    const std::string url = endpoint + "/v3/watch";
    curl_slist* headers = nullptr;
    headers = curl_slist_append(headers, "Content-Type: application/json");
    // gRPC metadata through the gateway: etcd ends the watch when its member loses the leader,
    // so a watch on a member cut off from the majority moves on instead of going quiet.
    headers = curl_slist_append(headers, "Grpc-Metadata-hasleader: true");
    curl_easy_setopt(curl, CURLOPT_ERRORBUFFER, errbuf);
    curl_easy_setopt(curl, CURLOPT_URL, url.c_str());
    curl_easy_setopt(curl, CURLOPT_HTTPHEADER, headers);
    curl_easy_setopt(curl, CURLOPT_POSTFIELDS, payload.data());
    curl_easy_setopt(curl, CURLOPT_POSTFIELDSIZE_LARGE, static_cast<curl_off_t>(payload.size()));
    curl_easy_setopt(curl, CURLOPT_CONNECTTIMEOUT_MS,
                     static_cast<long>(options.request_timeout.count()));
    curl_easy_setopt(curl, CURLOPT_WRITEFUNCTION, &Stream::write);
    curl_easy_setopt(curl, CURLOPT_WRITEDATA, &stream);
    curl_multi_add_handle(multi, curl);

    const auto connect_deadline = Clock::now() + options.request_timeout;
    CURLcode result = CURLE_OK;
    bool finished = false;
    long http_status = 0;
    while (!stopping_.load()) {
      int running = 0;
      curl_multi_perform(multi, &running);
      int queued = 0;
      while (CURLMsg* msg = curl_multi_info_read(multi, &queued)) {
        if (msg->msg == CURLMSG_DONE && msg->easy_handle == curl) {
          result = msg->data.result;
          finished = true;
        }
      }
      if (finished || running == 0 || stream.end) break;
      // etcd answers a watch at once with "created"; a server that says nothing is not one.
      if (!stream.created && Clock::now() > connect_deadline) {
        stream.end =
            StreamEnd{StreamEnd::Kind::kLost, 0,
                      Status::Unavailable("etcd watch on " + endpoint + ": no answer within " +
                                          std::to_string(options.request_timeout.count()) + " ms")};
        break;
      }
      curl_multi_poll(multi, nullptr, 0, 1000, nullptr);
    }
    curl_easy_getinfo(curl, CURLINFO_RESPONSE_CODE, &http_status);
    curl_multi_remove_handle(multi, curl);
    curl_easy_cleanup(curl);
    curl_slist_free_all(headers);
    if (!finished) result = CURLE_OK;

    if (stopping_.load()) break;
    // A last line without its newline (the server closed after it).
    if (!stream.end && !stream.pending.empty() &&
        stream.pending.find_first_not_of(" \r\t") != std::string::npos) {
      stream.line(stream.pending);
    }
    if (stream.end && stream.end->kind == StreamEnd::Kind::kCompacted) {
      ended_.store(true);
      handlers_.on_compacted(stream.end->compact_revision);
      return;
    }
    Status why = Status::Unavailable("etcd watch on " + endpoint + ": the stream ended");
    if (stream.end) {
      why = stream.end->why;
    } else if (result != CURLE_OK) {
      why = Status::Unavailable(
          "etcd watch on " + endpoint + ": " +
          (errbuf[0] != '\0' ? std::string(errbuf) : std::string(curl_easy_strerror(result))));
    } else if (http_status != 200) {
      why = Status::Unavailable("etcd watch on " + endpoint + ": HTTP " +
                                std::to_string(http_status) + ", not etcd's watch stream");
    }
    if (handlers_.on_reconnect) handlers_.on_reconnect(why);
    const bool was_up = stream.created;
    idx = (idx + 1) % n;
    if (was_up) {
      pause = std::chrono::milliseconds(20);  // a member went away: the next one at once
    } else {
      nap(pause);  // nobody answered: back off a little, up to 500 ms
      pause = std::min(pause * 2, std::chrono::milliseconds(500));
    }
  }
}

}  // namespace medgate::order
