// IPv4 and IPv6 networks ("10.20.0.0/16", "fd00:7::/64", or one address) and whether a peer's
// address is in one: the HL7 sources' address allow-lists and the config's [network] allow.
#pragma once

#include <sys/socket.h>

#include <array>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "hsm/status.h"

namespace medgate::appliance {

struct IpNetwork {
  bool v6 = false;
  std::array<std::uint8_t, 16> address{};  // IPv4 in the first 4 bytes; host bits cleared
  unsigned prefix = 0;                     // 0..32 or 0..128

  // "10.20.0.0/16", "10.1.2.3" (a /32 or /128 is written without its prefix), "fd00:7::/64".
  std::string to_string() const;
  // Whether `peer` (AF_INET or AF_INET6; an IPv4-mapped IPv6 address counts as IPv4) is inside.
  bool contains(const sockaddr_storage& peer) const;
  friend bool operator==(const IpNetwork&, const IpNetwork&) = default;
};

// One address or prefix. Host bits below the prefix are refused ("10.20.1.0/16 has host bits
// set; did you mean 10.20.0.0/16?"), since such a typo usually means the wrong network.
// kInvalidArgument naming the item.
Result<IpNetwork> parse_ip_network(std::string_view text);

// Items separated by spaces or commas; at least one.
Result<std::vector<IpNetwork>> parse_ip_networks(std::string_view text);

// Whether the list allows `peer`: an empty list allows every address.
bool allowed_from(const std::vector<IpNetwork>& networks, const sockaddr_storage& peer);

}  // namespace medgate::appliance
