#include "appliance/hl7/error.h"

namespace medgate::appliance::hl7 {

std::string_view error_code_text(ErrorCode code) {
  switch (code) {
    case ErrorCode::kSegmentSequence:
      return "Segment sequence error";
    case ErrorCode::kRequiredFieldMissing:
      return "Required field missing";
    case ErrorCode::kDataType:
      return "Data type error";
    case ErrorCode::kTableValueNotFound:
      return "Table value not found";
    case ErrorCode::kUnsupportedMessageType:
      return "Unsupported message type";
    case ErrorCode::kUnsupportedEvent:
      return "Unsupported event code";
    case ErrorCode::kUnsupportedProcessingId:
      return "Unsupported processing id";
    case ErrorCode::kUnsupportedVersion:
      return "Unsupported version id";
    case ErrorCode::kUnknownKey:
      return "Unknown key identifier";
    case ErrorCode::kDuplicateKey:
      return "Duplicate key identifier";
    case ErrorCode::kRecordLocked:
      return "Application record locked";
    case ErrorCode::kInternal:
      return "Application internal error";
  }
  return "Application internal error";
}

std::string ErrorLocation::describe() const {
  std::string out;
  if (sequence != 0) {
    out = "segment " + std::to_string(sequence);
    if (!segment.empty()) out += " (" + segment + ")";
  } else {
    out = segment;
  }
  if (out.empty()) return out;
  if (field != 0) out += " field " + std::to_string(field);
  if (repetition != 0) out += " repetition " + std::to_string(repetition);
  if (component != 0) out += " component " + std::to_string(component);
  if (subcomponent != 0) out += " subcomponent " + std::to_string(subcomponent);
  return out;
}

Status Hl7Error::status() const {
  std::string where_text = where.describe();
  if (where_text.empty()) return Status::InvalidArgument(text);
  return Status::InvalidArgument(where_text + ": " + text);
}

}  // namespace medgate::appliance::hl7
