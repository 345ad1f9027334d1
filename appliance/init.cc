#include "appliance/init.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <fstream>

#include <fmt/format.h>

#include "appliance/config.h"
#include "appliance/vault.h"
#include "hsm/key_store_factory.h"
#include "ledger/store.h"

namespace medgate::appliance {
namespace {

Status write_file(const std::filesystem::path& path, const std::string& text, mode_t mode) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, mode);
  if (fd < 0)
    return Status::FailedPrecondition(
        fmt::format("cannot create {}: {}", path.string(), std::strerror(errno)));
  bool ok = ::write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size()) &&
            ::fsync(fd) == 0;
  ::close(fd);
  if (!ok) return Status::IOError(fmt::format("cannot write {}", path.string()));
  return Status::Ok();
}

std::string host_name() {
  char buf[256] = {};
  if (::gethostname(buf, sizeof buf - 1) != 0 || !buf[0]) return "medgate";
  return buf;
}

}  // namespace

Result<InitResult> initialize(const InitOptions& o) {
  if (o.data_dir.empty()) return Status::InvalidArgument("--data-dir is required");
  std::filesystem::path dir = std::filesystem::absolute(o.data_dir).lexically_normal();
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec)
    return Status::InvalidArgument(
        fmt::format("cannot create data dir {}: {}", dir.string(), ec.message()));
  ::chmod(dir.c_str(), 0750);
  const std::filesystem::path ledger_path = dir / "ledger.db";
  if (std::filesystem::exists(ledger_path))
    return Status::FailedPrecondition(
        fmt::format("{} already holds a ledger ({}); refusing to create another", dir.string(),
                    ledger_path.string()));

  Config config;
  config.ledger_id = o.ledger_id.empty() ? host_name() : o.ledger_id;
  config.data_dir = dir;
  config.ledger_path = ledger_path;
  config.admin.socket = o.socket ? std::filesystem::absolute(*o.socket) : dir / "admin.sock";
  config.source = o.config_out ? std::filesystem::absolute(*o.config_out) : dir / "medgated.toml";
  if (std::filesystem::exists(config.source))
    return Status::FailedPrecondition(
        fmt::format("{} exists already; refusing to overwrite it", config.source.string()));

  if (o.key_store == "softhsm") {
    std::filesystem::path token_dir = dir / "softhsm";
    std::filesystem::create_directories(token_dir, ec);
    ::chmod(token_dir.c_str(), 0700);
    MEDGATE_ASSIGN_OR_RETURN(config.key_store,
                             hsm::create_softhsm_token(token_dir, "medgate", dir / "hsm-pin"));
  } else if (o.key_store.rfind("pkcs11:", 0) == 0) {
    config.key_store.uri = o.key_store;
    config.key_store.pin = o.pin;
    if (o.pin.kind == hsm::PinSource::Kind::kNone)
      return Status::InvalidArgument(
          "a pkcs11: key store needs a PIN source: --pin-file FILE or --pin-env VAR");
  } else if (o.key_store == "tpm2" || o.key_store.rfind("tpm2:", 0) == 0) {
    // The TPM keeps the keys; its blobs (useless without it) go to DIR/tpm. No PIN.
    std::filesystem::path key_dir = dir / "tpm";
    std::filesystem::create_directories(key_dir, ec);
    if (ec)
      return Status::InvalidArgument(
          fmt::format("cannot create {}: {}", key_dir.string(), ec.message()));
    ::chmod(key_dir.c_str(), 0700);
    config.key_store.uri = o.key_store;
    config.key_store.key_dir = key_dir;
    config.key_store.seal_pcrs = o.seal_pcrs;
    if (o.pin.kind != hsm::PinSource::Kind::kNone)
      return Status::InvalidArgument("a tpm2 key store takes no PIN (--pin-file, --pin-env)");
  } else {
    return Status::InvalidArgument(
        fmt::format("--key-store '{}' is not softhsm, pkcs11:URI or tpm2[:TCTI]", o.key_store));
  }

  if (!o.seal_pcrs.empty() && config.key_store.key_dir.empty())
    return Status::InvalidArgument("--seal-pcrs is for tpm2 key stores only");
  MEDGATE_ASSIGN_OR_RETURN(std::unique_ptr<hsm::KeyStore> keys,
                           hsm::open_key_store(config.key_store, hsm::KeyPolicy::kCreateIfMissing));
  ledger::LedgerOptions options;
  options.path = ledger_path;
  options.head_interval = std::chrono::milliseconds(0);
  {
    MEDGATE_ASSIGN_OR_RETURN(std::unique_ptr<ledger::Ledger> ledger,
                             ledger::Ledger::create(options, config.ledger_id, *keys, o.actor));
    ledger->close();
  }
  // The vault (per-patient data keys), empty; medgated refuses to start without it.
  MEDGATE_RETURN_IF_ERROR(Vault::open(dir / "vault.db", *keys).status());

  InitResult result;
  result.ledger_id = config.ledger_id;
  result.config = config.source;
  result.ledger = ledger_path;
  result.public_key = dir / "signing-key.pem";
  result.socket = config.admin.socket;
  result.key_id = keys->signing_key().id();
  result.key_store = keys->description();
  MEDGATE_RETURN_IF_ERROR(write_file(result.public_key, keys->signing_key().pem(), 0644));
  MEDGATE_RETURN_IF_ERROR(write_file(config.source, render_config(config), 0640));
  return result;
}

}  // namespace medgate::appliance
