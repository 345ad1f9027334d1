#include "appliance/restore.h"

#include <fcntl.h>
#include <stdlib.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <fstream>
#include <sstream>

#include <fmt/format.h>

#include "appliance/config.h"
#include "appliance/erasure.h"
#include "appliance/vault.h"
#include "hsm/key_store_factory.h"
#include "ledger/backup_file.h"
#include "ledger/sqlite.h"
#include "ledger/store.h"
#include "ledger/verifier.h"

namespace medgate::appliance {
namespace {

constexpr const char* kParts[] = {"ledger.db", "vault.db", "registry.db"};

// Holds `<ledger>.lock` (the lock medgated's Ledger takes) for the whole restore, so medgated
// cannot start half-way; names the process holding it otherwise.
class DaemonStopped {
 public:
  static Result<DaemonStopped> check(const std::filesystem::path& ledger_path) {
    std::filesystem::path path = ledger_path;
    path += ".lock";
    int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (fd < 0)
      return Status::IOError(
          fmt::format("cannot open {}: {}", path.string(), std::strerror(errno)));
    if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
      char buf[32] = {};
      ssize_t n = ::pread(fd, buf, sizeof buf - 1, 0);
      ::close(fd);
      std::string pid = n > 0 ? std::string(buf, static_cast<std::size_t>(n)) : "?";
      while (!pid.empty() && (pid.back() == '\n' || pid.back() == ' ')) pid.pop_back();
      return Status::FailedPrecondition(fmt::format(
          "medgated is running (process {} holds {}): stop it first (systemctl stop medgated); a "
          "backup is restored only into a stopped appliance",
          pid, ledger_path.string()));
    }
    return DaemonStopped(fd);
  }
  DaemonStopped(DaemonStopped&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  ~DaemonStopped() {
    if (fd_ >= 0) ::close(fd_);
  }

 private:
  explicit DaemonStopped(int fd) : fd_(fd) {}
  int fd_;
};

// A directory removed with everything in it on scope exit.
struct Staging {
  std::filesystem::path dir;
  ~Staging() {
    std::error_code ec;
    if (!dir.empty()) std::filesystem::remove_all(dir, ec);
  }
};

Result<std::uint64_t> entry_count(const std::filesystem::path& db) {
  MEDGATE_ASSIGN_OR_RETURN(auto conn,
                           ledger::sql::Database::open(db, ledger::sql::Database::Mode::kReadOnly));
  MEDGATE_ASSIGN_OR_RETURN(auto st, conn.prepare("SELECT count(*) FROM entries"));
  MEDGATE_ASSIGN_OR_RETURN(auto step, st.step());
  if (step != ledger::sql::Statement::Step::kRow)
    return Status::Corruption(fmt::format("{}: cannot count its entries", db.string()));
  return st.column_uint(0);
}

// Patients the current vault has erased (or begun to): an older vault still holds their keys.
Result<std::vector<Pseudonym>> erased_patients(const std::filesystem::path& vault) {
  std::vector<Pseudonym> out;
  if (!std::filesystem::exists(vault)) return out;
  MEDGATE_ASSIGN_OR_RETURN(
      auto conn, ledger::sql::Database::open(vault, ledger::sql::Database::Mode::kReadOnly));
  MEDGATE_ASSIGN_OR_RETURN(auto st,
                           conn.prepare("SELECT pseudonym FROM patients WHERE state <> 0"));
  for (;;) {
    MEDGATE_ASSIGN_OR_RETURN(auto step, st.step());
    if (step != ledger::sql::Statement::Step::kRow) break;
    ByteView b = st.column_blob(0);
    if (b.size() != 32)
      return Status::Corruption(fmt::format("{}: a malformed pseudonym", vault.string()));
    Pseudonym p;
    std::copy(b.begin(), b.end(), p.bytes.begin());
    out.push_back(p);
  }
  return out;
}

std::string read_text(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

// Renames `from` to `to` with SQLite's side files (-wal, -shm) along, replacing what is there.
Status move_db(const std::filesystem::path& from, const std::filesystem::path& to) {
  for (const char* suffix : {"", "-wal", "-shm"}) {
    std::filesystem::path f = from.string() + suffix, t = to.string() + suffix;
    std::error_code ec;
    if (!std::filesystem::exists(f)) {
      std::filesystem::remove(t, ec);  // a stale side file must not meet the new database
      continue;
    }
    std::filesystem::rename(f, t, ec);
    if (ec)
      return Status::IOError(
          fmt::format("cannot move {} to {}: {}", f.string(), t.string(), ec.message()));
  }
  return Status::Ok();
}

}  // namespace

Result<RestoreResult> restore_backup(const RestoreOptions& o) {
  MEDGATE_ASSIGN_OR_RETURN(Config config, load_config(o.config));
  MEDGATE_ASSIGN_OR_RETURN(DaemonStopped stopped, DaemonStopped::check(config.ledger_path));

  // The files are moved into place by rename: the ledger's directory and the data dir must be on
  // one file system, or a restore could stop with the ledger moved and the vault not.
  struct stat ledger_dir {
  }, data_dir_st{};
  if (::stat(config.ledger_path.parent_path().c_str(), &ledger_dir) != 0 ||
      ::stat(config.data_dir.c_str(), &data_dir_st) != 0)
    return Status::FailedPrecondition(fmt::format("{} or {} does not exist",
                                                  config.ledger_path.parent_path().string(),
                                                  config.data_dir.string()));
  if (ledger_dir.st_dev != data_dir_st.st_dev)
    return Status::FailedPrecondition(fmt::format(
        "the ledger ({}) and the data dir ({}) are on different file systems; restore cannot "
        "replace them together",
        config.ledger_path.string(), config.data_dir.string()));

  // 1. The file's integrity, unpacked into a private directory beside the ledger (so that the
  //    final renames stay on one file system).
  std::string tmpl = (config.ledger_path.parent_path() / ".restore-XXXXXX").string();
  if (!::mkdtemp(tmpl.data()))
    return Status::IOError(fmt::format("cannot make a staging directory in {}: {}",
                                       config.ledger_path.parent_path().string(),
                                       std::strerror(errno)));
  Staging staging{tmpl};
  MEDGATE_ASSIGN_OR_RETURN(ledger::BackupManifest manifest,
                           ledger::read_backup_file(o.backup, staging.dir));
  if (manifest.ledger_id != config.ledger_id)
    return Status::FailedPrecondition(
        fmt::format("the backup holds ledger '{}', but this appliance's is '{}' ({})",
                    manifest.ledger_id, config.ledger_id, o.config.string()));

  // 2. The ledger in it is genuine and this box's: verified offline with the key store's keys as
  //    the only trusted ones, the same verifier `medctl ledger verify` runs.
  MEDGATE_ASSIGN_OR_RETURN(std::unique_ptr<hsm::KeyStore> keys,
                           hsm::open_key_store(config.key_store));
  const std::filesystem::path staged = staging.dir / "ledger.db";
  ledger::VerifyOptions verify;
  verify.trusted_keys = keys->signing_keys();
  Result<ledger::VerifyReport> report = ledger::verify_ledger_file(staged, verify);
  if (!report.ok()) return report.status().with_context("the backup's ledger cannot be read");
  if (!report->ok())
    return Status::VerificationFailed(
        fmt::format("the backup's ledger does not verify against this key store's keys ({}): {}",
                    keys->description(), report->problem->describe()));
  if (report->ledger_id != config.ledger_id)
    return Status::FailedPrecondition(
        fmt::format("the backup's ledger is '{}', not this appliance's '{}'", report->ledger_id,
                    config.ledger_id));

  // 3. What the restore would discard.
  RestoreResult result;
  result.ledger_id = report->ledger_id;
  result.backup_created = manifest.created;
  result.backup_entries = report->entries;
  if (std::filesystem::exists(config.ledger_path)) {
    MEDGATE_ASSIGN_OR_RETURN(result.replaced_entries, entry_count(config.ledger_path));
    if (result.replaced_entries > report->entries) {
      result.discarded_entries = result.replaced_entries - report->entries;
      if (!o.discard_newer)
        return Status::FailedPrecondition(fmt::format(
            "the current ledger holds {} entries, {} more than the backup's {}: restoring would "
            "discard them; give --discard-newer to do so (the restore entry records how many)",
            result.replaced_entries, result.discarded_entries, report->entries));
    }
  }

  // 4. The restore on the restored ledger itself, before anything else can be appended to it.
  {
    ledger::LedgerOptions options;
    options.path = staged;
    options.head_interval = std::chrono::milliseconds(0);
    options.counter_interval = std::chrono::seconds(0);
    options.restore = ledger::RestoreRecord{o.actor, o.backup.filename().string(),
                                            result.replaced_entries, result.discarded_entries};
    // Read before anything moves: the erasures the replaced vault knows of.
    MEDGATE_ASSIGN_OR_RETURN(std::vector<Pseudonym> erased,
                             erased_patients(config.data_dir / "vault.db"));
    MEDGATE_ASSIGN_OR_RETURN(std::unique_ptr<ledger::Ledger> restored,
                             ledger::Ledger::open(options, *keys));
    ledger::LedgerStats s = restored->stats();
    result.restore_entry = s.restore_entry.value_or(0);
    // Erasure is final (appliance/vault.h): a patient erased after the backup was taken is erased
    // again in the restored vault, with the same protocol and a new patient-erasure entry on the
    // restored ledger, before the vault goes back into use.
    if (!erased.empty() && std::filesystem::exists(staging.dir / "vault.db")) {
      MEDGATE_ASSIGN_OR_RETURN(std::unique_ptr<Vault> vault,
                               Vault::open(staging.dir / "vault.db", *keys, /*must_exist=*/true));
      for (const Pseudonym& p : erased) {
        Result<PatientInfo> info = vault->info(p);
        if (!info.ok() || info->state != PatientState::kActive) continue;
        MEDGATE_RETURN_IF_ERROR(
            vault
                ->begin_erase(
                    p, ErasureRequest{o.actor, "erased after the backup; erased again on restore",
                                      restored->stats().tree_size})
                .status());
        ++result.erasures_reapplied;
      }
      PatientErasure erasure(*vault, *restored);
      MEDGATE_RETURN_IF_ERROR(erasure.finish_pending().status().with_context(
          "re-applying erasures to the restored vault"));
    }
    restored->close();
    s = restored->stats();
    result.entries = s.tree_size;
    result.key_store_counter = s.device_counter;
  }
  result.backup_rollback_counter = report->rollback_counter;
  std::filesystem::remove(staged.string() + ".lock");
  std::filesystem::remove((staging.dir / "vault.db").string() + ".lock");

  // 5. Into place; what was there is kept beside.
  const std::filesystem::path data_dir = config.ledger_path.parent_path();
  struct stat owner {};
  const bool chown_needed =
      ::geteuid() == 0 && ::stat(data_dir.c_str(), &owner) == 0 && owner.st_uid != 0;
  for (const char* name : kParts) {
    std::filesystem::path from = staging.dir / name;
    if (!std::filesystem::exists(from)) continue;
    std::filesystem::path to =
        std::string(name) == "ledger.db" ? config.ledger_path : config.data_dir / name;
    if (std::filesystem::exists(to))
      MEDGATE_RETURN_IF_ERROR(move_db(to, to.string() + ".before-restore"));
    if (chown_needed && ::chown(from.c_str(), owner.st_uid, owner.st_gid) != 0)
      return Status::IOError(fmt::format("cannot give {} to the data dir's owner", from.string()));
    MEDGATE_RETURN_IF_ERROR(move_db(from, to));
  }
  if (std::filesystem::exists(staging.dir / "medgated.toml") &&
      read_text(staging.dir / "medgated.toml") != read_text(o.config)) {
    std::filesystem::path beside = o.config.parent_path() / "medgated.toml.from-backup";
    std::error_code ec;
    std::filesystem::rename(staging.dir / "medgated.toml", beside, ec);
  }
  if (int fd = ::open(data_dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC); fd >= 0) {
    ::fsync(fd);
    ::close(fd);
  }
  return result;
}

}  // namespace medgate::appliance
