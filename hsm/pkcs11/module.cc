#include "hsm/pkcs11/module.h"

#include <dlfcn.h>

#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>

namespace medgate::hsm::pkcs11 {
namespace {

struct ModuleEntry {
  CK_FUNCTION_LIST* functions = nullptr;
  int references = 0;
  // False when someone else in the process had already initialised the module: then it is theirs
  // to finalise.
  bool finalize = true;
  // SOFTHSM2_CONF as it was when C_Initialize ran.
  std::optional<std::string> softhsm_conf;
};

// Leaked on purpose: a KeyStore destroyed during static destruction must still find them.
std::mutex& registry_mutex() {
  static auto* mutex = new std::mutex;
  return *mutex;
}
std::map<void*, ModuleEntry>& registry() {
  static auto* modules = new std::map<void*, ModuleEntry>;
  return *modules;
}

std::optional<std::string> softhsm_conf_env() {
  const char* value = std::getenv("SOFTHSM2_CONF");
  if (value == nullptr) return std::nullopt;
  return std::string(value);
}

}  // namespace

Result<std::shared_ptr<Pkcs11Module>> Pkcs11Module::acquire(
    const std::string& path, const std::optional<std::filesystem::path>& softhsm_conf) {
  std::lock_guard lock(registry_mutex());
  // RTLD_NODELETE: crypto libraries register atexit handlers and thread-local destructors;
  // unmapping one while those still point into it crashes at exit. A module stays mapped once
  // loaded; C_Finalize still runs when the last user goes.
  void* handle = ::dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL | RTLD_NODELETE);
  if (handle == nullptr) {
    const char* why = ::dlerror();
    return Status::Unavailable("cannot load PKCS#11 module " + path + ": " +
                               (why != nullptr ? why : "unknown dlopen error"));
  }

  auto& modules = registry();
  if (auto it = modules.find(handle); it != modules.end()) {
    ModuleEntry& entry = it->second;
    if (softhsm_conf && entry.softhsm_conf != softhsm_conf->string()) {
      ::dlclose(handle);
      return Status::FailedPrecondition(
          "PKCS#11 module " + path + " is already in use in this process with SOFTHSM2_CONF=" +
          entry.softhsm_conf.value_or("(unset)") + "; it cannot also open " +
          softhsm_conf->string() + " until every key store on it is closed");
    }
    ++entry.references;
    return std::shared_ptr<Pkcs11Module>(new Pkcs11Module(handle, entry.functions, path));
  }

  void* symbol = ::dlsym(handle, "C_GetFunctionList");
  if (symbol == nullptr) {
    ::dlclose(handle);
    return Status::Unavailable("cannot load PKCS#11 module " + path +
                               ": it has no C_GetFunctionList");
  }
  auto get_function_list = reinterpret_cast<CK_C_GetFunctionList>(symbol);
  CK_FUNCTION_LIST* functions = nullptr;
  CK_RV rv = get_function_list(&functions);
  if (rv != CKR_OK || functions == nullptr) {
    ::dlclose(handle);
    return Status::Unavailable("cannot load PKCS#11 module " + path +
                               ": C_GetFunctionList failed: " + ckr_name(rv));
  }

  // SoftHSM reads SOFTHSM2_CONF in C_Initialize. setenv changes the whole process's environment;
  // the registry lock keeps two initialisations here from racing on it.
  if (softhsm_conf) ::setenv("SOFTHSM2_CONF", softhsm_conf->c_str(), 1);
  CK_C_INITIALIZE_ARGS args{};
  args.flags = CKF_OS_LOCKING_OK;
  rv = functions->C_Initialize(&args);
  bool finalize = true;
  if (rv == CKR_CRYPTOKI_ALREADY_INITIALIZED) {
    finalize = false;
  } else if (rv != CKR_OK) {
    ::dlclose(handle);
    std::string hint;
    if (auto conf = softhsm_conf_env()) hint = " (SOFTHSM2_CONF=" + *conf + ")";
    return Status::Unavailable("PKCS#11 module " + path + " failed to initialise: " + ckr_name(rv) +
                               hint);
  }
  modules.emplace(handle, ModuleEntry{functions, 1, finalize, softhsm_conf_env()});
  return std::shared_ptr<Pkcs11Module>(new Pkcs11Module(handle, functions, path));
}

Pkcs11Module::~Pkcs11Module() {
  std::lock_guard lock(registry_mutex());
  auto& modules = registry();
  if (auto it = modules.find(handle_); it != modules.end() && --it->second.references == 0) {
    if (it->second.finalize) it->second.functions->C_Finalize(nullptr);
    modules.erase(it);
  }
  ::dlclose(handle_);
}

std::string ckr_name(CK_RV rv) {
  switch (rv) {
#define MEDGATE_CKR(name) \
  case name:              \
    return #name;
    MEDGATE_CKR(CKR_OK)
    MEDGATE_CKR(CKR_HOST_MEMORY)
    MEDGATE_CKR(CKR_SLOT_ID_INVALID)
    MEDGATE_CKR(CKR_GENERAL_ERROR)
    MEDGATE_CKR(CKR_FUNCTION_FAILED)
    MEDGATE_CKR(CKR_ARGUMENTS_BAD)
    MEDGATE_CKR(CKR_ATTRIBUTE_SENSITIVE)
    MEDGATE_CKR(CKR_ATTRIBUTE_TYPE_INVALID)
    MEDGATE_CKR(CKR_ATTRIBUTE_VALUE_INVALID)
    MEDGATE_CKR(CKR_DATA_INVALID)
    MEDGATE_CKR(CKR_DATA_LEN_RANGE)
    MEDGATE_CKR(CKR_ENCRYPTED_DATA_INVALID)
    MEDGATE_CKR(CKR_ENCRYPTED_DATA_LEN_RANGE)
    MEDGATE_CKR(CKR_ATTRIBUTE_READ_ONLY)
    MEDGATE_CKR(CKR_ACTION_PROHIBITED)
    MEDGATE_CKR(CKR_KEY_SIZE_RANGE)
    MEDGATE_CKR(CKR_SIGNATURE_INVALID)
    MEDGATE_CKR(CKR_SIGNATURE_LEN_RANGE)
    MEDGATE_CKR(CKR_DEVICE_ERROR)
    MEDGATE_CKR(CKR_DEVICE_MEMORY)
    MEDGATE_CKR(CKR_DEVICE_REMOVED)
    MEDGATE_CKR(CKR_FUNCTION_NOT_SUPPORTED)
    MEDGATE_CKR(CKR_KEY_HANDLE_INVALID)
    MEDGATE_CKR(CKR_KEY_TYPE_INCONSISTENT)
    MEDGATE_CKR(CKR_KEY_FUNCTION_NOT_PERMITTED)
    MEDGATE_CKR(CKR_MECHANISM_INVALID)
    MEDGATE_CKR(CKR_MECHANISM_PARAM_INVALID)
    MEDGATE_CKR(CKR_OBJECT_HANDLE_INVALID)
    MEDGATE_CKR(CKR_OPERATION_ACTIVE)
    MEDGATE_CKR(CKR_OPERATION_NOT_INITIALIZED)
    MEDGATE_CKR(CKR_PIN_INCORRECT)
    MEDGATE_CKR(CKR_PIN_INVALID)
    MEDGATE_CKR(CKR_PIN_LEN_RANGE)
    MEDGATE_CKR(CKR_PIN_EXPIRED)
    MEDGATE_CKR(CKR_PIN_LOCKED)
    MEDGATE_CKR(CKR_SESSION_CLOSED)
    MEDGATE_CKR(CKR_SESSION_COUNT)
    MEDGATE_CKR(CKR_SESSION_HANDLE_INVALID)
    MEDGATE_CKR(CKR_SESSION_READ_ONLY)
    MEDGATE_CKR(CKR_SESSION_EXISTS)
    MEDGATE_CKR(CKR_SESSION_READ_WRITE_SO_EXISTS)
    MEDGATE_CKR(CKR_TEMPLATE_INCOMPLETE)
    MEDGATE_CKR(CKR_TEMPLATE_INCONSISTENT)
    MEDGATE_CKR(CKR_TOKEN_NOT_PRESENT)
    MEDGATE_CKR(CKR_TOKEN_NOT_RECOGNIZED)
    MEDGATE_CKR(CKR_TOKEN_WRITE_PROTECTED)
    MEDGATE_CKR(CKR_USER_ALREADY_LOGGED_IN)
    MEDGATE_CKR(CKR_USER_NOT_LOGGED_IN)
    MEDGATE_CKR(CKR_USER_PIN_NOT_INITIALIZED)
    MEDGATE_CKR(CKR_USER_TYPE_INVALID)
    MEDGATE_CKR(CKR_USER_ANOTHER_ALREADY_LOGGED_IN)
    MEDGATE_CKR(CKR_RANDOM_NO_RNG)
    MEDGATE_CKR(CKR_DOMAIN_PARAMS_INVALID)
    MEDGATE_CKR(CKR_CURVE_NOT_SUPPORTED)
    MEDGATE_CKR(CKR_BUFFER_TOO_SMALL)
    MEDGATE_CKR(CKR_CRYPTOKI_NOT_INITIALIZED)
    MEDGATE_CKR(CKR_CRYPTOKI_ALREADY_INITIALIZED)
    MEDGATE_CKR(CKR_PIN_TOO_WEAK)
    MEDGATE_CKR(CKR_FUNCTION_REJECTED)
#undef MEDGATE_CKR
    default: {
      char buf[32];
      std::snprintf(buf, sizeof buf, "CKR_0x%lx", static_cast<unsigned long>(rv));
      return buf;
    }
  }
}

std::string trim_field(const unsigned char* field, std::size_t size) {
  std::string s(reinterpret_cast<const char*>(field), size);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\0')) s.pop_back();
  return s;
}

Result<std::vector<CK_SLOT_ID>> slots_with_token(const Pkcs11Module& module) {
  // The list can grow between the two calls (SoftHSM adds a slot when a token is initialised).
  for (int attempt = 0; attempt < 3; ++attempt) {
    CK_ULONG count = 0;
    CK_RV rv = module.fn()->C_GetSlotList(CK_TRUE, nullptr, &count);
    if (rv != CKR_OK)
      return Status::Unavailable("C_GetSlotList on " + module.path() + " failed: " + ckr_name(rv));
    std::vector<CK_SLOT_ID> slots(count);
    rv = module.fn()->C_GetSlotList(CK_TRUE, slots.data(), &count);
    if (rv == CKR_BUFFER_TOO_SMALL) continue;
    if (rv != CKR_OK)
      return Status::Unavailable("C_GetSlotList on " + module.path() + " failed: " + ckr_name(rv));
    slots.resize(count);
    return slots;
  }
  return Status::Unavailable("the slot list of " + module.path() + " keeps changing");
}

Result<Bytes> generate_random(const Pkcs11Module& module, CK_SESSION_HANDLE session,
                              std::size_t n) {
  Bytes out(n);
  if (n == 0) return out;
  CK_RV rv = module.fn()->C_GenerateRandom(session, u8(std::span<std::byte>(out)), n);
  if (rv != CKR_OK) return Status::Unavailable("C_GenerateRandom failed: " + ckr_name(rv));
  return out;
}

Result<Session> Session::open(const Pkcs11Module& module, CK_SLOT_ID slot) {
  CK_SESSION_HANDLE handle = CK_INVALID_HANDLE;
  CK_RV rv = module.fn()->C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, nullptr, nullptr,
                                        &handle);
  if (rv != CKR_OK)
    return Status::Unavailable("cannot open a session on slot " + std::to_string(slot) + " of " +
                               module.path() + ": " + ckr_name(rv));
  return Session(module.fn(), handle);
}

Session::~Session() {
  if (handle_ != CK_INVALID_HANDLE) fn_->C_CloseSession(handle_);
}

}  // namespace medgate::hsm::pkcs11
