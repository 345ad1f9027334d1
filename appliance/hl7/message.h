// HL7 v2 messages in ER7, the pipe-and-hat encoding: parsing and read access.
//
// A message is segments separated by CR (LF and CRLF are tolerated), each segment a three-letter
// id and fields separated by the field separator declared in MSH-1. Within a field: repetitions,
// components, subcomponents, separated by the encoding characters declared in MSH-2 (usually
// "^~\&", but any four distinct punctuation characters, plus an optional fifth, the truncation
// character of v2.7+). Numbering is HL7's, 1-based: in MSH, field 1 is the field separator itself
// and field 2 the encoding characters; in every other segment field 1 is the first after the id.
//
// Values are bytes, kept as sent: nothing is transcoded (text without MSH-18 may well be
// Latin-1), and escapes are decoded only when a value is read with get():
//   \F\ \S\ \T\ \R\ \E\ (and \P\ when a truncation character is declared) become the delimiter
//   they name; \Xhh..\ becomes the bytes hh.. (a non-zero, even number of hex digits); the rest
//   (\H\ \N\ \.br\ \Z..\ \C..\ \M..\, a malformed \X..\ or an unterminated escape) is kept
//   verbatim, escape characters included. raw() gives the bytes as sent.
// Z-segments are segments like any other.
#pragma once

#include <cstddef>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "appliance/hl7/error.h"
#include "hsm/status.h"

namespace medgate::appliance::hl7 {

struct Delimiters {
  char field = '|';
  char component = '^';
  char repetition = '~';
  char escape = '\\';
  char subcomponent = '&';
  std::optional<char> truncation;  // MSH-2's fifth character (v2.7+), if given

  // MSH-2 as it would be written: "^~\&" (plus the truncation character).
  std::string encoding_characters() const;
  friend bool operator==(const Delimiters&, const Delimiters&) = default;
};

// Decodes the escapes in `raw` (see the file comment). Never fails.
std::string decode_escapes(std::string_view raw, const Delimiters& delimiters);
// The reverse, for writing a value into a field: escapes each delimiter and the escape
// character, and writes bytes below 0x20 and 0x7F (CR, LF, MLLP's 0x0B and 0x1C) as \Xhh\.
std::string encode_escapes(std::string_view value, const Delimiters& delimiters);

// One repetition of a field: a view into its segment, valid while the segment lives. Reading
// all repetitions of a field through Segment::repetitions() is linear in the field's length, where
// Segment::get(field, rep, ...) for each rep in turn would be quadratic.
class FieldRepetition {
 public:
  FieldRepetition(std::string_view text, const Delimiters& delimiters)
      : text_(text), delimiters_(&delimiters) {}
  std::string_view raw(std::size_t comp = 0, std::size_t sub = 0) const;
  std::string get(std::size_t comp = 0, std::size_t sub = 0) const;

 private:
  std::string_view text_;
  const Delimiters* delimiters_;
};

// One segment: its id and its fields, kept as sent. Indices are 1-based; 0 for `rep`, `comp` or
// `sub` means "all of it" (the whole field, repetition or component). Anything beyond what was
// sent reads as empty.
class Segment {
 public:
  Segment(std::string text, const Delimiters& delimiters);

  std::string_view id() const { return std::string_view(text_).substr(0, 3); }
  const std::string& text() const { return text_; }  // the segment as sent, without its CR
  // The highest field number present (for MSH, at least 2).
  std::size_t field_count() const;
  std::size_t repetition_count(std::size_t field) const;
  std::size_t component_count(std::size_t field, std::size_t rep) const;
  std::size_t subcomponent_count(std::size_t field, std::size_t rep, std::size_t comp) const;
  // Every repetition of `field` (none when it is empty, and none for MSH-1/MSH-2), split once.
  std::vector<FieldRepetition> repetitions(std::size_t field) const;

  std::string_view raw(std::size_t field, std::size_t rep = 0, std::size_t comp = 0,
                       std::size_t sub = 0) const;
  // raw() with escapes decoded. Read leaves (all indices given) to keep delimiter characters
  // that came from escapes apart from real separators. MSH-1 and MSH-2 are returned as sent.
  std::string get(std::size_t field, std::size_t rep = 0, std::size_t comp = 0,
                  std::size_t sub = 0) const;

 private:
  bool is_header() const;  // MSH, FHS, BHS: fields 1 and 2 are the delimiters

  std::string text_;
  Delimiters delimiters_;
  // [begin, end) of each field in text_; fields_[0] is field 1.
  std::vector<std::pair<std::size_t, std::size_t>> fields_;
};

// A parsed message. Copyable and movable; holds its own bytes.
class Message {
 public:
  const Delimiters& delimiters() const { return delimiters_; }
  const std::vector<Segment>& segments() const { return segments_; }

  // The `nth` (1-based) segment with this id, or nullptr.
  const Segment* find(std::string_view id, std::size_t nth = 1) const;
  // Shorthands over find(id): empty when the segment is absent.
  std::string_view raw(std::string_view segment, std::size_t field, std::size_t rep = 0,
                       std::size_t comp = 0, std::size_t sub = 0) const;
  std::string get(std::string_view segment, std::size_t field, std::size_t rep = 0,
                  std::size_t comp = 0, std::size_t sub = 0) const;

 private:
  friend Result<Message> parse_message(std::string_view er7, Hl7Error* error);
  Delimiters delimiters_;
  std::vector<Segment> segments_;
};

// Parses one message. It must begin with MSH (leading CR/LF are skipped) with its delimiters:
// MSH-1 and four or five distinct encoding characters, each printable ASCII punctuation. Empty
// lines are skipped; every segment needs a three-character id of capitals and digits; a second
// MSH, or FHS/BHS/BTS/FTS, is refused (use split_batch). Failures are kInvalidArgument naming a
// position, never content; `error`, if given, also receives the HL7 error code and location for
// an ERR segment.
Result<Message> parse_message(std::string_view er7, Hl7Error* error = nullptr);

// Splits a batch (FHS, BHS, messages, BTS, FTS; either header optional) into its messages and
// parses each. A text that is a single message gives that message. BTS-1, when it is a number,
// must equal the count of messages in its batch. Errors as parse_message's, positions counted
// in the whole text.
Result<std::vector<Message>> split_batch(std::string_view er7, Hl7Error* error = nullptr);

// True when `text` begins (after CR/LF) with FHS or BHS.
bool is_batch(std::string_view text);

}  // namespace medgate::appliance::hl7
