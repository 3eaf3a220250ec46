#!/usr/bin/env bash
# Install the Debian packages keyfence's tests talk to, when they are missing:
# libiscsi-bin (iscsi-test-cu, iscsi-perf), tgt (the peer target), sg3-utils
# (reference sg_persist), multipath-tools (reference mpathpersist).
set -euo pipefail
need=()
command -v iscsi-test-cu >/dev/null || need+=(libiscsi-bin)
command -v tgtd >/dev/null || need+=(tgt)
command -v sg_persist >/dev/null || need+=(sg3-utils)
command -v mpathpersist >/dev/null || need+=(multipath-tools)
command -v python3 >/dev/null || need+=(python3)
if [ ${#need[@]} -gt 0 ]; then
    echo "installing: ${need[*]}"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
