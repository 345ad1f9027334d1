#!/usr/bin/env bash
# MLLP over TLS end to end, with real parts only: medgated's TLS key generated on a real SoftHSM
# token by `medgated tls-key` (used through libp11's engine), its CSR signed by a test CA made
# with openssl, medgate-mllp-send as the sender. AA over TLS; a sender that does not trust the
# listener's CA refuses it; client certificates required, verified, and bound to HL7 sources;
# plain-text and stalled clients are dropped without holding anyone up; kill -9 while sending
# over TLS loses nothing that was acknowledged.
source "$(dirname "$0")/lib.sh" "$1"
MLLP_SEND=$BIN_SRC/medgate-mllp-send

DATA=$WORK/data
PKI=$WORK/pki
mkdir -p "$WORK/run" "$WORK/msg" "$PKI"
chmod 755 "$WORK/run"
SOCK=$WORK/run/admin.sock
"$MEDCTL" init --data-dir "$DATA" --ledger-id ward-7 --socket "$SOCK" >/dev/null
CONF=$DATA/medgated.toml
sed -i "s/^admin_group = .*/admin_group = 'daemon'/; s/^auditor_group = .*/auditor_group = 'nogroup'/" "$CONF"
LOG=$WORK/medgated.log
export MEDGATE_SOCKET=$SOCK
MARK=MARKER$RANDOM$RANDOM

# ---- a hospital CA (test only: its key is a file), and one nobody trusts ----
ca() {  # ca NAME
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 \
    -subj "/CN=$1" -keyout "$PKI/$1.key" -out "$PKI/$1.pem" 2>/dev/null
}
client_cert() {  # client_cert NAME CN CA
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$2" \
    -keyout "$PKI/$1.key" -out "$PKI/$1.csr" 2>/dev/null
  openssl x509 -req -in "$PKI/$1.csr" -CA "$PKI/$3.pem" -CAkey "$PKI/$3.key" -CAcreateserial \
    -days 30 -out "$PKI/$1.pem" 2>/dev/null
}
fingerprint() { openssl x509 -in "$1" -noout -fingerprint -sha256 | sed 's/.*=//'; }
ca hospital-ca
ca rogue-ca
client_cert central central-icu hospital-ca
client_cert lab lab-1 hospital-ca
client_cert rogue central-icu rogue-ca

say "== the TLS key"
expect_rc 2 "tls-key needs somewhere to write" -- "$MEDGATED" tls-key --config "$CONF" --cn mllp.ward7
expect_rc 2 "a bad subjectAltName is refused" -- "$MEDGATED" tls-key --config "$CONF" --cn mllp.ward7 --san "IP:not-an-ip" --csr-out "$PKI/x.csr"
expect_in "not an IPv4 or IPv6 address" "and named"
expect_rc 0 "medgated tls-key creates the key on the token and writes a CSR" -- \
  "$MEDGATED" tls-key --config "$CONF" --cn mllp.ward7 --san 127.0.0.1 --san localhost --csr-out "$PKI/server.csr" --cert-out "$PKI/self.pem"
expect_in "Created the TLS key in the key store" "created"
expect_in "pkcs11:token=.*object=medgate-tls" "names where the key is"
KEY_SHA=$(sed -n 's/.*public key  sha256 \([0-9a-f]*\).*/\1/p' <<<"$OUT")
expect_rc 0 "the CSR's signature verifies (made by the token's key)" -- openssl req -in "$PKI/server.csr" -noout -verify
expect_rc 0 "a second run keeps the key" -- "$MEDGATED" tls-key --config "$CONF" --cn mllp.ward7 --san 127.0.0.1 --cert-out "$PKI/self2.pem"
expect_in "Kept the TLS key" "kept"
expect_in "sha256 $KEY_SHA" "the same public key"
# The private key never leaves the token: it is sensitive and not extractable.
SOFTHSM2_CONF=$DATA/softhsm/softhsm2.conf
[ -f "$SOFTHSM2_CONF" ] || SOFTHSM2_CONF=$(sed -n 's/^softhsm_conf = "\(.*\)"/\1/p' "$CONF")
if command -v pkcs11-tool >/dev/null; then
  OUT=$(SOFTHSM2_CONF=$SOFTHSM2_CONF pkcs11-tool --module /usr/lib/softhsm/libsofthsm2.so --token-label medgate \
    --login --pin "$(cat "$DATA/hsm-pin")" --list-objects --type privkey 2>&1 || true)
  expect_in "label: +medgate-tls" "the TLS private key is on the token"
  expect_in "never extractable" "never extractable"
fi
openssl x509 -req -in "$PKI/server.csr" -CA "$PKI/hospital-ca.pem" -CAkey "$PKI/hospital-ca.key" -CAcreateserial \
  -days 30 -copy_extensions copy -out "$PKI/server.pem" 2>/dev/null
cat "$PKI/server.pem" "$PKI/hospital-ca.pem" >"$PKI/server-chain.pem"

cat >>"$CONF" <<EOF

[metrics]
listen = "127.0.0.1:0"

[hl7]
address = "127.0.0.1"
port = 0
read_timeout_s = 10
tls = true
tls_cert = "$PKI/server-chain.pem"
tls_client_ca = "$PKI/hospital-ca.pem"
tls_handshake_timeout_s = 2
EOF

start_daemon "$CONF" "$LOG"
hl7_port() { "$MEDCTL" --json status | sed -n '/"hl7": {/,/}/s/.*"port": \([0-9]*\).*/\1/p' | head -1; }
HL7_PORT=$(hl7_port)
[ -n "$HL7_PORT" ] && [ "$HL7_PORT" != 0 ] && pass "the HL7 listener is up (port $HL7_PORT)" || failed "no HL7 port in status"
grep -q "over TLS (key: key store (medgate-tls); client certificates required)" "$LOG" && pass "it says TLS, key in the key store, client certificates required" || failed "no TLS line in the log"

oru() {  # oru FILE CONTROL_ID PATIENT [APP]
  printf 'MSH|^~\\&|%s|ICU|MEDGATE|HOSP|20261125120000||ORU^R01^ORU_R01|%s|P|2.6\rPID|1||%s^^^HOSP^MR\rOBR|1||||||20261125115900\rOBX|1|NM|150456^MDC_PULS_OXIM_SAT_O2^MDC||97|262688^MDC_DIM_PERCENT^MDC|||||F|||20261125115900\rOBX|2|ST|8251-1^Note^LN||%s-note||||||F\r' \
    "${4:-CENTRAL}" "$2" "$3" "$MARK" >"$1"
}
send() {  # send CLIENT FILE... (CLIENT: a certificate name, or - for none)
  local who=$1
  shift
  local args=(--host 127.0.0.1 --port "$HL7_PORT" --timeout-ms 5000 --tls --ca "$PKI/hospital-ca.pem")
  [ "$who" = - ] || args+=(--cert "$PKI/$who.pem" --key "$PKI/$who.key")
  "$MLLP_SEND" "${args[@]}" "$@"
}

say "== sources bound to certificates"
expect_rc 2 "a fingerprint that is not 64 hex digits" -- "$MEDCTL" device add central --kind hl7 --hl7-app CENTRAL --hl7-facility ICU --cert-fingerprint abc
expect_in "64 hex digits" "names the rule"
expect_rc 2 "a fingerprint and a CN together" -- "$MEDCTL" device add central --kind hl7 --hl7-app CENTRAL --cert-fingerprint "$(fingerprint "$PKI/central.pem")" --cert-cn x
expect_rc 2 "a CoAP device has no client certificate" -- "$MEDCTL" device add pump-1 --kind coap --cert-cn pump-1
expect_in "DTLS key authenticates it" "says why"
expect_rc 0 "an HL7 source bound to its certificate's fingerprint (as openssl prints it)" -- \
  "$MEDCTL" device add central --kind hl7 --hl7-app CENTRAL --hl7-facility ICU --cert-fingerprint "$(fingerprint "$PKI/central.pem")"
CENTRAL_FP=$(fingerprint "$PKI/central.pem" | tr -d : | tr 'A-F' 'a-f')
expect_in "client +certificate sha256 $CENTRAL_FP" "shows the binding"
expect_rc 0 "an HL7 source bound to a subject CN" -- "$MEDCTL" device add lab --kind hl7 --hl7-app LAB --cert-cn lab-1
expect_in "client +certificate with subject CN 'lab-1'" "shows it"
expect_rc 0 "an HL7 source bound to no certificate" -- "$MEDCTL" device add monitor --kind hl7 --hl7-app MONITOR
expect_in "client +any connection" "shows it"
ADD_ENTRY=$("$MEDCTL" --json device show central | sed -n 's/.*"last_entry": \([0-9]*\).*/\1/p')
expect_rc 0 "the binding is on the ledger" -- "$MEDCTL" --json ledger show --entry "$ADD_ENTRY"
expect_in "\"cert\": \"sha256:$CENTRAL_FP\"" "as the device event's cert"

say "== MLLP over TLS"
oru "$WORK/msg/1.hl7" TLS0001 "$MARK-P1"
expect_rc 0 "an ORU over TLS with the source's certificate is acknowledged AA" -- send central "$WORK/msg/1.hl7"
expect_in "AA TLS0001" "AA echoes MSH-10"
oru "$WORK/msg/2.hl7" TLS0002 "$MARK-P1" LAB
expect_rc 0 "a source bound by CN, with a certificate of that CN" -- send lab "$WORK/msg/2.hl7"
expect_in "AA TLS0002" "AA"
oru "$WORK/msg/3.hl7" TLS0003 "$MARK-P1" MONITOR
expect_rc 0 "an unbound source, with any verified certificate" -- send lab "$WORK/msg/3.hl7"
expect_in "AA TLS0003" "AA"
oru "$WORK/msg/4.hl7" TLS0004 "$MARK-P1"
expect_rc 0 "several messages, one byte per record, trailer split" -- send central --chunk 1 --pause-ms 0 --split-trailer "$WORK/msg/4.hl7" "$WORK/msg/1.hl7"
expect_in "AA TLS0004" "AA"

say "== refusals"
oru "$WORK/msg/5.hl7" TLS0005 "$MARK-P1"
expect_rc 1 "the certificate of another source is answered AE" -- send lab "$WORK/msg/5.hl7"
expect_in "AE TLS0005" "AE, MSA-2 the message's id"
expect_in "not registered for this client certificate" "with an ERR saying no more than that"
grep -q "mllp.certificate_refused.*central (control id TLS0005).*another one" "$LOG" && pass "logged as mllp.certificate_refused with the message id" || failed "no mllp.certificate_refused for TLS0005 in the log"
oru "$WORK/msg/6.hl7" TLS0006 "$MARK-P1" LAB
expect_rc 1 "a CN binding refuses another CN" -- send central "$WORK/msg/6.hl7"
expect_in "AE TLS0006" "AE"
expect_rc 3 "a sender that does not trust the listener's CA refuses it" -- \
  "$MLLP_SEND" --host 127.0.0.1 --port "$HL7_PORT" --tls --ca "$PKI/rogue-ca.pem" --cert "$PKI/central.pem" --key "$PKI/central.key" "$WORK/msg/1.hl7"
expect_in "certificate does not verify" "says why"
expect_rc 3 "the self-signed certificate is not the one the listener serves" -- \
  "$MLLP_SEND" --host 127.0.0.1 --port "$HL7_PORT" --tls --ca "$PKI/self.pem" "$WORK/msg/1.hl7"
expect_rc 3 "no client certificate: refused in the handshake" -- send - "$WORK/msg/1.hl7"
expect_not_in "AA" "no ACK"
expect_rc 3 "a client certificate from another CA: refused" -- \
  "$MLLP_SEND" --host 127.0.0.1 --port "$HL7_PORT" --timeout-ms 5000 --tls --ca "$PKI/hospital-ca.pem" --cert "$PKI/rogue.pem" --key "$PKI/rogue.key" "$WORK/msg/1.hl7"
expect_rc 2 "--cert without --key" -- "$MLLP_SEND" --port "$HL7_PORT" --tls --ca "$PKI/hospital-ca.pem" --cert "$PKI/central.pem" "$WORK/msg/1.hl7"
expect_rc 2 "--ca without --tls" -- "$MLLP_SEND" --port "$HL7_PORT" --ca "$PKI/hospital-ca.pem" "$WORK/msg/1.hl7"
grep -q "mllp.tls_handshake_failed" "$LOG" && pass "failed handshakes are logged" || failed "no mllp.tls_handshake_failed in the log"

say "== plain text and stalled clients"
expect_rc 3 "a plain MLLP sender on the TLS port gets no ACK" -- "$MLLP_SEND" --host 127.0.0.1 --port "$HL7_PORT" --timeout-ms 3000 "$WORK/msg/1.hl7"
expect_not_in "AA|AE|AR" "no HL7 answer"
# Raw bytes: a whole HL7 frame in the clear. The listener must not take it as HL7.
oru "$WORK/msg/plain.hl7" PLAIN001 "$MARK-P1"
expect_rc 0 "a raw plain-text frame" -- bash -c "exec 3<>/dev/tcp/127.0.0.1/$HL7_PORT; printf '\x0b%s\x1c\r' \"\$(cat $WORK/msg/plain.hl7)\" >&3; timeout 5 cat <&3 | head -c 200 | od -c | head -3"
expect_not_in "M +S +H" "is answered with no HL7"
# Stalled: one connection says nothing, one sends half a ClientHello and stops. Both stay open
# while a real sender is served; both are closed when the handshake timeout passes.
( exec 3<>"/dev/tcp/127.0.0.1/$HL7_PORT"; sleep 6 ) &
SILENT=$!
( exec 3<>"/dev/tcp/127.0.0.1/$HL7_PORT"; printf '\x16\x03\x01\x02\x00\x01\x00\x01' >&3; sleep 6 ) &
HALF=$!
sleep 0.3
oru "$WORK/msg/7.hl7" TLS0007 "$MARK-P1"
START_NS=$(date +%s%N)
expect_rc 0 "a sender is served while two handshakes stall" -- send central "$WORK/msg/7.hl7"
ELAPSED_MS=$(( ($(date +%s%N) - START_NS) / 1000000 ))
say "     (answered in $ELAPSED_MS ms; the stalled handshakes time out after 2000 ms)"
expect_in "AA TLS0007" "AA"
sleep 2.5
n=$(grep -c "mllp.tls_handshake_timeout" "$LOG" || true)
[ "$n" -ge 2 ] && pass "both stalled handshakes were closed at the timeout ($n)" || failed "$n handshake timeouts logged"
kill "$SILENT" "$HALF" 2>/dev/null || true
wait "$SILENT" "$HALF" 2>/dev/null || true
# A client that connects and closes at once (port scanners, load balancer probes).
for _ in 1 2 3 4 5; do (exec 3<>"/dev/tcp/127.0.0.1/$HL7_PORT") 2>/dev/null || true; done
expect_rc 0 "the daemon keeps serving" -- send central "$WORK/msg/1.hl7"
expect_in "AA TLS0001" "AA"
expect_rc 0 "status counts handshakes" -- "$MEDCTL" --json status
expect_in '"tls": true' "TLS on"
expect_in '"tls_client_certificates": true' "client certificates required"
expect_in '"tls_handshake_failures": [1-9]' "failures"
expect_in '"tls_handshake_timeouts": [2-9]' "timeouts"
expect_rc 0 "medctl status" -- "$MEDCTL" status
expect_in "TLS, client certificates required: [1-9][0-9]* handshakes, [1-9][0-9]* failed, [2-9][0-9]* timed out" "shows the TLS counters"
METRICS_PORT=$("$MEDCTL" --json status | sed -n '/"metrics": {/,/}/s/.*"port": \([0-9]*\).*/\1/p' | head -1)
expect_rc 0 "a metrics scrape" -- curl -sS -f "http://127.0.0.1:$METRICS_PORT/metrics"
expect_in "medgate_hl7_tls_handshake_timeouts_total [2-9]" "counts handshake timeouts"
expect_in 'medgate_device_rejected_total\{device="central",reason="certificate"\} 1' "and certificate refusals per device"
expect_rc 0 "device show counts certificate refusals" -- "$MEDCTL" --json device show central
expect_in '"certificate": 1' "one for central"

say "== device cert"
expect_rc 2 "cert needs exactly one of --fingerprint, --cn, --none" -- "$MEDCTL" device cert central
expect_rc 2 "not two" -- "$MEDCTL" device cert central --cn a --none
expect_rc 2 "a fingerprint with a bad digit" -- "$MEDCTL" device cert central --fingerprint "$(printf 'g%.0s' $(seq 64))"
expect_rc 2 "an unknown device" -- "$MEDCTL" device cert nope --none
expect_rc 0 "rebind central to the lab's certificate" -- "$MEDCTL" device cert central --fingerprint "$(fingerprint "$PKI/lab.pem")"
CERT_ENTRY=$(sed -n 's/.*(ledger entry \([0-9]*\)).*/\1/p' <<<"$OUT" | head -1)
expect_rc 0 "the change is a ledger entry" -- "$MEDCTL" --json ledger show --entry "$CERT_ENTRY"
expect_in '"event": "cert"' "a device event 'cert'"
oru "$WORK/msg/8.hl7" TLS0008 "$MARK-P1"
expect_rc 1 "central's own certificate is refused now" -- send central "$WORK/msg/8.hl7"
expect_rc 0 "the lab's is taken" -- send lab "$WORK/msg/8.hl7"
expect_in "AA TLS0008" "AA"
expect_rc 0 "--none lifts the binding" -- "$MEDCTL" device cert central --none
expect_in "client +any connection" "any connection"
expect_rc 0 "bind it back" -- "$MEDCTL" device cert central --fingerprint "$(fingerprint "$PKI/central.pem")"

say "== kill -9 while sending over TLS"
# One file of 3000 messages (a blank line between them): TLS on loopback is quick. Control ids
# K10000..K12999: six characters, CBOR text header 0x66 in the query below.
for i in $(seq 10000 12999); do oru "$WORK/msg/one.hl7" "K$i" "$MARK-P4"; cat "$WORK/msg/one.hl7"; printf '\n\n'; done >"$WORK/msg/kill.hl7"
send central "$WORK/msg/kill.hl7" >"$WORK/acks" 2>&1 &
SENDER=$!
sleep 0.5
kill -9 "$DAEMON_PID"
wait "$DAEMON_PID" 2>/dev/null || true
DAEMON_PID=
wait "$SENDER" 2>/dev/null || true
ACKED=$(grep -c ': AA K' "$WORK/acks" || true)
say "     (the sender got $ACKED AAs before medgated died)"
[ "$ACKED" -gt 0 ] && [ "$ACKED" -lt 3000 ] && pass "the kill came while messages were being acknowledged over TLS" || failed "$ACKED of 3000 acknowledged before the kill"
start_daemon "$CONF" "$LOG"
HL7_PORT=$(hl7_port)
missing=0
for id in $(grep -o ': AA K[0-9]*' "$WORK/acks" | sed 's/: AA //'); do
  grep -qa "$id" "$DATA/ledger.db" "$DATA/ledger.db-wal" 2>/dev/null || missing=$((missing + 1))
done
[ "$missing" = 0 ] && pass "every acknowledged message is on the ledger after restart ($ACKED)" || failed "$missing acknowledged messages are missing"
expect_rc 0 "the ledger verifies after the crash" -- "$MEDCTL" ledger verify
send central "$WORK/msg/kill.hl7" >"$WORK/acks2" 2>&1 || true
[ "$(grep -c ': AA K' "$WORK/acks2")" = 3000 ] && pass "all 3000 are acknowledged on the second try" || failed "$(grep -c ': AA K' "$WORK/acks2") of 3000 acknowledged"
expect_rc 1 "the certificate binding survived the restart" -- send lab "$WORK/msg/5.hl7"
expect_in "AE TLS0005" "AE"
stop_daemon
recorded=$(sqlite3 "$DATA/ledger.db" "SELECT count(*) FROM entries WHERE type = 6 AND instr(bytes, CAST('message_id' AS BLOB) || X'66' || CAST('K1' AS BLOB)) > 0")
[ "$recorded" = 6000 ] && pass "each message is on the ledger exactly once (6000 readings)" || failed "$recorded readings recorded for 3000 messages of 2 readings"

say "== config"
cp "$CONF" "$WORK/bad.toml"
sed -i "s|^tls_cert = .*|tls_cert = \"$PKI/self.pem\"|" "$WORK/bad.toml"
start_daemon "$WORK/bad.toml" "$WORK/bad.log"
pass "the self-signed certificate of the same key serves too"
stop_daemon
sed -i "s|^tls_cert = .*|tls_cert = \"$PKI/lab.pem\"|" "$WORK/bad.toml"
expect_rc 1 "a certificate of another key is refused at start" -- "$MEDGATED" --config "$WORK/bad.toml"
expect_in "is not the certificate of the key store's key" "and named"
sed -i "s|^tls_cert = .*|tls_cert = \"$PKI/nope.pem\"|" "$WORK/bad.toml"
expect_rc 1 "a missing certificate file" -- "$MEDGATED" --config "$WORK/bad.toml"
expect_in "tls_cert .*nope.pem: no such file" "is named"
cp "$CONF" "$WORK/filekey.toml"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 -subj "/CN=file" \
  -addext "subjectAltName=IP:127.0.0.1" -keyout "$PKI/file.key" -out "$PKI/file.pem" 2>/dev/null
sed -i "s|^tls_cert = .*|tls_cert = \"$PKI/file.pem\"\ntls_key_file = \"$PKI/file.key\"|; s|^tls_client_ca = .*||" "$WORK/filekey.toml"
chmod 644 "$PKI/file.key"
expect_rc 1 "tls_key_file: a key file others may read is refused" -- "$MEDGATED" --config "$WORK/filekey.toml"
expect_in "tls_key_file .*file.key may be read by others \(mode 0644\); chmod 600 it" "and says what to do"
chmod 600 "$PKI/file.key"
start_daemon "$WORK/filekey.toml" "$WORK/filekey.log"
grep -q "over TLS (key: file $PKI/file.key; client certificates not asked for)" "$WORK/filekey.log" && pass "tls_key_file: the fallback key file is used, and says so" || failed "no fallback line in the log"
HL7_PORT=$(hl7_port)
expect_rc 0 "an unbound source over TLS without client certificates" -- \
  "$MLLP_SEND" --host 127.0.0.1 --port "$HL7_PORT" --tls --ca "$PKI/file.pem" "$WORK/msg/3.hl7"
expect_in "AA TLS0003" "AA"
oru "$WORK/msg/9.hl7" TLS0009 "$MARK-P1"
expect_rc 1 "a source bound to a certificate, on a connection without one" -- \
  "$MLLP_SEND" --host 127.0.0.1 --port "$HL7_PORT" --tls --ca "$PKI/file.pem" "$WORK/msg/9.hl7"
expect_in "AE TLS0009" "AE"
grep -q "mllp.certificate_refused.*no client certificate" "$WORK/filekey.log" && pass "logged: no client certificate" || failed "no refusal in the log"
stop_daemon

say "== privacy"
for f in "$DATA"/ledger.db* "$DATA"/registry.db* "$LOG" "$WORK/filekey.log"; do
  [ -f "$f" ] || continue
  if grep -qa "$MARK" "$f"; then failed "a patient identifier or value is in $(basename "$f")"; else pass "nothing identifying in $(basename "$f")"; fi
done
if grep -qa "$(cat "$DATA/hsm-pin")" "$LOG"; then failed "the PIN is in the log"; else pass "no PIN in the log"; fi

finish
