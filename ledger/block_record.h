// LEDGER-CRITICAL: block records, what a member of a replicated ledger proposes to etcd for a
// height, and their validation (docs/replication.md, "Blocks through etcd").
//
//   { 0: 8 (block record), 1: version (1), 2: block header bytes (ledger/block.h),
//     3: [entry bytes, ...], 4: proposer member id, 5: signature, 6: [first, count] }
//
//   signature = the proposer's ECDSA P-256 over SHA-256(header bytes), DER
//
// The header commits to everything else: its Merkle root covers the entries, its previous hash
// the chain, its key id the proposer's key. Field 6 is the proposer's own outbox range (its local
// queue's sequence numbers) that the block holds: it lets the proposer, after a crash, tell which
// of its queued entries a block of its own already carried. It is not signed and means nothing
// to other members.
//
// validate_block_record() is what every replica runs before it applies a block, against its own
// state after the previous block. It is deterministic, so every honest replica accepts or voids
// the same record.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "hsm/bytes.h"
#include "hsm/status.h"
#include "ledger/block.h"
#include "ledger/membership.h"
#include "ledger/merkle.h"

namespace medgate::ledger {

inline constexpr std::uint64_t kBlockRecordVersion = 1;

struct BlockRecord {
  Bytes header_bytes;
  BlockHeader header;  // decoded from header_bytes
  std::vector<Bytes> entries;
  std::string proposer;
  Bytes signature;
  std::uint64_t outbox_first = 0;
  std::uint64_t outbox_count = 0;
};

Bytes encode_block_record(const BlockRecord& record);
// Strict: canonical bytes, kind 8, version 1, every field of the right type, the header decoded
// (ledger/block.h), at least one entry, as many entries as the header counts. kCorruption names
// the problem.
Result<BlockRecord> decode_block_record(ByteView bytes);

// A replica's chain state after its latest block: what the next block must extend.
struct ChainTip {
  std::string ledger_id;
  std::uint64_t height = 0;
  Hash block_hash{};
  std::uint64_t time_us = 0;
  merkle::CompactRange tree;  // the tree over every entry so far
  // The ledger's active signing key: the genesis key or the key it last rotated to. Before the
  // membership is founded it is the only writer (its holder founds the membership).
  std::optional<PublicKey> active_key;
  // The key that vouches for the blocks written before the membership was founded: the founder
  // publishes them signed with its member key, and a replica that joins trusts that key (it is
  // what `--trust` names). Absent: such blocks are refused.
  std::optional<PublicKey> founder_key;
};

// The index of the newest entry before the block that names `subject`, if any (the replica's
// subject map).
using LatestOfSubject = std::function<std::optional<std::uint64_t>(ByteView subject)>;

struct ValidatedBlock {
  ChainTip tip;                           // the state after the block
  Membership membership;                  // the membership after the block
  std::vector<MembershipChange> changes;  // membership changes that took effect in it
  std::vector<std::pair<Bytes, std::uint64_t>> subject_updates;  // (subject, its newest index)
  std::vector<Entry> entries;  // the record's entries, decoded (so applying does not decode again)
  std::vector<Hash> leaves;    // and their leaf hashes
};

// Checks `record` as block 0 of a ledger founded by `founder`: the header starts the chain, its
// one entry is a genesis entry naming the header's ledger id and key, the root is that entry's
// leaf, and `founder` signed it. Returns the tip after it (active_key: the genesis key;
// founder_key: `founder`).
Result<ChainTip> validate_genesis_record(const BlockRecord& record, const PublicKey& founder);

// Checks `record` as block tip.height + 1 (docs/replication.md, "Validating and applying"): the
// chain link, indexes and counts, time, the proposer being a member whose current key the header
// names, the signature, every entry decoding strictly and not being a genesis entry, subject links
// of version-2 entries, key transitions (signed by a member's key and the new key; the member
// moves to the new key), membership entries (membership.h), and the Merkle root. Before the
// membership is founded, a block must name the ledger's active key and be signed by
// tip.founder_key (the founder publishing the ledger's history), and a key transition must rotate
// the active key. Returns the state
// after the block, or kVerificationFailed naming the first problem, e.g. "block 812 is signed by
// a key that is not a member's at height 811".
Result<ValidatedBlock> validate_block_record(const BlockRecord& record, const ChainTip& tip,
                                             const Membership& membership,
                                             const LatestOfSubject& latest_of);

}  // namespace medgate::ledger
