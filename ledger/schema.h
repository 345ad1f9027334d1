// The ledger file's SQLite schema and its migrations. The schema version is PRAGMA user_version;
// each migration moves it up by one. All the migrations an upgrade needs run in one transaction
// (with Ledger::open's checks and the data conversions they ask for, store.cc), so a failed
// upgrade leaves the file exactly as it was, even when it spans several versions.
#pragma once

#include "hsm/status.h"
#include "ledger/sqlite.h"

namespace medgate::ledger {

// Brings the file to the newest schema this build knows, in one transaction of its own.
// kFailedPrecondition when the file's version is newer than this build (an older medgated must not
// write a newer file); the message names both versions.
Status migrate_schema(sql::Database& db);

// The same inside a transaction the caller holds open (Ledger::open commits the migration only
// once the migrated file passed its checks). Returns the version the file had before.
Result<int> migrate_schema_in_transaction(sql::Database& db);

// The file's schema version (0 for a file that is not a ledger).
Result<int> schema_version(sql::Database& db);

// Checks that a file opened read-only has a schema this build can read (for offline verify).
Status check_schema_readable(sql::Database& db);

}  // namespace medgate::ledger
