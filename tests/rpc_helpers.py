"""Real TVM RPC trackers and servers on 127.0.0.1 for tests: subprocesses on free ports,
bounded waits, always killed (whole process group: the server forks a child per session).
Also: another process holding a latency database's write lock (hold_write_lock), and host
targets for tests (host_test_env, one_core_host_target)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TVM_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    def __init__(self, argv: list[str], env: dict | None = None):
        self.p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  start_new_session=True, env=env or ENV, cwd=REPO)

    def wait_line(self, needle: str, timeout: float) -> str:
        """Read stdout until a line containing needle (bounded by timeout)."""
        import selectors

        sel = selectors.DefaultSelector()
        sel.register(self.p.stdout, selectors.EVENT_READ)
        deadline, seen = time.monotonic() + timeout, []
        while time.monotonic() < deadline:
            if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
                break
            line = self.p.stdout.readline()
            if not line:
                break
            seen.append(line)
            if needle in line:
                return line
        raise AssertionError(f"no {needle!r} within {timeout} s; got: {''.join(seen)[-2000:]}")

    def kill(self) -> None:
        try:  # the group, even when the leader is gone: a session child may outlive it
            os.killpg(self.p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        if self.p.stdout:
            self.p.stdout.close()


def start_tracker(port: int | None = None) -> tuple[Proc, int]:
    port = port or free_port()
    proc = Proc([sys.executable, "-m", "mosc.device.server", "tracker", "--port", str(port)])
    proc.wait_line("listening", 30)
    return proc, port


def start_server(tracker_port: int, key: str, argv: list[str] | None = None, env: dict | None = None,
                 timeout: float = 60) -> Proc:
    from mosc.rpc import registered_keys, tracker_summary

    argv = argv or [sys.executable, "-m", "mosc.device.server", "serve", "--tracker", f"127.0.0.1:{tracker_port}",
                    "--key", key, "--port", str(free_port())]
    proc = Proc(argv, env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:  # registered with the tracker = ready
        if key in registered_keys(tracker_summary("127.0.0.1", tracker_port)):
            return proc
        if proc.p.poll() is not None:
            break
        time.sleep(0.2)
    out = proc.p.stdout.read() if proc.p.poll() is not None else ""
    proc.kill()
    raise AssertionError(f"RPC server {key!r} did not register within {timeout} s: {out[-2000:]}")


@contextmanager
def rpc_device(key: str = "testdev"):
    tracker, port = start_tracker()
    server = None
    try:
        server = start_server(port, key)
        yield port, server
    finally:
        if server:
            server.kill()
        tracker.kill()


def host_test_env(work: Path, protocol: dict) -> dict:
    """CLI environment with a `host` target whose [protocol] is replaced by `protocol` (short
    runs) and private artifact/tuning caches under `work`."""
    tdir = work / "targets"
    tdir.mkdir()
    text = (REPO / "targets" / "host.toml").read_text()
    for k, v in protocol.items():
        text = re.sub(rf"(?m)^{k} = .*$", f"{k} = {v}", text)
    (tdir / "host.toml").write_text(text)
    return {**ENV, "MOSC_TARGETS_DIR": str(tdir), "MOSC_ARTIFACT_CACHE": str(work / "cache"),
            "MOSC_TUNE_DIR": str(work / "tune"), "COLUMNS": "200"}


ONE_CORE_HOST_TOML = """
description = "this machine, one core, short protocol (tests)"
tvm_target = {kind = "llvm", mcpu = "auto", num-cores = 1}
[protocol]
batch = 1
source_len = 8
decoder_steps = 8
warmup = 1
repeats = 3
"""


def one_core_host_target(work: Path) -> Path:
    """A targets folder under `work` whose `host` is this machine at one core with a short
    protocol (what the tuning tests tune for); point MOSC_TARGETS_DIR at the returned folder."""
    tdir = work / "targets"
    tdir.mkdir()
    (tdir / "host.toml").write_text(ONE_CORE_HOST_TOML)
    return tdir


LOCK_HOLDER = """
import sqlite3, sys, time
c = sqlite3.connect(sys.argv[1], isolation_level=None)
c.execute("BEGIN IMMEDIATE")  # the write lock, held until killed
print("locked", flush=True)
time.sleep(600)
"""


def hold_write_lock(path) -> subprocess.Popen:
    """Another process holding an SQLite database's write lock (an open write transaction) until killed."""
    p = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(path)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p
