// Sealing a secret to a key-agreement key (ECIES: ECDH P-256, HKDF-SHA256, AES-256-GCM), so that a
// replicated ledger can carry a secret the cluster shares to each member in a form only that
// member's HSM/TPM can open (docs/replication.md, "Shared keys").
//
// A box (version 1):
//   0x01 || recipient key id (32, SHA-256 of its SPKI) || ephemeral public key (SPKI DER, 91)
//        || iv (12) || ciphertext || tag (16)
// key = HKDF-SHA256(salt = ephemeral SPKI || recipient SPKI, ikm = Z,
//                   info = "medgate sealed box v1" 0x00 || context)
// with the same info authenticated as associated data. Sealing needs only the recipient's public
// key (OpenSSL makes the ephemeral key); opening needs the recipient's key store, whose
// agreement key computes Z inside the device.
//
// Thread safety: pure functions (the key store serializes itself).
#pragma once

#include <string_view>

#include "hsm/bytes.h"
#include "hsm/key_store.h"
#include "hsm/public_key.h"
#include "hsm/status.h"

namespace medgate::hsm {

// kInvalidArgument for a secret over 4 KiB; kInternal when OpenSSL fails.
Result<Bytes> seal_to(const PublicKey& recipient, ByteView secret, std::string_view context);

// The key id a box is sealed to; kCorruption when `box` is not a version-1 box.
Result<KeyId> sealed_box_recipient(ByteView box);

// Opens a box with `keys`' agreement key. kCorruption for a malformed box, kNotFound when it is
// sealed to another key (naming both key ids' prefixes), kVerificationFailed when it does not
// authenticate (altered, or sealed with another context).
Result<SecretBytes> open_sealed_box(KeyStore& keys, ByteView box, std::string_view context);

}  // namespace medgate::hsm
