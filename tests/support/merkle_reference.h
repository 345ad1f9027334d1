// A naive RFC 9162 section 2.1 reference for tests, transcribed from the recursive definitions
// (MTH, PATH, SUBPROOF) and deliberately unlike ledger/merkle.cc's iterative code.
#pragma once

#include <bit>
#include <span>
#include <vector>

#include "ledger/merkle.h"

namespace medgate::testing::merkle_reference {

using Leaves = std::span<const Hash>;

inline std::uint64_t split(std::uint64_t n) { return std::bit_floor(n - 1); }

inline Hash mth(Leaves d) {
  if (d.empty()) return ledger::merkle::empty_root();
  if (d.size() == 1) return d[0];
  auto k = split(d.size());
  return ledger::merkle::node_hash(mth(d.first(k)), mth(d.subspan(k)));
}

inline std::vector<Hash> path(std::uint64_t m, Leaves d) {
  if (d.size() <= 1) return {};
  auto k = split(d.size());
  std::vector<Hash> p = m < k ? path(m, d.first(k)) : path(m - k, d.subspan(k));
  p.push_back(m < k ? mth(d.subspan(k)) : mth(d.first(k)));
  return p;
}

inline std::vector<Hash> subproof(std::uint64_t m, Leaves d, bool b) {
  if (m == d.size()) return b ? std::vector<Hash>{} : std::vector<Hash>{mth(d)};
  auto k = split(d.size());
  std::vector<Hash> p = m <= k ? subproof(m, d.first(k), b) : subproof(m - k, d.subspan(k), false);
  p.push_back(m <= k ? mth(d.subspan(k)) : mth(d.first(k)));
  return p;
}

// The multi-leaf proof for the leaves at `indexes` (ascending, relative to d) as its definition
// says (ledger/merkle.h): the MTH of every maximal subtree holding none of them, left to right.
inline std::vector<Hash> multiproof(std::span<const std::uint64_t> indexes, Leaves d,
                                    std::uint64_t offset = 0) {
  std::vector<std::uint64_t> inside;
  for (std::uint64_t i : indexes)
    if (i >= offset && i < offset + d.size()) inside.push_back(i);
  if (inside.empty()) return {mth(d)};
  if (d.size() == 1) return {};
  auto k = split(d.size());
  std::vector<Hash> p = multiproof(inside, d.first(k), offset);
  std::vector<Hash> right = multiproof(inside, d.subspan(k), offset + k);
  p.insert(p.end(), right.begin(), right.end());
  return p;
}

}  // namespace medgate::testing::merkle_reference
