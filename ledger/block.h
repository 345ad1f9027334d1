// LEDGER-CRITICAL: block headers (version 1) and signed heads (versions 1 and 2), and their
// canonical encodings.
//
// A block is the batch of entries one group commit writes. Its header chains to the previous
// block and commits to the Merkle root over every entry so far:
//
//   { 0: 2 (block header), 1: version, 2: ledger id, 3: height, 4: previous block hash (32 zero
//     bytes for height 0), 5: first entry index, 6: entry count, 7: tree size, 8: Merkle root,
//     9: time (us since epoch), 10: signing key id }
//
//   block hash = SHA-256(header bytes)
//
// The signing key id names the key whose signed heads are to cover the block. Heads are signed on
// their own cadence (never per entry, since a TPM signature takes ~200 ms) and cover the latest
// block at that moment:
//
//   { 0: 3 (signed head), 1: version, 2: ledger id, 3: block height, 4: block hash, 5: tree size,
//     6: Merkle root, 7: time (us), 8: key id, 9: rollback counter,
//     version 2 only: 10: subject-map root, 11: subject-map size }
//
// Version 2 (written since the audit-export issue; version 1 heads stay readable and verifiable)
// adds a commitment to every subject's latest entry: the root and leaf count of the subject map
// (ledger/subject_map.h), an RFC 9162 Merkle tree over the (subject, latest entry index) pairs of
// all entries below the head's tree size, sorted by subject. The signer computes it on the head
// cadence, never per entry. A verifier recomputes it from the entries; an audit bundle proves one
// patient's latest entry with it (docs/audit-bundle.md, "Completeness").
//
// The rollback counter is the value of the key store's monotonic counter (a TPM NV counter) that
// this head belongs to; see "Rollback protection" in ledger/store.h. It never decreases from one
// head to the next.
//
//   signature = ECDSA P-256 over SHA-256(head bytes), DER. Checkable with stock OpenSSL:
//   openssl dgst -sha256 -verify key.pem -signature head.sig head.cbor
#pragma once

#include <cstdint>
#include <string>

#include "hsm/bytes.h"
#include "hsm/public_key.h"
#include "hsm/status.h"

namespace medgate::ledger {

inline constexpr std::uint64_t kBlockFormatVersion = 1;
inline constexpr std::uint64_t kHeadFormatVersion = 2;        // what new heads are written in
inline constexpr std::uint64_t kOldestHeadFormatVersion = 1;  // still read and verified

struct BlockHeader {
  std::uint64_t version = kBlockFormatVersion;
  std::string ledger_id;
  std::uint64_t height = 0;
  Hash previous_hash{};
  std::uint64_t first_index = 0;
  std::uint64_t entry_count = 0;
  std::uint64_t tree_size = 0;
  Hash root{};
  std::uint64_t time_us = 0;
  KeyId key_id{};
  friend bool operator==(const BlockHeader&, const BlockHeader&) = default;
};

Bytes encode_block_header(const BlockHeader& header);
// Strict: canonical bytes, right kind and version, every field present, tree_size ==
// first_index + entry_count. kCorruption names the problem.
Result<BlockHeader> decode_block_header(ByteView bytes);
inline Hash block_hash(ByteView header_bytes) {
  return sha256(header_bytes);
}

struct HeadBody {
  std::uint64_t version = kHeadFormatVersion;
  std::string ledger_id;
  std::uint64_t height = 0;
  Hash block_hash{};
  std::uint64_t tree_size = 0;
  Hash root{};
  std::uint64_t time_us = 0;
  KeyId key_id{};
  std::uint64_t rollback_counter = 0;
  // Version 2 only (zero in a version-1 head): the subject map's root and leaf count.
  Hash subject_root{};
  std::uint64_t subject_count = 0;
  friend bool operator==(const HeadBody&, const HeadBody&) = default;
};

// Encodes in head.version (1 or 2; a version-1 head has no subject map).
Bytes encode_head(const HeadBody& head);
// Strict, for versions 1 and 2.
Result<HeadBody> decode_head(ByteView bytes);
inline Hash head_digest(ByteView head_bytes) {
  return sha256(head_bytes);
}

// What both keys of a rotation sign; the ledger records it as a key-transition entry (entry.h)
// holding both signatures:
//
//   { 0: 4 (key transition), 1: version, 2: ledger id, 3: old key id, 4: new key id }
//
//   signature = ECDSA P-256 over SHA-256(these bytes), DER, once by each key.
inline constexpr std::uint64_t kKeyTransitionFormatVersion = 1;
Bytes encode_key_transition_statement(const std::string& ledger_id, const KeyId& old_key,
                                      const KeyId& new_key);

struct SignedHead {
  std::uint64_t sequence = 0;  // the store's row number, not signed
  Bytes bytes;                 // canonical head bytes (what is signed)
  HeadBody head;               // decoded from `bytes`
  Bytes signature;             // DER ECDSA over SHA-256(bytes)
};

}  // namespace medgate::ledger
