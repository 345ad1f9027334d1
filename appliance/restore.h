// `medctl restore FILE` (run as `medgated restore`, since only medgated links the key-store
// backends): puts a backup (ledger/backup_file.h) back in place of the data dir's ledger, vault
// and device registry, honestly.
//
// A restored ledger is an older copy: its latest head carries a rollback counter behind the key
// store's, which Ledger::open refuses (ledger/store.h, "Rollback protection"). Restore does not
// hide that. It refuses unless
//   - medgated is stopped (the ledger's lock is free);
//   - the file is intact (every part's SHA-256) and its ledger verifies offline, with this box's
//     key store's public keys as the only trusted keys, under the config's ledger id: a backup of
//     another box, or one whose signing key this key store does not hold, is refused;
//   - the current ledger holds no entries beyond the backup's, or discard_newer says to drop them;
// and then opens the restored ledger in restore mode, which records a "ledger.restore" entry (the
// backup's latest head: sequence, tree size, root, rollback counter; the key store's counter; the
// replaced ledger's size and how many of its entries were discarded) and signs a head carrying the
// key store's counter again. Patients the replaced vault had erased but the backup's vault still
// holds are erased again (erasure is final; each gets a new patient-erasure entry). The replaced
// files are kept beside as NAME.before-restore.
// The config in the backup is not applied (it names this box's paths and key store); it is
// written beside the config as medgated.toml.from-backup when it differs, for the admin to compare.
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>

#include "hsm/status.h"

namespace medgate::appliance {

struct RestoreOptions {
  std::filesystem::path config;
  std::filesystem::path backup;
  bool discard_newer = false;
  std::string actor;  // who ran it
};

struct RestoreResult {
  std::string ledger_id;
  std::string backup_created;
  std::uint64_t backup_entries = 0;
  std::uint64_t backup_rollback_counter = 0;
  std::uint64_t key_store_counter = 0;
  std::uint64_t replaced_entries = 0;  // the ledger that was there (0: none)
  std::uint64_t discarded_entries = 0;
  std::uint64_t restore_entry = 0;
  std::uint64_t erasures_reapplied = 0;  // patients erased after the backup, erased again
  std::uint64_t entries = 0;             // after the restore
};

Result<RestoreResult> restore_backup(const RestoreOptions& options);

}  // namespace medgate::appliance
