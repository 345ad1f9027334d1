// The ENGINE API is deprecated in OpenSSL 3, but Debian 12 has no pkcs11-provider: libp11's
// engine is the way to a token-resident TLS key there.
#define OPENSSL_SUPPRESS_DEPRECATED 1

#include "hsm/pkcs11/tls_engine.h"

#include <openssl/engine.h>
#include <openssl/err.h>
#include <openssl/evp.h>

#include <mutex>
#include <string>

#include "hsm/pin.h"
#include "hsm/pkcs11/module.h"

namespace medgate::hsm::pkcs11 {
namespace {

std::string openssl_errors() {
  std::string out;
  while (unsigned long e = ERR_get_error()) {
    char buf[256];
    ERR_error_string_n(e, buf, sizeof buf);
    out += (out.empty() ? "" : "; ") + std::string(buf);
  }
  return out.empty() ? "no detail from OpenSSL" : out;
}

struct LoadedEngine {
  ENGINE* engine = nullptr;
  std::string module_path;
  std::shared_ptr<Pkcs11Module> module;  // kept: the key store's module must outlive the engine
};

std::mutex& engine_mutex() {
  static auto* mutex = new std::mutex;
  return *mutex;
}
// Leaked on purpose (see hsm/tls_key.h): never torn down before the process exits.
LoadedEngine*& loaded() {
  static LoadedEngine* engine = nullptr;
  return engine;
}

}  // namespace

Result<EVP_PKEY*> load_engine_key(const TokenTlsKey& key) {
  std::lock_guard lock(engine_mutex());
  LoadedEngine*& current = loaded();
  if (current != nullptr && current->module_path != key.module_path)
    return Status::FailedPrecondition("the pkcs11 engine is already loaded for module " +
                                      current->module_path + "; it cannot also load " +
                                      key.module_path);
  if (current == nullptr) {
    ERR_clear_error();
    // By id: OpenSSL finds pkcs11.so in its engines directory (libengine-pkcs11-openssl).
    ENGINE* e = ENGINE_by_id("pkcs11");
    if (e == nullptr)
      return Status::Unavailable(
          "cannot load OpenSSL's pkcs11 engine (install libengine-pkcs11-openssl): " +
          openssl_errors());
    if (ENGINE_ctrl_cmd_string(e, "MODULE_PATH", key.module_path.c_str(), 0) != 1 ||
        ENGINE_init(e) != 1) {
      std::string why = openssl_errors();
      ENGINE_free(e);
      return Status::Unavailable("the pkcs11 engine cannot use module " + key.module_path + ": " +
                                 why);
    }
    ENGINE_free(e);  // ENGINE_init holds its own (functional) reference
    current = new LoadedEngine{e, key.module_path, key.module};
  }
  MEDGATE_ASSIGN_OR_RETURN(std::string pin, read_pin(key.pin));
  ERR_clear_error();
  int set = ENGINE_ctrl_cmd_string(current->engine, "PIN", pin.c_str(), 0);
  secure_wipe(pin);
  if (set != 1)
    return Status::Unavailable("the pkcs11 engine refused the PIN: " + openssl_errors());
  EVP_PKEY* pkey = ENGINE_load_private_key(current->engine, key.key_uri.c_str(), nullptr, nullptr);
  if (pkey == nullptr)
    return Status::Unavailable("the pkcs11 engine cannot load " + key.key_uri + ": " +
                               openssl_errors());
  return pkey;
}

}  // namespace medgate::hsm::pkcs11
