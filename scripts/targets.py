"""Targets under test for keyfence's scripts: keyfence itself and Debian's tgtd,
each started on free loopback ports with one file-backed LUN reachable through
two portal groups, and stopped cleanly. keyfence binds 127.0.0.1:0 and the
ports are read from its start-up banner; tgtd needs its ports up front."""

import os
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
    def __init__(self, binary, workdir, size, image=None, read_only=False):
        self.binary = binary
        self.workdir = workdir
        self.size = size
        self.image = image
        self.read_only = read_only
        self.proc = None

    def start(self):
        data = os.path.join(self.workdir, "data")
        if self.image:
            os.makedirs(data, exist_ok=True)
            os.replace(self.image, os.path.join(data, "lun0.img"))
        if self.read_only:
            # A write-protected LUN can only be described in a config file.
            os.makedirs(data, exist_ok=True)
            img = os.path.join(data, "lun0.img")
            if not os.path.exists(img):
                with open(img, "wb") as f:  # serve does not create read-only files
                    f.truncate(self.size)
            conf = os.path.join(self.workdir, "keyfence.toml")
            portals = '"127.0.0.1:0", "127.0.0.1:0"'
            with open(conf, "w") as f:
                f.write(f'data_dir = "{data}"\n\n[[target]]\nname = "{KEYFENCE_IQN}"\n'
                        f'portals = [{portals}]\n\n[[target.lun]]\nid = 0\n'
                        f'path = "lun0.img"\nsize = {self.size}\nread_only = true\n')
            args = [self.binary, "serve", "--config", conf]
        else:
            args = [self.binary, "serve", "--data-dir", data,
                    "--target-name", KEYFENCE_IQN, "--size", str(self.size)]
            args += ["--listen", "127.0.0.1:0", "--listen", "127.0.0.1:0"]
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


class TgtTarget:
    """Debian's tgtd on its own control port, one LUN on two portals."""

    def __init__(self, workdir, size, image=None):
        self.workdir = workdir
        self.size = size
        self.image = image
        self.proc = None
        self.control = 9000 + os.getpid() % 500

    def adm(self, *args):
        subprocess.run(["tgtadm", "-C", str(self.control), "--lld", "iscsi", *args],
                       check=True, stdout=subprocess.DEVNULL)

    def start(self):
        self.ports = [free_port(), free_port()]
        img = self.image or os.path.join(self.workdir, "tgt-lun.img")
        if not self.image:
            with open(img, "wb") as f:
                f.truncate(self.size)
        portals = ",".join(f"portal=127.0.0.1:{p}" for p in self.ports)
        args = ["tgtd", "-f", "-C", str(self.control), "--iscsi", portals]
        self.log = open(os.path.join(self.workdir, "tgtd.log"), "w")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT)
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
        subprocess.run(["tgtadm", "-C", str(self.control), "--lld", "iscsi", "--op", "delete",
                        "--mode", "target", "--tid", "1", "--force"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        subprocess.run(["tgtadm", "-C", str(self.control), "--op", "delete", "--mode", "system"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
