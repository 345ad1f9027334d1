// LEDGER-CRITICAL: ledger entries, their types and their canonical encoding (format versions 1
// and 2; new entries are written in version 2).
//
// An entry is one fact the appliance records: who (actor) did or saw what (type + body) when
// (time). Its canonical bytes are a deterministic CBOR map (ledger/cbor.h):
//
//   { 0: 1 (object kind: entry), 1: format version, 2: type, 3: time (microseconds since the
//     Unix epoch, UTC), 4: actor (text), 5: body (map with text keys), 6: subjects (optional) }
//
// Merkle leaf hash = SHA-256(0x00 || these bytes). An entry does not contain its own index, so the
// same entry can be re-proposed at another position (replication) without re-encoding.
//
// Subjects (key 6) make per-subject completeness provable (the audit-export issue): an array of
// [subject, previous] pairs, where subject is a keyed pseudonym (bytes, never a real identifier)
// and previous is the index of that subject's previous entry, or null for its first. Absent when
// an entry is about no subject.
//
// Format versions differ only in what `previous` means:
//   1: `previous` carries no meaning (it was always written as null) and is not checked.
//   2: `previous` is the index of the newest earlier entry (of any version) that names the same
//      subject, or null when there is none. Only the ledger's writer knows indexes, so callers
//      encode an entry without key 6 and the writer appends it (append_subject_links) with the
//      links filled in, from its in-memory map of every subject's latest index. The verifier
//      checks every link of a version-2 entry. Together with the subject map that each version-2
//      signed head commits to (ledger/subject_map.h), this makes a patient's history provably
//      complete: see docs/audit-bundle.md, "Completeness".
//
// Adding an entry type: add it to EntryType with a new number (numbers are never reused), and a row
// to the table in entry.cc with its name, its audit kind and its body check.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "hsm/bytes.h"
#include "hsm/status.h"
#include "ledger/cbor.h"

namespace medgate::ledger {

inline constexpr std::uint64_t kEntryFormatVersion = 2;        // what new entries are written in
inline constexpr std::uint64_t kOldestEntryFormatVersion = 1;  // still read and verified

// Object kinds: key 0 of every canonical map, so that no two kinds of signed or hashed object can
// ever share bytes.
enum class ObjectKind : std::uint64_t {
  kEntry = 1,
  kBlockHeader = 2,
  kSignedHead = 3,
  kKeyTransition = 4,
  kSubjectMapLeaf = 5,       // ledger/subject_map.h
  kAuditBundle = 6,          // ledger/audit_bundle.h
  kMembershipStatement = 7,  // ledger/membership.h
  kBlockRecord = 8,          // ledger/block_record.h (replication)
};

enum class EntryType : std::uint32_t {
  kGenesis = 1,      // the ledger's first entry: its id and the key that signs its heads
  kAdminAction = 2,  // a state-changing admin call: operation and arguments (no PHI)
  kKeyEvent = 3,     // a key registered, rotated or retired
  // A patient's data key destroyed (crypto-shredding): {"pseudonym": bytes(32), "reason": text,
  // possibly empty}; its subject link names the same pseudonym.
  kPatientErasure = 4,
  kKeyTransition = 5,  // the signing key rotated: old and new key, each signing the statement in
                       // block.h; heads covering it and everything after are signed by the new key
  // A device's reading, encrypted under the patient's data key by the vault: {"source": "hl7" |
  // "coap", "device": text, "message_id": text (HL7 MSH-10; may be empty), "ciphertext": bytes};
  // its subject link names the patient's pseudonym. The ledger commits to the ciphertext, never to
  // a plain value.
  kObservation = 6,
  // A change to the device registry: {"event": "add" | "bind" | "revoke" | "rotate-psk",
  // "device": text, "kind": "coap" | "hl7", "hl7_application": text, "hl7_facility": text, and
  // in a cluster "psk_sealed": bytes (a new PSK sealed for the members under the key derived from
  // the cluster's secret, appliance/vault.h)}; a bound patient is the entry's subject (its
  // pseudonym). No key or PSK is ever in it in clear.
  kDeviceEvent = 7,
  // A patient-administration message (HL7 ADT) indexed the patient: {"source": text, "device":
  // text, "message_id": text, "event": text ("ADT^A01")}; its subjects are the pseudonyms of the
  // identifiers the message gave (PID-3), never the identifiers.
  kPatientEvent = 8,
  // A version of the hospital's consent rules deployed: {"version": uint (1, 2, ...), "text":
  // text (the Cedar policies exactly as deployed), "sha256": bytes(32) of the text}. Rules name
  // roles, categories and purposes, never patients.
  kRulesVersion = 9,
  // The directory of principals (practitioners, roles, organizations, wards) replaced:
  // {"version": uint, "entities": text (Cedar's JSON entity format, as imported), "sha256":
  // bytes(32) of the text}. No patient is in it.
  kDirectoryImport = 10,
  // A patient's consent: {"grant": text (its id), "to": text (a Cedar entity), "data": text (a
  // category), "purpose": text (a FHIR purpose of use), "until": uint (µs) or absent, "policy":
  // text (the Cedar policy it became), and, when the patient signed it, "document": bytes (what
  // they signed) and "signature": bytes}; its subject is the patient's pseudonym.
  kConsentGrant = 11,
  // A consent withdrawn: {"grant": text, and "document"/"signature" when the patient signed the
  // withdrawal}; its subject is the patient's pseudonym.
  kConsentRevoke = 12,
  // An access decision, permit or deny: {"principal": text, "action": text, "purpose": text,
  // "data": text (category), "decision": "allow" | "deny", "policies": [text] (the determining
  // policy ids), "errors": [text] (ids of policies that errored), "break_glass": bool,
  // "reason": bytes (the requester's reason, encrypted under the patient's data key; absent when
  // none was given), "state": uint (the ledger index of the newest rules/directory/consent entry
  // the decision saw), "returned": uint (observations returned)}; its subject is the patient's
  // pseudonym.
  kAccessDecision = 13,
  // A patient enrolled a public key for signing consent documents: {"public_key": bytes
  // (SubjectPublicKeyInfo DER), "key_id": bytes(32), SHA-256 of it}; its subject is the patient's
  // pseudonym. A later enrolment replaces the key.
  kPatientKey = 14,
  // Replicated ledgers' membership (ledger/membership.h): a proposal to add or remove a member,
  // {"statement": bytes, "member": text, "signature": bytes}, and a member's approval of one,
  // {"proposal": bytes(32), "member": text, "signature": bytes}.
  kMemberProposal = 15,
  kMemberApproval = 16,
  // The cluster's shared secret sealed to one member's key-agreement key (ledger/membership.h,
  // "Key shares"): {"member": text, "agreement_key": bytes(32) (its key id), "secret": bytes(32)
  // (the secret's id, a commitment), "box": bytes (hsm/sealed_box.h)}. Only that member's HSM/TPM
  // can open the box.
  kKeyShare = 17,
};

struct EntryTypeInfo {
  EntryType type;
  std::string_view name;  // "genesis", shown by medctl and used in --kind filters
  // The audit-export category (medctl audit export --kind): "ingest", "access", "consent",
  // "rules", "device", "admin", "key" or "erasure". A label only: it is not encoded.
  std::string_view audit_kind;
  Status (*check_body)(const cbor::Value& body);
};

// nullptr for a type this build does not know.
const EntryTypeInfo* find_entry_type(std::uint64_t type);
const EntryTypeInfo* find_entry_type(std::string_view name);

struct SubjectLink {
  Bytes subject;                          // a keyed pseudonym
  std::optional<std::uint64_t> previous;  // index of the subject's previous entry
  friend bool operator==(const SubjectLink&, const SubjectLink&) = default;
};

struct Entry {
  std::uint64_t version = kEntryFormatVersion;  // 1 or 2; see the top of this file
  EntryType type = EntryType::kAdminAction;
  std::uint64_t time_us = 0;
  std::string actor;  // "system:medgated", "user:alice", "uid:1234"
  cbor::Value body;   // a map with text keys; checked per type
  std::vector<SubjectLink> subjects;
  friend bool operator==(const Entry&, const Entry&) = default;
};

// Checks the entry (known type, non-empty actor, body shape, version 1 or 2) and encodes it, with
// its subject links as given. kInvalidArgument names what is wrong.
Result<Bytes> encode_entry(const Entry& entry);

// The same without key 6, whatever entry.subjects holds: what a caller's thread encodes before
// the writer, which knows the indexes, appends the links.
Result<Bytes> encode_entry_without_subjects(const Entry& entry);
// Turns the bytes of encode_entry_without_subjects into those of the entry with `links` (non-empty,
// no empty subject) as key 6: the map grows from 6 to 7 keys (one header byte, 0xa6 -> 0xa7) and
// key 6, the largest, is appended, so the result is canonical and equal to encode_entry's.
Status append_subject_links(Bytes& bytes, std::span<const SubjectLink> links);

// Strict decode: canonical CBOR, the right object kind and version, known keys only, a known type
// whose body passes its check. kCorruption names the problem.
Result<Entry> decode_entry(ByteView bytes);

// The part of decode_entry that needs no allocation: every byte checked for canonical form, the
// kind, version, type, time, actor and subject links read, the body checked to be a map with text
// keys but not against its type's rules. The views point into `bytes`. This is what the verifier
// runs on every entry; decode_entry adds the body.
struct EntryHeader {
  const EntryTypeInfo* info = nullptr;
  std::uint64_t version = kEntryFormatVersion;
  EntryType type = EntryType::kAdminAction;
  std::uint64_t time_us = 0;
  std::string_view actor;
  ByteView body;      // the body's canonical encoding
  ByteView subjects;  // empty when the entry has no subject links
};
Result<EntryHeader> read_entry_header(ByteView bytes);

// Reads the subject links of a header's `subjects` view (already checked by read_entry_header).
// Calls f(subject, previous) for each, in order.
Status for_each_subject_link(
    ByteView subjects,
    const std::function<void(ByteView subject, std::optional<std::uint64_t> previous)>& f);

// Microseconds since the Unix epoch, now.
std::uint64_t now_us();
// RFC 3339 UTC with microseconds: "2026-11-25T17:03:04.123456Z".
std::string format_time(std::uint64_t time_us);
// Accepts RFC 3339 with 'Z' or a numeric offset and optional fraction.
std::optional<std::uint64_t> parse_time(std::string_view rfc3339);

}  // namespace medgate::ledger
