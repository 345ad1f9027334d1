#include "hsm/pkcs11/softhsm_token.h"

#include <fcntl.h>
#include <openssl/rand.h>
#include <sys/stat.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <cstring>
#include <fstream>

#include "hsm/bytes.h"
#include "hsm/pkcs11/module.h"

namespace medgate::hsm::pkcs11 {
namespace {

constexpr std::size_t kPinLength = 16;  // 62^16: about 95 bits

bool valid_label(const std::string& label) {
  if (label.empty() || label.size() > 32) return false;
  for (char c : label) {
    bool ok = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
              c == '.' || c == '_' || c == '-';
    if (!ok) return false;
  }
  return true;
}

// Wipes a secret string on every way out of the scope.
class WipeOnExit {
 public:
  explicit WipeOnExit(std::string& secret) : secret_(secret) {}
  ~WipeOnExit() { secure_wipe(secret_); }
  WipeOnExit(const WipeOnExit&) = delete;
  WipeOnExit& operator=(const WipeOnExit&) = delete;

 private:
  std::string& secret_;
};

// Fills `pin` (capacity reserved up front, so no copy is left behind by a reallocation) with
// kPinLength alphanumeric characters, by rejection sampling so that each is uniform.
Status random_pin(std::string& pin) {
  static constexpr std::string_view kAlphabet =
      "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
  pin.clear();
  pin.reserve(kPinLength);
  std::array<unsigned char, 32> buffer{};
  while (pin.size() < kPinLength) {
    if (RAND_bytes(buffer.data(), buffer.size()) != 1)
      return Status::Internal("OpenSSL RAND_bytes failed");
    for (unsigned char b : buffer)
      if (b < 248 && pin.size() < kPinLength) pin += kAlphabet[b % kAlphabet.size()];  // 248 = 4*62
  }
  secure_wipe(std::as_writable_bytes(std::span(buffer)));
  return Status::Ok();
}

// The PIN file, created exclusively before the token so that an existing file stops us early;
// removed again unless keep() is called.
class PinFile {
 public:
  static Result<PinFile> create(const std::filesystem::path& path) {
    int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd < 0 && errno == EEXIST)
      return Status::InvalidArgument("PIN file " + path.string() +
                                     " already exists; remove it or choose another path");
    if (fd < 0)
      return Status::IOError("cannot create PIN file " + path.string() + ": " +
                             std::strerror(errno));
    return PinFile(path, fd);
  }
  PinFile(PinFile&& other) noexcept : path_(std::move(other.path_)), fd_(other.fd_) {
    other.fd_ = -1;
  }
  PinFile& operator=(PinFile&&) = delete;
  ~PinFile() {
    if (fd_ < 0) return;
    ::close(fd_);
    ::unlink(path_.c_str());
  }

  Status write_and_keep(const std::string& pin) {
    std::string line = pin + "\n";
    WipeOnExit wipe(line);
    std::size_t done = 0;
    while (done < line.size()) {
      ssize_t n = ::write(fd_, line.data() + done, line.size() - done);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0)
        return Status::IOError("cannot write PIN file " + path_.string() + ": " +
                               std::strerror(errno));
      done += static_cast<std::size_t>(n);
    }
    if (::fsync(fd_) != 0 || ::close(fd_) != 0) {
      fd_ = -1;
      ::unlink(path_.c_str());
      return Status::IOError("cannot write PIN file " + path_.string() + ": " +
                             std::strerror(errno));
    }
    fd_ = -1;
    return Status::Ok();
  }

 private:
  PinFile(std::filesystem::path path, int fd) : path_(std::move(path)), fd_(fd) {}
  std::filesystem::path path_;
  int fd_;
};

Status write_softhsm_conf(const std::filesystem::path& conf, const std::filesystem::path& tokens) {
  if (::mkdir(tokens.c_str(), 0700) != 0 && errno != EEXIST)
    return Status::IOError("cannot create " + tokens.string() + ": " + std::strerror(errno));
  std::error_code ec;
  if (!std::filesystem::is_directory(tokens, ec))
    return Status::InvalidArgument(tokens.string() + " exists and is not a directory");
  std::filesystem::permissions(tokens, std::filesystem::perms::owner_all,
                               std::filesystem::perm_options::replace, ec);
  if (ec) return Status::IOError("cannot chmod 700 " + tokens.string() + ": " + ec.message());

  std::ofstream out(conf, std::ios::trunc);
  out << "# SoftHSM configuration written by medgate (create_softhsm_token).\n"
      << "directories.tokendir = " << tokens.string() << "\n"
      << "objectstore.backend = file\n"
      << "log.level = ERROR\n"
      << "slots.removable = false\n";
  out.close();
  if (!out) return Status::IOError("cannot write " + conf.string());
  return Status::Ok();
}

struct Slots {
  std::optional<CK_SLOT_ID> free;      // SoftHSM always offers one uninitialised token
  std::optional<CK_SLOT_ID> labelled;  // the initialised token with our label
};

Result<Slots> scan_slots(const Pkcs11Module& module, const std::string& label) {
  MEDGATE_ASSIGN_OR_RETURN(std::vector<CK_SLOT_ID> slots, slots_with_token(module));
  Slots result;
  for (CK_SLOT_ID slot : slots) {
    CK_TOKEN_INFO info{};
    if (module.fn()->C_GetTokenInfo(slot, &info) != CKR_OK) continue;
    if ((info.flags & CKF_TOKEN_INITIALIZED) == 0) {
      if (!result.free) result.free = slot;
    } else if (trim_field(info.label, sizeof info.label) == label) {
      result.labelled = slot;
    }
  }
  return result;
}

Status init_token(const Pkcs11Module& module, const std::string& label, std::string& so_pin,
                  std::string& user_pin, const std::filesystem::path& tokens) {
  MEDGATE_ASSIGN_OR_RETURN(Slots before, scan_slots(module, label));
  if (before.labelled)
    return Status::FailedPrecondition("a token labelled " + label + " already exists in " +
                                      tokens.string());
  if (!before.free) return Status::Unavailable("SoftHSM offers no free slot for a new token");

  std::array<CK_UTF8CHAR, 32> padded_label;
  padded_label.fill(' ');
  std::memcpy(padded_label.data(), label.data(), label.size());
  auto* so = reinterpret_cast<CK_UTF8CHAR*>(so_pin.data());
  CK_RV rv = module.fn()->C_InitToken(*before.free, so, so_pin.size(), padded_label.data());
  if (rv != CKR_OK)
    return Status::Unavailable("C_InitToken for " + label + " failed: " + ckr_name(rv));

  // SoftHSM moves an initialised token to a new slot id (derived from its serial): look again.
  MEDGATE_ASSIGN_OR_RETURN(Slots after, scan_slots(module, label));
  if (!after.labelled)
    return Status::Unavailable("the token " + label + " is not visible after C_InitToken");
  MEDGATE_ASSIGN_OR_RETURN(Session session, Session::open(module, *after.labelled));
  rv = module.fn()->C_Login(session.handle(), CKU_SO, so, so_pin.size());
  if (rv != CKR_OK)
    return Status::Unavailable("SO login on the new token " + label + " failed: " + ckr_name(rv));
  rv = module.fn()->C_InitPIN(session.handle(), reinterpret_cast<CK_UTF8CHAR*>(user_pin.data()),
                              user_pin.size());
  module.fn()->C_Logout(session.handle());
  if (rv != CKR_OK)
    return Status::Unavailable("C_InitPIN on the new token " + label + " failed: " + ckr_name(rv));
  return Status::Ok();
}

}  // namespace

Result<KeyStoreConfig> provision_softhsm_token(const std::filesystem::path& dir,
                                               const std::string& label,
                                               const std::filesystem::path& pin_file) {
  if (!valid_label(label))
    return Status::InvalidArgument("token label '" + label +
                                   "' must be 1 to 32 characters of A-Z a-z 0-9 . _ -");
  std::error_code ec;
  const std::filesystem::path root = std::filesystem::absolute(dir, ec);
  if (ec) return Status::InvalidArgument("bad directory " + dir.string() + ": " + ec.message());
  const std::filesystem::path pin_path = std::filesystem::absolute(pin_file, ec);
  if (ec) return Status::InvalidArgument("bad PIN file " + pin_file.string() + ": " + ec.message());
  const std::filesystem::path conf = root / "softhsm2.conf";
  const std::filesystem::path tokens = root / "tokens";

  MEDGATE_ASSIGN_OR_RETURN(PinFile pin_out, PinFile::create(pin_path));
  std::filesystem::create_directories(root, ec);
  if (ec) return Status::IOError("cannot create " + root.string() + ": " + ec.message());
  MEDGATE_RETURN_IF_ERROR(write_softhsm_conf(conf, tokens));

  // The SO PIN is used once, here, and not kept anywhere: nobody can reset the user PIN later.
  // The recovery path for a lost user PIN is re-initialising the token (and a new signing key).
  std::string so_pin;
  std::string user_pin;
  WipeOnExit wipe_so(so_pin);
  WipeOnExit wipe_user(user_pin);
  MEDGATE_RETURN_IF_ERROR(random_pin(so_pin));
  MEDGATE_RETURN_IF_ERROR(random_pin(user_pin));
  {
    MEDGATE_ASSIGN_OR_RETURN(std::shared_ptr<Pkcs11Module> module,
                             Pkcs11Module::acquire(std::string(kSoftHsmModule), conf));
    MEDGATE_RETURN_IF_ERROR(init_token(*module, label, so_pin, user_pin, tokens));
  }
  MEDGATE_RETURN_IF_ERROR(pin_out.write_and_keep(user_pin));

  KeyStoreConfig config;
  config.uri = "pkcs11:token=" + label +
               ";object=medgate-signing?module-path=" + std::string(kSoftHsmModule);
  config.pin = PinSource{PinSource::Kind::kFile, pin_path.string()};
  config.softhsm_conf = conf;
  return config;
}

}  // namespace medgate::hsm::pkcs11
