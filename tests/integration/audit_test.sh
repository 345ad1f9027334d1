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

# The bundles are signed by the key that signs heads now (after the rotation): openssl needs it.
"$MEDCTL" keys show | sed -n '/BEGIN PUBLIC KEY/,/END PUBLIC KEY/p' >"$WORK/current-key.pem"

say "== verify offline: no daemon"
stop_daemon
expect_rc 0 "the whole bundle verifies against the first key (through the rotation)" -- "$MEDCTL" audit verify "$B" --trust "$WORK/first-key.pem"
expect_in "verifies: ledger 'ward-7'" "says so"
expect_in "key chain of 2" "across the rotation"
expect_rc 0 "and against the current key" -- "$MEDCTL" audit verify "$B" --trust "$DATA/signing-key.pem"
expect_rc 0 "the per-patient bundle verifies, complete" -- "$MEDCTL" audit verify "$P" --trust "$WORK/first-key.pem" --entries
expect_in "patient: complete; latest entry" "completeness proved by the subject map"
expect_in "patient-erasure" "the erasure is in it"
expect_rc 0 "the erasure export verifies" -- "$MEDCTL" --json audit verify "$E" --trust "$WORK/first-key.pem"
expect_in '"selected": 1' "with one erasure"
expect_rc 0 "stock openssl checks the bundle signature" -- openssl dgst -sha256 -verify "$WORK/current-key.pem" -signature "$B.sig" "$B"
expect_in "Verified OK" "Verified OK"

say "== tampering"
cp "$P" "$WORK/t.cbor"; cp "$P.sig" "$WORK/t.cbor.sig"
SIZE=$(stat -c %s "$WORK/t.cbor")
printf '\x00' | dd of="$WORK/t.cbor" bs=1 seek=$((SIZE - 40)) conv=notrunc status=none
expect_rc 1 "a changed byte fails (exit 1)" -- "$MEDCTL" audit verify "$WORK/t.cbor" --trust "$WORK/first-key.pem"
expect_in "does NOT verify" "and says so"
cp "$B.sig" "$WORK/t.cbor.sig"; cp "$P" "$WORK/t.cbor"
expect_rc 1 "another bundle's signature fails" -- "$MEDCTL" audit verify "$WORK/t.cbor" --trust "$WORK/first-key.pem"
expect_in "the bundle signature does not verify" "names the bundle signature"
expect_rc 1 "openssl refuses it too" -- openssl dgst -sha256 -verify "$WORK/current-key.pem" -signature "$WORK/t.cbor.sig" "$WORK/t.cbor"
openssl ecparam -name prime256v1 -genkey -noout -out "$WORK/other.key" 2>/dev/null
openssl ec -in "$WORK/other.key" -pubout -out "$WORK/other.pem" 2>/dev/null
expect_rc 1 "a key the ledger never used is not trusted" -- "$MEDCTL" audit verify "$B" --trust "$WORK/other.pem"
expect_in "is a trusted key" "names the trust problem"
printf 'not a bundle' >"$WORK/junk.cbor"
expect_rc 2 "something that is not a bundle (exit 2)" -- "$MEDCTL" audit verify "$WORK/junk.cbor" --trust "$WORK/first-key.pem"
expect_in "is not an audit bundle" "says so"
expect_rc 2 "the ledger file is not a bundle either" -- "$MEDCTL" audit verify "$DATA/ledger.db" --trust "$WORK/first-key.pem"
expect_rc 2 "no trusted key is bad usage" -- "$MEDCTL" audit verify "$B"
if grep -q "$MARK" "$B" "$P" "$E" "$LOG"; then failed "an identifier is in a bundle or the log"; else pass "no identifier in any bundle or the log"; fi
expect_rc 0 "the ledger still verifies offline" -- "$MEDCTL" ledger verify --db "$DATA/ledger.db" --trust "$WORK/first-key.pem"

finish
