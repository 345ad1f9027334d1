// Fuzz target: parse_policies, parse_expression and parse_entity_uid (ledger/rules/parser.h), the
// consent rules an admin or a grant writes. Properties: never crashes, whatever the nesting or
// size (the parser's limits hold); every error is located inside the text; accepted policies,
// printed with to_text, parse again without errors to the same policies (the same to_text and
// ids), and the validator runs on them; the same round trip for one expression and for an
// entity uid.
#include <string>
#include <string_view>
#include <vector>

#include "ledger/rules/parser.h"
#include "ledger/rules/validator.h"
#include "tests/fuzz/fuzz_check.h"

using namespace medgate;
using namespace medgate::rules;

namespace {

void check_located(const std::vector<Diagnostic>& errors, std::string_view text) {
  for (const Diagnostic& d : errors) {
    FUZZ_CHECK(d.location.line >= 1 && d.location.column >= 1 && d.location.offset <= text.size(),
               "an error outside the text: %s (offset %u of %zu)", d.to_text().c_str(),
               d.location.offset, text.size());
    FUZZ_CHECK(!d.message.empty(), "an error without a message at %s", d.to_text().c_str());
  }
}

void policies_round_trip(std::string_view text) {
  ParseResult parsed = parse_policies(text);
  check_located(parsed.errors, text);
  if (!parsed.ok()) return;
  (void)validate(parsed.policies);
  std::string printed = to_text(parsed.policies);
  ParseResult back = parse_policies(printed);
  FUZZ_CHECK(back.ok(), "the printed policies do not parse: %s\n--- printed:\n%s",
             back.errors.empty() ? "" : back.errors.front().to_text().c_str(), printed.c_str());
  FUZZ_CHECK(back.policies.policies.size() == parsed.policies.policies.size(),
             "%zu policies became %zu\n--- printed:\n%s", parsed.policies.policies.size(),
             back.policies.policies.size(), printed.c_str());
  std::string reprinted = to_text(back.policies);
  FUZZ_CHECK(reprinted == printed, "the policies changed\n--- printed:\n%s\n--- reprinted:\n%s",
             printed.c_str(), reprinted.c_str());
  for (std::size_t i = 0; i < back.policies.policies.size(); ++i) {
    FUZZ_CHECK(back.policies.policies[i].id == parsed.policies.policies[i].id,
               "policy %zu's id changed\n--- printed:\n%s", i, printed.c_str());
  }
}

void expression_round_trip(std::string_view text) {
  ExprParseResult parsed = parse_expression(text);
  check_located(parsed.errors, text);
  FUZZ_CHECK((parsed.expr == nullptr) == !parsed.errors.empty(),
             "an expression and errors, or neither");
  if (!parsed.expr) return;
  std::string printed = to_text(*parsed.expr);
  ExprParseResult back = parse_expression(printed);
  FUZZ_CHECK(back.expr != nullptr, "the printed expression does not parse: %s\n--- printed:\n%s",
             back.errors.empty() ? "" : back.errors.front().to_text().c_str(), printed.c_str());
  std::string reprinted = to_text(*back.expr);
  FUZZ_CHECK(reprinted == printed, "the expression changed\n--- printed:\n%s\n--- reprinted:\n%s",
             printed.c_str(), reprinted.c_str());
}

void entity_uid_round_trip(std::string_view text) {
  Result<EntityUid> uid = parse_entity_uid(text);
  if (!uid.ok()) {
    FUZZ_CHECK(uid.status().code() == StatusCode::kInvalidArgument, "%s",
               uid.status().to_string().c_str());
    return;
  }
  std::string printed = uid->to_text();
  Result<EntityUid> back = parse_entity_uid(printed);
  FUZZ_CHECK(back.ok() && *back == *uid, "the entity uid changed\n--- printed:\n%s",
             printed.c_str());
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size > fuzz::kMaxInput) return 0;
  std::string_view text(reinterpret_cast<const char*>(data), size);
  policies_round_trip(text);
  expression_round_trip(text);
  entity_uid_round_trip(text);
  return 0;
}
