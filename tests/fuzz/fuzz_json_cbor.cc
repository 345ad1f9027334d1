// Fuzz target: the admin API's request path into the ledger: a request line parsed as
// nlohmann::json::parse(line, nullptr, false) (appliance/admin_server.cc), then json_to_cbor
// (appliance/json_cbor.h) as daemon.cc does with a call's "args" before recording it.
// Properties: never crashes; a refusal is kInvalidArgument; what is accepted can be recorded
// and read back: the CBOR decodes to the same value, and an admin-action entry with it as
// "args" (when it is a map) survives encode_entry/decode_entry.
#include <nlohmann/json.hpp>

#include "appliance/json_cbor.h"
#include "ledger/entry.h"
#include "tests/fuzz/fuzz_check.h"

using namespace medgate;
namespace cbor = medgate::ledger::cbor;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size > fuzz::kMaxInput) return 0;
  nlohmann::json json =
      nlohmann::json::parse(data, data + size, nullptr, /*allow_exceptions=*/false);
  if (json.is_discarded()) return 0;
  Result<cbor::Value> value = appliance::json_to_cbor(json);
  if (!value.ok()) {
    FUZZ_CHECK(value.status().code() == StatusCode::kInvalidArgument, "%s",
               value.status().to_string().c_str());
    return 0;
  }
  Bytes encoded = cbor::encode(*value);
  Result<cbor::Value> decoded = cbor::decode(encoded);
  FUZZ_CHECK(decoded.ok(), "converted JSON does not decode as CBOR: %s",
             decoded.status().to_string().c_str());
  FUZZ_CHECK(*decoded == *value, "converted JSON decodes to another value");

  if (value->as_map()) {
    Result<cbor::Value> body =
        cbor::Value::map({{cbor::Value::text("op"), cbor::Value::text("fuzz")},
                          {cbor::Value::text("args"), *value}});
    FUZZ_CHECK(body.ok(), "%s", body.status().to_string().c_str());
    ledger::Entry entry;
    entry.type = ledger::EntryType::kAdminAction;
    entry.actor = "uid:0";
    entry.body = *body;
    Result<Bytes> bytes = ledger::encode_entry(entry);
    FUZZ_CHECK(bytes.ok(), "an admin-action entry with these args does not encode: %s",
               bytes.status().to_string().c_str());
    Result<ledger::Entry> back = ledger::decode_entry(*bytes);
    FUZZ_CHECK(back.ok(), "an admin-action entry with these args does not decode: %s",
               back.status().to_string().c_str());
    FUZZ_CHECK(*back == entry, "an admin-action entry with these args reads back different");
  }
  return 0;
}
