#!/usr/bin/env bash
# Split-brain soak: many rounds of the fencing split-brain test against real
# keyfence targets on 127.0.0.1. Each round cuts a random node off at a
# random moment, fences it with fence_keyfence and checks the LUN for late
# writes.
#
# Single node (crates/keyfence/tests/fence_split_brain.rs): three writers on
# one `keyfence serve`.
# --cluster (crates/keyfence/tests/cluster_split_brain.rs): a three-member
# etcd and two gateways over one backing file; the victim writes through one
# gateway, the fencer preempts and takes over through the other; the rounds
# rotate between a plain race, freezing (SIGSTOP) the victim's or the
# fencer's gateway around the preempt, and freezing the victim's gateway past
# its lease. KEYFENCE_SPLIT_MODES (comma separated: race, stop-victim-gw,
# stop-fencer-gw, expire-victim-gw) limits the modes.
#
# Usage: scripts/split-brain.sh [--cluster] [ROUNDS]     (default 100)
# KEYFENCE_PROFILE selects the cargo profile (default release).
set -euo pipefail
cd "$(dirname "$0")/.."
test_name=fence_split_brain
if [ "${1:-}" = "--cluster" ]; then
  test_name=cluster_split_brain
  shift
fi
rounds="${1:-100}"
case "$rounds" in
  ''|*[!0-9]*) echo "usage: $0 [--cluster] [ROUNDS]" >&2; exit 1 ;;
esac
if [ $# -gt 1 ]; then
  echo "usage: $0 [--cluster] [ROUNDS]" >&2
  exit 1
fi
export KEYFENCE_SPLIT_ROUNDS="$rounds"
exec cargo test --profile "${KEYFENCE_PROFILE:-release}" -p keyfence --test "$test_name" \
    -- --nocapture
