// The ledger store. See store.h for the contract; the threads are:
//   - callers of append(): encode the entry and hash its leaf on their own thread, queue it, wait;
//   - the writer: one SQLite transaction per batch (entries + tiles + block header), fsync, wake;
//   - the head signer: signs a head over the latest block every head_interval (or on request) and
//     hands the signed head to the writer to store;
//   - the checkpointer: copies the WAL into the database file off the write path.
#include "ledger/store.h"

#include <fcntl.h>
#include <pthread.h>
#include <sys/file.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <fstream>
#include <map>
#include <mutex>
#include <thread>
#include <unordered_map>

#include <fmt/format.h>

#include "ledger/merkle.h"
#include "ledger/schema.h"
#include "ledger/sqlite.h"
#include "ledger/subject_map.h"
#include "ledger/tiles.h"

namespace medgate::ledger {
namespace {

constexpr int kCheckpointPages = 1000;  // ~4 MiB of WAL before a passive checkpoint

std::string hex_short(const Hash& h) {
  return to_hex(ByteView(h).first(8));
}

Status apply_pragmas(sql::Database& db, const LedgerOptions& options) {
  MEDGATE_ASSIGN_OR_RETURN(auto st, db.prepare("PRAGMA journal_mode=WAL"));
  MEDGATE_ASSIGN_OR_RETURN(auto step, st.step());
  if (step != sql::Statement::Step::kRow || st.column_text(0) != "wal")
    return Status::IOError("cannot switch the ledger to WAL mode");
  return db.exec(fmt::format(
      "PRAGMA synchronous=FULL; PRAGMA journal_size_limit={}; PRAGMA wal_autocheckpoint=0;"
      "PRAGMA cache_size=-8000; PRAGMA temp_store=MEMORY;",
      options.wal_limit_bytes));
}

// Reads tiles through one connection. Not thread-safe: one per connection.
//
// Level-0 tiles (leaf hashes) are stored only once they are complete: the partial one at the right
// edge would otherwise be rewritten by every commit, a WAL page each time. Its hashes are
// recomputed here from the (at most 15) entries it covers.
TileReader tile_reader(const sql::Database& db) {
  struct Statements {
    Result<sql::Statement> tile, entries;
  };
  auto st = std::make_shared<Statements>(Statements{
      db.prepare("SELECT hashes FROM tiles WHERE level = ? AND idx = ?"),
      db.prepare("SELECT idx, bytes FROM entries WHERE idx >= ? AND idx < ? ORDER BY idx")});
  return [st](int level, std::uint64_t index) -> Result<Bytes> {
    if (!st->tile.ok()) return st->tile.status();
    if (!st->entries.ok()) return st->entries.status();
    sql::Statement& s = st->tile.value();
    s.bind(1, level).bind(2, index);
    Result<sql::Statement::Step> step = s.step();
    Result<Bytes> out =
        Status::NotFound(fmt::format("Merkle tile ({}, {}) is missing", level, index));
    if (!step.ok())
      out = step.status();
    else if (*step == sql::Statement::Step::kRow) {
      ByteView b = s.column_blob(0);
      out = Bytes(b.begin(), b.end());
    }
    s.reset();
    if (level != 0 || out.ok() || out.status().code() != StatusCode::kNotFound) return out;
    sql::Statement& e = st->entries.value();
    e.bind(1, index * kTileWidth).bind(2, (index + 1) * kTileWidth);
    Bytes hashes;
    for (std::uint64_t expected = index * kTileWidth;; ++expected) {
      Result<sql::Statement::Step> row = e.step();
      if (!row.ok()) {
        e.reset();
        return row.status();
      }
      if (*row == sql::Statement::Step::kDone) break;
      if (e.column_uint(0) != expected) break;  // a gap: stop; callers see a short tile
      Hash leaf = merkle::leaf_hash(e.column_blob(1));
      hashes.insert(hashes.end(), leaf.begin(), leaf.end());
    }
    e.reset();
    if (hashes.empty()) return out;
    return hashes;
  };
}

void fsync_directory(const std::filesystem::path& dir) {
  int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd >= 0) {
    ::fsync(fd);
    ::close(fd);
  }
}

// An exclusive flock on `<db>.lock` that holds the owner's pid, so a second writer can be told
// who holds the ledger.
class LockFile {
 public:
  static Result<LockFile> acquire(const std::filesystem::path& db_path) {
    std::filesystem::path path = db_path;
    path += ".lock";
    int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (fd < 0)
      return Status::IOError(
          fmt::format("cannot open lock {}: {}", path.string(), std::strerror(errno)));
    if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
      char buf[32] = {};
      ssize_t n = ::pread(fd, buf, sizeof buf - 1, 0);
      ::close(fd);
      std::string pid = n > 0 ? std::string(buf, static_cast<std::size_t>(n)) : "";
      while (!pid.empty() && (pid.back() == '\n' || pid.back() == ' ')) pid.pop_back();
      std::string comm;
      if (!pid.empty()) {
        std::ifstream f("/proc/" + pid + "/comm");
        std::getline(f, comm);
      }
      return Status::FailedPrecondition(fmt::format("ledger {} is in use by process {}{}",
                                                    db_path.string(), pid.empty() ? "?" : pid,
                                                    comm.empty() ? "" : " (" + comm + ")"));
    }
    std::string pid = std::to_string(::getpid()) + "\n";
    if (::ftruncate(fd, 0) != 0 || ::pwrite(fd, pid.data(), pid.size(), 0) < 0) {
      ::close(fd);
      return Status::IOError(fmt::format("cannot write lock {}", path.string()));
    }
    return LockFile(fd);
  }
  LockFile(LockFile&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  ~LockFile() {
    if (fd_ >= 0) ::close(fd_);  // releases the flock
  }

 private:
  explicit LockFile(int fd) : fd_(fd) {}
  int fd_;
};

// Heads covering at least `from_size` entries are signed by `key`.
struct KeyEpoch {
  std::uint64_t from_size;
  KeyId key;
};

struct PendingEntry {
  Bytes bytes;  // without subject links when link_subjects (the writer appends them)
  Hash leaf;    // of the final bytes; filled in by the writer when link_subjects
  EntryType type;
  std::uint64_t time_us;
  std::vector<Bytes> subjects;
  bool link_subjects = false;  // a version-2 entry with subjects: the writer fills the links
};

// Hashes pseudonyms (HMAC outputs) and any other subject bytes for the writer's map.
struct SubjectHash {
  std::size_t operator()(const Bytes& b) const {
    return std::hash<std::string_view>()(
        std::string_view(reinterpret_cast<const char*>(b.data()), b.size()));
  }
};

struct Job {
  std::vector<PendingEntry> entries;  // an append (kept together in one block)
  std::optional<SignedHead> head;     // or a signed head to store
  Status status;
  std::uint64_t first_index = 0;

  // Each job is woken on its own, so a commit wakes exactly the callers it made durable (one
  // shared condition variable would wake every waiting appender on every commit). The writer
  // sets `done` holding `mu`, so the caller cannot destroy the job before the writer is done.
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  // An asynchronous append (Ledger::append_async): called instead of waking a waiter, and the
  // job, which the writer then owns, is deleted after it.
  std::function<void(Result<std::uint64_t>)> on_done;

  void finish(Status s) {
    if (on_done) {
      auto callback = std::move(on_done);
      Result<std::uint64_t> r =
          s.ok() ? Result<std::uint64_t>(first_index) : Result<std::uint64_t>(s);
      delete this;
      callback(std::move(r));
      return;
    }
    std::lock_guard lk(mu);
    status = std::move(s);
    done = true;
    cv.notify_one();
  }
  Status wait() {
    std::unique_lock lk(mu);
    cv.wait(lk, [&] { return done; });
    return status;
  }
};

Result<SignedHead> read_signed_head(sql::Statement& st) {
  SignedHead h;
  h.sequence = st.column_uint(0);
  ByteView body = st.column_blob(1), sig = st.column_blob(2);
  h.bytes.assign(body.begin(), body.end());
  h.signature.assign(sig.begin(), sig.end());
  MEDGATE_ASSIGN_OR_RETURN(h.head, decode_head(h.bytes));
  return h;
}

}  // namespace

class Ledger::Impl {
 public:
  Impl(LedgerOptions options, hsm::KeyStore& signer, LockFile lock)
      : options_(std::move(options)), signer_(signer), lock_(std::move(lock)) {}

  ~Impl() { close(); }

  Status open() {
    MEDGATE_ASSIGN_OR_RETURN(db_,
                             sql::Database::open(options_.path, sql::Database::Mode::kReadWrite));
    MEDGATE_RETURN_IF_ERROR(apply_pragmas(db_, options_));
    MEDGATE_RETURN_IF_ERROR(upgrade_and_load());
    next_epoch_ = std::chrono::steady_clock::now() + options_.counter_interval;
    epoch_tree_size_ = committed_size_.load();
    MEDGATE_ASSIGN_OR_RETURN(
        insert_entry_,
        db_.prepare("INSERT INTO entries (idx, type, time_us, bytes) VALUES (?,?,?,?)"));
    MEDGATE_ASSIGN_OR_RETURN(
        insert_tile_,
        db_.prepare("INSERT OR REPLACE INTO tiles (level, idx, hashes) VALUES (?,?,?)"));
    MEDGATE_ASSIGN_OR_RETURN(
        insert_block_,
        db_.prepare(
            "INSERT INTO blocks (height, first_index, entry_count, header) VALUES (?,?,?,?)"));
    MEDGATE_ASSIGN_OR_RETURN(
        insert_head_,
        db_.prepare("INSERT INTO heads (height, tree_size, head, signature) VALUES (?,?,?,?)"));
    MEDGATE_ASSIGN_OR_RETURN(
        insert_epoch_,
        db_.prepare("INSERT INTO key_epochs (from_size, key_id, entry_index) VALUES (?,?,?)"));
    MEDGATE_RETURN_IF_ERROR(load_subjects().with_context("loading the subjects' latest entries"));
    MEDGATE_ASSIGN_OR_RETURN(tx_statements_, sql::TransactionStatements::prepare(db_));
    sqlite3_wal_hook(db_.handle(), &Impl::wal_hook, this);
    // Named, so that top -H and perf show which of the ledger's threads is busy.
    writer_ = std::thread([this] {
      pthread_setname_np(pthread_self(), "ledger-writer");
      writer_loop();
    });
    signer_thread_ = std::thread([this] {
      pthread_setname_np(pthread_self(), "ledger-signer");
      signer_loop();
    });
    checkpointer_ = std::thread([this] {
      pthread_setname_np(pthread_self(), "ledger-ckpt");
      checkpointer_loop();
    });
    // A restore is on the ledger before the head that carries the key store's counter again.
    if (options_.restore)
      MEDGATE_RETURN_IF_ERROR(record_restore().with_context("recording the restore"));
    // Opening is a counter epoch: a copy of the file taken before now is detectably old.
    return advance_counter().with_context("starting a rollback-counter epoch");
  }

  // LEDGER-CRITICAL (upgrades). The schema migrations, the one-time conversions they ask for
  // (index_old_subjects) and every check load_state() makes run in one transaction, committed only
  // when all of them passed: an upgrade that fails anywhere (a migration, an old entry that does
  // not decode, a rollback, a key the key store lacks) leaves the file byte for byte as it was,
  // for the older medgated it came from or a newer one that fixes the cause.
  Status upgrade_and_load() {
    MEDGATE_ASSIGN_OR_RETURN(auto tx, sql::Transaction::immediate(db_));
    Result<int> from = migrate_schema_in_transaction(db_);
    if (!from.ok()) return from.status();
    auto upgrade_failed = [&](const Status& s) {
      if (*from >= kSchemaVersion) return s;
      return s.with_context(
          fmt::format("upgrading the ledger from schema {} to {} failed; the file is unchanged",
                      *from, kSchemaVersion));
    };
    if (Status s = load_state(); !s.ok()) return upgrade_failed(s);
    // OR IGNORE: an entry may name the same subject twice.
    MEDGATE_ASSIGN_OR_RETURN(
        insert_subject_, db_.prepare("INSERT OR IGNORE INTO subjects (subject, idx) VALUES (?,?)"));
    if (Status s = index_old_subjects().with_context("indexing the entries' subjects"); !s.ok())
      return upgrade_failed(s);
    if (Status s = tx.commit(); !s.ok()) return upgrade_failed(s);
    return Status::Ok();
  }

  // The restore entry (store.h, LedgerOptions::restore): what open() found, not what the caller
  // says, so a restore cannot describe itself as less than it was.
  Status record_restore() {
    const RestoreRecord& r = *options_.restore;
    const SignedHead& h = *latest_head_;
    using cbor::Value;
    MEDGATE_ASSIGN_OR_RETURN(
        Value args,
        Value::map({
            {Value::text("source"), Value::text(r.source)},
            {Value::text("backup_head_sequence"), Value::uint(h.sequence)},
            {Value::text("backup_tree_size"), Value::uint(h.head.tree_size)},
            {Value::text("backup_root"), Value::bytes(h.head.root)},
            {Value::text("backup_rollback_counter"), Value::uint(h.head.rollback_counter)},
            {Value::text("key_store_counter"), Value::uint(device_counter_)},
            {Value::text("replaced_tree_size"), Value::uint(r.replaced_tree_size)},
            {Value::text("discarded_entries"), Value::uint(r.discarded_entries)},
        }));
    Entry e;
    e.type = EntryType::kAdminAction;
    e.actor = r.actor;
    MEDGATE_ASSIGN_OR_RETURN(e.body, Value::map({{Value::text("op"), Value::text("ledger.restore")},
                                                 {Value::text("args"), std::move(args)}}));
    MEDGATE_ASSIGN_OR_RETURN(restore_entry_, append(std::span(&e, 1)));
    return Status::Ok();
  }

  // ---- writes ----

  // Encodes and hashes entries on the caller's thread into `job`.
  Status prepare(Job& job, std::span<const Entry> entries, bool internal) {
    if (entries.empty()) return Status::InvalidArgument("nothing to append");
    for (const Entry& e : entries)
      if (!internal && (e.type == EntryType::kGenesis || e.type == EntryType::kKeyTransition))
        return Status::InvalidArgument(
            "genesis and key-transition entries are written only by the ledger itself");
    job.entries.reserve(entries.size());
    std::uint64_t now = now_us();
    for (const Entry& e : entries) {
      Entry copy_if_needed;
      const Entry* src = &e;
      if (e.time_us == 0) {
        copy_if_needed = e;
        copy_if_needed.time_us = now;
        src = &copy_if_needed;
      }
      // A version-2 entry's subject links name each subject's previous entry, which only the
      // writer knows: it is encoded without them here, and the writer appends them (entry.h).
      const bool link = src->version == kEntryFormatVersion && !src->subjects.empty();
      for (const SubjectLink& l : src->subjects)
        if (l.subject.empty()) return Status::InvalidArgument("subject link with an empty subject");
      Result<Bytes> bytes = link ? encode_entry_without_subjects(*src) : encode_entry(*src);
      if (!bytes.ok()) return bytes.status();
      Hash leaf = link ? Hash{} : merkle::leaf_hash(*bytes);
      std::vector<Bytes> subjects;
      subjects.reserve(src->subjects.size());
      for (const SubjectLink& l : src->subjects) subjects.push_back(l.subject);
      job.entries.push_back(
          {std::move(bytes).value(), leaf, src->type, src->time_us, std::move(subjects), link});
    }
    return Status::Ok();
  }

  Status append_async(std::span<const Entry> entries,
                      std::function<void(Result<std::uint64_t>)> done) {
    auto job = std::make_unique<Job>();
    if (Status s = prepare(*job, entries, false); !s.ok()) {
      failed_appends_.fetch_add(1);
      return s;
    }
    std::size_t n = job->entries.size();
    {
      std::lock_guard lk(queue_mu_);
      if (!accepting_) return Status::FailedPrecondition("the ledger is closing");
      if (queued_entries_ + n > options_.max_queued_entries && queued_entries_ > 0)
        return Status::Unavailable("the ledger's append queue is full");
      queued_entries_ += n;
      job->on_done = std::move(done);
      queue_.push_back(job.release());
    }
    writer_cv_.notify_one();
    return Status::Ok();
  }

  Result<std::uint64_t> append(std::span<const Entry> entries, bool internal = false) {
    Job job;
    if (Status s = prepare(job, entries, internal); !s.ok()) {
      failed_appends_.fetch_add(1);
      return s;
    }
    Status s = submit(job);
    if (!s.ok()) {
      failed_appends_.fetch_add(1);
      return s;
    }
    return job.first_index;
  }

  // force: sign a new head even if the latest covers everything (a key or counter changed).
  Result<SignedHead> sign_head_now(bool force = false) {
    std::unique_lock lk(sign_mu_);
    std::uint64_t target = committed_size_.load();
    if (!force && latest_head_ && latest_head_->head.tree_size >= target) return *latest_head_;
    std::uint64_t ticket = ++sign_requested_;
    sign_cv_.notify_all();
    sign_done_cv_.wait(lk, [&] { return sign_completed_ >= ticket || signer_stopped_; });
    if (sign_completed_ < ticket)
      return Status::Unavailable("the ledger closed before a head could be signed");
    if (!last_sign_status_.ok()) return last_sign_status_;
    if (latest_head_ && latest_head_->head.tree_size >= target) return *latest_head_;
    return Status::Internal("the signed head does not cover the committed entries");
  }

  // Runs a rollback-counter epoch on the signer thread (see store.h) and waits for it.
  Status advance_counter() {
    std::unique_lock lk(sign_mu_);
    std::uint64_t ticket = ++counter_requested_;
    sign_cv_.notify_all();
    sign_done_cv_.wait(lk, [&] { return counter_completed_ >= ticket || signer_stopped_; });
    if (counter_completed_ < ticket)
      return Status::Unavailable("the ledger closed before the rollback counter could advance");
    return last_counter_status_;
  }

  Result<KeyRotation> rotate_signing_key(const std::string& actor) {
    std::lock_guard rotation(rotate_mu_);
    KeyId old_id = key_id();
    MEDGATE_ASSIGN_OR_RETURN(PublicKey old_key, public_key(old_id));
    MEDGATE_ASSIGN_OR_RETURN(PublicKey new_key, signer_.create_signing_key());
    {
      std::lock_guard lk(keys_mu_);
      keys_.insert_or_assign(new_key.id(), new_key);
    }
    Hash digest = sha256(encode_key_transition_statement(ledger_id_, old_id, new_key.id()));
    Result<Bytes> old_sig = signer_.sign_digest_with(old_id, digest);
    if (!old_sig.ok())
      return old_sig.status().with_context("signing the transition with the old key");
    Result<Bytes> new_sig = signer_.sign_digest_with(new_key.id(), digest);
    if (!new_sig.ok())
      return new_sig.status().with_context("signing the transition with the new key");
    if (!old_key.verify_digest(digest, *old_sig).ok() ||
        !new_key.verify_digest(digest, *new_sig).ok())
      return Status::Internal("the key store returned a transition signature that does not verify");

    Entry e;
    e.type = EntryType::kKeyTransition;
    e.actor = actor;
    MEDGATE_ASSIGN_OR_RETURN(
        e.body, cbor::Value::map({
                    {cbor::Value::text("old_key_id"), cbor::Value::bytes(old_id)},
                    {cbor::Value::text("new_key_id"), cbor::Value::bytes(new_key.id())},
                    {cbor::Value::text("new_public_key"), cbor::Value::bytes(new_key.spki_der())},
                    {cbor::Value::text("old_signature"), cbor::Value::bytes(*old_sig)},
                    {cbor::Value::text("new_signature"), cbor::Value::bytes(*new_sig)},
                }));
    MEDGATE_ASSIGN_OR_RETURN(std::uint64_t index, append(std::span(&e, 1), /*internal=*/true));
    // Durable: the writer recorded the new epoch in the same transaction.
    if (Status s = signer_.use_signing_key(new_key.id()); !s.ok())
      return s.with_context("switching the key store to the new key");
    KeyRotation r{index, old_key, new_key, std::nullopt};
    if (Result<SignedHead> h = sign_head_now(); h.ok()) r.first_head = std::move(h).value();
    return r;
  }

  void close() {
    {
      std::lock_guard lk(queue_mu_);
      if (closed_) return;
      closed_ = true;
      accepting_ = false;
    }
    if (writer_.joinable()) {
      // Wait for everything accepted to commit, then sign a final head, then stop the threads.
      {
        std::unique_lock lk(queue_mu_);
        done_cv_.wait(lk, [&] { return queue_.empty() && !writer_busy_; });
      }
      // A clean shutdown is a counter epoch: its final head carries the new value.
      if (!advance_counter().ok() && latest_head_size() < committed_size_.load())
        (void)sign_head_now();
      {
        std::lock_guard lk(sign_mu_);
        signer_stop_ = true;
      }
      sign_cv_.notify_all();
      signer_thread_.join();
      {
        std::lock_guard lk(queue_mu_);
        writer_stop_ = true;
      }
      writer_cv_.notify_all();
      writer_.join();
      {
        std::lock_guard lk(checkpoint_mu_);
        checkpoint_stop_ = true;
      }
      checkpoint_cv_.notify_all();
      checkpointer_.join();
      // A last checkpoint so the file is complete on its own.
      (void)db_.exec("PRAGMA wal_checkpoint(TRUNCATE)");
    }
  }

  // ---- reads ----

  LedgerStats stats() const {
    LedgerStats s;
    s.ledger_id = ledger_id_;
    {
      std::lock_guard lk(state_mu_);
      s.tree_size = last_block_.header.tree_size;
      s.height = last_block_.header.height;
      s.root = last_block_.header.root;
      s.last_block_time_us = last_block_.header.time_us;
      s.writer_error = writer_error_.ok() ? "" : writer_error_.message();
    }
    {
      std::lock_guard lk(sign_mu_);
      s.latest_head = latest_head_;
      s.signer_error = last_sign_status_.ok() ? "" : last_sign_status_.message();
      s.device_counter = device_counter_;
      s.counter_error = last_counter_status_.ok() ? "" : last_counter_status_.message();
    }
    s.active_key = key_id();
    s.rollback_counter = declared_counter_.load();
    s.counter_epochs = counter_epochs_.load();
    s.restore_entry = restore_entry_;
    s.appended = appended_.load();
    s.batches = batches_.load();
    s.failed_appends = failed_appends_.load();
    s.heads_signed = heads_signed_.load();
    s.sign_failures = sign_failures_.load();
    return s;
  }

  std::optional<SignedHead> latest_head() const {
    std::lock_guard lk(sign_mu_);
    return latest_head_;
  }

  template <typename F>
  auto with_reader(F&& f) const -> decltype(f(std::declval<sql::Database&>())) {
    sql::Database db;
    {
      std::lock_guard lk(readers_mu_);
      if (!readers_.empty()) {
        db = std::move(readers_.back());
        readers_.pop_back();
      }
    }
    if (!db.handle()) {
      auto opened = sql::Database::open(options_.path, sql::Database::Mode::kReadOnly);
      if (!opened.ok()) return opened.status();
      db = std::move(opened).value();
    }
    auto result = f(db);
    std::lock_guard lk(readers_mu_);
    if (readers_.size() < 4) readers_.push_back(std::move(db));
    return result;
  }

  Result<StoredEntry> entry(std::uint64_t index) const {
    std::uint64_t size = committed_size_.load();
    if (index >= size)
      return Status::NotFound(
          fmt::format("entry {} does not exist (the ledger has {} entries)", index, size));
    return with_reader([&](sql::Database& db) -> Result<StoredEntry> {
      MEDGATE_ASSIGN_OR_RETURN(auto st, db.prepare("SELECT bytes FROM entries WHERE idx = ?"));
      st.bind(1, index);
      MEDGATE_ASSIGN_OR_RETURN(auto step, st.step());
      if (step != sql::Statement::Step::kRow)
        return Status::Corruption(fmt::format("entry {} is missing from the store", index));
      StoredEntry out;
      out.index = index;
      ByteView b = st.column_blob(0);
      out.bytes.assign(b.begin(), b.end());
      out.leaf = merkle::leaf_hash(out.bytes);
      Result<Entry> decoded = decode_entry(out.bytes);
      if (!decoded.ok()) return decoded.status().with_context(fmt::format("entry {}", index));
      out.entry = std::move(decoded).value();
      return out;
    });
  }

  Result<std::vector<StoredEntry>> entries_of_type(std::span<const EntryType> types,
                                                   std::uint64_t from, std::size_t limit) const {
    const std::uint64_t size = committed_size_.load();
    std::string in;
    for (EntryType t : types)
      in += fmt::format("{}{}", in.empty() ? "" : ",", static_cast<std::uint32_t>(t));
    if (in.empty() || limit == 0) return std::vector<StoredEntry>{};
    return with_reader([&](sql::Database& db) -> Result<std::vector<StoredEntry>> {
      MEDGATE_ASSIGN_OR_RETURN(
          auto st, db.prepare(fmt::format("SELECT idx, bytes FROM entries WHERE type IN ({}) AND "
                                          "idx >= ? AND idx < ? ORDER BY idx LIMIT ?",
                                          in)));
      st.bind(1, from).bind(2, size).bind(3, static_cast<std::uint64_t>(limit));
      std::vector<StoredEntry> out;
      for (;;) {
        MEDGATE_ASSIGN_OR_RETURN(auto step, st.step());
        if (step != sql::Statement::Step::kRow) break;
        StoredEntry e;
        e.index = static_cast<std::uint64_t>(st.column_int(0));
        ByteView b = st.column_blob(1);
        e.bytes.assign(b.begin(), b.end());
        e.leaf = merkle::leaf_hash(e.bytes);
        Result<Entry> decoded = decode_entry(e.bytes);
        if (!decoded.ok()) return decoded.status().with_context(fmt::format("entry {}", e.index));
        e.entry = std::move(decoded).value();
        out.push_back(std::move(e));
      }
      return out;
    });
  }

  Result<std::vector<std::uint64_t>> subject_entries(ByteView subject, std::uint64_t from,
                                                     std::size_t limit) const {
    const std::uint64_t size = committed_size_.load();
    return with_reader([&](sql::Database& db) -> Result<std::vector<std::uint64_t>> {
      MEDGATE_ASSIGN_OR_RETURN(auto st, db.prepare("SELECT idx FROM subjects WHERE subject = ? AND "
                                                   "idx >= ? AND idx < ? ORDER BY idx LIMIT ?"));
      st.bind(1, subject).bind(2, from).bind(3, size).bind(4, static_cast<std::uint64_t>(limit));
      std::vector<std::uint64_t> out;
      for (;;) {
        MEDGATE_ASSIGN_OR_RETURN(auto step, st.step());
        if (step != sql::Statement::Step::kRow) break;
        out.push_back(static_cast<std::uint64_t>(st.column_int(0)));
      }
      return out;
    });
  }

  Result<StoredBlock> block(std::uint64_t height) const {
    std::uint64_t latest;
    {
      std::lock_guard lk(state_mu_);
      latest = last_block_.header.height;
    }
    if (height > latest)
      return Status::NotFound(
          fmt::format("block {} does not exist (the latest is {})", height, latest));
    return with_reader([&](sql::Database& db) -> Result<StoredBlock> {
      MEDGATE_ASSIGN_OR_RETURN(auto st, db.prepare("SELECT header FROM blocks WHERE height = ?"));
      st.bind(1, height);
      MEDGATE_ASSIGN_OR_RETURN(auto step, st.step());
      if (step != sql::Statement::Step::kRow)
        return Status::Corruption(fmt::format("block {} is missing from the store", height));
      ByteView b = st.column_blob(0);
      StoredBlock out;
      out.bytes.assign(b.begin(), b.end());
      out.hash = block_hash(out.bytes);
      Result<BlockHeader> h = decode_block_header(out.bytes);
      if (!h.ok()) return h.status().with_context(fmt::format("block {}", height));
      out.header = std::move(h).value();
      return out;
    });
  }

  Result<std::uint64_t> block_height_of(std::uint64_t index) const {
    std::uint64_t size = committed_size_.load();
    if (index >= size)
      return Status::NotFound(
          fmt::format("entry {} does not exist (the ledger has {} entries)", index, size));
    std::uint64_t latest;
    {
      std::lock_guard lk(state_mu_);
      latest = last_block_.header.height;
    }
    // Blocks are numbered in entry order: binary search on the height (the primary key) rather
    // than keep an index on first_index that every commit would have to write.
    return with_reader([&](sql::Database& db) -> Result<std::uint64_t> {
      MEDGATE_ASSIGN_OR_RETURN(auto st,
                               db.prepare("SELECT first_index FROM blocks WHERE height = ?"));
      std::uint64_t lo = 0, hi = latest;  // the answer is in [lo, hi]
      while (lo < hi) {
        std::uint64_t mid = lo + (hi - lo + 1) / 2;
        st.bind(1, mid);
        MEDGATE_ASSIGN_OR_RETURN(auto step, st.step());
        if (step != sql::Statement::Step::kRow)
          return Status::Corruption(fmt::format("block {} is missing", mid));
        std::uint64_t first = st.column_uint(0);
        st.reset();
        if (first <= index)
          lo = mid;
        else
          hi = mid - 1;
      }
      return lo;
    });
  }

  Result<SignedHead> head(std::uint64_t sequence) const {
    return with_reader([&](sql::Database& db) -> Result<SignedHead> {
      MEDGATE_ASSIGN_OR_RETURN(auto st,
                               db.prepare("SELECT seq, head, signature FROM heads WHERE seq = ?"));
      st.bind(1, sequence);
      MEDGATE_ASSIGN_OR_RETURN(auto step, st.step());
      if (step != sql::Statement::Step::kRow)
        return Status::NotFound(fmt::format("signed head #{} does not exist", sequence));
      return read_signed_head(st);
    });
  }

  Status check_size(std::uint64_t size) const {
    std::uint64_t committed = committed_size_.load();
    if (size > committed)
      return Status::InvalidArgument(
          fmt::format("tree size {} is beyond the ledger's {} entries", size, committed));
    return Status::Ok();
  }

  Result<Hash> root_at(std::uint64_t size) const {
    MEDGATE_RETURN_IF_ERROR(check_size(size));
    return with_reader(
        [&](sql::Database& db) { return merkle::root(size, node_source(tile_reader(db))); });
  }

  Result<std::vector<Hash>> inclusion_proof(std::uint64_t index, std::uint64_t size) const {
    MEDGATE_RETURN_IF_ERROR(check_size(size));
    return with_reader([&](sql::Database& db) {
      return merkle::inclusion_proof(index, size, node_source(tile_reader(db)));
    });
  }

  // Many proofs to one size through one reader in one read transaction (no lock taken per
  // statement), with the tiles read and the nodes hashed once for all of them: neighbouring
  // entries' proofs share most of their nodes. The caches are dropped when they grow large, which
  // costs time, never correctness (they hold committed, immutable nodes).
  Result<std::vector<std::vector<Hash>>> inclusion_proofs(std::span<const std::uint64_t> indexes,
                                                          std::uint64_t size) const {
    MEDGATE_RETURN_IF_ERROR(check_size(size));
    return with_reader([&](sql::Database& db) -> Result<std::vector<std::vector<Hash>>> {
      MEDGATE_RETURN_IF_ERROR(db.exec("BEGIN"));
      constexpr std::size_t kMaxCached = 1 << 16;
      auto tiles = std::make_shared<std::unordered_map<std::uint64_t, Bytes>>();
      TileReader read = tile_reader(db);
      TileReader cached_tiles = [read, tiles](int level, std::uint64_t index) -> Result<Bytes> {
        std::uint64_t key = (static_cast<std::uint64_t>(level) << 58) | index;
        if (auto it = tiles->find(key); it != tiles->end()) return it->second;
        MEDGATE_ASSIGN_OR_RETURN(Bytes tile, read(level, index));
        if (tiles->size() >= kMaxCached) tiles->clear();
        tiles->emplace(key, tile);
        return tile;
      };
      merkle::NodeSource hashed = node_source(cached_tiles);
      std::unordered_map<std::uint64_t, Hash> nodes;
      merkle::NodeSource cached_nodes = [&](int level, std::uint64_t index) -> Result<Hash> {
        std::uint64_t key = (static_cast<std::uint64_t>(level) << 58) | index;
        if (auto it = nodes.find(key); it != nodes.end()) return it->second;
        MEDGATE_ASSIGN_OR_RETURN(Hash h, hashed(level, index));
        if (nodes.size() >= 16 * kMaxCached) nodes.clear();
        nodes.emplace(key, h);
        return h;
      };
      std::vector<std::vector<Hash>> out;
      out.reserve(indexes.size());
      Status failed;
      for (std::uint64_t index : indexes) {
        Result<std::vector<Hash>> proof = merkle::inclusion_proof(index, size, cached_nodes);
        if (!proof.ok()) {
          failed = proof.status();
          break;
        }
        out.push_back(std::move(proof).value());
      }
      Status ended = db.exec("COMMIT");  // ends the read transaction, whatever happened
      MEDGATE_RETURN_IF_ERROR(failed);
      MEDGATE_RETURN_IF_ERROR(ended);
      return out;
    });
  }

  // One multi-leaf proof through one reader in one read transaction. The proof's walk asks for
  // nodes left to right, so at each tile level the tiles it needs come in ascending order: keeping
  // the last tile read per level reads each tile about once (the right edge's pieces come right to
  // left), in O(levels) memory.
  Result<std::vector<Hash>> multi_inclusion_proof(std::span<const std::uint64_t> indexes,
                                                  std::uint64_t size) const {
    MEDGATE_RETURN_IF_ERROR(check_size(size));
    return with_reader([&](sql::Database& db) -> Result<std::vector<Hash>> {
      MEDGATE_RETURN_IF_ERROR(db.exec("BEGIN"));
      struct LastTile {
        std::optional<std::uint64_t> index;
        Bytes hashes;
      };
      auto last = std::make_shared<std::vector<LastTile>>(64);
      TileReader read = tile_reader(db);
      TileReader per_level = [read, last](int level, std::uint64_t index) -> Result<Bytes> {
        LastTile& t = last->at(static_cast<std::size_t>(level));
        if (t.index != index) {
          MEDGATE_ASSIGN_OR_RETURN(t.hashes, read(level, index));
          t.index = index;
        }
        return t.hashes;
      };
      Result<std::vector<Hash>> proof =
          merkle::multi_inclusion_proof(indexes, size, node_source(per_level));
      Status ended = db.exec("COMMIT");  // ends the read transaction, whatever happened
      if (!proof.ok()) return proof.status();
      MEDGATE_RETURN_IF_ERROR(ended);
      return proof;
    });
  }

  // Entries by index through one reader, one statement and one read transaction.
  Result<std::vector<StoredEntry>> entries_at(std::span<const std::uint64_t> indexes) const {
    const std::uint64_t size = committed_size_.load();
    for (std::uint64_t index : indexes)
      if (index >= size)
        return Status::NotFound(
            fmt::format("entry {} does not exist (the ledger has {} entries)", index, size));
    return with_reader([&](sql::Database& db) -> Result<std::vector<StoredEntry>> {
      MEDGATE_RETURN_IF_ERROR(db.exec("BEGIN"));
      auto read_all = [&]() -> Result<std::vector<StoredEntry>> {
        MEDGATE_ASSIGN_OR_RETURN(auto st, db.prepare("SELECT bytes FROM entries WHERE idx = ?"));
        std::vector<StoredEntry> out;
        out.reserve(indexes.size());
        for (std::uint64_t index : indexes) {
          st.bind(1, index);
          MEDGATE_ASSIGN_OR_RETURN(auto step, st.step());
          if (step != sql::Statement::Step::kRow)
            return Status::Corruption(fmt::format("entry {} is missing from the store", index));
          StoredEntry e;
          e.index = index;
          ByteView b = st.column_blob(0);
          e.bytes.assign(b.begin(), b.end());
          st.reset();
          e.leaf = merkle::leaf_hash(e.bytes);
          Result<Entry> decoded = decode_entry(e.bytes);
          if (!decoded.ok()) return decoded.status().with_context(fmt::format("entry {}", index));
          e.entry = std::move(decoded).value();
          out.push_back(std::move(e));
        }
        return out;
      };
      Result<std::vector<StoredEntry>> out = read_all();
      Status ended = db.exec("COMMIT");
      if (!out.ok()) return out.status();
      MEDGATE_RETURN_IF_ERROR(ended);
      return out;
    });
  }

  Result<std::vector<Hash>> consistency_proof(std::uint64_t from, std::uint64_t to) const {
    MEDGATE_RETURN_IF_ERROR(check_size(to));
    return with_reader([&](sql::Database& db) {
      return merkle::consistency_proof(from, to, node_source(tile_reader(db)));
    });
  }

  Result<SubjectMapProof> subject_map_proof(ByteView subject, const SignedHead& head) const {
    if (head.head.version < 2)
      return Status::FailedPrecondition("the head predates subject maps (head format version 1)");
    std::lock_guard lk(head_map_mu_);
    if (head_map_size_ != head.head.tree_size)
      return Status::Unavailable(
          fmt::format("the subject map is at tree size {}, not at the head's {}; sign a new head",
                      head_map_size_, head.head.tree_size));
    if (head_map_.root() != head.head.subject_root || head_map_.size() != head.head.subject_count)
      return Status::Internal("the in-memory subject map does not match the signed head");
    return head_map_.prove(subject);
  }

  // The first signed head covering entry `index` (tree size > index). Heads are stored in
  // sequence order with non-decreasing tree sizes, numbered 1.. without gaps (the verifier checks
  // both), so a binary search on the sequence finds it.
  Result<SignedHead> first_head_covering(std::uint64_t index) const {
    std::optional<SignedHead> latest = latest_head();
    if (!latest || latest->head.tree_size <= index)
      return Status::NotFound(fmt::format("no signed head covers entry {} yet", index));
    std::uint64_t hi = latest->sequence;
    return with_reader([&](sql::Database& db) -> Result<SignedHead> {
      MEDGATE_ASSIGN_OR_RETURN(auto st, db.prepare("SELECT tree_size FROM heads WHERE seq = ?"));
      std::uint64_t lo = 1;  // the answer is in [lo, hi]
      while (lo < hi) {
        std::uint64_t mid = lo + (hi - lo) / 2;
        st.bind(1, mid);
        MEDGATE_ASSIGN_OR_RETURN(auto step, st.step());
        if (step != sql::Statement::Step::kRow)
          return Status::Corruption(fmt::format("signed head #{} is missing", mid));
        std::uint64_t size = st.column_uint(0);
        st.reset();
        if (size > index)
          hi = mid;
        else
          lo = mid + 1;
      }
      MEDGATE_ASSIGN_OR_RETURN(auto one,
                               db.prepare("SELECT seq, head, signature FROM heads WHERE seq = ?"));
      one.bind(1, lo);
      MEDGATE_ASSIGN_OR_RETURN(auto step, one.step());
      if (step != sql::Statement::Step::kRow)
        return Status::Corruption(fmt::format("signed head #{} is missing", lo));
      return read_signed_head(one);
    });
  }

  const std::string& ledger_id() const { return ledger_id_; }
  // The active signing key: the latest epoch's.
  KeyId key_id() const {
    std::lock_guard lk(state_mu_);
    return epochs_.back().key;
  }

 private:
  // ---- opening ----

  // Once, after the schema migration that added the subjects table: index the subjects of the
  // entries written before it, in one transaction that also clears the flag.
  Status index_old_subjects() {
    MEDGATE_ASSIGN_OR_RETURN(auto flag,
                             db_.prepare("SELECT 1 FROM meta WHERE key = 'subjects_to_index'"));
    MEDGATE_ASSIGN_OR_RETURN(auto step, flag.step());
    if (step != sql::Statement::Step::kRow) return Status::Ok();
    // Inside upgrade_and_load()'s transaction.
    MEDGATE_ASSIGN_OR_RETURN(auto st, db_.prepare("SELECT idx, bytes FROM entries ORDER BY idx"));
    for (;;) {
      MEDGATE_ASSIGN_OR_RETURN(auto row, st.step());
      if (row != sql::Statement::Step::kRow) break;
      const auto index = static_cast<std::uint64_t>(st.column_int(0));
      Result<Entry> e = decode_entry(st.column_blob(1));
      if (!e.ok()) return e.status().with_context(fmt::format("entry {}", index));
      for (const SubjectLink& l : e->subjects)
        MEDGATE_RETURN_IF_ERROR(insert_subject_.bind(1, ByteView(l.subject)).bind(2, index).run());
    }
    return db_.exec("DELETE FROM meta WHERE key = 'subjects_to_index'");
  }

  // Every subject's latest entry, from the subjects index: the writer's map for new links and the
  // signer's subject map, both as of the committed tree size.
  Status load_subjects() {
    MEDGATE_ASSIGN_OR_RETURN(
        auto st,
        db_.prepare("SELECT subject, max(idx) FROM subjects WHERE idx < ? GROUP BY subject"));
    st.bind(1, committed_size_.load());
    std::lock_guard lk(head_map_mu_);
    for (;;) {
      MEDGATE_ASSIGN_OR_RETURN(auto row, st.step());
      if (row != sql::Statement::Step::kRow) break;
      ByteView subject = st.column_blob(0);
      std::uint64_t latest = st.column_uint(1);
      latest_subjects_[Bytes(subject.begin(), subject.end())] = latest;
      head_map_.update(subject, latest);
    }
    head_map_size_ = committed_size_.load();
    return Status::Ok();
  }

  Status load_state() {
    MEDGATE_ASSIGN_OR_RETURN(auto meta,
                             db_.prepare("SELECT value FROM meta WHERE key = 'ledger_id'"));
    MEDGATE_ASSIGN_OR_RETURN(auto step, meta.step());
    if (step != sql::Statement::Step::kRow)
      return Status::Corruption("the ledger file has no ledger id");
    ledger_id_ = to_string(meta.column_blob(0));

    MEDGATE_ASSIGN_OR_RETURN(
        auto last, db_.prepare("SELECT height, header FROM blocks ORDER BY height DESC LIMIT 1"));
    MEDGATE_ASSIGN_OR_RETURN(step, last.step());
    if (step != sql::Statement::Step::kRow)
      return Status::Corruption("the ledger file has no blocks (not even genesis)");
    std::uint64_t height = last.column_uint(0);
    ByteView header_bytes = last.column_blob(1);
    last_block_.bytes.assign(header_bytes.begin(), header_bytes.end());
    Result<BlockHeader> header = decode_block_header(last_block_.bytes);
    if (!header.ok()) return header.status().with_context(fmt::format("block {}", height));
    last_block_.header = std::move(header).value();
    last_block_.hash = block_hash(last_block_.bytes);
    if (last_block_.header.height != height || last_block_.header.ledger_id != ledger_id_)
      return Status::Corruption(fmt::format("block {}'s header does not match its row", height));
    committed_size_ = last_block_.header.tree_size;

    MEDGATE_ASSIGN_OR_RETURN(auto count,
                             db_.prepare("SELECT count(*), coalesce(max(idx), -1) FROM entries"));
    MEDGATE_ASSIGN_OR_RETURN(step, count.step());
    if (count.column_uint(0) != last_block_.header.tree_size ||
        count.column_int(1) + 1 != static_cast<std::int64_t>(last_block_.header.tree_size))
      return Status::Corruption(fmt::format(
          "the store holds {} entry rows but its blocks cover {}; run `medctl ledger verify --db`",
          count.column_uint(0), last_block_.header.tree_size));

    Result<TileBuilder> builder = TileBuilder::load(last_block_.header.tree_size, tile_reader(db_));
    if (!builder.ok()) return builder.status().with_context("rebuilding the Merkle right edge");
    tiles_ = std::move(builder).value();
    if (tiles_.root() != last_block_.header.root)
      return Status::Corruption(
          fmt::format("the stored Merkle tiles give root {} but block {} says {}",
                      hex_short(tiles_.root()), height, hex_short(last_block_.header.root)));

    // The genesis entry names the key this ledger's heads are signed with.
    MEDGATE_ASSIGN_OR_RETURN(auto genesis, db_.prepare("SELECT bytes FROM entries WHERE idx = 0"));
    MEDGATE_ASSIGN_OR_RETURN(step, genesis.step());
    if (step != sql::Statement::Step::kRow)
      return Status::Corruption("the genesis entry is missing");
    Result<Entry> g = decode_entry(genesis.column_blob(0));
    if (!g.ok()) return g.status().with_context("genesis entry");
    if (g->type != EntryType::kGenesis) return Status::Corruption("entry 0 is not a genesis entry");
    const Bytes* genesis_key = g->body.find("key_id")->as_bytes();
    KeyEpoch first{1, {}};
    std::copy(genesis_key->begin(), genesis_key->end(), first.key.begin());
    {
      std::lock_guard lk(state_mu_);
      epochs_ = {first};
    }
    MEDGATE_ASSIGN_OR_RETURN(
        auto epochs, db_.prepare("SELECT from_size, key_id FROM key_epochs ORDER BY from_size"));
    for (;;) {
      MEDGATE_ASSIGN_OR_RETURN(step, epochs.step());
      if (step != sql::Statement::Step::kRow) break;
      ByteView id = epochs.column_blob(1);
      if (id.size() != 32) return Status::Corruption("a key epoch row has a malformed key id");
      KeyEpoch e{epochs.column_uint(0), {}};
      std::copy(id.begin(), id.end(), e.key.begin());
      std::lock_guard lk(state_mu_);
      epochs_.push_back(e);
    }
    // The ledger decides which key signs; the key store must hold it.
    KeyId active = key_id();
    if (Status s = signer_.use_signing_key(active); !s.ok())
      return Status::FailedPrecondition(
          fmt::format("the key store ({}) does not hold this ledger's signing key {}: {}",
                      signer_.description(), to_hex(active), s.message()));

    MEDGATE_ASSIGN_OR_RETURN(
        auto heads,
        db_.prepare("SELECT seq, head, signature FROM heads ORDER BY seq DESC LIMIT 1"));
    MEDGATE_ASSIGN_OR_RETURN(step, heads.step());
    if (step != sql::Statement::Step::kRow)
      return Status::Corruption("the ledger has no signed head");
    MEDGATE_ASSIGN_OR_RETURN(SignedHead head, read_signed_head(heads));
    MEDGATE_RETURN_IF_ERROR(
        check_head(head).with_context(fmt::format("latest signed head #{}", head.sequence)));
    latest_head_ = std::move(head);
    return check_rollback_counter();
  }

  // See "Rollback protection" in store.h.
  Status check_rollback_counter() {
    Result<std::uint64_t> device = signer_.read_counter();
    if (!device.ok())
      return device.status().with_context("reading the key store's rollback counter");
    const SignedHead& h = *latest_head_;
    std::uint64_t ledger = h.head.rollback_counter;
    // LEDGER-CRITICAL (rollback protection): only a restore (LedgerOptions::restore) goes on
    // past an older counter, and open() records it (record_restore) before the epoch's head.
    if (ledger < *device && options_.restore) ledger = *device;
    if (ledger < *device)
      return Status::FailedPrecondition(fmt::format(
          "rollback detected: the latest signed head (#{}, {}, tree size {}) carries rollback "
          "counter {}, but the key store's counter is {}: this ledger file is older than the "
          "ledger this key store last signed for (restored from a backup or a copy?)",
          h.sequence, format_time(h.head.time_us), h.head.tree_size, ledger, *device));
    if (ledger > *device + 1)
      return Status::FailedPrecondition(fmt::format(
          "the ledger's rollback counter {} is ahead of the key store's counter {}: the key store "
          "is not the one this ledger was last used with, or its counter was reset",
          ledger, *device));
    declared_counter_ = ledger;
    device_counter_ = *device;
    return Status::Ok();
  }

  // The latest head must be ours, well signed, and agree with the block it names.
  Status check_head(const SignedHead& h) {
    if (h.head.ledger_id != ledger_id_) return Status::Corruption("names another ledger");
    KeyId expected = key_for_size(h.head.tree_size);
    if (h.head.key_id != expected)
      return Status::VerificationFailed(
          fmt::format("signed by key {}, not by the ledger's key for that tree size {}",
                      to_hex(h.head.key_id), to_hex(expected)));
    MEDGATE_ASSIGN_OR_RETURN(PublicKey key, public_key(expected));
    Status sig = key.verify_digest(head_digest(h.bytes), h.signature);
    if (!sig.ok())
      return Status::VerificationFailed("its signature does not verify: " + sig.message());
    MEDGATE_ASSIGN_OR_RETURN(auto st, db_.prepare("SELECT header FROM blocks WHERE height = ?"));
    st.bind(1, h.head.height);
    MEDGATE_ASSIGN_OR_RETURN(auto step, st.step());
    if (step != sql::Statement::Step::kRow)
      return Status::Corruption(fmt::format("covers block {}, which is missing", h.head.height));
    ByteView b = st.column_blob(0);
    Result<BlockHeader> header = decode_block_header(b);
    if (!header.ok()) return header.status();
    if (block_hash(b) != h.head.block_hash || header->tree_size != h.head.tree_size ||
        header->root != h.head.root)
      return Status::VerificationFailed(fmt::format("does not match block {}", h.head.height));
    return Status::Ok();
  }

  // ---- the writer ----

  Status submit(Job& job) {
    std::unique_lock lk(queue_mu_);
    if (!accepting_ && !job.head) return Status::FailedPrecondition("the ledger is closing");
    std::size_t n = job.entries.size();
    space_cv_.wait(lk, [&] {
      return queued_entries_ + n <= options_.max_queued_entries || queued_entries_ == 0 ||
             !accepting_;
    });
    if (!accepting_ && !job.head) return Status::FailedPrecondition("the ledger is closing");
    queued_entries_ += n;
    queue_.push_back(&job);
    lk.unlock();
    writer_cv_.notify_one();
    return job.wait();
  }

  void writer_loop() {
    std::vector<Job*> batch;
    for (;;) {
      std::unique_lock lk(queue_mu_);
      writer_cv_.wait(lk, [&] { return !queue_.empty() || writer_stop_; });
      if (queue_.empty()) return;
      std::size_t entries = 0;
      while (!queue_.empty() && (batch.empty() || entries + queue_.front()->entries.size() <=
                                                      options_.max_batch_entries)) {
        entries += queue_.front()->entries.size();
        batch.push_back(queue_.front());
        queue_.pop_front();
      }
      writer_busy_ = true;
      lk.unlock();
      Status s = commit_batch(batch);
      for (Job* job : batch) job->finish(s);  // after this the job may be gone
      batch.clear();
      lk.lock();
      queued_entries_ -= entries;
      writer_busy_ = false;
      lk.unlock();
      space_cv_.notify_all();
      done_cv_.notify_all();
      if (s.ok()) bound_wal();
    }
  }

  Status commit_batch(const std::vector<Job*>& batch) {
    {
      std::lock_guard lk(state_mu_);
      if (!writer_error_.ok()) return writer_error_;
    }
    TileBuilder before = tiles_;
    std::uint64_t first = tiles_.size();
    bool began = false;
    Status s = write_batch(batch, first, began);
    if (!s.ok()) {
      tiles_ = std::move(before);
      (void)tiles_.take_dirty();
      // A full disk leaves SQLite's state clean (the transaction rolled back); anything else, an
      // fsync error above all, leaves the file's durable state unknown.
      // A transaction that never began wrote nothing (another process held the write lock).
      bool disk_full = sql::is_disk_full(s);
      if (began && !disk_full) {
        std::lock_guard lk(state_mu_);
        writer_error_ = Status(
            s.code(),
            "the ledger stopped writing after an error (reopen it once the cause is fixed): " +
                s.message());
      }
      return s;
    }
    return Status::Ok();
  }

  Status write_batch(const std::vector<Job*>& batch, std::uint64_t first, bool& began) {
    MEDGATE_ASSIGN_OR_RETURN(auto tx, sql::Transaction::immediate(db_, tx_statements_));
    began = true;
    std::uint64_t index = first;
    std::vector<KeyEpoch> new_epochs;
    // This batch's subject updates, in index order, and the newest index per subject among them:
    // latest_subjects_ learns them only once the batch is durable.
    std::vector<std::pair<Bytes, std::uint64_t>> subject_updates;
    std::unordered_map<Bytes, std::uint64_t, SubjectHash> batch_latest;
    for (Job* job : batch) {
      job->first_index = index;
      for (PendingEntry& e : job->entries) {
        if (e.link_subjects) {
          std::vector<SubjectLink> links;
          links.reserve(e.subjects.size());
          for (const Bytes& subject : e.subjects) {
            std::optional<std::uint64_t> previous;
            if (auto it = batch_latest.find(subject); it != batch_latest.end())
              previous = it->second;
            else if (auto old = latest_subjects_.find(subject); old != latest_subjects_.end())
              previous = old->second;
            links.push_back({subject, previous});
          }
          // A retried batch (after a full disk) must not append the links twice.
          if (e.bytes.empty() || e.bytes[0] != std::byte(0xa6))
            return Status::Internal("an entry's bytes already carry subject links");
          MEDGATE_RETURN_IF_ERROR(append_subject_links(e.bytes, links));
          e.leaf = merkle::leaf_hash(e.bytes);
        }
        for (const Bytes& subject : e.subjects) {
          batch_latest[subject] = index;
          subject_updates.emplace_back(subject, index);
        }
        insert_entry_.bind(1, index)
            .bind(2, static_cast<std::int64_t>(e.type))
            .bind(3, e.time_us)
            .bind(4, ByteView(e.bytes));
        if (Status st = insert_entry_.run(); !st.ok())
          return st.with_context(fmt::format("writing entry {}", index));
        for (const Bytes& subject : e.subjects) {
          insert_subject_.bind(1, ByteView(subject)).bind(2, index);
          if (Status st = insert_subject_.run(); !st.ok())
            return st.with_context(fmt::format("indexing entry {}'s subjects", index));
        }
        if (e.type == EntryType::kKeyTransition) {
          MEDGATE_ASSIGN_OR_RETURN(KeyEpoch epoch, write_key_epoch(e, index));
          new_epochs.push_back(epoch);
        }
        tiles_.append(e.leaf);
        ++index;
      }
    }
    std::optional<StoredBlock> new_block;
    if (index > first) {
      for (const auto& [key, hashes] : tiles_.take_dirty()) {
        if (key.level == 0 && hashes.size() < kTileWidth * 32) continue;  // see tile_reader()
        insert_tile_.bind(1, key.level).bind(2, key.index).bind(3, ByteView(hashes));
        MEDGATE_RETURN_IF_ERROR(insert_tile_.run().with_context("writing Merkle tiles"));
      }
      StoredBlock b;
      {
        std::lock_guard lk(state_mu_);
        b.header.ledger_id = ledger_id_;
        b.header.height = last_block_.header.height + 1;
        b.header.previous_hash = last_block_.hash;
        b.header.time_us = std::max(now_us(), last_block_.header.time_us);
      }
      b.header.first_index = first;
      b.header.entry_count = index - first;
      b.header.tree_size = index;
      b.header.root = tiles_.root();
      b.header.key_id = new_epochs.empty() ? key_id() : new_epochs.back().key;
      b.bytes = encode_block_header(b.header);
      b.hash = block_hash(b.bytes);
      insert_block_.bind(1, b.header.height)
          .bind(2, first)
          .bind(3, index - first)
          .bind(4, ByteView(b.bytes));
      if (Status st = insert_block_.run(); !st.ok())
        return st.with_context(fmt::format("writing block {}", b.header.height));
      new_block = std::move(b);
    }
    for (Job* job : batch) {
      if (!job->head) continue;
      const SignedHead& h = *job->head;
      insert_head_.bind(1, h.head.height)
          .bind(2, h.head.tree_size)
          .bind(3, ByteView(h.bytes))
          .bind(4, ByteView(h.signature));
      MEDGATE_RETURN_IF_ERROR(insert_head_.run().with_context("writing a signed head"));
      job->head->sequence = static_cast<std::uint64_t>(sqlite3_last_insert_rowid(db_.handle()));
    }
    MEDGATE_RETURN_IF_ERROR(tx.commit().with_context("committing"));
    // Durable: publish.
    for (auto& [subject, latest] : batch_latest) latest_subjects_[subject] = latest;
    if (new_block) {
      std::lock_guard lk(state_mu_);
      last_block_ = std::move(*new_block);
      committed_size_ = index;
      epochs_.insert(epochs_.end(), new_epochs.begin(), new_epochs.end());
      // The signer folds these into its subject map when it signs a head over this block.
      if (pending_subject_updates_.empty())
        pending_subject_updates_ = std::move(subject_updates);
      else
        pending_subject_updates_.insert(pending_subject_updates_.end(),
                                        std::make_move_iterator(subject_updates.begin()),
                                        std::make_move_iterator(subject_updates.end()));
    }
    appended_.fetch_add(index - first);
    batches_.fetch_add(1);
    return Status::Ok();
  }

  Result<KeyEpoch> write_key_epoch(const PendingEntry& e, std::uint64_t index) {
    MEDGATE_ASSIGN_OR_RETURN(Entry entry, decode_entry(e.bytes));
    const Bytes* id = entry.body.find("new_key_id")->as_bytes();
    KeyEpoch epoch{index + 1, {}};
    std::copy(id->begin(), id->end(), epoch.key.begin());
    insert_epoch_.bind(1, epoch.from_size).bind(2, ByteView(epoch.key)).bind(3, index);
    MEDGATE_RETURN_IF_ERROR(insert_epoch_.run().with_context("writing a key epoch"));
    return epoch;
  }

  static int wal_hook(void* self, sqlite3*, const char*, int pages) {
    auto* impl = static_cast<Impl*>(self);
    impl->wal_pages_ = pages;
    // Past the limit the writer truncates (bound_wal); a passive checkpoint running then would
    // only make that attempt fail as busy.
    bool over = static_cast<std::int64_t>(pages) * 4096 > impl->options_.wal_limit_bytes;
    if (pages >= kCheckpointPages && !over) {
      std::lock_guard lk(impl->checkpoint_mu_);
      impl->checkpoint_wanted_ = true;
      impl->checkpoint_cv_.notify_one();
    }
    return SQLITE_OK;
  }

  // Copies the WAL into the database file on its own connection, off the write path. Passive:
  // it blocks nobody. It cannot restart the WAL while readers keep arriving, though; that is
  // bound_wal()'s job.
  void checkpointer_loop() {
    Result<sql::Database> db = sql::Database::open(options_.path, sql::Database::Mode::kReadWrite);
    // Until a connection has read the file it does not know it is in WAL mode, and a checkpoint
    // on it is a silent no-op.
    if (db.ok()) (void)db->exec("PRAGMA journal_mode=WAL");
    for (;;) {
      std::unique_lock lk(checkpoint_mu_);
      checkpoint_cv_.wait(lk, [&] { return checkpoint_wanted_ || checkpoint_stop_; });
      if (checkpoint_stop_) return;
      checkpoint_wanted_ = false;
      lk.unlock();
      if (db.ok())
        sqlite3_wal_checkpoint_v2(db->handle(), nullptr, SQLITE_CHECKPOINT_PASSIVE, nullptr,
                                  nullptr);
    }
  }

  // Called by the writer between batches. Past wal_limit_bytes, a restarting checkpoint (most
  // frames are already copied by the checkpointer) waits briefly for the current readers, which
  // read in short chunks, so that the next commit writes the WAL from its start again
  // (journal_size_limit then trims the file; a truncate on every restart costs ~30 ms here). If a
  // long-lived reader (an admin's sqlite3 shell, a backup) holds it up, appends go on and the WAL
  // grows until that reader goes: there is no way around that, so retry with a growing back-off
  // rather than stall every batch.
  void bound_wal() {
    if (static_cast<std::int64_t>(wal_pages_.load()) * 4096 <= options_.wal_limit_bytes) return;
    auto now = std::chrono::steady_clock::now();
    if (now < truncate_after_) return;
    sqlite3_busy_timeout(db_.handle(), 250);
    int rc = sqlite3_wal_checkpoint_v2(db_.handle(), nullptr, SQLITE_CHECKPOINT_RESTART, nullptr,
                                       nullptr);
    sqlite3_busy_timeout(db_.handle(), 10000);
    if (rc == SQLITE_OK) {
      wal_pages_ = 0;
      truncate_backoff_ = std::chrono::milliseconds(50);
    } else {
      // Busy: a reader, or the passive checkpointer at work. Back off, longer each time.
      truncate_after_ = now + truncate_backoff_;
      truncate_backoff_ = std::min(truncate_backoff_ * 2, std::chrono::milliseconds(10000));
    }
  }

  // ---- the head signer ----

  std::uint64_t latest_head_size() const {
    std::lock_guard lk(sign_mu_);
    return latest_head_ ? latest_head_->head.tree_size : 0;
  }

  void signer_loop() {
    auto next = std::chrono::steady_clock::now() + options_.head_interval;
    for (;;) {
      std::uint64_t ticket;
      {
        std::unique_lock lk(sign_mu_);
        auto counter_due = [&] {
          if (counter_requested_ > counter_completed_) return true;
          return options_.counter_interval.count() > 0 &&
                 std::chrono::steady_clock::now() >= next_epoch_ &&
                 committed_size_.load() > epoch_tree_size_;
        };
        auto due = [&] {
          if (signer_stop_ || sign_requested_ > sign_completed_ || counter_due()) return true;
          return options_.head_interval.count() > 0 && std::chrono::steady_clock::now() >= next &&
                 (!latest_head_ || latest_head_->head.tree_size < committed_size_.load());
        };
        auto wake = next;
        if (options_.counter_interval.count() > 0) wake = std::min(wake, next_epoch_);
        if (options_.head_interval.count() > 0 || options_.counter_interval.count() > 0)
          sign_cv_.wait_until(lk, wake, due);
        else
          sign_cv_.wait(lk, due);
        if (signer_stop_) {
          signer_stopped_ = true;
          sign_done_cv_.notify_all();
          return;
        }
        if (counter_due()) {
          std::uint64_t counter_ticket = counter_requested_;
          lk.unlock();
          Status s = counter_epoch();
          // A failed epoch (the key store unreachable) is tried again after a pause, not at once.
          if (!s.ok())
            next_epoch_ = std::chrono::steady_clock::now() +
                          std::min<std::chrono::steady_clock::duration>(options_.counter_interval,
                                                                        std::chrono::seconds(10));
          lk.lock();
          last_counter_status_ = s;
          counter_completed_ = counter_ticket;
          sign_done_cv_.notify_all();
          next = std::chrono::steady_clock::now() + options_.head_interval;
          continue;
        }
        if (!due()) {
          next = std::chrono::steady_clock::now() + options_.head_interval;
          continue;
        }
        ticket = sign_requested_;
      }
      Result<SignedHead> signed_head = sign_and_store();
      next = std::chrono::steady_clock::now() + options_.head_interval;
      std::lock_guard lk(sign_mu_);
      publish_head(std::move(signed_head));
      sign_completed_ = ticket;
      sign_done_cv_.notify_all();
    }
  }

  // sign_mu_ held.
  void publish_head(Result<SignedHead> signed_head) {
    if (signed_head.ok()) {
      latest_head_ = std::move(signed_head).value();
      last_sign_status_ = Status::Ok();
      heads_signed_.fetch_add(1);
    } else {
      last_sign_status_ = signed_head.status();
      sign_failures_.fetch_add(1);
    }
  }

  // One rollback-counter epoch (store.h): a durable head carrying device + 1, then the device's
  // increment. Signer thread only.
  Status counter_epoch() {
    Result<std::uint64_t> device = signer_.read_counter();
    if (!device.ok()) return device.status().with_context("reading the rollback counter");
    std::uint64_t next_value = *device + 1;
    if (next_value < declared_counter_.load())
      return Status::FailedPrecondition(fmt::format(
          "the key store's rollback counter {} is behind this ledger's {}: refusing to go back",
          *device, declared_counter_.load()));
    declared_counter_ = next_value;
    std::uint64_t covered = committed_size_.load();
    Result<SignedHead> head = sign_and_store();
    bool head_ok = head.ok();
    Status head_status = head_ok ? Status::Ok() : head.status();
    {
      std::lock_guard lk(sign_mu_);
      publish_head(std::move(head));
    }
    if (!head_ok) return head_status.with_context("signing the rollback-counter head");
    Result<std::uint64_t> moved = signer_.increment_counter();
    if (!moved.ok()) return moved.status().with_context("incrementing the rollback counter");
    {
      std::lock_guard lk(sign_mu_);
      device_counter_ = *moved;
    }
    if (*moved != next_value)
      return Status::FailedPrecondition(fmt::format(
          "the key store's rollback counter went from {} to {}, not to {}: is another ledger "
          "using the same counter?",
          *device, *moved, next_value));
    epoch_tree_size_ = covered;
    next_epoch_ = std::chrono::steady_clock::now() + options_.counter_interval;
    counter_epochs_.fetch_add(1);
    return Status::Ok();
  }

  Result<SignedHead> sign_and_store() {
    HeadBody body;
    std::vector<std::pair<Bytes, std::uint64_t>> updates;
    {
      std::lock_guard lk(state_mu_);
      body.ledger_id = ledger_id_;
      body.height = last_block_.header.height;
      body.block_hash = last_block_.hash;
      body.tree_size = last_block_.header.tree_size;
      body.root = last_block_.header.root;
      body.time_us = std::max(now_us(), last_block_.header.time_us);
      // Exactly the updates of the blocks up to this one (the writer queues them with the block).
      updates.swap(pending_subject_updates_);
    }
    {
      // The subject map at this head's tree size: what the head commits to (subject_map.h). Its
      // cost is here, on the head cadence, never on the append path.
      std::lock_guard lk(head_map_mu_);
      for (const auto& [subject, index] : updates) head_map_.update(subject, index);
      head_map_size_ = body.tree_size;
      body.subject_root = head_map_.root();
      body.subject_count = head_map_.size();
    }
    body.key_id = key_for_size(body.tree_size);
    body.rollback_counter = declared_counter_.load();
    MEDGATE_ASSIGN_OR_RETURN(PublicKey key, public_key(body.key_id));
    Job job;
    SignedHead h;
    h.bytes = encode_head(body);
    h.head = body;
    Result<Bytes> sig = signer_.sign_digest_with(body.key_id, head_digest(h.bytes));
    if (!sig.ok()) return sig.status().with_context("signing a head");
    // A key store that returns a bad signature must not get it stored as if it were good.
    Status check = key.verify_digest(head_digest(h.bytes), *sig);
    if (!check.ok())
      return Status::Internal("the key store returned a signature that does not verify");
    h.signature = std::move(sig).value();
    job.head = std::move(h);
    {
      std::lock_guard lk(queue_mu_);
      queue_.push_back(&job);
    }
    writer_cv_.notify_one();
    if (Status s = job.wait(); !s.ok()) return s.with_context("storing a signed head");
    return std::move(*job.head);
  }

  // The key that signs heads covering tree size `size`.
  KeyId key_for_size(std::uint64_t size) const {
    std::lock_guard lk(state_mu_);
    KeyId key = epochs_.front().key;
    for (const KeyEpoch& e : epochs_)
      if (e.from_size <= size) key = e.key;
    return key;
  }

  // The public half of a key the key store holds.
  Result<PublicKey> public_key(const KeyId& id) {
    std::lock_guard lk(keys_mu_);
    auto it = keys_.find(id);
    if (it == keys_.end()) {
      for (const PublicKey& k : signer_.signing_keys()) keys_.insert_or_assign(k.id(), k);
      it = keys_.find(id);
    }
    if (it == keys_.end())
      return Status::FailedPrecondition(fmt::format(
          "the key store ({}) does not hold signing key {}", signer_.description(), to_hex(id)));
    return it->second;
  }

  LedgerOptions options_;
  hsm::KeyStore& signer_;
  LockFile lock_;
  std::string ledger_id_;
  std::vector<KeyEpoch> epochs_;  // ascending; guarded by state_mu_
  std::mutex keys_mu_;
  std::map<KeyId, PublicKey> keys_;
  std::mutex rotate_mu_;

  sql::Database db_;  // the writer's connection (writer thread only, after open)
  sql::Statement insert_entry_, insert_tile_, insert_block_, insert_head_, insert_epoch_,
      insert_subject_;
  sql::TransactionStatements tx_statements_;
  TileBuilder tiles_;  // writer thread only

  // Every subject's latest entry index, for the links of new entries (entry.h). Writer thread
  // only (and open()); it learns a batch's subjects once the batch is durable.
  std::unordered_map<Bytes, std::uint64_t, SubjectHash> latest_subjects_;
  // The signer's subject map, as of tree size head_map_size_ (the latest head it computed).
  mutable std::mutex head_map_mu_;
  SubjectMap head_map_;
  std::uint64_t head_map_size_ = 0;

  mutable std::mutex state_mu_;
  // Subject updates of committed blocks the signer has not folded into head_map_ yet.
  std::vector<std::pair<Bytes, std::uint64_t>> pending_subject_updates_;
  StoredBlock last_block_;
  Status writer_error_;
  std::atomic<std::uint64_t> committed_size_{0};

  std::mutex queue_mu_;
  std::condition_variable writer_cv_, space_cv_, done_cv_;
  std::deque<Job*> queue_;
  std::size_t queued_entries_ = 0;
  bool accepting_ = true, closed_ = false, writer_stop_ = false, writer_busy_ = false;
  std::thread writer_;

  mutable std::mutex sign_mu_;
  std::condition_variable sign_cv_, sign_done_cv_;
  std::uint64_t sign_requested_ = 0, sign_completed_ = 0;
  bool signer_stop_ = false, signer_stopped_ = false;
  std::optional<SignedHead> latest_head_;
  Status last_sign_status_;
  std::uint64_t counter_requested_ = 0, counter_completed_ = 0;
  Status last_counter_status_;
  std::uint64_t device_counter_ = 0;
  std::thread signer_thread_;
  // Rollback counter: what new heads carry; the signer thread's epoch bookkeeping.
  std::atomic<std::uint64_t> declared_counter_{0};
  std::atomic<std::uint64_t> counter_epochs_{0};
  std::optional<std::uint64_t> restore_entry_;          // set in open(), read-only afterwards
  std::uint64_t epoch_tree_size_ = 0;                   // signer thread only
  std::chrono::steady_clock::time_point next_epoch_{};  // signer thread only

  std::mutex checkpoint_mu_;
  std::condition_variable checkpoint_cv_;
  bool checkpoint_wanted_ = false, checkpoint_stop_ = false;
  std::atomic<int> wal_pages_{0};
  std::chrono::steady_clock::time_point truncate_after_;  // writer thread only
  std::chrono::milliseconds truncate_backoff_{50};
  std::thread checkpointer_;

  mutable std::mutex readers_mu_;
  mutable std::vector<sql::Database> readers_;

  std::atomic<std::uint64_t> appended_{0}, batches_{0}, failed_appends_{0}, heads_signed_{0},
      sign_failures_{0};
};

// ---- Ledger ----

Ledger::Ledger(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Ledger::~Ledger() {
  close();
}

Result<std::unique_ptr<Ledger>> Ledger::create(const LedgerOptions& options,
                                               const std::string& ledger_id, hsm::KeyStore& signer,
                                               const std::string& actor) {
  if (ledger_id.empty()) return Status::InvalidArgument("the ledger id is empty");
  if (std::filesystem::exists(options.path))
    return Status::FailedPrecondition(
        fmt::format("{} exists already; refusing to overwrite a ledger", options.path.string()));
  {
    MEDGATE_ASSIGN_OR_RETURN(LockFile lock, LockFile::acquire(options.path));
    MEDGATE_ASSIGN_OR_RETURN(sql::Database db,
                             sql::Database::open(options.path, sql::Database::Mode::kCreate));
    MEDGATE_RETURN_IF_ERROR(apply_pragmas(db, options));
    MEDGATE_RETURN_IF_ERROR(migrate_schema(db));

    const PublicKey& key = signer.signing_key();
    std::uint64_t now = now_us();
    Entry genesis;
    genesis.type = EntryType::kGenesis;
    genesis.time_us = now;
    genesis.actor = actor;
    MEDGATE_ASSIGN_OR_RETURN(
        genesis.body,
        cbor::Value::map({
            {cbor::Value::text("ledger_id"), cbor::Value::text(ledger_id)},
            {cbor::Value::text("key_id"), cbor::Value::bytes(key.id())},
            {cbor::Value::text("public_key"), cbor::Value::bytes(key.spki_der())},
            {cbor::Value::text("key_store"), cbor::Value::text(signer.description())},
            {cbor::Value::text("software"), cbor::Value::text("medgate " MEDGATE_VERSION)},
        }));
    MEDGATE_ASSIGN_OR_RETURN(Bytes entry_bytes, encode_entry(genesis));
    TileBuilder builder;
    builder.append(merkle::leaf_hash(entry_bytes));

    BlockHeader header;
    header.ledger_id = ledger_id;
    header.height = 0;
    header.first_index = 0;
    header.entry_count = 1;
    header.tree_size = 1;
    header.root = builder.root();
    header.time_us = now;
    header.key_id = key.id();
    Bytes header_bytes = encode_block_header(header);

    Result<std::uint64_t> counter = signer.read_counter();
    if (!counter.ok()) return counter.status().with_context("reading the rollback counter");
    // The genesis entry names no subject: the subject map is empty.
    HeadBody head{kHeadFormatVersion,
                  ledger_id,
                  0,
                  block_hash(header_bytes),
                  1,
                  header.root,
                  now,
                  key.id(),
                  *counter,
                  merkle::empty_root(),
                  0};
    Bytes head_bytes = encode_head(head);
    MEDGATE_ASSIGN_OR_RETURN(Bytes signature, signer.sign_digest(head_digest(head_bytes)));
    MEDGATE_RETURN_IF_ERROR(key.verify_digest(head_digest(head_bytes), signature)
                                .with_context("the key store's first signature does not verify"));

    MEDGATE_ASSIGN_OR_RETURN(auto tx, sql::Transaction::immediate(db));
    MEDGATE_ASSIGN_OR_RETURN(auto meta,
                             db.prepare("INSERT INTO meta (key, value) VALUES ('ledger_id', ?)"));
    MEDGATE_RETURN_IF_ERROR(meta.bind(1, ByteView(as_bytes(ledger_id))).run());
    MEDGATE_ASSIGN_OR_RETURN(
        auto ins_entry,
        db.prepare("INSERT INTO entries (idx, type, time_us, bytes) VALUES (0,?,?,?)"));
    MEDGATE_RETURN_IF_ERROR(ins_entry.bind(1, static_cast<std::int64_t>(EntryType::kGenesis))
                                .bind(2, now)
                                .bind(3, ByteView(entry_bytes))
                                .run());
    MEDGATE_ASSIGN_OR_RETURN(auto ins_tile,
                             db.prepare("INSERT INTO tiles (level, idx, hashes) VALUES (?,?,?)"));
    for (const auto& [k, hashes] : builder.take_dirty())
      if (k.level != 0 || hashes.size() == kTileWidth * 32)  // see tile_reader()
        MEDGATE_RETURN_IF_ERROR(
            ins_tile.bind(1, k.level).bind(2, k.index).bind(3, ByteView(hashes)).run());
    MEDGATE_ASSIGN_OR_RETURN(
        auto ins_block,
        db.prepare(
            "INSERT INTO blocks (height, first_index, entry_count, header) VALUES (0,0,1,?)"));
    MEDGATE_RETURN_IF_ERROR(ins_block.bind(1, ByteView(header_bytes)).run());
    MEDGATE_ASSIGN_OR_RETURN(
        auto ins_head,
        db.prepare("INSERT INTO heads (height, tree_size, head, signature) VALUES (0,1,?,?)"));
    MEDGATE_RETURN_IF_ERROR(
        ins_head.bind(1, ByteView(head_bytes)).bind(2, ByteView(signature)).run());
    MEDGATE_RETURN_IF_ERROR(tx.commit());
    fsync_directory(options.path.has_parent_path() ? options.path.parent_path() : ".");
  }
  return open(options, signer);
}

Result<std::unique_ptr<Ledger>> Ledger::open(const LedgerOptions& options, hsm::KeyStore& signer) {
  if (!std::filesystem::exists(options.path))
    return Status::NotFound(fmt::format("no ledger at {}", options.path.string()));
  MEDGATE_ASSIGN_OR_RETURN(LockFile lock, LockFile::acquire(options.path));
  auto impl = std::make_unique<Impl>(options, signer, std::move(lock));
  MEDGATE_RETURN_IF_ERROR(impl->open().with_context(options.path.string()));
  return std::unique_ptr<Ledger>(new Ledger(std::move(impl)));
}

Result<std::uint64_t> Ledger::append(const Entry& entry) {
  return impl_->append(std::span(&entry, 1));
}
Result<std::uint64_t> Ledger::append_all(std::span<const Entry> entries) {
  return impl_->append(entries);
}
Status Ledger::append_async(std::span<const Entry> entries,
                            std::function<void(Result<std::uint64_t>)> done) {
  return impl_->append_async(entries, std::move(done));
}
Result<KeyRotation> Ledger::rotate_signing_key(const std::string& actor) {
  return impl_->rotate_signing_key(actor);
}
void Ledger::close() {
  if (impl_) impl_->close();
}
const std::string& Ledger::ledger_id() const {
  return impl_->ledger_id();
}
KeyId Ledger::signing_key_id() const {
  return impl_->key_id();
}
LedgerStats Ledger::stats() const {
  return impl_->stats();
}
std::optional<SignedHead> Ledger::latest_head() const {
  return impl_->latest_head();
}
Result<StoredEntry> Ledger::entry(std::uint64_t index) const {
  return impl_->entry(index);
}
Result<StoredBlock> Ledger::block(std::uint64_t height) const {
  return impl_->block(height);
}
Result<std::uint64_t> Ledger::block_height_of(std::uint64_t index) const {
  return impl_->block_height_of(index);
}
Result<SignedHead> Ledger::head(std::uint64_t sequence) const {
  return impl_->head(sequence);
}
Result<Hash> Ledger::root_at(std::uint64_t size) const {
  return impl_->root_at(size);
}
Result<std::vector<Hash>> Ledger::inclusion_proof(std::uint64_t index, std::uint64_t size) const {
  return impl_->inclusion_proof(index, size);
}
Result<std::vector<std::vector<Hash>>> Ledger::inclusion_proofs(
    std::span<const std::uint64_t> indexes, std::uint64_t size) const {
  return impl_->inclusion_proofs(indexes, size);
}
Result<std::vector<Hash>> Ledger::multi_inclusion_proof(std::span<const std::uint64_t> indexes,
                                                        std::uint64_t size) const {
  return impl_->multi_inclusion_proof(indexes, size);
}
Result<std::vector<StoredEntry>> Ledger::entries_at(std::span<const std::uint64_t> indexes) const {
  return impl_->entries_at(indexes);
}
Result<std::vector<Hash>> Ledger::consistency_proof(std::uint64_t from, std::uint64_t to) const {
  return impl_->consistency_proof(from, to);
}
Result<std::vector<StoredEntry>> Ledger::entries_of_type(std::span<const EntryType> types,
                                                         std::uint64_t from,
                                                         std::size_t limit) const {
  return impl_->entries_of_type(types, from, limit);
}
Result<std::vector<std::uint64_t>> Ledger::subject_entries(ByteView subject, std::uint64_t from,
                                                           std::size_t limit) const {
  return impl_->subject_entries(subject, from, limit);
}
Result<SubjectMapProof> Ledger::subject_map_proof(ByteView subject, const SignedHead& head) const {
  return impl_->subject_map_proof(subject, head);
}
Result<SignedHead> Ledger::first_head_covering(std::uint64_t index) const {
  return impl_->first_head_covering(index);
}
Result<SignedHead> Ledger::sign_head_now(bool force) {
  return impl_->sign_head_now(force);
}

}  // namespace medgate::ledger
