#include "appliance/registry.h"

#include <fmt/format.h>

#include "ledger/entry.h"

namespace medgate::appliance {
namespace {

constexpr std::string_view kSchema = R"sql(
  CREATE TABLE IF NOT EXISTS devices (
    id TEXT PRIMARY KEY, kind TEXT NOT NULL, revoked INTEGER NOT NULL,
    patient BLOB,              -- the bound patient's pseudonym (32 bytes) or NULL
    psk BLOB,                  -- CoAP: the PSK wrapped by the key store's KEK
    hl7_application TEXT NOT NULL, hl7_facility TEXT NOT NULL,
    created_us INTEGER NOT NULL, updated_us INTEGER NOT NULL, last_entry INTEGER NOT NULL,
    allow TEXT NOT NULL DEFAULT '',  -- HL7: allowed networks, space-separated; '' is any
    cert TEXT NOT NULL DEFAULT '');  -- HL7: 'sha256:HEX' or 'cn:NAME' of its client cert; '' any
  -- A replicated ledger (appliance/cluster.h): the index of the last device event applied from
  -- the ledger's blocks, so a restart replays from there.
  CREATE TABLE IF NOT EXISTS replicated (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
)sql";

// Registries written before HL7 sources had address allow-lists (`allow`) or client
// certificates (`cert`) lack the column; it is added in place, empty (any) for every device.
Status add_column(ledger::sql::Database& db, std::string_view column) {
  MEDGATE_ASSIGN_OR_RETURN(auto st, db.prepare("SELECT count(*) FROM pragma_table_info('devices') "
                                               "WHERE name = ?"));
  st.bind(1, column);
  MEDGATE_ASSIGN_OR_RETURN(auto step, st.step());
  if (step == ledger::sql::Statement::Step::kRow && st.column_int(0) > 0) return Status::Ok();
  return db.exec(fmt::format("ALTER TABLE devices ADD COLUMN {} TEXT NOT NULL DEFAULT ''", column));
}

std::string allow_text(const std::vector<IpNetwork>& allow) {
  std::string out;
  for (const IpNetwork& n : allow) out += (out.empty() ? "" : " ") + n.to_string();
  return out;
}

constexpr std::size_t kPskRandomBytes = 24;  // 32 base64url characters

Bytes psk_context(const std::string& id) {
  return to_bytes("medgate device-psk v1\0" + id);
}

bool valid_id(const std::string& id) {
  if (id.empty() || id.size() > 64) return false;
  for (char c : id)
    if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
          c == '_' || c == '-'))
      return false;
  return true;
}

}  // namespace

std::string_view device_kind_name(DeviceKind kind) {
  return kind == DeviceKind::kCoap ? "coap" : "hl7";
}

std::optional<DeviceKind> parse_device_kind(std::string_view name) {
  if (name == "coap") return DeviceKind::kCoap;
  if (name == "hl7") return DeviceKind::kHl7;
  return std::nullopt;
}

DeviceRegistry::DeviceRegistry(ledger::sql::Database db, hsm::KeyStore& keys, Vault& vault,
                               ledger::Ledger& ledger)
    : db_(std::move(db)), keys_(keys), vault_(vault), ledger_(ledger) {}

DeviceRegistry::~DeviceRegistry() = default;

Result<std::unique_ptr<DeviceRegistry>> DeviceRegistry::open(const std::filesystem::path& path,
                                                             hsm::KeyStore& keys, Vault& vault,
                                                             ledger::Ledger& ledger) {
  MEDGATE_ASSIGN_OR_RETURN(ledger::sql::Database db,
                           ledger::sql::Database::open(path, ledger::sql::Database::Mode::kCreate));
  MEDGATE_RETURN_IF_ERROR(db.exec("PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL"));
  MEDGATE_RETURN_IF_ERROR(
      db.exec(kSchema).with_context(path.string() + " is not a device registry"));
  MEDGATE_RETURN_IF_ERROR(add_column(db, "allow").with_context(path.string()));
  MEDGATE_RETURN_IF_ERROR(add_column(db, "cert").with_context(path.string()));
  std::unique_ptr<DeviceRegistry> r(new DeviceRegistry(std::move(db), keys, vault, ledger));
  MEDGATE_RETURN_IF_ERROR(r->load().with_context(path.string()));
  return r;
}

Status DeviceRegistry::load() {
  MEDGATE_ASSIGN_OR_RETURN(
      auto st, db_.prepare("SELECT id, kind, revoked, patient, psk, hl7_application, hl7_facility, "
                           "created_us, updated_us, last_entry, allow, cert FROM devices"));
  for (;;) {
    MEDGATE_ASSIGN_OR_RETURN(auto step, st.step());
    if (step != ledger::sql::Statement::Step::kRow) break;
    DeviceInfo d;
    d.id = st.column_text(0);
    std::optional<DeviceKind> kind = parse_device_kind(st.column_text(1));
    if (!kind) return Status::Corruption(fmt::format("device {} has an unknown kind", d.id));
    d.kind = *kind;
    d.revoked = st.column_int(2) != 0;
    if (!st.column_is_null(3)) {
      ByteView p = st.column_blob(3);
      if (p.size() != 32)
        return Status::Corruption(fmt::format("device {}'s patient is malformed", d.id));
      Pseudonym pseudonym;
      std::copy(p.begin(), p.end(), pseudonym.bytes.begin());
      d.patient = pseudonym;
    }
    std::optional<std::string> psk;
    if (!st.column_is_null(4)) {
      ByteView wrapped = st.column_blob(4);
      Result<hsm::SecretBytes> key = keys_.unwrap_key(wrapped, psk_context(d.id));
      if (!key.ok()) return key.status().with_context(fmt::format("device {}'s PSK", d.id));
      psk = to_string(key->view());
    }
    d.hl7_application = st.column_text(5);
    d.hl7_facility = st.column_text(6);
    d.created_us = st.column_uint(7);
    d.updated_us = st.column_uint(8);
    d.last_entry = st.column_uint(9);
    if (const std::string allow = st.column_text(10); !allow.empty()) {
      Result<std::vector<IpNetwork>> networks = parse_ip_networks(allow);
      if (!networks.ok())
        return Status::Corruption(
            fmt::format("device {}'s allowed networks: {}", d.id, networks.status().message()));
      d.allow = std::move(*networks);
    }
    Result<CertBinding> cert = parse_cert_binding(st.column_text(11));
    if (!cert.ok())
      return Status::Corruption(
          fmt::format("device {}'s client certificate: {}", d.id, cert.status().message()));
    d.cert = std::move(*cert);
    Status cached = cache(d, psk);
    if (psk) secure_wipe(*psk);
    MEDGATE_RETURN_IF_ERROR(cached);
  }
  return Status::Ok();
}

// Under mu_ (or before the registry is shared). The bound patient's identifier comes from the
// vault; a patient erased since is no patient: the device's readings are refused.
Status DeviceRegistry::cache(const DeviceInfo& d, const std::optional<std::string>& psk) {
  DeviceCredentials c;
  auto old = credentials_.find(d.id);
  if (old != credentials_.end()) c = old->second;
  c.device_id = d.id;
  c.revoked = d.revoked;
  c.patient_id.clear();
  c.patient_pseudonym.reset();
  if (d.patient) {
    Result<std::string> id = vault_.identifier(*d.patient);
    if (id.ok())
      c.patient_id = *id;
    else
      c.patient_pseudonym = d.patient->bytes;  // bound at another member
  }
  if (psk) c.psk = to_bytes(*psk);
  c.allow = d.allow;
  c.cert = d.cert;
  devices_[d.id] = d;
  credentials_[d.id] = std::move(c);
  return Status::Ok();
}

Result<std::string> DeviceRegistry::new_psk() {
  MEDGATE_ASSIGN_OR_RETURN(Bytes random, keys_.random(kPskRandomBytes));
  std::string b64 = to_base64(random);
  secure_wipe(random);
  for (char& c : b64) {
    if (c == '+') c = '-';
    if (c == '/') c = '_';
  }
  return b64;
}

// What a PSK sealed for the other members of a cluster is bound to: the device and the purpose.
Bytes shared_psk_label(const std::string& id) {
  const std::string label = "medgate device psk v1" + std::string(1, '\0') + id;
  ByteView v = as_bytes(label);
  return Bytes(v.begin(), v.end());
}

Result<Bytes> DeviceRegistry::wrap_psk(const std::string& id, const std::string& psk) {
  return keys_.wrap_key(as_bytes(psk), psk_context(id));
}

Result<std::uint64_t> DeviceRegistry::record(const std::string& event, const DeviceInfo& d,
                                             const std::string& actor,
                                             const std::optional<Bytes>& sealed_psk) {
  using ledger::cbor::Value;
  ledger::Entry e;
  e.type = ledger::EntryType::kDeviceEvent;
  e.actor = actor;
  ledger::cbor::Map body{{Value::text("event"), Value::text(event)},
                         {Value::text("device"), Value::text(d.id)},
                         {Value::text("kind"), Value::text(std::string(device_kind_name(d.kind)))},
                         {Value::text("hl7_application"), Value::text(d.hl7_application)},
                         {Value::text("hl7_facility"), Value::text(d.hl7_facility)}};
  if (!d.allow.empty()) {
    ledger::cbor::Array networks;
    for (const IpNetwork& n : d.allow) networks.push_back(Value::text(n.to_string()));
    body.emplace_back(Value::text("allow"), Value::array(std::move(networks)));
  }
  if (d.cert.bound()) body.emplace_back(Value::text("cert"), Value::text(d.cert.to_string()));
  if (sealed_psk) body.emplace_back(Value::text("psk_sealed"), Value::bytes(*sealed_psk));
  MEDGATE_ASSIGN_OR_RETURN(e.body, Value::map(std::move(body)));
  if (d.patient)
    e.subjects.push_back({Bytes(d.patient->bytes.begin(), d.patient->bytes.end()), std::nullopt});
  return ledger_.append(e);
}

Status DeviceRegistry::store(const DeviceInfo& d, const std::optional<Bytes>& wrapped_psk) {
  MEDGATE_ASSIGN_OR_RETURN(
      auto st,
      db_.prepare("INSERT INTO devices (id, kind, revoked, patient, psk, hl7_application, "
                  "hl7_facility, created_us, updated_us, last_entry, allow, cert) VALUES "
                  "(?,?,?,?,?,?,?,?,?,?,?,?) "
                  "ON CONFLICT(id) DO UPDATE SET revoked = excluded.revoked, patient = "
                  "excluded.patient, psk = coalesce(excluded.psk, psk), updated_us = "
                  "excluded.updated_us, last_entry = excluded.last_entry, allow = excluded.allow, "
                  "cert = excluded.cert"));
  st.bind(1, std::string_view(d.id)).bind(2, device_kind_name(d.kind)).bind(3, d.revoked ? 1 : 0);
  if (d.patient) st.bind(4, ByteView(d.patient->bytes));
  if (wrapped_psk) st.bind(5, ByteView(*wrapped_psk));
  st.bind(6, std::string_view(d.hl7_application))
      .bind(7, std::string_view(d.hl7_facility))
      .bind(8, d.created_us)
      .bind(9, d.updated_us)
      .bind(10, d.last_entry);
  const std::string allow = allow_text(d.allow);  // bound without a copy: must outlive run()
  st.bind(11, std::string_view(allow));
  const std::string cert = d.cert.to_string();
  st.bind(12, std::string_view(cert));
  return st.run().with_context(fmt::format("storing device {}", d.id));
}

// Under mu_. Every change: a new PSK wrapped first (so a key-store failure records nothing), then
// the ledger entry, then the registry file, then the in-memory view the listeners read.
Result<DeviceChange> DeviceRegistry::apply(const char* event, DeviceInfo d,
                                           const std::string& actor, bool make_psk,
                                           std::unique_lock<std::mutex>& lk) {
  DeviceChange change;
  std::optional<Bytes> wrapped;
  std::optional<Bytes> sealed;  // for the other members of a cluster
  if (make_psk) {
    MEDGATE_ASSIGN_OR_RETURN(change.psk, new_psk());
    MEDGATE_ASSIGN_OR_RETURN(Bytes w, wrap_psk(d.id, change.psk));
    wrapped = std::move(w);
    MEDGATE_ASSIGN_OR_RETURN(sealed,
                             vault_.seal_for_members(as_bytes(change.psk), shared_psk_label(d.id)));
  }
  // The ledger append waits for the cluster to order the entry on a replicated ledger: the
  // listeners (every HL7 message, every DTLS handshake) must not wait with it.
  lk.unlock();
  Result<std::uint64_t> entry = record(event, d, actor, sealed);
  lk.lock();
  if (!entry.ok()) return entry.status();
  change.entry = *entry;
  if (ledger_.replica()) {
    // A cluster's registry changes in ledger order only: this change is applied when its entry
    // comes back through the follower (apply_replicated), after every other member's change
    // ordered before it, as at every other member.
    if (!applied_cv_.wait_for(lk, std::chrono::seconds(10),
                              [&] { return replicated_index_ >= change.entry; }))
      return Status::Unavailable(fmt::format(
          "device event {} is on the ledger but not applied here yet (the cluster's follower is "
          "behind); it takes effect when it is",
          change.entry));
    auto it = devices_.find(d.id);
    if (it == devices_.end())
      return Status::Internal(fmt::format("device {} is not here after its event", d.id));
    // Without a cluster secret the event carries no sealed PSK: keep the one made here.
    if (make_psk && !sealed) {
      MEDGATE_RETURN_IF_ERROR(store(it->second, wrapped));
      MEDGATE_RETURN_IF_ERROR(cache(it->second, change.psk));
    }
    change.device = it->second;
    return change;
  }
  d.updated_us = ledger::now_us();
  d.last_entry = change.entry;
  MEDGATE_RETURN_IF_ERROR(store(d, wrapped));
  MEDGATE_RETURN_IF_ERROR(
      cache(d, make_psk ? std::optional<std::string>(change.psk) : std::nullopt));
  change.device = std::move(d);
  return change;
}

Result<DeviceChange> DeviceRegistry::add(const std::string& id, DeviceKind kind,
                                         const std::optional<std::string>& patient_id,
                                         const std::string& hl7_application,
                                         const std::string& hl7_facility, const std::string& actor,
                                         std::vector<IpNetwork> allow, CertBinding cert) {
  if (!valid_id(id))
    return Status::InvalidArgument(
        "a device id is 1-64 characters of letters, digits, '.', '_' and '-'");
  std::lock_guard change(change_mu_);  // one change at a time, in the order they are asked
  std::unique_lock lk(mu_);
  if (devices_.count(id))
    return Status::FailedPrecondition(fmt::format("device {} is registered already", id));
  DeviceInfo d;
  d.id = id;
  d.kind = kind;
  if (kind == DeviceKind::kHl7) {
    d.hl7_application = hl7_application.empty() ? id : hl7_application;
    d.hl7_facility = hl7_facility;
    for (const auto& [other_id, other] : devices_)
      if (other.kind == DeviceKind::kHl7 && other.hl7_application == d.hl7_application &&
          other.hl7_facility == d.hl7_facility)
        return Status::FailedPrecondition(fmt::format(
            "device {} is registered already for that sending application and facility", other_id));
    d.allow = std::move(allow);
    d.cert = std::move(cert);
  } else if (!hl7_application.empty() || !hl7_facility.empty()) {
    return Status::InvalidArgument("a CoAP device has no HL7 application or facility");
  } else if (!allow.empty()) {
    return Status::InvalidArgument(
        "a CoAP device has no address allow-list: its DTLS key authenticates it");
  } else if (cert.bound()) {
    return Status::InvalidArgument(
        "a CoAP device has no TLS client certificate: its DTLS key authenticates it");
  }
  if (patient_id) {
    MEDGATE_ASSIGN_OR_RETURN(Pseudonym p, vault_.pseudonym(*patient_id));
    d.patient = p;
  }
  d.created_us = ledger::now_us();
  return apply("add", std::move(d), actor, /*new_psk=*/kind == DeviceKind::kCoap, lk);
}

Result<DeviceChange> DeviceRegistry::bind(const std::string& id, const std::string& patient_id,
                                          const std::string& actor) {
  std::lock_guard change(change_mu_);  // one change at a time, in the order they are asked
  std::unique_lock lk(mu_);
  auto it = devices_.find(id);
  if (it == devices_.end()) return Status::NotFound(fmt::format("no device {}", id));
  if (it->second.revoked)
    return Status::FailedPrecondition(fmt::format("device {} is revoked", id));
  DeviceInfo d = it->second;
  MEDGATE_ASSIGN_OR_RETURN(Pseudonym p, vault_.pseudonym(patient_id));
  d.patient = p;
  return apply("bind", std::move(d), actor, /*new_psk=*/false, lk);
}

Result<DeviceChange> DeviceRegistry::revoke(const std::string& id, const std::string& actor) {
  std::lock_guard change(change_mu_);  // one change at a time, in the order they are asked
  std::unique_lock lk(mu_);
  auto it = devices_.find(id);
  if (it == devices_.end()) return Status::NotFound(fmt::format("no device {}", id));
  if (it->second.revoked)
    return Status::FailedPrecondition(fmt::format("device {} is revoked already", id));
  DeviceInfo d = it->second;
  d.revoked = true;
  return apply("revoke", std::move(d), actor, /*new_psk=*/false, lk);
}

Result<DeviceChange> DeviceRegistry::rotate_psk(const std::string& id, const std::string& actor) {
  std::lock_guard change(change_mu_);  // one change at a time, in the order they are asked
  std::unique_lock lk(mu_);
  auto it = devices_.find(id);
  if (it == devices_.end()) return Status::NotFound(fmt::format("no device {}", id));
  if (it->second.kind != DeviceKind::kCoap)
    return Status::InvalidArgument(fmt::format("device {} is an HL7 source: it has no PSK", id));
  if (it->second.revoked)
    return Status::FailedPrecondition(fmt::format("device {} is revoked", id));
  return apply("rotate-psk", it->second, actor, /*new_psk=*/true, lk);
}

Result<DeviceChange> DeviceRegistry::set_allow(const std::string& id, std::vector<IpNetwork> allow,
                                               const std::string& actor) {
  std::lock_guard change(change_mu_);  // one change at a time, in the order they are asked
  std::unique_lock lk(mu_);
  auto it = devices_.find(id);
  if (it == devices_.end()) return Status::NotFound(fmt::format("no device {}", id));
  if (it->second.kind != DeviceKind::kHl7)
    return Status::InvalidArgument(fmt::format(
        "device {} is a CoAP device: its DTLS key authenticates it, not its address", id));
  if (it->second.revoked)
    return Status::FailedPrecondition(fmt::format("device {} is revoked", id));
  DeviceInfo d = it->second;
  d.allow = std::move(allow);
  return apply("allow", std::move(d), actor, /*new_psk=*/false, lk);
}

Result<DeviceChange> DeviceRegistry::set_cert(const std::string& id, CertBinding cert,
                                              const std::string& actor) {
  std::lock_guard change(change_mu_);  // one change at a time, in the order they are asked
  std::unique_lock lk(mu_);
  auto it = devices_.find(id);
  if (it == devices_.end()) return Status::NotFound(fmt::format("no device {}", id));
  if (it->second.kind != DeviceKind::kHl7)
    return Status::InvalidArgument(fmt::format(
        "device {} is a CoAP device: its DTLS key authenticates it, not a certificate", id));
  if (it->second.revoked)
    return Status::FailedPrecondition(fmt::format("device {} is revoked", id));
  DeviceInfo d = it->second;
  d.cert = std::move(cert);
  return apply("cert", std::move(d), actor, /*new_psk=*/false, lk);
}

std::vector<DeviceInfo> DeviceRegistry::list() const {
  std::lock_guard lk(mu_);
  std::vector<DeviceInfo> out;
  for (const auto& [id, d] : devices_) out.push_back(d);
  return out;
}

Result<DeviceInfo> DeviceRegistry::show(const std::string& id) const {
  std::lock_guard lk(mu_);
  auto it = devices_.find(id);
  if (it == devices_.end()) return Status::NotFound(fmt::format("no device {}", id));
  return it->second;
}

std::optional<DeviceCredentials> DeviceRegistry::coap_device(std::string_view identity) const {
  std::lock_guard lk(mu_);
  auto d = devices_.find(std::string(identity));
  if (d == devices_.end() || d->second.kind != DeviceKind::kCoap) return std::nullopt;
  return credentials_.at(d->first);
}

std::optional<DeviceCredentials> DeviceRegistry::hl7_source(std::string_view application,
                                                            std::string_view facility) const {
  std::lock_guard lk(mu_);
  const DeviceInfo* wildcard = nullptr;
  for (const auto& [id, d] : devices_) {
    if (d.kind != DeviceKind::kHl7 || d.hl7_application != application) continue;
    if (d.hl7_facility == facility) return credentials_.at(id);
    if (d.hl7_facility.empty()) wildcard = &d;
  }
  if (wildcard) return credentials_.at(wildcard->id);
  return std::nullopt;
}

}  // namespace medgate::appliance

namespace medgate::appliance {

std::uint64_t DeviceRegistry::replicated_through() const {
  std::lock_guard lk(mu_);
  auto st = db_.prepare("SELECT value FROM replicated WHERE key = 'device_events'");
  if (!st.ok()) return 0;
  auto step = st->step();
  if (!step.ok() || *step != ledger::sql::Statement::Step::kRow) return 0;
  return st->column_uint(0);
}

// A device event from the replicated ledger, in ledger order (own events included, which changes
// nothing they did not already do). The event names no secret and the bound patient only by this
// another box's pseudonym, so: a device added elsewhere is known here without a PSK (a
// CoAP device added at another member cannot authenticate here until its PSK is rotated here) and
// without a patient; revocations, allow-lists and certificate bindings take effect here as there.
Status DeviceRegistry::apply_replicated(std::uint64_t index, const ledger::Entry& e) {
  if (e.type != ledger::EntryType::kDeviceEvent) return Status::Ok();
  const std::string* event = e.body.find("event") ? e.body.find("event")->as_text() : nullptr;
  const std::string* id = e.body.find("device") ? e.body.find("device")->as_text() : nullptr;
  const std::string* kind_name = e.body.find("kind") ? e.body.find("kind")->as_text() : nullptr;
  if (!event || !id || !kind_name || !valid_id(*id))
    return Status::Corruption(fmt::format("device event {} is malformed", index));
  std::optional<DeviceKind> kind = parse_device_kind(*kind_name);
  if (!kind) return Status::Corruption(fmt::format("device event {} has an unknown kind", index));
  std::lock_guard lk(mu_);
  DeviceInfo d;
  if (auto it = devices_.find(*id); it != devices_.end()) {
    if (it->second.last_entry >= index) return mark_replicated(index);  // applied here already
    d = it->second;
  } else {
    d.id = *id;
    d.kind = *kind;
    d.created_us = e.time_us;
  }
  auto text = [&](const char* name) {
    const ledger::cbor::Value* v = e.body.find(name);
    return v && v->as_text() ? *v->as_text() : std::string();
  };
  if (*event == "add") {
    d.kind = *kind;
    d.revoked = false;
    d.hl7_application = text("hl7_application");
    d.hl7_facility = text("hl7_facility");
  } else if (*event == "revoke") {
    d.revoked = true;
  }
  if (*event == "add" || *event == "allow") {
    d.allow.clear();
    if (const ledger::cbor::Value* allow = e.body.find("allow"); allow && allow->as_array())
      for (const ledger::cbor::Value& n : *allow->as_array())
        if (n.as_text())
          if (Result<IpNetwork> net = parse_ip_network(*n.as_text()); net.ok())
            d.allow.push_back(*net);
  }
  if (*event == "add" || *event == "cert") {
    Result<CertBinding> cert = parse_cert_binding(text("cert"));
    d.cert = cert.ok() ? std::move(*cert) : CertBinding{};
  }
  // The bound patient is the entry's subject: the same pseudonym at every member of a cluster
  // (a single box never gets here).
  if ((*event == "add" || *event == "bind") && !e.subjects.empty() &&
      e.subjects.front().subject.size() == sizeof(Hash)) {
    Pseudonym p;
    std::copy(e.subjects.front().subject.begin(), e.subjects.front().subject.end(),
              p.bytes.begin());
    d.patient = p;
  }
  // Another member's new PSK, sealed for the members: kept here wrapped by this key store.
  std::optional<Bytes> wrapped;
  std::optional<std::string> psk;
  Status psk_status;
  if (const ledger::cbor::Value* sealed = e.body.find("psk_sealed");
      sealed && sealed->as_bytes() && (*event == "add" || *event == "rotate-psk")) {
    Result<hsm::SecretBytes> opened =
        vault_.open_from_member(*sealed->as_bytes(), shared_psk_label(*id));
    if (opened.ok()) {
      psk = to_string(opened->view());
      Result<Bytes> w = wrap_psk(*id, *psk);
      if (w.ok())
        wrapped = std::move(w).value();
      else
        psk_status = w.status();
    } else {
      psk_status = opened.status();
    }
  }
  if (!psk_status.ok()) {
    // Fail closed: whatever PSK the device had here no longer opens a session (a rotation that
    // cannot be followed must not leave the retired key working), and the device stays behind
    // this event so that a later replay (after a restart, or once the cluster's secret arrives)
    // applies it again.
    if (psk) secure_wipe(*psk);
    MEDGATE_ASSIGN_OR_RETURN(auto clear, db_.prepare("UPDATE devices SET psk = NULL WHERE id = ?"));
    MEDGATE_RETURN_IF_ERROR(clear.bind(1, std::string_view(*id)).run());
    if (auto c = credentials_.find(*id); c != credentials_.end()) c->second.psk.clear();
    return psk_status.with_context(fmt::format(
        "the PSK of device {} in entry {} (the device cannot connect here until it is applied)",
        *id, index));
  }
  d.updated_us = e.time_us;
  d.last_entry = index;
  MEDGATE_RETURN_IF_ERROR(store(d, wrapped));
  Status cached = cache(d, psk);
  if (psk) secure_wipe(*psk);
  MEDGATE_RETURN_IF_ERROR(cached);
  return mark_replicated(index);
}

Status DeviceRegistry::mark_replicated(std::uint64_t index) {
  if (index > replicated_index_) {
    replicated_index_ = index;
    applied_cv_.notify_all();
  }
  MEDGATE_ASSIGN_OR_RETURN(
      auto st, db_.prepare("INSERT INTO replicated (key, value) VALUES ('device_events', ?) "
                           "ON CONFLICT(key) DO UPDATE SET value = max(value, excluded.value)"));
  return st.bind(1, index).run();
}

}  // namespace medgate::appliance
