// HL7 v2 ingest, the pure half: MLLP framing under every split a network can deliver, the ER7
// parser on a corpus of real-world-shaped messages (tests/data/hl7), ORU/ADT mapping asserted
// field by field, a specific error for each kind of malformed input, and ACKs parsed back.
#include <catch2/catch.hpp>

#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "appliance/hl7/ack.h"
#include "appliance/hl7/message.h"
#include "appliance/hl7/mllp.h"
#include "appliance/hl7/oru.h"
#include "appliance/hl7/receiver.h"

using namespace medgate;
using namespace medgate::appliance;
using namespace medgate::appliance::hl7;

namespace {

const std::filesystem::path kData = std::filesystem::path(MEDGATE_TEST_DATA) / "hl7";

std::string read_data(const std::string& name) {
  std::ifstream in(kData / name, std::ios::binary);
  REQUIRE(in.good());
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

Message parse_ok(const std::string& text) {
  Hl7Error error;
  Result<Message> m = parse_message(text, &error);
  INFO(m.status().to_string());
  REQUIRE(m.ok());
  return std::move(m).value();
}

std::vector<Observation> observations_of(const std::string& name) {
  Message m = parse_ok(read_data(name));
  Result<std::vector<Observation>> obs = observations_from_oru(m);
  INFO(obs.status().to_string());
  REQUIRE(obs.ok());
  return std::move(obs).value();
}

Hl7Error parse_error(const std::string& text) {
  Hl7Error error;
  Result<Message> m = parse_message(text, &error);
  REQUIRE_FALSE(m.ok());
  CHECK(m.status().code() == StatusCode::kInvalidArgument);
  CHECK(m.status().message() == error.status().message());
  return error;
}

Hl7Error oru_error(const std::string& text) {
  Message m = parse_ok(text);
  Hl7Error error;
  Result<std::vector<Observation>> obs = observations_from_oru(m, &error);
  REQUIRE_FALSE(obs.ok());
  return error;
}

double number(const Observation& o) {
  REQUIRE(std::holds_alternative<double>(o.value));
  return std::get<double>(o.value);
}
std::string text(const Observation& o) {
  REQUIRE(std::holds_alternative<std::string>(o.value));
  return std::get<std::string>(o.value);
}

// --- MLLP ---------------------------------------------------------------------------------------

Bytes frame_of(std::string_view content) {
  Result<Bytes> f = encode_frame(as_bytes(content));
  REQUIRE(f.ok());
  return *f;
}

struct Deframed {
  std::vector<std::string> frames;
  std::size_t errors = 0;
};

// Feeds `stream` cut at `cuts` (ascending offsets) and collects what comes out.
Deframed deframe(MllpDeframer& d, const Bytes& stream, const std::vector<std::size_t>& cuts) {
  Deframed out;
  std::size_t at = 0;
  auto take = [&](std::size_t end) {
    for (auto& r : d.feed(ByteView(stream).subspan(at, end - at))) {
      if (r.ok()) {
        out.frames.push_back(to_string(*r));
      } else {
        ++out.errors;
      }
    }
    at = end;
  };
  for (std::size_t cut : cuts) take(cut);
  take(stream.size());
  return out;
}

}  // namespace

TEST_CASE("MLLP: encode_frame wraps content and refuses what would not deframe to itself",
          "[hl7][mllp]") {
  Bytes f = frame_of("MSH|^~\\&|A");
  CHECK(to_string(f) == "\x0bMSH|^~\\&|A\x1c\r");
  CHECK_FALSE(encode_frame(as_bytes("a\x0b")).ok());
  CHECK_FALSE(encode_frame(as_bytes("a\x1c\rb")).ok());
  CHECK(encode_frame(as_bytes("a\x1c"
                              "b\x1c"))
            .ok());  // a lone 0x1C is data
}

TEST_CASE("MLLP: every way of cutting a stream into two or three reads gives the same frames",
          "[hl7][mllp]") {
  const std::vector<std::string> contents = {"MSH|^~\\&|ONE\r", "MSH|^~\\&|T\x1cWO\rPID|1\r",
                                             "x\x1c"};
  Bytes stream = to_bytes("\r\n junk");
  for (const auto& c : contents) {
    Bytes f = frame_of(c);
    stream.insert(stream.end(), f.begin(), f.end());
    stream.push_back(std::byte{'\n'});  // some senders end frames with a newline
  }
  for (std::size_t i = 0; i <= stream.size(); ++i) {
    for (std::size_t j = i; j <= stream.size(); ++j) {
      MllpDeframer d;
      Deframed out = deframe(d, stream, {i, j});
      INFO("cuts at " << i << " and " << j);
      REQUIRE(out.frames == contents);
      REQUIRE(out.errors == 0);
      REQUIRE(d.junk_bytes() == 7 + 3);
      REQUIRE(d.frames() == 3);
      REQUIRE_FALSE(d.pending());
      REQUIRE(d.finish().ok());
    }
  }
}

TEST_CASE("MLLP: one byte at a time, and several frames in one read", "[hl7][mllp]") {
  Bytes stream;
  for (int i = 0; i < 5; ++i) {
    Bytes f = frame_of("MSH|^~\\&|" + std::to_string(i));
    stream.insert(stream.end(), f.begin(), f.end());
  }
  MllpDeframer one_by_one;
  std::vector<std::size_t> every_byte;
  for (std::size_t i = 1; i < stream.size(); ++i) every_byte.push_back(i);
  CHECK(deframe(one_by_one, stream, every_byte).frames.size() == 5);

  MllpDeframer at_once;
  auto results = at_once.feed(stream);
  REQUIRE(results.size() == 5);
  CHECK(to_string(*results[4]) == "MSH|^~\\&|4");
  CHECK(at_once.junk_bytes() == 0);
}

TEST_CASE("MLLP: the trailer split across reads completes the frame on the second read",
          "[hl7][mllp]") {
  MllpDeframer d;
  CHECK(d.feed(as_bytes("\x0bMSH|^~\\&|A\x1c")).empty());
  CHECK(d.pending());
  auto r = d.feed(as_bytes("\r"));
  REQUIRE(r.size() == 1);
  CHECK(to_string(*r[0]) == "MSH|^~\\&|A");
  CHECK_FALSE(d.pending());
}

TEST_CASE("MLLP: a 0x1C not followed by 0x0D stays in the frame as data", "[hl7][mllp]") {
  MllpDeframer d;
  auto r =
      d.feed(as_bytes("\x0b"
                      "a\x1c"
                      "b\x1c\x1c\r"));
  REQUIRE(r.size() == 1);
  CHECK(to_string(*r[0]) ==
        "a\x1c"
        "b\x1c");
}

TEST_CASE("MLLP: an oversize frame is reported once and deframing resumes at the next 0x0B",
          "[hl7][mllp]") {
  MllpDeframer d(8);
  Bytes stream = frame_of("12345678");  // exactly the limit: fine
  Bytes big = frame_of(
      "123456789abc\x1c"
      "def");
  Bytes next = frame_of("ok");
  stream.insert(stream.end(), big.begin(), big.end());
  stream.insert(stream.end(), next.begin(), next.end());
  for (std::size_t cut = 0; cut <= stream.size(); ++cut) {
    MllpDeframer split(8);
    Deframed out = deframe(split, stream, {cut});
    INFO("cut at " << cut);
    REQUIRE(out.frames == std::vector<std::string>{"12345678", "ok"});
    REQUIRE(out.errors == 1);
    REQUIRE(split.oversize_frames() == 1);
  }
  auto r = d.feed(big);
  REQUIRE(r.size() == 1);
  CHECK_FALSE(r[0].ok());
  CHECK(r[0].status().message().find("limit of 8 bytes") != std::string::npos);
  CHECK(d.pending());      // still discarding until the next 0x0B
  CHECK(d.finish().ok());  // already reported, not an incomplete frame
}

TEST_CASE("MLLP: a start block inside a frame abandons it and starts over", "[hl7][mllp]") {
  MllpDeframer d;
  auto r = d.feed(as_bytes("\x0bMSH|par\x0bMSH|whole\x1c\r"));
  REQUIRE(r.size() == 1);
  CHECK(to_string(*r[0]) == "MSH|whole");
  CHECK(d.abandoned_frames() == 1);
}

TEST_CASE("MLLP: a peer closing mid-frame leaves an incomplete frame that finish() reports",
          "[hl7][mllp]") {
  for (std::string_view partial : {"\x0bMSH|^~", "\x0bMSH|^~\x1c"}) {
    MllpDeframer d;
    CHECK(d.feed(as_bytes(partial)).empty());
    CHECK(d.pending());
    Status s = d.finish();
    CHECK(s.code() == StatusCode::kInvalidArgument);
    CHECK(s.message().find("closed inside an MLLP frame") != std::string::npos);
    CHECK(d.incomplete_frames() == 1);
    CHECK_FALSE(d.pending());
  }
  MllpDeframer idle;
  (void)idle.feed(as_bytes("noise"));
  CHECK(idle.finish().ok());
}

// --- ER7 parsing --------------------------------------------------------------------------------

TEST_CASE("ER7: MSH-1 and MSH-2 are the delimiters and numbering is HL7's", "[hl7]") {
  Message m = parse_ok(read_data("pcd01_philips.hl7"));
  CHECK(m.delimiters() == Delimiters{});
  CHECK(m.segments().size() == 8);
  CHECK(m.get("MSH", 1) == "|");
  CHECK(m.get("MSH", 2) == "^~\\&");
  CHECK(m.get("MSH", 3, 1, 1) == "PHILIPS_IX");
  CHECK(m.get("MSH", 3, 1, 3) == "EUI-64");
  CHECK(m.get("MSH", 9) == "ORU^R01^ORU_R01");
  CHECK(m.get("MSH", 10) == "MSG00017");
  CHECK(m.get("MSH", 21, 1, 3) == "1.3.6.1.4.1.19376.1.6.1.1.1");
  CHECK(m.get("PID", 3, 1, 4) == "HOSP_MRN");
  CHECK(m.get("PID", 99).empty());
  CHECK(m.get("NTE", 1).empty());
  const Segment* obx3 = m.find("OBX", 3);
  REQUIRE(obx3 != nullptr);
  CHECK(obx3->get(5) == "97.5");
  CHECK(obx3->field_count() == 18);
  CHECK(obx3->component_count(18, 1) == 4);
}

TEST_CASE("ER7: repetitions, components and subcomponents, and Z-segments", "[hl7]") {
  Message m = parse_ok(read_data("zsegments.hl7"));
  const Segment* zpd = m.find("ZPD");
  REQUIRE(zpd != nullptr);
  CHECK(zpd->repetition_count(2) == 2);
  CHECK(zpd->component_count(2, 1) == 2);
  CHECK(zpd->subcomponent_count(2, 1, 1) == 3);
  CHECK(zpd->get(2, 1, 1, 2) == "ICU");
  CHECK(zpd->get(2, 1, 2) == "x");
  CHECK(zpd->get(2, 2) == "y");
  CHECK(zpd->get(2, 3).empty());
  CHECK(zpd->get(3, 1, 2) == "data");
  CHECK(m.get("ZOB", 1) == "extra");
  CHECK(m.get("PID", 3, 1, 4, 2) == "1.2.840.113619");
}

TEST_CASE("ER7: non-default encoding characters (MSH#*@!%) are honoured", "[hl7]") {
  Message m = parse_ok(read_data("nondefault_delimiters.hl7"));
  CHECK(m.delimiters() == Delimiters{'#', '*', '@', '!', '%', std::nullopt});
  CHECK(m.get("MSH", 1) == "#");
  CHECK(m.get("MSH", 2) == "*@!%");
  CHECK(m.get("MSH", 9, 1, 2) == "R01");
  CHECK(m.find("PID")->repetition_count(3) == 2);
  CHECK(m.get("PID", 3, 1, 2) == "*x");  // !S! is this encoding's component separator
  CHECK(m.get("PID", 3, 1, 3) == "#");
  CHECK(m.get("PID", 3, 1, 4, 1) == "WARD%A");
  CHECK(m.get("PID", 3, 2, 1) == "77-88");
  CHECK(m.find("OBX", 2)->get(5, 1) == "a|b^c # d@e");  // | and ^ are plain data here

  auto obs = observations_of("nondefault_delimiters.hl7");
  REQUIRE(obs.size() == 2);
  CHECK(obs[0].patient_id == "WARD%A:55-66");
  CHECK(number(obs[0]) == 96);
  CHECK(obs[0].unit == "%");
  CHECK(obs[0].time_us == 1710665940000000);
  CHECK(obs[1].display == "pipe|and^hat");
  CHECK(text(obs[1]) == "a|b^c # d@e");
}

TEST_CASE("ER7: escapes decode on read, raw bytes stay as sent, Latin-1 is kept byte-exact",
          "[hl7]") {
  std::string input = read_data("escapes_latin1.hl7");  // CRLF line ends, no MSH-18
  Message m = parse_ok(input);
  CHECK(m.segments().size() == 8);
  CHECK(m.get("PID", 5, 1, 1) == "M\xfcller");
  CHECK(m.get("PID", 5, 1, 2) == "Jos\xe9");
  CHECK(m.raw("PID", 3, 1, 1) == "P\\T\\77");

  auto obs = observations_of("escapes_latin1.hl7");
  REQUIRE(obs.size() == 5);
  for (const auto& o : obs) CHECK(o.patient_id == "CLINIQUE^NORD:P&77");
  CHECK(text(obs[0]) == "Pulse | irregular ^ see chart & ~ \\ A B\r\n");
  // \H\ \N\ \.br\ are formatting, kept verbatim for whoever renders the text; Latin-1 untouched.
  CHECK(text(obs[1]) == "Patient resting \\H\\calm\\N\\ line\\.br\\two, caf\xe9 ok");
  // Malformed and unknown escapes are kept verbatim.
  CHECK(text(obs[2]) == "odd \\X4\\ and \\Xzz\\ and \\Q\\ end \\X\\");
  CHECK(obs[3].display == "Temp\xe9rature corporelle");
  CHECK(number(obs[3]) == Approx(37.2));
  CHECK(obs[3].unit == "Cel");
  CHECK(text(obs[4]) == "unterminated \\X41");
  CHECK(obs[4].time_us == 1710676500000000);
}

TEST_CASE("ER7: decode_escapes and encode_escapes", "[hl7]") {
  Delimiters d;
  CHECK(decode_escapes("\\X414243\\\\xff\\", d) == "ABC\\xff\\");
  CHECK(decode_escapes("\\XfF00\\", d) == std::string("\xff\0", 2));
  CHECK(decode_escapes("\\P\\", d) == "\\P\\");  // no truncation character declared
  Delimiters with_truncation = d;
  with_truncation.truncation = '#';
  CHECK(decode_escapes("\\P\\", with_truncation) == "#");
  std::string nasty = "a|b^c~d\\e&f\r\n\x0b\x1c#";
  CHECK(encode_escapes(nasty, d) == "a\\F\\b\\S\\c\\R\\d\\E\\e\\T\\f\\X0D\\\\X0A\\\\X0B\\\\X1C\\#");
  CHECK(decode_escapes(encode_escapes(nasty, d), d) == nasty);
  CHECK(decode_escapes(encode_escapes(nasty, with_truncation), with_truncation) == nasty);
}

TEST_CASE("ER7: a fifth encoding character is the truncation character", "[hl7]") {
  Message m = parse_ok("MSH|^~\\&#|A|B|C|D|20240101||ORU^R01|1|P|2.7\rNTE|1||50\\P\\ done");
  REQUIRE(m.delimiters().truncation == '#');
  CHECK(m.get("MSH", 2) == "^~\\&#");
  CHECK(m.get("MSH", 3) == "A");
  CHECK(m.get("NTE", 3) == "50# done");
}

TEST_CASE("ER7: LF and CRLF separate segments too; empty lines are skipped", "[hl7]") {
  Message m = parse_ok("\r\nMSH|^~\\&|A\n\nPID|1\r\n\rOBX|1\r");
  REQUIRE(m.segments().size() == 3);
  CHECK(m.segments()[2].id() == "OBX");
  CHECK(m.find("OBX")->text() == "OBX|1");
}

TEST_CASE("ER7: malformed input gets a specific error naming a position, never content", "[hl7]") {
  SECTION("empty") {
    Hl7Error e = parse_error("\r\n");
    CHECK(e.code == ErrorCode::kSegmentSequence);
    CHECK(e.text == "the message is empty");
  }
  SECTION("no MSH") {
    Hl7Error e = parse_error("PID|||SECRET-ID\rOBX|1");
    CHECK(e.code == ErrorCode::kSegmentSequence);
    CHECK(e.where == ErrorLocation{"MSH", 1});
    CHECK(e.status().message() == "segment 1 (MSH): the message does not begin with MSH");
  }
  SECTION("MSH shorter than its delimiters") {
    Hl7Error e = parse_error("MSH|^~");
    CHECK(e.code == ErrorCode::kDataType);
    CHECK(e.where == ErrorLocation{"MSH", 1, 2});
    CHECK(e.text == "MSH-2 has 2 encoding characters; 4 (or 5 with truncation) are required");
    CHECK(parse_error("MSH").where == ErrorLocation{"MSH", 1, 1});
  }
  SECTION("too many encoding characters") {
    CHECK(parse_error("MSH|^~\\&#$|A").text.starts_with("MSH-2 has 6 encoding characters"));
  }
  SECTION("duplicate encoding characters") {
    Hl7Error e = parse_error("MSH|^~\\^|A");
    CHECK(e.text == "MSH-2 character 4 repeats a delimiter declared before it");
  }
  SECTION("a letter or digit as a delimiter") {
    CHECK(parse_error("MSH|^~\\a|A").text == "MSH-2 character 4 is not a punctuation character");
    CHECK(parse_error("MSHX^~\\&XA").text ==
          "MSH-1 (the field separator) is missing or not a punctuation character");
  }
  SECTION("a line that is not a segment") {
    Hl7Error e = parse_error("MSH|^~\\&|A\rPID|1\rDoe, John born 1960\r");
    CHECK(e.code == ErrorCode::kSegmentSequence);
    CHECK(e.where == ErrorLocation{"", 3});
    CHECK(e.status().message().starts_with("segment 3: not a segment"));
    CHECK(e.status().message().find("Doe") == std::string::npos);
  }
  SECTION("two messages where one is expected") {
    Hl7Error e = parse_error("MSH|^~\\&|A\rMSH|^~\\&|B");
    CHECK(e.where == ErrorLocation{"MSH", 2});
  }
  SECTION("a batch where one message is expected") {
    CHECK(parse_error(read_data("batch.hl7")).text.starts_with("a batch"));
  }
}

TEST_CASE("ER7: batches split into their messages", "[hl7]") {
  std::string input = read_data("batch.hl7");  // LF line ends
  CHECK(is_batch(input));
  Result<std::vector<Message>> batch = split_batch(input);
  REQUIRE(batch.ok());
  REQUIRE(batch->size() == 2);
  CHECK((*batch)[0].get("MSH", 10) == "B-1");
  CHECK((*batch)[1].get("MSH", 10) == "B-2");
  CHECK((*batch)[1].segments().size() == 3);  // BTS/FTS are not part of it

  auto first = observations_from_oru((*batch)[0]);
  auto second = observations_from_oru((*batch)[1]);
  REQUIRE(first.ok());
  REQUIRE(second.ok());
  REQUIRE(first->size() == 1);
  REQUIRE(second->size() == 1);
  CHECK((*first)[0].patient_id == "HOSP:111");
  CHECK(number((*first)[0]) == 101);
  CHECK((*first)[0].time_us == 1710802800000000);
  CHECK((*second)[0].patient_id == "HOSP:222");
  CHECK(number((*second)[0]) == 88);
  CHECK((*second)[0].time_us == 1710803700000000);

  // A single message is a batch of one.
  auto single = split_batch(read_data("adt_a08.hl7"));
  REQUIRE(single.ok());
  CHECK(single->size() == 1);

  SECTION("a miscounted batch") {
    std::string miscounted = input;
    miscounted.replace(miscounted.find("BTS|2"), 5, "BTS|3");
    Hl7Error e;
    CHECK_FALSE(split_batch(miscounted, &e).ok());
    CHECK(e.where == ErrorLocation{"BTS", 9, 1});
    CHECK(e.text == "BTS-1 gives 3 messages, the batch holds 2");
  }
  SECTION("an error inside the second message is placed in the whole text") {
    std::string broken = input;
    broken.replace(broken.find("PID|||222"), 3, "p1d");
    Hl7Error e;
    CHECK_FALSE(split_batch(broken, &e).ok());
    CHECK(e.where == ErrorLocation{"", 7});
  }
  SECTION("a segment outside any message") {
    Hl7Error e;
    CHECK_FALSE(split_batch("BHS|^~\\&\rPID|1\rBTS|0", &e).ok());
    CHECK(e.where == ErrorLocation{"", 2});
  }
}

// --- mapping ------------------------------------------------------------------------------------

TEST_CASE("ORU: an IHE PCD-01 device report with MDC codes", "[hl7]") {
  auto obs = observations_of("pcd01_philips.hl7");
  REQUIRE(obs.size() == 4);
  for (const auto& o : obs) {
    CHECK(o.patient_id == "HOSP_MRN:12345678");
    CHECK(o.code_system == "MDC");
    CHECK(o.device_id == "0010C3FFFE1A2B3C");
  }
  // The MDS line of the containment tree: no value, OBR-7's time.
  CHECK(obs[0].code == "69965");
  CHECK(obs[0].display == "MDC_DEV_MON_PHYSIO_MULTI_PARAM_MDS");
  CHECK(std::holds_alternative<std::monostate>(obs[0].value));
  CHECK(obs[0].status == "X");
  CHECK(obs[0].time_us == 1710509400000000);

  CHECK(obs[1].code == "147842");
  CHECK(obs[1].display == "MDC_ECG_HEART_RATE");
  CHECK(number(obs[1]) == 72);
  CHECK(obs[1].unit == "264864");
  CHECK(obs[1].status == "R");
  CHECK(obs[1].time_us == 1710509400000000);

  CHECK(obs[2].code == "150456");
  CHECK(number(obs[2]) == 97.5);
  CHECK(obs[2].unit == "262688");
  CHECK(obs[2].time_us == 1710509401250000);  // fractional seconds, +0100

  CHECK(obs[3].display == "MDC_PRESS_BLD_NONINV_SYS");
  CHECK(number(obs[3]) == 118);
  CHECK(obs[3].status == "F");
  CHECK(obs[3].time_us == 1710509395000000);
}

TEST_CASE("ORU: a lab result with LOINC codes, several value types and repetitions", "[hl7]") {
  auto obs = observations_of("lab_loinc.hl7");
  REQUIRE(obs.size() == 7);
  for (const auto& o : obs) {
    CHECK(o.patient_id == "A0001234");  // first PID-3 repetition, no assigning authority
    CHECK(o.code_system == "LN");
    CHECK(o.device_id.empty());
  }
  CHECK(obs[0].code == "2345-7");
  CHECK(obs[0].display == "Glucose [Mass/volume] in Serum or Plasma");
  CHECK(number(obs[0]) == 95);
  CHECK(obs[0].unit == "mg/dL");
  CHECK(obs[0].status == "F");
  CHECK(obs[0].time_us == 1710575100000000);  // OBR-7, no offset: UTC

  CHECK(number(obs[1]) == Approx(1.10));
  CHECK(obs[1].unit == "mg/dL");

  CHECK(text(obs[2]) == "Specimen slightly haemolysed");
  CHECK(text(obs[3]) == "278149003");

  // OBX-5 repeated: one Observation per repetition, sharing everything else.
  CHECK(obs[4].code == "2823-3");
  CHECK(number(obs[4]) == Approx(4.1));
  CHECK(number(obs[5]) == Approx(4.3));
  CHECK(obs[5].unit == "mmol/L");
  CHECK(obs[5].status == "C");
  CHECK(obs[4].time_us == 1710594000000000);  // OBX-14 with -0500
  CHECK(obs[5].time_us == obs[4].time_us);

  REQUIRE(std::holds_alternative<Bytes>(obs[6].value));
  CHECK(to_string(std::get<Bytes>(obs[6].value)) == "%PDF-1.4\n");
}

TEST_CASE("ORU: HD namespace as assigning authority, unit from OBX-6.2, device from OBX-18",
          "[hl7]") {
  auto obs = observations_of("zsegments.hl7");
  REQUIRE(obs.size() == 2);
  CHECK(obs[0].patient_id == "GEHC:MRN778899");
  CHECK(obs[0].device_id == "CARESCAPE-B850-SN4411");
  CHECK(obs[0].time_us == 1710772199000000);
  CHECK(number(obs[1]) == 80);
  CHECK(obs[1].unit == "/min");
  CHECK(obs[1].device_id.empty());
}

TEST_CASE("ORU: each OBX belongs to the PID and OBR before it", "[hl7]") {
  Message m = parse_ok(
      "MSH|^~\\&|A|B|C|D|20240101||ORU^R01|1|P|2.5\r"
      "PID|||1^^^H\rOBR|1||||||20240101\rOBX|1|NM|X^^L||1\r"
      "PID|||2\rOBX|1|NM|X^^L||2\r"
      "OBR|2||||||20240102\rOBX|1|NM|X^^L||3|||||||||20240103\r");
  auto obs = observations_from_oru(m);
  REQUIRE(obs.ok());
  REQUIRE(obs->size() == 3);
  CHECK((*obs)[0].patient_id == "H:1");
  CHECK((*obs)[0].time_us == 1704067200000000);
  CHECK((*obs)[1].patient_id == "2");
  CHECK((*obs)[1].time_us == 0);  // a new patient starts without the earlier OBR's time
  CHECK((*obs)[2].time_us == 1704240000000000);
}

TEST_CASE("ORU: values that do not match their type are refused with their position", "[hl7]") {
  const std::string head = "MSH|^~\\&|A|B|C|D|20240101||ORU^R01|1|P|2.5\rPID|||1\r";
  SECTION("NM that is not a number") {
    for (std::string bad : {"12,5", "1e3", "nan", "-", ".", "1.2.3", "0x10"}) {
      INFO(bad);
      Hl7Error e = oru_error(head + "OBX|1|NM|X||" + bad);
      CHECK(e.code == ErrorCode::kDataType);
      CHECK(e.where == ErrorLocation{"OBX", 3, 5, 1});
      CHECK(e.status().message() ==
            "segment 3 (OBX) field 5 repetition 1: OBX-2 is NM but OBX-5 is not a number");
    }
    auto ok = observations_from_oru(parse_ok(head + "OBX|1|NM|X|| -.5 "));
    REQUIRE(ok.ok());
    CHECK(number((*ok)[0]) == -0.5);
  }
  SECTION("a bad OBX-14") {
    Hl7Error e = oru_error(head + "OBX|1|NM|X||1|||||||||20241301");
    CHECK(e.where == ErrorLocation{"OBX", 3, 14});
    CHECK(e.code == ErrorCode::kDataType);
  }
  SECTION("a bad OBR-7") {
    Hl7Error e = oru_error(head + "OBR|1||||||yesterday\rOBX|1|NM|X||1");
    CHECK(e.where == ErrorLocation{"OBR", 3, 7});
    CHECK(e.status().message().find("yesterday") == std::string::npos);
  }
  SECTION("ED that does not decode") {
    Hl7Error e = oru_error(head + "OBX|1|ED|X||^AP^PDF^Base64^!!!");
    CHECK(e.text == "ED data is not valid Base64");
  }
  SECTION("not ORU^R01") {
    CHECK(oru_error("MSH|^~\\&|A|B|C|D|1||ORU^R30|1|P|2.5").code == ErrorCode::kUnsupportedEvent);
    CHECK(oru_error("MSH|^~\\&|A|B|C|D|1||ADT^A01|1|P|2.5").code ==
          ErrorCode::kUnsupportedMessageType);
  }
}

TEST_CASE("ORU: many repetitions are read in one pass, and a message may not expand without bound",
          "[hl7]") {
  // Once each repetition of OBX-5 was found by scanning from the start of the field: 30,000
  // repetitions (60 KB) took minutes. tests/fuzz/corpus/hl7/crash-timeout-obx5-many-repetitions.
  const std::string head = "MSH|^~\\&|A|B|C|D|1||ORU^R01|1|P|2.5\rPID|||1\rOBX|1|NM|X||";
  std::string many = head;
  for (int i = 0; i < 9999; ++i) many += std::to_string(i % 10) + "~";
  many += "7";
  auto obs = observations_from_oru(parse_ok(many));
  REQUIRE(obs.ok());
  REQUIRE(obs->size() == 10000);
  CHECK(number((*obs)[9998]) == 8);
  CHECK(number((*obs)[9999]) == 7);

  Hl7Error e = oru_error(many + "~1");
  CHECK(e.code == ErrorCode::kInternal);
  CHECK(e.where == ErrorLocation{"OBX", 3, 5});
  CHECK(e.text == "more than 10000 observations in one message");
}

TEST_CASE("ER7: repetitions() splits a field once into views that read components", "[hl7]") {
  Message m = parse_ok(read_data("adt_a01.hl7"));
  const Segment* pid = m.find("PID");
  REQUIRE(pid != nullptr);
  auto reps = pid->repetitions(3);
  REQUIRE(reps.size() == 2);
  CHECK(reps[0].raw() == "556677^^^HOSP_MRN^MR");
  CHECK(reps[1].get(4, 2) == "2.16.840.1.113883.4.1");
  CHECK(reps[1].get(9).empty());
  CHECK(pid->repetitions(4).empty());
  CHECK(m.find("MSH")->repetitions(2).empty());
}

TEST_CASE("DTM: precision, fractions and offsets", "[hl7]") {
  CHECK(*parse_dtm("1970") == 0);
  CHECK(*parse_dtm("197001010000") == 0);
  CHECK(*parse_dtm("19700101000001.5") == 1'500'000);
  CHECK(*parse_dtm("19700101000001.1234567") == 1'123'456);
  CHECK(*parse_dtm("19700101010000+0100") == 0);
  CHECK(*parse_dtm("2024022912") == 1709208000000000);  // a leap day
  for (std::string_view bad : {"", "197", "19700", "20240230", "2024010124", "202401011260",
                               "20240101120060", "2024.5", "2024010112.5", "20240101+01",
                               "20240101+2400", "19691231", "19700101000000+0001", "２０２４"}) {
    INFO(bad);
    CHECK_FALSE(parse_dtm(bad).ok());
  }
}

TEST_CASE("MSH: message_info reads the header and insists on what every message needs", "[hl7]") {
  Message m = parse_ok(read_data("pcd01_philips.hl7"));
  Result<MessageInfo> info = message_info(m);
  REQUIRE(info.ok());
  CHECK(info->sending_application == "PHILIPS_IX");
  CHECK(info->raw_sending_application == "PHILIPS_IX^0010C3FFFE1A2B3C^EUI-64");
  CHECK(info->sending_facility == "WARD7");
  CHECK(info->receiving_application == "MEDGATE");
  CHECK(info->receiving_facility == "HOSP");
  CHECK(info->message_type == "ORU");
  CHECK(info->trigger_event == "R01");
  CHECK(info->message_structure == "ORU_R01");
  CHECK(info->control_id == "MSG00017");
  CHECK(info->processing_id == "P");
  CHECK(info->version == "2.6");
  CHECK(info->accept_ack_type == "AL");
  CHECK(info->application_ack_type == "NE");
  CHECK(info->charset == "UNICODE UTF-8");
  CHECK(info->enhanced_mode());

  Result<MessageInfo> lab = message_info(parse_ok(read_data("lab_loinc.hl7")));
  REQUIRE(lab.ok());
  CHECK_FALSE(lab->enhanced_mode());
  CHECK(lab->charset.empty());

  Hl7Error e;
  CHECK_FALSE(message_info(parse_ok("MSH|^~\\&|A|B|C|D|1||ORU^R01||P|2.5"), &e).ok());
  CHECK(e.code == ErrorCode::kRequiredFieldMissing);
  CHECK(e.where == ErrorLocation{"MSH", 1, 10});
  CHECK_FALSE(message_info(parse_ok("MSH|^~\\&|A|B|C|D|1||ORU|1|P|2.5"), &e).ok());
  CHECK(e.where == ErrorLocation{"MSH", 1, 9, 0, 2});
}

TEST_CASE("ADT: patient_ids reads every PID-3 identifier", "[hl7]") {
  auto a01 = patient_ids(parse_ok(read_data("adt_a01.hl7")));
  REQUIRE(a01.ok());
  REQUIRE(a01->size() == 2);
  CHECK((*a01)[0] == PatientIdentifier{"556677", "HOSP_MRN", "MR"});
  CHECK((*a01)[0].qualified() == "HOSP_MRN:556677");
  CHECK((*a01)[1] == PatientIdentifier{"1234567890", "2.16.840.1.113883.4.1", "SS"});

  auto a08 = patient_ids(parse_ok(read_data("adt_a08.hl7")));
  REQUIRE(a08.ok());
  REQUIRE(a08->size() == 1);
  CHECK((*a08)[0].qualified() == "HOSP_MRN:556677");

  Hl7Error e;
  CHECK_FALSE(patient_ids(parse_ok("MSH|^~\\&|A\rEVN|A08\rPID|1||~^^^X"), &e).ok());
  CHECK(e.code == ErrorCode::kRequiredFieldMissing);
  CHECK(e.where == ErrorLocation{"PID", 3, 3});
  CHECK_FALSE(patient_ids(parse_ok("MSH|^~\\&|A\rEVN|A08"), &e).ok());
  CHECK(e.code == ErrorCode::kSegmentSequence);
}

// --- ACKs ---------------------------------------------------------------------------------------

TEST_CASE("ACK: an AA in the sender's delimiters, sender and receiver swapped", "[hl7]") {
  MessageInfo info = *message_info(parse_ok(read_data("lab_loinc.hl7")));
  std::string ack = build_ack(info, AckCode::kAA, "MG-1", 1710594000000000);
  CHECK(ack ==
        "MSH|^~\\&|MEDGATE|WARD7|LABSYS|CENTRAL_LAB|20240316130000+0000||ACK^R01^ACK|MG-1|P|"
        "2.5.1\rMSA|AA|LAB-20240316-0042\r");
}

TEST_CASE("ACK: an error ACK parses back with MSA-2 echoed and ERR fields escaped", "[hl7]") {
  Message received = parse_ok(read_data("nondefault_delimiters.hl7"));
  MessageInfo info = *message_info(received);
  Hl7Error error{ErrorCode::kRequiredFieldMissing,
                 {"PID", 2, 3, 1, 1},
                 "odd #*@!% and |^~\\& in the text\r\x0b"};
  std::string ack = build_ack(info, AckCode::kAE, "MG-2", 0, &error);
  Message m = parse_ok(ack);
  CHECK(m.delimiters() == info.delimiters);
  CHECK(m.segments().size() == 3);
  CHECK(m.get("MSH", 3) == "MEDGATE");
  CHECK(m.get("MSH", 5) == "MONITOR");
  CHECK(m.get("MSH", 6) == "ICU");
  CHECK(m.get("MSH", 9, 1, 1) == "ACK");
  CHECK(m.get("MSH", 9, 1, 2) == "R01");
  CHECK(m.get("MSH", 9, 1, 3) == "ACK");
  CHECK(m.get("MSH", 10) == "MG-2");
  CHECK(m.get("MSH", 12) == "2.5.1");
  CHECK(m.get("MSA", 1) == "AE");
  CHECK(m.get("MSA", 2) == "ND-7");
  CHECK(m.get("MSA", 3) == error.text);
  CHECK(m.raw("ERR", 2) == "PID*2*3*1*1");
  CHECK(m.get("ERR", 3, 1, 1) == "101");
  CHECK(m.get("ERR", 3, 1, 2) == "Required field missing");
  CHECK(m.get("ERR", 3, 1, 3) == "HL70357");
  CHECK(m.get("ERR", 4) == "E");
  CHECK(m.get("ERR", 8) == error.text);
  CHECK(encode_frame(as_bytes(ack)).ok());  // no raw 0x0B/CR left inside
}

TEST_CASE("ACK: enhanced mode gets commit codes, NE/NE and the charset echoed", "[hl7]") {
  MessageInfo info = *message_info(parse_ok(read_data("pcd01_philips.hl7")));
  CHECK(ack_code_for(info, Disposition::kAccept) == AckCode::kCA);
  CHECK(ack_code_for(info, Disposition::kError) == AckCode::kCE);
  CHECK(ack_code_for(info, Disposition::kReject) == AckCode::kCR);
  Message m = parse_ok(build_ack(info, AckCode::kCA, "MG-3", 0));
  CHECK(m.get("MSA", 1) == "CA");
  CHECK(m.get("MSA", 2) == "MSG00017");
  CHECK(m.get("MSH", 5) == "PHILIPS_IX^0010C3FFFE1A2B3C^EUI-64");
  CHECK(m.get("MSH", 15) == "NE");
  CHECK(m.get("MSH", 16) == "NE");
  CHECK(m.get("MSH", 18) == "UNICODE UTF-8");
  CHECK(m.find("ERR") == nullptr);

  info.accept_ack_type = "ER";
  CHECK_FALSE(wants_ack(info, Disposition::kAccept));
  CHECK(wants_ack(info, Disposition::kReject));
  info.accept_ack_type = "SU";
  CHECK(wants_ack(info, Disposition::kAccept));
  CHECK_FALSE(wants_ack(info, Disposition::kError));
}

TEST_CASE("ACK: a reject for input without a usable MSH uses the defaults", "[hl7]") {
  Hl7Error error{ErrorCode::kSegmentSequence, {"MSH", 1}, "the message does not begin with MSH"};
  Message m = parse_ok(build_reject("MG-4", 0, error));
  CHECK(m.delimiters() == Delimiters{});
  CHECK(m.get("MSH", 9) == "ACK");
  CHECK(m.get("MSH", 10) == "MG-4");
  CHECK(m.get("MSA", 1) == "AR");
  CHECK(m.get("MSA", 2).empty());
  CHECK(m.raw("ERR", 2) == "MSH^1");
  CHECK(m.get("ERR", 3, 1, 1) == "100");
}

// --- process(): one frame in, a decision and its ACK out ----------------------------------------

TEST_CASE("process: each message of the corpus is accepted with its observations or patients",
          "[hl7]") {
  for (std::string name : {"pcd01_philips.hl7", "lab_loinc.hl7", "nondefault_delimiters.hl7",
                           "escapes_latin1.hl7", "adt_a01.hl7", "adt_a08.hl7"}) {
    INFO(name);
    std::string input = read_data(name);
    Received r = process(as_bytes(input), "MG-9", 0);
    CHECK(r.disposition == Disposition::kAccept);
    CHECK_FALSE(r.error.has_value());
    REQUIRE(r.info.has_value());
    REQUIRE(r.send_ack);
    Message ack = parse_ok(r.ack);
    CHECK(ack.get("MSA", 1) == (r.info->enhanced_mode() ? "CA" : "AA"));
    CHECK(ack.raw("MSA", 2) == r.info->raw_control_id);
    if (r.info->message_type == "ORU") {
      CHECK(r.observations == observations_from_oru(parse_ok(input)).value());
    } else {
      CHECK(r.patients == patient_ids(parse_ok(input)).value());
    }
  }
}

TEST_CASE("process: NE in MSH-15 means no ACK is sent", "[hl7]") {
  Received r = process(as_bytes(read_data("zsegments.hl7")), "MG-9", 0);
  CHECK(r.disposition == Disposition::kAccept);
  CHECK(r.observations.size() == 2);
  CHECK_FALSE(r.send_ack);
  CHECK(r.ack.empty());
}

TEST_CASE("process: what cannot be parsed is AR, what cannot be processed is AE", "[hl7]") {
  auto answer = [](std::string_view frame) {
    Received r = process(as_bytes(frame), "MG-9", 0);
    REQUIRE(r.error.has_value());
    REQUIRE(r.send_ack);
    Message ack = parse_ok(r.ack);
    CHECK(ack.get("ERR", 8) == r.error->text);
    return std::pair{r, ack};
  };
  const std::string msh = "MSH|^~\\&|A|B|C|D|20240101||";
  SECTION("no MSH: AR with the defaults") {
    auto [r, ack] = answer("PID|||123");
    CHECK(r.disposition == Disposition::kReject);
    CHECK_FALSE(r.info.has_value());
    CHECK(ack.get("MSA", 1) == "AR");
  }
  SECTION("a bad segment after a good MSH: AR that still echoes MSH-10") {
    auto [r, ack] = answer(msh + "ORU^R01|C-1|P|2.5\rPID|1\r\x01\x02garbage");
    CHECK(r.disposition == Disposition::kReject);
    CHECK(ack.get("MSA", 1) == "AR");
    CHECK(ack.get("MSA", 2) == "C-1");
    CHECK(ack.raw("ERR", 2) == "");
  }
  SECTION("missing MSH-10: AR") {
    auto [r, ack] = answer(msh + "ORU^R01||P|2.5\rPID|||1");
    CHECK(r.disposition == Disposition::kReject);
    CHECK(ack.get("ERR", 3, 1, 1) == "101");
  }
  SECTION("a batch in one frame: AR") {
    auto [r, ack] = answer(read_data("batch.hl7"));
    CHECK(r.disposition == Disposition::kReject);
  }
  SECTION("an unsupported message type: AE 200") {
    auto [r, ack] = answer(msh + "QRY^Q01|C-2|P|2.5\rQRD|1");
    CHECK(r.disposition == Disposition::kError);
    CHECK(ack.get("MSA", 1) == "AE");
    CHECK(ack.get("ERR", 3, 1, 1) == "200");
  }
  SECTION("an ORU without a patient identifier: AE 101 at PID-3") {
    auto [r, ack] = answer(msh + "ORU^R01|C-3|P|2.5\rPID|1||\rOBX|1|NM|X||5");
    CHECK(r.disposition == Disposition::kError);
    CHECK(r.observations.empty());
    CHECK(ack.raw("ERR", 2) == "PID^2^3");
    CHECK(ack.get("ERR", 3, 1, 1) == "101");
  }
  SECTION("an unreadable OBX: AE 102, in enhanced mode CE") {
    auto [r, ack] = answer(msh + "ORU^R01|C-4|P|2.5|||AL|NE\rPID|||1\rOBX|1|NM|X||high");
    CHECK(r.disposition == Disposition::kError);
    CHECK(ack.get("MSA", 1) == "CE");
    CHECK(ack.raw("ERR", 2) == "OBX^3^5^1");
    CHECK(ack.get("ERR", 3, 1, 1) == "102");
  }
}

TEST_CASE("process: a frame the deframer refused gets an AR naming the limit", "[hl7]") {
  MllpDeframer d(16);
  auto results = d.feed(frame_of("MSH|^~\\&|A|B|C|D|1||ORU^R01|1|P|2.5"));
  REQUIRE(results.size() == 1);
  REQUIRE_FALSE(results[0].ok());
  Received r = reject_frame(results[0].status(), "MG-10", 0);
  CHECK(r.disposition == Disposition::kReject);
  Message ack = parse_ok(r.ack);
  CHECK(ack.get("MSA", 1) == "AR");
  CHECK(ack.get("MSH", 10) == "MG-10");
  CHECK(ack.get("ERR", 8) ==
        "MLLP frame larger than the limit of 16 bytes; skipped to the next "
        "start block");
}
