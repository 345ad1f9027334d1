// The admin API's wire protocol, shared by medgated and medctl (header only; medctl includes
// nothing else from appliance/).
//
// Transport: a Unix stream socket. Each request is one JSON object on one line; each response is
// one JSON object on one line, in order. A connection may carry many requests.
//
//   request:  {"v": 1, "op": "ledger.head", "args": {...}}
//   response: {"ok": true, "result": {...}}
//           | {"ok": false, "error": {"code": "permission_denied", "message": "..."}}
//
// Error codes are the names of medgate::StatusCode below; medctl maps them to its exit codes
// (../shared/CLI.md): 1 a negative answer, 2 bad usage or input, 3 a part unreachable.
#pragma once

#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "hsm/status.h"

namespace medgate::admin {

inline constexpr int kProtocolVersion = 1;

struct CodeName {
  StatusCode code;
  std::string_view name;
};
inline constexpr CodeName kCodeNames[] = {
    {StatusCode::kOk, "ok"},
    {StatusCode::kInvalidArgument, "invalid_argument"},
    {StatusCode::kNotFound, "not_found"},
    {StatusCode::kCorruption, "corruption"},
    {StatusCode::kVerificationFailed, "verification_failed"},
    {StatusCode::kPermissionDenied, "permission_denied"},
    {StatusCode::kUnavailable, "unavailable"},
    {StatusCode::kIOError, "io_error"},
    {StatusCode::kFailedPrecondition, "failed_precondition"},
    {StatusCode::kInternal, "internal"},
};

inline std::string_view code_name(StatusCode code) {
  for (const auto& c : kCodeNames)
    if (c.code == code) return c.name;
  return "internal";
}

inline StatusCode code_from_name(std::string_view name) {
  for (const auto& c : kCodeNames)
    if (c.name == name) return c.code;
  return StatusCode::kInternal;
}

// medctl's exit code for a failed call.
inline int exit_code(StatusCode code) {
  switch (code) {
    case StatusCode::kOk:
      return 0;
    case StatusCode::kVerificationFailed:
    case StatusCode::kPermissionDenied:
    case StatusCode::kIOError:
    case StatusCode::kInternal:
      return 1;
    case StatusCode::kInvalidArgument:
    case StatusCode::kNotFound:
    case StatusCode::kCorruption:
    case StatusCode::kFailedPrecondition:
      return 2;
    case StatusCode::kUnavailable:
      return 3;
  }
  return 1;
}

inline nlohmann::json request(std::string_view op, nlohmann::json args = nlohmann::json::object()) {
  return {{"v", kProtocolVersion}, {"op", op}, {"args", std::move(args)}};
}

inline nlohmann::json ok_response(nlohmann::json result) {
  return {{"ok", true}, {"result", std::move(result)}};
}

inline nlohmann::json error_response(const Status& status) {
  return {{"ok", false},
          {"error", {{"code", code_name(status.code())}, {"message", status.message()}}}};
}

// Turns a response back into a result or a Status; a malformed response is kInternal.
inline Result<nlohmann::json> parse_response(const nlohmann::json& response) {
  if (!response.is_object() || !response.contains("ok") || !response["ok"].is_boolean())
    return Status::Internal("the daemon's response is malformed");
  if (response["ok"].get<bool>())
    return response.contains("result") ? response["result"] : nlohmann::json::object();
  const auto& e = response.value("error", nlohmann::json::object());
  return Status(code_from_name(e.value("code", "internal")), e.value("message", "unknown error"));
}

}  // namespace medgate::admin
