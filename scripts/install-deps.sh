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
command -v protoc >/dev/null || need+=(protobuf-compiler)
[ -e /usr/include/google/protobuf/descriptor.proto ] || need+=(libprotobuf-dev)
if [ ${#need[@]} -gt 0 ]; then
    echo "installing: ${need[*]}"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
