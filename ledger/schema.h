// The ledger file's SQLite schema and its migrations. The schema version is PRAGMA user_version;
// each migration moves it up by one inside one transaction, so a failed migration leaves the file
// exactly as it was.
#pragma once

#include "hsm/status.h"
#include "ledger/sqlite.h"

namespace medgate::ledger {

// Brings the file to the newest schema this build knows. kFailedPrecondition when the file's
// version is newer than this build (an older medgated must not write a newer file).
Status migrate_schema(sql::Database& db);

// Checks that a file opened read-only has a schema this build can read (for offline verify).
Status check_schema_readable(sql::Database& db);

}  // namespace medgate::ledger
