#include "appliance/hl7/message.h"

#include <algorithm>

namespace medgate::appliance::hl7 {
namespace {

// The `n`th (1-based) piece of `s` split at `sep`; empty when there are fewer.
std::string_view piece(std::string_view s, char sep, std::size_t n) {
  std::size_t begin = 0;
  for (std::size_t i = 1; i < n; ++i) {
    std::size_t next = s.find(sep, begin);
    if (next == std::string_view::npos) return {};
    begin = next + 1;
  }
  std::size_t end = s.find(sep, begin);
  return s.substr(begin, end == std::string_view::npos ? std::string_view::npos : end - begin);
}

std::size_t count_pieces(std::string_view s, char sep) {
  if (s.empty()) return 0;
  return static_cast<std::size_t>(std::count(s.begin(), s.end(), sep)) + 1;
}

int hex_value(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  return -1;
}

bool is_header_id(std::string_view id) {
  return id == "MSH" || id == "FHS" || id == "BHS";
}
bool is_batch_control_id(std::string_view id) {
  return id == "FHS" || id == "BHS" || id == "BTS" || id == "FTS";
}

// A delimiter must be printable ASCII and not a letter or digit (HL7 2.5.1 2.5.4).
bool is_delimiter_char(char c) {
  return c > 0x20 && c < 0x7F && !(c >= '0' && c <= '9') && !(c >= 'A' && c <= 'Z') &&
         !(c >= 'a' && c <= 'z');
}

bool is_segment_id(std::string_view line, char field_separator) {
  if (line.size() < 3) return false;
  if (!(line[0] >= 'A' && line[0] <= 'Z')) return false;
  for (std::size_t i = 1; i < 3; ++i) {
    char c = line[i];
    if (!((c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9'))) return false;
  }
  return line.size() == 3 || line[3] == field_separator;
}

// The non-empty lines of `text` (split at CR and LF), each with its 1-based position.
std::vector<std::string_view> lines_of(std::string_view text) {
  std::vector<std::string_view> lines;
  std::size_t begin = 0;
  while (begin <= text.size()) {
    std::size_t end = text.find_first_of("\r\n", begin);
    if (end == std::string_view::npos) end = text.size();
    if (end > begin) lines.push_back(text.substr(begin, end - begin));
    begin = end + 1;
  }
  return lines;
}

Status fail(Hl7Error* out, ErrorCode code, ErrorLocation where, std::string text) {
  Hl7Error e{code, std::move(where), std::move(text)};
  Status s = e.status();
  if (out != nullptr) *out = std::move(e);
  return s;
}

// The delimiters a header segment (MSH, FHS, BHS) declares, `line` being that segment.
Result<Delimiters> read_delimiters(std::string_view line, std::size_t sequence, Hl7Error* error) {
  std::string id(line.substr(0, 3));
  if (line.size() < 4 || !is_delimiter_char(line[3])) {
    return fail(error, ErrorCode::kDataType, {id, sequence, 1},
                id + "-1 (the field separator) is missing or not a punctuation character");
  }
  Delimiters d;
  d.field = line[3];
  std::string_view enc = line.substr(4);
  enc = enc.substr(0, enc.find(d.field));
  if (enc.size() < 4 || enc.size() > 5) {
    return fail(error, ErrorCode::kDataType, {id, sequence, 2},
                id + "-2 has " + std::to_string(enc.size()) +
                    " encoding characters; 4 (or 5 with truncation) are required");
  }
  std::string seen(1, d.field);
  for (std::size_t i = 0; i < enc.size(); ++i) {
    char c = enc[i];
    if (!is_delimiter_char(c)) {
      return fail(error, ErrorCode::kDataType, {id, sequence, 2},
                  id + "-2 character " + std::to_string(i + 1) + " is not a punctuation character");
    }
    if (seen.find(c) != std::string::npos) {
      return fail(
          error, ErrorCode::kDataType, {id, sequence, 2},
          id + "-2 character " + std::to_string(i + 1) + " repeats a delimiter declared before it");
    }
    seen.push_back(c);
  }
  d.component = enc[0];
  d.repetition = enc[1];
  d.escape = enc[2];
  d.subcomponent = enc[3];
  if (enc.size() == 5) d.truncation = enc[4];
  return d;
}

}  // namespace

std::string Delimiters::encoding_characters() const {
  std::string s{component, repetition, escape, subcomponent};
  if (truncation) s.push_back(*truncation);
  return s;
}

std::string decode_escapes(std::string_view raw, const Delimiters& d) {
  std::string out;
  out.reserve(raw.size());
  std::size_t i = 0;
  while (i < raw.size()) {
    char c = raw[i];
    if (c != d.escape) {
      out.push_back(c);
      ++i;
      continue;
    }
    std::size_t close = raw.find(d.escape, i + 1);
    if (close == std::string_view::npos) {  // unterminated: verbatim
      out.append(raw.substr(i));
      break;
    }
    std::string_view seq = raw.substr(i + 1, close - i - 1);
    bool decoded = true;
    if (seq == "F") {
      out.push_back(d.field);
    } else if (seq == "S") {
      out.push_back(d.component);
    } else if (seq == "T") {
      out.push_back(d.subcomponent);
    } else if (seq == "R") {
      out.push_back(d.repetition);
    } else if (seq == "E") {
      out.push_back(d.escape);
    } else if (seq == "P" && d.truncation) {
      out.push_back(*d.truncation);
    } else if (seq.size() >= 3 && seq[0] == 'X' && (seq.size() - 1) % 2 == 0 &&
               std::all_of(seq.begin() + 1, seq.end(), [](char h) { return hex_value(h) >= 0; })) {
      for (std::size_t h = 1; h < seq.size(); h += 2) {
        out.push_back(static_cast<char>(hex_value(seq[h]) * 16 + hex_value(seq[h + 1])));
      }
    } else {
      decoded = false;
    }
    if (!decoded) out.append(raw.substr(i, close - i + 1));  // \H\, \N\, \.br\, ...: verbatim
    i = close + 1;
  }
  return out;
}

std::string encode_escapes(std::string_view value, const Delimiters& d) {
  static constexpr char kHex[] = "0123456789ABCDEF";
  std::string out;
  out.reserve(value.size());
  auto escape = [&](std::string_view seq) {
    out.push_back(d.escape);
    out.append(seq);
    out.push_back(d.escape);
  };
  for (char c : value) {
    auto u = static_cast<unsigned char>(c);
    if (c == d.field) {
      escape("F");
    } else if (c == d.component) {
      escape("S");
    } else if (c == d.subcomponent) {
      escape("T");
    } else if (c == d.repetition) {
      escape("R");
    } else if (c == d.escape) {
      escape("E");
    } else if (d.truncation && c == *d.truncation) {
      escape("P");
    } else if (u < 0x20 || u == 0x7F) {
      escape(std::string{'X', kHex[u >> 4], kHex[u & 0xF]});
    } else {
      out.push_back(c);
    }
  }
  return out;
}

Segment::Segment(std::string text, const Delimiters& delimiters)
    : text_(std::move(text)), delimiters_(delimiters) {
  if (text_.size() <= 3) return;
  std::size_t begin = 4;
  if (is_header()) {
    // Field 1 is the separator itself; field 2 runs to the next separator, unsplit.
    fields_.emplace_back(3, 4);
    std::size_t end = text_.find(delimiters_.field, 4);
    if (end == std::string::npos) end = text_.size();
    fields_.emplace_back(4, end);
    if (end == text_.size()) return;
    begin = end + 1;
  }
  while (true) {
    std::size_t end = text_.find(delimiters_.field, begin);
    if (end == std::string::npos) {
      fields_.emplace_back(begin, text_.size());
      return;
    }
    fields_.emplace_back(begin, end);
    begin = end + 1;
  }
}

bool Segment::is_header() const {
  return is_header_id(id());
}

std::size_t Segment::field_count() const {
  return fields_.size();
}

std::size_t Segment::repetition_count(std::size_t field) const {
  std::string_view f = raw(field);
  if (is_header() && field <= 2) return f.empty() ? 0 : 1;
  return count_pieces(f, delimiters_.repetition);
}

std::size_t Segment::component_count(std::size_t field, std::size_t rep) const {
  if (rep == 0) return 0;
  std::string_view r = raw(field, rep);
  if (is_header() && field <= 2) return r.empty() ? 0 : 1;
  return count_pieces(r, delimiters_.component);
}

std::size_t Segment::subcomponent_count(std::size_t field, std::size_t rep,
                                        std::size_t comp) const {
  if (rep == 0 || comp == 0) return 0;
  std::string_view c = raw(field, rep, comp);
  if (is_header() && field <= 2) return c.empty() ? 0 : 1;
  return count_pieces(c, delimiters_.subcomponent);
}

std::string_view FieldRepetition::raw(std::size_t comp, std::size_t sub) const {
  if (comp == 0) return text_;
  std::string_view c = piece(text_, delimiters_->component, comp);
  if (sub == 0) return c;
  return piece(c, delimiters_->subcomponent, sub);
}

std::string FieldRepetition::get(std::size_t comp, std::size_t sub) const {
  return decode_escapes(raw(comp, sub), *delimiters_);
}

std::vector<FieldRepetition> Segment::repetitions(std::size_t field) const {
  std::vector<FieldRepetition> out;
  std::string_view f = raw(field);
  if (f.empty()) return out;
  if (is_header() && field <= 2) return out;  // MSH-1/2 are delimiters, not data
  std::size_t begin = 0;
  while (true) {
    std::size_t end = f.find(delimiters_.repetition, begin);
    out.emplace_back(f.substr(begin, end == std::string_view::npos ? end : end - begin),
                     delimiters_);
    if (end == std::string_view::npos) return out;
    begin = end + 1;
  }
}

std::string_view Segment::raw(std::size_t field, std::size_t rep, std::size_t comp,
                              std::size_t sub) const {
  if (field == 0 || field > fields_.size()) return {};
  auto [begin, end] = fields_[field - 1];
  std::string_view f = std::string_view(text_).substr(begin, end - begin);
  if (is_header() && field <= 2) return rep <= 1 && comp <= 1 && sub <= 1 ? f : std::string_view();
  if (rep == 0) return f;
  std::string_view r = piece(f, delimiters_.repetition, rep);
  if (comp == 0) return r;
  std::string_view c = piece(r, delimiters_.component, comp);
  if (sub == 0) return c;
  return piece(c, delimiters_.subcomponent, sub);
}

std::string Segment::get(std::size_t field, std::size_t rep, std::size_t comp,
                         std::size_t sub) const {
  std::string_view r = raw(field, rep, comp, sub);
  if (is_header() && field <= 2) return std::string(r);
  return decode_escapes(r, delimiters_);
}

const Segment* Message::find(std::string_view id, std::size_t nth) const {
  std::size_t seen = 0;
  for (const Segment& s : segments_) {
    if (s.id() == id && ++seen == nth) return &s;
  }
  return nullptr;
}

std::string_view Message::raw(std::string_view segment, std::size_t field, std::size_t rep,
                              std::size_t comp, std::size_t sub) const {
  const Segment* s = find(segment);
  return s == nullptr ? std::string_view() : s->raw(field, rep, comp, sub);
}

std::string Message::get(std::string_view segment, std::size_t field, std::size_t rep,
                         std::size_t comp, std::size_t sub) const {
  const Segment* s = find(segment);
  return s == nullptr ? std::string() : s->get(field, rep, comp, sub);
}

Result<Message> parse_message(std::string_view er7, Hl7Error* error) {
  std::vector<std::string_view> lines = lines_of(er7);
  if (lines.empty() || lines[0].substr(0, 3) != "MSH") {
    if (!lines.empty() && (lines[0].substr(0, 3) == "FHS" || lines[0].substr(0, 3) == "BHS")) {
      return fail(error, ErrorCode::kSegmentSequence, {"MSH", 1},
                  "a batch (FHS/BHS) where one message was expected");
    }
    return fail(error, ErrorCode::kSegmentSequence, {"MSH", 1},
                lines.empty() ? "the message is empty" : "the message does not begin with MSH");
  }
  MEDGATE_ASSIGN_OR_RETURN(Delimiters d, read_delimiters(lines[0], 1, error));
  Message m;
  m.delimiters_ = d;
  m.segments_.reserve(lines.size());
  for (std::size_t i = 0; i < lines.size(); ++i) {
    std::string_view line = lines[i];
    std::size_t sequence = i + 1;
    if (!is_segment_id(line, d.field)) {
      return fail(error, ErrorCode::kSegmentSequence, {"", sequence},
                  "not a segment: no id of three capitals or digits followed by the field "
                  "separator");
    }
    std::string_view id = line.substr(0, 3);
    if (i > 0 && (id == "MSH" || is_batch_control_id(id))) {
      return fail(error, ErrorCode::kSegmentSequence, {std::string(id), sequence},
                  "a message or batch header inside a message (a batch needs split_batch)");
    }
    m.segments_.emplace_back(std::string(line), d);
  }
  return m;
}

bool is_batch(std::string_view text) {
  std::size_t start = text.find_first_not_of("\r\n");
  if (start == std::string_view::npos) return false;
  std::string_view id = text.substr(start, 3);
  return id == "FHS" || id == "BHS";
}

Result<std::vector<Message>> split_batch(std::string_view er7, Hl7Error* error) {
  if (!is_batch(er7)) {
    MEDGATE_ASSIGN_OR_RETURN(Message m, parse_message(er7, error));
    std::vector<Message> one;
    one.push_back(std::move(m));
    return one;
  }
  std::vector<std::string_view> lines = lines_of(er7);
  std::vector<Message> messages;
  Delimiters batch_delimiters;
  std::string current;                // the message being gathered, CR-separated
  std::size_t current_first = 0;      // its first segment's position in the whole text
  std::size_t messages_in_batch = 0;  // since the last BHS
  auto flush = [&]() -> Status {
    if (current.empty()) return Status::Ok();
    Hl7Error inner;
    Result<Message> m = parse_message(current, &inner);
    current.clear();
    if (!m.ok()) {
      if (inner.where.sequence != 0) inner.where.sequence += current_first - 1;
      Status s = inner.status();
      if (error != nullptr) *error = std::move(inner);
      return s;
    }
    messages.push_back(std::move(m).value());
    ++messages_in_batch;
    return Status::Ok();
  };
  for (std::size_t i = 0; i < lines.size(); ++i) {
    std::string_view line = lines[i];
    std::size_t sequence = i + 1;
    std::string_view id = line.substr(0, 3);
    if (id == "MSH") {
      MEDGATE_RETURN_IF_ERROR(flush());
      current_first = sequence;
      current.assign(line);
      continue;
    }
    if (!is_batch_control_id(id)) {
      if (current.empty()) {
        return fail(error, ErrorCode::kSegmentSequence, {"", sequence},
                    "a segment outside any message of the batch");
      }
      current.push_back('\r');
      current.append(line);
      continue;
    }
    MEDGATE_RETURN_IF_ERROR(flush());
    if (id == "FHS" || id == "BHS") {
      if (id == "FHS" && i != 0) {
        return fail(error, ErrorCode::kSegmentSequence, {"FHS", sequence},
                    "a file header after the start of the batch");
      }
      MEDGATE_ASSIGN_OR_RETURN(batch_delimiters, read_delimiters(line, sequence, error));
      if (id == "BHS") messages_in_batch = 0;
      continue;
    }
    if (!is_segment_id(line, batch_delimiters.field)) {
      return fail(error, ErrorCode::kSegmentSequence, {"", sequence},
                  "not a segment: no id of three capitals or digits followed by the field "
                  "separator");
    }
    if (id == "BTS") {
      Segment bts{std::string(line), batch_delimiters};
      std::string_view count = bts.raw(1, 1, 1, 1);
      if (!count.empty() && count.size() < 10 &&
          std::all_of(count.begin(), count.end(), [](char c) { return c >= '0' && c <= '9'; }) &&
          std::stoul(std::string(count)) != messages_in_batch) {
        return fail(error, ErrorCode::kSegmentSequence, {"BTS", sequence, 1},
                    "BTS-1 gives " + std::string(count) + " messages, the batch holds " +
                        std::to_string(messages_in_batch));
      }
    }
  }
  MEDGATE_RETURN_IF_ERROR(flush());
  return messages;
}

}  // namespace medgate::appliance::hl7
