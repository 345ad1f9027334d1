// What every fuzz target shares: the input cap and the failure that libFuzzer reports as a crash.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <span>

#include "hsm/bytes.h"

namespace medgate::fuzz {

// Larger inputs teach nothing new and make each run slow; ctest also passes -max_len=65536.
inline constexpr std::size_t kMaxInput = 64 * 1024;

inline ByteView bytes_of(const std::uint8_t* data, std::size_t size) {
  return {reinterpret_cast<const std::byte*>(data), size};
}

}  // namespace medgate::fuzz

// A broken property: say which, then trap so libFuzzer saves the input as crash-<sha1>.
#define FUZZ_CHECK(cond, ...)                                   \
  do {                                                          \
    if (!(cond)) {                                              \
      std::fprintf(stderr, "FUZZ_CHECK failed: %s\n  ", #cond); \
      std::fprintf(stderr, __VA_ARGS__);                        \
      std::fprintf(stderr, "\n");                               \
      __builtin_trap();                                         \
    }                                                           \
  } while (false)
