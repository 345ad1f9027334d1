// The ledger store: one SQLite file holding entries, blocks, Merkle tiles and signed heads.
//
// Writes go through one writer thread with group commit: any number of threads call append(); the
// writer takes everything queued (up to a batch limit), writes the entries, the Merkle tiles and
// one block header in a single IMMEDIATE transaction, commits (WAL, synchronous=FULL: the commit
// returns after fsync), and only then wakes the callers. append() returning OK means durable.
//
// Heads are signed by a separate thread on their own cadence (LedgerOptions::head_interval) and
// never on the append path, since a TPM signature takes ~200 ms. The longest time an entry waits
// for a signed head covering it is head_interval + one signature + one commit.
//
// A write error fails the appends of that batch loudly. A full disk (SQLITE_FULL) is rolled back
// and later appends may succeed once space is freed; any other I/O error (an fsync that failed
// leaves the file's state unknown) stops the writer for good: every later append fails with the
// same error until the ledger is reopened, so nothing is ever retried as if nothing happened.
//
// Subject links and the subject map. A version-2 entry's subject links name each subject's
// previous entry (entry.h); the writer fills them in from an in-memory map of every subject's
// latest index (rebuilt from the subjects index at open), appending them to the bytes the caller
// encoded, so callers never need to know indexes. The signer keeps the subject map that each
// version-2 head commits to (subject_map.h), folding in the committed updates when it signs:
// O(changed subjects) map updates plus one pass over the leaves per head, never per entry.
//
// Signing keys. The genesis entry names the first key; Ledger::rotate_signing_key() records a
// key-transition entry at index t signed by the old and the new key, and every head covering
// tree size > t is signed by the new key. Ledger::open() makes the key store use the ledger's
// active key.
//
// Rollback protection. Every signed head carries the value of the key store's monotonic counter
// (a TPM NV counter; hsm/key_store.h) it belongs to. An epoch moves the counter from c to c+1 in
// two steps: first a head carrying c+1 is made durable, then the device counter is incremented.
// So the latest head's counter is always c or c+1 of the device's c, whatever step a crash
// interrupts. Epochs happen when the ledger opens, when it closes cleanly and, while it runs,
// every counter_interval if anything was appended. open() refuses a ledger whose latest head
// carries a counter below the device's: an older copy of the file (a restored backup) that does
// not know the device has moved on. A copy taken within the last epoch is not detected: the
// window is counter_interval.
//
// Restoring a backup (medctl restore) does not bypass this; it makes the rollback visible instead:
// with LedgerOptions::restore set, open() accepts the older counter and, before anything else is
// appended, records an admin-action entry "ledger.restore" naming the latest head it found
// (sequence, tree size, root, rollback counter) and the key store's counter, and then signs the
// opening epoch's head carrying the key store's counter + 1. Every verifier sees the counter jump
// and the entry that explains it. A file copied back without this still fails to open.
//
// Upgrades. open() migrates an older schema in one transaction together with every check it
// makes (schema.h): an upgrade that fails leaves the file byte for byte as it was. Entries and
// heads of every earlier format stay as they were written, and verify (entry.h, block.h).
//
// Replication (docs/replication.md). A ledger becomes replicated either as the founder
// (start_replication(), after the founding member-proposal) or as a replica created from the
// cluster's block 0 (create_replica()). From then on append() makes an entry durable in the
// outbox (a table in the same file, one transaction per group commit as before) rather than in a
// block: it has no index until the cluster orders it. The orderer (ledger/order/orderer.h) asks
// build_block() for the next block from the oldest queued entries, claims its height in etcd, and
// applies whatever block won the height with apply_block(), which validates it
// (validate_block_record) and writes it in ONE transaction with the removal of the outbox rows it
// carried, so a crash leaves an entry either queued or in a block, never both and never neither.
// Heads stay local: each replica signs its own heads with its own key.
//
// Thread safety: all public methods may be called from any thread. One writable Ledger per file:
// open() takes an exclusive lock (`<path>.lock`) and names the process that holds it otherwise.
#pragma once

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "hsm/bytes.h"
#include "hsm/key_store.h"
#include "hsm/status.h"
#include "ledger/block.h"
#include "ledger/block_record.h"
#include "ledger/entry.h"
#include "ledger/membership.h"
#include "ledger/subject_map.h"

namespace medgate::ledger {

inline constexpr int kSchemaVersion = 5;

// Who restores, from what, and what it replaces (Ledger::open; see "Rollback protection").
struct RestoreRecord {
  std::string actor;                     // "user:alice"
  std::string source;                    // the backup's name, as the admin gave it
  std::uint64_t replaced_tree_size = 0;  // the ledger the backup replaces (0: none)
  std::uint64_t discarded_entries = 0;   // its entries beyond the backup's
};

struct LedgerOptions {
  std::filesystem::path path;
  std::size_t max_batch_entries = 16384;          // entries per group commit (one block)
  std::size_t max_queued_entries = 262144;        // append() waits while more than this are queued
  std::chrono::milliseconds head_interval{1000};  // 0: heads only on sign_head_now() and close()
  std::int64_t wal_limit_bytes = 64LL << 20;      // WAL is checkpointed and truncated past this
  // Rollback-counter epochs while running (0: only at open and close). Each epoch is one NV write
  // on a TPM, whose NV memory wears: 300 s is at most 288 writes a day.
  std::chrono::seconds counter_interval{300};
  // Set only by a restore (appliance/restore.h): open() records it and accepts an older rollback
  // counter (see "Rollback protection" above).
  std::optional<RestoreRecord> restore;
  // Replicated mode: how long append()/append_all() wait for the cluster to order an entry that
  // is durable in the outbox before they give up with kUnavailable (the entry stays queued and
  // is ordered later). append_async() never waits for the cluster.
  std::chrono::milliseconds order_timeout{5000};
};

// What a replicated ledger knows about itself (see "Replication" above).
struct ReplicaInfo {
  std::string member_id;
  KeyId key_id{};                        // this member's signing key
  std::optional<PublicKey> founder_key;  // vouched for the history before the membership
  std::uint64_t outbox_entries = 0;      // durable, acknowledged, not yet ordered
  std::uint64_t outbox_first = 0;        // the oldest queued entry's outbox sequence (0: none)
  std::uint64_t outbox_oldest_us = 0;    // its time
  std::uint64_t blocks_applied = 0;      // since open: blocks from the cluster (any proposer)
  std::uint64_t own_blocks = 0;          // since open: blocks this member proposed
  std::uint64_t queued_total = 0;        // since open: entries queued in the outbox
};

struct StoredEntry {
  std::uint64_t index = 0;
  Bytes bytes;  // canonical bytes, as hashed
  Entry entry;  // decoded
  Hash leaf{};
};

struct StoredBlock {
  Bytes bytes;  // canonical header bytes
  BlockHeader header;
  Hash hash{};
};

struct LedgerStats {
  std::string ledger_id;
  std::uint64_t tree_size = 0;
  std::uint64_t height = 0;  // latest block
  Hash root{};
  std::uint64_t last_block_time_us = 0;
  std::optional<SignedHead> latest_head;
  std::uint64_t appended = 0;        // entries committed since open
  std::uint64_t batches = 0;         // group commits since open
  std::uint64_t failed_appends = 0;  // appends that returned an error since open
  std::uint64_t heads_signed = 0;
  std::uint64_t sign_failures = 0;
  std::string writer_error;  // non-empty once the writer stopped after an I/O error
  std::string signer_error;  // the last signing failure, if the latest attempt failed
  KeyId active_key{};
  std::uint64_t rollback_counter = 0;          // the value new heads carry
  std::uint64_t device_counter = 0;            // the key store's counter at the last epoch
  std::uint64_t counter_epochs = 0;            // epochs since open
  std::string counter_error;                   // the last epoch's failure, if it failed
  std::optional<std::uint64_t> restore_entry;  // the entry open() recorded for a restore
};

struct KeyRotation {
  std::uint64_t entry_index = 0;  // the key-transition entry
  PublicKey old_key;
  PublicKey new_key;
  std::optional<SignedHead> first_head;  // the first head signed by the new key
};

class Ledger {
 public:
  // Creates a new ledger file holding block 0 (the genesis entry naming `ledger_id` and the
  // signer's public key) and a first signed head. kFailedPrecondition if the file exists.
  static Result<std::unique_ptr<Ledger>> create(const LedgerOptions& options,
                                                const std::string& ledger_id, hsm::KeyStore& signer,
                                                const std::string& actor);

  // Opens an existing ledger for writing: applies schema migrations, rebuilds the Merkle right
  // edge from stored tiles, and checks that the latest block's root matches them and that the
  // latest signed head is signed by `signer`'s key and matches its block. `signer` must outlive the
  // Ledger.
  static Result<std::unique_ptr<Ledger>> open(const LedgerOptions& options, hsm::KeyStore& signer);

  ~Ledger();
  Ledger(const Ledger&) = delete;
  Ledger& operator=(const Ledger&) = delete;

  // Appends one entry and returns its index once it is durable. Genesis and key-transition
  // entries are written only by the ledger itself (kInvalidArgument).
  Result<std::uint64_t> append(const Entry& entry);
  // Appends entries atomically (all in the same block) and returns the first index.
  Result<std::uint64_t> append_all(std::span<const Entry> entries);
  // Appends entries atomically without waiting. `done` runs once, on the writer thread, with the
  // first index when the entries are durable or with the error; it must be quick (hand the
  // result to another thread). kUnavailable, without calling `done`, when the queue holds
  // max_queued_entries already (backpressure); kInvalidArgument for a bad entry.
  Status append_async(std::span<const Entry> entries,
                      std::function<void(Result<std::uint64_t>)> done);

  // Signs a head covering everything committed when called and returns it once durable (the
  // latest head, when it covers everything already, unless `force`).
  Result<SignedHead> sign_head_now(bool force = false);

  // Creates a new signing key in the key store, records the transition (signed by the active and
  // the new key), switches to the new key and signs a head with it.
  Result<KeyRotation> rotate_signing_key(const std::string& actor);

  // Stops accepting appends, commits what was accepted, signs a final head, joins the threads.
  // Idempotent; the destructor calls it.
  void close();

  // ---- readers ----
  const std::string& ledger_id() const;
  KeyId signing_key_id() const;
  LedgerStats stats() const;
  std::optional<SignedHead> latest_head() const;
  Result<StoredEntry> entry(std::uint64_t index) const;
  Result<StoredBlock> block(std::uint64_t height) const;
  Result<std::uint64_t> block_height_of(std::uint64_t entry_index) const;
  Result<SignedHead> head(std::uint64_t sequence) const;
  // Root of the first `size` entries; size must not exceed the committed tree size.
  Result<Hash> root_at(std::uint64_t size) const;
  Result<std::vector<Hash>> inclusion_proof(std::uint64_t index, std::uint64_t size) const;
  // The inclusion proofs of many entries to one size, in the order of `indexes`: the same proofs
  // as inclusion_proof(), read in one transaction with each tile read once (an audit export).
  Result<std::vector<std::vector<Hash>>> inclusion_proofs(std::span<const std::uint64_t> indexes,
                                                          std::uint64_t size) const;
  // Committed entries at these indexes, in the order given, read in one transaction.
  Result<std::vector<StoredEntry>> entries_at(std::span<const std::uint64_t> indexes) const;
  Result<std::vector<Hash>> consistency_proof(std::uint64_t from, std::uint64_t to) const;
  // Committed entries of the given types with index >= from, in index order, at most `limit`.
  Result<std::vector<StoredEntry>> entries_of_type(std::span<const EntryType> types,
                                                   std::uint64_t from, std::size_t limit) const;
  // Indexes of the committed entries whose subject links name `subject`, ascending, >= from, at
  // most `limit`.
  Result<std::vector<std::uint64_t>> subject_entries(ByteView subject, std::uint64_t from,
                                                     std::size_t limit) const;
  // The subject map's proof for `subject` at `head` (ledger/subject_map.h), which must be the
  // head the signer computed the map for last (normally the latest head): kUnavailable when a
  // newer head moved the map on (sign a new head and ask again), kFailedPrecondition for a
  // version-1 head.
  Result<SubjectMapProof> subject_map_proof(ByteView subject, const SignedHead& head) const;
  // The first signed head whose tree covers entry `index`; kNotFound when none does yet.
  Result<SignedHead> first_head_covering(std::uint64_t index) const;
  // The multi-leaf inclusion proof of the entries at `indexes` (strictly ascending) to tree size
  // `size` (merkle::multi_inclusion_proof), read in one transaction with each tile read once.
  Result<std::vector<Hash>> multi_inclusion_proof(std::span<const std::uint64_t> indexes,
                                                  std::uint64_t size) const;

  // ---- membership and replication (see "Replication" above) ----

  // The membership as of the committed blocks (empty and unfounded on a single box).
  Membership membership() const;
  // The ledger's active signing key (the genesis key or the key it rotated to): the key that
  // founds the membership. On a replica it is the founder's chain, not this member's key.
  PublicKey active_key() const;
  // Appends a member-proposal or member-approval entry after checking it against the current
  // membership (Membership::check), so an honest box never writes one every replica would void.
  // Serialised with other membership appends.
  Result<std::uint64_t> append_membership(const Entry& entry);

  // Makes this ledger the founder's replica: the membership must be founded and `member_id` must
  // be the member holding this ledger's active key. Durable before it returns; from then on
  // appends queue in the outbox. kFailedPrecondition otherwise; idempotent for the same member.
  Status start_replication(const std::string& member_id);
  // Creates a replica from the cluster's block 0, trusting `founder` (the founder's public key,
  // which signed the history): a file holding block 0 and a first head signed by `signer`'s own
  // key. Later blocks come through apply_block().
  static Result<std::unique_ptr<Ledger>> create_replica(const LedgerOptions& options,
                                                        const BlockRecord& genesis,
                                                        const PublicKey& founder,
                                                        const std::string& member_id,
                                                        hsm::KeyStore& signer);
  // Set once replicated.
  std::optional<ReplicaInfo> replica() const;
  // The state the next block must extend.
  Result<ChainTip> chain_tip() const;
  // The next block this member proposes: the oldest queued entries (at most `max_entries`, and
  // at most `max_bytes` of entry bytes, but always at least one) on the current tip, signed by
  // this member's key. kNotFound when the outbox is empty. A queued membership entry that the
  // membership no longer allows (another member's change took effect first) is dropped from the
  // outbox here and its waiting appender told why.
  Result<BlockRecord> build_block(std::size_t max_entries, std::size_t max_bytes);
  // Validates `record` as the next block and applies it (see above). kVerificationFailed names
  // the problem; nothing changes then.
  Status apply_block(const BlockRecord& record);
  // The record of a committed block: as applied (with its proposer's signature), or for a block
  // written before replication, signed now by this ledger's key with this member as proposer.
  Result<BlockRecord> block_record(std::uint64_t height);
  // Waits until the outbox holds something or `timeout` passes; true if it does.
  bool wait_for_outbox(std::chrono::milliseconds timeout) const;
  // Called on the writer thread after each block from the cluster is durable (any proposer,
  // this member's own blocks included), with the index of its first entry and its entries in
  // order: how the appliance's own state follows the replicated ledger. It must be quick and must
  // not call back into the ledger (hand the entries to another thread). Set before the orderer
  // starts; nullptr removes it.
  using ApplyListener =
      std::function<void(std::uint64_t first_index, const std::vector<Entry>& entries)>;
  void set_apply_listener(ApplyListener listener);

  class Impl;

 private:
  explicit Ledger(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace medgate::ledger
