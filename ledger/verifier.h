// LEDGER-CRITICAL: the full verifier. From the raw rows of a ledger file and nothing but trusted
// public keys, it recomputes every leaf hash, every block's Merkle root, every chain link and
// every head signature, and names the first thing that does not hold.
//
// What counts as tampering and what does not:
//   - A crash never leaves half a block: SQLite commits a block's entries, tiles and header in one
//     transaction. The "torn tail" of a crash is the blocks committed after the latest signed head;
//     they verify in every other respect and are reported as not yet signed, not as tampering.
//   - Anything else that does not hold is tampering or damage: an entry whose bytes changed, a
//     missing or extra entry, a block out of order or not chained, a head whose signature fails or
//     whose key is not trusted, a head naming a block that is gone (a truncated tail).
//
// Reads happen in short transactions of a few thousand rows each, so a verification of a live
// ledger does not pin the WAL (the writer keeps checkpointing while it runs).
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "hsm/bytes.h"
#include "hsm/public_key.h"
#include "hsm/status.h"

namespace medgate::ledger {

struct VerifyOptions {
  // The keys the caller trusts. At least one key of the ledger's chain (the genesis key and the
  // new key of each key transition, each transition signed by its old and new key) must be among
  // them; then the chain is trusted, each key only for the range it was active.
  std::vector<PublicKey> trusted_keys;
  // Called now and then with (entries checked, entries in total); for progress bars.
  std::function<void(std::uint64_t done, std::uint64_t total)> progress;
};

struct VerifyProblem {
  enum class Where { kFile, kEntry, kBlock, kHead, kTile };
  Where where = Where::kFile;
  std::uint64_t number = 0;  // entry index, block height, head sequence or tile index
  std::string reason;
  std::string describe() const;  // "entry 57: its bytes do not match ..."
};

struct VerifyReport {
  bool ok() const { return !problem.has_value(); }
  std::optional<VerifyProblem> problem;  // the first one found; checking stops there

  std::string ledger_id;
  std::uint64_t entries = 0;
  std::uint64_t blocks = 0;
  std::uint64_t heads = 0;
  Hash root{};
  std::optional<std::uint64_t> latest_signed_size;  // tree size of the latest valid head
  std::uint64_t latest_signed_time_us = 0;
  std::uint64_t unsigned_entries = 0;  // committed after the latest signed head (not tampering)
  std::vector<std::string> key_ids;    // hex ids of keys that signed heads
  std::uint64_t rollback_counter = 0;  // carried by the latest valid head
  std::uint64_t member_blocks = 0;     // replicated: blocks whose proposer signature was checked
};

// Verifies the ledger file at `path`, opened read-only. The returned Status fails only when the
// file cannot be read as a ledger at all (missing, not SQLite, unknown schema); tampering is
// reported in the VerifyReport.
Result<VerifyReport> verify_ledger_file(const std::filesystem::path& path,
                                        const VerifyOptions& options);

// The report as JSON, for medctl --json and the admin API.
nlohmann::json to_json(const VerifyReport& report);

}  // namespace medgate::ledger
