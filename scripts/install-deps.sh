#!/usr/bin/env bash
# Install the Debian packages keyfence's tests talk to, when they are missing:
# libiscsi-bin (iscsi-test-cu, iscsi-perf), tgt (the peer target), sg3-utils
# (reference sg_persist), multipath-tools (reference mpathpersist), etcd-server
# (the cluster tests' etcd), and protobuf-compiler + libprotobuf-dev (protoc and
# its well-known .proto files, which the etcd-client crate's build needs).
set -euo pipefail
need=()
command -v iscsi-test-cu >/dev/null || need+=(libiscsi-bin)
# tgtd and tgtadm live in /usr/sbin, which is not on every user's PATH.
{ command -v tgtd || [ -x /usr/sbin/tgtd ]; } >/dev/null || need+=(tgt)
command -v sg_persist >/dev/null || need+=(sg3-utils)
command -v mpathpersist >/dev/null || need+=(multipath-tools)
command -v python3 >/dev/null || need+=(python3)
command -v etcd >/dev/null || need+=(etcd-server)
# promtool checks the metrics endpoint's output (crates/keyfence-target/tests/metrics.rs).
command -v promtool >/dev/null || need+=(prometheus)
command -v protoc >/dev/null || need+=(protobuf-compiler)
[ -e /usr/include/google/protobuf/descriptor.proto ] || need+=(libprotobuf-dev)
# Packaging tests: systemd-analyze (unit check), groff (man pages), the
# shells whose completions are tried, dpkg-deb/dpkg-shlibdeps (cargo-deb).
command -v systemd-analyze >/dev/null || need+=(systemd)
command -v groff >/dev/null || need+=(groff-base)
command -v bash >/dev/null || need+=(bash)
command -v zsh >/dev/null || need+=(zsh)
command -v fish >/dev/null || need+=(fish)
command -v dpkg-deb >/dev/null || need+=(dpkg)
command -v dpkg-shlibdeps >/dev/null || need+=(dpkg-dev)
# Block-device LUN tests (run as root): loop devices and a file system to mount.
command -v losetup >/dev/null || need+=(mount)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
if [ ${#need[@]} -gt 0 ]; then
    echo "installing: ${need[*]}"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# cargo-deb builds the Debian package (scripts/package.sh); a Cargo tool,
# not a Debian package.
if ! cargo deb --version >/dev/null 2>&1; then
    echo "installing: cargo-deb (cargo install)"
    cargo install cargo-deb --version 3.8.0 --locked --quiet
fi
