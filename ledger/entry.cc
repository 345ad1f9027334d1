// LEDGER-CRITICAL: see entry.h. The encoding written here is the one that is hashed.
#include "ledger/entry.h"

#include "ledger/membership.h"

#include <chrono>
#include <cstdio>
#include <ctime>

#include <fmt/format.h>

namespace medgate::ledger {
namespace {

Status require_text(const cbor::Value& body, std::string_view key) {
  const cbor::Value* v = body.find(key);
  if (!v || !v->as_text() || v->as_text()->empty())
    return Status::InvalidArgument(fmt::format("body needs a non-empty text \"{}\"", key));
  return Status::Ok();
}

Status require_bytes(const cbor::Value& body, std::string_view key, std::size_t size) {
  const cbor::Value* v = body.find(key);
  if (!v || !v->as_bytes() || (size && v->as_bytes()->size() != size))
    return Status::InvalidArgument(size ? fmt::format("body needs \"{}\" as {} bytes", key, size)
                                        : fmt::format("body needs \"{}\" as bytes", key));
  return Status::Ok();
}

Status check_genesis(const cbor::Value& body) {
  MEDGATE_RETURN_IF_ERROR(require_text(body, "ledger_id"));
  MEDGATE_RETURN_IF_ERROR(require_bytes(body, "key_id", 32));
  MEDGATE_RETURN_IF_ERROR(require_bytes(body, "public_key", 0));
  return Status::Ok();
}

Status check_admin_action(const cbor::Value& body) {
  MEDGATE_RETURN_IF_ERROR(require_text(body, "op"));
  if (const cbor::Value* args = body.find("args"); args && !args->as_map())
    return Status::InvalidArgument("body \"args\" must be a map");
  return Status::Ok();
}

Status check_key_event(const cbor::Value& body) {
  MEDGATE_RETURN_IF_ERROR(require_text(body, "event"));
  MEDGATE_RETURN_IF_ERROR(require_bytes(body, "key_id", 32));
  return Status::Ok();
}

Status check_key_transition(const cbor::Value& body) {
  MEDGATE_RETURN_IF_ERROR(require_bytes(body, "old_key_id", 32));
  MEDGATE_RETURN_IF_ERROR(require_bytes(body, "new_key_id", 32));
  MEDGATE_RETURN_IF_ERROR(require_bytes(body, "new_public_key", 0));
  MEDGATE_RETURN_IF_ERROR(require_bytes(body, "old_signature", 0));
  MEDGATE_RETURN_IF_ERROR(require_bytes(body, "new_signature", 0));
  return Status::Ok();
}

Status check_patient_erasure(const cbor::Value& body) {
  MEDGATE_RETURN_IF_ERROR(require_bytes(body, "pseudonym", 32));
  const cbor::Value* reason = body.find("reason");
  if (!reason || !reason->as_text())
    return Status::InvalidArgument("body needs a text \"reason\" (it may be empty)");
  return Status::Ok();
}

Status check_observation(const cbor::Value& body) {
  MEDGATE_RETURN_IF_ERROR(require_text(body, "source"));
  MEDGATE_RETURN_IF_ERROR(require_text(body, "device"));
  const cbor::Value* id = body.find("message_id");
  if (!id || !id->as_text())
    return Status::InvalidArgument("body needs a text \"message_id\" (may be empty)");
  MEDGATE_RETURN_IF_ERROR(require_bytes(body, "ciphertext", 0));
  return Status::Ok();
}

Status require_text_array(const cbor::Value& body, std::string_view key);

Status check_device_event(const cbor::Value& body) {
  MEDGATE_RETURN_IF_ERROR(require_text(body, "event"));
  MEDGATE_RETURN_IF_ERROR(require_text(body, "device"));
  MEDGATE_RETURN_IF_ERROR(require_text(body, "kind"));
  // An HL7 source's address allow-list (absent: any address).
  if (body.find("allow")) MEDGATE_RETURN_IF_ERROR(require_text_array(body, "allow"));
  // In a cluster, a new PSK sealed for the members (never in clear).
  if (body.find("psk_sealed")) {
    const cbor::Value* v = body.find("psk_sealed");
    if (!v->as_bytes() || v->as_bytes()->size() < 29 || v->as_bytes()->size() > 512)
      return Status::InvalidArgument("body \"psk_sealed\" must be 29 to 512 bytes");
  }
  return Status::Ok();
}

Status check_patient_event(const cbor::Value& body) {
  MEDGATE_RETURN_IF_ERROR(require_text(body, "source"));
  MEDGATE_RETURN_IF_ERROR(require_text(body, "device"));
  MEDGATE_RETURN_IF_ERROR(require_text(body, "event"));
  const cbor::Value* id = body.find("message_id");
  if (!id || !id->as_text())
    return Status::InvalidArgument("body needs a text \"message_id\" (may be empty)");
  return Status::Ok();
}

Status require_uint(const cbor::Value& body, std::string_view key) {
  const cbor::Value* v = body.find(key);
  if (!v || !v->as_uint())
    return Status::InvalidArgument(fmt::format("body needs an unsigned integer \"{}\"", key));
  return Status::Ok();
}

Status optional_signature(const cbor::Value& body) {
  const cbor::Value* doc = body.find("document");
  const cbor::Value* sig = body.find("signature");
  if (!doc && !sig) return Status::Ok();
  MEDGATE_RETURN_IF_ERROR(require_bytes(body, "document", 0));
  MEDGATE_RETURN_IF_ERROR(require_bytes(body, "signature", 0));
  return Status::Ok();
}

Status check_rules_version(const cbor::Value& body) {
  MEDGATE_RETURN_IF_ERROR(require_uint(body, "version"));
  const cbor::Value* text = body.find("text");
  if (!text || !text->as_text()) return Status::InvalidArgument("body needs a text \"text\"");
  return require_bytes(body, "sha256", 32);
}

Status check_directory_import(const cbor::Value& body) {
  MEDGATE_RETURN_IF_ERROR(require_uint(body, "version"));
  MEDGATE_RETURN_IF_ERROR(require_text(body, "entities"));
  return require_bytes(body, "sha256", 32);
}

Status check_consent_grant(const cbor::Value& body) {
  for (std::string_view key : {"grant", "to", "data", "purpose", "policy"})
    MEDGATE_RETURN_IF_ERROR(require_text(body, key));
  if (body.find("until")) MEDGATE_RETURN_IF_ERROR(require_uint(body, "until"));
  return optional_signature(body);
}

Status check_consent_revoke(const cbor::Value& body) {
  MEDGATE_RETURN_IF_ERROR(require_text(body, "grant"));
  return optional_signature(body);
}

Status require_text_array(const cbor::Value& body, std::string_view key) {
  const cbor::Value* v = body.find(key);
  const cbor::Array* a = v ? v->as_array() : nullptr;
  if (!a) return Status::InvalidArgument(fmt::format("body needs an array \"{}\"", key));
  for (const cbor::Value& item : *a)
    if (!item.as_text())
      return Status::InvalidArgument(fmt::format("body \"{}\" must hold texts", key));
  return Status::Ok();
}

Status check_access_decision(const cbor::Value& body) {
  for (std::string_view key : {"principal", "action", "purpose", "data", "decision"})
    MEDGATE_RETURN_IF_ERROR(require_text(body, key));
  const std::string* d = body.find("decision")->as_text();
  if (*d != "allow" && *d != "deny")
    return Status::InvalidArgument("body \"decision\" must be \"allow\" or \"deny\"");
  MEDGATE_RETURN_IF_ERROR(require_text_array(body, "policies"));
  MEDGATE_RETURN_IF_ERROR(require_text_array(body, "errors"));
  const cbor::Value* bg = body.find("break_glass");
  if (!bg || !bg->as_bool()) return Status::InvalidArgument("body needs a bool \"break_glass\"");
  if (body.find("reason")) MEDGATE_RETURN_IF_ERROR(require_bytes(body, "reason", 0));
  MEDGATE_RETURN_IF_ERROR(require_uint(body, "state"));
  return require_uint(body, "returned");
}

Status check_patient_key(const cbor::Value& body) {
  MEDGATE_RETURN_IF_ERROR(require_bytes(body, "public_key", 0));
  return require_bytes(body, "key_id", 32);
}

constexpr EntryTypeInfo kEntryTypes[] = {
    {EntryType::kGenesis, "genesis", "admin", check_genesis},
    {EntryType::kAdminAction, "admin-action", "admin", check_admin_action},
    {EntryType::kKeyEvent, "key-event", "key", check_key_event},
    {EntryType::kKeyTransition, "key-transition", "key", check_key_transition},
    {EntryType::kObservation, "observation", "ingest", check_observation},
    {EntryType::kDeviceEvent, "device-event", "device", check_device_event},
    {EntryType::kPatientEvent, "patient-event", "ingest", check_patient_event},
    {EntryType::kPatientErasure, "patient-erasure", "erasure", check_patient_erasure},
    {EntryType::kRulesVersion, "rules-version", "rules", check_rules_version},
    {EntryType::kDirectoryImport, "directory-import", "rules", check_directory_import},
    {EntryType::kConsentGrant, "consent-grant", "consent", check_consent_grant},
    {EntryType::kConsentRevoke, "consent-revoke", "consent", check_consent_revoke},
    {EntryType::kAccessDecision, "access-decision", "access", check_access_decision},
    {EntryType::kPatientKey, "patient-key", "consent", check_patient_key},
    {EntryType::kMemberProposal, "member-proposal", "admin", check_member_proposal_body},
    {EntryType::kMemberApproval, "member-approval", "admin", check_member_approval_body},
    {EntryType::kKeyShare, "key-share", "key", check_key_share_body},
};

enum Key : std::uint64_t {
  kKind = 0,
  kVersion = 1,
  kType = 2,
  kTime = 3,
  kActor = 4,
  kBody = 5,
  kSubjects = 6,
};

Status check_body(const EntryTypeInfo& info, const cbor::Value& body) {
  const cbor::Map* map = body.as_map();
  if (!map) return Status::InvalidArgument(fmt::format("{} entry body is not a map", info.name));
  for (const auto& [k, v] : *map)
    if (!k.as_text())
      return Status::InvalidArgument(fmt::format("{} entry body has a non-text key", info.name));
  Status s = info.check_body(body);
  if (!s.ok()) return s.with_context(fmt::format("{} entry", info.name));
  return s;
}

}  // namespace

const EntryTypeInfo* find_entry_type(std::uint64_t type) {
  for (const auto& info : kEntryTypes)
    if (static_cast<std::uint64_t>(info.type) == type) return &info;
  return nullptr;
}

const EntryTypeInfo* find_entry_type(std::string_view name) {
  for (const auto& info : kEntryTypes)
    if (info.name == name) return &info;
  return nullptr;
}

Result<Bytes> encode_entry_without_subjects(const Entry& entry) {
  const EntryTypeInfo* info = find_entry_type(static_cast<std::uint64_t>(entry.type));
  if (!info)
    return Status::InvalidArgument(
        fmt::format("unknown entry type {}", static_cast<std::uint32_t>(entry.type)));
  if (entry.version < kOldestEntryFormatVersion || entry.version > kEntryFormatVersion)
    return Status::InvalidArgument(
        fmt::format("entry format version {} is not one this build writes", entry.version));
  if (entry.actor.empty()) return Status::InvalidArgument("entry has no actor");
  MEDGATE_RETURN_IF_ERROR(check_body(*info, entry.body));

  cbor::Writer w;
  w.map_header(6);
  w.uint(kKind);
  w.uint(static_cast<std::uint64_t>(ObjectKind::kEntry));
  w.uint(kVersion);
  w.uint(entry.version);
  w.uint(kType);
  w.uint(static_cast<std::uint64_t>(entry.type));
  w.uint(kTime);
  w.uint(entry.time_us);
  w.uint(kActor);
  w.text(entry.actor);
  w.uint(kBody);
  cbor::encode_to(entry.body, w);
  return w.take();
}

Status append_subject_links(Bytes& bytes, std::span<const SubjectLink> links) {
  // A 6-key map's header is the single byte 0xa6 (major 5, count 6); with key 6 it is 0xa7.
  if (bytes.empty() || bytes[0] != std::byte(0xa6))
    return Status::InvalidArgument("not the bytes of an entry without subject links");
  if (links.empty()) return Status::InvalidArgument("no subject links to append");
  cbor::Writer w;
  w.uint(kSubjects);
  w.array_header(links.size());
  for (const SubjectLink& s : links) {
    if (s.subject.empty()) return Status::InvalidArgument("subject link with an empty subject");
    w.array_header(2);
    w.bytes(s.subject);
    if (s.previous)
      w.uint(*s.previous);
    else
      w.null();
  }
  bytes[0] = std::byte(0xa7);
  const Bytes& tail = w.data();
  bytes.insert(bytes.end(), tail.begin(), tail.end());
  return Status::Ok();
}

Result<Bytes> encode_entry(const Entry& entry) {
  MEDGATE_ASSIGN_OR_RETURN(Bytes bytes, encode_entry_without_subjects(entry));
  if (!entry.subjects.empty()) MEDGATE_RETURN_IF_ERROR(append_subject_links(bytes, entry.subjects));
  return bytes;
}

Status for_each_subject_link(
    ByteView subjects,
    const std::function<void(ByteView subject, std::optional<std::uint64_t> previous)>& f) {
  cbor::Cursor s(subjects);
  MEDGATE_ASSIGN_OR_RETURN(cbor::Cursor::Head list, s.head());
  if (list.major != 4) return Status::Corruption("entry subjects are not an array");
  for (std::uint64_t k = 0; k < list.arg; ++k) {
    MEDGATE_ASSIGN_OR_RETURN(cbor::Cursor::Head pair, s.head());
    if (pair.major != 4 || pair.arg != 2) return Status::Corruption("subject link is not a pair");
    MEDGATE_ASSIGN_OR_RETURN(ByteView subject, s.read_bytes());
    MEDGATE_ASSIGN_OR_RETURN(cbor::Cursor::Head previous, s.head());
    if (previous.major == 0)
      f(subject, previous.arg);
    else
      f(subject, std::nullopt);
  }
  return Status::Ok();
}

Result<EntryHeader> read_entry_header(ByteView bytes) {
  MEDGATE_RETURN_IF_ERROR(cbor::validate(bytes));
  cbor::Cursor c(bytes);
  MEDGATE_ASSIGN_OR_RETURN(cbor::Cursor::Head map, c.head());
  if (map.major != 5) return Status::Corruption("entry is not a CBOR map");
  static constexpr const char* kMissing[] = {"an object kind", "a format version", "a type",
                                             "a time",         "an actor",         "a body"};
  EntryHeader h;
  // Canonical maps have unique keys in ascending order, so the keys of formats 1 and 2 must be 0..5
  // and optionally 6, in that order: the first key out of place names what is missing or extra.
  for (std::uint64_t i = 0; i < map.arg; ++i) {
    Result<std::uint64_t> key = c.read_uint();
    if (!key.ok() || *key > kSubjects)
      return Status::Corruption("entry has a key this format does not define");
    if (*key != i) return Status::Corruption(fmt::format("entry has no {}", kMissing[i]));
    switch (*key) {
      case kKind: {
        Result<std::uint64_t> kind = c.read_uint();
        if (!kind.ok() || *kind != static_cast<std::uint64_t>(ObjectKind::kEntry))
          return Status::Corruption("object is not an entry (key 0)");
        break;
      }
      case kVersion: {
        Result<std::uint64_t> version = c.read_uint();
        if (!version.ok() || *version < kOldestEntryFormatVersion || *version > kEntryFormatVersion)
          return Status::Corruption(
              version.ok()
                  ? fmt::format("entry format version {} is not supported by this build (it "
                                "reads {} to {})",
                                *version, kOldestEntryFormatVersion, kEntryFormatVersion)
                  : "entry format version is not an integer");
        h.version = *version;
        break;
      }
      case kType: {
        Result<std::uint64_t> type = c.read_uint();
        if (!type.ok()) return Status::Corruption("entry type is not an integer");
        h.info = find_entry_type(*type);
        if (!h.info)
          return Status::Corruption(fmt::format("entry type {} is unknown to this build", *type));
        break;
      }
      case kTime: {
        Result<std::uint64_t> time = c.read_uint();
        if (!time.ok()) return Status::Corruption("entry time is not an unsigned integer");
        h.time_us = *time;
        break;
      }
      case kActor: {
        Result<std::string_view> actor = c.read_text();
        if (!actor.ok() || actor->empty()) return Status::Corruption("entry has no actor");
        h.actor = *actor;
        break;
      }
      case kBody: {
        MEDGATE_ASSIGN_OR_RETURN(h.body, c.read_item());
        cbor::Cursor b(h.body);
        MEDGATE_ASSIGN_OR_RETURN(cbor::Cursor::Head body, b.head());
        if (body.major != 5)
          return Status::Corruption(fmt::format("{} entry body is not a map", h.info->name));
        for (std::uint64_t k = 0; k < body.arg; ++k) {
          if (!b.read_text().ok())
            return Status::Corruption(
                fmt::format("{} entry body has a non-text key", h.info->name));
          MEDGATE_RETURN_IF_ERROR(b.read_item().status());
        }
        break;
      }
      case kSubjects: {
        MEDGATE_ASSIGN_OR_RETURN(h.subjects, c.read_item());
        cbor::Cursor s(h.subjects);
        MEDGATE_ASSIGN_OR_RETURN(cbor::Cursor::Head list, s.head());
        if (list.major != 4 || list.arg == 0)
          return Status::Corruption("entry subjects must be a non-empty array");
        for (std::uint64_t k = 0; k < list.arg; ++k) {
          Result<cbor::Cursor::Head> pair = s.head();
          Result<ByteView> subject = pair.ok() && pair->major == 4 && pair->arg == 2
                                         ? s.read_bytes()
                                         : Result<ByteView>(Status::Corruption("not a pair"));
          Result<cbor::Cursor::Head> previous =
              subject.ok() ? s.head() : Result<cbor::Cursor::Head>(subject.status());
          if (!subject.ok() || subject->empty() || !previous.ok() ||
              !(previous->major == 0 || (previous->major == 7 && previous->arg == 22)))
            return Status::Corruption(
                "entry subject link is not [pseudonym, previous index or null]");
        }
        break;
      }
    }
  }
  if (map.arg < kSubjects)
    return Status::Corruption(fmt::format("entry has no {}", kMissing[map.arg]));
  h.type = h.info->type;
  return h;
}

Result<Entry> decode_entry(ByteView bytes) {
  MEDGATE_ASSIGN_OR_RETURN(EntryHeader h, read_entry_header(bytes));
  Entry e;
  e.version = h.version;
  e.type = h.type;
  e.time_us = h.time_us;
  e.actor = std::string(h.actor);
  MEDGATE_ASSIGN_OR_RETURN(e.body, cbor::decode(h.body));
  if (Status s = check_body(*h.info, e.body); !s.ok()) return Status::Corruption(s.message());
  if (!h.subjects.empty()) {
    MEDGATE_ASSIGN_OR_RETURN(cbor::Value subjects, cbor::decode(h.subjects));
    for (const cbor::Value& item : *subjects.as_array()) {
      const cbor::Array& pair = *item.as_array();
      e.subjects.push_back({*pair[0].as_bytes(), pair[1].as_uint()});
    }
  }
  return e;
}

std::uint64_t now_us() {
  return static_cast<std::uint64_t>(std::chrono::duration_cast<std::chrono::microseconds>(
                                        std::chrono::system_clock::now().time_since_epoch())
                                        .count());
}

std::string format_time(std::uint64_t time_us) {
  std::time_t secs = static_cast<std::time_t>(time_us / 1000000);
  std::tm tm{};
  gmtime_r(&secs, &tm);
  return fmt::format("{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z", tm.tm_year + 1900, tm.tm_mon + 1,
                     tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, time_us % 1000000);
}

std::optional<std::uint64_t> parse_time(std::string_view s) {
  // YYYY-MM-DDTHH:MM:SS[.frac](Z|+HH:MM|-HH:MM)
  auto digits = [&](std::size_t pos, std::size_t n) -> std::optional<int> {
    if (pos + n > s.size()) return std::nullopt;
    int v = 0;
    for (std::size_t i = pos; i < pos + n; ++i) {
      if (s[i] < '0' || s[i] > '9') return std::nullopt;
      v = v * 10 + (s[i] - '0');
    }
    return v;
  };
  auto year = digits(0, 4), mon = digits(5, 2), day = digits(8, 2), hour = digits(11, 2),
       min = digits(14, 2), sec = digits(17, 2);
  if (!year || !mon || !day || !hour || !min || !sec || s.size() < 20 || s[4] != '-' ||
      s[7] != '-' || (s[10] != 'T' && s[10] != 't' && s[10] != ' ') || s[13] != ':' || s[16] != ':')
    return std::nullopt;
  if (*mon < 1 || *mon > 12 || *day < 1 || *day > 31 || *hour > 23 || *min > 59 || *sec > 60 ||
      *year < 1970)
    return std::nullopt;
  std::size_t pos = 19;
  std::uint64_t micros = 0;
  if (s[pos] == '.') {
    ++pos;
    int n = 0;
    while (pos < s.size() && s[pos] >= '0' && s[pos] <= '9') {
      if (n < 6) micros = micros * 10 + static_cast<std::uint64_t>(s[pos] - '0');
      ++n;
      ++pos;
    }
    if (n == 0) return std::nullopt;
    for (; n < 6; ++n) micros *= 10;
  }
  long offset = 0;
  if (pos < s.size() && (s[pos] == 'Z' || s[pos] == 'z') && pos + 1 == s.size()) {
  } else if (pos + 6 == s.size() && (s[pos] == '+' || s[pos] == '-') && s[pos + 3] == ':') {
    auto oh = digits(pos + 1, 2), om = digits(pos + 4, 2);
    if (!oh || !om || *oh > 23 || *om > 59) return std::nullopt;
    offset = (*oh * 60 + *om) * 60 * (s[pos] == '+' ? 1 : -1);
  } else {
    return std::nullopt;
  }
  std::tm tm{};
  tm.tm_year = *year - 1900;
  tm.tm_mon = *mon - 1;
  tm.tm_mday = *day;
  tm.tm_hour = *hour;
  tm.tm_min = *min;
  tm.tm_sec = *sec;
  std::time_t t = timegm(&tm);
  long secs = static_cast<long>(t) - offset;
  if (secs < 0) return std::nullopt;
  return static_cast<std::uint64_t>(secs) * 1000000 + micros;
}

}  // namespace medgate::ledger
