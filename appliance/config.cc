#include "appliance/config.h"

#include <algorithm>
#include <cctype>
#include <fstream>
#include <set>
#include <sstream>

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

// Checks the text before toml++ sees it, against TOML's own rules plus one of ours: no control
// characters but tab, CR and LF; non-ASCII characters only in comments (TOML allows them in
// strings too, but toml++ misreads them where it takes a string for something else); a table header
// ([x] or [[x]]) begins with a key; and, since no setting takes them, no multi-line strings, arrays
// or inline tables. Debian's toml++ 3.3.0 hits an unreachable branch or a failed assertion on
// inputs that break these (upstream PRs #301 and #305, and more in arrays; found by tests/fuzz), so
// such input gets a clear error here instead. A setting that needs a list must come with parsing
// that is fuzzed.
Status check_toml_characters(std::string_view text, const Reader& r) {
  enum class In { kCode, kComment, kBasic, kLiteral } in = In::kCode;
  int line = 1;
  bool line_start = true;  // nothing but blanks so far on this line (outside strings)
  auto at = [&](const std::string& what) { return r.error_at_line(line, what); };
  auto header_starts_with_key = [&](std::size_t i) {
    std::size_t j = i + 1;
    auto blanks = [&] {
      while (j < text.size() && (text[j] == ' ' || text[j] == '\t')) ++j;
    };
    blanks();
    if (j < text.size() && text[j] == '[') ++j, blanks();
    if (j >= text.size()) return true;  // the parser reports the end of the text itself
    unsigned char k = static_cast<unsigned char>(text[j]);
    return std::isalnum(k) || k == '_' || k == '-' || k == '"' || k == '\'' || k == ']';
  };
  // Characters first, so that a control character is named as such wherever it is.
  for (std::size_t i = 0, l = 1; i < text.size(); ++i) {
    auto c = static_cast<unsigned char>(text[i]);
    if (c == '\n') ++l;
    if ((c < 0x20 && c != '\t' && c != '\r' && c != '\n') || c == 0x7f)
      return r.error_at_line(static_cast<int>(l),
                             fmt::format("control character 0x{:02x} is not allowed", c));
  }
  for (std::size_t i = 0; i < text.size(); ++i) {
    auto c = static_cast<unsigned char>(text[i]);
    if (c == '\n') {
      if (in == In::kBasic || in == In::kLiteral)
        return at("a quoted string is not closed on its line");
      ++line;
      line_start = true;
      in = In::kCode;
      continue;
    }
    if (c >= 0x80 && in != In::kComment)
      return at("a non-ASCII character outside a comment (ids, paths and names must be ASCII)");
    switch (in) {
      case In::kCode:
        if (c == ' ' || c == '\t' || c == '\r') break;
        if (c == '[' && line_start) {
          if (!header_starts_with_key(i)) return at("a table header must begin with a key name");
          if (i + 1 < text.size() && text[i + 1] == '[') ++i;  // [[array of tables]]
          line_start = false;
          continue;
        }
        if (c == '[')
          return at("arrays are not accepted in medgated.toml (no setting takes a list)");
        if (c == '{') return at("inline tables are not accepted in medgated.toml; use a [section]");
        line_start = false;
        if (text.substr(i, 3) == "\"\"\"" || text.substr(i, 3) == "'''")
          return at("multi-line strings are not accepted in medgated.toml");
        if (c == '#')
          in = In::kComment;
        else if (c == '"')
          in = In::kBasic;
        else if (c == '\'')
          in = In::kLiteral;
        break;
      case In::kComment:
        break;
      case In::kBasic:
        if (c == '\\')
          ++i;  // an escape: skip the escaped character (a newline is caught above)
        else if (c == '"')
          in = In::kCode;
        break;
      case In::kLiteral:
        if (c == '\'') in = In::kCode;
        break;
    }
  }
  return Status::Ok();
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
  MEDGATE_RETURN_IF_ERROR(check_toml_characters(text, r));
  toml::table root;
  try {
    root = toml::parse(text, source.string());
  } catch (const toml::parse_error& e) {
    return r.error_at(e.source(), std::string(e.description()));
  }
  MEDGATE_RETURN_IF_ERROR(r.check_keys(root, "top level", {"ledger", "key_store", "admin", "log"}));
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
      r.check_keys(ledger, "ledger", {"id", "data_dir", "path", "head_interval_ms"}));
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

  const toml::table& keys = section("key_store");
  MEDGATE_RETURN_IF_ERROR(r.check_keys(
      keys, "key_store", {"uri", "pin_file", "pin_env", "pin_credential", "softhsm_conf"}));
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
  return fmt::format(R"(# medgated configuration, written by `medctl init`. See medgated.toml(5).

[ledger]
# The ledger's name; it is in every block and signed head and cannot change.
id = {}
data_dir = {}
path = {}
# How often a head covering new entries is signed (milliseconds). An entry waits at most this
# long plus one signature for a signed head that covers it.
head_interval_ms = {}

[key_store]
# RFC 7512 PKCS#11 URI of the token and signing key.
uri = {}
# Where the PIN comes from: pin_file (mode 0600), pin_env (a variable name) or pin_credential
# (a systemd credential from LoadCredential=). Never on a command line.
{}
{}

[admin]
socket = {}
admin_group = {}
auditor_group = {}

[log]
level = "info"
)",
                     q(c.ledger_id), q(c.data_dir.string()), q(c.ledger_path.string()),
                     c.head_interval.count(), q(c.key_store.uri), pin, softhsm,
                     q(c.admin.socket.string()), q(c.admin.admin_group), q(c.admin.auditor_group));
}

}  // namespace medgate::appliance
