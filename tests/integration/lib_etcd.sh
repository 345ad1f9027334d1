# A real etcd cluster for the integration tests, the bash twin of tests/support/etcd_cluster.h:
# 1 or 3 `etcd` members on free loopback ports (never 2379/2380, where Debian's own etcd.service
# may listen), heartbeat 50 ms, election timeout 500 ms, each with its data in DIR/etcd-N. Only
# the PIDs started here are ever signalled.
#
#   source lib_etcd.sh              (after lib.sh, or alone; it adds its stop to the EXIT trap)
#   start_etcd_cluster N DIR        starts N members and waits until all are healthy (10 s)
#   ETCD_ENDPOINTS                  "http://127.0.0.1:P1,http://127.0.0.1:P2,..." once started
#   etcd_endpoint I                 member I's client URL
#   kill_etcd_member I              kill -9 member I
#   restart_etcd_member I           starts member I again with its data dir and ports, waits
#   stop_etcd_cluster               SIGTERM to every member, SIGKILL after 5 s
#   etcdctl_cluster ARGS...         etcdctl against the running members
#   etcd_wait_writable              waits until the running members take a write (10 s)
#
#   bash lib_etcd.sh --self-test    starts a 3-member cluster, kills and restarts one, stops it

ETCD_PIDS=()
ETCD_CLIENT_PORTS=()
ETCD_PEER_PORTS=()
ETCD_ENDPOINTS=
ETCD_DIR=
ETCD_INITIAL_CLUSTER=
ETCD_TOKEN=

etcd_port_in_use() { ss -Htln "sport = :$1" 2>/dev/null | grep -q .; }

# Prints a port in 20000-31999 (away from 2379/2380 and the kernel's ephemeral range) that nothing
# listens on and that is not in the arguments.
etcd_free_port() {
  local p
  while :; do
    p=$((RANDOM % 12000 + 20000))
    case " $* " in *" $p "*) continue ;; esac
    etcd_port_in_use "$p" || { echo "$p"; return 0; }
  done
}

etcd_endpoint() { echo "http://127.0.0.1:${ETCD_CLIENT_PORTS[$1]}"; }

etcd_member_healthy() {
  curl -s --max-time 1 "$(etcd_endpoint "$1")/health" 2>/dev/null | grep -q '"health":"true"'
}

etcd_spawn_member() {
  local i=$1 client peer
  client=$(etcd_endpoint "$i")
  peer="http://127.0.0.1:${ETCD_PEER_PORTS[$i]}"
  mkdir -p "$ETCD_DIR/etcd-$i"
  chmod 700 "$ETCD_DIR/etcd-$i"
  # env -u: a developer's ETCD_* variables would be read as flags.
  env $(env | sed -n 's/^\(ETCD[A-Za-z0-9_]*\)=.*/-u \1/p') \
    etcd --name "m$i" --data-dir "$ETCD_DIR/etcd-$i" \
    --listen-client-urls "$client" --advertise-client-urls "$client" \
    --listen-peer-urls "$peer" --initial-advertise-peer-urls "$peer" \
    --initial-cluster "$ETCD_INITIAL_CLUSTER" --initial-cluster-state new \
    --initial-cluster-token "$ETCD_TOKEN" --heartbeat-interval 50 --election-timeout 500 \
    --logger zap --log-level warn </dev/null >>"$ETCD_DIR/etcd-$i.log" 2>&1 &
  ETCD_PIDS[$i]=$!
}

# etcd_wait_healthy I [TENTHS]: waits until member I says it is healthy (default 10 s).
etcd_wait_healthy() {
  local i=$1 tries=${2:-100}
  for _ in $(seq 1 "$tries"); do
    if etcd_member_healthy "$i"; then return 0; fi
    if ! kill -0 "${ETCD_PIDS[$i]}" 2>/dev/null; then
      echo "etcd member m$i exited:" >&2
      tail -15 "$ETCD_DIR/etcd-$i.log" >&2
      return 1
    fi
    sleep 0.1
  done
  echo "etcd member m$i is not healthy after $((tries / 10)) s:" >&2
  tail -15 "$ETCD_DIR/etcd-$i.log" >&2
  return 1
}

start_etcd_cluster() {
  local n=${1:?usage: start_etcd_cluster N DIR} dir=${2:?usage: start_etcd_cluster N DIR}
  if [ "$n" != 1 ] && [ "$n" != 3 ]; then echo "start_etcd_cluster: 1 or 3 members, not $n" >&2; return 2; fi
  command -v etcd >/dev/null || { echo "start_etcd_cluster: etcd is not installed (etcd-server)" >&2; return 2; }
  local attempt i ok used
  for attempt in 1 2 3; do
    stop_etcd_cluster
    ETCD_DIR=$dir ETCD_PIDS=() ETCD_CLIENT_PORTS=() ETCD_PEER_PORTS=() ETCD_INITIAL_CLUSTER=
    ETCD_TOKEN="medgate-it-$$-$RANDOM"
    used=
    for ((i = 0; i < n; i++)); do
      ETCD_CLIENT_PORTS[$i]=$(etcd_free_port $used); used="$used ${ETCD_CLIENT_PORTS[$i]}"
      ETCD_PEER_PORTS[$i]=$(etcd_free_port $used); used="$used ${ETCD_PEER_PORTS[$i]}"
      ETCD_INITIAL_CLUSTER="${ETCD_INITIAL_CLUSTER:+$ETCD_INITIAL_CLUSTER,}m$i=http://127.0.0.1:${ETCD_PEER_PORTS[$i]}"
      rm -rf "$dir/etcd-$i"
    done
    for ((i = 0; i < n; i++)); do etcd_spawn_member "$i"; done
    ok=1
    for ((i = 0; i < n; i++)); do etcd_wait_healthy "$i" || { ok=0; break; }; done
    if [ "$ok" = 1 ]; then
      ETCD_ENDPOINTS=
      for ((i = 0; i < n; i++)); do ETCD_ENDPOINTS="${ETCD_ENDPOINTS:+$ETCD_ENDPOINTS,}$(etcd_endpoint "$i")"; done
      return 0
    fi
    echo "start_etcd_cluster: attempt $attempt failed (a port taken?); trying other ports" >&2
  done
  stop_etcd_cluster
  echo "start_etcd_cluster: cannot start a healthy $n-member etcd cluster" >&2
  return 1
}

etcd_terminate() {
  local pid=$1
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 50); do
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
    sleep 0.1
  done
  kill -9 "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

stop_etcd_cluster() {
  local i
  for i in "${!ETCD_PIDS[@]}"; do
    etcd_terminate "${ETCD_PIDS[$i]}"
    ETCD_PIDS[$i]=
  done
}

kill_etcd_member() {
  local i=${1:?usage: kill_etcd_member I} pid=${ETCD_PIDS[$1]:-}
  [ -n "$pid" ] || { echo "kill_etcd_member: member $i is not running" >&2; return 1; }
  kill -9 "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  ETCD_PIDS[$i]=
}

restart_etcd_member() {
  local i=${1:?usage: restart_etcd_member I}
  etcd_terminate "${ETCD_PIDS[$i]:-}"
  etcd_spawn_member "$i"
  etcd_wait_healthy "$i"
}

etcdctl_cluster() {
  local i list=
  for i in "${!ETCD_PIDS[@]}"; do
    [ -n "${ETCD_PIDS[$i]}" ] && list="${list:+$list,}$(etcd_endpoint "$i")"
  done
  ETCDCTL_API=3 etcdctl --endpoints="$list" --command-timeout=5s "$@"
}

# etcd_wait_writable [TENTHS]: waits until the running members accept a write (default 10 s).
# After the leader is killed, a write sent to a member that still follows it hangs until etcd's
# own request timeout (~6 s); short tries get past the election instead.
etcd_wait_writable() {
  local tries=${1:-100} i list=
  for i in "${!ETCD_PIDS[@]}"; do
    [ -n "${ETCD_PIDS[$i]}" ] && list="${list:+$list,}$(etcd_endpoint "$i")"
  done
  for _ in $(seq 1 "$tries"); do
    if ETCDCTL_API=3 etcdctl --endpoints="$list" --command-timeout=300ms \
      put medgate-test/writable x >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  echo "etcd_wait_writable: the cluster takes no write after $((tries / 10)) s" >&2
  return 1
}

# Stop the cluster on exit too, after whatever the EXIT trap already did (lib.sh's cleanup).
etcd_previous_exit_trap=$(trap -p EXIT | sed -e "s/^trap -- '//" -e "s/' EXIT\$//")
# shellcheck disable=SC2064
trap "stop_etcd_cluster; ${etcd_previous_exit_trap}" EXIT

if [ "${BASH_SOURCE[0]}" = "$0" ] && [ "${1:-}" = --self-test ]; then
  set -euo pipefail
  dir=$(mktemp -d /tmp/medgate-etcd-it.XXXXXX)
  trap 'stop_etcd_cluster; rm -rf "$dir"' EXIT
  start_etcd_cluster 3 "$dir"
  echo "ok   3 members healthy: $ETCD_ENDPOINTS"
  etcdctl_cluster put medgate/k v1 >/dev/null
  kill_etcd_member 0
  etcd_wait_writable
  etcdctl_cluster put medgate/k v2 >/dev/null
  echo "ok   a write with member 0 killed -9"
  restart_etcd_member 0
  got=$(ETCDCTL_API=3 etcdctl --endpoints="$(etcd_endpoint 0)" get --print-value-only medgate/k)
  [ "$got" = v2 ] || { echo "FAIL member 0 after restart reads '$got', wanted v2"; exit 1; }
  echo "ok   member 0 restarted from its data dir and caught up"
  pids=("${ETCD_PIDS[@]}")
  stop_etcd_cluster
  for pid in "${pids[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then echo "FAIL etcd $pid still runs after stop"; exit 1; fi
  done
  echo "ok   stopped"
fi
