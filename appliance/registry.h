// The device registry: which devices may send, as whom, for which patient.
//
// Every change is recorded on the ledger first (a device-event entry: add, bind, revoke,
// rotate-psk; the bound patient appears only as its pseudonym, as the entry's subject, and no
// secret is ever on the ledger), then applied to the registry's own SQLite file
// (`<data_dir>/registry.db`). A crash between the two leaves the change recorded but not applied:
// the admin's command did not answer, and running it again applies it (recording it a second
// time, which an audit shows as a retry).
//
// CoAP devices authenticate with DTLS-PSK: identity = device id, key = a random 32-character
// base64url string (printable, so `coap-client -k` can take it), shown once and stored only
// wrapped by the key store's KEK. HL7 sources are recognised by MSH-3 (sending application) and
// MSH-4 (sending facility; empty matches any), optionally restricted to an address allow-list and
// to a TLS client certificate (cert_binding.h).
//
// The registry implements DeviceDirectory for the listeners from memory: PSKs are unwrapped and
// bound patients' identifiers decrypted once, at open and on change, so a DTLS handshake never
// waits for the key store or the disk.
//
// Thread safety: all methods from any thread.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "appliance/ingest.h"
#include "appliance/ip_network.h"
#include "appliance/vault.h"
#include "hsm/key_store.h"
#include "ledger/entry.h"
#include "ledger/sqlite.h"
#include "ledger/store.h"

namespace medgate::appliance {

enum class DeviceKind { kCoap, kHl7 };
std::string_view device_kind_name(DeviceKind kind);
std::optional<DeviceKind> parse_device_kind(std::string_view name);

struct DeviceInfo {
  std::string id;
  DeviceKind kind = DeviceKind::kCoap;
  bool revoked = false;
  std::optional<Pseudonym> patient;  // bound patient
  std::string hl7_application, hl7_facility;
  // HL7 sources: the networks it may send from (empty: any address). Checked on each message
  // against the connection's peer address.
  std::vector<IpNetwork> allow;
  // HL7 sources: the TLS client certificate it must send with (none: any connection). Checked
  // on each message against the connection's verified certificate.
  CertBinding cert;
  std::uint64_t created_us = 0, updated_us = 0;
  std::uint64_t last_entry = 0;  // the ledger entry of the latest change
};

struct DeviceChange {
  DeviceInfo device;
  std::uint64_t entry = 0;  // the device-event entry
  std::string psk;          // a new PSK (add or rotate-psk of a CoAP device), shown once
};

class DeviceRegistry final : public DeviceDirectory {
 public:
  // Opens or creates `path`. Unwraps every PSK and decrypts every bound patient's identifier.
  static Result<std::unique_ptr<DeviceRegistry>> open(const std::filesystem::path& path,
                                                      hsm::KeyStore& keys, Vault& vault,
                                                      ledger::Ledger& ledger);
  ~DeviceRegistry() override;

  // Device ids: 1-64 characters of [A-Za-z0-9._-] (they are PSK identities and log words).
  // kInvalidArgument for a bad id or kind, kFailedPrecondition when it exists.
  Result<DeviceChange> add(const std::string& id, DeviceKind kind,
                           const std::optional<std::string>& patient_id,
                           const std::string& hl7_application, const std::string& hl7_facility,
                           const std::string& actor, std::vector<IpNetwork> allow = {},
                           CertBinding cert = {});
  Result<DeviceChange> bind(const std::string& id, const std::string& patient_id,
                            const std::string& actor);
  Result<DeviceChange> revoke(const std::string& id, const std::string& actor);
  Result<DeviceChange> rotate_psk(const std::string& id, const std::string& actor);
  // Replaces an HL7 source's address allow-list (empty: any address). kInvalidArgument for a CoAP
  // device (DTLS-PSK authenticates those).
  Result<DeviceChange> set_allow(const std::string& id, std::vector<IpNetwork> allow,
                                 const std::string& actor);

  // Binds an HL7 source to a TLS client certificate, or unbinds it (CertBinding{}: any
  // connection). kInvalidArgument for a CoAP device, kFailedPrecondition when revoked.
  Result<DeviceChange> set_cert(const std::string& id, CertBinding cert, const std::string& actor);

  // A replicated ledger (appliance/cluster.h): applies a device event from the ledger's blocks,
  // in ledger order, so that a device added, revoked or given an allow-list at another member
  // takes effect here too. Events already applied here (by index) change nothing.
  Status apply_replicated(std::uint64_t index, const ledger::Entry& entry);
  // The index of the last device event applied from the ledger (0: none).
  std::uint64_t replicated_through() const;

  std::vector<DeviceInfo> list() const;
  Result<DeviceInfo> show(const std::string& id) const;

  // DeviceDirectory
  std::optional<DeviceCredentials> coap_device(std::string_view identity) const override;
  std::optional<DeviceCredentials> hl7_source(std::string_view application,
                                              std::string_view facility) const override;

 private:
  DeviceRegistry(ledger::sql::Database db, hsm::KeyStore& keys, Vault& vault,
                 ledger::Ledger& ledger);
  Status load();
  Result<std::uint64_t> record(const std::string& event, const DeviceInfo& d,
                               const std::string& actor, const std::optional<Bytes>& sealed_psk);
  // Under mu_ (held by `lk`, released while the ledger append waits).
  Result<DeviceChange> apply(const char* event, DeviceInfo d, const std::string& actor,
                             bool make_psk, std::unique_lock<std::mutex>& lk);
  Status store(const DeviceInfo& d, const std::optional<Bytes>& wrapped_psk);
  Result<std::string> new_psk();
  Result<Bytes> wrap_psk(const std::string& id, const std::string& psk);
  Status cache(const DeviceInfo& d, const std::optional<std::string>& psk);
  Status mark_replicated(std::uint64_t index);

  std::mutex change_mu_;   // serializes local changes (held across the ledger append)
  mutable std::mutex mu_;  // guards the caches; never held while the ledger append waits
  // A replicated ledger: the highest device event applied (apply_replicated); a local change waits
  // on applied_cv_ for its own.
  std::uint64_t replicated_index_ = 0;
  std::condition_variable applied_cv_;
  mutable ledger::sql::Database db_;
  hsm::KeyStore& keys_;
  Vault& vault_;
  ledger::Ledger& ledger_;
  std::map<std::string, DeviceInfo> devices_;
  std::map<std::string, DeviceCredentials> credentials_;  // by device id
};

}  // namespace medgate::appliance
