// LEDGER-CRITICAL: see verifier.h. Changes here decide what an auditor is told; they must only
// ever make the checks stricter, and say so.
#include "ledger/verifier.h"

#include <pthread.h>

#include <algorithm>
#include <condition_variable>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <thread>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "ledger/block.h"
#include "ledger/consent_document.h"
#include "ledger/entry.h"
#include "ledger/membership.h"
#include "ledger/merkle.h"
#include "ledger/schema.h"
#include "ledger/sqlite.h"
#include "ledger/subject_map.h"
#include "ledger/tiles.h"

namespace medgate::ledger {
namespace {

constexpr std::uint64_t kEntryChunk = 8192;
constexpr std::uint64_t kBlockChunk = 1024;
constexpr std::uint64_t kHeadChunk = 1024;

std::string short_hex(const Hash& h) {
  return to_hex(ByteView(h).first(8));
}

VerifyProblem problem(VerifyProblem::Where where, std::uint64_t number, std::string reason) {
  return {where, number, std::move(reason)};
}

// Rows read in short transactions: each chunk is one statement run to completion and reset, so
// no read transaction outlives a chunk.
struct EntryRow {
  std::uint64_t index;
  std::int64_t type;
  std::int64_t time_us;
  bool integer_columns;  // SQLite is dynamically typed: 2.5 or '2' would read back as 2
  ByteView bytes;        // in its chunk's arena, valid until the next chunk is taken
  // Filled in by the reading thread: the leaf hash and the result of reading the entry's header.
  Hash leaf{};
  Status header_status;
  std::int64_t header_type = 0;
  std::int64_t header_time_us = 0;
  std::uint64_t header_version = 0;
  ByteView subjects;  // the entry's subject links (in `bytes`), empty when none
};

// Reads entries in index order on its own thread and connection, a chunk ahead of the verifier,
// and does the per-entry work that needs nothing but the entry (canonical-form check, header,
// leaf hash) there, so that the two cores share the work.
class EntryStream {
 public:
  static Result<std::unique_ptr<EntryStream>> open(const std::filesystem::path& path) {
    MEDGATE_ASSIGN_OR_RETURN(sql::Database db,
                             sql::Database::open(path, sql::Database::Mode::kReadOnly));
    MEDGATE_ASSIGN_OR_RETURN(auto st,
                             db.prepare("SELECT idx, type, time_us, bytes, typeof(type) = "
                                        "'integer' AND typeof(time_us) = 'integer' "
                                        "FROM entries WHERE idx >= ? ORDER BY idx LIMIT ?"));
    return std::unique_ptr<EntryStream>(new EntryStream(std::move(db), std::move(st)));
  }

  ~EntryStream() {
    {
      std::lock_guard lk(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    if (reader_.joinable()) reader_.join();
  }

  // The row with the next index, if stored. nullopt at the end of the table.
  Result<std::optional<EntryRow>> next() {
    if (pos_ >= current_.rows.size()) {
      std::unique_lock lk(mu_);
      cv_.wait(lk, [&] { return !ready_.empty() || finished_; });
      if (ready_.empty()) {
        if (!error_.ok()) return error_;
        return std::optional<EntryRow>();
      }
      current_ = std::move(ready_.front());
      ready_.pop_front();
      pos_ = 0;
      lk.unlock();
      cv_.notify_all();
    }
    return std::optional<EntryRow>(current_.rows[pos_++]);
  }

 private:
  EntryStream(sql::Database db, sql::Statement st) : db_(std::move(db)), st_(std::move(st)) {
    reader_ = std::thread([this] {
      pthread_setname_np(pthread_self(), "ledger-verify");
      read_loop();
    });
  }

  void read_loop() {
    std::int64_t cursor = 0;
    for (;;) {
      {
        std::unique_lock lk(mu_);
        cv_.wait(lk, [&] { return ready_.size() < 2 || stop_; });
        if (stop_) return;
      }
      Chunk chunk;
      chunk.rows.reserve(kEntryChunk);
      std::vector<std::pair<std::size_t, std::size_t>> spans;  // in the arena, which may move
      spans.reserve(kEntryChunk);
      Status status;
      st_.bind(1, cursor).bind(2, static_cast<std::int64_t>(kEntryChunk));
      for (;;) {
        Result<sql::Statement::Step> step = st_.step();
        if (!step.ok()) {
          status = step.status();
          break;
        }
        if (*step == sql::Statement::Step::kDone) break;
        ByteView b = st_.column_blob(3);
        EntryRow& row = chunk.rows.emplace_back();
        row.index = st_.column_uint(0);
        row.type = st_.column_int(1);
        row.time_us = st_.column_int(2);
        row.integer_columns = st_.column_int(4) == 1;
        spans.emplace_back(chunk.arena.size(), b.size());
        chunk.arena.insert(chunk.arena.end(), b.begin(), b.end());
      }
      st_.reset();
      for (std::size_t r = 0; r < chunk.rows.size(); ++r) {
        EntryRow& row = chunk.rows[r];
        row.bytes = ByteView(chunk.arena).subspan(spans[r].first, spans[r].second);
        row.leaf = merkle::leaf_hash(row.bytes);
        Result<EntryHeader> header = read_entry_header(row.bytes);
        if (header.ok()) {
          row.header_type = static_cast<std::int64_t>(header->type);
          row.header_time_us = static_cast<std::int64_t>(header->time_us);
          row.header_version = header->version;
          row.subjects = header->subjects;
        } else {
          row.header_status = header.status();
        }
      }
      std::lock_guard lk(mu_);
      bool last = chunk.rows.size() < kEntryChunk;
      if (!chunk.rows.empty()) {
        cursor = static_cast<std::int64_t>(chunk.rows.back().index) + 1;
        ready_.push_back(std::move(chunk));
      }
      if (!status.ok() || last) {
        error_ = status;
        finished_ = true;
        cv_.notify_all();
        return;
      }
      cv_.notify_all();
    }
  }

  sql::Database db_;
  sql::Statement st_;
  std::thread reader_;
  std::mutex mu_;
  std::condition_variable cv_;
  struct Chunk {
    std::vector<EntryRow> rows;
    Bytes arena;  // the rows' bytes, one allocation per chunk
  };
  std::deque<Chunk> ready_;
  bool finished_ = false, stop_ = false;
  Status error_;
  Chunk current_;  // the verifier thread's
  std::size_t pos_ = 0;
};

struct BlockRow {
  std::uint64_t height, first_index, entry_count;
  Bytes header;
};

struct HeadRow {
  std::uint64_t seq, height, tree_size;
  Bytes head, signature;
};

template <typename Row>
class ChunkedStream {
 public:
  using Reader = Row (*)(sql::Statement&);
  ChunkedStream(sql::Statement st, std::uint64_t chunk, Reader reader,
                std::uint64_t (*key)(const Row&))
      : st_(std::move(st)), chunk_(chunk), reader_(reader), key_(key) {}
  Result<std::optional<Row>> peek() {
    if (buffer_.empty() && !done_) {
      st_.bind(1, cursor_).bind(2, static_cast<std::int64_t>(chunk_));
      for (;;) {
        MEDGATE_ASSIGN_OR_RETURN(auto step, st_.step());
        if (step == sql::Statement::Step::kDone) break;
        buffer_.push_back(reader_(st_));
      }
      st_.reset();
      if (buffer_.empty())
        done_ = true;
      else
        cursor_ = static_cast<std::int64_t>(key_(buffer_.back())) + 1;
    }
    if (buffer_.empty()) return std::optional<Row>();
    return std::optional<Row>(buffer_.front());
  }
  void pop() { buffer_.pop_front(); }

 private:
  sql::Statement st_;
  std::uint64_t chunk_;
  Reader reader_;
  std::uint64_t (*key_)(const Row&);
  std::int64_t cursor_ = 0;
  bool done_ = false;
  std::deque<Row> buffer_;
};

BlockRow read_block(sql::Statement& st) {
  ByteView b = st.column_blob(3);
  return {st.column_uint(0), st.column_uint(1), st.column_uint(2), Bytes(b.begin(), b.end())};
}
HeadRow read_head(sql::Statement& st) {
  ByteView h = st.column_blob(3), s = st.column_blob(4);
  return {st.column_uint(0), st.column_uint(1), st.column_uint(2), Bytes(h.begin(), h.end()),
          Bytes(s.begin(), s.end())};
}

// Compares recomputed nodes with the stored tiles, so a changed entry is named even when the
// block's root would only say "somewhere in this block".
class TileChecker {
 public:
  TileChecker(TileReader reader, std::uint64_t tree_size)
      : reader_(std::move(reader)), tree_size_(tree_size) {}

  // OK; kVerificationFailed when the hash differs from the stored one (the message names the
  // tile); kCorruption when the tile is missing or malformed.
  Status check(int level, std::uint64_t index, const Hash& hash) {
    int t = level / kTileHeight;
    std::uint64_t k = index / kTileWidth, pos = index % kTileWidth;
    if (cache_.size() <= static_cast<std::size_t>(t))
      cache_.resize(static_cast<std::size_t>(t) + 1);
    Cached& c = cache_[static_cast<std::size_t>(t)];
    if (c.valid && c.index == k && c.absent_partial) return Status::Ok();
    if (!c.valid || c.index != k || c.blob.size() < (pos + 1) * 32) {
      Result<Bytes> blob = reader_(t, k);
      // The partial tile at the right edge of a level is not stored (store.cc, tile_reader();
      // schema 4 stored those above level 0): its nodes are checked by their block's root alone.
      const int shift = kTileHeight * (t + 1);
      const bool partial = shift >= 64 || k >= (tree_size_ >> shift);
      if (!blob.ok() && blob.status().code() == StatusCode::kNotFound && partial) {
        c = {true, k, {}};
        c.absent_partial = true;
        return Status::Ok();
      }
      if (!blob.ok())
        return Status::Corruption(
            fmt::format("Merkle tile ({}, {}) cannot be read: {}", t, k, blob.status().message()));
      c = {true, k, std::move(blob).value()};
      if (c.blob.size() % 32 != 0 || c.blob.size() > kTileWidth * 32)
        return Status::Corruption(fmt::format(
            "Merkle tile ({}, {}) has a malformed size of {} bytes", t, k, c.blob.size()));
    }
    if (c.blob.size() < (pos + 1) * 32)
      return Status::Corruption(
          fmt::format("Merkle tile ({}, {}) lacks the hash of node ({}, {})", t, k, level, index));
    if (!std::equal(hash.begin(), hash.end(),
                    c.blob.begin() + static_cast<std::ptrdiff_t>(pos * 32)))
      return Status::VerificationFailed(
          fmt::format("the hash stored in Merkle tile ({}, {}) when it was committed", t, k));
    return Status::Ok();
  }

 private:
  struct Cached {
    bool valid = false;
    std::uint64_t index = 0;
    Bytes blob;
    bool absent_partial = false;
  };
  TileReader reader_;
  std::uint64_t tree_size_ = 0;
  std::vector<Cached> cache_;
};

// Checks that every entry lies in a run of its type in type_runs (schema 5): the readers that find
// entries by type (consent and key state at start, exports by kind) read only the runs' ranges,
// so a run deleted or shortened would hide entries from them without changing anything hashed.
// Each type's runs are read in order, a chunk at a time (no statement stays open between
// chunks, so the verification does not pin the WAL), as the entries go by.
class TypeRunChecker {
 public:
  explicit TypeRunChecker(sql::Database& db) : db_(db) {}

  // OK; kVerificationFailed when no run of the type covers the entry.
  Status check(std::uint64_t index, std::int64_t type) {
    Runs& r = runs_[type];
    for (;;) {
      while (r.next < r.chunk.size() && r.chunk[r.next].second <= index) ++r.next;
      if (r.next < r.chunk.size()) break;
      if (r.done && r.read_after == index) break;
      MEDGATE_RETURN_IF_ERROR(read(r, type, index));
    }
    if (r.next < r.chunk.size() && r.chunk[r.next].first <= index) return Status::Ok();
    return Status::VerificationFailed(fmt::format(
        "lies in no range of type_runs for its type ({}): the table that readers use to find "
        "entries by type (consent and key state, exports by kind) was changed, and they would not "
        "see this entry",
        type));
  }

 private:
  static constexpr std::int64_t kChunk = 256;
  struct Runs {
    std::vector<std::pair<std::uint64_t, std::uint64_t>> chunk;  // [first, end), by end
    std::size_t next = 0;
    bool done = false;  // the last read found no run ending after read_after
    std::uint64_t read_after = 0;
  };

  // The type's next runs ending after `index`.
  Status read(Runs& r, std::int64_t type, std::uint64_t index) {
    if (!st_) {
      MEDGATE_ASSIGN_OR_RETURN(
          sql::Statement st,
          db_.prepare("SELECT first_index, end_index FROM type_runs WHERE type = "
                      "? AND end_index > ? ORDER BY end_index LIMIT ?"));
      st_ = std::move(st);
    }
    r.chunk.clear();
    r.next = 0;
    st_->bind(1, type).bind(2, index).bind(3, kChunk);
    for (;;) {
      Result<sql::Statement::Step> step = st_->step();
      if (!step.ok()) {
        st_->reset();
        return step.status();
      }
      if (*step != sql::Statement::Step::kRow) break;
      r.chunk.emplace_back(st_->column_uint(0), st_->column_uint(1));
    }
    st_->reset();
    r.done = r.chunk.empty();
    r.read_after = index;
    return Status::Ok();
  }

  sql::Database& db_;
  std::optional<sql::Statement> st_;
  std::map<std::int64_t, Runs> runs_;
};

class Verifier {
 public:
  Verifier(sql::Database& db, std::filesystem::path path, const VerifyOptions& options)
      : db_(db), path_(std::move(path)), options_(options) {
    for (const PublicKey& k : options.trusted_keys) trusted_.emplace(k.id(), k);
  }

  Result<VerifyReport> run() {
    MEDGATE_RETURN_IF_ERROR(check_schema_readable(db_));
    MEDGATE_ASSIGN_OR_RETURN(auto meta,
                             db_.prepare("SELECT value FROM meta WHERE key = 'ledger_id'"));
    MEDGATE_ASSIGN_OR_RETURN(auto step, meta.step());
    if (step != sql::Statement::Step::kRow)
      return fail(problem(VerifyProblem::Where::kFile, 0, "the file has no ledger id"));
    report_.ledger_id = to_string(meta.column_blob(0));
    meta.reset();

    MEDGATE_ASSIGN_OR_RETURN(auto count, db_.prepare("SELECT count(*) FROM entries"));
    MEDGATE_ASSIGN_OR_RETURN(step, count.step());
    total_ = count.column_uint(0);
    count.reset();
    {
      // A replicated ledger's file keeps block records (schema 4); a single box's keeps none,
      // and its heads are all signed by the ledger's own key chain.
      MEDGATE_ASSIGN_OR_RETURN(auto t,
                               db_.prepare("SELECT 1 FROM sqlite_master WHERE type = 'table' AND "
                                           "name = 'block_records'"));
      MEDGATE_ASSIGN_OR_RETURN(auto found, t.step());
      if (found == sql::Statement::Step::kRow) {
        MEDGATE_ASSIGN_OR_RETURN(auto any, db_.prepare("SELECT 1 FROM block_records LIMIT 1"));
        MEDGATE_ASSIGN_OR_RETURN(auto row, any.step());
        has_block_records_ = row == sql::Statement::Step::kRow;
      }
    }
    if (has_block_records_) {
      MEDGATE_ASSIGN_OR_RETURN(
          records_st_,
          db_.prepare("SELECT proposer, signature FROM block_records WHERE height = ?"));
    }

    // Rows the streams below never reach (they read upward from 0): anything at a negative key,
    // and heads whose sequence has a gap (a head deleted from the middle of the history).
    MEDGATE_ASSIGN_OR_RETURN(
        auto negative, db_.prepare("SELECT 'entry', min(idx) FROM entries WHERE idx < 0 UNION ALL "
                                   "SELECT 'block', min(height) FROM blocks WHERE height < 0 "
                                   "UNION ALL SELECT 'head', min(seq) FROM heads WHERE seq < 1"));
    for (;;) {
      MEDGATE_ASSIGN_OR_RETURN(step, negative.step());
      if (step != sql::Statement::Step::kRow) break;
      if (negative.column_is_null(1)) continue;
      std::string what = negative.column_text(0);
      std::int64_t n = negative.column_int(1);
      negative.reset();
      return fail(problem(
          VerifyProblem::Where::kFile, 0,
          fmt::format(
              "{} {} is stored at a number no ledger writes (below the first): the file was edited",
              what, n)));
    }
    negative.reset();
    MEDGATE_ASSIGN_OR_RETURN(auto gaps,
                             db_.prepare("SELECT min(seq), max(seq), count(*) FROM heads"));
    MEDGATE_ASSIGN_OR_RETURN(step, gaps.step());
    if (step == sql::Statement::Step::kRow && gaps.column_uint(2) > 0 &&
        (gaps.column_uint(0) != 1 || gaps.column_uint(1) != gaps.column_uint(2))) {
      std::uint64_t heads = gaps.column_uint(2), last = gaps.column_uint(1);
      gaps.reset();
      // Name the first missing sequence number.
      MEDGATE_ASSIGN_OR_RETURN(
          auto first_gap,
          db_.prepare(
              "SELECT coalesce((SELECT 1 WHERE NOT EXISTS (SELECT 1 FROM heads WHERE seq = 1)), "
              "(SELECT min(seq) + 1 FROM heads h WHERE NOT EXISTS (SELECT 1 FROM heads WHERE seq = "
              "h.seq + 1) AND seq < ?))"));
      first_gap.bind(1, last);
      MEDGATE_ASSIGN_OR_RETURN(step, first_gap.step());
      std::uint64_t missing = first_gap.column_uint(0);
      first_gap.reset();
      return fail(problem(VerifyProblem::Where::kHead, missing,
                          fmt::format("is missing: {} heads are stored but their numbers run to {} "
                                      "(a signed head was deleted)",
                                      heads, last)));
    }
    gaps.reset();

    // The blocks verified are those stored now: on a live ledger (medgated verifying its own
    // file while it appends) the streams below read at different moments, and what the writer
    // commits meanwhile is left for the next verification (see the end of this function). Where
    // the last block says the tree ends: the partial tiles there are not stored.
    std::uint64_t final_height = 0, final_tree_size = 0;
    {
      MEDGATE_ASSIGN_OR_RETURN(auto last,
                               db_.prepare("SELECT height, first_index + entry_count FROM blocks "
                                           "ORDER BY height DESC LIMIT 1"));
      MEDGATE_ASSIGN_OR_RETURN(auto last_step, last.step());
      if (last_step == sql::Statement::Step::kRow) {
        final_height = last.column_uint(0);
        final_tree_size = last.column_uint(1);
      }
    }
    MEDGATE_ASSIGN_OR_RETURN(
        auto blocks_st,
        db_.prepare(fmt::format("SELECT height, first_index, entry_count, header FROM blocks WHERE "
                                "height >= ? AND height <= {} ORDER BY height LIMIT ?",
                                final_height)));
    MEDGATE_ASSIGN_OR_RETURN(auto heads_st,
                             db_.prepare("SELECT seq, height, tree_size, head, signature FROM "
                                         "heads WHERE seq >= ? ORDER BY seq LIMIT ?"));
    // Schema 5 keeps complete tiles in merkle_tiles by position (ledger/tiles.h); files written
    // before it keep them in tiles by (level, idx). Both are read: auditors verify old files.
    MEDGATE_ASSIGN_OR_RETURN(const int schema, schema_version(db_));
    const bool by_position = schema >= 5;
    std::optional<TypeRunChecker> type_runs;
    if (schema >= 5) type_runs.emplace(db_);
    MEDGATE_ASSIGN_OR_RETURN(
        auto tile_st, db_.prepare(by_position ? "SELECT hashes FROM merkle_tiles WHERE pos = ?"
                                              : "SELECT hashes FROM tiles WHERE level = ? AND "
                                                "idx = ?"));
    // Level-0 tiles are read 512 at a time (one query per 8,192 entries, not one per 16). A
    // level-0 tile (0, k) is at position (k + 1) * 256 (tile_position()); the range holds higher
    // tiles too, and the multiples of 256 in it are exactly the level-0 positions.
    MEDGATE_ASSIGN_OR_RETURN(
        auto leaf_tiles_st,
        db_.prepare(by_position ? "SELECT (pos >> 8) - 1, hashes FROM merkle_tiles WHERE pos >= "
                                  "(?1 + 1) << 8 AND pos < (?2 + 1) << 8 AND pos % 256 = 0 ORDER BY "
                                  "pos"
                                : "SELECT idx, hashes FROM tiles WHERE level = 0 AND idx >= ?1 "
                                  "AND idx < ?2 ORDER BY idx"));
    struct TileQueries {
      sql::Statement one, leaves;
      bool by_position = false;
      std::uint64_t first = 0;
      std::vector<std::optional<Bytes>> window;
    };
    auto q = std::make_shared<TileQueries>(
        TileQueries{std::move(tile_st), std::move(leaf_tiles_st), by_position, 0, {}});
    TileChecker tiles(
        [q](int level, std::uint64_t index) -> Result<Bytes> {
          constexpr std::uint64_t kWindow = 512;
          if (level == 0) {
            if (index < q->first || index >= q->first + q->window.size()) {
              q->first = index;
              q->window.assign(kWindow, std::nullopt);
              q->leaves.bind(1, index).bind(2, index + kWindow);
              for (;;) {
                auto s = q->leaves.step();
                if (!s.ok()) {
                  q->leaves.reset();
                  q->window.clear();
                  return s.status();
                }
                if (*s == sql::Statement::Step::kDone) break;
                ByteView b = q->leaves.column_blob(1);
                q->window[q->leaves.column_uint(0) - index] = Bytes(b.begin(), b.end());
              }
              q->leaves.reset();
            }
            const std::optional<Bytes>& tile = q->window[index - q->first];
            if (!tile) return Status::NotFound("missing");
            return *tile;
          }
          if (q->by_position) {
            MEDGATE_ASSIGN_OR_RETURN(std::int64_t pos, tile_position({level, index}));
            q->one.bind(1, pos);
          } else {
            q->one.bind(1, level).bind(2, index);
          }
          auto s = q->one.step();
          Result<Bytes> out = Status::NotFound("missing");
          if (!s.ok())
            out = s.status();
          else if (*s == sql::Statement::Step::kRow) {
            ByteView b = q->one.column_blob(0);
            out = Bytes(b.begin(), b.end());
          }
          q->one.reset();
          return out;
        },
        final_tree_size);

    MEDGATE_ASSIGN_OR_RETURN(std::unique_ptr<EntryStream> entry_stream, EntryStream::open(path_));
    EntryStream& entries = *entry_stream;
    ChunkedStream<BlockRow> blocks(std::move(blocks_st), kBlockChunk, read_block,
                                   [](const BlockRow& r) { return r.height; });
    ChunkedStream<HeadRow> heads(std::move(heads_st), kHeadChunk, read_head,
                                 [](const HeadRow& r) { return r.seq; });

    merkle::CompactRange tree;
    Hash previous{};
    std::uint64_t expected_height = 0;
    std::optional<VerifyProblem> tile_problem;
    for (;;) {
      MEDGATE_ASSIGN_OR_RETURN(std::optional<BlockRow> row, blocks.peek());
      if (!row) break;
      blocks.pop();
      const std::uint64_t h = row->height;
      if (h != expected_height)
        return fail(problem(VerifyProblem::Where::kBlock, expected_height,
                            h > expected_height
                                ? fmt::format("is missing (the next stored block is {})", h)
                                : "is stored twice"));
      Result<BlockHeader> decoded = decode_block_header(row->header);
      if (!decoded.ok())
        return fail(problem(VerifyProblem::Where::kBlock, h,
                            "header does not decode: " + decoded.status().message()));
      const BlockHeader& header = *decoded;
      if (header.height != h || header.first_index != row->first_index ||
          header.entry_count != row->entry_count)
        return fail(
            problem(VerifyProblem::Where::kBlock, h,
                    "header does not match the block's row (height, first entry or count)"));
      if (header.ledger_id != report_.ledger_id)
        return fail(problem(
            VerifyProblem::Where::kBlock, h,
            fmt::format("names ledger '{}', not '{}'", header.ledger_id, report_.ledger_id)));
      if (header.previous_hash != previous)
        return fail(problem(
            VerifyProblem::Where::kBlock, h,
            fmt::format("does not chain: its previous-block hash is {} but block {} hashes to {}",
                        short_hex(header.previous_hash), h == 0 ? 0 : h - 1, short_hex(previous))));
      if (header.first_index != tree.size())
        return fail(
            problem(VerifyProblem::Where::kBlock, h,
                    fmt::format("starts at entry {} but the previous block ended at entry {}",
                                header.first_index, tree.size())));
      // A replicated ledger: once the membership is founded, each block is proposed by a member
      // whose key its header names (the membership as of the block's start).
      const bool founded_at_start = membership_.founded();
      std::optional<Member> proposer_at_start;
      if (founded_at_start)
        if (const Member* m = membership_.find_by_key(header.key_id)) proposer_at_start = *m;

      for (std::uint64_t i = header.first_index; i < header.tree_size; ++i) {
        MEDGATE_ASSIGN_OR_RETURN(std::optional<EntryRow> e, entries.next());
        if (!e || e->index != i)
          return fail(problem(VerifyProblem::Where::kEntry, i,
                              fmt::format("is missing (block {} covers entries {}..{})", h,
                                          header.first_index, header.tree_size - 1)));
        const Hash& leaf = e->leaf;
        if (!tile_problem) {
          if (Status s = tiles.check(0, i, leaf); !s.ok()) {
            // A leaf that differs from the one stored at commit time names the changed entry;
            // the block root check below decides whether the entry or the tile was changed.
            tile_problem = s.code() == StatusCode::kVerificationFailed
                               ? problem(VerifyProblem::Where::kEntry, i,
                                         "its bytes do not match " + s.message())
                               : problem(VerifyProblem::Where::kTile, i, s.message());
          }
        }
        // Every entry's canonical form and header are checked; bodies are checked against their
        // type's rules when written and whenever decode_entry reads them, and fully here only for
        // the genesis entry, whose body the verifier uses.
        if (!e->header_status.ok())
          return fail(problem(VerifyProblem::Where::kEntry, i,
                              "does not decode: " + e->header_status.message()));
        if (!e->integer_columns || e->header_type != e->type || e->header_time_us != e->time_us)
          return fail(tile_problem && tile_problem->where == VerifyProblem::Where::kEntry &&
                              tile_problem->number == i
                          ? *tile_problem
                          : problem(VerifyProblem::Where::kEntry, i,
                                    "its type or time column does not match its bytes"));
        if (type_runs) {
          if (Status s = type_runs->check(i, e->type); !s.ok()) {
            if (s.code() != StatusCode::kVerificationFailed) return s;
            return fail(problem(VerifyProblem::Where::kEntry, i, s.message()));
          }
        }
        if (i == 0) {
          Result<Entry> genesis = decode_entry(e->bytes);
          if (!genesis.ok())
            return fail(problem(VerifyProblem::Where::kEntry, 0,
                                "does not decode: " + genesis.status().message()));
          VerifyProblem p;
          if (!take_genesis(*genesis, p)) return fail(p);
        } else if (e->header_type == static_cast<std::int64_t>(EntryType::kGenesis)) {
          return fail(problem(VerifyProblem::Where::kEntry, i, "is a second genesis entry"));
        } else if (e->header_type == static_cast<std::int64_t>(EntryType::kKeyTransition)) {
          VerifyProblem p;
          if (!take_transition(i, e->bytes, p)) return fail(p);
        } else if (e->header_type == static_cast<std::int64_t>(EntryType::kMemberProposal) ||
                   e->header_type == static_cast<std::int64_t>(EntryType::kMemberApproval)) {
          VerifyProblem p;
          if (!take_membership(i, e->bytes, p)) return fail(p);
        } else if (e->header_type == static_cast<std::int64_t>(EntryType::kPatientKey) ||
                   e->header_type == static_cast<std::int64_t>(EntryType::kConsentGrant) ||
                   e->header_type == static_cast<std::int64_t>(EntryType::kConsentRevoke)) {
          VerifyProblem p;
          if (!take_consent(i, e->bytes, p)) return fail(p);
        }
        if (!e->subjects.empty()) {
          VerifyProblem p;
          if (!take_subjects(i, e->header_version, e->subjects, p)) return fail(p);
        }
        tree.append(leaf, [&](int level, std::uint64_t index, const Hash& node) {
          if (tile_problem || level % kTileHeight != 0) return;
          if (Status s = tiles.check(level, index, node); !s.ok())
            tile_problem = problem(VerifyProblem::Where::kTile, index,
                                   s.code() == StatusCode::kVerificationFailed
                                       ? fmt::format("Merkle node ({}, {}) does not match {}",
                                                     level, index, s.message())
                                       : s.message());
        });
        ++report_.entries;
        if (options_.progress && report_.entries % 65536 == 0)
          options_.progress(report_.entries, total_);
      }
      if (tree.root() != header.root) {
        if (tile_problem && tile_problem->where == VerifyProblem::Where::kEntry)
          return fail(*tile_problem);
        return fail(
            problem(VerifyProblem::Where::kBlock, h,
                    fmt::format("Merkle root over entries {}..{} is {} but the header says {}",
                                header.first_index, header.tree_size - 1, short_hex(tree.root()),
                                short_hex(header.root))));
      }
      if (tile_problem) return fail(*tile_problem);
      if (founded_at_start) {
        if (!proposer_at_start)
          return fail(
              problem(VerifyProblem::Where::kBlock, h,
                      fmt::format("is signed by a key that is not a member's at height {} ({})",
                                  h - 1, short_hex(header.key_id))));
        VerifyProblem p;
        if (!check_block_record(h, row->header, *proposer_at_start, p)) return fail(p);
      } else {
        if (!known_.count(header.key_id))
          return fail(problem(VerifyProblem::Where::kBlock, h,
                              fmt::format("names signing key {}, which the ledger does not know",
                                          to_hex(header.key_id))));
        if (header.key_id != active_key_)
          return fail(
              problem(VerifyProblem::Where::kBlock, h,
                      fmt::format("names signing key {}, but the ledger's key at that point is {}",
                                  short_hex(header.key_id), short_hex(active_key_))));
      }

      previous = block_hash(row->header);
      ++report_.blocks;
      expected_height = h + 1;

      // Heads are stored in sequence order and cover non-decreasing heights.
      for (;;) {
        MEDGATE_ASSIGN_OR_RETURN(std::optional<HeadRow> head, heads.peek());
        if (!head || head->height > h) break;
        heads.pop();
        VerifyProblem p;
        if (!check_head(*head, h, previous, header, p)) return fail(p);
      }
    }
    if (report_.blocks == 0)
      return fail(problem(VerifyProblem::Where::kFile, 0, "the ledger has no blocks"));

    // A head or an entry past the last block verified is a problem unless a block stored since
    // covers it (a live ledger grew): that block and what it covers are the next verification's.
    MEDGATE_ASSIGN_OR_RETURN(auto latest,
                             db_.prepare("SELECT height, first_index + entry_count FROM blocks "
                                         "ORDER BY height DESC LIMIT 1"));
    MEDGATE_ASSIGN_OR_RETURN(auto latest_step, latest.step());
    const std::uint64_t latest_height =
        latest_step == sql::Statement::Step::kRow ? latest.column_uint(0) : 0;
    const std::uint64_t latest_size =
        latest_step == sql::Statement::Step::kRow ? latest.column_uint(1) : 0;
    latest.reset();
    MEDGATE_ASSIGN_OR_RETURN(std::optional<HeadRow> stray, heads.peek());
    if (stray && stray->height > latest_height)
      return fail(problem(VerifyProblem::Where::kHead, stray->seq,
                          fmt::format("covers block {}, which is not in the ledger (the last block "
                                      "is {}): the ledger was truncated",
                                      stray->height, expected_height - 1)));
    MEDGATE_ASSIGN_OR_RETURN(std::optional<EntryRow> extra, entries.next());
    if (extra && extra->index >= latest_size)
      return fail(
          problem(VerifyProblem::Where::kEntry, extra->index, "is not covered by any block"));

    // Heads signed by a replica's own key before that replica became a member: the key is
    // vouched for by the membership entries that added it (each approved by a majority).
    for (const DeferredHead& d : deferred_heads_) {
      auto key = member_keys_.find(d.key_id);
      if (key == member_keys_.end())
        return fail(problem(VerifyProblem::Where::kHead, d.seq,
                            fmt::format("is signed by key {}, which is neither the ledger's key "
                                        "nor ever a member's",
                                        to_hex(d.key_id))));
      if (!key->second.verify_digest(d.digest, d.signature).ok())
        return fail(problem(VerifyProblem::Where::kHead, d.seq,
                            "signature does not verify with the member key it names"));
    }

    // Trust: every key of the ledger is chained to the genesis key by transitions that both
    // keys signed, so trusting any one of them vouches for all of them, each for its own range.
    // In a replicated ledger every member key follows from the membership entries, each signed by
    // a majority of the members before it, so trusting one member's key is enough too.
    bool chain_trusted = std::any_of(chain_.begin(), chain_.end(),
                                     [&](const KeyId& k) { return trusted_.count(k) > 0; }) ||
                         std::any_of(member_keys_.begin(), member_keys_.end(),
                                     [&](const auto& k) { return trusted_.count(k.first) > 0; });
    if (!chain_trusted)
      return fail(problem(
          VerifyProblem::Where::kFile, 0,
          fmt::format("none of the ledger's signing keys ({}) is trusted", describe_chain())));
    report_.root = tree.root();
    if (!report_.latest_signed_size)
      return fail(problem(VerifyProblem::Where::kFile, 0, "the ledger has no signed head"));
    report_.unsigned_entries = tree.size() - *report_.latest_signed_size;
    if (options_.progress) options_.progress(report_.entries, total_);
    return report_;
  }

 private:
  Result<VerifyReport> fail(VerifyProblem p) {
    report_.problem = std::move(p);
    return report_;
  }

  bool take_genesis(const Entry& genesis, VerifyProblem& p) {
    if (genesis.type != EntryType::kGenesis) {
      p = problem(VerifyProblem::Where::kEntry, 0, "is not a genesis entry");
      return false;
    }
    const std::string* id = genesis.body.find("ledger_id")->as_text();
    if (*id != report_.ledger_id) {
      p = problem(VerifyProblem::Where::kEntry, 0,
                  fmt::format("names ledger '{}', not '{}'", *id, report_.ledger_id));
      return false;
    }
    Result<PublicKey> key = PublicKey::from_spki_der(*genesis.body.find("public_key")->as_bytes());
    const Bytes* key_id = genesis.body.find("key_id")->as_bytes();
    if (!key.ok() ||
        !std::equal(key_id->begin(), key_id->end(), key->id().begin(), key->id().end())) {
      p = problem(VerifyProblem::Where::kEntry, 0,
                  "its public key is malformed or does not match its key id");
      return false;
    }
    // Whether the genesis key is trusted is decided at the end, once the chain of key
    // transitions is known (a later key may be the trusted one).
    known_.emplace(key->id(), *key);
    chain_.push_back(key->id());
    active_key_ = key->id();
    return true;
  }

  // Patients' keys, and the consent documents they signed: an enrolment's key must be a key a
  // patient may use and match its key id; a signed grant or withdrawal must carry a document for
  // this ledger that names the entry's subject, says what the entry says, and verifies under the
  // key that patient had enrolled before it.
  bool take_consent(std::uint64_t index, ByteView bytes, VerifyProblem& p) {
    auto bad = [&](std::string reason) {
      p = problem(VerifyProblem::Where::kEntry, index, std::move(reason));
      return false;
    };
    Result<Entry> e = decode_entry(bytes);
    if (!e.ok()) return bad("does not decode: " + e.status().message());
    if (e->subjects.size() != 1 || e->subjects[0].subject.size() != 32)
      return bad("must name exactly one patient as its subject");
    const Bytes& subject = e->subjects[0].subject;
    if (e->type == EntryType::kPatientKey) {
      const Bytes& der = *e->body.find("public_key")->as_bytes();
      Result<Bytes> checked = patient_key_der(der);
      if (!checked.ok())
        return bad("enrols an unusable patient key: " + checked.status().message());
      const Bytes& id = *e->body.find("key_id")->as_bytes();
      Hash digest = sha256(der);
      if (!std::equal(id.begin(), id.end(), digest.begin(), digest.end()))
        return bad("its key_id is not the SHA-256 of its public key");
      patient_keys_[subject] = der;
      return true;
    }
    const cbor::Value* doc = e->body.find("document");
    if (!doc) return true;  // made by an admin, not signed by the patient
    const Bytes& document = *doc->as_bytes();
    auto key = patient_keys_.find(subject);
    if (key == patient_keys_.end())
      return bad("carries a patient-signed document, but the patient enrolled no key before it");
    if (Status s =
            verify_patient_signature(key->second, document, *e->body.find("signature")->as_bytes());
        !s.ok())
      return bad(s.message());
    Result<ConsentDocument> d = parse_consent_document(to_string(document));
    if (!d.ok()) return bad(d.status().message());
    if (d->ledger_id != report_.ledger_id)
      return bad(fmt::format("its signed document is for ledger '{}'", d->ledger_id));
    if (!std::equal(subject.begin(), subject.end(), d->patient.begin(), d->patient.end()))
      return bad("its signed document names another patient");
    auto text = [&](const char* name) { return *e->body.find(name)->as_text(); };
    bool grant = e->type == EntryType::kConsentGrant;
    if (grant != (d->kind == ConsentDocument::Kind::kGrant))
      return bad("its signed document is of the other kind (grant / withdrawal)");
    if (grant) {
      const cbor::Value* until = e->body.find("until");
      std::optional<std::uint64_t> entry_until =
          until ? until->as_uint() : std::optional<std::uint64_t>();
      if (text("to") != d->to || text("data") != d->data || text("purpose") != d->purpose ||
          entry_until != d->until_us)
        return bad("says something other than the document the patient signed");
      if (text("grant") != signed_grant_id(document))
        return bad("its grant id is not derived from the signed document");
    } else if (text("grant") != d->grant) {
      return bad("withdraws another grant than the document the patient signed");
    }
    return true;
  }

  // Subject links: in a version-2 entry each names the subject's previous entry, which must be
  // the newest earlier entry (of any version) naming that subject. Every entry's subjects then
  // move the subject map on (subject_map.h), which version-2 heads commit to.
  bool take_subjects(std::uint64_t index, std::uint64_t version, ByteView subjects,
                     VerifyProblem& p) {
    std::vector<std::pair<ByteView, std::optional<std::uint64_t>>> links;
    Status s = for_each_subject_link(subjects,
                                     [&](ByteView subject, std::optional<std::uint64_t> previous) {
                                       links.emplace_back(subject, previous);
                                     });
    if (!s.ok()) {
      p = problem(VerifyProblem::Where::kEntry, index,
                  "its subject links do not decode: " + s.message());
      return false;
    }
    if (version >= 2) {
      for (const auto& [subject, previous] : links) {
        std::optional<std::uint64_t> expected = subjects_.latest(subject);
        if (previous == expected) continue;
        auto name = [](std::optional<std::uint64_t> i) {
          return i ? fmt::format("entry {}", *i) : std::string("none");
        };
        p = problem(VerifyProblem::Where::kEntry, index,
                    fmt::format("its link for subject {} names {} as the subject's previous entry, "
                                "but the ledger's is {} (an entry about the subject was removed, "
                                "moved or added)",
                                to_hex(subject.first(std::min<std::size_t>(subject.size(), 8))),
                                name(previous), name(expected)));
        return false;
      }
    }
    for (const auto& [subject, previous] : links) subjects_.update(subject, index);
    return true;
  }

  // A key transition must name the active key as the old one and carry valid signatures of the
  // statement (block.h) by both keys. The new key signs every head from here on.
  bool take_transition(std::uint64_t index, ByteView bytes, VerifyProblem& p) {
    auto bad = [&](std::string reason) {
      p = problem(VerifyProblem::Where::kEntry, index, std::move(reason));
      return false;
    };
    Result<Entry> e = decode_entry(bytes);
    if (!e.ok()) return bad("does not decode: " + e.status().message());
    auto hash_of = [&](std::string_view name) {
      Hash h{};
      const Bytes* b = e->body.find(name)->as_bytes();
      std::copy(b->begin(), b->end(), h.begin());
      return h;
    };
    KeyId old_id = hash_of("old_key_id"), new_id = hash_of("new_key_id");
    // In a replicated ledger a member other than the holder of the active key rotates its own
    // key: it moves that member, not the ledger's key chain.
    const Member* member = membership_.founded() ? membership_.find_by_key(old_id) : nullptr;
    if (old_id != active_key_ && member) {
      Result<PublicKey> new_member_key =
          PublicKey::from_spki_der(*e->body.find("new_public_key")->as_bytes());
      if (!new_member_key.ok() || new_member_key->id() != new_id)
        return bad(
            "is a key transition whose new public key is malformed or does not match its id");
      if (known_.count(new_id) || member_keys_.count(new_id))
        return bad(fmt::format("is a key transition to key {}, which the ledger used before",
                               short_hex(new_id)));
      Hash digest = sha256(encode_key_transition_statement(report_.ledger_id, old_id, new_id));
      if (!member->signing_key.verify_digest(digest, *e->body.find("old_signature")->as_bytes())
               .ok())
        return bad("is a key transition whose old-key signature does not verify");
      if (!new_member_key->verify_digest(digest, *e->body.find("new_signature")->as_bytes()).ok())
        return bad("is a key transition whose new-key signature does not verify");
      retired_member_keys_.emplace(old_id, index);
      membership_.apply_key_transition(old_id, *new_member_key);
      member_keys_.emplace(new_id, *new_member_key);
      return true;
    }
    if (old_id != active_key_)
      return bad(fmt::format("is a key transition from key {}, but the active key is {}",
                             short_hex(old_id), short_hex(active_key_)));
    Result<PublicKey> new_key =
        PublicKey::from_spki_der(*e->body.find("new_public_key")->as_bytes());
    if (!new_key.ok() || new_key->id() != new_id)
      return bad("is a key transition whose new public key is malformed or does not match its id");
    if (known_.count(new_id))
      return bad(fmt::format("is a key transition to key {}, which the ledger used before",
                             short_hex(new_id)));
    Hash digest = sha256(encode_key_transition_statement(report_.ledger_id, old_id, new_id));
    if (!known_.at(old_id).verify_digest(digest, *e->body.find("old_signature")->as_bytes()).ok())
      return bad("is a key transition whose old-key signature does not verify");
    if (!new_key->verify_digest(digest, *e->body.find("new_signature")->as_bytes()).ok())
      return bad("is a key transition whose new-key signature does not verify");
    retired_.emplace(old_id, index);
    known_.emplace(new_id, *new_key);
    chain_.push_back(new_id);
    active_key_ = new_id;
    membership_.apply_key_transition(old_id, *new_key);
    return true;
  }

  // Membership entries follow the same rules the replicas apply (ledger/membership.h).
  bool take_membership(std::uint64_t index, ByteView bytes, VerifyProblem& p) {
    Result<Entry> e = decode_entry(bytes);
    if (!e.ok()) {
      p = problem(VerifyProblem::Where::kEntry, index, "does not decode: " + e.status().message());
      return false;
    }
    if (membership_.ledger_id().empty()) membership_ = Membership(report_.ledger_id);
    auto change = membership_.apply(*e, index, active_key_);
    if (!change.ok()) {
      p = problem(VerifyProblem::Where::kEntry, index, change.status().message());
      return false;
    }
    for (const Member& m : membership_.members())
      member_keys_.emplace(m.signing_key.id(), m.signing_key);
    return true;
  }

  // A block after founding: its record (proposer and signature, kept by every replica) must name
  // the member whose key the header names, and that key must have signed the header.
  bool check_block_record(std::uint64_t height, ByteView header_bytes, const Member& proposer,
                          VerifyProblem& p) {
    auto bad = [&](std::string reason) {
      p = problem(VerifyProblem::Where::kBlock, height, std::move(reason));
      return false;
    };
    if (!has_block_records_) {
      // A single box that founded a membership and never replicated: its own blocks.
      if (proposer.signing_key.id() == active_key_) return true;
      return bad("is after the membership was founded but the file keeps no block records");
    }
    records_st_.bind(1, height);
    auto step = records_st_.step();
    if (!step.ok() || *step != sql::Statement::Step::kRow) {
      records_st_.reset();
      // The founder's own blocks between founding and replication carry no record: its key is
      // the ledger's active key, which signs its heads.
      if (proposer.signing_key.id() == active_key_) return true;
      return bad(fmt::format("has no block record (proposer and signature)"));
    }
    const std::string who = records_st_.column_text(0);
    ByteView sig = records_st_.column_blob(1);
    Bytes signature(sig.begin(), sig.end());
    records_st_.reset();
    if (who != proposer.id)
      return bad(fmt::format("is recorded as proposed by \"{}\" but names the key of \"{}\"", who,
                             proposer.id));
    if (!proposer.signing_key.verify_digest(block_hash(header_bytes), signature).ok())
      return bad(fmt::format("has a proposer signature that does not verify with the key of \"{}\"",
                             proposer.id));
    ++report_.member_blocks;
    return true;
  }

  std::string describe_chain() const {
    std::string out;
    for (const KeyId& k : chain_) out += (out.empty() ? "" : " -> ") + short_hex(k);
    return out;
  }

  bool check_head(const HeadRow& row, std::uint64_t height, const Hash& hash,
                  const BlockHeader& header, VerifyProblem& p) {
    auto bad = [&](std::string reason) {
      p = problem(VerifyProblem::Where::kHead, row.seq, std::move(reason));
      return false;
    };
    if (row.height < height)
      return bad(
          fmt::format("covers block {} but is stored after a head for a later block", row.height));
    Result<HeadBody> head = decode_head(row.head);
    if (!head.ok()) return bad("does not decode: " + head.status().message());
    if (head->height != row.height || head->tree_size != row.tree_size)
      return bad("does not match its row (height or tree size)");
    if (head->ledger_id != report_.ledger_id)
      return bad(fmt::format("names ledger '{}'", head->ledger_id));
    if (head->block_hash != hash || head->tree_size != header.tree_size ||
        head->root != header.root)
      return bad(
          fmt::format("does not match block {} (block hash, tree size or root differ)", height));
    auto key = known_.find(head->key_id);
    const bool replica_head = head->key_id != active_key_ &&
                              (membership_.founded() || key == known_.end()) && has_block_records_;
    if (replica_head) {
      // A replica's own head: signed by its member key. Checked now if it is a member's key,
      // otherwise once the whole ledger is read (the replica joined before it was added).
      if (const Member* m = membership_.find_by_key(head->key_id)) {
        if (row.signature.empty()) return bad("has no signature");
        if (!m->signing_key.verify_digest(head_digest(row.head), row.signature).ok())
          return bad(fmt::format("signature does not verify with the key of member \"{}\"", m->id));
      } else if (auto retired = retired_member_keys_.find(head->key_id);
                 retired != retired_member_keys_.end()) {
        return bad(fmt::format(
            "is signed by key {}, which the member's key transition at entry {} retired",
            short_hex(head->key_id), retired->second));
      } else {
        deferred_heads_.push_back({row.seq, head->key_id, head_digest(row.head), row.signature});
      }
    } else if (key == known_.end()) {
      return bad(
          fmt::format("is signed by key {}, which the ledger does not know", to_hex(head->key_id)));
    } else if (head->key_id != active_key_) {
      auto retired = retired_.find(head->key_id);
      if (retired != retired_.end())
        return bad(fmt::format(
            "is signed by key {}, which the key transition at entry {} retired; heads covering "
            "it are signed by {}",
            short_hex(head->key_id), retired->second, short_hex(active_key_)));
      return bad(fmt::format("is signed by key {}, not by the ledger's key at that point {}",
                             short_hex(head->key_id), short_hex(active_key_)));
    }
    if (!replica_head) {
      if (row.signature.empty()) return bad("has no signature");
      Status sig = key->second.verify_digest(head_digest(row.head), row.signature);
      if (!sig.ok()) return bad("signature does not verify: " + sig.message());
    }
    if (head->time_us < last_head_time_) return bad("is dated before the head stored before it");
    if (head->version < last_head_version_)
      return bad(fmt::format("is in head format {}, older than the head before it ({})",
                             head->version, last_head_version_));
    if (head->version >= 2) {
      if (head->subject_count != subjects_.size() || head->subject_root != subjects_.root())
        return bad(fmt::format(
            "commits to a subject map of {} subjects with root {}, but the entries it covers give "
            "{} subjects with root {}",
            head->subject_count, short_hex(head->subject_root), subjects_.size(),
            short_hex(subjects_.root())));
    }
    last_head_version_ = head->version;
    if (head->rollback_counter < last_head_counter_)
      return bad(fmt::format("carries rollback counter {}, lower than the head before it ({})",
                             head->rollback_counter, last_head_counter_));
    last_head_time_ = head->time_us;
    last_head_counter_ = head->rollback_counter;
    report_.rollback_counter = head->rollback_counter;
    ++report_.heads;
    report_.latest_signed_size = head->tree_size;
    report_.latest_signed_time_us = head->time_us;
    std::string id = to_hex(head->key_id);
    if (std::find(report_.key_ids.begin(), report_.key_ids.end(), id) == report_.key_ids.end())
      report_.key_ids.push_back(id);
    return true;
  }

  sql::Database& db_;
  std::filesystem::path path_;
  const VerifyOptions& options_;
  std::map<KeyId, PublicKey> trusted_;
  // Replication: the membership so far, every key that was ever a member's, and replica heads
  // whose key was not (yet) a member's when they were read.
  Membership membership_{""};
  std::map<KeyId, PublicKey> member_keys_;
  std::map<KeyId, std::uint64_t> retired_member_keys_;  // key -> the transition that retired it
  struct DeferredHead {
    std::uint64_t seq;
    KeyId key_id;
    Hash digest;
    Bytes signature;
  };
  std::vector<DeferredHead> deferred_heads_;
  bool has_block_records_ = false;
  sql::Statement records_st_;
  std::map<KeyId, PublicKey> known_;
  std::vector<KeyId> chain_;                // genesis key, then each transition's new key
  std::map<KeyId, std::uint64_t> retired_;  // key -> the transition entry that retired it
  KeyId active_key_{};
  std::map<Bytes, Bytes> patient_keys_;  // pseudonym -> enrolled key (DER)
  std::uint64_t last_head_counter_ = 0;
  VerifyReport report_;
  std::uint64_t total_ = 0;
  std::uint64_t last_head_time_ = 0;
  std::uint64_t last_head_version_ = 0;
  SubjectMap subjects_;  // every subject's latest entry so far
};

}  // namespace

std::string VerifyProblem::describe() const {
  switch (where) {
    case Where::kFile:
      return reason;
    case Where::kEntry:
      return fmt::format("entry {}: {}", number, reason);
    case Where::kBlock:
      return fmt::format("block {}: {}", number, reason);
    case Where::kHead:
      return fmt::format("signed head #{}: {}", number, reason);
    case Where::kTile:
      return reason;
  }
  return reason;
}

nlohmann::json to_json(const VerifyReport& r) {
  nlohmann::json out = {{"ok", r.ok()},
                        {"ledger_id", r.ledger_id},
                        {"entries", r.entries},
                        {"blocks", r.blocks},
                        {"heads", r.heads},
                        {"root", to_hex(r.root)},
                        {"unsigned_entries", r.unsigned_entries},
                        {"key_ids", r.key_ids},
                        {"member_blocks", r.member_blocks},
                        {"rollback_counter", r.rollback_counter}};
  if (r.latest_signed_size) {
    out["latest_signed_size"] = *r.latest_signed_size;
    out["latest_signed_time"] = format_time(r.latest_signed_time_us);
  }
  if (r.problem) out["problem"] = r.problem->describe();
  return out;
}

Result<VerifyReport> verify_ledger_file(const std::filesystem::path& path,
                                        const VerifyOptions& options) {
  if (!std::filesystem::exists(path))
    return Status::NotFound(fmt::format("no ledger file at {}", path.string()));
  MEDGATE_ASSIGN_OR_RETURN(sql::Database db,
                           sql::Database::open(path, sql::Database::Mode::kReadOnly));
  (void)db.exec("PRAGMA mmap_size = 4294967296");
  Result<VerifyReport> report = Verifier(db, path, options).run();
  if (!report.ok()) return report.status().with_context(path.string());
  return report;
}

}  // namespace medgate::ledger
