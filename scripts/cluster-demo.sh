#!/usr/bin/env bash
# Cluster mode on loopback, start to finish: a three-member etcd, two
# keyfence gateways (gwa: TPGT 1, gwb: TPGT 2) over one shared backing
# file, a registration and reservation through gateway A, and the state as
# gateway B, `keyfence cluster status` and `keyfence pr show` see it.
# Everything it starts is stopped by PID on exit, and its files removed.
#
# Usage: scripts/cluster-demo.sh
# Environment: KEYFENCE (binary; default: built with cargo --release),
#   ETCD (default: etcd on PATH or /usr/bin/etcd),
#   KF_DEMO_PORT (first of 8 consecutive loopback ports; default 23790).
set -euo pipefail
cd "$(dirname "$0")/.."

base="${KF_DEMO_PORT:-23790}"
case "$base" in ''|*[!0-9]*) echo "KF_DEMO_PORT must be a number" >&2; exit 1 ;; esac
etcd_bin="${ETCD:-$(command -v etcd || echo /usr/bin/etcd)}"
if [ ! -x "$etcd_bin" ]; then
  echo "etcd not found: install it with 'apt-get install etcd-server' (or set ETCD)" >&2
  exit 1
fi
if [ -z "${KEYFENCE:-}" ]; then
  cargo build --release --bin keyfence >&2
  KEYFENCE="$PWD/target/release/keyfence"
fi
kf() { "$KEYFENCE" "$@"; }

dir="$(mktemp -d)"
pids=()
cleanup() {
  # Newest first: the gateways stop while etcd is still there.
  local i
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    kill "${pids[i]}" 2>/dev/null || true
    wait "${pids[i]}" 2>/dev/null || true
  done
  rm -rf "$dir"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Ports: etcd clients base..base+2, etcd peers base+3..base+5, gateways
# base+6 and base+7.
cport() { echo $((base + $1)); }
pport() { echo $((base + 3 + $1)); }
gwa_port=$((base + 6))
gwb_port=$((base + 7))
initial="m0=http://127.0.0.1:$(pport 0),m1=http://127.0.0.1:$(pport 1),m2=http://127.0.0.1:$(pport 2)"
for i in 0 1 2; do
  "$etcd_bin" --name "m$i" --data-dir "$dir/etcd$i" \
    --listen-client-urls "http://127.0.0.1:$(cport $i)" \
    --advertise-client-urls "http://127.0.0.1:$(cport $i)" \
    --listen-peer-urls "http://127.0.0.1:$(pport $i)" \
    --initial-advertise-peer-urls "http://127.0.0.1:$(pport $i)" \
    --initial-cluster "$initial" --initial-cluster-state new \
    --initial-cluster-token "kf-demo-$$" \
    --logger zap --log-level warn >"$dir/etcd$i.log" 2>&1 &
  pids+=($!)
done
EP="http://127.0.0.1:$(cport 0),http://127.0.0.1:$(cport 1),http://127.0.0.1:$(cport 2)"

# etcd is up when a linearizable read succeeds (bounded: 30 s).
for _ in $(seq 60); do
  if kf cluster status --etcd "$EP" >/dev/null 2>&1; then break; fi
  sleep 0.5
done
kf cluster status --etcd "$EP" >/dev/null

IQN=iqn.2026-11.io.keyfence:demo
truncate -s 64M "$dir/shared.img"
start_gateway() { # NAME PORT TPGT PEER
  mkdir -p "$dir/$1"
  ln -s "$dir/shared.img" "$dir/$1/lun0.img"
  "$KEYFENCE" serve --data-dir "$dir/$1" --target-name "$IQN" --size 64M \
    --listen "127.0.0.1:$2" --first-tpgt "$3" \
    --cluster "$EP" --gateway "$1" --peer "$4" \
    >"$dir/$1.out" 2>"$dir/$1.log" &
  pids+=($!)
}
start_gateway gwa "$gwa_port" 1 "gwb:2:127.0.0.1:$gwb_port"
start_gateway gwb "$gwb_port" 2 "gwa:1:127.0.0.1:$gwa_port"
for g in gwa gwb; do
  for _ in $(seq 100); do
    grep -q "portal " "$dir/$g.out" 2>/dev/null && break
    sleep 0.1
  done
  grep -q "portal " "$dir/$g.out" || { echo "gateway $g did not start:" >&2; cat "$dir/$g.log" >&2; exit 1; }
done
echo "== gateway gwa"; cat "$dir/gwa.out"

A="iscsi://127.0.0.1:$gwa_port/$IQN/0"
B="iscsi://127.0.0.1:$gwb_port/$IQN/0"
N1=iqn.2026-11.io.example:node1
N2=iqn.2026-11.io.example:node2
# A gateway serves the LU once it has installed the committed state; the
# PR tools retry unit attentions but not NOT READY, so wait (bounded).
for _ in $(seq 50); do
  kf persist --initiator-name "$N2" -n -k "$B" >/dev/null 2>&1 && break
  sleep 0.2
done

echo "== node1 registers 0xa1 and reserves Write Exclusive (type 1) through gateway A ($A)"
kf persist --initiator-name "$N1" -n --out --register --param-sark=0xa1 "$A"
kf persist --initiator-name "$N1" -n --out --reserve --param-rk=0xa1 --prout-type=1 "$A"
echo "== node2 reads the keys and the reservation through gateway B ($B)"
kf persist --initiator-name "$N2" -n -k "$B"
kf persist --initiator-name "$N2" -n -r "$B"
echo "== node2 registers 0xb2 through gateway B and tries to reserve: conflict"
kf persist --initiator-name "$N2" -n --out --register --param-sark=0xb2 "$B"
if kf persist --initiator-name "$N2" -n --out --reserve --param-rk=0xb2 --prout-type=1 "$B"; then
  echo "unexpected: the reservation taken through A did not bind B" >&2
  exit 1
fi
echo "== keyfence cluster status --etcd $EP"
kf cluster status --etcd "$EP"
echo "== keyfence pr show --etcd $EP"
kf pr show --etcd "$EP"
echo "== the PR OUT log lines of gateway A"
grep "PERSISTENT RESERVE OUT" "$dir/gwa.log" || true
echo "cluster demo: OK (stopping ${#pids[@]} processes)"
