#include "ledger/backup_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/evp.h>

#include <algorithm>
#include <cstring>
#include <memory>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "ledger/entry.h"
#include "ledger/sqlite.h"

namespace medgate::ledger {
namespace {

constexpr std::size_t kChunk = 1 << 16;
// The manifest is a few hundred bytes; a limit keeps a damaged file from being read whole.
constexpr std::size_t kMaxManifest = 64 << 10;

// An fd closed on scope exit.
struct Fd {
  int fd = -1;
  explicit Fd(int f) : fd(f) {}
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
};

class Sha256 {
 public:
  Sha256() : ctx_(EVP_MD_CTX_new(), EVP_MD_CTX_free) {
    EVP_DigestInit_ex(ctx_.get(), EVP_sha256(), nullptr);
  }
  void update(const void* data, std::size_t n) { EVP_DigestUpdate(ctx_.get(), data, n); }
  std::string hex() {
    unsigned char out[EVP_MAX_MD_SIZE];
    unsigned int n = 0;
    EVP_DigestFinal_ex(ctx_.get(), out, &n);
    return to_hex(ByteView(reinterpret_cast<const std::byte*>(out), n));
  }

 private:
  std::unique_ptr<EVP_MD_CTX, void (*)(EVP_MD_CTX*)> ctx_;
};

Status write_all(int fd, const void* data, std::size_t n, const std::filesystem::path& path) {
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    ssize_t w = ::write(fd, p, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      return Status::IOError(
          fmt::format("cannot write {}: {}", path.string(), std::strerror(errno)));
    }
    p += w;
    n -= static_cast<std::size_t>(w);
  }
  return Status::Ok();
}

// Reads exactly n bytes unless the file ends first; returns how many were read.
Result<std::size_t> read_some(int fd, void* data, std::size_t n,
                              const std::filesystem::path& path) {
  std::size_t got = 0;
  char* p = static_cast<char*>(data);
  while (got < n) {
    ssize_t r = ::read(fd, p + got, n - got);
    if (r < 0) {
      if (errno == EINTR) continue;
      return Status::IOError(
          fmt::format("cannot read {}: {}", path.string(), std::strerror(errno)));
    }
    if (r == 0) break;
    got += static_cast<std::size_t>(r);
  }
  return got;
}

bool known_part(std::string_view name) {
  return std::find(std::begin(kBackupPartNames), std::end(kBackupPartNames), name) !=
         std::end(kBackupPartNames);
}

}  // namespace

const BackupManifest::Part* BackupManifest::find(std::string_view name) const {
  for (const Part& p : parts)
    if (p.name == name) return &p;
  return nullptr;
}

Status snapshot_sqlite_file(const std::filesystem::path& db, const std::filesystem::path& out) {
  if (std::filesystem::exists(out))
    return Status::FailedPrecondition(fmt::format("{} exists already", out.string()));
  MEDGATE_ASSIGN_OR_RETURN(sql::Database src,
                           sql::Database::open(db, sql::Database::Mode::kReadOnly));
  MEDGATE_ASSIGN_OR_RETURN(sql::Statement st, src.prepare("VACUUM INTO ?"));
  std::string target = out.string();
  MEDGATE_RETURN_IF_ERROR(st.bind(1, std::string_view(target))
                              .run()
                              .with_context(fmt::format("snapshot of {}", db.string())));
  ::chmod(out.c_str(), 0600);
  return Status::Ok();
}

Status write_backup_file(const std::filesystem::path& out, const std::string& ledger_id,
                         std::span<const BackupPart> parts) {
  if (std::none_of(parts.begin(), parts.end(),
                   [](const BackupPart& p) { return p.name == "ledger.db"; }))
    return Status::InvalidArgument("a backup needs the ledger (ledger.db)");
  nlohmann::json manifest = {{"ledger_id", ledger_id},
                             {"created", format_time(now_us())},
                             {"software", "medgate " MEDGATE_VERSION},
                             {"parts", nlohmann::json::array()}};
  for (const BackupPart& part : parts) {
    if (!known_part(part.name))
      return Status::InvalidArgument(fmt::format("\"{}\" is not a backup part", part.name));
    Fd in(::open(part.file.c_str(), O_RDONLY | O_CLOEXEC));
    if (in.fd < 0)
      return Status::IOError(
          fmt::format("cannot read {}: {}", part.file.string(), std::strerror(errno)));
    Sha256 sha;
    std::uint64_t size = 0;
    std::vector<char> buf(kChunk);
    for (;;) {
      MEDGATE_ASSIGN_OR_RETURN(std::size_t n, read_some(in.fd, buf.data(), buf.size(), part.file));
      if (n == 0) break;
      sha.update(buf.data(), n);
      size += n;
    }
    manifest["parts"].push_back({{"name", part.name}, {"size", size}, {"sha256", sha.hex()}});
  }
  Fd fd(::open(out.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600));
  if (fd.fd < 0) {
    if (errno == EEXIST)
      return Status::FailedPrecondition(
          fmt::format("{} exists already; refusing to overwrite it", out.string()));
    return Status::IOError(fmt::format("cannot create {}: {}", out.string(), std::strerror(errno)));
  }
  std::string head = std::string(kBackupMagic) + manifest.dump() + "\n";
  MEDGATE_RETURN_IF_ERROR(write_all(fd.fd, head.data(), head.size(), out));
  std::size_t i = 0;
  for (const BackupPart& part : parts) {
    Fd in(::open(part.file.c_str(), O_RDONLY | O_CLOEXEC));
    if (in.fd < 0)
      return Status::IOError(
          fmt::format("cannot read {}: {}", part.file.string(), std::strerror(errno)));
    std::vector<char> buf(kChunk);
    std::uint64_t copied = 0;
    for (;;) {
      MEDGATE_ASSIGN_OR_RETURN(std::size_t n, read_some(in.fd, buf.data(), buf.size(), part.file));
      if (n == 0) break;
      MEDGATE_RETURN_IF_ERROR(write_all(fd.fd, buf.data(), n, out));
      copied += n;
    }
    // The parts are snapshots nobody else writes; a change between the two passes is a bug.
    if (copied != manifest["parts"][i++]["size"].get<std::uint64_t>())
      return Status::Internal(fmt::format("{} changed while it was backed up", part.file.string()));
  }
  if (::fsync(fd.fd) != 0)
    return Status::IOError(fmt::format("cannot fsync {}: {}", out.string(), std::strerror(errno)));
  return Status::Ok();
}

Result<BackupManifest> read_backup_file(const std::filesystem::path& file,
                                        const std::optional<std::filesystem::path>& extract_to) {
  Fd fd(::open(file.c_str(), O_RDONLY | O_CLOEXEC));
  if (fd.fd < 0)
    return Status::NotFound(fmt::format("cannot read {}: {}", file.string(), std::strerror(errno)));
  struct stat st {};
  if (::fstat(fd.fd, &st) != 0 || !S_ISREG(st.st_mode))
    return Status::InvalidArgument(fmt::format("{} is not a regular file", file.string()));
  auto bad = [&](const std::string& why) {
    return Status::Corruption(
        fmt::format("{} is not a usable medgate backup: {}", file.string(), why));
  };

  std::string magic(kBackupMagic.size(), '\0');
  MEDGATE_ASSIGN_OR_RETURN(std::size_t n, read_some(fd.fd, magic.data(), magic.size(), file));
  if (n != magic.size() || magic != kBackupMagic)
    return bad("it does not start with \"medgate-backup 1\"");
  std::string line;
  for (;;) {
    char c = 0;
    MEDGATE_ASSIGN_OR_RETURN(n, read_some(fd.fd, &c, 1, file));
    if (n == 0) return bad("the manifest line is cut short");
    if (c == '\n') break;
    line.push_back(c);
    if (line.size() > kMaxManifest) return bad("the manifest line is too long");
  }
  BackupManifest m;
  std::uint64_t offset = kBackupMagic.size() + line.size() + 1;
  try {
    nlohmann::json j = nlohmann::json::parse(line);
    m.ledger_id = j.at("ledger_id").get<std::string>();
    m.created = j.at("created").get<std::string>();
    m.software = j.value("software", "");
    for (const auto& p : j.at("parts")) {
      BackupManifest::Part part{p.at("name").get<std::string>(), p.at("size").get<std::uint64_t>(),
                                p.at("sha256").get<std::string>()};
      if (!known_part(part.name)) return bad(fmt::format("unknown part \"{}\"", part.name));
      if (m.find(part.name)) return bad(fmt::format("part \"{}\" appears twice", part.name));
      m.parts.push_back(std::move(part));
    }
  } catch (const nlohmann::json::exception& e) {
    return bad(fmt::format("the manifest is malformed ({})", e.what()));
  }
  if (!m.find("ledger.db")) return bad("it holds no ledger");
  std::uint64_t total = offset;
  for (const auto& p : m.parts) total += p.size;
  m.file_size = static_cast<std::uint64_t>(st.st_size);
  if (total != m.file_size)
    return bad(
        fmt::format("the manifest accounts for {} bytes but the file has {} (truncated or "
                    "damaged)",
                    total, m.file_size));

  std::vector<char> buf(kChunk);
  for (const auto& p : m.parts) {
    std::optional<Fd> out;
    std::filesystem::path out_path;
    if (extract_to) {
      out_path = *extract_to / p.name;
      out.emplace(::open(out_path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600));
      if (out->fd < 0)
        return Status::IOError(
            fmt::format("cannot create {}: {}", out_path.string(), std::strerror(errno)));
    }
    Sha256 sha;
    std::uint64_t left = p.size;
    while (left > 0) {
      std::size_t want = static_cast<std::size_t>(std::min<std::uint64_t>(left, buf.size()));
      MEDGATE_ASSIGN_OR_RETURN(n, read_some(fd.fd, buf.data(), want, file));
      if (n != want) return bad(fmt::format("part \"{}\" is cut short", p.name));
      sha.update(buf.data(), n);
      if (out) MEDGATE_RETURN_IF_ERROR(write_all(out->fd, buf.data(), n, out_path));
      left -= n;
    }
    if (sha.hex() != p.sha256)
      return bad(fmt::format("part \"{}\" does not match its SHA-256 (damaged)", p.name));
    if (out && ::fsync(out->fd) != 0)
      return Status::IOError(fmt::format("cannot fsync {}", out_path.string()));
  }
  return m;
}

}  // namespace medgate::ledger
