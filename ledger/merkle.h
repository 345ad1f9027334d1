// LEDGER-CRITICAL: the Merkle log's hashing, proofs and proof checks (RFC 9162 section 2.1).
// Changing any result here changes every root ever signed. Refactors must not change behaviour.
//
//   leaf hash     = SHA-256(0x00 || entry bytes)
//   interior node = SHA-256(0x01 || left || right)
//   root of an empty tree = SHA-256("")
//
// Proof generation reads only perfect subtrees ("nodes"): node (level L, index i) is the root of
// leaves [i * 2^L, (i + 1) * 2^L). Callers supply them through a NodeSource, so a proof or a root
// costs O(log n) node reads whatever the storage (see ledger/tiles.h for the stored form).
// All functions are pure and thread-safe.
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <vector>

#include "hsm/bytes.h"
#include "hsm/status.h"

namespace medgate::ledger::merkle {

Hash leaf_hash(ByteView entry_bytes);
Hash node_hash(const Hash& left, const Hash& right);
Hash empty_root();

// Returns the hash of the perfect subtree at (level, index). Called only for nodes that lie
// completely inside the tree size being proved.
using NodeSource = std::function<Result<Hash>(int level, std::uint64_t index)>;

// Root of the first `size` leaves (RFC 9162 MTH).
Result<Hash> root(std::uint64_t size, const NodeSource& nodes);

// Audit path for leaf `index` in the tree of `size` leaves (RFC 9162 2.1.3.1), leaf upward.
// kInvalidArgument when index >= size.
Result<std::vector<Hash>> inclusion_proof(std::uint64_t index, std::uint64_t size,
                                          const NodeSource& nodes);

// Consistency proof between sizes m and n (RFC 9162 2.1.4.1). kInvalidArgument unless
// 0 < m <= n; empty when m == n.
Result<std::vector<Hash>> consistency_proof(std::uint64_t m, std::uint64_t n,
                                            const NodeSource& nodes);

// RFC 9162 2.1.3.2. OK, or kVerificationFailed naming why (index out of range, wrong proof
// length, root mismatch).
Status verify_inclusion(std::uint64_t index, std::uint64_t size, const Hash& leaf,
                        std::span<const Hash> proof, const Hash& root);

// RFC 9162 2.1.4.2, with transparency-dev's edge rules: m == 0 is rejected, m == n needs an empty
// proof and equal roots, m < n needs a non-empty proof.
Status verify_consistency(std::uint64_t m, std::uint64_t n, const Hash& root_m, const Hash& root_n,
                          std::span<const Hash> proof);

// ---- multi-leaf inclusion proofs ----
//
// One proof that several leaves are in one tree, instead of one audit path per leaf: the hashes of
// the maximal subtrees of RFC 9162's tree that hold none of the given leaves and whose parent holds
// at least one. From the given leaves and these hashes the verifier recomputes every node on the
// leaves' paths, and so the root. Each such subtree hash appears once, however many leaves share
// it, where single-leaf proofs repeat the upper part of every path.
//
// Canonical order: the subtrees in the order of the leaves they cover, left to right (RFC 9162's
// MTH recursion visited depth first, left child before right). The proof for one leaf holds the
// hashes of its audit path, ordered by position instead of by level; the proof for every leaf is
// empty.

// A leaf hash at its index, as the verifier of a multi-leaf proof takes it.
struct IndexedLeaf {
  std::uint64_t index = 0;
  Hash hash{};
};

// The multi-leaf proof for `indexes` (strictly ascending, each below `size`; kInvalidArgument
// otherwise, and for an empty set). Reads each proof node once, in canonical order, through
// `nodes` (a subtree at the right edge that is not perfect costs one read per piece).
Result<std::vector<Hash>> multi_inclusion_proof(std::span<const std::uint64_t> indexes,
                                                std::uint64_t size, const NodeSource& nodes);

// The root that `leaves` (strictly ascending indexes, each below `size`) and `proof` (canonical
// order) give for a tree of `size` leaves, using every proof hash exactly once. kVerificationFailed
// naming why: no leaves, an index out of range or out of order, a proof too short or too long.
// A root computed this way proves nothing until compared with a trusted root of the same size.
Result<Hash> root_from_multi_proof(std::span<const IndexedLeaf> leaves, std::uint64_t size,
                                   std::span<const Hash> proof);

// root_from_multi_proof compared with `root`: OK, or kVerificationFailed naming why.
Status verify_multi_inclusion(std::span<const IndexedLeaf> leaves, std::uint64_t size,
                              std::span<const Hash> proof, const Hash& root);

// The right edge of a growing tree: the roots of its perfect subtrees, largest first. Appending a
// leaf and computing the root are O(log n) in time and memory: this is what the writer and the
// verifier keep while they stream through millions of entries.
class CompactRange {
 public:
  CompactRange() = default;
  // Rebuilds the range for `size` leaves from stored nodes (the perfect subtrees of size's binary
  // decomposition).
  static Result<CompactRange> for_size(std::uint64_t size, const NodeSource& nodes);

  // Appends a leaf hash. `completed`, if given, is called with every perfect node that the append
  // completes (level >= 1), lowest first, so callers can store them.
  void append(
      const Hash& leaf,
      const std::function<void(int level, std::uint64_t index, const Hash&)>& completed = {});
  std::uint64_t size() const { return size_; }
  Hash root() const;

 private:
  std::uint64_t size_ = 0;
  std::vector<Hash> peaks_;  // perfect subtree roots, largest (leftmost) first
};

}  // namespace medgate::ledger::merkle
