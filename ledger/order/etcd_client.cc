#include "ledger/order/etcd_client.h"

#include <curl/curl.h>

#include <fstream>

#include <nlohmann/json.hpp>

#include "ledger/order/etcd_transport.h"

namespace medgate::order {
namespace {

using nlohmann::json;

std::string b64(std::string_view s) {
  return to_base64(as_bytes(s));
}

std::string revision_string(std::int64_t r) {
  return std::to_string(r);
}

// Every v3 answer carries a header with the store's revision; its absence means the server is
// not etcd.
Result<std::int64_t> header_revision(const json& j) {
  auto h = j.find("header");
  if (h == j.end() || !h->is_object()) return Status::InvalidArgument("no header");
  auto rev = int64_field(*h, "revision");
  if (!rev) return Status::InvalidArgument("header revision is not an integer");
  return *rev;
}

Result<Range> range_of(const json& r) {
  Range out;
  MEDGATE_ASSIGN_OR_RETURN(out.revision, header_revision(r));
  if (auto kvs = r.find("kvs"); kvs != r.end()) {
    if (!kvs->is_array()) return Status::InvalidArgument("kvs is not an array");
    for (const json& kv : *kvs) {
      MEDGATE_ASSIGN_OR_RETURN(KeyValue pair, key_value_of(kv));
      out.kvs.push_back(std::move(pair));
    }
  }
  if (auto more = r.find("more"); more != r.end()) {
    if (!more->is_boolean()) return Status::InvalidArgument("more is not a boolean");
    out.more = more->get<bool>();
  }
  auto count = int64_field(r, "count");
  if (!count) return Status::InvalidArgument("count is not an integer");
  out.count = *count;
  return out;
}

// An endpoint URL: http or https, a host, an explicit port, no path beyond "/", nothing else.
Result<std::string> checked_endpoint(const std::string& url) {
  auto bad = [&](const std::string& why) {
    return Status::InvalidArgument("etcd endpoint '" + url + "' " + why +
                                   " (expected http://HOST:PORT or https://HOST:PORT)");
  };
  CURLU* u = curl_url();
  if (u == nullptr) return Status::Internal("curl_url failed");
  std::string normalized;
  Status st = Status::Ok();
  auto part = [&](CURLUPart which) -> std::optional<std::string> {
    char* v = nullptr;
    if (curl_url_get(u, which, &v, 0) != CURLUE_OK || v == nullptr) return std::nullopt;
    std::string s(v);
    curl_free(v);
    return s;
  };
  if (curl_url_set(u, CURLUPART_URL, url.c_str(), 0) != CURLUE_OK) {
    st = bad("is not a URL");
  } else {
    auto scheme = part(CURLUPART_SCHEME);
    auto host = part(CURLUPART_HOST);
    auto port = part(CURLUPART_PORT);
    auto path = part(CURLUPART_PATH);
    if (!scheme || (*scheme != "http" && *scheme != "https")) {
      st = bad("has a scheme other than http or https");
    } else if (url.rfind(*scheme + "://", 0) != 0) {
      st = bad("does not start with " + *scheme + "://");
    } else if (!host || host->empty()) {
      st = bad("has no host");
    } else if (!port) {
      st = bad("has no port");
    } else if (path && *path != "/" && !path->empty()) {
      st = bad("has a path");
    } else if (part(CURLUPART_QUERY) || part(CURLUPART_FRAGMENT) || part(CURLUPART_USER)) {
      st = bad("has a query, fragment or user");
    } else {
      normalized = *scheme + "://" + *host + ":" + *port;
    }
  }
  curl_url_cleanup(u);
  if (!st.ok()) return st;
  return normalized;
}

Status readable(const std::string& option, const std::string& file) {
  std::ifstream in(file);
  if (!in) return Status::InvalidArgument("etcd " + option + " '" + file + "' cannot be read");
  return Status::Ok();
}

}  // namespace

std::string prefix_end(std::string_view prefix) {
  std::string end(prefix);
  while (!end.empty()) {
    auto last = static_cast<unsigned char>(end.back());
    if (last < 0xff) {
      end.back() = static_cast<char>(last + 1);
      return end;
    }
    end.pop_back();
  }
  return std::string(1, '\0');
}

EtcdClient::EtcdClient(EtcdOptions options)
    : options_(options), transport_(std::make_unique<Transport>(std::move(options))) {}

EtcdClient::~EtcdClient() = default;

Result<std::unique_ptr<EtcdClient>> EtcdClient::open(const EtcdOptions& options) {
  static std::once_flag curl_once;
  static CURLcode curl_init = CURLE_OK;
  std::call_once(curl_once, [] { curl_init = curl_global_init(CURL_GLOBAL_DEFAULT); });
  if (curl_init != CURLE_OK)
    return Status::Internal(std::string("curl_global_init failed: ") +
                            curl_easy_strerror(curl_init));

  if (options.endpoints.empty()) return Status::InvalidArgument("no etcd endpoint given");
  if (options.request_timeout.count() <= 0 || options.attempt_timeout.count() <= 0)
    return Status::InvalidArgument("etcd request and attempt timeouts must be positive");
  if (options.max_request_bytes <= kRequestOverheadBytes)
    return Status::InvalidArgument("etcd max_request_bytes must be over " +
                                   std::to_string(kRequestOverheadBytes));
  EtcdOptions checked = options;
  bool any_https = false;
  for (std::string& e : checked.endpoints) {
    MEDGATE_ASSIGN_OR_RETURN(e, checked_endpoint(e));
    any_https = any_https || e.rfind("https://", 0) == 0;
  }
  if (options.cert_file.empty() != options.key_file.empty())
    return Status::InvalidArgument("etcd TLS client certificate and key go together: give both");
  bool any_tls_file = !options.ca_file.empty() || !options.cert_file.empty();
  if (any_tls_file && !any_https)
    return Status::InvalidArgument(
        "etcd TLS files are given but no endpoint is https: they would not be used");
  if (!options.ca_file.empty()) MEDGATE_RETURN_IF_ERROR(readable("CA file", options.ca_file));
  if (!options.cert_file.empty()) {
    MEDGATE_RETURN_IF_ERROR(readable("certificate file", options.cert_file));
    MEDGATE_RETURN_IF_ERROR(readable("key file", options.key_file));
  }
  return std::unique_ptr<EtcdClient>(new EtcdClient(std::move(checked)));
}

Result<std::int64_t> EtcdClient::put(std::string_view key, ByteView value) {
  const std::string what = "etcd put of key '" + printable_key(key) + "'";
  std::size_t size = key.size() + value.size() + kRequestOverheadBytes;
  if (size > options_.max_request_bytes)
    return Status::InvalidArgument(what + ": the request would be about " + std::to_string(size) +
                                   " bytes, over etcd's request limit of " +
                                   std::to_string(options_.max_request_bytes) +
                                   " bytes (max_request_bytes); not sent");
  json body = {{"key", b64(key)}, {"value", to_base64(value)}};
  std::int64_t revision = 0;
  MEDGATE_RETURN_IF_ERROR(transport_->call("/v3/kv/put", body, what, [&](const json& r) {
    MEDGATE_ASSIGN_OR_RETURN(revision, header_revision(r));
    return Status::Ok();
  }));
  return revision;
}

Result<std::int64_t> EtcdClient::remove(std::string_view key, std::string_view range_end) {
  const std::string what = "etcd delete of key '" + printable_key(key) + "'";
  json body = {{"key", b64(key)}};
  if (!range_end.empty()) body["range_end"] = b64(range_end);
  std::int64_t deleted = 0;
  MEDGATE_RETURN_IF_ERROR(transport_->call("/v3/kv/deleterange", body, what, [&](const json& r) {
    // etcd leaves out zero-valued fields: no "deleted" means none.
    if (!r.contains("deleted")) return Status::Ok();
    auto n = int64_field(r, "deleted");
    if (!n) return Status::InvalidArgument("deleted is not an integer");
    deleted = *n;
    return Status::Ok();
  }));
  return deleted;
}

Result<Range> EtcdClient::range(std::string_view key, std::string_view range_end,
                                std::int64_t limit, std::int64_t revision,
                                std::int64_t min_mod_revision) {
  const std::string what = "etcd range read of key '" + printable_key(key) + "'";
  if (limit < 0 || revision < 0 || min_mod_revision < 0)
    return Status::InvalidArgument(what + ": limit and revisions must not be negative");
  json body = {{"key", b64(key)}};
  if (!range_end.empty()) body["range_end"] = b64(range_end);
  if (limit > 0) body["limit"] = revision_string(limit);
  if (revision > 0) body["revision"] = revision_string(revision);
  if (min_mod_revision > 0) body["min_mod_revision"] = revision_string(min_mod_revision);
  Range out;
  MEDGATE_RETURN_IF_ERROR(transport_->call("/v3/kv/range", body, what, [&](const json& r) {
    MEDGATE_ASSIGN_OR_RETURN(out, range_of(r));
    return Status::Ok();
  }));
  return out;
}

Status EtcdClient::compact(std::int64_t revision, bool physical) {
  const std::string what = "etcd compaction to revision " + std::to_string(revision);
  if (revision <= 0) return Status::InvalidArgument(what + ": the revision must be 1 or more");
  json body = {{"revision", revision_string(revision)}, {"physical", physical}};
  return transport_->call("/v3/kv/compaction", body, what,
                          [&](const json& r) { return header_revision(r).status(); });
}

Result<CreateResult> EtcdClient::create_if_absent(std::string_view key, ByteView value) {
  return put_if(key, value, /*mod_revision=*/0);
}

Result<CreateResult> EtcdClient::replace_if_revision(std::string_view key,
                                                     std::int64_t mod_revision, ByteView value) {
  if (mod_revision <= 0)
    return Status::InvalidArgument("replace_if_revision needs the revision being replaced");
  return put_if(key, value, mod_revision);
}

// One transaction: put `value` if the key is absent (mod_revision 0) or was last written at
// `mod_revision`; otherwise read it.
Result<CreateResult> EtcdClient::put_if(std::string_view key, ByteView value,
                                        std::int64_t mod_revision) {
  const std::string what = std::string(mod_revision ? "etcd replace" : "etcd create") +
                           " of key '" + printable_key(key) + "'";
  std::size_t size = 2 * key.size() + value.size() + kRequestOverheadBytes;
  if (size > options_.max_request_bytes)
    return Status::InvalidArgument(what + ": the request would be about " + std::to_string(size) +
                                   " bytes, over etcd's request limit of " +
                                   std::to_string(options_.max_request_bytes) +
                                   " bytes (max_request_bytes); not sent");
  const std::string k = b64(key);
  json compare =
      mod_revision == 0
          ? json{{"target", "CREATE"}, {"result", "EQUAL"}, {"key", k}, {"create_revision", "0"}}
          : json{{"target", "MOD"},
                 {"result", "EQUAL"},
                 {"key", k},
                 {"mod_revision", std::to_string(mod_revision)}};
  json body = {
      {"compare", json::array({compare})},
      {"success", json::array({{{"request_put", {{"key", k}, {"value", to_base64(value)}}}}})},
      {"failure", json::array({{{"request_range", {{"key", k}}}}})},
  };
  CreateResult out;
  MEDGATE_RETURN_IF_ERROR(transport_->call("/v3/kv/txn", body, what, [&](const json& r) {
    MEDGATE_ASSIGN_OR_RETURN(out.revision, header_revision(r));
    // A failed compare leaves "succeeded" out (false is the protobuf default).
    auto s = r.find("succeeded");
    out.created = s != r.end() && s->is_boolean() && s->get<bool>();
    if (out.created) return Status::Ok();
    auto responses = r.find("responses");
    if (responses == r.end() || !responses->is_array() || responses->size() != 1)
      return Status::InvalidArgument("a failed txn without its one range response");
    auto range = (*responses)[0].find("response_range");
    if (range == (*responses)[0].end()) return Status::InvalidArgument("no response_range");
    MEDGATE_ASSIGN_OR_RETURN(Range read, range_of(*range));
    // A create's compare failing means the key exists; a replace's may also mean it is gone.
    if (read.kvs.empty() && mod_revision != 0) return Status::Ok();
    if (read.kvs.size() != 1 || read.kvs[0].key != key)
      return Status::InvalidArgument("the txn's range response lacks the key");
    out.existing = std::move(read.kvs[0]);
    return Status::Ok();
  }));
  return out;
}

Result<EtcdStatus> EtcdClient::status() {
  EtcdStatus out;
  MEDGATE_RETURN_IF_ERROR(
      transport_->call("/v3/maintenance/status", json::object(), "etcd status", [&](const json& r) {
        MEDGATE_ASSIGN_OR_RETURN(out.revision, header_revision(r));
        const json& h = r.at("header");
        auto member = uint64_field(h, "member_id");
        auto leader = uint64_field(r, "leader");
        // The gateway writes this message's fields in camelCase; accept either spelling.
        auto term = uint64_field(r, r.contains("raftTerm") ? "raftTerm" : "raft_term");
        auto db = int64_field(r, r.contains("dbSize") ? "dbSize" : "db_size");
        if (!member || !leader || !term || !db)
          return Status::InvalidArgument("status fields are not integers");
        auto version = r.find("version");
        if (version == r.end() || !version->is_string())
          return Status::InvalidArgument("status without a version");
        out.member_id = *member;
        out.leader = *leader;
        out.raft_term = *term;
        out.db_size = *db;
        out.version = version->get<std::string>();
        return Status::Ok();
      }));
  out.endpoint = options_.endpoints[transport_->preferred.load() % options_.endpoints.size()];
  for (const std::string& endpoint : options_.endpoints) {
    EndpointHealth health{endpoint, false, {}};
    auto ex = transport_->exchange(endpoint + "/health", nullptr, options_.request_timeout);
    if (!ex.transferred) {
      health.error = ex.failure;
    } else {
      json j = json::parse(ex.body, nullptr, false);
      auto h = j.is_object() ? j.find("health") : j.end();
      if (j.is_object() && h != j.end() && h->is_string()) {
        health.healthy = ex.http_status == 200 && h->get<std::string>() == "true";
        if (!health.healthy) {
          auto reason = j.find("reason");
          health.error =
              "unhealthy (HTTP " + std::to_string(ex.http_status) + ")" +
              (reason != j.end() && reason->is_string() ? ": " + reason->get<std::string>()
                                                        : std::string());
        }
      } else {
        health.error = "HTTP " + std::to_string(ex.http_status) + ", not etcd's health answer";
      }
    }
    out.member_health.push_back(std::move(health));
  }
  return out;
}

}  // namespace medgate::order
