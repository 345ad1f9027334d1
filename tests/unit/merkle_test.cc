// ledger/merkle against three independent references: transparency-dev's probe corpus (196
// files), the derived proofs for the 8-leaf reference tree, and a naive transcription of RFC
// 9162's MTH / PATH / PROOF run on random trees.
#include "ledger/merkle.h"
#include "tests/support/merkle_reference.h"

#include <algorithm>
#include <bit>
#include <filesystem>
#include <fstream>
#include <limits>
#include <optional>
#include <random>
#include <string>

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

namespace merkle = medgate::ledger::merkle;
using medgate::Hash;
using medgate::Status;
using medgate::StatusCode;
using nlohmann::json;

namespace {

const std::filesystem::path kData = std::filesystem::path(MEDGATE_TEST_DATA) / "merkle";
constexpr std::uint64_t kMax = std::numeric_limits<std::uint64_t>::max();

json read_json(const std::filesystem::path& path) {
  std::ifstream in(path);
  INFO(path.string());
  REQUIRE(in.good());
  return json::parse(in);
}

Hash hex_hash(const json& hex) {
  auto h = medgate::hash_from_hex(hex.get<std::string>());
  REQUIRE(h.has_value());
  return *h;
}

std::vector<Hash> hex_hashes(const json& list) {
  std::vector<Hash> out;
  for (const auto& h : list) out.push_back(hex_hash(h));
  return out;
}

// A probe's byte string as a Hash; nullopt when it is not 32 bytes (our API types every leaf
// hash, root and proof element as a SHA-256 digest, so such input is rejected at the boundary).
std::optional<Hash> b64_hash(const json& v) {
  auto bytes = medgate::from_base64(v.get<std::string>());
  if (!bytes || bytes->size() != 32) return std::nullopt;
  Hash h;
  std::copy(bytes->begin(), bytes->end(), h.begin());
  return h;
}

std::optional<std::vector<Hash>> b64_proof(const json& v) {
  std::vector<Hash> out;
  if (v.is_null()) return out;
  for (const auto& e : v) {
    auto h = b64_hash(e);
    if (!h) return std::nullopt;
    out.push_back(*h);
  }
  return out;
}

using namespace medgate::testing::merkle_reference;

// A NodeSource over leaves in memory that computes each node naively, refuses any node not
// wholly inside `size` (the contract in merkle.h) and counts reads.
struct MemoryNodes {
  std::vector<Hash> leaves;
  std::uint64_t size = 0;
  int reads = 0;
  int out_of_range = 0;

  merkle::NodeSource source() {
    return [this](int level, std::uint64_t index) -> medgate::Result<Hash> {
      ++reads;
      if (level < 0 || level > 63 || index >= (size >> level)) {
        ++out_of_range;
        return Status::Internal("node outside the tree");
      }
      return mth(Leaves(leaves).subspan(index << level, std::size_t{1} << level));
    };
  }
};

std::vector<Hash> random_leaves(std::mt19937_64& rng, std::size_t n) {
  std::vector<Hash> out(n);
  for (auto& h : out) {
    for (auto& b : h) b = std::byte(rng() & 0xff);
  }
  return out;
}

void flip_bit(std::vector<Hash>& proof, std::mt19937_64& rng) {
  auto& h = proof[rng() % proof.size()];
  h[rng() % 32] ^= std::byte(1 << (rng() % 8));
}

}  // namespace

TEST_CASE("hashing matches RFC 9162 / transparency-dev hasher vectors", "[merkle]") {
  json ref = read_json(kData / "reference_tree.json");
  const auto& vectors = ref["hasherVectors"];
  CHECK(merkle::empty_root() == hex_hash(vectors[0]["want"]));
  CHECK(merkle::leaf_hash({}) == hex_hash(vectors[1]["want"]));
  CHECK(merkle::leaf_hash(medgate::as_bytes("L123456")) == hex_hash(vectors[2]["want"]));
  // vectors[3] hashes 4-byte children; node_hash takes 32-byte digests only, so the interior
  // hash is checked through the reference tree's node hashes below instead.
  const auto& inputs = ref["leafInputsHex"];
  const auto& leaf_hashes = ref["leafHashesHex"];
  const auto& levels = ref["nodeHashesByLevelHex"];
  REQUIRE(inputs.size() == 8);
  for (std::size_t i = 0; i < inputs.size(); ++i) {
    auto data = medgate::from_hex(inputs[i].get<std::string>());
    REQUIRE(data.has_value());
    CHECK(merkle::leaf_hash(*data) == hex_hash(leaf_hashes[i]));
  }
  for (std::size_t level = 1; level < levels.size(); ++level) {
    for (std::size_t i = 0; i < levels[level].size(); ++i) {
      CHECK(merkle::node_hash(hex_hash(levels[level - 1][2 * i]),
                              hex_hash(levels[level - 1][2 * i + 1])) ==
            hex_hash(levels[level][i]));
    }
  }
}

TEST_CASE("verifiers agree with every transparency-dev probe", "[merkle]") {
  // Upstream compares byte strings of any length; our roots are typed 32-byte digests. This one
  // probe expects success for two equal 12-byte "roots" of equal-size trees; no 12-byte value
  // is a SHA-256 root, so medgate rejects it at the type boundary, on purpose.
  const std::string kTypedRootDeviation =
      "consistency/additional/sizes-are-equal-one-and-proof-is-empty.json";
  int inclusion = 0, consistency = 0;
  for (std::string kind : {"inclusion", "consistency"}) {
    const auto dir = kData / "testdata" / kind;
    REQUIRE(std::filesystem::is_directory(dir));
    for (const auto& entry : std::filesystem::recursive_directory_iterator(dir)) {
      if (!entry.is_regular_file() || entry.path().extension() != ".json") continue;
      const std::string name = kind + "/" + entry.path().lexically_relative(dir).generic_string();
      json probe = read_json(entry.path());
      INFO(name << " (" << probe["desc"].get<std::string>() << ")");
      const bool want_err = probe["wantErr"].get<bool>();
      bool rejected = true;
      std::string why = "a byte string is not 32 bytes";
      if (kind == "inclusion") {
        ++inclusion;
        auto root = b64_hash(probe["root"]);
        auto leaf = b64_hash(probe["leafHash"]);
        auto proof = b64_proof(probe["proof"]);
        if (root && leaf && proof) {
          Status s = merkle::verify_inclusion(probe["leafIdx"].get<std::uint64_t>(),
                                              probe["treeSize"].get<std::uint64_t>(), *leaf, *proof,
                                              *root);
          rejected = !s.ok();
          why = s.to_string();
          if (rejected) CHECK(s.code() == StatusCode::kVerificationFailed);
        }
      } else {
        ++consistency;
        auto root1 = b64_hash(probe["root1"]);
        auto root2 = b64_hash(probe["root2"]);
        auto proof = b64_proof(probe["proof"]);
        if (root1 && root2 && proof) {
          Status s = merkle::verify_consistency(probe["size1"].get<std::uint64_t>(),
                                                probe["size2"].get<std::uint64_t>(), *root1, *root2,
                                                *proof);
          rejected = !s.ok();
          why = s.to_string();
          if (rejected) CHECK(s.code() == StatusCode::kVerificationFailed);
        }
      }
      INFO("outcome: " << why);
      if (name == kTypedRootDeviation) {
        CHECK_FALSE(want_err);
        CHECK(rejected);
      } else {
        CHECK(rejected == want_err);
      }
    }
  }
  // The corpus must be there: a missing directory would otherwise pass vacuously.
  REQUIRE(inclusion == 98);
  REQUIRE(consistency == 98);
  REQUIRE(inclusion + consistency == 196);

  // What the deviating probe means for well-formed roots: equal sizes, equal roots, empty proof.
  Hash r = merkle::leaf_hash(medgate::as_bytes("x"));
  CHECK(merkle::verify_consistency(1, 1, r, r, {}).ok());
}

TEST_CASE("reference tree: roots and every proof up to 8 leaves", "[merkle]") {
  json ref = read_json(kData / "reference_tree.json");
  json derived = read_json(kData / "derived_all_proofs_size_le_8.json");
  MemoryNodes tree;
  for (const auto& in : ref["leafInputsHex"]) {
    tree.leaves.push_back(merkle::leaf_hash(*medgate::from_hex(in.get<std::string>())));
  }
  merkle::CompactRange range;
  for (std::uint64_t size = 0; size <= 8; ++size) {
    INFO("size " << size);
    const Hash want = hex_hash(ref["rootHashesBySizeHex"][std::to_string(size)]);
    tree.size = size;
    auto got = merkle::root(size, tree.source());
    REQUIRE(got.ok());
    CHECK(*got == want);
    CHECK(range.root() == want);
    if (size < 8) range.append(tree.leaves[size]);
  }

  REQUIRE(derived["inclusion"].size() == 36);
  for (const auto& c : derived["inclusion"]) {
    const auto index = c["leafIdx"].get<std::uint64_t>(), size = c["treeSize"].get<std::uint64_t>();
    INFO("inclusion " << index << " of " << size);
    tree.size = size;
    auto proof = merkle::inclusion_proof(index, size, tree.source());
    REQUIRE(proof.ok());
    CHECK(*proof == hex_hashes(c["proofHex"]));
    CHECK(merkle::verify_inclusion(index, size, hex_hash(c["leafHashHex"]), *proof,
                                   hex_hash(c["rootHex"]))
              .ok());
  }
  REQUIRE(derived["consistency"].size() == 36);
  for (const auto& c : derived["consistency"]) {
    const auto m = c["size1"].get<std::uint64_t>(), n = c["size2"].get<std::uint64_t>();
    INFO("consistency " << m << " -> " << n);
    tree.size = n;
    auto proof = merkle::consistency_proof(m, n, tree.source());
    REQUIRE(proof.ok());
    CHECK(*proof == hex_hashes(c["proofHex"]));
    CHECK(merkle::verify_consistency(m, n, hex_hash(c["root1Hex"]), hex_hash(c["root2Hex"]), *proof)
              .ok());
  }
  CHECK(tree.out_of_range == 0);
}

TEST_CASE("random trees: generation equals the naive RFC recursion and verifies", "[merkle]") {
  const std::uint64_t seed = GENERATE(11u, 22u, 33u);
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  const auto all = random_leaves(rng, 5000);
  MemoryNodes tree;
  tree.leaves = all;

  // Every size up to 70 exhaustively, then larger sizes (power-of-two edges and random) sampled.
  std::vector<std::uint64_t> sizes;
  for (std::uint64_t n = 1; n <= 70; ++n) sizes.push_back(n);
  for (std::uint64_t n : {127, 128, 129, 1023, 1024, 1025, 4095, 4096, 4097}) sizes.push_back(n);
  for (int i = 0; i < 6; ++i) sizes.push_back(71 + rng() % (all.size() - 71));

  for (std::uint64_t n : sizes) {
    INFO("size " << n);
    const Leaves leaves = Leaves(all).first(n);
    const Hash root = mth(leaves);
    const Hash other_root = mth(Leaves(all).first(n + 1));
    tree.size = n;
    tree.reads = 0;
    auto got_root = merkle::root(n, tree.source());
    REQUIRE(got_root.ok());
    REQUIRE(*got_root == root);
    CHECK(tree.reads == std::popcount(n));

    const bool exhaustive = n <= 70;
    const std::uint64_t samples = exhaustive ? n : 12;
    for (std::uint64_t s = 0; s < samples; ++s) {
      const std::uint64_t index = exhaustive ? s : rng() % n;
      INFO("index " << index);
      tree.reads = 0;
      auto proof = merkle::inclusion_proof(index, n, tree.source());
      REQUIRE(proof.ok());
      CHECK(*proof == path(index, leaves));
      // O(log n) reads: one per proof element plus the pieces of at most one non-perfect range.
      CHECK(tree.reads <= static_cast<int>(proof->size()) + std::popcount(n));
      CHECK(merkle::verify_inclusion(index, n, leaves[index], *proof, root).ok());
      CHECK_FALSE(
          merkle::verify_inclusion(index, n, merkle::node_hash(root, root), *proof, root).ok());
      if (!proof->empty()) {
        auto bad = *proof;
        flip_bit(bad, rng);
        CHECK_FALSE(merkle::verify_inclusion(index, n, leaves[index], bad, root).ok());
        bad = *proof;
        bad.pop_back();
        CHECK_FALSE(merkle::verify_inclusion(index, n, leaves[index], bad, root).ok());
      }
      auto longer = *proof;
      longer.push_back(root);
      CHECK_FALSE(merkle::verify_inclusion(index, n, leaves[index], longer, root).ok());
      // (A proof need not fail for another size: the signed head binds the size to the root.)
      CHECK_FALSE(merkle::verify_inclusion(index, n, leaves[index], *proof, other_root).ok());
    }
    for (std::uint64_t s = 0; s < samples; ++s) {
      const std::uint64_t m = exhaustive ? s + 1 : 1 + rng() % n;
      INFO("old size " << m);
      const Hash old_root = mth(leaves.first(m));
      tree.reads = 0;
      auto proof = merkle::consistency_proof(m, n, tree.source());
      REQUIRE(proof.ok());
      CHECK(*proof == subproof(m, leaves, true));
      CHECK(tree.reads <= static_cast<int>(proof->size()) + std::popcount(n));
      CHECK(merkle::verify_consistency(m, n, old_root, root, *proof).ok());
      if (m == n) continue;
      auto bad = *proof;
      flip_bit(bad, rng);
      CHECK_FALSE(merkle::verify_consistency(m, n, old_root, root, bad).ok());
      CHECK_FALSE(merkle::verify_consistency(m, n, root, old_root, *proof).ok());
      if (m > 1) CHECK_FALSE(merkle::verify_consistency(m - 1, n, old_root, root, *proof).ok());
    }
  }
  CHECK(tree.out_of_range == 0);
}

TEST_CASE("CompactRange: append, completed nodes, for_size", "[merkle]") {
  std::mt19937_64 rng(7);
  MemoryNodes tree;
  tree.leaves = random_leaves(rng, 600);
  tree.size = tree.leaves.size();
  merkle::CompactRange range;
  int completed = 0;
  for (std::uint64_t n = 0; n < tree.leaves.size(); ++n) {
    INFO("size " << n);
    REQUIRE(range.size() == n);
    REQUIRE(range.root() == mth(Leaves(tree.leaves).first(n)));
    if (n % 37 == 0) {
      auto rebuilt = merkle::CompactRange::for_size(n, tree.source());
      REQUIRE(rebuilt.ok());
      CHECK(rebuilt->root() == range.root());
      rebuilt->append(tree.leaves[n]);
      CHECK(rebuilt->root() == mth(Leaves(tree.leaves).first(n + 1)));
    }
    int last_level = 0;
    range.append(tree.leaves[n], [&](int level, std::uint64_t index, const Hash& h) {
      ++completed;
      CHECK(level == last_level + 1);  // lowest first, one level at a time
      last_level = level;
      CHECK(((index + 1) << level) == n + 1);
      CHECK(h == mth(Leaves(tree.leaves).subspan(index << level, std::size_t{1} << level)));
    });
  }
  CHECK(completed == 600 - std::popcount(600u));  // a tree of n leaves has n - popcount(n) nodes
}

TEST_CASE("bad sizes and indexes are errors, never crashes or loops", "[merkle]") {
  // Every leaf equal makes every node of level L equal, so trees of any size up to 2^64 - 1 are
  // cheap and self-consistent.
  std::vector<Hash> level_hash{merkle::leaf_hash(medgate::as_bytes("same"))};
  while (level_hash.size() < 64)
    level_hash.push_back(merkle::node_hash(level_hash.back(), level_hash.back()));
  merkle::NodeSource uniform = [&](int level, std::uint64_t) -> medgate::Result<Hash> {
    return level_hash.at(static_cast<std::size_t>(level));
  };

  CHECK(merkle::inclusion_proof(0, 0, uniform).status().code() == StatusCode::kInvalidArgument);
  CHECK(merkle::inclusion_proof(5, 5, uniform).status().code() == StatusCode::kInvalidArgument);
  CHECK(merkle::inclusion_proof(kMax, kMax, uniform).status().code() ==
        StatusCode::kInvalidArgument);
  CHECK(merkle::consistency_proof(0, 0, uniform).status().code() == StatusCode::kInvalidArgument);
  CHECK(merkle::consistency_proof(0, 5, uniform).status().code() == StatusCode::kInvalidArgument);
  CHECK(merkle::consistency_proof(6, 5, uniform).status().code() == StatusCode::kInvalidArgument);
  CHECK(merkle::consistency_proof(kMax, kMax, uniform)->empty());
  CHECK(*merkle::root(0, uniform) == merkle::empty_root());
  CHECK(medgate::to_hex(merkle::empty_root()) ==
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");

  const Hash leaf = level_hash[0];
  for (std::uint64_t n : {kMax, kMax - 1, std::uint64_t{1} << 63, (std::uint64_t{1} << 63) + 1,
                          (std::uint64_t{1} << 40) + 3}) {
    INFO("size " << n);
    auto root = merkle::root(n, uniform);
    REQUIRE(root.ok());
    for (std::uint64_t index : {std::uint64_t{0}, n / 3, n - 2, n - 1}) {
      auto proof = merkle::inclusion_proof(index, n, uniform);
      REQUIRE(proof.ok());
      CHECK(proof->size() <= 64);
      CHECK(merkle::verify_inclusion(index, n, leaf, *proof, *root).ok());
      CHECK(merkle::verify_inclusion(n, n, leaf, *proof, *root).code() ==
            StatusCode::kVerificationFailed);
    }
    for (std::uint64_t m : {std::uint64_t{1}, std::uint64_t{3}, n / 2, n - 1}) {
      auto proof = merkle::consistency_proof(m, n, uniform);
      REQUIRE(proof.ok());
      CHECK(merkle::verify_consistency(m, n, *merkle::root(m, uniform), *root, *proof).ok());
    }
  }

  // A failing store is reported, not hidden.
  merkle::NodeSource broken = [](int, std::uint64_t) -> medgate::Result<Hash> {
    return Status::NotFound("no such node");
  };
  CHECK(merkle::root(5, broken).status().code() == StatusCode::kNotFound);
  CHECK(merkle::inclusion_proof(1, 5, broken).status().code() == StatusCode::kNotFound);
  CHECK(merkle::consistency_proof(2, 5, broken).status().code() == StatusCode::kNotFound);
  CHECK(merkle::CompactRange::for_size(5, broken).status().code() == StatusCode::kNotFound);

  // Random garbage at extreme sizes terminates with a refusal.
  std::mt19937_64 rng(99);
  for (int i = 0; i < 2000; ++i) {
    const std::uint64_t n = i % 2 ? kMax - rng() % 4 : rng();
    const std::uint64_t a = rng() % (n + (n != kMax ? 1 : 0));
    std::vector<Hash> proof = random_leaves(rng, rng() % 70);
    const Hash r1 = level_hash[rng() % 64], r2 = level_hash[rng() % 64];
    CHECK_FALSE(merkle::verify_inclusion(a, n, r1, proof, r2).ok());
    if (a == n && r1 == r2 && proof.empty()) continue;
    CHECK_FALSE(merkle::verify_consistency(a, n, r1, r2, proof).ok());
  }
}

// ---- multi-leaf inclusion proofs ----

namespace {

std::vector<merkle::IndexedLeaf> indexed(const std::vector<std::uint64_t>& indexes,
                                         const std::vector<Hash>& leaves) {
  std::vector<merkle::IndexedLeaf> out;
  for (std::uint64_t i : indexes) out.push_back({i, leaves[i]});
  return out;
}

// The subset shapes the brief of format 2 names, for a tree of n leaves: one leaf (first, last,
// middle), all, first and last, sparse, adjacent runs, and a few random sets.
std::vector<std::vector<std::uint64_t>> shapes(std::uint64_t n, std::mt19937_64& rng) {
  std::vector<std::vector<std::uint64_t>> out;
  out.push_back({0});
  out.push_back({n - 1});
  out.push_back({n / 2});
  std::vector<std::uint64_t> all(n);
  for (std::uint64_t i = 0; i < n; ++i) all[i] = i;
  out.push_back(all);
  if (n > 1) out.push_back({0, n - 1});
  for (std::uint64_t step : {2, 3, 7, 10}) {
    std::vector<std::uint64_t> sparse;
    for (std::uint64_t i = step / 2; i < n; i += step) sparse.push_back(i);
    if (!sparse.empty()) out.push_back(sparse);
  }
  std::vector<std::uint64_t> runs;  // runs of 3 every 8, and a run at the right edge
  for (std::uint64_t i = 0; i < n; ++i)
    if (i % 8 >= 2 && i % 8 < 5) runs.push_back(i);
  for (std::uint64_t i = n > 4 ? n - 4 : 0; i < n; ++i)
    if (runs.empty() || i > runs.back()) runs.push_back(i);
  out.push_back(runs);
  for (int r = 0; r < 3; ++r) {
    std::vector<std::uint64_t> random;
    for (std::uint64_t i = 0; i < n; ++i)
      if (rng() % 4 == 0) random.push_back(i);
    if (!random.empty()) out.push_back(random);
  }
  return out;
}

// Every way the proof can be damaged, each of which must fail against `root`.
void check_tampers(const std::vector<merkle::IndexedLeaf>& leaves, std::uint64_t n,
                   const std::vector<Hash>& proof, const Hash& root, std::mt19937_64& rng) {
  for (std::size_t k = 0; k < proof.size(); ++k) {
    INFO("proof hash " << k);
    auto changed = proof;
    changed[k][rng() % 32] ^= std::byte(1 << (rng() % 8));
    CHECK_FALSE(merkle::verify_multi_inclusion(leaves, n, changed, root).ok());
    auto missing = proof;
    missing.erase(missing.begin() + static_cast<std::ptrdiff_t>(k));
    CHECK_FALSE(merkle::verify_multi_inclusion(leaves, n, missing, root).ok());
    auto extra = proof;
    extra.insert(extra.begin() + static_cast<std::ptrdiff_t>(k), proof[k]);
    CHECK_FALSE(merkle::verify_multi_inclusion(leaves, n, extra, root).ok());
    if (k + 1 < proof.size() && proof[k] != proof[k + 1]) {
      auto swapped = proof;
      std::swap(swapped[k], swapped[k + 1]);
      CHECK_FALSE(merkle::verify_multi_inclusion(leaves, n, swapped, root).ok());
    }
  }
  auto longer = proof;
  longer.push_back(root);
  CHECK_FALSE(merkle::verify_multi_inclusion(leaves, n, longer, root).ok());
  if (proof.size() > 1) {
    auto reversed = proof;
    std::reverse(reversed.begin(), reversed.end());
    if (reversed != proof)
      CHECK_FALSE(merkle::verify_multi_inclusion(leaves, n, reversed, root).ok());
  }
  // A changed leaf, a leaf left out, the leaves out of order or repeated.
  auto changed_leaf = leaves;
  changed_leaf[rng() % leaves.size()].hash[0] ^= std::byte{1};
  CHECK_FALSE(merkle::verify_multi_inclusion(changed_leaf, n, proof, root).ok());
  if (leaves.size() > 1) {
    auto fewer = leaves;
    fewer.erase(fewer.begin() + static_cast<std::ptrdiff_t>(rng() % fewer.size()));
    CHECK_FALSE(merkle::verify_multi_inclusion(fewer, n, proof, root).ok());
    auto reordered = leaves;
    std::swap(reordered[0], reordered[1]);
    CHECK(merkle::verify_multi_inclusion(reordered, n, proof, root).code() ==
          StatusCode::kVerificationFailed);
    auto repeated = leaves;
    repeated.insert(repeated.begin() + 1, leaves[0]);
    CHECK_FALSE(merkle::verify_multi_inclusion(repeated, n, proof, root).ok());
  }
}

}  // namespace

TEST_CASE("multi-leaf proofs: every subset of the reference tree", "[merkle][multiproof]") {
  json ref = read_json(kData / "reference_tree.json");
  json derived = read_json(kData / "derived_all_proofs_size_le_8.json");
  MemoryNodes tree;
  for (const auto& in : ref["leafInputsHex"])
    tree.leaves.push_back(merkle::leaf_hash(*medgate::from_hex(in.get<std::string>())));
  std::mt19937_64 rng(5);
  int subsets = 0;
  for (std::uint64_t size = 1; size <= 8; ++size) {
    const Hash root = hex_hash(ref["rootHashesBySizeHex"][std::to_string(size)]);
    tree.size = size;
    for (std::uint64_t mask = 1; mask < (std::uint64_t{1} << size); ++mask) {
      std::vector<std::uint64_t> indexes;
      for (std::uint64_t i = 0; i < size; ++i)
        if ((mask >> i) & 1) indexes.push_back(i);
      INFO("size " << size << ", leaves mask " << mask);
      ++subsets;
      tree.reads = 0;
      auto proof = merkle::multi_inclusion_proof(indexes, size, tree.source());
      REQUIRE(proof.ok());
      CHECK(*proof == multiproof(indexes, Leaves(tree.leaves).first(size)));
      // One read per proof hash, plus the pieces of a subtree at the right edge.
      CHECK(tree.reads <= static_cast<int>(proof->size()) + std::popcount(size));
      // Each hash once (the reference leaves are distinct, so are their subtrees).
      auto sorted = *proof;
      std::sort(sorted.begin(), sorted.end());
      CHECK(std::adjacent_find(sorted.begin(), sorted.end()) == sorted.end());
      auto leaves = indexed(indexes, tree.leaves);
      CHECK(merkle::verify_multi_inclusion(leaves, size, *proof, root).ok());
      // Every proof hash is a hash of some single leaf's RFC 9162 audit path (the derived vectors),
      // and a single leaf's proof holds exactly its audit path.
      std::vector<Hash> paths;
      for (const auto& c : derived["inclusion"])
        if (c["treeSize"].get<std::uint64_t>() == size &&
            (mask >> c["leafIdx"].get<std::uint64_t>()) & 1)
          for (const Hash& h : hex_hashes(c["proofHex"])) paths.push_back(h);
      for (const Hash& h : *proof) CHECK(std::find(paths.begin(), paths.end(), h) != paths.end());
      if (indexes.size() == 1) {
        std::sort(paths.begin(), paths.end());
        CHECK(sorted == paths);
      }
      if (indexes.size() == size) CHECK(proof->empty());
      check_tampers(leaves, size, *proof, root, rng);
    }
  }
  CHECK(subsets == 502);  // sum of 2^n - 1 for n = 1..8
  CHECK(tree.out_of_range == 0);
}

TEST_CASE("multi-leaf proofs: random trees, every subset shape, every tamper",
          "[merkle][multiproof]") {
  std::mt19937_64 rng(GENERATE(3u, 4u));
  const auto all = random_leaves(rng, 4200);
  MemoryNodes tree;
  tree.leaves = all;
  std::vector<std::uint64_t> sizes;
  for (std::uint64_t n = 1; n <= 40; ++n) sizes.push_back(n);
  for (std::uint64_t n : {63, 64, 65, 100, 127, 128, 129, 1000, 1023, 1024, 1025, 4097})
    sizes.push_back(n);
  for (std::uint64_t n : sizes) {
    const Leaves leaves = Leaves(all).first(n);
    const Hash root = mth(leaves);
    tree.size = n;
    for (const auto& indexes : shapes(n, rng)) {
      INFO("size " << n << ", " << indexes.size() << " leaves from " << indexes.front());
      tree.reads = 0;
      auto proof = merkle::multi_inclusion_proof(indexes, n, tree.source());
      REQUIRE(proof.ok());
      CHECK(*proof == multiproof(indexes, leaves));
      CHECK(tree.reads <= static_cast<int>(proof->size()) + std::popcount(n));
      auto given = indexed(indexes, all);
      CHECK(merkle::verify_multi_inclusion(given, n, *proof, root).ok());
      // Never larger than the single-leaf proofs together, and as large only for one leaf.
      if (indexes.size() <= 64) {
        std::size_t singles = 0;
        for (std::uint64_t i : indexes) singles += path(i, leaves).size();
        CHECK(proof->size() <= singles);
        if (indexes.size() == 1) CHECK(proof->size() == singles);
      }
      // A wrong size: against the root of that size (the signed head binds size and root
      // together; on its own an RFC 9162 proof does not commit to the size).
      for (std::uint64_t m : {n + 1, n + 2, n - 1, n / 2, n * 2}) {
        if (m == n || m == 0 || m > all.size() || indexes.back() >= m) continue;
        INFO("claimed size " << m);
        CHECK_FALSE(
            merkle::verify_multi_inclusion(given, m, *proof, mth(Leaves(all).first(m))).ok());
      }
      if (n <= 40 || indexes.size() <= 8) check_tampers(given, n, *proof, root, rng);
    }
  }
  CHECK(tree.out_of_range == 0);
}

TEST_CASE("multi-leaf proofs: bad input is an error naming it", "[merkle][multiproof]") {
  std::vector<Hash> level_hash{merkle::leaf_hash(medgate::as_bytes("same"))};
  while (level_hash.size() < 64)
    level_hash.push_back(merkle::node_hash(level_hash.back(), level_hash.back()));
  merkle::NodeSource uniform = [&](int level, std::uint64_t) -> medgate::Result<Hash> {
    return level_hash.at(static_cast<std::size_t>(level));
  };
  using V = std::vector<std::uint64_t>;
  auto code = [&](const V& indexes, std::uint64_t size) {
    return merkle::multi_inclusion_proof(indexes, size, uniform).status();
  };
  CHECK(code({}, 5).code() == StatusCode::kInvalidArgument);
  CHECK(code({5}, 5).code() == StatusCode::kInvalidArgument);
  CHECK(code({0}, 0).code() == StatusCode::kInvalidArgument);
  CHECK_THAT(code({3, 1}, 5).message(), Catch::Contains("ascend strictly (1 follows 3)"));
  CHECK(code({2, 2}, 5).code() == StatusCode::kInvalidArgument);

  const Hash leaf = level_hash[0];
  auto root = merkle::root(5, uniform);
  REQUIRE(root.ok());
  auto proof = merkle::multi_inclusion_proof(V{1, 3}, 5, uniform);
  REQUIRE(proof.ok());
  std::vector<merkle::IndexedLeaf> leaves{{1, leaf}, {3, leaf}};
  CHECK(merkle::verify_multi_inclusion(leaves, 5, *proof, *root).ok());
  auto message = [&](std::span<const merkle::IndexedLeaf> l, std::uint64_t size,
                     std::span<const Hash> p) {
    Status s = merkle::verify_multi_inclusion(l, size, p, *root);
    CHECK(s.code() == StatusCode::kVerificationFailed);
    return s.message();
  };
  CHECK_THAT(message({}, 5, *proof), Catch::Contains("no leaves"));
  std::vector<merkle::IndexedLeaf> beyond{{1, leaf}, {5, leaf}};
  CHECK_THAT(message(beyond, 5, *proof), Catch::Contains("not below tree size 5"));
  std::vector<merkle::IndexedLeaf> backwards{{3, leaf}, {1, leaf}};
  CHECK_THAT(message(backwards, 5, *proof), Catch::Contains("ascend strictly"));
  std::vector<Hash> fewer(proof->begin(), proof->end() - 1);
  CHECK_THAT(message(leaves, 5, fewer), Catch::Contains("too few"));
  std::vector<Hash> more = *proof;
  more.push_back(leaf);
  CHECK_THAT(message(leaves, 5, more), Catch::Contains("need " + std::to_string(proof->size())));

  // Huge trees: the walk is bounded by the leaves' paths, not by the size.
  for (std::uint64_t n : {kMax, std::uint64_t{1} << 63, (std::uint64_t{1} << 40) + 3}) {
    INFO("size " << n);
    auto big_root = merkle::root(n, uniform);
    REQUIRE(big_root.ok());
    V indexes{0, 1, n / 3, n - 2, n - 1};
    auto big = merkle::multi_inclusion_proof(indexes, n, uniform);
    REQUIRE(big.ok());
    CHECK(big->size() <= 5 * 64);
    std::vector<merkle::IndexedLeaf> l;
    for (std::uint64_t i : indexes) l.push_back({i, leaf});
    CHECK(merkle::verify_multi_inclusion(l, n, *big, *big_root).ok());
  }
  merkle::NodeSource broken = [](int, std::uint64_t) -> medgate::Result<Hash> {
    return Status::NotFound("no such node");
  };
  CHECK(merkle::multi_inclusion_proof(V{1}, 5, broken).status().code() == StatusCode::kNotFound);
}
