#include "hsm/pin.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>

namespace medgate::hsm {

std::string PinSource::describe() const {
  switch (kind) {
    case Kind::kNone:
      return "no PIN source";
    case Kind::kFile:
      return "PIN file " + name;
    case Kind::kEnv:
      return "environment variable " + name;
    case Kind::kCredential:
      return "systemd credential " + name;
  }
  return "?";
}

static Result<std::string> read_secret_file(const std::string& path, bool check_mode) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
  if (fd < 0)
    return Status::InvalidArgument("cannot open PIN file " + path + ": " + std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    return Status::InvalidArgument("PIN file " + path + " is not a regular file");
  }
  if (check_mode && (st.st_mode & (S_IRWXG | S_IRWXO)) != 0) {
    ::close(fd);
    char mode[8];
    std::snprintf(mode, sizeof mode, "%04o", static_cast<unsigned>(st.st_mode & 07777));
    return Status::InvalidArgument("PIN file " + path + " may be read by others (mode " + mode +
                                   "); make it 0600 (chmod 600 " + path + ")");
  }
  if (st.st_size > 4096) {
    ::close(fd);
    return Status::InvalidArgument("PIN file " + path + " is larger than 4096 bytes");
  }
  std::string pin(static_cast<std::size_t>(st.st_size), '\0');
  ssize_t n = ::read(fd, pin.data(), pin.size());
  ::close(fd);
  if (n < 0) return Status::IOError("cannot read PIN file " + path + ": " + std::strerror(errno));
  pin.resize(static_cast<std::size_t>(n));
  if (!pin.empty() && pin.back() == '\n') pin.pop_back();
  if (!pin.empty() && pin.back() == '\r') pin.pop_back();
  if (pin.empty()) return Status::InvalidArgument("PIN file " + path + " is empty");
  return pin;
}

Result<std::string> read_pin(const PinSource& source) {
  switch (source.kind) {
    case PinSource::Kind::kNone:
      return Status::InvalidArgument(
          "no PIN source configured (pin_file, pin_env or pin_credential)");
    case PinSource::Kind::kFile:
      return read_secret_file(source.name, /*check_mode=*/true);
    case PinSource::Kind::kEnv: {
      const char* v = std::getenv(source.name.c_str());
      if (!v || !*v)
        return Status::InvalidArgument("environment variable " + source.name +
                                       " is not set or empty");
      return std::string(v);
    }
    case PinSource::Kind::kCredential: {
      const char* dir = std::getenv("CREDENTIALS_DIRECTORY");
      if (!dir || !*dir)
        return Status::InvalidArgument("PIN credential '" + source.name +
                                       "' requested but $CREDENTIALS_DIRECTORY is not set (use "
                                       "LoadCredential= in the unit)");
      if (source.name.find('/') != std::string::npos)
        return Status::InvalidArgument("credential name '" + source.name + "' contains '/'");
      // systemd makes credential files 0400 owned by the service user: no mode check needed.
      return read_secret_file(std::string(dir) + "/" + source.name, /*check_mode=*/false);
    }
  }
  return Status::Internal("unknown PIN source");
}

}  // namespace medgate::hsm
