// The appliance's side of a replicated ledger (docs/replication.md): the cluster settings kept in
// the data dir, the etcd client and orderer the daemon runs for a replicated ledger, and the admin
// operations behind `medctl cluster ...` and `medctl member ...`.
//
// Settings. `medctl cluster init` (the founder) and `medctl init --join` (every other member)
// write DATA_DIR/cluster.json (0600): the etcd client URLs, this member's id and endpoint, the
// key prefix, and TLS files for etcd. The ledger itself records that it is replicated (and as
// which member); the file says how to reach the cluster. A replicated ledger whose settings are
// missing keeps working on its own and queues its entries (store-and-forward), and says so in
// `medctl status`.
//
// Operations (admin unless noted):
//   cluster.init     {etcd: [urls], member_id, endpoint, prefix?}: founds the membership with this
//                    appliance's signing key, makes the ledger replicated, publishes its history
//                    to etcd and starts ordering. Refused when etcd already holds blocks under the
//                    prefix (another ledger's) or the ledger is replicated already.
//   cluster.status   (auditor) members, heights, lag, queue, etcd health, void blocks.
//   member.propose   {action: add|remove, member_id, public_key (PEM, add), endpoint (add),
//                    agreement_key (PEM, add; what the member's `init --join` wrote)}: this
//                    member proposes a change (its signature is its approval).
//   member.approve   {proposal: member id or statement hash prefix}: this member approves.
//   member.list      (auditor) members, epoch, open proposals.
#pragma once

#include <condition_variable>
#include <deque>
#include <filesystem>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "appliance/admin_server.h"
#include "appliance/config.h"
#include "hsm/key_store.h"
#include "hsm/status.h"
#include "ledger/block_record.h"
#include "ledger/order/etcd_client.h"

namespace medgate::ledger {
class Ledger;
}
namespace medgate::order {
class Orderer;
}

namespace medgate::appliance {

class ConsentBook;
class DeviceRegistry;
class Vault;

struct ClusterSettings {
  std::vector<std::string> etcd;  // client URLs
  std::string member_id;
  std::string endpoint;                      // host:port other members reach this one at
  std::string prefix;                        // "/medgate/<ledger id>/"
  std::string ca_file, cert_file, key_file;  // TLS to etcd (optional)
  // How often this member compacts etcd's history (docs/replication.md, "Size and compaction");
  // 0: never. Optional in the file ("compaction_interval_s").
  std::int64_t compaction_interval_s = 60;

  order::EtcdOptions etcd_options() const;
};

std::filesystem::path cluster_settings_path(const std::filesystem::path& data_dir);
// nullopt when the file does not exist; kInvalidArgument naming the problem when it is malformed.
Result<std::optional<ClusterSettings>> load_cluster_settings(const std::filesystem::path& data_dir);
// Written to a temporary file, fsynced and renamed into place (0600).
Status save_cluster_settings(const std::filesystem::path& data_dir, const ClusterSettings& s);
// "/medgate/<ledger id>/".
std::string default_cluster_prefix(const std::string& ledger_id);
// Checks URLs, id, endpoint and prefix; kInvalidArgument names the first bad one.
Status check_cluster_settings(const ClusterSettings& s);

// Block 0 of the ledger under `settings.prefix` in etcd, for a member that joins.
Result<ledger::BlockRecord> fetch_genesis_record(const ClusterSettings& settings);

class Cluster {
 public:
  Cluster(const Config& config, ledger::Ledger& ledger, hsm::KeyStore& keys);
  ~Cluster();
  Cluster(const Cluster&) = delete;
  Cluster& operator=(const Cluster&) = delete;

  // The state that follows the replicated ledger here: device events from every member's blocks
  // are applied to `registry` in ledger order (on a thread of the cluster's own, never the
  // ledger's writer). Call before start().
  void follow_devices(DeviceRegistry& registry) { registry_ = &registry; }
  // Consent grants and withdrawals, rules versions, the directory and patients' keys likewise.
  // Until members share a pseudonym key (docs/replication.md, "Shared keys"), another member's
  // grant names a patient by that member's pseudonym: it is on the book here and matches no
  // request here; rules versions and the directory apply everywhere.
  void follow_consent(ConsentBook& consent) { consent_ = &consent; }
  // The cluster's shared secret (docs/replication.md, "Shared keys"): the founder makes it at
  // cluster init; a member that holds it seals it to every member added with a key-agreement key
  // (a key-share entry); a member that lacks it opens the share naming it with its own key store
  // and keeps it in `vault`, which makes no pseudonym until then.
  void follow_keys(Vault& vault) { vault_ = &vault; }

  // For a replicated ledger: reads the settings and starts ordering. A failure to reach etcd is
  // not fatal (the orderer retries); malformed settings are.
  Status start();
  void stop();

  std::vector<Operation> operations();
  // The "cluster" section of `status` (null for a single box).
  nlohmann::json status_json() const;
  // Problems for status's health section.
  std::vector<std::string> problems() const;

 private:
  Status start_orderer(const ClusterSettings& settings);
  Result<nlohmann::json> init(const Caller& caller, const nlohmann::json& args);
  Result<nlohmann::json> propose(const Caller& caller, const nlohmann::json& args);
  Result<nlohmann::json> approve(const Caller& caller, const nlohmann::json& args);
  nlohmann::json members_json() const;
  Result<nlohmann::json> cluster_status() const;

  void start_follower();
  void follower_loop();
  void replay_devices();
  // Adopts the secret from a share naming this member, or (holding it) writes the shares that
  // members added since are missing. Runs on the follower thread.
  void reconcile_keys();
  // Publishes this member's data keys to etcd and removes erased patients' keys there, on a
  // thread of its own; serves other members' keys to the vault.
  Status start_key_sharing(const ClusterSettings& settings);
  void publisher_loop();
  // An erasure entry from the replicated ledger (any member's): applied to the vault, and the
  // patient's published keys queued for removal from etcd.
  void follow_erasure(std::uint64_t index, const ledger::Entry& entry);
  // The key share sealing `secret` to `member`.
  Result<ledger::Entry> share_for(const ledger::Member& member, ByteView secret,
                                  const std::string& actor) const;

  const Config& config_;
  ledger::Ledger& ledger_;
  hsm::KeyStore& keys_;
  DeviceRegistry* registry_ = nullptr;
  ConsentBook* consent_ = nullptr;
  Vault* vault_ = nullptr;
  // Follower thread only: shares this member queued and has not seen applied yet (member id and
  // agreement key id), and share entries already reported as unopenable.
  std::set<std::pair<std::string, KeyId>> shares_sent_;
  std::set<std::uint64_t> shares_reported_;
  // Shares whose append failed (filled on the ledger's writer thread; shared, so that a late
  // callback outlives nothing it needs): sealed again at the next reconcile.
  struct FailedShares {
    std::mutex mu;
    std::vector<std::pair<std::string, KeyId>> shares;
  };
  std::shared_ptr<FailedShares> failed_shares_ = std::make_shared<FailedShares>();
  // Key sharing through etcd (its own client: the orderer's thread owns the orderer's). The
  // client is shared with the vault's key source, which may still be running a fetch when the
  // cluster stops.
  std::mutex keys_mu_;  // everything below; never held across etcd or key-store calls
  std::condition_variable keys_cv_;
  std::shared_ptr<order::EtcdClient> keys_etcd_;
  std::string keys_prefix_;
  std::set<std::string> erased_to_remove_;  // pseudonyms (hex) whose published keys go
  bool keys_stop_ = false;
  std::thread publisher_;
  // Entries of applied blocks that the appliance's state follows, handed over by the ledger's
  // writer thread.
  std::mutex follow_mu_;
  std::condition_variable follow_cv_;
  std::deque<std::pair<std::uint64_t, ledger::Entry>> follow_queue_;
  bool follow_stop_ = false;
  std::thread follower_;
  std::optional<ClusterSettings> settings_;
  std::unique_ptr<order::EtcdClient> etcd_;
  std::unique_ptr<order::Orderer> orderer_;
  mutable std::mutex mu_;  // settings_, etcd_, orderer_, stopping_
  // Retries starting the orderer while etcd does not answer at start.
  std::thread retry_;
  std::condition_variable retry_cv_;
  bool stopping_ = false;
};

}  // namespace medgate::appliance
