// Byte vocabulary shared by every layer: owned bytes, borrowed bytes, SHA-256 digests, hex.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace medgate {

using Bytes = std::vector<std::byte>;
using ByteView = std::span<const std::byte>;
using Hash = std::array<std::byte, 32>;  // a SHA-256 digest

inline ByteView as_bytes(std::string_view s) {
  return {reinterpret_cast<const std::byte*>(s.data()), s.size()};
}
inline const unsigned char* u8(ByteView b) {
  return reinterpret_cast<const unsigned char*>(b.data());
}
inline unsigned char* u8(std::span<std::byte> b) {
  return reinterpret_cast<unsigned char*>(b.data());
}
inline Bytes to_bytes(std::string_view s) {
  auto v = as_bytes(s);
  return {v.begin(), v.end()};
}
inline std::string to_string(ByteView b) {
  return {reinterpret_cast<const char*>(b.data()), b.size()};
}

std::string to_hex(ByteView bytes);
// Accepts upper or lower case; nullopt on odd length or a non-hex character.
std::optional<Bytes> from_hex(std::string_view hex);
std::optional<Hash> hash_from_hex(std::string_view hex);

std::string to_base64(ByteView bytes);
std::optional<Bytes> from_base64(std::string_view b64);

Hash sha256(ByteView data);

// Overwrites memory that held a secret (PIN, key material) so it does not linger.
void secure_wipe(std::span<std::byte> bytes);
void secure_wipe(std::string& s);

}  // namespace medgate
