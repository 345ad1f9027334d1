// LEDGER-CRITICAL: see block.h. The encodings written here are the ones that are hashed and signed.
#include "ledger/block.h"

#include <fmt/format.h>

#include "ledger/cbor.h"
#include "ledger/entry.h"

namespace medgate::ledger {
namespace {

// Reads a fixed-shape canonical map with unsigned keys 0..n-1, all present.
// `key_count_of(version)` gives the number of keys a version has, 0 for a version this build does
// not read.
Result<cbor::Value> decode_fixed_map(ByteView bytes, ObjectKind kind,
                                     std::uint64_t (*key_count_of)(std::uint64_t version),
                                     std::string_view what) {
  MEDGATE_ASSIGN_OR_RETURN(cbor::Value v, cbor::decode(bytes));
  const cbor::Map* map = v.as_map();
  if (!map) return Status::Corruption(fmt::format("{} is not a CBOR map", what));
  // The version decides the shape, so read it first (key 1, if the map has one).
  std::optional<std::uint64_t> got;
  if (map->size() >= 2 && (*map)[1].first.as_uint() == 1u) got = (*map)[1].second.as_uint();
  // Version 0 is never a real version: key_count_of(0) only gives the shape to report against.
  std::uint64_t key_count = got && *got != 0 ? key_count_of(*got) : 0;
  if (got && key_count == 0 && (*map)[0].second.as_uint() == static_cast<std::uint64_t>(kind))
    return Status::Corruption(
        fmt::format("{} version {} is not supported by this build", what, *got));
  if (key_count == 0) key_count = key_count_of(0);
  if (map->size() != key_count)
    return Status::Corruption(
        fmt::format("{} has {} fields, expected {}", what, map->size(), key_count));
  for (std::uint64_t i = 0; i < key_count; ++i)
    if ((*map)[i].first.as_uint() != i)
      return Status::Corruption(fmt::format("{} lacks field {}", what, i));
  if ((*map)[0].second.as_uint() != static_cast<std::uint64_t>(kind))
    return Status::Corruption(fmt::format("object is not a {} (key 0)", what));
  if (!got) return Status::Corruption(fmt::format("{} has no version", what));
  return v;
}

Result<std::uint64_t> field_uint(const cbor::Value& v, std::uint64_t key, std::string_view what) {
  auto u = v.find(key)->as_uint();
  if (!u)
    return Status::Corruption(fmt::format("{} field {} is not an unsigned integer", what, key));
  return *u;
}

Result<Hash> field_hash(const cbor::Value& v, std::uint64_t key, std::string_view what) {
  const Bytes* b = v.find(key)->as_bytes();
  if (!b || b->size() != 32)
    return Status::Corruption(fmt::format("{} field {} is not 32 bytes", what, key));
  Hash h;
  std::copy(b->begin(), b->end(), h.begin());
  return h;
}

Result<std::string> field_text(const cbor::Value& v, std::uint64_t key, std::string_view what) {
  const std::string* t = v.find(key)->as_text();
  if (!t || t->empty())
    return Status::Corruption(fmt::format("{} field {} is not a non-empty text", what, key));
  return *t;
}

}  // namespace

Bytes encode_block_header(const BlockHeader& h) {
  cbor::Writer w;
  w.map_header(11);
  w.uint(0), w.uint(static_cast<std::uint64_t>(ObjectKind::kBlockHeader));
  w.uint(1), w.uint(h.version);
  w.uint(2), w.text(h.ledger_id);
  w.uint(3), w.uint(h.height);
  w.uint(4), w.bytes(h.previous_hash);
  w.uint(5), w.uint(h.first_index);
  w.uint(6), w.uint(h.entry_count);
  w.uint(7), w.uint(h.tree_size);
  w.uint(8), w.bytes(h.root);
  w.uint(9), w.uint(h.time_us);
  w.uint(10), w.bytes(h.key_id);
  return w.take();
}

Result<BlockHeader> decode_block_header(ByteView bytes) {
  constexpr std::string_view what = "block header";
  MEDGATE_ASSIGN_OR_RETURN(cbor::Value v,
                           decode_fixed_map(
                               bytes, ObjectKind::kBlockHeader,
                               [](std::uint64_t version) -> std::uint64_t {
                                 // Version 0 asks for the shape to report a wrong field count
                                 // against.
                                 return version == kBlockFormatVersion || version == 0 ? 11 : 0;
                               },
                               what));
  BlockHeader h;
  MEDGATE_ASSIGN_OR_RETURN(h.ledger_id, field_text(v, 2, what));
  MEDGATE_ASSIGN_OR_RETURN(h.height, field_uint(v, 3, what));
  MEDGATE_ASSIGN_OR_RETURN(h.previous_hash, field_hash(v, 4, what));
  MEDGATE_ASSIGN_OR_RETURN(h.first_index, field_uint(v, 5, what));
  MEDGATE_ASSIGN_OR_RETURN(h.entry_count, field_uint(v, 6, what));
  MEDGATE_ASSIGN_OR_RETURN(h.tree_size, field_uint(v, 7, what));
  MEDGATE_ASSIGN_OR_RETURN(h.root, field_hash(v, 8, what));
  MEDGATE_ASSIGN_OR_RETURN(h.time_us, field_uint(v, 9, what));
  MEDGATE_ASSIGN_OR_RETURN(h.key_id, field_hash(v, 10, what));
  if (h.entry_count == 0) return Status::Corruption("block header has no entries");
  if (h.first_index + h.entry_count != h.tree_size || h.tree_size < h.first_index)
    return Status::Corruption(fmt::format("block header: first index {} + count {} != tree size {}",
                                          h.first_index, h.entry_count, h.tree_size));
  return h;
}

Bytes encode_head(const HeadBody& h) {
  cbor::Writer w;
  w.map_header(h.version >= 2 ? 12 : 10);
  w.uint(0), w.uint(static_cast<std::uint64_t>(ObjectKind::kSignedHead));
  w.uint(1), w.uint(h.version);
  w.uint(2), w.text(h.ledger_id);
  w.uint(3), w.uint(h.height);
  w.uint(4), w.bytes(h.block_hash);
  w.uint(5), w.uint(h.tree_size);
  w.uint(6), w.bytes(h.root);
  w.uint(7), w.uint(h.time_us);
  w.uint(8), w.bytes(h.key_id);
  w.uint(9), w.uint(h.rollback_counter);
  if (h.version >= 2) {
    w.uint(10), w.bytes(h.subject_root);
    w.uint(11), w.uint(h.subject_count);
  }
  return w.take();
}

Result<HeadBody> decode_head(ByteView bytes) {
  constexpr std::string_view what = "signed head";
  MEDGATE_ASSIGN_OR_RETURN(cbor::Value v, decode_fixed_map(
                                              bytes, ObjectKind::kSignedHead,
                                              [](std::uint64_t version) -> std::uint64_t {
                                                if (version == 1) return 10;
                                                if (version == 2 || version == 0) return 12;
                                                return 0;
                                              },
                                              what));
  HeadBody h;
  h.version = *v.find(std::uint64_t{1})->as_uint();
  MEDGATE_ASSIGN_OR_RETURN(h.ledger_id, field_text(v, 2, what));
  MEDGATE_ASSIGN_OR_RETURN(h.height, field_uint(v, 3, what));
  MEDGATE_ASSIGN_OR_RETURN(h.block_hash, field_hash(v, 4, what));
  MEDGATE_ASSIGN_OR_RETURN(h.tree_size, field_uint(v, 5, what));
  MEDGATE_ASSIGN_OR_RETURN(h.root, field_hash(v, 6, what));
  MEDGATE_ASSIGN_OR_RETURN(h.time_us, field_uint(v, 7, what));
  MEDGATE_ASSIGN_OR_RETURN(h.key_id, field_hash(v, 8, what));
  MEDGATE_ASSIGN_OR_RETURN(h.rollback_counter, field_uint(v, 9, what));
  if (h.version >= 2) {
    MEDGATE_ASSIGN_OR_RETURN(h.subject_root, field_hash(v, 10, what));
    MEDGATE_ASSIGN_OR_RETURN(h.subject_count, field_uint(v, 11, what));
  }
  return h;
}

Bytes encode_key_transition_statement(const std::string& ledger_id, const KeyId& old_key,
                                      const KeyId& new_key) {
  cbor::Writer w;
  w.map_header(5);
  w.uint(0), w.uint(static_cast<std::uint64_t>(ObjectKind::kKeyTransition));
  w.uint(1), w.uint(kKeyTransitionFormatVersion);
  w.uint(2), w.text(ledger_id);
  w.uint(3), w.bytes(old_key);
  w.uint(4), w.bytes(new_key);
  return w.take();
}

}  // namespace medgate::ledger
