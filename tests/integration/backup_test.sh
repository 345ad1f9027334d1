#!/usr/bin/env bash
# medctl backup and restore with the real medgated, medctl and SoftHSM: a backup taken while
# readings are ingested, restored into a fresh data dir on the same token (verifies, starts, the
# restore is on the ledger with the rollback it explains); restore refuses a running daemon, a
# newer ledger without --discard-newer, a damaged file; a plain copy of an older ledger is still
# refused at start; an auditor cannot back up; the offline backup of a stopped appliance.
#
#   backup_test.sh BIN_DIR
source "$(dirname "$0")/lib.sh" "$1"
MLLP_SEND=$BIN_SRC/medgate-mllp-send

DATA=$WORK/data
mkdir -p "$WORK/run" "$WORK/out"
chmod 755 "$WORK/run"
chmod 777 "$WORK/out"
SOCK=$WORK/run/admin.sock
"$MEDCTL" init --data-dir "$DATA" --ledger-id ward-7 --socket "$SOCK" >/dev/null
CONF=$DATA/medgated.toml
sed -i "s/^admin_group = .*/admin_group = 'daemon'/; s/^auditor_group = .*/auditor_group = 'nogroup'/" "$CONF"
printf '\n[hl7]\naddress = "127.0.0.1"\nport = 0\nread_timeout_s = 5\n' >>"$CONF"
PEM=$DATA/signing-key.pem
export MEDGATE_SOCKET=$SOCK
json_field() { sed -n "s/.*\"$1\": \"\{0,1\}\([^\",]*\)\"\{0,1\}.*/\1/p" <<<"$OUT" | head -1; }
entries() { "$MEDCTL" --json status | sed -n '/"ledger": {/,/}/s/.*"entries": \([0-9]*\).*/\1/p' | head -1; }

say "== backup while ingesting"
start_daemon "$CONF"
HL7_PORT=$("$MEDCTL" --json status | sed -n '/"hl7": {/,/}/s/.*"port": \([0-9]*\).*/\1/p' | head -1)
"$MEDCTL" device add central --kind hl7 --hl7-app CENTRAL >/dev/null
send() {
  printf 'MSH|^~\\&|CENTRAL|ICU|MEDGATE|HOSP|20261125120000||ORU^R01^ORU_R01|%s|P|2.6\rPID|1||TEST-P%s^^^HOSP^MR\rOBR|1||||||20261125115900\rOBX|1|NM|150456^MDC_PULS_OXIM_SAT_O2^MDC||97|262688^MDC_DIM_PERCENT^MDC|||||F|||20261125115900\r' \
    "$1" "$(($2 % 3))" >"$WORK/msg-$1.hl7"
  "$MLLP_SEND" --host 127.0.0.1 --port "$HL7_PORT" "$WORK/msg-$1.hl7" >/dev/null
}
for i in $(seq 1 20); do send "PRE$i" "$i"; done
( for i in $(seq 1 60); do send "DUR$i" "$i" || exit 1; done ) &
INGEST=$!
expect_rc 0 "medctl backup while readings arrive" -- "$MEDCTL" backup "$WORK/out/b1.mgb"
expect_in "recorded on the ledger as entry [0-9]+" "the backup is recorded"
BACKUP_ENTRY=$(sed -n 's/.*as entry \([0-9]*\).*/\1/p' <<<"$OUT")
wait "$INGEST" && pass "ingest went on during the backup" || failed "ingest failed during the backup"
[ "$(stat -c %a "$WORK/out/b1.mgb")" = 600 ] && pass "the backup file is 0600" || failed "mode $(stat -c %a "$WORK/out/b1.mgb")"
expect_rc 1 "an auditor may not back up" -- as_user nobody "$MEDCTL" backup "$WORK/out/auditor.mgb"
expect_in "permission|admin" "and is told why"
[ ! -e "$WORK/out/auditor.mgb" ] && pass "no file for the auditor" || failed "the auditor got a file"
expect_rc 2 "backup refuses to overwrite a file" -- "$MEDCTL" backup "$WORK/out/b1.mgb"
expect_rc 2 "an offline backup while medgated runs is refused" -- "$MEDCTL" backup --data-dir "$DATA" "$WORK/out/off.mgb"
expect_in "in use" "naming why"
OUT=$(printf '%s\n' '{"v":1,"op":"backup.read","args":{"id":"nosuch","offset":0}}' '{"v":1,"op":"backup.read","args":{"offset":0}}' '{"v":1,"op":"backup.finish","args":{"id":"nosuch"}}' | raw_request "$SOCK")
expect_in '"code":"not_found".*no backup nosuch of yours' "backup.read of an unknown backup: not found"
expect_in '"code":"invalid_argument".*\\"id\\"' "backup.read without an id: invalid argument"
[ -z "$(find "$DATA" -maxdepth 1 -name '.backup-*')" ] && pass "no backup left in the data dir once copied out" || failed "backups left: $(ls -a "$DATA")"
"$MEDCTL" device add later --kind hl7 --hl7-app LATER >/dev/null
expect_rc 0 "a patient erased after the backup" -- "$MEDCTL" patient erase --yes --reason "test" - <<<"HOSP:TEST-P1"
AFTER_BACKUP=$(entries)
expect_rc 2 "restore while medgated runs is refused" -- "$MEDCTL" --config "$CONF" restore "$WORK/out/b1.mgb"
expect_in "medgated is running" "saying so"
stop_daemon

say "== the backup file"
# Its ledger part, extracted by the layout in ledger/backup_file.h, verifies like any ledger file.
python3 - "$WORK/out/b1.mgb" "$WORK/b1-ledger.db" <<'PY'
import json, sys
f = open(sys.argv[1], 'rb'); f.readline(); m = json.loads(f.readline())
for p in m['parts']:
    data = f.read(p['size'])
    if p['name'] == 'ledger.db': open(sys.argv[2], 'wb').write(data)
PY
expect_rc 0 "the backup's ledger verifies offline" -- "$MEDCTL" --json ledger verify --db "$WORK/b1-ledger.db" --trust "$PEM"
B1_ENTRIES=$(json_field entries)
[ "$B1_ENTRIES" -gt "$BACKUP_ENTRY" ] && pass "it holds its own backup entry ($BACKUP_ENTRY of $B1_ENTRIES)" || failed "backup entry $BACKUP_ENTRY, $B1_ENTRIES entries"
expect_rc 0 "offline backup of the stopped appliance" -- "$MEDCTL" backup --data-dir "$DATA" "$WORK/out/off.mgb"
expect_in "not recorded" "says it is not recorded"

say "== a plain copy of an older ledger is still refused"
cp "$DATA/ledger.db" "$WORK/current.db"
cp "$WORK/b1-ledger.db" "$DATA/ledger.db"
expect_rc 1 "medgated refuses the copied older ledger" -- "$MEDGATED" --config "$CONF"
expect_in "rollback detected" "with the rollback message"
cp "$WORK/current.db" "$DATA/ledger.db"

say "== damaged backups"
cp "$WORK/out/b1.mgb" "$WORK/bad.mgb"
SIZE=$(stat -c %s "$WORK/bad.mgb")
printf '\x00\xff' | dd of="$WORK/bad.mgb" bs=1 seek=$((SIZE / 2)) conv=notrunc status=none
expect_rc 2 "a damaged backup is refused" -- "$MEDCTL" --config "$CONF" restore "$WORK/bad.mgb"
expect_in "does not match its SHA-256" "naming the damaged part"
head -c $((SIZE - 100)) "$WORK/out/b1.mgb" >"$WORK/short.mgb"
expect_rc 2 "a truncated backup is refused" -- "$MEDCTL" --config "$CONF" restore "$WORK/short.mgb"
expect_in "truncated" "saying so"
printf 'medgate-backup 1\n{"ledger_id": "ward-7", "parts": [\n' >"$WORK/manifest.mgb"
expect_rc 2 "a backup with a malformed manifest is refused" -- "$MEDCTL" --config "$CONF" restore "$WORK/manifest.mgb"
expect_in "the manifest is malformed" "saying so"
echo "not a backup" >"$WORK/junk.mgb"
expect_rc 2 "a file that is no backup is refused" -- "$MEDCTL" --config "$CONF" restore "$WORK/junk.mgb"
cmp -s "$DATA/ledger.db" "$WORK/current.db" && pass "the ledger is untouched by the refusals" || failed "the ledger changed"

say "== backups of other appliances"
"$MEDCTL" init --data-dir "$WORK/other" --ledger-id ward-7 --socket "$WORK/run/other.sock" >/dev/null 2>&1
expect_rc 1 "a backup whose keys this key store does not hold is refused" -- "$MEDCTL" --config "$WORK/other/medgated.toml" restore "$WORK/out/b1.mgb"
expect_in "does not verify against this key store's keys" "saying so"
"$MEDCTL" init --data-dir "$WORK/other2" --ledger-id ward-9 --socket "$WORK/run/other2.sock" >/dev/null 2>&1
expect_rc 2 "a backup of another ledger id is refused" -- "$MEDCTL" --config "$WORK/other2/medgated.toml" restore "$WORK/out/b1.mgb"
expect_in "holds ledger 'ward-7', but this appliance's is 'ward-9'" "naming both"

say "== restore over a newer ledger"
expect_rc 2 "without --discard-newer it is refused" -- "$MEDCTL" --config "$CONF" restore "$WORK/out/b1.mgb"
expect_in "discard-newer" "and says how many and what to do"
cmp -s "$DATA/ledger.db" "$WORK/current.db" && pass "the ledger is untouched" || failed "the ledger changed"

say "== restore into a fresh data dir on the same token"
FRESH=$WORK/fresh
mkdir -p "$FRESH"
FRESH_SOCK=$WORK/run/fresh.sock
sed -e "s|^data_dir = .*|data_dir = '$FRESH'|" -e "s|$DATA/ledger.db|$FRESH/ledger.db|" \
    -e "s|$SOCK|$FRESH_SOCK|" "$CONF" >"$FRESH/medgated.toml"
grep -q "$FRESH" "$FRESH/medgated.toml" && pass "a config for the fresh dir" || failed "cannot point the config at $FRESH"
expect_rc 0 "restore into the fresh dir" -- "$MEDCTL" --config "$FRESH/medgated.toml" --json restore "$WORK/out/b1.mgb"
RESTORE_ENTRY=$(json_field restore_entry)
BACKUP_COUNTER=$(json_field backup_rollback_counter)
DEVICE_COUNTER=$(json_field key_store_counter)
[ "$BACKUP_COUNTER" -lt "$DEVICE_COUNTER" ] && pass "the backup's counter $BACKUP_COUNTER was behind the key store's $DEVICE_COUNTER" || failed "counters: backup $BACKUP_COUNTER, key store $DEVICE_COUNTER"
[ "$RESTORE_ENTRY" = "$B1_ENTRIES" ] && pass "the restore is the first entry after the backup's ($RESTORE_ENTRY)" || failed "restore entry $RESTORE_ENTRY, backup had $B1_ENTRIES"
for f in ledger.db vault.db registry.db; do [ -e "$FRESH/$f" ] && pass "$f restored" || failed "$f missing"; done
expect_rc 0 "the restored ledger verifies offline" -- "$MEDCTL" --json ledger verify --db "$FRESH/ledger.db" --trust "$PEM"
export MEDGATE_SOCKET=$FRESH_SOCK
start_daemon "$FRESH/medgated.toml"
expect_rc 0 "medgated starts on it" -- "$MEDCTL" status
expect_rc 0 "the restore entry" -- "$MEDCTL" --json ledger show --entry "$RESTORE_ENTRY"
expect_in "ledger.restore" "is a ledger.restore admin action"
expect_in "backup_rollback_counter" "naming the backup's counter"
expect_rc 0 "the daemon verifies it against the key store's counter" -- "$MEDCTL" ledger verify
expect_rc 0 "the restored registry knows the device" -- "$MEDCTL" device show central
stop_daemon
export MEDGATE_SOCKET=$SOCK

say "== restore over the newer ledger with --discard-newer"
expect_rc 0 "restore --discard-newer" -- "$MEDCTL" --config "$CONF" --json restore --discard-newer "$WORK/out/b1.mgb"
DISCARDED=$(json_field discarded_entries)
[ "${DISCARDED:-0}" -gt 0 ] && pass "$DISCARDED newer entries discarded, and counted" || failed "discarded: ${DISCARDED:-?}"
[ -e "$DATA/ledger.db.before-restore" ] && pass "the replaced ledger is kept beside" || failed "no ledger.db.before-restore"
REAPPLIED=$(json_field erasures_reapplied)
[ "$REAPPLIED" = 1 ] && pass "the erasure done after the backup is applied again" || failed "erasures re-applied: ${REAPPLIED:-?}"
start_daemon "$CONF"
expect_rc 0 "medgated starts on the restored ledger" -- "$MEDCTL" ledger verify
expect_rc 0 "patient show" -- "$MEDCTL" --json patient show - <<<"HOSP:TEST-P1"
expect_in '"state": "erased"' "the patient erased after the backup stays erased"
stop_daemon

finish
