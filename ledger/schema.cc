#include "ledger/schema.h"

#include <fmt/format.h>

#include "ledger/store.h"

namespace medgate::ledger {
namespace {

// kMigrations[i] takes the schema from version i to version i + 1. Append only; never edit a
// migration that has shipped.
constexpr const char* kMigrations[] = {
    // 0 -> 1: the first schema.
    R"sql(
      CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
      -- Canonical entry bytes; type and time are copied out for queries and checked by the verifier.
      CREATE TABLE entries (idx INTEGER PRIMARY KEY, type INTEGER NOT NULL, time_us INTEGER NOT NULL,
                            bytes BLOB NOT NULL);
      CREATE TABLE blocks (height INTEGER PRIMARY KEY, first_index INTEGER NOT NULL,
                           entry_count INTEGER NOT NULL, header BLOB NOT NULL);
      -- Merkle nodes in tiles of 16 (ledger/tiles.h). Level-0 tiles are stored once complete; the
      -- partial one is recomputed from the entries (store.cc, tile_reader()).
      CREATE TABLE tiles (level INTEGER NOT NULL, idx INTEGER NOT NULL, hashes BLOB NOT NULL,
                          PRIMARY KEY (level, idx)) WITHOUT ROWID;
      CREATE TABLE heads (seq INTEGER PRIMARY KEY, height INTEGER NOT NULL, tree_size INTEGER NOT NULL,
                          head BLOB NOT NULL, signature BLOB NOT NULL);
    )sql",
    // 1 -> 2: signing-key epochs, an index of the key-transition entries kept by the writer in the
    // transaction that writes them, so that opening a ledger finds its active key without reading
    // every entry. Heads covering tree sizes >= from_size are signed by key_id. The verifier does
    // not trust this table: it follows the transition entries themselves.
    R"sql(
      CREATE TABLE key_epochs (from_size INTEGER PRIMARY KEY, key_id BLOB NOT NULL,
                               entry_index INTEGER NOT NULL);
    )sql",
    // 2 -> 3: indexes for readers that look for entries by kind or by subject (consent state
    // rebuilt at start, a patient's data, audit export). Both are written by the writer in the
    // transaction that writes the entries; the verifier trusts neither. Existing entries' subjects
    // are indexed once after this migration (the flag below; store.cc, index_old_subjects()).
    R"sql(
      CREATE INDEX entries_by_type ON entries (type, idx);
      CREATE TABLE subjects (subject BLOB NOT NULL, idx INTEGER NOT NULL,
                             PRIMARY KEY (subject, idx)) WITHOUT ROWID;
      INSERT INTO meta (key, value) VALUES ('subjects_to_index', x'01');
    )sql",
    // 3 -> 4: replication (docs/replication.md). The outbox holds entries appended on this member
    // and not yet in a block: durable (acknowledged) but without an index until the cluster orders
    // them. Each row is the entry encoded without subject links (the block that carries it adds
    // them) and its subjects (a CBOR array of byte strings). A block's record fields beyond its
    // header (proposer, signature, the proposer's outbox range) are kept so that this replica can
    // hand the exact record on (to etcd after a loss, to a member catching up). AUTOINCREMENT: an
    // outbox sequence is never reused, so a block's outbox range names its rows only. Both tables
    // stay
    // empty on a ledger that is not replicated.
    R"sql(
      CREATE TABLE outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, type INTEGER NOT NULL,
                           time_us INTEGER NOT NULL, bytes BLOB NOT NULL, subjects BLOB NOT NULL,
                           link INTEGER NOT NULL);
      CREATE TABLE block_records (height INTEGER PRIMARY KEY, proposer TEXT NOT NULL,
                                  signature BLOB NOT NULL, outbox_first INTEGER NOT NULL,
                                  outbox_count INTEGER NOT NULL);
    )sql",
    // 4 -> 5: fewer pages written per commit (README, "Measured numbers"). Merkle tiles move to
    // merkle_tiles, keyed by where they complete (ledger/tiles.h, tile_position()), and only
    // complete tiles are stored: the partial tile at each level's right edge is recomputed from
    // the complete tiles below it (store.cc, tile_reader()), so a commit appends tile rows at the
    // table's end instead of rewriting one row per level. The by-type index becomes type_runs:
    // per type, disjoint ranges [first_index, end_index) of entry indexes outside which no entry
    // of that type lies. A type's last run stays open (end_index 2^62) while consecutive blocks
    // hold the type and is closed at its real end by the first block that does not, so most
    // commits write no row here instead of one index row per entry (store.cc,
    // write_type_runs()). Existing entries' runs are the maximal stretches of consecutive entries
    // of one type, the last entry's left open. Neither table is trusted by the verifier.
    R"sql(
      CREATE TABLE merkle_tiles (pos INTEGER PRIMARY KEY, hashes BLOB NOT NULL);
      INSERT INTO merkle_tiles (pos, hashes)
        SELECT ((idx + 1) << (4 * (level + 1))) * 16 + level, hashes FROM tiles
        WHERE length(hashes) = 512 ORDER BY 1;
      DROP TABLE tiles;
      CREATE TABLE type_runs (type INTEGER NOT NULL, end_index INTEGER NOT NULL,
                              first_index INTEGER NOT NULL,
                              PRIMARY KEY (type, end_index)) WITHOUT ROWID;
      INSERT INTO type_runs (type, end_index, first_index)
        SELECT type, max(idx) + 1, min(idx) FROM
          (SELECT type, idx, idx - row_number() OVER (PARTITION BY type ORDER BY idx) AS run
           FROM entries)
        GROUP BY type, run;
      UPDATE type_runs SET end_index = 4611686018427387904
        WHERE end_index = (SELECT max(idx) + 1 FROM entries);
      DROP INDEX entries_by_type;
    )sql",
};
constexpr int kKnownVersion = static_cast<int>(std::size(kMigrations));
static_assert(kKnownVersion == kSchemaVersion);

Result<int> user_version(sql::Database& db) {
  MEDGATE_ASSIGN_OR_RETURN(sql::Statement st, db.prepare("PRAGMA user_version"));
  MEDGATE_ASSIGN_OR_RETURN(auto step, st.step());
  if (step != sql::Statement::Step::kRow)
    return Status::Corruption("PRAGMA user_version gave no row");
  return static_cast<int>(st.column_int(0));
}

}  // namespace

Result<int> migrate_schema_in_transaction(sql::Database& db) {
  MEDGATE_ASSIGN_OR_RETURN(int version, user_version(db));
  if (version > kKnownVersion)
    return Status::FailedPrecondition(fmt::format(
        "ledger schema version {} is newer than this build understands ({}); use a newer medgate",
        version, kKnownVersion));
  for (int v = version; v < kKnownVersion; ++v) {
    Status s = db.exec(kMigrations[v]);
    if (s.ok()) s = db.exec(fmt::format("PRAGMA user_version = {}", v + 1));
    if (!s.ok()) return s.with_context(fmt::format("schema migration {} -> {}", v, v + 1));
  }
  return version;
}

Status migrate_schema(sql::Database& db) {
  MEDGATE_ASSIGN_OR_RETURN(auto tx, sql::Transaction::immediate(db));
  MEDGATE_ASSIGN_OR_RETURN(int from, migrate_schema_in_transaction(db));
  Status s = tx.commit();
  if (!s.ok() && from < kKnownVersion)
    return s.with_context(fmt::format("upgrading the ledger schema {} -> {}; the file is unchanged",
                                      from, kKnownVersion));
  return s;
}

Result<int> schema_version(sql::Database& db) {
  return user_version(db);
}

Status check_schema_readable(sql::Database& db) {
  MEDGATE_ASSIGN_OR_RETURN(int version, user_version(db));
  if (version == 0) return Status::Corruption("not a medgate ledger (no schema)");
  if (version > kKnownVersion)
    return Status::FailedPrecondition(
        fmt::format("ledger schema version {} is newer than this build understands ({})", version,
                    kKnownVersion));
  return Status::Ok();
}

}  // namespace medgate::ledger
