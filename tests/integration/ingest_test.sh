#!/usr/bin/env bash
# Device ingest end to end, with real parts only: medgated with its HL7/MLLP and CoAP/DTLS-PSK
# listeners on loopback, a real SoftHSM token, medgate-mllp-send and libcoap's
# coap-client-openssl as the devices. Readings are acknowledged (AA, 2.04) once durable and are on
# the ledger only as ciphertext under a pseudonym; unknown sources, wrong keys and revoked devices
# are refused; a retransmission is recorded once; kill -9 while a sender is sending loses nothing
# that was acknowledged; an erased patient's readings are refused.
source "$(dirname "$0")/lib.sh" "$1"
MLLP_SEND=$BIN_SRC/medgate-mllp-send

DATA=$WORK/data
mkdir -p "$WORK/run" "$WORK/msg"
chmod 755 "$WORK/run"
SOCK=$WORK/run/admin.sock
"$MEDCTL" init --data-dir "$DATA" --ledger-id ward-7 --socket "$SOCK" >/dev/null
CONF=$DATA/medgated.toml
sed -i "s/^admin_group = .*/admin_group = 'daemon'/; s/^auditor_group = .*/auditor_group = 'nogroup'/" "$CONF"
LOG=$WORK/medgated.log
export MEDGATE_SOCKET=$SOCK
MARK=MARKER$RANDOM$RANDOM

# A free UDP port for CoAP (HL7 takes port 0: any free port, read back from status).
for _ in $(seq 1 50); do
  COAP_PORT=$(( (RANDOM % 20000) + 30000 ))
  ss -Huln "sport = :$COAP_PORT" | grep -q . || break
done
cat >>"$CONF" <<EOF

[hl7]
address = "127.0.0.1"
port = 0
read_timeout_s = 5

[coap]
address = "127.0.0.1"
port = $COAP_PORT

[metrics]
listen = "127.0.0.1:0"
EOF

start_daemon "$CONF" "$LOG"
hl7_port() { "$MEDCTL" --json status | sed -n '/"hl7": {/,/}/s/.*"port": \([0-9]*\).*/\1/p' | head -1; }
HL7_PORT=$(hl7_port)
[ -n "$HL7_PORT" ] && [ "$HL7_PORT" != 0 ] && pass "the HL7 listener is up (port $HL7_PORT)" || failed "no HL7 port in status"

# oru FILE CONTROL_ID PATIENT [APP]: an ORU^R01 with one SpO2 reading and one text note.
oru() {
  printf 'MSH|^~\\&|%s|ICU|MEDGATE|HOSP|20261125120000||ORU^R01^ORU_R01|%s|P|2.6\rPID|1||%s^^^HOSP^MR\rOBR|1||||||20261125115900\rOBX|1|NM|150456^MDC_PULS_OXIM_SAT_O2^MDC||97|262688^MDC_DIM_PERCENT^MDC|||||F|||20261125115900\rOBX|2|ST|8251-1^Note^LN||%s-note||||||F\r' \
    "${4:-CENTRAL}" "$2" "$3" "$MARK" >"$1"
}
count_observations() { "$MEDCTL" --json status | sed -n '/"pipeline"/,/}/s/.*"observations": \([0-9]*\).*/\1/p'; }

say "== HL7"
"$MEDCTL" device add central --kind hl7 --hl7-app CENTRAL --hl7-facility ICU >/dev/null
oru "$WORK/msg/1.hl7" MSG0001 "$MARK-P1"
expect_rc 0 "an ORU from a registered source is acknowledged AA" -- "$MLLP_SEND" --host 127.0.0.1 --port "$HL7_PORT" "$WORK/msg/1.hl7"
expect_in "AA MSG0001" "AA echoes MSH-10"
[ "$(count_observations)" = 2 ] && pass "two readings committed" || failed "committed: $(count_observations)"
expect_rc 0 "the same message again (a retransmission)" -- "$MLLP_SEND" --host 127.0.0.1 --port "$HL7_PORT" "$WORK/msg/1.hl7"
[ "$(count_observations)" = 2 ] && pass "is acknowledged but not recorded twice" || failed "committed: $(count_observations)"
oru "$WORK/msg/2.hl7" MSG0002 "$MARK-P1" STRANGER
expect_rc 1 "an unknown source is refused" -- "$MLLP_SEND" --host 127.0.0.1 --port "$HL7_PORT" "$WORK/msg/2.hl7"
expect_in "AE MSG0002" "with AE"
printf 'garbage' >"$WORK/msg/3.hl7"
expect_rc 1 "garbage is refused" -- "$MLLP_SEND" --host 127.0.0.1 --port "$HL7_PORT" "$WORK/msg/3.hl7"
expect_in "AR" "with AR"
oru "$WORK/msg/4.hl7" MSG0004 "$MARK-P2"
expect_rc 0 "sent one byte at a time with the trailer split" -- "$MLLP_SEND" --host 127.0.0.1 --port "$HL7_PORT" --chunk 1 --split-trailer "$WORK/msg/4.hl7"
printf 'MSH|^~\\&|CENTRAL|ICU|MEDGATE|HOSP|20261125120500||ADT^A01^ADT_A01|ADT0001|P|2.6\rEVN|A01|20261125120500\rPID|1||%s-P5^^^HOSP^MR||%s-NAME^JANE\r' "$MARK" "$MARK" >"$WORK/msg/adt.hl7"
expect_rc 0 "an ADT^A01 is acknowledged AA once the patient is indexed" -- "$MLLP_SEND" --host 127.0.0.1 --port "$HL7_PORT" "$WORK/msg/adt.hl7"
expect_in "AA ADT0001" "AA"
expect_rc 0 "the admitted patient is in the index" -- "$MEDCTL" patient show - <<<"HOSP:$MARK-P5"
expect_in "state +active" "as an active patient"
expect_rc 0 "device show counts it" -- "$MEDCTL" device show central
expect_in "traffic +[0-9]+ received, 4 committed" "four committed (the ADT, and a retransmission counts as acknowledged)"

say "== CoAP"
"$MEDCTL" device add pump-1 --kind coap --patient - --psk-out "$WORK/pump-1.psk" <<<"$MARK-P3" >/dev/null
"$MEDCTL" device add pump-2 --kind coap --psk-out "$WORK/pump-2.psk" >/dev/null
printf '[{"bn":"urn:dev:pump-1:","bt":1764072000,"n":"rate","u":"ml/h","v":12.5},{"n":"note","vs":"%s-coap"}]' "$MARK" >"$WORK/msg/senml.json"
coap() {  # coap IDENTITY KEY -> prints the last response code
  coap-client-openssl -v 6 -B 5 -m post -t 110 -f "$WORK/msg/senml.json" -u "$1" -k "$2" \
    "coaps://127.0.0.1:$COAP_PORT/obs" 2>&1 | grep -o 'c:[0-9]\.[0-9][0-9]' | grep -v 'c:0.00' | tail -1
}
[ "$(coap pump-1 "$(cat "$WORK/pump-1.psk")")" = "c:2.04" ] && pass "a bound device with its PSK gets 2.04" || failed "pump-1 got '$(coap pump-1 "$(cat "$WORK/pump-1.psk")")'"
[ "$(count_observations)" = 6 ] && pass "its two readings are committed" || failed "committed: $(count_observations)"
[ -z "$(coap pump-1 wrong-key-wrong-key-wrong-key-1)" ] && pass "a wrong PSK gets no answer" || failed "a wrong PSK got an answer"
[ "$(coap pump-2 "$(cat "$WORK/pump-2.psk")")" = "c:4.03" ] && pass "an unbound device gets 4.03" || failed "unbound: wrong code"
"$MEDCTL" device revoke pump-1 >/dev/null
[ "$(coap pump-1 "$(cat "$WORK/pump-1.psk")")" = "c:4.03" ] && pass "a revoked device gets 4.03" || failed "revoked: wrong code"
[ "$(count_observations)" = 6 ] && pass "nothing else was committed" || failed "committed: $(count_observations)"
expect_rc 0 "status" -- "$MEDCTL" status
expect_in "ingest +[0-9]+ batches committed \(6 readings\)" "status shows the pipeline"
expect_in "^health +ok" "and starts with its health"
expect_in "coap +DTLS-PSK port $COAP_PORT" "and the CoAP listener"
for _ in $(seq 1 50); do "$MEDCTL" status | grep -q "^rates " && break; sleep 0.1; done
expect_rc 0 "status with rates" -- "$MEDCTL" --json status
expect_in '"readings_per_s": [0-9.]+' "shows ingest rates over the last minute"

say "== HL7 source address allow-lists"
expect_rc 0 "an HL7 source allowed from one network only" -- "$MEDCTL" device add lis --kind hl7 --hl7-app LIS --allow 10.99.0.0/16
expect_in "allowed +from 10.99.0.0/16" "shows its allow-list"
oru "$WORK/msg/6.hl7" MSG0006 "$MARK-P6" LIS
expect_rc 1 "a message from outside the allow-list is refused" -- "$MLLP_SEND" --host 127.0.0.1 --port "$HL7_PORT" "$WORK/msg/6.hl7"
expect_in "AE MSG0006" "with AE"
expect_in "not registered for this address" "saying no more than for an unknown source"
grep -q "mllp.address_refused" "$LOG" && pass "the refusal is logged with its message id" || failed "no mllp.address_refused in the log"
expect_rc 2 "a network with host bits set" -- "$MEDCTL" device allow lis 10.99.1.0/16
expect_in "did you mean 10.99.0.0/16" "suggests the network"
expect_rc 2 "a name is no network" -- "$MEDCTL" device allow lis lab.example
expect_rc 2 "networks and --any together" -- "$MEDCTL" device allow lis 10.0.0.0/8 --any
expect_rc 2 "a CoAP device has no allow-list" -- "$MEDCTL" device allow pump-2 127.0.0.1
expect_in "DTLS key authenticates it" "says why"
expect_rc 0 "allow loopback too" -- "$MEDCTL" device allow lis 10.99.0.0/16 127.0.0.1
expect_in "allowed +from 10.99.0.0/16 127.0.0.1" "shows both"
ALLOW_ENTRY=$(sed -n 's/.*(ledger entry \([0-9]*\)).*/\1/p' <<<"$OUT" | head -1)
expect_rc 0 "the change is a ledger entry" -- "$MEDCTL" --json ledger show --entry "$ALLOW_ENTRY"
expect_in '"event": "allow"' "a device event 'allow'"
expect_in '"127.0.0.1"' "naming the networks"
expect_rc 0 "now the same message is taken" -- "$MLLP_SEND" --host 127.0.0.1 --port "$HL7_PORT" "$WORK/msg/6.hl7"
expect_in "AA MSG0006" "with AA"
expect_rc 0 "device show counts the refusal" -- "$MEDCTL" --json device show lis
expect_in '"address": 1' "as rejected for its address"
expect_rc 0 "--any lifts the list" -- "$MEDCTL" device allow lis --any
expect_in "allowed +from any address" "any address"

say "== metrics"
METRICS_PORT=$("$MEDCTL" --json status | sed -n '/"metrics": {/,/}/s/.*"port": \([0-9]*\).*/\1/p' | head -1)
[ -n "$METRICS_PORT" ] && [ "$METRICS_PORT" != 0 ] && pass "the metrics endpoint is up (port $METRICS_PORT)" || failed "no metrics port in status"
expect_rc 0 "a scrape" -- curl -sS -f "http://127.0.0.1:$METRICS_PORT/metrics"
expect_in "# TYPE medgate_ledger_entries gauge" "names its families"
expect_in "medgate_ingest_observations_total [1-9][0-9]*" "counts committed readings"
expect_in 'medgate_device_rejected_total\{device="lis",reason="address"\} 1' "per device and reason"
expect_in 'medgate_device_committed_total\{device="central",kind="hl7"\} [1-9]' "and per device committed"
expect_in "medgate_key_store_reachable 1" "the key store's health"
expect_not_in "$MARK" "nothing about a patient"
expect_rc 22 "another path is 404" -- curl -sS -f "http://127.0.0.1:$METRICS_PORT/"
expect_rc 0 "a request that never ends is cut off and answered 400" -- bash -c "exec 3<>/dev/tcp/127.0.0.1/$METRICS_PORT; printf 'GET /metrics HTTP/1.1\r\n' >&3; cat <&3"
expect_in "400 Bad Request" "400"
expect_rc 0 "status counts the scrapes" -- "$MEDCTL" --json status
expect_in '"scrapes": [1-9]' "scrapes"

say "== patients"
expect_rc 0 "an admin looks a patient up by identifier" -- "$MEDCTL" patient show - <<<"HOSP:$MARK-P1"
expect_in "identifier HOSP:$MARK-P1" "and sees the identifier"
expect_in "recorded as ledger entry [0-9]+" "the look is recorded"
PSEUDO=$(sed -n 's/^patient *\([0-9a-f]\{64\}\)$/\1/p' <<<"$OUT")
expect_rc 0 "by pseudonym" -- "$MEDCTL" patient show "$PSEUDO"
expect_in "identifier HOSP:$MARK-P1" "the same patient"
expect_rc 1 "an auditor may not see identifiers" -- as_user nobody "$MEDCTL" patient show "$PSEUDO"

say "== erasure"
# PID-3 with an assigning authority names the patient AUTHORITY:ID.
expect_rc 0 "erase an HL7 patient" -- "$MEDCTL" patient erase - --yes <<<"HOSP:$MARK-P1"
oru "$WORK/msg/5.hl7" MSG0005 "$MARK-P1"
expect_rc 1 "a reading for the erased patient is refused" -- "$MLLP_SEND" --host 127.0.0.1 --port "$HL7_PORT" "$WORK/msg/5.hl7"
expect_in "AE MSG0005" "with AE"
expect_rc 0 "an erased patient shows no identifier" -- "$MEDCTL" patient show "$PSEUDO"
expect_in "state +erased" "only that it was erased"
expect_not_in "identifier" "no identifier"

say "== kill -9 while sending"
for i in $(seq 1000 1599); do oru "$WORK/msg/k$i.hl7" "K$i" "$MARK-P4"; done
"$MLLP_SEND" --host 127.0.0.1 --port "$HL7_PORT" "$WORK"/msg/k*.hl7 >"$WORK/acks" 2>&1 &
SENDER=$!
sleep 0.2
kill -9 "$DAEMON_PID"
wait "$DAEMON_PID" 2>/dev/null || true
DAEMON_PID=
wait "$SENDER" 2>/dev/null || true
ACKED=$(grep -c ': AA K' "$WORK/acks" || true)
say "     (the sender got $ACKED AAs before medgated died)"
start_daemon "$CONF" "$LOG"
# Every AA'd message is on the ledger: count the observation entries that name it.
missing=0
for id in $(grep -o ': AA K[0-9]*' "$WORK/acks" | sed 's/: AA //'); do
  grep -qa "$id" "$DATA/ledger.db" "$DATA/ledger.db-wal" 2>/dev/null || missing=$((missing + 1))
done
[ "$missing" = 0 ] && pass "every acknowledged message is on the ledger after restart ($ACKED)" || failed "$missing acknowledged messages are missing"
expect_rc 0 "the ledger verifies after the crash" -- "$MEDCTL" ledger verify
# The sender never heard about the rest: it sends every message again. Nothing is recorded twice,
# including what was committed but not yet acknowledged when medgated died.
"$MLLP_SEND" --host 127.0.0.1 --port "$(hl7_port)" "$WORK"/msg/k*.hl7 >"$WORK/acks2" 2>&1 || true
[ "$(grep -c ': AA K' "$WORK/acks2")" = 600 ] && pass "all 600 are acknowledged on the second try" || failed "$(grep -c ': AA K' "$WORK/acks2") of 600 acknowledged"
stop_daemon
recorded=$(sqlite3 "$DATA/ledger.db" "SELECT count(*) FROM entries WHERE type = 6 AND instr(bytes, CAST('message_id' AS BLOB) || X'65' || CAST('K1' AS BLOB)) > 0")
[ "$recorded" = 1200 ] && pass "each message is on the ledger exactly once (1200 readings)" || failed "$recorded readings recorded for 600 messages of 2 readings"
start_daemon "$CONF" "$LOG"
stop_daemon

say "== privacy"
for f in "$DATA"/ledger.db* "$DATA"/vault.db* "$DATA"/registry.db* "$LOG"; do
  [ -f "$f" ] || continue
  if grep -qa "$MARK" "$f"; then failed "a patient identifier or value is in $(basename "$f")"; else pass "nothing identifying in $(basename "$f")"; fi
done

finish
