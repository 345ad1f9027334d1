// The ingest pipeline: what makes a device's reading durable. It implements IngestSink
// (appliance/ingest.h) for the listeners:
//
//   submit (listener's thread, never blocks)
//     -> bounded queue (kBusy when full: the listener pushes back on the device)
//     -> worker thread: vault.pseudonym(patient) and vault.encrypt(observation) per reading,
//        one observation entry per reading, all of a batch in one Ledger::append_async
//     -> the ledger's writer commits (fsync) and calls back
//     -> done(result) on the writer's thread: the listener may now acknowledge (AA, 2.04).
//
// A batch is all-or-nothing: its entries are in one block. The worker never waits for the commit:
// the ledger's writer groups the batches of all workers and listeners into one transaction.
//
// Retransmissions: a batch whose (device, message_id) is in the recent window (committed or in
// flight) is not recorded again; `done` reports the original's first entry with duplicate=true.
// The window holds the last max_recent message ids; load_recent() refills it from the ledger's
// newest entries at start, so a sender that retransmits after a crash (it never got its ACK) is
// not recorded twice either. A retransmission older than the window is recorded again, with the
// same message id in both entries, so an audit can tell.
//
// Thread safety: submit() and counters() from any thread. stop() (and the destructor) stop
// accepting and wait until every accepted batch has had its `done` called.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "appliance/ingest.h"
#include "appliance/vault.h"
#include "ledger/store.h"

namespace medgate::appliance {

struct PipelineOptions {
  std::size_t max_queued_observations = 65536;  // beyond this, submit() answers kBusy
  std::size_t workers = 2;
  std::size_t max_recent = 65536;  // (device, message id) pairs kept for retransmission checks
};

struct PipelineCounters {
  std::uint64_t batches = 0;       // accepted
  std::uint64_t observations = 0;  // committed
  std::uint64_t committed = 0;     // batches committed
  std::uint64_t failed = 0;        // batches that failed (bad input or a ledger error)
  std::uint64_t duplicates = 0;    // retransmissions acknowledged without a second record
  std::uint64_t busy = 0;          // submits refused because the pipeline was full
  std::uint64_t queued = 0;        // observations accepted but not yet durable
};

// The bytes that are encrypted for one observation (a CBOR map; see pipeline.cc), and back.
Bytes encode_observation(const Observation& o);
Result<Observation> decode_observation(ByteView bytes);
// The associated data every observation ciphertext is bound to (besides the pseudonym).
inline constexpr std::string_view kObservationAad = "medgate observation v1";

class IngestPipeline final : public IngestSink {
 public:
  // `ledger` and `vault` must outlive the pipeline.
  IngestPipeline(ledger::Ledger& ledger, Vault& vault, PipelineOptions options = {});
  ~IngestPipeline() override;
  IngestPipeline(const IngestPipeline&) = delete;
  IngestPipeline& operator=(const IngestPipeline&) = delete;

  // Refills the retransmission window from the ledger's newest `max_entries` entries (observation
  // and patient-event entries carry their source's message id). Call before the listeners start.
  Status load_recent(std::uint64_t max_entries);

  Admit submit(IngestBatch batch, std::function<void(IngestResult)> done) override;
  void stop();
  PipelineCounters counters() const;

 private:
  struct Pending {
    IngestBatch batch;
    std::function<void(IngestResult)> done;
    std::optional<IngestResult> answer;  // a retransmission of a committed batch: just answer
  };
  using RecentKey = std::pair<std::string, std::string>;  // (device, message id)
  struct Recent {
    bool committed = false;
    bool forget_when_done = false;  // left the window while still in flight
    std::uint64_t first_entry = 0;
    std::vector<std::function<void(IngestResult)>> waiters;  // retransmissions while in flight
  };

  void worker_loop();
  void process(Pending pending);
  void complete(const IngestBatch& batch, std::size_t observations, IngestResult result,
                const std::function<void(IngestResult)>& done);

  ledger::Ledger& ledger_;
  Vault& vault_;
  const PipelineOptions options_;

  mutable std::mutex mu_;
  std::condition_variable work_cv_, idle_cv_;
  std::deque<Pending> queue_;
  std::size_t queued_observations_ = 0;  // accepted, not yet completed
  std::size_t in_flight_batches_ = 0;
  bool stopping_ = false;
  std::map<RecentKey, Recent> recent_;
  std::deque<RecentKey> recent_order_;
  PipelineCounters counters_;
  std::vector<std::thread> workers_;
};

}  // namespace medgate::appliance
