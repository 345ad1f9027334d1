// The CoAP listener: devices POST SenML to /obs over DTLS-PSK (coaps, 5684), the PSK identity
// being the device id. A reading is answered 2.04 Changed only once the IngestSink reports it
// durable; until then the device holds an empty ACK (a separate response, RFC 7252 5.2.2).
//
// Answers to POST /obs:
//   2.04  the batch is durable
//   4.00  malformed SenML (diagnostic payload names the record and field, never a value)
//   4.01  unknown device (plain CoAP only: over DTLS an unknown identity fails the handshake,
//         since there is no key to authenticate it with)
//   4.03  revoked device, or a device not bound to a patient (the diagnostic says which)
//   4.13  payload over max_payload, or a pack over the SenML limits (senml.h)
//   4.15  content-format other than 110 (SenML JSON) or 112 (SenML CBOR), or none
//   5.00  the sink failed to make the batch durable (no detail)
//   5.03  the sink is full (backpressure) or the server is stopping; Max-Age says when to retry
//
// Revoked devices: the handshake completes with the device's key and every request is answered
// 4.03. Only a holder of the key learns that it is revoked, and the device gets an answer it can
// report instead of a silent handshake failure. The directory is asked again on every request,
// so a revocation or a new patient binding takes effect on the next POST of an open session.
//
// Plain CoAP (plain_port, off by default) has no authentication at all: the device names itself
// in a Uri-Query "d=DEVICE-ID". It is meant for isolated bench networks and diagnosis only.
//
// Threading: libcoap runs on one thread owned by the server. The sink's `done` may run on any
// thread; it only queues the result and wakes the loop (an eventfd), which answers the device.
// start() and stop() are for the owner's thread; counters() is thread-safe and keeps working
// after stop(). A CoapServer starts once.
#pragma once

#include <array>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include "appliance/coap/senml.h"
#include "appliance/ingest.h"
#include "hsm/status.h"

namespace medgate::appliance::coap {

struct CoapServerConfig {
  std::string address = "::";               // numeric IPv4 or IPv6 address to listen on
  std::uint16_t port = 5684;                // coaps (DTLS-PSK)
  std::optional<std::uint16_t> plain_port;  // plain CoAP, unauthenticated: off unless set
  std::size_t max_payload = kMaxPackBytes;  // larger bodies are answered 4.13
  std::chrono::seconds busy_max_age{1};     // Max-Age of a 5.03
};

// Why a POST was not acknowledged 2.04. The values index DeviceCounters::rejected.
enum class RejectReason : std::size_t {
  kUnsupportedFormat,  // 4.15
  kTooLarge,           // 4.13
  kMalformed,          // 4.00
  kRevoked,            // 4.03
  kNoPatient,          // 4.03
  kBusy,               // 5.03 (sink full or server stopping)
  kFailed,             // 5.00
};
inline constexpr std::size_t kRejectReasonCount = 7;
std::string_view reject_reason_name(RejectReason reason);

struct DeviceCounters {
  std::uint64_t received = 0;                                // POSTs to /obs from this device
  std::uint64_t committed = 0;                               // answered 2.04
  std::array<std::uint64_t, kRejectReasonCount> rejected{};  // by RejectReason
  std::uint64_t last_seen_us = 0;                            // last POST, µs since the Unix epoch
};

struct CoapCounters {
  // Registered devices only (the identity was known to the directory): the map is bounded by
  // the registry, whatever peers send.
  std::map<std::string, DeviceCounters> devices;
  std::uint64_t unknown_identity = 0;  // handshakes refused, plain requests answered 4.01
  std::uint64_t handshake_errors = 0;  // DTLS errors (wrong key, broken handshake)
};

class CoapServer {
 public:
  CoapServer();
  ~CoapServer();  // stop()s if still running
  CoapServer(const CoapServer&) = delete;
  CoapServer& operator=(const CoapServer&) = delete;

  // Binds the endpoints and starts the loop thread. `directory` and `sink` must stay alive until
  // stop() returns. Fails (kUnavailable) when DTLS is not available or an endpoint cannot be
  // bound, (kInvalidArgument) for an unparseable address, (kFailedPrecondition) if this server
  // was started before.
  Status start(const CoapServerConfig& config, const DeviceDirectory& directory, IngestSink& sink);

  // Stops taking readings (new POSTs get 5.03, new handshakes fail), waits until every batch the
  // sink accepted has called `done` and its answer has been sent (or given up after a short
  // grace period for the device's ACK), then closes the endpoints and joins the thread.
  // Idempotent. Waits as long as the sink takes: the sink's contract is that `done` comes.
  void stop();

  CoapCounters counters() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace medgate::appliance::coap
