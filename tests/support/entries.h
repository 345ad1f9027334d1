// Small entries for ledger tests.
#pragma once

#include <cstdint>
#include <string>

#include "ledger/entry.h"

namespace medgate::testing {

// An admin-action entry {"op": op, "args": {"n": n}} by "user:test", time filled at append.
inline ledger::Entry note(const std::string& op, std::uint64_t n = 0) {
  using ledger::cbor::Value;
  ledger::Entry e;
  e.type = ledger::EntryType::kAdminAction;
  e.actor = "user:test";
  e.body = *Value::map({{Value::text("op"), Value::text(op)},
                        {Value::text("args"), *Value::map({{Value::text("n"), Value::uint(n)}})}});
  return e;
}

}  // namespace medgate::testing
