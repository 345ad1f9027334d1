// The ingest pipeline against a real SoftHSM token, a real vault and a real ledger: batches
// become encrypted observation entries that are durable before `done`, retransmissions are not
// recorded twice, a full pipeline pushes back, bad batches fail alone, an erased patient's data
// can no longer be read while the ledger still verifies, and no identifier or value reaches the
// files in clear.
#include <catch2/catch.hpp>

#include <condition_variable>
#include <fstream>
#include <mutex>
#include <set>
#include <sstream>
#include <thread>

#include "appliance/erasure.h"
#include "appliance/pipeline.h"
#include "appliance/vault.h"
#include "ledger/store.h"
#include "ledger/verifier.h"
#include "tests/support/softhsm.h"
#include "tests/support/temp_dir.h"

using namespace medgate;
using namespace medgate::appliance;
using medgate::testing::SoftHsmToken;
using medgate::testing::TempDir;
namespace fs = std::filesystem;

namespace {

Observation reading(const std::string& patient, double value, const std::string& note = "") {
  Observation o;
  o.patient_id = patient;
  o.code = "150456";
  o.code_system = "MDC";
  o.display = "MDC_PULS_OXIM_SAT_O2";
  o.value = value;
  o.unit = "%";
  o.time_us = 1764000000000000ULL;
  o.device_id = "monitor-7";
  if (!note.empty()) o.value = note;
  return o;
}

// Collects `done` results from whatever thread calls it.
struct Results {
  std::mutex mu;
  std::condition_variable cv;
  std::vector<IngestResult> results;
  std::vector<std::uint64_t> sizes_at_done;  // the ledger's committed size when done ran
  ledger::Ledger* ledger = nullptr;

  std::function<void(IngestResult)> callback() {
    return [this](IngestResult r) {
      std::uint64_t size = ledger ? ledger->stats().tree_size : 0;
      std::lock_guard lk(mu);
      results.push_back(std::move(r));
      sizes_at_done.push_back(size);
      cv.notify_all();
    };
  }
  std::vector<IngestResult> wait_for(std::size_t n) {
    std::unique_lock lk(mu);
    cv.wait(lk, [&] { return results.size() >= n; });
    return results;
  }
};

std::string file_bytes(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

struct Fixture {
  TempDir dir;
  SoftHsmToken token{dir.path()};
  std::unique_ptr<hsm::KeyStore> keys = token.open_with_key();
  std::unique_ptr<ledger::Ledger> ledger;
  std::unique_ptr<Vault> vault;

  Fixture() {
    ledger::LedgerOptions o;
    o.path = dir / "ledger.db";
    o.head_interval = std::chrono::milliseconds(0);
    auto l = ledger::Ledger::create(o, "ward-7", *keys, "user:root");
    REQUIRE(l.ok());
    ledger = std::move(l).value();
    auto v = Vault::open(dir / "vault.db", *keys);
    REQUIRE(v.ok());
    vault = std::move(v).value();
  }
};

}  // namespace

TEST_CASE("batches become encrypted observation entries, durable before done", "[pipeline]") {
  Fixture f;
  const std::string marker = "MARKER-" + to_hex(*f.keys->random(8));
  Results results;
  results.ledger = f.ledger.get();
  {
    IngestPipeline pipeline(*f.ledger, *f.vault);
    std::vector<std::thread> senders;
    for (int t = 0; t < 4; ++t)
      senders.emplace_back([&, t] {
        for (int i = 0; i < 10; ++i) {
          IngestBatch b;
          b.kind = SourceKind::kHl7;
          b.device_id = "monitor-" + std::to_string(t);
          b.message_id = "msg-" + std::to_string(i);
          for (int k = 0; k < 3; ++k)
            b.observations.push_back(reading(marker + "-patient-" + std::to_string(k), 97.0 + k,
                                             k == 2 ? marker + "-note" : ""));
          while (pipeline.submit(b, results.callback()) != IngestSink::Admit::kAccepted)
            std::this_thread::yield();
        }
      });
    for (auto& s : senders) s.join();
    auto all = results.wait_for(40);
    std::set<std::uint64_t> firsts;
    for (std::size_t i = 0; i < all.size(); ++i) {
      const IngestResult& r = all[i];
      INFO(r.status.to_string());
      CHECK(r.status.ok());
      CHECK_FALSE(r.duplicate);
      firsts.insert(r.first_entry);
      // Durable before done: when done ran, the committed tree already held the batch.
      CHECK(results.sizes_at_done[i] >= r.first_entry + 3);
    }
    CHECK(firsts.size() == 40);
    PipelineCounters c = pipeline.counters();
    CHECK(c.committed == 40);
    CHECK(c.observations == 120);
    CHECK(c.queued == 0);
  }

  // Every entry decrypts, through its subject's key, to what was sent.
  for (std::uint64_t i = 1; i < 121; ++i) {
    auto e = f.ledger->entry(i);
    REQUIRE(e.ok());
    REQUIRE(e->entry.type == ledger::EntryType::kObservation);
    REQUIRE(e->entry.subjects.size() == 1);
    Pseudonym p;
    std::copy(e->entry.subjects[0].subject.begin(), e->entry.subjects[0].subject.end(),
              p.bytes.begin());
    auto plain = f.vault->decrypt(p, *e->entry.body.find("ciphertext")->as_bytes(),
                                  as_bytes(kObservationAad));
    REQUIRE(plain.ok());
    auto o = decode_observation(*plain);
    REQUIRE(o.ok());
    CHECK(o->code == "150456");
    CHECK(o->unit == "%");
    auto id = f.vault->identifier(p);
    REQUIRE(id.ok());
    CHECK_THAT(*id, Catch::StartsWith(marker));
  }

  // Privacy: no identifier and no string value in clear in any file.
  f.ledger->close();
  for (const char* name : {"ledger.db", "ledger.db-wal", "vault.db", "vault.db-wal"}) {
    INFO(name);
    CHECK(file_bytes(f.dir / name).find(marker) == std::string::npos);
  }
  ledger::VerifyOptions vo;
  vo.trusted_keys = {f.keys->signing_key()};
  auto report = ledger::verify_ledger_file(f.dir / "ledger.db", vo);
  REQUIRE(report.ok());
  CHECK(report->ok());
}

TEST_CASE("a retransmitted message is acknowledged again but recorded once", "[pipeline]") {
  Fixture f;
  IngestPipeline pipeline(*f.ledger, *f.vault);
  Results results;
  IngestBatch b;
  b.device_id = "lab-1";
  b.message_id = "MSG00042";
  b.observations = {reading("P-1", 98)};
  REQUIRE(pipeline.submit(b, results.callback()) == IngestSink::Admit::kAccepted);
  results.wait_for(1);
  std::uint64_t size = f.ledger->stats().tree_size;
  REQUIRE(pipeline.submit(b, results.callback()) == IngestSink::Admit::kAccepted);
  auto all = results.wait_for(2);
  CHECK(all[1].status.ok());
  CHECK(all[1].duplicate);
  CHECK(all[1].first_entry == all[0].first_entry);
  CHECK(f.ledger->stats().tree_size == size);
  // The same control id from another source is another message.
  b.device_id = "lab-2";
  REQUIRE(pipeline.submit(b, results.callback()) == IngestSink::Admit::kAccepted);
  all = results.wait_for(3);
  CHECK_FALSE(all[2].duplicate);
  CHECK(f.ledger->stats().tree_size == size + 1);
}

TEST_CASE("a bad batch fails alone, and a full pipeline pushes back", "[pipeline]") {
  Fixture f;
  Results results;
  SECTION("no patient") {
    IngestPipeline pipeline(*f.ledger, *f.vault);
    IngestBatch b;
    b.device_id = "pump-3";
    b.observations = {reading("P-1", 1), reading("", 2)};
    REQUIRE(pipeline.submit(b, results.callback()) == IngestSink::Admit::kAccepted);
    auto all = results.wait_for(1);
    CHECK(all[0].status.code() == StatusCode::kInvalidArgument);
    CHECK(f.ledger->stats().tree_size == 1);  // all or nothing
  }
  SECTION("backpressure") {
    PipelineOptions o;
    o.max_queued_observations = 4;
    o.workers = 1;
    IngestPipeline pipeline(*f.ledger, *f.vault, o);
    int accepted = 0, busy = 0;
    for (int i = 0; i < 200; ++i) {
      IngestBatch b;
      b.device_id = "pump-3";
      b.observations = {reading("P-" + std::to_string(i % 7), i)};
      if (pipeline.submit(b, results.callback()) == IngestSink::Admit::kAccepted)
        ++accepted;
      else
        ++busy;
    }
    auto all = results.wait_for(static_cast<std::size_t>(accepted));
    for (const auto& r : all) CHECK(r.status.ok());
    CHECK(busy > 0);  // 200 submits in a tight loop against a bound of 4 observations
    CHECK(pipeline.counters().busy == static_cast<std::uint64_t>(busy));
    CHECK(f.ledger->stats().tree_size == 1u + accepted);
  }
}

TEST_CASE("after erasure a patient's readings cannot be read or added; the ledger verifies",
          "[pipeline][vault]") {
  Fixture f;
  IngestPipeline pipeline(*f.ledger, *f.vault);
  Results results;
  IngestBatch b;
  b.device_id = "monitor-1";
  b.observations = {reading("P-erase", 91), reading("P-keep", 92)};
  REQUIRE(pipeline.submit(b, results.callback()) == IngestSink::Admit::kAccepted);
  auto first = results.wait_for(1)[0];
  REQUIRE(first.status.ok());

  PatientErasure erasure(*f.vault, *f.ledger);
  auto erased = erasure.erase("P-erase", "patient request", "user:alice");
  REQUIRE(erased.ok());

  auto entry = f.ledger->entry(first.first_entry);
  REQUIRE(entry.ok());
  auto read = f.vault->decrypt(erased->pseudonym, *entry->entry.body.find("ciphertext")->as_bytes(),
                               as_bytes(kObservationAad));
  CHECK(read.status().code() == StatusCode::kFailedPrecondition);
  CHECK_THAT(read.status().message(), Catch::Contains("was erased"));

  IngestBatch later;
  later.device_id = "monitor-1";
  later.observations = {reading("P-erase", 93)};
  REQUIRE(pipeline.submit(later, results.callback()) == IngestSink::Admit::kAccepted);
  auto after = results.wait_for(2)[1];
  CHECK(after.status.code() == StatusCode::kFailedPrecondition);

  pipeline.stop();
  f.ledger->close();
  ledger::VerifyOptions vo;
  vo.trusted_keys = {f.keys->signing_key()};
  auto report = ledger::verify_ledger_file(f.dir / "ledger.db", vo);
  REQUIRE(report.ok());
  CHECK(report->ok());
}

TEST_CASE("the retransmission window is refilled from the ledger after a restart", "[pipeline]") {
  Fixture f;
  Results results;
  IngestBatch b;
  b.device_id = "lab-1";
  b.message_id = "MSG-BEFORE-CRASH";
  b.observations = {reading("P-1", 98), reading("P-2", 99)};
  {
    IngestPipeline pipeline(*f.ledger, *f.vault);
    REQUIRE(pipeline.submit(b, results.callback()) == IngestSink::Admit::kAccepted);
    REQUIRE(results.wait_for(1)[0].status.ok());
  }
  std::uint64_t first = results.results[0].first_entry;
  std::uint64_t size = f.ledger->stats().tree_size;
  IngestPipeline restarted(*f.ledger, *f.vault);
  REQUIRE(restarted.load_recent(1000).ok());
  REQUIRE(restarted.submit(b, results.callback()) == IngestSink::Admit::kAccepted);
  auto again = results.wait_for(2)[1];
  CHECK(again.status.ok());
  CHECK(again.duplicate);
  CHECK(again.first_entry == first);
  CHECK(f.ledger->stats().tree_size == size);
  // Without the refill the same message would have been recorded again.
  IngestPipeline forgetful(*f.ledger, *f.vault);
  b.message_id = "MSG-OTHER";
  REQUIRE(forgetful.submit(b, results.callback()) == IngestSink::Admit::kAccepted);
  CHECK_FALSE(results.wait_for(3)[2].duplicate);
}
