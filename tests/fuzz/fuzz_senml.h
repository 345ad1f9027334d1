// What the two SenML fuzz targets check once a decoder has answered (see fuzz_senml_json.cc).
#pragma once

#include <algorithm>
#include <cctype>
#include <vector>

#include "appliance/coap/senml.h"
#include "tests/fuzz/fuzz_check.h"

namespace medgate::fuzz {

inline void check_senml_pack(const Result<std::vector<appliance::coap::Record>>& records) {
  namespace senml = appliance::coap;
  if (!records.ok()) {
    FUZZ_CHECK(records.status().code() == StatusCode::kInvalidArgument, "%s",
               records.status().to_string().c_str());
    return;
  }
  FUZZ_CHECK(!records->empty() && records->size() <= senml::kMaxRecords, "%zu records",
             records->size());
  Bytes cbor = senml::encode_senml_cbor(*records);
  auto again = senml::decode_senml_cbor(cbor);
  FUZZ_CHECK(again.ok(), "encoded pack does not decode: %s", again.status().to_string().c_str());
  FUZZ_CHECK(*again == *records, "encoded pack decodes to other records");

  constexpr std::uint64_t kNowUs = 1700000000ull * 1000000;
  auto resolved = senml::resolve(*records, kNowUs);
  if (!resolved.ok()) {
    FUZZ_CHECK(resolved.status().code() == StatusCode::kInvalidArgument, "%s",
               resolved.status().to_string().c_str());
    return;
  }
  FUZZ_CHECK(!resolved->empty() && resolved->size() <= records->size(), "%zu resolved",
             resolved->size());
  for (const auto& r : *resolved) {
    const bool name_ok = !r.name.empty() && std::isalnum(static_cast<unsigned char>(r.name[0])) &&
                         std::all_of(r.name.begin(), r.name.end(), [](char c) {
                           return std::isalnum(static_cast<unsigned char>(c)) || c == '-' ||
                                  c == ':' || c == '.' || c == '/' || c == '_';
                         });
    FUZZ_CHECK(name_ok, "resolved name outside RFC 8428 section 4.5.1");
    FUZZ_CHECK(r.version >= 1 && r.version <= senml::kSenmlVersion, "version %llu",
               static_cast<unsigned long long>(r.version));
  }
  auto observations = senml::observations_from_senml(*resolved, "fuzz-device", "fuzz-patient");
  FUZZ_CHECK(observations.ok(), "%s", observations.status().to_string().c_str());
  FUZZ_CHECK(observations->size() >= resolved->size(), "fewer Observations than records");
}

}  // namespace medgate::fuzz
