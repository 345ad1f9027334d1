// A loaded PKCS#11 module and the process-wide bookkeeping around it. Private to hsm/pkcs11/.
//
// PKCS#11 allows C_Initialize once per process and C_Finalize tears down every session of every
// user in the process, so modules are shared: Pkcs11Module::acquire() returns a reference to the
// one initialised instance of a library (keyed by its dlopen handle, so a symlinked path finds the
// same entry) and the module is finalised when the last reference goes.
//
// Thread safety: acquire() and releasing a reference may be called from any thread. The function
// list may be used from any thread (the module is initialised with CKF_OS_LOCKING_OK), but a
// PKCS#11 session must only be used by one thread at a time.
#pragma once

#include <p11-kit/pkcs11.h>

#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "hsm/bytes.h"
#include "hsm/status.h"

namespace medgate::hsm::pkcs11 {

class Pkcs11Module {
 public:
  // Loads `path` (an absolute file name) and initialises it, or joins the instance already
  // initialised in this process. If `softhsm_conf` is set, SOFTHSM2_CONF is set to it (for the
  // whole process) before C_Initialize. Joining a module that was initialised with a different
  // SOFTHSM2_CONF fails with kFailedPrecondition: SoftHSM reads its configuration only at
  // C_Initialize, so it could not see the other token directory.
  // kUnavailable when the library cannot be loaded or refuses to initialise.
  static Result<std::shared_ptr<Pkcs11Module>> acquire(
      const std::string& path, const std::optional<std::filesystem::path>& softhsm_conf);

  Pkcs11Module(const Pkcs11Module&) = delete;
  Pkcs11Module& operator=(const Pkcs11Module&) = delete;
  ~Pkcs11Module();

  CK_FUNCTION_LIST* fn() const { return functions_; }
  const std::string& path() const { return path_; }

 private:
  Pkcs11Module(void* handle, CK_FUNCTION_LIST* functions, std::string path)
      : handle_(handle), functions_(functions), path_(std::move(path)) {}

  void* handle_;  // dlopen handle; the registry key
  CK_FUNCTION_LIST* functions_;
  std::string path_;
};

// "CKR_PIN_INCORRECT", or "CKR_0x%lx" for codes without a name here.
std::string ckr_name(CK_RV rv);

// A fixed-width, space-padded PKCS#11 text field (token label, serial) without its padding.
std::string trim_field(const unsigned char* field, std::size_t size);

// The slots of `module` that hold a token, or kUnavailable naming the failing call.
Result<std::vector<CK_SLOT_ID>> slots_with_token(const Pkcs11Module& module);

// C_GenerateRandom on `session`, in one call. The caller serializes use of `session`.
Result<Bytes> generate_random(const Pkcs11Module& module, CK_SESSION_HANDLE session, std::size_t n);

// An RW session on `slot` that is closed on destruction unless release()d. The module must
// outlive it.
class Session {
 public:
  static Result<Session> open(const Pkcs11Module& module, CK_SLOT_ID slot);
  Session(Session&& other) noexcept : fn_(other.fn_), handle_(other.release()) {}
  Session& operator=(Session&&) = delete;
  Session(const Session&) = delete;
  ~Session();

  CK_SESSION_HANDLE handle() const { return handle_; }
  CK_SESSION_HANDLE release() {
    CK_SESSION_HANDLE h = handle_;
    handle_ = CK_INVALID_HANDLE;
    return h;
  }

 private:
  Session(CK_FUNCTION_LIST* fn, CK_SESSION_HANDLE handle) : fn_(fn), handle_(handle) {}
  CK_FUNCTION_LIST* fn_;
  CK_SESSION_HANDLE handle_;
};

}  // namespace medgate::hsm::pkcs11
