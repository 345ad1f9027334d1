// Fuzz target: the HL7 v2 path of a received frame (appliance/hl7/receiver.h): parse_message,
// split_batch, message_info, observations_from_oru, patient_ids, build_ack, via process().
// Properties: never crashes; every decision comes with an ACK (unless MSH-15 declined it) that
// parses back in the same delimiters, frames for MLLP, answers with the code for its disposition
// and echoes MSH-10; every field of an accepted message reads without fault; escaping a value
// and decoding it again gives the value back.
#include <string>
#include <string_view>

#include "appliance/hl7/ack.h"
#include "appliance/hl7/message.h"
#include "appliance/hl7/mllp.h"
#include "appliance/hl7/oru.h"
#include "appliance/hl7/receiver.h"
#include "tests/fuzz/fuzz_check.h"

using namespace medgate;
using namespace medgate::appliance::hl7;

namespace {

bool has_control_byte(std::string_view s) {
  for (char c : s) {
    auto u = static_cast<unsigned char>(c);
    if (u < 0x20 || u == 0x7F) return true;
  }
  return false;
}

void read_everything(const Message& m) {
  for (const Segment& s : m.segments()) {
    for (std::size_t f = 1; f <= s.field_count() + 1; ++f) {
      (void)s.get(f);
      std::size_t reps = s.repetition_count(f);
      for (std::size_t r = 1; r <= reps + 1 && r <= 8; ++r) {
        std::size_t comps = s.component_count(f, r);
        for (std::size_t c = 1; c <= comps + 1 && c <= 8; ++c) {
          std::size_t subs = s.subcomponent_count(f, r, c);
          for (std::size_t sub = 1; sub <= subs + 1 && sub <= 8; ++sub) (void)s.get(f, r, c, sub);
        }
      }
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size > fuzz::kMaxInput) return 0;
  std::string_view text(reinterpret_cast<const char*>(data), size);
  ByteView frame = fuzz::bytes_of(data, size);

  Received r = process(frame, "MG-FUZZ", 1700000000000000);
  FUZZ_CHECK(r.send_ack != r.ack.empty(), "send_ack and the ACK disagree");
  FUZZ_CHECK((r.disposition == Disposition::kAccept) != r.error.has_value(),
             "an error without a refusal, or a refusal without an error");
  if (r.send_ack) {
    FUZZ_CHECK(encode_frame(as_bytes(r.ack)).ok(), "the ACK cannot be framed:\n%s", r.ack.c_str());
    Hl7Error why;
    Result<Message> ack = parse_message(r.ack, &why);
    FUZZ_CHECK(ack.ok(), "the ACK does not parse: %s\n%s", ack.status().to_string().c_str(),
               r.ack.c_str());
    Delimiters expected = r.info ? r.info->delimiters : Delimiters{};
    FUZZ_CHECK(ack->delimiters() == expected, "the ACK changed delimiters");
    std::string code = ack->get("MSA", 1);
    AckCode wanted = r.info ? ack_code_for(*r.info, r.disposition) : AckCode::kAR;
    FUZZ_CHECK(code == ack_code_name(wanted), "MSA-1 is %s", code.c_str());
    if (r.info && !has_control_byte(r.info->raw_control_id)) {
      FUZZ_CHECK(ack->raw("MSA", 2) == r.info->raw_control_id, "MSA-2 does not echo MSH-10");
    }
    if (r.error) {
      FUZZ_CHECK(ack->get("ERR", 8) == r.error->text, "ERR-8 does not read back as the error");
    }
  }

  Result<Message> m = parse_message(text);
  if (m.ok()) {
    read_everything(*m);
    (void)message_info(*m);
    (void)observations_from_oru(*m);
    (void)patient_ids(*m);
    std::string value(text.substr(0, 64));
    FUZZ_CHECK(decode_escapes(encode_escapes(value, m->delimiters()), m->delimiters()) == value,
               "escaping does not round-trip");
  }
  Result<std::vector<Message>> batch = split_batch(text);
  if (batch.ok()) {
    for (const Message& each : *batch) read_everything(each);
  }
  (void)parse_dtm(text.substr(0, 40));
  return 0;
}
