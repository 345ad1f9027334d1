// The admin API's backup operations (medctl backup), admin only:
//   backup.create  records the backup on the ledger (an admin action), then takes consistent
//                  snapshots (SQLite VACUUM INTO, a read transaction of its own, so appends go on)
//                  of the vault, the device registry and the ledger, in that order, and packs them
//                  with the config into one backup file (ledger/backup_file.h) in a private
//                  directory under the data dir (the hardened unit may write nowhere else);
//   backup.read    returns a chunk of it (base64), for medctl to write where the admin asked;
//   backup.finish  deletes it. A backup nobody finishes is deleted after kBackupKeep, and what a
//                  crash left behind at the next start.
// Order: the ledger is snapshotted last, so everything the vault and the registry hold is covered
// by the ledger in the backup (an erasure or a device change in between is, at worst, recorded but
// not yet applied: what a crash at that moment leaves, and what medgated finishes at start).
#pragma once

#include <chrono>
#include <vector>

#include "appliance/admin_server.h"
#include "appliance/config.h"

namespace medgate::ledger {
class Ledger;
}

namespace medgate::appliance {

inline constexpr std::chrono::minutes kBackupKeep{15};

std::vector<Operation> backup_operations(const Config& config, ledger::Ledger& ledger);

}  // namespace medgate::appliance
