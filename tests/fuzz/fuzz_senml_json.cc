// Fuzz target: SenML JSON as a CoAP device POSTs it (content-format 110): decode_senml_json,
// resolve and observations_from_senml (appliance/coap/senml.h).
// Properties: never crashes; a refusal is kInvalidArgument; an accepted pack has 1..kMaxRecords
// records, survives encode_senml_cbor + decode_senml_cbor unchanged (the two decoders agree), and
// resolves to names within RFC 8428 section 4.5.1's characters and to Observations.
#include "appliance/coap/senml.h"
#include "tests/fuzz/fuzz_check.h"
#include "tests/fuzz/fuzz_senml.h"

using namespace medgate;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size > fuzz::kMaxInput) return 0;
  auto records = appliance::coap::decode_senml_json(fuzz::bytes_of(data, size));
  fuzz::check_senml_pack(records);
  return 0;
}
