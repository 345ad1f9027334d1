// The backup file of `medctl backup` / `medctl restore`: consistent snapshots of the appliance's
// SQLite files (the ledger, the vault, the device registry) and its config, in one file.
//
// Layout (version 1):
//   "medgate-backup 1\n"
//   one line of JSON, the manifest: {"ledger_id": text, "created": RFC 3339, "software": text,
//     "parts": [{"name": "ledger.db", "size": N, "sha256": hex}, ...]}
//   the parts' bytes, concatenated in manifest order; nothing after the last.
// Part names are plain file names from a fixed set (kBackupPartNames), so extracting a backup can
// never write outside the directory it is given.
//
// The checks here are about the file's integrity (a truncated or damaged copy); whether the
// ledger in it is genuine is the verifier's question (ledger/verifier.h), asked by restore.
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "hsm/status.h"

namespace medgate::ledger {

inline constexpr std::string_view kBackupMagic = "medgate-backup 1\n";
// What a backup may hold; ledger.db is required.
inline constexpr std::string_view kBackupPartNames[] = {"ledger.db", "vault.db", "registry.db",
                                                        "medgated.toml"};

struct BackupPart {
  std::string name;            // one of kBackupPartNames
  std::filesystem::path file;  // where its bytes are now
};

struct BackupManifest {
  struct Part {
    std::string name;
    std::uint64_t size = 0;
    std::string sha256;  // hex
  };
  std::string ledger_id;
  std::string created;  // RFC 3339
  std::string software;
  std::vector<Part> parts;
  std::uint64_t file_size = 0;
  const Part* find(std::string_view name) const;
};

// Writes a new backup file at `out` (mode 0600; kFailedPrecondition if it exists), fsynced.
Status write_backup_file(const std::filesystem::path& out, const std::string& ledger_id,
                         std::span<const BackupPart> parts);

// Reads and checks a backup file: the magic, the manifest, every part's size and SHA-256, nothing
// after the last part. With `extract_to` (an existing directory) each part is also written there
// under its name. kCorruption names what is wrong (and which part).
Result<BackupManifest> read_backup_file(const std::filesystem::path& file,
                                        const std::optional<std::filesystem::path>& extract_to);

// A consistent copy of the SQLite file `db` at `out` (which must not exist) through a separate
// read-only connection (VACUUM INTO): safe while another process writes `db`, since the copy is
// made inside one read transaction.
Status snapshot_sqlite_file(const std::filesystem::path& db, const std::filesystem::path& out);

}  // namespace medgate::ledger
