// Fuzz target: parse_config (appliance/config.h), medgated.toml as an admin or a tool wrote it.
// Properties: never crashes (toml++ parse errors are caught inside); a refusal is
// kInvalidArgument naming the file; an accepted config, rendered by render_config (what
// `medctl init` writes), parses again to the same ledger id, key-store URI and admin socket; its
// [network] allow, if any, becomes a unit drop-in whose only IPAddressAllow= lines are localhost
// and the list (no entry can smuggle in a line of its own).
#include <string>
#include <string_view>

#include "appliance/config.h"
#include "tests/fuzz/fuzz_check.h"

using namespace medgate;

namespace {
const std::filesystem::path kSource = "/etc/medgate/medgated.toml";
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size > fuzz::kMaxInput) return 0;
  std::string_view text(reinterpret_cast<const char*>(data), size);
  Result<appliance::Config> config = appliance::parse_config(text, kSource);
  if (!config.ok()) {
    FUZZ_CHECK(config.status().code() == StatusCode::kInvalidArgument &&
                   config.status().message().starts_with(kSource.string()),
               "%s", config.status().to_string().c_str());
    return 0;
  }
  std::string rendered = appliance::render_config(*config);
  Result<appliance::Config> back = appliance::parse_config(rendered, kSource);
  FUZZ_CHECK(back.ok(), "the rendered config does not parse: %s\n--- rendered:\n%s",
             back.status().to_string().c_str(), rendered.c_str());
  FUZZ_CHECK(back->ledger_id == config->ledger_id, "ledger id changed\n--- rendered:\n%s",
             rendered.c_str());
  FUZZ_CHECK(back->key_store.uri == config->key_store.uri,
             "key-store uri changed\n--- rendered:\n%s", rendered.c_str());
  FUZZ_CHECK(back->admin.socket == config->admin.socket, "admin socket changed\n--- rendered:\n%s",
             rendered.c_str());
  Result<std::string> dropin = appliance::render_ip_allow_dropin(*config);
  FUZZ_CHECK(dropin.ok() == !config->ip_allow.empty(), "ip-allow drop-in: %s",
             dropin.status().to_string().c_str());
  if (dropin.ok()) {
    std::string list;
    for (const auto& a : config->ip_allow) {
      FUZZ_CHECK(a.find_first_of(" \t\r\n,") == std::string::npos, "entry '%s'", a.c_str());
      list += (list.empty() ? "" : " ") + a;
    }
    FUZZ_CHECK(dropin->find("\nIPAddressAllow=localhost\nIPAddressAllow=" + list + "\n") !=
                       std::string::npos &&
                   dropin->ends_with("IPAddressAllow=" + list + "\n"),
               "drop-in:\n%s", dropin->c_str());
  }
  return 0;
}
