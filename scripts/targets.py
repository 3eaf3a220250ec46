"""Targets under test for keyfence's scripts: keyfence itself and Debian's tgtd,
each started on free loopback ports with one file-backed LUN reachable through
two portal groups, and stopped cleanly. keyfence binds 127.0.0.1:0 and the
ports are read from its start-up banner; tgtd needs its ports up front."""

import os
import random
import re
import signal
import socket
import subprocess
import sys
import time

def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"target exited early with status {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


KEYFENCE_IQN = "iqn.2026-11.io.keyfence:test"
PORTAL_RE = re.compile(r"^  portal (\S+):(\d+) \(TPGT \d+\)$", re.M)


def wait_banner(log_path, proc, count, timeout=30.0):
    """Ports of the first `count` portals `keyfence serve` printed at start-up
    (it binds 127.0.0.1:0 and prints the port it got)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(log_path, errors="replace") as f:
            ports = [int(m.group(2)) for m in PORTAL_RE.finditer(f.read())]
        if len(ports) >= count:
            return ports[:count]
        if proc.poll() is not None:
            raise RuntimeError(f"keyfence serve exited early with status {proc.returncode}")
        time.sleep(0.05)
    raise RuntimeError(f"keyfence serve printed no {count} portals within {timeout}s")


class KeyfenceTarget:
    def __init__(self, binary, workdir, size, image=None, read_only=False, acl=None,
                 extra_args=()):
        """`acl`: initiator names; when given, the target admits only them
        (each seeing LUN 0 through an explicit mapping) instead of being open.
        `extra_args`: more arguments for `keyfence serve` (e.g. --metrics)."""
        self.binary = binary
        self.extra_args = list(extra_args)
        self.workdir = workdir
        self.size = size
        self.image = image
        self.read_only = read_only
        self.acl = acl
        self.proc = None

    def start(self):
        data = os.path.join(self.workdir, "data")
        if self.image:
            os.makedirs(data, exist_ok=True)
            os.replace(self.image, os.path.join(data, "lun0.img"))
        if self.read_only or self.acl:
            # A write-protected LUN and ACLs can only be described in a config file.
            os.makedirs(data, exist_ok=True)
            img = os.path.join(data, "lun0.img")
            if self.read_only and not os.path.exists(img):
                with open(img, "wb") as f:  # serve does not create read-only files
                    f.truncate(self.size)
            conf = os.path.join(self.workdir, "keyfence.toml")
            portals = '"127.0.0.1:0", "127.0.0.1:0"'
            if self.acl:
                access = "".join(f'\n[[target.acl]]\ninitiator = "{name}"\n'
                                 '[[target.acl.lun]]\nlun = 0\ntarget_lun = 0\n'
                                 for name in self.acl)
            else:
                access = "open = true\n"
            ro = "true" if self.read_only else "false"
            with open(conf, "w") as f:
                f.write(f'data_dir = "{data}"\n\n[[target]]\nname = "{KEYFENCE_IQN}"\n'
                        f'portals = [{portals}]\n{access}\n[[target.lun]]\nid = 0\n'
                        f'path = "lun0.img"\nsize = {self.size}\nread_only = {ro}\n')
            args = [self.binary, "serve", "--config", conf]
        else:
            args = [self.binary, "serve", "--data-dir", data,
                    "--target-name", KEYFENCE_IQN, "--size", str(self.size)]
            args += ["--listen", "127.0.0.1:0", "--listen", "127.0.0.1:0"]
        args += self.extra_args
        log_path = os.path.join(self.workdir, "keyfence.log")
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT)
        self.ports = wait_banner(log_path, self.proc, 2)
        return [f"iscsi://127.0.0.1:{p}/{KEYFENCE_IQN}/0" for p in self.ports]

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc and self.proc.returncode not in (0, None, -signal.SIGKILL):
            print(f"warning: keyfence exited with status {self.proc.returncode}", file=sys.stderr)


def free_control_port():
    """A tgtd control port (tgtd takes at most 32767) no live tgtd answers on."""
    for _ in range(1000):
        n = random.randrange(20000, 32000)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            try:
                s.connect(f"/var/run/tgtd/socket.{n}")
            except OSError:
                return n
    raise RuntimeError("no free tgtd control port")


def remove_control_files(control):
    """The socket and lock files a tgtd we started left for `control`."""
    for suffix in ("", ".lock"):
        try:
            os.remove(f"/var/run/tgtd/socket.{control}{suffix}")
        except OSError:
            pass


class TgtTarget:
    """Debian's tgtd on its own control port, one LUN on two portals.

    tgtd needs its ports up front. When it cannot bind them it falls back to
    its default portals, and when another tgtd holds the control port it
    exits: either way that tgtd is stopped and the start retried on other
    ports."""

    def __init__(self, workdir, size, image=None):
        self.workdir = workdir
        self.size = size
        self.image = image
        self.proc = None
        self.control = None

    def adm(self, *args):
        subprocess.run(["tgtadm", "-C", str(self.control), "--lld", "iscsi", *args],
                       check=True, stdout=subprocess.DEVNULL, timeout=30)

    def _portals_up(self, timeout=15.0):
        """None once our tgtd lists exactly our portals, else why not."""
        want = sorted(f"Portal: 127.0.0.1:{p},1" for p in self.ports)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return f"tgtd exited at start-up with status {self.proc.returncode}"
            r = subprocess.run(["tgtadm", "-C", str(self.control), "--lld", "iscsi",
                                "--op", "show", "--mode", "portal"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=30)
            # The answer counts only if it came from our tgtd: still running.
            if r.returncode == 0 and self.proc.poll() is None:
                got = sorted(l for l in r.stdout.decode().splitlines()
                             if l.startswith("Portal:"))
                if got == want:
                    return None
                if got:
                    self.owned_control = True
                    return f"tgtd could not bind its portals, listens on {got}"
            time.sleep(0.05)
        return f"tgtd did not answer on control port {self.control} within {timeout}s"

    def start(self):
        img = self.image or os.path.join(self.workdir, "tgt-lun.img")
        if not self.image:
            with open(img, "wb") as f:
                f.truncate(self.size)
        self.log = open(os.path.join(self.workdir, "tgtd.log"), "w")
        errors = []
        for _ in range(10):
            self.control = free_control_port()
            self.ports = [free_port(), free_port()]
            portals = ",".join(f"portal=127.0.0.1:{p}" for p in self.ports)
            args = ["tgtd", "-f", "-C", str(self.control), "--iscsi", portals]
            self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT)
            self.owned_control = False
            why = self._portals_up()
            if why is None:
                break
            errors.append(why)
            # Ours and without targets yet: SIGKILL by its PID is safe.
            self.proc.kill()
            self.proc.wait()
            if self.owned_control:
                remove_control_files(self.control)
        else:
            self.proc = None
            raise RuntimeError("could not start tgtd: " + "; ".join(errors))
        for p in self.ports:
            wait_port(p, self.proc)
        iqn = "iqn.2026-11.io.keyfence:tgt-peer"
        self.adm("--op", "new", "--mode", "target", "--tid", "1", "-T", iqn)
        self.adm("--op", "new", "--mode", "logicalunit", "--tid", "1", "--lun", "1", "-b", img)
        self.adm("--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL")
        return [f"iscsi://127.0.0.1:{p}/{iqn}/1" for p in self.ports]

    def stop(self):
        if not self.proc:
            return
        # tgtd ignores SIGTERM while it has targets: delete them, then the system.
        for args in (["--lld", "iscsi", "--op", "delete", "--mode", "target", "--tid", "1",
                      "--force"],
                     ["--op", "delete", "--mode", "system"]):
            try:
                subprocess.run(["tgtadm", "-C", str(self.control), *args], timeout=30,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            except subprocess.TimeoutExpired:
                pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        # Our tgtd held this control port until now: remove its files.
        remove_control_files(self.control)


def _stop(proc, what, timeout=20):
    if proc and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc and proc.returncode not in (0, None, -signal.SIGKILL, -signal.SIGTERM):
        print(f"warning: {what} exited with status {proc.returncode}", file=sys.stderr)


class ClusterTarget:
    """keyfence in cluster mode: a three-member etcd on loopback and two
    gateways (gwa: TPGT 1, gwb: TPGT 2), each told the other's portal, over
    one shared backing file. start() returns one URL per gateway, so a
    second URL drives the multipath suites across gateways."""

    def __init__(self, binary, workdir, size, etcd="etcd"):
        self.binary = binary
        self.workdir = workdir
        self.size = size
        self.etcd = etcd
        self.etcds = []
        self.gateways = []
        self.endpoints = None

    def _start_etcd(self):
        ports = [free_port() for _ in range(6)]
        if len(set(ports)) < 6:
            raise OSError("port clash")
        token = f"kf-conf-{os.getpid()}-{ports[0]}"
        initial = ",".join(f"m{i}=http://127.0.0.1:{ports[3 + i]}" for i in range(3))
        for i in range(3):
            cp, pp = ports[i], ports[3 + i]
            log = open(os.path.join(self.workdir, f"etcd{i}.log"), "w")
            self.etcds.append(subprocess.Popen(
                [self.etcd, "--name", f"m{i}", "--data-dir", os.path.join(self.workdir, f"etcd{i}"),
                 "--listen-client-urls", f"http://127.0.0.1:{cp}",
                 "--advertise-client-urls", f"http://127.0.0.1:{cp}",
                 "--listen-peer-urls", f"http://127.0.0.1:{pp}",
                 "--initial-advertise-peer-urls", f"http://127.0.0.1:{pp}",
                 "--initial-cluster", initial, "--initial-cluster-state", "new",
                 "--initial-cluster-token", token,
                 "--heartbeat-interval", "50", "--election-timeout", "500",
                 "--logger", "zap", "--log-level", "warn"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
        self.endpoints = ",".join(f"http://127.0.0.1:{p}" for p in ports[:3])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.etcds):
                raise RuntimeError("an etcd member exited at start-up")
            r = subprocess.run([self.binary, "cluster", "status", "--etcd", self.endpoints],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if r.returncode == 0:
                return
            time.sleep(0.3)
        raise RuntimeError("etcd cluster not healthy within 30 s")

    def _start_gateways(self):
        shared = os.path.join(self.workdir, "shared.img")
        if not os.path.exists(shared):
            with open(shared, "wb") as f:
                f.truncate(self.size)
        ports = [free_port(), free_port()]
        names = ["gwa", "gwb"]
        for i in range(2):
            data = os.path.join(self.workdir, names[i])
            os.makedirs(data, exist_ok=True)
            img = os.path.join(data, "lun0.img")
            if not os.path.lexists(img):
                os.symlink(shared, img)
            log_path = os.path.join(self.workdir, f"{names[i]}.log")
            log = open(log_path, "w")
            proc = subprocess.Popen(
                [self.binary, "serve", "--data-dir", data, "--target-name", KEYFENCE_IQN,
                 "--size", str(self.size), "--listen", f"127.0.0.1:{ports[i]}",
                 "--first-tpgt", str(i + 1), "--cluster", self.endpoints,
                 "--gateway", names[i],
                 "--peer", f"{names[1 - i]}:{2 - i}:127.0.0.1:{ports[1 - i]}",
                 "--log-level", "warn"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            self.gateways.append(proc)
            wait_banner(log_path, proc, 1)
        return ports

    def start(self):
        for attempt in range(5):
            try:
                if not self.etcds:
                    self._start_etcd()
                ports = self._start_gateways()
                break
            except (OSError, RuntimeError) as e:
                for g in self.gateways:
                    _stop(g, "gateway")
                self.gateways = []
                if not self.endpoints or any(p.poll() is not None for p in self.etcds):
                    for p in self.etcds:
                        _stop(p, "etcd")
                    self.etcds = []
                if attempt == 4:
                    raise RuntimeError(f"cluster did not start: {e}")
        # A gateway serves the LU once it installed the committed state.
        urls = [f"iscsi://127.0.0.1:{p}/{KEYFENCE_IQN}/0" for p in ports]
        deadline = time.monotonic() + 30
        for u in urls:
            while True:
                r = subprocess.run([self.binary, "persist", "-n", "-k", u],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                if r.returncode == 0:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"gateway at {u} does not serve the LU within 30 s")
                time.sleep(0.2)
        return urls

    def stop(self):
        """Gateways first, while etcd is still there; then etcd."""
        for g in self.gateways:
            _stop(g, "keyfence gateway")
        self.gateways = []
        for p in self.etcds:
            _stop(p, "etcd")
        self.etcds = []
