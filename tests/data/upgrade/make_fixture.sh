#!/usr/bin/env bash
# Makes the upgrade fixture: a small appliance data dir written by an OLD medgate (schema 2, entry
# format 1, head format 1), for tests/integration/upgrade_test.sh. README.txt says which commit
# and how; this is the script it names. Test-only token PINs.
#
#   make_fixture.sh OLD_BIN_DIR OUT_DIR    (OLD_BIN_DIR holds medgated, medctl, medgate-mllp-send)
set -euo pipefail
OLD=${1:?usage: $0 OLD_BIN_DIR OUT_DIR}
OUT=${2:?usage: $0 OLD_BIN_DIR OUT_DIR}
WORK=$(mktemp -d /tmp/medgate-fixture.XXXXXX)
DATA=$WORK/data
DAEMON_PID=
trap '[ -n "$DAEMON_PID" ] && kill -9 "$DAEMON_PID" 2>/dev/null; rm -rf "$WORK"' EXIT
MEDCTL=$OLD/medctl
export MEDGATE_SOCKET=$DATA/admin.sock

"$MEDCTL" init --data-dir "$DATA" --ledger-id upgrade-fixture --socket "$MEDGATE_SOCKET" >/dev/null
CONF=$DATA/medgated.toml
sed -i "s/^admin_group = .*/admin_group = 'daemon'/; s/^auditor_group = .*/auditor_group = 'nogroup'/" "$CONF"
printf '\n[hl7]\naddress = "127.0.0.1"\nport = 0\nread_timeout_s = 5\n' >>"$CONF"

start() {
  "$OLD/medgated" --config "$CONF" >>"$WORK/medgated.log" 2>&1 &
  DAEMON_PID=$!
  for _ in $(seq 1 100); do "$MEDCTL" status >/dev/null 2>&1 && return 0; sleep 0.1; done
  cat "$WORK/medgated.log"; exit 1
}
stop() { kill -TERM "$DAEMON_PID"; wait "$DAEMON_PID"; DAEMON_PID=; }
oru() {  # oru CONTROL_ID PATIENT VALUE: an ORU^R01 with one SpO2 reading
  printf 'MSH|^~\\&|CENTRAL|ICU|MEDGATE|HOSP|20261125120000||ORU^R01^ORU_R01|%s|P|2.6\rPID|1||%s^^^HOSP^MR\rOBR|1||||||20261125115900\rOBX|1|NM|150456^MDC_PULS_OXIM_SAT_O2^MDC||%s|262688^MDC_DIM_PERCENT^MDC|||||F|||20261125115900\r' \
    "$1" "$2" "$3" >"$WORK/msg.hl7"
  "$OLD/medgate-mllp-send" --host 127.0.0.1 --port "$PORT" "$WORK/msg.hl7" >/dev/null
}

start
PORT=$("$MEDCTL" --json status | sed -n '/"hl7": {/,/}/s/.*"port": \([0-9]*\).*/\1/p' | head -1)
"$MEDCTL" device add central --kind hl7 --hl7-app CENTRAL --hl7-facility ICU >/dev/null
"$MEDCTL" device add cuff-1 --kind coap --psk-out "$WORK/psk" >/dev/null
oru MSG0001 TEST-P1 97
oru MSG0002 TEST-P2 95
"$MEDCTL" ledger sign-head >/dev/null
oru MSG0003 TEST-P1 96
"$MEDCTL" keys rotate >/dev/null
oru MSG0004 TEST-P2 94
# Enough entries for a complete Merkle tile (16), so the stored tiles are exercised too.
for i in $(seq 10 19); do oru "MSG00$i" "TEST-P$((i % 3 + 1))" "$((80 + i))"; done
"$MEDCTL" patient erase --yes --reason "fixture: erasure" - <<<"HOSP:TEST-P2" >/dev/null
"$MEDCTL" device revoke cuff-1 >/dev/null
"$MEDCTL" ledger sign-head >/dev/null
stop
"$MEDCTL" ledger verify --db "$DATA/ledger.db" --trust "$DATA/signing-key.pem"

# Everything in the main files (the daemon checkpoints at close; make sure), no side files.
for db in ledger vault registry; do
  sqlite3 "$DATA/$db.db" 'PRAGMA wal_checkpoint(TRUNCATE);' >/dev/null
  rm -f "$DATA/$db.db-wal" "$DATA/$db.db-shm" "$DATA/$db.db.lock"
done
rm -f "$DATA/admin.sock"
# The test puts the copy where it likes: absolute paths become @DATA@.
grep -rlF "$DATA" "$DATA" --include='*.toml' --include='*.conf' | xargs sed -i "s|$DATA|@DATA@|g"
mkdir -p "$OUT"
cp -a "$DATA/." "$OUT/"
echo "fixture in $OUT:"; du -ab "$OUT" | sort -n | tail -12
