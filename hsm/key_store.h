// The key-custody interface. Every key medgate uses lives inside a key store (a PKCS#11 token or,
// later, a TPM 2.0); medgate asks it to sign, never to hand the private key out.
//
// Thread safety: every method may be called from any thread; implementations serialize access
// to the device themselves. A KeyStore must outlive every object that was given a reference to it.
#pragma once

#include <cstddef>
#include <string>

#include "hsm/bytes.h"
#include "hsm/public_key.h"
#include "hsm/status.h"

namespace medgate::hsm {

class KeyStore {
 public:
  virtual ~KeyStore() = default;

  // Signs a SHA-256 digest with the appliance's ECDSA P-256 signing key and returns a DER
  // ECDSA-Sig-Value. May take ~200 ms on a hardware TPM: never call it per ledger entry.
  // kUnavailable when the device cannot be reached.
  virtual Result<Bytes> sign_digest(const Hash& digest) = 0;

  // The signing key's public half (its id is the SHA-256 fingerprint of the SPKI).
  virtual const PublicKey& signing_key() const = 0;

  // n bytes from the device's random number generator.
  virtual Result<Bytes> random(std::size_t n) = 0;

  // Where the keys are, for status and logs, with no secret in it (e.g. a pkcs11: URI without
  // any PIN attribute).
  virtual std::string description() const = 0;

  // Later issues add: wrap/unwrap (or seal/unseal) a data key, and a monotonic counter.
};

}  // namespace medgate::hsm
