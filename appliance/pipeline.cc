#include "appliance/pipeline.h"

#include <nlohmann/json.hpp>

#include <pthread.h>

#include <algorithm>
#include <chrono>
#include <cstring>

#include "ledger/entry.h"

namespace medgate::appliance {
namespace {

using nlohmann::json;

// The observation's fields, short keys; the patient is not in it (the entry's subject is the
// pseudonym and the vault holds the identifier).
json to_json(const Observation& o) {
  json j = {{"c", o.code}, {"cs", o.code_system}, {"t", o.time_us}};
  if (!o.display.empty()) j["d"] = o.display;
  if (!o.unit.empty()) j["u"] = o.unit;
  if (!o.device_id.empty()) j["dev"] = o.device_id;
  if (!o.status.empty()) j["st"] = o.status;
  if (const double* v = std::get_if<double>(&o.value)) j["v"] = *v;
  if (const std::string* v = std::get_if<std::string>(&o.value)) j["vs"] = *v;
  if (const bool* v = std::get_if<bool>(&o.value)) j["vb"] = *v;
  if (const Bytes* v = std::get_if<Bytes>(&o.value)) {
    std::vector<std::uint8_t> raw(v->size());
    std::memcpy(raw.data(), v->data(), v->size());
    j["vd"] = json::binary(std::move(raw));
  }
  return j;
}

}  // namespace

Bytes encode_observation(const Observation& o) {
  std::vector<std::uint8_t> cbor = json::to_cbor(to_json(o));
  Bytes out(cbor.size());
  std::memcpy(out.data(), cbor.data(), cbor.size());
  return out;
}

Result<Observation> decode_observation(ByteView bytes) {
  json j = json::from_cbor(u8(bytes), u8(bytes) + bytes.size(), /*strict=*/true,
                           /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object())
    return Status::Corruption("an observation payload is not a CBOR map");
  Observation o;
  try {
    o.code = j.value("c", "");
    o.code_system = j.value("cs", "");
    o.display = j.value("d", "");
    o.unit = j.value("u", "");
    o.device_id = j.value("dev", "");
    o.status = j.value("st", "");
    o.time_us = j.value("t", std::uint64_t{0});
    if (j.contains("v")) o.value = j["v"].get<double>();
    if (j.contains("vs")) o.value = j["vs"].get<std::string>();
    if (j.contains("vb")) o.value = j["vb"].get<bool>();
    if (j.contains("vd")) {
      const auto& raw = j["vd"].get_binary();
      Bytes b(raw.size());
      std::memcpy(b.data(), raw.data(), raw.size());
      o.value = std::move(b);
    }
  } catch (const json::exception&) {
    return Status::Corruption("an observation payload has a field of the wrong type");
  }
  return o;
}

IngestPipeline::IngestPipeline(ledger::Ledger& ledger, Vault& vault, PipelineOptions options)
    : ledger_(ledger), vault_(vault), options_(options) {
  for (std::size_t i = 0; i < std::max<std::size_t>(options_.workers, 1); ++i)
    workers_.emplace_back([this] {
      pthread_setname_np(pthread_self(), "ingest-worker");
      worker_loop();
    });
}

IngestPipeline::~IngestPipeline() {
  stop();
}

IngestSink::Admit IngestPipeline::submit(IngestBatch batch,
                                         std::function<void(IngestResult)> done) {
  std::unique_lock lk(mu_);
  if (stopping_) {
    ++counters_.busy;
    return Admit::kBusy;
  }
  if (!batch.message_id.empty()) {
    auto it = recent_.find({batch.device_id, batch.message_id});
    if (it != recent_.end()) {
      ++counters_.duplicates;
      if (!it->second.committed) {
        it->second.waiters.push_back(std::move(done));
        return Admit::kAccepted;
      }
      // Answered by a worker: `done` must not run on the caller's thread (the listener may hold
      // its own lock), and stop() waits for it like for any accepted batch.
      ++in_flight_batches_;
      queue_.push_back({{}, std::move(done), IngestResult{Status::Ok(), it->second.first_entry, true}});
      lk.unlock();
      work_cv_.notify_one();
      return Admit::kAccepted;
    }
  }
  std::size_t n = batch.observations.size();
  if (queued_observations_ > 0 && queued_observations_ + n > options_.max_queued_observations) {
    ++counters_.busy;
    return Admit::kBusy;
  }
  queued_observations_ += n;
  ++in_flight_batches_;
  ++counters_.batches;
  if (!batch.message_id.empty()) {
    RecentKey key{batch.device_id, batch.message_id};
    recent_.emplace(key, Recent{});
    recent_order_.push_back(key);
    while (recent_order_.size() > options_.max_recent) {
      auto old = recent_.find(recent_order_.front());
      if (old != recent_.end()) {
        if (old->second.committed)
          recent_.erase(old);
        else
          old->second.forget_when_done = true;  // still in flight: complete() forgets it
      }
      recent_order_.pop_front();
    }
  }
  queue_.push_back({std::move(batch), std::move(done), std::nullopt});
  lk.unlock();
  work_cv_.notify_one();
  return Admit::kAccepted;
}

Status IngestPipeline::load_recent(std::uint64_t max_entries) {
  const std::uint64_t size = ledger_.stats().tree_size;
  const std::uint64_t from = size > max_entries ? size - max_entries : 0;
  std::lock_guard lk(mu_);
  for (std::uint64_t i = from; i < size; ++i) {
    Result<ledger::StoredEntry> e = ledger_.entry(i);
    if (!e.ok()) return e.status().with_context("reading the ledger's newest entries");
    if (e->entry.type != ledger::EntryType::kObservation &&
        e->entry.type != ledger::EntryType::kPatientEvent)
      continue;
    const std::string* device = e->entry.body.find("device")->as_text();
    const std::string* id = e->entry.body.find("message_id")->as_text();
    if (!device || !id || id->empty()) continue;
    RecentKey key{*device, *id};
    if (recent_.count(key)) continue;  // a batch's later entries: keep its first
    Recent r;
    r.committed = true;
    r.first_entry = i;
    recent_.emplace(key, std::move(r));
    recent_order_.push_back(key);
    if (recent_order_.size() > options_.max_recent) {
      recent_.erase(recent_order_.front());
      recent_order_.pop_front();
    }
  }
  return Status::Ok();
}

void IngestPipeline::stop() {
  std::unique_lock lk(mu_);
  if (!stopping_) {
    stopping_ = true;
    work_cv_.notify_all();
  }
  idle_cv_.wait(lk, [&] { return in_flight_batches_ == 0; });
  lk.unlock();
  for (std::thread& t : workers_)
    if (t.joinable()) t.join();
}

PipelineCounters IngestPipeline::counters() const {
  std::lock_guard lk(mu_);
  PipelineCounters c = counters_;
  c.queued = queued_observations_;
  return c;
}

void IngestPipeline::worker_loop() {
  for (;;) {
    std::unique_lock lk(mu_);
    work_cv_.wait(lk, [&] { return !queue_.empty() || stopping_; });
    if (queue_.empty()) return;  // stopping, and everything taken
    Pending p = std::move(queue_.front());
    queue_.pop_front();
    lk.unlock();
    if (p.answer) {
      p.done(*p.answer);
      lk.lock();
      if (--in_flight_batches_ == 0) idle_cv_.notify_all();
      continue;
    }
    process(std::move(p));
  }
}

// Encrypts each reading under its patient's key and hands the batch to the ledger. Errors that
// are the batch's own (no patient, an erased patient) fail it; a full ledger queue is waited out,
// since the batch was accepted and must not be dropped.
void IngestPipeline::process(Pending p) {
  const std::size_t n = p.batch.observations.size();
  auto fail = [&](Status s) { complete(p.batch, n, IngestResult{std::move(s), 0, false}, p.done); };
  if (n == 0 && p.batch.patient_ids.empty())
    return fail(Status::InvalidArgument("the message holds no observations"));
  std::vector<ledger::Entry> entries;
  entries.reserve(n + 1);
  const char* source = p.batch.kind == SourceKind::kHl7 ? "hl7" : "coap";
  std::uint64_t now = ledger::now_us();
  if (!p.batch.patient_ids.empty()) {
    ledger::Entry e;
    e.type = ledger::EntryType::kPatientEvent;
    e.time_us = now;
    e.actor = "device:" + p.batch.device_id;
    for (const std::string& id : p.batch.patient_ids) {
      Result<Pseudonym> patient = vault_.pseudonym(id);
      if (!patient.ok()) return fail(patient.status());
      e.subjects.push_back({Bytes(patient->bytes.begin(), patient->bytes.end()), std::nullopt});
    }
    Result<ledger::cbor::Value> body = ledger::cbor::Value::map({
        {ledger::cbor::Value::text("source"), ledger::cbor::Value::text(source)},
        {ledger::cbor::Value::text("device"), ledger::cbor::Value::text(p.batch.device_id)},
        {ledger::cbor::Value::text("message_id"), ledger::cbor::Value::text(p.batch.message_id)},
        {ledger::cbor::Value::text("event"),
         ledger::cbor::Value::text(p.batch.event.empty() ? "ADT" : p.batch.event)},
    });
    if (!body.ok()) return fail(body.status());
    e.body = std::move(body).value();
    entries.push_back(std::move(e));
  }
  for (const Observation& o : p.batch.observations) {
    Result<Pseudonym> patient = Status::InvalidArgument("an observation names no patient");
    if (!o.patient_id.empty()) {
      patient = vault_.pseudonym(o.patient_id);
    } else if (o.patient_pseudonym) {
      // A device bound at another member of the cluster: known here by pseudonym only.
      patient = Pseudonym{*o.patient_pseudonym};
      if (Status s = vault_.ensure_patient(*patient); !s.ok()) patient = s;
    }
    if (!patient.ok()) return fail(patient.status());
    Result<Bytes> ciphertext =
        vault_.encrypt(*patient, encode_observation(o), as_bytes(kObservationAad));
    if (!ciphertext.ok()) return fail(ciphertext.status());
    ledger::Entry e;
    e.type = ledger::EntryType::kObservation;
    e.time_us = now;
    e.actor = "device:" + p.batch.device_id;
    Result<ledger::cbor::Value> body = ledger::cbor::Value::map({
        {ledger::cbor::Value::text("source"), ledger::cbor::Value::text(source)},
        {ledger::cbor::Value::text("device"), ledger::cbor::Value::text(p.batch.device_id)},
        {ledger::cbor::Value::text("message_id"), ledger::cbor::Value::text(p.batch.message_id)},
        {ledger::cbor::Value::text("ciphertext"), ledger::cbor::Value::bytes(*ciphertext)},
    });
    if (!body.ok()) return fail(body.status());
    e.body = std::move(body).value();
    e.subjects.push_back({Bytes(patient->bytes.begin(), patient->bytes.end()), std::nullopt});
    entries.push_back(std::move(e));
  }
  // The callback runs on the ledger's writer thread once the block is durable.
  auto shared = std::make_shared<Pending>(std::move(p));
  std::chrono::milliseconds backoff{1};
  for (;;) {
    Status s = ledger_.append_async(entries, [this, shared, n](Result<std::uint64_t> r) {
      IngestResult result{r.ok() ? Status::Ok() : r.status(), r.ok() ? *r : 0, false};
      complete(shared->batch, n, std::move(result), shared->done);
    });
    if (s.ok()) return;
    if (s.code() != StatusCode::kUnavailable)
      return complete(shared->batch, n, IngestResult{s, 0, false}, shared->done);
    std::this_thread::sleep_for(backoff);  // the ledger's queue is full: wait, never drop
    backoff = std::min(backoff * 2, std::chrono::milliseconds(100));
  }
}

void IngestPipeline::complete(const IngestBatch& batch, std::size_t observations,
                              IngestResult result, const std::function<void(IngestResult)>& done) {
  std::vector<std::function<void(IngestResult)>> waiters;
  {
    std::lock_guard lk(mu_);
    queued_observations_ -= observations;
    if (result.status.ok()) {
      ++counters_.committed;
      counters_.observations += observations;
    } else {
      ++counters_.failed;
    }
    if (!batch.message_id.empty()) {
      auto it = recent_.find({batch.device_id, batch.message_id});
      if (it != recent_.end()) {
        waiters = std::move(it->second.waiters);
        if (result.status.ok() && !it->second.forget_when_done) {
          it->second.committed = true;
          it->second.first_entry = result.first_entry;
        } else {
          recent_.erase(it);  // a failed message may be sent again and recorded then
        }
      }
    }
  }
  done(result);
  for (auto& w : waiters) w(IngestResult{result.status, result.first_entry, true});
  std::lock_guard lk(mu_);
  --in_flight_batches_;
  if (in_flight_batches_ == 0) idle_cv_.notify_all();
}

}  // namespace medgate::appliance
