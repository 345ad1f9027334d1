# Shared helpers for the integration tests: real medgated and medctl binaries, a real SoftHSM
# token, in a temporary directory; everything started here is stopped on exit.
#
#   source lib.sh BIN_DIR        (BIN_DIR holds medgated and medctl)
set -euo pipefail

BIN_SRC=${1:?usage: $0 BIN_DIR}
WORK=$(mktemp -d /tmp/medgate-it.XXXXXX)
chmod 755 "$WORK"
# Copies of the binaries in a directory every test user can reach.
mkdir -p "$WORK/bin"
cp "$BIN_SRC/medgated" "$BIN_SRC/medctl" "$WORK/bin/"
chmod 755 "$WORK/bin" "$WORK/bin/"*
MEDCTL=$WORK/bin/medctl
MEDGATED=$WORK/bin/medgated
DAEMON_PID=
SWTPM_PID=
TPM_PORT=
FAILURES=0
CHECKS=0

cleanup() {
  stop_swtpm
  if [ -n "$DAEMON_PID" ] && kill -0 "$DAEMON_PID" 2>/dev/null; then kill -9 "$DAEMON_PID" 2>/dev/null || true; fi
  jobs -p | xargs -r kill -9 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

say() { printf '%s\n' "$*"; }
pass() { CHECKS=$((CHECKS + 1)); say "ok   $*"; }
failed() { CHECKS=$((CHECKS + 1)); FAILURES=$((FAILURES + 1)); say "FAIL $*"; }

# expect_rc N DESCRIPTION -- CMD...: runs CMD, keeps its output in $OUT, checks its exit code.
expect_rc() {
  local want=$1 what=$2
  shift 3
  set +e
  OUT=$("$@" 2>&1)
  local rc=$?
  set -e
  if [ "$rc" = "$want" ]; then pass "$what (rc $rc)"; else failed "$what: rc $rc, wanted $want"; say "$OUT" | sed 's/^/     | /' | tail -15; fi
}

# expect_in PATTERN DESCRIPTION: the last command's output matches PATTERN (grep -E).
# (Here-strings, not pipes: with pipefail, grep -q exiting early would fail the printf.)
expect_in() {
  if grep -qE -- "$1" <<<"$OUT"; then pass "$2"; else failed "$2: output lacks /$1/"; say "$OUT" | sed 's/^/     | /' | tail -15; fi
}
expect_not_in() {
  if grep -qE -- "$1" <<<"$OUT"; then failed "$2: output has /$1/"; say "$OUT" | sed 's/^/     | /' | tail -15; else pass "$2"; fi
}

# Runs a command as another user (and their groups), without any capability.
as_user() {
  local user=$1
  shift
  setpriv --reuid="$user" --regid="$(id -g "$user")" --init-groups --inh-caps=-all -- "$@"
}

# start_daemon CONFIG [LOG]: starts medgated in the background and waits for its socket.
start_daemon() {
  local config=$1 log=${2:-$WORK/medgated.log}
  "$MEDGATED" --config "$config" >>"$log" 2>&1 &
  DAEMON_PID=$!
  for _ in $(seq 1 100); do
    if "$MEDCTL" --config "$config" status >/dev/null 2>&1; then return 0; fi
    if ! kill -0 "$DAEMON_PID" 2>/dev/null; then say "medgated exited early:"; tail -20 "$log"; return 1; fi
    sleep 0.1
  done
  say "medgated did not answer within 10 s"
  tail -20 "$log"
  return 1
}

# stop_daemon: SIGTERM and wait; the exit status must be 0 (clean stop).
stop_daemon() {
  kill -TERM "$DAEMON_PID"
  set +e
  wait "$DAEMON_PID"
  local rc=$?
  set -e
  DAEMON_PID=
  if [ "$rc" = 0 ]; then pass "medgated stops cleanly on SIGTERM"; else failed "medgated exited $rc on SIGTERM"; fi
}

# raw_request SOCKET: sends stdin to the admin socket and prints what comes back.
raw_request() { socat -t 5 - "UNIX-CONNECT:$1" 2>&1 || true; }

# swtpm on loopback for the tests that use a TPM; stopped on exit.
TPM_STATE=$WORK/swtpm-state

port_in_use() { ss -Htln "sport = :$1" 2>/dev/null | grep -q .; }

# start_swtpm [PORT]: starts swtpm (on a free port pair unless PORT is given) and waits for it.
start_swtpm() {
  local want=${1:-} port
  mkdir -p "$TPM_STATE"
  for _ in $(seq 1 20); do
    port=${want:-$(( (RANDOM % 15000 + 20000) * 2 ))}
    if [ -z "$want" ] && { port_in_use "$port" || port_in_use $((port + 1)); }; then continue; fi
    swtpm socket --tpm2 --tpmstate dir="$TPM_STATE" \
      --server type=tcp,port="$port",bindaddr=127.0.0.1 \
      --ctrl type=tcp,port=$((port + 1)),bindaddr=127.0.0.1 \
      --flags not-need-init,startup-clear >>"$WORK/swtpm.log" 2>&1 &
    SWTPM_PID=$!
    for _ in $(seq 1 200); do
      if ! kill -0 "$SWTPM_PID" 2>/dev/null; then break; fi
      if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then TPM_PORT=$port; return 0; fi
      sleep 0.05
    done
    kill -9 "$SWTPM_PID" 2>/dev/null || true
    wait "$SWTPM_PID" 2>/dev/null || true
    SWTPM_PID=
    sleep 0.2
  done
  say "cannot start swtpm"; tail -5 "$WORK/swtpm.log"; return 1
}

stop_swtpm() {
  [ -n "$SWTPM_PID" ] || return 0
  swtpm_ioctl --tcp "127.0.0.1:$((TPM_PORT + 1))" -s >/dev/null 2>&1 || kill -TERM "$SWTPM_PID" 2>/dev/null || true
  wait "$SWTPM_PID" 2>/dev/null || true
  SWTPM_PID=
}

finish() {
  say ""
  say "$((CHECKS - FAILURES)) passed, $FAILURES failed"
  [ "$FAILURES" = 0 ]
}
