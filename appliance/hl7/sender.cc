#include "appliance/hl7/sender.h"

#include <netdb.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <thread>

#include <fmt/format.h>

#include "appliance/hl7/message.h"

namespace medgate::appliance::hl7 {
namespace {

// Bytes outside any frame: line noise, a telnet probe. No 0x0B, so it cannot start a frame.
constexpr std::string_view kJunk = "\r\nGET / HTTP/1.0\r\n\x1c\r\x7f\r\n";

}  // namespace

Result<AckSummary> summarize_ack(std::string_view ack) {
  Result<Message> message = parse_message(ack);
  if (!message.ok()) return message.status();
  const Segment* msa = message->find("MSA");
  if (msa == nullptr) return Status::InvalidArgument("the answer has no MSA segment");
  AckSummary summary;
  summary.code = msa->get(1, 1, 1, 1);
  summary.control_id = msa->get(2, 1, 1, 1);
  std::string text = msa->get(3, 1, 1, 1);
  if (const Segment* err = message->find("ERR"); err != nullptr) {
    std::string detail = err->get(8, 1, 1, 1);
    if (detail.empty()) detail = err->get(3, 1, 2, 1);
    if (!detail.empty() && detail != text) text = text.empty() ? detail : text + "; " + detail;
  }
  summary.text = std::move(text);
  return summary;
}

std::vector<std::string> split_messages(std::string_view file_text) {
  std::vector<std::string> messages;
  std::string current;
  std::size_t i = 0;
  while (i <= file_text.size()) {
    std::size_t end = file_text.find_first_of("\r\n", i);
    if (end == std::string_view::npos) end = file_text.size();
    std::string_view line = file_text.substr(i, end - i);
    if (line.find_first_not_of(" \t") == std::string_view::npos) {
      if (!current.empty()) messages.push_back(std::exchange(current, {}));
    } else {
      current.append(line);
      current.push_back('\r');
    }
    if (end == file_text.size()) break;
    // CRLF is one line end.
    i = end + ((file_text[end] == '\r' && end + 1 < file_text.size() && file_text[end + 1] == '\n')
                   ? 2
                   : 1);
  }
  if (!current.empty()) messages.push_back(std::move(current));
  return messages;
}

MllpSender::~MllpSender() {
  if (fd_ >= 0) ::close(fd_);
}

Status MllpSender::connect() {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* found = nullptr;
  std::string service = std::to_string(options_.port);
  if (int rc = ::getaddrinfo(options_.host.c_str(), service.c_str(), &hints, &found); rc != 0) {
    return Status::Unavailable(
        fmt::format("cannot resolve {}: {}", options_.host, ::gai_strerror(rc)));
  }
  std::string last_error = "no address";
  for (addrinfo* a = found; a != nullptr; a = a->ai_next) {
    int fd = ::socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
    if (fd < 0) {
      last_error = std::strerror(errno);
      continue;
    }
    if (::connect(fd, a->ai_addr, a->ai_addrlen) == 0) {
      fd_ = fd;
      break;
    }
    last_error = std::strerror(errno);
    ::close(fd);
  }
  ::freeaddrinfo(found);
  if (fd_ < 0) {
    return Status::Unavailable(
        fmt::format("cannot connect to {} port {}: {}", options_.host, options_.port, last_error));
  }
  return Status::Ok();
}

Status MllpSender::write_all(ByteView bytes) {
  std::size_t step = options_.chunk == 0 ? bytes.size() : options_.chunk;
  std::size_t off = 0;
  while (off < bytes.size()) {
    std::size_t n = std::min(step, bytes.size() - off);
    std::size_t done = 0;
    while (done < n) {
      ssize_t w = ::send(fd_, bytes.data() + off + done, n - done, MSG_NOSIGNAL);
      if (w < 0 && errno == EINTR) continue;
      if (w < 0) return Status::Unavailable(fmt::format("send: {}", std::strerror(errno)));
      done += static_cast<std::size_t>(w);
    }
    off += n;
    if (options_.chunk != 0 && off < bytes.size()) std::this_thread::sleep_for(options_.pause);
  }
  return Status::Ok();
}

Status MllpSender::send(std::string_view message) {
  if (fd_ < 0) return Status::FailedPrecondition("not connected");
  Result<Bytes> framed = encode_frame(as_bytes(message));
  if (!framed.ok()) return framed.status();
  if (options_.junk) MEDGATE_RETURN_IF_ERROR(write_all(as_bytes(kJunk)));
  ByteView all(*framed);
  if (!options_.split_trailer) return write_all(all);
  MEDGATE_RETURN_IF_ERROR(write_all(all.first(all.size() - 1)));
  std::this_thread::sleep_for(options_.pause);
  return write_all(all.last(1));
}

Result<std::string> MllpSender::receive() {
  if (fd_ < 0) return Status::FailedPrecondition("not connected");
  auto deadline = std::chrono::steady_clock::now() + options_.ack_timeout;
  std::byte buffer[16 * 1024];
  while (next_ready_ >= ready_.size()) {
    ready_.clear();
    next_ready_ = 0;
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) {
      return Status::Unavailable(fmt::format("no ACK within {} ms", options_.ack_timeout.count()));
    }
    pollfd p{fd_, POLLIN, 0};
    int ready = ::poll(&p, 1, static_cast<int>(left.count()));
    if (ready < 0 && errno == EINTR) continue;
    if (ready < 0) return Status::Unavailable(fmt::format("poll: {}", std::strerror(errno)));
    if (ready == 0) continue;
    ssize_t n = ::read(fd_, buffer, sizeof buffer);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return Status::Unavailable(fmt::format("read: {}", std::strerror(errno)));
    if (n == 0) return Status::Unavailable("the listener closed the connection before an ACK");
    ready_ = deframer_.feed(ByteView(buffer, static_cast<std::size_t>(n)));
  }
  Result<Bytes>& frame = ready_[next_ready_++];
  if (!frame.ok()) return frame.status();
  return to_string(*frame);
}

}  // namespace medgate::appliance::hl7
