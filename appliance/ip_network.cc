#include "appliance/ip_network.h"

#include <arpa/inet.h>
#include <netinet/in.h>

#include <algorithm>
#include <cstring>
#include <optional>

#include <fmt/format.h>

namespace medgate::appliance {
namespace {

// Clears the bits of `address` below `prefix`; returns whether any was set.
bool clear_host_bits(std::array<std::uint8_t, 16>& address, unsigned prefix, unsigned bits) {
  bool had = false;
  for (unsigned i = prefix; i < bits; ++i) {
    const auto mask = static_cast<std::uint8_t>(0x80u >> (i % 8));
    if (address[i / 8] & mask) had = true;
    address[i / 8] = static_cast<std::uint8_t>(address[i / 8] & ~mask);
  }
  return had;
}

bool prefix_matches(const std::uint8_t* a, const std::uint8_t* b, unsigned prefix) {
  const unsigned whole = prefix / 8;
  if (std::memcmp(a, b, whole) != 0) return false;
  if (prefix % 8 == 0) return true;
  const auto mask = static_cast<std::uint8_t>(0xffu << (8 - prefix % 8));
  return (a[whole] & mask) == (b[whole] & mask);
}

}  // namespace

std::string IpNetwork::to_string() const {
  char buf[INET6_ADDRSTRLEN] = {};
  ::inet_ntop(v6 ? AF_INET6 : AF_INET, address.data(), buf, sizeof buf);
  if (prefix == (v6 ? 128u : 32u)) return buf;
  return fmt::format("{}/{}", buf, prefix);
}

bool IpNetwork::contains(const sockaddr_storage& peer) const {
  if (peer.ss_family == AF_INET) {
    if (v6) return false;
    const auto& in = reinterpret_cast<const sockaddr_in&>(peer);
    return prefix_matches(reinterpret_cast<const std::uint8_t*>(&in.sin_addr), address.data(),
                          prefix);
  }
  if (peer.ss_family == AF_INET6) {
    const auto& in6 = reinterpret_cast<const sockaddr_in6&>(peer);
    const auto* bytes = reinterpret_cast<const std::uint8_t*>(&in6.sin6_addr);
    if (IN6_IS_ADDR_V4MAPPED(&in6.sin6_addr))
      return !v6 && prefix_matches(bytes + 12, address.data(), prefix);
    return v6 && prefix_matches(bytes, address.data(), prefix);
  }
  return false;
}

Result<IpNetwork> parse_ip_network(std::string_view text) {
  const std::string item(text);
  std::string address = item;
  std::optional<unsigned> prefix;
  if (const auto slash = item.find('/'); slash != std::string::npos) {
    address = item.substr(0, slash);
    const std::string bits = item.substr(slash + 1);
    if (bits.empty() || bits.size() > 3 ||
        !std::all_of(bits.begin(), bits.end(), [](char c) { return c >= '0' && c <= '9'; }))
      return Status::InvalidArgument(fmt::format("'{}': the prefix length is not a number", item));
    prefix = static_cast<unsigned>(std::stoul(bits));
  }
  IpNetwork n;
  unsigned max_bits = 0;
  if (::inet_pton(AF_INET, address.c_str(), n.address.data()) == 1) {
    max_bits = 32;
  } else if (::inet_pton(AF_INET6, address.c_str(), n.address.data()) == 1) {
    n.v6 = true;
    max_bits = 128;
  } else {
    return Status::InvalidArgument(fmt::format(
        "'{}' is not an IPv4 or IPv6 address or prefix (e.g. 10.20.0.0/16, fd00:7::/64)", item));
  }
  if (prefix && *prefix > max_bits)
    return Status::InvalidArgument(
        fmt::format("'{}': an IPv{} prefix is at most /{}", item, n.v6 ? 6 : 4, max_bits));
  n.prefix = prefix.value_or(max_bits);
  IpNetwork cleared = n;
  if (clear_host_bits(cleared.address, n.prefix, max_bits))
    return Status::InvalidArgument(
        fmt::format("'{}' has host bits set; did you mean {}?", item, cleared.to_string()));
  return n;
}

Result<std::vector<IpNetwork>> parse_ip_networks(std::string_view text) {
  std::vector<IpNetwork> out;
  std::size_t i = 0;
  while (i < text.size()) {
    if (text[i] == ' ' || text[i] == ',' || text[i] == '\t') {
      ++i;
      continue;
    }
    std::size_t end = text.find_first_of(" ,\t", i);
    if (end == std::string_view::npos) end = text.size();
    MEDGATE_ASSIGN_OR_RETURN(IpNetwork n, parse_ip_network(text.substr(i, end - i)));
    if (std::find(out.begin(), out.end(), n) == out.end()) out.push_back(n);
    i = end;
  }
  if (out.empty()) return Status::InvalidArgument("the list of networks is empty");
  return out;
}

bool allowed_from(const std::vector<IpNetwork>& networks, const sockaddr_storage& peer) {
  if (networks.empty()) return true;
  return std::any_of(networks.begin(), networks.end(),
                     [&](const IpNetwork& n) { return n.contains(peer); });
}

}  // namespace medgate::appliance
