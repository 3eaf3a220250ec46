#!/usr/bin/env bash
# Split-brain soak: many rounds of the fencing split-brain test
# (crates/keyfence/tests/fence_split_brain.rs) against a real keyfence
# target on 127.0.0.1. Each round cuts a random node off at a random moment,
# fences it with fence_keyfence and checks the LUN for late writes.
#
# Usage: scripts/split-brain.sh [ROUNDS]     (default 100)
# KEYFENCE_PROFILE selects the cargo profile (default release).
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${1:-100}"
case "$rounds" in
  ''|*[!0-9]*) echo "usage: $0 [ROUNDS]" >&2; exit 1 ;;
esac
export KEYFENCE_SPLIT_ROUNDS="$rounds"
exec cargo test --profile "${KEYFENCE_PROFILE:-release}" -p keyfence --test fence_split_brain \
    -- --nocapture
