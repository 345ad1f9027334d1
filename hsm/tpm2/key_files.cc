#include "hsm/tpm2/key_files.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <string>
#include <utility>

namespace medgate::hsm::tpm2 {
namespace {

class Fd {
 public:
  explicit Fd(int fd) : fd_(fd) {}
  ~Fd() {
    if (fd_ >= 0) ::close(fd_);
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  int get() const { return fd_; }
  int release() { return std::exchange(fd_, -1); }

 private:
  int fd_;
};

Status io_error(const std::string& what, const std::filesystem::path& path, int err) {
  return Status::IOError("cannot " + what + " " + path.string() + ": " + std::strerror(err));
}

}  // namespace

Status write_file_atomically(const std::filesystem::path& path, ByteView bytes) {
  std::filesystem::path temp = path;
  temp += ".tmp";
  {
    Fd fd(::open(temp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0600));
    if (fd.get() < 0) return io_error("create", temp, errno);
    ::fchmod(fd.get(), 0600);  // O_CREAT leaves an existing temp file's mode alone
    std::size_t done = 0;
    while (done < bytes.size()) {
      ssize_t n = ::write(fd.get(), bytes.data() + done, bytes.size() - done);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) {
        int err = n < 0 ? errno : EIO;
        ::unlink(temp.c_str());
        return io_error("write", temp, err);
      }
      done += static_cast<std::size_t>(n);
    }
    if (::fsync(fd.get()) != 0) {
      int err = errno;
      ::unlink(temp.c_str());
      return io_error("fsync", temp, err);
    }
    int raw = fd.release();
    if (::close(raw) != 0) {
      int err = errno;
      ::unlink(temp.c_str());
      return io_error("close", temp, err);
    }
  }
  if (::rename(temp.c_str(), path.c_str()) != 0) {
    int err = errno;
    ::unlink(temp.c_str());
    return io_error("rename " + temp.string() + " to", path, err);
  }
  std::filesystem::path dir = path.parent_path().empty() ? "." : path.parent_path();
  Fd dir_fd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (dir_fd.get() < 0 || ::fsync(dir_fd.get()) != 0)
    return io_error("fsync directory", dir, errno);
  return Status::Ok();
}

Result<Bytes> read_small_file(const std::filesystem::path& path, std::size_t max_bytes) {
  Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW));
  if (fd.get() < 0) {
    if (errno == ENOENT) return Status::NotFound(path.string() + " does not exist");
    return io_error("open", path, errno);
  }
  Bytes out;
  std::byte buffer[4096];
  for (;;) {
    ssize_t n = ::read(fd.get(), buffer, sizeof buffer);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return io_error("read", path, errno);
    if (n == 0) break;
    out.insert(out.end(), buffer, buffer + n);
    if (out.size() > max_bytes)
      return Status::Corruption(path.string() + " is larger than " + std::to_string(max_bytes) +
                                " bytes; it is not a medgate TPM file");
  }
  return out;
}

}  // namespace medgate::hsm::tpm2
