// HL7 acknowledgements (ACK) in ER7: MSH, MSA and, for an error, ERR.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "appliance/hl7/error.h"
#include "appliance/hl7/oru.h"

namespace medgate::appliance::hl7 {

// MSA-1. Original mode answers AA/AE/AR; enhanced mode (MSH-15/16 valued) commit ACKs CA/CE/CR.
enum class AckCode { kAA, kAE, kAR, kCA, kCE, kCR };
std::string_view ack_code_name(AckCode code);  // "AA"

// What the receiver made of a message: accepted (once durable), valid but not processable (AE),
// or not parseable as HL7 at all (AR).
enum class Disposition { kAccept, kError, kReject };

// The MSA-1 for a disposition in the message's acknowledgement mode.
AckCode ack_code_for(const MessageInfo& received, Disposition disposition);
// Whether the sender asked for an ACK in this case: always in original mode; in enhanced mode as
// MSH-15 says (AL or empty: always, NE: never, ER: only on error, SU: only on success).
bool wants_ack(const MessageInfo& received, Disposition disposition);

// An ACK to `received`, in its delimiters and charset (MSH-18 echoed):
//   MSH-3..6  the received MSH-5, 6, 3, 4 (sender and receiver swapped), as sent
//   MSH-7     `time_us` as YYYYMMDDHHMMSS+0000 (empty when 0)
//   MSH-9     ACK^<received trigger>^ACK;  MSH-10 `control_id`
//   MSH-11/12 the received processing id and version ("P", "2.5.1" when they are empty)
//   MSH-15/16 NE/NE in enhanced mode, so the sender does not acknowledge the ACK
//   MSA       `code`, the received MSH-10 as sent, and for an error its text (MSA-3)
//   ERR       when `error` is given: ERR-2 its location, ERR-3 code^text^HL70357, ERR-4 "E",
//             ERR-8 its text.
// Text written by medgate is escaped; fields echoed as sent have only control bytes escaped.
// Segments end in CR. `error` may be null for an accepting ACK.
std::string build_ack(const MessageInfo& received, AckCode code, std::string_view control_id,
                      std::uint64_t time_us, const Hl7Error* error = nullptr);

// An AR for input without a usable MSH (no MSH, bad encoding characters): default delimiters
// "|^~\&", empty MSH-3..6 and MSA-2, version 2.5.1.
std::string build_reject(std::string_view control_id, std::uint64_t time_us, const Hl7Error& error);

}  // namespace medgate::appliance::hl7
