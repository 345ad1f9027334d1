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
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <span>
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
// Only complete tiles are stored (schema 5, ledger/schema.cc): the partial tile at the right edge
// of each level would otherwise be rewritten by every commit, a WAL page per level each time. A
// tile that is not stored is recomputed here: at level 0 from the (at most 15) entries it covers,
// above from the roots of the complete tiles one level down (at most 15 reads). A tile that ends
// short (a gap, or a child that is not complete) stops there: callers see a short tile.
TileReader tile_reader(const sql::Database& db) {
  struct Reader {
    Result<sql::Statement> tile, entries;

    Result<Bytes> read(int level, std::uint64_t index) {
      if (!tile.ok()) return tile.status();
      if (!entries.ok()) return entries.status();
      MEDGATE_ASSIGN_OR_RETURN(std::int64_t pos, tile_position({level, index}));
      sql::Statement& s = tile.value();
      s.bind(1, pos);
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
      if (out.ok() || out.status().code() != StatusCode::kNotFound) return out;
      Result<Bytes> hashes = level == 0 ? leaf_hashes(index) : child_roots(level, index);
      if (!hashes.ok()) return hashes.status();
      if (hashes->empty()) return out;
      return hashes;
    }

    Result<Bytes> leaf_hashes(std::uint64_t index) {
      sql::Statement& e = entries.value();
      e.bind(1, index * kTileWidth).bind(2, (index + 1) * kTileWidth);
      Bytes hashes;
      for (std::uint64_t expected = index * kTileWidth;; ++expected) {
        Result<sql::Statement::Step> row = e.step();
        if (!row.ok()) {
          e.reset();
          return row.status();
        }
        if (*row == sql::Statement::Step::kDone) break;
        if (e.column_uint(0) != expected) break;  // a gap
        Hash leaf = merkle::leaf_hash(e.column_blob(1));
        hashes.insert(hashes.end(), leaf.begin(), leaf.end());
      }
      e.reset();
      return hashes;
    }

    Result<Bytes> child_roots(int level, std::uint64_t index) {
      Bytes hashes;
      for (std::uint64_t i = 0; i < kTileWidth; ++i) {
        Result<Bytes> child = read(level - 1, index * kTileWidth + i);
        if (!child.ok() && child.status().code() == StatusCode::kNotFound) break;
        if (!child.ok()) return child.status();
        if (child->size() != kTileWidth * sizeof(Hash)) break;  // not complete: no node above it
        Hash root = tile_root(*child);
        hashes.insert(hashes.end(), root.begin(), root.end());
      }
      return hashes;
    }
  };
  auto reader = std::make_shared<Reader>(
      Reader{db.prepare("SELECT hashes FROM merkle_tiles WHERE pos = ?"),
             db.prepare("SELECT idx, bytes FROM entries WHERE idx >= ? AND idx < ? ORDER BY idx")});
  return [reader](int level, std::uint64_t index) { return reader->read(level, index); };
}

// Calls fn(index, bytes) for the entries of `types` with indexes in [from, until), in index
// order, at most `limit` of them (0: no limit), read through type_runs (ledger/schema.cc, 4 -> 5):
// no entry of a type lies outside its runs, so only the runs' ranges are scanned, each once even
// where runs of several of the types overlap.
Status for_each_entry_of_type(const sql::Database& db, std::span<const EntryType> types,
                              std::uint64_t from, std::uint64_t until, std::size_t limit,
                              const std::function<Status(std::uint64_t, ByteView)>& fn) {
  struct Runs {
    sql::Statement st;
    bool has = false;
    std::uint64_t first = 0, end = 0;
    Status next() {
      MEDGATE_ASSIGN_OR_RETURN(auto step, st.step());
      has = step == sql::Statement::Step::kRow;
      if (has) {
        first = st.column_uint(0);
        end = st.column_uint(1);
      }
      return Status::Ok();
    }
  };
  std::string in;
  std::vector<Runs> runs;
  for (EntryType t : types) {
    const auto type = static_cast<std::uint32_t>(t);
    in += fmt::format("{}{}", in.empty() ? "" : ",", type);
    MEDGATE_ASSIGN_OR_RETURN(auto st, db.prepare("SELECT first_index, end_index FROM type_runs "
                                                 "WHERE type = ? AND end_index > ? ORDER BY "
                                                 "end_index"));
    st.bind(1, static_cast<std::int64_t>(type)).bind(2, from);
    runs.push_back({std::move(st)});
    MEDGATE_RETURN_IF_ERROR(runs.back().next());
  }
  if (in.empty()) return Status::Ok();
  MEDGATE_ASSIGN_OR_RETURN(
      auto scan, db.prepare(fmt::format("SELECT idx, bytes FROM entries WHERE idx >= ? AND idx < ? "
                                        "AND type IN ({}) ORDER BY idx",
                                        in)));
  std::size_t found = 0;
  for (std::uint64_t pos = from; pos < until && (limit == 0 || found < limit);) {
    // The run, among the types', that reaches furthest left of what is not yet scanned.
    std::optional<std::pair<std::uint64_t, std::uint64_t>> next;
    for (Runs& r : runs) {
      while (r.has && r.end <= pos) MEDGATE_RETURN_IF_ERROR(r.next());
      if (!r.has) continue;
      const std::uint64_t begin = std::max(r.first, pos);
      if (!next || begin < next->first) next = {begin, r.end};
    }
    if (!next || next->first >= until) break;
    const std::uint64_t end = std::min(next->second, until);
    scan.bind(1, next->first).bind(2, end);
    for (;;) {
      Result<sql::Statement::Step> step = scan.step();
      if (!step.ok()) {
        scan.reset();
        return step.status();
      }
      if (*step != sql::Statement::Step::kRow) break;
      if (Status s = fn(scan.column_uint(0), scan.column_blob(1)); !s.ok()) {
        scan.reset();
        return s;
      }
      if (++found == limit) break;
    }
    scan.reset();
    pos = end;
  }
  return Status::Ok();
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

// The end_index of a type's open run in type_runs: one that goes on to the ledger's end
// (ledger/schema.cc, 4 -> 5; Ledger::Impl::write_type_runs()).
constexpr std::uint64_t kOpenRunEnd = std::uint64_t{1} << 62;

// A range of entry indexes [first, end) outside which no entry of some type lies (type_runs).
struct TypeRun {
  std::uint64_t first = 0, end = 0;
};

// Adds `type` to a block's types (with `index`, its first entry there) unless it is there.
void note_type(std::vector<std::pair<std::uint32_t, std::uint64_t>>& firsts, EntryType type,
               std::uint64_t index) {
  const auto t = static_cast<std::uint32_t>(type);
  for (const auto& f : firsts)
    if (f.first == t) return;
  firsts.emplace_back(t, index);
}

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
  // Or work to run on the writer thread alone (replication: build, apply, start).
  std::function<Status()> task;

  // Replicated mode: the entries went to the outbox as sequences [first_index, last_seq]. A
  // synchronous appender then waits, under the ledger's outbox_mu_, for the cluster to order them.
  bool queued = false;
  std::uint64_t last_seq = 0;
  std::optional<std::uint64_t> ordered_first;  // the index of the first entry, once ordered
  bool ordered = false;
  Status order_status;

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

// A new ledger file's first rows, inside the caller's transaction: its id, the genesis entry and
// its Merkle tiles, block 0 and the first signed head (Ledger::create and create_replica).
Status write_first_block(sql::Database& db, const std::string& ledger_id, ByteView entry_bytes,
                         std::uint64_t entry_time_us, ByteView header_bytes, ByteView head_bytes,
                         ByteView signature) {
  MEDGATE_ASSIGN_OR_RETURN(auto meta,
                           db.prepare("INSERT INTO meta (key, value) VALUES ('ledger_id', ?)"));
  MEDGATE_RETURN_IF_ERROR(meta.bind(1, ByteView(as_bytes(ledger_id))).run());
  MEDGATE_ASSIGN_OR_RETURN(
      auto ins_entry,
      db.prepare("INSERT INTO entries (idx, type, time_us, bytes) VALUES (0,?,?,?)"));
  MEDGATE_RETURN_IF_ERROR(ins_entry.bind(1, static_cast<std::int64_t>(EntryType::kGenesis))
                              .bind(2, entry_time_us)
                              .bind(3, entry_bytes)
                              .run());
  // One leaf completes no Merkle tile (tile_reader() recomputes the partial ones).
  MEDGATE_ASSIGN_OR_RETURN(
      auto ins_run,
      db.prepare("INSERT INTO type_runs (type, end_index, first_index) VALUES (?,?,0)"));
  MEDGATE_RETURN_IF_ERROR(
      ins_run.bind(1, static_cast<std::int64_t>(EntryType::kGenesis)).bind(2, kOpenRunEnd).run());
  MEDGATE_ASSIGN_OR_RETURN(
      auto ins_block,
      db.prepare("INSERT INTO blocks (height, first_index, entry_count, header) VALUES (0,0,1,?)"));
  MEDGATE_RETURN_IF_ERROR(ins_block.bind(1, header_bytes).run());
  MEDGATE_ASSIGN_OR_RETURN(
      auto ins_head,
      db.prepare("INSERT INTO heads (height, tree_size, head, signature) VALUES (0,1,?,?)"));
  return ins_head.bind(1, head_bytes).bind(2, signature).run();
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
    MEDGATE_ASSIGN_OR_RETURN(insert_tile_,
                             db_.prepare("INSERT INTO merkle_tiles (pos, hashes) VALUES (?,?)"));
    MEDGATE_ASSIGN_OR_RETURN(
        insert_run_,
        db_.prepare("INSERT INTO type_runs (type, end_index, first_index) VALUES (?,?,?)"));
    MEDGATE_ASSIGN_OR_RETURN(
        close_run_,
        db_.prepare("UPDATE type_runs SET end_index = ? WHERE type = ? AND end_index = ?"));
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
    MEDGATE_ASSIGN_OR_RETURN(
        insert_outbox_,
        db_.prepare(
            "INSERT INTO outbox (type, time_us, bytes, subjects, link) VALUES (?,?,?,?,?)"));
    MEDGATE_ASSIGN_OR_RETURN(
        insert_record_,
        db_.prepare("INSERT INTO block_records (height, proposer, signature, outbox_first, "
                    "outbox_count) VALUES (?,?,?,?,?)"));
    MEDGATE_RETURN_IF_ERROR(load_subjects().with_context("loading the subjects' latest entries"));
    MEDGATE_RETURN_IF_ERROR(load_outbox().with_context("reading the outbox"));
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
    for (const Entry& e : entries)
      if (e.type == EntryType::kMemberProposal || e.type == EntryType::kMemberApproval)
        return Status::InvalidArgument(
            "membership entries are written through append_membership(), which checks them");
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

  Result<std::uint64_t> append(std::span<const Entry> entries, bool internal = false,
                               bool membership = false) {
    Job job;
    if (!membership)
      for (const Entry& e : entries)
        if (e.type == EntryType::kMemberProposal || e.type == EntryType::kMemberApproval)
          return Status::InvalidArgument(
              "membership entries are written through append_membership(), which checks them");
    if (Status s = prepare(job, entries, internal); !s.ok()) {
      failed_appends_.fetch_add(1);
      return s;
    }
    Status s = submit(job);
    if (!s.ok()) {
      failed_appends_.fetch_add(1);
      return s;
    }
    if (job.queued) return wait_ordered(job);
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
    // Replicated: the transition is ordered like any entry (append waits for it), and applying
    // it moves this member to the new key (apply_record); the block that holds it is still
    // proposed with the old key.
    KeyId old_id = replicated_ ? own_member_key() : key_id();
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

  // ---- membership and replication (store.h) ----

  // Runs `fn` on the writer thread, alone, and returns its status.
  Status run_on_writer(std::function<Status()> fn) {
    Job job;
    job.task = std::move(fn);
    {
      std::lock_guard lk(queue_mu_);
      if (!accepting_) return Status::FailedPrecondition("the ledger is closing");
      queue_.push_back(&job);
    }
    writer_cv_.notify_one();
    return job.wait();
  }

  Result<std::uint64_t> append_membership(const Entry& entry) {
    if (entry.type != EntryType::kMemberProposal && entry.type != EntryType::kMemberApproval)
      return Status::InvalidArgument("not a membership entry");
    std::lock_guard serial(membership_append_mu_);
    {
      std::lock_guard lk(state_mu_);
      MEDGATE_RETURN_IF_ERROR(membership_.check(entry, active_pub_ ? active_pub_->id() : KeyId{}));
    }
    return append(std::span(&entry, 1), /*internal=*/false, /*membership=*/true);
  }

  Status start_replication(const std::string& member_id) {
    const PublicKey own = active_key();
    return run_on_writer([&]() -> Status {
      if (replicated_) {
        if (member_id == member_id_) return Status::Ok();
        return Status::FailedPrecondition(
            fmt::format("this ledger is replicated already, as member \"{}\"", member_id_));
      }
      Membership m = membership_copy();
      const Member* me = m.find(member_id);
      if (!m.founded())
        return Status::FailedPrecondition("the membership is not founded (no member yet)");
      if (!me || me->signing_key.id() != own.id())
        return Status::FailedPrecondition(
            fmt::format("\"{}\" is not the member holding this ledger's signing key", member_id));
      const std::uint64_t from = committed_size_.load();
      MEDGATE_ASSIGN_OR_RETURN(Bytes meta, replica_meta(member_id, own.id(), from, own));
      MEDGATE_ASSIGN_OR_RETURN(auto tx, sql::Transaction::immediate(db_));
      MEDGATE_ASSIGN_OR_RETURN(auto st,
                               db_.prepare("INSERT INTO meta (key, value) VALUES ('replica', ?)"));
      MEDGATE_RETURN_IF_ERROR(st.bind(1, ByteView(meta)).run());
      MEDGATE_RETURN_IF_ERROR(tx.commit());
      member_id_ = member_id;
      member_key_ = own.id();
      founder_key_ = own;
      replicated_ = true;
      return Status::Ok();
    });
  }

  static Result<Bytes> replica_meta(const std::string& member_id, const KeyId& key,
                                    std::uint64_t from, const PublicKey& founder) {
    using cbor::Value;
    MEDGATE_ASSIGN_OR_RETURN(Value v,
                             Value::map({
                                 {Value::text("member_id"), Value::text(member_id)},
                                 {Value::text("key_id"), Value::bytes(key)},
                                 {Value::text("from_size"), Value::uint(from)},
                                 {Value::text("founder_key"), Value::bytes(founder.spki_der())},
                             }));
    return cbor::encode(v);
  }

  std::optional<ReplicaInfo> replica() const {
    if (!replicated_) return std::nullopt;
    ReplicaInfo r;
    r.member_id = member_id_;
    r.key_id = own_member_key();
    r.founder_key = founder_key_;
    {
      std::lock_guard lk(outbox_mu_);
      r.outbox_entries = outbox_entries_;
      r.outbox_first = outbox_first_;
      r.outbox_oldest_us = outbox_oldest_us_;
    }
    r.blocks_applied = blocks_applied_.load();
    r.own_blocks = own_blocks_.load();
    r.queued_total = queued_total_.load();
    return r;
  }

  Membership membership() const { return membership_copy(); }

  PublicKey active_key() const {
    std::lock_guard lk(state_mu_);
    return *active_pub_;
  }

  Result<ChainTip> chain_tip() {
    ChainTip tip;
    if (Status task = run_on_writer([&] {
          tip = current_tip();
          return Status::Ok();
        });
        !task.ok())
      return task;
    return tip;
  }

  Result<BlockRecord> build_block(std::size_t max_entries, std::size_t max_bytes) {
    BlockRecord record;
    if (Status task = run_on_writer([&]() -> Status {
          MEDGATE_ASSIGN_OR_RETURN(record, build_record(max_entries, max_bytes));
          return Status::Ok();
        });
        !task.ok())
      return task;
    Result<Bytes> sig =
        signer_.sign_digest_with(record.header.key_id, block_hash(record.header_bytes));
    if (!sig.ok()) return sig.status().with_context("signing a block");
    record.signature = std::move(sig).value();
    return record;
  }

  Status apply_block(const BlockRecord& record) {
    return run_on_writer([&] { return apply_record(record); });
  }

  bool wait_for_outbox(std::chrono::milliseconds timeout) const {
    std::unique_lock lk(outbox_mu_);
    return outbox_cv_.wait_for(lk, timeout, [&] { return outbox_entries_ > 0; });
  }

  // Replicated mode: a synchronous appender waits for the cluster to order its entries.
  Result<std::uint64_t> wait_ordered(Job& job) {
    std::unique_lock lk(outbox_mu_);
    bool settled = order_cv_.wait_for(lk, options_.order_timeout, [&] { return job.ordered; });
    if (!settled) {
      order_waiters_.erase(job.first_index);
      return Status::Unavailable(fmt::format(
          "recorded locally (queued as outbox entry {}), but the cluster has not ordered it "
          "within {} ms; it stays queued and is ordered when the cluster is reachable",
          job.first_index, options_.order_timeout.count()));
    }
    if (!job.order_status.ok()) return job.order_status;
    if (!job.ordered_first) return Status::Internal("an ordered entry has no index");
    return *job.ordered_first;
  }

  Result<BlockRecord> block_record(std::uint64_t height) {
    BlockRecord r;
    bool stored = false;
    if (Status task = with_reader([&](sql::Database& db) -> Status {
          MEDGATE_ASSIGN_OR_RETURN(
              auto b,
              db.prepare("SELECT header, first_index, entry_count FROM blocks WHERE height = ?"));
          b.bind(1, height);
          MEDGATE_ASSIGN_OR_RETURN(auto step, b.step());
          if (step != sql::Statement::Step::kRow)
            return Status::NotFound(fmt::format("no block {}", height));
          ByteView header = b.column_blob(0);
          r.header_bytes.assign(header.begin(), header.end());
          MEDGATE_ASSIGN_OR_RETURN(r.header, decode_block_header(r.header_bytes));
          MEDGATE_ASSIGN_OR_RETURN(
              auto e,
              db.prepare("SELECT bytes FROM entries WHERE idx >= ? AND idx < ? ORDER BY idx"));
          e.bind(1, r.header.first_index).bind(2, r.header.first_index + r.header.entry_count);
          for (;;) {
            MEDGATE_ASSIGN_OR_RETURN(auto row, e.step());
            if (row != sql::Statement::Step::kRow) break;
            ByteView bytes = e.column_blob(0);
            r.entries.emplace_back(bytes.begin(), bytes.end());
          }
          MEDGATE_ASSIGN_OR_RETURN(
              auto rec, db.prepare("SELECT proposer, signature, outbox_first, outbox_count FROM "
                                   "block_records WHERE height = ?"));
          rec.bind(1, height);
          MEDGATE_ASSIGN_OR_RETURN(auto found, rec.step());
          if (found == sql::Statement::Step::kRow) {
            stored = true;
            r.proposer = std::string(to_string(rec.column_blob(0)));
            ByteView sig = rec.column_blob(1);
            r.signature.assign(sig.begin(), sig.end());
            r.outbox_first = rec.column_uint(2);
            r.outbox_count = rec.column_uint(3);
          }
          return Status::Ok();
        });
        !task.ok())
      return task;
    if (r.entries.size() != r.header.entry_count)
      return Status::Corruption(fmt::format("block {} lacks entries", height));
    if (stored) return r;
    // A block from before replication: the founder vouches for it with its member key, once;
    // the signature is kept so the record stays the same bytes whenever it is asked for again.
    if (!replicated_ || !founder_key_ || founder_key_->id() != member_key_)
      return Status::FailedPrecondition(
          fmt::format("block {} predates replication and only the founder can publish it", height));
    MEDGATE_ASSIGN_OR_RETURN(r.signature,
                             signer_.sign_digest_with(member_key_, block_hash(r.header_bytes)));
    r.proposer = member_id_;
    if (Status task = run_on_writer([&]() -> Status {
          MEDGATE_ASSIGN_OR_RETURN(auto tx, sql::Transaction::immediate(db_));
          MEDGATE_ASSIGN_OR_RETURN(
              auto ins, db_.prepare("INSERT OR IGNORE INTO block_records (height, proposer, "
                                    "signature, outbox_first, outbox_count) VALUES (?,?,?,0,0)"));
          MEDGATE_RETURN_IF_ERROR(
              ins.bind(1, height).bind(2, r.proposer).bind(3, ByteView(r.signature)).run());
          return tx.commit();
        });
        !task.ok())
      return task;
    return block_record(height);  // what is stored now (another caller may have won)
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
    if (types.empty() || limit == 0) return std::vector<StoredEntry>{};
    return with_reader([&](sql::Database& db) -> Result<std::vector<StoredEntry>> {
      std::vector<StoredEntry> out;
      MEDGATE_RETURN_IF_ERROR(for_each_entry_of_type(
          db, types, from, size, limit, [&](std::uint64_t index, ByteView bytes) -> Status {
            StoredEntry e;
            e.index = index;
            e.bytes.assign(bytes.begin(), bytes.end());
            e.leaf = merkle::leaf_hash(e.bytes);
            Result<Entry> decoded = decode_entry(e.bytes);
            if (!decoded.ok()) return decoded.status().with_context(fmt::format("entry {}", index));
            e.entry = std::move(decoded).value();
            out.push_back(std::move(e));
            return Status::Ok();
          }));
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
    MEDGATE_RETURN_IF_ERROR(load_type_runs().with_context("reading the type runs"));
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
    MEDGATE_RETURN_IF_ERROR(load_membership(g->body).with_context("reading the membership"));
    MEDGATE_RETURN_IF_ERROR(load_replica().with_context("reading the replication settings"));
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

  // The membership and the active key, from the genesis entry and every membership and
  // key-transition entry in order (found through type_runs).
  Status load_membership(const cbor::Value& genesis_body) {
    auto genesis_key = PublicKey::from_spki_der(*genesis_body.find("public_key")->as_bytes());
    if (!genesis_key.ok()) return genesis_key.status().with_context("the genesis key");
    std::lock_guard lk(state_mu_);
    membership_ = Membership(ledger_id_);
    active_pub_ = std::move(genesis_key).value();
    constexpr EntryType kTypes[] = {EntryType::kKeyTransition, EntryType::kMemberProposal,
                                    EntryType::kMemberApproval};
    return for_each_entry_of_type(
        db_, kTypes, 0, committed_size_.load(), 0,
        [&](std::uint64_t index, ByteView bytes) -> Status {
          Result<Entry> e = decode_entry(bytes);
          if (!e.ok()) return e.status().with_context(fmt::format("entry {}", index));
          apply_to_membership(*e, index);
          return Status::Ok();
        });
  }

  // meta 'replica': {"member_id", "key_id", "from_size", "founder_key"} once replicated.
  Status load_replica() {
    MEDGATE_ASSIGN_OR_RETURN(auto st, db_.prepare("SELECT value FROM meta WHERE key = 'replica'"));
    MEDGATE_ASSIGN_OR_RETURN(auto step, st.step());
    if (step != sql::Statement::Step::kRow) return Status::Ok();
    MEDGATE_ASSIGN_OR_RETURN(cbor::Value v, cbor::decode(st.column_blob(0)));
    const std::string* member = v.find("member_id") ? v.find("member_id")->as_text() : nullptr;
    const Bytes* key = v.find("key_id") ? v.find("key_id")->as_bytes() : nullptr;
    std::optional<std::uint64_t> from =
        v.find("from_size") ? v.find("from_size")->as_uint() : std::nullopt;
    const Bytes* founder = v.find("founder_key") ? v.find("founder_key")->as_bytes() : nullptr;
    if (!member || !key || key->size() != 32 || !from || !founder)
      return Status::Corruption("the replication settings are malformed");
    MEDGATE_ASSIGN_OR_RETURN(PublicKey founder_key, PublicKey::from_spki_der(*founder));
    member_id_ = *member;
    std::copy(key->begin(), key->end(), member_key_.begin());
    founder_key_ = std::move(founder_key);
    {
      // This replica's heads are signed by its own member key from `from` on.
      std::lock_guard lk(state_mu_);
      if (epochs_.back().key != member_key_) epochs_.push_back({*from, member_key_});
    }
    replicated_ = true;
    return Status::Ok();
  }

  Status load_outbox() {
    MEDGATE_ASSIGN_OR_RETURN(auto st, db_.prepare("SELECT count(*), min(seq) FROM outbox"));
    MEDGATE_ASSIGN_OR_RETURN(auto step, st.step());
    (void)step;
    std::lock_guard lk(outbox_mu_);
    outbox_entries_ = st.column_uint(0);
    outbox_first_ = outbox_entries_ ? st.column_uint(1) : 0;
    if (outbox_entries_ > 0) {
      MEDGATE_ASSIGN_OR_RETURN(auto t, db_.prepare("SELECT time_us FROM outbox WHERE seq = ?"));
      t.bind(1, outbox_first_);
      MEDGATE_ASSIGN_OR_RETURN(auto row, t.step());
      if (row == sql::Statement::Step::kRow) outbox_oldest_us_ = t.column_uint(0);
    }
    return Status::Ok();
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
      // A task runs alone; a batch stops before the next task so that tasks keep their place.
      while (!queue_.empty() && (batch.empty() || (!queue_.front()->task && !batch.front()->task &&
                                                   entries + queue_.front()->entries.size() <=
                                                       options_.max_batch_entries))) {
        entries += queue_.front()->entries.size();
        batch.push_back(queue_.front());
        queue_.pop_front();
      }
      writer_busy_ = true;
      lk.unlock();
      Status s = batch.front()->task ? batch.front()->task() : commit_batch(batch);
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

  // The complete Merkle tiles the entries just appended to tiles_ completed, in the order they
  // completed: each is the merkle_tiles table's new last row (tiles.h, tile_position()). Partial
  // tiles are not stored (tile_reader() recomputes them).
  Status write_complete_tiles() {
    for (const auto& [key, hashes] : tiles_.take_completed()) {
      MEDGATE_ASSIGN_OR_RETURN(std::int64_t pos, tile_position(key));
      insert_tile_.bind(1, pos).bind(2, ByteView(hashes));
      MEDGATE_RETURN_IF_ERROR(insert_tile_.run().with_context("writing Merkle tiles"));
    }
    return Status::Ok();
  }

  // Records in type_runs that a block holding entries [first, end) holds the types in `firsts`
  // (each with its first index in the block). A type's last run stays open on disk (end_index
  // kOpenRunEnd, ledger/schema.cc) for as long as consecutive blocks hold the type: a type the
  // block before held costs no write; a type it did not hold starts an open run at its first
  // index here; an open run whose type this block lacks is closed where it really ended. So
  // after every commit the open runs are exactly the last block's types, and most commits write
  // nothing here. `open` receives them with their in-memory ends, for open_runs_ once durable.
  Status write_type_runs(std::uint64_t first, std::uint64_t end,
                         const std::vector<std::pair<std::uint32_t, std::uint64_t>>& firsts,
                         std::unordered_map<std::uint32_t, TypeRun>& open) {
    open.clear();
    auto close = [&](std::uint32_t type, std::uint64_t run_end) -> Status {
      close_run_.bind(1, run_end).bind(2, static_cast<std::int64_t>(type)).bind(3, kOpenRunEnd);
      MEDGATE_RETURN_IF_ERROR(close_run_.run().with_context("closing a type run"));
      // The open runs in memory must be the ones on disk; if not, stop rather than write runs
      // that would hide entries from the readers.
      if (sqlite3_changes(db_.handle()) != 1)
        return Status::Corruption(fmt::format(
            "type_runs has no open run for entry type {} where the writer expected one", type));
      return Status::Ok();
    };
    for (const auto& [type, at] : firsts) {
      auto run = open_runs_.find(type);
      if (run != open_runs_.end() && run->second.end == first) {
        open[type] = {run->second.first, end};
        continue;
      }
      if (run != open_runs_.end()) MEDGATE_RETURN_IF_ERROR(close(type, run->second.end));
      insert_run_.bind(1, static_cast<std::int64_t>(type)).bind(2, kOpenRunEnd).bind(3, at);
      MEDGATE_RETURN_IF_ERROR(insert_run_.run().with_context("starting a type run"));
      open[type] = {at, end};
    }
    for (const auto& [type, run] : open_runs_)
      if (!open.contains(type)) MEDGATE_RETURN_IF_ERROR(close(type, run.end));
    return Status::Ok();
  }

  // The open runs are the last block's types (write_type_runs()); they end at the tree size.
  Status load_type_runs() {
    open_runs_.clear();
    MEDGATE_ASSIGN_OR_RETURN(
        auto st, db_.prepare("SELECT type, first_index FROM type_runs WHERE end_index = ?"));
    st.bind(1, kOpenRunEnd);
    for (;;) {
      MEDGATE_ASSIGN_OR_RETURN(auto step, st.step());
      if (step != sql::Statement::Step::kRow) break;
      open_runs_[static_cast<std::uint32_t>(st.column_uint(0))] = {st.column_uint(1),
                                                                   committed_size_.load()};
    }
    return Status::Ok();
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
      (void)tiles_.take_completed();
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
    if (replicated_) return write_outbox(batch, began);
    MEDGATE_ASSIGN_OR_RETURN(auto tx, sql::Transaction::immediate(db_, tx_statements_));
    began = true;
    // Membership and key-transition entries of this batch, applied to the in-memory membership
    // once the batch is durable.
    std::vector<std::pair<std::uint64_t, Entry>> membership_entries;
    std::uint64_t index = first;
    std::vector<KeyEpoch> new_epochs;
    // This batch's subject updates, in index order, and the newest index per subject among them:
    // latest_subjects_ learns them only once the batch is durable.
    std::vector<std::pair<Bytes, std::uint64_t>> subject_updates;
    std::unordered_map<Bytes, std::uint64_t, SubjectHash> batch_latest;
    std::vector<std::pair<std::uint32_t, std::uint64_t>> types;  // the block's, see note_type()
    std::unordered_map<std::uint32_t, TypeRun> open_runs;
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
        if (affects_membership(e.type)) {
          MEDGATE_ASSIGN_OR_RETURN(Entry decoded, decode_entry(e.bytes));
          membership_entries.emplace_back(index, std::move(decoded));
        }
        tiles_.append(e.leaf);
        note_type(types, e.type, index);
        ++index;
      }
    }
    std::optional<StoredBlock> new_block;
    if (index > first) {
      MEDGATE_RETURN_IF_ERROR(write_complete_tiles());
      MEDGATE_RETURN_IF_ERROR(write_type_runs(first, index, types, open_runs));
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
    MEDGATE_RETURN_IF_ERROR(write_heads(batch));
    MEDGATE_RETURN_IF_ERROR(tx.commit().with_context("committing"));
    // Durable: publish.
    for (auto& [subject, latest] : batch_latest) latest_subjects_[subject] = latest;
    if (new_block) open_runs_ = std::move(open_runs);
    if (new_block) {
      std::lock_guard lk(state_mu_);
      for (auto& [i, e] : membership_entries) apply_to_membership(e, i);
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

  Status write_heads(const std::vector<Job*>& batch) {
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
    return Status::Ok();
  }

  static bool affects_membership(EntryType t) {
    return t == EntryType::kMemberProposal || t == EntryType::kMemberApproval ||
           t == EntryType::kKeyTransition;
  }

  // Applies a committed membership or key-transition entry to the in-memory membership and
  // active key (state_mu_ held). The entry was checked before it was written (append_membership)
  // or validated with its block (apply_record), so a failure here means the ledger itself holds
  // an entry the rules refuse: it is kept as the first such problem for status and verify.
  void apply_to_membership(const Entry& e, std::uint64_t index) {
    if (e.type == EntryType::kKeyTransition) {
      const Bytes* old_id = e.body.find("old_key_id")->as_bytes();
      auto new_key = PublicKey::from_spki_der(*e.body.find("new_public_key")->as_bytes());
      if (!new_key.ok() || old_id->size() != 32) return;
      KeyId old{};
      std::copy(old_id->begin(), old_id->end(), old.begin());
      membership_.apply_key_transition(old, *new_key);
      if (active_pub_ && active_pub_->id() == old) active_pub_ = *new_key;
      return;
    }
    auto change = membership_.apply(e, index, active_pub_ ? active_pub_->id() : KeyId{});
    if (!change.ok() && membership_error_.ok()) membership_error_ = change.status();
  }

  // ---- replication: the outbox and blocks from the cluster (store.h, "Replication") ----

  // Replicated mode's group commit: the batch's entries become outbox rows (acknowledged once
  // this commits), without indexes; heads are stored as always.
  Status write_outbox(const std::vector<Job*>& batch, bool& began) {
    MEDGATE_ASSIGN_OR_RETURN(auto tx, sql::Transaction::immediate(db_, tx_statements_));
    began = true;
    std::uint64_t count = 0, oldest = 0, first_seq = 0;
    for (Job* job : batch) {
      for (std::size_t i = 0; i < job->entries.size(); ++i) {
        const PendingEntry& e = job->entries[i];
        cbor::Writer subjects;
        subjects.array_header(e.subjects.size());
        for (const Bytes& subject : e.subjects) subjects.bytes(subject);
        Bytes subject_bytes = subjects.take();
        insert_outbox_.bind(1, static_cast<std::int64_t>(e.type))
            .bind(2, e.time_us)
            .bind(3, ByteView(e.bytes))
            .bind(4, ByteView(subject_bytes))
            .bind(5, static_cast<std::int64_t>(e.link_subjects ? 1 : 0));
        MEDGATE_RETURN_IF_ERROR(insert_outbox_.run().with_context("queueing an entry"));
        auto seq = static_cast<std::uint64_t>(sqlite3_last_insert_rowid(db_.handle()));
        if (i == 0) job->first_index = seq;
        job->last_seq = seq;
        if (count == 0) {
          first_seq = seq;
          oldest = e.time_us;
        }
        ++count;
      }
      if (!job->entries.empty()) job->queued = true;
    }
    MEDGATE_RETURN_IF_ERROR(write_heads(batch));
    MEDGATE_RETURN_IF_ERROR(tx.commit().with_context("committing"));
    if (count > 0) {
      std::lock_guard lk(outbox_mu_);
      if (outbox_entries_ == 0) {
        outbox_first_ = first_seq;
        outbox_oldest_us_ = oldest;
      }
      outbox_entries_ += count;
      // Synchronous appenders wait for the cluster (append()); register them before anyone can
      // order their entries.
      for (Job* job : batch)
        if (job->queued && !job->on_done) order_waiters_[job->first_index] = job;
    }
    outbox_cv_.notify_all();
    queued_total_.fetch_add(count);
    return Status::Ok();
  }

  // The state the next block extends (writer thread, or with the writer idle).
  ChainTip current_tip() const {
    std::lock_guard lk(state_mu_);
    ChainTip tip;
    tip.ledger_id = ledger_id_;
    tip.height = last_block_.header.height;
    tip.block_hash = last_block_.hash;
    tip.time_us = last_block_.header.time_us;
    tip.tree = tiles_.range();
    tip.active_key = active_pub_;
    tip.founder_key = founder_key_;
    return tip;
  }

  std::optional<std::uint64_t> latest_of(ByteView subject) const {
    auto it = latest_subjects_.find(Bytes(subject.begin(), subject.end()));
    if (it == latest_subjects_.end()) return std::nullopt;
    return it->second;
  }

  // Tells the synchronous appenders waiting for outbox sequences what became of them: each pair
  // is (sequence, index) for an ordered entry, or (sequence, nullopt) for one dropped with `why`.
  void settle_waiters(
      const std::vector<std::pair<std::uint64_t, std::optional<std::uint64_t>>>& seqs,
      const Status& why) {
    std::lock_guard lk(outbox_mu_);
    for (const auto& [seq, index] : seqs) {
      auto it = order_waiters_.upper_bound(seq);
      if (it == order_waiters_.begin()) continue;
      --it;
      Job* w = it->second;
      if (seq > w->last_seq) continue;
      if (!index) {
        w->order_status = why;
        w->ordered = true;
        order_waiters_.erase(it);
        continue;
      }
      if (seq == w->first_index) w->ordered_first = *index;
      if (seq == w->last_seq) {
        w->ordered = true;
        order_waiters_.erase(it);
      }
    }
    order_cv_.notify_all();
  }

  // After rows left the outbox: the counters and the oldest row.
  Status refresh_outbox(std::uint64_t removed) {
    MEDGATE_ASSIGN_OR_RETURN(auto st,
                             db_.prepare("SELECT seq, time_us FROM outbox ORDER BY seq LIMIT 1"));
    MEDGATE_ASSIGN_OR_RETURN(auto step, st.step());
    std::lock_guard lk(outbox_mu_);
    outbox_entries_ = removed >= outbox_entries_ ? 0 : outbox_entries_ - removed;
    if (step == sql::Statement::Step::kRow) {
      outbox_first_ = st.column_uint(0);
      outbox_oldest_us_ = st.column_uint(1);
    } else {
      outbox_entries_ = 0;
      outbox_first_ = 0;
      outbox_oldest_us_ = 0;
    }
    return Status::Ok();
  }

  // LEDGER-CRITICAL (replication). Builds the next block from the oldest outbox rows on the
  // current tip, unsigned (the caller signs: a TPM signature must not hold up the writer).
  Result<BlockRecord> build_record(std::size_t max_entries, std::size_t max_bytes) {
    if (!replicated_) return Status::FailedPrecondition("the ledger is not replicated");
    if (max_entries == 0) max_entries = 1;
    MEDGATE_ASSIGN_OR_RETURN(
        auto st, db_.prepare("SELECT seq, type, bytes, subjects, link FROM outbox ORDER BY seq "
                             "LIMIT ?"));
    st.bind(1, static_cast<std::uint64_t>(max_entries));
    ChainTip tip = current_tip();
    Membership membership = membership_copy();
    const KeyId active = tip.active_key ? tip.active_key->id() : KeyId{};
    BlockRecord record;
    std::map<Bytes, std::uint64_t> in_block;
    std::vector<std::pair<std::uint64_t, std::optional<std::uint64_t>>> dropped;
    std::vector<Status> drop_reasons;
    std::uint64_t first_seq = 0, last_seq = 0, bytes_total = 0;
    const std::uint64_t first_index = tip.tree.size();
    for (;;) {
      MEDGATE_ASSIGN_OR_RETURN(auto step, st.step());
      if (step != sql::Statement::Step::kRow) break;
      const std::uint64_t seq = st.column_uint(0);
      const auto type = static_cast<EntryType>(st.column_int(1));
      ByteView raw = st.column_blob(2);
      if (!record.entries.empty() && bytes_total + raw.size() > max_bytes) break;
      if (first_seq == 0) first_seq = seq;
      last_seq = seq;
      Bytes bytes(raw.begin(), raw.end());
      const std::uint64_t index = first_index + record.entries.size();
      if (type == EntryType::kMemberProposal || type == EntryType::kMemberApproval) {
        // Checked when it was queued, but another member's change may have ended its epoch.
        Result<Entry> e = decode_entry(bytes);
        Status ok = e.ok() ? membership.apply(*e, index, active).status() : e.status();
        if (!ok.ok()) {
          dropped.emplace_back(seq, std::nullopt);
          drop_reasons.push_back(ok);
          continue;
        }
      }
      if (st.column_int(4) != 0) {
        MEDGATE_ASSIGN_OR_RETURN(cbor::Value subjects, cbor::decode(st.column_blob(3)));
        std::vector<SubjectLink> links;
        for (const cbor::Value& v : *subjects.as_array()) {
          const Bytes& subject = *v.as_bytes();
          std::optional<std::uint64_t> previous;
          if (auto it = in_block.find(subject); it != in_block.end())
            previous = it->second;
          else
            previous = latest_of(subject);
          links.push_back({subject, previous});
        }
        MEDGATE_RETURN_IF_ERROR(append_subject_links(bytes, links));
        for (const SubjectLink& l : links) in_block[l.subject] = index;
      }
      bytes_total += bytes.size();
      tip.tree.append(merkle::leaf_hash(bytes));
      record.entries.push_back(std::move(bytes));
    }
    if (!dropped.empty()) {
      // Dropped rows leave the outbox now; the block's range then names only rows it carries.
      MEDGATE_ASSIGN_OR_RETURN(auto tx, sql::Transaction::immediate(db_));
      MEDGATE_ASSIGN_OR_RETURN(auto del, db_.prepare("DELETE FROM outbox WHERE seq = ?"));
      for (const auto& [seq, unused] : dropped) MEDGATE_RETURN_IF_ERROR(del.bind(1, seq).run());
      MEDGATE_RETURN_IF_ERROR(tx.commit());
      MEDGATE_RETURN_IF_ERROR(refresh_outbox(dropped.size()));
      settle_waiters(dropped,
                     Status::FailedPrecondition("the membership changed before the cluster ordered "
                                                "this entry: " +
                                                drop_reasons.front().message()));
    }
    if (record.entries.empty()) return Status::NotFound("the outbox is empty");
    BlockHeader& h = record.header;
    h.ledger_id = ledger_id_;
    h.height = tip.height + 1;
    h.previous_hash = tip.block_hash;
    h.first_index = first_index;
    h.entry_count = record.entries.size();
    h.tree_size = tip.tree.size();
    h.root = tip.tree.root();
    h.time_us = std::max(now_us(), tip.time_us);
    h.key_id = member_key_;
    record.header_bytes = encode_block_header(h);
    record.proposer = member_id_;
    record.outbox_first = first_seq;
    record.outbox_count = last_seq - first_seq + 1;
    return record;
  }

  // LEDGER-CRITICAL (replication). Validates `r` against this replica's state and writes it: the
  // entries, their subjects, the tiles, the block, its record fields and, for a block this member
  // proposed, the removal of the outbox rows it carried, all in one transaction.
  Status apply_record(const BlockRecord& r) {
    {
      std::lock_guard lk(state_mu_);
      if (!writer_error_.ok()) return writer_error_;
    }
    const ChainTip tip = current_tip();
    MEDGATE_ASSIGN_OR_RETURN(ValidatedBlock v, validate_block_record(r, tip, membership_copy(),
                                                                     [this](ByteView subject) {
                                                                       return latest_of(subject);
                                                                     }));
    const bool own = replicated_ && r.proposer == member_id_ && r.outbox_count > 0;
    TileBuilder before = tiles_;
    bool began = false;
    std::vector<std::pair<std::uint64_t, std::optional<std::uint64_t>>> ordered;
    std::vector<std::pair<std::uint64_t, Entry>> membership_entries;
    std::vector<std::pair<Bytes, std::uint64_t>> subject_updates;
    std::optional<KeyEpoch> own_rotation;
    std::unordered_map<std::uint32_t, TypeRun> open_runs;
    Status s = [&]() -> Status {
      MEDGATE_ASSIGN_OR_RETURN(auto tx, sql::Transaction::immediate(db_, tx_statements_));
      began = true;
      std::uint64_t index = r.header.first_index;
      std::vector<std::pair<std::uint32_t, std::uint64_t>> types;  // see note_type()
      for (std::size_t i = 0; i < r.entries.size(); ++i) {
        const Bytes& bytes = r.entries[i];
        Entry& e = v.entries[i];
        insert_entry_.bind(1, index)
            .bind(2, static_cast<std::int64_t>(e.type))
            .bind(3, e.time_us)
            .bind(4, ByteView(bytes));
        if (Status st = insert_entry_.run(); !st.ok())
          return st.with_context(fmt::format("writing entry {}", index));
        for (const SubjectLink& l : e.subjects) {
          insert_subject_.bind(1, ByteView(l.subject)).bind(2, index);
          MEDGATE_RETURN_IF_ERROR(insert_subject_.run());
          subject_updates.emplace_back(l.subject, index);
        }
        tiles_.append(v.leaves[i]);
        note_type(types, e.type, index);
        if (affects_membership(e.type)) membership_entries.emplace_back(index, e);
        if (e.type == EntryType::kKeyTransition && replicated_) {
          // This member's own rotation: its heads and blocks use the new key from here on.
          const Bytes& old_id = *e.body.find("old_key_id")->as_bytes();
          if (std::equal(old_id.begin(), old_id.end(), member_key_.begin(), member_key_.end())) {
            const Bytes& new_id = *e.body.find("new_key_id")->as_bytes();
            KeyEpoch epoch{index + 1, {}};
            std::copy(new_id.begin(), new_id.end(), epoch.key.begin());
            insert_epoch_.bind(1, epoch.from_size).bind(2, ByteView(epoch.key)).bind(3, index);
            MEDGATE_RETURN_IF_ERROR(insert_epoch_.run().with_context("writing a key epoch"));
            MEDGATE_ASSIGN_OR_RETURN(PublicKey founder, founder_public());
            MEDGATE_ASSIGN_OR_RETURN(Bytes meta,
                                     replica_meta(member_id_, epoch.key, index + 1, founder));
            MEDGATE_ASSIGN_OR_RETURN(
                auto upd, db_.prepare("UPDATE meta SET value = ? WHERE key = 'replica'"));
            MEDGATE_RETURN_IF_ERROR(upd.bind(1, ByteView(meta)).run());
            own_rotation = epoch;
          }
        }
        ++index;
      }
      MEDGATE_RETURN_IF_ERROR(write_complete_tiles());
      MEDGATE_RETURN_IF_ERROR(write_type_runs(r.header.first_index, index, types, open_runs));
      insert_block_.bind(1, r.header.height)
          .bind(2, r.header.first_index)
          .bind(3, r.header.entry_count)
          .bind(4, ByteView(r.header_bytes));
      if (Status st = insert_block_.run(); !st.ok())
        return st.with_context(fmt::format("writing block {}", r.header.height));
      insert_record_.bind(1, r.header.height)
          .bind(2, r.proposer)
          .bind(3, ByteView(r.signature))
          .bind(4, r.outbox_first)
          .bind(5, r.outbox_count);
      MEDGATE_RETURN_IF_ERROR(insert_record_.run().with_context("writing a block record"));
      if (own) {
        MEDGATE_ASSIGN_OR_RETURN(
            auto rows,
            db_.prepare("SELECT seq FROM outbox WHERE seq >= ? AND seq < ? ORDER BY seq"));
        rows.bind(1, r.outbox_first).bind(2, r.outbox_first + r.outbox_count);
        std::uint64_t next = r.header.first_index;
        for (;;) {
          MEDGATE_ASSIGN_OR_RETURN(auto step, rows.step());
          if (step != sql::Statement::Step::kRow) break;
          ordered.emplace_back(rows.column_uint(0), next++);
        }
        MEDGATE_ASSIGN_OR_RETURN(auto del,
                                 db_.prepare("DELETE FROM outbox WHERE seq >= ? AND seq < ?"));
        MEDGATE_RETURN_IF_ERROR(
            del.bind(1, r.outbox_first).bind(2, r.outbox_first + r.outbox_count).run());
      }
      return tx.commit().with_context("committing");
    }();
    if (!s.ok()) {
      tiles_ = std::move(before);
      (void)tiles_.take_completed();
      if (began && !sql::is_disk_full(s)) {
        std::lock_guard lk(state_mu_);
        writer_error_ = Status(
            s.code(),
            "the ledger stopped writing after an error (reopen it once the cause is fixed): " +
                s.message());
      }
      return s;
    }
    // Durable: publish.
    for (const auto& [subject, latest] : v.subject_updates) latest_subjects_[subject] = latest;
    open_runs_ = std::move(open_runs);
    {
      std::lock_guard lk(state_mu_);
      last_block_.bytes = r.header_bytes;
      last_block_.header = r.header;
      last_block_.hash = v.tip.block_hash;
      committed_size_ = r.header.tree_size;
      membership_ = std::move(v.membership);
      if (own_rotation) {
        epochs_.push_back(*own_rotation);
        member_key_ = own_rotation->key;
      }
      active_pub_ = v.tip.active_key;
      if (pending_subject_updates_.empty())
        pending_subject_updates_ = std::move(subject_updates);
      else
        pending_subject_updates_.insert(pending_subject_updates_.end(),
                                        std::make_move_iterator(subject_updates.begin()),
                                        std::make_move_iterator(subject_updates.end()));
    }
    appended_.fetch_add(r.header.entry_count);
    blocks_applied_.fetch_add(1);
    if (own) {
      own_blocks_.fetch_add(1);
      MEDGATE_RETURN_IF_ERROR(refresh_outbox(ordered.size()));
      settle_waiters(ordered, Status::Ok());
    }
    ApplyListener listener;
    {
      std::lock_guard lk(listener_mu_);
      listener = apply_listener_;
    }
    if (listener) listener(r.header.first_index, v.entries);
    return Status::Ok();
  }

 public:
  void set_apply_listener(ApplyListener listener) {
    std::lock_guard lk(listener_mu_);
    apply_listener_ = std::move(listener);
  }

 private:
  // This member's current signing key (it moves when its rotation is applied).
  KeyId own_member_key() const {
    std::lock_guard lk(state_mu_);
    return member_key_;
  }

  Result<PublicKey> founder_public() const {
    if (!founder_key_) return Status::Internal("a replicated ledger without a founder key");
    return *founder_key_;
  }

  Membership membership_copy() const {
    std::lock_guard lk(state_mu_);
    return membership_;
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
      insert_subject_, insert_run_, close_run_;
  sql::TransactionStatements tx_statements_;
  TileBuilder tiles_;  // writer thread only
  // The open runs in type_runs (write_type_runs()) by type, each with where it really ends (the
  // tree size). Writer thread only (and open()); it learns a block's runs once it is durable.
  std::unordered_map<std::uint32_t, TypeRun> open_runs_;

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

  // ---- membership and replication ----
  // Guarded by state_mu_: the membership and the ledger's active key as of the committed blocks,
  // and the first membership entry the rules refused (a ledger written before the rules existed).
  Membership membership_{""};
  std::optional<PublicKey> active_pub_;
  Status membership_error_;
  std::mutex membership_append_mu_;  // one membership append at a time (append_membership)
  // Set once (open(), or start_replication() on the writer thread before replicated_); read-only
  // after replicated_ is true.
  std::atomic<bool> replicated_{false};
  std::string member_id_;
  KeyId member_key_{};
  std::optional<PublicKey> founder_key_;
  sql::Statement insert_outbox_, insert_record_;
  // The outbox's size and oldest row, and the synchronous appenders waiting for their entries to
  // be ordered (keyed by their first outbox sequence).
  mutable std::mutex outbox_mu_;
  mutable std::condition_variable outbox_cv_, order_cv_;
  std::uint64_t outbox_entries_ = 0, outbox_first_ = 0, outbox_oldest_us_ = 0;
  std::map<std::uint64_t, Job*> order_waiters_;
  std::atomic<std::uint64_t> blocks_applied_{0}, own_blocks_{0}, queued_total_{0};
  std::mutex listener_mu_;
  ApplyListener apply_listener_;
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
    MEDGATE_RETURN_IF_ERROR(
        write_first_block(db, ledger_id, entry_bytes, now, header_bytes, head_bytes, signature));
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

namespace medgate::ledger {

Membership Ledger::membership() const {
  return impl_->membership();
}
PublicKey Ledger::active_key() const {
  return impl_->active_key();
}
Result<std::uint64_t> Ledger::append_membership(const Entry& entry) {
  return impl_->append_membership(entry);
}
Status Ledger::start_replication(const std::string& member_id) {
  return impl_->start_replication(member_id);
}
std::optional<ReplicaInfo> Ledger::replica() const {
  return impl_->replica();
}
Result<ChainTip> Ledger::chain_tip() const {
  return impl_->chain_tip();
}
Result<BlockRecord> Ledger::build_block(std::size_t max_entries, std::size_t max_bytes) {
  return impl_->build_block(max_entries, max_bytes);
}
Status Ledger::apply_block(const BlockRecord& record) {
  return impl_->apply_block(record);
}
Result<BlockRecord> Ledger::block_record(std::uint64_t height) {
  return impl_->block_record(height);
}
bool Ledger::wait_for_outbox(std::chrono::milliseconds timeout) const {
  return impl_->wait_for_outbox(timeout);
}
void Ledger::set_apply_listener(ApplyListener listener) {
  impl_->set_apply_listener(std::move(listener));
}

Result<std::unique_ptr<Ledger>> Ledger::create_replica(const LedgerOptions& options,
                                                       const BlockRecord& genesis,
                                                       const PublicKey& founder,
                                                       const std::string& member_id,
                                                       hsm::KeyStore& signer) {
  if (!valid_member_id(member_id))
    return Status::InvalidArgument(fmt::format("\"{}\" is not a valid member id", member_id));
  if (std::filesystem::exists(options.path))
    return Status::FailedPrecondition(
        fmt::format("{} exists already; refusing to overwrite a ledger", options.path.string()));
  MEDGATE_ASSIGN_OR_RETURN(ChainTip tip, validate_genesis_record(genesis, founder));
  const std::string& ledger_id = genesis.header.ledger_id;
  {
    MEDGATE_ASSIGN_OR_RETURN(LockFile lock, LockFile::acquire(options.path));
    MEDGATE_ASSIGN_OR_RETURN(sql::Database db,
                             sql::Database::open(options.path, sql::Database::Mode::kCreate));
    MEDGATE_RETURN_IF_ERROR(apply_pragmas(db, options));
    MEDGATE_RETURN_IF_ERROR(migrate_schema(db));

    const PublicKey& own = signer.signing_key();
    MEDGATE_ASSIGN_OR_RETURN(Bytes meta, Impl::replica_meta(member_id, own.id(), 1, founder));
    Result<std::uint64_t> counter = signer.read_counter();
    if (!counter.ok()) return counter.status().with_context("reading the rollback counter");
    // This replica's first head, over block 0, signed by its own key.
    HeadBody head{kHeadFormatVersion,
                  ledger_id,
                  0,
                  tip.block_hash,
                  1,
                  genesis.header.root,
                  std::max(now_us(), genesis.header.time_us),
                  own.id(),
                  *counter,
                  merkle::empty_root(),
                  0};
    Bytes head_bytes = encode_head(head);
    MEDGATE_ASSIGN_OR_RETURN(Bytes signature, signer.sign_digest(head_digest(head_bytes)));
    MEDGATE_RETURN_IF_ERROR(own.verify_digest(head_digest(head_bytes), signature)
                                .with_context("the key store's first signature does not verify"));

    MEDGATE_ASSIGN_OR_RETURN(Entry g, decode_entry(genesis.entries[0]));
    MEDGATE_ASSIGN_OR_RETURN(auto tx, sql::Transaction::immediate(db));
    MEDGATE_RETURN_IF_ERROR(write_first_block(db, ledger_id, genesis.entries[0], g.time_us,
                                              genesis.header_bytes, head_bytes, signature));
    MEDGATE_ASSIGN_OR_RETURN(auto ins_meta,
                             db.prepare("INSERT INTO meta (key, value) VALUES ('replica', ?)"));
    MEDGATE_RETURN_IF_ERROR(ins_meta.bind(1, ByteView(meta)).run());
    MEDGATE_ASSIGN_OR_RETURN(
        auto ins_record,
        db.prepare("INSERT INTO block_records (height, proposer, signature, outbox_first, "
                   "outbox_count) VALUES (0,?,?,?,?)"));
    MEDGATE_RETURN_IF_ERROR(ins_record.bind(1, genesis.proposer)
                                .bind(2, ByteView(genesis.signature))
                                .bind(3, genesis.outbox_first)
                                .bind(4, genesis.outbox_count)
                                .run());
    MEDGATE_RETURN_IF_ERROR(tx.commit());
    fsync_directory(options.path.has_parent_path() ? options.path.parent_path() : ".");
  }
  return open(options, signer);
}

}  // namespace medgate::ledger
