// Renderings of a verified audit bundle (ledger/audit_bundle.h) for the tools auditors already
// use: a FHIR R4 Bundle of AuditEvent resources following IHE BALP (Basic Audit Log Patterns),
// and CSV (RFC 4180). docs/audit-bundle.md, "Renderings", has the mapping and a worked example.
//
// A rendering is derived, never signed: it names the signed bundle it came from (the bundle
// file's name and SHA-256, and the bundle head's tree size and root), and each row or AuditEvent
// names its ledger entry's index and leaf hash, so anything in it can be traced back to the bundle
// and proved there. Only the selected entries (those the export's query matched) are rendered;
// the key history and the patient chain that a bundle also carries are proof material.
//
// The renderers refuse a bundle whose report has problems (kFailedPrecondition): produce the
// report with verify_audit_bundle first, against a trusted key. They never need the daemon, a key
// store or the network. Nothing here puts PHI in a rendering that the bundle does not hold: the
// bundle carries pseudonyms and ciphertexts, and decrypted values only when it was exported with
// --include-values (then the rendering carries them too).
//
// All functions are thread-safe (they share nothing).
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>

#include <nlohmann/json_fwd.hpp>

#include "hsm/bytes.h"
#include "hsm/public_key.h"
#include "hsm/status.h"
#include "ledger/audit_bundle.h"

namespace medgate::ledger {

// The signed bundle a rendering is derived from.
struct BundleSource {
  std::string file_name;  // as the auditor knows it (the base name, not a local path)
  Hash sha256{};          // of the bundle file's bytes
};

// Now and then: (entries rendered, entries to render), for a progress bar.
using RenderProgress = std::function<void(std::uint64_t, std::uint64_t)>;

// The FHIR R4 Bundle (type "collection"), one AuditEvent per selected entry in index order.
Result<nlohmann::json> render_fhir(const AuditBundle& bundle, const AuditReport& report,
                                   const BundleSource& source, const RenderProgress& progress = {});

// CSV: a header row, then one row per selected entry in index order; CRLF line ends. The columns
// (kCsvColumns) start with the bundle's reference, repeated on every row so that a row copied
// elsewhere still says where it came from.
Result<std::string> render_csv(const AuditBundle& bundle, const AuditReport& report,
                               const BundleSource& source, const RenderProgress& progress = {});

inline constexpr std::string_view kCsvColumns[] = {
    "bundle_file", "bundle_sha256", "head_tree_size", "head_root", "index",     "time",
    "kind",        "type",          "actor",          "subjects",  "principal", "purpose",
    "break_glass", "decision",      "outcome",        "policies",  "leaf_hash", "values"};

// One CSV field, RFC 4180: as is, or in double quotes (with quotes doubled) when it holds a
// comma, a quote, CR or LF.
std::string csv_field(std::string_view text);

// The AuditEvent outcome for an entry (FHIR R4 audit-event-outcome): "0" success for every
// recorded fact and an allowed access, "4" minor failure for a denied access, "8" serious failure
// for a denial where policies failed to evaluate.
std::string_view audit_event_outcome(const Entry& entry);

// The public key the bundle's genesis entry names (the ledger's first key), or nullopt when the
// bundle has no well-formed genesis entry. For a bundle just exported from the appliance when the
// auditor gave no --trust: everything is still checked, but the anchor is the ledger's own key
// rather than one the auditor brought.
std::optional<PublicKey> bundle_genesis_key(const AuditBundle& bundle);

}  // namespace medgate::ledger
