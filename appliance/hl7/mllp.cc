#include "appliance/hl7/mllp.h"

#include <string>

namespace medgate::appliance::hl7 {

Result<Bytes> encode_frame(ByteView content) {
  for (std::size_t i = 0; i < content.size(); ++i) {
    if (content[i] == kMllpStart) {
      return Status::InvalidArgument("MLLP frame content holds a start block (0x0B) at offset " +
                                     std::to_string(i));
    }
    if (content[i] == kMllpEnd && i + 1 < content.size() && content[i + 1] == kMllpTrailer) {
      return Status::InvalidArgument(
          "MLLP frame content holds an end block (0x1C 0x0D) at offset " + std::to_string(i));
    }
  }
  Bytes out;
  out.reserve(content.size() + 3);
  out.push_back(kMllpStart);
  out.insert(out.end(), content.begin(), content.end());
  out.push_back(kMllpEnd);
  out.push_back(kMllpTrailer);
  return out;
}

void MllpDeframer::start_frame() {
  frame_.clear();
  state_ = State::kInFrame;
}

void MllpDeframer::append(std::byte b, std::vector<Result<Bytes>>& out) {
  if (frame_.size() >= max_frame_) {
    ++oversize_frames_;
    oversize_bytes_ += frame_.size() + 1;
    frame_.clear();
    frame_.shrink_to_fit();
    state_ = State::kDiscarding;
    out.emplace_back(Status::InvalidArgument("MLLP frame larger than the limit of " +
                                             std::to_string(max_frame_) +
                                             " bytes; skipped to the next start block"));
    return;
  }
  frame_.push_back(b);
}

void MllpDeframer::step(std::byte b, std::vector<Result<Bytes>>& out) {
  switch (state_) {
    case State::kIdle:
      if (b == kMllpStart) {
        start_frame();
      } else {
        ++junk_bytes_;
      }
      return;
    case State::kDiscarding:
      if (b == kMllpStart) {
        start_frame();
      } else {
        ++oversize_bytes_;
      }
      return;
    case State::kInFrame:
      if (b == kMllpEnd) {
        state_ = State::kSawEnd;
      } else if (b == kMllpStart) {
        ++abandoned_frames_;
        start_frame();
      } else {
        append(b, out);
      }
      return;
    case State::kSawEnd:
      if (b == kMllpTrailer) {
        ++frames_;
        out.emplace_back(std::move(frame_));
        frame_ = Bytes();
        state_ = State::kIdle;
        return;
      }
      // The earlier 0x1C was data (see the header); `b` is then read afresh, in whatever state
      // appending the 0x1C left (kDiscarding if it made the frame too large).
      state_ = State::kInFrame;
      append(kMllpEnd, out);
      step(b, out);
      return;
  }
}

std::vector<Result<Bytes>> MllpDeframer::feed(ByteView bytes) {
  std::vector<Result<Bytes>> out;
  for (std::byte b : bytes) step(b, out);
  return out;
}

Status MllpDeframer::finish() {
  State was = state_;
  std::size_t lost = frame_.size() + (was == State::kSawEnd ? 1 : 0);
  frame_.clear();
  state_ = State::kIdle;
  switch (was) {
    case State::kIdle:
    case State::kDiscarding:  // already reported as oversize
      return Status::Ok();
    case State::kInFrame:
    case State::kSawEnd:
      ++incomplete_frames_;
      return Status::InvalidArgument("connection closed inside an MLLP frame after " +
                                     std::to_string(lost) + " bytes");
  }
  return Status::Ok();
}

}  // namespace medgate::appliance::hl7
