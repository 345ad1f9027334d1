#!/usr/bin/env bash
# What an installer and an admin do: medctl init on a fresh SoftHSM token, start medgated, use
# medctl as root, as an admin-group member, as an auditor and as nobody in particular; feed the
# admin socket garbage; stop, restart, verify; and every way the daemon must refuse to start.
source "$(dirname "$0")/lib.sh" "$1"

DATA=$WORK/data
RUN=$WORK/run
mkdir -p "$RUN"
chmod 755 "$RUN"
SOCK=$RUN/admin.sock

say "== init"
expect_rc 0 "medctl init makes a token, a key, a ledger and a config" -- \
  "$MEDCTL" init --data-dir "$DATA" --ledger-id ward-7 --socket "$SOCK"
expect_in "Created ledger 'ward-7'" "init says what it made"
CONF=$DATA/medgated.toml
[ -f "$CONF" ] && [ -f "$DATA/signing-key.pem" ] && [ -f "$DATA/ledger.db" ] && pass "config, public key and ledger exist" || failed "init left files missing"
[ "$(stat -c %a "$DATA/hsm-pin")" = 600 ] && pass "PIN file is 0600" || failed "PIN file mode is $(stat -c %a "$DATA/hsm-pin")"
if grep -q "$(cat "$DATA/hsm-pin")" "$CONF"; then failed "the PIN is in the config"; else pass "the PIN is not in the config"; fi
expect_rc 2 "init refuses a data dir that already holds a ledger" -- "$MEDCTL" init --data-dir "$DATA" --ledger-id ward-7
expect_in "already holds a ledger" "and says so"
expect_rc 2 "init refuses an unknown key store" -- "$MEDCTL" init --data-dir "$WORK/other" --key-store floppy
expect_rc 3 "init with a TPM that is not there is an unreachable part" -- "$MEDCTL" init --data-dir "$WORK/other2" --key-store tpm2:device:/nonexistent/tpmrm0
expect_in "device:/nonexistent/tpmrm0" "and names the TCTI"

# Roles come from groups: 'daemon' plays medgate-admin, 'nogroup' plays medgate-audit.
sed -i "s/^admin_group = .*/admin_group = 'daemon'/; s/^auditor_group = .*/auditor_group = 'nogroup'/" "$CONF"

say "== start and use as root"
start_daemon "$CONF"
expect_rc 0 "status" -- "$MEDCTL" --config "$CONF" status
expect_in "ledger +'ward-7': 1 entries" "status shows the ledger"
expect_in "you +user:root \(admin\)" "status shows the caller's role"
expect_rc 0 "status --json" -- "$MEDCTL" --config "$CONF" --json status
expect_in '"entries": 1' "JSON status"
export MEDGATE_SOCKET=$SOCK
expect_rc 0 "MEDGATE_SOCKET finds the daemon" -- "$MEDCTL" status
expect_rc 0 "sign-head records the request and signs" -- "$MEDCTL" ledger sign-head
expect_in "the request is entry 1" "sign-head names its entry"
expect_rc 0 "ledger head checks the signature" -- "$MEDCTL" ledger head
expect_in "signature verifies" "head signature checked by medctl"
expect_rc 0 "show the recorded admin action" -- "$MEDCTL" --json ledger show --entry 1
expect_in '"actor": "user:root"' "who"
expect_in '"op": "ledger.sign_head"' "what"
expect_in '"time": "20' "when"
expect_rc 0 "show a block" -- "$MEDCTL" ledger show --block 1
expect_rc 2 "show a missing entry" -- "$MEDCTL" ledger show --entry 999
expect_in "entry 999 does not exist" "names the missing entry"
expect_rc 2 "show needs exactly one of --entry/--block" -- "$MEDCTL" ledger show
expect_rc 0 "inclusion proof, checked by medctl against the signed head" -- "$MEDCTL" ledger proof --entry 0
expect_in "whose signature verifies" "proof verified"
expect_rc 2 "a proof beyond the tree" -- "$MEDCTL" ledger proof --entry 0 --size 50
expect_rc 0 "consistency proof" -- "$MEDCTL" ledger consistency --from 1
expect_in "extends the earlier one" "consistency verified"
expect_rc 0 "keys show" -- "$MEDCTL" keys show
expect_in "BEGIN PUBLIC KEY" "PEM shown"
expect_rc 0 "online verify" -- "$MEDCTL" ledger verify
expect_in "verifies: 2 entries" "online verify counts entries"
expect_rc 2 "an unknown command is bad usage" -- "$MEDCTL" ledger frobnicate

say "== roles"
expect_rc 0 "an admin-group member may change state" -- as_user daemon "$MEDCTL" ledger sign-head
expect_rc 0 "and is recorded by name" -- "$MEDCTL" --json ledger show --entry 2
expect_in '"actor": "user:daemon"' "actor is the admin-group member"
expect_rc 0 "an auditor may read status" -- as_user nobody "$MEDCTL" status
expect_in "user:nobody \(auditor\)" "auditor role shown"
expect_rc 0 "an auditor may verify" -- as_user nobody "$MEDCTL" ledger verify
expect_rc 1 "an auditor may not change state" -- as_user nobody "$MEDCTL" ledger sign-head
expect_in "needs the admin role" "says why"
expect_rc 1 "anyone else cannot even connect" -- as_user bin "$MEDCTL" status
expect_in "permission denied on .*admin.sock" "medctl says permission denied"
chmod 666 "$SOCK"
expect_rc 1 "with the socket opened up, the daemon itself refuses anyone else" -- as_user bin "$MEDCTL" status
expect_in "may not use medgate" "daemon names the refusal"
chmod 660 "$SOCK"
[ "$(stat -c %a "$SOCK")" = 660 ] && pass "socket mode 0660" || failed "socket mode $(stat -c %a "$SOCK")"
getfacl -p "$SOCK" 2>/dev/null | grep -q '^group:nogroup:rw-' && pass "auditor group has an ACL entry" || failed "no ACL entry for the auditor group"

say "== bad requests: each gets an error, the daemon survives"
set +o pipefail  # the generators below die of SIGPIPE when the daemon hangs up: that is fine
OUT=$(printf 'this is not json\n' | raw_request "$SOCK"); expect_in '"invalid_argument".*not valid JSON' "garbage"
OUT=$(printf '{"v":1,"op":"no.such"}\n' | raw_request "$SOCK"); expect_in "unknown operation 'no.such'" "unknown op"
OUT=$(printf '{"v":99,"op":"status"}\n' | raw_request "$SOCK"); expect_in "protocol version" "wrong version"
OUT=$(printf '[1,2,3]\n' | raw_request "$SOCK"); expect_in "must be a JSON object" "not an object"
OUT=$(printf '{"v":1,"op":"ledger.entry","args":{"index":"seven"}}\n' | raw_request "$SOCK"); expect_in "non-negative integer" "wrong argument type"
OUT=$(printf '{"v":1,"op":"ledger.entry","args":{"index":-1}}\n' | raw_request "$SOCK"); expect_in "non-negative integer" "negative index"
OUT=$(head -c 2000000 /dev/zero | tr '\0' 'x' | raw_request "$SOCK"); expect_in "exceeds the limit of 1048576 bytes" "oversized request"
OUT=$( (printf '{"v":1,"op":"ledger.sign_head","args":'; head -c 600000 /dev/zero | tr '\0' '['; printf '\n') | raw_request "$SOCK"); expect_in '"ok":false' "deeply nested JSON"
OUT=$( (printf '{"v":1,"op":"ledger.sign_head","args":{"a":'; for _ in $(seq 1 40); do printf '['; done; for _ in $(seq 1 40); do printf ']'; done; printf '}}\n') | raw_request "$SOCK"); expect_in "nested too deeply" "arguments too deep to record"
OUT=$(printf '{"v":1,"op":"ledger.sign_head","args":{"x":1.5}}\n' | raw_request "$SOCK"); expect_in "fractional" "fractional argument refused"
OUT=$(printf '\x00\xff\xfe\n{"v":1,"op":"status"}\n' | raw_request "$SOCK"); expect_in '"ok":true' "a bad line does not end the connection"
set -o pipefail
expect_rc 0 "the daemon is still up after all that" -- "$MEDCTL" status
expect_in "errors" "status counts errors"

say "== stop, restart, verify"
ENTRIES_BEFORE=$("$MEDCTL" --json status | grep -o '"entries": [0-9]*' | head -1 | grep -o '[0-9]*')
stop_daemon
grep -q '<6>daemon.exit: stopped cleanly' "$WORK/medgated.log" && pass "log has journald priorities and message ids" || failed "log format"
expect_rc 3 "medctl says the daemon is unreachable (exit 3)" -- "$MEDCTL" status
expect_in "cannot reach medgated" "unreachable message"
expect_rc 0 "offline verify with the public key" -- "$MEDCTL" ledger verify --db "$DATA/ledger.db" --trust "$DATA/signing-key.pem"
expect_rc 2 "offline verify without --trust is bad usage" -- "$MEDCTL" ledger verify --db "$DATA/ledger.db"
start_daemon "$CONF"
expect_rc 0 "restarted daemon has every entry" -- "$MEDCTL" --json status
expect_in "\"entries\": $ENTRIES_BEFORE" "same entry count after restart"

say "== refusals to start"
expect_rc 1 "a second medgated on the same data dir is refused" -- "$MEDGATED" --config "$CONF"
expect_in "in use by (process $DAEMON_PID|another running medgated)" "names the holder"
stop_daemon

cp "$CONF" "$WORK/bad.toml"
printf '\n[ledger\n' >>"$WORK/bad.toml"
expect_rc 2 "broken TOML" -- "$MEDGATED" --config "$WORK/bad.toml"
expect_in "bad.toml:[0-9]+" "names file and line"
sed "s/^head_interval_ms/head_intervall_ms/" "$CONF" >"$WORK/typo.toml"
expect_rc 2 "an unknown key (typo)" -- "$MEDGATED" --config "$WORK/typo.toml"
expect_in "typo.toml:[0-9]+: unknown key 'head_intervall_ms' in \[ledger\]" "names the key"
sed "s/^head_interval_ms = .*/head_interval_ms = 'soon'/" "$CONF" >"$WORK/type.toml"
expect_rc 2 "a value of the wrong type" -- "$MEDGATED" --config "$WORK/type.toml"
expect_in "must be an integer" "names the type"
expect_rc 2 "a missing config file" -- "$MEDGATED" --config "$WORK/nope.toml"
sed "s/^id = .*/id = 'other-ward'/" "$CONF" >"$WORK/id.toml"
expect_rc 1 "a ledger id that does not match the ledger" -- "$MEDGATED" --config "$WORK/id.toml"
expect_in "names 'other-ward'" "names both ids"
sed "s|^uri = .*|uri = 'pkcs11:token=missing;object=medgate-signing?module-path=/usr/lib/softhsm/libsofthsm2.so'|" "$CONF" >"$WORK/token.toml"
expect_rc 3 "a missing token (exit 3: unreachable)" -- "$MEDGATED" --config "$WORK/token.toml"
expect_in "no token matching" "names the token"
cp "$DATA/hsm-pin" "$WORK/pin.good"
printf 'wrong-pin-123456\n' >"$DATA/hsm-pin"
expect_rc 1 "a wrong PIN" -- "$MEDGATED" --config "$CONF"
expect_in "wrong PIN" "says wrong PIN"
expect_not_in "wrong-pin-123456|$(cat "$WORK/pin.good")" "the PIN is not in the message"
cp "$WORK/pin.good" "$DATA/hsm-pin"
chmod 644 "$DATA/hsm-pin"
expect_rc 1 "a PIN file others can read" -- "$MEDGATED" --config "$CONF"
expect_in "chmod 600" "says how to fix it"
chmod 600 "$DATA/hsm-pin"
cp "$DATA/ledger.db" "$WORK/ledger.db.orig"
sqlite3 "$DATA/ledger.db" "UPDATE heads SET signature = X'3006020101020101' WHERE seq = (SELECT max(seq) FROM heads)"
expect_rc 1 "a ledger whose latest head does not verify" -- "$MEDGATED" --config "$CONF"
expect_in "latest signed head #[0-9]+: its signature does not verify" "names the head"
cp "$WORK/ledger.db.orig" "$DATA/ledger.db"
start_daemon "$CONF"
pass "starts again once the ledger is restored"
stop_daemon

say "== init from an existing config (the Debian package's way)"
# The packaged /etc/medgate/medgated.toml, moved into the test's directory; the data dir belongs to
# the daemon's user (tmpfiles.d makes /var/lib/medgate medgate:medgate; 'daemon' plays medgate).
PKG=$WORK/pkg
unset MEDGATE_SOCKET
mkdir -p "$PKG/etc" "$PKG/data" "$PKG/run" "$PKG/cred"
chown daemon:daemon "$PKG/data" "$PKG/run"
chmod 750 "$PKG/data"
chmod 755 "$PKG" "$PKG/etc"
sed -e "s|/var/lib/medgate|$PKG/data|g" -e "s|/run/medgate|$PKG/run|g" \
  "$(dirname "$0")/../../systemd/medgated.toml" >"$PKG/etc/medgated.toml"
chmod 644 "$PKG/etc/medgated.toml"
sum=$(sha256sum <"$PKG/etc/medgated.toml")
expect_rc 3 "the packaged config parses; before init the token is missing (exit 3, not 2)" -- \
  "$MEDGATED" --config "$PKG/etc/medgated.toml"
expect_rc 2 "init with the config refuses another ledger id" -- \
  "$MEDCTL" --config "$PKG/etc/medgated.toml" init --ledger-id ward-9
expect_in "names the ledger 'medgate' \\(\\[ledger\\] id\\)" "and names the line to change"
expect_rc 2 "init with the config refuses --key-store" -- \
  "$MEDCTL" --config "$PKG/etc/medgated.toml" init --key-store tpm2
expect_rc 2 "init with --data-dir refuses to overwrite an existing config" -- \
  "$MEDCTL" --config "$PKG/etc/medgated.toml" init --data-dir "$PKG/data"
expect_in "without --data-dir" "and says how to use it instead"
expect_rc 0 "medctl init makes what the config describes" -- "$MEDCTL" --config "$PKG/etc/medgated.toml" init
expect_in "used as it is" "init says it used the config as it is"
[ "$(sha256sum <"$PKG/etc/medgated.toml")" = "$sum" ] && pass "the config is unchanged" || failed "init changed the config"
[ "$(stat -c '%a %U' "$PKG/etc/hsm-pin")" = "600 root" ] && pass "the PIN is next to the config, 0600 root (LoadCredential's source)" \
  || failed "PIN file: $(stat -c '%a %U' "$PKG/etc/hsm-pin" 2>&1)"
if find "$PKG/data" ! -user daemon | grep -q .; then failed "init left files in the data dir that daemon does not own: $(find "$PKG/data" ! -user daemon)"
else pass "everything init made in the data dir belongs to the data dir's owner"; fi
expect_rc 2 "init again refuses: the ledger exists" -- "$MEDCTL" --config "$PKG/etc/medgated.toml" init
# As systemd would run it: the daemon's user, the PIN as a credential only it can read.
cp "$PKG/etc/hsm-pin" "$PKG/cred/hsm-pin"
chown daemon "$PKG/cred/hsm-pin"
chmod 400 "$PKG/cred/hsm-pin"
CREDENTIALS_DIRECTORY=$PKG/cred setpriv --reuid=daemon --regid=daemon --clear-groups --inh-caps=-all -- \
  "$MEDGATED" --config "$PKG/etc/medgated.toml" >>"$WORK/pkg-medgated.log" 2>&1 &
DAEMON_PID=$!
for _ in $(seq 1 100); do "$MEDCTL" --config "$PKG/etc/medgated.toml" status >/dev/null 2>&1 && break; sleep 0.1; done
expect_rc 0 "medgated runs as the data dir's owner with the PIN credential" -- "$MEDCTL" --config "$PKG/etc/medgated.toml" status
expect_in "ledger +'medgate': 1 entries" "status shows the packaged ledger"
stop_daemon

finish
