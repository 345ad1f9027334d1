#!/usr/bin/env bash
# Audit export end to end, with the real medgated, medctl and a SoftHSM token: access decisions
# about a patient, a key rotation and an erasure on the ledger; `medctl audit export` by the
# auditor group (others get nothing; decrypted values only for admins, recorded); `medctl audit
# verify` offline against the public key alone, and stock openssl on the bundle signature;
# tampered bundles named, with exit 1; something that is not a bundle, exit 2.
source "$(dirname "$0")/lib.sh" "$1"

DATA=$WORK/data
mkdir -p "$WORK/run" "$WORK/out"
chmod 755 "$WORK/run"
chmod 777 "$WORK/out"
SOCK=$WORK/run/admin.sock
"$MEDCTL" init --data-dir "$DATA" --ledger-id ward-7 --socket "$SOCK" >/dev/null
CONF=$DATA/medgated.toml
sed -i "s/^admin_group = .*/admin_group = 'daemon'/; s/^auditor_group = .*/auditor_group = 'nogroup'/" "$CONF"
export MEDGATE_SOCKET=$SOCK
LOG=$WORK/medgated.log
MARK=MARKER$RANDOM$RANDOM
PATIENT="HOSP:$MARK-P1"
OTHER="HOSP:$MARK-P2"
cp "$DATA/signing-key.pem" "$WORK/first-key.pem"
start_daemon "$CONF" "$LOG"

say "== a patient's history: access decisions, a key rotation, an erasure"
for who in "$PATIENT" "$OTHER" "$PATIENT"; do
  expect_rc 1 "an access decision is recorded (deny, exit 1)" -- bash -c "printf '%s\n' '$who' | '$MEDCTL' data read --as 'Practitioner::\"dr-lee\"' --patient - --purpose TREAT"
done
expect_rc 0 "keys rotate" -- "$MEDCTL" keys rotate
expect_rc 1 "another decision, under the new key" -- bash -c "printf '%s\n' '$PATIENT' | '$MEDCTL' data read --as 'Practitioner::\"dr-kim\"' --patient - --purpose TREAT"
expect_rc 0 "the patient is erased" -- bash -c "printf '%s\n' '$PATIENT' | '$MEDCTL' patient erase - --reason 'request' --yes"

say "== export: auditors yes, others nothing"
B=$WORK/out/all.cbor
expect_rc 0 "the auditor group exports everything" -- as_user nobody "$MEDCTL" audit export --out "$B"
expect_in "wrote .*all.cbor" "and is told what was written"
[ -s "$B" ] && [ -s "$B.sig" ] && pass "bundle and signature written" || failed "bundle or signature missing"
expect_rc 1 "anyone else gets nothing" -- as_user bin "$MEDCTL" audit export --out "$WORK/out/bin.cbor"
[ ! -e "$WORK/out/bin.cbor" ] && pass "and no file" || failed "a file was written for an outsider"
expect_rc 1 "an auditor may not ask for decrypted values" -- as_user nobody "$MEDCTL" audit export --out "$WORK/out/v.cbor" --include-values
expect_in "only an admin" "says why"
P=$WORK/out/patient.cbor
expect_rc 0 "a per-patient export (identifier from stdin)" -- bash -c "printf '%s\n' '$PATIENT' | setpriv --reuid=nobody --regid=\$(id -g nobody) --init-groups --inh-caps=-all -- '$MEDCTL' audit export --out '$P' --patient -"
E=$WORK/out/erasure.cbor
expect_rc 0 "an export of erasures" -- as_user nobody "$MEDCTL" audit export --out "$E" --kind erasure
expect_rc 2 "an unknown kind is bad input" -- as_user nobody "$MEDCTL" audit export --out "$WORK/out/x.cbor" --kind nonsense
expect_rc 2 "a bad time is bad input" -- as_user nobody "$MEDCTL" audit export --out "$WORK/out/x.cbor" --from yesterday
V=$WORK/out/values.cbor
expect_rc 0 "an admin may export with values" -- "$MEDCTL" audit export --out "$V" --include-values --kind access
expect_rc 0 "and that export is on the ledger" -- "$MEDCTL" --json ledger show --entry "$("$MEDCTL" --json status | sed -n 's/.*"tree_size": \([0-9]*\).*/\1/p' | head -1 | awk '{print $1 - 1}')"
expect_in '"op": "audit.export"' "as an admin action"

K=$WORK/out/access.cbor
expect_rc 0 "an export with --format csv writes the bundle and its rendering" -- as_user nobody "$MEDCTL" audit export --out "$K" --kind access --format csv
expect_in "wrote .*access.csv \(4 audit events, csv, derived from .*access.cbor\)" "and names both"
expect_in "verified against the ledger's own genesis key" "says what the rendering was checked against"
[ -s "$K" ] && [ -s "$K.sig" ] && [ -s "$WORK/out/access.csv" ] && pass "bundle, signature and CSV written" || failed "a file is missing"
expect_rc 0 "with --trust, the rendering is checked against that key" -- as_user nobody "$MEDCTL" audit export --out "$WORK/out/access2.cbor" --kind access --format fhir --trust "$WORK/first-key.pem"
expect_not_in "genesis key" "and no note"
[ -s "$WORK/out/access2.fhir.json" ] && pass "FHIR written beside it" || failed "no access2.fhir.json"
expect_rc 0 "an export with an RFC 9162 audit path for each entry" -- as_user nobody "$MEDCTL" audit export --out "$WORK/out/per-entry.cbor" --kind access --proofs per-entry
expect_rc 2 "--proofs takes shared or per-entry" -- as_user nobody "$MEDCTL" audit export --out "$WORK/out/y.cbor" --proofs some
expect_in "shared or per-entry" "naming both"
expect_rc 2 "an unknown format is bad input" -- as_user nobody "$MEDCTL" audit export --out "$WORK/out/x.cbor" --format xml
[ ! -e "$WORK/out/x.cbor" ] && pass "and nothing is exported" || failed "a bundle was written for a bad format"

# The bundles are signed by the key that signs heads now (after the rotation): openssl needs it.
"$MEDCTL" keys show | sed -n '/BEGIN PUBLIC KEY/,/END PUBLIC KEY/p' >"$WORK/current-key.pem"

say "== verify offline: no daemon"
stop_daemon
expect_rc 0 "the whole bundle verifies against the first key (through the rotation)" -- "$MEDCTL" audit verify "$B" --trust "$WORK/first-key.pem"
expect_in "verifies: ledger 'ward-7'" "says so"
expect_in "key chain of 2" "across the rotation"
expect_in "bundle format 2" "in format 2, as exports are now"
expect_rc 0 "the per-entry export verifies" -- "$MEDCTL" audit verify "$WORK/out/per-entry.cbor" --trust "$WORK/first-key.pem"
expect_in "bundle format 1" "in format 1 (a proof per entry)"
expect_rc 0 "and against the current key" -- "$MEDCTL" audit verify "$B" --trust "$DATA/signing-key.pem"
expect_rc 0 "the per-patient bundle verifies, complete" -- "$MEDCTL" audit verify "$P" --trust "$WORK/first-key.pem" --entries
expect_in "patient: complete; latest entry" "completeness proved by the subject map"
expect_in "patient-erasure" "the erasure is in it"
expect_rc 0 "the erasure export verifies" -- "$MEDCTL" --json audit verify "$E" --trust "$WORK/first-key.pem"
expect_in '"selected": 1' "with one erasure"
expect_rc 0 "stock openssl checks the bundle signature" -- openssl dgst -sha256 -verify "$WORK/current-key.pem" -signature "$B.sig" "$B"
expect_in "Verified OK" "Verified OK"
V1=$(dirname "$0")/../data/audit
expect_rc 0 "a format-1 bundle from before format 2 still verifies" -- "$MEDCTL" audit verify "$V1/patient-a.v1.cbor" --trust "$V1/first-key.pem"
expect_in "bundle format 1" "in format 1"
expect_in "patient: complete; latest entry 10" "complete, as it was"

say "== renderings: offline, from a verified bundle"
openssl ecparam -name prime256v1 -genkey -noout -out "$WORK/other.key" 2>/dev/null
openssl ec -in "$WORK/other.key" -pubout -out "$WORK/other.pem" 2>/dev/null
expect_rc 0 "the per-patient bundle renders as FHIR (no daemon)" -- "$MEDCTL" audit render "$P" --trust "$WORK/first-key.pem" --format fhir
expect_in "verifies; wrote .*patient.fhir.json \(4 audit events, fhir\)" "beside the bundle"
expect_rc 0 "and as CSV" -- "$MEDCTL" audit render "$P" --trust "$WORK/first-key.pem" --format csv
expect_rc 0 "to standard output with --out -" -- "$MEDCTL" audit render "$P" --trust "$WORK/first-key.pem" --format csv --out -
expect_in "^bundle_file,bundle_sha256,head_tree_size,head_root,index," "the CSV's header"
SELECTED=$("$MEDCTL" --json audit verify "$P" --trust "$WORK/first-key.pem" | python3 -c 'import json,sys; print(json.load(sys.stdin)["selected"])')
SHA=$(sha256sum "$P" | cut -d' ' -f1)
check_fhir() {
  python3 - "$1" "$SELECTED" "$SHA" <<'PY'
import json, sys
path, selected, sha = sys.argv[1], int(sys.argv[2]), sys.argv[3]
b = json.load(open(path))
assert b["resourceType"] == "Bundle" and b["type"] == "collection", "not a collection Bundle"
assert b["identifier"]["value"] == sha, "the Bundle does not name the bundle's SHA-256"
ref = {x["url"]: x for x in b["meta"]["extension"][0]["extension"]}
assert ref["file"]["valueString"] == "patient.cbor", ref["file"]
assert ref["sha256"]["valueString"] == sha
events = [e["resource"] for e in b["entry"]]
assert all(e["resourceType"] == "AuditEvent" for e in events)
assert len(events) == selected, f"{len(events)} AuditEvents, {selected} selected entries"
for e in events:
    entry = [x for x in e["entity"] if x.get("what", {}).get("identifier", {}).get("system") == "urn:medgate:ledger-entry"]
    assert len(entry) == 1 and any(d["type"] == "leaf-hash" and len(d["valueString"]) == 64 for d in entry[0]["detail"]), e["id"]
access = [e for e in events if e["type"]["code"] == "110113"]
assert len(access) == 3 and all(e["outcome"] == "4" for e in access), "denials are outcome 4"
assert all(e["purposeOfEvent"][0]["coding"][0]["code"] == "TREAT" for e in access)
assert any(e["action"] == "D" for e in events), "the erasure is in it"
print(f"{len(events)} AuditEvents")
PY
}
check_csv() {
  python3 - "$1" "$SELECTED" "$SHA" <<'PY'
import csv, sys
path, selected, sha = sys.argv[1], int(sys.argv[2]), sys.argv[3]
rows = list(csv.DictReader(open(path, newline="")))
assert len(rows) == selected, f"{len(rows)} rows, {selected} selected entries"
assert all(r["bundle_sha256"] == sha and r["bundle_file"] == "patient.cbor" for r in rows)
assert [r["outcome"] for r in rows if r["kind"] == "access"] == ["4"] * 3
assert [r["type"] for r in rows][-1] == "patient-erasure"
print(f"{len(rows)} rows")
PY
}
expect_rc 0 "the FHIR Bundle: one AuditEvent per selected entry, each traced to the bundle" -- check_fhir "$WORK/out/patient.fhir.json"
expect_rc 0 "the CSV: one row per selected entry, each naming the bundle" -- check_csv "$WORK/out/patient.csv"
expect_rc 0 "the FHIR an export wrote is valid JSON with AuditEvents" -- jq -e '.entry | length == 4 and all(.resource.resourceType == "AuditEvent")' "$WORK/out/access2.fhir.json"
expect_rc 0 "no progress bar when stderr is not a terminal" -- bash -c "'$MEDCTL' audit render '$P' --trust '$WORK/first-key.pem' --format csv --out /dev/null 2>&1 >/dev/null"
[ -z "$OUT" ] && pass "stderr stays empty" || failed "stderr has: $OUT"
expect_rc 0 "on a terminal, a progress bar on stderr" -- script -qec "'$MEDCTL' audit render '$P' --trust '$WORK/first-key.pem' --format csv --out /dev/null" /dev/null
expect_in "verifying \[#+\] [0-9]+/[0-9]+ entries" "entries done / total"
expect_rc 1 "a bundle verified against a key the ledger never used is not rendered" -- "$MEDCTL" audit render "$P" --trust "$WORK/other.pem" --format fhir --out "$WORK/out/never.json"
[ ! -e "$WORK/out/never.json" ] && pass "and nothing is written" || failed "a rendering was written"
expect_rc 2 "render wants fhir or csv" -- "$MEDCTL" audit render "$P" --trust "$WORK/first-key.pem" --format bundle

say "== tampering"
cp "$P" "$WORK/t.cbor"; cp "$P.sig" "$WORK/t.cbor.sig"
# The last byte is the last hash of the bundle's multi-leaf proof (key 10, written last).
python3 -c 'import sys; p = sys.argv[1]; b = bytearray(open(p, "rb").read()); b[-1] ^= 0x01; open(p, "wb").write(b)' "$WORK/t.cbor"
expect_rc 1 "a changed byte fails (exit 1)" -- "$MEDCTL" audit verify "$WORK/t.cbor" --trust "$WORK/first-key.pem"
expect_in "does NOT verify" "and says so"
expect_in "multi-leaf inclusion proof does not lead to the signed head's root" "names the proof"
cp "$B.sig" "$WORK/t.cbor.sig"; cp "$P" "$WORK/t.cbor"
expect_rc 1 "another bundle's signature fails" -- "$MEDCTL" audit verify "$WORK/t.cbor" --trust "$WORK/first-key.pem"
expect_in "the bundle signature does not verify" "names the bundle signature"
expect_rc 1 "a tampered bundle is not rendered" -- "$MEDCTL" audit render "$WORK/t.cbor" --trust "$WORK/first-key.pem" --format fhir
expect_in "no fhir rendering is written" "says so"
[ ! -e "$WORK/t.fhir.json" ] && pass "and no file" || failed "a rendering of a tampered bundle was written"
expect_rc 1 "openssl refuses it too" -- openssl dgst -sha256 -verify "$WORK/current-key.pem" -signature "$WORK/t.cbor.sig" "$WORK/t.cbor"
expect_rc 1 "a key the ledger never used is not trusted" -- "$MEDCTL" audit verify "$B" --trust "$WORK/other.pem"
expect_in "is a trusted key" "names the trust problem"
printf 'not a bundle' >"$WORK/junk.cbor"
expect_rc 2 "something that is not a bundle (exit 2)" -- "$MEDCTL" audit verify "$WORK/junk.cbor" --trust "$WORK/first-key.pem"
expect_in "is not an audit bundle" "says so"
expect_rc 2 "the ledger file is not a bundle either" -- "$MEDCTL" audit verify "$DATA/ledger.db" --trust "$WORK/first-key.pem"
expect_rc 2 "no trusted key is bad usage" -- "$MEDCTL" audit verify "$B"
if grep -q "$MARK" "$B" "$P" "$E" "$LOG" "$WORK/out/patient.fhir.json" "$WORK/out/patient.csv" "$WORK/out/access.csv"; then failed "an identifier is in a bundle, a rendering or the log"; else pass "no identifier in any bundle, rendering or the log"; fi
expect_rc 0 "the ledger still verifies offline" -- "$MEDCTL" ledger verify --db "$DATA/ledger.db" --trust "$WORK/first-key.pem"

finish
