// The replicated ledger end to end inside one process: a real 3-member etcd cluster, three
// ledgers (each with its own signing key in a real SoftHSM token) and their orderers
// (ledger/order/orderer.h). The founder publishes its history, two replicas join from block 0,
// membership changes go through the ledger, all three append at once, and the replicas converge
// to the same chain. A record written straight into etcd by a non-member is voided by every
// replica, reported, and replaced. etcd's history is compacted by the orderers: a replica stopped
// across a compaction, and one whose watch a compaction cut, both catch up to the same chain.
#include <catch2/catch.hpp>

#include <atomic>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "hsm/key_store.h"
#include "ledger/block_record.h"
#include "ledger/membership.h"
#include "ledger/order/etcd_client.h"
#include "ledger/order/orderer.h"
#include "ledger/store.h"
#include "ledger/verifier.h"
#include "tests/support/entries.h"
#include "tests/support/etcd_cluster.h"
#include "tests/support/softhsm.h"
#include "tests/support/temp_dir.h"

using namespace medgate;
using namespace medgate::ledger;
using namespace std::chrono_literals;

namespace {

const std::string kLedgerId = "ward-ledger";
const std::string kPrefix = "/medgate/ward-ledger/";

struct Replica {
  std::string id;
  std::unique_ptr<hsm::KeyStore> keys;
  std::unique_ptr<Ledger> ledger;
  std::unique_ptr<order::EtcdClient> etcd;
  std::unique_ptr<order::Orderer> orderer;
  std::atomic<int> invalid_reports{0};
  std::string last_invalid;
  std::chrono::milliseconds compaction_interval{60000};

  ~Replica() {
    if (orderer) orderer->stop();
    orderer.reset();
    if (ledger) ledger->close();
  }

  void start_orderer() {
    order::OrdererOptions o;
    o.prefix = kPrefix;
    o.max_block_entries = 64;  // several blocks per burst, so heights are contended
    o.compaction_interval = compaction_interval;
    o.on_invalid = [this](std::uint64_t, const std::string& reason) {
      last_invalid = reason;
      ++invalid_reports;
    };
    auto started = order::Orderer::start(*ledger, *etcd, std::move(o));
    INFO(started.status().message());
    REQUIRE(started.ok());
    orderer = std::move(started).value();
  }
};

LedgerOptions options(const std::filesystem::path& path) {
  LedgerOptions o;
  o.path = path;
  o.head_interval = 200ms;
  o.order_timeout = 10s;
  return o;
}

std::unique_ptr<order::EtcdClient> client(std::vector<std::string> endpoints) {
  order::EtcdOptions o;
  o.endpoints = std::move(endpoints);
  auto c = order::EtcdClient::open(o);
  REQUIRE(c.ok());
  return std::move(c).value();
}

std::unique_ptr<order::EtcdClient> client(const testing::EtcdCluster& cluster) {
  return client(cluster.endpoints());
}

Bytes add_statement(std::uint64_t epoch, const std::string& id, const PublicKey& key) {
  MembershipStatement s;
  s.ledger_id = kLedgerId;
  s.epoch = epoch;
  s.action = MembershipAction::kAdd;
  s.member_id = id;
  s.signing_key = key;
  s.endpoint = "127.0.0.1:1";
  auto bytes = encode_membership_statement(s);
  REQUIRE(bytes.ok());
  return *bytes;
}

Bytes sign(hsm::KeyStore& keys, ByteView statement) {
  auto sig = keys.sign_digest(sha256(statement));
  REQUIRE(sig.ok());
  return *sig;
}

Entry noted(const std::string& op, std::uint64_t n, std::uint8_t subject) {
  Entry e = testing::note(op, n);
  e.subjects.push_back({Bytes(32, std::byte{subject}), std::nullopt});
  return e;
}

// A replica that joins: its own key in the token, block 0 from etcd, trusting the founder.
void join(Replica& m, testing::SoftHsmToken& token, const std::filesystem::path& dir,
          const PublicKey& founder) {
  m.keys = token.open_with_key();
  auto own = m.keys->create_signing_key();
  REQUIRE(own.ok());
  REQUIRE(m.keys->use_signing_key(own->id()).ok());
  auto r = m.etcd->range(order::block_key(kPrefix, 0));
  REQUIRE(r.ok());
  REQUIRE(r->kvs.size() == 1);
  auto genesis = decode_block_record(r->kvs[0].value);
  REQUIRE(genesis.ok());
  auto ledger =
      Ledger::create_replica(options(dir / (m.id + ".db")), *genesis, founder, m.id, *m.keys);
  INFO(ledger.status().message());
  REQUIRE(ledger.ok());
  m.ledger = std::move(ledger).value();
  m.start_orderer();
}

void wait_converged(std::vector<Replica*> members) {
  const auto deadline = std::chrono::steady_clock::now() + 30s;
  for (;;) {
    bool same = true;
    auto first = members[0]->ledger->stats();
    for (Replica* m : members) {
      auto s = m->ledger->stats();
      auto r = m->ledger->replica();
      if (s.height != first.height || s.root != first.root || r->outbox_entries != 0) same = false;
    }
    if (same) return;
    if (std::chrono::steady_clock::now() > deadline) {
      for (Replica* m : members) {
        auto s = m->ledger->stats();
        UNSCOPED_INFO(m->id << ": height " << s.height << " tree " << s.tree_size << " outbox "
                            << m->ledger->replica()->outbox_entries << " error "
                            << m->orderer->stats().last_error);
      }
      FAIL("the replicas did not converge within 30 s");
    }
    std::this_thread::sleep_for(10ms);
  }
}

// A block record for the height after `ledger`'s tip that claims to be `claimed`'s but is signed
// by a key that is no member's: what anyone with write access to etcd could put there.
BlockRecord forged_record(testing::SoftHsmToken& token, Ledger& ledger,
                          const std::string& claimed) {
  auto outsider = token.open_with_key();
  auto key = outsider->create_signing_key();
  REQUIRE(key.ok());
  REQUIRE(outsider->use_signing_key(key->id()).ok());
  auto tip = ledger.chain_tip();
  REQUIRE(tip.ok());
  BlockRecord forged;
  auto bytes = encode_entry(noted("forged", 1, 9));
  REQUIRE(bytes.ok());
  forged.entries.push_back(*bytes);
  ChainTip t = *tip;
  t.tree.append(merkle::leaf_hash(*bytes));
  forged.header.ledger_id = kLedgerId;
  forged.header.height = tip->height + 1;
  forged.header.previous_hash = tip->block_hash;
  forged.header.first_index = tip->tree.size();
  forged.header.entry_count = 1;
  forged.header.tree_size = t.tree.size();
  forged.header.root = t.tree.root();
  forged.header.time_us = tip->time_us + 1;
  forged.header.key_id = key->id();
  forged.header_bytes = encode_block_header(forged.header);
  forged.proposer = claimed;
  auto sig = outsider->sign_digest(block_hash(forged.header_bytes));
  REQUIRE(sig.ok());
  forged.signature = *sig;
  return forged;
}

// A founds a cluster of one: its ledger with a little history, the membership, its orderer.
void found(Replica& a, testing::SoftHsmToken& token, const std::filesystem::path& dir,
           const testing::EtcdCluster& cluster) {
  a.keys = token.open_with_key();
  auto l = Ledger::create(options(dir / (a.id + ".db")), kLedgerId, *a.keys, "user:test");
  REQUIRE(l.ok());
  a.ledger = std::move(l).value();
  for (int i = 0; i < 3; ++i) REQUIRE(a.ledger->append(noted("history", i, 1)).ok());
  Bytes founding = add_statement(0, a.id, a.keys->signing_key());
  auto entry = member_proposal_entry(founding, a.id, sign(*a.keys, founding), "user:test");
  REQUIRE(entry.ok());
  REQUIRE(a.ledger->append_membership(*entry).ok());
  REQUIRE(a.ledger->start_replication(a.id).ok());
  a.etcd = client(cluster);
  a.start_orderer();
}

// Waits until `done` holds; false after `timeout`.
template <typename F>
bool eventually(F done, std::chrono::milliseconds timeout = 20s) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (!done()) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::sleep_for(10ms);
  }
  return true;
}

}  // namespace

TEST_CASE("replication: three members order one ledger through etcd", "[replication]") {
  testing::TempDir dir("medgate-replication");
  testing::EtcdCluster cluster(dir.path(), 3);
  testing::SoftHsmToken token(dir.path());

  Replica a, b, c;
  a.id = "a", b.id = "b", c.id = "c";
  a.keys = token.open_with_key();
  {
    auto l = Ledger::create(options(dir / "a.db"), kLedgerId, *a.keys, "user:test");
    REQUIRE(l.ok());
    a.ledger = std::move(l).value();
  }
  // History from before the cluster: single-box blocks.
  for (int i = 0; i < 5; ++i) REQUIRE(a.ledger->append(noted("history", i, 1)).ok());

  {
    const PublicKey a_key = a.keys->signing_key();
    Bytes founding = add_statement(0, "a", a_key);
    auto entry = member_proposal_entry(founding, "a", sign(*a.keys, founding), "user:test");
    REQUIRE(entry.ok());
    // Replication needs a founded membership that names this ledger's key.
    CHECK(a.ledger->start_replication("a").code() == StatusCode::kFailedPrecondition);
    REQUIRE(a.ledger->append_membership(*entry).ok());
    CHECK(a.ledger->membership().founded());
    CHECK(a.ledger->start_replication("x").code() == StatusCode::kFailedPrecondition);
    REQUIRE(a.ledger->start_replication("a").ok());
    a.etcd = client(cluster);
    a.start_orderer();
    CHECK(a.orderer->stats().history_published == a.ledger->stats().height + 1);
  }

  // Replicated appends wait for the cluster and come back with an index.
  auto index = a.ledger->append(noted("after", 1, 2));
  INFO(index.status().message());
  REQUIRE(index.ok());
  CHECK(*index == a.ledger->stats().tree_size - 1);

  // B joins from block 0, trusting A's key, and catches up.
  b.etcd = client(cluster);
  join(b, token, dir.path(), a.keys->signing_key());
  REQUIRE(b.orderer->wait_for_height(a.ledger->stats().height, 10s));
  CHECK(b.ledger->stats().root == a.ledger->stats().root);
  // Not a member yet: its appends queue and are not ordered.
  {
    std::thread early([&] {
      auto r = b.ledger->append(noted("early", 1, 3));
      CHECK(r.ok());  // ordered once b is a member (below), within order_timeout
    });
    std::this_thread::sleep_for(300ms);
    CHECK(b.ledger->replica()->outbox_entries == 1);

    // A adds B (a majority of one).
    Bytes add_b = add_statement(1, "b", b.keys->signing_key());
    auto e = member_proposal_entry(add_b, "a", sign(*a.keys, add_b), "user:test");
    REQUIRE(e.ok());
    REQUIRE(a.ledger->append_membership(*e).ok());
    CHECK(a.ledger->membership().find("b") != nullptr);
    early.join();
  }

  // C joins; adding it needs A and B (two of two).
  c.etcd = client(cluster);
  join(c, token, dir.path(), a.keys->signing_key());
  {
    Bytes add_c = add_statement(2, "c", c.keys->signing_key());
    auto e = member_proposal_entry(add_c, "a", sign(*a.keys, add_c), "user:test");
    REQUIRE(e.ok());
    REQUIRE(a.ledger->append_membership(*e).ok());
    CHECK(a.ledger->membership().find("c") == nullptr);  // one approval of two
    REQUIRE(b.orderer->wait_for_height(a.ledger->stats().height, 10s));
    auto approve = member_approval_entry(add_c, "b", sign(*b.keys, add_c), "user:test");
    REQUIRE(approve.ok());
    // A second approval by the proposer is refused before anything is written.
    auto again = member_approval_entry(add_c, "a", sign(*a.keys, add_c), "user:test");
    CHECK(a.ledger->append_membership(*again).status().code() == StatusCode::kVerificationFailed);
    REQUIRE(b.ledger->append_membership(*approve).ok());
    CHECK(b.ledger->membership().find("c") != nullptr);
  }

  // All three append at once, without waiting for the cluster (store-and-forward).
  constexpr int kPerMember = 300;
  std::atomic<int> acked{0};
  {
    std::vector<std::thread> writers;
    for (Replica* m : {&a, &b, &c}) {
      writers.emplace_back([m, &acked] {
        for (int i = 0; i < kPerMember; ++i) {
          Entry e = noted(m->id, static_cast<std::uint64_t>(i), static_cast<std::uint8_t>(i % 7));
          std::atomic<bool> done{false};
          Status s = m->ledger->append_async(std::span(&e, 1), [&](Result<std::uint64_t> r) {
            if (r.ok()) ++acked;
            done = true;
          });
          if (!s.ok()) return;
          while (!done) std::this_thread::sleep_for(100us);
        }
      });
    }
    for (auto& t : writers) t.join();
  }
  CHECK(acked == 3 * kPerMember);
  wait_converged({&a, &b, &c});
  const auto final_a = a.ledger->stats();
  // Every entry appended anywhere is on every replica, exactly once.
  for (Replica* m : {&a, &b, &c}) {
    std::vector<EntryType> types{EntryType::kAdminAction};
    auto all = m->ledger->entries_of_type(types, 0, 100000);
    REQUIRE(all.ok());
    std::map<std::string, int> per_op;
    for (const auto& e : *all) per_op[*e.entry.body.find("op")->as_text()]++;
    CHECK(per_op["a"] == kPerMember);
    CHECK(per_op["b"] == kPerMember);
    CHECK(per_op["c"] == kPerMember);
    CHECK(per_op["early"] == 1);
    CHECK(per_op["history"] == 5);
  }
  // Blocks were contended: some claims were lost and the losers' entries went on top.
  const auto lost = a.orderer->stats().claims_lost + b.orderer->stats().claims_lost +
                    c.orderer->stats().claims_lost;
  INFO("claims lost: " << lost);
  CHECK(final_a.height > 3 * kPerMember / 64);

  // Each replica signs its own heads with its own key.
  REQUIRE(b.ledger->sign_head_now(true).ok());
  CHECK(b.ledger->latest_head()->head.key_id == b.keys->signing_key().id());
  CHECK(b.ledger->latest_head()->head.root == final_a.root);

  // Every replica's file verifies offline, trusting only the founder's key, or only one other
  // member's key (the rest follows from the membership entries).
  for (Replica* m : {&a, &b, &c}) {
    REQUIRE(m->ledger->sign_head_now(true).ok());
    for (Replica* trusted : {&a, &c}) {
      VerifyOptions vo;
      vo.trusted_keys.push_back(trusted->keys->signing_key());
      auto report = verify_ledger_file(dir / (m->id + ".db"), vo);
      REQUIRE(report.ok());
      INFO(m->id << " trusting " << trusted->id << ": "
                 << (report->problem ? report->problem->describe() : "ok"));
      CHECK(report->ok());
      CHECK(report->root == final_a.root);
      CHECK(report->member_blocks > 0);
    }
  }

  // b rotates its key in the cluster: the transition is ordered, b's later blocks and heads use
  // the new key, every replica accepts them, and every file still verifies.
  {
    const KeyId old_b = b.keys->signing_key().id();
    auto rotated = b.ledger->rotate_signing_key("user:test");
    INFO(rotated.status().message());
    REQUIRE(rotated.ok());
    CHECK(rotated->old_key.id() == old_b);
    CHECK(b.ledger->replica()->key_id == rotated->new_key.id());
    REQUIRE(b.ledger->append(noted("after-rotation", 1, 5)).ok());
    wait_converged({&a, &b, &c});
    CHECK(a.ledger->membership().find("b")->signing_key.id() == rotated->new_key.id());
    REQUIRE(b.ledger->sign_head_now(true).ok());
    CHECK(b.ledger->latest_head()->head.key_id == rotated->new_key.id());
    for (Replica* m : {&a, &b, &c}) {
      VerifyOptions vo;
      vo.trusted_keys.push_back(a.keys->signing_key());
      auto report = verify_ledger_file(dir / (m->id + ".db"), vo);
      REQUIRE(report.ok());
      INFO(m->id << ": " << (report->problem ? report->problem->describe() : "ok"));
      CHECK(report->ok());
    }
  }

  // A block written straight into etcd by a key that is not a member's.
  {
    const auto before_forgery = a.ledger->stats();
    BlockRecord forged = forged_record(token, *a.ledger, "a");  // claims to be a
    auto put =
        a.etcd->put(order::block_key(kPrefix, forged.header.height), encode_block_record(forged));
    REQUIRE(put.ok());
    const auto deadline = std::chrono::steady_clock::now() + 10s;
    while ((a.invalid_reports == 0 || b.invalid_reports == 0 || c.invalid_reports == 0) &&
           std::chrono::steady_clock::now() < deadline)
      std::this_thread::sleep_for(10ms);
    CHECK(a.invalid_reports >= 1);
    CHECK(b.invalid_reports >= 1);
    CHECK(c.invalid_reports >= 1);
    INFO(b.last_invalid);
    CHECK(b.last_invalid.find("not a member's") != std::string::npos);
    CHECK(a.ledger->stats().height == before_forgery.height);  // not applied

    // The next member with something to propose replaces it, and the cluster goes on.
    auto after = c.ledger->append(noted("after-forgery", 1, 4));
    INFO(after.status().message());
    REQUIRE(after.ok());
    wait_converged({&a, &b, &c});
    auto replaced = a.ledger->block_record(forged.header.height);
    REQUIRE(replaced.ok());
    CHECK(replaced->proposer == "c");
  }
}

TEST_CASE("replication: members' reported heights are parsed, and anything else is ignored",
          "[replication]") {
  const std::string prefix = "/medgate/w/";
  auto seen = order::parse_seen("/medgate/w/members/ward-a/seen", prefix, as_bytes("42 1700000"));
  REQUIRE(seen);
  CHECK(seen->member_id == "ward-a");
  CHECK(seen->height == 42);
  CHECK(seen->time_us == 1700000);
  CHECK(order::seen_key(prefix, "ward-a") == "/medgate/w/members/ward-a/seen");
  CHECK_FALSE(order::parse_seen("/medgate/w/members/ward-a/seen", prefix, as_bytes("garbage")));
  CHECK_FALSE(order::parse_seen("/medgate/w/members/ward-a/seen", prefix, as_bytes("")));
  CHECK_FALSE(order::parse_seen("/medgate/w/blocks/00000000000000000001", prefix, as_bytes("1 2")));
  CHECK_FALSE(order::parse_seen("/other/members/a/seen", prefix, as_bytes("1 2")));
}

TEST_CASE("replication: a replica stopped across a compaction of etcd's history catches up",
          "[replication][compaction]") {
  testing::TempDir dir("medgate-compaction");
  testing::EtcdCluster cluster(dir.path(), 1);
  testing::SoftHsmToken token(dir.path());
  Replica a, c;
  a.id = "a", c.id = "c";
  a.compaction_interval = 100ms;  // a compacts to the revision it read 100 ms earlier
  c.compaction_interval = 0ms;    // c never does: only a's compactions are at work here
  found(a, token, dir.path(), cluster);
  c.etcd = client(cluster);
  join(c, token, dir.path(), a.keys->signing_key());
  REQUIRE(c.orderer->wait_for_height(a.ledger->stats().height, 10s));
  c.orderer->stop();
  c.orderer.reset();
  const std::uint64_t c_height = c.ledger->stats().height;

  // While c is away: a key written and deleted (what an erasure does to a value in etcd), blocks
  // ordered one by one, and a void record written and replaced.
  const std::string erased_key = kPrefix + "test/erased";
  auto secret = a.etcd->put(erased_key, as_bytes("patient data"));
  REQUIRE(secret.ok());
  REQUIRE(a.etcd->remove(erased_key).ok());
  for (int i = 0; i < 40; ++i) REQUIRE(a.ledger->append(noted("away", i, 1)).ok());
  BlockRecord forged = forged_record(token, *a.ledger, "a");
  const std::string forged_key = order::block_key(kPrefix, forged.header.height);
  auto forged_put = a.etcd->put(forged_key, encode_block_record(forged));
  REQUIRE(forged_put.ok());
  REQUIRE(eventually([&] { return a.invalid_reports >= 1; }));
  REQUIRE(a.ledger->append(noted("after-forgery", 1, 4)).ok());  // a replaces the void record
  auto replaced = a.etcd->range(forged_key);
  REQUIRE(replaced.ok());
  REQUIRE(replaced->kvs.size() == 1);
  CHECK(replaced->kvs[0].mod_revision > *forged_put);
  CHECK(replaced->kvs[0].value != encode_block_record(forged));
  for (int i = 0; i < 20; ++i) REQUIRE(a.ledger->append(noted("more", i, 2)).ok());

  // a's orderer compacts past the void record and the deleted value.
  const std::int64_t past = replaced->kvs[0].mod_revision;
  REQUIRE(eventually([&] { return a.orderer->stats().compacted_revision > past; }));
  const order::OrdererStats as = a.orderer->stats();
  CHECK(as.compactions >= 1);
  CHECK(as.compacted_at_us > 0);
  auto old_void = a.etcd->range(forged_key, "", 0, *forged_put);
  CHECK(old_void.status().code() == StatusCode::kFailedPrecondition);
  auto old_secret = a.etcd->range(erased_key, "", 0, *secret);
  CHECK(old_secret.status().code() == StatusCode::kFailedPrecondition);
  CHECK(a.etcd->range(erased_key).value().kvs.empty());
  // Every block is still there, at its latest value.
  const std::string blocks = kPrefix + "blocks/";
  auto all = a.etcd->range(blocks, order::prefix_end(blocks), 1);
  REQUIRE(all.ok());
  CHECK(static_cast<std::uint64_t>(all->count) == a.ledger->stats().height + 1);

  // c comes back and catches up by range reads to the same chain. The void record is gone from
  // etcd's history, so c never even sees it.
  c.start_orderer();
  wait_converged({&a, &c});
  CHECK(c.ledger->stats().root == a.ledger->stats().root);
  const order::OrdererStats cs = c.orderer->stats();
  CHECK(cs.blocks_applied == a.ledger->stats().height - c_height);
  CHECK(cs.invalid_blocks == 0);
  CHECK(c.invalid_reports == 0);
  CHECK(cs.compactions == 0);
}

TEST_CASE("replication: a watch cut by a compaction is started again after a range read",
          "[replication][compaction]") {
  testing::TempDir dir("medgate-compaction");
  testing::EtcdCluster cluster(dir.path(), 3);
  testing::SoftHsmToken token(dir.path());
  Replica a, c;
  a.id = "a", c.id = "c";
  a.compaction_interval = 100ms;
  c.compaction_interval = 0ms;
  found(a, token, dir.path(), cluster);
  // c talks to etcd member 0 only, so that losing that member cuts c's watch.
  c.etcd = client({cluster.endpoint(0)});
  join(c, token, dir.path(), a.keys->signing_key());
  REQUIRE(c.orderer->wait_for_height(a.ledger->stats().height, 10s));
  CHECK(c.orderer->stats().watch_restarts == 0);

  // Member 0 dies; the other two go on, and a orders blocks and compacts past c's watch.
  cluster.kill(0);
  const std::string blocks = kPrefix + "blocks/";
  auto at_cut = a.etcd->range(blocks, order::prefix_end(blocks), 1);
  REQUIRE(at_cut.ok());
  for (int i = 0; i < 30; ++i) REQUIRE(a.ledger->append(noted("while-cut", i, 3)).ok());
  REQUIRE(eventually([&] { return a.orderer->stats().compacted_revision > at_cut->revision + 1; }));
  CHECK(c.ledger->stats().height < a.ledger->stats().height);
  const std::uint64_t height = a.ledger->stats().height;

  // In the gap, a rewrite of a block c applied before it was cut off, which no one puts back
  // (a's orderer is stopped): only c's read of the gap can find it.
  a.orderer->stop();
  a.orderer.reset();
  auto holds_applied = [&](std::uint64_t h) {
    auto applied = c.ledger->block_record(h);
    auto now = a.etcd->range(order::block_key(kPrefix, h));
    return applied.ok() && now.ok() && now->kvs.size() == 1 &&
           now->kvs[0].value == encode_block_record(*applied);
  };
  REQUIRE(holds_applied(2));
  REQUIRE(a.etcd->put(order::block_key(kPrefix, 2), as_bytes("a rewrite in the gap")).ok());

  // Member 0 is back (with the compaction applied): c's watch resumes from a compacted revision,
  // reports it, and c's orderer reads the gap, watches again, and catches up.
  cluster.restart(0);
  REQUIRE(eventually([&] { return c.orderer->stats().watch_restarts >= 1; }));
  REQUIRE(c.orderer->wait_for_height(height, 20s));
  CHECK(c.ledger->stats().root == a.ledger->stats().root);
  REQUIRE(eventually([&] { return c.orderer->stats().rewrites >= 1; }));
  CHECK(eventually([&] { return holds_applied(2); }));  // c put it back

  // The new watch is live: only it can show c a rewrite at a height c already applied.
  REQUIRE(a.etcd->put(order::block_key(kPrefix, 1), as_bytes("a rewrite after the gap")).ok());
  REQUIRE(eventually([&] { return c.orderer->stats().rewrites >= 2; }));
  CHECK(eventually([&] { return holds_applied(1); }));
  CHECK(c.orderer->stats().watch_restarts == 1);
}
