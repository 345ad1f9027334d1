// The TPM key store's data-key secret at work: a 64-byte secret sealed in the TPM is unsealed once
// at open, and two keys are derived from it with HKDF-SHA256 (RFC 5869, no salt): the KEK that
// wraps per-patient data keys (AES-256-GCM) and the pseudonym key (HMAC-SHA256). Both live in
// process memory only and are wiped when the DerivedKeys object dies.
//
// Wrapped format (version 1): 0x01 || IV (12 random bytes) || ciphertext || GCM tag (16 bytes),
// with the caller's context as GCM associated data.
//
// Thread safety: const methods may be called from any thread at once (each call has its own
// OpenSSL context).
#pragma once

#include <array>
#include <cstddef>

#include "hsm/bytes.h"
#include "hsm/key_store.h"
#include "hsm/status.h"

namespace medgate::hsm::tpm2 {

class DerivedKeys {
 public:
  static constexpr std::size_t kMaxDataKeyBytes = 64;

  // kInternal when OpenSSL cannot run HKDF (a broken installation).
  static Result<DerivedKeys> derive(ByteView secret);

  DerivedKeys(DerivedKeys&& other) noexcept;
  DerivedKeys& operator=(DerivedKeys&& other) noexcept;
  DerivedKeys(const DerivedKeys&) = delete;
  DerivedKeys& operator=(const DerivedKeys&) = delete;
  ~DerivedKeys();

  // kInvalidArgument for an empty key or one longer than kMaxDataKeyBytes.
  Result<Bytes> wrap(ByteView key, ByteView context) const;
  // kVerificationFailed when the tag does not match (altered blob, other context, other KEK);
  // kInvalidArgument when the blob is not a version-1 wrapped key at all.
  Result<SecretBytes> unwrap(ByteView wrapped, ByteView context) const;
  Hash keyed_hash(ByteView message) const;

 private:
  DerivedKeys() = default;
  std::array<std::byte, 32> kek_{};
  std::array<std::byte, 32> pseudonym_key_{};
};

}  // namespace medgate::hsm::tpm2
