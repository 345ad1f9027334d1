// Symmetric building blocks shared by the key stores, the sealed box and the vault: HKDF-SHA256
// (RFC 5869) and AES-256-GCM with a random 96-bit IV, all through OpenSSL.
//
// Thread safety: pure functions.
#pragma once

#include <cstddef>
#include <span>
#include <string_view>

#include "hsm/bytes.h"
#include "hsm/status.h"

namespace medgate::hsm {

inline constexpr std::size_t kGcmIvBytes = 12;
inline constexpr std::size_t kGcmTagBytes = 16;

// Fills `out` with HKDF-SHA256(salt, secret, info). kInternal only when OpenSSL cannot run it.
Status hkdf_sha256(ByteView secret, ByteView salt, ByteView info, std::span<std::byte> out);

// AES-256-GCM under a 32-byte key: iv (12, from OpenSSL's CSPRNG) || ciphertext || tag (16), with
// `aad` authenticated. kInvalidArgument for a key that is not 32 bytes or inputs over 1 GiB.
Result<Bytes> gcm_seal(ByteView key, ByteView aad, ByteView plaintext);
// The inverse; kVerificationFailed when the input is too short or does not authenticate (the
// unauthenticated plaintext is wiped, never returned).
Result<Bytes> gcm_open(ByteView key, ByteView aad, ByteView sealed);

}  // namespace medgate::hsm
