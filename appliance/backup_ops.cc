#include "appliance/backup_ops.h"

#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>

#include <cstring>
#include <map>
#include <memory>
#include <mutex>

#include <fmt/format.h>

#include "appliance/json_cbor.h"
#include "appliance/log.h"
#include "ledger/backup_file.h"
#include "ledger/entry.h"
#include "ledger/store.h"

namespace medgate::appliance {
namespace {

using nlohmann::json;

constexpr std::size_t kReadChunk = 1 << 20;  // 1.4 MB of base64 per answer
constexpr const char* kShelfPrefix = ".backup-";

struct Backup {
  std::filesystem::path dir;  // private (0700); the backup file is dir/backup
  uid_t owner = 0;            // only the admin who made it reads or finishes it
  std::uint64_t size = 0;
  std::chrono::steady_clock::time_point created;
};

// The backups made and not yet finished. Deletes them all when the daemon stops.
class BackupShelf {
 public:
  BackupShelf(const Config& config, ledger::Ledger& ledger) : config_(config), ledger_(ledger) {
    // Backups a crash left behind: nobody can finish them any more.
    std::error_code ec;
    for (const auto& e : std::filesystem::directory_iterator(config_.data_dir, ec))
      if (e.path().filename().string().starts_with(kShelfPrefix))
        std::filesystem::remove_all(e.path(), ec);
  }
  ~BackupShelf() {
    std::error_code ec;
    for (const auto& [id, b] : backups_) std::filesystem::remove_all(b.dir, ec);
  }

  Result<json> create(const Caller& caller) {
    drop_stale();
    ledger::Entry record;
    record.type = ledger::EntryType::kAdminAction;
    record.actor = caller.actor();
    using ledger::cbor::Value;
    MEDGATE_ASSIGN_OR_RETURN(Value no_args, Value::map({}));
    MEDGATE_ASSIGN_OR_RETURN(record.body,
                             Value::map({{Value::text("op"), Value::text("backup.create")},
                                         {Value::text("args"), std::move(no_args)}}));
    // Recorded first, so the backup holds the entry that says it was taken.
    MEDGATE_ASSIGN_OR_RETURN(std::uint64_t entry, ledger_.append(record));
    log(LogLevel::kNotice, "admin.action", "backup.create by {} recorded as entry {}",
        caller.actor(), entry);
    // A head over it, so the backup's latest signed head covers everything in it (a restore
    // names that head).
    MEDGATE_RETURN_IF_ERROR(ledger_.sign_head_now().status().with_context("signing a head"));

    std::string tmpl = (config_.data_dir / (std::string(kShelfPrefix) + "XXXXXX")).string();
    if (!::mkdtemp(tmpl.data()))
      return Status::IOError(fmt::format("cannot make a directory for the backup in {}: {}",
                                         config_.data_dir.string(), std::strerror(errno)));
    Backup b{tmpl, caller.uid, 0, std::chrono::steady_clock::now()};
    Status s = pack(b);
    if (!s.ok()) {
      std::error_code ec;
      std::filesystem::remove_all(b.dir, ec);
      log(LogLevel::kError, "backup.create", "backup by {} failed: {}", caller.actor(),
          s.message());
      return s;
    }
    ledger::LedgerStats stats = ledger_.stats();
    std::string id = b.dir.filename().string().substr(std::strlen(kShelfPrefix));
    {
      std::lock_guard lk(mu_);
      backups_[id] = b;
    }
    log(LogLevel::kInfo, "backup.create", "backup {} ({} bytes) ready for {}", id, b.size,
        caller.actor());
    return json{{"id", id},
                {"size", b.size},
                {"entry", entry},
                {"ledger_id", ledger_.ledger_id()},
                {"tree_size", stats.tree_size}};
  }

  Result<json> read(const Caller& caller, const json& args) {
    MEDGATE_ASSIGN_OR_RETURN(Backup b, find(caller, args));
    auto off = args.find("offset");
    if (off == args.end() || !off->is_number_unsigned())
      return Status::InvalidArgument("argument \"offset\" must be a non-negative integer");
    std::uint64_t offset = off->get<std::uint64_t>();
    if (offset > b.size)
      return Status::InvalidArgument(
          fmt::format("offset {} is past the backup's {} bytes", offset, b.size));
    std::size_t n = static_cast<std::size_t>(std::min<std::uint64_t>(kReadChunk, b.size - offset));
    Bytes buf(n);
    int fd = ::open((b.dir / "backup").c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return Status::IOError("the backup file is gone");
    ssize_t got = ::pread(fd, buf.data(), n, static_cast<off_t>(offset));
    ::close(fd);
    if (got != static_cast<ssize_t>(n)) return Status::IOError("cannot read the backup file");
    return json{{"data", to_base64(buf)}, {"offset", offset}, {"size", b.size}};
  }

  Result<json> finish(const Caller& caller, const json& args) {
    MEDGATE_ASSIGN_OR_RETURN(Backup b, find(caller, args));
    {
      std::lock_guard lk(mu_);
      backups_.erase(args["id"].get<std::string>());
    }
    std::error_code ec;
    std::filesystem::remove_all(b.dir, ec);
    return json{{"deleted", true}};
  }

 private:
  Status pack(Backup& b) {
    std::vector<ledger::BackupPart> parts;
    // Vault and registry before the ledger (backup_ops.h).
    for (const char* name : {"vault.db", "registry.db"}) {
      std::filesystem::path src = config_.data_dir / name;
      if (!std::filesystem::exists(src)) continue;
      MEDGATE_RETURN_IF_ERROR(ledger::snapshot_sqlite_file(src, b.dir / name));
      parts.push_back({name, b.dir / name});
    }
    MEDGATE_RETURN_IF_ERROR(ledger::snapshot_sqlite_file(config_.ledger_path, b.dir / "ledger.db"));
    parts.insert(parts.begin(), {"ledger.db", b.dir / "ledger.db"});
    if (!config_.source.empty() && std::filesystem::exists(config_.source))
      parts.push_back({"medgated.toml", config_.source});
    MEDGATE_RETURN_IF_ERROR(
        ledger::write_backup_file(b.dir / "backup", ledger_.ledger_id(), parts));
    for (const auto& p : parts)
      if (p.file.parent_path() == b.dir) std::filesystem::remove(p.file);
    b.size = std::filesystem::file_size(b.dir / "backup");
    return Status::Ok();
  }

  Result<Backup> find(const Caller& caller, const json& args) {
    auto id = args.find("id");
    if (id == args.end() || !id->is_string())
      return Status::InvalidArgument("argument \"id\" (the backup's id) is required");
    std::lock_guard lk(mu_);
    auto it = backups_.find(id->get<std::string>());
    if (it == backups_.end() || it->second.owner != caller.uid)
      return Status::NotFound(fmt::format("no backup {} of yours (finished, or older than {} min)",
                                          id->get<std::string>(), kBackupKeep.count()));
    return it->second;
  }

  void drop_stale() {
    std::lock_guard lk(mu_);
    auto now = std::chrono::steady_clock::now();
    for (auto it = backups_.begin(); it != backups_.end();) {
      if (now - it->second.created > kBackupKeep) {
        std::error_code ec;
        std::filesystem::remove_all(it->second.dir, ec);
        it = backups_.erase(it);
      } else {
        ++it;
      }
    }
  }

  const Config& config_;
  ledger::Ledger& ledger_;
  std::mutex mu_;
  std::map<std::string, Backup> backups_;
};

}  // namespace

std::vector<Operation> backup_operations(const Config& config, ledger::Ledger& ledger) {
  auto shelf = std::make_shared<BackupShelf>(config, ledger);
  return {
      {"backup.create", Role::kAdmin,
       [shelf](const Caller& c, const json&) -> Result<json> { return shelf->create(c); }},
      {"backup.read", Role::kAdmin,
       [shelf](const Caller& c, const json& args) -> Result<json> { return shelf->read(c, args); }},
      {"backup.finish", Role::kAdmin,
       [shelf](const Caller& c, const json& args) -> Result<json> {
         return shelf->finish(c, args);
       }},
  };
}

}  // namespace medgate::appliance
