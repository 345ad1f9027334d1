// LEDGER-CRITICAL: the subject map, a commitment to every subject's latest entry.
//
// At a tree size N the map holds one pair (subject, latest) per subject named by the subject links
// of entries [0, N), where latest is the index of the newest such entry. Its leaves, sorted by
// subject (bytewise), are hashed as
//
//   leaf = SHA-256(0x00 || { 0: 5 (subject-map leaf), 1: 1 (version), 2: subject, 3: latest })
//
// (canonical CBOR; the object kind keeps a map leaf from ever equalling an entry's leaf) and
// combined into an RFC 9162 Merkle tree (ledger/merkle.h); an empty map has root SHA-256("").
// Version-2 signed heads carry the root and the leaf count (ledger/block.h).
//
// Why this proves a patient's history complete (docs/audit-bundle.md, "Completeness"): a head
// signed by the appliance key names, through the map, the latest entry L about patient P below its
// tree size. Every version-2 entry's link for P names P's previous entry (ledger/entry.h), so
// following links from L visits every entry about P, newest first, and the walk cannot skip one
// without a link or the map being wrong, which the full verifier would find. Absence is provable
// too: two adjacent leaves whose subjects enclose P (or one at an edge of the sorted order).
//
// SubjectMap is the in-memory form the ledger's signer and the verifier keep. Not thread-safe.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <vector>

#include "hsm/bytes.h"
#include "hsm/status.h"

namespace medgate::ledger {

inline constexpr std::uint64_t kSubjectMapLeafVersion = 1;

Bytes encode_subject_map_leaf(ByteView subject, std::uint64_t latest);
Hash subject_map_leaf_hash(ByteView subject, std::uint64_t latest);

// One leaf of the map with its RFC 9162 inclusion proof.
struct SubjectMapLeafProof {
  Bytes subject;
  std::uint64_t latest = 0;
  std::uint64_t position = 0;  // in the sorted order
  std::vector<Hash> path;
  friend bool operator==(const SubjectMapLeafProof&, const SubjectMapLeafProof&) = default;
};

// What the map says about one subject: its leaf (`match`), or, when the subject is not in the map,
// the leaves just below and above where it would be (either absent at an edge; both absent only
// for an empty map).
struct SubjectMapProof {
  std::uint64_t count = 0;  // leaves in the map
  std::optional<SubjectMapLeafProof> match, below, above;
  friend bool operator==(const SubjectMapProof&, const SubjectMapProof&) = default;
};

// Checks `proof` for `subject` against a head's map root and count. Returns the subject's latest
// entry index, or nullopt when the proof shows that the map holds no entry about the subject.
// kVerificationFailed names what does not hold.
Result<std::optional<std::uint64_t>> verify_subject_map_proof(ByteView subject, const Hash& root,
                                                              std::uint64_t count,
                                                              const SubjectMapProof& proof);

class SubjectMap {
 public:
  // Records that entry `index` names `subject`. Indexes must not decrease for a subject.
  void update(ByteView subject, std::uint64_t index);
  std::optional<std::uint64_t> latest(ByteView subject) const;
  std::uint64_t size() const { return leaves_.size(); }
  // O(size) the first time after an update (one hash per leaf was already paid by update(); the
  // tree's interior nodes are rehashed), then cached.
  Hash root() const;
  SubjectMapProof prove(ByteView subject) const;

 private:
  struct Leaf {
    std::uint64_t latest = 0;
    Hash hash{};
  };
  std::map<Bytes, Leaf> leaves_;
  mutable std::optional<Hash> root_;
};

}  // namespace medgate::ledger
