// MLLP (HL7 v2 Minimal Lower Layer Protocol) framing: 0x0B, the message, 0x1C 0x0D.
//
// MllpDeframer is an incremental state machine over a byte stream as TCP delivers it: any split
// (one byte at a time, the 0x1C 0x0D trailer across two reads, several frames in one read) gives
// the same frames and the same counters. It does no I/O and knows nothing of HL7 itself.
//
// Rules for what real peers send besides well-formed frames (each has a counter):
//  - Bytes outside a frame (before 0x0B, after 0x1C 0x0D: stray CR/LF, telnet noise) are skipped
//    and counted as junk.
//  - A 0x1C not followed by 0x0D is data: both bytes stay in the frame and it continues. (A
//    message never contains 0x1C; keeping it loses nothing and lets the encoder round-trip.)
//  - A 0x0B inside a frame means the sender gave up on that frame and began another (a
//    retransmission after a timeout): the partial frame is dropped and counted as abandoned, and
//    the new frame starts. A frame therefore never contains 0x0B.
//  - A frame whose content exceeds the size limit is reported once as an error; everything up to
//    the next 0x0B is discarded (counted), and deframing resynchronises there.
//  - A peer that closes mid-frame: finish() reports the incomplete frame.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "hsm/bytes.h"
#include "hsm/status.h"

namespace medgate::appliance::hl7 {

inline constexpr std::byte kMllpStart{0x0B};
inline constexpr std::byte kMllpEnd{0x1C};
inline constexpr std::byte kMllpTrailer{0x0D};
inline constexpr std::size_t kDefaultMaxFrame = 1024 * 1024;

// 0x0B, `content`, 0x1C 0x0D. Refuses (kInvalidArgument) content that would not deframe to
// itself: a 0x0B anywhere, or 0x1C followed by 0x0D. HL7 text contains neither.
Result<Bytes> encode_frame(ByteView content);

// One connection's deframer. Not thread-safe; one per connection.
class MllpDeframer {
 public:
  explicit MllpDeframer(std::size_t max_frame = kDefaultMaxFrame) : max_frame_(max_frame) {}

  // Consumes all of `bytes` and returns, in stream order, each frame completed by them (its
  // content, without 0x0B and 0x1C 0x0D) and, for each frame that outgrew the limit, a
  // kInvalidArgument Status (no content: it says how large the limit is). Never fails otherwise.
  std::vector<Result<Bytes>> feed(ByteView bytes);

  // True while a frame has begun and not ended (including one being discarded as oversize).
  bool pending() const { return state_ != State::kIdle; }
  // Call when the peer has closed: OK if the stream ended between frames, else a
  // kInvalidArgument Status saying how many bytes of an unfinished frame were lost (counted in
  // incomplete_frames()). Resets to the idle state.
  Status finish();

  // Counters since construction, for status and logs (they carry no content).
  std::uint64_t frames() const { return frames_; }
  std::uint64_t junk_bytes() const { return junk_bytes_; }
  std::uint64_t oversize_frames() const { return oversize_frames_; }
  std::uint64_t oversize_bytes() const { return oversize_bytes_; }
  std::uint64_t abandoned_frames() const { return abandoned_frames_; }
  std::uint64_t incomplete_frames() const { return incomplete_frames_; }

 private:
  enum class State {
    kIdle,       // between frames
    kInFrame,    // after 0x0B
    kSawEnd,     // after a 0x1C inside a frame
    kDiscarding  // the frame outgrew the limit; skipping to the next 0x0B
  };
  void step(std::byte b, std::vector<Result<Bytes>>& out);
  void append(std::byte b, std::vector<Result<Bytes>>& out);
  void start_frame();

  std::size_t max_frame_;
  State state_ = State::kIdle;
  Bytes frame_;
  std::uint64_t frames_ = 0;
  std::uint64_t junk_bytes_ = 0;
  std::uint64_t oversize_frames_ = 0;
  std::uint64_t oversize_bytes_ = 0;
  std::uint64_t abandoned_frames_ = 0;
  std::uint64_t incomplete_frames_ = 0;
};

}  // namespace medgate::appliance::hl7
