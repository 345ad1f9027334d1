// LEDGER-CRITICAL: see audit_bundle.h. The verifier here decides what an auditor is told.
#include "ledger/audit_bundle.h"

#include <algorithm>
#include <deque>
#include <future>
#include <map>
#include <set>
#include <thread>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "ledger/block.h"
#include "ledger/merkle.h"
#include "ledger/store.h"

namespace medgate::ledger {
namespace {

using cbor::Value;

constexpr std::size_t kPage = 4096;
constexpr std::size_t kMaxProblems = 50;
// Bundles with at least this many entries are decoded and checked on two threads; below it a
// thread costs more than it saves.
constexpr std::size_t kThreadedFrom = 8192;

Value text_key(std::string_view k) {
  return Value::text(std::string(k));
}

Value hashes(const std::vector<Hash>& hs) {
  cbor::Array a;
  a.reserve(hs.size());
  for (const Hash& h : hs) a.push_back(Value::bytes(ByteView(h)));
  return Value::array(std::move(a));
}

std::string short_hex(ByteView b) {
  return to_hex(b.first(std::min<std::size_t>(b.size(), 8)));
}

// ---- decoding helpers: every field is checked, a missing or mistyped one is kCorruption ----

Status bad(std::string_view what) {
  return Status::Corruption(fmt::format("not a valid audit bundle: {}", what));
}

Result<const Value*> field(const Value& map, std::string_view key, std::string_view where) {
  const Value* v = map.find(key);
  if (!v) return bad(fmt::format("{} has no \"{}\"", where, key));
  return v;
}

Result<std::uint64_t> uint_field(const Value& map, std::string_view key, std::string_view where) {
  MEDGATE_ASSIGN_OR_RETURN(const Value* v, field(map, key, where));
  if (!v->as_uint()) return bad(fmt::format("{} \"{}\" is not an unsigned integer", where, key));
  return *v->as_uint();
}

Result<Bytes> bytes_field(const Value& map, std::string_view key, std::string_view where) {
  MEDGATE_ASSIGN_OR_RETURN(const Value* v, field(map, key, where));
  if (!v->as_bytes()) return bad(fmt::format("{} \"{}\" is not bytes", where, key));
  return *v->as_bytes();
}

Result<std::vector<Hash>> hashes_field(const Value& map, std::string_view key,
                                       std::string_view where) {
  MEDGATE_ASSIGN_OR_RETURN(const Value* v, field(map, key, where));
  const cbor::Array* a = v->as_array();
  if (!a) return bad(fmt::format("{} \"{}\" is not an array", where, key));
  std::vector<Hash> out;
  out.reserve(a->size());
  for (const Value& item : *a) {
    const Bytes* b = item.as_bytes();
    if (!b || b->size() != 32) return bad(fmt::format("{} \"{}\" holds a non-hash", where, key));
    Hash h;
    std::copy(b->begin(), b->end(), h.begin());
    out.push_back(h);
  }
  return out;
}

Value head_value(const BundleHead& h, bool earlier) {
  cbor::Map m{{text_key("head"), Value::bytes(h.bytes)},
              {text_key("signature"), Value::bytes(h.signature)}};
  if (earlier) m.emplace_back(text_key("consistency"), hashes(h.consistency));
  return Value::map(std::move(m)).value();
}

Result<BundleHead> decode_head_value(const Value& v, bool earlier, std::string_view where) {
  if (!v.as_map()) return bad(fmt::format("{} is not a map", where));
  BundleHead h;
  MEDGATE_ASSIGN_OR_RETURN(h.bytes, bytes_field(v, "head", where));
  MEDGATE_ASSIGN_OR_RETURN(h.signature, bytes_field(v, "signature", where));
  if (earlier) {
    MEDGATE_ASSIGN_OR_RETURN(h.consistency, hashes_field(v, "consistency", where));
  }
  return h;
}

Value leaf_proof_value(const SubjectMapLeafProof& p) {
  return Value::map({{text_key("subject"), Value::bytes(p.subject)},
                     {text_key("latest"), Value::uint(p.latest)},
                     {text_key("position"), Value::uint(p.position)},
                     {text_key("path"), hashes(p.path)}})
      .value();
}

Result<std::optional<SubjectMapLeafProof>> decode_leaf_proof(const Value& map,
                                                             std::string_view key) {
  const Value* v = map.find(key);
  if (!v) return std::optional<SubjectMapLeafProof>();
  if (!v->as_map()) return bad(fmt::format("subject proof \"{}\" is not a map", key));
  SubjectMapLeafProof p;
  MEDGATE_ASSIGN_OR_RETURN(p.subject, bytes_field(*v, "subject", "subject proof leaf"));
  MEDGATE_ASSIGN_OR_RETURN(p.latest, uint_field(*v, "latest", "subject proof leaf"));
  MEDGATE_ASSIGN_OR_RETURN(p.position, uint_field(*v, "position", "subject proof leaf"));
  MEDGATE_ASSIGN_OR_RETURN(p.path, hashes_field(*v, "path", "subject proof leaf"));
  return std::optional<SubjectMapLeafProof>(std::move(p));
}

// Whether `meta` is exactly the map the encoder writes for `e` ({"type", "kind", "time", "actor"}),
// compared in place: building a map for every entry of a large bundle would cost more than
// everything else the verifier does with it.
bool meta_matches(const Value& meta, const Entry& e) {
  const cbor::Map* m = meta.as_map();
  const EntryTypeInfo* info = find_entry_type(static_cast<std::uint64_t>(e.type));
  if (!m || !info || m->size() != 4) return false;
  auto is = [&](std::string_view key, std::string_view want) {
    const Value* v = meta.find(key);
    return v && v->as_text() && *v->as_text() == want;
  };
  return is("type", info->name) && is("kind", info->audit_kind) &&
         is("time", format_time(e.time_us)) && is("actor", e.actor);
}

bool names_subject(const Entry& e, ByteView subject) {
  return std::any_of(e.subjects.begin(), e.subjects.end(), [&](const SubjectLink& l) {
    return std::equal(l.subject.begin(), l.subject.end(), subject.begin(), subject.end());
  });
}

std::optional<std::uint64_t> link_for(const Entry& e, ByteView subject) {
  for (const SubjectLink& l : e.subjects)
    if (std::equal(l.subject.begin(), l.subject.end(), subject.begin(), subject.end()))
      return l.previous;
  return std::nullopt;
}

}  // namespace

bool audit_query_matches(const AuditQuery& q, const Entry& e) {
  if (q.from_us && e.time_us < *q.from_us) return false;
  if (q.to_us && e.time_us > *q.to_us) return false;
  if (q.patient && !names_subject(e, *q.patient)) return false;
  if (q.kind) {
    const EntryTypeInfo* info = find_entry_type(static_cast<std::uint64_t>(e.type));
    if (!info || info->audit_kind != *q.kind) return false;
  }
  if (q.principal) {
    auto body_is = [&](std::string_view key) {
      const Value* v = e.body.find(key);
      return v && v->as_text() && *v->as_text() == *q.principal;
    };
    if (e.actor != *q.principal && !body_is("principal") && !body_is("to")) return false;
  }
  return true;
}

namespace {

// One entry record, written straight into the output instead of being built as a Value first: the
// same canonical bytes, without ~30 allocations per entry. A canonical map's keys are in bytewise
// order of their encodings, so shorter text keys first: record {"meta", "bytes", "index", "proof"
// (format 1), "values", "selected"}, meta {"kind", "time", "type", "actor"}. The strict decoder
// (and the round-trip tests) hold this to the rule.
Status write_entry_record(const BundleEntry& e, std::uint64_t version, cbor::Writer& w) {
  const bool per_entry_proofs = version == 1;
  MEDGATE_ASSIGN_OR_RETURN(EntryHeader h, read_entry_header(e.bytes));
  if (!per_entry_proofs && !e.proof.empty())
    return Status::InvalidArgument(fmt::format(
        "entry {} has its own inclusion proof, which format {} does not carry", e.index, version));
  w.map_header((e.values ? 1 : 0) + (per_entry_proofs ? 5 : 4));
  w.text("meta");
  w.map_header(4);
  w.text("kind");
  w.text(h.info->audit_kind);
  w.text("time");
  w.text(format_time(h.time_us));
  w.text("type");
  w.text(h.info->name);
  w.text("actor");
  w.text(h.actor);
  w.text("bytes");
  w.bytes(e.bytes);
  w.text("index");
  w.uint(e.index);
  if (per_entry_proofs) {
    w.text("proof");
    w.array_header(e.proof.size());
    for (const Hash& p : e.proof) w.bytes(p);
  }
  if (e.values) {
    w.text("values");
    cbor::encode_to(*e.values, w);
  }
  w.text("selected");
  w.boolean(e.selected);
  return Status::Ok();
}

}  // namespace

Result<Bytes> encode_audit_bundle(const AuditBundle& b) {
  if (b.version != 1 && b.version != 2)
    return Status::InvalidArgument(fmt::format(
        "audit bundle format version {} is not one this build writes (1, 2)", b.version));
  const bool per_entry_proofs = b.version == 1;
  if (per_entry_proofs && !b.multi_proof.empty())
    return Status::InvalidArgument("a format-1 audit bundle has no multi-leaf proof");
  cbor::Map query;
  const AuditQuery& q = b.query;
  if (q.from_us) query.emplace_back(text_key("from"), Value::uint(*q.from_us));
  if (q.to_us) query.emplace_back(text_key("to"), Value::uint(*q.to_us));
  if (q.patient) query.emplace_back(text_key("patient"), Value::bytes(*q.patient));
  if (q.principal) query.emplace_back(text_key("principal"), Value::text(*q.principal));
  if (q.kind) query.emplace_back(text_key("kind"), Value::text(*q.kind));
  query.emplace_back(text_key("include_values"), Value::boolean(q.include_values));

  cbor::Array earlier;
  for (const BundleHead& h : b.earlier_heads) earlier.push_back(head_value(h, true));

  // The entries (nearly all of a large bundle) are written by write_entry_record().
  cbor::Writer w;
  w.map_header(9 + (b.subject_proof ? 1 : 0) + (per_entry_proofs ? 0 : 1));
  w.uint(0);
  w.uint(static_cast<std::uint64_t>(ObjectKind::kAuditBundle));
  w.uint(1);
  w.uint(b.version);
  w.uint(2);
  w.text(b.ledger_id);
  w.uint(3);
  w.uint(b.created_us);
  w.uint(4);
  w.text(b.exported_by);
  w.uint(5);
  MEDGATE_ASSIGN_OR_RETURN(Value query_value, Value::map(std::move(query)));
  cbor::encode_to(query_value, w);
  w.uint(6);
  cbor::encode_to(head_value(b.head, false), w);
  w.uint(7);
  cbor::encode_to(Value::array(std::move(earlier)), w);
  w.uint(8);
  w.array_header(b.entries.size());
  // Each record on its own; a large bundle's two halves on two threads, joined in order (the same
  // bytes as one thread writes).
  auto write_records = [&](std::size_t from, std::size_t to, cbor::Writer& out) -> Status {
    for (std::size_t k = from; k < to; ++k) {
      MEDGATE_RETURN_IF_ERROR(write_entry_record(b.entries[k], b.version, out));
    }
    return Status::Ok();
  };
  const std::size_t n = b.entries.size();
  if (n >= kThreadedFrom) {
    cbor::Writer second;
    Status second_half;
    {
      std::jthread other([&] { second_half = write_records(n / 2, n, second); });
      MEDGATE_RETURN_IF_ERROR(write_records(0, n / 2, w));
    }
    MEDGATE_RETURN_IF_ERROR(second_half);
    w.raw(second.data());
  } else {
    MEDGATE_RETURN_IF_ERROR(write_records(0, n, w));
  }
  if (b.subject_proof) {
    cbor::Map p{{text_key("count"), Value::uint(b.subject_proof->count)}};
    if (b.subject_proof->match)
      p.emplace_back(text_key("match"), leaf_proof_value(*b.subject_proof->match));
    if (b.subject_proof->below)
      p.emplace_back(text_key("below"), leaf_proof_value(*b.subject_proof->below));
    if (b.subject_proof->above)
      p.emplace_back(text_key("above"), leaf_proof_value(*b.subject_proof->above));
    MEDGATE_ASSIGN_OR_RETURN(Value pv, Value::map(std::move(p)));
    w.uint(9);
    cbor::encode_to(pv, w);
  }
  if (!per_entry_proofs) {
    Bytes concatenated;
    concatenated.reserve(b.multi_proof.size() * sizeof(Hash));
    for (const Hash& h : b.multi_proof) concatenated.insert(concatenated.end(), h.begin(), h.end());
    w.uint(10);
    w.bytes(concatenated);
  }
  return w.take();
}

namespace {

// One entry record, read with a cursor from bytes that cbor::validate accepted (canonical, so keys
// are unique and in order): the bulk of a large bundle, decoded without building Values for the
// entry bytes and the proof hashes.
Result<BundleEntry> read_entry_record(ByteView item, std::uint64_t version) {
  constexpr std::string_view where = "an entry record";
  cbor::Cursor c(item);
  MEDGATE_ASSIGN_OR_RETURN(cbor::Cursor::Head map, c.head());
  if (map.major != 5) return bad("an entry record is not a map");
  BundleEntry e;
  bool index = false, bytes = false, proof = false, selected = false, meta = false;
  for (std::uint64_t k = 0; k < map.arg; ++k) {
    Result<std::string_view> key = c.read_text();
    if (!key.ok()) return bad("an entry record has a non-text key");
    if (*key == "index") {
      Result<std::uint64_t> v = c.read_uint();
      if (!v.ok()) return bad(fmt::format("{} \"index\" is not an unsigned integer", where));
      e.index = *v;
      index = true;
    } else if (*key == "bytes") {
      Result<ByteView> v = c.read_bytes();
      if (!v.ok()) return bad(fmt::format("{} \"bytes\" is not bytes", where));
      e.bytes.assign(v->begin(), v->end());
      bytes = true;
    } else if (*key == "proof" && version == 1) {
      MEDGATE_ASSIGN_OR_RETURN(cbor::Cursor::Head a, c.head());
      if (a.major != 4) return bad(fmt::format("{} \"proof\" is not an array", where));
      if (a.arg > item.size()) return bad(fmt::format("{} \"proof\" is too long", where));
      e.proof.reserve(a.arg);
      for (std::uint64_t i = 0; i < a.arg; ++i) {
        Result<ByteView> h = c.read_bytes();
        if (!h.ok() || h->size() != 32)
          return bad(fmt::format("{} \"proof\" holds a non-hash", where));
        Hash hash;
        std::copy(h->begin(), h->end(), hash.begin());
        e.proof.push_back(hash);
      }
      proof = true;
    } else if (*key == "selected") {
      MEDGATE_ASSIGN_OR_RETURN(cbor::Cursor::Head b, c.head());
      if (b.major != 7 || (b.arg != 20 && b.arg != 21))
        return bad("an entry record's \"selected\" is not a bool");
      e.selected = b.arg == 21;
      selected = true;
    } else if (*key == "meta" || *key == "values") {
      MEDGATE_ASSIGN_OR_RETURN(ByteView raw, c.read_item());
      MEDGATE_ASSIGN_OR_RETURN(Value v, cbor::decode(raw));
      if (*key == "meta") {
        e.meta = std::move(v);
        meta = true;
      } else {
        e.values = std::move(v);
      }
    } else {
      // No format ignores anything: an unknown key is another format or a forgery.
      return bad(fmt::format("{} has an unknown key \"{}\"", where, *key));
    }
  }
  if (!c.at_end()) return bad("an entry record has bytes after it");
  for (auto [present, name] : {std::pair{index, "index"}, std::pair{bytes, "bytes"},
                               std::pair{proof || version != 1, "proof"},
                               std::pair{selected, "selected"}, std::pair{meta, "meta"}})
    if (!present) return bad(fmt::format("{} has no \"{}\"", where, name));
  return e;
}

}  // namespace

Result<AuditBundle> decode_audit_bundle(ByteView bytes) {
  if (Status s = cbor::validate(bytes); !s.ok()) return bad("not canonical CBOR: " + s.message());
  // Everything but the entries (key 8) is small: decoded as Values. The entries are read with a
  // cursor, record by record.
  cbor::Cursor top(bytes);
  MEDGATE_ASSIGN_OR_RETURN(cbor::Cursor::Head top_head, top.head());
  if (top_head.major != 5) return bad("not a CBOR map");
  cbor::Map small;
  std::optional<ByteView> entries_item;
  for (std::uint64_t k = 0; k < top_head.arg; ++k) {
    MEDGATE_ASSIGN_OR_RETURN(ByteView key_raw, top.read_item());
    MEDGATE_ASSIGN_OR_RETURN(ByteView item, top.read_item());
    MEDGATE_ASSIGN_OR_RETURN(Value key, cbor::decode(key_raw));
    if (key.as_uint() == std::uint64_t{8}) {
      entries_item = item;
      small.emplace_back(std::move(key), Value::array({}));
      continue;
    }
    MEDGATE_ASSIGN_OR_RETURN(Value value, cbor::decode(item));
    small.emplace_back(std::move(key), std::move(value));
  }
  Result<Value> decoded = Value::map(std::move(small));
  if (!decoded.ok()) return bad("not canonical CBOR: " + decoded.status().message());
  const Value& v = *decoded;
  const Value* kind = v.find(std::uint64_t{0});
  if (!kind || kind->as_uint() != static_cast<std::uint64_t>(ObjectKind::kAuditBundle))
    return bad("the object is not an audit bundle (key 0)");
  const Value* version = v.find(std::uint64_t{1});
  if (!version || !version->as_uint() || (*version->as_uint() != 1 && *version->as_uint() != 2))
    return bad("audit bundle format version is not one this build reads (1, 2)");
  AuditBundle b;
  b.version = *version->as_uint();
  const std::uint64_t last_key = b.version == 1 ? 9 : 10;
  for (const auto& [k, item] : *v.as_map())
    if (!k.as_uint() || *k.as_uint() > last_key)
      return bad(fmt::format("the bundle has a key format {} does not define", b.version));
  auto key = [&](std::uint64_t k) { return v.find(k); };
  if (!key(2) || !key(2)->as_text()) return bad("no ledger id (key 2)");
  b.ledger_id = *key(2)->as_text();
  if (!key(3) || !key(3)->as_uint()) return bad("no creation time (key 3)");
  b.created_us = *key(3)->as_uint();
  if (!key(4) || !key(4)->as_text()) return bad("no exporter (key 4)");
  b.exported_by = *key(4)->as_text();
  const Value* q = key(5);
  if (!q || !q->as_map()) return bad("no query (key 5)");
  for (const auto& [k, item] : *q->as_map()) {
    const std::string* name = k.as_text();
    if (!name) return bad("the query has a non-text key");
    if (*name == "from" && item.as_uint())
      b.query.from_us = item.as_uint();
    else if (*name == "to" && item.as_uint())
      b.query.to_us = item.as_uint();
    else if (*name == "patient" && item.as_bytes())
      b.query.patient = *item.as_bytes();
    else if (*name == "principal" && item.as_text())
      b.query.principal = *item.as_text();
    else if (*name == "kind" && item.as_text())
      b.query.kind = *item.as_text();
    else if (*name == "include_values" && item.as_bool())
      b.query.include_values = *item.as_bool();
    else
      return bad(fmt::format("the query's \"{}\" is unknown or mistyped", *name));
  }
  if (!key(6)) return bad("no head (key 6)");
  MEDGATE_ASSIGN_OR_RETURN(b.head, decode_head_value(*key(6), false, "the bundle head"));
  if (!key(7) || !key(7)->as_array()) return bad("no earlier heads (key 7)");
  for (const Value& h : *key(7)->as_array()) {
    MEDGATE_ASSIGN_OR_RETURN(BundleHead head, decode_head_value(h, true, "an earlier head"));
    b.earlier_heads.push_back(std::move(head));
  }
  if (!entries_item) return bad("no entries (key 8)");
  cbor::Cursor entries(*entries_item);
  MEDGATE_ASSIGN_OR_RETURN(cbor::Cursor::Head array, entries.head());
  if (array.major != 4) return bad("no entries (key 8)");
  if (array.arg > entries_item->size()) return bad("the entries array is longer than the bundle");
  // The records' extents first (a cursor skipping over them), then the records themselves, in two
  // halves on two threads for a large bundle; the first bad record in bundle order is reported.
  std::vector<ByteView> items;
  items.reserve(array.arg);
  for (std::uint64_t k = 0; k < array.arg; ++k) {
    MEDGATE_ASSIGN_OR_RETURN(ByteView item, entries.read_item());
    items.push_back(item);
  }
  b.entries.resize(items.size());
  auto read_records = [&](std::size_t from, std::size_t to) -> Status {
    for (std::size_t k = from; k < to; ++k) {
      MEDGATE_ASSIGN_OR_RETURN(b.entries[k], read_entry_record(items[k], b.version));
    }
    return Status::Ok();
  };
  const std::size_t n = items.size();
  Status first_half, second_half;
  if (n >= kThreadedFrom) {
    std::jthread other([&] { second_half = read_records(n / 2, n); });
    first_half = read_records(0, n / 2);
  } else {
    first_half = read_records(0, n);
  }
  MEDGATE_RETURN_IF_ERROR(first_half);
  MEDGATE_RETURN_IF_ERROR(second_half);
  if (const Value* p = key(9)) {
    if (!p->as_map()) return bad("the subject proof (key 9) is not a map");
    SubjectMapProof proof;
    MEDGATE_ASSIGN_OR_RETURN(proof.count, uint_field(*p, "count", "the subject proof"));
    MEDGATE_ASSIGN_OR_RETURN(proof.match, decode_leaf_proof(*p, "match"));
    MEDGATE_ASSIGN_OR_RETURN(proof.below, decode_leaf_proof(*p, "below"));
    MEDGATE_ASSIGN_OR_RETURN(proof.above, decode_leaf_proof(*p, "above"));
    b.subject_proof = std::move(proof);
  }
  if (b.version >= 2) {
    const Value* p = key(10);
    if (!p || !p->as_bytes()) return bad("no multi-leaf inclusion proof (key 10)");
    const Bytes& hashes = *p->as_bytes();
    if (hashes.size() % sizeof(Hash) != 0)
      return bad("the multi-leaf inclusion proof (key 10) is not a whole number of hashes");
    b.multi_proof.resize(hashes.size() / sizeof(Hash));
    for (std::size_t k = 0; k < b.multi_proof.size(); ++k)
      std::copy_n(hashes.begin() + static_cast<std::ptrdiff_t>(k * sizeof(Hash)), sizeof(Hash),
                  b.multi_proof[k].begin());
  }
  return b;
}

// ---- export ----

namespace {

// The first entry index whose time can be >= from_us: the first index of the first block dated
// at or after it (a block's time is never earlier than its entries', which are dated when they
// are appended, and block times never decrease).
Result<std::uint64_t> first_index_at(const Ledger& ledger, std::uint64_t from_us) {
  LedgerStats s = ledger.stats();
  std::uint64_t lo = 0, hi = s.height + 1;  // first block with time >= from_us in [lo, hi]
  while (lo < hi) {
    std::uint64_t mid = lo + (hi - lo) / 2;
    MEDGATE_ASSIGN_OR_RETURN(StoredBlock b, ledger.block(mid));
    if (b.header.time_us >= from_us)
      hi = mid;
    else
      lo = mid + 1;
  }
  if (lo > s.height) return s.tree_size;
  MEDGATE_ASSIGN_OR_RETURN(StoredBlock b, ledger.block(lo));
  return b.header.first_index;
}

std::vector<EntryType> types_of_kind(std::optional<std::string_view> kind) {
  std::vector<EntryType> out;
  for (std::uint64_t t = 1; t < 64; ++t)
    if (const EntryTypeInfo* info = find_entry_type(t);
        info && (!kind || info->audit_kind == *kind))
      out.push_back(info->type);
  return out;
}

}  // namespace

Result<AuditBundle> build_audit_bundle(Ledger& ledger, const AuditQuery& query,
                                       const std::string& exported_by,
                                       const AuditExportOptions& options) {
  if (query.kind && std::find(std::begin(kAuditKinds), std::end(kAuditKinds), *query.kind) ==
                        std::end(kAuditKinds))
    return Status::InvalidArgument(fmt::format(
        "unknown kind \"{}\" (ingest, access, consent, rules, device, admin, key, erasure)",
        *query.kind));
  if (query.from_us && query.to_us && *query.from_us > *query.to_us)
    return Status::InvalidArgument("--from is after --to");
  if (options.format_version != 1 && options.format_version != 2)
    return Status::InvalidArgument(
        fmt::format("audit bundle format version {} is not one this build writes (1, 2)",
                    options.format_version));

  // The bundle's head, and for a patient the subject map at exactly that head (a head signed in
  // between moves the map on: sign again).
  MEDGATE_ASSIGN_OR_RETURN(SignedHead head, ledger.sign_head_now());
  std::optional<SubjectMapProof> subject_proof;
  if (query.patient) {
    for (int attempt = 0;; ++attempt) {
      Result<SubjectMapProof> p = ledger.subject_map_proof(*query.patient, head);
      if (p.ok()) {
        subject_proof = std::move(p).value();
        break;
      }
      if (p.status().code() != StatusCode::kUnavailable || attempt >= 5)
        return p.status().with_context("proving the patient's latest entry");
      MEDGATE_ASSIGN_OR_RETURN(head, ledger.sign_head_now(/*force=*/true));
    }
  }
  const std::uint64_t size = head.head.tree_size;

  AuditBundle b;
  b.version = options.format_version;
  b.ledger_id = ledger.ledger_id();
  b.created_us = now_us();
  b.exported_by = exported_by;
  b.query = query;
  b.head = {head.bytes, head.signature, {}};
  b.subject_proof = subject_proof;

  std::map<std::uint64_t, BundleEntry> picked;
  // Takes an entry into the bundle if the query selects it (`selected`) or it is proof material.
  auto add_judged = [&](StoredEntry e, bool selected, bool chain_or_key) -> Status {
    if (!selected && !chain_or_key) return Status::Ok();
    auto [it, fresh] = picked.try_emplace(e.index);
    if (!fresh) return Status::Ok();
    BundleEntry& out = it->second;
    out.index = e.index;
    out.selected = selected;
    if (selected && query.include_values && options.values) {
      MEDGATE_ASSIGN_OR_RETURN(out.values, options.values(e.entry));
    }
    out.bytes = std::move(e.bytes);
    return Status::Ok();
  };
  auto add = [&](StoredEntry e, bool chain_or_key) -> Status {
    const bool selected = audit_query_matches(query, e.entry);
    return add_judged(std::move(e), selected, chain_or_key);
  };

  // The key history: genesis and every key transition below the head.
  MEDGATE_ASSIGN_OR_RETURN(StoredEntry genesis, ledger.entry(0));
  MEDGATE_RETURN_IF_ERROR(add(std::move(genesis), true));
  const EntryType transition[] = {EntryType::kKeyTransition};
  for (std::uint64_t from = 0;;) {
    MEDGATE_ASSIGN_OR_RETURN(auto page, ledger.entries_of_type(transition, from, kPage));
    if (page.empty()) break;
    from = page.back().index + 1;
    for (StoredEntry& e : page)
      if (e.index < size) MEDGATE_RETURN_IF_ERROR(add(std::move(e), true));
  }

  std::uint64_t first = 0;
  if (query.from_us) {
    MEDGATE_ASSIGN_OR_RETURN(first, first_index_at(ledger, *query.from_us));
  }

  if (query.patient) {
    // The chain: from the map-proved latest entry back through the links, past the range start
    // (the first entry dated before --from ends it, and is included to show where it ends).
    std::vector<std::uint64_t> indexes;
    for (std::uint64_t from = 0;;) {
      MEDGATE_ASSIGN_OR_RETURN(auto page, ledger.subject_entries(*query.patient, from, kPage));
      if (page.empty()) break;
      from = page.back() + 1;
      for (std::uint64_t i : page)
        if (i < size) indexes.push_back(i);
    }
    std::optional<std::uint64_t> next =
        subject_proof->match ? std::optional<std::uint64_t>(subject_proof->match->latest)
                             : std::nullopt;
    std::uint64_t visited = 0;
    // The chain is read a page at a time, newest first, from the subject index (for format-2
    // entries the links name exactly the index's previous entry; where they do not, the entry a
    // link names is read alone, and the verifier will judge the chain). Reading and decoding the
    // entries is most of an export's work, and taking them in is little: so for a long chain the
    // next two pages are always being read, on two other threads, while this one takes a page in.
    using Position = std::vector<std::uint64_t>::const_iterator;
    auto page_from = [&](Position end) {
      std::vector<std::uint64_t> wanted;  // the page's indexes, newest first, ending before `end`
      for (auto it = end; it != indexes.cbegin() && wanted.size() < kPage;) wanted.push_back(*--it);
      return wanted;
    };
    std::vector<StoredEntry> page;
    std::size_t in_page = 0;
    struct Ahead {
      std::uint64_t first = 0;  // the newest index of the page
      std::future<Result<std::vector<StoredEntry>>> entries;
    };
    std::deque<Ahead> ahead;             // pages being read, in the order the chain will want them
    Position unread = indexes.cbegin();  // the end of the newest page not being read yet
    const bool read_ahead = indexes.size() >= 2 * kPage;
    auto read_next = [&](std::uint64_t index) -> Result<StoredEntry> {
      if (in_page < page.size() && page[in_page].index == index) return std::move(page[in_page++]);
      auto end = std::upper_bound(indexes.cbegin(), indexes.cend(), index);
      if (end == indexes.cbegin() || *(end - 1) != index) return ledger.entry(index);
      Result<std::vector<StoredEntry>> read = Status::Internal("not read");
      if (!ahead.empty() && ahead.front().first == index) {
        read = ahead.front().entries.get();
        ahead.pop_front();
      } else {
        ahead.clear();  // not the pages the chain went on with (each waits for its read)
        read = ledger.entries_at(page_from(end));
        unread = end - static_cast<std::ptrdiff_t>(std::min<std::size_t>(
                           kPage, static_cast<std::size_t>(end - indexes.cbegin())));
      }
      if (!read.ok()) return read.status();
      page = std::move(read).value();
      in_page = 1;
      while (read_ahead && ahead.size() < 2 && unread != indexes.cbegin()) {
        ahead.push_back(
            {*(unread - 1), std::async(std::launch::async, [&ledger, wanted = page_from(unread)] {
               return ledger.entries_at(wanted);
             })});
        unread -= static_cast<std::ptrdiff_t>(
            std::min<std::size_t>(kPage, static_cast<std::size_t>(unread - indexes.cbegin())));
      }
      return std::move(page[0]);
    };
    while (next) {
      MEDGATE_ASSIGN_OR_RETURN(StoredEntry e, read_next(*next));
      std::optional<std::uint64_t> previous = link_for(e.entry, *query.patient);
      bool before_range = query.from_us && e.entry.time_us < *query.from_us;
      bool old_format = e.entry.version < 2;
      MEDGATE_RETURN_IF_ERROR(add(std::move(e), true));
      if (options.progress && ++visited % 1024 == 0) options.progress(visited, indexes.size());
      if (before_range) break;
      if (old_format) {
        // Format-1 entries carry no links: take the rest of the range from the subject index.
        for (auto it = indexes.rbegin(); it != indexes.rend(); ++it) {
          if (*it >= *next) continue;
          MEDGATE_ASSIGN_OR_RETURN(StoredEntry older, ledger.entry(*it));
          bool stop = query.from_us && older.entry.time_us < *query.from_us;
          MEDGATE_RETURN_IF_ERROR(add(std::move(older), false));
          if (stop) break;
        }
        break;
      }
      next = previous;
    }
  } else {
    const std::vector<EntryType> types = types_of_kind(query.kind);
    // Calls `f` for each page of the entries of these types in [from, to).
    auto for_pages = [&ledger, &types](std::uint64_t from, std::uint64_t to,
                                       const std::function<Status(std::span<StoredEntry>)>& f) {
      while (from < to) {
        MEDGATE_ASSIGN_OR_RETURN(auto page, ledger.entries_of_type(types, from, kPage));
        if (page.empty()) break;
        from = page.back().index + 1;
        auto past = std::find_if(page.begin(), page.end(),
                                 [&](const StoredEntry& e) { return e.index >= to; });
        MEDGATE_RETURN_IF_ERROR(f(std::span<StoredEntry>(page.begin(), past)));
        if (past != page.end()) break;
      }
      return Status::Ok();
    };
    // Reading and decoding the entries is most of an export's work: on a large range the second
    // half is read and judged on a second thread (only the selected entries are kept, and without
    // their decoded form unless values are wanted), and taken in after this thread's first half.
    const std::uint64_t span = size - std::min(size, first);
    const std::uint64_t mid = span >= 2 * kThreadedFrom ? first + span / 2 : size;
    struct Judged {
      StoredEntry entry;
      bool selected = false;
    };
    std::future<Result<std::vector<Judged>>> second_half;
    if (mid < size) {
      second_half = std::async(std::launch::async, [&]() -> Result<std::vector<Judged>> {
        std::vector<Judged> kept;
        auto keep_selected = [&](std::span<StoredEntry> page) -> Status {
          for (StoredEntry& e : page) {
            if (!audit_query_matches(query, e.entry)) continue;
            if (!query.include_values) e.entry = Entry{};
            kept.push_back({std::move(e), true});
          }
          return Status::Ok();
        };
        MEDGATE_RETURN_IF_ERROR(for_pages(mid, size, keep_selected));
        return kept;
      });
    }
    std::uint64_t looked = 0;
    auto take_page = [&](std::span<StoredEntry> page) -> Status {
      for (StoredEntry& e : page) MEDGATE_RETURN_IF_ERROR(add(std::move(e), false));
      looked += page.size();
      if (options.progress) options.progress(looked, span);
      return Status::Ok();
    };
    MEDGATE_RETURN_IF_ERROR(for_pages(first, mid, take_page));
    if (second_half.valid()) {
      MEDGATE_ASSIGN_OR_RETURN(std::vector<Judged> kept, second_half.get());
      for (Judged& j : kept)
        MEDGATE_RETURN_IF_ERROR(add_judged(std::move(j.entry), j.selected, false));
      if (options.progress) options.progress(span, span);
    }
  }

  // Format 2: one multi-leaf proof of every entry to the bundle head. Format 1: an inclusion
  // proof per entry, all in one batch (they share most of their nodes).
  std::vector<std::uint64_t> proved;
  proved.reserve(picked.size());
  for (const auto& [index, e] : picked) proved.push_back(index);
  std::vector<std::vector<Hash>> proofs;
  if (b.version == 1) {
    MEDGATE_ASSIGN_OR_RETURN(proofs, ledger.inclusion_proofs(proved, size));
  } else {
    MEDGATE_ASSIGN_OR_RETURN(b.multi_proof, ledger.multi_inclusion_proof(proved, size));
  }
  b.entries.reserve(picked.size());
  std::optional<std::uint64_t> first_selected, last_selected;
  std::size_t k = 0;
  for (auto& [index, e] : picked) {
    if (b.version == 1) e.proof = std::move(proofs[k++]);
    if (e.selected) {
      if (!first_selected) first_selected = index;
      last_selected = index;
    }
    b.entries.push_back(std::move(e));
  }
  // The first heads that covered the range's first and last selected entries, each with a
  // consistency proof to the bundle head: they show when those entries were first signed for, and
  // let an auditor who kept one of those heads tie the bundle to it.
  std::set<std::uint64_t> seen{head.sequence};
  for (std::optional<std::uint64_t> i : {first_selected, last_selected}) {
    if (!i) continue;
    Result<SignedHead> earlier = ledger.first_head_covering(*i);
    if (!earlier.ok() || !seen.insert(earlier->sequence).second) continue;
    if (earlier->head.tree_size >= size) continue;
    MEDGATE_ASSIGN_OR_RETURN(std::vector<Hash> proof,
                             ledger.consistency_proof(earlier->head.tree_size, size));
    b.earlier_heads.push_back({earlier->bytes, earlier->signature, std::move(proof)});
  }
  return b;
}

// ---- verification ----

namespace {

// Checks RFC 9162 inclusion proofs of many entries, in ascending index order, to one head. Proofs
// to the same head share their upper part: once an entry's path meets the path of the entry
// checked before it (at the same node, in the same state of the RFC's walk), the rest of the walk
// is the same computation on the same hashes, so equal remaining proof hashes give the same root
// and are compared instead of hashed again. A bundle of every tenth entry hashes ~4 nodes per entry
// instead of ~20. Any disagreement falls back to merkle::verify_inclusion, which decides and words
// the problem; only a path that verified is remembered.
class InclusionChecker {
 public:
  InclusionChecker(std::uint64_t size, const Hash& root) : size_(size), root_(root) {}

  Status check(std::uint64_t index, const Hash& leaf, std::span<const Hash> proof) {
    if (index >= size_) return merkle::verify_inclusion(index, size_, leaf, proof, root_);
    steps_.clear();
    std::uint64_t fn = index, sn = size_ - 1, level = 0;
    Hash r = leaf;
    std::size_t m = 0;  // the first of the last path's steps not below `level`
    for (std::size_t k = 0; k < proof.size(); ++k) {
      if (sn == 0) return full(index, leaf, proof);
      if ((fn & 1) != 0 || fn == sn) {
        r = merkle::node_hash(proof[k], r);
        while ((fn & 1) == 0 && fn != 0) {
          fn >>= 1;
          sn >>= 1;
          ++level;
        }
      } else {
        r = merkle::node_hash(r, proof[k]);
      }
      fn >>= 1;
      sn >>= 1;
      ++level;
      steps_.push_back({level, fn, r, k + 1});
      while (m < last_steps_.size() && last_steps_[m].level < level) ++m;
      if (m < last_steps_.size() && last_steps_[m].level == level && last_steps_[m].node == fn) {
        const Step& met = last_steps_[m];
        std::span<const Hash> rest = proof.subspan(k + 1);
        std::span<const Hash> last_rest = std::span<const Hash>(last_proof_).subspan(met.rest);
        if (met.value != r ||
            !std::equal(rest.begin(), rest.end(), last_rest.begin(), last_rest.end()))
          return full(index, leaf, proof);
        for (std::size_t t = m + 1; t < last_steps_.size(); ++t) {
          Step above = last_steps_[t];
          above.rest = above.rest - met.rest + k + 1;
          steps_.push_back(above);
        }
        remember(proof);
        return Status::Ok();
      }
    }
    if (sn != 0 || r != root_) return full(index, leaf, proof);
    remember(proof);
    return Status::Ok();
  }

 private:
  struct Step {
    std::uint64_t level = 0;  // right shifts of the walk so far
    std::uint64_t node = 0;   // fn after them: the node's index at that level
    Hash value{};             // the node's hash
    std::size_t rest = 0;     // proof hashes consumed to get here
  };

  Status full(std::uint64_t index, const Hash& leaf, std::span<const Hash> proof) {
    Status s = merkle::verify_inclusion(index, size_, leaf, proof, root_);
    if (s.ok()) {
      // Recompute the steps the shortcut needs next time (rare: only after a disagreement).
      steps_.clear();
      std::uint64_t fn = index, sn = size_ - 1, level = 0;
      Hash r = leaf;
      for (std::size_t k = 0; k < proof.size(); ++k) {
        if ((fn & 1) != 0 || fn == sn) {
          r = merkle::node_hash(proof[k], r);
          while ((fn & 1) == 0 && fn != 0) {
            fn >>= 1;
            sn >>= 1;
            ++level;
          }
        } else {
          r = merkle::node_hash(r, proof[k]);
        }
        fn >>= 1;
        sn >>= 1;
        ++level;
        steps_.push_back({level, fn, r, k + 1});
      }
      remember(proof);
    }
    return s;
  }

  void remember(std::span<const Hash> proof) {
    last_steps_.swap(steps_);
    last_proof_.assign(proof.begin(), proof.end());
  }

  std::uint64_t size_;
  Hash root_;
  std::vector<Step> steps_, last_steps_;
  std::vector<Hash> last_proof_;
};

class BundleVerifier {
 public:
  BundleVerifier(const AuditBundle& b, const std::vector<PublicKey>& trusted,
                 const std::function<void(std::uint64_t, std::uint64_t)>& progress)
      : b_(b), progress_(progress) {
    for (const PublicKey& k : trusted) trusted_.emplace(k.id(), k);
  }

  AuditReport run(ByteView bundle_bytes, ByteView signature) {
    r_.format_version = b_.version;
    r_.ledger_id = b_.ledger_id;
    r_.created_us = b_.created_us;
    r_.exported_by = b_.exported_by;
    r_.query = b_.query;
    r_.entries = b_.entries.size();
    r_.earlier_heads = b_.earlier_heads.size();
    r_.patient_query = b_.query.patient.has_value();

    Result<HeadBody> head = decode_head(b_.head.bytes);
    if (!head.ok()) {
      problem("the bundle head does not decode: " + head.status().message());
      return r_;
    }
    head_ = *head;
    r_.tree_size = head_.tree_size;
    r_.head_time_us = head_.time_us;
    r_.root = head_.root;
    r_.signing_key = to_hex(head_.key_id);
    if (head_.ledger_id != b_.ledger_id)
      problem(fmt::format("the bundle head names ledger '{}', the bundle '{}'", head_.ledger_id,
                          b_.ledger_id));

    check_entries_order_and_proofs();
    // The bundle's digest and format 2's multi-leaf proof are pure hashing: on a large bundle
    // they run on a second thread while the checks below run on this one. Their problems are
    // reported after those either way, so a report reads the same whatever the bundle's size.
    Hash digest{};
    std::optional<std::string> multi_problem;
    auto hashing = [&] {
      digest = sha256(bundle_bytes);
      if (b_.version >= 2) multi_problem = multi_proof_problem();
    };
    {
      std::jthread helper;
      if (b_.entries.size() >= kThreadedFrom)
        helper = std::jthread(hashing);
      else
        hashing();
      take_key_history();
      check_head_signature(head_, b_.head.bytes, b_.head.signature, "the bundle head");
      check_earlier_heads();
      check_selection();
      if (r_.patient_query) check_patient_chain();
    }  // joins the helper
    if (multi_problem) problem(std::move(*multi_problem));
    check_bundle_signature(digest, signature);
    if (b_.query.include_values) r_.values_included = true;
    return r_;
  }

 private:
  void problem(std::string p) {
    if (r_.problems.size() < kMaxProblems) r_.problems.push_back(std::move(p));
  }

  // Entries in strictly ascending index order, each below the head's size, each proved in it.
  // Decoding and proving the entries is most of the work on a large bundle: two halves run on two
  // threads (each with its own InclusionChecker for format 1; format 2 hashes the leaves there and
  // checks the one multi-leaf proof later, see run()), which also judge each entry's selection and
  // metadata; then the results are taken in bundle order, so the problems read the same as from
  // one thread.
  void check_entries_order_and_proofs() {
    const std::size_t n = b_.entries.size();
    const bool per_entry_proofs = b_.version == 1;
    std::vector<Result<Entry>> decoded(n, Status::Internal("not checked"));
    std::vector<Status> proofs(n);
    checks_.assign(n, RecordCheck{});
    leaves_.resize(n);
    auto work = [&](std::size_t from, std::size_t to, bool report) {
      InclusionChecker inclusion(head_.tree_size, head_.root);
      for (std::size_t k = from; k < to; ++k) {
        const BundleEntry& e = b_.entries[k];
        decoded[k] = decode_entry(e.bytes);
        leaves_[k] = {e.index, merkle::leaf_hash(e.bytes)};
        if (decoded[k].ok()) {
          checks_[k] = {true, audit_query_matches(b_.query, *decoded[k]),
                        meta_matches(e.meta, *decoded[k])};
          if (per_entry_proofs) proofs[k] = inclusion.check(e.index, leaves_[k].hash, e.proof);
        }
        // The other half runs alongside: report this half's progress for both.
        if (report && progress_ && (k + 1 - from) % 4096 == 0)
          progress_(std::min(n, 2 * (k + 1 - from)), n);
      }
    };
    if (n >= kThreadedFrom) {
      std::jthread other(work, n / 2, n, false);
      work(0, n / 2, true);
    } else {
      work(0, n, true);
    }
    std::optional<std::uint64_t> previous;
    for (std::size_t k = 0; k < n; ++k) {
      const BundleEntry& e = b_.entries[k];
      if (previous && e.index <= *previous)
        problem(
            fmt::format("entries are out of order: entry {} at position {} follows entry {} "
                        "(reordered or duplicated)",
                        e.index, k, *previous));
      previous = e.index;
      if (!decoded[k].ok()) {
        problem(
            fmt::format("entry {}: does not decode: {}", e.index, decoded[k].status().message()));
        continue;
      }
      if (!proofs[k].ok())
        problem(
            fmt::format("entry {}: its inclusion proof does not lead to the signed head's root "
                        "(the entry or its proof was changed): {}",
                        e.index, proofs[k].message()));
      entries_.emplace_hint(entries_.end(), e.index, std::move(decoded[k]).value());
    }
    if (progress_) progress_(n, n);
  }

  // Format 2: every entry's leaf, with the bundle's one multi-leaf proof, gives the head's root.
  // The proof cannot say which entry was changed (any one leaf or proof hash changes the root);
  // entries out of order are put in order first, so that a reordering is named once, by
  // check_entries_order_and_proofs(). Pure hashing on leaves_: safe on another thread while the
  // other checks run. Returns the problem, or nothing.
  std::optional<std::string> multi_proof_problem() {
    std::vector<merkle::IndexedLeaf>& leaves = leaves_;
    const auto by_index = [](const merkle::IndexedLeaf& x, const merkle::IndexedLeaf& y) {
      return x.index < y.index;
    };
    if (!std::is_sorted(leaves.begin(), leaves.end(), by_index)) {
      std::stable_sort(leaves.begin(), leaves.end(), by_index);
    }
    auto same = std::adjacent_find(leaves.begin(), leaves.end(),
                                   [](const merkle::IndexedLeaf& x, const merkle::IndexedLeaf& y) {
                                     return x.index == y.index;
                                   });
    if (same != leaves.end())
      return fmt::format(
          "entry {} is in the bundle more than once: the multi-leaf inclusion proof proves each "
          "entry once, so it cannot be checked",
          same->index);
    if (Status s =
            merkle::verify_multi_inclusion(leaves, head_.tree_size, b_.multi_proof, head_.root);
        !s.ok())
      return fmt::format(
          "the entries' multi-leaf inclusion proof does not lead to the signed head's root (an "
          "entry or the proof was changed, added or removed): {}",
          s.message());
    return std::nullopt;
  }

  // Genesis, then every key transition in index order: each signed by the key before it and the
  // key it introduces (the ledger verifier's rules). The chain is trusted when any key of it is.
  void take_key_history() {
    auto g = entries_.find(0);
    if (g == entries_.end() || g->second.type != EntryType::kGenesis) {
      problem("the bundle lacks the ledger's genesis entry (entry 0), which names its first key");
      return;
    }
    const Entry& genesis = g->second;
    const std::string* id = genesis.body.find("ledger_id")->as_text();
    if (*id != b_.ledger_id)
      problem(fmt::format("the genesis entry names ledger '{}', not '{}'", *id, b_.ledger_id));
    Result<PublicKey> key = PublicKey::from_spki_der(*genesis.body.find("public_key")->as_bytes());
    if (!key.ok()) {
      problem("the genesis entry's public key is malformed");
      return;
    }
    keys_.emplace(key->id(), *key);
    epochs_.push_back({1, key->id()});
    for (const auto& [index, e] : entries_) {
      if (e.type != EntryType::kKeyTransition) continue;
      auto hash_of = [&](std::string_view name) {
        Hash h{};
        const Bytes* b = e.body.find(name)->as_bytes();
        std::copy(b->begin(), b->end(), h.begin());
        return h;
      };
      KeyId old_id = hash_of("old_key_id"), new_id = hash_of("new_key_id");
      KeyId active = epochs_.back().second;
      if (old_id != active) {
        problem(
            fmt::format("entry {}: a key transition from key {}, but the active key is {} (a "
                        "transition is missing)",
                        index, short_hex(old_id), short_hex(active)));
        continue;
      }
      Result<PublicKey> new_key =
          PublicKey::from_spki_der(*e.body.find("new_public_key")->as_bytes());
      if (!new_key.ok() || new_key->id() != new_id) {
        problem(fmt::format("entry {}: a key transition whose new key is malformed", index));
        continue;
      }
      Hash digest = sha256(encode_key_transition_statement(b_.ledger_id, old_id, new_id));
      if (!keys_.at(old_id).verify_digest(digest, *e.body.find("old_signature")->as_bytes()).ok() ||
          !new_key->verify_digest(digest, *e.body.find("new_signature")->as_bytes()).ok()) {
        problem(fmt::format("entry {}: a key transition whose signatures do not verify", index));
        continue;
      }
      keys_.emplace(new_id, *new_key);
      epochs_.push_back({index + 1, new_id});
    }
    bool trusted = false;
    for (const auto& [from, k] : epochs_) {
      r_.key_chain.push_back(to_hex(k));
      trusted = trusted || trusted_.count(k);
    }
    if (!trusted) {
      std::string chain;
      for (const auto& [from, k] : epochs_) chain += (chain.empty() ? "" : " -> ") + short_hex(k);
      problem(fmt::format("none of the ledger's signing keys ({}) is a trusted key", chain));
    }
  }

  // The key that signs heads covering `size` entries, by the key history.
  std::optional<KeyId> key_for(std::uint64_t size) const {
    std::optional<KeyId> key;
    for (const auto& [from, k] : epochs_)
      if (from <= size) key = k;
    return key;
  }

  void check_head_signature(const HeadBody& h, ByteView bytes, ByteView signature,
                            std::string_view what) {
    std::optional<KeyId> expected = key_for(h.tree_size);
    if (!expected) return;  // no key history: reported already
    if (h.key_id != *expected) {
      problem(
          fmt::format("{} is signed by key {}, but the key history says heads of tree size {} "
                      "are signed by {}",
                      what, short_hex(h.key_id), h.tree_size, short_hex(*expected)));
      return;
    }
    if (Status s = keys_.at(h.key_id).verify_digest(head_digest(bytes), signature); !s.ok())
      problem(fmt::format("{}'s signature does not verify: {}", what, s.message()));
  }

  void check_bundle_signature(const Hash& digest, ByteView signature) {
    auto key = keys_.find(head_.key_id);
    if (key == keys_.end()) {
      problem(fmt::format("the bundle is signed by key {}, which is not in the key history",
                          short_hex(head_.key_id)));
      return;
    }
    if (signature.empty()) {
      problem("the bundle has no signature");
      return;
    }
    if (Status s = key->second.verify_digest(digest, signature); !s.ok())
      problem(
          fmt::format("the bundle signature does not verify with key {} (the bundle was "
                      "changed after it was signed, or the signature is forged): {}",
                      short_hex(head_.key_id), s.message()));
  }

  void check_earlier_heads() {
    for (std::size_t k = 0; k < b_.earlier_heads.size(); ++k) {
      const BundleHead& eh = b_.earlier_heads[k];
      std::string what = fmt::format("earlier head {}", k + 1);
      Result<HeadBody> h = decode_head(eh.bytes);
      if (!h.ok()) {
        problem(what + " does not decode: " + h.status().message());
        continue;
      }
      if (h->ledger_id != b_.ledger_id) problem(what + " names another ledger");
      check_head_signature(*h, eh.bytes, eh.signature, what);
      if (h->tree_size > head_.tree_size) {
        problem(what + " is larger than the bundle head");
        continue;
      }
      if (Status s = merkle::verify_consistency(h->tree_size, head_.tree_size, h->root, head_.root,
                                                eh.consistency);
          !s.ok())
        problem(
            fmt::format("{} (tree size {}): its consistency proof to the bundle head does not "
                        "verify: {}",
                        what, h->tree_size, s.message()));
    }
  }

  // Every entry's "selected" flag must be what the query says of it; metadata must match bytes
  // (both judged alongside the decoding, check_entries_order_and_proofs()).
  void check_selection() {
    for (std::size_t k = 0; k < b_.entries.size(); ++k) {
      const BundleEntry& e = b_.entries[k];
      const RecordCheck& c = checks_[k];
      if (!c.decoded) continue;
      bool matches = c.matches;
      if (matches != e.selected)
        problem(fmt::format("entry {}: marked {}selected, but the query {} it", e.index,
                            e.selected ? "" : "not ", matches ? "selects" : "does not select"));
      if (e.selected) ++r_.selected;
      if (!c.meta_ok)
        problem(fmt::format("entry {}: its metadata does not match its bytes", e.index));
      if (e.values && !b_.query.include_values)
        problem(fmt::format("entry {}: carries values the query did not ask for", e.index));
    }
  }

  // Completeness for one patient (docs/audit-bundle.md): the head's subject map names the
  // patient's latest entry; links lead back from it through every entry about the patient.
  void check_patient_chain() {
    const Bytes& patient = *b_.query.patient;
    if (head_.version < 2) {
      problem(
          "the bundle head is in format 1, which commits to no subject map: completeness "
          "cannot be shown");
      return;
    }
    if (!b_.subject_proof) {
      problem("the bundle is for one patient but carries no subject-map proof");
      return;
    }
    Result<std::optional<std::uint64_t>> latest = verify_subject_map_proof(
        patient, head_.subject_root, head_.subject_count, *b_.subject_proof);
    if (!latest.ok()) {
      problem(latest.status().message());
      return;
    }
    r_.patient_latest = *latest;
    std::optional<std::uint64_t> next = *latest;
    std::optional<std::uint64_t> came_from;
    std::set<std::uint64_t> chain;
    while (next) {
      auto it = entries_.find(*next);
      if (it == entries_.end()) {
        problem(fmt::format(
            "the patient's chain is broken: entry {} ({}) is not in the bundle (an entry about the "
            "patient was removed)",
            *next,
            came_from
                ? fmt::format("named as the previous entry by entry {}", *came_from)
                : std::string("the latest entry about the patient, by the signed subject map")));
        return;
      }
      const Entry& e = it->second;
      if (!names_subject(e, patient)) {
        problem(fmt::format("the patient's chain leads to entry {}, which is not about the patient",
                            *next));
        return;
      }
      chain.insert(*next);
      ++r_.chain_entries;
      if (b_.query.from_us && e.time_us < *b_.query.from_us) break;  // past the range start
      if (e.version < 2) {
        r_.notes.push_back(fmt::format(
            "entries about the patient up to entry {} are in entry format 1, which kept no links: "
            "completeness is proved from entry {} on",
            *next, *next));
        break;
      }
      came_from = *next;
      next = link_for(e, patient);
    }
    // Every selected entry about the patient must be on the proved chain (an entry not on it
    // would mean the links are wrong).
    for (const auto& [index, e] : entries_)
      if (names_subject(e, patient) && audit_query_matches(b_.query, e) && !chain.count(index) &&
          r_.notes.empty())
        problem(fmt::format("entry {} is about the patient but not on the proved chain", index));
  }

  // What the decoding threads found out about each record, in bundle order.
  struct RecordCheck {
    bool decoded = false;
    bool matches = false;  // the query selects it
    bool meta_ok = false;  // its metadata copy is what its bytes say
  };

  const AuditBundle& b_;
  const std::function<void(std::uint64_t, std::uint64_t)>& progress_;
  std::vector<RecordCheck> checks_;
  std::vector<merkle::IndexedLeaf> leaves_;  // each record's (index, leaf hash)
  std::map<KeyId, PublicKey> trusted_;
  std::map<KeyId, PublicKey> keys_;
  std::vector<std::pair<std::uint64_t, KeyId>> epochs_;  // (from tree size, key)
  std::map<std::uint64_t, Entry> entries_;
  HeadBody head_;
  AuditReport r_;
};

}  // namespace

Result<AuditReport> verify_audit_bundle(
    ByteView bundle_bytes, ByteView signature, const std::vector<PublicKey>& trusted_keys,
    const std::function<void(std::uint64_t, std::uint64_t)>& progress) {
  MEDGATE_ASSIGN_OR_RETURN(AuditBundle b, decode_audit_bundle(bundle_bytes));
  return BundleVerifier(b, trusted_keys, progress).run(bundle_bytes, signature);
}

AuditReport verify_decoded_audit_bundle(
    const AuditBundle& bundle, ByteView bundle_bytes, ByteView signature,
    const std::vector<PublicKey>& trusted_keys,
    const std::function<void(std::uint64_t, std::uint64_t)>& progress) {
  return BundleVerifier(bundle, trusted_keys, progress).run(bundle_bytes, signature);
}

nlohmann::json to_json(const AuditReport& r) {
  nlohmann::json query = nlohmann::json::object();
  if (r.query.from_us) query["from"] = format_time(*r.query.from_us);
  if (r.query.to_us) query["to"] = format_time(*r.query.to_us);
  if (r.query.patient) query["patient"] = to_hex(*r.query.patient);
  if (r.query.principal) query["principal"] = *r.query.principal;
  if (r.query.kind) query["kind"] = *r.query.kind;
  query["include_values"] = r.query.include_values;
  nlohmann::json out = {{"ok", r.ok()},
                        {"problems", r.problems},
                        {"notes", r.notes},
                        {"format_version", r.format_version},
                        {"ledger_id", r.ledger_id},
                        {"created", format_time(r.created_us)},
                        {"exported_by", r.exported_by},
                        {"query", query},
                        {"tree_size", r.tree_size},
                        {"head_time", format_time(r.head_time_us)},
                        {"root", to_hex(r.root)},
                        {"key_chain", r.key_chain},
                        {"signing_key", r.signing_key},
                        {"entries", r.entries},
                        {"selected", r.selected},
                        {"earlier_heads", r.earlier_heads},
                        {"values_included", r.values_included}};
  if (r.patient_query) {
    out["patient_latest"] = r.patient_latest ? nlohmann::json(*r.patient_latest) : nlohmann::json();
    out["chain_entries"] = r.chain_entries;
  }
  return out;
}

nlohmann::json bundle_entries_json(const AuditBundle& b) {
  nlohmann::json out = nlohmann::json::array();
  for (const BundleEntry& e : b.entries) {
    if (!e.selected) continue;
    Result<Entry> d = decode_entry(e.bytes);
    if (!d.ok()) continue;
    const EntryTypeInfo* info = find_entry_type(static_cast<std::uint64_t>(d->type));
    nlohmann::json subjects = nlohmann::json::array();
    for (const SubjectLink& l : d->subjects)
      subjects.push_back(
          {{"subject", to_hex(l.subject)},
           {"previous", l.previous ? nlohmann::json(*l.previous) : nlohmann::json()}});
    nlohmann::json j = {{"index", e.index},
                        {"type", info->name},
                        {"kind", info->audit_kind},
                        {"time", format_time(d->time_us)},
                        {"actor", d->actor},
                        {"subjects", subjects},
                        {"body", cbor::to_json(d->body)},
                        {"leaf_hash", to_hex(merkle::leaf_hash(e.bytes))}};
    if (e.values) j["values"] = cbor::to_json(*e.values);
    out.push_back(std::move(j));
  }
  return out;
}

}  // namespace medgate::ledger
