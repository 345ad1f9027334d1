// CONSENSUS-CRITICAL (rule semantics): see evaluator.h. Each rule below is Cedar 4's evaluation
// of the same operator (cedar-policy-core, evaluator.rs), restricted to the subset.
//
// The walk returns pointers, not values: a literal, the context, an entity's attribute or a
// record's field is read where it lives, and only computed results are built (in a `scratch`
// value each caller provides). So `context.purpose == "TREAT"` copies nothing.
#include "ledger/rules/evaluator.h"

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <utility>

namespace medgate::rules {

namespace {

// The parser bounds nesting, but the evaluator must not trust its caller: a deeper tree is an
// evaluation error, not a stack overflow. Each level costs a few hundred bytes of stack.
constexpr int kMaxDepth = 1000;

std::string type_error(std::string_view expected, const Value& got) {
  return "type error: expected " + std::string(expected) + ", got " +
         std::string(kind_name(got.kind()));
}

// Both sets are sorted by Value's order: a merge decides inclusion and overlap.
bool includes_all(const ValueSet& big, const ValueSet& small) {
  return std::includes(big.begin(), big.end(), small.begin(), small.end());
}
bool intersects(const ValueSet& a, const ValueSet& b) {
  auto i = a.begin();
  auto j = b.begin();
  while (i != a.end() && j != b.end()) {
    auto c = *i <=> *j;
    if (c == 0) return true;
    if (c < 0) {
      ++i;
    } else {
      ++j;
    }
  }
  return false;
}

// Out of line (MEDGATE_COLD) so that building a message costs no stack in the recursive frames:
// eval() and the operator helpers hold only pointers and the few Values they compute, which keeps
// a level of nesting to a few hundred bytes of stack (a few KiB under AddressSanitizer).
#define MEDGATE_COLD [[gnu::noinline, gnu::cold]]
// The recursive helpers stay separate frames: inlined into eval(), each one's locals would be
// paid at every level whatever the operator.
#define MEDGATE_FRAME [[gnu::noinline]]

class Evaluation {
 public:
  Evaluation(const Request& request, const Entities& entities)
      : request_(request), entities_(entities) {}

  // Evaluates `e`. Returns a pointer either to `scratch` or to storage that outlives the
  // evaluation (the tree, the request, the entity store); nullptr on error, with error() set.
  const Value* eval(const Expr& e, Value& scratch, int depth);

  EvalError& error() { return error_; }

 private:
  // Each sets error() to the message and e's location and returns nullptr.
  MEDGATE_COLD const Value* fail(const Expr& e, std::string message);
  MEDGATE_COLD const Value* fail_type(const Expr& e, const char* expected, const Value& got);
  MEDGATE_COLD const Value* fail_malformed(const Expr& e, const char* what);
  MEDGATE_COLD const Value* fail_depth(const Expr& e);
  MEDGATE_COLD const Value* fail_overflow(const Expr& e, const Value& a, BinaryOp op,
                                          const Value& b);
  MEDGATE_COLD const Value* fail_negate_overflow(const Expr& e, const Value& a);
  MEDGATE_COLD const Value* fail_record_attr(const Expr& e);
  MEDGATE_COLD const Value* fail_no_entity(const Expr& e, const EntityUid& uid);
  MEDGATE_COLD const Value* fail_entity_attr(const Expr& e, const EntityUid& uid);

  // A child, or nullptr when the tree is malformed (never from the parser, but never trusted).
  static const Expr* child(const Expr& e, std::size_t i) {
    return i < e.children.size() ? e.children[i].get() : nullptr;
  }

  const Value* variable(Variable v);
  // The uid `e` names without building a Value, when it is principal, action or resource.
  const EntityUid* entity_variable(const Expr& e) const;

  // The parts of eval(), one per kind of node; same contract.
  MEDGATE_FRAME const Value* unary(const Expr& e, Value& scratch, int depth);
  MEDGATE_FRAME const Value* logical(const Expr& e, Value& scratch, int depth);
  MEDGATE_FRAME const Value* binary(const Expr& e, Value& scratch, int depth);
  MEDGATE_FRAME const Value* conditional(const Expr& e, Value& scratch, int depth);
  MEDGATE_FRAME const Value* attribute(const Expr& e, Value& scratch, int depth);
  MEDGATE_FRAME const Value* has_attribute(const Expr& e, Value& scratch, int depth);
  MEDGATE_FRAME const Value* like(const Expr& e, Value& scratch, int depth);
  MEDGATE_FRAME const Value* is(const Expr& e, Value& scratch, int depth);
  MEDGATE_FRAME const Value* set_literal(const Expr& e, Value& scratch, int depth);
  MEDGATE_FRAME const Value* record_literal(const Expr& e, Value& scratch, int depth);
  // The three-way `in` of a binary node, once both operands are values.
  const Value* in(const Expr& e, const Value& a, const Value& b, Value& scratch);

  const Request& request_;
  const Entities& entities_;
  // principal, action and resource as Values, built on first use.
  std::optional<Value> principal_, action_, resource_;
  EvalError error_;
};

const Value* Evaluation::fail(const Expr& e, std::string message) {
  error_.message = std::move(message);
  error_.location = e.location;
  return nullptr;
}
const Value* Evaluation::fail_type(const Expr& e, const char* expected, const Value& got) {
  return fail(e, type_error(expected, got));
}
const Value* Evaluation::fail_malformed(const Expr& e, const char* what) {
  return fail(e, std::string("malformed expression: ") + what);
}
const Value* Evaluation::fail_depth(const Expr& e) {
  return fail(e, "expression nested deeper than " + std::to_string(kMaxDepth) + " levels");
}
const Value* Evaluation::fail_overflow(const Expr& e, const Value& a, BinaryOp op, const Value& b) {
  return fail(e, "integer overflow: " + a.to_text() + " " + std::string(operator_text(op)) + " " +
                     b.to_text());
}
const Value* Evaluation::fail_negate_overflow(const Expr& e, const Value& a) {
  return fail(e, "integer overflow: -(" + a.to_text() + ")");
}
const Value* Evaluation::fail_record_attr(const Expr& e) {
  return fail(e, "record does not have the attribute `" + e.attr + "`");
}
const Value* Evaluation::fail_no_entity(const Expr& e, const EntityUid& uid) {
  return fail(e, "entity " + uid.to_text() + " does not exist");
}
const Value* Evaluation::fail_entity_attr(const Expr& e, const EntityUid& uid) {
  return fail(e, "entity " + uid.to_text() + " does not have the attribute `" + e.attr + "`");
}

const Value* Evaluation::variable(Variable v) {
  switch (v) {
    case Variable::kPrincipal:
      if (!principal_) principal_.emplace(request_.principal);
      return &*principal_;
    case Variable::kAction:
      if (!action_) action_.emplace(request_.action);
      return &*action_;
    case Variable::kResource:
      if (!resource_) resource_.emplace(request_.resource);
      return &*resource_;
    case Variable::kContext:
      return &request_.context;
  }
  return &request_.context;
}

const EntityUid* Evaluation::entity_variable(const Expr& e) const {
  if (e.kind != Expr::Kind::kVariable) return nullptr;
  switch (e.variable) {
    case Variable::kPrincipal:
      return &request_.principal;
    case Variable::kAction:
      return &request_.action;
    case Variable::kResource:
      return &request_.resource;
    case Variable::kContext:
      return nullptr;
  }
  return nullptr;
}

const Value* Evaluation::eval(const Expr& e, Value& scratch, int depth) {
  if (depth > kMaxDepth) return fail_depth(e);
  switch (e.kind) {
    case Expr::Kind::kLiteral:
      return &e.literal;
    case Expr::Kind::kVariable:
      return variable(e.variable);
    case Expr::Kind::kUnary:
      return unary(e, scratch, depth);
    case Expr::Kind::kBinary:
      if (e.binary_op == BinaryOp::kAnd || e.binary_op == BinaryOp::kOr) {
        return logical(e, scratch, depth);
      }
      return binary(e, scratch, depth);
    case Expr::Kind::kIf:
      return conditional(e, scratch, depth);
    case Expr::Kind::kGetAttr:
      return attribute(e, scratch, depth);
    case Expr::Kind::kHasAttr:
      return has_attribute(e, scratch, depth);
    case Expr::Kind::kLike:
      return like(e, scratch, depth);
    case Expr::Kind::kIs:
      return is(e, scratch, depth);
    case Expr::Kind::kSet:
      return set_literal(e, scratch, depth);
    case Expr::Kind::kRecord:
      return record_literal(e, scratch, depth);
  }
  return fail_malformed(e, "unknown kind of node");
}

const Value* Evaluation::unary(const Expr& e, Value& scratch, int depth) {
  const Expr* operand = child(e, 0);
  if (operand == nullptr) return fail_malformed(e, "unary operator without operand");
  Value s;
  const Value* v = eval(*operand, s, depth + 1);
  if (v == nullptr) return nullptr;
  switch (e.unary_op) {
    case UnaryOp::kNot:
      if (!v->is_bool()) return fail_type(e, "bool", *v);
      scratch = Value(!v->as_bool());
      return &scratch;
    case UnaryOp::kNeg: {
      if (!v->is_long()) return fail_type(e, "long", *v);
      std::int64_t result = 0;
      if (__builtin_sub_overflow(std::int64_t{0}, v->as_long(), &result)) {
        return fail_negate_overflow(e, *v);
      }
      scratch = Value(result);
      return &scratch;
    }
  }
  return fail_malformed(e, "unknown unary operator");
}

// && and || evaluate the right operand only when the left does not decide; both must be bools.
const Value* Evaluation::logical(const Expr& e, Value& scratch, int depth) {
  const Expr* left = child(e, 0);
  const Expr* right = child(e, 1);
  if (left == nullptr || right == nullptr) {
    return fail_malformed(e, "&& or || without two operands");
  }
  const bool deciding = e.binary_op == BinaryOp::kOr;
  const Value* a = eval(*left, scratch, depth + 1);
  if (a == nullptr) return nullptr;
  if (!a->is_bool()) return fail_type(e, "bool", *a);
  if (a->as_bool() == deciding) {
    scratch = Value(deciding);
    return &scratch;
  }
  const Value* b = eval(*right, scratch, depth + 1);
  if (b == nullptr) return nullptr;
  if (!b->is_bool()) return fail_type(e, "bool", *b);
  return b;
}

const Value* Evaluation::binary(const Expr& e, Value& scratch, int depth) {
  const Expr* left = child(e, 0);
  const Expr* right = child(e, 1);
  if (left == nullptr || right == nullptr) {
    return fail_malformed(e, "binary operator without two operands");
  }
  Value s1, s2;
  const Value* a = eval(*left, s1, depth + 1);
  if (a == nullptr) return nullptr;
  const Value* b = eval(*right, s2, depth + 1);
  if (b == nullptr) return nullptr;

  switch (e.binary_op) {
    case BinaryOp::kEq:
      scratch = Value(*a == *b);
      return &scratch;
    case BinaryOp::kNe:
      scratch = Value(!(*a == *b));
      return &scratch;

    case BinaryOp::kLt:
    case BinaryOp::kLe:
    case BinaryOp::kGt:
    case BinaryOp::kGe: {
      if (!a->is_long()) return fail_type(e, "long", *a);
      if (!b->is_long()) return fail_type(e, "long", *b);
      const std::int64_t x = a->as_long();
      const std::int64_t y = b->as_long();
      bool result = false;
      switch (e.binary_op) {
        case BinaryOp::kLt:
          result = x < y;
          break;
        case BinaryOp::kLe:
          result = x <= y;
          break;
        case BinaryOp::kGt:
          result = x > y;
          break;
        default:
          result = x >= y;
          break;
      }
      scratch = Value(result);
      return &scratch;
    }

    case BinaryOp::kAdd:
    case BinaryOp::kSub:
    case BinaryOp::kMul: {
      if (!a->is_long()) return fail_type(e, "long", *a);
      if (!b->is_long()) return fail_type(e, "long", *b);
      std::int64_t result = 0;
      bool overflow = false;
      switch (e.binary_op) {
        case BinaryOp::kAdd:
          overflow = __builtin_add_overflow(a->as_long(), b->as_long(), &result);
          break;
        case BinaryOp::kSub:
          overflow = __builtin_sub_overflow(a->as_long(), b->as_long(), &result);
          break;
        default:
          overflow = __builtin_mul_overflow(a->as_long(), b->as_long(), &result);
          break;
      }
      if (overflow) return fail_overflow(e, *a, e.binary_op, *b);
      scratch = Value(result);
      return &scratch;
    }

    case BinaryOp::kIn:
      return in(e, *a, *b, scratch);

    case BinaryOp::kContains: {
      if (!a->is_set()) return fail_type(e, "set", *a);
      const ValueSet& set = a->as_set();
      scratch = Value(std::binary_search(set.begin(), set.end(), *b));
      return &scratch;
    }
    case BinaryOp::kContainsAll:
    case BinaryOp::kContainsAny: {
      if (!a->is_set()) return fail_type(e, "set", *a);
      if (!b->is_set()) return fail_type(e, "set", *b);
      scratch = Value(e.binary_op == BinaryOp::kContainsAll ? includes_all(a->as_set(), b->as_set())
                                                            : intersects(a->as_set(), b->as_set()));
      return &scratch;
    }

    case BinaryOp::kAnd:
    case BinaryOp::kOr:
      return logical(e, scratch, depth);  // not reached: eval() sends these to logical()
  }
  return fail_malformed(e, "unknown binary operator");
}

const Value* Evaluation::in(const Expr& e, const Value& a, const Value& b, Value& scratch) {
  if (!a.is_entity()) return fail_type(e, "entity", a);
  const EntityUid& uid = a.as_entity();
  if (b.is_entity()) {
    scratch = Value(entities_.is_in(uid, b.as_entity()));
    return &scratch;
  }
  if (!b.is_set()) return fail_type(e, "entity or set of entities", b);
  // Every element must be an entity, even when an earlier one already matches.
  for (const Value& element : b.as_set()) {
    if (!element.is_entity()) return fail_type(e, "entity in the set", element);
  }
  bool found = false;
  for (const Value& element : b.as_set()) {
    if (entities_.is_in(uid, element.as_entity())) {
      found = true;
      break;
    }
  }
  scratch = Value(found);
  return &scratch;
}

const Value* Evaluation::conditional(const Expr& e, Value& scratch, int depth) {
  const Expr* test = child(e, 0);
  const Expr* then_branch = child(e, 1);
  const Expr* else_branch = child(e, 2);
  if (test == nullptr || then_branch == nullptr || else_branch == nullptr) {
    return fail_malformed(e, "if without its three parts");
  }
  const Value* cond = eval(*test, scratch, depth + 1);
  if (cond == nullptr) return nullptr;
  if (!cond->is_bool()) return fail_type(*test, "bool", *cond);
  // Only the taken branch is evaluated; its result lands in the caller's scratch.
  return eval(cond->as_bool() ? *then_branch : *else_branch, scratch, depth + 1);
}

const Value* Evaluation::attribute(const Expr& e, Value& scratch, int depth) {
  const Expr* operand = child(e, 0);
  if (operand == nullptr) return fail_malformed(e, "attribute access without operand");
  const EntityUid* uid = entity_variable(*operand);
  Value s;
  if (uid == nullptr) {
    const Value* v = eval(*operand, s, depth + 1);
    if (v == nullptr) return nullptr;
    if (v->is_record()) {
      const ValueRecord& record = v->as_record();
      auto it = record.find(e.attr);
      if (it == record.end()) return fail_record_attr(e);
      if (v != &s) return &it->second;
      scratch = it->second;  // the record dies with `s`
      return &scratch;
    }
    if (!v->is_entity()) return fail_type(e, "entity or record", *v);
    uid = &v->as_entity();
  }
  const Entity* entity = entities_.find(*uid);
  if (entity == nullptr) return fail_no_entity(e, *uid);
  auto it = entity->attrs.find(e.attr);
  if (it == entity->attrs.end()) return fail_entity_attr(e, *uid);
  return &it->second;
}

const Value* Evaluation::has_attribute(const Expr& e, Value& scratch, int depth) {
  const Expr* operand = child(e, 0);
  if (operand == nullptr) return fail_malformed(e, "has without operand");
  const EntityUid* uid = entity_variable(*operand);
  Value s;
  if (uid == nullptr) {
    const Value* v = eval(*operand, s, depth + 1);
    if (v == nullptr) return nullptr;
    if (v->is_record()) {
      scratch = Value(v->as_record().count(e.attr) != 0);
      return &scratch;
    }
    if (!v->is_entity()) return fail_type(e, "entity or record", *v);
    uid = &v->as_entity();
  }
  // An entity the store does not hold has no attributes (not an error, unlike `.attr`).
  const Entity* entity = entities_.find(*uid);
  scratch = Value(entity != nullptr && entity->attrs.count(e.attr) != 0);
  return &scratch;
}

const Value* Evaluation::like(const Expr& e, Value& scratch, int depth) {
  const Expr* operand = child(e, 0);
  if (operand == nullptr) return fail_malformed(e, "like without operand");
  const Value* v = eval(*operand, scratch, depth + 1);
  if (v == nullptr) return nullptr;
  if (!v->is_string()) return fail_type(e, "string", *v);
  const bool match = matches_pattern(v->as_string(), e.pattern);
  scratch = Value(match);  // may overwrite the string `v` points to: read first
  return &scratch;
}

const Value* Evaluation::is(const Expr& e, Value& scratch, int depth) {
  const Expr* operand = child(e, 0);
  if (operand == nullptr) return fail_malformed(e, "is without operand");
  if (const EntityUid* uid = entity_variable(*operand)) {
    scratch = Value(uid->type == e.entity_type);
    return &scratch;
  }
  const Value* v = eval(*operand, scratch, depth + 1);
  if (v == nullptr) return nullptr;
  if (!v->is_entity()) return fail_type(e, "entity", *v);
  const bool same = v->as_entity().type == e.entity_type;
  scratch = Value(same);
  return &scratch;
}

const Value* Evaluation::set_literal(const Expr& e, Value& scratch, int depth) {
  std::vector<Value> elements;
  elements.reserve(e.children.size());
  for (const ExprPtr& element : e.children) {
    if (element == nullptr) return fail_malformed(e, "empty set element");
    Value s;
    const Value* v = eval(*element, s, depth + 1);
    if (v == nullptr) return nullptr;
    elements.push_back(v == &s ? std::move(s) : *v);
  }
  scratch = Value::set(std::move(elements));
  return &scratch;
}

const Value* Evaluation::record_literal(const Expr& e, Value& scratch, int depth) {
  if (e.keys.size() != e.children.size()) {
    return fail_malformed(e, "record keys and values differ in number");
  }
  ValueRecord fields;
  for (std::size_t i = 0; i < e.children.size(); ++i) {
    const Expr* field = e.children[i].get();
    if (field == nullptr) return fail_malformed(e, "empty record field");
    Value s;
    const Value* v = eval(*field, s, depth + 1);
    if (v == nullptr) return nullptr;
    fields.insert_or_assign(e.keys[i], v == &s ? std::move(s) : *v);
  }
  scratch = Value::record(std::move(fields));
  return &scratch;
}

// Finds the literal parts [first, last) back to back in text[from, limit), leftmost; returns the
// offset just past them, or npos.
std::size_t find_run(std::string_view text, std::size_t from, std::size_t limit,
                     const std::vector<PatternPart>& parts, std::size_t first, std::size_t last) {
  std::size_t length = 0;
  for (std::size_t i = first; i < last; ++i) length += parts[i].text.size();
  if (length == 0) return from;
  if (limit < from || limit - from < length) return std::string_view::npos;
  std::string_view window = text.substr(from, limit - from);
  // Anchor on the first non-empty part; check the rest follow it.
  std::size_t anchor = first;
  while (parts[anchor].text.empty()) ++anchor;
  std::size_t search = 0;
  while (true) {
    std::size_t at = window.find(parts[anchor].text, search);
    if (at == std::string_view::npos || window.size() - at < length) return std::string_view::npos;
    std::size_t pos = at;
    bool ok = true;
    for (std::size_t i = anchor; i < last && ok; ++i) {
      const std::string& piece = parts[i].text;
      ok = window.compare(pos, piece.size(), piece) == 0;
      pos += piece.size();
    }
    if (ok) return from + pos;
    search = at + 1;
  }
}

}  // namespace

EvalResult evaluate(const Expr& expr, const Request& request, const Entities& entities) {
  Evaluation evaluation(request, entities);
  Value scratch;
  const Value* v = evaluation.eval(expr, scratch, 0);
  if (v == nullptr) return std::move(evaluation.error());
  if (v == &scratch) return scratch;  // moved: a local
  return *v;
}

// Wildcards split the pattern into literal runs. The first run must be a prefix, the last a
// suffix, and each run between them is matched leftmost in what remains (greedy leftmost is
// exact for `*`-only patterns), so the cost is at most text length x pattern length and never
// exponential. Text and pattern are UTF-8 (Cedar strings are Unicode): because UTF-8 is
// self-synchronising, a run of whole characters matches bytes exactly where it matches
// characters, so matching bytes is matching Unicode scalar values.
bool matches_pattern(std::string_view text, const std::vector<PatternPart>& pattern) {
  const std::size_t n = pattern.size();
  std::size_t first_star = n;
  std::size_t last_star = n;
  for (std::size_t i = 0; i < n; ++i) {
    if (pattern[i].wildcard) {
      if (first_star == n) first_star = i;
      last_star = i;
    }
  }
  // The parts before the first star (all of them when there is none) must start the text.
  std::size_t pos = 0;
  for (std::size_t i = 0; i < first_star; ++i) {
    const std::string& piece = pattern[i].text;
    if (text.compare(pos, piece.size(), piece) != 0) return false;  // also when text runs out
    pos += piece.size();
  }
  if (first_star == n) return pos == text.size();

  // Suffix: the parts after the last star, ending at the text's end, not overlapping the prefix.
  std::size_t suffix_length = 0;
  for (std::size_t i = last_star + 1; i < n; ++i) suffix_length += pattern[i].text.size();
  if (text.size() - pos < suffix_length) return false;
  const std::size_t limit = text.size() - suffix_length;
  {
    std::size_t at = limit;
    for (std::size_t i = last_star + 1; i < n; ++i) {
      const std::string& piece = pattern[i].text;
      if (text.compare(at, piece.size(), piece) != 0) return false;
      at += piece.size();
    }
  }
  // Middle runs, between consecutive stars, leftmost within [pos, limit).
  std::size_t i = first_star + 1;
  while (i < last_star) {
    std::size_t j = i;
    while (j < last_star && !pattern[j].wildcard) ++j;
    pos = find_run(text, pos, limit, pattern, i, j);
    if (pos == std::string_view::npos) return false;
    i = j + 1;
  }
  return true;
}

}  // namespace medgate::rules
