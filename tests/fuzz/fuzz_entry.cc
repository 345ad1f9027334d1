// Fuzz target: decode_entry (ledger/entry.h), which reads every entry back from a ledger file.
// Properties: never crashes; a refusal is kCorruption; an accepted entry encodes with
// encode_entry to exactly the input bytes (the bytes that were hashed are the bytes stored).
#include <algorithm>

#include "ledger/entry.h"
#include "tests/fuzz/fuzz_check.h"

using namespace medgate;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size > fuzz::kMaxInput) return 0;
  ByteView input = fuzz::bytes_of(data, size);
  Result<ledger::Entry> entry = ledger::decode_entry(input);
  if (!entry.ok()) {
    FUZZ_CHECK(entry.status().code() == StatusCode::kCorruption, "%s",
               entry.status().to_string().c_str());
    return 0;
  }
  Result<Bytes> again = ledger::encode_entry(*entry);
  FUZZ_CHECK(again.ok(), "an accepted entry does not encode: %s",
             again.status().to_string().c_str());
  FUZZ_CHECK(std::equal(input.begin(), input.end(), again->begin(), again->end()),
             "accepted entry re-encodes to different bytes: %s", to_hex(*again).c_str());
  (void)ledger::format_time(entry->time_us);
  return 0;
}
