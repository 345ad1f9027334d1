// Internal to medgate_rules_syntax: Cedar's lexical classes, shared by the parser (which enforces
// them) and the printer (which must write only what the parser reads back).
#pragma once

#include <string_view>

namespace medgate::rules {

// Cedar's reserved words: true false if then else in like has is __cedar. They cannot be used
// as an attribute name after `.`, after `has` or as a record key unless written as a string, nor
// as a part of an entity type.
bool is_reserved_word(std::string_view word);

// Cedar's IDENT shape, [_a-zA-Z][_a-zA-Z0-9]*, reserved words included.
bool is_identifier(std::string_view word);

// An entity type whose last path part is `Action` (`Action`, `Hospital::Action`): the type of
// the entities the action scope names.
bool is_action_type(std::string_view type);

}  // namespace medgate::rules
