// The admin API's operations for rules, the directory, consent, patient keys and data access
// (medctl rules|directory|consent|data, patient enroll). Patient identifiers arrive in arguments
// and are turned into pseudonyms at once: no log line, error message or ledger entry carries one.
#pragma once

#include <vector>

#include "appliance/admin_server.h"

namespace medgate::ledger {
class Ledger;
}

namespace medgate::appliance {

class ConsentBook;
class Vault;

std::vector<Operation> consent_operations(ConsentBook& book, Vault& vault, ledger::Ledger& ledger);

}  // namespace medgate::appliance
