// Membership of a replicated ledger (ledger/membership.h) and block records with their
// validation (ledger/block_record.h). Members' keys are real: several signing keys in one SoftHSM
// token, each standing for one appliance's HSM.
#include <catch2/catch.hpp>

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "hsm/key_store.h"
#include "ledger/block_record.h"
#include "ledger/cbor.h"
#include "ledger/entry.h"
#include "ledger/membership.h"
#include "tests/support/softhsm.h"
#include "tests/support/temp_dir.h"

using namespace medgate;
using namespace medgate::ledger;

namespace {

const std::string kLedger = "ward-ledger";

// Four appliances' signing keys, held in one token.
struct Keys {
  Keys() : token(dir.path()), store(token.open_with_key()) {
    keys.emplace("a", store->signing_key());
    for (const char* name : {"b", "c", "d", "outsider"}) {
      auto k = store->create_signing_key();
      REQUIRE(k.ok());
      keys.emplace(name, *k);
    }
  }
  const PublicKey& key(const std::string& name) const { return keys.at(name); }
  Bytes sign(const std::string& name, ByteView message) {
    auto sig = store->sign_digest_with(key(name).id(), sha256(message));
    REQUIRE(sig.ok());
    return *sig;
  }

  testing::TempDir dir{"medgate-membership"};
  testing::SoftHsmToken token;
  std::unique_ptr<hsm::KeyStore> store;
  std::map<std::string, PublicKey> keys;
};

Keys& keys() {
  static Keys k;
  return k;
}

Bytes add_statement(std::uint64_t epoch, const std::string& member, const std::string& key_name,
                    std::string ledger = kLedger) {
  MembershipStatement s;
  s.ledger_id = std::move(ledger);
  s.epoch = epoch;
  s.action = MembershipAction::kAdd;
  s.member_id = member;
  s.signing_key = keys().key(key_name);
  s.endpoint = "10.0.0.1:7400";
  auto bytes = encode_membership_statement(s);
  REQUIRE(bytes.ok());
  return *bytes;
}

Bytes remove_statement(std::uint64_t epoch, const std::string& member) {
  MembershipStatement s;
  s.ledger_id = kLedger;
  s.epoch = epoch;
  s.action = MembershipAction::kRemove;
  s.member_id = member;
  auto bytes = encode_membership_statement(s);
  REQUIRE(bytes.ok());
  return *bytes;
}

// member `by` (whose key is key_name) proposes / approves `statement`.
Entry propose(const Bytes& statement, const std::string& by, const std::string& key_name) {
  auto e = member_proposal_entry(statement, by, keys().sign(key_name, statement), "user:admin");
  REQUIRE(e.ok());
  return *e;
}
Entry approve(const Bytes& statement, const std::string& by, const std::string& key_name) {
  auto e = member_approval_entry(statement, by, keys().sign(key_name, statement), "user:admin");
  REQUIRE(e.ok());
  return *e;
}

// A membership founded by "a" (holding the ledger's active key) with "b" added: epoch 2.
Membership founded_ab() {
  Membership m(kLedger);
  auto founded = m.apply(propose(add_statement(0, "a", "a"), "a", "a"), 1, keys().key("a").id());
  REQUIRE(founded.ok());
  REQUIRE(founded->took_effect);
  auto added = m.apply(propose(add_statement(1, "b", "b"), "a", "a"), 2, KeyId{});
  REQUIRE(added.ok());
  REQUIRE(added->took_effect);  // one member: its own proposal is a majority
  REQUIRE(m.epoch() == 2);
  return m;
}

}  // namespace

TEST_CASE("membership: statements round-trip and strict decoding names the problem",
          "[membership]") {
  Bytes add = add_statement(3, "ward-3a", "b");
  auto back = decode_membership_statement(add);
  REQUIRE(back.ok());
  CHECK(back->ledger_id == kLedger);
  CHECK(back->epoch == 3);
  CHECK(back->action == MembershipAction::kAdd);
  CHECK(back->member_id == "ward-3a");
  CHECK(back->signing_key == keys().key("b"));
  CHECK(back->endpoint == "10.0.0.1:7400");
  CHECK_FALSE(back->agreement_key);

  MembershipStatement with_agreement = *back;
  with_agreement.agreement_key = keys().key("c");
  auto nine = encode_membership_statement(with_agreement);
  REQUIRE(nine.ok());
  auto back9 = decode_membership_statement(*nine);
  REQUIRE(back9.ok());
  CHECK(back9->agreement_key == keys().key("c"));

  auto removed = decode_membership_statement(remove_statement(4, "ward-3a"));
  REQUIRE(removed.ok());
  CHECK(removed->action == MembershipAction::kRemove);
  CHECK_FALSE(removed->signing_key);

  // Shapes encode refuses.
  MembershipStatement s = *back;
  s.member_id = "-leading-dash";
  CHECK(encode_membership_statement(s).status().code() == StatusCode::kInvalidArgument);
  s = *back;
  s.endpoint = "no-port";
  CHECK(encode_membership_statement(s).status().code() == StatusCode::kInvalidArgument);
  s = *back;
  s.action = MembershipAction::kRemove;  // a remove that carries a key
  CHECK(encode_membership_statement(s).status().code() == StatusCode::kInvalidArgument);

  // Bytes decode refuses: another object kind, a remove with an endpoint, a key that is no key.
  auto as_value = [](const Bytes& b) { return *cbor::decode(b); };
  auto rewrite = [&](const Bytes& b, std::uint64_t key, cbor::Value v) {
    cbor::Map m = *as_value(b).as_map();
    bool replaced = false;
    for (auto& [k, val] : m)
      if (k.as_uint() == key) val = v, replaced = true;
    if (!replaced) m.emplace_back(cbor::Value::uint(key), std::move(v));
    return cbor::encode(*cbor::Value::map(std::move(m)));
  };
  auto kind = decode_membership_statement(rewrite(add, 0, cbor::Value::uint(4)));
  CHECK(kind.status().code() == StatusCode::kCorruption);
  CHECK_THAT(kind.status().message(), Catch::Contains("not a membership statement"));
  auto extra = decode_membership_statement(
      rewrite(remove_statement(1, "b"), 6, cbor::Value::bytes(keys().key("a").spki_der())));
  CHECK_THAT(extra.status().message(), Catch::Contains("which its action does not have"));
  auto not_key = decode_membership_statement(rewrite(add, 6, cbor::Value::bytes(Bytes(65))));
  CHECK_THAT(not_key.status().message(), Catch::Contains("not a P-256 public key"));
  auto version = decode_membership_statement(rewrite(add, 1, cbor::Value::uint(2)));
  CHECK_THAT(version.status().message(), Catch::Contains("not supported"));
  Bytes truncated(add.begin(), add.end() - 1);
  CHECK(decode_membership_statement(truncated).status().code() == StatusCode::kCorruption);
}

TEST_CASE("membership: ids and endpoints", "[membership]") {
  CHECK(valid_member_id("ward-3a"));
  CHECK(valid_member_id("A.b_c-1"));
  CHECK_FALSE(valid_member_id(""));
  CHECK_FALSE(valid_member_id("_x"));
  CHECK_FALSE(valid_member_id("has space"));
  CHECK_FALSE(valid_member_id(std::string(65, 'a')));
  CHECK(valid_member_endpoint("10.0.0.1:7400"));
  CHECK(valid_member_endpoint("[::1]:7400"));
  CHECK(valid_member_endpoint("box.ward.example:1"));
  CHECK_FALSE(valid_member_endpoint("10.0.0.1"));
  CHECK_FALSE(valid_member_endpoint("10.0.0.1:"));
  CHECK_FALSE(valid_member_endpoint(":80"));
  CHECK_FALSE(valid_member_endpoint("host:0"));
  CHECK_FALSE(valid_member_endpoint("host:65536"));
  CHECK_FALSE(valid_member_endpoint("ho st:80"));
}

TEST_CASE("membership: founding needs the ledger's active key, adding itself", "[membership]") {
  const KeyId active = keys().key("a").id();
  Membership m(kLedger);
  CHECK_FALSE(m.founded());

  auto other_key = m.apply(propose(add_statement(0, "b", "b"), "b", "b"), 1, active);
  CHECK(other_key.status().code() == StatusCode::kVerificationFailed);
  CHECK_THAT(other_key.status().message(), Catch::Contains("active signing key"));
  auto for_someone_else = m.apply(propose(add_statement(0, "b", "a"), "a", "a"), 1, active);
  CHECK(for_someone_else.status().code() == StatusCode::kVerificationFailed);
  auto forged = m.apply(propose(add_statement(0, "a", "a"), "a", "b"), 1, active);  // b signed
  CHECK_THAT(forged.status().message(), Catch::Contains("does not verify"));
  auto wrong_ledger = m.apply(propose(add_statement(0, "a", "a", "other"), "a", "a"), 1, active);
  CHECK_THAT(wrong_ledger.status().message(), Catch::Contains("another ledger"));
  CHECK(m.epoch() == 0);
  CHECK(m.members().empty());

  auto founded = m.apply(propose(add_statement(0, "a", "a"), "a", "a"), 7, active);
  REQUIRE(founded.ok());
  CHECK(founded->took_effect);
  CHECK(m.epoch() == 1);
  REQUIRE(m.find("a"));
  CHECK(m.find("a")->since_index == 7);
  CHECK(m.find_by_key(active) == m.find("a"));
}

TEST_CASE("membership: a change takes effect at a strict majority of its epoch's members",
          "[membership]") {
  Membership m = founded_ab();  // a, b at epoch 2: a change needs both
  CHECK(m.majority() == 2);

  Bytes add_c = add_statement(2, "c", "c");
  auto proposed = m.apply(propose(add_c, "a", "a"), 10, KeyId{});
  REQUIRE(proposed.ok());
  CHECK_FALSE(proposed->took_effect);
  REQUIRE(m.open_proposals().size() == 1);
  CHECK(m.open_proposals()[0].approvers == std::vector<std::string>{"a"});

  // Not a member, a repeat, a forged signature: each refused, nothing changes.
  auto outsider = m.apply(approve(add_c, "c", "c"), 11, KeyId{});
  CHECK_THAT(outsider.status().message(),
             Catch::Contains("\"c\", which is not a member at epoch 2"));
  auto again = m.apply(approve(add_c, "a", "a"), 11, KeyId{});
  CHECK_THAT(again.status().message(), Catch::Contains("repeats its approval of entry 10"));
  auto forged = m.apply(approve(add_c, "b", "a"), 11, KeyId{});
  CHECK_THAT(forged.status().message(), Catch::Contains("does not verify"));
  auto repeat_proposal = m.apply(propose(add_c, "b", "b"), 11, KeyId{});
  CHECK_THAT(repeat_proposal.status().message(), Catch::Contains("repeats an open proposal"));
  CHECK(m.epoch() == 2);
  CHECK_FALSE(m.find("c"));

  auto approved = m.apply(approve(add_c, "b", "b"), 12, KeyId{});
  REQUIRE(approved.ok());
  CHECK(approved->took_effect);
  CHECK(approved->epoch == 3);
  REQUIRE(m.find("c"));
  CHECK(m.find("c")->since_index == 12);
  CHECK(m.open_proposals().empty());
  CHECK(m.majority() == 2);  // 3 members
}

TEST_CASE("membership: once a change takes effect, the epoch's other proposals are dead",
          "[membership]") {
  Membership m = founded_ab();
  Bytes add_c = add_statement(2, "c", "c");
  REQUIRE(m.apply(approve(add_c, "b", "b"), 1, KeyId{}).status().code() ==
          StatusCode::kVerificationFailed);  // nothing to approve yet
  REQUIRE(m.apply(propose(add_c, "a", "a"), 10, KeyId{}).ok());
  Bytes add_d = add_statement(2, "d", "d");
  REQUIRE(m.apply(propose(add_d, "b", "b"), 11, KeyId{}).ok());
  REQUIRE(m.apply(approve(add_c, "b", "b"), 12, KeyId{})->took_effect);

  auto late = m.apply(approve(add_d, "a", "a"), 13, KeyId{});
  CHECK_THAT(late.status().message(), Catch::Contains("names no open proposal at epoch 3"));
  auto stale = m.apply(propose(add_d, "a", "a"), 13, KeyId{});
  CHECK_THAT(stale.status().message(),
             Catch::Contains("is for epoch 2, but the membership is at epoch 3"));
  CHECK_FALSE(m.find("d"));
}

TEST_CASE("membership: removals, duplicates, the last member, and key rotation", "[membership]") {
  Membership m = founded_ab();
  auto dup_id = m.apply(propose(add_statement(2, "b", "c"), "a", "a"), 10, KeyId{});
  CHECK_THAT(dup_id.status().message(), Catch::Contains("a member already"));
  auto dup_key = m.apply(propose(add_statement(2, "x", "b"), "a", "a"), 10, KeyId{});
  CHECK_THAT(dup_key.status().message(), Catch::Contains("with the signing key of member \"b\""));
  auto unknown = m.apply(propose(remove_statement(2, "zz"), "a", "a"), 10, KeyId{});
  CHECK_THAT(unknown.status().message(), Catch::Contains("which is not a member"));

  // b may vote on its own removal.
  Bytes remove_b = remove_statement(2, "b");
  REQUIRE(m.apply(propose(remove_b, "b", "b"), 10, KeyId{}).ok());
  REQUIRE(m.apply(approve(remove_b, "a", "a"), 11, KeyId{})->took_effect);
  CHECK_FALSE(m.find("b"));
  CHECK(m.members().size() == 1);

  auto last = m.apply(propose(remove_statement(3, "a"), "a", "a"), 12, KeyId{});
  CHECK_THAT(last.status().message(), Catch::Contains("the last member"));

  // check() says the same as apply() and changes nothing.
  Entry add_c = propose(add_statement(3, "c", "c"), "a", "a");
  CHECK(m.check(add_c, KeyId{}).ok());
  CHECK(m.open_proposals().empty());
  CHECK(m.epoch() == 3);

  // a rotates its key: its later signatures are by the new one.
  m.apply_key_transition(keys().key("a").id(), keys().key("d"));
  CHECK(m.find("a")->signing_key == keys().key("d"));
  auto old_key = m.apply(propose(add_statement(3, "c", "c"), "a", "a"), 13, KeyId{});
  CHECK_THAT(old_key.status().message(), Catch::Contains("does not verify"));
  CHECK(m.apply(propose(add_statement(3, "c", "c"), "a", "d"), 13, KeyId{})->took_effect);
}

TEST_CASE("membership: entry bodies are checked by the entry table", "[membership]") {
  Entry e = propose(add_statement(0, "a", "a"), "a", "a");
  auto bytes = encode_entry(e);
  REQUIRE(bytes.ok());
  auto back = decode_entry(*bytes);
  REQUIRE(back.ok());
  CHECK(back->type == EntryType::kMemberProposal);
  CHECK(find_entry_type("member-approval")->audit_kind == "admin");

  Entry broken = e;
  cbor::Map fields = *broken.body.as_map();
  for (auto& [k, v] : fields)
    if (*k.as_text() == "statement") v = cbor::Value::bytes(Bytes{std::byte{1}, std::byte{2}});
  broken.body = *cbor::Value::map(std::move(fields));
  auto refused = encode_entry(broken);
  CHECK(refused.status().code() == StatusCode::kInvalidArgument);
  CHECK_THAT(refused.status().message(), Catch::Contains("statement"));
}

TEST_CASE("key shares: round trip through the entry encoding; malformed bodies are named",
          "[membership]") {
  KeyShare share;
  share.member = "ward-b";
  share.agreement_key = sha256(Bytes{std::byte{1}});
  share.secret_id = sha256(Bytes{std::byte{2}});
  share.box = Bytes(200, std::byte{0x5a});
  Result<Entry> e = key_share_entry(share, "member:ward-a");
  REQUIRE(e.ok());
  CHECK(find_entry_type("key-share")->audit_kind == "key");
  auto back = decode_entry(encode_entry(*e).value());
  REQUIRE(back.ok());
  Result<KeyShare> decoded = decode_key_share(*back);
  REQUIRE(decoded.ok());
  CHECK(decoded->member == "ward-b");
  CHECK(decoded->agreement_key == share.agreement_key);
  CHECK(decoded->secret_id == share.secret_id);
  CHECK(decoded->box == share.box);

  KeyShare bad = share;
  bad.member = "not a member id";
  CHECK_THAT(key_share_entry(bad, "x").status().message(), Catch::Contains("\"member\""));
  bad = share;
  bad.box.clear();
  CHECK_THAT(key_share_entry(bad, "x").status().message(), Catch::Contains("\"box\""));
  bad.box = Bytes(kMaxKeyShareBox + 1);
  CHECK(key_share_entry(bad, "x").status().code() == StatusCode::kInvalidArgument);
  Entry short_id = *e;
  cbor::Map fields = *short_id.body.as_map();
  for (auto& [k, v] : fields)
    if (*k.as_text() == "secret") v = cbor::Value::bytes(Bytes(31));
  short_id.body = *cbor::Value::map(std::move(fields));
  CHECK_THAT(encode_entry(short_id).status().message(), Catch::Contains("\"secret\" must be 32"));
  CHECK(decode_key_share(short_id).status().code() == StatusCode::kInvalidArgument);
  Entry other = *e;
  other.type = EntryType::kMemberApproval;
  CHECK(decode_key_share(other).status().code() == StatusCode::kInvalidArgument);
}

// ---- block records ----

namespace {

struct Chain {
  Chain() : membership(founded_ab()) {
    tip.ledger_id = kLedger;
    tip.height = 0;
    tip.block_hash = sha256(Bytes{std::byte{7}});
    tip.time_us = 1'000'000;
    tip.tree.append(merkle::leaf_hash(Bytes{std::byte{1}}));  // entries 0..2 stand for history
    tip.tree.append(merkle::leaf_hash(Bytes{std::byte{2}}));
    tip.tree.append(merkle::leaf_hash(Bytes{std::byte{3}}));
  }

  static Bytes entry_bytes(std::string op, std::vector<SubjectLink> links = {}) {
    Entry e;
    e.type = EntryType::kAdminAction;
    e.time_us = 2'000'000;
    e.actor = "user:admin";
    cbor::Map body;
    body.emplace_back(cbor::Value::text("op"), cbor::Value::text(std::move(op)));
    e.body = *cbor::Value::map(std::move(body));
    e.subjects = std::move(links);
    auto bytes = encode_entry(e);
    REQUIRE(bytes.ok());
    return *bytes;
  }

  // A record for the next height holding `entries`, proposed by `proposer` and signed with
  // `key_name`'s key, the header naming `header_key`'s key (default: key_name).
  BlockRecord record(std::vector<Bytes> entries, const std::string& proposer,
                     const std::string& key_name, std::string header_key = "") {
    BlockRecord r;
    r.header.ledger_id = kLedger;
    r.header.height = tip.height + 1;
    r.header.previous_hash = tip.block_hash;
    r.header.first_index = tip.tree.size();
    r.header.entry_count = entries.size();
    merkle::CompactRange tree = tip.tree;
    for (const Bytes& e : entries) tree.append(merkle::leaf_hash(e));
    r.header.tree_size = tree.size();
    r.header.root = tree.root();
    r.header.time_us = tip.time_us + 10;
    r.header.key_id = keys().key(header_key.empty() ? key_name : header_key).id();
    r.entries = std::move(entries);
    r.proposer = proposer;
    resign(r, key_name);
    r.outbox_first = 40;
    r.outbox_count = r.entries.size();
    return r;
  }
  static void resign(BlockRecord& r, const std::string& key_name) {
    r.header_bytes = encode_block_header(r.header);
    r.signature = keys().sign(key_name, r.header_bytes);
  }

  Result<ValidatedBlock> validate(const BlockRecord& r) {
    return validate_block_record(r, tip, membership,
                                 [&](ByteView s) -> std::optional<std::uint64_t> {
                                   auto it = latest.find(Bytes(s.begin(), s.end()));
                                   if (it == latest.end()) return std::nullopt;
                                   return it->second;
                                 });
  }

  ChainTip tip;
  Membership membership;
  std::map<Bytes, std::uint64_t> latest;
};

Bytes subject(char c) {
  return Bytes(32, std::byte(c));
}

}  // namespace

TEST_CASE("block records: round trip, and decoding refuses what is not one", "[membership]") {
  Chain chain;
  BlockRecord r = chain.record({Chain::entry_bytes("x"), Chain::entry_bytes("y")}, "a", "a");
  Bytes bytes = encode_block_record(r);
  auto back = decode_block_record(bytes);
  REQUIRE(back.ok());
  CHECK(back->header == r.header);
  CHECK(back->entries == r.entries);
  CHECK(back->proposer == "a");
  CHECK(back->signature == r.signature);
  CHECK(back->outbox_first == 40);
  CHECK(back->outbox_count == 2);
  CHECK(encode_block_record(*back) == bytes);

  BlockRecord short_one = r;
  short_one.entries.pop_back();  // the header still counts two
  auto count = decode_block_record(encode_block_record(short_one));
  CHECK_THAT(count.status().message(), Catch::Contains("holds 1 entries but its header counts 2"));
  BlockRecord bad_proposer = r;
  bad_proposer.proposer = "not a member id";
  CHECK_THAT(decode_block_record(encode_block_record(bad_proposer)).status().message(),
             Catch::Contains("field 4"));
  Bytes garbage = bytes;
  garbage[3] = std::byte{0xff};
  CHECK(decode_block_record(garbage).status().code() == StatusCode::kCorruption);
  CHECK(decode_block_record(Bytes{}).status().code() == StatusCode::kCorruption);
  CHECK(decode_block_record(r.header_bytes).status().code() == StatusCode::kCorruption);
}

TEST_CASE("block records: a member's block validates and moves the tip on", "[membership]") {
  Chain chain;
  chain.latest[subject('p')] = 1;
  BlockRecord r = chain.record({Chain::entry_bytes("x", {{subject('p'), 1}}),
                                Chain::entry_bytes("y", {{subject('p'), 3}, {subject('q'), {}}})},
                               "b", "b");
  auto v = chain.validate(r);
  INFO(v.status().to_string());
  REQUIRE(v.ok());
  CHECK(v->tip.height == 1);
  CHECK(v->tip.tree.size() == 5);
  CHECK(v->tip.tree.root() == r.header.root);
  CHECK(v->tip.block_hash == block_hash(r.header_bytes));
  CHECK(v->subject_updates.size() == 2);
  CHECK(v->changes.empty());
}

TEST_CASE("block records: each broken rule voids the block and is named", "[membership]") {
  Chain chain;
  auto refused = [&](const BlockRecord& r, const std::string& reason) {
    auto v = chain.validate(r);
    INFO(reason);
    REQUIRE_FALSE(v.ok());
    CHECK(v.status().code() == StatusCode::kVerificationFailed);
    CHECK_THAT(v.status().message(), Catch::Contains(reason));
  };
  std::vector<Bytes> two = {Chain::entry_bytes("x"), Chain::entry_bytes("y")};

  refused(chain.record(two, "outsider", "outsider"),
          "block 1 is proposed by \"outsider\", which is not a member at height 0");
  refused(chain.record(two, "a", "outsider"),
          "block 1 is signed by a key that is not a member's at height 0");
  refused(chain.record(two, "a", "a", "b"), "names the key of \"b\", not of its proposer \"a\"");
  {
    BlockRecord r = chain.record(two, "a", "a");
    r.signature = keys().sign("b", r.header_bytes);  // b's signature, a's header
    refused(r, "signature that does not verify with the key of \"a\"");
  }
  {
    BlockRecord r = chain.record(two, "a", "a");
    r.header.previous_hash[0] ^= std::byte{1};
    Chain::resign(r, "a");
    refused(r, "does not chain to block 0");
  }
  {
    BlockRecord r = chain.record(two, "a", "a");
    r.header.height = 2;
    Chain::resign(r, "a");
    refused(r, "says it is block 2");
  }
  {
    BlockRecord r = chain.record(two, "a", "a");
    r.header.time_us = chain.tip.time_us - 1;
    Chain::resign(r, "a");
    refused(r, "is older than block 0");
  }
  {
    BlockRecord r = chain.record(two, "a", "a");
    r.header.ledger_id = "another";
    Chain::resign(r, "a");
    refused(r, "belongs to another ledger");
  }
  {
    BlockRecord r = chain.record(two, "a", "a");
    r.entries[1] = Chain::entry_bytes("z");  // signed header, other entry
    refused(r, "has a Merkle root that its entries do not give");
  }
  refused(chain.record({Chain::entry_bytes("x", {{subject('p'), 0}})}, "a", "a"),
          "entry 3 links a subject to entry 0, but its previous entry is none");
  refused(chain.record({Chain::entry_bytes("x", {{subject('p'), {}}}),
                        Chain::entry_bytes("y", {{subject('p'), {}}})},
                       "a", "a"),
          "entry 4 links a subject to entry none, but its previous entry is 3");
  {
    Entry g;
    g.type = EntryType::kGenesis;
    g.time_us = 5;
    g.actor = "system:medgated";
    cbor::Map body;
    body.emplace_back(cbor::Value::text("ledger_id"), cbor::Value::text(kLedger));
    body.emplace_back(cbor::Value::text("key_id"),
                      cbor::Value::bytes(ByteView(keys().key("a").id())));
    body.emplace_back(cbor::Value::text("public_key"),
                      cbor::Value::bytes(keys().key("a").spki_der()));
    g.body = *cbor::Value::map(std::move(body));
    refused(chain.record({*encode_entry(g)}, "a", "a"), "entry 3 is a second genesis");
  }
  {
    Bytes bad_membership =
        *encode_entry(approve(add_statement(2, "c", "c"), "a", "a"));  // approves nothing open
    refused(chain.record({bad_membership}, "a", "a"),
            "entry 3 member-approval by \"a\" names no open proposal");
  }
  {
    Chain unfounded;
    unfounded.membership = Membership(kLedger);
    auto v = unfounded.validate(unfounded.record(two, "a", "a"));
    CHECK_THAT(v.status().message(), Catch::Contains("whose membership is not founded"));
  }
}

TEST_CASE("block records: membership changes inside a block apply to the next block",
          "[membership]") {
  Chain chain;
  Bytes add_c = add_statement(2, "c", "c");
  BlockRecord r = chain.record(
      {*encode_entry(propose(add_c, "a", "a")), *encode_entry(approve(add_c, "b", "b"))}, "a", "a");
  auto v = chain.validate(r);
  INFO(v.status().to_string());
  REQUIRE(v.ok());
  REQUIRE(v->changes.size() == 1);
  CHECK(v->changes[0].statement.member_id == "c");
  CHECK(v->membership.find("c"));
  CHECK_FALSE(chain.membership.find("c"));  // the caller's state is untouched

  // c may propose the next block; it could not propose this one.
  CHECK_THAT(chain.validate(chain.record({Chain::entry_bytes("x")}, "c", "c")).status().message(),
             Catch::Contains("\"c\", which is not a member at height 0"));
  chain.tip = v->tip;
  chain.membership = v->membership;
  auto next = chain.validate(chain.record({Chain::entry_bytes("x")}, "c", "c"));
  INFO(next.status().to_string());
  CHECK(next.ok());
}
