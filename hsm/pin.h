// Where a PIN comes from. Never argv: a file (0600), an environment variable, or a systemd
// credential ($CREDENTIALS_DIRECTORY/NAME, from LoadCredential=).
#pragma once

#include <string>

#include "hsm/status.h"

namespace medgate::hsm {

struct PinSource {
  enum class Kind { kNone, kFile, kEnv, kCredential };
  Kind kind = Kind::kNone;
  std::string name;  // file path, variable name or credential name

  std::string describe() const;  // "file /etc/medgate/pin", never the PIN
};

// Reads the PIN; strips one trailing newline. Refuses a file that others may read, an unset or
// empty variable, and a credential when $CREDENTIALS_DIRECTORY is not set, naming the cause.
Result<std::string> read_pin(const PinSource& source);

}  // namespace medgate::hsm
