#!/usr/bin/env python3
"""Run libiscsi's conformance suite (iscsi-test-cu) against keyfence or tgt.

Starts the target under test on free loopback ports (two portal groups, so
the second URL drives the multipath suites), runs
`iscsi-test-cu -d --test=ALL URL1 URL2`, parses every test's outcome and
prints per-suite and total counts.

Exit status: 0 when no test outside the excluded suites failed (by default
the PR suites are not excluded: pass --exclude to set them), 1 otherwise,
2 when the run itself could not be done or was not complete: iscsi-test-cu
killed by a signal, exiting with a status other than CUnit's 0 (no failure)
or 1 (failures), exiting 1 without a failed test, not reaching the end of
its run, or fewer tests than --min-tests. The last line printed is always
`conformance: N passed, N failed, N skipped`.

--cluster runs keyfence in cluster mode instead: a three-member etcd on
loopback and two gateways over one backing file, the two URLs on different
gateways, and iscsi-test-cu's PR suites (Prin*, Prout*, Reserve6) and the
multipath suite (MultipathIO), one run per suite against the same cluster
(--test: a comma-separated list of suites to run instead).

--acl (keyfence only) serves the target with initiator ACLs instead of
`open = true`: only iscsi-test-cu's two initiator names (passed to it
explicitly with -i/-I; the second is the one its multipath tests use) may
log in, each through an explicit LUN 0 mapping.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

from targets import ClusterTarget, KeyfenceTarget, TgtTarget

PR_SUITES = ("Prin", "Prout", "Reserve6")
# What --cluster runs: every PR suite and the multipath suite.
CLUSTER_SUITES = ("ALL.PrinReadKeys", "ALL.PrinServiceactionRange", "ALL.PrinReportCapabilities",
                  "ALL.ProutRegister", "ALL.ProutReserve", "ALL.ProutClear", "ALL.ProutPreempt",
                  "ALL.Reserve6", "ALL.MultipathIO")
# Tests in CLUSTER_SUITES today; fewer means suites went missing.
CLUSTER_TESTS = 31
# The initiator names iscsi-test-cu uses (its -i and -I defaults).
INITIATOR_NAMES = ("iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-test",
                   "iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-test-2")


TEST_RE = re.compile(r"^  Test: (\S+) \.\.\.(.*)$")
OUTCOME_RE = re.compile(r"(?:^|\.\.\.)\s*(passed|FAILED)\b")
SUMMARY_RE = re.compile(r"^\s+tests\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)")
# iscsi-test-cu prints this after CUnit's run; missing means it never got
# there (setup error) or died during the run.
COMPLETED_RE = re.compile(r"^Tests completed with return value: ", re.M)
# Tests in `--test=ALL` today (191 passed + 39 skipped for keyfence, with the
# ReadOnly suite from its second pass; tgt reports the same 230). Fewer
# means suites went missing, not that the target got better.
ALL_TESTS = 230


def parse(text):
    """Return ([(suite, test, outcome, detail)], summary) from CUnit's verbose output.

    CUnit prints `  Test: NAME ...` when a test starts and `passed` or
    `FAILED` when it ends (on the same line or a later one); libiscsi prints
    `[SKIPPED] reason` in between for a feature the target does not have.
    """
    results = []
    suite = None
    current = None  # [suite, test, skipped_reason, failure_messages]

    def finish(outcome):
        nonlocal current
        s, t, skip, fails = current
        if outcome == "FAILED":
            results.append((s, t, "failed", "; ".join(fails) or "failed"))
        elif skip:
            results.append((s, t, "skipped", skip))
        else:
            results.append((s, t, "passed", ""))
        current = None

    def scan(fragment):
        if current is None:
            return
        m = re.search(r"\[SKIPPED\]\s*(.*)", fragment)
        if m and not current[2]:
            current[2] = m.group(1).strip() or "skipped"
        m = re.search(r"\[FAILED\]\s*(.*)", fragment)
        if m:
            current[3].append(m.group(1).strip())
        m = OUTCOME_RE.search(fragment)
        if m:
            finish(m.group(1))

    summary = None
    for line in text.splitlines():
        if line.startswith("Suite: "):
            suite = line[len("Suite: "):].strip()
            continue
        m = TEST_RE.match(line)
        if m:
            if current is not None:  # no outcome seen: treat as failed
                finish("FAILED")
            current = [suite, m.group(1), None, []]
            scan(m.group(2))
            continue
        m = SUMMARY_RE.match(line)
        if m:
            summary = dict(zip(("total", "ran", "passed", "failed", "inactive"),
                               map(int, m.groups())))
            continue
        scan(line)
    if current is not None:
        finish("FAILED")
    return results, summary


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peer", choices=["keyfence", "tgt"], default="keyfence")
    ap.add_argument("--binary", default=os.path.join("target", "release", "keyfence"))
    ap.add_argument("--size", type=int, default=256 * 1024 * 1024)
    ap.add_argument("--exclude", action="append", default=[],
                    help="suite name prefix whose failures do not fail the run (repeatable; "
                         "'pr' means Prin, Prout and Reserve6)")
    ap.add_argument("--test", default="ALL")
    ap.add_argument("--json", help="write per-test outcomes here")
    ap.add_argument("--log", help="keep iscsi-test-cu's output here")
    ap.add_argument("--timeout", type=int, default=1800)
    ap.add_argument("--cluster", action="store_true",
                    help="keyfence in cluster mode: etcd and two gateways, one URL on each; "
                         "runs the PR and multipath suites")
    ap.add_argument("--etcd", default=shutil.which("etcd") or "/usr/bin/etcd",
                    help="etcd binary for --cluster")
    ap.add_argument("--acl", action="store_true",
                    help="serve with ACLs admitting only iscsi-test-cu's initiator names")
    ap.add_argument("--min-tests", type=int, default=None,
                    help=f"fail when fewer tests ran (default {ALL_TESTS} for --test=ALL, "
                         "else 1)")
    args = ap.parse_args()
    if args.cluster and args.test == "ALL":
        args.test = ",".join(CLUSTER_SUITES)
        if args.min_tests is None:
            args.min_tests = CLUSTER_TESTS
    if args.min_tests is None:
        args.min_tests = ALL_TESTS if args.test == "ALL" else 1
    sys.stdout.reconfigure(line_buffering=True)

    if shutil.which("iscsi-test-cu") is None:
        print("iscsi-test-cu not found: apt-get install libiscsi-bin", file=sys.stderr)
        print("conformance: 0 passed, 0 failed, 0 skipped")
        return 2
    excluded = []
    for e in args.exclude:
        excluded += list(PR_SUITES) if e == "pr" else [e]

    workdir = tempfile.mkdtemp(prefix="kf-conformance-")

    def run_suite(target, test, n_urls):
        try:
            urls = target.start()[:n_urls]
            print(f"running iscsi-test-cu --test={test} against {args.peer}: {' '.join(urls)}",
                  flush=True)
            names = [f"--initiator-name={INITIATOR_NAMES[0]}",
                     f"--initiator-name-2={INITIATOR_NAMES[1]}"]
            run = subprocess.run(["iscsi-test-cu", "-d", *names, f"--test={test}", *urls],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 timeout=args.timeout, cwd=workdir)
            return run.stdout.decode("utf-8", "replace"), run.returncode
        finally:
            target.stop()

    problems = []

    def check_exit(test, text, rc):
        """Record why a run of iscsi-test-cu --test=TEST was not a complete run."""
        outcomes, summary = parse(text)
        failed = sum(1 for r in outcomes if r[2] == "failed")
        if rc < 0:
            problems.append(f"iscsi-test-cu --test={test} was killed by signal {-rc}")
        elif rc not in (0, 1):
            problems.append(f"iscsi-test-cu --test={test} exited with status {rc} "
                            "(neither 0 nor CUnit's 1 for failed tests)")
        elif rc == 1 and failed == 0 and not (summary and summary["failed"]):
            problems.append(f"iscsi-test-cu --test={test} exited with status 1 "
                            "but no test failed")
        if not COMPLETED_RE.search(text):
            problems.append(f"iscsi-test-cu --test={test} did not complete its run")

    if args.cluster and (args.peer != "keyfence" or args.acl):
        print("--cluster applies to --peer keyfence without --acl", file=sys.stderr)
        print("conformance: 0 passed, 0 failed, 0 skipped")
        return 2
    if args.cluster and not os.access(args.etcd, os.X_OK):
        print(f"etcd not found ({args.etcd}): apt-get install etcd-server", file=sys.stderr)
        print("conformance: 0 passed, 0 failed, 0 skipped")
        return 2
    if args.acl and args.peer != "keyfence":
        print("--acl applies to --peer keyfence only", file=sys.stderr)
        print("conformance: 0 passed, 0 failed, 0 skipped")
        return 2
    acl = INITIATOR_NAMES if args.acl else None
    try:
        if args.cluster:
            target = ClusterTarget(os.path.abspath(args.binary), os.path.join(workdir, "cluster"),
                                   args.size, etcd=args.etcd)
            os.makedirs(target.workdir)
            text = ""
            try:
                urls = target.start()
                for test in args.test.split(","):
                    print(f"running iscsi-test-cu --test={test} across gateways: {' '.join(urls)}",
                          flush=True)
                    names = [f"--initiator-name={INITIATOR_NAMES[0]}",
                             f"--initiator-name-2={INITIATOR_NAMES[1]}"]
                    run = subprocess.run(["iscsi-test-cu", "-d", *names, f"--test={test}", *urls],
                                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                         timeout=args.timeout, cwd=workdir)
                    out = run.stdout.decode("utf-8", "replace")
                    check_exit(test, out, run.returncode)
                    text += out + "\n"
            finally:
                target.stop()
            results, summary = parse(text)
            summary = None  # one CUnit summary per suite run
        else:
            if args.peer == "keyfence":
                target = KeyfenceTarget(os.path.abspath(args.binary), os.path.join(workdir, "rw"),
                                        args.size, acl=acl)
            else:
                target = TgtTarget(os.path.join(workdir, "rw"), args.size)
            os.makedirs(target.workdir)
            text, rc = run_suite(target, args.test, 2)
            check_exit(args.test, text, rc)
            results, summary = parse(text)
            # The ReadOnly suite only runs against a write-protected LU: give it one.
            if args.peer == "keyfence" and any(r[0] == "ReadOnly" and r[2] == "skipped"
                                               for r in results):
                ro = KeyfenceTarget(os.path.abspath(args.binary), os.path.join(workdir, "ro"),
                                    args.size, read_only=True, acl=acl)
                os.makedirs(ro.workdir)
                ro_text, ro_rc = run_suite(ro, "ALL.ReadOnly", 1)
                check_exit("ALL.ReadOnly", ro_text, ro_rc)
                ro_results, _ = parse(ro_text)
                if ro_results:
                    results = [r for r in results if r[0] != "ReadOnly"] + ro_results
                    text += "\n" + ro_text
                    summary = None
    except (RuntimeError, subprocess.SubprocessError, OSError) as e:
        print(f"conformance run failed: {e}", file=sys.stderr, flush=True)
        print("conformance: 0 passed, 0 failed, 0 skipped")
        return 2
    if args.log:
        with open(args.log, "w") as f:
            f.write(text)

    if not results:
        print(text[-3000:], file=sys.stderr)
        print("no test outcomes found in iscsi-test-cu output", file=sys.stderr, flush=True)
        print("conformance: 0 passed, 0 failed, 0 skipped")
        return 2
    failed_n = sum(1 for r in results if r[2] == "failed")
    if summary and (summary["ran"] != len(results) or summary["failed"] != failed_n):
        print(f"warning: parsed {len(results)} tests / {failed_n} failed, CUnit summary "
              f"says {summary['ran']} ran / {summary['failed']} failed", file=sys.stderr)

    suites = {}
    for s, _, o, _ in results:
        suites.setdefault(s, {"passed": 0, "skipped": 0, "failed": 0})[o] += 1
    print(f"\n{'suite':<28} {'passed':>6} {'skipped':>7} {'failed':>6}")
    for s, c in suites.items():
        print(f"{s:<28} {c['passed']:>6} {c['skipped']:>7} {c['failed']:>6}")
    print("\nskipped:")
    for s, t, o, d in results:
        if o == "skipped":
            print(f"  {s}.{t}: {d}")
    print("failed:")
    for s, t, o, d in results:
        if o == "failed":
            print(f"  {s}.{t}: {d[:300]}")

    def is_excluded(suite):
        return any(suite.startswith(p) for p in excluded)

    blocking = [r for r in results if r[2] == "failed" and not is_excluded(r[0])]
    p = sum(1 for r in results if r[2] == "passed")
    k = sum(1 for r in results if r[2] == "skipped")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dict(suite=s, test=t, outcome=o, detail=d) for s, t, o, d in results],
                      f, indent=1)
    print(f"\n{args.peer}: {p} passed, {k} skipped, {failed_n} failed of {len(results)}"
          + (f" ({len(blocking)} failures outside excluded suites {','.join(excluded)})"
             if excluded else ""))
    if len(results) < args.min_tests:
        problems.append(f"only {len(results)} tests ran, expected at least {args.min_tests}")
    for why in problems:
        print(f"error: {why}", file=sys.stderr)
    sys.stderr.flush()
    print(f"conformance: {p} passed, {failed_n} failed, {k} skipped")
    shutil.rmtree(workdir, ignore_errors=True)
    if problems:
        return 2
    return 1 if blocking else 0


if __name__ == "__main__":
    sys.exit(main())
