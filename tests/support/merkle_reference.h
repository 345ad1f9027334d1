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

}  // namespace medgate::testing::merkle_reference
