// Fuzz target: parse_config (appliance/config.h), medgated.toml as an admin or a tool wrote it.
// Properties: never crashes (toml++ parse errors are caught inside); a refusal is
// kInvalidArgument naming the file; an accepted config, rendered by render_config (what
// `medctl init` writes), parses again to the same ledger id, key-store URI and admin socket.
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
  return 0;
}
