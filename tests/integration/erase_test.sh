#!/usr/bin/env bash
# `medctl patient erase` against the real medgated and a real SoftHSM token, as far as it goes
# before ingest exists (issue 4): nothing can create a patient record through the admin API yet, so
# this covers the vault next to the ledger, an unknown patient, bad arguments, roles, and that no
# patient identifier reaches the output's pseudonym, the log or the ledger. Erasing a real patient
# end to end (ingest, erase, read refused) waits for ingest; the unit tests cover it meanwhile.
source "$(dirname "$0")/lib.sh" "$1"

DATA=$WORK/data
RUN=$WORK/run
mkdir -p "$RUN"
chmod 755 "$RUN"
SOCK=$RUN/admin.sock
MARK="MRN-MARKER-$RANDOM$RANDOM"

say "== init and start"
expect_rc 0 "medctl init" -- "$MEDCTL" init --data-dir "$DATA" --ledger-id ward-7 --socket "$SOCK"
CONF=$DATA/medgated.toml
sed -i "s/^admin_group = .*/admin_group = 'daemon'/; s/^auditor_group = .*/auditor_group = 'nogroup'/" "$CONF"
start_daemon "$CONF"
export MEDGATE_SOCKET=$SOCK
[ -f "$DATA/vault.db" ] && pass "the daemon opened a vault next to the ledger" || failed "no $DATA/vault.db"
[ "$(stat -c %a "$DATA/vault.db")" = 600 ] && pass "vault.db is 0600" || failed "vault.db mode $(stat -c %a "$DATA/vault.db")"
ENTRIES_BEFORE=$("$MEDCTL" --json status | grep -o '"entries": [0-9]*' | head -1 | grep -o '[0-9]*')

say "== an unknown patient"
expect_rc 2 "erasing an unknown patient is bad input (exit 2)" -- "$MEDCTL" patient erase "$MARK" --reason "test"
expect_in "no patient [0-9a-f]{16} in the vault" "says there is no such patient, by pseudonym prefix"
expect_not_in "$MARK" "the identifier is not echoed"
expect_rc 2 "the same with --json" -- "$MEDCTL" --json patient erase "$MARK"
expect_in '"code": "not_found"' "JSON error document"
expect_rc 2 "the identifier can come from stdin" -- bash -c "printf '%s\n' '$MARK' | '$MEDCTL' patient erase -"
expect_in "no patient [0-9a-f]{16} in the vault" "stdin identifier looked up"

say "== bad arguments"
expect_rc 2 "an empty identifier" -- "$MEDCTL" patient erase ""
expect_in "identifier is empty" "names the problem"
expect_rc 2 "no identifier at all is bad usage" -- "$MEDCTL" patient erase
set +o pipefail
OUT=$(printf '{"v":1,"op":"patient.erase","args":{"patient":7}}\n' | raw_request "$SOCK"); expect_in 'invalid_argument.*argument ..patient' "a non-text patient"
OUT=$(printf '{"v":1,"op":"patient.erase","args":{}}\n' | raw_request "$SOCK"); expect_in 'invalid_argument.*argument ..patient' "no patient argument"
OUT=$(printf '{"v":1,"op":"patient.erase","args":{"patient":"x","reason":5}}\n' | raw_request "$SOCK"); expect_in 'invalid_argument.*argument ..reason' "a non-text reason"
set -o pipefail

say "== roles"
expect_rc 1 "an auditor may not erase" -- as_user nobody "$MEDCTL" patient erase "$MARK"
expect_in "needs the admin role" "says why"
expect_rc 1 "anyone else cannot even connect" -- as_user bin "$MEDCTL" patient erase "$MARK"
expect_rc 2 "an admin-group member reaches the vault" -- as_user daemon "$MEDCTL" patient erase "$MARK"
expect_in "no patient [0-9a-f]{16} in the vault" "and gets the vault's answer"

say "== nothing recorded, nothing leaked"
expect_rc 0 "status" -- "$MEDCTL" --json status
expect_in "\"entries\": $ENTRIES_BEFORE" "a refused erasure appends nothing to the ledger"
if grep -q "$MARK" "$WORK/medgated.log"; then failed "the identifier is in the daemon's log"; else pass "the identifier is not in the daemon's log"; fi
no_marker_in_files() {
  for f in "$DATA"/ledger.db* "$DATA"/vault.db*; do
    if grep -qa "$MARK" "$f"; then failed "the identifier is in $(basename "$f") ($1)"; else pass "the identifier is not in $(basename "$f") ($1)"; fi
  done
}
no_marker_in_files "daemon running"
stop_daemon
no_marker_in_files "daemon stopped"

say "== restart"
start_daemon "$CONF"
pass "the daemon reopens its vault"
expect_rc 0 "offline verify still passes" -- "$MEDCTL" ledger verify --db "$DATA/ledger.db" --trust "$DATA/signing-key.pem"
stop_daemon

say "== a missing vault"
mv "$DATA/vault.db" "$WORK/vault.db.saved"
expect_rc 1 "medgated refuses to start without its vault (an empty one would orphan every reading)" -- "$MEDGATED" --config "$CONF"
expect_in "the vault .*vault.db is missing: restore it from a backup" "and says what to do"
[ ! -e "$DATA/vault.db" ] && pass "it did not create an empty one" || failed "an empty vault.db was created"
mv "$WORK/vault.db.saved" "$DATA/vault.db"
start_daemon "$CONF"
pass "with the vault back it starts"
stop_daemon

finish
