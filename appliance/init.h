// `medctl init` (run through `medgated init`, since only the daemon's binary links the key-store
// backends): makes the data dir, the key store's token and signing key, the ledger with its
// genesis block and first signed head, the config file and the public key for auditors.
#pragma once

#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "hsm/pin.h"
#include "hsm/public_key.h"
#include "hsm/status.h"

namespace medgate::appliance {

struct InitOptions {
  std::filesystem::path data_dir;
  std::string key_store = "softhsm";                // "softhsm", "pkcs11:URI" or "tpm2[:TCTI]"
  std::string ledger_id;                            // default: the host name
  std::optional<std::filesystem::path> config_out;  // default: data_dir/medgated.toml
  std::optional<std::filesystem::path> socket;      // default: data_dir/admin.sock
  hsm::PinSource pin;  // for pkcs11: URIs (softhsm makes its own PIN file)
  std::string actor;   // who ran it, as recorded in the genesis entry
  // tpm2 only: the PCRs (SHA-256 bank) to seal the data-key secret to, e.g. {7}; empty: none.
  std::vector<unsigned> seal_pcrs;
};

struct InitResult {
  std::string ledger_id;
  std::filesystem::path config;
  std::filesystem::path ledger;
  std::filesystem::path public_key;
  std::filesystem::path socket;
  KeyId key_id{};
  std::string key_store;
};

Result<InitResult> initialize(const InitOptions& options);

}  // namespace medgate::appliance
