// LEDGER-CRITICAL: RFC 9162 section 2.1 hashing, proof generation and proof checks (see
// merkle.h). Every root ever signed depends on these bytes; refactors must not change behaviour.
#include "ledger/merkle.h"

#include <openssl/evp.h>

#include <algorithm>
#include <bit>
#include <cstdio>
#include <cstdlib>

#include <fmt/format.h>

namespace medgate::ledger::merkle {
namespace {

constexpr std::byte kLeafPrefix{0x00};
constexpr std::byte kNodePrefix{0x01};

// One SHA-256 context per thread, reused. Hashing is the hot path (every append, every proof
// check); a fresh EVP context per hash would cost a heap allocation and an algorithm fetch, and a
// copy into a buffer would cost another allocation for large entries.
class Sha256 {
 public:
  Sha256() = default;
  Sha256(const Sha256&) = delete;
  Sha256& operator=(const Sha256&) = delete;
  ~Sha256() {
    EVP_MD_CTX_free(ctx_);
    EVP_MD_free(md_);
  }

  Hash digest(std::byte prefix, ByteView a, ByteView b) {
    Hash out;
    unsigned int len = 0;
    bool ok = md_ != nullptr && ctx_ != nullptr && EVP_DigestInit_ex2(ctx_, md_, nullptr) == 1 &&
              EVP_DigestUpdate(ctx_, &prefix, 1) == 1 &&
              EVP_DigestUpdate(ctx_, a.data(), a.size()) == 1 &&
              EVP_DigestUpdate(ctx_, b.data(), b.size()) == 1 &&
              EVP_DigestFinal_ex(ctx_, reinterpret_cast<unsigned char*>(out.data()), &len) == 1 &&
              len == out.size();
    // A hash has no error path to report through, and a wrong digest would silently poison every
    // later root; so a failing SHA-256 (no memory, no provider) stops the process.
    if (!ok) {
      std::fputs("medgate: OpenSSL SHA-256 failed; cannot hash the ledger safely\n", stderr);
      std::abort();
    }
    return out;
  }

 private:
  EVP_MD* md_ = EVP_MD_fetch(nullptr, "SHA256", nullptr);
  EVP_MD_CTX* ctx_ = EVP_MD_CTX_new();
};

Sha256& thread_hasher() {
  thread_local Sha256 hasher;
  return hasher;
}

// RFC 9162's split point k: the largest power of two strictly below n (n >= 2).
std::uint64_t split_point(std::uint64_t n) {
  return std::bit_floor(n - 1);
}

// MTH(D[begin:end]) for 0 <= begin < end, folding the perfect subtrees of the length's binary
// decomposition from the right: O(log n) node reads. Requires `begin` to be a multiple of every
// piece, which holds for every range the RFC recursions visit (they start at 0 or at a split
// point that is a multiple of a power of two no smaller than the rest of the range).
Result<Hash> range_hash(std::uint64_t begin, std::uint64_t end, const NodeSource& nodes) {
  std::uint64_t rest = end - begin;
  std::uint64_t pos = end;
  Hash acc{};
  bool first = true;
  while (rest != 0) {
    const std::uint64_t width = rest & (~rest + 1);  // lowest set bit: the rightmost piece
    const int level = std::countr_zero(width);
    pos -= width;
    rest -= width;
    if (pos % width != 0) {
      return Status::Internal(
          fmt::format("range [{}, {}) is not aligned to its subtrees", begin, end));
    }
    MEDGATE_ASSIGN_OR_RETURN(Hash piece, nodes(level, pos >> level));
    acc = first ? piece : node_hash(piece, acc);
    first = false;
  }
  return acc;
}

// Bottom-up audit path length for leaf `index` of `size` (transparency-dev's inner + border),
// used only to make verification messages specific.
std::size_t inclusion_path_length(std::uint64_t index, std::uint64_t size) {
  const int inner = static_cast<int>(std::bit_width(index ^ (size - 1)));
  return static_cast<std::size_t>(inner + std::popcount(inner >= 64 ? 0 : index >> inner));
}

}  // namespace

Hash leaf_hash(ByteView entry_bytes) {
  return thread_hasher().digest(kLeafPrefix, entry_bytes, {});
}

Hash node_hash(const Hash& left, const Hash& right) {
  return thread_hasher().digest(kNodePrefix, left, right);
}

Hash empty_root() {
  return sha256({});
}

Result<Hash> root(std::uint64_t size, const NodeSource& nodes) {
  if (size == 0) return empty_root();
  return range_hash(0, size, nodes);
}

// RFC 9162 2.1.3.1 PATH, unrolled: walking down from [0, size), each step keeps the half that
// holds the leaf and records the other half's MTH. Only the first right-hand sibling can be a
// non-perfect range; below it every range is a perfect subtree, so reads stay O(log n).
Result<std::vector<Hash>> inclusion_proof(std::uint64_t index, std::uint64_t size,
                                          const NodeSource& nodes) {
  if (index >= size) {
    return Status::InvalidArgument(
        fmt::format("inclusion proof: leaf index {} is not below tree size {}", index, size));
  }
  std::vector<Hash> path;  // top-down while walking; reversed at the end
  std::uint64_t lo = 0, hi = size;
  while (hi - lo > 1) {
    const std::uint64_t k = split_point(hi - lo);
    if (index < lo + k) {
      MEDGATE_ASSIGN_OR_RETURN(Hash sibling, range_hash(lo + k, hi, nodes));
      path.push_back(sibling);
      hi = lo + k;
    } else {
      MEDGATE_ASSIGN_OR_RETURN(Hash sibling, range_hash(lo, lo + k, nodes));
      path.push_back(sibling);
      lo += k;
    }
  }
  std::reverse(path.begin(), path.end());
  return path;
}

// RFC 9162 2.1.4.1 SUBPROOF(m, D[n], true), unrolled the same way. Invariant: lo < m <= hi.
Result<std::vector<Hash>> consistency_proof(std::uint64_t m, std::uint64_t n,
                                            const NodeSource& nodes) {
  if (m == 0 || m > n) {
    return Status::InvalidArgument(
        fmt::format("consistency proof: need 0 < m <= n, got m = {}, n = {}", m, n));
  }
  std::vector<Hash> proof;  // top-down while walking; reversed at the end
  std::uint64_t lo = 0, hi = n;
  bool whole_old_tree = true;  // SUBPROOF's b: is [lo, hi) still a prefix of the old tree's root?
  while (m != hi) {
    const std::uint64_t k = split_point(hi - lo);
    if (m - lo <= k) {
      MEDGATE_ASSIGN_OR_RETURN(Hash right, range_hash(lo + k, hi, nodes));
      proof.push_back(right);
      hi = lo + k;
    } else {
      MEDGATE_ASSIGN_OR_RETURN(Hash left, range_hash(lo, lo + k, nodes));
      proof.push_back(left);
      lo += k;
      whole_old_tree = false;
    }
  }
  if (!whole_old_tree) {
    MEDGATE_ASSIGN_OR_RETURN(Hash subtree, range_hash(lo, hi, nodes));
    proof.push_back(subtree);
  }
  std::reverse(proof.begin(), proof.end());
  return proof;
}

// RFC 9162 2.1.3.2, step by step.
Status verify_inclusion(std::uint64_t index, std::uint64_t size, const Hash& leaf,
                        std::span<const Hash> proof, const Hash& root) {
  if (index >= size) {
    return Status::VerificationFailed(
        fmt::format("inclusion: leaf index {} is not below tree size {}", index, size));
  }
  const auto wrong_length = [&] {
    return Status::VerificationFailed(
        fmt::format("inclusion: proof has {} hashes, leaf {} of a {}-leaf tree needs {}",
                    proof.size(), index, size, inclusion_path_length(index, size)));
  };
  std::uint64_t fn = index, sn = size - 1;
  Hash r = leaf;
  for (const Hash& p : proof) {
    if (sn == 0) return wrong_length();
    if ((fn & 1) != 0 || fn == sn) {
      r = node_hash(p, r);
      while ((fn & 1) == 0 && fn != 0) {
        fn >>= 1;
        sn >>= 1;
      }
    } else {
      r = node_hash(r, p);
    }
    fn >>= 1;
    sn >>= 1;
  }
  if (sn != 0) return wrong_length();
  if (r != root) {
    return Status::VerificationFailed(
        fmt::format("inclusion: leaf {} with this proof gives root {}, not the expected {}", index,
                    to_hex(r), to_hex(root)));
  }
  return Status::Ok();
}

// RFC 9162 2.1.4.2, step by step, after transparency-dev's edge rules (see merkle.h).
Status verify_consistency(std::uint64_t m, std::uint64_t n, const Hash& root_m, const Hash& root_n,
                          std::span<const Hash> proof) {
  if (m == 0) {
    return Status::VerificationFailed("consistency: a proof from the empty tree proves nothing");
  }
  if (m > n) {
    return Status::VerificationFailed(
        fmt::format("consistency: old size {} is larger than new size {}", m, n));
  }
  if (m == n) {
    if (!proof.empty()) {
      return Status::VerificationFailed(
          fmt::format("consistency: equal sizes need an empty proof, got {} hashes", proof.size()));
    }
    if (root_m != root_n) {
      return Status::VerificationFailed(
          fmt::format("consistency: roots differ for the same size {}", m));
    }
    return Status::Ok();
  }
  if (proof.empty()) {
    return Status::VerificationFailed(
        fmt::format("consistency: empty proof between sizes {} and {}", m, n));
  }
  const auto wrong_length = [&] {
    return Status::VerificationFailed(
        fmt::format("consistency: proof of {} hashes has the wrong length for sizes {} -> {}",
                    proof.size(), m, n));
  };
  // Step 2: when m is a power of two the old root is itself a node of the new tree and is
  // prepended. Done by index instead of copying the proof.
  const bool prepend = std::has_single_bit(m);
  const std::size_t count = proof.size() + (prepend ? 1 : 0);
  const auto element = [&](std::size_t i) -> const Hash& {
    if (prepend) return i == 0 ? root_m : proof[i - 1];
    return proof[i];
  };
  std::uint64_t fn = m - 1, sn = n - 1;
  while ((fn & 1) != 0) {
    fn >>= 1;
    sn >>= 1;
  }
  Hash fr = element(0), sr = element(0);
  for (std::size_t i = 1; i < count; ++i) {
    const Hash& c = element(i);
    if (sn == 0) return wrong_length();
    if ((fn & 1) != 0 || fn == sn) {
      fr = node_hash(c, fr);
      sr = node_hash(c, sr);
      while ((fn & 1) == 0 && fn != 0) {
        fn >>= 1;
        sn >>= 1;
      }
    } else {
      sr = node_hash(sr, c);
    }
    fn >>= 1;
    sn >>= 1;
  }
  if (sn != 0) return wrong_length();
  if (fr != root_m) {
    return Status::VerificationFailed(
        fmt::format("consistency: proof does not rebuild the old root of size {}", m));
  }
  if (sr != root_n) {
    return Status::VerificationFailed(
        fmt::format("consistency: proof does not rebuild the new root of size {}", n));
  }
  return Status::Ok();
}

namespace {

// The proof's walk: RFC 9162's MTH recursion over [lo, hi), descending only into subtrees that
// hold a given leaf. Leaves [a, b) of the (ascending) list are those inside [lo, hi). Depth is at
// most 64; every node visited is on a given leaf's path or is one proof hash.
template <typename Leaves>
std::size_t first_at_or_after(const Leaves& leaves, std::size_t a, std::size_t b,
                              std::uint64_t index) {
  // Leaves are strictly ascending: the first one at or after `index`, by binary search.
  std::size_t lo = a, hi = b;
  while (lo < hi) {
    const std::size_t mid = lo + (hi - lo) / 2;
    if (leaves(mid) < index)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo;
}

class MultiProofBuilder {
 public:
  MultiProofBuilder(std::span<const std::uint64_t> indexes, const NodeSource& nodes)
      : indexes_(indexes), nodes_(nodes) {}

  Status walk(std::uint64_t lo, std::uint64_t hi, std::size_t a, std::size_t b) {
    if (a == b) {
      MEDGATE_ASSIGN_OR_RETURN(Hash h, range_hash(lo, hi, nodes_));
      proof_.push_back(h);
      return Status::Ok();
    }
    if (hi - lo == 1) return Status::Ok();  // a given leaf
    const std::uint64_t mid = lo + split_point(hi - lo);
    const std::size_t m =
        first_at_or_after([this](std::size_t i) { return indexes_[i]; }, a, b, mid);
    MEDGATE_RETURN_IF_ERROR(walk(lo, mid, a, m));
    return walk(mid, hi, m, b);
  }

  std::vector<Hash> take() { return std::move(proof_); }

 private:
  std::span<const std::uint64_t> indexes_;
  const NodeSource& nodes_;
  std::vector<Hash> proof_;
};

// The verifier's walk: the same recursion, taking proof hashes in order and hashing up. Errors are
// kept in a flag rather than returned through every level (the walk is the hot path of verifying
// a large audit bundle).
class MultiProofRoot {
 public:
  MultiProofRoot(std::span<const IndexedLeaf> leaves, std::span<const Hash> proof)
      : leaves_(leaves), proof_(proof) {}

  Hash walk(std::uint64_t lo, std::uint64_t hi, std::size_t a, std::size_t b) {
    if (a == b) {
      if (next_ == proof_.size()) {
        short_ = true;
        return Hash{};
      }
      return proof_[next_++];
    }
    if (hi - lo == 1) return leaves_[a].hash;
    const std::uint64_t mid = lo + split_point(hi - lo);
    const std::size_t m =
        first_at_or_after([this](std::size_t i) { return leaves_[i].index; }, a, b, mid);
    const Hash left = walk(lo, mid, a, m);
    const Hash right = walk(mid, hi, m, b);
    if (short_) return Hash{};
    return node_hash(left, right);
  }

  bool proof_too_short() const { return short_; }
  std::size_t used() const { return next_; }

 private:
  std::span<const IndexedLeaf> leaves_;
  std::span<const Hash> proof_;
  std::size_t next_ = 0;
  bool short_ = false;
};

}  // namespace

Result<std::vector<Hash>> multi_inclusion_proof(std::span<const std::uint64_t> indexes,
                                                std::uint64_t size, const NodeSource& nodes) {
  if (indexes.empty())
    return Status::InvalidArgument("multi-leaf inclusion proof: no leaves to prove");
  for (std::size_t k = 0; k < indexes.size(); ++k) {
    if (indexes[k] >= size)
      return Status::InvalidArgument(fmt::format(
          "multi-leaf inclusion proof: leaf index {} is not below tree size {}", indexes[k], size));
    if (k > 0 && indexes[k] <= indexes[k - 1])
      return Status::InvalidArgument(fmt::format(
          "multi-leaf inclusion proof: leaf indexes must ascend strictly ({} follows {})",
          indexes[k], indexes[k - 1]));
  }
  MultiProofBuilder builder(indexes, nodes);
  MEDGATE_RETURN_IF_ERROR(builder.walk(0, size, 0, indexes.size()));
  return builder.take();
}

Result<Hash> root_from_multi_proof(std::span<const IndexedLeaf> leaves, std::uint64_t size,
                                   std::span<const Hash> proof) {
  if (leaves.empty())
    return Status::VerificationFailed("multi-leaf inclusion: no leaves, so nothing is proved");
  for (std::size_t k = 0; k < leaves.size(); ++k) {
    if (leaves[k].index >= size)
      return Status::VerificationFailed(fmt::format(
          "multi-leaf inclusion: leaf index {} is not below tree size {}", leaves[k].index, size));
    if (k > 0 && leaves[k].index <= leaves[k - 1].index)
      return Status::VerificationFailed(
          fmt::format("multi-leaf inclusion: leaf indexes must ascend strictly ({} follows {})",
                      leaves[k].index, leaves[k - 1].index));
  }
  MultiProofRoot walker(leaves, proof);
  Hash root = walker.walk(0, size, 0, leaves.size());
  if (walker.proof_too_short())
    return Status::VerificationFailed(
        fmt::format("multi-leaf inclusion: the proof has {} hashes, too few for these {} leaves "
                    "of a {}-leaf tree",
                    proof.size(), leaves.size(), size));
  if (walker.used() != proof.size())
    return Status::VerificationFailed(
        fmt::format("multi-leaf inclusion: the proof has {} hashes, these {} leaves of a {}-leaf "
                    "tree need {}",
                    proof.size(), leaves.size(), size, walker.used()));
  return root;
}

Status verify_multi_inclusion(std::span<const IndexedLeaf> leaves, std::uint64_t size,
                              std::span<const Hash> proof, const Hash& root) {
  MEDGATE_ASSIGN_OR_RETURN(Hash got, root_from_multi_proof(leaves, size, proof));
  if (got != root)
    return Status::VerificationFailed(
        fmt::format("multi-leaf inclusion: {} leaves with this proof give root {}, not the "
                    "expected {}",
                    leaves.size(), to_hex(got), to_hex(root)));
  return Status::Ok();
}

Result<CompactRange> CompactRange::for_size(std::uint64_t size, const NodeSource& nodes) {
  CompactRange range;
  std::uint64_t pos = 0;
  for (int level = 63; level >= 0; --level) {
    const std::uint64_t width = std::uint64_t{1} << level;
    if ((size & width) == 0) continue;
    MEDGATE_ASSIGN_OR_RETURN(Hash peak, nodes(level, pos >> level));
    range.peaks_.push_back(peak);
    pos += width;
  }
  range.size_ = size;
  return range;
}

void CompactRange::append(
    const Hash& leaf,
    const std::function<void(int level, std::uint64_t index, const Hash&)>& completed) {
  // Each trailing one bit of the old size is a peak that the new node completes into its parent.
  // (A tree of 2^64 - 1 leaves cannot grow; no log gets there.)
  Hash node = leaf;
  std::uint64_t index = size_;
  int level = 0;
  while ((index & 1) != 0) {
    node = node_hash(peaks_.back(), node);
    peaks_.pop_back();
    ++level;
    index >>= 1;
    if (completed) completed(level, index, node);
  }
  peaks_.push_back(node);
  ++size_;
}

Hash CompactRange::root() const {
  if (peaks_.empty()) return empty_root();
  Hash acc = peaks_.back();
  for (auto it = peaks_.rbegin() + 1; it != peaks_.rend(); ++it) acc = node_hash(*it, acc);
  return acc;
}

}  // namespace medgate::ledger::merkle
