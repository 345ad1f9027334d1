#include "appliance/init.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <fstream>
#include <set>
#include <sstream>

#include <fmt/format.h>

#include "appliance/cluster.h"
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

// Every path under `dir` (and `dir` itself), without following symbolic links.
std::set<std::filesystem::path> tree(const std::filesystem::path& dir) {
  std::set<std::filesystem::path> paths{dir};
  std::error_code ec;
  for (auto it = std::filesystem::recursive_directory_iterator(dir, ec);
       !ec && it != std::filesystem::recursive_directory_iterator(); it.increment(ec))
    paths.insert(it->path());
  return paths;
}

// Run as root on a data dir owned by another user (the package's /var/lib/medgate, made
// medgate:medgate by tmpfiles.d), gives the files init created there (every path not in
// `before`) to the data dir's owner and group: the daemon runs as that user and must open them.
Status give_to_data_dir_owner(const std::filesystem::path& dir,
                              const std::set<std::filesystem::path>& before,
                              const std::vector<std::filesystem::path>& also) {
  struct stat st {};
  if (::geteuid() != 0 || ::stat(dir.c_str(), &st) != 0 || st.st_uid == 0) return Status::Ok();
  std::set<std::filesystem::path> created = tree(dir);
  for (const auto& p : also)
    if (std::filesystem::exists(std::filesystem::symlink_status(p))) created.insert(p);
  for (const auto& p : created) {
    if (before.count(p)) continue;
    if (::lchown(p.c_str(), st.st_uid, st.st_gid) != 0)
      return Status::IOError(fmt::format("cannot give {} to the data dir's owner (uid {}): {}",
                                         p.string(), st.st_uid, std::strerror(errno)));
  }
  return Status::Ok();
}

// The label in "pkcs11:token=LABEL;object=medgate-signing?module-path=...", the URI that
// create_softhsm_token returns; nullopt for any other shape.
std::optional<std::string> embedded_token_label(const std::string& uri) {
  static constexpr std::string_view kPrefix = "pkcs11:token=";
  static constexpr std::string_view kRest = ";object=medgate-signing?module-path=";
  if (uri.rfind(kPrefix, 0) != 0) return std::nullopt;
  std::size_t end = uri.find(kRest, kPrefix.size());
  if (end == std::string::npos || end == kPrefix.size()) return std::nullopt;
  return uri.substr(kPrefix.size(), end - kPrefix.size());
}

// A pin_credential NAME, for init (which runs outside the unit): $CREDENTIALS_DIRECTORY/NAME when
// that is set, else the file NAME next to the config, where the unit's LoadCredential= reads it.
hsm::PinSource pin_for_init(const Config& config) {
  hsm::PinSource pin = config.key_store.pin;
  if (pin.kind == hsm::PinSource::Kind::kCredential && !std::getenv("CREDENTIALS_DIRECTORY"))
    pin = {hsm::PinSource::Kind::kFile, (config.source.parent_path() / pin.name).string()};
  return pin;
}

// Creates the ledger, the vault and the public key for `config` with `keys`; the parts both
// ways into init share.
Result<InitResult> make_ledger(const Config& config, hsm::KeyStore& keys, const std::string& actor,
                               const std::optional<JoinOptions>& join) {
  ledger::LedgerOptions options;
  options.path = config.ledger_path;
  options.head_interval = std::chrono::milliseconds(0);
  std::optional<ClusterSettings> cluster;
  if (join) {
    // Block 0 from etcd, vouched for by the founder's key; the rest comes once medgated runs.
    cluster = ClusterSettings{
        join->etcd,
        join->member_id,
        join->endpoint,
        join->prefix.empty() ? default_cluster_prefix(config.ledger_id) : join->prefix,
        "",
        "",
        ""};
    MEDGATE_RETURN_IF_ERROR(check_cluster_settings(*cluster));
    std::ifstream in(join->trust);
    std::stringstream pem;
    pem << in.rdbuf();
    if (!in)
      return Status::InvalidArgument(
          fmt::format("cannot read the founder's public key {}", join->trust.string()));
    Result<PublicKey> founder = PublicKey::from_pem(pem.str());
    if (!founder.ok())
      return founder.status().with_context(
          fmt::format("the founder's public key {}", join->trust.string()));
    MEDGATE_ASSIGN_OR_RETURN(ledger::BlockRecord genesis, fetch_genesis_record(*cluster));
    if (genesis.header.ledger_id != config.ledger_id)
      return Status::InvalidArgument(fmt::format("the ledger under {} in etcd is '{}', not '{}'",
                                                 cluster->prefix, genesis.header.ledger_id,
                                                 config.ledger_id));
    MEDGATE_ASSIGN_OR_RETURN(
        std::unique_ptr<ledger::Ledger> ledger,
        ledger::Ledger::create_replica(options, genesis, *founder, join->member_id, keys));
    ledger->close();
  } else {
    MEDGATE_ASSIGN_OR_RETURN(std::unique_ptr<ledger::Ledger> ledger,
                             ledger::Ledger::create(options, config.ledger_id, keys, actor));
    ledger->close();
  }
  if (cluster) MEDGATE_RETURN_IF_ERROR(save_cluster_settings(config.data_dir, *cluster));
  // The vault (per-patient data keys), empty; medgated refuses to start without it.
  MEDGATE_RETURN_IF_ERROR(Vault::open(config.data_dir / "vault.db", keys).status());

  InitResult result;
  result.ledger_id = config.ledger_id;
  result.config = config.source;
  result.ledger = config.ledger_path;
  result.public_key = config.data_dir / "signing-key.pem";
  result.socket = config.admin.socket;
  result.key_id = keys.signing_key().id();
  result.key_store = keys.description();
  if (join) result.joined_as = join->member_id;
  MEDGATE_RETURN_IF_ERROR(write_file(result.public_key, keys.signing_key().pem(), 0644));
  if (join) {
    Result<PublicKey> agreement = keys.agreement_key();
    if (!agreement.ok())
      return agreement.status().with_context(
          "this key store's key-agreement key (a member needs one to receive the cluster's "
          "shared key)");
    result.agreement_key = config.data_dir / "agreement-key.pem";
    MEDGATE_RETURN_IF_ERROR(write_file(*result.agreement_key, agreement->pem(), 0644));
  }
  return result;
}

Result<std::filesystem::path> make_data_dir(const std::filesystem::path& data_dir) {
  std::filesystem::path dir = std::filesystem::absolute(data_dir).lexically_normal();
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec)
    return Status::InvalidArgument(
        fmt::format("cannot create data dir {}: {}", dir.string(), ec.message()));
  ::chmod(dir.c_str(), 0750);
  return dir;
}

Status refuse_existing_ledger(const std::filesystem::path& dir, const std::filesystem::path& db) {
  if (std::filesystem::exists(db))
    return Status::FailedPrecondition(fmt::format(
        "{} already holds a ledger ({}); refusing to create another", dir.string(), db.string()));
  return Status::Ok();
}

// init with an existing config: make what it describes, leave the file alone.
Result<InitResult> initialize_from_config(const InitOptions& o) {
  const std::filesystem::path file = std::filesystem::absolute(*o.existing_config);
  if (!std::filesystem::exists(file))
    return Status::InvalidArgument(fmt::format(
        "{} does not exist: give --data-dir DIR to have init write a config", file.string()));
  MEDGATE_ASSIGN_OR_RETURN(Config config, load_config(file));
  if (!o.ledger_id.empty() && o.ledger_id != config.ledger_id)
    return Status::InvalidArgument(fmt::format(
        "{} names the ledger '{}' ([ledger] id); to call it '{}', change that line first (a "
        "ledger's id cannot change once it exists)",
        file.string(), config.ledger_id, o.ledger_id));
  MEDGATE_ASSIGN_OR_RETURN(std::filesystem::path dir, make_data_dir(config.data_dir));
  MEDGATE_RETURN_IF_ERROR(refuse_existing_ledger(dir, config.ledger_path));
  const std::set<std::filesystem::path> before = tree(dir);

  hsm::KeyStoreConfig key_store = config.key_store;
  std::optional<std::filesystem::path> new_pin;
  if (config.key_store.softhsm_conf) {
    // The embedded SoftHSM token: init makes it where softhsm_conf says, with a new PIN written
    // where the config's PIN source will read it.
    const std::filesystem::path& conf = *config.key_store.softhsm_conf;
    std::optional<std::string> label = embedded_token_label(config.key_store.uri);
    if (!label || conf.filename() != "softhsm2.conf")
      return Status::InvalidArgument(fmt::format(
          "{}: [key_store] softhsm_conf is set, so init makes a SoftHSM token, but uri must "
          "then be \"pkcs11:token=LABEL;object=medgate-signing?module-path=MODULE\" and "
          "softhsm_conf end in softhsm2.conf",
          file.string()));
    hsm::PinSource pin = pin_for_init(config);
    if (pin.kind != hsm::PinSource::Kind::kFile)
      return Status::InvalidArgument(fmt::format(
          "{}: a new SoftHSM token's PIN must go to a file: set [key_store] pin_file or "
          "pin_credential",
          file.string()));
    if (std::filesystem::exists(conf))
      return Status::FailedPrecondition(fmt::format(
          "{} exists already: a SoftHSM token is there; refusing to make another", conf.string()));
    MEDGATE_ASSIGN_OR_RETURN(key_store,
                             hsm::create_softhsm_token(conf.parent_path(), *label, pin.name));
    new_pin = pin.name;
    if (key_store.uri != config.key_store.uri)
      return Status::InvalidArgument(
          fmt::format("{}: [key_store] uri is \"{}\", but the token init made is \"{}\"",
                      file.string(), config.key_store.uri, key_store.uri));
  } else {
    key_store.pin = pin_for_init(config);
    if (!key_store.key_dir.empty()) {
      std::error_code ec;
      std::filesystem::create_directories(key_store.key_dir, ec);
      if (ec)
        return Status::InvalidArgument(
            fmt::format("cannot create {}: {}", key_store.key_dir.string(), ec.message()));
      ::chmod(key_store.key_dir.c_str(), 0700);
    }
  }
  MEDGATE_ASSIGN_OR_RETURN(std::unique_ptr<hsm::KeyStore> keys,
                           hsm::open_key_store(key_store, hsm::KeyPolicy::kCreateIfMissing));
  MEDGATE_ASSIGN_OR_RETURN(InitResult result, make_ledger(config, *keys, o.actor, o.join));
  keys.reset();
  result.config_written = false;
  result.pin_file = new_pin;
  const std::string db = config.ledger_path.string();
  MEDGATE_RETURN_IF_ERROR(
      give_to_data_dir_owner(dir, before,
                             {config.ledger_path, db + "-wal", db + "-shm", db + ".lock",
                              cluster_settings_path(config.data_dir)}));
  return result;
}

}  // namespace

Result<InitResult> initialize(const InitOptions& o) {
  if (o.existing_config) {
    if (!o.data_dir.empty() || o.config_out || o.socket)
      return Status::InvalidArgument(
          "with an existing config, init takes the data dir and the socket from it (no "
          "--data-dir, --socket or another config to write)");
    if (o.pin.kind != hsm::PinSource::Kind::kNone || !o.seal_pcrs.empty() ||
        o.key_store != "softhsm")
      return Status::InvalidArgument(
          "with an existing config, init takes the key store, its PIN and the sealing PCRs from "
          "its [key_store] section (no --key-store, --pin-file, --pin-env or --seal-pcrs)");
    return initialize_from_config(o);
  }
  if (o.data_dir.empty()) return Status::InvalidArgument("--data-dir is required");
  MEDGATE_ASSIGN_OR_RETURN(std::filesystem::path dir, make_data_dir(o.data_dir));
  const std::filesystem::path ledger_path = dir / "ledger.db";
  MEDGATE_RETURN_IF_ERROR(refuse_existing_ledger(dir, ledger_path));
  const std::set<std::filesystem::path> before = tree(dir);
  std::error_code ec;

  if (o.join && o.ledger_id.empty())
    return Status::InvalidArgument("joining a cluster needs --ledger-id: the id of its ledger");
  Config config;
  config.ledger_id = o.ledger_id.empty() ? host_name() : o.ledger_id;
  config.data_dir = dir;
  config.ledger_path = ledger_path;
  config.admin.socket = o.socket ? std::filesystem::absolute(*o.socket) : dir / "admin.sock";
  config.source = o.config_out ? std::filesystem::absolute(*o.config_out) : dir / "medgated.toml";
  if (std::filesystem::exists(config.source))
    return Status::FailedPrecondition(fmt::format(
        "{} exists already; refusing to overwrite it (to make the ledger it describes, run init "
        "with that config and without --data-dir)",
        config.source.string()));

  std::optional<std::filesystem::path> new_pin;
  if (o.key_store == "softhsm") {
    std::filesystem::path token_dir = dir / "softhsm";
    std::filesystem::create_directories(token_dir, ec);
    ::chmod(token_dir.c_str(), 0700);
    MEDGATE_ASSIGN_OR_RETURN(config.key_store,
                             hsm::create_softhsm_token(token_dir, "medgate", dir / "hsm-pin"));
    new_pin = dir / "hsm-pin";
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
  MEDGATE_ASSIGN_OR_RETURN(InitResult result, make_ledger(config, *keys, o.actor, o.join));
  keys.reset();
  MEDGATE_RETURN_IF_ERROR(write_file(config.source, render_config(config), 0640));
  result.config_written = true;
  result.pin_file = new_pin;
  MEDGATE_RETURN_IF_ERROR(give_to_data_dir_owner(dir, before, {}));
  return result;
}

}  // namespace medgate::appliance
