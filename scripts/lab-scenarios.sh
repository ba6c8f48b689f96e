#!/usr/bin/env bash
# Runs the whole scenario library (scenarios/*.toml, or the files given) one after the
# other with `kvmha lab run --json`, prints one result line per scenario and a summary,
# and exits non-zero if any scenario did not pass. Root only; about 15 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p kvmha || exit 2
files=("$@")
if [ "${#files[@]}" -eq 0 ]; then
  # The 30-minute soak is not part of the library run: name it to run it.
  for file in scenarios/*.toml; do
    [ "$(basename "$file")" = soak.toml ] || files+=("$file")
  done
fi
failed=0
for file in "${files[@]}"; do
  result=$(target/release/kvmha lab run "$file" --json 2>"/tmp/kvmha-lab-$(basename "$file" .toml).log")
  code=$?
  echo "$(basename "$file"): exit $code $result"
  [ "$code" -eq 0 ] || failed=$((failed + 1))
done
echo "${#files[@]} scenarios, $failed not passed (stderr of each in /tmp/kvmha-lab-NAME.log)"
[ "$failed" -eq 0 ]
