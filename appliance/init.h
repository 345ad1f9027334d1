// `medctl init` (run through `medgated init`, since only the daemon's binary links the key-store
// backends): makes the data dir, the key store's token and signing key, the ledger with its
// genesis block and first signed head, the config file and the public key for auditors.
//
// Two ways in. With a data dir, init decides everything and writes the config. With an existing
// config (the Debian package's /etc/medgate/medgated.toml), init makes what that config
// describes -- its ledger id, data dir, ledger path and key store -- and never writes the file.
//
// Run as root on a data dir that belongs to someone else (the package's /var/lib/medgate is
// medgate:medgate), init gives everything it created there to the data dir's owner and group, so
// the daemon's user can open it; files init creates elsewhere (a PIN file next to the config)
// stay root's.
#pragma once

#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "hsm/pin.h"
#include "hsm/public_key.h"
#include "hsm/status.h"

namespace medgate::appliance {

// Joining a replicated ledger instead of creating one (docs/replication.md): the ledger's block 0
// comes from etcd, checked against the founder's public key, and this appliance's own key signs
// its heads. It is a member once the members add it (`medctl member propose add` on a member).
struct JoinOptions {
  std::vector<std::string> etcd;  // client URLs
  std::string member_id;          // this appliance's id in the cluster
  std::string endpoint;           // host:port it is reached at
  std::string prefix;             // default: /medgate/<ledger id>/
  std::filesystem::path trust;    // the founder's public key (PEM)
};

struct InitOptions {
  // Either a data dir (init writes the config) or an existing config, never both.
  std::filesystem::path data_dir;
  std::optional<std::filesystem::path> existing_config;
  std::string key_store = "softhsm";  // "softhsm", "pkcs11:URI" or "tpm2[:TCTI]"
  std::string ledger_id;  // default: the host name; with existing_config, must match its id
  std::optional<std::filesystem::path> config_out;  // default: data_dir/medgated.toml
  std::optional<std::filesystem::path> socket;      // default: data_dir/admin.sock
  // For pkcs11: URIs (softhsm makes its own PIN file). With existing_config the config's PIN
  // source is used: a pin_credential NAME is read from (for the embedded SoftHSM token: written
  // to) the file NAME next to the config, which is where the packaged unit's LoadCredential=
  // takes it from.
  hsm::PinSource pin;
  std::string actor;  // who ran it, as recorded in the genesis entry
  // tpm2 only: the PCRs (SHA-256 bank) to seal the data-key secret to, e.g. {7}; empty: none.
  std::vector<unsigned> seal_pcrs;
  std::optional<JoinOptions> join;
};

struct InitResult {
  std::string ledger_id;
  std::filesystem::path config;
  std::filesystem::path ledger;
  std::filesystem::path public_key;
  std::filesystem::path socket;
  KeyId key_id{};
  std::string key_store;
  bool config_written = false;                    // false: an existing config was used as it is
  std::optional<std::filesystem::path> pin_file;  // a new SoftHSM token's PIN, when init made one
  std::optional<std::string> joined_as;           // the member id, when init joined a cluster
  // Joining: the key store's key-agreement public key (what the cluster's shared secret is sealed
  // to), written next to the signing key for `medctl member propose add --agreement-key`.
  std::optional<std::filesystem::path> agreement_key;
};

Result<InitResult> initialize(const InitOptions& options);

}  // namespace medgate::appliance
