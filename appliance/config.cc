#include "appliance/config.h"

#include "appliance/ip_network.h"

#include <algorithm>
#include <cctype>
#include <fstream>
#include <set>
#include <sstream>

#include <arpa/inet.h>

#include <fmt/format.h>
#include <toml++/toml.h>

namespace medgate::appliance {
namespace {

// Reads a TOML table against a list of allowed keys, with errors naming file and line.
class Reader {
 public:
  Reader(const std::filesystem::path& source) : source_(source) {}

  Status error_at(const toml::source_region& where, const std::string& what) const {
    return Status::InvalidArgument(
        fmt::format("{}:{}: {}", source_.string(), where.begin.line, what));
  }
  Status error_at_line(int line, const std::string& what) const {
    return Status::InvalidArgument(fmt::format("{}:{}: {}", source_.string(), line, what));
  }
  Status error(const std::string& what) const {
    return Status::InvalidArgument(fmt::format("{}: {}", source_.string(), what));
  }

  Status check_keys(const toml::table& table, std::string_view name,
                    const std::set<std::string_view>& allowed) const {
    for (const auto& [key, node] : table) {
      if (!allowed.count(key.str()))
        return error_at(key.source(), fmt::format("unknown key '{}' in [{}]", key.str(), name));
    }
    return Status::Ok();
  }

  template <typename T>
  Result<std::optional<T>> get(const toml::table& table, std::string_view section,
                               std::string_view key) const {
    const toml::node* node = table.get(key);
    if (!node) return std::optional<T>();
    // Exact types only: toml++'s value<T>() would convert (a float to an integer, out of range).
    std::optional<T> value;
    if constexpr (std::is_same_v<T, std::string>) {
      if (const auto* v = node->as_string()) value = v->get();
    } else if constexpr (std::is_same_v<T, bool>) {
      if (const auto* v = node->as_boolean()) value = v->get();
    } else {
      if (const auto* v = node->as_integer()) value = v->get();
    }
    if (!value) {
      const char* want = std::is_same_v<T, std::string> ? "a string"
                         : std::is_same_v<T, bool>      ? "true or false"
                                                        : "an integer";
      return error_at(node->source(), fmt::format("[{}] {} must be {}", section, key, want));
    }
    if constexpr (std::is_same_v<T, std::string>) {
      // \u escapes can still smuggle in what check_toml_characters keeps out of the text.
      for (char ch : *value)
        if (static_cast<unsigned char>(ch) >= 0x80 || static_cast<unsigned char>(ch) < 0x20)
          return error_at(
              node->source(),
              fmt::format("[{}] {} must be printable ASCII (no escapes for other characters)",
                          section, key));
    }
    return std::optional<T>(*value);
  }

  std::filesystem::path resolve(const std::string& p) const {
    std::filesystem::path path(p);
    if (path.is_relative()) return source_.parent_path() / path;
    return path;
  }

 private:
  std::filesystem::path source_;
};

// medgated.toml is checked line by line against the small part of TOML it uses before toml++
// sees it: [table] headers, key = value with a quoted string, an integer, true or false, and
// comments. Debian's toml++ 3.3.0 reaches failed assertions and unreachable code on some malformed
// input (upstream PRs #301 and #305 and more; found by tests/fuzz), so it only ever gets text that
// is well-formed in this subset. Non-ASCII is allowed in comments only: ids, paths and names are
// ASCII (toml++ also misreads non-ASCII in places).
class SubsetChecker {
  static constexpr const char* kNoValue =
      "expected a value: a quoted string, an integer, true or false (no floats or dates)";
  static constexpr const char* kNonAscii =
      "a non-ASCII character outside a comment (ids, paths and names must be ASCII)";

 public:
  SubsetChecker(std::string_view text, const Reader& r) : text_(text), r_(r) {}

  Status check() {
    for (std::size_t c = 0, l = 1; c < text_.size(); ++c) {
      auto ch = static_cast<unsigned char>(text_[c]);
      if (ch == '\n') ++l;
      if ((ch < 0x20 && ch != '\t' && ch != '\r' && ch != '\n') || ch == 0x7f)
        return r_.error_at_line(static_cast<int>(l),
                                fmt::format("control character 0x{:02x} is not allowed", ch));
    }
    while (pos_ < text_.size()) {
      blanks();
      if (peek() == '[')
        MEDGATE_RETURN_IF_ERROR(header());
      else if (peek() != '#' && !at_line_end())
        MEDGATE_RETURN_IF_ERROR(key_value());
      blanks();
      if (peek() == '#') comment();
      if (!at_line_end()) return fail("unexpected text after the value");
      if (peek() == '\r') ++pos_;
      if (pos_ < text_.size()) {
        if (text_[pos_] != '\n') return fail("a carriage return must be followed by a line feed");
        ++pos_;
        ++line_;
        line_start_ = pos_;
      }
    }
    return Status::Ok();
  }

 private:
  char peek(std::size_t ahead = 0) const {
    return pos_ + ahead < text_.size() ? text_[pos_ + ahead] : '\0';
  }
  bool at_line_end() const { return pos_ >= text_.size() || peek() == '\n' || peek() == '\r'; }
  void blanks() {
    while (peek() == ' ' || peek() == '\t') ++pos_;
  }
  Status fail(const std::string& what) const {
    return r_.error_at_line(line_, fmt::format("column {}: {}", pos_ - line_start_ + 1, what));
  }
  void comment() {
    while (!at_line_end()) ++pos_;
  }
  static bool bare(char c) {
    return std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '-';
  }

  Status header() {
    ++pos_;
    bool array = peek() == '[';
    if (array) ++pos_;
    blanks();
    MEDGATE_RETURN_IF_ERROR(key());
    blanks();
    if (peek() != ']' || (array && peek(1) != ']'))
      return fail(array ? "expected ']]' to close the header" : "expected ']' to close the header");
    pos_ += array ? 2 : 1;
    return Status::Ok();
  }

  Status key() {
    for (;;) {
      if (peek() == '"' || peek() == '\'') {
        MEDGATE_RETURN_IF_ERROR(string());
      } else if (bare(peek())) {
        while (bare(peek())) ++pos_;
      } else if (static_cast<unsigned char>(peek()) >= 0x80) {
        return fail(kNonAscii);
      } else {
        return fail("expected a key name");
      }
      blanks();
      if (peek() != '.') return Status::Ok();
      ++pos_;
      blanks();
    }
  }

  Status key_value() {
    MEDGATE_RETURN_IF_ERROR(key());
    blanks();
    if (peek() != '=') return fail("expected '=' after the key");
    ++pos_;
    blanks();
    char c = peek();
    if (c == '"' || c == '\'') {
      if (peek(1) == c && peek(2) == c)
        return fail("multi-line strings are not accepted in medgated.toml");
      return string();
    }
    if (c == '[') return fail("arrays are not accepted in medgated.toml (no setting takes a list)");
    if (c == '{') return fail("inline tables are not accepted in medgated.toml; use a [section]");
    if (static_cast<unsigned char>(c) >= 0x80) return fail(kNonAscii);
    if (text_.substr(pos_, 4) == "true" && !bare(peek(4))) return pos_ += 4, Status::Ok();
    if (text_.substr(pos_, 5) == "false" && !bare(peek(5))) return pos_ += 5, Status::Ok();
    return integer();
  }

  // [+-]? (0 | [1-9] (_? [0-9])*), as TOML writes decimal integers.
  Status integer() {
    if (peek() == '+' || peek() == '-') ++pos_;
    if (peek() == '0' && !std::isdigit(static_cast<unsigned char>(peek(1))) && peek(1) != '_')
      return ++pos_, terminated();
    if (peek() < '1' || peek() > '9') return fail(kNoValue);
    ++pos_;
    while (std::isdigit(static_cast<unsigned char>(peek())) ||
           (peek() == '_' && std::isdigit(static_cast<unsigned char>(peek(1)))))
      ++pos_;
    if (pos_ - line_start_ > 40) return fail("the number is too long");
    return terminated();
  }

  Status terminated() const {
    char c = peek();
    if (at_line_end() || c == ' ' || c == '\t' || c == '#') return Status::Ok();
    return fail(kNoValue);
  }

  Status string() {
    char quote = peek();
    ++pos_;
    for (;;) {
      if (at_line_end()) return fail("a quoted string is not closed on its line");
      auto c = static_cast<unsigned char>(peek());
      if (c >= 0x80)
        return fail("a non-ASCII character outside a comment (ids, paths and names must be ASCII)");
      ++pos_;
      if (c == static_cast<unsigned char>(quote)) return Status::Ok();
      if (quote == '"' && c == '\\') {
        char e = peek();
        if (e == 'u' || e == 'U') {
          std::size_t digits = e == 'u' ? 4 : 8;
          ++pos_;
          for (std::size_t i = 0; i < digits; ++i, ++pos_)
            if (!std::isxdigit(static_cast<unsigned char>(peek())))
              return fail("a \\u escape needs hex digits");
        } else if (std::string_view("btnfr\"\\").find(e) != std::string_view::npos && e != '\0') {
          ++pos_;
        } else {
          return fail("an unknown escape sequence in a string");
        }
      }
    }
  }

  std::string_view text_;
  const Reader& r_;
  std::size_t pos_ = 0, line_start_ = 0;
  int line_ = 1;
};

// [network] allow: addresses and prefixes separated by spaces or commas, as systemd's
// IPAddressAllow= takes them. Each is checked here so that a typo stops medgated ip-allow with the
// line, rather than making systemd refuse the drop-in (or, worse, read it differently).
Result<std::vector<std::string>> parse_ip_allow(std::string_view text) {
  std::vector<std::string> out;
  std::size_t i = 0;
  while (i < text.size()) {
    if (text[i] == ' ' || text[i] == ',' || text[i] == '\t') {
      ++i;
      continue;
    }
    std::size_t end = text.find_first_of(" ,\t", i);
    if (end == std::string_view::npos) end = text.size();
    std::string item(text.substr(i, end - i));
    i = end;
    if (item == "localhost" || item == "link-local" || item == "multicast") {
      out.push_back(item);
      continue;
    }
    if (item == "any")
      return Status::InvalidArgument(
          "'any' would allow every address; leave [network] allow out instead");
    if (Result<IpNetwork> network = parse_ip_network(item); !network.ok())
      return Status::InvalidArgument(network.status().message() +
                                     " (or one of localhost, link-local, multicast)");
    out.push_back(item);
  }
  if (out.empty()) return Status::InvalidArgument("the list is empty; leave the key out instead");
  return out;
}

// [hl7] tls and its keys. The server key is the key store's (hsm/tls_key.h) unless tls_key_file
// names a PEM key: an explicit fallback.
Result<std::optional<hl7::MllpTlsConfig>> parse_hl7_tls(const Reader& r, const toml::table& t,
                                                        const hsm::KeyStoreConfig& key_store) {
  MEDGATE_ASSIGN_OR_RETURN(auto tls, r.get<bool>(t, "hl7", "tls"));
  MEDGATE_ASSIGN_OR_RETURN(auto cert, r.get<std::string>(t, "hl7", "tls_cert"));
  MEDGATE_ASSIGN_OR_RETURN(auto key_file, r.get<std::string>(t, "hl7", "tls_key_file"));
  MEDGATE_ASSIGN_OR_RETURN(auto client_ca, r.get<std::string>(t, "hl7", "tls_client_ca"));
  MEDGATE_ASSIGN_OR_RETURN(auto timeout, r.get<std::int64_t>(t, "hl7", "tls_handshake_timeout_s"));
  if (!tls || !*tls) {
    for (const char* key : {"tls_cert", "tls_key_file", "tls_client_ca", "tls_handshake_timeout_s"})
      if (const toml::node* n = t.get(key))
        return r.error_at(n->source(),
                          fmt::format("[hl7] {} is set but tls is not; add tls = true", key));
    return std::optional<hl7::MllpTlsConfig>();
  }
  hl7::MllpTlsConfig out;
  if (!cert || cert->empty())
    return r.error_at(t.get("tls")->source(),
                      "[hl7] tls = true needs tls_cert, the server certificate chain (PEM)");
  out.cert_file = r.resolve(*cert);
  if (key_file) {
    if (key_file->empty())
      return r.error_at(t.get("tls_key_file")->source(), "[hl7] tls_key_file is empty");
    out.key_file = r.resolve(*key_file);
  }
  if (client_ca) {
    if (client_ca->empty())
      return r.error_at(t.get("tls_client_ca")->source(), "[hl7] tls_client_ca is empty");
    out.client_ca = r.resolve(*client_ca);
  }
  if (timeout) {
    if (*timeout < 1 || *timeout > 300)
      return r.error_at(t.get("tls_handshake_timeout_s")->source(),
                        "[hl7] tls_handshake_timeout_s must be between 1 and 300");
    out.handshake_timeout = std::chrono::seconds(*timeout);
  }
  out.key_store = key_store;
  return std::optional<hl7::MllpTlsConfig>(std::move(out));
}

}  // namespace

Result<Config> load_config(const std::filesystem::path& file) {
  std::ifstream in(file);
  if (!in) return Status::InvalidArgument(fmt::format("cannot read config file {}", file.string()));
  std::stringstream text;
  text << in.rdbuf();
  return parse_config(text.str(), std::filesystem::absolute(file));
}

Result<Config> parse_config(std::string_view text, const std::filesystem::path& source) {
  Reader r(source);
  MEDGATE_RETURN_IF_ERROR(SubsetChecker(text, r).check());
  toml::table root;
  try {
    root = toml::parse(text, source.string());
  } catch (const toml::parse_error& e) {
    return r.error_at(e.source(), std::string(e.description()));
  }
  MEDGATE_RETURN_IF_ERROR(r.check_keys(
      root, "top level", {"ledger", "key_store", "admin", "hl7", "coap", "network", "metrics", "log"}));
  for (const auto& [key, node] : root)
    if (!node.is_table())
      return r.error_at(node.source(),
                        fmt::format("'{}' must be a table ([{}])", key.str(), key.str()));

  Config c;
  c.source = source;
  static const toml::table kEmpty;
  auto section = [&](std::string_view name) -> const toml::table& {
    const toml::table* t = root[name].as_table();
    return t ? *t : kEmpty;
  };

  const toml::table& ledger = section("ledger");
  MEDGATE_RETURN_IF_ERROR(
      r.check_keys(ledger, "ledger",
                   {"id", "data_dir", "path", "head_interval_ms", "counter_interval_s"}));
  MEDGATE_ASSIGN_OR_RETURN(auto id, r.get<std::string>(ledger, "ledger", "id"));
  if (!id || id->empty()) return r.error("[ledger] id is required");
  c.ledger_id = *id;
  MEDGATE_ASSIGN_OR_RETURN(auto data_dir, r.get<std::string>(ledger, "ledger", "data_dir"));
  if (!data_dir || data_dir->empty()) return r.error("[ledger] data_dir is required");
  c.data_dir = r.resolve(*data_dir);
  MEDGATE_ASSIGN_OR_RETURN(auto path, r.get<std::string>(ledger, "ledger", "path"));
  c.ledger_path = path ? r.resolve(*path) : c.data_dir / "ledger.db";
  MEDGATE_ASSIGN_OR_RETURN(auto interval,
                           r.get<std::int64_t>(ledger, "ledger", "head_interval_ms"));
  if (interval) {
    if (*interval < 10 || *interval > 3600000)
      return r.error_at(ledger.get("head_interval_ms")->source(),
                        "[ledger] head_interval_ms must be between 10 and 3600000");
    c.head_interval = std::chrono::milliseconds(*interval);
  }
  MEDGATE_ASSIGN_OR_RETURN(auto counter_interval,
                           r.get<std::int64_t>(ledger, "ledger", "counter_interval_s"));
  if (counter_interval) {
    if (*counter_interval < 0 || *counter_interval > 86400)
      return r.error_at(ledger.get("counter_interval_s")->source(),
                        "[ledger] counter_interval_s must be between 0 and 86400");
    c.counter_interval = std::chrono::seconds(*counter_interval);
  }

  const toml::table& keys = section("key_store");
  MEDGATE_RETURN_IF_ERROR(
      r.check_keys(keys, "key_store",
                   {"uri", "pin_file", "pin_env", "pin_credential", "softhsm_conf", "key_dir",
                    "seal_pcrs", "counter_nv_index"}));
  MEDGATE_ASSIGN_OR_RETURN(auto uri, r.get<std::string>(keys, "key_store", "uri"));
  if (!uri || uri->empty()) return r.error("[key_store] uri is required");
  c.key_store.uri = *uri;
  int pin_sources = 0;
  MEDGATE_ASSIGN_OR_RETURN(auto pin_file, r.get<std::string>(keys, "key_store", "pin_file"));
  if (pin_file) {
    c.key_store.pin = {hsm::PinSource::Kind::kFile, r.resolve(*pin_file).string()};
    ++pin_sources;
  }
  MEDGATE_ASSIGN_OR_RETURN(auto pin_env, r.get<std::string>(keys, "key_store", "pin_env"));
  if (pin_env) {
    c.key_store.pin = {hsm::PinSource::Kind::kEnv, *pin_env};
    ++pin_sources;
  }
  MEDGATE_ASSIGN_OR_RETURN(auto pin_credential,
                           r.get<std::string>(keys, "key_store", "pin_credential"));
  if (pin_credential) {
    c.key_store.pin = {hsm::PinSource::Kind::kCredential, *pin_credential};
    ++pin_sources;
  }
  if (pin_sources > 1)
    return r.error("[key_store] give only one of pin_file, pin_env, pin_credential");
  MEDGATE_ASSIGN_OR_RETURN(auto softhsm_conf,
                           r.get<std::string>(keys, "key_store", "softhsm_conf"));
  if (softhsm_conf) c.key_store.softhsm_conf = r.resolve(*softhsm_conf);
  // TPM only: where the key blobs are, the PCRs the data-key secret is sealed to, the counter.
  MEDGATE_ASSIGN_OR_RETURN(auto key_dir, r.get<std::string>(keys, "key_store", "key_dir"));
  if (key_dir) {
    if (key_dir->empty())
      return r.error_at(keys.get("key_dir")->source(), "[key_store] key_dir is empty");
    c.key_store.key_dir = r.resolve(*key_dir);
  }
  MEDGATE_ASSIGN_OR_RETURN(auto seal_pcrs, r.get<std::string>(keys, "key_store", "seal_pcrs"));
  if (seal_pcrs) {
    Result<std::vector<unsigned>> pcrs = parse_pcr_list(*seal_pcrs);
    if (!pcrs.ok())
      return r.error_at(keys.get("seal_pcrs")->source(),
                        "[key_store] seal_pcrs: " + pcrs.status().message());
    c.key_store.seal_pcrs = std::move(pcrs).value();
  }
  MEDGATE_ASSIGN_OR_RETURN(auto nv_index,
                           r.get<std::int64_t>(keys, "key_store", "counter_nv_index"));
  if (nv_index) {
    if (*nv_index < 0x01000000 || *nv_index > 0x01ffffff)
      return r.error_at(keys.get("counter_nv_index")->source(),
                        "[key_store] counter_nv_index must be an NV index, 16777216 (0x01000000) "
                        "to 33554431 (0x01ffffff)");
    c.key_store.counter_nv_index = static_cast<std::uint32_t>(*nv_index);
  }
  const bool tpm = c.key_store.uri.rfind("tpm2", 0) == 0;
  if (tpm && c.key_store.key_dir.empty())
    return r.error("[key_store] key_dir is required for a tpm2 key store");
  if (!tpm && (key_dir || seal_pcrs || nv_index))
    return r.error(
        "[key_store] key_dir, seal_pcrs and counter_nv_index are for tpm2 key stores only");

  const toml::table& admin = section("admin");
  MEDGATE_RETURN_IF_ERROR(r.check_keys(admin, "admin",
                                       {"socket", "admin_group", "auditor_group",
                                        "max_request_bytes", "max_connections", "idle_timeout_s"}));
  MEDGATE_ASSIGN_OR_RETURN(auto socket, r.get<std::string>(admin, "admin", "socket"));
  c.admin.socket = socket ? r.resolve(*socket) : c.data_dir / "admin.sock";
  if (c.admin.socket.string().size() >= 108)
    return r.error(
        fmt::format("[admin] socket path {} is longer than a Unix socket allows (107 bytes)",
                    c.admin.socket.string()));
  MEDGATE_ASSIGN_OR_RETURN(auto admin_group, r.get<std::string>(admin, "admin", "admin_group"));
  if (admin_group) c.admin.admin_group = *admin_group;
  MEDGATE_ASSIGN_OR_RETURN(auto auditor_group, r.get<std::string>(admin, "admin", "auditor_group"));
  if (auditor_group) c.admin.auditor_group = *auditor_group;
  MEDGATE_ASSIGN_OR_RETURN(auto max_request,
                           r.get<std::int64_t>(admin, "admin", "max_request_bytes"));
  if (max_request) {
    if (*max_request < 1024 || *max_request > (64 << 20))
      return r.error_at(admin.get("max_request_bytes")->source(),
                        "[admin] max_request_bytes must be between 1024 and 67108864");
    c.admin.max_request_bytes = static_cast<std::size_t>(*max_request);
  }
  MEDGATE_ASSIGN_OR_RETURN(auto max_connections,
                           r.get<std::int64_t>(admin, "admin", "max_connections"));
  if (max_connections) {
    if (*max_connections < 1 || *max_connections > 1024)
      return r.error_at(admin.get("max_connections")->source(),
                        "[admin] max_connections must be between 1 and 1024");
    c.admin.max_connections = static_cast<int>(*max_connections);
  }
  MEDGATE_ASSIGN_OR_RETURN(auto idle, r.get<std::int64_t>(admin, "admin", "idle_timeout_s"));
  if (idle) {
    if (*idle < 1 || *idle > 86400)
      return r.error_at(admin.get("idle_timeout_s")->source(),
                        "[admin] idle_timeout_s must be between 1 and 86400");
    c.admin.idle_timeout = std::chrono::seconds(*idle);
  }

  // Ingest listeners: each runs when its section is present and not `enabled = false`.
  auto port_of = [&](const toml::table& t, const char* name, const char* key,
                     std::int64_t value) -> Result<std::uint16_t> {
    if (value < 0 || value > 65535)
      return r.error_at(t.get(key)->source(),
                        fmt::format("[{}] {} must be a port number (0-65535)", name, key));
    return static_cast<std::uint16_t>(value);
  };
  if (root.contains("hl7")) {
    const toml::table& t = section("hl7");
    MEDGATE_RETURN_IF_ERROR(r.check_keys(
        t, "hl7",
        {"enabled", "address", "port", "max_connections", "max_frame_bytes", "read_timeout_s",
         "tls", "tls_cert", "tls_key_file", "tls_client_ca", "tls_handshake_timeout_s"}));
    MEDGATE_ASSIGN_OR_RETURN(auto enabled, r.get<bool>(t, "hl7", "enabled"));
    if (!enabled || *enabled) {
      hl7::MllpListenerConfig l;
      MEDGATE_ASSIGN_OR_RETURN(auto address, r.get<std::string>(t, "hl7", "address"));
      if (address) l.address = *address;
      MEDGATE_ASSIGN_OR_RETURN(auto port, r.get<std::int64_t>(t, "hl7", "port"));
      if (port) {
        MEDGATE_ASSIGN_OR_RETURN(l.port, port_of(t, "hl7", "port", *port));
      }
      MEDGATE_ASSIGN_OR_RETURN(auto max_conn, r.get<std::int64_t>(t, "hl7", "max_connections"));
      if (max_conn) {
        if (*max_conn < 1 || *max_conn > 65536)
          return r.error_at(t.get("max_connections")->source(),
                            "[hl7] max_connections must be between 1 and 65536");
        l.max_connections = static_cast<std::size_t>(*max_conn);
      }
      MEDGATE_ASSIGN_OR_RETURN(auto max_frame, r.get<std::int64_t>(t, "hl7", "max_frame_bytes"));
      if (max_frame) {
        if (*max_frame < 1024 || *max_frame > (64 << 20))
          return r.error_at(t.get("max_frame_bytes")->source(),
                            "[hl7] max_frame_bytes must be between 1024 and 67108864");
        l.max_frame_bytes = static_cast<std::size_t>(*max_frame);
      }
      MEDGATE_ASSIGN_OR_RETURN(auto timeout, r.get<std::int64_t>(t, "hl7", "read_timeout_s"));
      if (timeout) {
        if (*timeout < 1 || *timeout > 86400)
          return r.error_at(t.get("read_timeout_s")->source(),
                            "[hl7] read_timeout_s must be between 1 and 86400");
        l.read_timeout = std::chrono::seconds(*timeout);
      }
      MEDGATE_ASSIGN_OR_RETURN(l.tls, parse_hl7_tls(r, t, c.key_store));
      c.hl7 = l;
    }
  }
  if (root.contains("coap")) {
    const toml::table& t = section("coap");
    MEDGATE_RETURN_IF_ERROR(
        r.check_keys(t, "coap", {"enabled", "address", "port", "plain_port", "max_payload"}));
    MEDGATE_ASSIGN_OR_RETURN(auto enabled, r.get<bool>(t, "coap", "enabled"));
    if (!enabled || *enabled) {
      coap::CoapServerConfig s;
      MEDGATE_ASSIGN_OR_RETURN(auto address, r.get<std::string>(t, "coap", "address"));
      if (address) s.address = *address;
      MEDGATE_ASSIGN_OR_RETURN(auto port, r.get<std::int64_t>(t, "coap", "port"));
      if (port) {
        MEDGATE_ASSIGN_OR_RETURN(s.port, port_of(t, "coap", "port", *port));
      }
      MEDGATE_ASSIGN_OR_RETURN(auto plain, r.get<std::int64_t>(t, "coap", "plain_port"));
      if (plain && *plain != 0) {
        MEDGATE_ASSIGN_OR_RETURN(std::uint16_t p, port_of(t, "coap", "plain_port", *plain));
        s.plain_port = p;
      }
      MEDGATE_ASSIGN_OR_RETURN(auto max_payload, r.get<std::int64_t>(t, "coap", "max_payload"));
      if (max_payload) {
        if (*max_payload < 64 || *max_payload > static_cast<std::int64_t>(coap::kMaxPackBytes))
          return r.error_at(t.get("max_payload")->source(),
                            fmt::format("[coap] max_payload must be between 64 and {}",
                                        coap::kMaxPackBytes));
        s.max_payload = static_cast<std::size_t>(*max_payload);
      }
      c.coap = s;
    }
  }

  const toml::table& network = section("network");
  MEDGATE_RETURN_IF_ERROR(r.check_keys(network, "network", {"allow"}));
  MEDGATE_ASSIGN_OR_RETURN(auto allow, r.get<std::string>(network, "network", "allow"));
  if (allow) {
    Result<std::vector<std::string>> list = parse_ip_allow(*allow);
    if (!list.ok())
      return r.error_at(network.get("allow")->source(),
                        "[network] allow: " + list.status().message());
    c.ip_allow = std::move(list).value();
  }

  const toml::table& metrics = section("metrics");
  MEDGATE_RETURN_IF_ERROR(r.check_keys(metrics, "metrics", {"listen"}));
  MEDGATE_ASSIGN_OR_RETURN(auto listen, r.get<std::string>(metrics, "metrics", "listen"));
  if (listen) {
    Result<MetricsConfig> m = parse_metrics_listen(*listen);
    if (!m.ok())
      return r.error_at(metrics.get("listen")->source(),
                        "[metrics] listen: " + m.status().message());
    c.metrics = *m;
  }

  const toml::table& log = section("log");
  MEDGATE_RETURN_IF_ERROR(r.check_keys(log, "log", {"level"}));
  MEDGATE_ASSIGN_OR_RETURN(auto level, r.get<std::string>(log, "log", "level"));
  if (level) {
    static const std::pair<std::string_view, LogLevel> kLevels[] = {{"error", LogLevel::kError},
                                                                    {"warning", LogLevel::kWarning},
                                                                    {"notice", LogLevel::kNotice},
                                                                    {"info", LogLevel::kInfo},
                                                                    {"debug", LogLevel::kDebug}};
    auto it = std::find_if(std::begin(kLevels), std::end(kLevels),
                           [&](auto& p) { return p.first == *level; });
    if (it == std::end(kLevels))
      return r.error_at(
          log.get("level")->source(),
          fmt::format("[log] level '{}' is not one of error, warning, notice, info, debug",
                      *level));
    c.log_level = it->second;
  }
  return c;
}

Result<std::vector<unsigned>> parse_pcr_list(std::string_view text) {
  std::vector<unsigned> pcrs;
  if (text.empty()) return pcrs;
  for (;;) {
    std::size_t comma = text.find(',');
    std::string_view item = text.substr(0, comma);
    while (!item.empty() && item.front() == ' ') item.remove_prefix(1);
    while (!item.empty() && item.back() == ' ') item.remove_suffix(1);
    if (item.empty() || item.size() > 2 ||
        !std::all_of(item.begin(), item.end(), [](char ch) { return ch >= '0' && ch <= '9'; }))
      return Status::InvalidArgument(
          fmt::format("'{}' is not a PCR number; write a list like \"7\" or \"0,7\"", item));
    unsigned pcr = static_cast<unsigned>(std::stoul(std::string(item)));
    if (pcr > 23)
      return Status::InvalidArgument(fmt::format("PCR {} does not exist (0 to 23)", pcr));
    if (std::find(pcrs.begin(), pcrs.end(), pcr) != pcrs.end())
      return Status::InvalidArgument(fmt::format("PCR {} is listed twice", pcr));
    pcrs.push_back(pcr);
    if (comma == std::string_view::npos) break;
    text = text.substr(comma + 1);
  }
  std::sort(pcrs.begin(), pcrs.end());
  return pcrs;
}

std::string render_config(const Config& c) {
  auto q = [](const std::string& s) {
    toml::table t;
    t.insert("v", s);
    std::ostringstream out;
    out << t;
    std::string line = out.str();  // v = "..."
    return line.substr(line.find('=') + 2);
  };
  std::string pin;
  switch (c.key_store.pin.kind) {
    case hsm::PinSource::Kind::kFile:
      pin = "pin_file = " + q(c.key_store.pin.name);
      break;
    case hsm::PinSource::Kind::kEnv:
      pin = "pin_env = " + q(c.key_store.pin.name);
      break;
    case hsm::PinSource::Kind::kCredential:
      pin = "pin_credential = " + q(c.key_store.pin.name);
      break;
    case hsm::PinSource::Kind::kNone:
      pin = "# pin_file = \"/etc/medgate/hsm-pin\"";
      break;
  }
  std::string softhsm = c.key_store.softhsm_conf
                            ? "softhsm_conf = " + q(c.key_store.softhsm_conf->string())
                            : "# softhsm_conf = \"/var/lib/medgate/softhsm/softhsm2.conf\"";
  std::string key_store_text;
  if (c.key_store.uri.rfind("tpm2", 0) == 0) {
    std::string pcrs;
    for (unsigned p : c.key_store.seal_pcrs) pcrs += (pcrs.empty() ? "" : ",") + std::to_string(p);
    key_store_text = fmt::format(
        R"(# The TPM 2.0 the keys live in: tpm2:TCTI (tpm2 alone is tpm2:device:/dev/tpmrm0).
uri = {}
# The TPM's key blobs (signing keys, the sealed data-key secret): useless without this TPM.
key_dir = {}
# PCRs (SHA-256 bank) the data-key secret was sealed to at init, e.g. "7" or "0,7"; "" for none.
# Changing this does not reseal: the blobs in key_dir record what they are sealed to.
seal_pcrs = {}
# The TPM NV index of the rollback counter ({:#010x}).
counter_nv_index = {})",
        q(c.key_store.uri), q(c.key_store.key_dir.string()), q(pcrs), c.key_store.counter_nv_index,
        c.key_store.counter_nv_index);
  } else {
    key_store_text = fmt::format(
        R"(# RFC 7512 PKCS#11 URI of the token and signing key.
uri = {}
# Where the PIN comes from: pin_file (mode 0600), pin_env (a variable name) or pin_credential
# (a systemd credential from LoadCredential=). Never on a command line.
{}
{})",
        q(c.key_store.uri), pin, softhsm);
  }
  return fmt::format(R"(# medgated configuration, written by `medctl init`. See medgated.toml(5).

[ledger]
# The ledger's name; it is in every block and signed head and cannot change.
id = {}
data_dir = {}
path = {}
# How often a head covering new entries is signed (milliseconds). An entry waits at most this
# long plus one signature for a signed head that covers it.
head_interval_ms = {}
# How often, while entries arrive, the key store's rollback counter advances (seconds; 0: only at
# start and clean stop). A restored copy of the ledger older than this is refused at start. Each
# advance is one NV write on a TPM: 300 s is at most 288 a day.
counter_interval_s = {}

[key_store]
{}

[admin]
socket = {}
admin_group = {}
auditor_group = {}

# Device ingest. Each listener runs when its section is here (remove the '#'s) and enabled.
# [hl7]                    # HL7 v2 over MLLP (TCP); sources: medctl device add ID --kind hl7
# address = "0.0.0.0"
# port = 2575
# read_timeout_s = 60
# tls = true               # MLLP over TLS; the key stays in the key store (medgated tls-key)
# tls_cert = "/etc/medgate/mllp-cert.pem"
# tls_client_ca = "/etc/medgate/mllp-client-ca.pem"   # require client certificates
# [coap]                   # CoAP + SenML over DTLS-PSK; devices: medctl device add ID --kind coap
# address = "::"
# port = 5684

# The networks devices and peers are on, for the service's IP allow-list: `medgated ip-allow`
# turns this into a systemd drop-in (IPAddressDeny=any, IPAddressAllow=...). Not read at run time.
# [network]
# allow = "10.20.0.0/16 fd00:7::/64"

# Prometheus metrics (loopback only; off unless set): GET /metrics
# [metrics]
# listen = "127.0.0.1:9464"

[log]
level = "info"
)",
                     q(c.ledger_id), q(c.data_dir.string()), q(c.ledger_path.string()),
                     c.head_interval.count(), c.counter_interval.count(), key_store_text,
                     q(c.admin.socket.string()), q(c.admin.admin_group), q(c.admin.auditor_group));
}

Result<std::string> render_ip_allow_dropin(const Config& c) {
  if (c.ip_allow.empty())
    return Status::InvalidArgument(
        fmt::format("{} has no [network] allow: there is no network to restrict medgated to "
                    "(add e.g. allow = \"10.20.0.0/16\")",
                    c.source.string()));
  std::string allow;
  for (const auto& a : c.ip_allow) allow += " " + a;
  return fmt::format(
      R"(# Written by `medgated ip-allow --config {}` from its [network] allow.
# Install as /etc/systemd/system/medgated.service.d/ip-allow.conf, then
# `systemctl daemon-reload && systemctl restart medgated`. Write it again after changing the list.
#
# medgated may exchange IP packets (both ways: devices, clinical systems, etcd peers) only with
# these networks; everything else is dropped by the kernel before it reaches a socket. Loopback
# stays open (local tools and tests). The admin socket is a Unix socket and is not affected.
[Service]
IPAddressDeny=any
IPAddressAllow=localhost
IPAddressAllow={}
)",
      c.source.string(), allow.substr(1));
}

}  // namespace medgate::appliance
