// One MLLP frame in, what to do about it out: the HL7 half of ingest without any I/O, so the
// listener only moves bytes, commits and sends.
//
//   for (auto& frame : deframer.feed(bytes)) {
//     if (!frame.ok()) { send(encode_frame(reject_frame(frame.status(), id, now).ack)); continue; }
//     Received r = process(*frame, next_control_id(), now);
//     if (r.disposition == Disposition::kAccept) { ...commit r.observations, wait until durable...
//     } if (r.send_ack) send(encode_frame(r.ack));
//   }
//
// The sender's identity (MSH-3/MSH-4 against the device registry) is the caller's check: on an
// unknown or revoked source it answers build_ack(*r.info, ack_code_for(*r.info, kError), ...)
// with ErrorCode::kUnknownKey instead.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "appliance/hl7/ack.h"
#include "appliance/hl7/error.h"
#include "appliance/hl7/oru.h"
#include "appliance/observation.h"
#include "hsm/bytes.h"

namespace medgate::appliance::hl7 {

struct Received {
  Disposition disposition = Disposition::kReject;
  // The header as read, whenever the MSH segment itself was usable (also for most rejects).
  std::optional<MessageInfo> info;
  std::vector<Observation> observations;    // ORU^R01: what to record
  std::vector<PatientIdentifier> patients;  // ADT: PID-3, for the patient index
  std::optional<Hl7Error> error;            // why, for kError and kReject (no PHI)
  // The ACK to send (ER7, not framed). For kAccept it is the AA/CA: send it only once the
  // observations are durable. Empty if and only if send_ack is false.
  std::string ack;
  bool send_ack = true;  // false when enhanced mode's MSH-15 asked for no ACK in this case
};

// Parses the frame as one HL7 message and decides:
//  - AR (CR): not parseable (no MSH, bad encoding characters, a bad segment id), a batch in one
//    frame (send one message per frame), or a required MSH field missing (MSH-9, 10, 11, 12).
//  - AE (CE): valid HL7 that medgate cannot take: a message type other than ORU^R01 and ADT, an
//    ORU whose OBX cannot be read (a bad number, time or ED), an observation without a patient
//    identifier, an ADT without PID-3.
//  - AA (CA): otherwise. An ORU^R01 without OBX is accepted with no observations.
// `control_id` is this ACK's MSH-10 and `now_us` its MSH-7.
Received process(ByteView frame, std::string_view control_id, std::uint64_t now_us);

// The AR for what the deframer refused (a frame over the size limit): no message to read a
// header from, so the defaults of build_reject, with `framing_error`'s message (which names sizes,
// never content) as the text.
Received reject_frame(const Status& framing_error, std::string_view control_id,
                      std::uint64_t now_us);

}  // namespace medgate::appliance::hl7
