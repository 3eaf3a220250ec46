#!/usr/bin/env bash
# Run every keyfence test: installs what the tests need (Debian packages via
# apt-get when missing), runs the workspace's tests, the split-brain fencing
# test (single node and across two cluster gateways), then libiscsi's
# conformance suite against `keyfence serve` (single node, with ACLs, and in
# cluster mode across two gateways).
#
# Everything is built in the `release-checked` profile (Cargo.toml: release
# plus overflow checks): the binary the scripts start is the one the Rust
# tests ran against, and the benchmark profile (`release`) is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh

profile=release-checked
out="${CARGO_TARGET_DIR:-target}"
bin="$out/$profile/keyfence"

echo "== cargo test --workspace --profile $profile"
cargo build --profile "$profile" --bin keyfence
cargo test --workspace --profile "$profile"

echo "== block-device LUNs on loop devices (crates/keyfence/tests/block_device.rs)"
if [ "$(id -u)" -eq 0 ] && losetup --find >/dev/null 2>&1; then
    cargo test --profile "$profile" -p keyfence --test block_device -- --ignored
else
    echo "block-device tests NOT run: they need root and a free loop device (losetup --find)"
fi

echo "== Debian package (cargo deb from the binary just built; dpkg -c checked)"
scripts/package-test.sh "$profile"

echo "== split-brain fencing test, 25 rounds (scripts/split-brain.sh N for more)"
KEYFENCE_PROFILE="$profile" scripts/split-brain.sh 25 2>&1 \
    | grep -E "^split brain|^test |test result"

echo "== split-brain fencing test across two cluster gateways, 10 rounds (scripts/split-brain.sh --cluster N for more)"
KEYFENCE_PROFILE="$profile" scripts/split-brain.sh --cluster 10 2>&1 \
    | grep -E "^split brain|^test |test result"

echo "== libiscsi conformance (iscsi-test-cu -d --test=ALL, two portal groups)"
python3 scripts/conformance.py --binary "$bin" --log "$out/conformance.log" \
    --json "$out/conformance.json"

echo "== libiscsi conformance again, the target with ACLs for iscsi-test-cu's initiator names"
python3 scripts/conformance.py --acl --binary "$bin" --log "$out/conformance-acl.log" \
    --json "$out/conformance-acl.json"

echo "== libiscsi conformance across gateways (three-member etcd, two gateways, PR and multipath suites)"
python3 scripts/conformance.py --cluster --binary "$bin" --log "$out/conformance-cluster.log" \
    --json "$out/conformance-cluster.json"
