// medctl backup | restore (README "Backup and restore", medctl(8)).
//
// backup, daemon running: the daemon records the backup on the ledger and takes consistent
// snapshots (appliance/backup_ops.h); medctl copies the file out over the admin socket in chunks
// and checks it (every part's SHA-256) before it says it is done. The admin role only.
// backup --data-dir D, daemon stopped: medctl takes the same snapshots itself, holding the
// ledger's lock so that medgated cannot start meanwhile (nothing is recorded: no key store here).
// restore: runs `medgated restore` (only medgated links the key-store backends, which restore
// needs to sign the head that makes the rollback visible; appliance/restore.h).
#include <fcntl.h>
#include <stdlib.h>
#include <sys/file.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <iostream>

#include <fmt/format.h>
#include <CLI/CLI.hpp>

#include "cli/commands.h"
#include "hsm/bytes.h"
#include "ledger/backup_file.h"
#include "ledger/sqlite.h"

namespace medgate::cli {
namespace {

using nlohmann::json;

constexpr const char* kPackagedConfig = "/etc/medgate/medgated.toml";

struct BackupArgs {
  std::string file;
  std::optional<std::string> data_dir;
};

struct RestoreArgs {
  std::string file;
  bool discard_newer = false;
};

void print_written(const GlobalOptions& g, const std::string& file, const ledger::BackupManifest& m,
                   const json& extra) {
  if (g.json) {
    json out = extra;
    out["file"] = file;
    out["size"] = m.file_size;
    out["ledger_id"] = m.ledger_id;
    out["created"] = m.created;
    out["parts"] = json::array();
    for (const auto& p : m.parts)
      out["parts"].push_back({{"name", p.name}, {"size", p.size}, {"sha256", p.sha256}});
    std::cout << out.dump(2) << "\n";
    return;
  }
  std::string parts;
  for (const auto& p : m.parts) parts += (parts.empty() ? "" : ", ") + p.name;
  std::cout << fmt::format("backup of ledger '{}' written to {} ({} bytes: {})\n", m.ledger_id,
                           file, m.file_size, parts);
  if (extra.contains("entry"))
    std::cout << fmt::format("recorded on the ledger as entry {}\n",
                             extra["entry"].get<std::uint64_t>());
  else
    std::cout << "taken offline: not recorded on the ledger\n";
}

int backup_online(const GlobalOptions& g, const BackupArgs& a) {
  const char* what = "medctl backup";
  if (std::filesystem::exists(a.file))
    return fail(g, Status::InvalidArgument(a.file + " exists already; refusing to overwrite it"),
                what);
  Result<json> made = call(g, "backup.create");
  if (!made.ok()) return fail(g, made.status(), what);
  const std::string id = (*made)["id"].get<std::string>();
  const std::uint64_t size = (*made)["size"].get<std::uint64_t>();
  auto finish = [&] { (void)call(g, "backup.finish", json{{"id", id}}); };

  int fd = ::open(a.file.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0) {
    finish();
    return fail(
        g,
        Status::InvalidArgument(fmt::format("cannot create {}: {}", a.file, std::strerror(errno))),
        what);
  }
  Status s;
  for (std::uint64_t offset = 0; s.ok() && offset < size;) {
    Result<json> chunk = call(g, "backup.read", json{{"id", id}, {"offset", offset}});
    if (!chunk.ok()) {
      s = chunk.status();
      break;
    }
    std::optional<Bytes> data = from_base64((*chunk)["data"].get<std::string>());
    if (!data || data->empty()) {
      s = Status::Internal("the daemon sent a malformed chunk");
      break;
    }
    const auto* p = reinterpret_cast<const char*>(data->data());
    std::size_t left = data->size();
    while (left > 0) {
      ssize_t n = ::write(fd, p, left);
      if (n < 0) {
        s = Status::IOError(fmt::format("cannot write {}: {}", a.file, std::strerror(errno)));
        break;
      }
      p += n;
      left -= static_cast<std::size_t>(n);
    }
    offset += data->size();
  }
  if (s.ok() && ::fsync(fd) != 0) s = Status::IOError(fmt::format("cannot fsync {}", a.file));
  ::close(fd);
  finish();
  if (!s.ok()) {
    std::filesystem::remove(a.file);
    return fail(g, s, what);
  }
  Result<ledger::BackupManifest> m = ledger::read_backup_file(a.file, std::nullopt);
  if (!m.ok()) {
    std::filesystem::remove(a.file);
    return fail(g, m.status().with_context("the copy does not check out"), what);
  }
  print_written(g, a.file, *m, json{{"entry", (*made)["entry"]}});
  return 0;
}

int backup_offline(const GlobalOptions& g, const BackupArgs& a) {
  const char* what = "medctl backup";
  const std::filesystem::path dir = *a.data_dir, db = dir / "ledger.db";
  if (!std::filesystem::exists(db))
    return fail(g, Status::InvalidArgument(fmt::format("no ledger at {}", db.string())), what);
  // The ledger's own lock: held by a running medgated, and held here so none starts meanwhile.
  const std::string lock_path = db.string() + ".lock";
  int lock = ::open(lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  if (lock < 0 || ::flock(lock, LOCK_EX | LOCK_NB) != 0) {
    if (lock >= 0) ::close(lock);
    return fail(g,
                Status::FailedPrecondition(fmt::format(
                    "{} is in use (medgated is running): run medctl backup without --data-dir "
                    "to have the daemon take it",
                    db.string())),
                what);
  }
  std::string tmpl = (std::filesystem::temp_directory_path() / "medctl-backup-XXXXXX").string();
  if (!::mkdtemp(tmpl.data())) {
    ::close(lock);
    return fail(g, Status::IOError("cannot make a temporary directory"), what);
  }
  const std::filesystem::path tmp = tmpl;
  auto run = [&]() -> Result<ledger::BackupManifest> {
    std::vector<ledger::BackupPart> parts;
    MEDGATE_RETURN_IF_ERROR(ledger::snapshot_sqlite_file(db, tmp / "ledger.db"));
    parts.push_back({"ledger.db", tmp / "ledger.db"});
    for (const char* name : {"vault.db", "registry.db"})
      if (std::filesystem::exists(dir / name)) {
        MEDGATE_RETURN_IF_ERROR(ledger::snapshot_sqlite_file(dir / name, tmp / name));
        parts.push_back({name, tmp / name});
      }
    if (std::filesystem::exists(dir / "medgated.toml"))
      parts.push_back({"medgated.toml", dir / "medgated.toml"});
    MEDGATE_ASSIGN_OR_RETURN(
        auto conn,
        ledger::sql::Database::open(tmp / "ledger.db", ledger::sql::Database::Mode::kReadOnly));
    MEDGATE_ASSIGN_OR_RETURN(auto st,
                             conn.prepare("SELECT value FROM meta WHERE key = 'ledger_id'"));
    MEDGATE_ASSIGN_OR_RETURN(auto step, st.step());
    if (step != ledger::sql::Statement::Step::kRow)
      return Status::Corruption(fmt::format("{} has no ledger id", db.string()));
    ByteView id = st.column_blob(0);
    MEDGATE_RETURN_IF_ERROR(ledger::write_backup_file(
        a.file, std::string(reinterpret_cast<const char*>(id.data()), id.size()), parts));
    return ledger::read_backup_file(a.file, std::nullopt);
  };
  Result<ledger::BackupManifest> m = run();
  ::close(lock);
  std::error_code ec;
  std::filesystem::remove_all(tmp, ec);
  if (!m.ok()) return fail(g, m.status(), what);
  print_written(g, a.file, *m, json::object());
  return 0;
}

int cmd_restore(const GlobalOptions& g, const RestoreArgs& a) {
  // Like init: medgated next to this medctl, else $MEDGATED, else PATH.
  std::string medgated = "medgated";
  std::error_code ec;
  auto self = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (const char* env = std::getenv("MEDGATED"); env && *env)
    medgated = env;
  else if (!ec && std::filesystem::exists(self.parent_path() / "medgated"))
    medgated = (self.parent_path() / "medgated").string();
  std::vector<std::string> args = {medgated, "restore", a.file, "--config",
                                   g.config.value_or(kPackagedConfig)};
  if (a.discard_newer) args.push_back("--discard-newer");
  if (g.json) args.push_back("--json");
  std::vector<char*> argv;
  for (auto& s : args) argv.push_back(s.data());
  argv.push_back(nullptr);
  ::execvp(argv[0], argv.data());
  return fail(g,
              Status::Unavailable(fmt::format("cannot run {}: {}", medgated, std::strerror(errno))),
              "medctl restore");
}

}  // namespace

void add_backup_commands(CLI::App& app, const GlobalOptions& g, int& rc) {
  auto backup_args = std::make_shared<BackupArgs>();
  auto* backup = app.add_subcommand(
      "backup",
      "a consistent backup (ledger, vault, device registry, config) in FILE (0600); recorded");
  backup->add_option("FILE", backup_args->file, "the backup file to write (must not exist)")
      ->required();
  backup->add_option("--data-dir", backup_args->data_dir,
                     "take it offline from this data dir (medgated stopped)");
  backup->callback([&g, &rc, backup_args] {
    rc = backup_args->data_dir ? backup_offline(g, *backup_args) : backup_online(g, *backup_args);
  });

  auto restore_args = std::make_shared<RestoreArgs>();
  auto* restore = app.add_subcommand(
      "restore",
      "restore a backup into the stopped appliance; the restore is recorded on the ledger");
  restore->add_option("FILE", restore_args->file, "a file written by medctl backup")->required();
  restore->add_flag("--discard-newer", restore_args->discard_newer,
                    "drop the current ledger's entries beyond the backup's (their number is "
                    "recorded)");
  restore->callback([&g, &rc, restore_args] { rc = cmd_restore(g, *restore_args); });
}

}  // namespace medgate::cli
