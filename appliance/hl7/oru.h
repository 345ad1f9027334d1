// What medgate reads out of a parsed HL7 message: the header (who sent what, and how to answer),
// observations from ORU^R01 (lab results and IHE PCD-01 device reports) and patient identifiers
// from ADT. Everything returned except MessageInfo is PHI.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "appliance/hl7/error.h"
#include "appliance/hl7/message.h"
#include "appliance/observation.h"
#include "hsm/status.h"

namespace medgate::appliance::hl7 {

// MSH, read. The decoded fields are for decisions and logs (they identify systems, not
// patients); the raw_ ones are the fields as sent, escapes and all, which an ACK echoes.
struct MessageInfo {
  Delimiters delimiters;
  std::string sending_application;    // MSH-3.1 (HD namespace id), else MSH-3.2 (universal id)
  std::string sending_facility;       // MSH-4, likewise
  std::string receiving_application;  // MSH-5
  std::string receiving_facility;     // MSH-6
  std::string message_type;           // MSH-9.1, "ORU"
  std::string trigger_event;          // MSH-9.2, "R01"
  std::string message_structure;      // MSH-9.3, "ORU_R01" (often absent)
  std::string control_id;             // MSH-10
  std::string processing_id;          // MSH-11.1: "P", "D" or "T"
  std::string version;                // MSH-12.1: "2.5.1"
  std::string accept_ack_type;        // MSH-15: "AL", "NE", "ER", "SU"; empty in original mode
  std::string application_ack_type;   // MSH-16, likewise
  std::string charset;                // MSH-18 first repetition; empty means ASCII (or unsaid)

  std::string raw_sending_application, raw_sending_facility;
  std::string raw_receiving_application, raw_receiving_facility;
  std::string raw_control_id;

  // Enhanced acknowledgement mode (commit ACKs CA/CE/CR) when MSH-15 or MSH-16 is valued.
  bool enhanced_mode() const { return !accept_ack_type.empty() || !application_ack_type.empty(); }
};

// Reads MSH without judging it: absent fields are empty. Use this to answer a message that
// message_info refuses.
MessageInfo read_header(const Message& message);

// read_header, then checks what every message must have: MSH-9.1 and MSH-9.2 (101), MSH-10
// (101), MSH-11 (101) and MSH-12 (101).
Result<MessageInfo> message_info(const Message& message, Hl7Error* error = nullptr);

// HL7 DTM/TS (YYYY[MM[DD[HH[MM[SS[.S+]]]]]][+/-ZZZZ]) as µs since the Unix epoch, UTC. Without an
// offset the time is taken as UTC: a local time without its zone cannot be placed, and UTC is
// what a box that records in UTC can at least say it assumed. Fractions beyond µs are cut.
// Refuses (kInvalidArgument, no content in the message) other shapes, impossible dates and times
// before 1970.
Result<std::uint64_t> parse_dtm(std::string_view dtm);

// A bound on what one message may expand to (each Observation costs far more memory than the
// "~" that made it): beyond it observations_from_oru refuses the message (207).
inline constexpr std::size_t kMaxObservationsPerMessage = 10000;

// One Observation per OBX (per repetition of OBX-5 when it repeats), of an ORU^R01 (MSH-9 ORU,
// R01; other ORU events are refused with 201, other types with 200). Each OBX is read in the
// context of the PID and OBR before it:
//   patient_id  PID-3 first repetition, "AUTHORITY:ID" when CX-4 (HD namespace, else universal
//               id) is valued, else the ID; empty when there is no PID or PID-3 is empty (the
//               caller decides: that is an AE for ingest).
//   code, display, code_system   OBX-3.1, .2, .3 (CE/CWE)
//   value       by OBX-2: NM -> double (HL7 NM: optional sign, digits, optional point; else 102);
//               CWE/CE/CNE/CF -> component 1 (else 2) as a string; ED -> bytes from ED-5 by
//               ED-4 (Base64, Hex, else as sent; undecodable: 102); ST, TX, FT and anything else
//               -> the whole repetition with escapes decoded, as a string. Empty OBX-5 -> no value
//               (std::monostate), still one Observation.
//   unit        OBX-6.1, else OBX-6.2
//   time_us     OBX-14, else OBR-7 of the OBR before it, else 0 (unparseable: 102)
//   device_id   OBX-18 first repetition: EI-1, else EI-3 (the universal id)
//   status      OBX-11
Result<std::vector<Observation>> observations_from_oru(const Message& message,
                                                       Hl7Error* error = nullptr);

struct PatientIdentifier {
  std::string id;         // CX-1
  std::string authority;  // CX-4: HD namespace id, else universal id
  std::string type;       // CX-5: "MR", "PI", ...
  // "AUTHORITY:ID", or ID without an authority: the form Observation::patient_id uses.
  std::string qualified() const;
  friend bool operator==(const PatientIdentifier&, const PatientIdentifier&) = default;
};

// Every repetition of PID-3 with an ID (ADT^A01, A04, A08, ... or any message with a PID). No PID
// is 100; a PID-3 without any ID is 101.
Result<std::vector<PatientIdentifier>> patient_ids(const Message& message,
                                                   Hl7Error* error = nullptr);

}  // namespace medgate::appliance::hl7
