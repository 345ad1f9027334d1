// Fuzz target: decode_block_header and decode_head (ledger/block.h), which read block headers
// and signed heads from a ledger file or a verifier's input. Each input goes to both decoders.
// Properties: never crashes; a refusal is kCorruption; anything accepted encodes back to exactly
// the input bytes (the block hash and the signed digest cover those bytes).
#include <algorithm>

#include "ledger/block.h"
#include "tests/fuzz/fuzz_check.h"

using namespace medgate;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size > fuzz::kMaxInput) return 0;
  ByteView input = fuzz::bytes_of(data, size);

  Result<ledger::BlockHeader> header = ledger::decode_block_header(input);
  if (header.ok()) {
    Bytes again = ledger::encode_block_header(*header);
    FUZZ_CHECK(std::equal(input.begin(), input.end(), again.begin(), again.end()),
               "accepted block header re-encodes to different bytes: %s", to_hex(again).c_str());
    FUZZ_CHECK(
        header->first_index + header->entry_count == header->tree_size && header->entry_count > 0,
        "accepted block header breaks its own rule: %llu + %llu != %llu",
        static_cast<unsigned long long>(header->first_index),
        static_cast<unsigned long long>(header->entry_count),
        static_cast<unsigned long long>(header->tree_size));
  } else {
    FUZZ_CHECK(header.status().code() == StatusCode::kCorruption, "%s",
               header.status().to_string().c_str());
  }

  Result<ledger::HeadBody> head = ledger::decode_head(input);
  if (head.ok()) {
    Bytes again = ledger::encode_head(*head);
    FUZZ_CHECK(std::equal(input.begin(), input.end(), again.begin(), again.end()),
               "accepted signed head re-encodes to different bytes: %s", to_hex(again).c_str());
  } else {
    FUZZ_CHECK(head.status().code() == StatusCode::kCorruption, "%s",
               head.status().to_string().c_str());
  }
  FUZZ_CHECK(!(header.ok() && head.ok()), "one input is both a block header and a signed head");
  return 0;
}
