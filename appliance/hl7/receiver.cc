#include "appliance/hl7/receiver.h"

#include <utility>

#include "appliance/hl7/message.h"

namespace medgate::appliance::hl7 {
namespace {

// The MSH of a message that failed to parse further down, if the MSH segment alone parses.
std::optional<MessageInfo> header_only(std::string_view text) {
  std::size_t start = text.find_first_not_of("\r\n");
  if (start == std::string_view::npos) return std::nullopt;
  std::string_view first = text.substr(start);
  first = first.substr(0, first.find_first_of("\r\n"));
  Result<Message> msh = parse_message(first);
  if (!msh.ok()) return std::nullopt;
  return read_header(*msh);
}

Received decide(Received r, Disposition disposition, std::string_view control_id,
                std::uint64_t now_us) {
  r.disposition = disposition;
  const Hl7Error* error = r.error ? &*r.error : nullptr;
  if (!r.info) {
    r.ack = build_reject(control_id, now_us, *r.error);
    return r;
  }
  r.send_ack = wants_ack(*r.info, disposition);
  if (r.send_ack) {
    r.ack = build_ack(*r.info, ack_code_for(*r.info, disposition), control_id, now_us, error);
  }
  return r;
}

Received failed(Received r, Disposition disposition, Hl7Error error, std::string_view control_id,
                std::uint64_t now_us) {
  r.error = std::move(error);
  r.observations.clear();
  r.patients.clear();
  return decide(std::move(r), disposition, control_id, now_us);
}

}  // namespace

Received process(ByteView frame, std::string_view control_id, std::uint64_t now_us) {
  Received r;
  std::string_view text(reinterpret_cast<const char*>(frame.data()), frame.size());
  if (is_batch(text)) {
    return failed(std::move(r), Disposition::kReject,
                  {ErrorCode::kSegmentSequence,
                   {},
                   "a batch (FHS/BHS) in one MLLP frame; send one message per frame"},
                  control_id, now_us);
  }
  Hl7Error error;
  Result<Message> message = parse_message(text, &error);
  if (!message.ok()) {
    r.info = header_only(text);
    return failed(std::move(r), Disposition::kReject, std::move(error), control_id, now_us);
  }
  r.info = read_header(*message);
  if (Result<MessageInfo> checked = message_info(*message, &error); !checked.ok()) {
    return failed(std::move(r), Disposition::kReject, std::move(error), control_id, now_us);
  }

  const MessageInfo& info = *r.info;
  if (info.message_type == "ORU") {
    Result<std::vector<Observation>> observations = observations_from_oru(*message, &error);
    if (!observations.ok()) {
      return failed(std::move(r), Disposition::kError, std::move(error), control_id, now_us);
    }
    r.observations = std::move(observations).value();
    for (const Observation& o : r.observations) {
      if (o.patient_id.empty()) {
        const Segment* pid = message->find("PID");
        std::size_t sequence = 0;
        for (std::size_t i = 0; pid != nullptr && i < message->segments().size(); ++i) {
          if (&message->segments()[i] == pid) sequence = i + 1;
        }
        return failed(std::move(r), Disposition::kError,
                      {ErrorCode::kRequiredFieldMissing,
                       {"PID", sequence, 3},
                       "no patient identifier (PID-3) for the observations"},
                      control_id, now_us);
      }
    }
    return decide(std::move(r), Disposition::kAccept, control_id, now_us);
  }
  if (info.message_type == "ADT") {
    Result<std::vector<PatientIdentifier>> ids = patient_ids(*message, &error);
    if (!ids.ok()) {
      return failed(std::move(r), Disposition::kError, std::move(error), control_id, now_us);
    }
    r.patients = std::move(ids).value();
    return decide(std::move(r), Disposition::kAccept, control_id, now_us);
  }
  return failed(std::move(r), Disposition::kError,
                {ErrorCode::kUnsupportedMessageType,
                 {"MSH", 1, 9, 0, 1},
                 "message type not supported (medgate takes ORU^R01 and ADT)"},
                control_id, now_us);
}

Received reject_frame(const Status& framing_error, std::string_view control_id,
                      std::uint64_t now_us) {
  return failed(Received{}, Disposition::kReject,
                {ErrorCode::kSegmentSequence, {}, framing_error.message()}, control_id, now_us);
}

}  // namespace medgate::appliance::hl7
