#include "appliance/cluster.h"

#include <fcntl.h>
#include <unistd.h>

#include <cstring>
#include <fstream>
#include <sstream>

#include <fmt/format.h>

#include "appliance/consent.h"
#include "appliance/log.h"
#include "appliance/registry.h"
#include "appliance/vault.h"
#include "hsm/sealed_box.h"
#include "ledger/membership.h"
#include "ledger/order/orderer.h"
#include "ledger/store.h"

namespace medgate::appliance {
namespace {

using nlohmann::json;

std::uint64_t age_ms(std::uint64_t time_us) {
  const std::uint64_t now = ledger::now_us();
  return now > time_us ? (now - time_us) / 1000 : 0;
}

}  // namespace

order::EtcdOptions ClusterSettings::etcd_options() const {
  order::EtcdOptions o;
  o.endpoints = etcd;
  o.ca_file = ca_file;
  o.cert_file = cert_file;
  o.key_file = key_file;
  return o;
}

std::filesystem::path cluster_settings_path(const std::filesystem::path& data_dir) {
  return data_dir / "cluster.json";
}

std::string default_cluster_prefix(const std::string& ledger_id) {
  return "/medgate/" + ledger_id + "/";
}

namespace {
// A day: a longer interval lets etcd's history grow for longer than an operator would notice.
constexpr std::int64_t kMaxCompactionIntervalS = 86400;
}  // namespace

Status check_cluster_settings(const ClusterSettings& s) {
  if (s.etcd.empty()) return Status::InvalidArgument("no etcd URL given");
  if (!ledger::valid_member_id(s.member_id))
    return Status::InvalidArgument(fmt::format(
        "member id \"{}\" is not 1 to 64 of letters, digits, '.', '_', '-' (starting with a "
        "letter or digit)",
        s.member_id));
  if (!ledger::valid_member_endpoint(s.endpoint))
    return Status::InvalidArgument(fmt::format("endpoint \"{}\" is not host:port", s.endpoint));
  if (s.prefix.size() < 2 || s.prefix.front() != '/' || s.prefix.back() != '/')
    return Status::InvalidArgument(
        fmt::format("etcd prefix \"{}\" must start and end with '/'", s.prefix));
  if (s.compaction_interval_s < 0 || s.compaction_interval_s > kMaxCompactionIntervalS)
    return Status::InvalidArgument(
        fmt::format("compaction interval {} s is not from 0 (never) to {} s (a day)",
                    s.compaction_interval_s, kMaxCompactionIntervalS));
  // The URLs themselves are checked by the etcd client.
  return order::EtcdClient::open(s.etcd_options()).status();
}

Result<std::optional<ClusterSettings>> load_cluster_settings(
    const std::filesystem::path& data_dir) {
  const std::filesystem::path path = cluster_settings_path(data_dir);
  std::ifstream in(path);
  if (!in) {
    if (!std::filesystem::exists(path)) return std::optional<ClusterSettings>();
    return Status::IOError(fmt::format("cannot read {}", path.string()));
  }
  std::stringstream text;
  text << in.rdbuf();
  json j = json::parse(text.str(), nullptr, /*allow_exceptions=*/false);
  auto bad = [&](const std::string& what) {
    return Status::InvalidArgument(fmt::format("{}: {}", path.string(), what));
  };
  if (j.is_discarded())
    return bad("is not valid JSON (damaged? it is rewritten whole, never in place)");
  if (!j.is_object()) return bad("is not a JSON object");
  ClusterSettings s;
  auto text_field = [&](const char* name, std::string& out, bool required) -> Status {
    auto it = j.find(name);
    if (it == j.end()) return required ? bad(fmt::format("\"{}\" is missing", name)) : Status::Ok();
    if (!it->is_string()) return bad(fmt::format("\"{}\" is not a text", name));
    out = it->get<std::string>();
    return Status::Ok();
  };
  MEDGATE_RETURN_IF_ERROR(text_field("member_id", s.member_id, true));
  MEDGATE_RETURN_IF_ERROR(text_field("endpoint", s.endpoint, true));
  MEDGATE_RETURN_IF_ERROR(text_field("prefix", s.prefix, true));
  MEDGATE_RETURN_IF_ERROR(text_field("ca_file", s.ca_file, false));
  MEDGATE_RETURN_IF_ERROR(text_field("cert_file", s.cert_file, false));
  MEDGATE_RETURN_IF_ERROR(text_field("key_file", s.key_file, false));
  if (auto it = j.find("compaction_interval_s"); it != j.end()) {
    if (!it->is_number_integer())
      return bad("\"compaction_interval_s\" is not a whole number of seconds");
    s.compaction_interval_s = it->get<std::int64_t>();
  }
  auto etcd = j.find("etcd");
  if (etcd == j.end() || !etcd->is_array()) return bad("\"etcd\" is not a list of URLs");
  for (const json& u : *etcd) {
    if (!u.is_string()) return bad("\"etcd\" holds something that is not a URL");
    s.etcd.push_back(u.get<std::string>());
  }
  if (Status c = check_cluster_settings(s); !c.ok()) return bad(c.message());
  return std::optional<ClusterSettings>(std::move(s));
}

Status save_cluster_settings(const std::filesystem::path& data_dir, const ClusterSettings& s) {
  json j = {{"etcd", s.etcd},         {"member_id", s.member_id},
            {"endpoint", s.endpoint}, {"prefix", s.prefix},
            {"ca_file", s.ca_file},   {"cert_file", s.cert_file},
            {"key_file", s.key_file}, {"compaction_interval_s", s.compaction_interval_s}};
  const std::string text = j.dump(2) + "\n";
  const std::filesystem::path path = cluster_settings_path(data_dir);
  const std::filesystem::path tmp = path.string() + ".tmp";
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0600);
  if (fd < 0)
    return Status::IOError(fmt::format("cannot create {}: {}", tmp.string(), std::strerror(errno)));
  bool ok = ::write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size()) &&
            ::fsync(fd) == 0;
  ::close(fd);
  if (!ok || ::rename(tmp.c_str(), path.c_str()) != 0)
    return Status::IOError(fmt::format("cannot write {}", path.string()));
  if (int dir = ::open(data_dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC); dir >= 0) {
    (void)::fsync(dir);
    ::close(dir);
  }
  return Status::Ok();
}

Result<ledger::BlockRecord> fetch_genesis_record(const ClusterSettings& settings) {
  MEDGATE_ASSIGN_OR_RETURN(std::unique_ptr<order::EtcdClient> etcd,
                           order::EtcdClient::open(settings.etcd_options()));
  MEDGATE_ASSIGN_OR_RETURN(order::Range r, etcd->range(order::block_key(settings.prefix, 0)));
  if (r.kvs.empty())
    return Status::NotFound(fmt::format(
        "etcd holds no ledger under {} (run `medctl cluster init` on the founding appliance "
        "first)",
        settings.prefix));
  Result<ledger::BlockRecord> record = ledger::decode_block_record(r.kvs[0].value);
  if (!record.ok()) return record.status().with_context("block 0 in etcd");
  return record;
}

Cluster::Cluster(const Config& config, ledger::Ledger& ledger, hsm::KeyStore& keys)
    : config_(config), ledger_(ledger), keys_(keys) {}

Cluster::~Cluster() {
  stop();
}

namespace {

bool consent_type(ledger::EntryType t) {
  return t == ledger::EntryType::kRulesVersion || t == ledger::EntryType::kDirectoryImport ||
         t == ledger::EntryType::kConsentGrant || t == ledger::EntryType::kConsentRevoke ||
         t == ledger::EntryType::kPatientKey;
}

// Entries after which the shared keys are reconciled.
bool key_type(ledger::EntryType t) {
  return t == ledger::EntryType::kMemberProposal || t == ledger::EntryType::kMemberApproval ||
         t == ledger::EntryType::kKeyShare;
}

// What a key share's box is sealed for: this ledger's secret, for this member.
std::string share_context(const std::string& ledger_id, const std::string& member) {
  return fmt::format("medgate cluster secret v1 ledger={} member={}", ledger_id, member);
}

}  // namespace

void Cluster::start_follower() {
  if ((!registry_ && !consent_ && !vault_) || follower_.joinable()) return;
  // Hand over first, then replay what the registry has not seen (a restart, or events applied
  // while the follower was not running): an event both paths deliver is applied once.
  ledger_.set_apply_listener([this](std::uint64_t first,
                                    const std::vector<ledger::Entry>& entries) {
    std::lock_guard lk(follow_mu_);
    for (std::size_t i = 0; i < entries.size(); ++i)
      if ((registry_ && entries[i].type == ledger::EntryType::kDeviceEvent) ||
          (consent_ && consent_type(entries[i].type)) ||
          (vault_ &&
           (key_type(entries[i].type) || entries[i].type == ledger::EntryType::kPatientErasure)))
        follow_queue_.emplace_back(first + i, entries[i]);
    follow_cv_.notify_one();
  });
  // (The consent book replays every consent entry when it opens.)
  replay_devices();
  follower_ = std::thread([this] { follower_loop(); });
}

// Every device event, from the first: one applied here already is skipped at once (its device's
// last entry is not older), one that could not be applied (a PSK that did not open before the
// cluster's secret arrived, a key-store failure) is applied again.
void Cluster::replay_devices() {
  const ledger::EntryType types[] = {ledger::EntryType::kDeviceEvent};
  for (std::uint64_t from = 0; registry_;) {
    Result<std::vector<ledger::StoredEntry>> page = ledger_.entries_of_type(types, from, 1000);
    if (!page.ok() || page->empty()) break;
    for (const ledger::StoredEntry& e : *page)
      if (Status s = registry_->apply_replicated(e.index, e.entry); !s.ok())
        log(LogLevel::kError, "replication.devices", "device event {}: {}", e.index, s.message());
    from = page->back().index + 1;
  }
}

void Cluster::follower_loop() {
  // Shares written while this member was down (or before it started following) are looked at
  // once now; later ones as their entries arrive. Erasures likewise (applying one twice changes
  // nothing): one whose block was applied just before a crash, ahead of this thread, is not lost.
  reconcile_keys();
  if (vault_) {
    const ledger::EntryType erasure[] = {ledger::EntryType::kPatientErasure};
    for (std::uint64_t from = 0;;) {
      Result<std::vector<ledger::StoredEntry>> page = ledger_.entries_of_type(erasure, from, 1000);
      if (!page.ok() || page->empty()) break;
      for (const ledger::StoredEntry& e : *page) follow_erasure(e.index, e.entry);
      from = page->back().index + 1;
    }
  }
  std::unique_lock lk(follow_mu_);
  for (;;) {
    // Every half minute without entries: look at the shares again (one whose append failed).
    if (!follow_cv_.wait_for(lk, std::chrono::seconds(30),
                             [&] { return follow_stop_ || !follow_queue_.empty(); })) {
      lk.unlock();
      reconcile_keys();
      lk.lock();
      continue;
    }
    if (follow_queue_.empty()) return;
    auto [index, entry] = std::move(follow_queue_.front());
    follow_queue_.pop_front();
    lk.unlock();
    if (key_type(entry.type)) {
      reconcile_keys();
    } else if (entry.type == ledger::EntryType::kPatientErasure) {
      follow_erasure(index, entry);
    } else if (entry.type != ledger::EntryType::kDeviceEvent) {
      if (Status s = consent_->apply_replicated(index, entry); !s.ok())
        log(LogLevel::kError, "replication.consent", "entry {}: {}", index, s.message());
    } else if (Status s = registry_->apply_replicated(index, entry); !s.ok())
      log(LogLevel::kError, "replication.devices", "device event {}: {}", index, s.message());
    else
      log(LogLevel::kInfo, "replication.devices", "device {} {} (entry {}) applied here",
          entry.body.find("device") && entry.body.find("device")->as_text()
              ? *entry.body.find("device")->as_text()
              : "?",
          entry.body.find("event") && entry.body.find("event")->as_text()
              ? *entry.body.find("event")->as_text()
              : "?",
          index);
    lk.lock();
  }
}

Result<ledger::Entry> Cluster::share_for(const ledger::Member& member, ByteView secret,
                                         const std::string& actor) const {
  if (!member.agreement_key)
    return Status::FailedPrecondition(
        fmt::format("member \"{}\" has no key-agreement key", member.id));
  ledger::KeyShare share;
  share.member = member.id;
  share.agreement_key = member.agreement_key->id();
  share.secret_id = secret_id_of(secret);
  MEDGATE_ASSIGN_OR_RETURN(share.box, hsm::seal_to(*member.agreement_key, secret,
                                                   share_context(ledger_.ledger_id(), member.id)));
  return ledger::key_share_entry(share, actor);
}

void Cluster::reconcile_keys() {
  const auto replica = ledger_.replica();
  if (!vault_ || !replica) return;
  std::vector<std::pair<std::uint64_t, ledger::KeyShare>> shares;
  const ledger::EntryType types[] = {ledger::EntryType::kKeyShare};
  for (std::uint64_t from = 0;;) {
    Result<std::vector<ledger::StoredEntry>> page = ledger_.entries_of_type(types, from, 1000);
    if (!page.ok()) {
      log(LogLevel::kError, "cluster.keys", "cannot read the key shares: {}",
          page.status().message());
      return;
    }
    if (page->empty()) break;
    for (const ledger::StoredEntry& e : *page) {
      Result<ledger::KeyShare> share = ledger::decode_key_share(e.entry);
      if (share.ok()) shares.emplace_back(e.index, std::move(share).value());
    }
    from = page->back().index + 1;
  }
  // A ledger founded before shared keys existed has no share: each member keeps its own keys.
  if (shares.empty()) return;
  const Hash cluster_id = shares.front().second.secret_id;
  Result<std::optional<Hash>> held = vault_->cluster_secret_id();
  if (!held.ok()) {
    log(LogLevel::kError, "cluster.keys", "cannot read the vault's cluster secret: {}",
        held.status().message());
    return;
  }
  if (!*held) {
    Result<PublicKey> mine = keys_.agreement_key();
    if (!mine.ok()) {
      log(LogLevel::kError, "cluster.keys", "this key store has no key-agreement key: {}",
          mine.status().message());
      return;
    }
    for (const auto& [index, share] : shares) {
      if (share.member != replica->member_id || share.agreement_key != mine->id() ||
          share.secret_id != cluster_id)
        continue;
      Result<hsm::SecretBytes> secret = hsm::open_sealed_box(
          keys_, share.box, share_context(ledger_.ledger_id(), replica->member_id));
      Status adopted = secret.ok() ? Status::Ok() : secret.status();
      if (adopted.ok() && secret_id_of(secret->view()) != cluster_id)
        adopted = Status::VerificationFailed("it opens to a secret other than the cluster's");
      if (adopted.ok()) adopted = vault_->adopt_cluster_secret(secret->view());
      if (adopted.ok()) {
        log(LogLevel::kNotice, "cluster.keys",
            "received the cluster's shared key (key share, entry {}); patients can be named here "
            "now",
            index);
        replay_devices();  // CoAP devices whose PSKs could not be opened without it
        return;
      }
      if (shares_reported_.insert(index).second)
        log(LogLevel::kError, "cluster.keys", "the key share in entry {} cannot be used: {}", index,
            adopted.message());
    }
    return;
  }
  if (**held != cluster_id) {
    if (shares_reported_.insert(0).second)
      log(LogLevel::kError, "cluster.keys",
          "the vault holds cluster secret {}, but the ledger's is {}; sharing nothing",
          to_hex(ByteView(**held).first(8)), to_hex(ByteView(cluster_id).first(8)));
    return;
  }
  {
    std::lock_guard lk(failed_shares_->mu);
    for (const auto& failed : failed_shares_->shares) shares_sent_.erase(failed);
    failed_shares_->shares.clear();
  }
  std::optional<hsm::SecretBytes> secret;
  for (const ledger::Member& m : ledger_.membership().members()) {
    if (!m.agreement_key) continue;
    const std::pair<std::string, KeyId> to{m.id, m.agreement_key->id()};
    bool shared = shares_sent_.contains(to);
    for (const auto& entry : shares)
      shared = shared || (entry.second.member == m.id && entry.second.agreement_key == to.second &&
                          entry.second.secret_id == cluster_id);
    if (shared) continue;
    if (!secret) {
      Result<hsm::SecretBytes> s = vault_->cluster_secret();
      if (!s.ok()) {
        log(LogLevel::kError, "cluster.keys", "cannot read the cluster secret: {}",
            s.status().message());
        return;
      }
      secret = std::move(s).value();
    }
    Result<ledger::Entry> e = share_for(m, secret->view(), "member:" + replica->member_id);
    auto on_done = [failed = failed_shares_, to](Result<std::uint64_t> r) {
      if (r.ok()) return;
      std::lock_guard lk(failed->mu);
      failed->shares.push_back(to);
    };
    Status queued = e.ok() ? ledger_.append_async(std::span(&*e, 1), on_done) : e.status();
    if (!queued.ok()) {
      log(LogLevel::kError, "cluster.keys", "cannot share the cluster key with member \"{}\": {}",
          m.id, queued.message());
      continue;
    }
    shares_sent_.insert(to);
    log(LogLevel::kNotice, "cluster.keys",
        "sealed the cluster's shared key to member \"{}\" (key-agreement key {})", m.id,
        to_hex(ByteView(to.second).first(8)));
  }
}

namespace {

// "<prefix>datakeys/<pseudonym hex>/": where a patient's data keys are published.
std::string data_keys_prefix(const std::string& prefix, const Pseudonym& p) {
  return prefix + "datakeys/" + p.hex() + "/";
}

}  // namespace

Status Cluster::start_key_sharing(const ClusterSettings& settings) {
  if (!vault_) return Status::Ok();
  MEDGATE_ASSIGN_OR_RETURN(std::unique_ptr<order::EtcdClient> etcd,
                           order::EtcdClient::open(settings.etcd_options()));
  std::shared_ptr<order::EtcdClient> client(std::move(etcd));
  {
    std::lock_guard lk(keys_mu_);
    if (publisher_.joinable()) return Status::Ok();
    keys_etcd_ = client;
    keys_prefix_ = settings.prefix;
    keys_stop_ = false;
  }
  // Captures no Cluster: a fetch still running when the cluster stops keeps its client alive.
  vault_->set_key_source(
      [client, prefix = settings.prefix](const Pseudonym& p,
                                         const DataKeyId& id) -> Result<std::optional<Bytes>> {
        MEDGATE_ASSIGN_OR_RETURN(order::Range r,
                                 client->range(data_keys_prefix(prefix, p) + to_hex(id)));
        if (r.kvs.empty()) return std::optional<Bytes>();
        return std::optional<Bytes>(std::move(r.kvs.front().value));
      });
  publisher_ = std::thread([this] { publisher_loop(); });
  return Status::Ok();
}

void Cluster::publisher_loop() {
  std::unique_lock lk(keys_mu_);
  for (;;) {
    keys_cv_.wait_for(lk, std::chrono::seconds(1), [&] { return keys_stop_; });
    if (keys_stop_) return;
    const std::shared_ptr<order::EtcdClient> etcd = keys_etcd_;
    const std::string prefix = keys_prefix_;
    std::set<std::string> erased;
    erased.swap(erased_to_remove_);
    lk.unlock();
    // Erased patients' keys first: nothing may be published for them again.
    std::set<std::string> retry;
    for (const std::string& patient : erased) {
      const std::string dir = prefix + "datakeys/" + patient + "/";
      if (!retry.empty() || !etcd->remove(dir, order::prefix_end(dir)).ok())
        retry.insert(patient);  // etcd away: next round
    }
    Result<std::vector<DataKeyExport>> keys = vault_->keys_to_publish(256);
    if (!keys.ok())
      log(LogLevel::kError, "cluster.keys", "cannot read the data keys to publish: {}",
          keys.status().message());
    for (const DataKeyExport& k : keys.ok() ? *keys : std::vector<DataKeyExport>()) {
      const std::string key = data_keys_prefix(prefix, k.patient) + to_hex(k.key_id);
      if (!etcd->put(key, k.sealed).ok()) break;  // etcd away: next round
      if (Status s = vault_->mark_published(k.patient, k.key_id); !s.ok())
        log(LogLevel::kError, "cluster.keys", "patient {}: {}", k.patient.prefix(), s.message());
      // An erasure applied while the put was on its way: take the key back out.
      Result<PatientInfo> info = vault_->info(k.patient);
      if (info.ok() && info->state != PatientState::kActive) retry.insert(k.patient.hex());
    }
    lk.lock();
    erased_to_remove_.insert(retry.begin(), retry.end());
  }
}

void Cluster::follow_erasure(std::uint64_t index, const ledger::Entry& entry) {
  const ledger::cbor::Value* field = entry.body.find("pseudonym");
  const Bytes* bytes = field ? field->as_bytes() : nullptr;
  if (!bytes || bytes->size() != sizeof(Hash)) return;  // the entry table checked it already
  Pseudonym p;
  std::copy(bytes->begin(), bytes->end(), p.bytes.begin());
  Result<bool> changed = vault_->apply_erasure(p, index);
  if (!changed.ok())
    log(LogLevel::kError, "replication.erasure", "patient {} (entry {}): {}", p.prefix(), index,
        changed.status().message());
  else if (*changed)
    log(LogLevel::kNotice, "replication.erasure",
        "patient {} erased here as decided on the ledger (entry {}): every data key of theirs "
        "this member held is destroyed",
        p.prefix(), index);
  std::lock_guard lk(keys_mu_);
  erased_to_remove_.insert(p.hex());
  keys_cv_.notify_all();
}

Status Cluster::start() {
  if (!ledger_.replica()) return Status::Ok();
  if (vault_) {
    // A member names no patient before it holds the cluster's secret, unless it is a founder from
    // before shared keys whose vault already has patients of its own (they keep working).
    Result<std::optional<Hash>> held = vault_->cluster_secret_id();
    Result<std::uint64_t> patients = vault_->patient_count();
    if (!held.ok()) return held.status();
    if (!patients.ok()) return patients.status();
    vault_->require_cluster_secret(held->has_value() || *patients == 0);
  }
  start_follower();
  MEDGATE_ASSIGN_OR_RETURN(std::optional<ClusterSettings> settings,
                           load_cluster_settings(config_.data_dir));
  if (!settings) {
    log(LogLevel::kError, "cluster.settings",
        "the ledger is replicated (member \"{}\") but {} is missing: entries queue here until "
        "the cluster settings are restored",
        ledger_.replica()->member_id, cluster_settings_path(config_.data_dir).string());
    return Status::Ok();
  }
  if (settings->member_id != ledger_.replica()->member_id)
    return Status::FailedPrecondition(
        fmt::format("{} names member \"{}\" but the ledger is member \"{}\"",
                    cluster_settings_path(config_.data_dir).string(), settings->member_id,
                    ledger_.replica()->member_id));
  MEDGATE_RETURN_IF_ERROR(start_key_sharing(*settings));
  return start_orderer(*settings);
}

Status Cluster::start_orderer(const ClusterSettings& settings) {
  MEDGATE_ASSIGN_OR_RETURN(std::unique_ptr<order::EtcdClient> etcd,
                           order::EtcdClient::open(settings.etcd_options()));
  order::OrdererOptions o;
  o.prefix = settings.prefix;
  o.compaction_interval = std::chrono::seconds(settings.compaction_interval_s);
  o.on_invalid = [](std::uint64_t height, const std::string& reason) {
    log(LogLevel::kError, "replication.invalid_block", "voided the record at height {}: {}", height,
        reason);
  };
  o.on_connection = [](bool connected, const std::string& error) {
    if (connected)
      log(LogLevel::kNotice, "replication.connected", "etcd answers again; catching up");
    else
      log(LogLevel::kWarning, "replication.disconnected",
          "etcd does not answer; entries queue here until it does: {}", error);
  };
  // The orderer publishes the history first, which needs etcd; when etcd is down at start, keep
  // trying in the background rather than refusing to start (store-and-forward).
  Result<std::unique_ptr<order::Orderer>> started = order::Orderer::start(ledger_, *etcd, o);
  std::lock_guard lk(mu_);
  settings_ = settings;
  etcd_ = std::move(etcd);
  if (!started.ok()) {
    if (started.status().code() != StatusCode::kUnavailable) return started.status();
    log(LogLevel::kWarning, "replication.disconnected",
        "etcd does not answer at start; entries queue here: {}", started.status().message());
    retry_ = std::thread([this, o] {
      for (int attempt = 0;; ++attempt) {
        {
          std::unique_lock lk2(mu_);
          if (retry_cv_.wait_for(lk2, std::chrono::seconds(1), [&] { return stopping_; })) return;
        }
        auto again = order::Orderer::start(ledger_, *etcd_, o);
        if (again.ok()) {
          std::lock_guard lk2(mu_);
          orderer_ = std::move(again).value();
          log(LogLevel::kNotice, "replication.connected", "etcd answers; ordering started");
          return;
        }
        if (again.status().code() != StatusCode::kUnavailable) {
          log(LogLevel::kError, "replication.start", "cannot start ordering: {}",
              again.status().message());
          return;
        }
      }
    });
    return Status::Ok();
  }
  orderer_ = std::move(started).value();
  log(LogLevel::kInfo, "replication.start",
      "member \"{}\" of the replicated ledger, ordering through etcd ({} URLs) under {}",
      settings.member_id, settings.etcd.size(), settings.prefix);
  return Status::Ok();
}

void Cluster::stop() {
  {
    std::lock_guard lk(mu_);
    stopping_ = true;
  }
  retry_cv_.notify_all();
  if (retry_.joinable()) retry_.join();
  std::unique_ptr<order::Orderer> orderer;
  {
    std::lock_guard lk(mu_);
    orderer = std::move(orderer_);
  }
  if (orderer) orderer->stop();
  ledger_.set_apply_listener(nullptr);
  {
    std::lock_guard lk(follow_mu_);
    follow_stop_ = true;
  }
  follow_cv_.notify_all();
  if (follower_.joinable()) follower_.join();
  {
    std::lock_guard lk(keys_mu_);
    keys_stop_ = true;
  }
  keys_cv_.notify_all();
  if (publisher_.joinable()) publisher_.join();
  if (vault_) vault_->set_key_source(nullptr);
  std::lock_guard lk(keys_mu_);
  keys_etcd_.reset();
}

std::vector<Operation> Cluster::operations() {
  std::vector<Operation> ops;
  ops.push_back({"cluster.init", Role::kAdmin,
                 [this](const Caller& c, const json& a) { return init(c, a); }});
  ops.push_back({"cluster.status", Role::kAuditor,
                 [this](const Caller&, const json&) { return cluster_status(); }});
  ops.push_back({"member.propose", Role::kAdmin,
                 [this](const Caller& c, const json& a) { return propose(c, a); }});
  ops.push_back({"member.approve", Role::kAdmin,
                 [this](const Caller& c, const json& a) { return approve(c, a); }});
  ops.push_back({"member.list", Role::kAuditor,
                 [this](const Caller&, const json&) -> Result<json> { return members_json(); }});
  return ops;
}

Result<json> Cluster::init(const Caller& caller, const json& args) {
  if (auto r = ledger_.replica())
    return Status::FailedPrecondition(
        fmt::format("this ledger is replicated already (member \"{}\")", r->member_id));
  ClusterSettings s;
  MEDGATE_ASSIGN_OR_RETURN(s.member_id, text_arg(args, "member_id"));
  MEDGATE_ASSIGN_OR_RETURN(s.endpoint, text_arg(args, "endpoint"));
  auto etcd = args.find("etcd");
  if (etcd == args.end() || !etcd->is_array() || etcd->empty())
    return Status::InvalidArgument("argument \"etcd\" must be a list of etcd client URLs");
  for (const json& u : *etcd) {
    if (!u.is_string()) return Status::InvalidArgument("argument \"etcd\" holds a non-text");
    s.etcd.push_back(u.get<std::string>());
  }
  auto optional_text = [&](const char* name, std::string fallback) -> Result<std::string> {
    auto it = args.find(name);
    if (it == args.end() || it->is_null()) return fallback;
    if (!it->is_string())
      return Status::InvalidArgument(fmt::format("argument \"{}\" must be a text", name));
    return it->get<std::string>();
  };
  MEDGATE_ASSIGN_OR_RETURN(s.prefix,
                           optional_text("prefix", default_cluster_prefix(ledger_.ledger_id())));
  MEDGATE_ASSIGN_OR_RETURN(s.ca_file, optional_text("ca_file", ""));
  MEDGATE_ASSIGN_OR_RETURN(s.cert_file, optional_text("cert_file", ""));
  MEDGATE_ASSIGN_OR_RETURN(s.key_file, optional_text("key_file", ""));
  MEDGATE_RETURN_IF_ERROR(check_cluster_settings(s));

  // etcd must answer, and hold nothing under the prefix yet.
  MEDGATE_ASSIGN_OR_RETURN(std::unique_ptr<order::EtcdClient> etcd_client,
                           order::EtcdClient::open(s.etcd_options()));
  const std::string blocks = s.prefix + "blocks/";
  MEDGATE_ASSIGN_OR_RETURN(order::Range existing,
                           etcd_client->range(blocks, order::prefix_end(blocks), 1));
  if (existing.count > 0)
    return Status::FailedPrecondition(fmt::format(
        "etcd already holds {} blocks under {}: another ledger uses that prefix (choose another "
        "with --prefix, or join that ledger with `medctl init --join`)",
        existing.count, s.prefix));

  // Found the membership with this appliance's key (the ledger's active key).
  const PublicKey own = keys_.signing_key();
  if (own.id() != ledger_.active_key().id())
    return Status::FailedPrecondition("the key store's key is not the ledger's active key");
  // The secret the members will share (pseudonyms, data keys), unless a first attempt made it.
  if (vault_) {
    MEDGATE_ASSIGN_OR_RETURN(std::optional<Hash> held, vault_->cluster_secret_id());
    if (!held) {
      MEDGATE_ASSIGN_OR_RETURN(Bytes raw, keys_.random(32));
      hsm::SecretBytes secret(std::move(raw));
      MEDGATE_RETURN_IF_ERROR(vault_->adopt_cluster_secret(secret.view()));
    }
  }
  if (!ledger_.membership().founded()) {
    ledger::MembershipStatement st;
    st.ledger_id = ledger_.ledger_id();
    st.epoch = 0;
    st.action = ledger::MembershipAction::kAdd;
    st.member_id = s.member_id;
    st.signing_key = own;
    st.endpoint = s.endpoint;
    if (vault_) {
      Result<PublicKey> agreement = keys_.agreement_key();
      if (!agreement.ok())
        return agreement.status().with_context("this key store's key-agreement key");
      st.agreement_key = *agreement;
    }
    MEDGATE_ASSIGN_OR_RETURN(Bytes statement, ledger::encode_membership_statement(st));
    MEDGATE_ASSIGN_OR_RETURN(Bytes signature, keys_.sign_digest(sha256(statement)));
    MEDGATE_ASSIGN_OR_RETURN(
        ledger::Entry e,
        ledger::member_proposal_entry(statement, s.member_id, signature, caller.actor()));
    MEDGATE_ASSIGN_OR_RETURN(std::uint64_t index, ledger_.append_membership(e));
    log(LogLevel::kNotice, "member.found", "membership founded by {}: member \"{}\" (entry {})",
        caller.actor(), s.member_id, index);
  }
  // The first key share, to the founder itself: it fixes the cluster's secret id for everyone.
  const ledger::Membership membership = ledger_.membership();
  const ledger::Member* self = membership.find(s.member_id);
  const ledger::EntryType share_type[] = {ledger::EntryType::kKeyShare};
  MEDGATE_ASSIGN_OR_RETURN(std::vector<ledger::StoredEntry> shares,
                           ledger_.entries_of_type(share_type, 0, 1));
  if (vault_ && self && self->agreement_key && shares.empty()) {
    MEDGATE_ASSIGN_OR_RETURN(hsm::SecretBytes secret, vault_->cluster_secret());
    MEDGATE_ASSIGN_OR_RETURN(ledger::Entry e, share_for(*self, secret.view(), caller.actor()));
    MEDGATE_RETURN_IF_ERROR(ledger_.append(e).status());
  }
  MEDGATE_RETURN_IF_ERROR(save_cluster_settings(config_.data_dir, s));
  MEDGATE_RETURN_IF_ERROR(ledger_.start_replication(s.member_id));
  start_follower();
  MEDGATE_RETURN_IF_ERROR(start_key_sharing(s));
  MEDGATE_RETURN_IF_ERROR(start_orderer(s));
  json out = members_json();
  out["prefix"] = s.prefix;
  out["etcd"] = s.etcd;
  return out;
}

Result<json> Cluster::propose(const Caller& caller, const json& args) {
  auto replica = ledger_.replica();
  if (!replica)
    return Status::FailedPrecondition(
        "this ledger is not replicated: run `medctl cluster init` first");
  MEDGATE_ASSIGN_OR_RETURN(std::string action, text_arg(args, "action"));
  ledger::MembershipStatement st;
  st.ledger_id = ledger_.ledger_id();
  st.epoch = ledger_.membership().epoch();
  MEDGATE_ASSIGN_OR_RETURN(st.member_id, text_arg(args, "member_id"));
  if (action == "add") {
    st.action = ledger::MembershipAction::kAdd;
    MEDGATE_ASSIGN_OR_RETURN(std::string pem, text_arg(args, "public_key"));
    Result<PublicKey> key = PublicKey::from_pem(pem);
    if (!key.ok())
      return Status::InvalidArgument("argument \"public_key\" is not a P-256 public key (PEM): " +
                                     key.status().message());
    st.signing_key = *key;
    MEDGATE_ASSIGN_OR_RETURN(st.endpoint, text_arg(args, "endpoint"));
    if (auto a = args.find("agreement_key"); a != args.end() && !a->is_null()) {
      if (!a->is_string())
        return Status::InvalidArgument("argument \"agreement_key\" must be a PEM text");
      Result<PublicKey> agreement = PublicKey::from_pem(a->get<std::string>());
      if (!agreement.ok())
        return Status::InvalidArgument(
            "argument \"agreement_key\" is not a P-256 public key (PEM): " +
            agreement.status().message());
      if (agreement->id() == key->id())
        return Status::InvalidArgument(
            "the agreement key is the signing key; give the member's agreement-key.pem");
      st.agreement_key = *agreement;
    }
  } else if (action == "remove") {
    st.action = ledger::MembershipAction::kRemove;
  } else {
    return Status::InvalidArgument("argument \"action\" must be add or remove");
  }
  MEDGATE_ASSIGN_OR_RETURN(Bytes statement, ledger::encode_membership_statement(st));
  MEDGATE_ASSIGN_OR_RETURN(Bytes signature, keys_.sign_digest(sha256(statement)));
  MEDGATE_ASSIGN_OR_RETURN(
      ledger::Entry e,
      ledger::member_proposal_entry(statement, replica->member_id, signature, caller.actor()));
  MEDGATE_ASSIGN_OR_RETURN(std::uint64_t index, ledger_.append_membership(e));
  const bool took_effect = action == "add" ? ledger_.membership().find(st.member_id) != nullptr
                                           : ledger_.membership().find(st.member_id) == nullptr;
  log(LogLevel::kNotice, "member.propose", "{} proposed to {} member \"{}\" (entry {}){}",
      caller.actor(), action, st.member_id, index, took_effect ? "; it took effect" : "");
  json out = members_json();
  out["proposal"] = {
      {"entry", index}, {"statement", to_hex(sha256(statement))}, {"took_effect", took_effect}};
  return out;
}

Result<json> Cluster::approve(const Caller& caller, const json& args) {
  auto replica = ledger_.replica();
  if (!replica) return Status::FailedPrecondition("this ledger is not replicated");
  MEDGATE_ASSIGN_OR_RETURN(std::string which, text_arg(args, "proposal"));
  std::optional<ledger::OpenProposal> found;
  for (const ledger::OpenProposal& p : ledger_.membership().open_proposals()) {
    const std::string hash = to_hex(p.statement_hash);
    if (p.decoded.member_id == which || (which.size() >= 8 && hash.rfind(which, 0) == 0)) {
      if (found)
        return Status::InvalidArgument(fmt::format(
            "\"{}\" names more than one open proposal; give the statement hash", which));
      found = p;
    }
  }
  if (!found)
    return Status::NotFound(
        fmt::format("no open proposal for \"{}\" (see `medctl member list`)", which));
  MEDGATE_ASSIGN_OR_RETURN(Bytes signature, keys_.sign_digest(sha256(found->statement)));
  MEDGATE_ASSIGN_OR_RETURN(ledger::Entry e,
                           ledger::member_approval_entry(found->statement, replica->member_id,
                                                         signature, caller.actor()));
  MEDGATE_ASSIGN_OR_RETURN(std::uint64_t index, ledger_.append_membership(e));
  log(LogLevel::kNotice, "member.approve", "{} approved the proposal for member \"{}\" (entry {})",
      caller.actor(), found->decoded.member_id, index);
  json out = members_json();
  out["approval"] = {{"entry", index}, {"statement", to_hex(found->statement_hash)}};
  return out;
}

json Cluster::members_json() const {
  const ledger::Membership m = ledger_.membership();
  json members = json::array();
  for (const ledger::Member& member : m.members())
    members.push_back(
        {{"id", member.id},
         {"key_id", to_hex(member.signing_key.id())},
         {"agreement_key_id",
          member.agreement_key ? json(to_hex(member.agreement_key->id())) : json(nullptr)},
         {"endpoint", member.endpoint},
         {"since_entry", member.since_index}});
  json proposals = json::array();
  for (const ledger::OpenProposal& p : m.open_proposals())
    proposals.push_back(
        {{"statement", to_hex(p.statement_hash)},
         {"action", p.decoded.action == ledger::MembershipAction::kAdd ? "add" : "remove"},
         {"member_id", p.decoded.member_id},
         {"entry", p.index},
         {"approvers", p.approvers},
         {"needed", m.majority()}});
  auto replica = ledger_.replica();
  return {{"epoch", m.epoch()},
          {"founded", m.founded()},
          {"this_member", replica ? json(replica->member_id) : json(nullptr)},
          {"members", members},
          {"open_proposals", proposals}};
}

json Cluster::status_json() const {
  auto replica = ledger_.replica();
  if (!replica) return nullptr;
  json out = {
      {"member_id", replica->member_id},
      {"queue",
       {{"entries", replica->outbox_entries},
        {"oldest_age_ms", replica->outbox_entries ? age_ms(replica->outbox_oldest_us) : 0}}},
      {"blocks_applied_since_start", replica->blocks_applied},
      {"own_blocks_since_start", replica->own_blocks},
      {"members", ledger_.membership().members().size()},
      {"epoch", ledger_.membership().epoch()}};
  // The shared key: its id's first 8 bytes, or null while this member waits for its share.
  if (vault_) {
    Result<std::optional<Hash>> held = vault_->cluster_secret_id();
    out["shared_key"] =
        held.ok() && *held ? json(to_hex(ByteView(**held).first(8))) : json(nullptr);
  }
  std::lock_guard lk(mu_);
  out["etcd"] = settings_ ? json(settings_->etcd) : json(nullptr);
  if (orderer_) {
    order::OrdererStats s = orderer_->stats();
    out["ordering"] = {
        {"connected", s.connected},
        {"local_height", s.local_height},
        {"cluster_height", s.cluster_height},
        {"lag_blocks", s.cluster_height > s.local_height ? s.cluster_height - s.local_height : 0},
        {"blocks_proposed", s.blocks_proposed},
        {"claims_lost", s.claims_lost},
        {"invalid_blocks", s.invalid_blocks},
        {"rewrites", s.rewrites},
        // etcd's history compacted by this member (docs/replication.md, "Size and compaction").
        {"compaction",
         {{"revision", s.compacted_revision},
          {"age_ms", s.compacted_at_us ? json(age_ms(s.compacted_at_us)) : json(nullptr)},
          {"compactions", s.compactions},
          {"watch_restarts", s.watch_restarts}}},
        {"last_invalid", s.last_invalid},
        {"last_error", s.last_error}};
  } else {
    out["ordering"] = nullptr;
  }
  return out;
}

std::vector<std::string> Cluster::problems() const {
  std::vector<std::string> out;
  auto replica = ledger_.replica();
  if (!replica) return out;
  if (vault_) {
    Result<std::optional<Hash>> held = vault_->cluster_secret_id();
    if (held.ok() && !*held)
      out.push_back(
          "this member has not received the cluster's shared key yet: no patient can be named "
          "here until a member seals it to this member's key-agreement key");
  }
  std::lock_guard lk(mu_);
  if (settings_ && settings_->compaction_interval_s == 0 && vault_)
    out.push_back(
        "this member never compacts etcd's history (compaction_interval_s = 0): unless another "
        "member or the operator does, erased patients' data keys stay in that history");
  if (!settings_) {
    out.push_back("replicated ledger without cluster settings: entries queue locally");
    return out;
  }
  if (!orderer_) {
    out.push_back("not ordering yet: etcd has not answered since the start");
    return out;
  }
  order::OrdererStats s = orderer_->stats();
  if (!s.connected)
    out.push_back("etcd does not answer: entries queue locally (" + s.last_error + ")");
  if (s.invalid_blocks > 0 && !s.last_invalid.empty())
    out.push_back("a void block record was seen: " + s.last_invalid);
  return out;
}

Result<json> Cluster::cluster_status() const {
  json out = status_json();
  if (out.is_null())
    return Status::FailedPrecondition(
        "this ledger is not replicated (a single box; `medctl cluster init` makes it the first "
        "member of a cluster)");
  out["membership"] = members_json();
  std::unique_ptr<order::EtcdClient> probe;
  {
    std::lock_guard lk(mu_);
    if (settings_) {
      auto c = order::EtcdClient::open(settings_->etcd_options());
      if (c.ok()) probe = std::move(c).value();
    }
  }
  if (probe) {
    // Each member's last reported height (members/<id>/seen; display only).
    std::string prefix;
    {
      std::lock_guard lk(mu_);
      prefix = settings_->prefix;
    }
    const std::string members = prefix + "members/";
    if (Result<order::Range> seen = probe->range(members, order::prefix_end(members)); seen.ok()) {
      json heights = json::array();
      for (const order::KeyValue& kv : seen->kvs)
        if (auto m = order::parse_seen(kv.key, prefix, kv.value))
          heights.push_back(
              {{"member_id", m->member_id}, {"height", m->height}, {"age_ms", age_ms(m->time_us)}});
      out["member_heights"] = heights;
    }
    Result<order::EtcdStatus> st = probe->status();
    if (st.ok()) {
      json health = json::array();
      for (const order::EndpointHealth& h : st->member_health)
        health.push_back({{"endpoint", h.endpoint}, {"healthy", h.healthy}, {"error", h.error}});
      out["etcd_status"] = {{"answered_by", st->endpoint}, {"leader", st->leader},
                            {"raft_term", st->raft_term},  {"revision", st->revision},
                            {"db_size", st->db_size},      {"version", st->version},
                            {"endpoints", health}};
    } else {
      out["etcd_status"] = {{"error", st.status().message()}};
    }
  }
  return out;
}

}  // namespace medgate::appliance
