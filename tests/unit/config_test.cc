// medgated.toml: what a valid file gives, and that every mistake names the file and line.
#include <catch2/catch.hpp>

#include <cctype>
#include <fstream>

#include <nlohmann/json.hpp>

#include "appliance/config.h"
#include "appliance/metrics.h"

using namespace medgate;
using namespace medgate::appliance;

namespace {
const char* kGood = R"(
[ledger]
id = "ward-7"
data_dir = "data"
head_interval_ms = 250

[key_store]
uri = "pkcs11:token=medgate;object=medgate-signing?module-path=/usr/lib/softhsm/libsofthsm2.so"
pin_credential = "hsm-pin"

[admin]
socket = "/run/medgate/admin.sock"
admin_group = "wheel"

[log]
level = "debug"
)";

Status error_of(const std::string& text) {
  return parse_config(text, "/etc/medgate/medgated.toml").status();
}
}  // namespace

TEST_CASE("a valid config gives its values, with relative paths against the file's directory",
          "[config]") {
  auto c = parse_config(kGood, "/etc/medgate/medgated.toml");
  REQUIRE(c.ok());
  CHECK(c->ledger_id == "ward-7");
  CHECK(c->data_dir == "/etc/medgate/data");
  CHECK(c->ledger_path == "/etc/medgate/data/ledger.db");
  CHECK(c->head_interval == std::chrono::milliseconds(250));
  CHECK(c->key_store.pin.kind == hsm::PinSource::Kind::kCredential);
  CHECK(c->key_store.pin.name == "hsm-pin");
  CHECK(c->admin.socket == "/run/medgate/admin.sock");
  CHECK(c->admin.admin_group == "wheel");
  CHECK(c->admin.auditor_group == "medgate-audit");
  CHECK(c->log_level == LogLevel::kDebug);
}

TEST_CASE("render_config writes a file that parses back to the same config", "[config]") {
  auto c = parse_config(kGood, "/etc/medgate/medgated.toml");
  REQUIRE(c.ok());
  c->key_store.pin = {hsm::PinSource::Kind::kFile, "/var/lib/medgate/hsm-pin"};
  c->key_store.softhsm_conf = "/var/lib/medgate/softhsm/softhsm2.conf";
  c->ledger_id = "it's \"quoted\"";
  auto back = parse_config(render_config(*c), "/etc/medgate/medgated.toml");
  REQUIRE(back.ok());
  CHECK(back->ledger_id == c->ledger_id);
  CHECK(back->key_store.uri == c->key_store.uri);
  CHECK(back->key_store.pin.name == "/var/lib/medgate/hsm-pin");
  CHECK(back->key_store.softhsm_conf == c->key_store.softhsm_conf);
  CHECK(back->admin.socket == c->admin.socket);
  CHECK(back->ledger_path == c->ledger_path);
}

TEST_CASE("config errors name the file, the line and the problem", "[config]") {
  std::string good = kGood;
  auto with = [&](const std::string& from, const std::string& to) {
    std::string s = good;
    s.replace(s.find(from), from.size(), to);
    return error_of(s);
  };
  Status s = with("head_interval_ms = 250", "head_interval_ms = 'fast'");
  CHECK(s.code() == StatusCode::kInvalidArgument);
  CHECK_THAT(s.message(),
             Catch::Contains("medgated.toml:5: [ledger] head_interval_ms must be an integer"));
  CHECK_THAT(with("head_interval_ms = 250", "head_interval_ms = 2e50").message(),
             Catch::Contains(":5: column 21: expected a value"));
  CHECK_THAT(with("head_interval_ms = 250", "head_interval_ms = 1").message(),
             Catch::Contains(":5: [ledger] head_interval_ms must be between"));
  CHECK_THAT(with("admin_group", "admin_grup").message(),
             Catch::Contains(":13: unknown key 'admin_grup' in [admin]"));
  CHECK_THAT(with("[log]", "[logging]").message(),
             Catch::Contains("unknown key 'logging' in [top level]"));
  CHECK_THAT(with("id = \"ward-7\"", "").message(), Catch::Contains("[ledger] id is required"));
  CHECK_THAT(with("uri = ", "url = ").message(), Catch::Contains("unknown key 'url'"));
  CHECK_THAT(
      with("pin_credential = \"hsm-pin\"", "pin_credential = \"x\"\npin_env = \"Y\"").message(),
      Catch::Contains("only one of pin_file, pin_env, pin_credential"));
  CHECK_THAT(with("level = \"debug\"", "level = \"chatty\"").message(),
             Catch::Contains("level 'chatty' is not one of"));
  CHECK_THAT(with("[ledger]", "[ledger").message(), Catch::Contains("medgated.toml:2:"));
  CHECK_THAT(
      with("socket = \"/run/medgate/admin.sock\"", "socket = \"/" + std::string(120, 'x') + "\"")
          .message(),
      Catch::Contains("longer than a Unix socket allows"));
  CHECK_THAT(error_of("ledger = 5").message(), Catch::Contains("'ledger' must be a table"));
  CHECK_THAT(error_of("").message(), Catch::Contains("[ledger] id is required"));
  CHECK(load_config("/nonexistent/medgated.toml").status().code() == StatusCode::kInvalidArgument);
}

TEST_CASE("characters TOML forbids get a clear error before the parser sees them", "[config]") {
  // toml++ 3.3.0 (Debian 12) misbehaves on these (tests/fuzz/corpus/config/crash-*).
  CHECK_THAT(error_of("\xc3\xbc").message(),
             Catch::Contains("medgated.toml:1: column 1: a non-ASCII character outside a comment"));
  CHECK_THAT(error_of("[\x01").message(),
             Catch::Contains("medgated.toml:1: control character 0x01"));
  CHECK_THAT(error_of("# ok\n[ledger]\nid = \"a\x7f\"").message(),
             Catch::Contains("medgated.toml:3: control character 0x7f"));
  CHECK_THAT(error_of("[ledger]\nid = \"unclosed\n").message(),
             Catch::Contains("medgated.toml:2: column 15: a quoted string is not closed"));
  CHECK_THAT(error_of("\n[[@l").message(),
             Catch::Contains("medgated.toml:2: column 3: expected a key name"));
  CHECK_THAT(error_of("[ledger]\nx = [1, 2]\n").message(),
             Catch::Contains("medgated.toml:2: column 5: arrays are not accepted"));
  CHECK_THAT(error_of("ledger = { id = 1 }").message(),
             Catch::Contains("inline tables are not accepted"));
  CHECK_THAT(error_of("[\"quoted [key]\"]\n").message(),
             Catch::Contains("unknown key 'quoted [key]'"));
  // Non-ASCII is fine in comments only: toml++ 3.3.0 misreads it in strings it takes for numbers.
  CHECK_THAT(
      error_of("[ledger]\nid = \"Station S\xc3\xbc"
               "d\"")
          .message(),
      Catch::Contains("medgated.toml:2: column 16: a non-ASCII character outside a comment"));
  CHECK_THAT(error_of("[ledger]\ndata_dir =+\"/x\xc9\xbf\"").message(),
             Catch::Contains(":2: column 12: expected a value"));
  CHECK_THAT(error_of("[ledger]\nhead_interval_ms = 1979-05-27").message(),
             Catch::Contains("no floats or dates"));
  CHECK_THAT(error_of("[ledger]\nid = \"a\\q\"").message(), Catch::Contains("unknown escape"));
  CHECK_THAT(error_of("[ledger]\nid = \"x\" trailing").message(),
             Catch::Contains("unexpected text after the value"));
  CHECK_THAT(error_of("[ledger]\nid = \"S\\u00fcd\"").message(),
             Catch::Contains(":2: [ledger] id must be printable ASCII"));
  std::string commented = std::string(kGood) +
                          "# Station S\xc3\xbc"
                          "d, Fl\xc3\xbc"
                          "gel B\n";
  CHECK(parse_config(commented, "/etc/medgate/medgated.toml").ok());
  std::string multi = std::string(kGood) + "\n# '''\n";
  CHECK(parse_config(multi, "/etc/medgate/medgated.toml").ok());  // ''' in a comment is fine
  multi.replace(multi.find("level = \"debug\""), 15, "level = \"\"\"debug\"\"\"");
  CHECK_THAT(parse_config(multi, "/etc/medgate/medgated.toml").status().message(),
             Catch::Contains("multi-line strings are not accepted"));
}

TEST_CASE("a tpm2 key store: key_dir, seal_pcrs and counter_nv_index round-trip", "[config]") {
  auto c = parse_config(kGood, "/etc/medgate/medgated.toml");
  REQUIRE(c.ok());
  c->key_store = {};
  c->key_store.uri = "tpm2:swtpm:host=127.0.0.1,port=2321";
  c->key_store.key_dir = "/var/lib/medgate/tpm";
  c->key_store.seal_pcrs = {0, 7};
  c->key_store.counter_nv_index = 0x01500010;
  const std::string text = render_config(*c);
  CHECK(text.find("pin_file") == std::string::npos);  // no PIN for a TPM
  auto back = parse_config(text, "/etc/medgate/medgated.toml");
  INFO(back.status().to_string());
  REQUIRE(back.ok());
  CHECK(back->key_store.uri == c->key_store.uri);
  CHECK(back->key_store.key_dir == "/var/lib/medgate/tpm");
  CHECK(back->key_store.seal_pcrs == std::vector<unsigned>{0, 7});
  CHECK(back->key_store.counter_nv_index == 0x01500010u);

  // No PCRs, relative key_dir, default counter.
  auto plain = parse_config(
      "[ledger]\nid = \"w\"\ndata_dir = \"d\"\n[key_store]\nuri = \"tpm2\"\nkey_dir = \"tpm\"\n"
      "seal_pcrs = \"\"\n",
      "/etc/medgate/medgated.toml");
  REQUIRE(plain.ok());
  CHECK(plain->key_store.key_dir == "/etc/medgate/tpm");
  CHECK(plain->key_store.seal_pcrs.empty());
  CHECK(plain->key_store.counter_nv_index == 0x01504d47u);
}

TEST_CASE("tpm2 settings are checked", "[config]") {
  const std::string head = "[ledger]\nid = \"w\"\ndata_dir = \"d\"\n[key_store]\n";
  auto err = [&](const std::string& keys) { return error_of(head + keys); };
  CHECK_THAT(err("uri = \"tpm2\"\n").message(), Catch::Contains("key_dir is required"));
  Status bad_pcr = err("uri = \"tpm2\"\nkey_dir = \"t\"\nseal_pcrs = \"7,24\"\n");
  CHECK(bad_pcr.code() == StatusCode::kInvalidArgument);
  CHECK_THAT(bad_pcr.message(), Catch::Contains("medgated.toml:7") && Catch::Contains("PCR 24"));
  CHECK_THAT(err("uri = \"tpm2\"\nkey_dir = \"t\"\nseal_pcrs = \"7,x\"\n").message(),
             Catch::Contains("'x' is not a PCR number"));
  CHECK_THAT(err("uri = \"tpm2\"\nkey_dir = \"t\"\nseal_pcrs = \"7,7\"\n").message(),
             Catch::Contains("listed twice"));
  CHECK_THAT(err("uri = \"tpm2\"\nkey_dir = \"t\"\nseal_pcrs = 7\n").message(),
             Catch::Contains("must be a string"));
  CHECK_THAT(err("uri = \"tpm2\"\nkey_dir = \"t\"\ncounter_nv_index = 5\n").message(),
             Catch::Contains("counter_nv_index must be an NV index"));
  CHECK_THAT(err("uri = \"pkcs11:token=x\"\nkey_dir = \"t\"\n").message(),
             Catch::Contains("tpm2 key stores only"));
  CHECK(parse_pcr_list("0, 7").ok());
  CHECK(*parse_pcr_list("7,0") == std::vector<unsigned>{0, 7});
}

TEST_CASE("ingest listeners: on with their section, off without it or with enabled = false",
          "[config]") {
  auto without = parse_config(kGood, "/etc/medgate/medgated.toml");
  REQUIRE(without.ok());
  CHECK_FALSE(without->hl7);
  CHECK_FALSE(without->coap);

  std::string text = std::string(kGood) + R"(
[hl7]
address = "127.0.0.1"
port = 2576
read_timeout_s = 30
max_connections = 10

[coap]
port = 5685
plain_port = 5683
max_payload = 4096
)";
  auto c = parse_config(text, "/etc/medgate/medgated.toml");
  INFO(c.status().to_string());
  REQUIRE(c.ok());
  REQUIRE(c->hl7);
  CHECK(c->hl7->address == "127.0.0.1");
  CHECK(c->hl7->port == 2576);
  CHECK(c->hl7->read_timeout == std::chrono::seconds(30));
  CHECK(c->hl7->max_connections == 10);
  REQUIRE(c->coap);
  CHECK(c->coap->address == "::");
  CHECK(c->coap->port == 5685);
  CHECK(c->coap->plain_port == std::optional<std::uint16_t>(5683));
  CHECK(c->coap->max_payload == 4096);

  auto off = parse_config(std::string(kGood) + "\n[hl7]\nenabled = false\nport = 1\n",
                          "/etc/medgate/medgated.toml");
  REQUIRE(off.ok());
  CHECK_FALSE(off->hl7);

  for (const char* bad : {"\n[hl7]\nport = 70000\n", "\n[hl7]\nread_timeout_s = 0\n",
                          "\n[hl7]\nlisten = \"x\"\n", "\n[coap]\nmax_payload = 1\n",
                          "\n[coap]\nport = \"5684\"\n", "\n[coap]\nenabled = \"yes\"\n"}) {
    auto r = parse_config(std::string(kGood) + bad, "/etc/medgate/medgated.toml");
    INFO(bad);
    CHECK(r.status().code() == StatusCode::kInvalidArgument);
    CHECK_THAT(r.status().message(), Catch::Contains("medgated.toml:"));
  }
}

TEST_CASE("[hl7] tls: the key in the key store, a key file only as an explicit fallback",
          "[config]") {
  auto c = parse_config(std::string(kGood) + R"(
[hl7]
tls = true
tls_cert = "mllp-cert.pem"
tls_client_ca = "/etc/medgate/ca.pem"
tls_handshake_timeout_s = 3
)",
                        "/etc/medgate/medgated.toml");
  INFO(c.status().to_string());
  REQUIRE(c.ok());
  REQUIRE(c->hl7);
  REQUIRE(c->hl7->tls);
  CHECK(c->hl7->tls->cert_file == "/etc/medgate/mllp-cert.pem");
  CHECK_FALSE(c->hl7->tls->key_file);  // the key store's
  CHECK(c->hl7->tls->key_store.uri == c->key_store.uri);
  CHECK(c->hl7->tls->key_store.pin.name == "hsm-pin");  // the key store's PIN source
  CHECK(c->hl7->tls->client_ca == std::filesystem::path("/etc/medgate/ca.pem"));
  CHECK(c->hl7->tls->handshake_timeout == std::chrono::seconds(3));

  auto plain = parse_config(std::string(kGood) + "\n[hl7]\ntls = false\n", "/etc/m.toml");
  REQUIRE(plain.ok());
  CHECK_FALSE(plain->hl7->tls);

  auto file_key = parse_config(
      std::string(kGood) + "\n[hl7]\ntls = true\ntls_cert = \"c.pem\"\ntls_key_file = \"k.pem\"\n",
      "/etc/medgate/medgated.toml");
  REQUIRE(file_key.ok());
  CHECK(file_key->hl7->tls->key_file == std::filesystem::path("/etc/medgate/k.pem"));
  CHECK(file_key->hl7->tls->handshake_timeout == std::chrono::seconds(10));

  struct Bad {
    const char* text;
    const char* says;
  };
  for (const Bad& bad : {
           Bad{"\n[hl7]\ntls = true\n", "needs tls_cert"},
           Bad{"\n[hl7]\ntls_cert = \"c.pem\"\n", "tls_cert is set but tls is not"},
           Bad{"\n[hl7]\ntls = false\ntls_client_ca = \"c.pem\"\n", "tls_client_ca is set but"},
           Bad{"\n[hl7]\ntls = true\ntls_cert = \"c.pem\"\ntls_handshake_timeout_s = 0\n",
               "between 1 and 300"},
           Bad{"\n[hl7]\ntls = true\ntls_cert = \"c.pem\"\ntls_key_file = \"\"\n",
               "tls_key_file is empty"},
           Bad{"\n[hl7]\ntls = \"yes\"\n", "must be true or false"},
       }) {
    auto r = parse_config(std::string(kGood) + bad.text, "/etc/medgate/medgated.toml");
    INFO(bad.text);
    CHECK(r.status().code() == StatusCode::kInvalidArgument);
    CHECK_THAT(r.status().message(), Catch::Contains("medgated.toml:"));
    CHECK_THAT(r.status().message(), Catch::Contains(bad.says));
  }

  // A TPM holds the TLS key too (hsm/tls_key.h); tls_key_file stays a fallback.
  std::string tpm = R"(
[ledger]
id = "ward-7"
data_dir = "/var/lib/medgate"
[key_store]
uri = "tpm2"
key_dir = "/var/lib/medgate/tpm"
[hl7]
tls = true
tls_cert = "c.pem"
)";
  auto in_tpm = parse_config(tpm, "/etc/medgate/medgated.toml");
  INFO(in_tpm.status().to_string());
  REQUIRE(in_tpm.ok());
  REQUIRE(in_tpm->hl7->tls);
  CHECK_FALSE(in_tpm->hl7->tls->key_file);
  CHECK(in_tpm->hl7->tls->key_store.uri == "tpm2");
  auto fallback = parse_config(tpm + "tls_key_file = \"k.pem\"\n", "/etc/medgate/medgated.toml");
  INFO(fallback.status().to_string());
  CHECK(fallback.ok());
}

TEST_CASE("[network] allow: addresses and prefixes for the unit's IP allow-list", "[config]") {
  auto c = parse_config(std::string(kGood) + R"(
[network]
allow = "10.20.0.0/16, 192.168.7.12  fd00:7::/64 localhost,link-local"
)",
                        "/etc/medgate/medgated.toml");
  INFO(c.status().to_string());
  REQUIRE(c.ok());
  CHECK(c->ip_allow == std::vector<std::string>{"10.20.0.0/16", "192.168.7.12", "fd00:7::/64",
                                                "localhost", "link-local"});
  auto dropin = render_ip_allow_dropin(*c);
  REQUIRE(dropin.ok());
  CHECK_THAT(*dropin, Catch::Contains("[Service]\nIPAddressDeny=any\nIPAddressAllow=localhost\n"
                                      "IPAddressAllow=10.20.0.0/16 192.168.7.12 fd00:7::/64 "
                                      "localhost link-local\n"));

  auto none = parse_config(kGood, "/etc/medgate/medgated.toml");
  REQUIRE(none.ok());
  CHECK(none->ip_allow.empty());
  CHECK(render_ip_allow_dropin(*none).status().code() == StatusCode::kInvalidArgument);

  for (const char* bad : {"10.20.0.0/33", "fd00::/129", "10.20.0.0/", "10.20.0/16", "any",
                          "ward-7.example", "10.0.0.0/1x", "", " , "}) {
    auto r = parse_config(std::string(kGood) + "\n[network]\nallow = \"" + bad + "\"\n",
                          "/etc/medgate/medgated.toml");
    INFO(bad);
    CHECK(r.status().code() == StatusCode::kInvalidArgument);
    CHECK_THAT(r.status().message(), Catch::Contains("medgated.toml:19: [network] allow"));
  }
  auto unknown = parse_config(std::string(kGood) + "\n[network]\ndeny = \"10.0.0.0/8\"\n",
                              "/etc/medgate/medgated.toml");
  CHECK_THAT(unknown.status().message(), Catch::Contains("unknown key 'deny' in [network]"));
}

// The file the Debian package installs as /etc/medgate/medgated.toml must be one medgated
// accepts as it is, and every setting it shows in a comment (apart from the TPM alternative to
// [key_store]) must be valid too once uncommented.
TEST_CASE("the packaged medgated.toml parses, and so do its commented settings", "[config]") {
  auto c = load_config(MEDGATE_PACKAGED_CONFIG);
  INFO(c.status().to_string());
  REQUIRE(c.ok());
  CHECK(c->ledger_id == "medgate");
  CHECK(c->data_dir == "/var/lib/medgate");
  CHECK(c->ledger_path == "/var/lib/medgate/ledger.db");
  CHECK(c->key_store.pin.kind == hsm::PinSource::Kind::kCredential);
  CHECK(c->key_store.pin.name == "hsm-pin");  // the unit's LoadCredential=hsm-pin:...
  CHECK(c->key_store.softhsm_conf == "/var/lib/medgate/softhsm/softhsm2.conf");
  CHECK(c->admin.socket == "/run/medgate/admin.sock");  // in the unit's RuntimeDirectory=
  CHECK_FALSE(c->hl7);
  CHECK_FALSE(c->coap);

  std::ifstream in(MEDGATE_PACKAGED_CONFIG);
  std::string line, text, section;
  int uncommented = 0;
  while (std::getline(in, line)) {
    bool header = line.rfind("# [", 0) == 0;
    bool setting = line.size() > 2 && line.rfind("# ", 0) == 0 &&
                   std::islower(static_cast<unsigned char>(line[2])) &&
                   line.find(" = ") != std::string::npos && line.find(' ') == 1 &&
                   line.find(' ', 2) == line.find(" = ");
    if (line.rfind("[", 0) == 0 || header) section = line.substr(line.find('['));
    if ((header || setting) && section.rfind("[key_store]", 0) != 0) {
      line = line.substr(2);
      ++uncommented;
    }
    text += line + "\n";
  }
  INFO(text);
  CHECK(uncommented >= 15);
  auto all = parse_config(text, "/etc/medgate/medgated.toml");
  INFO(all.status().to_string());
  REQUIRE(all.ok());
  CHECK(all->hl7);
  CHECK(all->coap);
  CHECK(all->ip_allow.size() == 2);
  CHECK(all->head_interval == std::chrono::milliseconds(1000));
}

TEST_CASE("[metrics] listen: loopback only, and the exposition text", "[config]") {
  auto m = parse_metrics_listen("127.0.0.1:9464");
  REQUIRE(m.ok());
  CHECK(m->address == "127.0.0.1");
  CHECK(m->port == 9464);
  CHECK(parse_metrics_listen("[::1]:0")->address == "::1");
  CHECK(parse_metrics_listen("localhost:9464")->address == "127.0.0.1");
  CHECK(parse_metrics_listen("127.3.4.5:1").ok());
  for (const char* bad : {"0.0.0.0:9464", "10.20.0.1:9464", "[::]:9464", "ward7:9464"}) {
    INFO(bad);
    CHECK_THAT(parse_metrics_listen(bad).status().message(), Catch::Contains("loopback only"));
  }
  CHECK_THAT(parse_metrics_listen("127.0.0.1").status().message(), Catch::Contains("address:port"));
  CHECK_THAT(parse_metrics_listen("127.0.0.1:99999").status().message(),
             Catch::Contains("up to 65535"));

  auto c = parse_config(std::string(kGood) + "\n[metrics]\nlisten = \"0.0.0.0:9464\"\n",
                        "/etc/medgate/medgated.toml");
  REQUIRE_FALSE(c.ok());
  CHECK_THAT(c.status().message(), Catch::Contains("[metrics] listen"));
  CHECK_THAT(c.status().message(), Catch::Contains("medgated.toml:"));

  nlohmann::json status = {
      {"ledger", {{"entries", 42}, {"writer_error", ""}}},
      {"key_store", {{"device", {{"reachable", true}}}}},
      {"consent", {{"decisions", {{"allowed", 3}, {"denied", 1}}}}},
  };
  nlohmann::json devices = nlohmann::json::array(
      {{{"id", "lab-\"1"}, {"kind", "hl7"},
        {"traffic", {{"received", 5}, {"committed", 4}, {"rejected", {{"address", 1}}}}}}});
  const std::string text = render_metrics(status, devices);
  CHECK_THAT(text, Catch::Contains("# TYPE medgate_ledger_entries gauge\nmedgate_ledger_entries 42\n"));
  CHECK_THAT(text, Catch::Contains("medgate_ledger_writer_stopped 0\n"));
  CHECK_THAT(text, Catch::Contains("medgate_key_store_reachable 1\n"));
  CHECK_THAT(text, Catch::Contains("medgate_decisions_total{decision=\"deny\"} 1\n"));
  CHECK_THAT(text, Catch::Contains("medgate_device_rejected_total{device=\"lab-\\\"1\",reason=\"address\"} 1\n"));
  // A family whose number is missing is left out, not written empty.
  CHECK_THAT(text, !Catch::Contains("medgate_heads_signed_total"));
}
