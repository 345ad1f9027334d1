// LEDGER-CRITICAL: see block_record.h.
#include "ledger/block_record.h"

#include <map>

#include <fmt/format.h>

#include "ledger/cbor.h"
#include "ledger/entry.h"

namespace medgate::ledger {
namespace {

constexpr std::string_view kWhat = "block record";

std::string short_id(const KeyId& id) {
  return to_hex(ByteView(id.data(), 8));
}

}  // namespace

Bytes encode_block_record(const BlockRecord& r) {
  cbor::Writer w;
  w.map_header(7);
  w.uint(0), w.uint(static_cast<std::uint64_t>(ObjectKind::kBlockRecord));
  w.uint(1), w.uint(kBlockRecordVersion);
  w.uint(2), w.bytes(r.header_bytes);
  w.uint(3), w.array_header(r.entries.size());
  for (const Bytes& e : r.entries) w.bytes(e);
  w.uint(4), w.text(r.proposer);
  w.uint(5), w.bytes(r.signature);
  w.uint(6), w.array_header(2);
  w.uint(r.outbox_first), w.uint(r.outbox_count);
  return w.take();
}

Result<BlockRecord> decode_block_record(ByteView bytes) {
  MEDGATE_ASSIGN_OR_RETURN(cbor::Value v, cbor::decode(bytes));
  const cbor::Map* map = v.as_map();
  if (!map) return Status::Corruption(fmt::format("{} is not a CBOR map", kWhat));
  if (map->size() != 7)
    return Status::Corruption(fmt::format("{} has {} fields, expected 7", kWhat, map->size()));
  for (std::uint64_t i = 0; i < 7; ++i)
    if ((*map)[i].first.as_uint() != i)
      return Status::Corruption(fmt::format("{} lacks field {}", kWhat, i));
  if (v.find(std::uint64_t{0})->as_uint() != static_cast<std::uint64_t>(ObjectKind::kBlockRecord))
    return Status::Corruption(fmt::format("object is not a {} (key 0)", kWhat));
  if (v.find(std::uint64_t{1})->as_uint() != kBlockRecordVersion)
    return Status::Corruption(fmt::format("{} version is not supported by this build", kWhat));

  BlockRecord r;
  const Bytes* header = v.find(std::uint64_t{2})->as_bytes();
  if (!header) return Status::Corruption(fmt::format("{} field 2 is not bytes", kWhat));
  r.header_bytes = *header;
  auto decoded = decode_block_header(r.header_bytes);
  if (!decoded.ok()) return decoded.status().with_context(kWhat);
  r.header = std::move(*decoded);

  const cbor::Array* entries = v.find(std::uint64_t{3})->as_array();
  if (!entries) return Status::Corruption(fmt::format("{} field 3 is not an array", kWhat));
  if (entries->empty()) return Status::Corruption(fmt::format("{} holds no entries", kWhat));
  if (entries->size() != r.header.entry_count)
    return Status::Corruption(fmt::format("{} holds {} entries but its header counts {}", kWhat,
                                          entries->size(), r.header.entry_count));
  r.entries.reserve(entries->size());
  for (std::size_t i = 0; i < entries->size(); ++i) {
    const Bytes* e = (*entries)[i].as_bytes();
    if (!e) return Status::Corruption(fmt::format("{} entry {} is not bytes", kWhat, i));
    r.entries.push_back(*e);
  }
  const std::string* proposer = v.find(std::uint64_t{4})->as_text();
  if (!proposer || !valid_member_id(*proposer))
    return Status::Corruption(fmt::format("{} field 4 is not a member id", kWhat));
  r.proposer = *proposer;
  const Bytes* signature = v.find(std::uint64_t{5})->as_bytes();
  if (!signature || signature->empty())
    return Status::Corruption(fmt::format("{} field 5 is not a signature", kWhat));
  r.signature = *signature;
  const cbor::Array* outbox = v.find(std::uint64_t{6})->as_array();
  if (!outbox || outbox->size() != 2 || !(*outbox)[0].as_uint() || !(*outbox)[1].as_uint())
    return Status::Corruption(fmt::format("{} field 6 is not [first, count]", kWhat));
  r.outbox_first = *(*outbox)[0].as_uint();
  r.outbox_count = *(*outbox)[1].as_uint();
  return r;
}

Result<ChainTip> validate_genesis_record(const BlockRecord& r, const PublicKey& founder) {
  const BlockHeader& h = r.header;
  auto bad = [](std::string reason) {
    return Status::VerificationFailed(fmt::format("block 0 {}", reason));
  };
  if (h.height != 0) return bad(fmt::format("says it is block {}", h.height));
  if (h.previous_hash != Hash{}) return bad("names a previous block");
  if (h.first_index != 0 || h.entry_count != 1 || r.entries.size() != 1)
    return bad("does not hold exactly the genesis entry");
  auto decoded = decode_entry(r.entries[0]);
  if (!decoded.ok())
    return bad(fmt::format("entry 0 does not decode: {}", decoded.status().message()));
  if (decoded->type != EntryType::kGenesis) return bad("entry 0 is not a genesis entry");
  const std::string* ledger_id = decoded->body.find("ledger_id")->as_text();
  if (!ledger_id || *ledger_id != h.ledger_id)
    return bad("entry 0 names another ledger than the header");
  auto genesis_key = PublicKey::from_spki_der(*decoded->body.find("public_key")->as_bytes());
  if (!genesis_key.ok() || genesis_key->id() != h.key_id)
    return bad("entry 0's key is not the key the header names");
  ChainTip tip;
  tip.ledger_id = h.ledger_id;
  tip.height = 0;
  tip.tree.append(merkle::leaf_hash(r.entries[0]));
  if (tip.tree.root() != h.root || h.tree_size != 1)
    return bad("has a Merkle root that its entry does not give");
  if (!founder.verify_digest(block_hash(r.header_bytes), r.signature).ok())
    return bad("has a signature that does not verify with the trusted founder's key");
  tip.block_hash = block_hash(r.header_bytes);
  tip.time_us = h.time_us;
  tip.active_key = std::move(genesis_key).value();
  tip.founder_key = founder;
  return tip;
}

Result<ValidatedBlock> validate_block_record(const BlockRecord& r, const ChainTip& tip,
                                             const Membership& membership,
                                             const LatestOfSubject& latest_of) {
  const BlockHeader& h = r.header;
  const std::uint64_t height = tip.height + 1;
  auto bad = [&](std::string reason) {
    return Status::VerificationFailed(fmt::format("block {} {}", height, reason));
  };
  if (h.ledger_id != tip.ledger_id) return bad("belongs to another ledger");
  if (h.height != height) return bad(fmt::format("says it is block {}", h.height));
  if (h.previous_hash != tip.block_hash)
    return bad(fmt::format("does not chain to block {}", tip.height));
  if (h.first_index != tip.tree.size())
    return bad(fmt::format("starts at entry {}, but the tree holds {} entries", h.first_index,
                           tip.tree.size()));
  if (h.entry_count != r.entries.size())
    return bad(fmt::format("counts {} entries but holds {}", h.entry_count, r.entries.size()));
  if (h.time_us < tip.time_us) return bad(fmt::format("is older than block {}", tip.height));

  if (!membership.founded()) {
    // The ledger's history from before it was replicated, published by its founder.
    if (!tip.founder_key)
      return bad("extends a ledger whose membership is not founded, and no founder key is trusted");
    if (!tip.active_key || h.key_id != tip.active_key->id())
      return bad(fmt::format("names key {}, not the ledger's active key", short_id(h.key_id)));
    if (!tip.founder_key->verify_digest(block_hash(r.header_bytes), r.signature).ok())
      return bad("has a signature that does not verify with the founder's key");
  } else {
    // The proposer: a member at the previous height, whose current key the header names.
    const Member* proposer = membership.find(r.proposer);
    if (!proposer)
      return bad(fmt::format("is proposed by \"{}\", which is not a member at height {}",
                             r.proposer, tip.height));
    if (proposer->signing_key.id() != h.key_id) {
      const Member* holder = membership.find_by_key(h.key_id);
      return bad(holder ? fmt::format("names the key of \"{}\", not of its proposer \"{}\"",
                                      holder->id, r.proposer)
                        : fmt::format("is signed by a key that is not a member's at height {} ({})",
                                      tip.height, short_id(h.key_id)));
    }
    if (!proposer->signing_key.verify_digest(block_hash(r.header_bytes), r.signature).ok())
      return bad(
          fmt::format("has a signature that does not verify with the key of \"{}\"", r.proposer));
  }

  ValidatedBlock out{tip, membership, {}, {}, {}, {}};
  out.entries.reserve(r.entries.size());
  out.leaves.reserve(r.entries.size());
  // Subjects named earlier in this block, and their newest index in it.
  std::map<Bytes, std::uint64_t> in_block;
  for (std::size_t i = 0; i < r.entries.size(); ++i) {
    const std::uint64_t index = h.first_index + i;
    auto entry_bad = [&](std::string reason) {
      return bad(fmt::format("entry {} {}", index, reason));
    };
    auto decoded = decode_entry(r.entries[i]);
    if (!decoded.ok())
      return entry_bad(fmt::format("does not decode: {}", decoded.status().message()));
    const Entry& e = *decoded;
    if (e.type == EntryType::kGenesis) return entry_bad("is a second genesis");

    if (e.type == EntryType::kKeyTransition) {
      const Bytes& old_id_bytes = *e.body.find("old_key_id")->as_bytes();
      KeyId old_id{};
      std::copy(old_id_bytes.begin(), old_id_bytes.end(), old_id.begin());
      const Member* holder = out.membership.find_by_key(old_id);
      const bool founded = out.membership.founded();
      if (founded && !holder) return entry_bad("rotates a key that is not a member's");
      if (!founded && (!out.tip.active_key || old_id != out.tip.active_key->id()))
        return entry_bad("rotates a key that is not the ledger's active key");
      auto new_key = PublicKey::from_spki_der(*e.body.find("new_public_key")->as_bytes());
      if (!new_key.ok()) return entry_bad("names a new key that is not a P-256 public key");
      const Bytes& new_id_bytes = *e.body.find("new_key_id")->as_bytes();
      if (!std::equal(new_id_bytes.begin(), new_id_bytes.end(), new_key->id().begin()))
        return entry_bad("names a new key id that is not its new key's");
      const Hash digest =
          sha256(encode_key_transition_statement(tip.ledger_id, old_id, new_key->id()));
      const PublicKey& old_key = founded ? holder->signing_key : *out.tip.active_key;
      if (!old_key.verify_digest(digest, *e.body.find("old_signature")->as_bytes()).ok())
        return entry_bad("is a key transition whose old-key signature does not verify");
      if (!new_key->verify_digest(digest, *e.body.find("new_signature")->as_bytes()).ok())
        return entry_bad("is a key transition whose new-key signature does not verify");
      out.membership.apply_key_transition(old_id, *new_key);
      if (out.tip.active_key && out.tip.active_key->id() == old_id) out.tip.active_key = *new_key;
    } else if (e.type == EntryType::kMemberProposal || e.type == EntryType::kMemberApproval) {
      // Only the holder of the active key founds (at epoch 0); later changes need members.
      auto change =
          out.membership.apply(e, index, out.tip.active_key ? out.tip.active_key->id() : KeyId{});
      if (!change.ok()) return entry_bad(change.status().message());
      if (change->took_effect) out.changes.push_back(std::move(*change));
    }

    // The history from before founding may hold entries of an older format; members write
    // version 2, whose subject links every replica computes alike.
    if (e.version < 2 && out.membership.founded())
      return entry_bad("is format version 1 (replicated entries are version 2)");
    {
      for (const SubjectLink& link : e.subjects) {
        std::optional<std::uint64_t> expected;
        if (auto it = in_block.find(link.subject); it != in_block.end()) {
          expected = it->second;
        } else if (latest_of) {
          expected = latest_of(link.subject);
        }
        if (link.previous != expected)
          return entry_bad(fmt::format("links a subject to entry {}, but its previous entry is {}",
                                       link.previous ? std::to_string(*link.previous) : "none",
                                       expected ? std::to_string(*expected) : "none"));
      }
    }
    for (const SubjectLink& link : e.subjects) in_block[link.subject] = index;
    const Hash leaf = merkle::leaf_hash(r.entries[i]);
    out.tip.tree.append(leaf);
    out.leaves.push_back(leaf);
    out.entries.push_back(std::move(decoded).value());
  }
  if (out.tip.tree.size() != h.tree_size || out.tip.tree.root() != h.root)
    return bad("has a Merkle root that its entries do not give");

  out.tip.height = height;
  out.tip.block_hash = block_hash(r.header_bytes);
  out.tip.time_us = h.time_us;
  out.subject_updates.assign(in_block.begin(), in_block.end());
  return out;
}

}  // namespace medgate::ledger
