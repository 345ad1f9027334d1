// medctl: the one command-line tool for medgate's admins and auditors (../shared/CLI.md).
#include <signal.h>

#include <iostream>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "cli/commands.h"

using namespace medgate::cli;

int main(int argc, char** argv) {
  ::signal(SIGPIPE, SIG_IGN);
  CLI::App app{"medctl: administer a medgate appliance and verify its ledger"};
  app.set_version_flag("--version", std::string("medctl ") + MEDGATE_VERSION);
  app.require_subcommand(1);
  GlobalOptions g;
  app.add_option(
      "--socket", g.socket,
      "admin socket (default: $MEDGATE_SOCKET, the config's socket, /run/medgate/admin.sock)");
  app.add_option("--config", g.config,
                 "medgated.toml, to find the socket (for init: the config to write with "
                 "--data-dir, or the existing one to complete)");
  app.add_flag("--json", g.json, "print one JSON document on stdout");

  int rc = 0;
  InitArgs init;
  auto* init_cmd =
      app.add_subcommand("init", "create the key store, signing key, ledger and config");
  init_cmd->add_option("--data-dir", init.data_dir,
                       "data directory; init writes the config (DIR/medgated.toml or --config). "
                       "Without it, init makes what an existing config describes: --config "
                       "FILE, else /etc/medgate/medgated.toml (the package's)");
  init_cmd->add_option("--key-store", init.key_store,
                       "softhsm (a token under DIR; the default) | pkcs11:URI | tpm2[:TCTI]");
  init_cmd->add_option("--ledger-id", init.ledger_id, "the ledger's name (default: the host name)");
  init_cmd->add_option("--socket", init.socket,
                       "admin socket path for the config (default: DIR/admin.sock)");
  init_cmd->add_option("--pin-file", init.pin_file,
                       "file holding the token PIN (pkcs11: key stores)");
  init_cmd->add_option("--pin-env", init.pin_env, "environment variable holding the token PIN");
  init_cmd->add_option(
      "--seal-pcrs", init.seal_pcrs,
      "tpm2: seal the data-key secret to these PCRs (SHA-256 bank), e.g. 7 or 0,7");
  init_cmd->add_option("--join", init.join,
                       "join the replicated ledger ordered by these etcd URLs (comma-separated) "
                       "instead of creating one; needs --ledger-id, --member-id, --endpoint, "
                       "--trust");
  init_cmd->add_option("--member-id", init.member_id, "with --join: this appliance's member id");
  init_cmd->add_option("--endpoint", init.endpoint,
                       "with --join: host:port other members reach it at");
  init_cmd->add_option("--prefix", init.prefix, "with --join: etcd key prefix");
  init_cmd->add_option("--trust", init.trust,
                       "with --join: the founding appliance's public key (PEM)");
  init_cmd->callback([&] { rc = cmd_init(g, init); });

  app.add_subcommand("status", "daemon, ledger, signed head, key store and admin counters")
      ->callback([&] { rc = cmd_status(g); });

  auto* ledger = app.add_subcommand("ledger", "the ledger: heads, verification, entries, proofs");
  ledger->require_subcommand(1);
  ledger->add_subcommand("head", "the latest signed head (its signature is checked)")
      ->callback([&] { rc = cmd_ledger_head(g); });

  std::optional<std::string> db;
  std::vector<std::string> trust;
  auto* verify = ledger->add_subcommand("verify", "verify every entry, block, link and signature");
  verify->add_option("--db", db, "verify this ledger file offline (no daemon, no HSM)");
  verify->add_option("--trust", trust, "trusted public key (PEM); repeatable; required with --db");
  verify->callback([&] { rc = cmd_ledger_verify(g, db, trust); });

  std::optional<std::uint64_t> entry, block;
  auto* show =
      ledger->add_subcommand("show", "one entry (metadata, never PHI values) or one block");
  show->add_option("--entry", entry, "entry index");
  show->add_option("--block", block, "block height");
  show->callback([&] { rc = cmd_ledger_show(g, entry, block); });

  std::uint64_t proof_entry = 0;
  std::optional<std::uint64_t> proof_size;
  auto* proof = ledger->add_subcommand("proof", "RFC 9162 inclusion proof of an entry");
  proof->add_option("--entry", proof_entry, "entry index")->required();
  proof->add_option("--size", proof_size, "tree size (default: the latest signed head's)");
  proof->callback([&] { rc = cmd_ledger_proof(g, proof_entry, proof_size); });

  std::uint64_t from = 0;
  std::optional<std::uint64_t> to;
  auto* consistency =
      ledger->add_subcommand("consistency", "RFC 9162 consistency proof between two tree sizes");
  consistency->add_option("--from", from, "earlier tree size")->required();
  consistency->add_option("--to", to, "later tree size (default: the latest signed head's)");
  consistency->callback([&] { rc = cmd_ledger_consistency(g, from, to); });

  ledger->add_subcommand("sign-head", "record the request and sign a head covering everything now")
      ->callback([&] { rc = cmd_ledger_sign_head(g); });

  auto* keys = app.add_subcommand("keys", "the appliance's signing key");
  keys->require_subcommand(1);
  keys->add_subcommand("show", "public key (PEM) and fingerprint")->callback([&] {
    rc = cmd_keys_show(g);
  });
  keys->add_subcommand("rotate",
                       "new signing key in the key store; the transition is recorded, signed by "
                       "the old and the new key")
      ->callback([&] { rc = cmd_keys_rotate(g); });

  std::string erase_patient, erase_reason;
  bool erase_yes = false;
  auto* patient =
      app.add_subcommand("patient", "patients: identifiers (admins), erasure by crypto-shredding");
  patient->require_subcommand(1);
  auto* erase = patient->add_subcommand(
      "erase", "destroy the patient's data key, so nothing stored for them can be decrypted again");
  erase->add_option("P", erase_patient, "the patient's identifier, or - to read it from stdin")
      ->required();
  erase->add_option("--reason", erase_reason,
                    "why, as recorded on the ledger in clear (never put patient data in it)");
  erase->add_flag("--yes", erase_yes, "do not ask for confirmation on a terminal");
  erase->callback([&] { rc = cmd_patient_erase(g, erase_patient, erase_reason, erase_yes); });
  std::string show_patient;
  auto* patient_show = patient->add_subcommand(
      "show", "a patient's state and, for admins, identifier (the look is recorded)");
  patient_show
      ->add_option("P", show_patient,
                   "a pseudonym (64 hex digits), an identifier, or - to read it from stdin")
      ->required();
  patient_show->callback([&] { rc = cmd_patient_show(g, show_patient); });

  std::string device_id, device_kind, device_hl7_app, device_hl7_facility;
  std::optional<std::string> device_patient, device_psk_out;
  std::vector<std::string> device_allow;
  bool device_allow_any = false;
  std::optional<std::string> device_cert_fingerprint, device_cert_cn;
  bool device_cert_none = false;
  auto* device = app.add_subcommand("device", "the device registry (CoAP devices, HL7 sources)");
  device->require_subcommand(1);
  auto* device_add = device->add_subcommand("add", "register a device; CoAP devices get a PSK");
  device_add->add_option("ID", device_id, "device id: the CoAP PSK identity")->required();
  device_add->add_option("--kind", device_kind, "coap or hl7")->required();
  device_add->add_option("--patient", device_patient,
                         "bind to this patient (identifier, or - to read it from stdin)");
  device_add->add_option("--hl7-app", device_hl7_app,
                         "HL7: sending application, MSH-3 (default ID)");
  device_add->add_option("--hl7-facility", device_hl7_facility,
                         "HL7: sending facility, MSH-4 (default: any)");
  device_add->add_option("--psk-out", device_psk_out, "write the PSK to this new file (0600)");
  device_add->add_option("--allow", device_allow,
                         "HL7: the networks it may send from (10.20.0.0/16, 10.1.2.3, fd00::/64; "
                         "default: any address)");
  device_add->add_option("--cert-fingerprint", device_cert_fingerprint,
                         "HL7 over TLS: accept it only with the client certificate of this "
                         "SHA-256 fingerprint (64 hex digits, ':' allowed)");
  device_add->add_option(
      "--cert-cn", device_cert_cn,
      "HL7 over TLS: accept it only with a client certificate of this subject CN");
  device_add->callback([&] {
    rc = cmd_device_add(g, device_id, device_kind, device_patient, device_hl7_app,
                        device_hl7_facility, device_psk_out, device_allow, device_cert_fingerprint,
                        device_cert_cn);
  });
  device->add_subcommand("list", "registered devices")->callback([&] { rc = cmd_device_list(g); });
  auto* device_show = device->add_subcommand("show", "one device");
  device_show->add_option("ID", device_id)->required();
  device_show->callback([&] { rc = cmd_device_show(g, device_id); });
  auto* device_bind = device->add_subcommand("bind", "bind a device to a patient");
  device_bind->add_option("ID", device_id)->required();
  device_bind->add_option("--patient", device_patient, "identifier, or - for stdin")->required();
  device_bind->callback(
      [&] { rc = cmd_device_change(g, "bind", device_id, device_patient, std::nullopt); });
  auto* device_revoke = device->add_subcommand("revoke", "refuse the device from now on");
  device_revoke->add_option("ID", device_id)->required();
  device_revoke->callback(
      [&] { rc = cmd_device_change(g, "revoke", device_id, std::nullopt, std::nullopt); });
  auto* device_rotate = device->add_subcommand("rotate-psk", "a new PSK for a CoAP device");
  device_rotate->add_option("ID", device_id)->required();
  device_rotate->add_option("--psk-out", device_psk_out, "write the PSK to this new file (0600)");
  device_rotate->callback(
      [&] { rc = cmd_device_change(g, "rotate-psk", device_id, std::nullopt, device_psk_out); });

  auto* device_allow_cmd =
      device->add_subcommand("allow", "the networks an HL7 source may send from");
  device_allow_cmd->add_option("ID", device_id)->required();
  device_allow_cmd->add_option("NETWORK", device_allow, "addresses or prefixes (10.20.0.0/16)");
  device_allow_cmd->add_flag("--any", device_allow_any, "allow every address again");
  device_allow_cmd->callback(
      [&] { rc = cmd_device_allow(g, device_id, device_allow, device_allow_any); });
  auto* device_cert_cmd =
      device->add_subcommand("cert", "the TLS client certificate an HL7 source must send with");
  device_cert_cmd->add_option("ID", device_id)->required();
  device_cert_cmd->add_option("--fingerprint", device_cert_fingerprint,
                              "SHA-256 of the certificate (64 hex digits, ':' allowed)");
  device_cert_cmd->add_option("--cn", device_cert_cn, "the certificate's subject CN");
  device_cert_cmd->add_flag("--none", device_cert_none, "any connection again");
  device_cert_cmd->callback([&] {
    rc = cmd_device_cert(g, device_id, device_cert_fingerprint, device_cert_cn, device_cert_none);
  });

  add_consent_commands(app, g, rc);
  add_audit_commands(app, g, rc);
  add_backup_commands(app, g, rc);
  add_cluster_commands(app, g, rc);

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    int code = app.exit(e);
    return code == 0 ? 0 : 2;
  } catch (const nlohmann::json::exception& e) {
    std::cerr << "medctl: the daemon's answer is malformed: " << e.what() << "\n";
    return 1;
  }
  return rc;
}
