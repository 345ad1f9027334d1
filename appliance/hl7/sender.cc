#include "appliance/hl7/sender.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <thread>

#include <fmt/format.h>

#include "appliance/hl7/message.h"
#include "appliance/hl7/tls.h"

namespace medgate::appliance::hl7 {
namespace {

// Bytes outside any frame: line noise, a telnet probe. No 0x0B, so it cannot start a frame.
constexpr std::string_view kJunk = "\r\nGET / HTTP/1.0\r\n\x1c\r\x7f\r\n";

}  // namespace

Result<AckSummary> summarize_ack(std::string_view ack) {
  Result<Message> message = parse_message(ack);
  if (!message.ok()) return message.status();
  const Segment* msa = message->find("MSA");
  if (msa == nullptr) return Status::InvalidArgument("the answer has no MSA segment");
  AckSummary summary;
  summary.code = msa->get(1, 1, 1, 1);
  summary.control_id = msa->get(2, 1, 1, 1);
  std::string text = msa->get(3, 1, 1, 1);
  if (const Segment* err = message->find("ERR"); err != nullptr) {
    std::string detail = err->get(8, 1, 1, 1);
    if (detail.empty()) detail = err->get(3, 1, 2, 1);
    if (!detail.empty() && detail != text) text = text.empty() ? detail : text + "; " + detail;
  }
  summary.text = std::move(text);
  return summary;
}

std::vector<std::string> split_messages(std::string_view file_text) {
  std::vector<std::string> messages;
  std::string current;
  std::size_t i = 0;
  while (i <= file_text.size()) {
    std::size_t end = file_text.find_first_of("\r\n", i);
    if (end == std::string_view::npos) end = file_text.size();
    std::string_view line = file_text.substr(i, end - i);
    if (line.find_first_not_of(" \t") == std::string_view::npos) {
      if (!current.empty()) messages.push_back(std::exchange(current, {}));
    } else {
      current.append(line);
      current.push_back('\r');
    }
    if (end == file_text.size()) break;
    // CRLF is one line end.
    i = end + ((file_text[end] == '\r' && end + 1 < file_text.size() && file_text[end + 1] == '\n')
                   ? 2
                   : 1);
  }
  if (!current.empty()) messages.push_back(std::move(current));
  return messages;
}

MllpSender::~MllpSender() {
  if (ssl_ != nullptr) {
    SSL_shutdown(ssl_);  // close_notify; the listener does not wait for it
    SSL_free(ssl_);
  }
  SSL_CTX_free(tls_ctx_);
  if (fd_ >= 0) ::close(fd_);
}

Status MllpSender::start_tls() {
  if (options_.ca_file.empty())
    return Status::InvalidArgument(
        "--tls needs --ca FILE, the CA that issued the listener's "
        "certificate (or the listener's self-signed certificate)");
  if (options_.cert_file.empty() != options_.key_file.empty())
    return Status::InvalidArgument("a client certificate needs both --cert FILE and --key FILE");
  ERR_clear_error();
  tls_ctx_ = SSL_CTX_new(TLS_client_method());
  if (tls_ctx_ == nullptr) return Status::Internal("SSL_CTX_new: " + tls_errors());
  SSL_CTX_set_min_proto_version(tls_ctx_, TLS1_2_VERSION);
  if (SSL_CTX_load_verify_locations(tls_ctx_, options_.ca_file.c_str(), nullptr) != 1)
    return Status::InvalidArgument(
        fmt::format("--ca {}: not readable PEM certificates: {}", options_.ca_file, tls_errors()));
  SSL_CTX_set_verify(tls_ctx_, SSL_VERIFY_PEER, nullptr);
  if (!options_.cert_file.empty()) {
    if (SSL_CTX_use_certificate_chain_file(tls_ctx_, options_.cert_file.c_str()) != 1)
      return Status::InvalidArgument(fmt::format("--cert {}: not a readable PEM certificate: {}",
                                                 options_.cert_file, tls_errors()));
    if (SSL_CTX_use_PrivateKey_file(tls_ctx_, options_.key_file.c_str(), SSL_FILETYPE_PEM) != 1)
      return Status::InvalidArgument(fmt::format("--key {}: not a readable PEM private key: {}",
                                                 options_.key_file, tls_errors()));
    if (SSL_CTX_check_private_key(tls_ctx_) != 1)
      return Status::InvalidArgument(fmt::format("--key {} is not the key of --cert {}",
                                                 options_.key_file, options_.cert_file));
  }
  ssl_ = SSL_new(tls_ctx_);
  if (ssl_ == nullptr || SSL_set_fd(ssl_, fd_) != 1)
    return Status::Internal("SSL_new: " + tls_errors());
  // The certificate must name the host connected to: its IP address, or its DNS name (also sent
  // as SNI).
  unsigned char addr[16];
  X509_VERIFY_PARAM* param = SSL_get0_param(ssl_);
  if (::inet_pton(AF_INET, options_.host.c_str(), addr) == 1 ||
      ::inet_pton(AF_INET6, options_.host.c_str(), addr) == 1) {
    X509_VERIFY_PARAM_set1_ip_asc(param, options_.host.c_str());
  } else {
    X509_VERIFY_PARAM_set1_host(param, options_.host.c_str(), 0);
    // SSL_set_tlsext_host_name, without its C cast.
    SSL_ctrl(ssl_, SSL_CTRL_SET_TLSEXT_HOSTNAME, TLSEXT_NAMETYPE_host_name,
             const_cast<char*>(options_.host.c_str()));
  }
  // The handshake is blocking; a listener that never answers must not hang the tool.
  timeval tv{};
  tv.tv_sec = static_cast<time_t>(options_.ack_timeout.count() / 1000);
  tv.tv_usec = static_cast<suseconds_t>((options_.ack_timeout.count() % 1000) * 1000);
  ::setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  if (SSL_connect(ssl_) != 1) {
    long verify = SSL_get_verify_result(ssl_);
    std::string why = verify != X509_V_OK
                          ? std::string("the listener's certificate does not verify: ") +
                                X509_verify_cert_error_string(verify)
                          : tls_errors();
    return Status::Unavailable(
        fmt::format("TLS handshake with {} port {} failed: {}", options_.host, options_.port, why));
  }
  timeval none{};
  ::setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &none, sizeof none);
  return Status::Ok();
}

Status MllpSender::connect() {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* found = nullptr;
  std::string service = std::to_string(options_.port);
  if (int rc = ::getaddrinfo(options_.host.c_str(), service.c_str(), &hints, &found); rc != 0) {
    return Status::Unavailable(
        fmt::format("cannot resolve {}: {}", options_.host, ::gai_strerror(rc)));
  }
  std::string last_error = "no address";
  for (addrinfo* a = found; a != nullptr; a = a->ai_next) {
    int fd = ::socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
    if (fd < 0) {
      last_error = std::strerror(errno);
      continue;
    }
    if (::connect(fd, a->ai_addr, a->ai_addrlen) == 0) {
      fd_ = fd;
      break;
    }
    last_error = std::strerror(errno);
    ::close(fd);
  }
  ::freeaddrinfo(found);
  if (fd_ < 0) {
    return Status::Unavailable(
        fmt::format("cannot connect to {} port {}: {}", options_.host, options_.port, last_error));
  }
  if (options_.tls) return start_tls();
  return Status::Ok();
}

Status MllpSender::write_all(ByteView bytes) {
  std::size_t step = options_.chunk == 0 ? bytes.size() : options_.chunk;
  std::size_t off = 0;
  while (off < bytes.size()) {
    std::size_t n = std::min(step, bytes.size() - off);
    MEDGATE_RETURN_IF_ERROR(write_some(bytes.data() + off, n));
    off += n;
    if (options_.chunk != 0 && off < bytes.size()) std::this_thread::sleep_for(options_.pause);
  }
  return Status::Ok();
}

// Writes all n bytes: with TLS, one record.
Status MllpSender::write_some(const std::byte* data, std::size_t n) {
  std::size_t done = 0;
  while (done < n) {
    if (ssl_ != nullptr) {
      ERR_clear_error();
      int w = SSL_write(ssl_, data + done, static_cast<int>(n - done));
      if (w <= 0) return Status::Unavailable("TLS write: " + tls_errors());
      done += static_cast<std::size_t>(w);
      continue;
    }
    ssize_t w = ::send(fd_, data + done, n - done, MSG_NOSIGNAL);
    if (w < 0 && errno == EINTR) continue;
    if (w < 0) return Status::Unavailable(fmt::format("send: {}", std::strerror(errno)));
    done += static_cast<std::size_t>(w);
  }
  return Status::Ok();
}

Status MllpSender::send(std::string_view message) {
  if (fd_ < 0) return Status::FailedPrecondition("not connected");
  Result<Bytes> framed = encode_frame(as_bytes(message));
  if (!framed.ok()) return framed.status();
  if (options_.junk) MEDGATE_RETURN_IF_ERROR(write_all(as_bytes(kJunk)));
  ByteView all(*framed);
  if (!options_.split_trailer) return write_all(all);
  MEDGATE_RETURN_IF_ERROR(write_all(all.first(all.size() - 1)));
  std::this_thread::sleep_for(options_.pause);
  return write_all(all.last(1));
}

Result<std::string> MllpSender::receive() {
  if (fd_ < 0) return Status::FailedPrecondition("not connected");
  auto deadline = std::chrono::steady_clock::now() + options_.ack_timeout;
  std::byte buffer[16 * 1024];
  while (next_ready_ >= ready_.size()) {
    ready_.clear();
    next_ready_ = 0;
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) {
      return Status::Unavailable(fmt::format("no ACK within {} ms", options_.ack_timeout.count()));
    }
    if (ssl_ == nullptr || SSL_pending(ssl_) == 0) {
      pollfd p{fd_, POLLIN, 0};
      int ready = ::poll(&p, 1, static_cast<int>(left.count()));
      if (ready < 0 && errno == EINTR) continue;
      if (ready < 0) return Status::Unavailable(fmt::format("poll: {}", std::strerror(errno)));
      if (ready == 0) continue;
    }
    if (ssl_ != nullptr) {
      ERR_clear_error();
      int n = SSL_read(ssl_, buffer, sizeof buffer);
      if (n <= 0) {
        int error = SSL_get_error(ssl_, n);
        if (error == SSL_ERROR_WANT_READ || error == SSL_ERROR_WANT_WRITE) continue;
        if (error == SSL_ERROR_ZERO_RETURN)
          return Status::Unavailable("the listener closed the connection before an ACK");
        // E.g. the listener refused the client certificate (TLS 1.3 reports it only here).
        return Status::Unavailable("TLS: the listener ended the connection: " + tls_errors());
      }
      ready_ = deframer_.feed(ByteView(buffer, static_cast<std::size_t>(n)));
      continue;
    }
    ssize_t n = ::read(fd_, buffer, sizeof buffer);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return Status::Unavailable(fmt::format("read: {}", std::strerror(errno)));
    if (n == 0) return Status::Unavailable("the listener closed the connection before an ACK");
    ready_ = deframer_.feed(ByteView(buffer, static_cast<std::size_t>(n)));
  }
  Result<Bytes>& frame = ready_[next_ready_++];
  if (!frame.ok()) return frame.status();
  return to_string(*frame);
}

}  // namespace medgate::appliance::hl7
