// Admin-call arguments (JSON) as CBOR, for admin-action entries on the ledger.
#pragma once

#include <nlohmann/json.hpp>

#include "hsm/status.h"
#include "ledger/cbor.h"

namespace medgate::appliance {

// Integers, strings, booleans, null, arrays and objects map one to one; the ledger's encoding has
// no floats, so a fractional number is refused (kInvalidArgument).
Result<ledger::cbor::Value> json_to_cbor(const nlohmann::json& json);

}  // namespace medgate::appliance
