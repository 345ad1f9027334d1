// Fuzz target: decode_block_header and decode_head (ledger/block.h), which read block headers
// and signed heads from a ledger file or a verifier's input, and decode_block_record and
// decode_membership_statement (ledger/block_record.h, ledger/membership.h), which read what
// members of a replicated ledger put into etcd and sign. Each input goes to every decoder.
// Properties: never crashes; a refusal is kCorruption; anything accepted encodes back to exactly
// the input bytes (the block hash and the signed digest cover those bytes).
#include <algorithm>

#include "ledger/block.h"
#include "ledger/block_record.h"
#include "ledger/membership.h"
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

  Result<ledger::BlockRecord> record = ledger::decode_block_record(input);
  if (record.ok()) {
    Bytes again = ledger::encode_block_record(*record);
    FUZZ_CHECK(std::equal(input.begin(), input.end(), again.begin(), again.end()),
               "accepted block record re-encodes to different bytes: %s", to_hex(again).c_str());
    FUZZ_CHECK(record->entries.size() == record->header.entry_count && !record->entries.empty(),
               "accepted block record holds %zu entries for a header counting %llu",
               record->entries.size(), static_cast<unsigned long long>(record->header.entry_count));
  } else {
    FUZZ_CHECK(record.status().code() == StatusCode::kCorruption, "%s",
               record.status().to_string().c_str());
  }

  Result<ledger::MembershipStatement> statement = ledger::decode_membership_statement(input);
  if (statement.ok()) {
    Result<Bytes> again = ledger::encode_membership_statement(*statement);
    FUZZ_CHECK(again.ok(), "accepted membership statement does not encode: %s",
               again.status().to_string().c_str());
    FUZZ_CHECK(std::equal(input.begin(), input.end(), again->begin(), again->end()),
               "accepted membership statement re-encodes to different bytes: %s",
               to_hex(*again).c_str());
  } else {
    FUZZ_CHECK(statement.status().code() == StatusCode::kCorruption, "%s",
               statement.status().to_string().c_str());
  }
  return 0;
}
