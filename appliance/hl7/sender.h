// The sending side of MLLP, for medgate-mllp-send (a diagnosis tool for admins) and tests: sends
// HL7 messages to a listener and reads the ACKs back, optionally fragmenting on purpose the way
// real networks do (loopback rarely splits anything by itself).
//
// Not thread-safe; one MllpSender per connection.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "appliance/hl7/mllp.h"
#include "hsm/status.h"

typedef struct ssl_ctx_st SSL_CTX;
typedef struct ssl_st SSL;

namespace medgate::appliance::hl7 {

struct MllpSendOptions {
  std::string host = "127.0.0.1";
  std::uint16_t port = 2575;
  std::size_t chunk = 0;               // write this many bytes at a time (0: a frame in one write)
  std::chrono::milliseconds pause{1};  // between the writes of --chunk and --split-trailer
  bool split_trailer = false;          // 0x1C and 0x0D in separate writes
  bool junk = false;                   // garbage (no 0x0B) before each frame
  std::chrono::milliseconds ack_timeout{30'000};
  // MLLP over TLS: the listener's certificate must verify against `ca_file` and name `host` (a
  // DNS name, or an IP address in its subjectAltName). cert_file/key_file: a client certificate.
  bool tls = false;
  std::string ca_file;
  std::string cert_file;
  std::string key_file;
};

// An ACK as the tool reports it.
struct AckSummary {
  std::string code;        // MSA-1: AA, AE, AR, CA, CE, CR
  std::string control_id;  // MSA-2: the MSH-10 it acknowledges
  std::string text;        // MSA-3 and ERR-8 (or ERR-3.2), joined; empty for an AA
  bool accepted() const { return code == "AA" || code == "CA"; }
};

// Reads MSA (and ERR) out of an ACK. kInvalidArgument when it is not an HL7 message with MSA.
Result<AckSummary> summarize_ack(std::string_view ack);

// The messages in a file: segments end in CR, LF or CRLF (all become CR); a blank line ends a
// message. A file without blank lines is one message.
std::vector<std::string> split_messages(std::string_view file_text);

class MllpSender {
 public:
  explicit MllpSender(MllpSendOptions options) : options_(std::move(options)) {}
  ~MllpSender();
  MllpSender(const MllpSender&) = delete;
  MllpSender& operator=(const MllpSender&) = delete;

  // kUnavailable when the host cannot be resolved or reached, or the TLS handshake fails (the
  // message says why: e.g. the certificate does not verify); kInvalidArgument for unreadable
  // TLS files.
  Status connect();
  // Frames `message` and writes it as the options say. kInvalidArgument if the message cannot
  // be framed (it contains 0x0B or 0x1C 0x0D), kUnavailable when the connection is lost.
  Status send(std::string_view message);
  // The next ACK. kUnavailable when the connection closes or ack_timeout passes first.
  Result<std::string> receive();

 private:
  Status write_all(ByteView bytes);
  Status start_tls();
  Status write_some(const std::byte* data, std::size_t n);

  MllpSendOptions options_;
  int fd_ = -1;
  SSL_CTX* tls_ctx_ = nullptr;
  SSL* ssl_ = nullptr;
  MllpDeframer deframer_;
  std::vector<Result<Bytes>> ready_;  // frames read but not yet returned
  std::size_t next_ready_ = 0;
};

}  // namespace medgate::appliance::hl7
