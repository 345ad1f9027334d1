// The seam between the device-facing listeners (HL7/MLLP in appliance/hl7/, CoAP/SenML in
// appliance/coap/) and what makes a reading durable (vault encryption, ledger append). A
// listener authenticates its peer, parses, maps to Observations and submits a batch; it answers the
// device only when `done` reports the batch durable (AA, 2.04) or failed.
//
// Backpressure: submit() never blocks. When the pipeline is full it answers kBusy without taking
// the batch, and the listener pushes back on the device (MLLP: stop reading the socket; CoAP:
// 5.03 Service Unavailable with Max-Age). Nothing is acknowledged early and nothing accepted is
// dropped.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "appliance/cert_binding.h"
#include "appliance/ip_network.h"
#include "appliance/observation.h"
#include "hsm/bytes.h"
#include "hsm/status.h"

namespace medgate::appliance {

enum class SourceKind { kHl7, kCoap };

struct IngestBatch {
  SourceKind kind = SourceKind::kHl7;
  // The authenticated source: a registered device id (CoAP PSK identity, or the HL7 source
  // registered for MSH-3/MSH-4).
  std::string device_id;
  // The source's id for this message (HL7 MSH-10, CoAP: empty): a retransmission of a message
  // already committed is acknowledged again without being recorded twice.
  std::string message_id;
  std::vector<Observation> observations;
  // An admission/update message (HL7 ADT): the identifiers to index (each gets its pseudonym and
  // its vault record) and the event ("ADT^A01"); recorded as one patient-event entry.
  std::vector<std::string> patient_ids;
  std::string event;
};

// What happened to a batch, for the listener's answer and its per-device counters.
struct IngestResult {
  Status status;                        // OK: durable
  std::uint64_t first_entry = 0;        // ledger index of the first observation entry (if OK)
  bool duplicate = false;               // a retransmission: acknowledged, not recorded again
};

class IngestSink {
 public:
  virtual ~IngestSink() = default;

  enum class Admit { kAccepted, kBusy };

  // Never blocks. kAccepted: `done` is called exactly once, on another thread, when the batch is
  // durable or has failed. kBusy: the pipeline is full; the batch was not taken and `done` is never
  // called.
  virtual Admit submit(IngestBatch batch, std::function<void(IngestResult)> done) = 0;
};

// A registered device as the listeners need it for authentication.
struct DeviceCredentials {
  std::string device_id;
  bool revoked = false;
  std::string patient_id;  // the patient a CoAP device is bound to (PHI: never logged)
  Bytes psk;               // CoAP DTLS pre-shared key (unwrapped; kept in memory only)
  std::vector<IpNetwork> allow;  // HL7: the networks it may send from; empty: any
  CertBinding cert;              // HL7: the TLS client certificate it must send with; none: any
  // Bound at another member of the cluster: the patient's pseudonym (the identifier is not
  // known here).
  std::optional<Hash> patient_pseudonym = std::nullopt;
};

class DeviceDirectory {
 public:
  virtual ~DeviceDirectory() = default;
  // The CoAP device whose PSK identity is `identity`; nullopt when unknown. Called from the
  // listener's thread during DTLS handshakes: must not block on the ledger or the key store.
  virtual std::optional<DeviceCredentials> coap_device(std::string_view identity) const = 0;
  // The HL7 source registered for sending application/facility (MSH-3, MSH-4); nullopt if none.
  virtual std::optional<DeviceCredentials> hl7_source(std::string_view application,
                                                      std::string_view facility) const = 0;
};

}  // namespace medgate::appliance
