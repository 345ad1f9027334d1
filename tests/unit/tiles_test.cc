// ledger/tiles: TileBuilder writes the tiles an in-memory store keeps, node_source reads them
// back, and everything is checked against a naive RFC 9162 recursion over the leaves.
#include "ledger/tiles.h"

#include <algorithm>
#include <bit>
#include <cstring>
#include <map>
#include <random>

#include <catch2/catch.hpp>

#include "tests/support/merkle_reference.h"

namespace merkle = medgate::ledger::merkle;
using medgate::Bytes;
using medgate::Hash;
using medgate::Status;
using medgate::StatusCode;
using medgate::ledger::kTileWidth;
using medgate::ledger::node_source;
using medgate::ledger::tile_at_position;
using medgate::ledger::tile_position;
using medgate::ledger::TileBuilder;
using medgate::ledger::TileKey;

namespace {

using namespace medgate::testing::merkle_reference;

// ---- An in-memory tile table, standing in for the SQLite one. ----
using Store = std::map<TileKey, Bytes>;

struct CountingReader {
  const Store* store;
  int* reads;
  medgate::Result<Bytes> operator()(int level, std::uint64_t index) const {
    if (reads != nullptr) ++*reads;
    auto it = store->find(TileKey{level, index});
    if (it == store->end()) return Status::NotFound("no such tile");
    return it->second;
  }
};

medgate::ledger::TileReader reader_for(const Store& store, int* reads = nullptr) {
  return CountingReader{&store, reads};
}

void apply(Store& store, std::vector<std::pair<TileKey, Bytes>> dirty) {
  for (auto& [key, blob] : dirty) store[key] = std::move(blob);  // INSERT OR REPLACE
}

std::vector<Hash> random_leaves(std::mt19937_64& rng, std::size_t n) {
  std::vector<Hash> out(n);
  for (auto& h : out) {
    for (auto& b : h) b = std::byte(rng() & 0xff);
  }
  return out;
}

// What the store must hold for `n` leaves: every tile, complete or partial, computed naively.
Store expected_tiles(Leaves leaves) {
  Store want;
  for (int t = 0; (leaves.size() >> (4 * t)) != 0; ++t) {
    const std::size_t width = std::size_t{1} << (4 * t);
    const std::size_t nodes = leaves.size() >> (4 * t);
    for (std::size_t i = 0; i < nodes; ++i) {
      Hash h = mth(leaves.subspan(i * width, width));
      Bytes& tile = want[TileKey{t, i / kTileWidth}];
      tile.insert(tile.end(), h.begin(), h.end());
    }
  }
  return want;
}

// Builds `leaves` from `builder`'s size on, applying take_dirty after random batches.
void build(TileBuilder& builder, Store& store, Leaves leaves, std::mt19937_64& rng) {
  while (builder.size() < leaves.size()) {
    const std::uint64_t batch = 1 + rng() % 40;
    for (std::uint64_t i = 0; i < batch && builder.size() < leaves.size(); ++i) {
      builder.append(leaves[builder.size()]);
    }
    apply(store, builder.take_dirty());
  }
}

}  // namespace

TEST_CASE("TileBuilder: roots and stored tiles across tile boundaries", "[tiles]") {
  std::mt19937_64 rng(2024);
  const auto all = random_leaves(rng, 5000);
  std::vector<std::uint64_t> sizes{0, 1, 15, 16, 17, 255, 256, 257, 4097};
  for (int i = 0; i < 3; ++i) sizes.push_back(rng() % all.size());

  for (std::uint64_t n : sizes) {
    INFO("size " << n);
    const Leaves leaves = Leaves(all).first(n);
    TileBuilder builder;
    Store store;
    while (builder.size() < n) {
      const std::uint64_t batch = 1 + rng() % 40;
      for (std::uint64_t i = 0; i < batch && builder.size() < n; ++i) {
        builder.append(leaves[builder.size()]);
      }
      apply(store, builder.take_dirty());
      // The stored tiles alone give the same root as the builder, at every flush.
      auto stored_root = merkle::root(builder.size(), node_source(reader_for(store)));
      REQUIRE(stored_root.ok());
      REQUIRE(*stored_root == builder.root());
    }
    CHECK(builder.size() == n);
    CHECK(builder.root() == mth(leaves));
    CHECK(builder.take_dirty().empty());  // nothing changed since the last flush
    CHECK(store == expected_tiles(leaves));
  }
}

TEST_CASE("TileBuilder: flushing after every append writes the same tiles", "[tiles]") {
  std::mt19937_64 rng(5);
  const auto leaves = random_leaves(rng, 600);
  TileBuilder builder;
  Store store;
  for (const Hash& leaf : leaves) {
    builder.append(leaf);
    auto dirty = builder.take_dirty();
    // One append changes the level-0 tile and at most one tile per higher level.
    CHECK(dirty.size() <= 3);
    apply(store, std::move(dirty));
  }
  CHECK(store == expected_tiles(leaves));
}

TEST_CASE("TileBuilder::load at every size continues exactly like uninterrupted building",
          "[tiles]") {
  std::mt19937_64 rng(77);
  const std::uint64_t n = GENERATE(300u, 4097u);
  INFO("final size " << n);
  const auto leaves = random_leaves(rng, n);
  TileBuilder full_builder;
  Store full;
  std::vector<Hash> roots{full_builder.root()};
  for (const Hash& leaf : leaves) {
    full_builder.append(leaf);
    roots.push_back(full_builder.root());
  }
  apply(full, full_builder.take_dirty());  // completed tiles wait for one late flush
  REQUIRE(full == expected_tiles(leaves));

  std::vector<std::uint64_t> restarts;
  if (n <= 300) {
    for (std::uint64_t s = 0; s <= n; ++s) restarts.push_back(s);
  } else {
    restarts = {0, 1, 15, 16, 17, 255, 256, 257, 4095, 4096};
    for (int i = 0; i < 12; ++i) restarts.push_back(rng() % n);
  }
  for (std::uint64_t s : restarts) {
    INFO("restart at " << s);
    // The store as a writer that flushed at size s left it.
    TileBuilder first;
    Store store;
    build(first, store, Leaves(leaves).first(s), rng);

    auto loaded = TileBuilder::load(s, reader_for(store));
    REQUIRE(loaded.ok());
    CHECK(loaded->size() == s);
    CHECK(loaded->root() == roots[s]);
    CHECK(loaded->take_dirty().empty());
    while (loaded->size() < n) {
      loaded->append(leaves[loaded->size()]);
      REQUIRE(loaded->root() == roots[loaded->size()]);
      if (rng() % 8 == 0) apply(store, loaded->take_dirty());
    }
    apply(store, loaded->take_dirty());
    CHECK(store == full);

    // A store that already holds tiles past s (a writer that flushed further than the size it
    // committed) loads as size s too, and the surplus is rewritten away.
    auto ahead = TileBuilder::load(s, reader_for(full));
    REQUIRE(ahead.ok());
    CHECK(ahead->root() == roots[s]);
    Store rewritten = full;
    apply(rewritten, ahead->take_dirty());
    for (std::uint64_t i = s; i < n; ++i) ahead->append(leaves[i]);
    apply(rewritten, ahead->take_dirty());
    CHECK(rewritten == full);
  }
}

TEST_CASE("node_source over stored tiles gives the naive proofs", "[tiles]") {
  std::mt19937_64 rng(31337);
  const auto all = random_leaves(rng, 4200);
  TileBuilder builder;
  Store store;
  std::vector<std::uint64_t> sizes{1, 2, 15, 16, 17, 31, 33, 255, 256, 257, 4096, 4097};
  for (int i = 0; i < 4; ++i) sizes.push_back(1 + rng() % all.size());
  std::sort(sizes.begin(), sizes.end());
  for (std::uint64_t n : sizes) {
    INFO("size " << n);
    build(builder, store, Leaves(all).first(n), rng);
    const Leaves leaves = Leaves(all).first(n);
    const Hash root = mth(leaves);
    REQUIRE(builder.root() == root);
    int reads = 0;
    const auto nodes = node_source(reader_for(store, &reads));
    // Tile reads stay logarithmic: about one per tile level plus the right-edge pieces.
    const int tile_levels = (std::bit_width(n) + 3) / 4;
    for (int s = 0; s < 20; ++s) {
      const std::uint64_t index = n <= 20 ? static_cast<std::uint64_t>(s) % n : rng() % n;
      INFO("index " << index);
      reads = 0;
      auto proof = merkle::inclusion_proof(index, n, nodes);
      REQUIRE(proof.ok());
      CHECK(*proof == path(index, leaves));
      CHECK(reads <= 2 * tile_levels + std::popcount(n));
      CHECK(merkle::verify_inclusion(index, n, leaves[index], *proof, root).ok());

      const std::uint64_t m = 1 + rng() % n;
      INFO("old size " << m);
      reads = 0;
      auto consistency = merkle::consistency_proof(m, n, nodes);
      REQUIRE(consistency.ok());
      CHECK(*consistency == subproof(m, leaves, true));
      CHECK(reads <= 3 * tile_levels + std::popcount(n));
      CHECK(merkle::verify_consistency(m, n, mth(leaves.first(m)), root, *consistency).ok());
    }
  }
}

TEST_CASE("damaged tiles are reported as corruption, never a crash", "[tiles]") {
  std::mt19937_64 rng(3);
  const auto leaves = random_leaves(rng, 300);  // 300 = 256 + 32 + 8 + 4
  TileBuilder builder;
  Store good;
  build(builder, good, leaves, rng);
  const Hash root = builder.root();

  const auto code_and_message = [](const Status& s, StatusCode code, const std::string& text) {
    INFO(s.to_string());
    CHECK(s.code() == code);
    CHECK(s.message().find(text) != std::string::npos);
  };

  SECTION("not a whole number of hashes") {
    Store store = good;
    store[{0, 0}].resize(31);
    code_and_message(node_source(reader_for(store))(0, 0).status(), StatusCode::kCorruption,
                     "tile 0/0");
    code_and_message(merkle::inclusion_proof(1, 300, node_source(reader_for(store))).status(),
                     StatusCode::kCorruption, "tile 0/0");
    store[{0, 18}].resize(12 * 32 - 1);  // the partial level-0 tile that load() reads
    code_and_message(TileBuilder::load(300, reader_for(store)).status(), StatusCode::kCorruption,
                     "tile 0/18");
  }
  SECTION("a complete tile cut short") {
    Store store = good;
    store[{0, 3}].resize(15 * 32);
    code_and_message(merkle::inclusion_proof(62, 300, node_source(reader_for(store))).status(),
                     StatusCode::kCorruption, "tile 0/3: holds 15 hashes, but node (0, 63)");
    // A node that needs only the hashes still there is fine.
    CHECK(node_source(reader_for(store))(3, 6).ok());
  }
  SECTION("a partial tile shorter than the size needs") {
    Store store = good;
    store[{1, 1}].resize(32);  // 300 >> 4 = 18 level-4 nodes: tile 1/1 must hold 2
    code_and_message(TileBuilder::load(300, reader_for(store)).status(), StatusCode::kCorruption,
                     "tile 1/1");
    code_and_message(merkle::root(300, node_source(reader_for(store))).status(),
                     StatusCode::kCorruption, "tile 1/1");
  }
  SECTION("more than 16 hashes") {
    Store store = good;
    store[{0, 2}].resize(17 * 32);
    code_and_message(node_source(reader_for(store))(0, 33).status(), StatusCode::kCorruption,
                     "more than 16");
  }
  SECTION("a missing tile") {
    Store store = good;
    store.erase({2, 0});
    code_and_message(merkle::root(300, node_source(reader_for(store))).status(),
                     StatusCode::kNotFound, "tile 2/0");
    code_and_message(TileBuilder::load(300, reader_for(store)).status(), StatusCode::kNotFound,
                     "tile 2/0");
  }
  SECTION("a flipped bit gives a proof that fails to verify") {
    Store store = good;
    store[{0, 5}][32 + 7] ^= std::byte{0x10};  // leaf 81, the sibling of leaf 80
    auto proof = merkle::inclusion_proof(80, 300, node_source(reader_for(store)));
    REQUIRE(proof.ok());
    CHECK(merkle::verify_inclusion(80, 300, leaves[80], *proof, root).code() ==
          StatusCode::kVerificationFailed);
  }
  SECTION("nodes that cannot exist") {
    const auto nodes = node_source(reader_for(good));
    CHECK(nodes(64, 0).status().code() == StatusCode::kInvalidArgument);
    CHECK(nodes(-1, 0).status().code() == StatusCode::kInvalidArgument);
    CHECK(nodes(1, std::uint64_t{1} << 63).status().code() == StatusCode::kInvalidArgument);
    CHECK(nodes(63, 2).status().code() == StatusCode::kInvalidArgument);
    CHECK(nodes(63, 0).status().code() == StatusCode::kNotFound);  // exists only in huge trees
  }
}

TEST_CASE("an empty TileBuilder", "[tiles]") {
  TileBuilder empty;
  CHECK(empty.size() == 0);
  CHECK(empty.root() == merkle::empty_root());
  CHECK(empty.take_dirty().empty());
  Store none;
  auto loaded = TileBuilder::load(0, reader_for(none));
  REQUIRE(loaded.ok());
  CHECK(loaded->root() == merkle::empty_root());
  CHECK(TileBuilder::load(1, reader_for(none)).status().code() == StatusCode::kNotFound);
}

// Where merkle_tiles keeps a tile: positions must follow the order in which TileBuilder completes
// tiles (so each stored tile is the table's last row), be distinct, and map back.
TEST_CASE("tile positions follow completion order and map back", "[tiles]") {
  std::mt19937_64 rng(59);
  const auto leaves = random_leaves(rng, 70000);
  TileBuilder builder;
  std::int64_t last = 0;
  std::size_t completed = 0;
  for (const Hash& leaf : leaves) {
    builder.append(leaf);
    for (const auto& [key, hashes] : builder.take_dirty()) {
      if (hashes.size() < kTileWidth * 32) continue;  // partial: not stored
      auto pos = tile_position(key);
      REQUIRE(pos.ok());
      CHECK(*pos > last);
      last = *pos;
      auto back = tile_at_position(*pos);
      REQUIRE(back.ok());
      CHECK(*back == key);
      ++completed;
    }
  }
  CHECK(completed == 70000 / 16 + 70000 / 256 + 70000 / 4096 + 70000 / 65536);
  // Level-0 tile k is at (k + 1) * 256 (the verifier's range query relies on it).
  CHECK(*tile_position({0, 0}) == 256);
  CHECK(*tile_position({0, 9}) == 2560);
  CHECK(*tile_position({1, 0}) == 4096 + 1);
  // Beyond 2^59 leaves, and numbers no tile is stored at.
  CHECK(tile_position({14, 0}).status().code() == StatusCode::kInvalidArgument);
  CHECK(tile_position({0, (std::uint64_t{1} << 55) - 1}).status().code() ==
        StatusCode::kInvalidArgument);
  CHECK(tile_position({0, (std::uint64_t{1} << 55) - 2}).ok());
  for (std::int64_t bad : {std::int64_t{0}, std::int64_t{-256}, std::int64_t{255},
                           std::int64_t{257}, std::int64_t{256 + 16}, std::int64_t{16 * 16 + 1}})
    CHECK(tile_at_position(bad).status().code() == StatusCode::kCorruption);
}

// What the ledger's store writes: the completed tiles only, each once, in the order they
// completed, and exactly the complete tiles a naive computation gives.
TEST_CASE("TileBuilder::take_completed gives each complete tile once, in order", "[tiles]") {
  std::mt19937_64 rng(11);
  const auto leaves = random_leaves(rng, 5000);
  TileBuilder builder;
  Store completed;
  std::int64_t last = 0;
  for (std::size_t i = 0; i < leaves.size(); ++i) {
    builder.append(leaves[i]);
    if (rng() % 5 != 0) continue;
    for (auto& [key, blob] : builder.take_completed()) {
      CHECK(blob.size() == kTileWidth * 32);
      CHECK(*tile_position(key) > last);
      last = *tile_position(key);
      CHECK(completed.emplace(key, std::move(blob)).second);
    }
  }
  for (auto& [key, blob] : builder.take_completed()) completed.emplace(key, std::move(blob));
  CHECK(builder.take_completed().empty());
  Store want = expected_tiles(Leaves(leaves));
  std::erase_if(want, [](const auto& kv) { return kv.second.size() < kTileWidth * 32; });
  CHECK(completed == want);
}
