// Fuzz target: MllpDeframer (appliance/hl7/mllp.h), a TCP byte stream as a peer sends it.
// Input: byte 0 picks the frame limit, byte 1 seeds how the rest is cut into reads.
// Properties: never crashes; cutting the stream differently changes nothing (frames, errors,
// counters); every frame is within the limit, holds no 0x0B and no 0x1C 0x0D, and re-encodes to
// a frame that deframes to exactly itself.
#include <string>
#include <vector>

#include "appliance/hl7/mllp.h"
#include "tests/fuzz/fuzz_check.h"

using namespace medgate;
using namespace medgate::appliance::hl7;

namespace {

struct Outcome {
  std::vector<Bytes> frames;
  std::vector<std::string> errors;
  std::uint64_t counters[6] = {};
  bool pending = false;
  bool finished_ok = true;
};

Outcome run(std::size_t limit, ByteView stream, std::uint32_t seed) {
  MllpDeframer d(limit);
  Outcome out;
  std::size_t at = 0;
  while (at < stream.size()) {
    std::size_t n = stream.size() - at;
    if (seed != 0) {
      seed ^= seed << 13;  // xorshift32: read sizes of 1..32 bytes
      seed ^= seed >> 17;
      seed ^= seed << 5;
      n = std::min<std::size_t>(n, 1 + seed % 32);
    }
    for (auto& r : d.feed(stream.subspan(at, n))) {
      if (r.ok()) {
        out.frames.push_back(std::move(r).value());
      } else {
        out.errors.push_back(r.status().message());
      }
    }
    at += n;
  }
  out.counters[0] = d.frames();
  out.counters[1] = d.junk_bytes();
  out.counters[2] = d.oversize_frames();
  out.counters[3] = d.oversize_bytes();
  out.counters[4] = d.abandoned_frames();
  out.pending = d.pending();
  out.finished_ok = d.finish().ok();
  out.counters[5] = d.incomplete_frames();
  return out;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size < 2 || size > fuzz::kMaxInput) return 0;
  std::size_t limit = data[0] == 0xFF ? kDefaultMaxFrame : 1 + data[0];
  std::uint32_t seed = data[1] == 0 ? 0 : 0x9E3779B9u ^ data[1];
  ByteView stream = fuzz::bytes_of(data + 2, size - 2);

  Outcome whole = run(limit, stream, 0);
  Outcome cut = run(limit, stream, seed);
  FUZZ_CHECK(whole.frames == cut.frames, "frames depend on how the stream was cut");
  FUZZ_CHECK(whole.errors == cut.errors, "errors depend on how the stream was cut");
  FUZZ_CHECK(
      std::equal(std::begin(whole.counters), std::end(whole.counters), std::begin(cut.counters)),
      "counters depend on how the stream was cut");
  FUZZ_CHECK(whole.pending == cut.pending && whole.finished_ok == cut.finished_ok,
             "end state depends on how the stream was cut");
  FUZZ_CHECK(whole.frames.size() == whole.counters[0], "frames() is not the frames returned");
  FUZZ_CHECK(whole.errors.size() == whole.counters[2], "oversize_frames() is not the errors");

  for (const Bytes& frame : whole.frames) {
    FUZZ_CHECK(frame.size() <= limit, "a frame of %zu bytes passed a limit of %zu", frame.size(),
               limit);
    Result<Bytes> encoded = encode_frame(frame);
    FUZZ_CHECK(encoded.ok(), "a deframed frame does not re-encode: %s",
               encoded.status().to_string().c_str());
    MllpDeframer again(limit);
    auto back = again.feed(*encoded);
    FUZZ_CHECK(back.size() == 1 && back[0].ok() && *back[0] == frame,
               "a re-encoded frame does not deframe to itself");
    FUZZ_CHECK(again.junk_bytes() == 0 && !again.pending(), "re-encoding left junk or a tail");
  }
  return 0;
}
