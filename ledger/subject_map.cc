// LEDGER-CRITICAL: see subject_map.h. The leaf encoding and tree shape here are signed in every
// version-2 head.
#include "ledger/subject_map.h"

#include <algorithm>

#include <fmt/format.h>

#include "ledger/cbor.h"
#include "ledger/entry.h"
#include "ledger/merkle.h"

namespace medgate::ledger {
namespace {

// Root of the perfect subtree of `hashes` at (level, index).
Hash subtree(const std::vector<Hash>& hashes, int level, std::uint64_t index) {
  if (level == 0) return hashes[index];
  return merkle::node_hash(subtree(hashes, level - 1, 2 * index),
                           subtree(hashes, level - 1, 2 * index + 1));
}

Bytes to_owned(ByteView b) {
  return Bytes(b.begin(), b.end());
}

std::string short_hex(ByteView b) {
  return to_hex(b.first(std::min<std::size_t>(b.size(), 8)));
}

}  // namespace

Bytes encode_subject_map_leaf(ByteView subject, std::uint64_t latest) {
  cbor::Writer w;
  w.map_header(4);
  w.uint(0), w.uint(static_cast<std::uint64_t>(ObjectKind::kSubjectMapLeaf));
  w.uint(1), w.uint(kSubjectMapLeafVersion);
  w.uint(2), w.bytes(subject);
  w.uint(3), w.uint(latest);
  return w.take();
}

Hash subject_map_leaf_hash(ByteView subject, std::uint64_t latest) {
  return merkle::leaf_hash(encode_subject_map_leaf(subject, latest));
}

void SubjectMap::update(ByteView subject, std::uint64_t index) {
  Leaf& leaf = leaves_[to_owned(subject)];
  leaf.latest = index;
  leaf.hash = subject_map_leaf_hash(subject, index);
  root_.reset();
}

std::optional<std::uint64_t> SubjectMap::latest(ByteView subject) const {
  auto it = leaves_.find(to_owned(subject));
  if (it == leaves_.end()) return std::nullopt;
  return it->second.latest;
}

Hash SubjectMap::root() const {
  if (!root_) {
    merkle::CompactRange range;
    for (const auto& [subject, leaf] : leaves_) range.append(leaf.hash);
    root_ = leaves_.empty() ? merkle::empty_root() : range.root();
  }
  return *root_;
}

SubjectMapProof SubjectMap::prove(ByteView subject) const {
  SubjectMapProof proof;
  proof.count = leaves_.size();
  std::vector<Hash> hashes;
  hashes.reserve(leaves_.size());
  for (const auto& [s, leaf] : leaves_) hashes.push_back(leaf.hash);
  merkle::NodeSource nodes = [&hashes](int level, std::uint64_t index) -> Result<Hash> {
    return subtree(hashes, level, index);
  };
  auto leaf_proof = [&](std::map<Bytes, Leaf>::const_iterator it) {
    SubjectMapLeafProof p;
    p.subject = it->first;
    p.latest = it->second.latest;
    p.position = static_cast<std::uint64_t>(std::distance(leaves_.begin(), it));
    // Cannot fail: position < count and every node lies inside the tree.
    p.path = merkle::inclusion_proof(p.position, proof.count, nodes).value();
    return p;
  };
  Bytes key = to_owned(subject);
  auto it = leaves_.lower_bound(key);
  if (it != leaves_.end() && it->first == key) {
    proof.match = leaf_proof(it);
    return proof;
  }
  if (it != leaves_.end()) proof.above = leaf_proof(it);
  if (it != leaves_.begin()) proof.below = leaf_proof(std::prev(it));
  return proof;
}

Result<std::optional<std::uint64_t>> verify_subject_map_proof(ByteView subject, const Hash& root,
                                                              std::uint64_t count,
                                                              const SubjectMapProof& proof) {
  auto fail = [](std::string why) { return Status::VerificationFailed("subject map: " + why); };
  if (proof.count != count)
    return fail(
        fmt::format("the proof is for {} leaves but the head's map has {}", proof.count, count));
  auto check = [&](const SubjectMapLeafProof& p, std::string_view which) -> Status {
    Status s = merkle::verify_inclusion(p.position, count,
                                        subject_map_leaf_hash(p.subject, p.latest), p.path, root);
    if (!s.ok())
      return fail(fmt::format("the {} leaf (position {}) is not in the head's map: {}", which,
                              p.position, s.message()));
    return Status::Ok();
  };
  std::string_view s(reinterpret_cast<const char*>(subject.data()), subject.size());
  auto view = [](const Bytes& b) {
    return std::string_view(reinterpret_cast<const char*>(b.data()), b.size());
  };
  if (proof.match) {
    if (proof.below || proof.above) return fail("the proof both includes and excludes the subject");
    MEDGATE_RETURN_IF_ERROR(check(*proof.match, "subject's"));
    if (view(proof.match->subject) != s)
      return fail(fmt::format("the proved leaf is for subject {}, not {}",
                              short_hex(proof.match->subject), short_hex(subject)));
    return std::optional<std::uint64_t>(proof.match->latest);
  }
  // Absence: the neighbours in sorted order enclose the subject and are adjacent.
  if (count == 0) {
    if (proof.below || proof.above) return fail("an empty map has no leaves to show");
    if (root != merkle::empty_root())
      return fail("the map is said to be empty but its root is not");
    return std::optional<std::uint64_t>();
  }
  if (!proof.below && !proof.above)
    return fail("the proof shows neither the subject nor its neighbours");
  if (proof.below) {
    MEDGATE_RETURN_IF_ERROR(check(*proof.below, "lower neighbour"));
    if (!(view(proof.below->subject) < s))
      return fail("the lower neighbour does not sort below the subject");
  } else if (proof.above->position != 0) {
    return fail("no lower neighbour, but the upper one is not the first leaf");
  }
  if (proof.above) {
    MEDGATE_RETURN_IF_ERROR(check(*proof.above, "upper neighbour"));
    if (!(s < view(proof.above->subject)))
      return fail("the upper neighbour does not sort above the subject");
  } else if (proof.below->position + 1 != count) {
    return fail("no upper neighbour, but the lower one is not the last leaf");
  }
  if (proof.below && proof.above && proof.below->position + 1 != proof.above->position)
    return fail("the neighbours are not adjacent leaves");
  return std::optional<std::uint64_t>();
}

}  // namespace medgate::ledger
