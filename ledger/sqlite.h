// A thin RAII layer over SQLite for the ledger's own use (store, verifier, benchmarks). Errors
// come back as Status with SQLite's message and the statement's purpose.
#pragma once

#include <sqlite3.h>

#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>

#include "hsm/bytes.h"
#include "hsm/status.h"

namespace medgate::ledger::sql {

class Statement;

class Database {
 public:
  enum class Mode { kReadOnly, kReadWrite, kCreate };
  static Result<Database> open(const std::filesystem::path& path, Mode mode);

  Database() = default;
  Database(Database&& o) noexcept : db_(o.db_) { o.db_ = nullptr; }
  Database& operator=(Database&& o) noexcept;
  ~Database();

  // Runs one or more statements without results.
  Status exec(std::string_view sql);
  Result<Statement> prepare(std::string_view sql) const;
  sqlite3* handle() const { return db_; }
  // Maps the connection's last error to a Status. SQLITE_FULL -> kIOError "disk full".
  Status error(std::string_view what) const;

 private:
  explicit Database(sqlite3* db) : db_(db) {}
  sqlite3* db_ = nullptr;
};

class Statement {
 public:
  Statement() = default;
  Statement(Statement&& o) noexcept : st_(o.st_) { o.st_ = nullptr; }
  Statement& operator=(Statement&& o) noexcept;
  ~Statement();

  Statement& bind(int i, std::int64_t v);
  Statement& bind(int i, std::uint64_t v) { return bind(i, static_cast<std::int64_t>(v)); }
  Statement& bind(int i, int v) { return bind(i, static_cast<std::int64_t>(v)); }
  Statement& bind(int i, ByteView v);
  Statement& bind(int i, std::string_view v);
  Statement& bind_null(int i);

  // kRow: a row is ready; kDone: finished. Errors as Status.
  enum class Step { kRow, kDone };
  Result<Step> step();
  // Steps to completion, then resets; for INSERT/UPDATE.
  Status run();
  void reset();

  std::int64_t column_int(int i) const { return sqlite3_column_int64(st_, i); }
  std::uint64_t column_uint(int i) const {
    return static_cast<std::uint64_t>(sqlite3_column_int64(st_, i));
  }
  ByteView column_blob(int i) const;
  std::string column_text(int i) const;
  bool column_is_null(int i) const { return sqlite3_column_type(st_, i) == SQLITE_NULL; }

 private:
  friend class Database;
  explicit Statement(sqlite3_stmt* st) : st_(st) {}
  sqlite3_stmt* st_ = nullptr;
};

// BEGIN IMMEDIATE / COMMIT / ROLLBACK prepared once, for a connection that runs many
// transactions (the ledger's writer).
struct TransactionStatements {
  static Result<TransactionStatements> prepare(const Database& db);
  Statement begin_immediate, commit, rollback;
};

// Runs `BEGIN IMMEDIATE` and rolls back in the destructor unless commit() succeeded.
class Transaction {
 public:
  static Result<Transaction> immediate(Database& db);
  // The same through statements prepared once; `statements` must outlive the transaction.
  static Result<Transaction> immediate(Database& db, TransactionStatements& statements);
  Transaction(Transaction&& o) noexcept : db_(o.db_), statements_(o.statements_) {
    o.db_ = nullptr;
  }
  Transaction& operator=(Transaction&&) = delete;
  ~Transaction();
  Status commit();

 private:
  explicit Transaction(Database* db, TransactionStatements* statements = nullptr)
      : db_(db), statements_(statements) {}
  Database* db_;
  TransactionStatements* statements_;
};

// True for the Status this layer returns when SQLite reported SQLITE_FULL.
bool is_disk_full(const Status& status);

}  // namespace medgate::ledger::sql
