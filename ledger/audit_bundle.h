// LEDGER-CRITICAL: the audit bundle, an auditor's signed and self-contained extract of the
// ledger, and its offline verifier. The format is documented with a worked example in
// docs/audit-bundle.md; this header says the contract.
//
// A bundle is one canonical CBOR map (ledger/cbor.h; format version 2):
//
//   { 0: 6 (audit bundle), 1: 2 (version), 2: ledger id, 3: created (µs), 4: exported by (actor),
//     5: the query {"from", "to": µs, "patient": pseudonym, "principal", "kind": text,
//        "include_values": bool; absent filters are absent},
//     6: the bundle head {"head": signed head bytes, "signature": DER},
//     7: earlier heads [{"head", "signature", "consistency": [hash...] to the bundle head}],
//     8: entries [{"index", "bytes" (canonical), "selected": bool,
//        "meta": {"type", "kind", "time", "actor"},
//        "values": decrypted values (only with include_values)}], ascending by index,
//     9: for a patient query, the subject-map proof of the patient's latest entry at the head
//        {"count", "match" | "below" / "above": {"subject", "latest", "position", "path"}},
//     10: the multi-leaf inclusion proof of all the entries in the bundle head (merkle.h,
//        multi_inclusion_proof): its hashes concatenated, 32 bytes each, in canonical order }
//
// Format 1 (still read and verified; written only when asked, for compatibility tests) has no key
// 10 and instead one RFC 9162 inclusion proof per entry record, "proof": [hash...]. Format 2
// carries each proof hash once instead of ~20 per entry: a bundle of every tenth of a million
// entries is 2.25x smaller (44 MiB), and checking its proof hashes 425,001 nodes where walking
// every format-1 path hashes ~2 million (docs/audit-bundle.md).
//
// The entries are the selected ones (those the query matches), the genesis entry and every key
// transition below the head's tree size (the key history), and, for a patient query, the chain
// of the patient's entries from the latest one back past the start of the range. The bundle is
// signed as a whole by the appliance key that signed its head: ECDSA P-256 over SHA-256 of the
// bundle's bytes, DER, kept beside it as FILE.sig, so that stock OpenSSL checks it:
//
//   openssl dgst -sha256 -verify signing-key.pem -signature audit.cbor.sig audit.cbor
//
// All functions here are thread-safe (they share nothing).
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "hsm/bytes.h"
#include "hsm/public_key.h"
#include "hsm/status.h"
#include "ledger/cbor.h"
#include "ledger/entry.h"
#include "ledger/subject_map.h"

namespace medgate::ledger {

class Ledger;

// The format this build writes; it reads 1 and 2.
inline constexpr std::uint64_t kAuditBundleVersion = 2;

// The audit kinds an export can filter on (entry.h, EntryTypeInfo::audit_kind).
inline constexpr std::string_view kAuditKinds[] = {"ingest", "access", "consent", "rules",
                                                   "device", "admin",  "key",     "erasure"};

struct AuditQuery {
  std::optional<std::uint64_t> from_us, to_us;  // inclusive, on the entries' times
  std::optional<Bytes> patient;                 // a pseudonym: entries naming it as a subject
  // Entries whose actor is this, or whose body's "principal" (an access decision) or "to" (a
  // consent grant) is this.
  std::optional<std::string> principal;
  std::optional<std::string> kind;  // one of kAuditKinds
  bool include_values = false;
  friend bool operator==(const AuditQuery&, const AuditQuery&) = default;
};

// Whether `entry` is selected by the query (every filter given must match).
bool audit_query_matches(const AuditQuery& query, const Entry& entry);

struct BundleHead {
  Bytes bytes;                    // canonical signed-head bytes
  Bytes signature;                // DER
  std::vector<Hash> consistency;  // earlier heads only: RFC 9162 proof to the bundle head
};

struct BundleEntry {
  std::uint64_t index = 0;
  Bytes bytes;
  std::vector<Hash> proof;  // format 1 only: this entry's RFC 9162 inclusion proof
  bool selected = false;
  std::optional<cbor::Value> values;  // only with include_values
  // As decoded (a convenience copy of type, kind, time, actor; the encoder derives it from the
  // bytes, the verifier checks it against them).
  cbor::Value meta;
};

struct AuditBundle {
  std::uint64_t version = kAuditBundleVersion;  // 1 or 2
  std::string ledger_id;
  std::uint64_t created_us = 0;
  std::string exported_by;
  AuditQuery query;
  BundleHead head;
  std::vector<BundleHead> earlier_heads;
  std::vector<BundleEntry> entries;
  std::optional<SubjectMapProof> subject_proof;
  // Format 2 only: the multi-leaf inclusion proof of every entry's leaf to the bundle head.
  std::vector<Hash> multi_proof;
};

// The canonical bytes (what is signed; in `bundle.version`'s format, kInvalidArgument for another
// version or for proofs of the other format) and the strict decoder, which reads formats 1 and 2;
// kCorruption names what makes the input not a bundle.
Result<Bytes> encode_audit_bundle(const AuditBundle& bundle);
Result<AuditBundle> decode_audit_bundle(ByteView bytes);

// ---- export (on the appliance) ----

struct AuditExportOptions {
  // With include_values: the decrypted values of a selected entry, or nullopt (none, or erased).
  std::function<Result<std::optional<cbor::Value>>(const Entry& entry)> values;
  // Now and then: (entries looked at, candidates in total), for a progress bar.
  std::function<void(std::uint64_t, std::uint64_t)> progress;
  // The format to write. medgated always writes the current one; 1 is for compatibility tests and
  // for benchmarks that compare the formats.
  std::uint64_t format_version = kAuditBundleVersion;
};

// Builds the bundle for `query` at a newly signed head (unsigned: the caller signs its bytes with
// the head's key). Uses the ledger's indexes: by subject for a patient, by type for a kind, the
// blocks' times for --from.
Result<AuditBundle> build_audit_bundle(Ledger& ledger, const AuditQuery& query,
                                       const std::string& exported_by,
                                       const AuditExportOptions& options = {});

// ---- offline verification ----

struct AuditReport {
  bool ok() const { return problems.empty(); }
  std::vector<std::string> problems;  // each names exactly what fails; empty when it verifies
  std::vector<std::string> notes;     // limits of what was proved (not failures)

  std::uint64_t format_version = 0;  // of the bundle: 1 (a proof per entry) or 2
  std::string ledger_id;
  std::uint64_t created_us = 0;
  std::string exported_by;
  AuditQuery query;
  std::uint64_t tree_size = 0;  // of the bundle head
  std::uint64_t head_time_us = 0;
  Hash root{};
  std::vector<std::string> key_chain;  // hex ids: genesis key, then each transition's new key
  std::string signing_key;             // hex id of the key that signed the head and the bundle
  std::uint64_t entries = 0, selected = 0, earlier_heads = 0;
  // Patient queries: the latest entry about the patient at the head (nullopt: none) and how far
  // back the chain was proved complete.
  bool patient_query = false;
  std::optional<std::uint64_t> patient_latest;
  std::uint64_t chain_entries = 0;
  bool values_included = false;
};

// Checks everything a bundle claims (docs/audit-bundle.md, "What verify checks"), against
// trusted keys only: the bundle signature (over SHA-256 of `bundle_bytes`), the key history, the
// head's signature, every inclusion and consistency proof, every entry's decoding and selection,
// and for a patient query the completeness of the patient's chain. Does not stop at the first
// problem. kCorruption (not a report) when `bundle_bytes` is not an audit bundle at all.
// `progress`, when given, is called now and then with (entries checked, entries in the bundle).
Result<AuditReport> verify_audit_bundle(
    ByteView bundle_bytes, ByteView signature, const std::vector<PublicKey>& trusted_keys,
    const std::function<void(std::uint64_t, std::uint64_t)>& progress = {});
// The same for a bundle the caller decoded already from `bundle_bytes` (decode_audit_bundle), so
// that a caller that also needs the decoded bundle (a rendering) decodes it once.
AuditReport verify_decoded_audit_bundle(
    const AuditBundle& bundle, ByteView bundle_bytes, ByteView signature,
    const std::vector<PublicKey>& trusted_keys,
    const std::function<void(std::uint64_t, std::uint64_t)>& progress = {});

nlohmann::json to_json(const AuditReport& report);
// The selected entries of a bundle as JSON (metadata, body, subjects; values when present).
nlohmann::json bundle_entries_json(const AuditBundle& bundle);

}  // namespace medgate::ledger
