#include "appliance/json_cbor.h"

namespace medgate::appliance {

namespace {

Result<ledger::cbor::Value> convert(const nlohmann::json& json, int depth) {
  using ledger::cbor::Value;
  if (depth > ledger::cbor::kMaxDepth - 4)
    return Status::InvalidArgument("arguments are nested too deeply to record on the ledger");
  switch (json.type()) {
    case nlohmann::json::value_t::null:
      return Value::null();
    case nlohmann::json::value_t::boolean:
      return Value::boolean(json.get<bool>());
    case nlohmann::json::value_t::number_unsigned:
      return Value::uint(json.get<std::uint64_t>());
    case nlohmann::json::value_t::number_integer:
      return Value::integer(json.get<std::int64_t>());
    case nlohmann::json::value_t::string:
      return Value::text(json.get<std::string>());
    case nlohmann::json::value_t::array: {
      ledger::cbor::Array items;
      for (const auto& item : json) {
        MEDGATE_ASSIGN_OR_RETURN(Value v, convert(item, depth + 1));
        items.push_back(std::move(v));
      }
      return Value::array(std::move(items));
    }
    case nlohmann::json::value_t::object: {
      ledger::cbor::Map entries;
      for (const auto& [key, item] : json.items()) {
        MEDGATE_ASSIGN_OR_RETURN(Value v, convert(item, depth + 1));
        entries.emplace_back(Value::text(key), std::move(v));
      }
      return Value::map(std::move(entries));
    }
    default:
      return Status::InvalidArgument(
          "fractional and binary values cannot be recorded on the ledger");
  }
}

}  // namespace

Result<ledger::cbor::Value> json_to_cbor(const nlohmann::json& json) {
  return convert(json, 0);
}

}  // namespace medgate::appliance
