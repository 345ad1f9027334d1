// The TPM 2.0 key store (tpm2-tss ESAPI). Private to hsm/: the rest of medgate reaches it through
// open_key_store() (hsm/key_store_factory.h) with a "tpm2:TCTI" URI.
//
// What lives where:
//   - In the TPM: the primary storage key (ECC P-256, owner hierarchy, re-created from a fixed
//     template at every connect, never persisted) and the NV counter (config.counter_nv_index,
//     type counter, owner read/write, no DA).
//   - In config.key_dir (0700; every file 0600, written atomically): the signing keys' blobs
//     signing-<key id hex>.pub/.priv, the file signing-keys listing their ids oldest first (the
//     first is the genesis key, active after open), and the sealed data-key secret
//     data-key-secret.pub/.priv with data-key-secret.pcrs (the PCRs it is sealed to, "7",
//     "0,7" or empty), and the key-agreement key's blobs agreement-key.pub/.priv once
//     agreement_key() or agree() first ran (an ECC P-256 key under the same primary whose only
//     use is TPM2_ECDH_ZGen: decrypt, not sign, not restricted, scheme ECDH), and the MLLP
//     listener's TLS key's blobs tls-key.pub/.priv once `medgated tls-key` made it (an ECDSA
//     P-256 key like the signing keys, but never one of them: hsm/tls_key.h). The blobs are
//     useless without this TPM.
//   - In process memory: the KEK and the pseudonym key, derived at open from the unsealed secret
//     (hsm/tpm2/derived_keys.h), wiped on destruction.
//
// Transient handles: at most the primary and the active signing key stay loaded; anything else
// (an older signing key, the agreement key) is loaded for one command and flushed right after
// use, on every path (a TPM without a resource manager has three slots).
//
// Faults: TPM_RC_RETRY/YIELDED/TESTING are retried a few times with backoff. When the connection
// drops (the TPM or swtpm restarted) or the TPM forgot our handles, the next call rebuilds the
// TCTI and ESYS context and the primary and runs once more (health().reconnects counts it); a
// call that cannot reach the TPM returns kUnavailable naming the TCTI. TPM_RC_OBJECT_MEMORY:
// the active key is flushed and the call runs once more. Every device error is counted in
// health(). An increment_counter() whose reply was lost with the connection may have happened:
// the retry then adds one more (the counter stays monotonic).
//
// Thread safety: one mutex serializes the ESYS context and all state; every method may be
// called from any thread.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "hsm/key_store.h"
#include "hsm/key_store_factory.h"
#include "hsm/public_key.h"
#include "hsm/status.h"
#include "hsm/tls_key.h"
#include "hsm/tpm2/derived_keys.h"

namespace medgate::hsm::tpm2 {

class Device;

// What a key in key_dir is for; its public area must say so.
enum class KeyUse {
  kSign,   // ECDSA (the signing keys, the TLS key): sign, may not decrypt
  kAgree,  // ECDH (the agreement key): decrypt, not sign, not restricted
};

class Tpm2KeyStore final : public KeyStore, public TlsKeyHolder {
 public:
  // Connects, creates the primary key, reads the key blobs from config.key_dir (the agreement
  // key's too, when it exists) and loads them once (so a damaged blob is reported here), unseals
  // the data-key secret and checks the counter. With kCreateIfMissing, creates key_dir, the genesis
  // signing key, the sealed secret (to config.seal_pcrs) and the counter (incremented to its first
  // value) when absent. Errors as documented for open_key_store(); kCorruption for a damaged file
  // in key_dir.
  static Result<std::unique_ptr<Tpm2KeyStore>> open(const KeyStoreConfig& config, KeyPolicy policy);

  ~Tpm2KeyStore() override;
  Tpm2KeyStore(const Tpm2KeyStore&) = delete;
  Tpm2KeyStore& operator=(const Tpm2KeyStore&) = delete;

  Result<Bytes> sign_digest(const Hash& digest) override;
  Result<Bytes> sign_digest_with(const KeyId& key, const Hash& digest) override;
  PublicKey signing_key() const override;
  std::vector<PublicKey> signing_keys() const override;
  Status use_signing_key(const KeyId& key) override;
  Result<PublicKey> create_signing_key() override;

  Result<Bytes> wrap_key(ByteView key, ByteView context) override;
  Result<SecretBytes> unwrap_key(ByteView wrapped, ByteView context) override;
  Result<Hash> keyed_hash(ByteView message) override;

  Result<PublicKey> agreement_key() override;
  Result<SecretBytes> agree(const PublicKey& peer) override;
  // agree() on a point given as SEC 1 uncompressed bytes (0x04 || x || y), named `peer` in
  // errors: kInvalidArgument when it is not 65 such bytes or the TPM refuses it as a point on
  // P-256. agree() always passes a point OpenSSL has checked; this entry exists so that tests
  // can hand the TPM one OpenSSL would never parse.
  Result<SecretBytes> agree_with_point(ByteView point, const std::string& peer);

  // The TLS key: its own files and its own member, so no KeyStore signing method can reach it.
  Result<TlsKeyInfo> tls_key(bool create) override;
  Result<Bytes> sign_tls_digest(const Hash& digest) override;

  CounterKind counter_kind() const override { return CounterKind::kTpmNv; }
  Result<std::uint64_t> read_counter() override;
  Result<std::uint64_t> increment_counter() override;

  // TPM2_GetRandom in chunks; at most 64 KiB per call.
  Result<Bytes> random(std::size_t n) override;
  std::string description() const override { return "tpm2:" + tcti_; }
  KeyStoreHealth health() const override;

 private:
  // A key this store made under the primary: a signing key or the agreement key.
  struct KeyBlobs {
    PublicKey public_key;
    Bytes public_blob;   // marshalled TPM2B_PUBLIC
    Bytes private_blob;  // marshalled TPM2B_PRIVATE
  };
  using SigningKey = KeyBlobs;

  Tpm2KeyStore(std::string tcti, std::filesystem::path key_dir, std::uint32_t counter_index);

  // Runs `op` on the connected device (connecting first if needed) with the fault handling
  // described above. The caller holds mutex_.
  template <typename T, typename Op>
  Result<T> with_device(Op&& op);
  void drop_device();

  Status open_signing_keys(KeyPolicy policy);
  Status open_data_key_secret(const std::vector<unsigned>& seal_pcrs, KeyPolicy policy);
  Status open_counter(KeyPolicy policy);
  Status open_agreement_key();
  Status open_tls_key();
  // A key kept as <public_name>/<private_name> in key_dir, loaded once to check it: nullopt when
  // the public file does not exist, kCorruption naming the file when either is damaged.
  Result<std::optional<KeyBlobs>> read_optional_key(std::string_view public_name,
                                                    std::string_view private_name,
                                                    const std::string& what, KeyUse use);

  Result<KeyBlobs> make_agreement_key(Device& device);
  // Makes the agreement key and writes its files when there is none yet.
  Status ensure_agreement_key();

  Result<SigningKey> make_signing_key(Device& device);
  Status write_signing_key(const SigningKey& key, const std::vector<SigningKey>& all);
  Result<std::uint32_t> load(Device& device, ByteView public_blob, ByteView private_blob,
                             const std::string& what);
  Result<std::uint32_t> active_handle(Device& device);
  Result<Bytes> sign_with(Device& device, std::size_t index, const Hash& digest);
  Result<Bytes> sign_loaded(Device& device, std::uint32_t key, const std::string& name,
                            const Hash& digest);
  Result<Bytes> random_from(Device& device, std::size_t n);
  Result<std::uint32_t> counter_handle(Device& device);
  Result<std::uint64_t> read_counter_from(Device& device, std::uint32_t nv);
  std::string key_file(const KeyId& id, const char* extension) const;

  const std::string tcti_;
  const std::filesystem::path key_dir_;
  const std::uint32_t counter_index_;

  mutable std::mutex mutex_;        // guards everything below
  std::unique_ptr<Device> device_;  // null until connected and after the connection was lost
  bool connected_before_ = false;
  std::uint32_t active_tr_;       // ESYS_TR of keys_[active_] while loaded, else ESYS_TR_NONE
  std::uint32_t counter_tr_;      // ESYS_TR of the NV counter once looked up, else ESYS_TR_NONE
  std::vector<SigningKey> keys_;  // oldest first
  std::optional<KeyBlobs> agreement_;  // none until first needed
  std::optional<KeyBlobs> tls_;        // none until `medgated tls-key`
  std::size_t active_ = 0;
  std::optional<DerivedKeys> derived_;
  KeyStoreHealth health_;
};

}  // namespace medgate::hsm::tpm2
