#!/usr/bin/env bash
# The device registry as an admin uses it: medctl device add/list/show/bind/revoke/rotate-psk on a
# running medgated with a real SoftHSM token; PSKs shown once (or written 0600), wrapped at rest,
# never logged; patient identifiers only as pseudonyms on the ledger and in the files; every
# change a device-event entry; roles enforced; the registry survives a restart.
source "$(dirname "$0")/lib.sh" "$1"

DATA=$WORK/data
mkdir -p "$WORK/run"
chmod 755 "$WORK/run"
SOCK=$WORK/run/admin.sock
"$MEDCTL" init --data-dir "$DATA" --ledger-id ward-7 --socket "$SOCK" >/dev/null
CONF=$DATA/medgated.toml
sed -i "s/^admin_group = .*/admin_group = 'daemon'/; s/^auditor_group = .*/auditor_group = 'nogroup'/" "$CONF"
export MEDGATE_SOCKET=$SOCK
LOG=$WORK/medgated.log
MARKER=MRN-MARKER-$RANDOM$RANDOM

start_daemon "$CONF" "$LOG"

say "== add"
expect_rc 0 "add a CoAP device" -- "$MEDCTL" device add pump-1 --kind coap
expect_in "PSK +[A-Za-z0-9_-]{32}" "its PSK is shown once"
PSK1=$(sed -n 's/^PSK *\([A-Za-z0-9_-]*\)$/\1/p' <<<"$OUT")
expect_rc 2 "the same id twice" -- "$MEDCTL" device add pump-1 --kind coap
expect_in "registered already" "says so"
expect_rc 2 "a bad id" -- "$MEDCTL" device add "pump 1;" --kind coap
expect_in "device id is 1-64 characters" "names the rule"
expect_rc 2 "a bad kind" -- "$MEDCTL" device add pump-9 --kind zigbee
expect_in "coap or hl7" "names the kinds"
expect_rc 0 "add an HL7 source" -- "$MEDCTL" device add central-1 --kind hl7 --hl7-app CENTRAL --hl7-facility ICU
expect_in "MSH-3 'CENTRAL', MSH-4 'ICU'" "shows what identifies it"
expect_rc 2 "the same HL7 source under another id" -- "$MEDCTL" device add central-2 --kind hl7 --hl7-app CENTRAL --hl7-facility ICU
expect_rc 0 "add a device bound to a patient read from stdin, PSK to a file" -- \
  "$MEDCTL" device add pump-2 --kind coap --patient - --psk-out "$WORK/pump-2.psk" <<<"$MARKER"
[ "$(stat -c %a "$WORK/pump-2.psk")" = 600 ] && pass "the PSK file is 0600" || failed "PSK file mode $(stat -c %a "$WORK/pump-2.psk")"
[ "$(wc -c <"$WORK/pump-2.psk")" = 32 ] && pass "the PSK file holds the PSK" || failed "PSK file holds $(wc -c <"$WORK/pump-2.psk") bytes"
expect_not_in "$(cat "$WORK/pump-2.psk")" "a PSK written to a file is not printed"
expect_in "patient +pseudonym [0-9a-f]{64}" "the patient is shown as a pseudonym"
expect_rc 2 "--psk-out never overwrites" -- "$MEDCTL" device rotate-psk pump-2 --psk-out "$WORK/pump-2.psk"

say "== change"
expect_rc 0 "bind" -- "$MEDCTL" device bind pump-1 --patient "$MARKER-2"
expect_rc 0 "rotate-psk" -- "$MEDCTL" device rotate-psk pump-1
PSK2=$(sed -n 's/^PSK *\([A-Za-z0-9_-]*\)$/\1/p' <<<"$OUT")
[ -n "$PSK2" ] && [ "$PSK2" != "$PSK1" ] && pass "a new PSK" || failed "rotate-psk gave '$PSK2'"
expect_rc 2 "rotate-psk of an HL7 source" -- "$MEDCTL" device rotate-psk central-1
expect_rc 0 "revoke" -- "$MEDCTL" device revoke pump-1
expect_in "pump-1 \(coap, revoked\)" "shows it revoked"
expect_rc 2 "revoke twice" -- "$MEDCTL" device revoke pump-1
expect_rc 2 "rotate-psk of a revoked device" -- "$MEDCTL" device rotate-psk pump-1
expect_rc 2 "an unknown device" -- "$MEDCTL" device show nope
expect_in "no device nope" "names it"

say "== roles"
expect_rc 0 "an auditor lists devices" -- as_user nobody "$MEDCTL" device list
expect_in "pump-2 +coap +active +patient" "the list"
expect_rc 1 "an auditor may not add" -- as_user nobody "$MEDCTL" device add x-1 --kind coap
expect_rc 0 "an admin-group member adds" -- as_user daemon "$MEDCTL" --json device add x-2 --kind coap
expect_in '"psk": "[A-Za-z0-9_-]{32}"' "JSON carries the PSK once"

say "== restart"
stop_daemon
start_daemon "$CONF" "$LOG"
expect_rc 0 "the registry survives a restart (PSKs unwrap)" -- "$MEDCTL" device show pump-2
expect_in "pump-2 \(coap, active\)" "pump-2 is there"
expect_rc 0 "the ledger records every change" -- "$MEDCTL" --json ledger show --entry 1
expect_in '"type": "device-event"' "entry 1 is a device event"
expect_rc 0 "and verifies" -- "$MEDCTL" ledger verify
stop_daemon

say "== privacy"
for f in "$DATA/ledger.db" "$DATA/registry.db" "$DATA/vault.db" "$LOG"; do
  if grep -qa "$MARKER" "$f"; then failed "the patient identifier is in $(basename "$f")"; else pass "no identifier in $(basename "$f")"; fi
  if grep -qa "$PSK2" "$f"; then failed "a PSK is in $(basename "$f")"; else pass "no PSK in $(basename "$f")"; fi
done

finish
