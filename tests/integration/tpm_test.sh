#!/usr/bin/env bash
# medgate on a TPM 2.0 (swtpm on loopback): medctl init with tpm2, the daemon signs heads with the
# TPM key, the TPM restarting under a running daemon, and the daemon refusing to start when the
# TPM is gone (exit 3, naming it) or PCR 7 changed since the data-key secret was sealed.
source "$(dirname "$0")/lib.sh" "$1"


start_swtpm
TCTI="swtpm:host=127.0.0.1,port=$TPM_PORT"
export TPM2TOOLS_TCTI=$TCTI
DATA=$WORK/data
RUN=$WORK/run
mkdir -p "$RUN"
chmod 755 "$RUN"
SOCK=$RUN/admin.sock
CONF=$DATA/medgated.toml

say "== init on the TPM"
expect_rc 2 "--seal-pcrs is checked" -- "$MEDCTL" init --data-dir "$WORK/bad" --key-store "tpm2:$TCTI" --seal-pcrs 7,99
expect_in "PCR 99 does not exist" "names the bad PCR"
expect_rc 0 "medctl init --key-store tpm2:$TCTI --seal-pcrs 7" -- \
  "$MEDCTL" init --data-dir "$DATA" --ledger-id ward-tpm --socket "$SOCK" --key-store "tpm2:$TCTI" --seal-pcrs 7
expect_in "key store +tpm2:$TCTI" "init names the TPM key store"
[ "$(stat -c %a "$DATA/tpm")" = 700 ] && pass "DIR/tpm is 0700" || failed "DIR/tpm mode $(stat -c %a "$DATA/tpm")"
modes=$(stat -c %a "$DATA"/tpm/* | sort -u | tr '\n' ' ')
[ "$modes" = "600 " ] && pass "every TPM blob is 0600" || failed "TPM blob modes: $modes"
ls "$DATA"/tpm/signing-*.pub >/dev/null 2>&1 && [ -f "$DATA/tpm/data-key-secret.pub" ] && pass "signing key and sealed secret blobs exist" || failed "blobs missing: $(ls "$DATA/tpm")"
OUT=$(cat "$CONF")
expect_in "^uri = [\"']tpm2:$TCTI[\"']" "config has the tpm2 URI"
expect_in "^key_dir = [\"']$DATA/tpm[\"']" "config has key_dir"
expect_in "^seal_pcrs = [\"']7[\"']" "config has seal_pcrs"
expect_in '^counter_nv_index = [0-9]+' "config has counter_nv_index"
expect_not_in '^pin_' "no PIN for a TPM"
OUT=$(tpm2_getcap handles-transient 2>&1)
expect_not_in "0x80" "init left no transient object in the TPM"

say "== the daemon on the TPM"
sed -i "s/^admin_group = .*/admin_group = 'daemon'/; s/^auditor_group = .*/auditor_group = 'nogroup'/" "$CONF"
start_daemon "$CONF"
export MEDGATE_SOCKET=$SOCK
expect_rc 0 "status" -- "$MEDCTL" status
expect_in "key store +tpm2:$TCTI" "status shows the tpm2 key store"
expect_rc 0 "sign-head signs with the TPM key" -- "$MEDCTL" ledger sign-head
expect_rc 0 "ledger head checks the TPM's signature" -- "$MEDCTL" ledger head
expect_in "signature verifies" "head signature verifies"
expect_rc 0 "ledger verify" -- "$MEDCTL" ledger verify
expect_rc 0 "keys show" -- "$MEDCTL" keys show
if [ "$(sed -n '/BEGIN PUBLIC KEY/,/END PUBLIC KEY/p' <<<"$OUT")" = "$(cat "$DATA/signing-key.pem" | sed -n '/BEGIN PUBLIC KEY/,/END PUBLIC KEY/p')" ]; then
  pass "keys show matches DIR/signing-key.pem"
else
  failed "keys show differs from DIR/signing-key.pem"
fi

say "== the TPM restarts under the running daemon"
stop_swtpm
"$MEDCTL" ledger sign-head >/dev/null 2>&1 && failed "a head was signed without the TPM" || pass "no head is signed while the TPM is gone"
expect_rc 0 "status while the TPM is gone" -- "$MEDCTL" status
expect_in "health +DEGRADED" "the first line says so"
expect_in "head signing fails" "and why"
# The daemon's monitor logs the failure within a few seconds; status then shows the line.
for _ in $(seq 1 100); do "$MEDCTL" status 2>/dev/null | grep -q "ledger.sign cannot sign heads" && break; sleep 0.1; done
expect_rc 0 "status a moment later" -- "$MEDCTL" status
expect_in "recent +warnings and errors" "lists the recent log lines"
expect_in "[0-9:]{8} ledger.sign cannot sign heads" "with their time and message id"
start_swtpm "$TPM_PORT"
expect_rc 0 "sign-head after the TPM restarted" -- "$MEDCTL" ledger sign-head
expect_rc 0 "status" -- "$MEDCTL" status
expect_in "health +ok" "healthy again"
expect_in "[1-9] reconnects" "status counts the reconnect"
expect_rc 0 "ledger verify" -- "$MEDCTL" ledger verify
expect_in "verifies: " "still verifies"
stop_daemon
expect_rc 0 "offline verify against the TPM's public key" -- "$MEDCTL" ledger verify --db "$DATA/ledger.db" --trust "$DATA/signing-key.pem"

say "== refusals"
stop_swtpm
expect_rc 3 "medgated does not start without its TPM (exit 3)" -- "$MEDGATED" --config "$CONF"
expect_in "$TCTI" "and names the TPM"
start_swtpm "$TPM_PORT"
expect_rc 0 "PCR 7 extended (a changed boot state)" -- tpm2_pcrextend 7:sha256=0badc0de0badc0de0badc0de0badc0de0badc0de0badc0de0badc0de0badc0de
expect_rc 1 "medgated refuses to start when PCR 7 changed" -- "$MEDGATED" --config "$CONF"
expect_in "PCR 7 no longer matches" "and says why"

finish
