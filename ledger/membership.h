// LEDGER-CRITICAL: the members of a replicated ledger, and the rules that change them
// (docs/replication.md, "Members").
//
// A member is one appliance: an id, the P-256 key its HSM/TPM signs blocks and heads with, an
// endpoint for catch-up, and optionally a key-agreement key. Membership changes only through two
// entry types, applied in ledger order by every replica and by the verifier with the same code:
//
//   member-proposal  {"statement": bytes, "member": text (the proposer), "signature": bytes}
//   member-approval  {"proposal": bytes(32) (SHA-256 of the statement), "member": text,
//                     "signature": bytes (over the same statement)}
//
// The statement is canonical CBOR (object kind 7), what every approver signs:
//
//   { 0: 7, 1: version (1), 2: ledger id, 3: epoch, 4: action (0 add, 1 remove), 5: member id,
//     add only: 6: signing key (SPKI DER), 7: endpoint, 8: key-agreement key (SPKI DER; optional) }
//
//   signature = ECDSA P-256 over SHA-256(statement), DER
//
// Epoch e is the number of changes so far. A statement names the epoch it changes, so once a
// change takes effect every other statement of that epoch is dead and no approval can be
// replayed into a later membership. At epoch 0 (no members) the holder of the ledger's active
// signing key founds the membership alone: its proposal adding a member with that very key takes
// effect at once. From epoch 1 on, a current member proposes (its signature is its approval) and
// the change takes effect right after the entry that gives it approvals from more than half of
// the members of its epoch.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "hsm/bytes.h"
#include "hsm/public_key.h"
#include "hsm/status.h"
#include "ledger/entry.h"

namespace medgate::ledger {

inline constexpr std::uint64_t kMembershipStatementVersion = 1;

enum class MembershipAction : std::uint64_t { kAdd = 0, kRemove = 1 };

struct MembershipStatement {
  std::string ledger_id;
  std::uint64_t epoch = 0;
  MembershipAction action = MembershipAction::kAdd;
  std::string member_id;
  // Add only.
  std::optional<PublicKey> signing_key;
  std::string endpoint;
  std::optional<PublicKey> agreement_key;
};

// Checks the statement's shape (member id syntax, add has a key and an endpoint, remove has
// neither) and encodes it. kInvalidArgument names what is wrong.
Result<Bytes> encode_membership_statement(const MembershipStatement& statement);
// Strict: canonical bytes, kind 7, version 1, exactly the keys of its action, valid keys.
// kCorruption names the problem.
Result<MembershipStatement> decode_membership_statement(ByteView bytes);

// Member ids: 1 to 64 of [A-Za-z0-9._-], starting with a letter or digit.
bool valid_member_id(std::string_view id);
// Endpoints: "host:port", at most 255 bytes, no spaces or control characters.
bool valid_member_endpoint(std::string_view endpoint);

// The entries a member writes (with the signature its key store made over the statement's
// SHA-256). The time is left for the caller to set.
Result<Entry> member_proposal_entry(ByteView statement, std::string_view proposer,
                                    ByteView signature, std::string actor);
Result<Entry> member_approval_entry(ByteView statement, std::string_view approver,
                                    ByteView signature, std::string actor);

// Body checks for the entry table (entry.cc).
Status check_member_proposal_body(const cbor::Value& body);
Status check_member_approval_body(const cbor::Value& body);
Status check_key_share_body(const cbor::Value& body);

// ---- Key shares (docs/replication.md, "Shared keys") ----
//
// A replicated ledger's members share one 32-byte secret, from which every member derives the
// same pseudonym key and the key that wraps patient data keys between members. The founder makes
// it at `cluster init` and writes the first key share, sealed to its own key-agreement key: that
// share's secret id is the cluster's, and a share naming any other id is ignored. A member that
// holds the secret writes a share for each member added with a key-agreement key; the member it
// names opens it with its HSM/TPM and checks the id. Shares are not membership entries: they
// change no rule, and a replica that cannot open one (it is not the recipient) only records it.
struct KeyShare {
  std::string member;  // the recipient
  KeyId agreement_key{};
  Hash secret_id{};
  Bytes box;
};
inline constexpr std::size_t kMaxKeyShareBox = 1024;
Result<Entry> key_share_entry(const KeyShare& share, std::string actor);
// kInvalidArgument naming the problem for an entry that is not a well-formed key share.
Result<KeyShare> decode_key_share(const Entry& entry);

struct Member {
  std::string id;
  PublicKey signing_key;
  std::string endpoint;
  std::optional<PublicKey> agreement_key;
  std::uint64_t since_index = 0;  // the entry that made it a member (the deciding approval)
  friend bool operator==(const Member&, const Member&) = default;
};

struct OpenProposal {
  Hash statement_hash{};
  Bytes statement;
  MembershipStatement decoded;
  std::uint64_t index = 0;             // the proposal entry
  std::vector<std::string> approvers;  // the proposer first
};

// What applying an entry did.
struct MembershipChange {
  bool took_effect = false;  // the entry completed a majority (or founded the membership)
  std::uint64_t epoch = 0;   // the epoch after the entry
  MembershipStatement statement;
};

class Membership {
 public:
  explicit Membership(std::string ledger_id) : ledger_id_(std::move(ledger_id)) {}

  const std::string& ledger_id() const { return ledger_id_; }
  std::uint64_t epoch() const { return epoch_; }
  bool founded() const { return epoch_ > 0; }
  // Sorted by id.
  std::vector<Member> members() const;
  const Member* find(std::string_view id) const;
  const Member* find_by_key(const KeyId& key) const;
  std::vector<OpenProposal> open_proposals() const;
  // Approvals a change needs at the current epoch: more than half of the members.
  std::size_t majority() const { return members_.size() / 2 + 1; }

  // Applies entry `index` (decoded) in ledger order. Entries of other types are ignored, except
  // key transitions (apply_key_transition). `active_key` is the ledger's active signing key at
  // this point (it founds the membership at epoch 0). An entry that breaks a rule changes nothing
  // and returns kVerificationFailed naming the rule, e.g. "member-approval by \"ward-b\", which
  // is not a member at epoch 2".
  Result<MembershipChange> apply(const Entry& entry, std::uint64_t index, const KeyId& active_key);

  // The same checks as apply() without changing anything: what an appliance runs before it
  // writes a membership entry.
  Status check(const Entry& entry, const KeyId& active_key) const;

  // A signing-key rotation (a key-transition entry): the member holding `old_key` now signs with
  // `new_key`. No member holds it: nothing changes (a single box's own rotation, before founding).
  void apply_key_transition(const KeyId& old_key, const PublicKey& new_key);

 private:
  // Makes the proposal take effect once it has a majority; `index` is the deciding entry.
  Result<MembershipChange> decide(const Hash& digest, MembershipChange change, std::uint64_t index);

  std::string ledger_id_;
  std::uint64_t epoch_ = 0;
  std::map<std::string, Member, std::less<>> members_;
  std::map<Hash, OpenProposal> proposals_;  // open at the current epoch
};

}  // namespace medgate::ledger
