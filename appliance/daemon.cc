#include "appliance/daemon.h"

#include <signal.h>
#include <systemd/sd-daemon.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <deque>
#include <thread>

#include "appliance/admin_server.h"
#include "appliance/audit_ops.h"
#include "appliance/backup_ops.h"
#include "appliance/cluster.h"
#include "appliance/coap/server.h"
#include "appliance/consent.h"
#include "appliance/consent_ops.h"
#include "appliance/erasure.h"
#include "appliance/hl7/listener.h"
#include "appliance/json_cbor.h"
#include "appliance/log.h"
#include "appliance/pipeline.h"
#include "appliance/registry.h"
#include "appliance/vault.h"
#include "hsm/key_store_factory.h"
#include "ledger/store.h"
#include "ledger/verifier.h"

namespace medgate::appliance {
namespace {

using nlohmann::json;

std::uint64_t age_seconds(std::uint64_t time_us) {
  std::uint64_t now = ledger::now_us();
  return now > time_us ? (now - time_us) / 1000000 : 0;
}

json head_json(const ledger::SignedHead& h) {
  return {{"sequence", h.sequence},
          {"height", h.head.height},
          {"tree_size", h.head.tree_size},
          {"root", to_hex(h.head.root)},
          {"block_hash", to_hex(h.head.block_hash)},
          {"time", ledger::format_time(h.head.time_us)},
          {"age_seconds", age_seconds(h.head.time_us)},
          {"key_id", to_hex(h.head.key_id)},
          {"head", to_base64(h.bytes)},
          {"signature", to_base64(h.signature)}};
}

json hashes_json(const std::vector<Hash>& hashes) {
  json out = json::array();
  for (const Hash& h : hashes) out.push_back(to_hex(h));
  return out;
}

Result<std::uint64_t> uint_arg(const json& args, const char* name) {
  auto it = args.find(name);
  if (it == args.end())
    return Status::InvalidArgument(fmt::format("argument \"{}\" is required", name));
  if (!it->is_number_unsigned() && !(it->is_number_integer() && it->get<std::int64_t>() >= 0))
    return Status::InvalidArgument(
        fmt::format("argument \"{}\" must be a non-negative integer", name));
  return it->get<std::uint64_t>();
}

std::optional<std::uint64_t> optional_uint(const json& args, const char* name) {
  auto it = args.find(name);
  if (it == args.end() || it->is_null()) return std::nullopt;
  if (!it->is_number_unsigned() && !(it->is_number_integer() && it->get<std::int64_t>() >= 0))
    return std::nullopt;
  return it->get<std::uint64_t>();
}

}  // namespace

class Daemon::Impl {
 public:
  explicit Impl(Config config)
      : config_(std::move(config)), started_(std::chrono::steady_clock::now()) {}

  Status start() {
    set_log_level(config_.log_level);
    log(LogLevel::kInfo, "daemon.start", "medgated {} starting with {}", MEDGATE_VERSION,
        config_.source.string());
    Result<std::unique_ptr<hsm::KeyStore>> keys = hsm::open_key_store(config_.key_store);
    if (!keys.ok()) return keys.status().with_context("key store");
    keys_ = std::move(keys).value();
    log(LogLevel::kInfo, "keys.open", "key store {} open", keys_->description());

    ledger::LedgerOptions options;
    options.path = config_.ledger_path;
    options.head_interval = config_.head_interval;
    options.counter_interval = config_.counter_interval;
    Result<std::unique_ptr<ledger::Ledger>> opened = ledger::Ledger::open(options, *keys_);
    if (!opened.ok()) return opened.status().with_context("ledger");
    ledger_ = std::move(opened).value();
    if (ledger_->ledger_id() != config_.ledger_id)
      return Status::FailedPrecondition(fmt::format("ledger {} is '{}' but the config names '{}'",
                                                    config_.ledger_path.string(),
                                                    ledger_->ledger_id(), config_.ledger_id));
    ledger::LedgerStats stats = ledger_->stats();
    log(LogLevel::kInfo, "ledger.open",
        "ledger '{}' open: {} entries, block {}, root {}, signing key {}, rollback counter {}",
        stats.ledger_id, stats.tree_size, stats.height, to_hex(stats.root),
        to_hex(stats.active_key), stats.rollback_counter);

    // The payload vault, next to the ledger. Erasures a crash interrupted are finished before
    // anything else can touch the vault; one that cannot be finished now stays pending (its
    // patient's data is refused meanwhile) and is retried at the next start or erase request.
    const std::filesystem::path vault_path = config_.data_dir / "vault.db";
    Result<std::unique_ptr<Vault>> vault = Vault::open(vault_path, *keys_, /*must_exist=*/true);
    if (!vault.ok()) return vault.status().with_context("vault");
    vault_ = std::move(vault).value();
    erasure_ = std::make_unique<PatientErasure>(*vault_, *ledger_);
    log(LogLevel::kInfo, "vault.open", "vault {} open", vault_path.string());
    Result<std::unique_ptr<DeviceRegistry>> registry =
        DeviceRegistry::open(config_.data_dir / "registry.db", *keys_, *vault_, *ledger_);
    if (!registry.ok()) return registry.status().with_context("device registry");
    registry_ = std::move(registry).value();
    Result<std::unique_ptr<ConsentBook>> book = ConsentBook::open(*ledger_, *vault_);
    if (!book.ok()) return book.status().with_context("consent rules");
    consent_ = std::move(book).value();
    {
      std::vector<RulesVersionInfo> versions = consent_->rules_versions();
      log(LogLevel::kInfo, "rules.open", "consent rules: {}; {} consent grants on record",
          versions.empty() ? std::string("none deployed (every access is denied)")
                           : fmt::format("version {} ({} policies)", versions.back().version,
                                         versions.back().policies),
          consent_->grants(std::nullopt).size());
    }

    // Ingest: the pipeline makes readings durable; the listeners answer devices only after that.
    pipeline_ = std::make_unique<IngestPipeline>(*ledger_, *vault_);
    MEDGATE_RETURN_IF_ERROR(
        pipeline_->load_recent(PipelineOptions{}.max_recent).with_context("ingest pipeline"));
    if (config_.hl7) {
      mllp_ = std::make_unique<hl7::MllpListener>();
      hl7::MllpListenerConfig hl7_config = *config_.hl7;
      // A TPM's TLS key signs through this key store (declared before mllp_, so it outlives it).
      if (hl7_config.tls) hl7_config.tls->open_key_store = keys_.get();
      MEDGATE_RETURN_IF_ERROR(
          mllp_->start(hl7_config, *registry_, *pipeline_).with_context("HL7/MLLP listener"));
      log(LogLevel::kInfo, "hl7.listen", "HL7 v2 over MLLP{} on {} port {}",
          mllp_->tls() ? " over TLS" : "", config_.hl7->address, mllp_->port());
    }
    if (config_.coap) {
      coap_ = std::make_unique<coap::CoapServer>();
      MEDGATE_RETURN_IF_ERROR(
          coap_->start(*config_.coap, *registry_, *pipeline_).with_context("CoAP listener"));
      log(LogLevel::kInfo, "coap.listen", "CoAP/SenML over DTLS-PSK on {} port {}{}",
          config_.coap->address, config_.coap->port,
          config_.coap->plain_port
              ? fmt::format(", UNAUTHENTICATED plain CoAP on port {}", *config_.coap->plain_port)
              : "");
    }
    if (Result<std::vector<ErasureRecord>> done = erasure_->finish_pending(); !done.ok())
      log(LogLevel::kError, "vault.erase", "an interrupted erasure is still pending: {}",
          done.status().message());
    else
      for (const ErasureRecord& r : *done)
        log(LogLevel::kNotice, "vault.erase",
            "finished the interrupted erasure of patient {} (ledger entry {})",
            r.pseudonym.prefix(), r.entry);

    // A replicated ledger: order through etcd (docs/replication.md).
    cluster_ = std::make_unique<Cluster>(config_, *ledger_, *keys_);
    cluster_->follow_devices(*registry_);
    cluster_->follow_consent(*consent_);
    cluster_->follow_keys(*vault_);
    MEDGATE_RETURN_IF_ERROR(cluster_->start().with_context("cluster"));

    if (config_.metrics) {
      metrics_ = std::make_unique<MetricsServer>();
      MEDGATE_RETURN_IF_ERROR(metrics_->start(*config_.metrics, [this] { return metrics_text(); })
                                  .with_context("[metrics]"));
    }

    Result<std::unique_ptr<AdminServer>> server = AdminServer::start(config_.admin, operations());
    if (!server.ok()) return server.status().with_context("admin socket");
    admin_ = std::move(server).value();
    // The server answers from the moment it starts, before admin_ is assigned here: a status
    // request in between (medctl polls status while it waits for the daemon) must not read admin_.
    admin_view_.store(admin_.get(), std::memory_order_release);
    log(LogLevel::kInfo, "admin.listen", "admin API on {}", config_.admin.socket.string());

    monitor_ = std::thread([this] { monitor_loop(); });
    std::uint64_t watchdog_us = 0;
    if (sd_watchdog_enabled(0, &watchdog_us) > 0 && watchdog_us > 0)
      watchdog_ = std::thread(
          [this, watchdog_us] { watchdog_loop(std::chrono::microseconds(watchdog_us / 2)); });
    return Status::Ok();
  }

  void stop() {
    if (stopped_.exchange(true)) return;
    log(LogLevel::kInfo, "daemon.stop",
        "stopping: finishing admin requests, committing accepted entries");
    {
      std::lock_guard lk(watchdog_mu_);
      watchdog_stop_ = true;
    }
    watchdog_cv_.notify_all();
    if (watchdog_.joinable()) watchdog_.join();
    if (monitor_.joinable()) monitor_.join();
    // Listeners first: they answer what is in flight once it is durable, then the pipeline drains.
    if (metrics_) metrics_->stop();
    if (mllp_) mllp_->stop();
    if (coap_) coap_->stop();
    if (pipeline_) pipeline_->stop();
    if (admin_) admin_->stop();
    if (cluster_) cluster_->stop();
    if (ledger_) {
      ledger_->close();
      ledger::LedgerStats s = ledger_->stats();
      log(LogLevel::kInfo, "ledger.close",
          "ledger closed at {} entries; latest signed head covers {}", s.tree_size,
          s.latest_head ? s.latest_head->head.tree_size : 0);
    }
  }

 private:
  // Pings systemd's watchdog while the ledger writer is healthy; after a write error it stops, so
  // systemd restarts medgated (which reopens and re-checks the ledger).
  void watchdog_loop(std::chrono::microseconds period) {
    std::unique_lock lk(watchdog_mu_);
    while (!watchdog_stop_) {
      if (ledger_->stats().writer_error.empty()) sd_notify(0, "WATCHDOG=1");
      watchdog_cv_.wait_for(lk, period);
    }
  }

  // Logs when the key store or the head signer starts or stops failing, once per change, so the
  // journal shows a TPM lockout or a token that went away without repeating it every second.
  void monitor_loop() {
    std::unique_lock lk(watchdog_mu_);
    std::string device_error, sign_error, counter_error;
    std::uint64_t reconnects = 0;
    auto changed = [](std::string& last, const std::string& now) {
      if (last == now) return false;
      last = now;
      return true;
    };
    while (!watchdog_stop_) {
      hsm::KeyStoreHealth h = keys_->health();
      ledger::LedgerStats s = ledger_->stats();
      std::string device_now = h.reachable ? h.last_error : "unreachable: " + h.last_error;
      if (changed(device_error, device_now)) {
        if (device_now.empty())
          log(LogLevel::kNotice, "keys.health", "key store {} is healthy again",
              keys_->description());
        else
          log(LogLevel::kError, "keys.health", "key store {}: {}", keys_->description(),
              device_now);
      }
      if (h.reconnects > reconnects) {
        log(LogLevel::kNotice, "keys.reconnect", "reconnected to key store {} ({} in total)",
            keys_->description(), h.reconnects);
        reconnects = h.reconnects;
      }
      if (changed(sign_error, s.signer_error)) {
        if (sign_error.empty())
          log(LogLevel::kNotice, "ledger.sign", "signing heads again");
        else
          log(LogLevel::kError, "ledger.sign", "cannot sign heads: {}", sign_error);
      }
      if (changed(counter_error, s.counter_error) && !counter_error.empty())
        log(LogLevel::kError, "ledger.counter", "rollback counter: {}", counter_error);
      sample_rates(s);
      watchdog_cv_.wait_for(lk, std::chrono::seconds(2));
    }
  }

  // Counters sampled every monitor tick, so that status can show rates over the last minute.
  struct RateSample {
    std::chrono::steady_clock::time_point at;
    std::uint64_t entries = 0, readings = 0, decisions = 0;
  };
  static constexpr auto kRateWindow = std::chrono::seconds(60);

  void sample_rates(const ledger::LedgerStats& s) {
    RateSample r{std::chrono::steady_clock::now(), s.appended, 0, 0};
    if (pipeline_) r.readings = pipeline_->counters().observations;
    if (consent_) {
      ConsentBook::Counters c = consent_->counters();
      r.decisions = c.allowed + c.denied;
    }
    std::lock_guard lk(rates_mu_);
    rates_.push_back(r);
    // Keep one sample older than the window, so the window is always covered once it can be.
    while (rates_.size() > 2 && r.at - rates_[1].at >= kRateWindow) rates_.pop_front();
  }

  json rates_json() const {
    std::lock_guard lk(rates_mu_);
    if (rates_.size() < 2) return nullptr;
    const RateSample& a = rates_.front();
    const RateSample& b = rates_.back();
    const double seconds = std::chrono::duration<double>(b.at - a.at).count();
    if (seconds <= 0) return nullptr;
    auto per_s = [&](std::uint64_t from, std::uint64_t to) {
      return std::round(static_cast<double>(to - from) / seconds * 10) / 10;
    };
    return {{"window_seconds", std::lround(seconds)},
            {"entries_per_s", per_s(a.entries, b.entries)},
            {"readings_per_s", per_s(a.readings, b.readings)},
            {"decisions_per_s", per_s(a.decisions, b.decisions)}};
  }

  // Records a state-changing admin call on the ledger before it takes effect.
  Result<std::uint64_t> record(const Caller& caller, const std::string& op, const json& args) {
    MEDGATE_ASSIGN_OR_RETURN(ledger::cbor::Value cbor_args, json_to_cbor(args));
    ledger::Entry e;
    e.type = ledger::EntryType::kAdminAction;
    e.actor = caller.actor();
    MEDGATE_ASSIGN_OR_RETURN(
        e.body,
        ledger::cbor::Value::map({{ledger::cbor::Value::text("op"), ledger::cbor::Value::text(op)},
                                  {ledger::cbor::Value::text("args"), std::move(cbor_args)}}));
    Result<std::uint64_t> index = ledger_->append(e);
    if (!index.ok()) {
      log(LogLevel::kError, "ledger.append", "recording {} by {} failed: {}", op, caller.actor(),
          index.status().message());
      return index.status();
    }
    log(LogLevel::kNotice, "admin.action", "{} by {} recorded as entry {}", op, caller.actor(),
        *index);
    return index;
  }

  std::vector<Operation> operations() {
    std::vector<Operation> ops;
    auto read = [&](std::string name, auto fn) {
      ops.push_back({std::move(name), Role::kAuditor, fn});
    };
    auto change = [&](std::string name, auto fn) {
      ops.push_back({std::move(name), Role::kAdmin, fn});
    };

    read("status", [this](const Caller& c, const json&) -> Result<json> { return status(c); });
    read("ledger.head", [this](const Caller&, const json&) -> Result<json> {
      auto h = ledger_->latest_head();
      if (!h) return Status::NotFound("the ledger has no signed head yet");
      json out = head_json(*h);
      out["ledger_id"] = ledger_->ledger_id();
      return out;
    });
    read("ledger.verify", [this](const Caller& c, const json&) -> Result<json> {
      log(LogLevel::kInfo, "ledger.verify", "full verification requested by {}", c.actor());
      ledger::VerifyOptions options;
      options.trusted_keys = {keys_->signing_key()};
      MEDGATE_ASSIGN_OR_RETURN(ledger::VerifyReport report,
                               ledger::verify_ledger_file(config_.ledger_path, options));
      // The file cannot show that it is an old copy; the key store's counter can.
      Result<std::uint64_t> device = keys_->read_counter();
      if (report.ok() && device.ok() && report.rollback_counter < *device)
        report.problem = ledger::VerifyProblem{
            ledger::VerifyProblem::Where::kFile, 0,
            fmt::format("rollback: the latest signed head carries rollback counter {} but the key "
                        "store's counter is {}",
                        report.rollback_counter, *device)};
      if (!report.ok())
        log(LogLevel::kError, "ledger.tamper", "verification failed: {}",
            report.problem->describe());
      json out = ledger::to_json(report);
      out["key_store_counter"] = device.ok() ? json(*device) : json(nullptr);
      return out;
    });
    read("ledger.entry", [this](const Caller&, const json& args) -> Result<json> {
      MEDGATE_ASSIGN_OR_RETURN(std::uint64_t index, uint_arg(args, "index"));
      MEDGATE_ASSIGN_OR_RETURN(ledger::StoredEntry e, ledger_->entry(index));
      MEDGATE_ASSIGN_OR_RETURN(std::uint64_t height, ledger_->block_height_of(index));
      const ledger::EntryTypeInfo* info =
          ledger::find_entry_type(static_cast<std::uint64_t>(e.entry.type));
      json subjects = json::array();
      for (const auto& s : e.entry.subjects)
        subjects.push_back({{"subject", to_hex(s.subject)},
                            {"previous", s.previous ? json(*s.previous) : json(nullptr)}});
      return json{{"index", index},
                  {"block", height},
                  {"type", info ? info->name : "unknown"},
                  {"kind", info ? info->audit_kind : "unknown"},
                  {"time", ledger::format_time(e.entry.time_us)},
                  {"actor", e.entry.actor},
                  {"body", ledger::cbor::to_json(e.entry.body)},
                  {"subjects", subjects},
                  {"leaf_hash", to_hex(e.leaf)},
                  {"bytes", to_base64(e.bytes)}};
    });
    read("ledger.block", [this](const Caller&, const json& args) -> Result<json> {
      MEDGATE_ASSIGN_OR_RETURN(std::uint64_t height, uint_arg(args, "height"));
      MEDGATE_ASSIGN_OR_RETURN(ledger::StoredBlock b, ledger_->block(height));
      const auto& h = b.header;
      return json{{"height", h.height},
                  {"hash", to_hex(b.hash)},
                  {"previous_hash", to_hex(h.previous_hash)},
                  {"first_index", h.first_index},
                  {"entry_count", h.entry_count},
                  {"tree_size", h.tree_size},
                  {"root", to_hex(h.root)},
                  {"time", ledger::format_time(h.time_us)},
                  {"key_id", to_hex(h.key_id)},
                  {"version", h.version},
                  {"ledger_id", h.ledger_id},
                  {"header", to_base64(b.bytes)}};
    });
    read("ledger.proof", [this](const Caller&, const json& args) -> Result<json> {
      MEDGATE_ASSIGN_OR_RETURN(std::uint64_t index, uint_arg(args, "index"));
      auto head = ledger_->latest_head();
      std::uint64_t size = optional_uint(args, "size").value_or(head ? head->head.tree_size : 0);
      MEDGATE_ASSIGN_OR_RETURN(ledger::StoredEntry e, ledger_->entry(index));
      MEDGATE_ASSIGN_OR_RETURN(std::vector<Hash> proof, ledger_->inclusion_proof(index, size));
      MEDGATE_ASSIGN_OR_RETURN(Hash root, ledger_->root_at(size));
      json out = {{"index", index},
                  {"tree_size", size},
                  {"leaf_hash", to_hex(e.leaf)},
                  {"proof", hashes_json(proof)},
                  {"root", to_hex(root)}};
      if (head && head->head.tree_size == size) out["signed_head"] = head_json(*head);
      return out;
    });
    read("ledger.consistency", [this](const Caller&, const json& args) -> Result<json> {
      MEDGATE_ASSIGN_OR_RETURN(std::uint64_t from, uint_arg(args, "from"));
      auto head = ledger_->latest_head();
      std::uint64_t to = optional_uint(args, "to").value_or(head ? head->head.tree_size : 0);
      MEDGATE_ASSIGN_OR_RETURN(std::vector<Hash> proof, ledger_->consistency_proof(from, to));
      MEDGATE_ASSIGN_OR_RETURN(Hash from_root, ledger_->root_at(from));
      MEDGATE_ASSIGN_OR_RETURN(Hash to_root, ledger_->root_at(to));
      json out = {{"from", from},
                  {"to", to},
                  {"from_root", to_hex(from_root)},
                  {"to_root", to_hex(to_root)},
                  {"proof", hashes_json(proof)}};
      if (head && head->head.tree_size == to) out["signed_head"] = head_json(*head);
      return out;
    });
    read("keys.show", [this](const Caller&, const json&) -> Result<json> {
      const PublicKey& k = keys_->signing_key();
      return json{{"key_id", to_hex(k.id())},
                  {"public_key_pem", k.pem()},
                  {"key_store", keys_->description()}};
    });
    change("keys.rotate", [this](const Caller& c, const json&) -> Result<json> {
      log(LogLevel::kNotice, "keys.rotate", "signing-key rotation requested by {}", c.actor());
      Result<ledger::KeyRotation> r = ledger_->rotate_signing_key(c.actor());
      if (!r.ok()) {
        log(LogLevel::kError, "keys.rotate", "rotation failed: {}", r.status().message());
        return r.status();
      }
      log(LogLevel::kNotice, "keys.rotate", "signing key {} replaced by {} (entry {})",
          to_hex(r->old_key.id()), to_hex(r->new_key.id()), r->entry_index);
      json out = {{"entry", r->entry_index},
                  {"old_key_id", to_hex(r->old_key.id())},
                  {"new_key_id", to_hex(r->new_key.id())},
                  {"public_key_pem", r->new_key.pem()},
                  {"first_head", nullptr}};
      if (r->first_head) out["first_head"] = head_json(*r->first_head);
      return out;
    });
    change("ledger.sign_head", [this](const Caller& c, const json& args) -> Result<json> {
      MEDGATE_ASSIGN_OR_RETURN(std::uint64_t index, record(c, "ledger.sign_head", args));
      MEDGATE_ASSIGN_OR_RETURN(ledger::SignedHead head, ledger_->sign_head_now());
      json out = head_json(head);
      out["recorded_as"] = index;
      return out;
    });
    // Crypto-shredding: the patient's identifier is PHI, so it appears in no log line and no
    // admin-action entry; the patient-erasure entry carries the pseudonym instead.
    // ---- the device registry (patient identifiers in arguments are never logged) ----
    read("device.list", [this](const Caller&, const json&) -> Result<json> {
      json out = json::array();
      for (const DeviceInfo& d : registry_->list()) out.push_back(device_json(d));
      return json{{"devices", out}};
    });
    read("device.show", [this](const Caller&, const json& args) -> Result<json> {
      MEDGATE_ASSIGN_OR_RETURN(std::string id, text_arg(args, "id"));
      MEDGATE_ASSIGN_OR_RETURN(DeviceInfo d, registry_->show(id));
      json out = device_json(d);
      out["traffic"] = device_counters(d);
      return out;
    });
    change("device.add", [this](const Caller& c, const json& args) -> Result<json> {
      MEDGATE_ASSIGN_OR_RETURN(std::string id, text_arg(args, "id"));
      MEDGATE_ASSIGN_OR_RETURN(std::string kind_name, text_arg(args, "kind"));
      std::optional<DeviceKind> kind = parse_device_kind(kind_name);
      if (!kind) return Status::InvalidArgument("argument \"kind\" must be coap or hl7");
      std::optional<std::string> patient;
      if (auto p = args.find("patient"); p != args.end() && !p->is_null()) {
        if (!p->is_string() || p->get<std::string>().empty())
          return Status::InvalidArgument("argument \"patient\" must be a non-empty text");
        patient = p->get<std::string>();
      }
      MEDGATE_ASSIGN_OR_RETURN(std::vector<IpNetwork> allow, networks_arg(args));
      MEDGATE_ASSIGN_OR_RETURN(CertBinding cert, cert_arg(args));
      Result<DeviceChange> r = registry_->add(
          id, *kind, patient, args.value("hl7_application", std::string()),
          args.value("hl7_facility", std::string()), c.actor(), std::move(allow), std::move(cert));
      return device_change(c, "device.add", r);
    });
    change("device.allow", [this](const Caller& c, const json& args) -> Result<json> {
      MEDGATE_ASSIGN_OR_RETURN(std::string id, text_arg(args, "id"));
      MEDGATE_ASSIGN_OR_RETURN(std::vector<IpNetwork> allow, networks_arg(args));
      return device_change(c, "device.allow",
                           registry_->set_allow(id, std::move(allow), c.actor()));
    });
    change("device.cert", [this](const Caller& c, const json& args) -> Result<json> {
      MEDGATE_ASSIGN_OR_RETURN(std::string id, text_arg(args, "id"));
      MEDGATE_ASSIGN_OR_RETURN(CertBinding cert, cert_arg(args));
      return device_change(c, "device.cert", registry_->set_cert(id, std::move(cert), c.actor()));
    });
    change("device.bind", [this](const Caller& c, const json& args) -> Result<json> {
      MEDGATE_ASSIGN_OR_RETURN(std::string id, text_arg(args, "id"));
      MEDGATE_ASSIGN_OR_RETURN(std::string patient, text_arg(args, "patient"));
      return device_change(c, "device.bind", registry_->bind(id, patient, c.actor()));
    });
    change("device.revoke", [this](const Caller& c, const json& args) -> Result<json> {
      MEDGATE_ASSIGN_OR_RETURN(std::string id, text_arg(args, "id"));
      return device_change(c, "device.revoke", registry_->revoke(id, c.actor()));
    });
    change("device.rotate_psk", [this](const Caller& c, const json& args) -> Result<json> {
      MEDGATE_ASSIGN_OR_RETURN(std::string id, text_arg(args, "id"));
      return device_change(c, "device.rotate_psk", registry_->rotate_psk(id, c.actor()));
    });
    // Identifiers are shown to admins only, and every look is recorded (pseudonym only).
    change("patient.show", [this](const Caller& c, const json& args) -> Result<json> {
      Pseudonym p;
      if (auto ps = args.find("pseudonym"); ps != args.end() && ps->is_string()) {
        std::optional<Pseudonym> parsed = Pseudonym::from_hex(ps->get<std::string>());
        if (!parsed) return Status::InvalidArgument("argument \"pseudonym\" must be 64 hex digits");
        p = *parsed;
      } else if (auto id = args.find("patient");
                 id != args.end() && id->is_string() && !id->get<std::string>().empty()) {
        MEDGATE_ASSIGN_OR_RETURN(p, vault_->find(id->get<std::string>()));
      } else {
        return Status::InvalidArgument(
            "give argument \"pseudonym\" (64 hex digits) or \"patient\" (an identifier)");
      }
      MEDGATE_ASSIGN_OR_RETURN(PatientInfo info, vault_->info(p));
      MEDGATE_ASSIGN_OR_RETURN(std::uint64_t index,
                               record(c, "patient.show", json{{"pseudonym", p.hex()}}));
      json out = {{"pseudonym", p.hex()},
                  {"state", patient_state_name(info.state)},
                  {"created", ledger::format_time(info.created_us)},
                  {"identifier", nullptr},
                  {"recorded_as", index}};
      if (info.erased_us) out["erased_at"] = ledger::format_time(*info.erased_us);
      if (info.erasure_entry) out["erasure_entry"] = *info.erasure_entry;
      if (info.state == PatientState::kActive) {
        MEDGATE_ASSIGN_OR_RETURN(std::string id, vault_->identifier(p));
        out["identifier"] = id;
      }
      return out;
    });
    change("patient.erase", [this](const Caller& c, const json& args) -> Result<json> {
      auto patient = args.find("patient");
      if (patient == args.end() || !patient->is_string() || patient->get<std::string>().empty())
        return Status::InvalidArgument(
            "argument \"patient\" (the patient's identifier) is required");
      std::string reason;
      if (auto r = args.find("reason"); r != args.end() && !r->is_null()) {
        if (!r->is_string()) return Status::InvalidArgument("argument \"reason\" must be text");
        reason = r->get<std::string>();
      }
      Result<ErasureRecord> erased =
          erasure_->erase(patient->get<std::string>(), reason, c.actor());
      if (!erased.ok()) {
        log(LogLevel::kWarning, "patient.erase", "erasure requested by {} not done: {}", c.actor(),
            erased.status().message());
        return erased.status();
      }
      log(LogLevel::kNotice, "patient.erase", "patient {} erased by {}; recorded as entry {}",
          erased->pseudonym.prefix(), c.actor(), erased->entry);
      return json{{"pseudonym", erased->pseudonym.hex()},
                  {"entry", erased->entry},
                  {"erased_at", ledger::format_time(erased->erased_us)}};
    });
    for (Operation& op : consent_operations(*consent_, *vault_, *ledger_))
      ops.push_back(std::move(op));
    for (Operation& op : audit_operations(*ledger_, *keys_, *vault_)) ops.push_back(std::move(op));
    for (Operation& op : backup_operations(config_, *ledger_)) ops.push_back(std::move(op));
    for (Operation& op : cluster_->operations()) ops.push_back(std::move(op));
    return ops;
  }

  json consent_json() const {
    std::vector<RulesVersionInfo> versions = consent_->rules_versions();
    std::optional<DirectoryInfo> dir = consent_->directory();
    std::size_t active = 0;
    const std::uint64_t now = ledger::now_us();
    std::vector<ConsentGrant> grants = consent_->grants(std::nullopt);
    for (const ConsentGrant& g : grants) active += grant_state(g, now) == "active";
    ConsentBook::Counters c = consent_->counters();
    return {{"rules_version", versions.empty() ? json(nullptr) : json(versions.back().version)},
            {"policies", versions.empty() ? 0 : versions.back().policies},
            {"directory_version", dir ? json(dir->version) : json(nullptr)},
            {"grants", grants.size()},
            {"grants_active", active},
            {"decisions",
             {{"allowed", c.allowed},
              {"denied", c.denied},
              {"break_glass", c.break_glass},
              {"with_policy_errors", c.policy_errors}}}};
  }

  json ingest_json() const {
    PipelineCounters p = pipeline_ ? pipeline_->counters() : PipelineCounters{};
    json out = {{"pipeline",
                 {{"batches", p.batches},
                  {"committed", p.committed},
                  {"observations", p.observations},
                  {"failed", p.failed},
                  {"duplicates", p.duplicates},
                  {"busy", p.busy},
                  {"queued", p.queued}}},
                {"hl7", nullptr},
                {"coap", nullptr}};
    if (mllp_) {
      hl7::MllpListenerCounters m = mllp_->counters();
      out["hl7"] = {{"port", mllp_->port()},
                    {"connections_open", m.connections_open},
                    {"connections_accepted", m.connections_accepted},
                    {"connections_refused", m.connections_refused},
                    {"read_timeouts", m.read_timeouts},
                    {"unparseable_frames", m.unparseable_frames},
                    {"oversize_frames", m.oversize_frames},
                    {"incomplete_frames", m.incomplete_frames},
                    {"unknown_source", m.unknown_source},
                    {"acks_sent", m.acks_sent},
                    {"tls", mllp_->tls()},
                    {"tls_client_certificates", mllp_->verifies_clients()},
                    {"tls_handshakes", m.tls_handshakes},
                    {"tls_handshake_failures", m.tls_handshake_failures},
                    {"tls_handshake_timeouts", m.tls_handshake_timeouts}};
    }
    if (coap_) {
      coap::CoapCounters k = coap_->counters();
      out["coap"] = {{"port", config_.coap->port},
                     {"devices", k.devices.size()},
                     {"unknown_identity", k.unknown_identity},
                     {"handshake_errors", k.handshake_errors}};
    }
    return out;
  }

  // A device's traffic as its listener counted it; null when the listener is off.
  json device_counters(const DeviceInfo& d) const {
    if (d.kind == DeviceKind::kHl7 && mllp_) {
      hl7::MllpListenerCounters m = mllp_->counters();
      auto it = m.sources.find(d.id);
      if (it == m.sources.end()) return json{{"received", 0}};
      const hl7::MllpSourceCounters& c = it->second;
      return {{"received", c.received},
              {"committed", c.committed},
              {"duplicates", c.duplicates},
              {"adt", c.adt},
              {"rejected",
               {{"unparseable", c.rejected_unparseable},
                {"unprocessable", c.rejected_unprocessable},
                {"revoked", c.rejected_revoked},
                {"address", c.rejected_address},
                {"certificate", c.rejected_certificate},
                {"failed", c.failed}}},
              {"busy_retries", c.busy_retries},
              {"last_seen", c.last_seen_us ? json(ledger::format_time(c.last_seen_us)) : json()}};
    }
    if (d.kind == DeviceKind::kCoap && coap_) {
      coap::CoapCounters k = coap_->counters();
      auto it = k.devices.find(d.id);
      if (it == k.devices.end()) return json{{"received", 0}};
      const coap::DeviceCounters& c = it->second;
      json rejected = json::object();
      for (std::size_t i = 0; i < coap::kRejectReasonCount; ++i)
        rejected[std::string(coap::reject_reason_name(static_cast<coap::RejectReason>(i)))] =
            c.rejected[i];
      return {{"received", c.received},
              {"committed", c.committed},
              {"rejected", rejected},
              {"last_seen", c.last_seen_us ? json(ledger::format_time(c.last_seen_us)) : json()}};
    }
    return nullptr;
  }

  static json device_json(const DeviceInfo& d) {
    return {{"id", d.id},
            {"kind", device_kind_name(d.kind)},
            {"state", d.revoked ? "revoked" : "active"},
            {"patient", d.patient ? json(d.patient->hex()) : json(nullptr)},
            {"hl7_application", d.hl7_application},
            {"hl7_facility", d.hl7_facility},
            {"allow", allow_json(d.allow)},
            {"cert", d.cert.to_string()},
            {"created", ledger::format_time(d.created_us)},
            {"updated", ledger::format_time(d.updated_us)},
            {"last_entry", d.last_entry}};
  }

  static json allow_json(const std::vector<IpNetwork>& allow) {
    json out = json::array();
    for (const IpNetwork& n : allow) out.push_back(n.to_string());
    return out;
  }

  // "allow": an array of networks ("10.20.0.0/16", "10.1.2.3"); absent or empty: any address.
  static Result<std::vector<IpNetwork>> networks_arg(const json& args) {
    std::vector<IpNetwork> out;
    auto it = args.find("allow");
    if (it == args.end() || it->is_null()) return out;
    if (!it->is_array())
      return Status::InvalidArgument("argument \"allow\" must be an array of networks");
    for (const json& item : *it) {
      if (!item.is_string())
        return Status::InvalidArgument("argument \"allow\" must be an array of networks");
      MEDGATE_ASSIGN_OR_RETURN(IpNetwork n, parse_ip_network(item.get<std::string>()));
      if (std::find(out.begin(), out.end(), n) == out.end()) out.push_back(n);
    }
    return out;
  }

  // "cert_sha256" (64 hex digits, ':' allowed) or "cert_cn"; neither: no certificate binding.
  static Result<CertBinding> cert_arg(const json& args) {
    auto sha = args.find("cert_sha256");
    auto cn = args.find("cert_cn");
    bool has_sha = sha != args.end() && !sha->is_null();
    bool has_cn = cn != args.end() && !cn->is_null();
    if (has_sha && has_cn)
      return Status::InvalidArgument("give \"cert_sha256\" or \"cert_cn\", not both");
    if (has_sha) {
      if (!sha->is_string())
        return Status::InvalidArgument("argument \"cert_sha256\" must be text");
      return cert_fingerprint_binding(sha->get<std::string>());
    }
    if (has_cn) {
      if (!cn->is_string()) return Status::InvalidArgument("argument \"cert_cn\" must be text");
      return cert_cn_binding(cn->get<std::string>());
    }
    return CertBinding{};
  }

  Result<json> device_change(const Caller& c, const char* op, const Result<DeviceChange>& r) {
    if (!r.ok()) {
      log(LogLevel::kWarning, op, "{} by {} refused: {}", op, c.actor(), r.status().message());
      return r.status();
    }
    log(LogLevel::kNotice, op, "{} of device {} by {} recorded as entry {}", op, r->device.id,
        c.actor(), r->entry);
    json out = device_json(r->device);
    out["entry"] = r->entry;
    if (!r->psk.empty()) out["psk"] = r->psk;
    return out;
  }

  // The metrics endpoint's text: the same numbers as status, for the daemon itself.
  std::string metrics_text() {
    Caller self;
    self.uid = ::getuid();
    self.user = "medgated";
    self.role = Role::kAuditor;
    Result<json> s = status(self);
    json devices = json::array();
    if (registry_) {
      for (const DeviceInfo& d : registry_->list()) {
        json j = device_json(d);
        j["traffic"] = device_counters(d);
        devices.push_back(std::move(j));
      }
    }
    return render_metrics(s.ok() ? *s : json::object(), devices);
  }

  Result<json> status(const Caller& caller) {
    ledger::LedgerStats s = ledger_->stats();
    const hsm::KeyStoreHealth device = keys_->health();
    const AdminServer* server = admin_view_.load(std::memory_order_acquire);
    AdminCounters a = server ? server->counters() : AdminCounters{};
    json out = {
        {"daemon",
         {{"version", MEDGATE_VERSION},
          {"pid", ::getpid()},
          {"uptime_seconds", std::chrono::duration_cast<std::chrono::seconds>(
                                 std::chrono::steady_clock::now() - started_)
                                 .count()},
          {"config", config_.source.string()}}},
        {"caller", {{"actor", caller.actor()}, {"role", role_name(caller.role)}}},
        {"ledger",
         {{"id", s.ledger_id},
          {"path", config_.ledger_path.string()},
          {"entries", s.tree_size},
          {"height", s.height},
          {"root", to_hex(s.root)},
          {"last_block_time", ledger::format_time(s.last_block_time_us)},
          {"appended_since_start", s.appended},
          {"commits_since_start", s.batches},
          {"failed_appends", s.failed_appends},
          {"writer_error", s.writer_error}}},
        {"signed_head", nullptr},
        {"key_store",
         {{"description", keys_->description()},
          {"key_id", to_hex(s.active_key)},
          {"heads_signed", s.heads_signed},
          {"sign_failures", s.sign_failures},
          {"last_error", s.signer_error},
          {"device",
           {{"reachable", device.reachable},
            {"errors", device.errors},
            {"reconnects", device.reconnects},
            {"last_error", device.last_error}}}}},
        {"rollback_counter",
         {{"kind", keys_->counter_kind() == hsm::CounterKind::kTpmNv ? "tpm-nv" : "token-object"},
          {"signed", s.rollback_counter},
          {"key_store", s.device_counter},
          {"epochs_since_start", s.counter_epochs},
          {"interval_seconds", config_.counter_interval.count()},
          {"last_error", s.counter_error}}},
        {"admin",
         {{"socket", config_.admin.socket.string()},
          {"connections", a.connections},
          {"requests", a.requests},
          {"errors", a.errors},
          {"refused", a.refused}}},
        {"ingest", ingest_json()},
        {"consent", consent_json()},
        {"metrics", nullptr},
        {"rates", rates_json()},
        {"cluster", cluster_ ? cluster_->status_json() : json(nullptr)},
    };
    if (metrics_)
      out["metrics"] = {{"address", config_.metrics->address},
                        {"port", metrics_->port()},
                        {"scrapes", metrics_->scrapes()},
                        {"bad_requests", metrics_->bad_requests()}};
    // What needs an admin's attention, worst first; empty when all is well.
    json problems = json::array();
    if (!s.writer_error.empty()) problems.push_back("the ledger writer stopped: " + s.writer_error);
    if (!device.reachable) problems.push_back("the key store is unreachable");
    if (!s.signer_error.empty()) problems.push_back("head signing fails: " + s.signer_error);
    if (!s.counter_error.empty())
      problems.push_back("the rollback counter cannot advance: " + s.counter_error);
    if (cluster_)
      for (std::string& p : cluster_->problems()) problems.push_back(std::move(p));
    if (s.latest_head && config_.head_interval.count() > 0 &&
        s.tree_size > s.latest_head->head.tree_size) {
      const std::uint64_t limit = std::max<std::uint64_t>(
          60, 3 * static_cast<std::uint64_t>(config_.head_interval.count() / 1000 + 1));
      if (age_seconds(s.latest_head->head.time_us) > limit)
        problems.push_back(fmt::format("no signed head for {} s while entries wait",
                                       age_seconds(s.latest_head->head.time_us)));
    }
    json recent = json::array();
    for (const LoggedProblem& p : recent_problems())
      recent.push_back({{"time", ledger::format_time(p.time_us)},
                        {"level", p.level == LogLevel::kError ? "error" : "warning"},
                        {"id", p.id},
                        {"message", p.message}});
    out["health"] = {{"state", problems.empty() ? "ok" : "degraded"},
                     {"problems", problems},
                     {"recent_log", recent}};
    if (s.latest_head) {
      out["signed_head"] = {{"sequence", s.latest_head->sequence},
                            {"tree_size", s.latest_head->head.tree_size},
                            {"time", ledger::format_time(s.latest_head->head.time_us)},
                            {"age_seconds", age_seconds(s.latest_head->head.time_us)},
                            {"unsigned_entries", s.tree_size - s.latest_head->head.tree_size}};
    }
    return out;
  }

  Config config_;
  std::chrono::steady_clock::time_point started_;
  std::unique_ptr<hsm::KeyStore> keys_;
  std::unique_ptr<ledger::Ledger> ledger_;
  std::unique_ptr<Vault> vault_;
  std::unique_ptr<PatientErasure> erasure_;
  std::unique_ptr<DeviceRegistry> registry_;
  std::unique_ptr<ConsentBook> consent_;
  std::unique_ptr<IngestPipeline> pipeline_;
  std::unique_ptr<hl7::MllpListener> mllp_;
  std::unique_ptr<coap::CoapServer> coap_;
  std::unique_ptr<MetricsServer> metrics_;
  std::unique_ptr<Cluster> cluster_;
  std::unique_ptr<AdminServer> admin_;
  std::atomic<const AdminServer*> admin_view_{nullptr};  // admin_, once assigned
  std::atomic<bool> stopped_{false};
  std::thread watchdog_;
  std::thread monitor_;
  std::mutex watchdog_mu_;
  std::condition_variable watchdog_cv_;
  mutable std::mutex rates_mu_;
  std::deque<RateSample> rates_;  // under rates_mu_
  bool watchdog_stop_ = false;

  friend class Daemon;
};

Daemon::Daemon(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Daemon::~Daemon() {
  stop();
}

Result<std::unique_ptr<Daemon>> Daemon::start(const Config& config) {
  auto impl = std::make_unique<Impl>(config);
  Status s = impl->start();
  if (!s.ok()) {
    impl->stop();
    return s;
  }
  return std::unique_ptr<Daemon>(new Daemon(std::move(impl)));
}

void Daemon::run_until_signal() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  int sig = 0;
  sigwait(&set, &sig);
  log(LogLevel::kInfo, "daemon.signal", "received {}", sig == SIGTERM ? "SIGTERM" : "SIGINT");
  sd_notify(0, "STOPPING=1");
  stop();
}

void Daemon::stop() {
  if (impl_) impl_->stop();
}

}  // namespace medgate::appliance
