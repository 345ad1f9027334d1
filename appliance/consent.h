// Patients' consent and the hospital's rules, decided by the Cedar-subset engine (ledger/rules/).
//
// Everything here is derived from the ledger: at start the book replays the rules-version,
// directory-import, consent-grant, consent-revoke and patient-key entries, and afterwards it
// applies a change only once its entry is durable, under the same lock that decisions read. So a
// revocation takes effect for the next decision, expiry is decided from the grant's recorded end
// at decision time, and there is no second store that could drift from the ledger. Every decision,
// allow and deny, is itself a ledger entry (access-decision) naming the policies that determined
// it.
//
// The policies the engine sees: the deployed rules (the latest rules version) plus one policy per
// live grant. A grant for (patient P, grantee E, category C, purpose U, until T) becomes
//
//   @id("g-…") @consent("g-…")
//   permit (principal in E, action == Action::"read", resource in Patient::"<P's pseudonym>")
//   when { resource in Category::"C" && context.purpose == "U" && context.now < T
//          && !resource.signed_consent_required };      (the last clause only if not
//          patient-signed)
//
// A request to read category C of patient P is principal E', action Action::"read", resource
// PatientData::"<pseudonym>/C" (parents Patient::"<pseudonym>" and Category::"C"; attributes
// category and signed_consent_required), context {purpose, now (Unix seconds), break_glass,
// reason (when given)}. Patients appear in policies and requests only by pseudonym.
//
// Rules may require patient-signed consent for categories with the annotation
// @requires_signed_consent("psychiatry,genetics") on any policy: an admin's grant for such a
// category is refused, and older unsigned grants for it stop permitting.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "appliance/vault.h"
#include "hsm/bytes.h"
#include "hsm/status.h"
#include "ledger/entry.h"
#include "ledger/rules/authorizer.h"
#include "ledger/rules/deployment.h"
#include "ledger/rules/validator.h"

namespace medgate::ledger {
class Ledger;
}

namespace medgate::appliance {

inline constexpr const char* kReadAction = "read";

struct RulesVersionInfo {
  std::uint64_t version = 0;
  std::string text;
  Hash sha256{};
  std::uint64_t entry = 0;
  std::uint64_t time_us = 0;
  std::string actor;
  std::size_t policies = 0;
  std::set<std::string> signed_categories;
};

struct DirectoryInfo {
  std::uint64_t version = 0;
  std::string text;  // as imported (Cedar JSON entities)
  Hash sha256{};
  std::uint64_t entry = 0;
  std::uint64_t time_us = 0;
  std::string actor;
  std::size_t entities = 0;
};

struct ConsentGrant {
  std::string id;
  Pseudonym patient;
  std::string to;  // a Cedar entity: Practitioner::"dr-lee", Role::"ward-3-nurse"
  std::string data;
  std::string purpose;
  std::optional<std::uint64_t> until_us;
  bool patient_signed = false;
  std::string policy;  // the Cedar text it became
  std::uint64_t entry = 0;
  std::uint64_t time_us = 0;
  std::string actor;
  std::optional<std::uint64_t> revoked_entry;
  std::optional<std::uint64_t> revoked_us;
  bool revoked_by_patient = false;
};

// "active", "expired" (at `now_us`) or "revoked".
std::string_view grant_state(const ConsentGrant& grant, std::uint64_t now_us);

struct GrantRequest {
  Pseudonym patient;
  std::string to;
  std::string data;
  std::string purpose;
  std::optional<std::uint64_t> until_us;
};

struct AccessRequest {
  std::string principal;  // Cedar entity text
  Pseudonym patient;
  std::string purpose;
  std::string category;
  std::optional<std::string> reason;
};

struct AccessDecision {
  rules::Response response;
  bool break_glass = false;
  std::uint64_t state = 0;  // newest rules/directory/consent entry the decision saw
};

// Purposes of use a grant or a request may name (HL7 v3 PurposeOfUse codes, as FHIR Consent uses
// them). ETREAT is break-glass: only deployed rules can permit it, never a grant.
bool known_purpose(std::string_view code);

class ConsentBook {
 public:
  // Replays the ledger's consent state. kCorruption when a recorded rules version, directory or
  // grant no longer parses (a build that reads the subset differently), naming the entry.
  static Result<std::unique_ptr<ConsentBook>> open(ledger::Ledger& ledger, Vault& vault);
  ~ConsentBook();

  // kInvalidArgument with every located error when the text does not check.
  Result<RulesVersionInfo> deploy_rules(std::string text, const std::string& actor);
  std::vector<RulesVersionInfo> rules_versions() const;
  // The latest when `version` is empty; kNotFound for an unknown version.
  Result<RulesVersionInfo> rules_version(std::optional<std::uint64_t> version) const;

  Result<DirectoryInfo> import_directory(std::string json_text, const std::string& actor);
  std::optional<DirectoryInfo> directory() const;

  Result<ConsentGrant> grant(const GrantRequest& request, const std::string& actor);
  Result<ConsentGrant> grant_signed(ByteView document, ByteView signature,
                                    const std::string& actor);
  Result<ConsentGrant> revoke(std::string_view id, const std::string& actor);
  Result<ConsentGrant> revoke_signed(ByteView document, ByteView signature,
                                     const std::string& actor);
  std::vector<ConsentGrant> grants(const std::optional<Pseudonym>& patient) const;

  // Records the patient's public key (PEM or DER) and returns its key id (SHA-256 of the DER).
  Result<Hash> enroll_key(const Pseudonym& patient, ByteView key, const std::string& actor);
  std::optional<Hash> patient_key_id(const Pseudonym& patient) const;

  // Decides and records the decision; the returned decision is durable. `returned` is the number
  // of observations the caller will hand out on allow (recorded with the decision).
  Result<AccessDecision> decide(const AccessRequest& request);
  Result<std::uint64_t> record_decision(const AccessRequest& request,
                                        const AccessDecision& decision, std::uint64_t returned,
                                        const std::string& actor);

  const std::string& ledger_id() const;

  // A replicated ledger (appliance/cluster.h): a consent, rules, directory or patient-key entry
  // from the ledger's blocks, in ledger order, own and other members' alike; on such a ledger
  // this is the only way the book's state changes, and a local change returns once its entry
  // came back through here. Entries the book has (replayed at open) change nothing.
  Status apply_replicated(std::uint64_t index, const ledger::Entry& entry);

  // For medctl status: decisions recorded since start.
  struct Counters {
    std::uint64_t allowed = 0;
    std::uint64_t denied = 0;
    std::uint64_t break_glass = 0;
    std::uint64_t policy_errors = 0;  // decisions in which some policy erred
  };
  Counters counters() const;

  class Impl;

 private:
  explicit ConsentBook(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace medgate::appliance
