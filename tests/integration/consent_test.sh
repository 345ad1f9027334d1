#!/usr/bin/env bash
# Consent smart-rules end to end, with the real medgated, medctl, medgate-mllp-send and a SoftHSM
# token: rules checked, tested offline and deployed; a directory imported; a reading ingested over
# HL7; grants (by an admin and signed by the patient with stock openssl), withdrawals and expiry
# deciding `medctl data read`; break-glass; every decision on the ledger; nothing identifying in
# the log or the ledger's plaintext; the state surviving a restart; offline verification.
source "$(dirname "$0")/lib.sh" "$1"
EXAMPLES=$(cd "$(dirname "$0")/../../docs/examples" && pwd)
MLLP_SEND=$BIN_SRC/medgate-mllp-send

DATA=$WORK/data
mkdir -p "$WORK/run" "$WORK/msg" "$WORK/keys"
chmod 755 "$WORK/run"
SOCK=$WORK/run/admin.sock
"$MEDCTL" init --data-dir "$DATA" --ledger-id ward-7 --socket "$SOCK" >/dev/null
CONF=$DATA/medgated.toml
sed -i "s/^admin_group = .*/admin_group = 'daemon'/; s/^auditor_group = .*/auditor_group = 'nogroup'/" "$CONF"
cat >>"$CONF" <<EOF

[hl7]
address = "127.0.0.1"
port = 0
EOF
LOG=$WORK/medgated.log
export MEDGATE_SOCKET=$SOCK
MARK=MARKER$RANDOM$RANDOM
PATIENT="HOSP:$MARK-P1"
REASON="$MARK-reason: cardiac arrest in bed 4"
entry_of() { sed -n 's/.*"entry": \([0-9]*\).*/\1/p' <<<"$OUT" | head -1; }

say "== rules, offline"
expect_rc 0 "the example base policy checks" -- "$MEDCTL" rules check "$EXAMPLES/base-policy.cedar"
expect_in "5 policies, no errors" "and says how many policies"
printf 'permit (principal, action, resource);\n\nforbid (principal, action, resource)\n  when { 1 + };\n' >"$WORK/bad.cedar"
expect_rc 1 "a broken rules file is rejected (exit 1)" -- "$MEDCTL" rules check "$WORK/bad.cedar"
expect_in "bad.cedar:4:[0-9]+: error" "with the line and column of the error"
printf '@id("g-1234")\npermit (principal, action, resource);\n' >"$WORK/reserved.cedar"
expect_rc 1 "grant ids are reserved" -- "$MEDCTL" rules check "$WORK/reserved.cedar"
expect_rc 2 "a missing file is bad input" -- "$MEDCTL" rules check "$WORK/nope.cedar"
cat >"$WORK/entities.json" <<'EOF'
[{"uid": {"type": "Practitioner", "id": "dr-okafor"}, "attrs": {}, "parents": [{"type": "Role", "id": "emergency-physician"}]},
 {"uid": {"type": "PatientData", "id": "p/vitals"}, "attrs": {"category": "vitals"}, "parents": [{"type": "Category", "id": "vitals"}]}]
EOF
expect_rc 0 "what-if: break-glass permitted by the base policy" -- "$MEDCTL" rules test --policies "$EXAMPLES/base-policy.cedar" --entities "$WORK/entities.json" --principal 'Practitioner::"dr-okafor"' --action 'Action::"read"' --resource 'PatientData::"p/vitals"' --context '{"purpose": "ETREAT", "reason": "arrest"}'
expect_in "decision: allow" "allow"
expect_in "determining policies: break-glass" "names the determining policy"
expect_rc 1 "what-if: without a reason it is denied (exit 1)" -- "$MEDCTL" --json rules test --policies "$EXAMPLES/base-policy.cedar" --entities "$WORK/entities.json" --principal 'Practitioner::"dr-okafor"' --action 'Action::"read"' --resource 'PatientData::"p/vitals"' --context '{"purpose": "ETREAT"}'
expect_in '"decision": "deny"' "JSON answer"
printf 'permit (principal, action, resource);\npermit (principal, action, resource) when { context.x > 1 };\n' >"$WORK/err.cedar"
expect_rc 0 "what-if: an erroring policy is skipped and reported" -- "$MEDCTL" --json rules test --policies "$WORK/err.cedar" --principal 'A::"a"' --action 'Action::"read"' --resource 'R::"r"'
expect_in '"policy": "policy1"' "unnamed policies are policy0, policy1, ..."
expect_rc 2 "a malformed entity is bad usage" -- "$MEDCTL" rules test --policies "$WORK/err.cedar" --principal 'dr-lee' --action 'Action::"read"' --resource 'R::"r"'

say "== the daemon, a reading"
start_daemon "$CONF" "$LOG"
HL7_PORT=$("$MEDCTL" --json status | sed -n '/"hl7": {/,/}/s/.*"port": \([0-9]*\).*/\1/p' | head -1)
"$MEDCTL" device add central --kind hl7 --hl7-app CENTRAL --hl7-facility ICU >/dev/null
printf 'MSH|^~\\&|CENTRAL|ICU|MEDGATE|HOSP|20261125120000||ORU^R01^ORU_R01|MSG0001|P|2.6\rPID|1||%s-P1^^^HOSP^MR\rOBR|1||||||20261125115900\rOBX|1|NM|150456^MDC_PULS_OXIM_SAT_O2^MDC||97|262688^MDC_DIM_PERCENT^MDC|||||F|||20261125115900\r' "$MARK" >"$WORK/msg/1.hl7"
expect_rc 0 "a reading for the patient is ingested (AA)" -- "$MLLP_SEND" --host 127.0.0.1 --port "$HL7_PORT" "$WORK/msg/1.hl7"

say "== no rules yet: everything is denied, and recorded"
expect_rc 1 "dr-lee may not read (exit 1)" -- bash -c "printf '%s\n' '$PATIENT' | '$MEDCTL' --json data read --as 'Practitioner::\"dr-lee\"' --patient - --purpose TREAT"
expect_in '"decision": "deny"' "deny"
expect_in '"observations": null' "and nothing is returned"
DENY_ENTRY=$(entry_of)
expect_rc 0 "the decision is on the ledger" -- "$MEDCTL" --json ledger show --entry "$DENY_ENTRY"
expect_in '"type": "access-decision"' "as an access-decision entry"
expect_in '"decision": "deny"' "saying deny"

say "== directory and rules, on the ledger"
expect_rc 0 "directory import" -- "$MEDCTL" directory import "$EXAMPLES/directory.json"
expect_in "directory version 1 imported: 13 entities" "version 1, 13 entities"
expect_rc 0 "directory show" -- "$MEDCTL" directory show
expect_in 'Practitioner::"dr-lee"  in Role::"physician"' "lists principals with their parents"
printf '[{"uid": {"type": "Patient", "id": "x"}, "attrs": {}, "parents": []}]' >"$WORK/patients.json"
expect_rc 2 "a directory holding patients is refused" -- "$MEDCTL" directory import "$WORK/patients.json"
expect_in "patients are not part of the directory" "says why"
printf '[{"uid": {"type": "Practitioner"}, "attrs": {}}]' >"$WORK/broken.json"
expect_rc 2 "a malformed directory is refused" -- "$MEDCTL" directory import "$WORK/broken.json"
expect_rc 2 "rules that do not check are not deployed" -- "$MEDCTL" rules deploy "$WORK/bad.cedar"
expect_rc 0 "rules deploy" -- "$MEDCTL" rules deploy "$EXAMPLES/base-policy.cedar"
expect_in "rules version 1 deployed: 5 policies" "version 1"
expect_rc 0 "rules list" -- "$MEDCTL" rules list
expect_in "version 1 " "lists version 1"
expect_rc 0 "rules show" -- "$MEDCTL" --json rules show 1
expect_in "$(sha256sum "$EXAMPLES/base-policy.cedar" | cut -c1-64)" "with the SHA-256 of the deployed text"
expect_rc 2 "an unknown version" -- "$MEDCTL" rules show 9

say "== grants decide"
read_as() { # read_as WHO PURPOSE [extra args]: data read for $PATIENT (from stdin)
  local who=$1 purpose=$2; shift 2
  printf '%s\n' "$PATIENT" | "$MEDCTL" --json data read --as "$who" --patient - --purpose "$purpose" "$@"
}
export -f read_as; export MEDCTL PATIENT REASON
expect_rc 1 "dr-lee, no grant: denied" -- bash -c 'read_as "Practitioner::\"dr-lee\"" TREAT'
expect_rc 0 "an admin grants dr-lee vitals for treatment" -- bash -c "printf '%s\n' '$PATIENT' | '$MEDCTL' consent grant --patient - --to 'Practitioner::\"dr-lee\"' --data vitals --purpose TREAT"
GRANT=$(head -1 <<<"$OUT")
[[ "$GRANT" =~ ^g-[0-9a-f]{16}$ ]] && pass "it prints the grant id ($GRANT)" || failed "no grant id: $OUT"
expect_rc 0 "dr-lee: allowed" -- bash -c 'read_as "Practitioner::\"dr-lee\"" TREAT'
expect_in "\"$GRANT\"" "determined by the grant"
expect_in '"value": 97' "and the reading is returned, decrypted"
expect_rc 1 "dr-lee for research: denied (the grant is for TREAT)" -- bash -c 'read_as "Practitioner::\"dr-lee\"" HRESCH'
expect_rc 1 "another practitioner: denied" -- bash -c 'read_as "Practitioner::\"dr-okafor\"" TREAT'
expect_rc 0 "nurse-kim (ICU ward) by the base policy" -- bash -c 'read_as "Practitioner::\"nurse-kim\"" TREAT'
expect_in '"icu-team-vitals"' "determined by icu-team-vitals"
expect_rc 0 "a grant to a suspended practitioner" -- bash -c "printf '%s\n' '$PATIENT' | '$MEDCTL' consent grant --patient - --to 'Practitioner::\"dr-former\"' --data vitals --purpose TREAT"
expect_rc 1 "is overridden by the forbid" -- bash -c 'read_as "Practitioner::\"dr-former\"" TREAT'
expect_in '"suspended-staff"' "determined by suspended-staff"
expect_rc 2 "a grant for ETREAT is refused (break-glass is the rules' business)" -- bash -c "printf '%s\n' '$PATIENT' | '$MEDCTL' consent grant --patient - --to 'Practitioner::\"dr-lee\"' --data vitals --purpose ETREAT"
expect_rc 2 "an unknown purpose is refused" -- bash -c "printf '%s\n' '$PATIENT' | '$MEDCTL' consent grant --patient - --to 'Practitioner::\"dr-lee\"' --data vitals --purpose FUN"
expect_rc 2 "a bad entity is refused" -- bash -c "printf '%s\n' '$PATIENT' | '$MEDCTL' consent grant --patient - --to 'dr-lee' --data vitals --purpose TREAT"
expect_rc 2 "a past --until is refused" -- bash -c "printf '%s\n' '$PATIENT' | '$MEDCTL' consent grant --patient - --to 'Practitioner::\"dr-lee\"' --data vitals --purpose TREAT --until 2020-01-01"

say "== withdrawal and expiry"
expect_rc 0 "revoke" -- "$MEDCTL" consent revoke "$GRANT"
expect_rc 1 "the next decision: denied" -- bash -c 'read_as "Practitioner::\"dr-lee\"" TREAT'
expect_rc 2 "revoking again" -- "$MEDCTL" consent revoke "$GRANT"
expect_in "already withdrawn" "says so"
expect_rc 2 "an unknown grant" -- "$MEDCTL" consent revoke g-0000000000000000
UNTIL=$(date -u -d '+3 seconds' +%Y-%m-%dT%H:%M:%SZ)
expect_rc 0 "a grant until a few seconds from now" -- bash -c "printf '%s\n' '$PATIENT' | '$MEDCTL' consent grant --patient - --to 'Practitioner::\"dr-lee\"' --data vitals --purpose TREAT --until $UNTIL"
SHORT=$(head -1 <<<"$OUT")
expect_rc 0 "allows before it ends" -- bash -c 'read_as "Practitioner::\"dr-lee\"" TREAT'
sleep 4
expect_rc 1 "and denies after" -- bash -c 'read_as "Practitioner::\"dr-lee\"" TREAT'
expect_rc 0 "consent list" -- bash -c "printf '%s\n' '$PATIENT' | '$MEDCTL' consent list --patient -"
expect_in "$GRANT +revoked" "the withdrawn grant is revoked"
expect_in "$SHORT +expired" "the short one expired"

say "== break-glass"
expect_rc 2 "ETREAT without a reason is refused" -- bash -c 'read_as "Practitioner::\"dr-okafor\"" ETREAT'
expect_in "needs --reason" "and says so"
expect_rc 0 "ETREAT with a reason by an emergency physician" -- bash -c 'read_as "Practitioner::\"dr-okafor\"" ETREAT --reason "$REASON"'
expect_in '"break_glass": true' "flagged"
expect_in '"break-glass"' "determined by the break-glass rule"
BG_ENTRY=$(entry_of)
expect_rc 0 "its entry" -- "$MEDCTL" --json ledger show --entry "$BG_ENTRY"
expect_in '"break_glass": true' "is flagged on the ledger"
expect_rc 1 "ETREAT by someone the rules do not allow" -- bash -c 'read_as "Practitioner::\"dr-lee\"" ETREAT --reason "$REASON"'
grep -q "BREAK-GLASS" "$LOG" && pass "break-glass is logged" || failed "no BREAK-GLASS line in the log"

expect_rc 0 "status shows the consent state and the decisions" -- "$MEDCTL" status
expect_in "consent    rules version 1 \\(5 policies\\), directory version 1; 3 grants \\(1 active\\)" "rules, directory and grants"
expect_in "2 break-glass" "and the two break-glass decisions (one allowed, one denied)"

say "== patient-signed consent"
openssl ecparam -name prime256v1 -genkey -noout -out "$WORK/keys/patient.key" 2>/dev/null
openssl ec -in "$WORK/keys/patient.key" -pubout -out "$WORK/keys/patient.pub" 2>/dev/null
openssl ecparam -name prime256v1 -genkey -noout -out "$WORK/keys/other.key" 2>/dev/null
expect_rc 1 "an admin cannot grant psychiatry (the rules require the patient's signature)" -- bash -c "printf '%s\n' '$PATIENT' | '$MEDCTL' consent grant --patient - --to 'Practitioner::\"dr-lee\"' --data psychiatry --purpose TREAT"
expect_in "require the patient's own signed consent" "says why"
expect_rc 0 "draft the document" -- bash -c "printf '%s\n' '$PATIENT' | '$MEDCTL' consent draft --patient - --to 'Practitioner::\"dr-lee\"' --data psychiatry --purpose TREAT"
printf '%s\n' "$OUT" >"$WORK/consent.json"
grep -q "$MARK" "$WORK/consent.json" && failed "the document names the patient" || pass "the document names the patient by pseudonym only"
openssl dgst -sha256 -sign "$WORK/keys/patient.key" -out "$WORK/consent.json.sig" "$WORK/consent.json"
expect_rc 2 "before the patient enrolled a key it is refused" -- "$MEDCTL" consent grant --signed "$WORK/consent.json"
expect_rc 0 "enrol the patient's key" -- bash -c "printf '%s\n' '$PATIENT' | '$MEDCTL' patient enroll - --pubkey '$WORK/keys/patient.pub'"
printf 'not a key' >"$WORK/keys/bad.pub"
expect_rc 2 "a bad key is refused" -- bash -c "printf '%s\n' '$PATIENT' | '$MEDCTL' patient enroll - --pubkey '$WORK/keys/bad.pub'"
openssl dgst -sha256 -sign "$WORK/keys/other.key" -out "$WORK/other.sig" "$WORK/consent.json"
expect_rc 1 "a document signed by another key is refused" -- "$MEDCTL" consent grant --signed "$WORK/consent.json" --signature "$WORK/other.sig"
sed 's/TREAT/HRESCH/' "$WORK/consent.json" >"$WORK/altered.json"
expect_rc 1 "an altered document is refused" -- "$MEDCTL" consent grant --signed "$WORK/altered.json" --signature "$WORK/consent.json.sig"
expect_rc 0 "the signed document grants" -- "$MEDCTL" consent grant --signed "$WORK/consent.json"
SIGNED=$(head -1 <<<"$OUT")
[[ "$SIGNED" =~ ^s-[0-9a-f]{16}$ ]] && pass "a signed grant's id ($SIGNED)" || failed "signed grant id: $OUT"
expect_rc 2 "the same document cannot grant twice" -- "$MEDCTL" consent grant --signed "$WORK/consent.json"
expect_rc 0 "dr-lee may read psychiatry now" -- bash -c 'read_as "Practitioner::\"dr-lee\"" TREAT --data psychiatry'
expect_in "\"$SIGNED\"" "by the signed grant"
expect_rc 0 "draft a withdrawal" -- bash -c "printf '%s\n' '$PATIENT' | '$MEDCTL' consent draft --patient - --grant $SIGNED"
printf '%s\n' "$OUT" >"$WORK/withdraw.json"
openssl dgst -sha256 -sign "$WORK/keys/patient.key" -out "$WORK/withdraw.json.sig" "$WORK/withdraw.json"
expect_rc 0 "the patient's signed withdrawal" -- "$MEDCTL" consent revoke --signed "$WORK/withdraw.json"
expect_rc 1 "then psychiatry is denied again" -- bash -c 'read_as "Practitioner::\"dr-lee\"" TREAT --data psychiatry'

say "== roles"
expect_rc 1 "an auditor may list grants but not read data" -- as_user nobody "$MEDCTL" data read --as 'Practitioner::"dr-lee"' --patient x --purpose TREAT
expect_in "needs the admin role" "says why"

say "== restart: the state comes back from the ledger"
stop_daemon
start_daemon "$CONF" "$LOG"
expect_rc 1 "the withdrawn grant stays withdrawn" -- bash -c 'read_as "Practitioner::\"dr-lee\"" TREAT'
expect_rc 0 "the rules are still deployed" -- bash -c 'read_as "Practitioner::\"nurse-kim\"" TREAT'
expect_rc 0 "consent list after restart" -- "$MEDCTL" consent list
expect_in "$SIGNED +revoked .*patient-signed" "the signed grant and its withdrawal"
stop_daemon

say "== nothing identifying in the log or the ledger; the ledger verifies"
for f in "$LOG" "$DATA"/ledger.db*; do
  if grep -qa "$MARK" "$f"; then failed "the marker is in $(basename "$f")"; else pass "no identifier or reason in $(basename "$f")"; fi
done
expect_rc 0 "offline verification (signed consents checked against the enrolled key)" -- "$MEDCTL" ledger verify --db "$DATA/ledger.db" --trust "$DATA/signing-key.pem"
finish
