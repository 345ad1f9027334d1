// Fuzz target: multi-leaf inclusion proofs (ledger/merkle.h), which an auditor's verifier runs on
// every format-2 audit bundle. The input chooses a tree (any size up to 2^64 - 1 with equal leaves,
// or up to 512 distinct leaves), a set of leaves, a damage to the proof, and raw leaves and hashes.
// Properties: the proof of any set leads back to the tree's root; any damage (a flipped bit, a
// hash left out or repeated, two different hashes swapped) fails; raw input never crashes, always
// ends, and a refusal is kVerificationFailed.
#include <algorithm>
#include <cstring>
#include <vector>

#include "ledger/merkle.h"
#include "tests/fuzz/fuzz_check.h"

using namespace medgate;
namespace merkle = medgate::ledger::merkle;

namespace {

// Reads little-endian integers off the front of the input; zeros once it runs out.
struct Reader {
  ByteView in;
  std::uint64_t u64() {
    std::uint64_t v = 0;
    for (int i = 0; i < 8 && !in.empty(); ++i) {
      v |= std::uint64_t(std::to_integer<std::uint8_t>(in[0])) << (8 * i);
      in = in.subspan(1);
    }
    return v;
  }
  std::uint8_t u8() { return static_cast<std::uint8_t>(u64() & 0xff); }
};

Hash leaf_of(std::uint64_t i) {
  std::uint8_t b[8];
  for (int k = 0; k < 8; ++k) b[k] = static_cast<std::uint8_t>(i >> (8 * k));
  return merkle::leaf_hash(ByteView(reinterpret_cast<const std::byte*>(b), 8));
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size > fuzz::kMaxInput) return 0;
  Reader r{fuzz::bytes_of(data, size)};
  const std::uint8_t mode = r.u8();
  const bool distinct = (mode & 1) != 0;
  std::uint64_t n = r.u64();
  n = distinct ? 1 + n % 512 : (n == 0 ? 1 : n);

  // The tree: equal leaves make every node of level L equal (so any size is cheap); distinct
  // leaves are hashed up naively (sizes up to 512).
  std::vector<Hash> level_hash{leaf_of(0)};
  while (level_hash.size() < 64)
    level_hash.push_back(merkle::node_hash(level_hash.back(), level_hash.back()));
  std::vector<Hash> leaves;
  if (distinct)
    for (std::uint64_t i = 0; i < n; ++i) leaves.push_back(leaf_of(i));
  std::function<Hash(int, std::uint64_t)> node = [&](int level, std::uint64_t index) -> Hash {
    if (!distinct) return level_hash.at(static_cast<std::size_t>(level));
    if (level == 0) return leaves.at(index);
    return merkle::node_hash(node(level - 1, 2 * index), node(level - 1, 2 * index + 1));
  };
  merkle::NodeSource nodes = [&](int level, std::uint64_t index) -> Result<Hash> {
    FUZZ_CHECK(level >= 0 && level < 64 && index < (n >> level),
               "node (%d, %llu) outside a tree of %llu", level,
               static_cast<unsigned long long>(index), static_cast<unsigned long long>(n));
    return node(level, index);
  };
  auto leaf_at = [&](std::uint64_t i) { return distinct ? leaves.at(i) : level_hash[0]; };

  // The set: up to 64 indexes, sorted, without repeats.
  std::vector<std::uint64_t> indexes;
  const std::size_t count = 1 + r.u8() % 64;
  for (std::size_t k = 0; k < count; ++k) indexes.push_back(r.u64() % n);
  std::sort(indexes.begin(), indexes.end());
  indexes.erase(std::unique(indexes.begin(), indexes.end()), indexes.end());
  std::vector<merkle::IndexedLeaf> given;
  for (std::uint64_t i : indexes) given.push_back({i, leaf_at(i)});

  Result<Hash> root = merkle::root(n, nodes);
  FUZZ_CHECK(root.ok(), "no root: %s", root.status().to_string().c_str());
  Result<std::vector<Hash>> proof = merkle::multi_inclusion_proof(indexes, n, nodes);
  FUZZ_CHECK(proof.ok(), "no proof: %s", proof.status().to_string().c_str());
  FUZZ_CHECK(proof->size() <= 64 * indexes.size(), "a proof of %zu hashes for %zu leaves",
             proof->size(), indexes.size());
  Status good = merkle::verify_multi_inclusion(given, n, *proof, *root);
  FUZZ_CHECK(good.ok(), "the proof does not lead to the root: %s", good.to_string().c_str());

  // One damage to the proof.
  if (!proof->empty()) {
    std::vector<Hash> bad = *proof;
    const std::size_t at = r.u64() % bad.size();
    const std::uint8_t op = r.u8() % 4;
    bool changed = true;
    if (op == 0) {
      bad[at][r.u8() % 32] ^= std::byte{static_cast<std::uint8_t>(1u << (r.u8() % 8))};
    } else if (op == 1) {
      bad.erase(bad.begin() + static_cast<std::ptrdiff_t>(at));
    } else if (op == 2) {
      bad.insert(bad.begin() + static_cast<std::ptrdiff_t>(at), bad[at]);
    } else {
      const std::size_t other = r.u64() % bad.size();
      changed = bad[at] != bad[other];
      std::swap(bad[at], bad[other]);
    }
    Status s = merkle::verify_multi_inclusion(given, n, bad, *root);
    if (changed) FUZZ_CHECK(!s.ok(), "a damaged proof (op %u at %zu) verifies", op, at);
  }

  // Raw leaves and hashes from the rest of the input: any order, any count.
  std::vector<merkle::IndexedLeaf> raw_leaves;
  const std::size_t raw_count = r.u8() % 16;
  for (std::size_t k = 0; k < raw_count; ++k) raw_leaves.push_back({r.u64(), level_hash[0]});
  std::vector<Hash> raw_proof;
  while (r.in.size() >= 32 && raw_proof.size() < 256) {
    Hash h;
    std::memcpy(h.data(), r.in.data(), 32);
    r.in = r.in.subspan(32);
    raw_proof.push_back(h);
  }
  Result<Hash> raw = merkle::root_from_multi_proof(raw_leaves, r.u64() | 1, raw_proof);
  if (!raw.ok())
    FUZZ_CHECK(raw.status().code() == StatusCode::kVerificationFailed, "%s",
               raw.status().to_string().c_str());
  return 0;
}
