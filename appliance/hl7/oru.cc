#include "appliance/hl7/oru.h"

#include <algorithm>
#include <charconv>
#include <chrono>
#include <optional>

#include "hsm/bytes.h"

namespace medgate::appliance::hl7 {
namespace {

Status fail(Hl7Error* out, ErrorCode code, ErrorLocation where, std::string text) {
  Hl7Error e{code, std::move(where), std::move(text)};
  Status s = e.status();
  if (out != nullptr) *out = std::move(e);
  return s;
}

bool all_digits(std::string_view s) {
  return std::all_of(s.begin(), s.end(), [](char c) { return c >= '0' && c <= '9'; });
}

int digits_value(std::string_view s) {
  int v = 0;
  for (char c : s) v = v * 10 + (c - '0');
  return v;
}

std::string_view trim_spaces(std::string_view s) {
  std::size_t b = s.find_first_not_of(' ');
  if (b == std::string_view::npos) return {};
  std::size_t e = s.find_last_not_of(' ');
  return s.substr(b, e - b + 1);
}

bool iequals(std::string_view a, std::string_view b) {
  return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin(), [](char x, char y) {
           auto lower = [](char c) { return c >= 'A' && c <= 'Z' ? static_cast<char>(c + 32) : c; };
           return lower(x) == lower(y);
         });
}

// HL7 NM: [+|-] digits [. digits], at least one digit; spaces around are allowed.
std::optional<double> parse_nm(std::string_view s) {
  s = trim_spaces(s);
  if (!s.empty() && s[0] == '+') s.remove_prefix(1);
  std::string_view body = s;
  if (!body.empty() && body[0] == '-') body.remove_prefix(1);
  std::size_t dot = body.find('.');
  std::string_view whole = body.substr(0, dot);
  std::string_view frac = dot == std::string_view::npos ? std::string_view() : body.substr(dot + 1);
  if (whole.size() + frac.size() == 0 || !all_digits(whole) || !all_digits(frac)) {
    return std::nullopt;
  }
  double v = 0;
  auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v, std::chars_format::fixed);
  if (ec != std::errc() || end != s.data() + s.size()) return std::nullopt;
  return v;
}

// An HD (or the HD in a subcomponent): namespace id, else universal id.
std::string hd_name(const Segment& s, std::size_t field, std::size_t rep) {
  std::string v = s.get(field, rep, 1);
  return v.empty() ? s.get(field, rep, 2) : v;
}

PatientIdentifier cx_of(const FieldRepetition& cx) {
  PatientIdentifier p;
  p.id = cx.get(1, 1);
  p.authority = cx.get(4, 1);
  if (p.authority.empty()) p.authority = cx.get(4, 2);
  p.type = cx.get(5, 1);
  return p;
}

}  // namespace

std::string PatientIdentifier::qualified() const {
  return authority.empty() ? id : authority + ":" + id;
}

Result<std::uint64_t> parse_dtm(std::string_view dtm) {
  const Status bad =
      Status::InvalidArgument("not an HL7 date/time (YYYY[MM[DD[HH[MM[SS[.S+]]]]]][+/-ZZZZ])");
  std::size_t sign_at = dtm.find_first_of("+-");
  std::string_view main = dtm.substr(0, sign_at);
  std::string_view offset = sign_at == std::string_view::npos ? "" : dtm.substr(sign_at);
  std::string_view fraction;
  if (std::size_t dot = main.find('.'); dot != std::string_view::npos) {
    fraction = main.substr(dot + 1);
    main = main.substr(0, dot);
    if (fraction.empty() || !all_digits(fraction) || main.size() != 14) return bad;
  }
  if (main.size() < 4 || main.size() > 14 || main.size() % 2 != 0 || !all_digits(main)) return bad;
  auto part = [&](std::size_t at, int otherwise) {
    return main.size() >= at + 2 ? digits_value(main.substr(at, 2)) : otherwise;
  };
  int year = digits_value(main.substr(0, 4));
  int month = part(4, 1), day = part(6, 1), hour = part(8, 0), minute = part(10, 0),
      second = part(12, 0);
  std::chrono::year_month_day date{std::chrono::year(year),
                                   std::chrono::month(static_cast<unsigned>(month)),
                                   std::chrono::day(static_cast<unsigned>(day))};
  if (!date.ok() || hour > 23 || minute > 59 || second > 59) return bad;
  std::int64_t micros = 0;
  for (std::size_t i = 0; i < 6; ++i) {
    micros = micros * 10 + (i < fraction.size() ? fraction[i] - '0' : 0);
  }
  std::int64_t offset_minutes = 0;
  if (!offset.empty()) {
    if (offset.size() != 5 || !all_digits(offset.substr(1))) return bad;
    int oh = digits_value(offset.substr(1, 2)), om = digits_value(offset.substr(3, 2));
    if (oh > 23 || om > 59) return bad;
    offset_minutes = (oh * 60 + om) * (offset[0] == '-' ? -1 : 1);
  }
  std::int64_t days = std::chrono::sys_days(date).time_since_epoch().count();
  std::int64_t seconds = ((days * 24 + hour) * 60 + minute - offset_minutes) * 60 + second;
  if (seconds < 0) return Status::InvalidArgument("an HL7 date/time before 1970");
  return static_cast<std::uint64_t>(seconds) * 1'000'000u + static_cast<std::uint64_t>(micros);
}

MessageInfo read_header(const Message& message) {
  MessageInfo info;
  info.delimiters = message.delimiters();
  const Segment* msh = message.find("MSH");
  if (msh == nullptr) return info;
  info.sending_application = hd_name(*msh, 3, 1);
  info.sending_facility = hd_name(*msh, 4, 1);
  info.receiving_application = hd_name(*msh, 5, 1);
  info.receiving_facility = hd_name(*msh, 6, 1);
  info.message_type = msh->get(9, 1, 1);
  info.trigger_event = msh->get(9, 1, 2);
  info.message_structure = msh->get(9, 1, 3);
  info.control_id = msh->get(10, 1);
  info.processing_id = msh->get(11, 1, 1);
  info.version = msh->get(12, 1, 1);
  info.accept_ack_type = msh->get(15, 1);
  info.application_ack_type = msh->get(16, 1);
  info.charset = msh->get(18, 1);
  info.raw_sending_application = msh->raw(3);
  info.raw_sending_facility = msh->raw(4);
  info.raw_receiving_application = msh->raw(5);
  info.raw_receiving_facility = msh->raw(6);
  info.raw_control_id = msh->raw(10);
  return info;
}

Result<MessageInfo> message_info(const Message& message, Hl7Error* error) {
  MessageInfo info = read_header(message);
  auto missing = [&](std::size_t field, std::size_t component, std::string what) {
    return fail(error, ErrorCode::kRequiredFieldMissing, {"MSH", 1, field, 0, component},
                std::move(what));
  };
  if (info.message_type.empty()) return missing(9, 1, "MSH-9 (message type) is empty");
  if (info.trigger_event.empty() && info.message_type != "ACK") {
    return missing(9, 2, "MSH-9.2 (trigger event) is empty");
  }
  if (info.raw_control_id.empty()) return missing(10, 0, "MSH-10 (message control id) is empty");
  if (info.processing_id.empty()) return missing(11, 0, "MSH-11 (processing id) is empty");
  if (info.version.empty()) return missing(12, 0, "MSH-12 (version id) is empty");
  return info;
}

Result<std::vector<Observation>> observations_from_oru(const Message& message, Hl7Error* error) {
  const Segment* msh = message.find("MSH");
  if (msh == nullptr || msh->get(9, 1, 1) != "ORU") {
    return fail(error, ErrorCode::kUnsupportedMessageType, {"MSH", 1, 9, 0, 1},
                "only ORU messages carry observations");
  }
  if (msh->get(9, 1, 2) != "R01") {
    return fail(error, ErrorCode::kUnsupportedEvent, {"MSH", 1, 9, 0, 2},
                "only ORU^R01 is supported");
  }
  std::vector<Observation> out;
  std::string patient;
  std::uint64_t obr_time = 0;
  const std::vector<Segment>& segments = message.segments();
  for (std::size_t i = 0; i < segments.size(); ++i) {
    const Segment& s = segments[i];
    std::size_t sequence = i + 1;
    if (s.id() == "PID") {
      patient = cx_of(FieldRepetition(s.raw(3, 1), message.delimiters())).qualified();
      obr_time = 0;
      continue;
    }
    if (s.id() == "OBR") {
      obr_time = 0;
      std::string_view raw = s.raw(7, 1, 1);
      if (raw.empty()) continue;
      Result<std::uint64_t> t = parse_dtm(decode_escapes(raw, message.delimiters()));
      if (!t.ok()) {
        return fail(error, ErrorCode::kDataType, {"OBR", sequence, 7}, t.status().message());
      }
      obr_time = *t;
      continue;
    }
    if (s.id() != "OBX") continue;

    Observation base;
    base.patient_id = patient;
    base.code = s.get(3, 1, 1);
    base.display = s.get(3, 1, 2);
    base.code_system = s.get(3, 1, 3);
    base.unit = s.get(6, 1, 1);
    if (base.unit.empty()) base.unit = s.get(6, 1, 2);
    base.status = s.get(11, 1, 1);
    base.device_id = s.get(18, 1, 1);
    if (base.device_id.empty()) base.device_id = s.get(18, 1, 3);
    base.time_us = obr_time;
    if (std::string time = s.get(14, 1, 1); !time.empty()) {
      Result<std::uint64_t> t = parse_dtm(time);
      if (!t.ok()) {
        return fail(error, ErrorCode::kDataType, {"OBX", sequence, 14}, t.status().message());
      }
      base.time_us = *t;
    }

    std::string type = s.get(2, 1, 1);
    std::vector<FieldRepetition> values = s.repetitions(5);
    if (out.size() + std::max<std::size_t>(values.size(), 1) > kMaxObservationsPerMessage) {
      return fail(error, ErrorCode::kInternal, {"OBX", sequence, 5},
                  "more than " + std::to_string(kMaxObservationsPerMessage) +
                      " observations in one message");
    }
    if (values.empty()) {
      out.push_back(std::move(base));
      continue;
    }
    for (std::size_t rep = 1; rep <= values.size(); ++rep) {
      const FieldRepetition& value = values[rep - 1];
      Observation o = base;
      ErrorLocation where{"OBX", sequence, 5, rep};
      if (value.raw().empty()) {
        // An empty repetition: no value.
      } else if (type == "NM") {
        std::optional<double> v = parse_nm(value.get(1));
        if (!v) {
          return fail(error, ErrorCode::kDataType, where, "OBX-2 is NM but OBX-5 is not a number");
        }
        o.value = *v;
      } else if (type == "CWE" || type == "CE" || type == "CNE" || type == "CF") {
        std::string code = value.get(1);
        o.value = code.empty() ? value.get(2) : code;
      } else if (type == "ED") {
        std::string encoding = value.get(4);
        std::string data = value.get(5);
        if (iequals(encoding, "Base64")) {
          std::optional<Bytes> b = from_base64(data);
          if (!b) return fail(error, ErrorCode::kDataType, where, "ED data is not valid Base64");
          o.value = std::move(*b);
        } else if (iequals(encoding, "Hex")) {
          std::optional<Bytes> b = from_hex(data);
          if (!b) return fail(error, ErrorCode::kDataType, where, "ED data is not valid hex");
          o.value = std::move(*b);
        } else {
          o.value = to_bytes(data);
        }
      } else {
        o.value = value.get();
      }
      out.push_back(std::move(o));
    }
  }
  return out;
}

Result<std::vector<PatientIdentifier>> patient_ids(const Message& message, Hl7Error* error) {
  const std::vector<Segment>& segments = message.segments();
  for (std::size_t i = 0; i < segments.size(); ++i) {
    const Segment& pid = segments[i];
    if (pid.id() != "PID") continue;
    std::vector<PatientIdentifier> ids;
    for (const FieldRepetition& cx : pid.repetitions(3)) {
      PatientIdentifier p = cx_of(cx);
      if (!p.id.empty()) ids.push_back(std::move(p));
    }
    if (ids.empty()) {
      return fail(error, ErrorCode::kRequiredFieldMissing, {"PID", i + 1, 3},
                  "PID-3 (patient identifier list) has no identifier");
    }
    return ids;
  }
  return fail(error, ErrorCode::kSegmentSequence, {"PID"}, "the message has no PID segment");
}

}  // namespace medgate::appliance::hl7
