// medgate-mllp-send: sends HL7 messages over MLLP and prints each ACK (MSA-1, MSA-2, error
// text). For admins diagnosing a sender or the listener, and for tests.
//
// Exit codes: 0 every message got AA/CA; 1 any AE/AR/CE/CR; 2 bad arguments or unreadable files;
// 3 the listener could not be reached, the TLS handshake failed, or the connection was lost
// before every ACK.
#include <cstdio>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <CLI/CLI.hpp>

#include "appliance/hl7/sender.h"

namespace {

using medgate::Result;
using medgate::Status;
using namespace medgate::appliance::hl7;

struct Outgoing {
  std::string label;  // file, and #n when the file holds several messages
  std::string text;
};

// 1 for a negative ACK, 0 otherwise.
int report(const Outgoing& message, const Result<std::string>& ack) {
  Result<AckSummary> summary = summarize_ack(*ack);
  if (!summary.ok()) {
    fmt::print("{}: unreadable ACK: {}\n", message.label, summary.status().message());
    return 1;
  }
  fmt::print("{}: {} {}{}\n", message.label, summary->code, summary->control_id,
             summary->text.empty() ? "" : " : " + summary->text);
  return summary->accepted() ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Send HL7 v2 messages over MLLP and print the ACKs"};
  MllpSendOptions options;
  std::vector<std::string> files;
  bool pipeline = false;
  int timeout_ms = 30'000;
  int pause_ms = 1;
  app.add_option("--host", options.host, "listener host")->capture_default_str();
  app.add_option("--port", options.port, "listener port")->capture_default_str();
  app.add_option("--chunk", options.chunk, "write N bytes at a time (0: whole frames)");
  app.add_option("--pause-ms", pause_ms, "sleep between fragmented writes")->capture_default_str();
  app.add_flag("--split-trailer", options.split_trailer, "write 0x1C and 0x0D separately");
  app.add_flag("--junk", options.junk, "send garbage between frames");
  app.add_flag("--pipeline", pipeline, "send every message, then read the ACKs");
  app.add_option("--timeout-ms", timeout_ms, "wait this long for each ACK")->capture_default_str();
  app.add_flag("--tls", options.tls, "MLLP over TLS");
  app.add_option("--ca", options.ca_file,
                 "with --tls: CA certificates the listener's must verify against");
  app.add_option("--cert", options.cert_file, "with --tls: client certificate chain (PEM)");
  app.add_option("--key", options.key_file, "with --tls: the client certificate's key (PEM)");
  app.add_option("FILE", files, "HL7 files (a blank line separates messages)")->required();
  CLI11_PARSE(app, argc, argv);
  if (!options.tls &&
      (!options.ca_file.empty() || !options.cert_file.empty() || !options.key_file.empty())) {
    fmt::print(stderr, "--ca, --cert and --key are for --tls\n");
    return 2;
  }
  options.ack_timeout = std::chrono::milliseconds(timeout_ms);
  options.pause = std::chrono::milliseconds(pause_ms);

  std::vector<Outgoing> messages;
  for (const std::string& file : files) {
    std::ifstream in(file, std::ios::binary);
    if (!in) {
      fmt::print(stderr, "cannot read {}\n", file);
      return 2;
    }
    std::string text{std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
    std::vector<std::string> split = split_messages(text);
    for (std::size_t i = 0; i < split.size(); ++i) {
      std::string label = split.size() == 1 ? file : fmt::format("{}#{}", file, i + 1);
      messages.push_back({std::move(label), std::move(split[i])});
    }
  }

  MllpSender sender(options);
  if (Status s = sender.connect(); !s.ok()) {
    fmt::print(stderr, "{}\n", s.message());
    return s.code() == medgate::StatusCode::kInvalidArgument ? 2 : 3;
  }
  int result = 0;
  auto lost = [](const Status& s) {
    fmt::print(stderr, "{}\n", s.message());
    return 3;
  };
  if (pipeline) {
    for (const Outgoing& m : messages) {
      if (Status s = sender.send(m.text); !s.ok()) return lost(s);
    }
    for (const Outgoing& m : messages) {
      Result<std::string> ack = sender.receive();
      if (!ack.ok()) return lost(ack.status());
      result |= report(m, ack);
    }
    return result;
  }
  for (const Outgoing& m : messages) {
    if (Status s = sender.send(m.text); !s.ok()) return lost(s);
    Result<std::string> ack = sender.receive();
    if (!ack.ok()) return lost(ack.status());
    result |= report(m, ack);
  }
  return result;
}
