// Fuzz target: cbor::decode (ledger/cbor.h), the strict canonical decoder under every hash.
// Properties: never crashes; a refusal is kCorruption; anything accepted re-encodes to exactly
// the input bytes (one value, one encoding, one hash) and renders as JSON (medctl show).
#include <algorithm>

#include <nlohmann/json.hpp>

#include "ledger/cbor.h"
#include "tests/fuzz/fuzz_check.h"

using namespace medgate;
namespace cbor = medgate::ledger::cbor;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size > fuzz::kMaxInput) return 0;
  ByteView input = fuzz::bytes_of(data, size);
  Result<cbor::Value> value = cbor::decode(input);
  if (!value.ok()) {
    FUZZ_CHECK(value.status().code() == StatusCode::kCorruption, "%s",
               value.status().to_string().c_str());
    return 0;
  }
  Bytes again = cbor::encode(*value);
  FUZZ_CHECK(std::equal(input.begin(), input.end(), again.begin(), again.end()),
             "accepted %zu bytes re-encode to %zu different bytes: %s", size, again.size(),
             to_hex(again).c_str());
  (void)cbor::to_json(*value).dump();
  return 0;
}
