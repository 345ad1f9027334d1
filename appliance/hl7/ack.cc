#include "appliance/hl7/ack.h"

#include <chrono>

#include <fmt/format.h>

namespace medgate::appliance::hl7 {
namespace {

// Fields echoed as sent keep their escapes and separators; only bytes that would break the
// segment or the MLLP frame (CR, LF, 0x0B, 0x1C, ...) are written as \Xhh\.
std::string echo(std::string_view raw, const Delimiters& d) {
  std::string out;
  out.reserve(raw.size());
  for (char c : raw) {
    auto u = static_cast<unsigned char>(c);
    if (u < 0x20 || u == 0x7F) {
      out += fmt::format("{}X{:02X}{}", d.escape, u, d.escape);
    } else {
      out.push_back(c);
    }
  }
  return out;
}

std::string format_time(std::uint64_t time_us) {
  if (time_us == 0) return "";
  using namespace std::chrono;
  sys_seconds t{seconds(static_cast<std::int64_t>(time_us / 1'000'000))};
  sys_days day = floor<days>(t);
  year_month_day ymd{day};
  hh_mm_ss hms{t - day};
  return fmt::format("{:04}{:02}{:02}{:02}{:02}{:02}+0000", static_cast<int>(ymd.year()),
                     static_cast<unsigned>(ymd.month()), static_cast<unsigned>(ymd.day()),
                     hms.hours().count(), hms.minutes().count(), hms.seconds().count());
}

// ERL: segment ^ sequence ^ field ^ repetition ^ component ^ subcomponent, up to the last level
// that is given.
std::string error_location(const ErrorLocation& where, const Delimiters& d) {
  if (where.segment.empty()) return "";
  std::size_t parts[] = {where.sequence, where.field, where.repetition, where.component,
                         where.subcomponent};
  std::size_t last = 0;
  for (std::size_t i = 0; i < 5; ++i) {
    if (parts[i] != 0) last = i + 1;
  }
  std::string out = encode_escapes(where.segment, d);
  for (std::size_t i = 0; i < last; ++i) {
    out.push_back(d.component);
    if (parts[i] != 0) out += std::to_string(parts[i]);
  }
  return out;
}

}  // namespace

std::string_view ack_code_name(AckCode code) {
  switch (code) {
    case AckCode::kAA:
      return "AA";
    case AckCode::kAE:
      return "AE";
    case AckCode::kAR:
      return "AR";
    case AckCode::kCA:
      return "CA";
    case AckCode::kCE:
      return "CE";
    case AckCode::kCR:
      return "CR";
  }
  return "AR";
}

AckCode ack_code_for(const MessageInfo& received, Disposition disposition) {
  bool enhanced = received.enhanced_mode();
  switch (disposition) {
    case Disposition::kAccept:
      return enhanced ? AckCode::kCA : AckCode::kAA;
    case Disposition::kError:
      return enhanced ? AckCode::kCE : AckCode::kAE;
    case Disposition::kReject:
      return enhanced ? AckCode::kCR : AckCode::kAR;
  }
  return AckCode::kAR;
}

bool wants_ack(const MessageInfo& received, Disposition disposition) {
  if (!received.enhanced_mode()) return true;
  const std::string& when = received.accept_ack_type;
  if (when == "NE") return false;
  if (when == "ER") return disposition != Disposition::kAccept;
  if (when == "SU") return disposition == Disposition::kAccept;
  return true;  // AL, empty, or a value outside table 0155: answer rather than stay silent
}

std::string build_ack(const MessageInfo& received, AckCode code, std::string_view control_id,
                      std::uint64_t time_us, const Hl7Error* error) {
  const Delimiters& d = received.delimiters;
  const char f = d.field;
  const char c = d.component;
  std::string trigger = encode_escapes(received.trigger_event, d);
  std::string out;
  out.reserve(256);
  out += "MSH";
  out += f;
  out += d.encoding_characters();
  for (const std::string* raw :
       {&received.raw_receiving_application, &received.raw_receiving_facility,
        &received.raw_sending_application, &received.raw_sending_facility}) {
    out += f;
    out += echo(*raw, d);
  }
  out += f;
  out += format_time(time_us);
  out += f;  // MSH-8 security
  out += f;
  out += "ACK";
  if (!trigger.empty()) {
    out += c;
    out += trigger;
    out += c;
    out += "ACK";
  }
  out += f;
  out += encode_escapes(control_id, d);
  out += f;
  out += received.processing_id.empty() ? "P" : encode_escapes(received.processing_id, d);
  out += f;
  out += received.version.empty() ? "2.5.1" : encode_escapes(received.version, d);
  if (received.enhanced_mode() || !received.charset.empty()) {
    out += std::string(3, f);  // past MSH-13 and 14, to MSH-15
    if (received.enhanced_mode()) out += "NE";
    out += f;
    if (received.enhanced_mode()) out += "NE";
    if (!received.charset.empty()) {
      out += f;  // MSH-17
      out += f;
      out += encode_escapes(received.charset, d);
    }
  }
  out += '\r';

  out += "MSA";
  out += f;
  out += ack_code_name(code);
  out += f;
  out += echo(received.raw_control_id, d);
  if (error != nullptr) {
    out += f;
    out += encode_escapes(error->text, d);
  }
  out += '\r';

  if (error != nullptr) {
    out += "ERR";
    out += f;  // ERR-1 (before v2.5)
    out += f;
    out += error_location(error->where, d);
    out += f;
    out += std::to_string(static_cast<int>(error->code));
    out += c;
    out += encode_escapes(error_code_text(error->code), d);
    out += c;
    out += "HL70357";
    out += f;
    out += "E";
    out += std::string(4, f);  // ERR-5, 6, 7
    out += encode_escapes(error->text, d);
    out += '\r';
  }
  return out;
}

std::string build_reject(std::string_view control_id, std::uint64_t time_us,
                         const Hl7Error& error) {
  MessageInfo defaults;
  defaults.processing_id = "P";
  defaults.version = "2.5.1";
  return build_ack(defaults, AckCode::kAR, control_id, time_us, &error);
}

}  // namespace medgate::appliance::hl7
