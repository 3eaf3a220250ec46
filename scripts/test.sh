#!/usr/bin/env bash
# Run every keyfence test: installs what the tests need (Debian packages via
# apt-get when missing), runs the workspace's tests, then libiscsi's
# conformance suite against `keyfence serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh

echo "== cargo test --workspace"
cargo build --release --bin keyfence
cargo test --workspace --release

echo "== split-brain fencing test, 25 rounds (scripts/split-brain.sh N for more)"
scripts/split-brain.sh 25 2>&1 | grep -E "^split brain|^test |test result"

echo "== libiscsi conformance (iscsi-test-cu -d --test=ALL, two portal groups)"
python3 scripts/conformance.py --binary target/release/keyfence --log target/conformance.log \
    --json target/conformance.json
