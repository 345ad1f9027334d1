#!/usr/bin/env bash
# kill -9 of medgated while several admins append: every request medctl saw acknowledged is on the
# ledger after a restart, and the ledger verifies.
source "$(dirname "$0")/lib.sh" "$1"

DATA=$WORK/data
"$MEDCTL" init --data-dir "$DATA" --ledger-id ward-7 >/dev/null
CONF=$DATA/medgated.toml
start_daemon "$CONF"
export MEDGATE_SOCKET=$DATA/admin.sock
LOOPS=()
for t in 1 2 3 4 5 6; do
  (
    while true; do
      out=$("$MEDCTL" --json ledger sign-head 2>/dev/null) || continue
      printf '%s\n' "$out" | grep -o '"recorded_as": [0-9]*' | grep -o '[0-9]*' >>"$WORK/acks.$t"
    done
  ) &
  LOOPS+=($!)
done
sleep 3
kill -9 "$DAEMON_PID"
wait "$DAEMON_PID" 2>/dev/null || true
DAEMON_PID=
kill "${LOOPS[@]}" 2>/dev/null || true
wait "${LOOPS[@]}" 2>/dev/null || true
cat "$WORK"/acks.* | sort -n | uniq >"$WORK/acked"
ACKED=$(wc -l <"$WORK/acked")
[ "$ACKED" -ge 20 ] && pass "$ACKED requests were acknowledged before the kill" || failed "only $ACKED acknowledged"

start_daemon "$CONF"
MISSING=0
while read -r idx; do
  out=$("$MEDCTL" --json ledger show --entry "$idx" 2>&1) || { MISSING=$((MISSING + 1)); say "entry $idx: $out"; continue; }
  grep -q '"op": "ledger.sign_head"' <<<"$out" || { MISSING=$((MISSING + 1)); say "entry $idx: $out"; }
done <"$WORK/acked"
[ "$MISSING" = 0 ] && pass "every acknowledged entry is there after restart" || failed "$MISSING acknowledged entries are missing"
expect_rc 0 "the ledger verifies online after the crash" -- "$MEDCTL" ledger verify
stop_daemon
expect_rc 0 "and offline" -- "$MEDCTL" ledger verify --db "$DATA/ledger.db" --trust "$DATA/signing-key.pem"
finish
