// Erasing a patient: the vault's crash-safe protocol (appliance/vault.h) with the ledger's
// patient-erasure entry in the middle.
//
//   vault.begin_erase(p) -> ledger.append(patient-erasure entry) -> vault.finish_erase(p, index)
//
// An erasure that a crash interrupted is finished by finish_pending() at the daemon's start, or by
// asking for the same erasure again. Either way the ledger gets exactly one patient-erasure entry
// per patient: the pending record holds the ledger's size when the erasure began, and the entries
// from there on are searched for one naming the patient before a new one is appended.
//
// The entry: actor = who asked; body {"pseudonym": the 32-byte pseudonym, "reason": as given};
// subjects = the pseudonym. The reason is recorded in clear: it must never carry patient data.
//
// Thread safety: erase() and finish_pending() may be called from any thread; one erasure runs at a
// time. `vault` and `ledger` must outlive this object.
#pragma once

#include <cstdint>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include "appliance/vault.h"
#include "hsm/status.h"
#include "ledger/store.h"

namespace medgate::appliance {

struct ErasureRecord {
  Pseudonym pseudonym;
  std::uint64_t entry = 0;  // the ledger entry that records the erasure
  std::uint64_t erased_us = 0;
};

class PatientErasure {
 public:
  PatientErasure(Vault& vault, ledger::Ledger& ledger) : vault_(vault), ledger_(ledger) {}

  // Erases the patient `patient_id` names. kInvalidArgument for an empty identifier, kNotFound when
  // the vault has no such patient, kFailedPrecondition when the patient was already erased (the
  // message says when, and the entry). An erasure left pending by a crash is finished, keeping the
  // reason and actor it was begun with. Errors from the ledger leave the erasure pending: the
  // patient's data is refused from begin_erase on, and the erasure is finished later.
  Result<ErasureRecord> erase(std::string_view patient_id, const std::string& reason,
                              const std::string& actor);

  // Finishes every pending erasure, oldest first; stops at the first that fails.
  Result<std::vector<ErasureRecord>> finish_pending();

 private:
  Result<ErasureRecord> complete(const PendingErasure& pending, bool entry_may_exist);
  Result<std::optional<std::uint64_t>> find_entry(const PendingErasure& pending);

  Vault& vault_;
  ledger::Ledger& ledger_;
  std::mutex mu_;
};

}  // namespace medgate::appliance
