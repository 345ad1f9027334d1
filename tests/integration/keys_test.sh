#!/usr/bin/env bash
# Key rotation and rollback protection as an admin and an auditor meet them: `medctl keys rotate`
# on a running medgated, verification offline trusting the old or the new public key, and a
# ledger restored from an old copy refused at start (exit 1, named) while the copy itself still
# verifies as the genuine older ledger it is.
source "$(dirname "$0")/lib.sh" "$1"

DATA=$WORK/data
mkdir -p "$WORK/run"
chmod 755 "$WORK/run"
SOCK=$WORK/run/admin.sock
"$MEDCTL" init --data-dir "$DATA" --ledger-id ward-7 --socket "$SOCK" >/dev/null
CONF=$DATA/medgated.toml
# Roles come from groups: 'daemon' plays medgate-admin, 'nogroup' plays medgate-audit.
sed -i "s/^admin_group = .*/admin_group = 'daemon'/; s/^auditor_group = .*/auditor_group = 'nogroup'/" "$CONF"
OLD_PEM=$DATA/signing-key.pem
export MEDGATE_SOCKET=$SOCK

say "== rotation"
start_daemon "$CONF"
expect_rc 0 "status" -- "$MEDCTL" status
expect_in "rollback +token-object counter [0-9]+" "status shows the rollback counter"
OLD_ID=$("$MEDCTL" --json keys show | sed -n 's/.*"key_id": "\([0-9a-f]*\)".*/\1/p')
expect_rc 0 "sign-head before the rotation" -- "$MEDCTL" ledger sign-head
expect_rc 1 "an auditor may not rotate" -- as_user nobody "$MEDCTL" keys rotate
expect_rc 0 "keys rotate" -- "$MEDCTL" keys rotate
expect_in "signing key rotated at entry [0-9]+" "rotate names the transition entry"
expect_in "old $OLD_ID" "rotate names the old key"
sed -n '/BEGIN PUBLIC KEY/,/END PUBLIC KEY/p' <<<"$OUT" >"$WORK/new-key.pem"
NEW_ID=$("$MEDCTL" --json keys show | sed -n 's/.*"key_id": "\([0-9a-f]*\)".*/\1/p')
[ -n "$NEW_ID" ] && [ "$NEW_ID" != "$OLD_ID" ] && pass "keys show gives the new key" || failed "keys show still gives $NEW_ID"
expect_rc 0 "sign-head after the rotation" -- "$MEDCTL" ledger sign-head
expect_rc 0 "ledger show names the transition" -- "$MEDCTL" ledger show --entry 2
expect_in "key-transition" "the entry's type"
expect_rc 0 "the daemon verifies its rotated ledger" -- "$MEDCTL" ledger verify
stop_daemon

say "== offline verification across the rotation"
expect_rc 0 "trusting the old key follows the transition" -- "$MEDCTL" ledger verify --db "$DATA/ledger.db" --trust "$OLD_PEM"
expect_in "$NEW_ID" "the new key is listed"
expect_rc 0 "trusting only the new key vouches for the old range" -- "$MEDCTL" ledger verify --db "$DATA/ledger.db" --trust "$WORK/new-key.pem"

say "== restart with the rotated key"
start_daemon "$CONF"
expect_rc 0 "sign-head after the restart" -- "$MEDCTL" --json ledger head
expect_in "\"key_id\": \"$NEW_ID\"" "heads after a restart are signed by the new key"
stop_daemon

say "== rollback"
cp "$DATA/ledger.db" "$WORK/backup.db"
start_daemon "$CONF"
expect_rc 0 "an entry after the backup" -- "$MEDCTL" ledger sign-head
stop_daemon
cp "$WORK/backup.db" "$DATA/ledger.db"
expect_rc 1 "medgated refuses the restored older copy" -- "$MEDGATED" --config "$CONF"
expect_in "rollback detected" "and names it"
expect_in "counter [0-9]+, but the key store's counter is [0-9]+" "with both counter values"
expect_rc 0 "the copy is still a genuine (older) ledger" -- "$MEDCTL" ledger verify --db "$DATA/ledger.db" --trust "$OLD_PEM"

finish
