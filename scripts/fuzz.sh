#!/usr/bin/env bash
# Runs the cargo-fuzz targets of fuzz/ on the stable toolchain (no sanitizer).
#
#   scripts/fuzz.sh                 every target, 15 s each (what CI runs)
#   scripts/fuzz.sh TARGET          one target, 15 s
#   scripts/fuzz.sh all 300         every target, 5 minutes each
#   scripts/fuzz.sh TARGET 300
#
# The seed corpus of each target is fuzz/corpus/<target>/ (kept in git, small). New
# inputs the fuzzer finds go to a scratch corpus under fuzz/target/, never into the
# repository; a crash is saved under fuzz/artifacts/<target>/ and fails the script:
# turn it into a regression test in the crate that owns the code, then add the input
# to the seed corpus. The last line per target reports its exec count (docs/benchmarks.md).
set -euo pipefail
cd "$(dirname "$0")/.."

target="${1:-all}"
seconds="${2:-15}"
targets=(rmcp_decode redfish_json storage_record proto_messages manager_config agent_config scenario)
if [ "$target" != "all" ]; then
  targets=("$target")
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: cargo-fuzz missing; run scripts/setup.sh (cargo install cargo-fuzz --locked)" >&2
  exit 1
fi

# One build for every target (they share all their dependencies).
cargo fuzz build --sanitizer none

failed=()
for name in "${targets[@]}"; do
  seeds="fuzz/corpus/$name"
  scratch="fuzz/target/scratch-corpus/$name"
  mkdir -p "$seeds" "$scratch" "fuzz/artifacts/$name"
  log="fuzz/target/$name.log"
  echo "fuzz: $name for ${seconds}s" >&2
  # -rss_limit_mb: a decoder that allocates without bound is a bug too.
  if cargo fuzz run --sanitizer none "$name" "$scratch" "$seeds" -- \
      -max_total_time="$seconds" -rss_limit_mb=1024 -timeout=10 -print_final_stats=1 >"$log" 2>&1; then
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo "?")
    corpus=$(find "$scratch" -type f | wc -l)
    echo "fuzz: $name ok: ${runs} execs in ${seconds}s, corpus ${corpus}"
  else
    echo "fuzz: $name FAILED; last lines of $log:" >&2
    tail -n 40 "$log" >&2
    failed+=("$name")
  fi
done

if [ "${#failed[@]}" -gt 0 ]; then
  echo "fuzz: crashes in ${failed[*]} (inputs under fuzz/artifacts/)" >&2
  exit 1
fi
