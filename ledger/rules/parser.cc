// CONSENSUS-CRITICAL (rule semantics): see parser.h. A hand-written lexer and recursive-descent
// parser for medgate's Cedar subset, following Cedar's grammar and precedence
// (https://docs.cedarpolicy.com/policies/syntax-grammar.html):
//
//   Expr     := 'if' Expr 'then' Expr 'else' Expr | Or
//   Or       := And {'||' And}
//   And      := Relation {'&&' Relation}
//   Relation := Add [RELOP Add | 'has' (IDENT | STR) | 'like' PAT | 'is' Path ['in' Add]]
//   Add      := Mult {('+' | '-') Mult}
//   Mult     := Unary {'*' Unary}
//   Unary    := ['!'{1..4} | '-'{1..4}] Member
//   Member   := Primary {'.' IDENT ['(' Exprs ')'] | '[' STR ']'}
//   Primary  := LITERAL | VAR | Entity | '(' Expr ')' | '[' Exprs ']' | '{' RecInits '}'
//
// Relations do not chain (`a == b == c` needs parentheses), as in Cedar. `-` directly before an
// integer literal makes a negative literal (so -9223372036854775808 is the minimum Long), and
// `x is T in y` becomes (x is T) && (x in y).
//
// Errors: the first error inside a policy is reported where it is; the parser then skips past
// the next `;` and goes on, so one run reports a problem in every broken policy. Recursion is
// bounded twice, both at kMaxNesting: by the nesting of brackets (parse_expr's depth) and by the
// depth of the tree built, since every later pass over the tree (printer, validator, evaluator,
// the destructor) recurses on it, and a left-associative chain `1 + 1 + ...` is deep without
// being nested. The tree's size with shared subtrees expanded is bounded too (see
// kMaxExpandedNodes).
#include "ledger/rules/parser.h"

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <utility>

#include "ledger/rules/lexical.h"

namespace medgate::rules {

namespace {

constexpr std::string_view kReservedWords[] = {"true", "false", "if",  "then", "else",
                                               "in",   "like",  "has", "is",   "__cedar"};

// Cedar allows at most this many `!` or `-` in a row before an operand.
constexpr int kMaxUnaryRun = 4;

bool is_ident_start(char c) {
  return c == '_' || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
}
bool is_digit(char c) {
  return c >= '0' && c <= '9';
}
bool is_ident_char(char c) {
  return is_ident_start(c) || is_digit(c);
}

std::optional<unsigned> hex_value(char c) {
  if (c >= '0' && c <= '9') return static_cast<unsigned>(c - '0');
  if (c >= 'a' && c <= 'f') return static_cast<unsigned>(c - 'a' + 10);
  if (c >= 'A' && c <= 'F') return static_cast<unsigned>(c - 'A' + 10);
  return std::nullopt;
}

// Length of the well-formed UTF-8 sequence at s[i] (1 for ASCII), or 0 when there is none.
std::size_t utf8_length(std::string_view s, std::size_t i) {
  auto byte = [&](std::size_t k) -> unsigned {
    return i + k < s.size() ? static_cast<unsigned char>(s[i + k]) : 0u;
  };
  auto cont = [&](std::size_t k, unsigned lo = 0x80, unsigned hi = 0xBF) {
    unsigned b = byte(k);
    return b >= lo && b <= hi;
  };
  unsigned b0 = byte(0);
  if (i >= s.size()) return 0;
  if (b0 < 0x80) return 1;
  if (b0 >= 0xC2 && b0 <= 0xDF) return cont(1) ? 2 : 0;
  if (b0 == 0xE0) return cont(1, 0xA0) && cont(2) ? 3 : 0;
  if (b0 == 0xED) return cont(1, 0x80, 0x9F) && cont(2) ? 3 : 0;  // no surrogates
  if (b0 >= 0xE1 && b0 <= 0xEF) return cont(1) && cont(2) ? 3 : 0;
  if (b0 == 0xF0) return cont(1, 0x90) && cont(2) && cont(3) ? 4 : 0;
  if (b0 >= 0xF1 && b0 <= 0xF3) return cont(1) && cont(2) && cont(3) ? 4 : 0;
  if (b0 == 0xF4) return cont(1, 0x80, 0x8F) && cont(2) && cont(3) ? 4 : 0;
  return 0;
}

void append_utf8(std::string& out, std::uint32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

// Moves a location over one byte: a column is a character, so UTF-8 continuation bytes do not
// count.
void step(SourceLocation& loc, unsigned char c) {
  ++loc.offset;
  if (c == '\n') {
    ++loc.line;
    loc.column = 1;
  } else if ((c & 0xC0) != 0x80) {
    ++loc.column;
  }
}

SourceLocation location_after(SourceLocation loc, std::string_view passed) {
  for (char c : passed) step(loc, static_cast<unsigned char>(c));
  return loc;
}

// An identifier or number as it may appear in a message: never more than the token, and not
// all of a very long one.
std::string quoted(std::string_view text) {
  constexpr std::size_t kMax = 40;
  if (text.size() <= kMax) return "`" + std::string(text) + "`";
  std::size_t cut = kMax;
  while (cut > 0 && (static_cast<unsigned char>(text[cut]) & 0xC0) == 0x80) --cut;
  return "`" + std::string(text.substr(0, cut)) + "...`";
}

// ---------------------------------------------------------------------------------------------
// Lexer

enum class Tok {
  kIdent,
  kInt,
  kString,  // text: the body between the quotes, escapes not yet decoded
  kSlot,    // ?principal: a template slot (not supported)
  kAt,
  kDot,
  kComma,
  kSemi,
  kColon,
  kColonColon,
  kLParen,
  kRParen,
  kLBrace,
  kRBrace,
  kLBracket,
  kRBracket,
  kEqEq,
  kNe,
  kLt,
  kLe,
  kGt,
  kGe,
  kAssign,  // `=`: not an operator; lexed to say "use `==`"
  kOrOr,
  kAndAnd,
  kPlus,
  kMinus,
  kStar,
  kSlash,  // `/` and `%`: not operators in Cedar; lexed to name them
  kPercent,
  kBang,
  kError,  // a lexical error; `error` says what
  kEnd,
};

struct Token {
  Tok kind = Tok::kEnd;
  std::string_view text;
  SourceLocation location;
  std::string error;
};

class Lexer {
 public:
  explicit Lexer(std::string_view text) : text_(text) {
    loc_.line = 1;
    loc_.column = 1;
  }

  // Every token, then one kEnd.
  std::vector<Token> run() {
    std::vector<Token> out;
    for (;;) {
      skip_space_and_comments();
      if (pos_ >= text_.size()) {
        Token end;
        end.kind = Tok::kEnd;
        end.location = loc_;
        out.push_back(std::move(end));
        return out;
      }
      out.push_back(next_token());
    }
  }

 private:
  char at(std::size_t i) const { return i < text_.size() ? text_[i] : '\0'; }

  void advance_to(std::size_t end) {
    end = std::min(end, text_.size());
    while (pos_ < end) step(loc_, static_cast<unsigned char>(text_[pos_++]));
  }

  void skip_space_and_comments() {
    while (pos_ < text_.size()) {
      char c = text_[pos_];
      if (c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v') {
        advance_to(pos_ + 1);
      } else if (c == '/' && at(pos_ + 1) == '/') {
        std::size_t end = text_.find('\n', pos_);
        advance_to(end == std::string_view::npos ? text_.size() : end);
      } else {
        return;
      }
    }
  }

  Token make(Tok kind, std::size_t end) {
    Token t;
    t.kind = kind;
    t.location = loc_;
    t.text = text_.substr(pos_, end - pos_);
    advance_to(end);
    return t;
  }

  Token error(std::size_t end, std::string message) {
    Token t = make(Tok::kError, end);
    t.error = std::move(message);
    return t;
  }

  std::size_t scan_identifier(std::size_t i) const {
    while (i < text_.size() && is_ident_char(text_[i])) ++i;
    return i;
  }

  Token next_token() {
    char c = text_[pos_];
    if (is_ident_start(c)) return make(Tok::kIdent, scan_identifier(pos_ + 1));
    if (is_digit(c)) {
      std::size_t i = pos_ + 1;
      while (i < text_.size() && is_digit(text_[i])) ++i;
      return make(Tok::kInt, i);
    }
    if (c == '"') return string_token();
    if (c == '?') {
      if (is_ident_start(at(pos_ + 1))) return make(Tok::kSlot, scan_identifier(pos_ + 1));
      return error(pos_ + 1, "unexpected character `?`");
    }
    char d = at(pos_ + 1);
    struct Pair {
      char a, b;
      Tok kind;
    };
    static constexpr Pair kPairs[] = {{':', ':', Tok::kColonColon}, {'=', '=', Tok::kEqEq},
                                      {'!', '=', Tok::kNe},         {'<', '=', Tok::kLe},
                                      {'>', '=', Tok::kGe},         {'|', '|', Tok::kOrOr},
                                      {'&', '&', Tok::kAndAnd}};
    for (const Pair& p : kPairs) {
      if (c == p.a && d == p.b) return make(p.kind, pos_ + 2);
    }
    switch (c) {
      case '@':
        return make(Tok::kAt, pos_ + 1);
      case '.':
        return make(Tok::kDot, pos_ + 1);
      case ',':
        return make(Tok::kComma, pos_ + 1);
      case ';':
        return make(Tok::kSemi, pos_ + 1);
      case ':':
        return make(Tok::kColon, pos_ + 1);
      case '(':
        return make(Tok::kLParen, pos_ + 1);
      case ')':
        return make(Tok::kRParen, pos_ + 1);
      case '{':
        return make(Tok::kLBrace, pos_ + 1);
      case '}':
        return make(Tok::kRBrace, pos_ + 1);
      case '[':
        return make(Tok::kLBracket, pos_ + 1);
      case ']':
        return make(Tok::kRBracket, pos_ + 1);
      case '<':
        return make(Tok::kLt, pos_ + 1);
      case '>':
        return make(Tok::kGt, pos_ + 1);
      case '=':
        return make(Tok::kAssign, pos_ + 1);
      case '+':
        return make(Tok::kPlus, pos_ + 1);
      case '-':
        return make(Tok::kMinus, pos_ + 1);
      case '*':
        return make(Tok::kStar, pos_ + 1);
      case '/':
        return make(Tok::kSlash, pos_ + 1);
      case '%':
        return make(Tok::kPercent, pos_ + 1);
      case '!':
        return make(Tok::kBang, pos_ + 1);
      case '|':
        return error(pos_ + 1, "unexpected character `|` (Cedar's or is `||`)");
      case '&':
        return error(pos_ + 1, "unexpected character `&` (Cedar's and is `&&`)");
      default:
        break;
    }
    auto u = static_cast<unsigned char>(c);
    if (u >= 0x80) {
      std::size_t n = utf8_length(text_, pos_);
      if (n == 0) return error(pos_ + 1, "invalid UTF-8");
      return error(pos_ + n, "unexpected character `" + std::string(text_.substr(pos_, n)) + "`");
    }
    if (u < 0x20 || u == 0x7f) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "%02x", u);
      return error(pos_ + 1, std::string("unexpected control character 0x") + buf);
    }
    return error(pos_ + 1, "unexpected character `" + std::string(1, c) + "`");
  }

  // A string's body is checked for well-formed UTF-8 here; its escapes are decoded by the parser,
  // which knows whether it is a `like` pattern.
  Token string_token() {
    std::size_t i = pos_ + 1;
    bool bad_utf8 = false;
    for (;;) {
      if (i >= text_.size()) {
        return error(text_.size(), "unterminated string: no closing `\"`");
      }
      auto c = static_cast<unsigned char>(text_[i]);
      if (c == '"') break;
      if (c == '\\') {
        ++i;
        // The escaped character, when ASCII, never ends the string; a non-ASCII one is checked
        // as UTF-8 on the next turn (and refused as an escape later).
        if (i < text_.size() && static_cast<unsigned char>(text_[i]) < 0x80) ++i;
        continue;
      }
      if (c < 0x80) {
        ++i;
        continue;
      }
      std::size_t n = utf8_length(text_, i);
      if (n == 0) {
        bad_utf8 = true;
        ++i;
      } else {
        i += n;
      }
    }
    Token t;
    t.kind = bad_utf8 ? Tok::kError : Tok::kString;
    t.location = loc_;
    t.text = text_.substr(pos_ + 1, i - pos_ - 1);
    if (bad_utf8) t.error = "invalid UTF-8 in a string";
    advance_to(i + 1);
    return t;
  }

  std::string_view text_;
  std::size_t pos_ = 0;
  SourceLocation loc_;
};

// ---------------------------------------------------------------------------------------------
// Escapes

struct EscapeError {
  std::size_t at = 0;  // byte offset in the string's body
  std::string message;
};

// Cedar's escapes: \n \r \t \\ \0 \' \" \xHH (at most 7f) \u{1 to 6 hex digits}. In a `like`
// pattern an unescaped `*` is a wildcard and `\*` a literal star; elsewhere `\*` is an error.
std::optional<EscapeError> unescape(std::string_view body, bool pattern,
                                    std::vector<PatternPart>& parts) {
  std::string run;
  auto flush = [&] {
    if (!run.empty()) parts.push_back(PatternPart{false, std::move(run)});
    run.clear();
  };
  std::size_t i = 0;
  while (i < body.size()) {
    char c = body[i];
    if (c == '*' && pattern) {
      flush();
      parts.push_back(PatternPart{true, {}});
      ++i;
      continue;
    }
    if (c != '\\') {
      run += c;
      ++i;
      continue;
    }
    char e = i + 1 < body.size() ? body[i + 1] : '\0';
    switch (e) {
      case 'n':
        run += '\n';
        i += 2;
        continue;
      case 'r':
        run += '\r';
        i += 2;
        continue;
      case 't':
        run += '\t';
        i += 2;
        continue;
      case '\\':
        run += '\\';
        i += 2;
        continue;
      case '0':
        run += '\0';
        i += 2;
        continue;
      case '\'':
        run += '\'';
        i += 2;
        continue;
      case '"':
        run += '"';
        i += 2;
        continue;
      case '*':
        if (!pattern) return EscapeError{i, "`\\*` is an escape only in a `like` pattern"};
        run += '*';
        i += 2;
        continue;
      case 'x': {
        auto h = hex_value(i + 2 < body.size() ? body[i + 2] : '\0');
        auto l = hex_value(i + 3 < body.size() ? body[i + 3] : '\0');
        if (!h || !l) return EscapeError{i, "`\\x` needs two hex digits"};
        unsigned v = *h * 16 + *l;
        if (v > 0x7f) return EscapeError{i, "`\\x` escapes only go up to `\\x7f`; use `\\u{...}`"};
        run += static_cast<char>(v);
        i += 4;
        continue;
      }
      case 'u': {
        std::size_t j = i + 2;
        if (j >= body.size() || body[j] != '{') {
          return EscapeError{i, "`\\u` needs braces: `\\u{hex digits}`"};
        }
        ++j;
        std::uint32_t cp = 0;
        int digits = 0;
        while (j < body.size() && hex_value(body[j])) {
          if (++digits > 6) return EscapeError{i, "`\\u{...}` takes at most 6 hex digits"};
          cp = cp * 16 + *hex_value(body[j]);
          ++j;
        }
        if (digits == 0 || j >= body.size() || body[j] != '}') {
          return EscapeError{i, "`\\u{...}` needs 1 to 6 hex digits and a closing `}`"};
        }
        if (cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) {
          return EscapeError{i, "`\\u{...}` is not a Unicode scalar value"};
        }
        append_utf8(run, cp);
        i = j + 1;
        continue;
      }
      default:
        if (static_cast<unsigned char>(e) >= 0x20 && static_cast<unsigned char>(e) < 0x7f) {
          return EscapeError{i, std::string("invalid escape `\\") + e + "`"};
        }
        return EscapeError{i, "invalid escape sequence"};
    }
  }
  flush();
  return std::nullopt;
}

// ---------------------------------------------------------------------------------------------
// Parser

// `x is T in y` becomes (x is T) && (x in y) with x shared, so a tree can be far larger than
// its text: nesting `(... is T in y) is T in y` doubles it each time. Every pass over the tree
// (printing, evaluating) visits x twice, so the size that counts is this expanded one.
constexpr std::uint64_t kMaxExpandedNodes = std::uint64_t{1} << 20;

// An expression being built, with the depth of its tree and its size counted with every shared
// subtree as often as it is used.
struct Parsed {
  ExprPtr expr;
  int depth = 0;
  std::uint64_t size = 0;
  explicit operator bool() const { return expr != nullptr; }
};

// The children's greatest depth and total size, to measure the node above them.
struct Children {
  int depth = 0;
  std::uint64_t size = 0;
  Children& add(const Parsed& p) {
    depth = std::max(depth, p.depth);
    size += p.size;
    return *this;
  }
};

std::shared_ptr<Expr> new_expr(Expr::Kind kind, SourceLocation location) {
  auto e = std::make_shared<Expr>();
  e->kind = kind;
  e->location = location;
  return e;
}

std::optional<BinaryOp> relational_op(const Token& t) {
  switch (t.kind) {
    case Tok::kEqEq:
      return BinaryOp::kEq;
    case Tok::kNe:
      return BinaryOp::kNe;
    case Tok::kLt:
      return BinaryOp::kLt;
    case Tok::kLe:
      return BinaryOp::kLe;
    case Tok::kGt:
      return BinaryOp::kGt;
    case Tok::kGe:
      return BinaryOp::kGe;
    case Tok::kIdent:
      if (t.text == "in") return BinaryOp::kIn;
      return std::nullopt;
    default:
      return std::nullopt;
  }
}

class Parser {
 public:
  explicit Parser(std::string_view text) : tokens_(Lexer(text).run()) {}

  ParseResult parse_file() {
    ParseResult result;
    std::size_t index = 0;
    std::map<std::string, SourceLocation> ids;
    while (!at(Tok::kEnd)) {
      failed_ = false;
      nesting_ = 0;
      Policy policy;
      if (parse_policy(index, policy)) {
        auto [it, inserted] = ids.emplace(policy.id, policy.location);
        if (inserted) {
          result.policies.policies.push_back(std::move(policy));
        } else {
          errors_.push_back(Diagnostic{policy.location,
                                       "duplicate policy id " + quoted(policy.id) +
                                           " (first used at line " +
                                           std::to_string(it->second.line) + ")",
                                       policy.id});
        }
      } else {
        skip_past_semicolon();
      }
      ++index;
    }
    result.errors = std::move(errors_);
    return result;
  }

  ExprParseResult parse_one_expression() {
    ExprParseResult result;
    Parsed e = parse_expr();
    if (e && !at(Tok::kEnd)) fail_expected(peek(), "an operator or the end of the expression");
    if (!failed_) result.expr = std::move(e.expr);
    result.errors = std::move(errors_);
    return result;
  }

  Result<EntityUid> parse_one_entity_uid() {
    EntityUid uid;
    if (parse_entity(uid) && !at(Tok::kEnd)) fail_expected(peek(), "the end of the entity uid");
    if (failed_ && !errors_.empty()) {
      return Status::InvalidArgument("entity uid: " + errors_.front().to_text());
    }
    return uid;
  }

 private:
  // --- tokens ---------------------------------------------------------------------------------
  const Token& peek(std::size_t k = 0) const {
    std::size_t i = pos_ + k;
    return i < tokens_.size() ? tokens_[i] : tokens_.back();
  }
  void next() {
    if (pos_ + 1 < tokens_.size()) ++pos_;
  }
  bool at(Tok kind, std::size_t k = 0) const { return peek(k).kind == kind; }
  bool at_word(std::string_view word, std::size_t k = 0) const {
    const Token& t = peek(k);
    return t.kind == Tok::kIdent && t.text == word;
  }

  void skip_past_semicolon() {
    while (!at(Tok::kEnd)) {
      bool semicolon = at(Tok::kSemi);
      next();
      if (semicolon) return;
    }
  }

  // --- errors ---------------------------------------------------------------------------------
  // Records the first error of the current policy (or expression); later ones are consequences.
  void fail(SourceLocation location, std::string message) {
    if (failed_) return;
    failed_ = true;
    errors_.push_back(Diagnostic{location, std::move(message), current_policy_id_});
  }

  static std::string describe(const Token& t) {
    switch (t.kind) {
      case Tok::kEnd:
        return "end of input";
      case Tok::kString:
        return "a string";
      case Tok::kAssign:
        return "`=` (Cedar compares with `==`)";
      default:
        return quoted(t.text);
    }
  }

  void fail_expected(const Token& found, std::string_view expected) {
    if (found.kind == Tok::kError) return fail(found.location, found.error);
    if (found.kind == Tok::kSlot) {
      return fail(found.location, "template slots like " + quoted(found.text) +
                                      " are not supported in medgate's Cedar subset");
    }
    fail(found.location, "expected " + std::string(expected) + ", found " + describe(found));
  }

  bool expect(Tok kind, std::string_view what) {
    if (at(kind)) {
      next();
      return true;
    }
    fail_expected(peek(), what);
    return false;
  }

  bool expect_word(std::string_view word) {
    if (at_word(word)) {
      next();
      return true;
    }
    fail_expected(peek(), "`" + std::string(word) + "`");
    return false;
  }

  // --- strings --------------------------------------------------------------------------------
  // Where the escape at byte `at` of a string token's body is.
  static SourceLocation escape_location(const Token& t, std::size_t at) {
    SourceLocation loc = t.location;
    step(loc, '"');
    return location_after(loc, t.text.substr(0, at));
  }

  std::optional<std::string> string_value(const Token& t) {
    std::vector<PatternPart> parts;
    if (auto e = unescape(t.text, /*pattern=*/false, parts)) {
      fail(escape_location(t, e->at), e->message);
      return std::nullopt;
    }
    std::string out;
    for (PatternPart& p : parts) out += p.text;
    return out;
  }

  std::optional<std::vector<PatternPart>> pattern_value(const Token& t) {
    std::vector<PatternPart> parts;
    if (auto e = unescape(t.text, /*pattern=*/true, parts)) {
      fail(escape_location(t, e->at), e->message);
      return std::nullopt;
    }
    return parts;
  }

  // --- names ----------------------------------------------------------------------------------
  // One part of an entity type: an identifier that is not reserved.
  bool check_name_part(const Token& t) {
    if (t.text == "__cedar") {
      fail(t.location, "`__cedar` names are not supported in medgate's Cedar subset");
      return false;
    }
    if (is_reserved_word(t.text)) {
      fail(t.location, quoted(t.text) + " is a reserved word and cannot name an entity type");
      return false;
    }
    return true;
  }

  // Path := IDENT {'::' IDENT}, stopping before a `::` that is not followed by an identifier
  // (the `::"id"` of an entity uid).
  bool parse_path(std::string& type, std::string_view what) {
    const Token& first = peek();
    if (first.kind != Tok::kIdent) {
      fail_expected(first, what);
      return false;
    }
    if (!check_name_part(first)) return false;
    type = std::string(first.text);
    next();
    while (at(Tok::kColonColon) && at(Tok::kIdent, 1)) {
      if (!check_name_part(peek(1))) return false;
      type += "::";
      type += peek(1).text;
      next();
      next();
    }
    return true;
  }

  // Entity := Path '::' STR
  bool parse_entity(EntityUid& uid) {
    if (!parse_path(uid.type, "an entity uid such as `Type::\"id\"`")) return false;
    if (!expect(Tok::kColonColon, "`::` and a quoted id after the entity type")) return false;
    return parse_entity_id(uid);
  }

  bool parse_entity_id(EntityUid& uid) {
    const Token& t = peek();
    if (t.kind == Tok::kLBrace) {
      fail(t.location,
           "entity uids written as records are not supported in medgate's Cedar subset");
      return false;
    }
    if (t.kind != Tok::kString) {
      fail_expected(t, "a quoted entity id after `::`");
      return false;
    }
    auto id = string_value(t);
    if (!id) return false;
    uid.id = std::move(*id);
    next();
    return true;
  }

  // --- policies -------------------------------------------------------------------------------
  bool parse_policy(std::size_t index, Policy& policy) {
    policy.location = peek().location;
    policy.id = "policy" + std::to_string(index);
    current_policy_id_ = policy.id;
    while (at(Tok::kAt)) {
      next();
      const Token& key = peek();
      if (key.kind != Tok::kIdent) {
        fail_expected(key, "an annotation name after `@`");
        return false;
      }
      next();
      std::string value;
      if (at(Tok::kLParen)) {
        next();
        const Token& v = peek();
        if (v.kind != Tok::kString) {
          fail_expected(v, "a string annotation value");
          return false;
        }
        auto s = string_value(v);
        if (!s) return false;
        value = std::move(*s);
        next();
        if (!expect(Tok::kRParen, "`)` after the annotation value")) return false;
      }
      for (const auto& existing : policy.annotations) {
        if (existing.first == key.text) {
          fail(key.location, "duplicate annotation `@" + std::string(key.text) + "`");
          return false;
        }
      }
      if (key.text == "id") {
        policy.id = value;
        current_policy_id_ = value;
      }
      policy.annotations.emplace_back(std::string(key.text), std::move(value));
    }

    if (at_word("permit")) {
      policy.effect = Effect::kPermit;
    } else if (at_word("forbid")) {
      policy.effect = Effect::kForbid;
    } else {
      fail_expected(peek(), policy.annotations.empty() ? "`permit`, `forbid` or `@`"
                                                       : "`permit` or `forbid`");
      return false;
    }
    next();
    if (!expect(Tok::kLParen, "`(` after the effect")) return false;
    if (!parse_scope_clause("principal", policy.principal)) return false;
    if (!expect(Tok::kComma, "`,` after the principal")) return false;
    if (!parse_scope_clause("action", policy.action)) return false;
    if (!expect(Tok::kComma, "`,` after the action")) return false;
    if (!parse_scope_clause("resource", policy.resource)) return false;
    if (!expect(Tok::kRParen, "`)` after the resource")) return false;

    while (at_word("when") || at_word("unless")) {
      Condition condition;
      condition.is_when = at_word("when");
      next();
      if (!expect(Tok::kLBrace, "`{`")) return false;
      if (at(Tok::kRBrace)) {
        fail(peek().location, "expected an expression, found `}` (a condition cannot be empty)");
        return false;
      }
      Parsed e = parse_expr();
      if (!e) return false;
      if (!expect(Tok::kRBrace, "`}` after the condition")) return false;
      condition.expr = std::move(e.expr);
      policy.conditions.push_back(std::move(condition));
    }
    return expect(Tok::kSemi, "`when`, `unless` or `;`");
  }

  // principal [('==' | 'in') Entity | 'is' Path ['in' Entity]]
  // action [('==' Entity | 'in' Entity | 'in' '[' Entity, ... ']')]
  // resource: as principal
  bool parse_scope_clause(std::string_view variable, ScopeConstraint& scope) {
    const bool is_action = variable == "action";
    scope.location = peek().location;
    if (!expect_word(variable)) return false;
    const Token& op = peek();
    if (op.kind == Tok::kEqEq) {
      next();
      scope.op = ScopeConstraint::Op::kEq;
      return parse_entity(scope.entity);
    }
    if (op.kind == Tok::kIdent && op.text == "in") {
      next();
      if (at(Tok::kLBracket)) {
        if (!is_action) {
          fail(peek().location, "only the action scope can be `in` a list of entities");
          return false;
        }
        next();
        scope.op = ScopeConstraint::Op::kInSet;
        return parse_entity_list(scope.entities);
      }
      scope.op = ScopeConstraint::Op::kIn;
      return parse_entity(scope.entity);
    }
    if (op.kind == Tok::kIdent && op.text == "is") {
      if (is_action) {
        fail(op.location,
             "`is` cannot appear in the action scope; move `action is ...` into a "
             "`when` condition");
        return false;
      }
      next();
      if (!parse_path(scope.entity_type, "an entity type after `is`")) return false;
      if (at(Tok::kColonColon)) {
        fail(peek().location,
             "`is` takes an entity type, not an entity uid (use `==` for one "
             "entity)");
        return false;
      }
      if (at_word("in")) {
        next();
        scope.op = ScopeConstraint::Op::kIsIn;
        return parse_entity(scope.entity);
      }
      if (at(Tok::kEqEq)) {
        fail(peek().location, "`is` cannot be used with `==` in the scope; use `is ... in ...`");
        return false;
      }
      scope.op = ScopeConstraint::Op::kIs;
      return true;
    }
    scope.op = ScopeConstraint::Op::kAny;
    return true;
  }

  // After '[': [Entity {',' Entity}] ']'
  bool parse_entity_list(std::vector<EntityUid>& entities) {
    if (at(Tok::kRBracket)) {
      next();
      return true;
    }
    for (;;) {
      EntityUid uid;
      if (!parse_entity(uid)) return false;
      entities.push_back(std::move(uid));
      if (at(Tok::kComma)) {
        next();
        continue;
      }
      return expect(Tok::kRBracket, "`,` or `]`");
    }
  }

  // --- expressions ----------------------------------------------------------------------------
  // Wraps up a new node. Its children are each at most kMaxExpandedNodes, and fewer than the
  // text's bytes, so the sum cannot overflow.
  Parsed finish(std::shared_ptr<Expr> e, const Children& children) {
    const int depth = 1 + children.depth;
    const std::uint64_t size = 1 + children.size;
    if (depth > kMaxNesting) {
      fail(e->location, "expression nested too deeply (the limit is " +
                            std::to_string(kMaxNesting) + " levels)");
      return {};
    }
    if (size > kMaxExpandedNodes) {
      fail(e->location, "expression too large: more than " + std::to_string(kMaxExpandedNodes) +
                            " nodes once each `is ... in` is expanded");
      return {};
    }
    return Parsed{std::move(e), depth, size};
  }

  Parsed make_binary(BinaryOp op, SourceLocation location, const Parsed& lhs, const Parsed& rhs) {
    auto e = new_expr(Expr::Kind::kBinary, location);
    e->binary_op = op;
    e->children = {lhs.expr, rhs.expr};
    return finish(std::move(e), Children().add(lhs).add(rhs));
  }

  Parsed make_unary(UnaryOp op, SourceLocation location, const Parsed& operand) {
    auto e = new_expr(Expr::Kind::kUnary, location);
    e->unary_op = op;
    e->children = {operand.expr};
    return finish(std::move(e), Children().add(operand));
  }

  Parsed make_literal(Value v, SourceLocation location) {
    auto e = new_expr(Expr::Kind::kLiteral, location);
    e->literal = std::move(v);
    return finish(std::move(e), Children());
  }

  Parsed parse_expr() {
    if (nesting_ >= kMaxNesting) {
      fail(peek().location, "expression nested too deeply (the limit is " +
                                std::to_string(kMaxNesting) + " levels)");
      return {};
    }
    ++nesting_;
    Parsed result = parse_if_or_or();
    --nesting_;
    return result;
  }

  Parsed parse_if_or_or() {
    if (!at_word("if")) return parse_or();
    SourceLocation location = peek().location;
    next();
    Parsed condition = parse_expr();
    if (!condition || !expect_word("then")) return {};
    Parsed then_branch = parse_expr();
    if (!then_branch || !expect_word("else")) return {};
    Parsed else_branch = parse_expr();
    if (!else_branch) return {};
    auto e = new_expr(Expr::Kind::kIf, location);
    e->children = {condition.expr, then_branch.expr, else_branch.expr};
    return finish(std::move(e), Children().add(condition).add(then_branch).add(else_branch));
  }

  Parsed parse_or() {
    Parsed lhs = parse_and();
    while (lhs && at(Tok::kOrOr)) {
      SourceLocation location = peek().location;
      next();
      Parsed rhs = parse_and();
      if (!rhs) return {};
      lhs = make_binary(BinaryOp::kOr, location, lhs, rhs);
    }
    return lhs;
  }

  Parsed parse_and() {
    Parsed lhs = parse_relation();
    while (lhs && at(Tok::kAndAnd)) {
      SourceLocation location = peek().location;
      next();
      Parsed rhs = parse_relation();
      if (!rhs) return {};
      lhs = make_binary(BinaryOp::kAnd, location, lhs, rhs);
    }
    return lhs;
  }

  bool at_relation() const {
    return relational_op(peek()).has_value() || at_word("has") || at_word("like") || at_word("is");
  }

  Parsed parse_relation() {
    Parsed lhs = parse_add();
    if (!lhs) return {};
    Parsed result = lhs;
    const Token& op = peek();
    SourceLocation location = op.location;
    if (auto binary = relational_op(op)) {
      next();
      Parsed rhs = parse_add();
      if (!rhs) return {};
      result = make_binary(*binary, location, lhs, rhs);
    } else if (op.kind == Tok::kAssign) {
      fail(op.location, "expected an operator, found `=` (Cedar compares with `==`)");
      return {};
    } else if (at_word("has")) {
      next();
      result = parse_has(lhs, location);
    } else if (at_word("like")) {
      next();
      const Token& p = peek();
      if (p.kind != Tok::kString) {
        fail_expected(p, "a pattern string after `like`");
        return {};
      }
      auto pattern = pattern_value(p);
      if (!pattern) return {};
      next();
      auto e = new_expr(Expr::Kind::kLike, location);
      e->children = {lhs.expr};
      e->pattern = std::move(*pattern);
      result = finish(std::move(e), Children().add(lhs));
    } else if (at_word("is")) {
      next();
      auto e = new_expr(Expr::Kind::kIs, location);
      if (!parse_path(e->entity_type, "an entity type after `is`")) return {};
      if (at(Tok::kColonColon)) {
        fail(peek().location, "`is` takes an entity type, not an entity uid (use `==`)");
        return {};
      }
      e->children = {lhs.expr};
      result = finish(std::move(e), Children().add(lhs));
      if (result && at_word("in")) {
        // x is T in y  ==  (x is T) && (x in y)
        SourceLocation in_location = peek().location;
        next();
        Parsed container = parse_add();
        if (!container) return {};
        Parsed in = make_binary(BinaryOp::kIn, in_location, lhs, container);
        if (!in) return {};
        result = make_binary(BinaryOp::kAnd, location, result, in);
      }
    }
    if (result && at_relation()) {
      fail(peek().location, "expected `&&`, `||` or the end of the expression, found " +
                                describe(peek()) + " (a chain of comparisons needs parentheses)");
      return {};
    }
    return result;
  }

  // After `has`: IDENT | STR
  Parsed parse_has(const Parsed& target, SourceLocation location) {
    const Token& t = peek();
    auto e = new_expr(Expr::Kind::kHasAttr, location);
    if (t.kind == Tok::kString) {
      auto attr = string_value(t);
      if (!attr) return {};
      e->attr = std::move(*attr);
    } else if (t.kind == Tok::kIdent) {
      if (is_reserved_word(t.text)) {
        fail(t.location, quoted(t.text) + " is a reserved word; write it as a string: `has \"" +
                             std::string(t.text) + "\"`");
        return {};
      }
      e->attr = std::string(t.text);
    } else {
      fail_expected(t, "an attribute name after `has`");
      return {};
    }
    next();
    if (at(Tok::kDot) && at(Tok::kIdent, 1)) {
      fail(peek().location,
           "`has` with an attribute path is not supported in medgate's Cedar subset; write "
           "`x has a && x.a has b`");
      return {};
    }
    e->children = {target.expr};
    return finish(std::move(e), Children().add(target));
  }

  Parsed parse_add() {
    Parsed lhs = parse_mult();
    while (lhs && (at(Tok::kPlus) || at(Tok::kMinus))) {
      BinaryOp op = at(Tok::kPlus) ? BinaryOp::kAdd : BinaryOp::kSub;
      SourceLocation location = peek().location;
      next();
      Parsed rhs = parse_mult();
      if (!rhs) return {};
      lhs = make_binary(op, location, lhs, rhs);
    }
    return lhs;
  }

  Parsed parse_mult() {
    Parsed lhs = parse_unary();
    while (lhs) {
      if (at(Tok::kSlash) || at(Tok::kPercent)) {
        fail(peek().location, quoted(peek().text) +
                                  " is not an operator in Cedar (Long has only "
                                  "`+`, `-` and `*`)");
        return {};
      }
      if (!at(Tok::kStar)) break;
      SourceLocation location = peek().location;
      next();
      Parsed rhs = parse_unary();
      if (!rhs) return {};
      lhs = make_binary(BinaryOp::kMul, location, lhs, rhs);
    }
    return lhs;
  }

  Parsed parse_unary() {
    if (!at(Tok::kBang) && !at(Tok::kMinus)) return parse_member();
    const Tok kind = peek().kind;
    const std::string_view symbol = kind == Tok::kBang ? "!" : "-";
    std::vector<SourceLocation> ops;
    while (at(kind)) {
      if (static_cast<int>(ops.size()) == kMaxUnaryRun) {
        fail(peek().location, "more than " + std::to_string(kMaxUnaryRun) + " `" +
                                  std::string(symbol) + "` in a row");
        return {};
      }
      ops.push_back(peek().location);
      next();
    }
    if (at(Tok::kBang) || at(Tok::kMinus)) {
      fail(peek().location, "`" + std::string(symbol) + "` followed by " + describe(peek()) +
                                " needs parentheses, as in `" + std::string(symbol) + "(" +
                                std::string(peek().text) + "x)`");
      return {};
    }
    Parsed operand;
    if (kind == Tok::kMinus && at(Tok::kInt) && !at(Tok::kDot, 1) && !at(Tok::kLBracket, 1)) {
      // A negative literal: the innermost `-` is part of the number, so the minimum Long, whose
      // magnitude is not a Long, can be written.
      auto n = parse_integer(peek(), /*negative=*/true);
      if (!n) return {};
      operand = make_literal(Value(*n), ops.back());
      ops.pop_back();
      next();
    } else {
      operand = parse_member();
    }
    while (operand && !ops.empty()) {
      operand = make_unary(kind == Tok::kBang ? UnaryOp::kNot : UnaryOp::kNeg, ops.back(), operand);
      ops.pop_back();
    }
    return operand;
  }

  std::optional<std::int64_t> parse_integer(const Token& t, bool negative) {
    constexpr std::uint64_t kMaxMagnitude =
        static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max());
    const std::uint64_t limit = negative ? kMaxMagnitude + 1 : kMaxMagnitude;
    std::uint64_t n = 0;
    for (char c : t.text) {
      auto digit = static_cast<std::uint64_t>(c - '0');
      if (n > (limit - digit) / 10) {
        fail(t.location, "integer literal " + quoted(t.text) + " does not fit in a Long");
        return std::nullopt;
      }
      n = n * 10 + digit;
    }
    if (!negative) return static_cast<std::int64_t>(n);
    if (n == kMaxMagnitude + 1) return std::numeric_limits<std::int64_t>::min();
    return -static_cast<std::int64_t>(n);
  }

  Parsed parse_member() {
    Parsed target = parse_primary();
    while (target) {
      if (at(Tok::kDot)) {
        next();
        target = parse_dot(target);
      } else if (at(Tok::kLBracket)) {
        SourceLocation location = peek().location;
        next();
        const Token& t = peek();
        if (t.kind != Tok::kString) {
          fail_expected(t, "a string attribute name in `[...]`");
          return {};
        }
        auto attr = string_value(t);
        if (!attr) return {};
        next();
        if (!expect(Tok::kRBracket, "`]`")) return {};
        auto e = new_expr(Expr::Kind::kGetAttr, location);
        e->attr = std::move(*attr);
        e->children = {target.expr};
        target = finish(std::move(e), Children().add(target));
      } else {
        break;
      }
    }
    return target;
  }

  // After '.': IDENT ['(' Exprs ')']
  Parsed parse_dot(const Parsed& target) {
    const Token& name = peek();
    if (name.kind != Tok::kIdent) {
      fail_expected(name, "an attribute or method name after `.`");
      return {};
    }
    if (!at(Tok::kLParen, 1) && is_reserved_word(name.text)) {
      fail(name.location, quoted(name.text) +
                              " is a reserved word and cannot follow `.`; write "
                              "`[\"" +
                              std::string(name.text) + "\"]`");
      return {};
    }
    next();
    if (!at(Tok::kLParen)) {
      auto e = new_expr(Expr::Kind::kGetAttr, name.location);
      e->attr = std::string(name.text);
      e->children = {target.expr};
      return finish(std::move(e), Children().add(target));
    }
    BinaryOp op;
    if (name.text == "contains") {
      op = BinaryOp::kContains;
    } else if (name.text == "containsAll") {
      op = BinaryOp::kContainsAll;
    } else if (name.text == "containsAny") {
      op = BinaryOp::kContainsAny;
    } else {
      fail(name.location, "method " + quoted("." + std::string(name.text) + "()") +
                              " is not supported in medgate's Cedar subset (only .contains, "
                              ".containsAll and .containsAny)");
      return {};
    }
    next();  // (
    std::vector<Parsed> args;
    if (!parse_list(Tok::kRParen, "`,` or `)`", args)) return {};
    if (args.size() != 1) {
      fail(name.location, quoted("." + std::string(name.text)) + " takes exactly one argument, " +
                              "not " + std::to_string(args.size()));
      return {};
    }
    return make_binary(op, name.location, target, args.front());
  }

  // Exprs up to `close` (a trailing comma allowed, as in Cedar); the opening bracket is read.
  bool parse_list(Tok close, std::string_view expected, std::vector<Parsed>& out) {
    while (!at(close)) {
      Parsed e = parse_expr();
      if (!e) return false;
      out.push_back(std::move(e));
      if (at(Tok::kComma)) {
        next();
        continue;
      }
      if (!at(close)) {
        fail_expected(peek(), expected);
        return false;
      }
    }
    next();
    return true;
  }

  Parsed parse_primary() {
    const Token& t = peek();
    const SourceLocation location = t.location;
    switch (t.kind) {
      case Tok::kInt: {
        auto n = parse_integer(t, /*negative=*/false);
        if (!n) return {};
        next();
        return make_literal(Value(*n), location);
      }
      case Tok::kString: {
        auto s = string_value(t);
        if (!s) return {};
        next();
        return make_literal(Value(std::move(*s)), location);
      }
      case Tok::kLParen: {
        next();
        Parsed inner = parse_expr();
        if (!inner || !expect(Tok::kRParen, "`)`")) return {};
        return inner;
      }
      case Tok::kLBracket: {
        next();
        std::vector<Parsed> elements;
        if (!parse_list(Tok::kRBracket, "`,` or `]`", elements)) return {};
        auto e = new_expr(Expr::Kind::kSet, location);
        Children children;
        for (const Parsed& p : elements) {
          e->children.push_back(p.expr);
          children.add(p);
        }
        return finish(std::move(e), children);
      }
      case Tok::kLBrace:
        next();
        return parse_record(location);
      case Tok::kIdent:
        return parse_name(t);
      default:
        fail_expected(t, "an expression");
        return {};
    }
  }

  Parsed parse_name(const Token& t) {
    const SourceLocation location = t.location;
    if (t.text == "true" || t.text == "false") {
      next();
      return make_literal(Value(t.text == "true"), location);
    }
    static constexpr std::pair<std::string_view, Variable> kVariables[] = {
        {"principal", Variable::kPrincipal},
        {"action", Variable::kAction},
        {"resource", Variable::kResource},
        {"context", Variable::kContext}};
    if (!at(Tok::kColonColon, 1)) {
      for (const auto& [name, variable] : kVariables) {
        if (t.text != name) continue;
        next();
        auto e = new_expr(Expr::Kind::kVariable, location);
        e->variable = variable;
        return finish(std::move(e), Children());
      }
    }
    if (t.text == "if") {
      fail(location, "an `if` inside an operator needs parentheses: `(if ... then ... else ...)`");
      return {};
    }
    if (is_reserved_word(t.text) && t.text != "__cedar") {
      fail_expected(t, "an expression");
      return {};
    }
    EntityUid uid;
    if (!parse_path(uid.type, "an expression")) return {};
    if (at(Tok::kColonColon)) {
      next();
      if (!parse_entity_id(uid)) return {};
      return make_literal(Value(std::move(uid)), location);
    }
    if (at(Tok::kLParen)) {
      fail(location, "function " + quoted(uid.type + "(...)") +
                         " is not supported in medgate's Cedar subset (no extension types)");
      return {};
    }
    if (uid.type.find("::") == std::string::npos) {
      fail(location, "unknown variable " + quoted(uid.type) +
                         " (the variables are principal, action, resource and context)");
      return {};
    }
    fail_expected(peek(), "`::` and a quoted id after the entity type");
    return {};
  }

  // After '{': [Key ':' Expr {',' Key ':' Expr}] [','] '}'
  Parsed parse_record(SourceLocation location) {
    auto e = new_expr(Expr::Kind::kRecord, location);
    std::set<std::string> seen;
    Children children;
    while (!at(Tok::kRBrace)) {
      const Token& key = peek();
      std::string name;
      if (key.kind == Tok::kString) {
        auto s = string_value(key);
        if (!s) return {};
        name = std::move(*s);
      } else if (key.kind == Tok::kIdent) {
        if (is_reserved_word(key.text)) {
          fail(key.location, quoted(key.text) +
                                 " is a reserved word; write the key as a string: "
                                 "`\"" +
                                 std::string(key.text) + "\"`");
          return {};
        }
        name = std::string(key.text);
      } else {
        fail_expected(key, "a record key (an identifier or a string) or `}`");
        return {};
      }
      if (!seen.insert(name).second) {
        fail(key.location, "duplicate key " + quoted(name) + " in a record");
        return {};
      }
      next();
      if (!expect(Tok::kColon, "`:` after the record key")) return {};
      Parsed value = parse_expr();
      if (!value) return {};
      e->keys.push_back(std::move(name));
      e->children.push_back(value.expr);
      children.add(value);
      if (at(Tok::kComma)) {
        next();
      } else if (!at(Tok::kRBrace)) {
        fail_expected(peek(), "`,` or `}`");
        return {};
      }
    }
    next();
    return finish(std::move(e), children);
  }

  std::vector<Token> tokens_;
  std::size_t pos_ = 0;
  bool failed_ = false;  // the current policy (or expression) has had its error
  int nesting_ = 0;      // parse_expr calls in progress
  std::string current_policy_id_;
  std::vector<Diagnostic> errors_;
};

}  // namespace

bool is_reserved_word(std::string_view word) {
  return std::find(std::begin(kReservedWords), std::end(kReservedWords), word) !=
         std::end(kReservedWords);
}

bool is_identifier(std::string_view word) {
  if (word.empty() || !is_ident_start(word.front())) return false;
  return std::all_of(word.begin(), word.end(), is_ident_char);
}

bool is_action_type(std::string_view type) {
  constexpr std::string_view kAction = "Action";
  if (type == kAction) return true;
  return type.size() > kAction.size() + 2 && type.ends_with(kAction) &&
         type.substr(type.size() - kAction.size() - 2, 2) == "::";
}

std::string Diagnostic::to_text() const {
  return std::to_string(location.line) + ":" + std::to_string(location.column) + ": " + message;
}

ParseResult parse_policies(std::string_view text) {
  return Parser(text).parse_file();
}

ExprParseResult parse_expression(std::string_view text) {
  return Parser(text).parse_one_expression();
}

Result<EntityUid> parse_entity_uid(std::string_view text) {
  return Parser(text).parse_one_entity_uid();
}

}  // namespace medgate::rules
