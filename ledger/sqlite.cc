#include "ledger/sqlite.h"

#include <fmt/format.h>

namespace medgate::ledger::sql {

Result<Database> Database::open(const std::filesystem::path& path, Mode mode) {
  int flags = SQLITE_OPEN_NOMUTEX;  // each connection is used by one thread at a time
  switch (mode) {
    case Mode::kReadOnly:
      flags |= SQLITE_OPEN_READONLY;
      break;
    case Mode::kReadWrite:
      flags |= SQLITE_OPEN_READWRITE;
      break;
    case Mode::kCreate:
      flags |= SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE;
      break;
  }
  sqlite3* db = nullptr;
  int rc = sqlite3_open_v2(path.c_str(), &db, flags, nullptr);
  if (rc != SQLITE_OK) {
    std::string msg = db ? sqlite3_errmsg(db) : sqlite3_errstr(rc);
    sqlite3_close(db);
    if (rc == SQLITE_CANTOPEN)
      return Status::NotFound(fmt::format("cannot open {}: {}", path.string(), msg));
    return Status::IOError(fmt::format("cannot open {}: {}", path.string(), msg));
  }
  sqlite3_extended_result_codes(db, 1);
  sqlite3_busy_timeout(db, 10000);
  return Database(db);
}

Database& Database::operator=(Database&& o) noexcept {
  if (this != &o) {
    if (db_) sqlite3_close_v2(db_);
    db_ = o.db_;
    o.db_ = nullptr;
  }
  return *this;
}

Database::~Database() {
  if (db_) sqlite3_close_v2(db_);
}

Status Database::exec(std::string_view sql) {
  std::string s(sql);
  char* err = nullptr;
  if (sqlite3_exec(db_, s.c_str(), nullptr, nullptr, &err) != SQLITE_OK) {
    sqlite3_free(err);
    return error(sql.substr(0, 40));
  }
  return Status::Ok();
}

Result<Statement> Database::prepare(std::string_view sql) const {
  sqlite3_stmt* st = nullptr;
  if (sqlite3_prepare_v3(db_, sql.data(), static_cast<int>(sql.size()), SQLITE_PREPARE_PERSISTENT,
                         &st, nullptr) != SQLITE_OK)
    return error(fmt::format("prepare \"{}\"", sql.substr(0, 60)));
  return Statement(st);
}

Status Database::error(std::string_view what) const {
  int rc = sqlite3_extended_errcode(db_);
  std::string msg = fmt::format("{}: {} (SQLite {})", what, sqlite3_errmsg(db_), rc);
  switch (rc & 0xff) {
    case SQLITE_FULL:
      return Status::IOError(fmt::format("{}: disk full (SQLite {})", what, rc));
    case SQLITE_IOERR:
    case SQLITE_CANTOPEN:
    case SQLITE_READONLY:
    case SQLITE_BUSY:
    case SQLITE_LOCKED:
    case SQLITE_PERM:
      return Status::IOError(msg);
    case SQLITE_CORRUPT:
    case SQLITE_NOTADB:
    case SQLITE_SCHEMA:
    case SQLITE_ERROR:
    case SQLITE_MISMATCH:
    case SQLITE_CONSTRAINT:
      return Status::Corruption(msg);
    default:
      return Status::Internal(msg);
  }
}

Statement& Statement::operator=(Statement&& o) noexcept {
  if (this != &o) {
    sqlite3_finalize(st_);
    st_ = o.st_;
    o.st_ = nullptr;
  }
  return *this;
}

Statement::~Statement() {
  sqlite3_finalize(st_);
}

Statement& Statement::bind(int i, std::int64_t v) {
  sqlite3_bind_int64(st_, i, v);
  return *this;
}
Statement& Statement::bind_null(int i) {
  sqlite3_bind_null(st_, i);
  return *this;
}
Statement& Statement::bind(int i, ByteView v) {
  sqlite3_bind_blob64(st_, i, v.data(), v.size(), SQLITE_STATIC);
  return *this;
}
Statement& Statement::bind(int i, std::string_view v) {
  sqlite3_bind_text64(st_, i, v.data(), v.size(), SQLITE_STATIC, SQLITE_UTF8);
  return *this;
}

Result<Statement::Step> Statement::step() {
  int rc = sqlite3_step(st_);
  if (rc == SQLITE_ROW) return Step::kRow;
  if (rc == SQLITE_DONE) return Step::kDone;
  sqlite3* db = sqlite3_db_handle(st_);
  int ext = sqlite3_extended_errcode(db);
  std::string msg = fmt::format("{} (SQLite {})", sqlite3_errmsg(db), ext);
  sqlite3_reset(st_);
  switch (ext & 0xff) {
    case SQLITE_FULL:
      return Status::IOError(fmt::format("disk full (SQLite {})", ext));
    case SQLITE_CORRUPT:
    case SQLITE_NOTADB:
    case SQLITE_CONSTRAINT:
      return Status::Corruption(msg);
    default:
      return Status::IOError(msg);
  }
}

Status Statement::run() {
  Result<Step> r = step();
  while (r.ok() && *r == Step::kRow) r = step();
  reset();
  return r.status();
}

void Statement::reset() {
  sqlite3_reset(st_);
  sqlite3_clear_bindings(st_);
}

ByteView Statement::column_blob(int i) const {
  const void* p = sqlite3_column_blob(st_, i);
  int n = sqlite3_column_bytes(st_, i);
  return {static_cast<const std::byte*>(p), static_cast<std::size_t>(n)};
}

std::string Statement::column_text(int i) const {
  const unsigned char* p = sqlite3_column_text(st_, i);
  int n = sqlite3_column_bytes(st_, i);
  return p ? std::string(reinterpret_cast<const char*>(p), static_cast<std::size_t>(n))
           : std::string();
}

Result<Transaction> Transaction::immediate(Database& db) {
  MEDGATE_RETURN_IF_ERROR(db.exec("BEGIN IMMEDIATE"));
  return Transaction(&db);
}

Result<TransactionStatements> TransactionStatements::prepare(const Database& db) {
  TransactionStatements t;
  MEDGATE_ASSIGN_OR_RETURN(t.begin_immediate, db.prepare("BEGIN IMMEDIATE"));
  MEDGATE_ASSIGN_OR_RETURN(t.commit, db.prepare("COMMIT"));
  MEDGATE_ASSIGN_OR_RETURN(t.rollback, db.prepare("ROLLBACK"));
  return t;
}

Result<Transaction> Transaction::immediate(Database& db, TransactionStatements& statements) {
  MEDGATE_RETURN_IF_ERROR(statements.begin_immediate.run());
  return Transaction(&db, &statements);
}

Transaction::~Transaction() {
  if (!db_ || sqlite3_get_autocommit(db_->handle())) return;
  if (statements_)
    (void)statements_->rollback.run();
  else
    (void)db_->exec("ROLLBACK");
}

Status Transaction::commit() {
  Status s = statements_ ? statements_->commit.run() : db_->exec("COMMIT");
  if (s.ok()) db_ = nullptr;
  return s;
}

bool is_disk_full(const Status& status) {
  return status.code() == StatusCode::kIOError &&
         status.message().find("disk full (SQLite") != std::string::npos;
}

}  // namespace medgate::ledger::sql
