// The device registry against a real SoftHSM token, vault and ledger: what the listeners look up
// (PSKs unwrapped, bound patients resolved, revocation, HL7 application/facility matching), and
// that the registry reads back the same after a reopen.
#include <catch2/catch.hpp>

#include "appliance/registry.h"
#include "appliance/vault.h"
#include "ledger/store.h"
#include "tests/support/softhsm.h"
#include "tests/support/temp_dir.h"

using namespace medgate;
using namespace medgate::appliance;
using medgate::testing::SoftHsmToken;
using medgate::testing::TempDir;

TEST_CASE("the registry answers the listeners from memory and survives a reopen", "[registry]") {
  TempDir dir;
  SoftHsmToken token(dir.path());
  auto keys = token.open_with_key();
  ledger::LedgerOptions o;
  o.path = dir / "ledger.db";
  o.head_interval = std::chrono::milliseconds(0);
  auto ledger = ledger::Ledger::create(o, "ward-7", *keys, "user:root");
  REQUIRE(ledger.ok());
  auto vault = Vault::open(dir / "vault.db", *keys);
  REQUIRE(vault.ok());
  std::string psk;
  {
    auto r = DeviceRegistry::open(dir / "registry.db", *keys, **vault, **ledger);
    REQUIRE(r.ok());
    auto added = (*r)->add("pump-1", DeviceKind::kCoap, std::string("MRN-1"), "", "", "user:a");
    REQUIRE(added.ok());
    psk = added->psk;
    CHECK(psk.size() == 32);
    REQUIRE((*r)->add("central", DeviceKind::kHl7, std::nullopt, "CENTRAL", "", "user:a").ok());
    REQUIRE((*r)->add("lab", DeviceKind::kHl7, std::nullopt, "LIS", "MAIN", "user:a").ok());
    CHECK((*r)->add("pump-1", DeviceKind::kCoap, std::nullopt, "", "", "user:a").status().code() ==
          StatusCode::kFailedPrecondition);
    CHECK((*r)->add("x", DeviceKind::kCoap, std::nullopt, "APP", "", "user:a").status().code() ==
          StatusCode::kInvalidArgument);
    auto entry = (*ledger)->entry(added->entry);
    REQUIRE(entry.ok());
    CHECK(entry->entry.type == ledger::EntryType::kDeviceEvent);
    REQUIRE(entry->entry.subjects.size() == 1);  // the patient, as a pseudonym
  }
  auto r = DeviceRegistry::open(dir / "registry.db", *keys, **vault, **ledger);
  REQUIRE(r.ok());
  auto pump = (*r)->coap_device("pump-1");
  REQUIRE(pump);
  CHECK(to_string(pump->psk) == psk);
  CHECK(pump->patient_id == "MRN-1");
  CHECK_FALSE(pump->revoked);
  CHECK_FALSE((*r)->coap_device("central"));  // an HL7 source is no CoAP identity
  CHECK_FALSE((*r)->coap_device("nobody"));

  CHECK((*r)->hl7_source("CENTRAL", "ANY-FACILITY")->device_id == "central");  // empty: any
  CHECK((*r)->hl7_source("LIS", "MAIN")->device_id == "lab");
  CHECK_FALSE((*r)->hl7_source("LIS", "OTHER"));

  auto rotated = (*r)->rotate_psk("pump-1", "user:b");
  REQUIRE(rotated.ok());
  CHECK(rotated->psk != psk);
  CHECK(to_string((*r)->coap_device("pump-1")->psk) == rotated->psk);
  REQUIRE((*r)->revoke("pump-1", "user:b").ok());
  CHECK((*r)->coap_device("pump-1")->revoked);
  CHECK((*r)->bind("pump-1", "MRN-2", "user:b").status().code() == StatusCode::kFailedPrecondition);
}
