#!/usr/bin/env bash
# ctest "fuzz: build": configures and builds tests/fuzz as its own project with clang (libFuzzer
# needs it; the main build uses g++). Exits 77 (ctest: Skipped) when clang++ or libFuzzer's
# runtime is missing, leaving a note that the "fuzz: <name>" tests read so they skip too.
#
#   build_fuzzers.sh SOURCE_DIR BUILD_DIR [GENERATOR]
set -euo pipefail
src=$1 build=$2 generator=${3:-Ninja}
mkdir -p "$build"
skipped=$build/SKIPPED
rm -f "$skipped"

skip() {
  echo "$1" | tee "$skipped"
  exit 77
}
command -v clang++ >/dev/null ||
  skip "SKIP: clang++ is not installed (Debian: apt install clang libclang-rt-14-dev)"
probe=$build/probe.cc
echo 'extern "C" int LLVMFuzzerTestOneInput(const unsigned char*, unsigned long) { return 0; }' >"$probe"
clang++ -fsanitize=fuzzer,address,undefined "$probe" -o "$build/probe" 2>/dev/null ||
  skip "SKIP: clang++ cannot link libFuzzer with ASan/UBSan (Debian: apt install libclang-rt-14-dev)"
rm -f "$probe" "$build/probe"

if [ ! -f "$build/CMakeCache.txt" ]; then
  launcher=()
  command -v ccache >/dev/null && launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
  cmake -S "$src" -B "$build" -G "$generator" -DCMAKE_CXX_COMPILER=clang++ "${launcher[@]}"
fi
cmake --build "$build" -j "$(nproc)"
