#!/usr/bin/env bash
# The tamper suite: a real ledger written by medgated, edited with the sqlite3 shell the way an
# attacker with file access would, and checked offline with `medctl ledger verify --db --trust`.
# Each edit must be caught (exit 1) and the report must name where and why.
source "$(dirname "$0")/lib.sh" "$1"

DATA=$WORK/data
"$MEDCTL" init --data-dir "$DATA" --ledger-id ward-7 >/dev/null
CONF=$DATA/medgated.toml
start_daemon "$CONF"
# Several writers at once, so blocks hold several entries and there are many heads.
for t in 1 2 3 4; do (for _ in $(seq 1 6); do "$MEDCTL" --config "$CONF" ledger sign-head >/dev/null; done) & done
wait $(jobs -p | grep -v "^$DAEMON_PID$") 2>/dev/null || true
stop_daemon
DB=$DATA/ledger.db
PEM=$DATA/signing-key.pem
N=$(sqlite3 "$DB" "SELECT count(*) FROM entries")
[ "$N" -ge 20 ] && pass "the ledger has $N entries" || failed "only $N entries"
expect_rc 0 "the untouched ledger verifies" -- "$MEDCTL" ledger verify --db "$DB" --trust "$PEM"

# tamper NAME SQL...: a fresh copy of the ledger with the SQL applied; sets $COPY.
tamper() {
  COPY=$WORK/$1.db
  cp "$DB" "$COPY"
  shift
  sqlite3 "$COPY" "$@"
}
verify_copy() { expect_rc 1 "$1" -- "$MEDCTL" ledger verify --db "$COPY" --trust "$PEM"; }

say "== entries"
HEX=$(sqlite3 "$DB" "SELECT hex(bytes) FROM entries WHERE idx = 5")
EDITED=$(printf '%s' "$HEX" | sed 's/726F6F74/65766565/')  # 'root' -> 'evee'
[ "$EDITED" != "$HEX" ] && pass "prepared an edited entry (actor user:root -> user:evee)" || failed "could not prepare the edit"
tamper edit "UPDATE entries SET bytes = X'$EDITED' WHERE idx = 5"
verify_copy "an edited entry"
expect_in "entry 5: its bytes do not match the hash stored in Merkle tile \(0, 0\) when it was committed" "names entry 5 and why"
tamper tile_gone "DELETE FROM merkle_tiles WHERE pos = 256"  # tile (0, 0): ledger/tiles.h, tile_position()
verify_copy "a Merkle tile deleted"
expect_in "Merkle tile \(0, 0\) cannot be read" "names the tile"
# type_runs is how readers find entries by type (consent and key state at start): not signed, but
# a run removed would hide entries from them, so verify checks it covers every entry.
tamper type_run_gone "DELETE FROM type_runs WHERE type = 2"
verify_copy "a type run deleted"
expect_in "entry [0-9]+: lies in no range of type_runs for its type \(2\)" "names the first entry it hid"

tamper delete "DELETE FROM entries WHERE idx = 7"
verify_copy "a deleted entry"
expect_in "entry 7: is missing" "names entry 7"

# Two neighbours whose bytes differ: concurrent admin calls may be recorded in the same
# microsecond as byte-identical entries, and swapping those changes nothing.
I=$(sqlite3 "$DB" "SELECT a.idx FROM entries a JOIN entries b ON b.idx = a.idx + 1 WHERE a.idx >= 3 AND a.bytes != b.bytes ORDER BY a.idx LIMIT 1")
tamper reorder "CREATE TEMP TABLE t AS SELECT idx, bytes FROM entries WHERE idx IN ($I, $((I + 1)));
  UPDATE entries SET bytes = (SELECT bytes FROM t WHERE t.idx = $((2 * I + 1)) - entries.idx) WHERE idx IN ($I, $((I + 1)));"
verify_copy "two entries swapped"
expect_in "entry $I: its bytes do not match" "names the first swapped entry"

tamper column "UPDATE entries SET time_us = time_us + 1 WHERE idx = 2"
verify_copy "an entry's time column changed"
expect_in "entry 2: its type or time column" "names entry 2"

tamper extra "INSERT INTO entries (idx, type, time_us, bytes) SELECT max(idx) + 1, type, time_us, bytes FROM entries"
verify_copy "an entry smuggled in after the last block"
expect_in "entry $N: is not covered by any block" "names the extra entry"

say "== the tail"
tamper truncate "DELETE FROM entries WHERE idx >= $((N - 2))"
verify_copy "the last entries deleted"
expect_in "entry $((N - 2)): is missing" "names the first missing entry"
LAST=$(sqlite3 "$DB" "SELECT max(height) FROM blocks")
FIRST=$(sqlite3 "$DB" "SELECT first_index FROM blocks WHERE height = $LAST")
tamper truncate_blocks "DELETE FROM entries WHERE idx >= $FIRST; DELETE FROM blocks WHERE height = $LAST;"
verify_copy "the last block and its entries deleted, heads left"
expect_in "covers block $LAST, which is not in the ledger.*truncated" "names the head that covers the lost block"

say "== blocks"
tamper block_gone "DELETE FROM blocks WHERE height = 3"
verify_copy "a block deleted from the middle"
expect_in "block 3: is missing" "names block 3"
tamper block_edit "UPDATE blocks SET header = (SELECT header FROM blocks WHERE height = 2) WHERE height = 3"
verify_copy "a block header replaced by another"
expect_in "block 3: header does not match" "names block 3"

say "== heads and keys"
tamper strip "UPDATE heads SET signature = X'' WHERE seq = 3"
verify_copy "a stripped signature"
expect_in "signed head #3: has no signature" "names head 3"
HEAD_HEX=$(sqlite3 "$DB" "SELECT hex(head) FROM heads WHERE seq = 4")
# The last byte belongs to the key id; flip the time instead: replace the 8-byte time's last byte.
EDITED_HEAD=$(printf '%s' "$HEAD_HEX" | sed -E 's/(071B[0-9A-F]{14})([0-9A-F]{2})/\1FF/')
[ "$EDITED_HEAD" != "$HEAD_HEX" ] && pass "prepared an edited head (time changed)" || failed "could not edit the head"
tamper head_edit "UPDATE heads SET head = X'$EDITED_HEAD' WHERE seq = 4"
verify_copy "an edited head"
expect_in "signed head #4: signature does not verify" "names head 4"

# Another appliance with the same ledger id but its own key: its heads and its genesis are not ours.
"$MEDCTL" init --data-dir "$WORK/other" --ledger-id ward-7 >/dev/null
OTHER=$WORK/other/ledger.db
expect_rc 1 "a ledger made with another key" -- "$MEDCTL" ledger verify --db "$OTHER" --trust "$PEM"
expect_in "none of the ledger's signing keys \([0-9a-f]+\) is trusted" "names the untrusted genesis key"
sqlite3 "$OTHER" "SELECT hex(head), hex(signature) FROM heads WHERE seq = 1" >"$WORK/other-head"
IFS='|' read -r OH OS <"$WORK/other-head"
tamper foreign_head "UPDATE heads SET head = X'$OH', signature = X'$OS' WHERE seq = 1"
verify_copy "the genesis head replaced by one signed with another key"
expect_in "signed head #1: " "names head 1"
expect_rc 1 "trusting only the other key" -- "$MEDCTL" ledger verify --db "$DB" --trust "$WORK/other/signing-key.pem"
expect_in "none of the ledger's signing keys" "the real ledger is not trusted under the wrong key"

say "== not a ledger"
printf 'hello\n' >"$WORK/text.db"
expect_rc 2 "a text file" -- "$MEDCTL" ledger verify --db "$WORK/text.db" --trust "$PEM"
expect_in "not a database|not a medgate ledger" "says it is not a ledger"
expect_rc 2 "a missing file" -- "$MEDCTL" ledger verify --db "$WORK/nope.db" --trust "$PEM"
printf 'not a key\n' >"$WORK/bad.pem"
expect_rc 2 "a trust file that is not a key" -- "$MEDCTL" ledger verify --db "$DB" --trust "$WORK/bad.pem"
expect_rc 0 "--json report on success" -- "$MEDCTL" --json ledger verify --db "$DB" --trust "$PEM"
expect_in '"ok": true' "JSON ok"
cp "$DB" "$WORK/j.db"; sqlite3 "$WORK/j.db" "DELETE FROM entries WHERE idx = 7"
expect_rc 1 "--json report on failure" -- "$MEDCTL" --json ledger verify --db "$WORK/j.db" --trust "$PEM"
expect_in '"problem": "entry 7: is missing' "JSON names the problem"

finish
