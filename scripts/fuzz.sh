#!/usr/bin/env bash
# Run each cargo-fuzz target for a bounded time (default 60 s each).
# Needs cargo-fuzz (`cargo install cargo-fuzz`); on a stable toolchain the
# sanitizer flags are enabled through RUSTC_BOOTSTRAP.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs="${1:-60}"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
for t in pdu_decode cdb_execute pr_params session_ops; do
    echo "== fuzzing $t for ${secs}s"
    cargo fuzz run "$t" -- -max_total_time="$secs" -rss_limit_mb=2048
done
