#!/usr/bin/env bash
# The differential test: generates cases for each seed with gen.js (answered by cedar-wasm), then
# runs medgate's engine over them with rules_diff, which shrinks and prints any divergence.
#
#   run_diff.sh RULES_DIFF MODULES_DIR COUNT SEED...
#
# MODULES_DIR holds node_modules/@cedar-policy/cedar-wasm (setup runs npm ci there). A missing
# node or package fails the test: it is not skipped.
set -euo pipefail
rules_diff=$1 modules=$2 count=$3
shift 3
here=$(cd "$(dirname "$0")" && pwd)

if ! command -v node >/dev/null; then
  echo "FAIL: node is not installed; ./setup installs it (Debian packages nodejs and npm)" >&2
  exit 1
fi
if [ ! -f "$modules/node_modules/@cedar-policy/cedar-wasm/nodejs/cedar_wasm.js" ]; then
  echo "FAIL: @cedar-policy/cedar-wasm is not installed in $modules/node_modules;" \
       "./setup installs it there (npm ci)" >&2
  exit 1
fi
export MEDGATE_CEDAR_MODULES=$modules

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Two generators at a time (two cores).
files=()
pids=()
for seed in "$@"; do
  node "$here/gen.js" "$seed" "$count" "$work/cases-$seed.json" &
  pids+=($!)
  files+=("$work/cases-$seed.json")
  if [ ${#pids[@]} -ge 2 ]; then
    wait "${pids[0]}"
    pids=("${pids[@]:1}")
  fi
done
for p in "${pids[@]}"; do wait "$p"; done

exec "$rules_diff" "${files[@]}" --oracle "$here/oracle.js"
