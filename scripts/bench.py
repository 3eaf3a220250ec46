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
`keyfence serve` of --binary only.
"""

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile

from targets import KeyfenceTarget, TgtTarget

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


def keyfence_bench(binary, url, rw, bs, qd, seconds):
    out = subprocess.run([binary, "bench", url, "--rw", rw, "--bs", str(bs), "--qd", str(qd),
                          "--duration", str(seconds)], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, timeout=seconds + 60, check=True)
    text = out.stdout.decode()
    m = BENCH_RE.search(text)
    if not m:
        raise RuntimeError(f"could not parse keyfence bench output: {text[-400:]}")
    return float(m.group(1)), float(m.group(2))


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


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--binary", default=os.path.join("target", "release", "keyfence"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--size", type=int, default=512 << 20)
    ap.add_argument("--no-writes", action="store_true", help="skip the write workloads")
    ap.add_argument("--baseline", metavar="BINARY",
                    help="another keyfence binary to measure in the same rounds")
    ap.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                    help="extra argument for `keyfence serve` of --binary (repeatable; "
                         "use --serve-arg=--metrics --serve-arg=127.0.0.1:0)")
    ap.add_argument("--pr", action="store_true",
                    help="measure the reservation check instead: reads with and without a "
                         "WERO reservation on keyfence")
    args = ap.parse_args()
    binary = os.path.abspath(args.binary)
    for tool in ("iscsi-perf", "tgtd", "tgtadm"):
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
    for img in (kf_img, tgt_img) + ((base_img,) if args.baseline else ()):
        copy_synced(template, img)
    os.remove(template)
    for img in (kf_img, tgt_img) + ((base_img,) if args.baseline else ()):
        read_through(img)
    kf = KeyfenceTarget(binary, os.path.join(workdir, "kf"), args.size, image=kf_img,
                        extra_args=args.serve_arg)
    tgt = TgtTarget(os.path.join(workdir, "tgt"), args.size, image=tgt_img)
    os.makedirs(kf.workdir)
    os.makedirs(tgt.workdir)
    base = None
    if args.baseline:
        base = KeyfenceTarget(os.path.abspath(args.baseline), os.path.join(workdir, "base"),
                              args.size, image=base_img)
        os.makedirs(base.workdir)

    workloads = [
        ("4k randread qd32 (IOPS)", lambda url: iscsi_perf(url, 32, 8, True, args.seconds)[0]),
        ("128k seqread qd16 (MB/s)", lambda url: iscsi_perf(url, 16, 256, False, args.seconds)[1]),
    ]
    if not args.no_writes:
        workloads += [
            ("4k randwrite qd32 (IOPS)",
             lambda url: keyfence_bench(binary, url, "randwrite", 4096, 32, args.seconds)[0]),
            ("128k seqwrite qd16 (MB/s)",
             lambda url: keyfence_bench(binary, url, "write", 131072, 16, args.seconds)[1]),
        ]
    sides = ["keyfence", "tgt"] + (["baseline"] if base else [])
    results = {name: {side: [] for side in sides} for name, _ in workloads}
    cpu = {name: {side: [] for side in sides} for name, _ in workloads}
    try:
        urls = {"keyfence": kf.start()[0], "tgt": tgt.start()[0]}
        procs = {"keyfence": kf.proc.pid}
        if base:
            urls["baseline"] = base.start()[0]
            procs["baseline"] = base.proc.pid
        for r in range(args.rounds):
            for name, run in workloads:
                # Rotate the order each round so no side always goes first.
                order = sides[r % len(sides):] + sides[:r % len(sides)]
                for side, url in ((s, urls[s]) for s in order):
                    pid = procs.get(side)
                    c0 = process_cpu(pid)
                    v = run(url)
                    results[name][side].append(v)
                    if pid is not None and v > 0:
                        # Target CPU per unit of work (IO or MB).
                        cpu[name][side].append((process_cpu(pid) - c0) / (v * args.seconds))
                    print(f"round {r + 1}: {name:<26} {side:<8} {v:>10.0f}", file=sys.stderr,
                          flush=True)
    finally:
        kf.stop()
        tgt.stop()
        if base:
            base.stop()
        shutil.rmtree(workdir, ignore_errors=True)

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
