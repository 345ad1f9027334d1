#!/usr/bin/env bash
# A long differential run of the rules engine against Cedar's reference (cedar-wasm): SEEDS seeds
# of COUNT cases each, from FIRST_SEED on (the ctest uses seeds 1-3), two generators at a time,
# each pair checked by rules_diff as soon as it is generated. Defaults: 40 seeds x 2,500 cases
# (100,000 cases, about 400,000 requests; roughly 20 minutes on two cores).
#
#   tests/bench/rules_diff_long.sh [BUILD_DIR] [SEEDS] [COUNT] [FIRST_SEED]
#
# Prints each batch's rules_diff summary (and any divergence, shrunk) and the totals; exits 1 if
# any batch diverged.
set -euo pipefail
here=$(cd "$(dirname "$0")/../rules_diff" && pwd)
build=$(cd "${1:-$here/../../build}" && pwd)
seeds=${2:-40} count=${3:-2500} first=${4:-1000}
rules_diff=$build/bin/rules_diff
export MEDGATE_CEDAR_MODULES=$build/rules_diff
[ -x "$rules_diff" ] || { echo "rules_diff_long: no $rules_diff (build it first)" >&2; exit 2; }
command -v node >/dev/null || { echo "rules_diff_long: node is missing (./setup)" >&2; exit 2; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "rules_diff_long: $seeds seeds x $count cases from seed $first; load average $(cut -d' ' -f1-3 /proc/loadavg)"
start=$SECONDS status=0 cases=0 requests=0 divergences=0
for ((s = first; s < first + seeds; s += 2)); do
  batch=() pids=()
  for seed in $s $((s + 1)); do
    [ "$seed" -lt $((first + seeds)) ] || continue
    node "$here/gen.js" "$seed" "$count" "$work/cases-$seed.json" >/dev/null &
    pids+=($!)
    batch+=("$work/cases-$seed.json")
  done
  for p in "${pids[@]}"; do wait "$p"; done
  out=$("$rules_diff" "${batch[@]}" --oracle "$here/oracle.js" --max-shrink 2) || status=1
  summary=$(grep '^rules_diff: ' <<<"$out" | head -1)
  echo "seeds $s..$((s + ${#batch[@]} - 1)): ${summary#rules_diff: }"
  [ "$status" = 0 ] || grep -v '^rules_diff: ' <<<"$out" | head -200
  read -r c r d < <(sed -E 's/^rules_diff: ([0-9]+) cases, ([0-9]+) requests.* ([0-9]+) divergences.*/\1 \2 \3/' <<<"$summary")
  cases=$((cases + c)) requests=$((requests + r)) divergences=$((divergences + d))
  rm -f "${batch[@]}"
done
echo "rules_diff_long: $cases cases, $requests requests, $divergences divergences in $((SECONDS - start)) s; load average $(cut -d' ' -f1-3 /proc/loadavg)"
exit $status
