#include "appliance/erasure.h"

#include <fmt/format.h>

#include "ledger/cbor.h"
#include "ledger/entry.h"

namespace medgate::appliance {
namespace {

Result<ledger::Entry> erasure_entry(const PendingErasure& pending) {
  using ledger::cbor::Value;
  ledger::Entry e;
  e.type = ledger::EntryType::kPatientErasure;
  e.actor = pending.request.actor;
  MEDGATE_ASSIGN_OR_RETURN(
      e.body,
      Value::map({{Value::text("pseudonym"), Value::bytes(ByteView(pending.pseudonym.bytes))},
                  {Value::text("reason"), Value::text(pending.request.reason)}}));
  // The subject chain's `previous` link is left null: nothing else about a patient is on the ledger
  // yet (ingest, consent and access decisions come with later issues, and with them the tracking
  // of each subject's latest entry).
  e.subjects.push_back(
      {Bytes(pending.pseudonym.bytes.begin(), pending.pseudonym.bytes.end()), std::nullopt});
  return e;
}

}  // namespace

Result<ErasureRecord> PatientErasure::erase(std::string_view patient_id, const std::string& reason,
                                            const std::string& actor) {
  std::lock_guard lk(mu_);
  MEDGATE_ASSIGN_OR_RETURN(Pseudonym p, vault_.find(patient_id));
  MEDGATE_ASSIGN_OR_RETURN(PatientInfo info, vault_.info(p));
  switch (info.state) {
    case PatientState::kErased:
      return Status::FailedPrecondition(fmt::format(
          "patient {} was already erased at {}{}", p.prefix(),
          ledger::format_time(info.erased_us.value_or(0)),
          info.erasure_entry ? fmt::format(" (ledger entry {})", *info.erasure_entry) : ""));
    case PatientState::kErasePending: {
      MEDGATE_ASSIGN_OR_RETURN(std::vector<PendingErasure> pending, vault_.pending_erasures());
      for (const PendingErasure& e : pending)
        if (e.pseudonym == p) return complete(e, true);
      return Status::Internal(
          fmt::format("patient {} is pending erasure but not listed as pending", p.prefix()));
    }
    case PatientState::kActive: {
      ErasureRequest request{actor, reason, ledger_.stats().tree_size};
      MEDGATE_ASSIGN_OR_RETURN(PendingErasure pending, vault_.begin_erase(p, std::move(request)));
      return complete(pending, false);
    }
  }
  return Status::Internal("unknown patient state");
}

Result<std::vector<ErasureRecord>> PatientErasure::finish_pending() {
  std::lock_guard lk(mu_);
  MEDGATE_ASSIGN_OR_RETURN(std::vector<PendingErasure> pending, vault_.pending_erasures());
  std::vector<ErasureRecord> done;
  for (const PendingErasure& e : pending) {
    Result<ErasureRecord> r = complete(e, true);
    if (!r.ok())
      return r.status().with_context(
          fmt::format("finishing the erasure of patient {}", e.pseudonym.prefix()));
    done.push_back(*r);
  }
  return done;
}

Result<ErasureRecord> PatientErasure::complete(const PendingErasure& pending,
                                               bool entry_may_exist) {
  std::optional<std::uint64_t> index;
  if (entry_may_exist) {
    MEDGATE_ASSIGN_OR_RETURN(index, find_entry(pending));
  }
  if (!index) {
    MEDGATE_ASSIGN_OR_RETURN(ledger::Entry entry, erasure_entry(pending));
    MEDGATE_ASSIGN_OR_RETURN(index, ledger_.append(entry));
  }
  MEDGATE_ASSIGN_OR_RETURN(PatientInfo info, vault_.finish_erase(pending.pseudonym, *index));
  return ErasureRecord{pending.pseudonym, *index, info.erased_us.value_or(0)};
}

Result<std::optional<std::uint64_t>> PatientErasure::find_entry(const PendingErasure& pending) {
  std::uint64_t size = ledger_.stats().tree_size;
  for (std::uint64_t i = pending.request.ledger_size; i < size; ++i) {
    MEDGATE_ASSIGN_OR_RETURN(ledger::StoredEntry e, ledger_.entry(i));
    if (e.entry.type != ledger::EntryType::kPatientErasure) continue;
    const ledger::cbor::Value* p = e.entry.body.find("pseudonym");
    if (p && p->as_bytes() && ByteView(*p->as_bytes()).size() == sizeof(Hash) &&
        std::equal(p->as_bytes()->begin(), p->as_bytes()->end(), pending.pseudonym.bytes.begin()))
      return std::optional<std::uint64_t>(i);
  }
  return std::optional<std::uint64_t>();
}

}  // namespace medgate::appliance
