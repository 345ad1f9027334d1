// medctl cluster init|status and medctl member propose|remove|approve|list: the replicated
// ledger's membership and ordering (docs/replication.md; appliance/cluster.h is the daemon side).
// A new appliance joins with `medctl init --join ...` (cmd_init), then a member adds it.
#include <fstream>
#include <iostream>
#include <sstream>

#include <fmt/format.h>
#include <CLI/CLI.hpp>

#include "cli/commands.h"

namespace medgate::cli {
namespace {

using nlohmann::json;

std::vector<std::string> split_urls(const std::vector<std::string>& args) {
  std::vector<std::string> out;
  for (const std::string& a : args) {
    std::size_t start = 0;
    while (start <= a.size()) {
      std::size_t comma = a.find(',', start);
      if (comma == std::string::npos) comma = a.size();
      if (comma > start) out.push_back(a.substr(start, comma - start));
      start = comma + 1;
    }
  }
  return out;
}

void print_members(const json& r) {
  std::cout << "membership epoch " << r.value("epoch", 0);
  if (r.contains("this_member") && r["this_member"].is_string())
    std::cout << ", this appliance is \"" << r["this_member"].get<std::string>() << "\"";
  std::cout << "\n";
  for (const json& m : r.value("members", json::array())) {
    const json agreement = m.value("agreement_key_id", json());
    std::cout << fmt::format(
        "  {:<20} {}  key {}…  {}  (member since entry {})\n", m.value("id", ""),
        m.value("endpoint", ""), m.value("key_id", "").substr(0, 16),
        agreement.is_string() ? "agreement key " + agreement.get<std::string>().substr(0, 16) + "…"
                              : std::string("NO agreement key: it never receives the shared key"),
        m.value("since_entry", 0));
  }
  const json proposals = r.value("open_proposals", json::array());
  if (!proposals.empty()) {
    std::cout << "open proposals:\n";
    for (const json& p : proposals) {
      std::string approvers;
      for (const json& a : p["approvers"])
        approvers += (approvers.empty() ? "" : ", ") + a.get<std::string>();
      std::cout << fmt::format("  {} {:<20} {}/{} approvals ({})  statement {}\n",
                               p.value("action", ""), p.value("member_id", ""),
                               p["approvers"].size(), p.value("needed", 0), approvers,
                               p.value("statement", "").substr(0, 16));
    }
  }
}

int cmd_cluster_init(const GlobalOptions& g, const std::vector<std::string>& etcd,
                     const std::string& member_id, const std::string& endpoint,
                     const std::optional<std::string>& prefix) {
  const char* what = "medctl cluster init";
  json args = {{"etcd", split_urls(etcd)}, {"member_id", member_id}, {"endpoint", endpoint}};
  if (prefix) args["prefix"] = *prefix;
  Result<json> r = call(g, "cluster.init", args);
  if (!r.ok()) return fail(g, r.status(), what);
  if (g.json) {
    std::cout << r->dump(2) << "\n";
    return 0;
  }
  std::cout << "this ledger is now replicated through etcd under "
            << (*r)["prefix"].get<std::string>() << "\n";
  print_members(*r);
  std::cout << "Other appliances join with: medctl init --join URLS --ledger-id ID --member-id "
               "NAME --endpoint HOST:PORT --trust THIS-APPLIANCE.pem\n";
  return 0;
}

int cmd_cluster_status(const GlobalOptions& g) {
  Result<json> r = call(g, "cluster.status");
  if (!r.ok()) return fail(g, r.status(), "medctl cluster status");
  if (g.json) {
    std::cout << r->dump(2) << "\n";
    return 0;
  }
  const json& s = *r;
  std::cout << "member \"" << s.value("member_id", "") << "\"\n";
  const json& q = s["queue"];
  std::cout << fmt::format("  queue        {} entries waiting for the cluster (oldest {} ms)\n",
                           q.value("entries", 0), q.value("oldest_age_ms", 0));
  if (s["ordering"].is_object()) {
    const json& o = s["ordering"];
    std::cout << fmt::format(
        "  ordering     {}; height {} here, {} in etcd (lag {} blocks); proposed {}, lost {}\n",
        o.value("connected", false) ? "connected" : "NOT CONNECTED", o.value("local_height", 0),
        o.value("cluster_height", 0), o.value("lag_blocks", 0), o.value("blocks_proposed", 0),
        o.value("claims_lost", 0));
    if (o.value("invalid_blocks", 0) > 0)
      std::cout << "  void blocks  " << o.value("invalid_blocks", 0)
                << "; last: " << o.value("last_invalid", "") << "\n";
    if (o.contains("compaction") && o["compaction"].is_object() &&
        o["compaction"].value("revision", 0) > 0) {
      const json& c = o["compaction"];
      std::cout << fmt::format("  compaction   etcd history compacted to revision {}, {} s ago\n",
                               c.value("revision", 0),
                               c.contains("age_ms") && c["age_ms"].is_number_unsigned()
                                   ? c["age_ms"].get<std::uint64_t>() / 1000
                                   : 0);
    }
    if (!o.value("last_error", "").empty())
      std::cout << "  last error   " << o.value("last_error", "") << "\n";
  } else {
    std::cout << "  ordering     not started\n";
  }
  if (s.contains("etcd_status")) {
    const json& e = s["etcd_status"];
    if (e.contains("error")) {
      std::cout << "  etcd         " << e["error"].get<std::string>() << "\n";
    } else {
      std::cout << fmt::format("  etcd         {} (leader {:x}, term {}, revision {})\n",
                               e.value("version", ""), e.value("leader", 0ULL),
                               e.value("raft_term", 0ULL), e.value("revision", 0LL));
      for (const json& h : e["endpoints"])
        std::cout << fmt::format("    {} {}{}\n", h.value("endpoint", ""),
                                 h.value("healthy", false) ? "healthy" : "UNHEALTHY",
                                 h.value("error", "").empty() ? "" : ": " + h.value("error", ""));
    }
  }
  if (s.contains("member_heights") && !s["member_heights"].empty()) {
    std::cout << "  heights      as each member last reported:\n";
    for (const json& h : s["member_heights"])
      std::cout << fmt::format("    {:<20} height {}  ({} ms ago)\n", h.value("member_id", ""),
                               h.value("height", 0), h.value("age_ms", 0));
  }
  print_members(s["membership"]);
  return 0;
}

int cmd_member_propose(const GlobalOptions& g, const std::string& action, const std::string& id,
                       const std::optional<std::string>& key_file,
                       const std::optional<std::string>& endpoint,
                       const std::optional<std::string>& agreement_file) {
  const std::string what =
      "medctl member " + std::string(action == "add" ? "propose add" : "remove");
  json args = {{"action", action}, {"member_id", id}};
  if (action == "add") {
    if (!key_file || !endpoint)
      return fail(g, Status::InvalidArgument("adding a member needs --key PEM and --endpoint"),
                  what);
    auto read_pem = [](const std::string& file) -> std::optional<std::string> {
      std::ifstream in(file);
      std::stringstream pem;
      pem << in.rdbuf();
      if (!in) return std::nullopt;
      return pem.str();
    };
    const std::pair<const char*, std::optional<std::string>> files[] = {
        {"public_key", key_file}, {"agreement_key", agreement_file}};
    for (const auto& [arg, file] : files) {
      if (!file) continue;
      std::optional<std::string> pem = read_pem(*file);
      if (!pem) return fail(g, Status::InvalidArgument(fmt::format("cannot read {}", *file)), what);
      args[arg] = *pem;
    }
    args["endpoint"] = *endpoint;
  }
  Result<json> r = call(g, "member.propose", args);
  if (!r.ok()) return fail(g, r.status(), what);
  if (g.json) {
    std::cout << r->dump(2) << "\n";
    return 0;
  }
  const json& p = (*r)["proposal"];
  std::cout << fmt::format("proposal recorded (ledger entry {}, statement {}): {}\n",
                           p.value("entry", 0), p.value("statement", "").substr(0, 16),
                           p.value("took_effect", false)
                               ? "it took effect"
                               : "it takes effect once a majority of members approve "
                                 "(medctl member approve " +
                                     id + " on each)");
  print_members(*r);
  return 0;
}

int cmd_member_approve(const GlobalOptions& g, const std::string& which) {
  Result<json> r = call(g, "member.approve", {{"proposal", which}});
  if (!r.ok()) return fail(g, r.status(), "medctl member approve");
  if (g.json) {
    std::cout << r->dump(2) << "\n";
    return 0;
  }
  std::cout << "approval recorded (ledger entry " << (*r)["approval"].value("entry", 0) << ")\n";
  print_members(*r);
  return 0;
}

int cmd_member_list(const GlobalOptions& g) {
  Result<json> r = call(g, "member.list");
  if (!r.ok()) return fail(g, r.status(), "medctl member list");
  if (g.json) {
    std::cout << r->dump(2) << "\n";
    return 0;
  }
  if (!(*r).value("founded", false)) {
    std::cout << "no members: this ledger is a single box (medctl cluster init founds a cluster)\n";
    return 0;
  }
  print_members(*r);
  return 0;
}

struct ClusterArgs {
  std::vector<std::string> etcd;
  std::string member_id, endpoint, which, action_id;
  std::optional<std::string> prefix, key, member_endpoint, agreement_key;
};

}  // namespace

void add_cluster_commands(CLI::App& app, const GlobalOptions& g, int& rc) {
  static ClusterArgs a;
  auto* cluster = app.add_subcommand("cluster", "the replicated ledger: ordering through etcd");
  cluster->require_subcommand(1);
  auto* init = cluster->add_subcommand(
      "init", "make this appliance the founding member of a replicated ledger");
  init->add_option("--etcd", a.etcd, "etcd client URLs (comma-separated or repeated)")->required();
  init->add_option("--member-id", a.member_id, "this appliance's member id")->required();
  init->add_option("--endpoint", a.endpoint, "host:port other members reach it at")->required();
  init->add_option("--prefix", a.prefix, "etcd key prefix (default /medgate/LEDGER-ID/)");
  init->callback([&] { rc = cmd_cluster_init(g, a.etcd, a.member_id, a.endpoint, a.prefix); });
  cluster->add_subcommand("status", "members, heights, lag, queue and etcd health")->callback([&] {
    rc = cmd_cluster_status(g);
  });

  auto* member = app.add_subcommand("member", "members of the replicated ledger");
  member->require_subcommand(1);
  auto* propose = member->add_subcommand("propose", "propose adding a member");
  propose->require_subcommand(1);
  auto* add = propose->add_subcommand("add", "propose adding an appliance as a member");
  add->add_option("ID", a.action_id, "its member id")->required();
  add->add_option("--key", a.key, "its signing public key (PEM; medctl init wrote it)")->required();
  add->add_option("--endpoint", a.member_endpoint, "host:port it is reached at")->required();
  add->add_option("--agreement-key", a.agreement_key,
                  "its key-agreement public key (PEM; init --join wrote agreement-key.pem): "
                  "without it the member never receives the cluster's shared key");
  add->callback([&] {
    rc = cmd_member_propose(g, "add", a.action_id, a.key, a.member_endpoint, a.agreement_key);
  });
  auto* remove = member->add_subcommand("remove", "propose removing a member");
  remove->add_option("ID", a.action_id, "its member id")->required();
  remove->callback([&] {
    rc = cmd_member_propose(g, "remove", a.action_id, std::nullopt, std::nullopt, std::nullopt);
  });
  auto* approve = member->add_subcommand("approve", "approve an open proposal");
  approve->add_option("PROPOSAL", a.which, "the member id it is about, or its statement hash")
      ->required();
  approve->callback([&] { rc = cmd_member_approve(g, a.which); });
  member->add_subcommand("list", "members, the epoch and open proposals")->callback([&] {
    rc = cmd_member_list(g);
  });
}

}  // namespace medgate::cli
