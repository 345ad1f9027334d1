#!/usr/bin/env bash
# ctest "fuzz: <name>": replays every input in the target's corpus (the regression part: inputs
# that once broke something stay there), then fuzzes for SECONDS more. libFuzzer adds what it
# finds to the corpus directory, so it gets a scratch copy; the checked-in corpus is not touched.
# A crash, sanitizer report, leak, slow input (>5 s) or broken property fails the test and
# leaves the input in ARTIFACT_DIR (see README.md for adding it to the corpus).
#
#   run_fuzzer.sh FUZZER CORPUS_DIR SECONDS ARTIFACT_DIR
set -euo pipefail
fuzzer=$1 corpus=$2 seconds=$3 artifacts=$4

note=$(dirname "$fuzzer")/SKIPPED  # left by build_fuzzers.sh when it could not build
if [ -f "$note" ]; then
  cat "$note"
  exit 77
fi
if [ ! -x "$fuzzer" ]; then
  echo "$fuzzer is not built (in a g++ build, the 'fuzz: build' test builds it)" >&2
  exit 1
fi

scratch=$(mktemp -d "${TMPDIR:-/tmp}/medgate-fuzz.XXXXXX")
trap 'rm -rf "$scratch"' EXIT
cp -r "$corpus/." "$scratch/"
mkdir -p "$artifacts"
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
# libFuzzer's own exit code for a finding is 77, which ctest would read as Skipped: say 1.
"$fuzzer" -max_total_time="$seconds" -timeout=5 -rss_limit_mb=2048 -max_len=65536 \
  -error_exitcode=1 -timeout_exitcode=1 -print_final_stats=1 -artifact_prefix="$artifacts/" \
  "$scratch" || {
  rc=$?
  echo "fuzz: $(basename "$fuzzer") failed (exit $rc); the input is in $artifacts/" >&2
  exit 1
}
