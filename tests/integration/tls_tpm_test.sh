#!/usr/bin/env bash
# The MLLP listener's TLS key inside the TPM (swtpm), end to end: `medgated tls-key` makes it in
# the TPM beside the signing keys but apart from them, and every handshake's signature is made
# by the TPM through medgated's own key store connection (swtpm serves one client). openssl
# s_client, trusting only the certificate issued for the TPM's key, completes TLS 1.3 and 1.2
# handshakes (1.2 also with a SHA-384 signature) and sees that key.
source "$(dirname "$0")/lib.sh" "$1"

start_swtpm
DATA=$WORK/data
PKI=$WORK/pki
mkdir -p "$WORK/run" "$PKI"
chmod 755 "$WORK/run"
SOCK=$WORK/run/admin.sock
"$MEDCTL" init --data-dir "$DATA" --ledger-id ward-7 --socket "$SOCK" \
  --key-store "tpm2:swtpm:host=127.0.0.1,port=$TPM_PORT" >/dev/null
CONF=$DATA/medgated.toml
sed -i "s/^admin_group = .*/admin_group = 'daemon'/; s/^auditor_group = .*/auditor_group = 'nogroup'/" "$CONF"
LOG=$WORK/medgated.log
export MEDGATE_SOCKET=$SOCK
KEY_DIR=$DATA/tpm  # where medctl init puts a TPM's key blobs

say "== the TLS key in the TPM"
expect_rc 0 "medgated tls-key creates the key in the TPM and issues a certificate" -- \
  "$MEDGATED" tls-key --config "$CONF" --cn mllp.ward7 --san 127.0.0.1 --csr-out "$PKI/server.csr" --cert-out "$PKI/self.pem"
expect_in "Created the TLS key in the key store" "created"
expect_in "tpm2:swtpm:.*tls-key.pub" "names where the key is"
KEY_SHA=$(sed -n 's/.*public key  sha256 \([0-9a-f]*\).*/\1/p' <<<"$OUT")
[ -n "$KEY_SHA" ] && pass "prints the key's sha256" || failed "no key sha256 printed"
expect_rc 0 "the CSR's signature verifies (made by the TPM's key)" -- openssl req -in "$PKI/server.csr" -noout -verify
CERT_SHA=$(openssl x509 -in "$PKI/self.pem" -noout -pubkey | openssl pkey -pubin -outform DER | sha256sum | cut -d' ' -f1)
[ "$CERT_SHA" = "$KEY_SHA" ] && pass "the certificate carries the TPM's key" || failed "certificate key $CERT_SHA, TPM key $KEY_SHA"
expect_rc 0 "a second run keeps the key" -- "$MEDGATED" tls-key --config "$CONF" --cn mllp.ward7 --san 127.0.0.1 --cert-out "$PKI/self2.pem"
expect_in "Kept the TLS key" "kept"
expect_in "sha256 $KEY_SHA" "the same public key"
[ "$(stat -c %a "$KEY_DIR/tls-key.priv" 2>/dev/null)" = 600 ] && pass "its blob is private (0600)" || failed "tls-key.priv missing or not 0600"

cat >>"$CONF" <<EOC

[hl7]
address = "127.0.0.1"
port = 0
tls = true
tls_cert = "$PKI/self.pem"
tls_handshake_timeout_s = 5
EOC

start_daemon "$CONF" "$LOG"
HL7_PORT=$("$MEDCTL" --json status | sed -n '/"hl7": {/,/}/s/.*"port": \([0-9]*\).*/\1/p' | head -1)
[ -n "$HL7_PORT" ] && [ "$HL7_PORT" != 0 ] && pass "the HL7 listener is up (port $HL7_PORT)" || failed "no HL7 port in status"
grep -q "over TLS (key: key store (TPM, tls-key in " "$LOG" && pass "it says TLS with the key in the key store" || failed "no TLS line in the log"

expect_rc 0 "keys show" -- "$MEDCTL" --json keys show
expect_not_in "$KEY_SHA" "the TLS key is not a signing key"

handshake() {  # handshake DESCRIPTION OPENSSL_ARGS...
  local what=$1
  shift
  expect_rc 0 "$what" -- sh -c "openssl s_client -connect 127.0.0.1:$HL7_PORT -CAfile '$PKI/self.pem' \
    -verify_return_error -verify_ip 127.0.0.1 $* </dev/null 2>&1"
  expect_in "Verify return code: 0 \(ok\)" "$what: the server verifies against the TPM key's certificate"
  SERVED=$(openssl x509 -pubkey -noout <<<"$OUT" | openssl pkey -pubin -outform DER | sha256sum | cut -d' ' -f1)
  [ "$SERVED" = "$KEY_SHA" ] && pass "$what: the server's key is the TPM's" || failed "$what: served key $SERVED"
}
handshake "TLS 1.3" -tls1_3
handshake "TLS 1.2" -tls1_2
handshake "TLS 1.2 with ECDSA+SHA384" -tls1_2 -sigalgs ECDSA+SHA384
expect_in "Peer signature type: ECDSA" "the handshake was signed with ECDSA"
expect_rc 1 "a client that trusts another certificate refuses the server" -- sh -c \
  "openssl s_client -connect 127.0.0.1:$HL7_PORT -CAfile /etc/ssl/certs/ca-certificates.crt -verify_return_error </dev/null 2>&1"

expect_rc 0 "status" -- "$MEDCTL" --json status
OUT=$(sed -n '/"key_store": {/,/}/p' <<<"$OUT")
expect_in '"errors": 0' "the key store counted no device error"

say "== the signature is the TPM's: without it there is no handshake"
stop_swtpm
expect_rc 1 "with the TPM gone the handshake fails" -- sh -c \
  "openssl s_client -connect 127.0.0.1:$HL7_PORT -CAfile '$PKI/self.pem' -verify_return_error </dev/null 2>&1"
sleep 0.2
grep -q "the key store's TLS key: .*swtpm:host=127.0.0.1,port=$TPM_PORT" "$LOG" && pass "the log says the key store could not sign, naming the TPM" || { failed "no key store error in the log"; tail -5 "$LOG"; }
start_swtpm "$TPM_PORT"
handshake "TLS 1.3 after the TPM is back" -tls1_3
stop_daemon
finish
