// LEDGER-CRITICAL: reading Merkle nodes from stored tiles and writing the tiles as the log grows
// (see tiles.h). A wrong byte here is a wrong root for every later head.
#include "ledger/tiles.h"

#include <array>
#include <cassert>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>

#include <fmt/format.h>

namespace medgate::ledger {
namespace {

constexpr std::size_t kHashSize = sizeof(Hash);
constexpr int kMaxTileLevel = 63 / kTileHeight;  // tile level of Merkle level 63, the highest

std::string tile_name(TileKey key) {
  return fmt::format("tile {}/{}", key.level, key.index);
}

// Checks a stored tile's shape and returns how many hashes it holds.
Result<std::size_t> tile_hash_count(TileKey key, ByteView blob) {
  if (blob.size() % kHashSize != 0) {
    return Status::Corruption(fmt::format("{}: {} bytes is not a whole number of 32-byte hashes",
                                          tile_name(key), blob.size()));
  }
  if (blob.size() > kTileWidth * kHashSize) {
    return Status::Corruption(fmt::format("{}: holds {} hashes, more than {}", tile_name(key),
                                          blob.size() / kHashSize, kTileWidth));
  }
  return blob.size() / kHashSize;
}

Hash hash_at(ByteView blob, std::size_t i) {
  Hash h;
  std::memcpy(h.data(), blob.data() + i * kHashSize, kHashSize);
  return h;
}

Bytes serialize(const std::vector<Hash>& hashes) {
  Bytes out(hashes.size() * kHashSize);
  for (std::size_t i = 0; i < hashes.size(); ++i) {
    std::memcpy(out.data() + i * kHashSize, hashes[i].data(), kHashSize);
  }
  return out;
}

}  // namespace

Result<std::int64_t> tile_position(TileKey key) {
  constexpr int kPositionBits = 59;  // tree sizes up to 2^59, times 16, fit an int64
  const int shift = kTileHeight * (key.level + 1);
  if (key.level < 0 || shift >= kPositionBits ||
      key.index >= (std::uint64_t{1} << (kPositionBits - shift)) - 1)
    return Status::InvalidArgument(
        fmt::format("{} lies beyond 2^{} leaves", tile_name(key), kPositionBits));
  const std::uint64_t completes_at = (key.index + 1) << shift;
  return static_cast<std::int64_t>(completes_at * 16 + static_cast<std::uint64_t>(key.level));
}

Result<TileKey> tile_at_position(std::int64_t position) {
  const auto p = static_cast<std::uint64_t>(position);
  const int level = static_cast<int>(p % 16);
  const std::uint64_t completes_at = p / 16;
  const int shift = kTileHeight * (level + 1);
  if (position <= 0 || shift >= 64 || completes_at % (std::uint64_t{1} << shift) != 0 ||
      completes_at == 0)
    return Status::Corruption(fmt::format("no Merkle tile is stored at position {}", position));
  return TileKey{level, (completes_at >> shift) - 1};
}

Hash tile_root(ByteView complete_tile) {
  assert(complete_tile.size() == kTileWidth * kHashSize);
  std::array<Hash, kTileWidth> row;
  for (std::size_t i = 0; i < kTileWidth; ++i) row[i] = hash_at(complete_tile, i);
  for (std::size_t width = kTileWidth; width > 1; width /= 2)
    for (std::size_t i = 0; i < width / 2; ++i)
      row[i] = merkle::node_hash(row[2 * i], row[2 * i + 1]);
  return row[0];
}

merkle::NodeSource node_source(TileReader reader) {
  struct LastTile {
    std::mutex mu;
    std::optional<TileKey> key;
    Bytes blob;  // already checked by tile_hash_count
  };
  auto last = std::make_shared<LastTile>();
  return [reader = std::move(reader), last](int level, std::uint64_t index) -> Result<Hash> {
    // Outside input may reach here through a caller; a node must lie within 2^64 leaves.
    if (level < 0 || level > 63 || (level > 0 && (index >> (64 - level)) != 0)) {
      return Status::InvalidArgument(fmt::format("no Merkle node ({}, {})", level, index));
    }
    const int rise = level % kTileHeight;       // levels to hash up inside the tile
    const std::uint64_t first = index << rise;  // first level-4t descendant
    const TileKey key{level / kTileHeight, first / kTileWidth};
    const std::size_t begin = first % kTileWidth;
    const std::size_t end = begin + (std::size_t{1} << rise);

    std::array<Hash, 8> row;  // the 2^rise hashes at the tile's level, hashed up in place
    const auto take = [&](ByteView blob) {
      for (std::size_t i = begin; i < end; ++i) row[i - begin] = hash_at(blob, i);
    };
    bool cached = false;
    {
      std::lock_guard lock(last->mu);
      if (last->key == key && last->blob.size() >= end * kHashSize) {
        take(last->blob);
        cached = true;
      }
    }
    if (!cached) {
      Result<Bytes> blob = reader(key.level, key.index);
      if (!blob.ok()) return blob.status().with_context(tile_name(key));
      MEDGATE_ASSIGN_OR_RETURN(std::size_t count, tile_hash_count(key, *blob));
      if (count < end) {
        return Status::Corruption(
            fmt::format("{}: holds {} hashes, but node ({}, {}) needs hashes {}..{}",
                        tile_name(key), count, level, index, begin, end - 1));
      }
      take(*blob);
      std::lock_guard lock(last->mu);
      last->key = key;
      last->blob = std::move(blob).value();
    }
    for (std::size_t width = end - begin; width > 1; width /= 2) {
      for (std::size_t i = 0; i < width / 2; ++i) {
        row[i] = merkle::node_hash(row[2 * i], row[2 * i + 1]);
      }
    }
    return row[0];
  };
}

Result<TileBuilder> TileBuilder::load(std::uint64_t size, const TileReader& reader) {
  TileBuilder builder;
  MEDGATE_ASSIGN_OR_RETURN(builder.range_,
                           merkle::CompactRange::for_size(size, node_source(reader)));
  for (int t = 0; t <= kMaxTileLevel && (size >> (kTileHeight * t)) != 0; ++t) {
    const std::uint64_t nodes = size >> (kTileHeight * t);  // complete nodes at level 4t
    const std::size_t count = nodes % kTileWidth;           // of which in the partial tile
    PartialTile& partial = builder.partial_.emplace_back();
    if (count == 0) continue;
    const TileKey key{t, nodes / kTileWidth};
    Result<Bytes> blob = reader(key.level, key.index);
    if (!blob.ok()) return blob.status().with_context(tile_name(key));
    MEDGATE_ASSIGN_OR_RETURN(std::size_t stored, tile_hash_count(key, *blob));
    if (stored < count) {
      return Status::Corruption(fmt::format("{}: holds {} hashes, a tree of {} leaves needs {}",
                                            tile_name(key), stored, size, count));
    }
    for (std::size_t i = 0; i < count; ++i) partial.hashes.push_back(hash_at(*blob, i));
    partial.dirty = stored > count;  // drop the hashes beyond `size` from the store
  }
  return builder;
}

void TileBuilder::add_node(int tile_level, std::uint64_t index, const Hash& hash) {
  const auto t = static_cast<std::size_t>(tile_level);
  if (partial_.size() <= t) partial_.resize(t + 1);
  PartialTile& partial = partial_[t];
  assert(index % kTileWidth == partial.hashes.size());  // nodes arrive in order at each level
  partial.hashes.push_back(hash);
  partial.dirty = true;
  if (partial.hashes.size() == kTileWidth) {
    completed_.emplace_back(TileKey{tile_level, index / kTileWidth}, serialize(partial.hashes));
    partial.hashes.clear();
    partial.dirty = false;
  }
}

void TileBuilder::append(const Hash& leaf) {
  add_node(0, range_.size(), leaf);
  range_.append(leaf, [this](int level, std::uint64_t index, const Hash& hash) {
    if (level % kTileHeight == 0) add_node(level / kTileHeight, index, hash);
  });
}

std::vector<std::pair<TileKey, Bytes>> TileBuilder::take_completed() {
  return std::exchange(completed_, {});
}

std::vector<std::pair<TileKey, Bytes>> TileBuilder::take_dirty() {
  std::vector<std::pair<TileKey, Bytes>> dirty = std::move(completed_);
  completed_.clear();
  for (std::size_t t = 0; t < partial_.size(); ++t) {
    PartialTile& partial = partial_[t];
    if (!partial.dirty || partial.hashes.empty()) continue;
    const int level = static_cast<int>(t);
    const std::uint64_t nodes = size() >> (kTileHeight * level);
    dirty.emplace_back(TileKey{level, nodes / kTileWidth}, serialize(partial.hashes));
    partial.dirty = false;
  }
  return dirty;
}

}  // namespace medgate::ledger
