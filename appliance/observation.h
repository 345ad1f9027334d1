// What ingest makes of a device's message, whatever it spoke (HL7 v2 ORU, CoAP/SenML): one
// measurement for one patient. Observations are PHI. They go to the vault (encrypted under the
// patient's data key) and only their ciphertext reaches the ledger; nothing here is ever logged.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <variant>

#include "hsm/bytes.h"

namespace medgate::appliance {

struct Observation {
  // The patient as the source names them: HL7 PID-3 (first identifier, "ID^^^AUTHORITY" reduced
  // to "AUTHORITY:ID" when an assigning authority is given), or the patient a CoAP device is bound
  // to. Empty when the source gave none (the caller decides whether that is an error).
  std::string patient_id;
  // Instead of patient_id, in a cluster: the keyed pseudonym of a patient this member knows only
  // by pseudonym (a CoAP device bound at another member).
  std::optional<Hash> patient_pseudonym;
  // What was measured: an IEEE 11073 MDC code, a LOINC code or a SenML name, with its system
  // ("MDC", "LN", another HL7 coding system, or "SenML").
  std::string code;
  std::string code_system;
  std::string display;  // the code's text, if the source gave one (HL7 OBX-3.2)
  // The value: a number, a string, a boolean or opaque data (SenML vd / HL7 ED).
  std::variant<std::monostate, double, std::string, bool, Bytes> value;
  std::string unit;  // UCUM or MDC unit as sent ("bpm", "%", "MDC_DIM_BEAT_PER_MIN")
  // When it was measured (µs since the Unix epoch, UTC); 0 when the source gave no time (the
  // receiver then uses the time of receipt).
  std::uint64_t time_us = 0;
  std::string device_id;  // the measuring device as the source names it (OBX-18, SenML bn)
  std::string status;     // HL7 OBX-11 result status ("F", "R", ...), empty for SenML

  friend bool operator==(const Observation&, const Observation&) = default;
};

}  // namespace medgate::appliance
