// LEDGER-CRITICAL: see membership.h. The statement encoding written here is the one members sign.
#include "ledger/membership.h"

#include <algorithm>

#include <fmt/format.h>

#include "ledger/cbor.h"

namespace medgate::ledger {
namespace {

constexpr std::string_view kWhat = "membership statement";

std::string short_id(const KeyId& id) {
  return to_hex(ByteView(id.data(), 8));
}

Status check_statement_shape(const MembershipStatement& s) {
  if (s.ledger_id.empty()) return Status::InvalidArgument("membership statement has no ledger id");
  if (!valid_member_id(s.member_id))
    return Status::InvalidArgument(
        "member id must be 1 to 64 of letters, digits, '.', '_' and '-', starting with a letter or "
        "digit");
  if (s.action == MembershipAction::kAdd) {
    if (!s.signing_key) return Status::InvalidArgument("adding a member needs its signing key");
    if (!valid_member_endpoint(s.endpoint))
      return Status::InvalidArgument("adding a member needs an endpoint \"host:port\"");
  } else {
    if (s.signing_key || !s.endpoint.empty() || s.agreement_key)
      return Status::InvalidArgument("removing a member names only its id");
  }
  return Status::Ok();
}

Result<const cbor::Value*> body_field(const cbor::Value& body, std::string_view key) {
  const cbor::Value* v = body.find(key);
  if (!v) return Status::InvalidArgument(fmt::format("body needs \"{}\"", key));
  return v;
}

Status check_member_text(const cbor::Value& body) {
  MEDGATE_ASSIGN_OR_RETURN(const cbor::Value* member, body_field(body, "member"));
  if (!member->as_text() || !valid_member_id(*member->as_text()))
    return Status::InvalidArgument("body \"member\" must be a member id");
  MEDGATE_ASSIGN_OR_RETURN(const cbor::Value* sig, body_field(body, "signature"));
  if (!sig->as_bytes() || sig->as_bytes()->empty())
    return Status::InvalidArgument("body \"signature\" must be bytes");
  return Status::Ok();
}

Result<Entry> membership_entry(EntryType type, cbor::Map fields, std::string actor) {
  MEDGATE_ASSIGN_OR_RETURN(cbor::Value body, cbor::Value::map(std::move(fields)));
  Entry e;
  e.type = type;
  e.time_us = now_us();
  e.actor = std::move(actor);
  e.body = std::move(body);
  return e;
}

struct Vote {
  std::string member;
  Bytes signature;
};

Vote vote_of(const Entry& entry) {
  return {*entry.body.find("member")->as_text(), *entry.body.find("signature")->as_bytes()};
}

Hash hash_field(const cbor::Value& body, std::string_view key) {
  const Bytes& b = *body.find(key)->as_bytes();
  Hash h{};
  std::copy(b.begin(), b.end(), h.begin());
  return h;
}

Status verify_vote(const PublicKey& key, const Hash& statement_hash, const Vote& vote,
                   std::string_view what) {
  Status s = key.verify_digest(statement_hash, vote.signature);
  if (s.ok()) return s;
  return Status::VerificationFailed(
      fmt::format("{} by \"{}\": the signature does not verify with key {}", what, vote.member,
                  short_id(key.id())));
}

}  // namespace

bool valid_member_id(std::string_view id) {
  if (id.empty() || id.size() > 64) return false;
  auto alnum = [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
  };
  if (!alnum(id[0])) return false;
  return std::all_of(id.begin(), id.end(),
                     [&](char c) { return alnum(c) || c == '.' || c == '_' || c == '-'; });
}

bool valid_member_endpoint(std::string_view endpoint) {
  if (endpoint.empty() || endpoint.size() > 255) return false;
  if (std::any_of(endpoint.begin(), endpoint.end(),
                  [](char c) { return static_cast<unsigned char>(c) <= 0x20 || c == 0x7f; }))
    return false;
  const auto colon = endpoint.rfind(':');
  if (colon == std::string_view::npos || colon == 0 || colon + 1 == endpoint.size()) return false;
  const std::string_view port = endpoint.substr(colon + 1);
  if (port.size() > 5 ||
      !std::all_of(port.begin(), port.end(), [](char c) { return c >= '0' && c <= '9'; }))
    return false;
  const unsigned long p = std::stoul(std::string(port));
  return p >= 1 && p <= 65535;
}

Result<Bytes> encode_membership_statement(const MembershipStatement& s) {
  MEDGATE_RETURN_IF_ERROR(check_statement_shape(s));
  const bool add = s.action == MembershipAction::kAdd;
  cbor::Writer w;
  w.map_header(add ? (s.agreement_key ? 9 : 8) : 6);
  w.uint(0), w.uint(static_cast<std::uint64_t>(ObjectKind::kMembershipStatement));
  w.uint(1), w.uint(kMembershipStatementVersion);
  w.uint(2), w.text(s.ledger_id);
  w.uint(3), w.uint(s.epoch);
  w.uint(4), w.uint(static_cast<std::uint64_t>(s.action));
  w.uint(5), w.text(s.member_id);
  if (add) {
    w.uint(6), w.bytes(s.signing_key->spki_der());
    w.uint(7), w.text(s.endpoint);
    if (s.agreement_key) w.uint(8), w.bytes(s.agreement_key->spki_der());
  }
  return w.take();
}

Result<MembershipStatement> decode_membership_statement(ByteView bytes) {
  MEDGATE_ASSIGN_OR_RETURN(cbor::Value v, cbor::decode(bytes));
  const cbor::Map* map = v.as_map();
  if (!map) return Status::Corruption(fmt::format("{} is not a CBOR map", kWhat));
  for (std::size_t i = 0; i < map->size(); ++i)
    if ((*map)[i].first.as_uint() != i)
      return Status::Corruption(fmt::format("{} lacks field {}", kWhat, i));
  if (map->size() < 6)
    return Status::Corruption(fmt::format("{} lacks field {}", kWhat, map->size()));
  if (v.find(std::uint64_t{0})->as_uint() !=
      static_cast<std::uint64_t>(ObjectKind::kMembershipStatement))
    return Status::Corruption(fmt::format("object is not a {} (key 0)", kWhat));
  const auto version = v.find(std::uint64_t{1})->as_uint();
  if (version != kMembershipStatementVersion)
    return Status::Corruption(fmt::format("{} version is not supported by this build", kWhat));

  MembershipStatement s;
  const std::string* ledger_id = v.find(std::uint64_t{2})->as_text();
  const auto epoch = v.find(std::uint64_t{3})->as_uint();
  const auto action = v.find(std::uint64_t{4})->as_uint();
  const std::string* member = v.find(std::uint64_t{5})->as_text();
  if (!ledger_id || ledger_id->empty())
    return Status::Corruption(fmt::format("{} field 2 is not a ledger id", kWhat));
  if (!epoch) return Status::Corruption(fmt::format("{} field 3 is not an epoch", kWhat));
  if (!action || *action > 1)
    return Status::Corruption(fmt::format("{} field 4 is not 0 (add) or 1 (remove)", kWhat));
  if (!member) return Status::Corruption(fmt::format("{} field 5 is not a text", kWhat));
  s.ledger_id = *ledger_id;
  s.epoch = *epoch;
  s.action = static_cast<MembershipAction>(*action);
  s.member_id = *member;

  // A removal names only the member (keys 0-5); an addition also its key and endpoint (6, 7) and
  // optionally its key-agreement key (8).
  const bool shape_ok = s.action == MembershipAction::kRemove
                            ? map->size() == 6
                            : map->size() == 8 || map->size() == 9;
  if (!shape_ok)
    return Status::Corruption(
        fmt::format("{} has {} fields, which its action does not have", kWhat, map->size()));
  if (s.action == MembershipAction::kAdd) {
    const Bytes* key = v.find(std::uint64_t{6})->as_bytes();
    const std::string* endpoint = v.find(std::uint64_t{7})->as_text();
    if (!key) return Status::Corruption(fmt::format("{} field 6 is not bytes", kWhat));
    auto signing = PublicKey::from_spki_der(*key);
    if (!signing.ok())
      return Status::Corruption(fmt::format("{} field 6 is not a P-256 public key", kWhat));
    s.signing_key = std::move(*signing);
    if (!endpoint) return Status::Corruption(fmt::format("{} field 7 is not a text", kWhat));
    s.endpoint = *endpoint;
    if (map->size() == 9) {
      const Bytes* agreement = v.find(std::uint64_t{8})->as_bytes();
      if (!agreement) return Status::Corruption(fmt::format("{} field 8 is not bytes", kWhat));
      auto k = PublicKey::from_spki_der(*agreement);
      if (!k.ok())
        return Status::Corruption(fmt::format("{} field 8 is not a P-256 public key", kWhat));
      s.agreement_key = std::move(*k);
    }
  }
  if (Status shape = check_statement_shape(s); !shape.ok())
    return Status::Corruption(fmt::format("{}: {}", kWhat, shape.message()));
  return s;
}

Status check_member_proposal_body(const cbor::Value& body) {
  MEDGATE_ASSIGN_OR_RETURN(const cbor::Value* statement, body_field(body, "statement"));
  if (!statement->as_bytes()) return Status::InvalidArgument("body \"statement\" must be bytes");
  auto decoded = decode_membership_statement(*statement->as_bytes());
  if (!decoded.ok())
    return Status::InvalidArgument(
        fmt::format("body \"statement\": {}", decoded.status().message()));
  return check_member_text(body);
}

Status check_member_approval_body(const cbor::Value& body) {
  MEDGATE_ASSIGN_OR_RETURN(const cbor::Value* proposal, body_field(body, "proposal"));
  if (!proposal->as_bytes() || proposal->as_bytes()->size() != 32)
    return Status::InvalidArgument("body \"proposal\" must be 32 bytes");
  return check_member_text(body);
}

Result<Entry> member_proposal_entry(ByteView statement, std::string_view proposer,
                                    ByteView signature, std::string actor) {
  cbor::Map fields;
  fields.emplace_back(cbor::Value::text("statement"), cbor::Value::bytes(statement));
  fields.emplace_back(cbor::Value::text("member"), cbor::Value::text(std::string(proposer)));
  fields.emplace_back(cbor::Value::text("signature"), cbor::Value::bytes(signature));
  MEDGATE_ASSIGN_OR_RETURN(
      Entry e, membership_entry(EntryType::kMemberProposal, std::move(fields), std::move(actor)));
  MEDGATE_RETURN_IF_ERROR(check_member_proposal_body(e.body));
  return e;
}

Result<Entry> member_approval_entry(ByteView statement, std::string_view approver,
                                    ByteView signature, std::string actor) {
  cbor::Map fields;
  fields.emplace_back(cbor::Value::text("proposal"),
                      cbor::Value::bytes(ByteView(sha256(statement))));
  fields.emplace_back(cbor::Value::text("member"), cbor::Value::text(std::string(approver)));
  fields.emplace_back(cbor::Value::text("signature"), cbor::Value::bytes(signature));
  MEDGATE_ASSIGN_OR_RETURN(
      Entry e, membership_entry(EntryType::kMemberApproval, std::move(fields), std::move(actor)));
  MEDGATE_RETURN_IF_ERROR(check_member_approval_body(e.body));
  return e;
}

Status check_key_share_body(const cbor::Value& body) {
  MEDGATE_ASSIGN_OR_RETURN(const cbor::Value* member, body_field(body, "member"));
  if (!member->as_text() || !valid_member_id(*member->as_text()))
    return Status::InvalidArgument("body \"member\" must be a member id");
  for (const char* key : {"agreement_key", "secret"}) {
    MEDGATE_ASSIGN_OR_RETURN(const cbor::Value* v, body_field(body, key));
    if (!v->as_bytes() || v->as_bytes()->size() != 32)
      return Status::InvalidArgument(fmt::format("body \"{}\" must be 32 bytes", key));
  }
  MEDGATE_ASSIGN_OR_RETURN(const cbor::Value* box, body_field(body, "box"));
  if (!box->as_bytes() || box->as_bytes()->empty() || box->as_bytes()->size() > kMaxKeyShareBox)
    return Status::InvalidArgument(
        fmt::format("body \"box\" must be 1 to {} bytes", kMaxKeyShareBox));
  return Status::Ok();
}

Result<Entry> key_share_entry(const KeyShare& share, std::string actor) {
  cbor::Map fields;
  fields.emplace_back(cbor::Value::text("member"), cbor::Value::text(share.member));
  fields.emplace_back(cbor::Value::text("agreement_key"),
                      cbor::Value::bytes(ByteView(share.agreement_key)));
  fields.emplace_back(cbor::Value::text("secret"), cbor::Value::bytes(ByteView(share.secret_id)));
  fields.emplace_back(cbor::Value::text("box"), cbor::Value::bytes(share.box));
  MEDGATE_ASSIGN_OR_RETURN(
      Entry e, membership_entry(EntryType::kKeyShare, std::move(fields), std::move(actor)));
  MEDGATE_RETURN_IF_ERROR(check_key_share_body(e.body));
  return e;
}

Result<KeyShare> decode_key_share(const Entry& entry) {
  if (entry.type != EntryType::kKeyShare) return Status::InvalidArgument("not a key-share entry");
  MEDGATE_RETURN_IF_ERROR(check_key_share_body(entry.body));
  KeyShare share;
  share.member = *entry.body.find("member")->as_text();
  const Bytes& key = *entry.body.find("agreement_key")->as_bytes();
  std::copy(key.begin(), key.end(), share.agreement_key.begin());
  const Bytes& secret = *entry.body.find("secret")->as_bytes();
  std::copy(secret.begin(), secret.end(), share.secret_id.begin());
  share.box = *entry.body.find("box")->as_bytes();
  return share;
}

std::vector<Member> Membership::members() const {
  std::vector<Member> out;
  out.reserve(members_.size());
  for (const auto& [id, m] : members_) out.push_back(m);
  return out;
}

const Member* Membership::find(std::string_view id) const {
  auto it = members_.find(id);
  return it == members_.end() ? nullptr : &it->second;
}

const Member* Membership::find_by_key(const KeyId& key) const {
  for (const auto& [id, m] : members_)
    if (m.signing_key.id() == key) return &m;
  return nullptr;
}

std::vector<OpenProposal> Membership::open_proposals() const {
  std::vector<OpenProposal> out;
  for (const auto& [hash, p] : proposals_) out.push_back(p);
  std::sort(out.begin(), out.end(),
            [](const OpenProposal& a, const OpenProposal& b) { return a.index < b.index; });
  return out;
}

Status Membership::check(const Entry& entry, const KeyId& active_key) const {
  Membership copy = *this;
  return copy.apply(entry, 0, active_key).status();
}

void Membership::apply_key_transition(const KeyId& old_key, const PublicKey& new_key) {
  for (auto& [id, m] : members_) {
    if (m.signing_key.id() == old_key) {
      m.signing_key = new_key;
      return;
    }
  }
}

Result<MembershipChange> Membership::apply(const Entry& entry, std::uint64_t index,
                                           const KeyId& active_key) {
  MembershipChange change;
  change.epoch = epoch_;
  if (entry.type == EntryType::kMemberProposal) {
    MEDGATE_RETURN_IF_ERROR(check_member_proposal_body(entry.body));
    const Bytes& statement = *entry.body.find("statement")->as_bytes();
    MEDGATE_ASSIGN_OR_RETURN(MembershipStatement s, decode_membership_statement(statement));
    const Vote vote = vote_of(entry);
    const Hash digest = sha256(statement);
    if (s.ledger_id != ledger_id_)
      return Status::VerificationFailed(
          fmt::format("member-proposal by \"{}\" is for another ledger", vote.member));
    if (s.epoch != epoch_)
      return Status::VerificationFailed(fmt::format(
          "member-proposal by \"{}\" is for epoch {}, but the membership is at epoch {}",
          vote.member, s.epoch, epoch_));
    if (proposals_.count(digest))
      return Status::VerificationFailed(
          fmt::format("member-proposal by \"{}\" repeats an open proposal (entry {})", vote.member,
                      proposals_.at(digest).index));
    if (s.action == MembershipAction::kAdd) {
      if (members_.count(s.member_id))
        return Status::VerificationFailed(
            fmt::format("member-proposal adds \"{}\", which is a member already", s.member_id));
      if (find_by_key(s.signing_key->id()))
        return Status::VerificationFailed(
            fmt::format("member-proposal adds \"{}\" with the signing key of member \"{}\"",
                        s.member_id, find_by_key(s.signing_key->id())->id));
    } else {
      if (!members_.count(s.member_id))
        return Status::VerificationFailed(
            fmt::format("member-proposal removes \"{}\", which is not a member", s.member_id));
      if (members_.size() == 1)
        return Status::VerificationFailed(
            fmt::format("member-proposal removes \"{}\", the last member", s.member_id));
    }

    if (epoch_ == 0) {
      // Founding: the holder of the ledger's active key adds itself, alone.
      if (s.action != MembershipAction::kAdd || s.signing_key->id() != active_key ||
          vote.member != s.member_id)
        return Status::VerificationFailed(fmt::format(
            "member-proposal by \"{}\" at epoch 0 must add the proposer itself with the ledger's "
            "active signing key {}",
            vote.member, short_id(active_key)));
      MEDGATE_RETURN_IF_ERROR(verify_vote(*s.signing_key, digest, vote, "member-proposal"));
      members_.emplace(s.member_id,
                       Member{s.member_id, *s.signing_key, s.endpoint, s.agreement_key, index});
      epoch_ = 1;
      change.took_effect = true;
      change.epoch = epoch_;
      change.statement = std::move(s);
      return change;
    }

    const Member* proposer = find(vote.member);
    if (!proposer)
      return Status::VerificationFailed(fmt::format(
          "member-proposal by \"{}\", which is not a member at epoch {}", vote.member, epoch_));
    MEDGATE_RETURN_IF_ERROR(verify_vote(proposer->signing_key, digest, vote, "member-proposal"));
    OpenProposal p{digest, statement, std::move(s), index, {vote.member}};
    proposals_.emplace(digest, std::move(p));
    return decide(digest, change, index);
  }

  if (entry.type == EntryType::kMemberApproval) {
    MEDGATE_RETURN_IF_ERROR(check_member_approval_body(entry.body));
    const Vote vote = vote_of(entry);
    const Hash digest = hash_field(entry.body, "proposal");
    auto it = proposals_.find(digest);
    if (it == proposals_.end())
      return Status::VerificationFailed(fmt::format(
          "member-approval by \"{}\" names no open proposal at epoch {}", vote.member, epoch_));
    const Member* approver = find(vote.member);
    if (!approver)
      return Status::VerificationFailed(fmt::format(
          "member-approval by \"{}\", which is not a member at epoch {}", vote.member, epoch_));
    OpenProposal& p = it->second;
    if (std::find(p.approvers.begin(), p.approvers.end(), vote.member) != p.approvers.end())
      return Status::VerificationFailed(fmt::format(
          "member-approval by \"{}\" repeats its approval of entry {}", vote.member, p.index));
    MEDGATE_RETURN_IF_ERROR(verify_vote(approver->signing_key, digest, vote, "member-approval"));
    p.approvers.push_back(vote.member);
    return decide(digest, change, index);
  }
  return change;
}

Result<MembershipChange> Membership::decide(const Hash& digest, MembershipChange change,
                                            std::uint64_t index) {
  OpenProposal& p = proposals_.at(digest);
  if (p.approvers.size() < majority()) return change;
  const MembershipStatement& s = p.decoded;
  if (s.action == MembershipAction::kAdd) {
    members_.emplace(s.member_id,
                     Member{s.member_id, *s.signing_key, s.endpoint, s.agreement_key, index});
  } else {
    members_.erase(s.member_id);
  }
  change.took_effect = true;
  change.statement = s;  // a copy: clear() below ends `s`
  ++epoch_;
  change.epoch = epoch_;
  proposals_.clear();  // every other statement of the old epoch is dead
  return change;
}

}  // namespace medgate::ledger
