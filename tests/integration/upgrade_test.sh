#!/usr/bin/env bash
# Upgrades: a data dir written by the previous format version (tests/data/upgrade/schema2: schema
# 2, entry format 1, head format 1; README.txt there says how it was made) verifies offline with
# this medctl, is migrated in place by this medgated, takes new entries (format 2) beside the old,
# and verifies whole afterwards; the old entries and heads stay byte for byte as they were, and a
# consistency proof links the old signed tree to the new one.
# A failed upgrade leaves the file byte for byte as it was and says why: a schema newer than this
# build, and a migration that fails half-way (an old entry that does not decode, found while the
# migrated file is indexed).
#
#   upgrade_test.sh BIN_DIR
source "$(dirname "$0")/lib.sh" "$1"
FIXTURE=$(cd "$(dirname "$0")/../data/upgrade/schema2" && pwd)
MLLP_SEND=$BIN_SRC/medgate-mllp-send

# fixture DIR: a copy of the fixture at DIR, its paths pointed there.
fixture() {
  mkdir -p "$1"
  cp -a "$FIXTURE/." "$1/"
  rm -f "$1/README.txt" "$1/make_fixture.sh"
  sed -i "s|@DATA@|$1|g" "$1/medgated.toml" "$1/softhsm/softhsm2.conf"
  # git keeps no modes but the executable bit: the PIN and the token as init made them.
  chmod 600 "$1/hsm-pin" "$1/vault.db"
  chmod -R go-rwx "$1/softhsm"
}
sql() { sqlite3 "$1" "$2"; }
json_field() { sed -n "s/.*\"$1\": \"\{0,1\}\([^\",]*\)\"\{0,1\}.*/\1/p" <<<"$OUT" | head -1; }

DATA=$WORK/data
fixture "$DATA"
chmod 755 "$DATA"
CONF=$DATA/medgated.toml
SCHEMA=5  # the ledger schema this build writes (ledger/store.h, kSchemaVersion)
DB=$DATA/ledger.db
PEM=$DATA/signing-key.pem
export MEDGATE_SOCKET=$DATA/admin.sock

say "== the old ledger, offline, with the new medctl"
[ "$(sql "$DB" 'PRAGMA user_version')" = 2 ] && pass "the fixture is schema 2" || failed "the fixture is schema $(sql "$DB" 'PRAGMA user_version')"
expect_rc 0 "format-1 entries and heads verify" -- "$MEDCTL" --json ledger verify --db "$DB" --trust "$PEM"
OLD_SIZE=$(json_field entries)
OLD_ROOT=$(json_field root)
OLD_HEADS=$(json_field heads)  # head sequence numbers run 1..heads
[ "${OLD_SIZE:-0}" -ge 16 ] && pass "the old ledger has $OLD_SIZE entries, $OLD_HEADS heads" || failed "the old ledger has ${OLD_SIZE:-no} entries"
sql "$DB" 'SELECT idx, hex(bytes) FROM entries ORDER BY idx' >"$WORK/old-entries"
sql "$DB" 'SELECT seq, hex(head), hex(signature) FROM heads ORDER BY seq' >"$WORK/old-heads"
sql "$DB" 'SELECT height, hex(header) FROM blocks ORDER BY height' >"$WORK/old-blocks"

say "== the new medgated on it"
start_daemon "$CONF"
[ "$(sql "$DB" 'PRAGMA user_version')" = "$SCHEMA" ] && pass "migrated to schema $SCHEMA" || failed "schema $(sql "$DB" 'PRAGMA user_version') after the start"
# Schema 5: complete Merkle tiles by position, and type runs instead of the by-type index. Every
# entry must lie in a run of its type (the readers that look for entries by type see only those).
[ "$(sql "$DB" "SELECT count(*) FROM sqlite_master WHERE name IN ('tiles', 'entries_by_type')")" = 0 ] && pass "the old tiles table and by-type index are gone" || failed "the old tiles table or by-type index is still there"
[ "$(sql "$DB" 'SELECT count(*) FROM merkle_tiles')" -ge 1 ] && pass "the complete tiles moved to merkle_tiles" || failed "merkle_tiles is empty"
UNCOVERED=$(sql "$DB" 'SELECT count(*) FROM entries e WHERE NOT EXISTS (SELECT 1 FROM type_runs r WHERE r.type = e.type AND e.idx >= r.first_index AND e.idx < r.end_index)')
[ "$UNCOVERED" = 0 ] && pass "every entry lies in a run of its type" || failed "$UNCOVERED entries lie in no run of their type"
grep -q "ledger.open" "$WORK/medgated.log" && pass "the ledger opened" || failed "no ledger.open in the log"
expect_rc 0 "status" -- "$MEDCTL" --json status
HL7_PORT=$(sed -n '/"hl7": {/,/}/s/.*"port": \([0-9]*\).*/\1/p' <<<"$OUT" | head -1)
expect_rc 0 "a new device" -- "$MEDCTL" device add monitor-2 --kind hl7 --hl7-app MON2
printf 'MSH|^~\\&|MON2|ICU|MEDGATE|HOSP|20261126120000||ORU^R01^ORU_R01|NEW0001|P|2.6\rPID|1||TEST-P1^^^HOSP^MR\rOBR|1||||||20261126115900\rOBX|1|NM|150456^MDC_PULS_OXIM_SAT_O2^MDC||93|262688^MDC_DIM_PERCENT^MDC|||||F|||20261126115900\r' >"$WORK/new.hl7"
expect_rc 0 "a reading for a patient the old ledger knows" -- "$MLLP_SEND" --host 127.0.0.1 --port "$HL7_PORT" "$WORK/new.hl7"
expect_in "AA NEW0001" "is acknowledged"
expect_rc 0 "sign-head" -- "$MEDCTL" ledger sign-head
expect_rc 0 "keys rotate on the upgraded ledger" -- "$MEDCTL" keys rotate
expect_rc 0 "status after the appends" -- "$MEDCTL" --json status
NEW_SIZE=$(sed -n '/"ledger": {/,/}/s/.*"entries": \([0-9]*\).*/\1/p' <<<"$OUT" | head -1)
[ "${NEW_SIZE:-0}" -gt "$OLD_SIZE" ] && pass "entries grew: $OLD_SIZE -> $NEW_SIZE" || failed "entries: $OLD_SIZE -> ${NEW_SIZE:-?}"
expect_rc 0 "consistency from the old tree to the new" -- "$MEDCTL" --json ledger consistency --from "$OLD_SIZE"
expect_in '"verified": true' "the new tree extends the old one"
expect_in "\"from_root\": \"$OLD_ROOT\"" "the old root is unchanged"
expect_rc 0 "the daemon verifies the whole ledger" -- "$MEDCTL" ledger verify
# The new reading (format 2) names the patient's previous entry, one the old medgated wrote.
LINKED=
for i in $(seq "$OLD_SIZE" $((NEW_SIZE - 1))); do
  SHOW=$("$MEDCTL" --json ledger show --entry "$i")
  grep -q '"type": "observation"' <<<"$SHOW" || continue
  PREV=$(sed -n 's/.*"previous": \([0-9]*\).*/\1/p' <<<"$SHOW" | head -1)
  [ -n "$PREV" ] && [ "$PREV" -lt "$OLD_SIZE" ] && LINKED="$i -> $PREV"
done
[ -n "$LINKED" ] && pass "a new entry links back into the old ledger (entry $LINKED)" || failed "no new observation links to an old entry"
stop_daemon

say "== offline after the upgrade"
expect_rc 0 "old and new formats verify together" -- "$MEDCTL" --json ledger verify --db "$DB" --trust "$PEM"
AFTER=$(json_field entries)
[ "$AFTER" -gt "$OLD_SIZE" ] && pass "$AFTER entries after the restart" || failed "$AFTER entries"
sql "$DB" "SELECT idx, hex(bytes) FROM entries WHERE idx < $OLD_SIZE ORDER BY idx" | cmp -s - "$WORK/old-entries" && pass "the old entries are byte-identical" || failed "the old entries changed"
sql "$DB" "SELECT seq, hex(head), hex(signature) FROM heads WHERE seq <= $OLD_HEADS ORDER BY seq" | cmp -s - "$WORK/old-heads" && pass "the old heads are byte-identical" || failed "the old heads changed"
sql "$DB" "SELECT height, hex(header) FROM blocks ORDER BY height" | head -n "$(wc -l <"$WORK/old-blocks")" | cmp -s - "$WORK/old-blocks" && pass "the old blocks are byte-identical" || failed "the old blocks changed"
V2=$(sql "$DB" "SELECT count(*) FROM heads WHERE seq > $OLD_HEADS")
[ "$V2" -gt 0 ] && pass "$V2 new heads" || failed "no new heads"

say "== a schema newer than this build"
NEWER=$WORK/newer
fixture "$NEWER"
sql "$NEWER/ledger.db" 'PRAGMA user_version = 99'
BEFORE=$(sha256sum <"$NEWER/ledger.db")
expect_rc 1 "medgated refuses it" -- "$MEDGATED" --config "$NEWER/medgated.toml"
expect_in "schema version 99 is newer than this build understands \($SCHEMA\)" "naming both versions"
[ "$(sha256sum <"$NEWER/ledger.db")" = "$BEFORE" ] && pass "the file is byte-identical" || failed "the file changed"
expect_rc 2 "medctl ledger verify refuses it too" -- "$MEDCTL" ledger verify --db "$NEWER/ledger.db" --trust "$PEM"
expect_in "99 is newer than this build understands \($SCHEMA\)" "naming both versions"

say "== a migration that fails half-way"
HALF=$WORK/half
fixture "$HALF"
# Entry 5 lies in a complete Merkle tile (its hash is stored, so the tree still checks out at
# open); the upgrade finds it undecodable only while indexing the old entries, after the schema
# change itself ran.
sql "$HALF/ledger.db" "UPDATE entries SET bytes = x'a1' || substr(bytes, 2) WHERE idx = 5"
BEFORE=$(sha256sum <"$HALF/ledger.db")
expect_rc 1 "medgated refuses it" -- "$MEDGATED" --config "$HALF/medgated.toml"
expect_in "upgrading the ledger from schema 2 to $SCHEMA failed; the file is unchanged" "says the upgrade failed and nothing changed"
expect_in "entry 5" "names the entry"
[ "$(sha256sum <"$HALF/ledger.db")" = "$BEFORE" ] && pass "the file is byte-identical" || failed "the file changed"
[ "$(sql "$HALF/ledger.db" 'PRAGMA user_version')" = 2 ] && pass "still schema 2" || failed "schema is now $(sql "$HALF/ledger.db" 'PRAGMA user_version')"

finish
