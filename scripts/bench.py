#!/usr/bin/env python3
"""Benchmark keyfence against Debian's tgtd in the same run.

Both targets serve a LUN backed by a file of the same size and content on
loopback. libiscsi's iscsi-perf drives reads (4 KiB random at queue depth 32,
128 KiB sequential at queue depth 16); `keyfence bench` drives writes. Rounds
alternate between the targets so drift on a noisy machine hits both; the
table reports the median of each side and the ratio keyfence / tgt.

--baseline BINARY adds a second keyfence (e.g. the build before a change) to
the same alternating rounds, with its own columns, the ratio of the two
keyfence builds and the ratio of the CPU time their processes spent per IO; --serve-arg passes arguments (e.g. --metrics 127.0.0.1:0) to
`keyfence serve` of --binary only, --baseline-serve-arg to that of the
baseline. The baseline may be the same binary: then the two keyfence
columns compare two ways of serving (e.g. with and without --metrics) in
the same rounds. --no-tgt leaves tgtd out of such a comparison: the two
keyfence sides then run back to back in every round, in alternating order
(ABBA), and each round's ratio of the two is reported too (their median
and spread), which cancels drift in the machine's load better than the
ratio of the medians; the load average at the start and end is printed.

--cluster compares cluster mode (a three-member etcd on loopback, two
gateways over one file) with single-node mode instead, in one run: 4 KiB
random reads through gateway A against a single-node target with the same
caching (`direct = true`: both O_DIRECT, each on its own copy of the file
on disk), on tmpfs (both from memory), and, for reference, against a
single-node target reading the disk file through the page cache; PR OUT
latency (`keyfence bench --rw register`, one command at a time); COMPARE
AND WRITE latency (`keyfence bench --rw caw`, one at a time; clustered, each
takes the LU's etcd lock and fdatasyncs before releasing it); and the time
from a fence decision to the victim's first write refused with
RESERVATION CONFLICT, the victim writing through one gateway (portal) and
the fencer running fence_keyfence through the other.
"""

import argparse
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from targets import (KEYFENCE_IQN, ClusterTarget, KeyfenceTarget, TgtTarget, _stop, free_port,
                     wait_banner)

PERF_RE = re.compile(r"iops average (\d+) \((\d+) MB/s\)\s*$")


def iscsi_perf(url, qd, blocks, random, seconds):
    args = ["iscsi-perf", "-m", str(qd), "-b", str(blocks), "-t", str(seconds)]
    if random:
        args.append("-r")
    out = subprocess.run(args + [url], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         timeout=seconds + 30).stdout.decode("utf-8", "replace")
    # iscsi-perf redraws one line with carriage returns; the last one is the total.
    last = out.replace("\r", "\n").strip().splitlines()
    for line in reversed(last):
        m = PERF_RE.search(line)
        if m:
            return int(m.group(1)), int(m.group(2))
    raise RuntimeError(f"could not parse iscsi-perf output: {out[-400:]}")


BENCH_RE = re.compile(r"iops=(\d+(?:\.\d+)?)\s.*?mbps=(\d+(?:\.\d+)?)")
LAT_RE = re.compile(r"lat_p50_us=(\d+) lat_p99_us=(\d+)")


def keyfence_bench(binary, url, rw, bs, qd, seconds):
    out = subprocess.run([binary, "bench", url, "--rw", rw, "--bs", str(bs), "--qd", str(qd),
                          "--duration", str(seconds)], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, timeout=seconds + 60, check=True)
    text = out.stdout.decode()
    m = BENCH_RE.search(text)
    if not m:
        raise RuntimeError(f"could not parse keyfence bench output: {text[-400:]}")
    return float(m.group(1)), float(m.group(2))


def pr_latency(binary, url, seconds):
    """PR OUT REGISTER AND IGNORE EXISTING KEY, one at a time, a new key each:
    (commands per second, p50 us, p99 us)."""
    out = subprocess.run([binary, "bench", url, "--rw", "register", "--qd", "1",
                          "--duration", str(seconds), "--initiator-name",
                          "iqn.2026-11.io.keyfence:bench-pr"], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, timeout=seconds + 60, check=True)
    text = out.stdout.decode()
    m, lat = BENCH_RE.search(text), LAT_RE.search(text)
    if not (m and lat):
        raise RuntimeError(f"could not parse keyfence bench output: {text[-400:]}")
    return float(m.group(1)), int(lat.group(1)), int(lat.group(2))


def caw_latency(binary, url, bs, seconds):
    """COMPARE AND WRITE of one `bs`-byte range, one at a time, each one
    matching (a MISCOMPARE fails): (commands per second, p50 us, p99 us)."""
    out = subprocess.run([binary, "bench", url, "--rw", "caw", "--qd", "1", "--bs", str(bs),
                          "--duration", str(seconds), "--initiator-name",
                          "iqn.2026-11.io.keyfence:bench-caw"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, timeout=seconds + 60)
    text = out.stdout.decode()
    m, lat = BENCH_RE.search(text), LAT_RE.search(text)
    if out.returncode != 0 or not (m and lat):
        raise RuntimeError(f"keyfence bench --rw caw failed: {out.stderr.decode()[-400:]}")
    return float(m.group(1)), int(lat.group(1)), int(lat.group(2))


def fence_rounds(binary, victim_url, fencer_url, rounds, workdir):
    """Fence a writing victim `rounds` times: the victim's `keyfence fence
    writer` writes through `victim_url`, the fencer runs fence_keyfence -o off
    through `fencer_url` at a random moment. Per round: ms from the decision
    to PREEMPT AND ABORT's GOOD and to the victim's first write refused with
    RESERVATION CONFLICT, and whether a write of the victim in flight at the
    preempt was aborted (it gets no status: the writer's 1 s command timeout
    runs out first). Fails if a write of the victim issued after the preempt
    was acknowledged."""
    os.makedirs(workdir, exist_ok=True)
    agent = os.path.join(workdir, "fence_keyfence")
    if not os.path.lexists(agent):
        os.symlink(binary, agent)
    names = {"victim": "iqn.2026-11.io.keyfence:bench-victim",
             "fencer": "iqn.2026-11.io.keyfence:bench-fencer"}
    keys = {"victim": "0x7b01", "fencer": "0x7b02"}
    urls = {"victim": victim_url, "fencer": fencer_url}
    results = []
    for r in range(rounds):
        d = os.path.join(workdir, f"r{r}")
        os.makedirs(d)
        for who in ("fencer", "victim"):
            subprocess.run([binary, "fence", "agent", "-o", "on", "-k", keys[who], "-d", urls[who],
                            "--initiator-name", names[who], "--store-path",
                            os.path.join(d, f"store-{who}"), "--timeout", "5"],
                           check=True, stdout=subprocess.DEVNULL, timeout=60)
        hb, log, stop = (os.path.join(d, x) for x in ("hb", "log", "stop"))
        writer = subprocess.Popen(
            [binary, "fence", "writer", "--device", victim_url, "--node", "0", "--key",
             keys["victim"], "--region-lba", "0", "--region-blocks", "256", "--initiator-name",
             names["victim"], "--heartbeat", hb, "--cut", os.path.join(d, "cut"), "--stop", stop,
             "--log", log, "--max-ms", "60000", "--timeout-ms", "1000"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 20
            while True:
                try:
                    with open(hb) as f:
                        if int(f.read().split()[0]) >= 20:
                            break
                except (OSError, ValueError, IndexError):
                    pass
                if time.monotonic() > deadline or writer.poll() is not None:
                    raise RuntimeError("the victim's writer did not start writing")
                time.sleep(0.005)
            time.sleep(random.uniform(0, 0.2))
            # Python's time.monotonic_ns is CLOCK_MONOTONIC, the writer's clock.
            t_decide = time.monotonic_ns()
            out = subprocess.run([agent, "-o", "off", "-k", keys["victim"], "-d", fencer_url,
                                  "-v", "--initiator-name", names["fencer"], "--timeout", "20"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
            if out.returncode != 0:
                raise RuntimeError(f"fence_keyfence failed: {out.stderr.decode()[-400:]}")
            m = re.search(r"completed at monotonic (\d+)", out.stderr.decode())
            if not m:
                raise RuntimeError("fence_keyfence printed no preempt time")
            t_preempted = int(m.group(1))
            deadline = time.monotonic() + 10
            refused = None
            while refused is None and time.monotonic() < deadline:
                time.sleep(0.01)
                lines = parse_writer_log(log)
                refused = next((l for l in lines if l[0] == "refused" and l[4] >= t_decide
                                and l[5] == "RESERVATION CONFLICT"), None)
            if refused is None:
                raise RuntimeError("no write of the victim refused within 10 s of fencing")
        finally:
            open(stop, "w").close()
            try:
                writer.wait(timeout=20)
            except subprocess.TimeoutExpired:
                writer.kill()
                writer.wait()
        lines = parse_writer_log(log)
        late = [l for l in lines if l[0] == "ack" and l[2] > t_preempted]
        if late:
            raise RuntimeError(f"round {r}: a write of the victim issued after the preempt "
                               f"was acknowledged: {late[0]}")
        aborted = any(l[0] == "refused" and t_decide <= l[4] <= refused[4]
                      and l[5].startswith("timed out") for l in lines)
        results.append(((t_preempted - t_decide) / 1e6, (refused[4] - t_decide) / 1e6, aborted))
    return results


def etcd_put_latency(endpoint, seconds):
    """Latency of single etcd writes (one at a time, over etcd's JSON gateway
    on one keep-alive connection): what every cluster commit and ack costs at
    least. Returns (p50 us, p99 us)."""
    import base64
    import http.client
    import json
    from urllib.parse import urlparse
    u = urlparse(endpoint)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    key = base64.b64encode(b"/kf-bench/put-latency").decode()
    lat = []
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            body = json.dumps({"key": key, "value": base64.b64encode(os.urandom(16)).decode()})
            t0 = time.monotonic_ns()
            conn.request("POST", "/v3/kv/put", body, {"Content-Type": "application/json"})
            r = conn.getresponse()
            r.read()
            if r.status != 200:
                raise RuntimeError(f"etcd put: HTTP {r.status}")
            lat.append((time.monotonic_ns() - t0) / 1e3)
        conn.request("POST", "/v3/kv/deleterange", json.dumps({"key": key}),
                     {"Content-Type": "application/json"})
        conn.getresponse().read()
    finally:
        conn.close()
    return pct(lat, 50), pct(lat, 99)


def parse_writer_log(path):
    """(outcome, seq, t_issue, lba, t_done, error) per line of a writer log."""
    out = []
    try:
        with open(path) as f:
            for line in f:
                p = line.rstrip("\n").split(" ", 5)
                if len(p) >= 5:
                    out.append((p[0], int(p[1]), int(p[3]), int(p[2]), int(p[4]),
                                p[5] if len(p) > 5 else ""))
    except OSError:
        pass
    return out


def pct(values, p):
    """Nearest-rank percentile."""
    v = sorted(values)
    return v[min(len(v), max(1, -(-len(v) * p // 100))) - 1]


class ConfiguredSingle:
    """A single-node `keyfence serve` from a configuration file (two portals),
    for a block size the command line cannot set."""

    def __init__(self, binary, workdir, size, image, block_size, direct=False):
        self.binary, self.workdir, self.size = binary, workdir, size
        self.image, self.block_size, self.direct = image, block_size, direct
        self.proc = None

    def start(self):
        conf = os.path.join(self.workdir, "keyfence.toml")
        with open(conf, "w") as f:
            f.write(f'data_dir = "{self.workdir}"\n\n[[target]]\nname = "{KEYFENCE_IQN}"\n'
                    'portals = ["127.0.0.1:0", "127.0.0.1:0"]\nopen = true\n\n[[target.lun]]\n'
                    f'id = 0\npath = "{self.image}"\nsize = {self.size}\n'
                    f'block_size = {self.block_size}\n'
                    f'direct = {"true" if self.direct else "false"}\n')
        log_path = os.path.join(self.workdir, "keyfence.log")
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen([self.binary, "serve", "--config", conf, "--log-level", "warn"],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        ports = wait_banner(log_path, self.proc, 2)
        return [f"iscsi://127.0.0.1:{p}/{KEYFENCE_IQN}/0" for p in ports]

    def stop(self):
        _stop(self.proc, "keyfence serve")


class ConfiguredCluster(ClusterTarget):
    """ClusterTarget whose gateways are started from configuration files, for
    a block size the command line cannot set (tmpfs needs 4096-byte aligned
    direct I/O)."""

    def __init__(self, binary, workdir, size, etcd, block_size):
        super().__init__(binary, workdir, size, etcd=etcd)
        self.block_size = block_size

    def _start_gateways(self):
        shared = os.path.join(self.workdir, "shared.img")
        ports = [free_port(), free_port()]
        endpoints = ", ".join(f'"{e}"' for e in self.endpoints.split(","))
        for i, name in enumerate(["gwa", "gwb"]):
            data = os.path.join(self.workdir, name)
            os.makedirs(data, exist_ok=True)
            conf = os.path.join(data, "keyfence.toml")
            with open(conf, "w") as f:
                f.write(f'data_dir = "{data}"\n\n[[target]]\nname = "{KEYFENCE_IQN}"\n'
                        f'portals = ["127.0.0.1:{ports[i]}"]\nfirst_tpgt = {i + 1}\nopen = true\n'
                        f'\n[[target.lun]]\nid = 0\npath = "{shared}"\nsize = {self.size}\n'
                        f'block_size = {self.block_size}\n\n[cluster]\nendpoints = [{endpoints}]\n'
                        f'gateway = "{name}"\n')
            log_path = os.path.join(self.workdir, f"{name}.log")
            proc = subprocess.Popen([self.binary, "serve", "--config", conf, "--log-level", "warn"],
                                    stdout=open(log_path, "w"), stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)
            self.gateways.append(proc)
            wait_banner(log_path, proc, 1)
        return ports


def cluster_vs_single(binary, etcd, args):
    """Cluster mode against single-node mode, side by side in one run."""
    load0 = os.getloadavg()
    reads = {}
    cpu = {}
    pr = {"single-node": [], "cluster": []}
    caw = {}
    puts = []
    fences = {}
    for storage in ("disk", "tmpfs"):
        workdir = tempfile.mkdtemp(prefix="kf-bench-", dir="/dev/shm" if storage == "tmpfs" else None)
        targets = []
        try:
            os.makedirs(os.path.join(workdir, "cluster"))
            os.makedirs(os.path.join(workdir, "single"))
            single_img = os.path.join(workdir, "single.img")
            make_image(single_img, args.size)
            make_image(os.path.join(workdir, "cluster", "shared.img"), args.size)
            # The page-cache single-node LU starts warm.
            read_through(single_img)
            if storage == "disk":
                # The same caching as a clustered LU: uncached, on its own
                # copy (a clustered file cannot be served single-node at
                # the same time), on the same file system.
                os.makedirs(os.path.join(workdir, "direct"))
                direct_img = os.path.join(workdir, "direct.img")
                make_image(direct_img, args.size)
                single = KeyfenceTarget(binary, os.path.join(workdir, "single"), args.size,
                                        image=single_img, extra_args=["--log-level", "warn"])
                direct = ConfiguredSingle(binary, os.path.join(workdir, "direct"), args.size,
                                          direct_img, 512, direct=True)
                cl = ClusterTarget(binary, os.path.join(workdir, "cluster"), args.size, etcd=etcd)
                blocks, block_size = 8, 512
                sides = ["single-node direct", "cluster", "single-node cached"]
                started = {"single-node cached": single, "single-node direct": direct,
                           "cluster": cl}
            else:
                # Direct I/O on tmpfs needs 4096-byte alignment: 4096-byte
                # blocks on both sides.
                single = ConfiguredSingle(binary, os.path.join(workdir, "single"), args.size,
                                          single_img, 4096)
                cl = ConfiguredCluster(binary, os.path.join(workdir, "cluster"), args.size, etcd,
                                       4096)
                blocks, block_size = 1, 4096
                sides = ["single-node cached", "cluster"]
                started = {"single-node cached": single, "cluster": cl}
            urls, pids = {}, {}
            for side in sides:
                t = started[side]
                urls[side] = t.start()
                targets.append(t)
                pids[side] = t.gateways[0].pid if t is cl else t.proc.pid
            reads[storage] = {s: [] for s in sides}
            cpu[storage] = {s: [] for s in sides}
            for r in range(args.rounds):
                # Rotate the order each round so no side always goes first.
                order = sides[r % len(sides):] + sides[:r % len(sides)]
                for side in order:
                    c0 = process_cpu(pids[side])
                    v = iscsi_perf(urls[side][0], 32, blocks, True, args.seconds)[0]
                    reads[storage][side].append(v)
                    if v > 0:
                        cpu[storage][side].append(
                            (process_cpu(pids[side]) - c0) * 1e6 / (v * args.seconds))
                    print(f"round {r + 1}: {storage:<5} 4k randread qd32 {side:<18} {v:>8}",
                          file=sys.stderr, flush=True)
                if storage != "disk":
                    continue
                p50, p99 = etcd_put_latency(cl.endpoints.split(",")[0], min(args.seconds, 3))
                puts.append((p50, p99))
                print(f"round {r + 1}: etcd put p50 {p50:.0f} us p99 {p99:.0f} us",
                      file=sys.stderr, flush=True)
                for side in ("single-node cached", "cluster")[::1 if r % 2 == 0 else -1]:
                    ops, p50, p99 = pr_latency(binary, urls[side][0], args.seconds)
                    pr["single-node" if side != "cluster" else side].append((ops, p50, p99))
                    print(f"round {r + 1}: PR OUT register qd1 {side:<18} {ops:>8.0f}/s "
                          f"p50 {p50} us p99 {p99} us", file=sys.stderr, flush=True)
                for side in order:
                    ops, p50, p99 = caw_latency(binary, urls[side][0], block_size, args.seconds)
                    caw.setdefault(side, []).append((ops, p50, p99))
                    print(f"round {r + 1}: COMPARE AND WRITE qd1 {side:<18} {ops:>8.0f}/s "
                          f"p50 {p50} us p99 {p99} us", file=sys.stderr, flush=True)
            if storage == "disk":
                for side, url in (("single-node", urls["single-node cached"]),
                                  ("cluster", urls["cluster"])):
                    fences[side] = fence_rounds(binary, url[0], url[1], args.fence_rounds,
                                                os.path.join(workdir, f"fence-{side}"))
                    f = fences[side]
                    print(f"fence {side}: {len(f)} rounds, decision -> first conflict p50 "
                          f"{pct([x[1] for x in f], 50):.1f} ms", file=sys.stderr, flush=True)
        finally:
            for t in targets:
                t.stop()
            shutil.rmtree(workdir, ignore_errors=True)
    load1 = os.getloadavg()

    print("\n| 4 KiB random read, QD 32 | single-node (IOPS) | cluster, gateway A (IOPS) "
          "| cluster / single | target CPU per IO, single / cluster (us) |\n|---|---:|---:|---:|---:|")

    def read_row(name, storage, side):
        s = statistics.median(reads[storage][side])
        c = statistics.median(reads[storage]["cluster"])
        cs = statistics.median(cpu[storage][side] or [0])
        cc = statistics.median(cpu[storage]["cluster"] or [0])
        print(f"| {name} | {s:.0f} | {c:.0f} | {c / s:.3f} | {cs:.1f} / {cc:.1f} |")

    read_row("file on disk, both uncached (single-node direct = true, cluster O_DIRECT)",
             "disk", "single-node direct")
    read_row("file on tmpfs, 4096-byte blocks (both from memory)", "tmpfs", "single-node cached")
    read_row("for reference: file on disk, single-node through the page cache, cluster O_DIRECT",
             "disk", "single-node cached")
    print("\n| PR OUT REGISTER AND IGNORE EXISTING KEY, QD 1 | single-node | cluster |"
          "\n|---|---:|---:|")
    for i, name in ((1, "p50 latency (us)"), (2, "p99 latency (us)"), (0, "commands per second")):
        print(f"| {name} | {statistics.median(x[i] for x in pr['single-node']):.0f} "
              f"| {statistics.median(x[i] for x in pr['cluster']):.0f} |")
    print(f"| for scale: one etcd write (put), p50 / p99 (us) | | "
          f"{statistics.median(x[0] for x in puts):.0f} / {statistics.median(x[1] for x in puts):.0f} |")
    print("\n| COMPARE AND WRITE, 512 bytes, QD 1, file on disk | single-node cached "
          "| single-node direct | cluster |\n|---|---:|---:|---:|")
    for i, name in ((1, "p50 latency (us)"), (2, "p99 latency (us)"), (0, "commands per second")):
        print(f"| {name} | " + " | ".join(
            f"{statistics.median(x[i] for x in caw[side]):.0f}"
            for side in ("single-node cached", "single-node direct", "cluster")) + " |")
    print("\n| fence decision -> (ms) | single-node: p50 / p99 / max | cluster: p50 / p99 / max |"
          "\n|---|---:|---:|")

    def row(side, sel):
        v = [sel(x) for x in fences[side] if sel(x) is not None]
        if not v:
            return "n/a"
        return f"{pct(v, 50):.1f} / {pct(v, 99):.1f} / {max(v):.1f} ({len(v)})"

    for name, sel in (("PREEMPT AND ABORT GOOD", lambda x: x[0]),
                      ("victim's first RESERVATION CONFLICT", lambda x: x[1]),
                      ("... rounds without an aborted write in flight",
                       lambda x: x[1] if not x[2] else None),
                      ("... rounds with one (no status, 1 s command timeout first)",
                       lambda x: x[1] if x[2] else None)):
        print(f"| {name} | {row('single-node', sel)} | {row('cluster', sel)} |")
    print(f"\n({args.rounds} rounds of {args.seconds} s in rotating order, medians; "
          f"{args.size >> 20} MiB LU, each side on its own copy; {args.fence_rounds} fence "
          f"rounds per side, the victim through gateway/portal A, the fencer through B; "
          f"single-node PR OUT and fencing on the page-cache target; etcd: three members on "
          f"loopback, data on disk; load average {load0[0]:.2f} before, {load1[0]:.2f} after)")
    return 0


def persist(binary, url, initiator, *args):
    """One sg_persist-compatible PR OUT through `keyfence persist`."""
    subprocess.run([binary, "persist", "--initiator-name", initiator, "--no-inquiry", "--out",
                    *args, url], check=True, stdout=subprocess.DEVNULL, timeout=30)


def pr_fast_path(binary, workdir, size, rounds, seconds):
    """4 KiB random reads with a Write Exclusive - Registrants Only reservation
    held and two registrants, against no reservation, on the same target."""
    img = os.path.join(workdir, "pr.img")
    make_image(img, size)
    kf = KeyfenceTarget(binary, os.path.join(workdir, "pr"), size, image=img)
    os.makedirs(kf.workdir)
    a, b = "iqn.2026-11.io.keyfence:bench-a", "iqn.2026-11.io.keyfence:bench-b"
    free, held = [], []
    try:
        url = kf.start()[0]
        for r in range(rounds):
            for state in ("none", "WERO"):
                if state == "WERO":
                    persist(binary, url, a, "--register", "--param-sark=0xa")
                    persist(binary, url, b, "--register", "--param-sark=0xb")
                    persist(binary, url, a, "--reserve", "--param-rk=0xa", "--prout-type=5")
                v = iscsi_perf(url, 32, 8, True, seconds)[0]
                (held if state == "WERO" else free).append(v)
                print(f"round {r + 1}: 4k randread qd32 reservation={state:<5} {v:>8}",
                      file=sys.stderr, flush=True)
                if state == "WERO":
                    persist(binary, url, a, "--clear", "--param-rk=0xa")
    finally:
        kf.stop()
    f, h = statistics.median(free), statistics.median(held)
    print("\n| PR fast path: 4k randread qd32 | IOPS |\n|---|---:|")
    print(f"| no reservation | {f:.0f} |\n| WERO held, two registrants | {h:.0f} |")
    print(f"| ratio (held / none) | {h / f:.3f} |")
    print(f"\n({rounds} alternating rounds of {seconds} s, medians)")


def process_cpu(pid):
    """User + system CPU seconds of process `pid` (None: 0)."""
    if pid is None:
        return 0.0
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def copy_synced(src, dst):
    shutil.copyfile(src, dst)
    with open(dst, "rb+") as f:
        os.fsync(f.fileno())


def read_through(path):
    with open(path, "rb") as f:
        while f.read(1 << 20):
            pass


def make_image(path, size):
    """A file of `size` bytes of pseudo-random data, so reads touch real pages."""
    chunk = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for _ in range(size >> 20):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())


def print_pairs(workloads, results, per_round, args, load0, load1):
    """The --no-tgt table: medians, the ratio of the medians, and the median
    (and range) of the per-round ratios of the two keyfence sides, for the
    result and for the target's CPU per unit of work."""

    def spread(ratios):
        if not ratios:
            return "n/a"
        return f"{statistics.median(ratios):.3f}x ({min(ratios):.3f}-{max(ratios):.3f})"

    print("\n| workload | keyfence | baseline | keyfence/baseline | per round: median (range) "
          "| target CPU per unit, keyfence/baseline, per round: median (range) |"
          "\n|---|---:|---:|---:|---:|---:|")
    for name, _ in workloads:
        k = statistics.median(results[name]["keyfence"])
        b = statistics.median(results[name]["baseline"])
        rounds = per_round[name]
        ratio = [x["keyfence"][0] / x["baseline"][0] for x in rounds if x["baseline"][0] > 0]
        cpu = [x["keyfence"][1] / x["baseline"][1] for x in rounds
               if x["keyfence"][1] and x["baseline"][1]]
        print(f"| {name} | {k:.0f} | {b:.0f} | {k / b:.3f}x | {spread(ratio)} | {spread(cpu)} |")
    print(f"\n({args.rounds} rounds of {args.seconds} s, the two sides back to back in "
          f"alternating order, medians; {args.size >> 20} MiB file-backed LUN on each, loopback; "
          f"load average {load0[0]:.2f} at the start, {load1[0]:.2f} at the end)")
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--binary", default=os.path.join("target", "release", "keyfence"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--size", type=int, default=512 << 20)
    ap.add_argument("--no-writes", action="store_true", help="skip the write workloads")
    ap.add_argument("--writes-only", action="store_true", help="skip the read workloads")
    ap.add_argument("--baseline", metavar="BINARY",
                    help="another keyfence binary to measure in the same rounds")
    ap.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                    help="extra argument for `keyfence serve` of --binary (repeatable; "
                         "use --serve-arg=--metrics --serve-arg=127.0.0.1:0)")
    ap.add_argument("--cluster", action="store_true",
                    help="compare cluster mode (three-member etcd, two gateways) with "
                         "single-node mode instead of keyfence with tgt")
    ap.add_argument("--fence-rounds", type=int, default=20,
                    help="fence decisions per side with --cluster")
    ap.add_argument("--etcd", default=shutil.which("etcd") or "/usr/bin/etcd",
                    help="etcd binary for --cluster")
    ap.add_argument("--baseline-serve-arg", action="append", default=[], metavar="ARG",
                    help="extra argument for `keyfence serve` of --baseline (repeatable)")
    ap.add_argument("--no-tgt", action="store_true",
                    help="with --baseline: measure only the two keyfence sides, back to back "
                         "in alternating order, with per-round ratios")
    ap.add_argument("--pr", action="store_true",
                    help="measure the reservation check instead: reads with and without a "
                         "WERO reservation on keyfence")
    args = ap.parse_args()
    binary = os.path.abspath(args.binary)
    if args.cluster:
        if shutil.which("iscsi-perf") is None:
            print("iscsi-perf not found: run scripts/install-deps.sh", file=sys.stderr)
            return 2
        if not os.access(args.etcd, os.X_OK):
            print(f"etcd not found ({args.etcd}): apt-get install etcd-server", file=sys.stderr)
            return 2
        return cluster_vs_single(binary, args.etcd, args)
    if args.no_tgt and not args.baseline:
        print("--no-tgt compares --binary with --baseline: give --baseline", file=sys.stderr)
        return 2
    for tool in ("iscsi-perf",) + (() if args.no_tgt else ("tgtd", "tgtadm")):
        if shutil.which(tool) is None:
            print(f"{tool} not found: run scripts/install-deps.sh", file=sys.stderr)
            return 2

    workdir = tempfile.mkdtemp(prefix="kf-bench-")
    if args.pr:
        try:
            pr_fast_path(binary, workdir, args.size, args.rounds, args.seconds)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        return 0
    # Every side gets a copy of one image made the same way, written back
    # and then read once, so that no side starts with its file dirty or
    # out of the page cache (a 4 KiB write to an uncached page waits for a
    # read of it: that alone made one side 3x slower).
    template = os.path.join(workdir, "template.img")
    make_image(template, args.size)
    kf_img = os.path.join(workdir, "kf.img")
    tgt_img = os.path.join(workdir, "tgt.img")
    base_img = os.path.join(workdir, "base.img")
    images = (kf_img,) + (() if args.no_tgt else (tgt_img,)) + ((base_img,) if args.baseline else ())
    for img in images:
        copy_synced(template, img)
    os.remove(template)
    for img in images:
        read_through(img)
    kf = KeyfenceTarget(binary, os.path.join(workdir, "kf"), args.size, image=kf_img,
                        extra_args=args.serve_arg)
    tgt = None if args.no_tgt else TgtTarget(os.path.join(workdir, "tgt"), args.size, image=tgt_img)
    os.makedirs(kf.workdir)
    if tgt:
        os.makedirs(tgt.workdir)
    base = None
    if args.baseline:
        base = KeyfenceTarget(os.path.abspath(args.baseline), os.path.join(workdir, "base"),
                              args.size, image=base_img, extra_args=args.baseline_serve_arg)
        os.makedirs(base.workdir)

    if args.no_writes and args.writes_only:
        print("--no-writes and --writes-only leave nothing to measure", file=sys.stderr)
        return 2
    workloads = []
    if not args.writes_only:
        workloads += [
            ("4k randread qd32 (IOPS)",
             lambda url: iscsi_perf(url, 32, 8, True, args.seconds)[0]),
            ("128k seqread qd16 (MB/s)",
             lambda url: iscsi_perf(url, 16, 256, False, args.seconds)[1]),
        ]
    if not args.no_writes:
        workloads += [
            ("4k randwrite qd32 (IOPS)",
             lambda url: keyfence_bench(binary, url, "randwrite", 4096, 32, args.seconds)[0]),
            ("128k seqwrite qd16 (MB/s)",
             lambda url: keyfence_bench(binary, url, "write", 131072, 16, args.seconds)[1]),
        ]
    sides = ["keyfence"] + ([] if args.no_tgt else ["tgt"]) + (["baseline"] if base else [])
    results = {name: {side: [] for side in sides} for name, _ in workloads}
    cpu = {name: {side: [] for side in sides} for name, _ in workloads}
    # Per round, each side's (result, target CPU per unit or None), for --no-tgt.
    per_round = {name: [] for name, _ in workloads}
    load0 = os.getloadavg()
    try:
        urls = {"keyfence": kf.start()[0]}
        if tgt:
            urls["tgt"] = tgt.start()[0]
        procs = {"keyfence": kf.proc.pid}
        if base:
            urls["baseline"] = base.start()[0]
            procs["baseline"] = base.proc.pid
        for r in range(args.rounds):
            for name, run in workloads:
                # Rotate the order each round so no side always goes first
                # (with two sides: ABBA).
                order = sides[r % len(sides):] + sides[:r % len(sides)]
                this_round = {}
                for side, url in ((s, urls[s]) for s in order):
                    pid = procs.get(side)
                    c0 = process_cpu(pid)
                    v = run(url)
                    results[name][side].append(v)
                    c = None
                    if pid is not None and v > 0:
                        # Target CPU per unit of work (IO or MB).
                        c = (process_cpu(pid) - c0) / (v * args.seconds)
                        cpu[name][side].append(c)
                    this_round[side] = (v, c)
                    print(f"round {r + 1}: {name:<26} {side:<8} {v:>10.0f}", file=sys.stderr,
                          flush=True)
                per_round[name].append(this_round)
    finally:
        kf.stop()
        if tgt:
            tgt.stop()
        if base:
            base.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    if args.no_tgt:
        return print_pairs(workloads, results, per_round, args, load0, os.getloadavg())
    if base:
        print("\n| workload | keyfence | baseline | tgt | keyfence/tgt | baseline/tgt "
              "| keyfence/baseline |\n|---|---:|---:|---:|---:|---:|---:|")
    else:
        print(f"\n| workload | keyfence | tgt | ratio |\n|---|---:|---:|---:|")
    for name, _ in workloads:
        k = statistics.median(results[name]["keyfence"])
        t = statistics.median(results[name]["tgt"])
        if base:
            b = statistics.median(results[name]["baseline"])
            print(f"| {name} | {k:.0f} | {b:.0f} | {t:.0f} | {k / t:.2f}x | {b / t:.2f}x "
                  f"| {k / b:.3f}x |")
        else:
            print(f"| {name} | {k:.0f} | {t:.0f} | {k / t:.2f}x |")
    if base:
        # Throughput swings with whatever else the machine runs; the CPU the
        # target process spends per IO (or per MB) is steadier.
        print("\n| workload | keyfence/baseline target CPU per unit of work |\n|---|---:|")
        for name, _ in workloads:
            k = statistics.median(cpu[name]["keyfence"])
            b = statistics.median(cpu[name]["baseline"])
            print(f"| {name} | {k / b:.3f} |")
    print(f"\n({args.rounds} alternating rounds of {args.seconds} s, medians; "
          f"{args.size >> 20} MiB file-backed LUN on each target, loopback)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
