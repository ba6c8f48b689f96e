#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs what it needs, then format, lints and every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo nextest run --workspace --locked --no-fail-fast "$@"
# Every fuzz target briefly (one release build of fuzz/, then 15 s each; see scripts/fuzz.sh).
scripts/fuzz.sh all 15
