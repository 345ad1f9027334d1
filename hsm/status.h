// Errors as values, shared by every layer (hsm/ is the bottom layer, so the vocabulary lives here).
//
// A Status is either OK or a code plus a message that names the problem for a person: which file,
// which line, which entry. Messages never carry PHI. Library code returns Status or Result<T>;
// nothing throws across a library boundary.
#pragma once

#include <string>
#include <string_view>
#include <utility>
#include <variant>

namespace medgate {

// The codes map onto medctl's exit codes (../shared/CLI.md): kVerificationFailed and
// kPermissionDenied are negative answers (1), kInvalidArgument/kNotFound/kCorruption are bad
// input (2), kUnavailable is an unreachable part (3).
enum class StatusCode {
  kOk,
  kInvalidArgument,     // bad input from outside: config, request, file, command line
  kNotFound,            // the named thing does not exist
  kCorruption,          // stored data is damaged or malformed
  kVerificationFailed,  // a check ran and said no (signature, proof, chain)
  kPermissionDenied,    // the caller may not do this
  kUnavailable,         // a part (daemon, HSM, TPM, etcd) cannot be reached
  kIOError,             // the operating system refused a read, write or fsync
  kFailedPrecondition,  // the system is not in a state that allows this
  kInternal,            // a bug in medgate
};

std::string_view status_code_name(StatusCode code);

class [[nodiscard]] Status {
 public:
  Status() = default;
  Status(StatusCode code, std::string message) : code_(code), message_(std::move(message)) {}

  static Status Ok() { return {}; }
  static Status InvalidArgument(std::string m) {
    return {StatusCode::kInvalidArgument, std::move(m)};
  }
  static Status NotFound(std::string m) { return {StatusCode::kNotFound, std::move(m)}; }
  static Status Corruption(std::string m) { return {StatusCode::kCorruption, std::move(m)}; }
  static Status VerificationFailed(std::string m) {
    return {StatusCode::kVerificationFailed, std::move(m)};
  }
  static Status PermissionDenied(std::string m) {
    return {StatusCode::kPermissionDenied, std::move(m)};
  }
  static Status Unavailable(std::string m) { return {StatusCode::kUnavailable, std::move(m)}; }
  static Status IOError(std::string m) { return {StatusCode::kIOError, std::move(m)}; }
  static Status FailedPrecondition(std::string m) {
    return {StatusCode::kFailedPrecondition, std::move(m)};
  }
  static Status Internal(std::string m) { return {StatusCode::kInternal, std::move(m)}; }

  bool ok() const { return code_ == StatusCode::kOk; }
  StatusCode code() const { return code_; }
  const std::string& message() const { return message_; }

  // Prefixes the message with context: Status::IOError("disk full").with_context("block 7")
  // reads "block 7: disk full".
  Status with_context(std::string_view context) const;

  // "ok" or "<code name>: <message>".
  std::string to_string() const;

 private:
  StatusCode code_ = StatusCode::kOk;
  std::string message_;
};

// A value or the Status that explains why there is none. Accessing value() on an error is a bug
// in the caller (checked by assert); outside input must be checked with ok() first.
template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : state_(std::move(value)) {}  // NOLINT: implicit on purpose, like StatusOr
  Result(Status status) : state_(std::move(status)) {}  // NOLINT

  bool ok() const { return std::holds_alternative<T>(state_); }
  const Status& status() const {
    static const Status kOk;
    return ok() ? kOk : std::get<Status>(state_);
  }
  T& value() & { return std::get<T>(state_); }
  const T& value() const& { return std::get<T>(state_); }
  T&& value() && { return std::get<T>(std::move(state_)); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }

 private:
  std::variant<T, Status> state_;
};

}  // namespace medgate

// Returns early from a function returning Status or Result<T> when `expr` is not OK.
#define MEDGATE_RETURN_IF_ERROR(expr)                  \
  do {                                                 \
    ::medgate::Status medgate_status_ = (expr);        \
    if (!medgate_status_.ok()) return medgate_status_; \
  } while (false)

#define MEDGATE_CONCAT_INNER(a, b) a##b
#define MEDGATE_CONCAT(a, b) MEDGATE_CONCAT_INNER(a, b)
// MEDGATE_ASSIGN_OR_RETURN(auto x, f()): binds x to f()'s value or returns its Status.
#define MEDGATE_ASSIGN_OR_RETURN(decl, expr) \
  MEDGATE_ASSIGN_OR_RETURN_IMPL(MEDGATE_CONCAT(medgate_result_, __LINE__), decl, expr)
#define MEDGATE_ASSIGN_OR_RETURN_IMPL(tmp, decl, expr) \
  auto tmp = (expr);                                   \
  if (!tmp.ok()) return tmp.status();                  \
  decl = std::move(tmp).value()
