// The admin API's audit operation (medctl audit export): builds a signed audit bundle
// (ledger/audit_bundle.h) at a fresh signed head and signs it with the head's key through the key
// store. Auditors and admins may export; only an admin may ask for decrypted values
// (include_values), and such an export is itself recorded on the ledger before it is built.
#pragma once

#include <vector>

#include "appliance/admin_server.h"

namespace medgate::hsm {
class KeyStore;
}
namespace medgate::ledger {
class Ledger;
}

namespace medgate::appliance {

class Vault;

std::vector<Operation> audit_operations(ledger::Ledger& ledger, hsm::KeyStore& keys, Vault& vault);

}  // namespace medgate::appliance
