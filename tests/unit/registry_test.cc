// The device registry against a real SoftHSM token, vault and ledger: what the listeners look up
// (PSKs unwrapped, bound patients resolved, revocation, HL7 application/facility matching), and
// that the registry reads back the same after a reopen.
#include <catch2/catch.hpp>

#include <arpa/inet.h>
#include <netinet/in.h>

#include "appliance/cert_binding.h"
#include "appliance/ip_network.h"
#include "appliance/registry.h"
#include "appliance/vault.h"
#include "ledger/sqlite.h"
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

TEST_CASE("ip networks: parsing, host bits, membership of v4, v6 and v4-mapped peers",
          "[registry]") {
  auto net = [](const char* text) {
    Result<IpNetwork> n = parse_ip_network(text);
    INFO(text << ": " << n.status().to_string());
    REQUIRE(n.ok());
    return *n;
  };
  auto peer4 = [](const char* address) {
    sockaddr_storage ss{};
    auto& in = reinterpret_cast<sockaddr_in&>(ss);
    in.sin_family = AF_INET;
    REQUIRE(::inet_pton(AF_INET, address, &in.sin_addr) == 1);
    return ss;
  };
  auto peer6 = [](const char* address) {
    sockaddr_storage ss{};
    auto& in6 = reinterpret_cast<sockaddr_in6&>(ss);
    in6.sin6_family = AF_INET6;
    REQUIRE(::inet_pton(AF_INET6, address, &in6.sin6_addr) == 1);
    return ss;
  };
  CHECK(net("10.20.0.0/16").to_string() == "10.20.0.0/16");
  CHECK(net("10.1.2.3").to_string() == "10.1.2.3");
  CHECK(net("10.1.2.3/32").to_string() == "10.1.2.3");
  CHECK(net("fd00:7::/64").to_string() == "fd00:7::/64");
  CHECK(net("0.0.0.0/0").contains(peer4("192.0.2.1")));
  CHECK(net("10.20.0.0/16").contains(peer4("10.20.255.1")));
  CHECK_FALSE(net("10.20.0.0/16").contains(peer4("10.21.0.1")));
  CHECK(net("10.20.128.0/17").contains(peer4("10.20.200.1")));
  CHECK_FALSE(net("10.20.128.0/17").contains(peer4("10.20.127.1")));
  CHECK(net("10.20.0.0/16").contains(peer6("::ffff:10.20.3.4")));  // a dual-stack listener
  CHECK_FALSE(net("10.20.0.0/16").contains(peer6("fd00:7::1")));
  CHECK(net("fd00:7::/64").contains(peer6("fd00:7::1")));
  CHECK_FALSE(net("fd00:7::/64").contains(peer6("fd00:8::1")));
  CHECK_FALSE(net("fd00:7::/64").contains(peer4("10.20.3.4")));

  auto refused = [](const char* text, const char* why) {
    Result<IpNetwork> n = parse_ip_network(text);
    INFO(text);
    REQUIRE_FALSE(n.ok());
    CHECK(n.status().code() == StatusCode::kInvalidArgument);
    CHECK_THAT(n.status().message(), Catch::Contains(why));
  };
  refused("10.20.1.0/16", "has host bits set; did you mean 10.20.0.0/16?");
  refused("10.20.0.0/33", "at most /32");
  refused("fd00::/129", "at most /128");
  refused("10.20.0.0/", "not a number");
  refused("10.20.0.0/x", "not a number");
  refused("ward7.example", "is not an IPv4 or IPv6 address");
  refused("", "is not an IPv4 or IPv6 address");

  Result<std::vector<IpNetwork>> list = parse_ip_networks("10.20.0.0/16, 10.1.2.3 10.20.0.0/16");
  REQUIRE(list.ok());
  CHECK(list->size() == 2);  // the repeat is dropped
  CHECK(allowed_from(*list, peer4("10.1.2.3")));
  CHECK_FALSE(allowed_from(*list, peer4("10.1.2.4")));
  CHECK(allowed_from({}, peer4("192.0.2.1")));  // no list: any address
  CHECK_FALSE(parse_ip_networks(" , ").ok());
}

TEST_CASE(
    "HL7 sources keep their address allow-list across a reopen; an older registry file "
    "gains the column",
    "[registry]") {
  TempDir dir;
  {
    // A registry as written before allow-lists existed.
    auto db =
        ledger::sql::Database::open(dir / "registry.db", ledger::sql::Database::Mode::kCreate);
    REQUIRE(db.ok());
    REQUIRE(db->exec("CREATE TABLE devices (id TEXT PRIMARY KEY, kind TEXT NOT NULL, revoked "
                     "INTEGER NOT NULL, patient BLOB, psk BLOB, hl7_application TEXT NOT NULL, "
                     "hl7_facility TEXT NOT NULL, created_us INTEGER NOT NULL, updated_us INTEGER "
                     "NOT NULL, last_entry INTEGER NOT NULL);"
                     "INSERT INTO devices VALUES ('old-lis', 'hl7', 0, NULL, NULL, 'LIS', '', 1, "
                     "1, 3);")
                .ok());
  }
  SoftHsmToken token(dir.path());
  auto keys = token.open_with_key();
  ledger::LedgerOptions o;
  o.path = dir / "ledger.db";
  o.head_interval = std::chrono::milliseconds(0);
  auto ledger = ledger::Ledger::create(o, "ward-7", *keys, "user:root");
  REQUIRE(ledger.ok());
  auto vault = Vault::open(dir / "vault.db", *keys);
  REQUIRE(vault.ok());
  const auto networks = *parse_ip_networks("10.20.0.0/16 10.1.2.3");
  {
    auto r = DeviceRegistry::open(dir / "registry.db", *keys, **vault, **ledger);
    INFO(r.status().to_string());
    REQUIRE(r.ok());
    CHECK((*r)->hl7_source("LIS", "X")->allow.empty());  // the old row: any address
    auto added = (*r)->add("lab", DeviceKind::kHl7, std::nullopt, "LAB", "", "user:a", networks);
    REQUIRE(added.ok());
    auto entry = (*ledger)->entry(added->entry);
    REQUIRE(entry.ok());
    const ledger::cbor::Value* allow = entry->entry.body.find("allow");
    REQUIRE(allow);
    REQUIRE(allow->as_array());
    CHECK(allow->as_array()->size() == 2);
    CHECK((*r)->add("pump", DeviceKind::kCoap, std::nullopt, "", "", "user:a", networks)
              .status()
              .code() == StatusCode::kInvalidArgument);
    REQUIRE((*r)->add("pump", DeviceKind::kCoap, std::nullopt, "", "", "user:a").ok());
    CHECK((*r)->set_allow("pump", networks, "user:a").status().code() ==
          StatusCode::kInvalidArgument);
    CHECK((*r)->set_allow("nobody", networks, "user:a").status().code() == StatusCode::kNotFound);
    REQUIRE((*r)->set_allow("old-lis", {networks[1]}, "user:a").ok());
  }
  auto r = DeviceRegistry::open(dir / "registry.db", *keys, **vault, **ledger);
  INFO(r.status().to_string());
  REQUIRE(r.ok());
  CHECK((*r)->hl7_source("LAB", "ANY")->allow == networks);
  CHECK((*r)->show("lab")->allow == networks);
  CHECK((*r)->hl7_source("LIS", "X")->allow == std::vector<IpNetwork>{networks[1]});
  REQUIRE((*r)->set_allow("lab", {}, "user:a").ok());
  CHECK((*r)->hl7_source("LAB", "ANY")->allow.empty());
}

TEST_CASE(
    "HL7 sources bound to a client certificate: recorded, kept across a reopen, an older "
    "registry file gains the column",
    "[registry]") {
  TempDir dir;
  {
    // A registry as written before certificate bindings existed (with allow-lists).
    auto db =
        ledger::sql::Database::open(dir / "registry.db", ledger::sql::Database::Mode::kCreate);
    REQUIRE(db.ok());
    REQUIRE(db->exec("CREATE TABLE devices (id TEXT PRIMARY KEY, kind TEXT NOT NULL, revoked "
                     "INTEGER NOT NULL, patient BLOB, psk BLOB, hl7_application TEXT NOT NULL, "
                     "hl7_facility TEXT NOT NULL, created_us INTEGER NOT NULL, updated_us INTEGER "
                     "NOT NULL, last_entry INTEGER NOT NULL, allow TEXT NOT NULL DEFAULT '');"
                     "INSERT INTO devices VALUES ('old-lis', 'hl7', 0, NULL, NULL, 'LIS', '', 1, "
                     "1, 3, '');")
                .ok());
  }
  SoftHsmToken token(dir.path());
  auto keys = token.open_with_key();
  ledger::LedgerOptions o;
  o.path = dir / "ledger.db";
  o.head_interval = std::chrono::milliseconds(0);
  auto ledger = ledger::Ledger::create(o, "ward-7", *keys, "user:root");
  REQUIRE(ledger.ok());
  auto vault = Vault::open(dir / "vault.db", *keys);
  REQUIRE(vault.ok());
  const std::string hex(64, 'a');
  auto by_fingerprint = cert_fingerprint_binding(std::string(32, 'A') + ":" + std::string(32, 'a'));
  REQUIRE(by_fingerprint.ok());
  CHECK(by_fingerprint->value == hex);  // lower case, colons gone
  auto by_cn = cert_cn_binding("central-icu");
  REQUIRE(by_cn.ok());
  {
    auto r = DeviceRegistry::open(dir / "registry.db", *keys, **vault, **ledger);
    INFO(r.status().to_string());
    REQUIRE(r.ok());
    CHECK_FALSE((*r)->hl7_source("LIS", "X")->cert.bound());  // the old row: any connection
    auto added = (*r)->add("central", DeviceKind::kHl7, std::nullopt, "CENTRAL", "", "user:a", {},
                           *by_fingerprint);
    REQUIRE(added.ok());
    auto entry = (*ledger)->entry(added->entry);
    REQUIRE(entry.ok());
    const ledger::cbor::Value* cert = entry->entry.body.find("cert");
    REQUIRE(cert);
    REQUIRE(cert->as_text());
    CHECK(*cert->as_text() == "sha256:" + hex);
    CHECK((*r)->add("pump", DeviceKind::kCoap, std::nullopt, "", "", "user:a", {}, *by_cn)
              .status()
              .code() == StatusCode::kInvalidArgument);
    REQUIRE((*r)->add("pump", DeviceKind::kCoap, std::nullopt, "", "", "user:a").ok());
    CHECK((*r)->set_cert("pump", *by_cn, "user:a").status().code() == StatusCode::kInvalidArgument);
    CHECK((*r)->set_cert("nobody", *by_cn, "user:a").status().code() == StatusCode::kNotFound);
    auto changed = (*r)->set_cert("old-lis", *by_cn, "user:a");
    REQUIRE(changed.ok());
    auto cert_entry = (*ledger)->entry(changed->entry);
    REQUIRE(cert_entry.ok());
    const ledger::cbor::Value* event = cert_entry->entry.body.find("event");
    REQUIRE(event);
    CHECK(*event->as_text() == "cert");
  }
  auto r = DeviceRegistry::open(dir / "registry.db", *keys, **vault, **ledger);
  INFO(r.status().to_string());
  REQUIRE(r.ok());
  CHECK((*r)->hl7_source("CENTRAL", "ANY")->cert == *by_fingerprint);
  CHECK((*r)->hl7_source("LIS", "X")->cert == *by_cn);
  CHECK((*r)->hl7_source("LIS", "X")->cert.matches("", "central-icu"));
  CHECK_FALSE((*r)->hl7_source("LIS", "X")->cert.matches(hex, "lab-1"));
  REQUIRE((*r)->set_cert("old-lis", CertBinding{}, "user:a").ok());
  CHECK_FALSE((*r)->hl7_source("LIS", "X")->cert.bound());
  (*r).reset();
  // A damaged binding in the file is named at open.
  {
    auto db =
        ledger::sql::Database::open(dir / "registry.db", ledger::sql::Database::Mode::kReadWrite);
    REQUIRE(db.ok());
    REQUIRE(db->exec("UPDATE devices SET cert = 'md5:00' WHERE id = 'central'").ok());
  }
  auto damaged = DeviceRegistry::open(dir / "registry.db", *keys, **vault, **ledger);
  CHECK(damaged.status().code() == StatusCode::kCorruption);
  CHECK_THAT(damaged.status().message(), Catch::Contains("device central's client certificate"));
}

TEST_CASE("certificate bindings: parsing and matching", "[registry]") {
  CHECK(cert_fingerprint_binding(std::string(63, 'a')).status().code() ==
        StatusCode::kInvalidArgument);
  CHECK(cert_fingerprint_binding(std::string(65, 'a')).status().code() ==
        StatusCode::kInvalidArgument);
  CHECK(cert_fingerprint_binding(std::string(63, 'a') + "g").status().code() ==
        StatusCode::kInvalidArgument);
  CHECK(cert_cn_binding("").status().code() == StatusCode::kInvalidArgument);
  CHECK(cert_cn_binding(std::string(65, 'x')).status().code() == StatusCode::kInvalidArgument);
  CHECK(cert_cn_binding("a\nb").status().code() == StatusCode::kInvalidArgument);
  CHECK(parse_cert_binding("md5:00").status().code() == StatusCode::kInvalidArgument);
  auto none = parse_cert_binding("");
  REQUIRE(none.ok());
  CHECK_FALSE(none->bound());
  CHECK(none->matches("", ""));  // no binding: any connection, TLS or not
  auto cn = parse_cert_binding("cn:lab-1");
  REQUIRE(cn.ok());
  CHECK(cn->to_string() == "cn:lab-1");
  CHECK(cn->matches("", "lab-1"));
  CHECK_FALSE(cn->matches("", ""));  // no certificate is no match
  CHECK_FALSE(cn->matches("", "lab-10"));
  const std::string hex(64, 'b');
  auto fp = parse_cert_binding("sha256:" + hex);
  REQUIRE(fp.ok());
  CHECK(fp->matches(hex, "anything"));
  CHECK_FALSE(fp->matches(std::string(64, 'c'), "anything"));
  CHECK_FALSE(fp->matches("", ""));
}

TEST_CASE(
    "cluster: a CoAP device's PSK follows the ledger sealed, and fails closed when it "
    "cannot be opened",
    "[registry]") {
  TempDir dir;
  SoftHsmToken token(dir.path());
  auto keys = token.open_with_key();
  auto open_ledger = [&](const std::string& name) {
    ledger::LedgerOptions o;
    o.path = dir / (name + ".db");
    o.head_interval = std::chrono::milliseconds(0);
    auto l = ledger::Ledger::create(o, "ward-7", *keys, "user:root");
    REQUIRE(l.ok());
    return std::move(l).value();
  };
  auto ledger_a = open_ledger("a");
  auto ledger_b = open_ledger("b");
  auto vault_a = Vault::open(dir / "a-vault.db", *keys).value();
  auto vault_b = Vault::open(dir / "b-vault.db", *keys).value();
  const Bytes secret(32, std::byte{7});
  REQUIRE(vault_a->adopt_cluster_secret(secret).ok());
  REQUIRE(vault_b->adopt_cluster_secret(secret).ok());
  auto a = DeviceRegistry::open(dir / "a-registry.db", *keys, *vault_a, *ledger_a).value();
  auto b = DeviceRegistry::open(dir / "b-registry.db", *keys, *vault_b, *ledger_b).value();

  auto added = a->add("pump-1", DeviceKind::kCoap, std::string("MRN-1"), "", "", "user:a");
  REQUIRE(added.ok());
  ledger::StoredEntry add_entry = ledger_a->entry(added->entry).value();
  const ledger::cbor::Value* sealed = add_entry.entry.body.find("psk_sealed");
  REQUIRE(sealed);
  REQUIRE(sealed->as_bytes());
  const std::string& psk = added->psk;
  CHECK(std::search(sealed->as_bytes()->begin(), sealed->as_bytes()->end(), as_bytes(psk).begin(),
                    as_bytes(psk).end()) == sealed->as_bytes()->end());

  REQUIRE(b->apply_replicated(added->entry, add_entry.entry).ok());
  auto at_b = b->coap_device("pump-1");
  REQUIRE(at_b);
  CHECK(to_string(at_b->psk) == psk);
  // b does not know the identifier: it has the same pseudonym as a.
  CHECK(at_b->patient_id.empty());
  REQUIRE(at_b->patient_pseudonym);
  CHECK(*at_b->patient_pseudonym == vault_a->find("MRN-1").value().bytes);

  auto rotated = a->rotate_psk("pump-1", "user:a");
  REQUIRE(rotated.ok());
  ledger::StoredEntry rotate_entry = ledger_a->entry(rotated->entry).value();
  // Altered in transit (or another cluster's): refused, and the old PSK stops working at b.
  ledger::Entry altered = rotate_entry.entry;
  ledger::cbor::Map fields = *altered.body.as_map();
  for (auto& [k, v] : fields)
    if (*k.as_text() == "psk_sealed") {
      Bytes broken = *v.as_bytes();
      broken.back() ^= std::byte{1};
      v = ledger::cbor::Value::bytes(broken);
    }
  altered.body = *ledger::cbor::Value::map(std::move(fields));
  Status refused = b->apply_replicated(rotated->entry, altered);
  CHECK(refused.code() == StatusCode::kVerificationFailed);
  CHECK_THAT(refused.message(), Catch::Contains("cannot connect here"));
  CHECK(b->coap_device("pump-1")->psk.empty());
  // The genuine event is applied when it comes again (a replay): the device did not move past it.
  REQUIRE(b->apply_replicated(rotated->entry, rotate_entry.entry).ok());
  CHECK(to_string(b->coap_device("pump-1")->psk) == rotated->psk);
  // And across a reopen the retired PSK is not back.
  b.reset();
  b = DeviceRegistry::open(dir / "b-registry.db", *keys, *vault_b, *ledger_b).value();
  CHECK(to_string(b->coap_device("pump-1")->psk) == rotated->psk);
}
