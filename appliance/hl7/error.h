// Why a message was refused, in the terms an HL7 ACK's ERR segment needs: an HL7 error code
// (table 0357), where in the message (ERR-2, an ERL), and a sentence for a person. The sentence
// names positions ("segment 4 (OBX) field 5"), never content: messages carry PHI.
#pragma once

#include <cstddef>
#include <string>

#include "hsm/status.h"

namespace medgate::appliance::hl7 {

// HL7 table 0357, message error condition codes (ERR-3).
enum class ErrorCode {
  kSegmentSequence = 100,         // no MSH, a segment out of place, a batch miscounted
  kRequiredFieldMissing = 101,    // e.g. MSH-9, MSH-10, PID-3
  kDataType = 102,                // bad encoding characters, a bad number or date/time
  kTableValueNotFound = 103,      // a coded value outside its table (e.g. OBX-2)
  kUnsupportedMessageType = 200,  // MSH-9.1
  kUnsupportedEvent = 201,        // MSH-9.2
  kUnsupportedProcessingId = 202,
  kUnsupportedVersion = 203,
  kUnknownKey = 204,  // e.g. an unknown or revoked sending application
  kDuplicateKey = 205,
  kRecordLocked = 206,
  kInternal = 207,  // the receiver failed (storage, a bug)
};

std::string_view error_code_text(ErrorCode code);  // "Required field missing"

// ERR-2 (ERL): segment id ^ segment sequence ^ field ^ repetition ^ component ^ subcomponent.
// Zero means "not narrowed down to this level". The segment id is empty when the segment has no
// valid id (then only `sequence` says where); both empty/zero means no location at all.
struct ErrorLocation {
  std::string segment;       // "PID"
  std::size_t sequence = 0;  // the segment's 1-based position in the message
  std::size_t field = 0;
  std::size_t repetition = 0;
  std::size_t component = 0;
  std::size_t subcomponent = 0;

  // "segment 4 (OBX) field 5", for error sentences; empty when there is no location.
  std::string describe() const;
  friend bool operator==(const ErrorLocation&, const ErrorLocation&) = default;
};

struct Hl7Error {
  ErrorCode code = ErrorCode::kInternal;
  ErrorLocation where;
  std::string text;  // no PHI; goes to ERR-8, MSA-3 and logs

  // kInvalidArgument with "<location>: <text>" (or just the text when there is no location).
  Status status() const;
};

}  // namespace medgate::appliance::hl7
