// The MLLP listener: HL7 v2 senders (monitors, central stations, lab systems) connect over TCP,
// send one message per MLLP frame and wait for its ACK. This component moves bytes: it deframes
// (mllp.h), decides per frame (receiver.h), checks the sender against the device registry, hands
// accepted observations to the ingest seam (ingest.h) and answers.
//
// The rules it keeps:
//  - An AA (CA) is sent only when the sink's `done` reports the batch durable; a sink failure is
//    answered AE (CE) with ERR 207, so the sender sends the message again.
//  - One message per connection at a time. HL7 senders expect ACKs in the order they sent, and
//    not reading a connection while its message is in flight is also what pushes back on a
//    sender (TCP flow control) when the pipeline is slow.
//  - kBusy from the sink: the batch is kept, the connection is not read, and the submit is
//    retried after `busy_retry`. Nothing is dropped and nothing is acknowledged early.
//  - Unknown or revoked sending application/facility (MSH-3/MSH-4): AE (CE) with ERR 204 and
//    nothing submitted. Unparseable frames: AR (CR). The connection survives both.
//  - An idle peer (no bytes for `read_timeout` while the listener waits for it) is disconnected.
//    A peer that closes mid-frame loses that frame (never acknowledged, never submitted); it is
//    counted.
//  - ADT messages are acknowledged AA without being submitted: the patient index they update is
//    not wired yet (the daemon will add a hook for it).
//  - With `tls` (hl7/tls.h), every connection begins with a TLS handshake on the same epoll
//    thread, never blocking it: a plain-text client, a failed verification or a peer that does
//    not finish within tls->handshake_timeout is closed and counted, and nothing it sent is read
//    as HL7. A source bound to a client certificate (DeviceCredentials::cert) is answered AE
//    (CE) with ERR 204 on a connection whose verified certificate does not match, as for an
//    address outside its allow-list. Each handshake signs once with the key store's TLS key on
//    this thread: fine for SoftHSM or a network HSM; a slow smart card would slow every handshake.
//
// Logs carry sources (MSH-3/MSH-4, device ids), control ids and counts, never message content.
//
// Thread-safety: start() and stop() from one owning thread; counters() and port() from any
// thread. The listener runs one epoll thread of its own; the sink's `done` may be called from
// any thread, also after stop() returned (it is then ignored).
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>

#include "appliance/hl7/mllp.h"
#include "appliance/hl7/tls.h"
#include "appliance/ingest.h"
#include "hsm/status.h"

namespace medgate::appliance::hl7 {

inline constexpr std::uint16_t kDefaultMllpPort = 2575;

struct MllpListenerConfig {
  std::string address = "0.0.0.0";        // an IPv4 or IPv6 literal
  std::uint16_t port = kDefaultMllpPort;  // 0: any free port (see MllpListener::port())
  std::size_t max_connections = 256;      // more are accepted and closed at once (counted)
  std::size_t max_frame_bytes = kDefaultMaxFrame;
  // How long the listener waits for a peer (its next bytes, or reading an ACK) before closing.
  std::chrono::milliseconds read_timeout{60'000};
  // How long to wait before submitting again after the sink said kBusy.
  std::chrono::milliseconds busy_retry{20};
  // How long stop() waits for messages in flight to complete and their ACKs to be written.
  std::chrono::milliseconds stop_grace{30'000};
  // MLLP over TLS; absent: plain TCP.
  std::optional<MllpTlsConfig> tls;
};

// Per registered source (keyed by device id). No content, so it can be shown and logged.
struct MllpSourceCounters {
  std::uint64_t received = 0;    // frames with a usable header from this source
  std::uint64_t committed = 0;   // ORU batches reported durable (AA/CA sent, or asked not to)
  std::uint64_t duplicates = 0;  // of those, retransmissions the sink did not record again
  std::uint64_t adt = 0;         // ADT acknowledged (not yet submitted, see above)
  std::uint64_t rejected_unparseable = 0;    // AR/CR
  std::uint64_t rejected_unprocessable = 0;  // AE/CE from the message itself (type, PID-3, OBX)
  std::uint64_t rejected_revoked = 0;        // AE/CE 204: the source is revoked
  std::uint64_t rejected_address = 0;        // AE/CE 204: sent from outside its allow-list
  std::uint64_t rejected_certificate = 0;    // AE/CE 204: not its bound client certificate
  std::uint64_t failed = 0;                  // AE/CE 207: the sink could not make it durable
  std::uint64_t busy_retries = 0;            // submits answered kBusy
  std::uint64_t last_seen_us = 0;            // µs since the epoch of the last frame
};

struct MllpListenerCounters {
  std::uint64_t connections_accepted = 0;
  std::uint64_t connections_refused = 0;  // over max_connections
  std::uint64_t connections_open = 0;
  std::uint64_t read_timeouts = 0;
  std::uint64_t incomplete_frames = 0;   // the peer closed mid-frame
  std::uint64_t unparseable_frames = 0;  // AR without a usable header (no source to count it on)
  std::uint64_t oversize_frames = 0;     // over max_frame_bytes (answered AR)
  std::uint64_t abandoned_frames = 0;    // a new 0x0B before a frame ended
  std::uint64_t junk_bytes = 0;          // bytes between frames
  std::uint64_t unknown_source = 0;      // AE 204: MSH-3/MSH-4 not registered
  std::uint64_t acks_sent = 0;
  std::uint64_t acks_unsent = 0;  // the peer was gone when its ACK was ready
  std::uint64_t tls_handshakes = 0;          // completed
  std::uint64_t tls_handshake_failures = 0;  // refused: plain text, bad or missing certificate
  std::uint64_t tls_handshake_timeouts = 0;  // not finished within tls->handshake_timeout
  std::map<std::string, MllpSourceCounters> sources;
};

class MllpListener {
 public:
  MllpListener();
  ~MllpListener();  // stop()s
  MllpListener(const MllpListener&) = delete;
  MllpListener& operator=(const MllpListener&) = delete;

  // Binds, listens and starts the epoll thread. kInvalidArgument for a bad address or config,
  // kUnavailable when the port cannot be bound, kFailedPrecondition if already started; with
  // `tls`, the errors of TlsServerContext::create().
  // `directory` and `sink` must outlive stop().
  Status start(MllpListenerConfig config, const DeviceDirectory& directory, IngestSink& sink);

  // The bound port (the chosen one when the config said 0); 0 before start().
  std::uint16_t port() const;
  // Whether connections are TLS, and whether clients must present certificates.
  bool tls() const;
  bool verifies_clients() const;

  // Stops accepting and reading, waits up to stop_grace for the messages in flight to complete
  // and their ACKs to be written, then closes every connection. Frames received but not begun
  // are not acknowledged (the sender sends them again). Idempotent.
  void stop();

  MllpListenerCounters counters() const;

 private:
  class Loop;
  std::unique_ptr<Loop> loop_;
};

}  // namespace medgate::appliance::hl7
