#!/usr/bin/env bash
# The replicated ledger with real processes on loopback (docs/replication.md): a 3-member etcd
# cluster and three medgated appliances (a, b, c), each with its own data dir and SoftHSM token.
# a founds the cluster (`medctl cluster init`), b and c join (`medctl init --join`) and are added
# by the members (`medctl member propose add`, `member approve`); HL7 readings are ingested at all
# three at once and every replica converges to the same root and verifies offline trusting only
# a's key. Then: kill -9 of one appliance and one etcd member under load (nothing acknowledged is
# lost, all converge); c cut off from etcd (its proxy stopped) keeps ingesting, queues, and catches
# up in order when the proxy returns; records written straight into etcd with etcdctl (garbage, and
# a member's valid block replayed at the next height) are voided by every replica, reported, and
# replaced; a record rewritten below the members' tips is reported and put back; bad compaction
# intervals in cluster.json are refused and a member set to compact every second does; a device
# added at one member is accepted at the others, and revoked at one it is refused at the others
# (the time is printed; the issue asks for 1 s). Shared keys: a seals the cluster's secret to b
# and c (key-share entries), all three name patients alike, so a consent granted at a permits a
# read at b and its revocation at a denies it at b and c.
#
#   cluster_test.sh BIN_DIR
source "$(dirname "$0")/lib.sh" "$1"
source "$(dirname "$0")/lib_etcd.sh"
MLLP_SEND=$BIN_SRC/medgate-mllp-send
mkdir -p "$WORK/run"
chmod 755 "$WORK/run"
declare -A PID CONF SOCKP HL7 LOG COAP
PROXY_PID=

cluster_cleanup() {
  for m in a b c; do
    if [ -n "${PID[$m]:-}" ]; then kill -9 "${PID[$m]}" 2>/dev/null || true; fi
  done
  if [ -n "$PROXY_PID" ]; then kill -9 -- "-$PROXY_PID" 2>/dev/null || true; fi
}
trap 'cluster_cleanup; stop_etcd_cluster; cleanup' EXIT

start_etcd_cluster 3 "$WORK"
pass "a 3-member etcd cluster is up"

# c reaches etcd only through this proxy (a TCP forwarder to etcd member 2), so that cutting c
# off is stopping the proxy.
PROXY_PORT=$(etcd_free_port "${ETCD_CLIENT_PORTS[@]}" "${ETCD_PEER_PORTS[@]}")
start_proxy() {
  # Its own process group: stopping it must also end the connections its children forward.
  setsid socat "TCP-LISTEN:$PROXY_PORT,bind=127.0.0.1,reuseaddr,fork" "TCP:127.0.0.1:${ETCD_CLIENT_PORTS[2]}" &
  PROXY_PID=$!
  for _ in $(seq 1 50); do port_in_use "$PROXY_PORT" && return 0; sleep 0.1; done
  say "the proxy did not start"
  return 1
}
stop_proxy() {
  kill -9 -- "-$PROXY_PID" 2>/dev/null || true
  wait "$PROXY_PID" 2>/dev/null || true
  PROXY_PID=
}
start_proxy

make_config() {
  local m=$1
  CONF[$m]=$WORK/$m/medgated.toml
  SOCKP[$m]=$WORK/run/$m.sock
  LOG[$m]=$WORK/$m.log
  sed -i "s/^admin_group = .*/admin_group = 'daemon'/; s/^auditor_group = .*/auditor_group = 'nogroup'/" "${CONF[$m]}"
  printf '\n[hl7]\naddress = "127.0.0.1"\nport = 0\nread_timeout_s = 5\n' >>"${CONF[$m]}"
  COAP[$m]=$(etcd_free_port "${ETCD_CLIENT_PORTS[@]}" "${ETCD_PEER_PORTS[@]}")
  printf '\n[coap]\naddress = "127.0.0.1"\nport = %s\n' "${COAP[$m]}" >>"${CONF[$m]}"
}
start_member() {
  local m=$1
  "$MEDGATED" --config "${CONF[$m]}" >>"${LOG[$m]}" 2>&1 &
  PID[$m]=$!
  for _ in $(seq 1 100); do
    if "$MEDCTL" --config "${CONF[$m]}" status >/dev/null 2>&1; then
      HL7[$m]=$("$MEDCTL" --config "${CONF[$m]}" --json status | python3 -c 'import json,sys; print(json.load(sys.stdin)["ingest"]["hl7"]["port"])')
      return 0
    fi
    if ! kill -0 "${PID[$m]}" 2>/dev/null; then say "medgated $m exited early:"; tail -20 "${LOG[$m]}"; return 1; fi
    sleep 0.1
  done
  say "medgated $m did not answer"
  return 1
}
ctl() { local m=$1; shift; "$MEDCTL" --config "${CONF[$m]}" "$@"; }
stop_member() { kill -TERM "${PID[$1]}"; wait "${PID[$1]}" || true; PID[$1]=; }
status_field() { ctl "$1" --json status | python3 -c "import json,sys; s=json.load(sys.stdin); print($2)"; }

say "== a founds the cluster"
"$MEDCTL" init --data-dir "$WORK/a" --ledger-id ward --socket "$WORK/run/a.sock" >/dev/null
make_config a
METRICS_PORT=$(etcd_free_port "${ETCD_CLIENT_PORTS[@]}" "${ETCD_PEER_PORTS[@]}" "$PROXY_PORT")
printf '\n[metrics]\nlisten = "127.0.0.1:%s"\n' "$METRICS_PORT" >>"${CONF[a]}"
start_member a
ctl a device add central-a --kind hl7 --hl7-app CENTRAL-A >/dev/null
expect_rc 2 "cluster status on a single box: not a cluster yet" -- ctl a cluster status
# Bad input to cluster init: each named, nothing changed.
expect_rc 2 "cluster init with a bad member id" -- ctl a cluster init --etcd "$ETCD_ENDPOINTS" --member-id 'a b' --endpoint 127.0.0.1:7001
expect_in "member id \"a b\" is not" "names the id"
expect_rc 2 "cluster init with an endpoint that is not host:port" -- ctl a cluster init --etcd "$ETCD_ENDPOINTS" --member-id a --endpoint 'no port'
expect_in "endpoint" "names the endpoint"
expect_rc 2 "cluster init with a URL that is not http(s)" -- ctl a cluster init --etcd ftp://127.0.0.1:1 --member-id a --endpoint 127.0.0.1:7001
expect_rc 3 "cluster init with etcd unreachable" -- ctl a cluster init --etcd "http://127.0.0.1:$(etcd_free_port)" --member-id a --endpoint 127.0.0.1:7001
expect_in "127.0.0.1" "names the endpoint it tried"
OUT=$(printf '%s\n' '{"v":1,"op":"cluster.init","args":{"etcd":"http://x","member_id":"a","endpoint":"h:1"}}' '{"v":1,"op":"member.propose","args":{"action":"add"}}' | raw_request "${SOCKP[a]}")
expect_in '"code":"invalid_argument".*etcd.*list' "a raw cluster.init with etcd not a list: invalid argument"
expect_in 'not replicated' "member.propose on a single box is refused"
OUT=$(printf '%s\n' '{"v":1,"op":"cluster.init","args":{"etcd":["http://127.0.0.1:1"],"member_id":"a","endpoint":"h:1","prefix":5}}' | raw_request "${SOCKP[a]}")
expect_in '"code":"invalid_argument".*\\"prefix\\" must be a text' "a prefix that is not text is named"
[ ! -e "$WORK/a/cluster.json" ] && pass "no cluster settings were written by the refused calls" || failed "cluster.json written"
# A box that already named patients with its own pseudonym key cannot found a cluster.
"$MEDCTL" init --data-dir "$WORK/z" --ledger-id zed --socket "$WORK/run/z.sock" >/dev/null
make_config z
start_member z
printf '%s\n' "HOSP:Z-1" | ctl z device add pump-z --kind coap --patient - --psk-out "$WORK/pump-z.psk" >/dev/null
expect_rc 2 "cluster init on a box that has patients is refused" -- ctl z cluster init --etcd "$ETCD_ENDPOINTS" --member-id z --endpoint 127.0.0.1:7009 --prefix /medgate/zed/
expect_in "holds 1 patient record\(s\) whose pseudonyms were made with this key store's own key" "naming why"
[ -z "$(etcdctl_cluster get --prefix --keys-only /medgate/zed/)" ] && pass "and nothing was published" || failed "z published to etcd"
stop_member z
expect_rc 0 "medctl cluster init" -- ctl a cluster init --etcd "$ETCD_ENDPOINTS" --member-id a --endpoint 127.0.0.1:7001
expect_in '"?a"? +127.0.0.1:7001' "a is the first member"
expect_rc 2 "a second cluster init is refused" -- ctl a cluster init --etcd "$ETCD_ENDPOINTS" --member-id a --endpoint 127.0.0.1:7001
expect_in "replicated already" "naming why"
[ -n "$(etcdctl_cluster get --prefix --keys-only /medgate/ward/blocks/ | head -1)" ] && pass "a published its history to etcd" || failed "no blocks in etcd"

say "== b and c join"
expect_rc 0 "medctl init --join (b)" -- "$MEDCTL" init --data-dir "$WORK/b" --ledger-id ward --socket "$WORK/run/b.sock" \
  --join "$ETCD_ENDPOINTS" --member-id b --endpoint 127.0.0.1:7002 --trust "$WORK/a/signing-key.pem"
expect_in "Joined ledger 'ward'" "b joined"
expect_rc 1 "joining trusting the wrong key is refused" -- "$MEDCTL" init --data-dir "$WORK/x" --ledger-id ward --socket "$WORK/run/x.sock" \
  --join "$ETCD_ENDPOINTS" --member-id x --endpoint 127.0.0.1:7009 --trust "$WORK/b/signing-key.pem"
expect_in "does not verify with the trusted founder's key" "naming the signature"
expect_rc 2 "joining a ledger etcd does not hold" -- "$MEDCTL" init --data-dir "$WORK/y" --ledger-id nosuch --socket "$WORK/run/y.sock" \
  --join "$ETCD_ENDPOINTS" --member-id y --endpoint 127.0.0.1:7009 --trust "$WORK/a/signing-key.pem"
expect_in "holds no ledger under /medgate/nosuch/" "naming the prefix"
make_config b
start_member b
printf 'not a key\n' >"$WORK/bad.pem"
expect_rc 2 "member propose add with a file that is not a public key" -- ctl a member propose add b --key "$WORK/bad.pem" --endpoint 127.0.0.1:7002
expect_in "not a P-256 public key" "names the problem"
expect_rc 2 "member approve of no open proposal" -- ctl a member approve nosuch
expect_in "no open proposal" "names the problem"
expect_rc 1 "member remove of the last member is refused" -- ctl a member remove a
expect_in "last" "naming the rule"
expect_rc 2 "member propose add with an agreement key that is not a key" -- ctl a member propose add b --key "$WORK/b/signing-key.pem" --agreement-key "$WORK/bad.pem" --endpoint 127.0.0.1:7002
expect_in "agreement_key.*not a P-256 public key" "names the argument"
expect_rc 2 "member propose add with the signing key as agreement key" -- ctl a member propose add b --key "$WORK/b/signing-key.pem" --agreement-key "$WORK/b/signing-key.pem" --endpoint 127.0.0.1:7002
expect_in "agreement key is the signing key" "names the mix-up"
[ -s "$WORK/b/agreement-key.pem" ] && pass "init --join wrote b's agreement key" || failed "no agreement-key.pem"
expect_rc 0 "a adds b" -- ctl a member propose add b --key "$WORK/b/signing-key.pem" --agreement-key "$WORK/b/agreement-key.pem" --endpoint 127.0.0.1:7002
expect_in "it took effect" "a majority of one"

"$MEDCTL" init --data-dir "$WORK/c" --ledger-id ward --socket "$WORK/run/c.sock" \
  --join "http://127.0.0.1:$PROXY_PORT" --member-id c --endpoint 127.0.0.1:7003 --trust "$WORK/a/signing-key.pem" >/dev/null
make_config c
start_member c
expect_rc 0 "a proposes adding c" -- ctl a member propose add c --key "$WORK/c/signing-key.pem" --agreement-key "$WORK/c/agreement-key.pem" --endpoint 127.0.0.1:7003
expect_in "takes effect once a majority" "it needs b too"
expect_rc 1 "a cannot approve its own proposal again" -- ctl a member approve c
for _ in $(seq 1 50); do ctl b member list | grep -q "add c" && break; sleep 0.1; done
expect_rc 0 "b approves" -- ctl b member approve c
expect_in "epoch 3" "the change took effect at b, which wrote the deciding approval"
for _ in $(seq 1 50); do ctl c member list | grep -q "epoch 3" && break; sleep 0.1; done
expect_rc 0 "member list at c" -- ctl c member list
expect_in "epoch 3" "three changes so far"
expect_in "c +127.0.0.1:7003" "c is a member"
expect_in "c +127.0.0.1:7003  key [0-9a-f]{16}…  agreement key [0-9a-f]{16}…" "with its key-agreement key"
expect_rc 1 "an auditor cannot propose" -- as_user nobody "$MEDCTL" --socket "${SOCKP[a]}" member remove b

say "== the cluster's shared key reaches b and c"
shared_key() { status_field "$1" 's["cluster"]["shared_key"]'; }
KEY_A=$(shared_key a)
[[ "$KEY_A" =~ ^[0-9a-f]{16}$ ]] && pass "a holds the shared key it made at cluster init ($KEY_A)" || failed "a has no shared key: $KEY_A"
for m in b c; do
  for _ in $(seq 1 100); do [ "$(shared_key $m)" = "$KEY_A" ] && break; sleep 0.1; done
  [ "$(shared_key $m)" = "$KEY_A" ] && pass "$m received the same shared key" || failed "$m has shared key $(shared_key $m)"
done
expect_rc 0 "status at b" -- ctl b status
expect_in "shared key $KEY_A" "status shows the shared key's id"
SHARES=$(sqlite3 "$WORK/a/ledger.db" "SELECT count(*) FROM entries WHERE type = 17")
[ "$SHARES" -ge 3 ] && pass "the ledger holds a key share for each member ($SHARES)" || failed "$SHARES key shares"
if sqlite3 "$WORK/a/vault.db" "SELECT hex(wrapped) FROM cluster_secret" | grep -q .; then pass "the secret is kept wrapped in the vault"; else failed "no wrapped secret in a's vault"; fi

for m in b c; do ctl $m device add central-$m --kind hl7 --hl7-app CENTRAL-${m^^} >/dev/null; done

# send MEMBER FIRST COUNT: HL7 ORU messages to MEMBER; prints how many were acknowledged AA.
send() {
  local m=$1 first=$2 n=$3
  local f=$WORK/msgs-$m-$first.hl7  # a line of its own: `local` expands before it assigns
  : >"$f"
  for i in $(seq "$first" $((first + n - 1))); do
    printf 'MSH|^~\\&|CENTRAL-%s|ICU|MEDGATE|HOSP|20261125120000||ORU^R01^ORU_R01|%s-%s|P|2.6\rPID|1||P%s^^^HOSP^MR\rOBR|1||||||20261125115900\rOBX|1|NM|150456^MDC_PULS_OXIM_SAT_O2^MDC||97|262688^MDC_DIM_PERCENT^MDC|||||F|||20261125115900\r\n\n' \
      "${m^^}" "$m" "$i" "$((i % 5))" >>"$f"
  done
  "$MLLP_SEND" --host 127.0.0.1 --port "${HL7[$m]}" --timeout-ms "${SEND_TIMEOUT_MS:-5000}" "$f" 2>/dev/null | grep -c ": AA " || true
}
observations() { sqlite3 "$WORK/$1/ledger.db" "SELECT count(*) FROM entries WHERE type = 6"; }
converged() {
  local ra rb rc qa qb qc
  ra=$(status_field a 's["ledger"]["root"]'); rb=$(status_field b 's["ledger"]["root"]'); rc=$(status_field c 's["ledger"]["root"]')
  qa=$(status_field a 's["cluster"]["queue"]["entries"]'); qb=$(status_field b 's["cluster"]["queue"]["entries"]'); qc=$(status_field c 's["cluster"]["queue"]["entries"]')
  [ "$ra" = "$rb" ] && [ "$rb" = "$rc" ] && [ "$qa$qb$qc" = 000 ]
}
wait_converged() {
  for _ in $(seq 1 300); do converged && return 0; sleep 0.1; done
  for m in a b c; do ctl $m cluster status | head -4; done
  return 1
}

say "== ingest at all three at once"
send a 1 40 >"$WORK/acked-a1" & S1=$!
send b 1 40 >"$WORK/acked-b1" & S2=$!
send c 1 40 >"$WORK/acked-c1" & S3=$!
wait $S1 $S2 $S3
ACKED=$(($(cat "$WORK/acked-a1") + $(cat "$WORK/acked-b1") + $(cat "$WORK/acked-c1")))
[ "$ACKED" = 120 ] && pass "every reading acknowledged (AA) at once, without waiting for the cluster" || failed "$ACKED of 120 acknowledged"
wait_converged && pass "the three replicas converge to the same root with empty queues" || failed "no convergence"
for m in a b c; do
  [ "$(observations $m)" = 120 ] && pass "replica $m holds all 120 readings once" || failed "replica $m holds $(observations $m)"
done
for m in a b c; do
  expect_rc 0 "replica $m verifies offline trusting only a's key" -- "$MEDCTL" ledger verify --db "$WORK/$m/ledger.db" --trust "$WORK/a/signing-key.pem"
done
expect_rc 0 "b's replica verifies trusting only c's key (the membership vouches for the rest)" -- "$MEDCTL" ledger verify --db "$WORK/b/ledger.db" --trust "$WORK/c/signing-key.pem"

sleep 1.2  # members report their heights at most once a second
expect_rc 0 "cluster status at a" -- ctl a cluster status
H=$(status_field a 's["ledger"]["height"]')
expect_in "b +height $H " "shows b's height as b reported it"
expect_in "c +height $H " "and c's"
M=$(curl -s "http://127.0.0.1:$METRICS_PORT/metrics")
grep -q '^medgate_replication_queue_entries 0$' <<<"$M" && grep -q '^medgate_replication_connected 1$' <<<"$M" \
  && pass "Prometheus: the replication queue (0) and etcd connected (1)" || failed "replication metrics missing: $(grep replication <<<"$M")"

say "== kill -9 of an appliance and an etcd member under load"
send a 100 60 >"$WORK/acked-a2" & S1=$!
send b 100 60 >"$WORK/acked-b2" & S2=$!
send c 100 60 >"$WORK/acked-c2" & S3=$!
sleep 0.3
kill -9 "${PID[b]}"; wait "${PID[b]}" 2>/dev/null || true
kill_etcd_member 0
pass "killed appliance b and etcd member 0 while readings arrive"
wait $S1 $S2 $S3 || true
sleep 0.5
restart_etcd_member 0
start_member b
B_ACK=$(cat "$WORK/acked-b2")
send b 200 10 >"$WORK/acked-b3"
ACKED2=$(($(cat "$WORK/acked-a2") + B_ACK + $(cat "$WORK/acked-c2") + $(cat "$WORK/acked-b3")))
wait_converged && pass "all converge after the restarts" || failed "no convergence after the restarts"
for m in a b c; do
  N=$(observations $m)
  [ "$N" -ge $((120 + ACKED2)) ] && pass "replica $m holds every acknowledged reading ($N >= $((120 + ACKED2)))" || failed "replica $m holds $N, $((120 + ACKED2)) were acknowledged"
done

say "== c cut off from etcd"
stop_proxy
C_BEFORE=$(observations c)
C_ACK=$(send c 300 20)
[ "$C_ACK" = 20 ] && pass "c keeps acknowledging while cut off" || failed "c acknowledged $C_ACK of 20 while cut off"
# An admin change at c waits for the cluster (and gives up after the order timeout, its entry
# queued); readings meanwhile are looked up and acknowledged without waiting for it.
ctl c device add cut-dev --kind hl7 --hl7-app CUTDEV >"$WORK/cut-dev.out" 2>&1 &
ADD_PID=$!
sleep 0.3
C_ACK2=$(SEND_TIMEOUT_MS=2000 send c 320 10)  # the add waits 5 s: a reading waiting with it would time out
[ "$C_ACK2" = 10 ] && pass "c acknowledges readings while an admin change waits for the cluster" || failed "c acknowledged $C_ACK2 of 10 beside a waiting admin change"
ADD_RC=0
wait "$ADD_PID" || ADD_RC=$?
[ "$ADD_RC" = 3 ] && grep -q "queued" "$WORK/cut-dev.out" && pass "the device add at c says it is queued (exit 3)" || { failed "device add at c: rc $ADD_RC"; cat "$WORK/cut-dev.out"; }
send a 300 10 >/dev/null
sleep 1
Q=$(status_field c 's["cluster"]["queue"]["entries"]')
[ "$Q" -ge 20 ] && pass "c queues its readings ($Q entries)" || failed "c's queue holds $Q"
for _ in $(seq 1 50); do ctl c status | grep -q "etcd NOT CONNECTED" && break; sleep 0.1; done
expect_rc 0 "medctl status at c" -- ctl c status
expect_in "etcd NOT CONNECTED" "says c is cut off"
expect_in "etcd does not answer: entries queue locally" "and says so among the health problems"
[ "$(observations c)" = "$C_BEFORE" ] && pass "nothing is ordered at c while it is cut off" || failed "c ordered entries while cut off"
start_proxy
wait_converged && pass "c catches up in order when etcd is back, and its queue is ordered" || failed "c did not catch up"
N=$(observations a)
[ "$N" = "$(observations c)" ] && [ "$N" -ge $((120 + ACKED2 + 40)) ] && pass "every reading, from both sides of the cut, is on every replica ($N)" || failed "a holds $N, c $(observations c)"
for _ in $(seq 1 50); do ctl a device list 2>/dev/null | grep -q cut-dev && break; sleep 0.1; done
ctl a device list | grep -q cut-dev && pass "the device added at c while cut off reaches a once c is back" || failed "cut-dev is not at a"

say "== records written straight into etcd"
H=$(status_field a 's["ledger"]["height"]')
NEXT=$(printf '%020d' $((H + 1)))
etcdctl_cluster put "/medgate/ward/blocks/$NEXT" "not a block record" >/dev/null
for _ in $(seq 1 50); do
  V=$(status_field b 's["cluster"]["ordering"]["invalid_blocks"]')
  [ "$V" -ge 1 ] && break
  sleep 0.1
done
for m in a b c; do
  V=$(status_field $m 's["cluster"]["ordering"]["invalid_blocks"]')
  [ "$V" -ge 1 ] && pass "replica $m voids the garbage record" || failed "replica $m did not report it"
done
grep -q "replication.invalid_block" "${LOG[b]}" && pass "and logs it (replication.invalid_block)" || failed "no log line"
[ "$(status_field a 's["ledger"]["height"]')" = "$H" ] && pass "nothing was applied" || failed "a moved on"
send b 400 5 >/dev/null
wait_converged && pass "the next member with entries replaces it and all go on" || failed "stuck at the void record"
H=$(status_field a 's["ledger"]["height"]')
etcdctl_cluster get --print-value-only "/medgate/ward/blocks/$(printf '%020d' "$H")" >"$WORK/replay.bin"
# etcdctl prints a trailing newline after the value.
head -c -1 "$WORK/replay.bin" >"$WORK/replay.rec"
etcdctl_cluster put "/medgate/ward/blocks/$(printf '%020d' $((H + 1)))" <"$WORK/replay.rec" >/dev/null
sleep 1
V=$(status_field c 's["cluster"]["ordering"]["last_invalid"]')
expect_rc 0 "status at c" -- ctl c cluster status
expect_in "void blocks|says it is block|does not chain" "a member's valid block replayed at the next height is voided, with the reason"
send c 500 3 >/dev/null
wait_converged && pass "and replaced" || failed "stuck after the replay"
for m in a b c; do
  expect_rc 0 "replica $m still verifies" -- "$MEDCTL" ledger verify --db "$WORK/$m/ledger.db" --trust "$WORK/a/signing-key.pem"
done

say "== a rewrite of history in etcd is put back"
OLD_KEY="/medgate/ward/blocks/$(printf '%020d' 3)"
etcdctl_cluster get --print-value-only "$OLD_KEY" >"$WORK/block3.before"
etcdctl_cluster put "$OLD_KEY" "a different history" >/dev/null
for _ in $(seq 1 50); do
  etcdctl_cluster get --print-value-only "$OLD_KEY" >"$WORK/block3.after"
  cmp -s "$WORK/block3.before" "$WORK/block3.after" && break
  sleep 0.1
done
cmp -s "$WORK/block3.before" "$WORK/block3.after" && pass "the members put block 3's applied record back" || failed "block 3 stays rewritten"
for m in a b c; do
  R=$(status_field $m 's["cluster"]["ordering"]["rewrites"]')
  [ "$R" -ge 1 ] && pass "replica $m reports the rewrite" || failed "replica $m did not report it ($R)"
done
grep -q "was replaced by a different one after this replica applied it" "${LOG[a]}" && pass "and logs it" || failed "no log line for the rewrite"

say "== devices follow the replicated ledger"
# send_app APP MEMBER ID: one ORU from sending application APP to MEMBER; prints the ACK code.
send_app() {
  printf 'MSH|^~\\&|%s|ICU|MEDGATE|HOSP|20261125120000||ORU^R01^ORU_R01|%s|P|2.6\rPID|1||P1^^^HOSP^MR\rOBR|1||||||20261125115900\rOBX|1|NM|150456^MDC_PULS_OXIM_SAT_O2^MDC||97|262688^MDC_DIM_PERCENT^MDC|||||F|||20261125115900\r' \
    "$1" "$3" >"$WORK/one-$3.hl7"
  "$MLLP_SEND" --host 127.0.0.1 --port "${HL7[$2]}" --timeout-ms 5000 "$WORK/one-$3.hl7" 2>/dev/null | sed -n 's/.*: \(A[AER]\) .*/\1/p' || true
}
[ "$(send_app CENTRAL-A b DEV1)" = AA ] && pass "b accepts a source registered at a" || failed "b refuses a's source"
[ "$(send_app CENTRAL-C a DEV2)" = AA ] && pass "a accepts a source registered at c" || failed "a refuses c's source"
expect_rc 0 "device list at b" -- ctl b device list
expect_in "central-a" "b's registry lists a's device"
expect_rc 0 "device revoke at a" -- ctl a device revoke central-a
T0=$(date +%s%N)
CODE=AA
for _ in $(seq 1 100); do
  CODE=$(send_app CENTRAL-A b "REV$RANDOM")
  [ "$CODE" = AE ] && break
  sleep 0.02
done
T1=$(date +%s%N)
MS=$(((T1 - T0) / 1000000))
[ "$CODE" = AE ] && pass "a device revoked at a is refused at b (AE) $MS ms after the revoke returned" || failed "b still accepts the revoked device ($CODE)"
say "     (measured, not judged: $MS ms from the revoke's return to the first AE at b; the issue asks for 1 s)"
[ "$(send_app CENTRAL-A c REV2)" = AE ] && pass "and at c" || failed "c still accepts it"
say "== a CoAP device added at a speaks DTLS-PSK to b (its PSK sealed for the members)"
# Checked, not left to `set -e`: a failure here once ended the run with no line saying why.
if ! ADD_OUT=$(printf '%s\n' "HOSP:CLUSTER-P9" |
  ctl a device add pump-a --kind coap --patient - --psk-out "$WORK/pump-a.psk" 2>&1); then
  failed "device add pump-a at a: $ADD_OUT"
  tail -n 20 "${LOG[a]}" | sed 's/^/     a: /'
fi
printf '[{"bn":"urn:dev:pump-a:","n":"rate","u":"ml/h","v":12.5}]' >"$WORK/senml.json"
coap_at() {  # coap_at MEMBER KEY -> the last response code
  coap-client-openssl -v 6 -B 5 -m post -t 110 -f "$WORK/senml.json" -u pump-a -k "$2" \
    "coaps://127.0.0.1:${COAP[$1]}/obs" 2>&1 | grep -o 'c:[0-9]\.[0-9][0-9]' | grep -v 'c:0.00' | tail -1
}
CODE=
for _ in $(seq 1 50); do CODE=$(coap_at b "$(cat "$WORK/pump-a.psk")"); [ "$CODE" = c:2.04 ] && break; sleep 0.1; done
[ "$CODE" = c:2.04 ] && pass "b accepts pump-a's reading with the PSK a made (2.04)" || failed "b answered '$CODE'"
if sqlite3 "$WORK/a/ledger.db" "SELECT hex(bytes) FROM entries WHERE type = 7" | grep -qi "$(od -An -tx1 "$WORK/pump-a.psk" | tr -d ' \n')"; then failed "the PSK is on the ledger in clear"; else pass "the PSK is not on the ledger in clear"; fi
ctl a device rotate-psk pump-a --psk-out "$WORK/pump-a.psk2" >/dev/null
CODE=
for _ in $(seq 1 50); do CODE=$(coap_at c "$(cat "$WORK/pump-a.psk2")"); [ "$CODE" = c:2.04 ] && break; sleep 0.1; done
[ "$CODE" = c:2.04 ] && pass "after rotate-psk at a, c accepts the new PSK" || failed "c answered '$CODE' to the new PSK"
[ -z "$(coap_at c "$(cat "$WORK/pump-a.psk")")" ] && pass "and no longer answers the old one" || failed "c still answers the old PSK"

say "== damaged cluster settings"
stop_member c
cp "$WORK/c/cluster.json" "$WORK/c/cluster.json.good"
printf '{"etcd": "not a list"' >"$WORK/c/cluster.json"
expect_rc 1 "medgated refuses to start with damaged cluster settings" -- "$MEDGATED" --config "${CONF[c]}"
expect_in "cluster.json: is not valid JSON" "naming the file and the problem"
printf '{"etcd": ["http://127.0.0.1:1"], "member_id": "other", "endpoint": "h:1", "prefix": "/medgate/ward/"}' >"$WORK/c/cluster.json"
expect_rc 1 "medgated refuses settings naming another member" -- "$MEDGATED" --config "${CONF[c]}"
expect_in "names member \"other\" but the ledger is member \"c\"" "naming both"
# The compaction interval (optional; docs/replication.md, "Size and compaction"): bad values are
# refused and named; c comes back compacting every second.
set_compaction() {
  python3 -c "import json,sys; s=json.load(open(sys.argv[1])); s['compaction_interval_s']=json.loads(sys.argv[2]); json.dump(s, open(sys.argv[3], 'w'))" \
    "$WORK/c/cluster.json.good" "$1" "$WORK/c/cluster.json"
}
set_compaction '"60"'
expect_rc 1 "medgated refuses a compaction interval that is not a number" -- "$MEDGATED" --config "${CONF[c]}"
expect_in "\"compaction_interval_s\" is not a whole number of seconds" "naming the field"
set_compaction '-1'
expect_rc 1 "medgated refuses a negative compaction interval" -- "$MEDGATED" --config "${CONF[c]}"
expect_in "compaction interval -1 s is not from 0 \\(never\\) to 86400 s" "naming the range"
set_compaction '86401'
expect_rc 1 "medgated refuses a compaction interval over a day" -- "$MEDGATED" --config "${CONF[c]}"
expect_in "compaction interval 86401 s is not from 0" "naming the value"
set_compaction '1'
chmod 600 "$WORK/c/cluster.json"
rm "$WORK/c/cluster.json.good"
start_member c
pass "c starts again with its settings back"
REV=0
for _ in $(seq 1 100); do
  REV=$(status_field c 's["cluster"]["ordering"]["compaction"]["revision"]' 2>/dev/null || echo 0)
  [ "${REV:-0}" -gt 0 ] && break
  ctl c status >/dev/null 2>&1 || true
  sleep 0.1
done
[ "${REV:-0}" -gt 0 ] && pass "c compacted etcd's history (to revision $REV)" || failed "c did not compact etcd's history (revision ${REV:-none})"
expect_rc 0 "cluster status at c" -- ctl c cluster status
expect_in "compaction +etcd history compacted to revision [0-9]+" "shows the compaction"

say "== consent rules follow the replicated ledger"
expect_rc 0 "rules deployed at a" -- ctl a rules deploy "$(dirname "$0")/../../docs/examples/base-policy.cedar"
for _ in $(seq 1 50); do ctl c rules list 2>/dev/null | grep -q "^version 1 " && break; sleep 0.1; done
expect_rc 0 "rules list at c" -- ctl c rules list
expect_in "^version 1 " "c decides with the version a deployed"
expect_rc 0 "rules deployed at c (version 2)" -- ctl c rules deploy "$(dirname "$0")/../../docs/examples/base-policy.cedar"
for _ in $(seq 1 50); do ctl a rules list 2>/dev/null | grep -q "^version 2 " && break; sleep 0.1; done
expect_rc 0 "rules list at a" -- ctl a rules list
expect_in "^version 2 " "a has c's version too"

say "== consent follows the replicated ledger: granted at a, revoked at a, decided at b"
expect_rc 0 "directory imported at a" -- ctl a directory import "$(dirname "$0")/../../docs/examples/directory.json"
for _ in $(seq 1 50); do ctl b directory show 2>/dev/null | grep -q dr-lee && break; sleep 0.1; done
PATIENT="HOSP:CLUSTER-P7"
# read_at MEMBER: prints dr-lee's read's exit code (0 allowed, 1 denied, anything else an error).
read_at() {
  local rc=0
  printf '%s\n' "$PATIENT" | ctl "$1" --json data read --as 'Practitioner::"dr-lee"' --patient - --purpose TREAT >/dev/null 2>&1 || rc=$?
  echo $rc
}
expect_rc 1 "before any grant dr-lee is denied at b" -- bash -c "printf '%s\n' '$PATIENT' | '$MEDCTL' --config '${CONF[b]}' --json data read --as 'Practitioner::\"dr-lee\"' --patient - --purpose TREAT"
expect_rc 0 "a grants dr-lee vitals for treatment" -- bash -c "printf '%s\n' '$PATIENT' | '$MEDCTL' --config '${CONF[a]}' consent grant --patient - --to 'Practitioner::\"dr-lee\"' --data vitals --purpose TREAT"
GRANT=$(head -1 <<<"$OUT")
ALLOWED=no
for _ in $(seq 1 50); do if [ "$(read_at b)" = 0 ]; then ALLOWED=yes; break; fi; sleep 0.1; done
[ $ALLOWED = yes ] && pass "the grant made at a permits dr-lee's read at b (same pseudonym at both)" || failed "b still denies after a's grant"
[ "$(read_at c)" = 0 ] && pass "and at c" || failed "c does not permit after a's grant"
# A read is decided at b and its decision ordered before it returns: how long that takes here.
TIMES=
for _ in 1 2 3 4 5; do
  R0=$(date +%s%N); read_at b >/dev/null; R1=$(date +%s%N)
  TIMES="$TIMES $(((R1 - R0) / 1000000))"
done
say "     (measured, not judged: five reads at b took$TIMES ms, each with its decision ordered)"
expect_rc 0 "a revokes the grant" -- ctl a consent revoke "$GRANT"
T0=$(date +%s%N)
DENIED=no
for _ in $(seq 1 100); do if [ "$(read_at b)" = 1 ]; then DENIED=yes; break; fi; sleep 0.01; done
T1=$(date +%s%N)
[ $DENIED = yes ] && pass "the revocation at a denies the read at b $(((T1 - T0) / 1000000)) ms after the revoke returned" || failed "b still permits after the revocation"
say "     (measured, not judged: the issue asks for 1 s)"
[ "$(read_at c)" = 1 ] && pass "and c denies too" || failed "c does not deny"

say "== data keys: a reading ingested at c is read at b; an erasure at a destroys every member's keys"
expect_rc 0 "a grants dr-lee again" -- bash -c "printf '%s\n' '$PATIENT' | '$MEDCTL' --config '${CONF[a]}' consent grant --patient - --to 'Practitioner::\"dr-lee\"' --data vitals --purpose TREAT"
printf 'MSH|^~\\&|CENTRAL-C|ICU|MEDGATE|HOSP|20261125120000||ORU^R01^ORU_R01|KEY1|P|2.6\rPID|1||CLUSTER-P7^^^HOSP^MR\rOBR|1||||||20261125115900\rOBX|1|NM|150456^MDC_PULS_OXIM_SAT_O2^MDC||93|262688^MDC_DIM_PERCENT^MDC|||||F|||20261125115900\r' >"$WORK/key1.hl7"
[ "$("$MLLP_SEND" --host 127.0.0.1 --port "${HL7[c]}" --timeout-ms 5000 "$WORK/key1.hl7" 2>/dev/null | sed -n 's/.*: \(A[AER]\) .*/\1/p')" = AA ] && pass "c acknowledges a reading for the patient" || failed "c did not take the reading"
read_value_at() { printf '%s\n' "$PATIENT" | ctl "$1" --json data read --as 'Practitioner::"dr-lee"' --patient - --purpose TREAT 2>&1 || true; }
READ=
for _ in $(seq 1 100); do READ=$(read_value_at b); grep -q '"value": 93' <<<"$READ" && break; sleep 0.1; done
grep -q '"value": 93' <<<"$READ" && pass "b decrypts and returns the reading ingested at c" || { failed "b cannot read c's reading"; printf '%s\n' "$READ" | tail -5; }
P_HEX=$(sqlite3 "$WORK/b/vault.db" "SELECT lower(hex(pseudonym)) FROM member_keys LIMIT 1")
[ -n "$P_HEX" ] && pass "b keeps c's data key, wrapped by b's own token" || failed "no member key at b"
[ -n "$(etcdctl_cluster get --prefix --keys-only "/medgate/ward/datakeys/$P_HEX/")" ] && pass "c published its data key (sealed under the cluster's key) to etcd" || failed "no published data key"
if etcdctl_cluster get --prefix --print-value-only /medgate/ward/datakeys/ | grep -aq CLUSTER-P7; then failed "an identifier in etcd"; else pass "no identifier in etcd"; fi
expect_rc 0 "the patient is erased at a" -- bash -c "printf '%s\n' '$PATIENT' | '$MEDCTL' --config '${CONF[a]}' patient erase - --reason 'asked to be forgotten'"
GONE=no
for _ in $(seq 1 100); do
  if [ "$(sqlite3 "$WORK/b/vault.db" "SELECT count(*) FROM member_keys WHERE lower(hex(pseudonym)) = '$P_HEX'")" = 0 ] &&
     [ "$(sqlite3 "$WORK/c/vault.db" "SELECT count(*) FROM patients WHERE lower(hex(pseudonym)) = '$P_HEX' AND state = 2 AND wrapped_key IS NULL")" = 1 ] &&
     [ -z "$(etcdctl_cluster get --prefix --keys-only "/medgate/ward/datakeys/$P_HEX/")" ]; then GONE=yes; break; fi
  sleep 0.1
done
[ $GONE = yes ] && pass "the erasure at a destroyed c's key at c, its copy at b, and the published copy in etcd" || {
  failed "a data key survived the erasure"
  grep -h "erase" "${LOG[a]}" "${LOG[b]}" "${LOG[c]}" | tail -12
  for m in a b c; do say "     $m: erasure entries $(sqlite3 "$WORK/$m/ledger.db" "SELECT count(*) FROM entries WHERE type = 4"), vault $(sqlite3 "$WORK/$m/vault.db" "SELECT state, key_id IS NULL, published FROM patients WHERE lower(hex(pseudonym)) = '$P_HEX'")"; done
}
[ "$(sqlite3 "$WORK/b/vault.db" "SELECT state FROM patients WHERE lower(hex(pseudonym)) = '$P_HEX'")" = 2 ] && pass "b records the patient as erased" || failed "b does not record the erasure"
READ=$(read_value_at b)
grep -q '"value": 93' <<<"$READ" && failed "b still returns the erased patient's reading" || pass "b returns nothing of the erased patient"

stop_member b
start_member b
[ "$(send_app CENTRAL-A b REV3)" = AE ] && pass "b still refuses it after a restart" || failed "b forgot the revocation"
[ "$(send_app CENTRAL-C b REV4)" = AA ] && pass "and still accepts c's source" || failed "b lost c's source"

for m in a b c; do
  kill -TERM "${PID[$m]}"
  if wait "${PID[$m]}"; then pass "medgated $m stops cleanly"; else failed "medgated $m exited $? on SIGTERM"; fi
  PID[$m]=
done
finish
