// rules_diff: runs medgate's Cedar-subset engine on cases answered by Cedar's reference
// implementation (gen.js) and compares, request by request, the decision, the determining policies
// and the set of policies that errored (not the messages).
//
//   rules_diff CASES.json... [--oracle ORACLE.js] [--node NODE] [--max-shrink N]
//
// On a divergence it shrinks the case while the divergence persists — dropping policies,
// conditions, scope constraints, entities, attributes, parents and context fields, and replacing
// subexpressions by a child or a literal — asking the reference again through oracle.js at each
// step, then prints the minimal case: Cedar text, entities, request and both answers. Without an
// oracle it prints the case as it is. Exit 0 when every answer agrees, 1 on any divergence, 2 on
// bad input.
#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <exception>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "ledger/rules/authorizer.h"
#include "ledger/rules/entities.h"
#include "ledger/rules/evaluator.h"
#include "ledger/rules/parser.h"

namespace medgate::rules {
namespace {

using json = nlohmann::json;

// What either side says about one request.
struct Answer {
  std::string failure;  // non-empty: no answer (the text or entities were refused)
  std::string decision;
  std::set<std::string> reason;
  std::set<std::string> error_policies;
  std::map<std::string, std::string> messages;  // medgate's error messages, for the report

  bool same_as(const Answer& o) const {
    return failure.empty() && o.failure.empty() && decision == o.decision && reason == o.reason &&
           error_policies == o.error_policies;
  }
  std::string to_text() const {
    if (!failure.empty()) return "no answer: " + failure;
    auto list = [](const std::set<std::string>& ids) {
      std::string out;
      for (const auto& id : ids) out += (out.empty() ? "" : ", ") + id;
      return "[" + out + "]";
    };
    std::string out =
        fmt::format("{} reason {} errors {}", decision, list(reason), list(error_policies));
    for (const auto& [id, m] : messages) out += fmt::format("\n      {}: {}", id, m);
    return out;
  }
};

Answer answer_from_json(const json& j) {
  Answer a;
  if (j.contains("failure")) {
    a.failure = j["failure"].get<std::string>();
    return a;
  }
  a.decision = j.at("decision").get<std::string>();
  for (const auto& id : j.at("reason")) a.reason.insert(id.get<std::string>());
  for (const auto& id : j.at("error_policies")) a.error_policies.insert(id.get<std::string>());
  return a;
}

Result<EntityUid> uid_from_json(const json& j) {
  if (!j.is_object() || !j.contains("type") || !j.contains("id") || !j["type"].is_string() ||
      !j["id"].is_string())
    return Status::InvalidArgument("an entity uid must be {\"type\": T, \"id\": I}");
  return EntityUid{j["type"].get<std::string>(), j["id"].get<std::string>()};
}

Result<Request> request_from_json(const json& j) {
  Request r;
  MEDGATE_ASSIGN_OR_RETURN(r.principal, uid_from_json(j.value("principal", json())));
  MEDGATE_ASSIGN_OR_RETURN(r.action, uid_from_json(j.value("action", json())));
  MEDGATE_ASSIGN_OR_RETURN(r.resource, uid_from_json(j.value("resource", json())));
  MEDGATE_ASSIGN_OR_RETURN(r.context, value_from_json(j.value("context", json::object())));
  if (!r.context.is_record()) return Status::InvalidArgument("the context must be a record");
  return r;
}

// medgate's answer for a policy file, entities and one request.
Answer medgate_answer(std::string_view policy_text, const json& entities, const json& request) {
  Answer a;
  ParseResult parsed = parse_policies(policy_text);
  if (!parsed.ok()) {
    a.failure = "parse: " + parsed.errors.front().to_text();
    return a;
  }
  Result<Entities> store = entities_from_json(entities);
  if (!store.ok()) {
    a.failure = "entities: " + store.status().message();
    return a;
  }
  Result<Request> req = request_from_json(request);
  if (!req.ok()) {
    a.failure = "request: " + req.status().message();
    return a;
  }
  Authorizer authorizer(std::move(parsed.policies));
  Response r = authorizer.is_authorized(*req, *store);
  a.decision = std::string(decision_name(r.decision));
  a.reason.insert(r.determining.begin(), r.determining.end());
  for (const auto& e : r.errors) {
    a.error_policies.insert(e.policy_id);
    a.messages.emplace(e.policy_id, e.message);
  }
  return a;
}

// ---- the reference, through oracle.js on a pipe ----

class Oracle {
 public:
  Oracle(const std::string& node, const std::string& script) {
    int to_child[2], from_child[2];
    if (::pipe2(to_child, O_CLOEXEC) != 0) return;
    if (::pipe2(from_child, O_CLOEXEC) != 0) {
      ::close(to_child[0]);
      ::close(to_child[1]);
      return;
    }
    pid_ = ::fork();
    if (pid_ == 0) {
      ::dup2(to_child[0], 0);
      ::dup2(from_child[1], 1);
      const char* argv[] = {node.c_str(), script.c_str(), nullptr};
      ::execvp(argv[0], const_cast<char* const*>(argv));
      std::_Exit(127);
    }
    ::close(to_child[0]);
    ::close(from_child[1]);
    write_fd_ = to_child[1];
    read_fd_ = from_child[0];
    if (pid_ < 0) close_all();
  }
  ~Oracle() {
    close_all();
    if (pid_ > 0) ::waitpid(pid_, nullptr, 0);
  }
  Oracle(const Oracle&) = delete;
  Oracle& operator=(const Oracle&) = delete;

  std::size_t calls() const { return calls_; }
  bool alive() const { return write_fd_ >= 0; }

  // nullopt when the oracle is gone (not started, or died).
  std::optional<Answer> ask(const json& question) {
    if (write_fd_ < 0) return std::nullopt;
    ++calls_;
    std::string line = question.dump() + "\n";
    for (std::size_t off = 0; off < line.size();) {
      ssize_t n = ::write(write_fd_, line.data() + off, line.size() - off);
      if (n <= 0) {
        close_all();
        return std::nullopt;
      }
      off += static_cast<std::size_t>(n);
    }
    std::string reply;
    for (;;) {
      std::size_t nl = buffer_.find('\n');
      if (nl != std::string::npos) {
        reply = buffer_.substr(0, nl);
        buffer_.erase(0, nl + 1);
        break;
      }
      char chunk[65536];
      ssize_t n = ::read(read_fd_, chunk, sizeof chunk);
      if (n <= 0) {
        close_all();
        return std::nullopt;
      }
      buffer_.append(chunk, static_cast<std::size_t>(n));
    }
    json j = json::parse(reply, nullptr, false);
    if (j.is_discarded()) return std::nullopt;
    return answer_from_json(j);
  }

 private:
  void close_all() {
    if (write_fd_ >= 0) ::close(write_fd_);
    if (read_fd_ >= 0) ::close(read_fd_);
    write_fd_ = read_fd_ = -1;
  }
  pid_t pid_ = -1;
  int write_fd_ = -1, read_fd_ = -1;
  std::string buffer_;
  std::size_t calls_ = 0;
};

// ---- shrinking ----

// A case being shrunk: policies as trees (every one carrying its id as @id, so that dropping one
// renames none), entities and one request, both in Cedar's JSON form.
struct Reduced {
  std::vector<Policy> policies;
  json entities;
  json request;

  std::string policy_text() const {
    std::string out;
    for (const auto& p : policies) out += to_text(p) + "\n";
    return out;
  }
  json question() const {
    json texts = json::object();
    for (const auto& p : policies) texts[p.id] = to_text(p);
    return {{"policies", texts}, {"entities", entities}, {"request", request}};
  }
};

Policy with_id_annotation(Policy p) {
  bool has_id = false;
  for (auto& [key, value] : p.annotations) {
    if (key == "id") {
      value = p.id;
      has_id = true;
    }
  }
  if (!has_id) p.annotations.insert(p.annotations.begin(), {"id", p.id});
  return p;
}

std::size_t count_nodes(const Expr& e) {
  std::size_t n = 1;
  for (const auto& c : e.children)
    if (c) n += count_nodes(*c);
  return n;
}

// `e` with its `target`-th node (preorder) replaced by `make(node)`; `index` counts as it walks.
ExprPtr replace_node(const ExprPtr& e, std::size_t target, std::size_t& index,
                     const std::function<ExprPtr(const ExprPtr&)>& make) {
  if (index++ == target) return make(e);
  auto copy = std::make_shared<Expr>(*e);
  for (auto& c : copy->children)
    if (c) c = replace_node(c, target, index, make);
  return copy;
}

ExprPtr literal_bool(bool b) {
  auto e = std::make_shared<Expr>();
  e->kind = Expr::Kind::kLiteral;
  e->literal = Value(b);
  return e;
}

class Shrinker {
 public:
  Shrinker(Oracle& oracle, std::size_t budget) : oracle_(oracle), budget_(budget) {}
  void extend_budget(std::size_t n) { budget_ = std::max(budget_, oracle_.calls() + n); }

  // True when both sides still answer, and differently.
  bool diverges(const Reduced& r, Answer* ours = nullptr, Answer* theirs = nullptr) {
    if (oracle_.calls() >= budget_) return false;
    Answer m = medgate_answer(r.policy_text(), r.entities, r.request);
    if (!m.failure.empty()) return false;
    std::optional<Answer> c = oracle_.ask(r.question());
    if (!c || !c->failure.empty() || m.same_as(*c)) return false;
    if (ours) *ours = m;
    if (theirs) *theirs = *c;
    return true;
  }

  void shrink(Reduced& r) {
    for (bool progress = true; progress && oracle_.calls() < budget_;) {
      progress = false;
      progress |= drop_each(
          r, [](Reduced& x) { return x.policies.size(); },
          [](Reduced& x, std::size_t i) {
            x.policies.erase(x.policies.begin() + static_cast<long>(i));
          });
      progress |= drop_each(
          r, [](Reduced& x) { return x.entities.size(); },
          [](Reduced& x, std::size_t i) { x.entities.erase(i); });
      for (std::size_t p = 0; p < r.policies.size(); ++p) {
        progress |= drop_each(
            r, [p](Reduced& x) { return x.policies[p].conditions.size(); },
            [p](Reduced& x, std::size_t i) {
              auto& cs = x.policies[p].conditions;
              cs.erase(cs.begin() + static_cast<long>(i));
            });
        for (auto member : {&Policy::principal, &Policy::action, &Policy::resource}) {
          if ((r.policies[p].*member).op == ScopeConstraint::Op::kAny) continue;
          Reduced t = r;
          t.policies[p].*member = ScopeConstraint{};
          if (diverges(t)) r = std::move(t), progress = true;
        }
        progress |= simplify_conditions(r, p);
      }
      if (r.request.contains("context") && r.request["context"].is_object()) {
        progress |=
            shrink_json_members(r, [](Reduced& x) -> json& { return x.request["context"]; });
        progress |= shrink_json_tree(r, [](Reduced& x) -> json& { return x.request["context"]; });
      }
      for (std::size_t e = 0; e < r.entities.size(); ++e) {
        if (!r.entities[e].is_object()) continue;
        if (r.entities[e].contains("attrs") && r.entities[e]["attrs"].is_object()) {
          progress |=
              shrink_json_members(r, [e](Reduced& x) -> json& { return x.entities[e]["attrs"]; });
          progress |=
              shrink_json_tree(r, [e](Reduced& x) -> json& { return x.entities[e]["attrs"]; });
        }
        if (r.entities[e].contains("parents") && r.entities[e]["parents"].is_array())
          progress |= drop_each(
              r, [e](Reduced& x) { return x.entities[e]["parents"].size(); },
              [e](Reduced& x, std::size_t i) { x.entities[e]["parents"].erase(i); });
      }
    }
  }

 private:
  // Tries dropping each item (from the last), keeping every drop that keeps the divergence.
  bool drop_each(Reduced& r, const std::function<std::size_t(Reduced&)>& size,
                 const std::function<void(Reduced&, std::size_t)>& drop) {
    bool progress = false;
    for (std::size_t i = size(r); i-- > 0;) {
      Reduced t = r;
      drop(t, i);
      if (diverges(t)) r = std::move(t), progress = true;
    }
    return progress;
  }

  // Drops the members of a JSON object (a record of attributes, the context) one by one.
  bool shrink_json_members(Reduced& r, const std::function<json&(Reduced&)>& object) {
    bool progress = false;
    std::vector<std::string> keys;
    for (const auto& [k, v] : object(r).items()) keys.push_back(k);
    for (const auto& k : keys) {
      Reduced t = r;
      object(t).erase(k);
      if (diverges(t)) r = std::move(t), progress = true;
    }
    return progress;
  }

  // Drops members of nested records and elements of sets anywhere below the top level of
  // `root(r)`, the innermost and last first (so that earlier array indices stay valid).
  bool shrink_json_tree(Reduced& r, const std::function<json&(Reduced&)>& root) {
    std::vector<json::json_pointer> paths;
    std::function<void(const json&, const json::json_pointer&)> collect =
        [&](const json& v, const json::json_pointer& at) {
          if (v.is_object()) {
            for (const auto& [k, child] : v.items()) {
              if (!at.empty()) paths.push_back(at / k);
              collect(child, at / k);
            }
          } else if (v.is_array()) {
            for (std::size_t i = 0; i < v.size(); ++i) {
              if (!at.empty()) paths.push_back(at / i);
              collect(v[i], at / i);
            }
          }
        };
    collect(root(r), json::json_pointer());
    bool progress = false;
    for (auto it = paths.rbegin(); it != paths.rend(); ++it) {
      Reduced t = r;
      json& base = root(t);
      if (!base.contains(*it)) continue;
      json& parent = base[it->parent_pointer()];
      if (parent.is_object()) {
        parent.erase(it->back());
      } else if (parent.is_array()) {
        std::size_t index = std::stoul(it->back());
        if (index >= parent.size()) continue;
        parent.erase(index);
      }
      if (diverges(t)) r = std::move(t), progress = true;
    }
    return progress;
  }

  // Replaces subexpressions of policy p's conditions by one of their children, true or false.
  bool simplify_conditions(Reduced& r, std::size_t p) {
    bool progress = false;
    for (std::size_t c = 0; c < r.policies[p].conditions.size(); ++c) {
      for (std::size_t node = 0; node < count_nodes(*r.policies[p].conditions[c].expr); ++node) {
        std::size_t children = 0;
        {
          std::size_t index = 0;
          replace_node(r.policies[p].conditions[c].expr, node, index, [&](const ExprPtr& e) {
            children = e->children.size();
            return e;
          });
        }
        for (std::size_t choice = 0; choice < children + 2; ++choice) {
          Reduced t = r;
          std::size_t index = 0;
          auto& expr = t.policies[p].conditions[c].expr;
          bool changed = true;
          expr = replace_node(expr, node, index, [&](const ExprPtr& e) -> ExprPtr {
            if (choice < e->children.size() && e->children[choice]) return e->children[choice];
            bool b = choice == e->children.size();
            if (e->kind == Expr::Kind::kLiteral && e->literal == Value(b)) changed = false;
            return literal_bool(b);
          });
          if (changed && diverges(t)) {
            r = std::move(t);
            progress = true;
            break;
          }
        }
      }
    }
    return progress;
  }

  Oracle& oracle_;
  std::size_t budget_;
};

// ---- the run ----

// Which request is being answered, for a crash report: the engine must never crash, and when it
// does the case is what its author needs.
char g_current[512] = "before the first case";

void say_where_and_die(int sig) {
  const char prefix[] = "\nrules_diff: the engine crashed (or threw) in ";
  (void)!::write(2, prefix, sizeof prefix - 1);
  (void)!::write(2, g_current, std::strlen(g_current));
  (void)!::write(2, "\n", 1);
  ::signal(sig, SIG_DFL);
  ::raise(sig);
}

void set_current(const std::string& case_id, std::size_t request_no) {
  std::snprintf(g_current, sizeof g_current, "case %s request %zu", case_id.c_str(), request_no);
}

struct Options {
  std::vector<std::string> files;
  std::string oracle;  // oracle.js; empty: no shrinking
  std::string node = "node";
  std::size_t max_shrink = 5;  // divergences shrunk and printed in full; the rest are listed
};

struct Tally {
  std::size_t cases = 0, requests = 0, divergences = 0, skipped_by_generator = 0;
  std::map<std::string, std::size_t> outcomes;  // of the reference's answers
};

std::string outcome_of(const Answer& a) {
  if (!a.error_policies.empty()) return "error";
  if (a.decision == "allow") return "allow";
  return a.reason.empty() ? "default deny" : "deny by forbid";
}

void report(Oracle* oracle, const std::string& case_id, std::size_t request_no,
            const std::string& policies, const json& entities, const json& request,
            const Answer& ours, const Answer& theirs) {
  fmt::print("\nDIVERGENCE in case {} request {}\n  medgate: {}\n  cedar:   {}\n", case_id,
             request_no, ours.to_text(), theirs.to_text());
  std::string text = policies;
  json ents = entities, req = request;
  Answer m = ours, c = theirs;
  ParseResult parsed = parse_policies(policies);
  if (oracle != nullptr && parsed.ok()) {
    Reduced r{{}, entities, request};
    for (const auto& p : parsed.policies.policies) r.policies.push_back(with_id_annotation(p));
    Shrinker shrinker(*oracle, oracle->calls() + 4000);
    if (shrinker.diverges(r, &m, &c)) {
      shrinker.shrink(r);
      shrinker.extend_budget(1);  // the last step kept the divergence: ask once more for answers
      if (shrinker.diverges(r, &m, &c)) {
        text = r.policy_text();
        ents = r.entities;
        req = r.request;
      }
    } else if (!oracle->alive()) {
      fmt::print("  (the oracle did not answer: the case is shown unshrunk)\n");
    } else {
      fmt::print(
          "  (printing the parsed policies back to text loses the divergence: the case is "
          "shown as generated)\n");
    }
  } else if (oracle == nullptr) {
    fmt::print("  (no oracle: the case is shown unshrunk)\n");
  }
  fmt::print("--- minimal case: policies\n{}--- entities\n{}\n--- request\n{}\n", text,
             ents.dump(1), req.dump());
  fmt::print("--- medgate: {}\n--- cedar:   {}\n\n", m.to_text(), c.to_text());
  std::fflush(stdout);
}

int run(const Options& opt) {
  std::unique_ptr<Oracle> oracle;
  if (!opt.oracle.empty()) oracle = std::make_unique<Oracle>(opt.node, opt.oracle);
  Tally tally;
  auto t0 = std::chrono::steady_clock::now();
  for (const auto& file : opt.files) {
    std::ifstream in(file);
    json doc = json::parse(in, nullptr, false);
    if (!in || doc.is_discarded() || !doc.contains("cases")) {
      fmt::print(stderr, "rules_diff: {} is not a cases file from gen.js\n", file);
      return 2;
    }
    tally.skipped_by_generator += doc.value("skipped", std::size_t{0});
    for (const auto& c : doc["cases"]) {
      ++tally.cases;
      const std::string id = c.value("id", "?");
      const std::string policies = c.at("policies").get<std::string>();
      // Parse and load once per case; a refusal is a divergence on every request of the case.
      ParseResult parsed = parse_policies(policies);
      Result<Entities> store = entities_from_json(c.at("entities"));
      std::optional<Authorizer> authorizer;
      if (parsed.ok()) authorizer.emplace(std::move(parsed.policies));
      std::size_t n = 0;
      for (const auto& rq : c.at("requests")) {
        ++tally.requests;
        set_current(id, n);
        Answer theirs = answer_from_json(rq.at("expected"));
        ++tally.outcomes[outcome_of(theirs)];
        Answer ours;
        if (!parsed.ok()) {
          ours.failure = "parse: " + parsed.errors.front().to_text();
        } else if (!store.ok()) {
          ours.failure = "entities: " + store.status().message();
        } else if (Result<Request> req = request_from_json(rq); !req.ok()) {
          ours.failure = "request: " + req.status().message();
        } else {
          Response r = authorizer->is_authorized(*req, *store);
          ours.decision = std::string(decision_name(r.decision));
          ours.reason.insert(r.determining.begin(), r.determining.end());
          for (const auto& e : r.errors) {
            ours.error_policies.insert(e.policy_id);
            ours.messages.emplace(e.policy_id, e.message);
          }
        }
        if (!ours.same_as(theirs)) {
          if (++tally.divergences <= opt.max_shrink) {
            json request = {{"principal", rq.at("principal")},
                            {"action", rq.at("action")},
                            {"resource", rq.at("resource")},
                            {"context", rq.at("context")}};
            report(oracle.get(), id, n, policies, c.at("entities"), request, ours, theirs);
          } else {
            fmt::print("divergence in case {} request {}: medgate {} / cedar {}\n", id, n,
                       ours.to_text(), theirs.to_text());
          }
        }
        ++n;
      }
    }
  }
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  auto share = [&](const char* k) {
    auto it = tally.outcomes.find(k);
    std::size_t v = it == tally.outcomes.end() ? 0 : it->second;
    return fmt::format("{:.0f}%",
                       100.0 * static_cast<double>(v) /
                           static_cast<double>(std::max<std::size_t>(tally.requests, 1)));
  };
  fmt::print(
      "rules_diff: {} cases, {} requests (allow {}, deny by forbid {}, error {}, default deny "
      "{}); {} cases the generator skipped; {} divergences; {:.1f} s{}\n",
      tally.cases, tally.requests, share("allow"), share("deny by forbid"), share("error"),
      share("default deny"), tally.skipped_by_generator, tally.divergences, secs,
      oracle ? fmt::format(" ({} questions to the oracle)", oracle->calls()) : "");
  if (tally.cases == 0) {
    fmt::print(stderr, "rules_diff: no cases\n");
    return 2;
  }
  // A case the reference refused means the generator left the subset: a bug in the test.
  if (tally.skipped_by_generator > 0)
    fmt::print("rules_diff: the generator left the subset {} times (gen.js names the first)\n",
               tally.skipped_by_generator);
  return tally.divergences == 0 && tally.skipped_by_generator == 0 ? 0 : 1;
}

}  // namespace
}  // namespace medgate::rules

int main(int argc, char** argv) {
  ::signal(SIGPIPE, SIG_IGN);
  for (int sig : {SIGSEGV, SIGABRT, SIGBUS, SIGFPE})
    ::signal(sig, medgate::rules::say_where_and_die);
  std::set_terminate([] { medgate::rules::say_where_and_die(SIGABRT); });
  medgate::rules::Options opt;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "rules_diff: %s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--oracle") {
      opt.oracle = next();
    } else if (a == "--node") {
      opt.node = next();
    } else if (a == "--max-shrink") {
      opt.max_shrink = std::stoul(next());
    } else if (a.starts_with("--")) {
      std::fprintf(stderr,
                   "usage: rules_diff CASES.json... [--oracle oracle.js] [--node NODE] "
                   "[--max-shrink N]\n");
      return 2;
    } else {
      opt.files.push_back(a);
    }
  }
  if (opt.files.empty()) {
    std::fprintf(stderr, "usage: rules_diff CASES.json... [--oracle oracle.js] [--node NODE]\n");
    return 2;
  }
  return medgate::rules::run(opt);
}
