// LEDGER-CRITICAL: the stored form of the Merkle log's nodes. Every later root and proof is
// computed from what is written here.
//
// Nodes are stored in tlog-style tiles of height 4. Tile (t, k) holds the hashes of the nodes at
// level 4t with indexes [16k, 16k + 16), concatenated, 32 bytes each; the tile at the right edge
// of a level is partial and holds fewer (hash count = blob size / 32). Level-0 tiles hold the
// leaf hashes.
//
// Why tiles rather than one row per node: an append adds one row per 16 leaves (plus, rarely, a
// higher-level row) instead of ~2 new rows per leaf, which keeps appends cheap; yet any node is
// still computable from a single tile by hashing at most 15 pairs (node (4t + r, i) from 2^r
// hashes at level 4t), so a root or a proof stays O(log n) tile reads. The ledger's store keeps
// complete tiles only (schema 5, at tile_position()) and recomputes the partial ones when read.
#pragma once

#include <compare>
#include <cstdint>
#include <functional>
#include <utility>
#include <vector>

#include "hsm/bytes.h"
#include "hsm/status.h"
#include "ledger/merkle.h"

namespace medgate::ledger {

constexpr int kTileHeight = 4;
constexpr std::uint64_t kTileWidth = 16;  // 2^kTileHeight hashes per full tile

struct TileKey {
  int level = 0;            // tile level t: the tile holds nodes of Merkle level 4t
  std::uint64_t index = 0;  // k: the tile holds node indexes [16k, 16k + 16)
  auto operator<=>(const TileKey&) const = default;
};

// Where a complete tile is stored (schema 5, table merkle_tiles): the tree size at which it
// completes, times 16, plus its level. Tiles complete in this order (at a given tree size the
// lower level first), so every tile the writer stores becomes the table's last row: SQLite appends
// it to the b-tree's rightmost page instead of splitting a page in the middle of the table, and a
// commit dirties about one tile page however many levels it completes. kInvalidArgument for a
// tile beyond 2^59 leaves (the position would not fit a SQLite integer).
Result<std::int64_t> tile_position(TileKey key);
// The inverse; kCorruption for a number no tile is stored at.
Result<TileKey> tile_at_position(std::int64_t position);

// The root of a complete tile's 16 hashes (512 bytes): the node one tile level up.
Hash tile_root(ByteView complete_tile);

// Returns the stored blob of tile (tile_level, tile_index), or kNotFound if there is none.
using TileReader = std::function<Result<Bytes>(int tile_level, std::uint64_t tile_index)>;

// A NodeSource over stored tiles: node (4t + r, i) is hashed up r levels from the 2^r hashes of
// tile (t, (i << r) / 16). A tile that is not a whole number of hashes, holds more than 16, or
// lacks the hashes a node needs is kCorruption naming the tile; the reader's errors pass through
// with the tile named. The source keeps the last tile read (the levels of one proof mostly share
// a tile), re-reading it if it is too short: stored hashes must never change once written, which
// holds for what TileBuilder writes. `reader` is copied into the source and must stay usable for
// as long as the source is; the source is safe to call from several threads if the reader is.
merkle::NodeSource node_source(TileReader reader);

// The writer's in-memory right edge of the tiled tree: the CompactRange plus, at each tile level,
// the hashes of the partial tile (at most 15). Memory is O(log n) plus the tiles completed since
// the last take_dirty(). Not thread-safe.
class TileBuilder {
 public:
  TileBuilder() = default;  // the empty tree

  // Rebuilds the right edge for a tree of `size` leaves from its stored tiles (O(log n) reads).
  // Hashes a stored tile holds beyond `size` are ignored (nothing reads past the tree size) and
  // are replaced as the tree grows; a partial tile holding them is rewritten at the next
  // take_dirty().
  static Result<TileBuilder> load(std::uint64_t size, const TileReader& reader);

  void append(const Hash& leaf);
  std::uint64_t size() const { return range_.size(); }
  Hash root() const { return range_.root(); }
  const merkle::CompactRange& range() const { return range_; }

  // Every tile whose content changed since the last call (completed ones and the current partial
  // ones), each with its full current content, for a store that keeps partial tiles too (INSERT
  // OR REPLACE). Completed tiles come first, in the order they completed.
  std::vector<std::pair<TileKey, Bytes>> take_dirty();
  // Only the tiles completed since the last call, in the order they completed: what the ledger's
  // store writes (it recomputes partial tiles), without serializing the partial ones each commit.
  std::vector<std::pair<TileKey, Bytes>> take_completed();

 private:
  struct PartialTile {
    std::vector<Hash> hashes;  // nodes at level 4t from index 16 * (count / 16) on; < 16 of them
    bool dirty = false;
  };

  void add_node(int tile_level, std::uint64_t index, const Hash& hash);

  merkle::CompactRange range_;
  std::vector<PartialTile> partial_;  // by tile level
  std::vector<std::pair<TileKey, Bytes>> completed_;
};

}  // namespace medgate::ledger
