// The payload vault: envelope encryption of patient data, and erasure by crypto-shredding.
//
// Every patient has a record in the vault's own SQLite file (`<data_dir>/vault.db`), keyed by the
// patient's keyed pseudonym (HMAC-SHA256 under the key store's pseudonym key, never a plain hash):
//   - a 32-byte data key from the key store's RNG, stored only wrapped by the key store's KEK
//     (context "medgate data-key v1" || pseudonym);
//   - the patient's identifier, encrypted under that data key, so that the map pseudonym ->
//     identifier exists only in encrypted form and is shredded together with the key.
// Payloads are AES-256-GCM under the patient's data key: 0x01 || iv (12) || ciphertext || tag (16),
// with the pseudonym and the caller's associated data bound as AAD, so a ciphertext moved to
// another patient or another context does not decrypt.
//
// Erasure protocol (crash-safe; the daemon drives it through PatientErasure, appliance/erasure.h):
//   1. begin_erase(p): the record is marked "erase pending" in one durable transaction. From here
//      on encrypt/decrypt/identifier refuse the patient (fail closed) and its cached key is wiped.
//   2. the caller appends a patient-erasure entry to the ledger.
//   3. finish_erase(p, entry): in one transaction the wrapped key and the encrypted identifier are
//      set to NULL (secure_delete zeroes the freed bytes), the record becomes "erased" with the
//      time and the ledger entry's index; then the WAL is checkpointed and truncated so no old page
//      holding the wrapped key lingers there.
// What a crash leaves:
//   - before 1 commits: nothing happened; the erase can simply be asked for again.
//   - between 1 and 2 (or during 2): a pending record that pending_erasures() lists; whether the
//     ledger entry was appended is found by scanning the ledger from the size recorded at step 1
//     (PendingErasure::ledger_size), so the entry is appended exactly once.
//   - between 2 and 3: the same; the scan finds the entry and finish_erase records its index.
//   - between 3's commit and its checkpoint: the record is erased but the WAL may still hold an
//     old page; open() checkpoints and truncates the WAL before doing anything else.
// Erasure is final: pseudonym() of the same identifier gives the same pseudonym afterwards, but the
// record stays "erased" and is never silently re-created with a new key (that would make new data
// for a patient who asked to be forgotten look like nothing happened); encrypt refuses.
//
// The wrapped key is useless without the KEK in the key store; what shredding removes is the only
// copy of the wrapped key in the live files. Copies of vault.db in backups, or blocks the
// filesystem or an SSD keeps after an overwrite, are outside what this class can reach.
//
// No message or log line carries an identifier or a payload: patients are named by the first 8
// bytes of their pseudonym in hex.
//
// Thread safety: every method may be called from any thread (one mutex; the key store is called
// under it only on a patient's first use, to create or unwrap its key). One Vault per file: open()
// takes an exclusive lock on `<path>.lock`. The KeyStore must outlive the Vault.
#pragma once

#include <array>
#include <compare>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "hsm/bytes.h"
#include "hsm/key_store.h"
#include "hsm/status.h"

namespace medgate::appliance {

// A patient's keyed pseudonym: HMAC-SHA256("medgate patient v1\0" || identifier) under the key
// store's pseudonym key. This, never the identifier, is what the ledger and logs carry.
struct Pseudonym {
  Hash bytes{};

  std::string hex() const { return to_hex(bytes); }
  // The first 8 bytes in hex: how messages and logs name a patient.
  std::string prefix() const;
  static std::optional<Pseudonym> from_hex(std::string_view hex);
  friend auto operator<=>(const Pseudonym&, const Pseudonym&) = default;
};

enum class PatientState { kActive, kErasePending, kErased };
std::string_view patient_state_name(PatientState state);

struct PatientInfo {
  Pseudonym pseudonym;
  PatientState state = PatientState::kActive;
  std::uint64_t created_us = 0;
  std::optional<std::uint64_t> erase_requested_us;  // set from begin_erase on
  std::optional<std::uint64_t> erased_us;           // set once erased
  std::optional<std::uint64_t> erasure_entry;       // the ledger entry recording the erasure
};

// What begin_erase records, so that an erasure interrupted by a crash can be finished.
struct ErasureRequest {
  std::string actor;   // who asked ("user:alice")
  std::string reason;  // as recorded on the ledger; may be empty
  // The ledger's tree size just before the erasure entry is appended: a resumed erasure looks for
  // its entry from here on.
  std::uint64_t ledger_size = 0;
};

struct PendingErasure {
  Pseudonym pseudonym;
  std::uint64_t requested_us = 0;
  ErasureRequest request;
};

// A data key's id in a cluster (random, 16 bytes): ciphertexts made with the key carry it.
inline constexpr std::size_t kDataKeyIdSize = 16;
using DataKeyId = std::array<std::byte, kDataKeyIdSize>;

// One of this member's data keys, sealed for the other members (AES-256-GCM under the key derived
// from the cluster secret, "medgate cluster data keys v1", with "medgate member data key v1" 0x00
// || pseudonym || key id authenticated).
struct DataKeyExport {
  Pseudonym patient;
  DataKeyId key_id{};
  Bytes sealed;
};

// Where another member's data key comes from: its sealed form, nullopt when it has not been
// published (yet), an error when the source cannot be reached.
using DataKeySource =
    std::function<Result<std::optional<Bytes>>(const Pseudonym& patient, const DataKeyId& key)>;

// The id of a replicated ledger's shared secret: SHA-256("medgate cluster secret id v1" 0x00 ||
// secret). A commitment: it names the secret without revealing anything of it.
Hash secret_id_of(ByteView secret);

class Vault {
 public:
  // Opens or creates the vault file (WAL, synchronous=FULL, secure_delete=ON), applies its schema
  // migrations and truncates the WAL. kCorruption "... is not a medgate vault" for a file that is
  // some other SQLite database or not one at all; kFailedPrecondition when another process holds
  // it or its schema is newer than this build. `keys` must outlive the Vault.
  // With must_exist (medgated: `medctl init` made the vault), a missing file is
  // kFailedPrecondition instead of a new empty vault: an empty vault would quietly leave every
  // stored reading unreadable and give known patients new keys.
  static Result<std::unique_ptr<Vault>> open(const std::filesystem::path& path, hsm::KeyStore& keys,
                                             bool must_exist = false);
  ~Vault();
  Vault(const Vault&) = delete;
  Vault& operator=(const Vault&) = delete;

  // The patient's pseudonym; creates the patient's record (a fresh data key, the encrypted
  // identifier) on first use. Cached: a known identifier costs no key-store call. For an erased
  // patient the same pseudonym comes back and the record stays erased. kInvalidArgument for an
  // empty identifier.
  Result<Pseudonym> pseudonym(std::string_view patient_id);
  // The same without creating anything: kNotFound when the vault has no record for the identifier.
  Result<Pseudonym> find(std::string_view patient_id);

  // AES-256-GCM under the patient's data key. kNotFound for a pseudonym without a record;
  // kFailedPrecondition for a patient that is erased or being erased; decrypt gives
  // kVerificationFailed for a ciphertext that was altered, truncated, or bound to another
  // patient or another `aad`.
  Result<Bytes> encrypt(const Pseudonym& patient, ByteView plaintext, ByteView aad);
  Result<Bytes> decrypt(const Pseudonym& patient, ByteView ciphertext, ByteView aad);

  // The patient's identifier, decrypted: for an authorized admin's display only.
  Result<std::string> identifier(const Pseudonym& patient);
  // kNotFound for a pseudonym without a record.
  Result<PatientInfo> info(const Pseudonym& patient);

  // Step 1 of the erasure protocol (see the top of this file). kNotFound without a record,
  // kFailedPrecondition when the patient is already erased or an erasure is already pending.
  Result<PendingErasure> begin_erase(const Pseudonym& patient, ErasureRequest request);
  // Step 3: destroys the key and the identifier and records `ledger_entry`. kFailedPrecondition
  // unless an erasure is pending. Returns the record as it now is.
  Result<PatientInfo> finish_erase(const Pseudonym& patient, std::uint64_t ledger_entry);
  // Erasures begun but not finished (after a crash), oldest first.
  Result<std::vector<PendingErasure>> pending_erasures();

  // ---- a replicated ledger's shared secret (docs/replication.md, "Shared keys") ----
  //
  // The members of a replicated ledger must give a patient the same pseudonym, so a vault that
  // holds the cluster's secret makes pseudonyms with HMAC-SHA256 under a key derived from it
  // (HKDF-SHA256, info "medgate cluster pseudonym v1") instead of the key store's own pseudonym
  // key. The secret is stored wrapped by the key store's KEK (context "medgate cluster secret
  // v1"), unwrapped once at open; the derived key lives in memory only.

  // The id of the secret this vault holds; nullopt when it holds none.
  Result<std::optional<Hash>> cluster_secret_id();
  // Keeps `secret` (32 bytes) and makes every later pseudonym with it. Adopting the secret it
  // already holds is a no-op. kFailedPrecondition when it holds another secret, or holds patient
  // records whose pseudonyms came from the key store's own key (they would stop matching: such a
  // box cannot found or join a cluster).
  Status adopt_cluster_secret(ByteView secret);
  // The secret, unwrapped, to seal it to a new member. kNotFound when the vault holds none.
  Result<hsm::SecretBytes> cluster_secret();
  // A replicated ledger's member must not make a pseudonym before it holds the secret: with
  // `required`, pseudonym() and find() are kUnavailable until adopt_cluster_secret().
  void require_cluster_secret(bool required);
  // A cluster's member names a patient bound to a device at another member by pseudonym only (it
  // does not know the identifier): makes the record, with a data key and no identifier, when there
  // is none. kFailedPrecondition outside a cluster.
  Status ensure_patient(const Pseudonym& patient);
  // How many patient records the vault holds (erased ones included).
  Result<std::uint64_t> patient_count();

  // ---- data keys shared between members ----
  //
  // Once the vault holds the cluster secret, every new patient record gets a data key id, and
  // encrypt() writes 0x02 || key id || iv || ciphertext || tag (label, pseudonym, key id and aad
  // authenticated), so that any member can tell whose key a reading needs. decrypt() reads both
  // formats; a key id that is not the patient's own here is another member's: it is looked up in
  // member_keys, or fetched once from the key source, checked, and kept wrapped by this key
  // store's KEK. kUnavailable when the source has not got it (yet).

  // This member's data keys that the other members have not been given yet, sealed for them.
  Result<std::vector<DataKeyExport>> keys_to_publish(std::size_t limit);
  Status mark_published(const Pseudonym& patient, const DataKeyId& key);
  void set_key_source(DataKeySource source);
  // A small secret (a CoAP device's PSK) sealed for every member: AES-256-GCM under the sharing
  // key, `label` authenticated. nullopt when the vault holds no cluster secret (a single box).
  Result<std::optional<Bytes>> seal_for_members(ByteView secret, ByteView label);
  // The inverse; kFailedPrecondition without a cluster secret, kVerificationFailed when it does
  // not open (altered, another label, another cluster).
  Result<hsm::SecretBytes> open_from_member(ByteView sealed, ByteView label);
  // An erasure decided on the replicated ledger (another member's, or this member's seen again):
  // the patient's own key and identifier and every other member's key kept here are destroyed,
  // and a patient never seen here is recorded as erased so that naming it later is refused. An
  // erasure pending here is left to this member's own protocol. True when something changed.
  Result<bool> apply_erasure(const Pseudonym& patient, std::uint64_t ledger_entry);

  class Impl;

 private:
  explicit Vault(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace medgate::appliance
