"""Devices: a TVM RPC tracker, RPC servers registered with it, and an emulated Raspberry Pi.

    run_tracker(host, port)                  the tracker, in this process, until killed
    run_server(tracker, key, host, port)     an RPC server registered with the tracker, in this
                                             process; a session that crashes restarts the loop, a
                                             tracker that restarts or drops is registered with again
    emulate_command(...)                     the argv + env of an aarch64 server under qemu-user
    own_info()                               what `mosc.device_info` answers over RPC

Both bind to 127.0.0.1 unless told otherwise (a TVM RPC server runs any code it is sent:
expose it only on a trusted network). The tracker and the server run in the calling process
(TVM's `rpc.Server`/`rpc.Tracker` would fork a `sys.executable` helper that outlives a killed
parent); each RPC session is a forked child of the server process. Kill the process group
to take a device down completely.

The server registers a global function `mosc.device_info` (JSON: mosc.rpc.machine_info()
with `emulated` from $MOSC_EMULATED, the pid and the TVM version), so the measuring side
learns from the device itself that its timings come from an emulator.

Knows nothing of artifacts, targets, measuring or the database. Imports only the standard
library and mosc.env/mosc.rpc (standard library too) at module level, TVM inside functions:
it also runs as `python3 -m mosc.device.server serve ...` inside the arm64 root under qemu,
where only numpy and the TVM runtime are installed (no torch, no typer).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

from mosc import env
from mosc.rpc import DEVICE_INFO_FUNC, machine_info

DEFAULT_HOST = "127.0.0.1"
DEFAULT_TRACKER_PORT = 9190
DEFAULT_SERVER_PORT = 9091  # first port tried; the server takes the next free one below port_end
PORT_RANGE = 100
EMULATORS = {"rpi4": "aarch64"}  # target -> qemu-user architecture
TRACKER_TIMEOUT_S = 10.0  # a tracker that does not answer (connect, ping, register) within this is gone
RECONNECT_MAX_S = 10.0  # longest pause between tries to reach a tracker that is down


def own_info() -> dict:
    """This device, seen from inside (under qemu: the emulated machine): what `mosc.device_info`
    answers. mosc.rpc.machine_info() plus this server's pid and TVM version."""
    info = {**machine_info(), "pid": os.getpid()}
    try:
        import tvm

        info["tvm"] = tvm.__version__
    except Exception:  # noqa: BLE001  (a device without TVM's Python package still describes itself)
        pass
    return info


def _exit_on_signals(what: str) -> None:
    """SIGTERM/SIGINT end the process at once (the tracker/server threads are not daemons)."""

    def bye(signum, _frame):
        print(f"{what}: stopped ({signal.Signals(signum).name})", flush=True)
        os._exit(0)

    signal.signal(signal.SIGTERM, bye)
    signal.signal(signal.SIGINT, bye)


def run_tracker(host: str = DEFAULT_HOST, port: int = DEFAULT_TRACKER_PORT, port_end: int | None = None) -> None:
    """Run a TVM RPC tracker in this process until SIGTERM/SIGINT. Prints the bound address."""
    from tvm.rpc.tracker import PopenTrackerServerState

    logging.getLogger("RPCTracker").setLevel(logging.WARNING)
    _exit_on_signals("tracker")
    try:
        state = PopenTrackerServerState(host, port, port_end or port + 1, silent=True)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: cannot start an RPC tracker on {host}:{port} ({e})")
    print(f"RPC tracker listening on {host}:{state.port}", flush=True)
    state.thread.join()


def _tracker_connector(key: str, host: str, port: int):
    """What this server process uses in place of tvm.rpc.base.connect_with_retry.

    TVM's RPC server (tvm/rpc/server.py, _listen_loop) reconnects and registers again whenever
    its tracker connection raises OSError, through connect_with_retry, which retries only a
    refused connection, every 5 s, for 60 s, then raises RuntimeError and the listen thread
    dies. Its tracker socket has no timeout: a tracker that vanished without closing the
    connection (machine rebooted, network cut) leaves the server waiting for an answer for
    ever, never registered again. This one retries every failure for as long as it takes
    (backoff up to RECONNECT_MAX_S) and bounds every exchange on the connection it returns by
    TRACKER_TIMEOUT_S, so that a silent tracker is an OSError and TVM's loop reconnects."""
    import socket

    st = {"returned": None, "pause": 0.5, "down": False}

    def wait():
        time.sleep(st["pause"])
        st["pause"] = min(2 * st["pause"], RECONNECT_MAX_S)

    def connect_with_retry(addr, timeout=None, retry_period=None):  # TVM's signature; both ignored
        if st["returned"] is not None:
            if time.monotonic() - st["returned"] > 60:
                st["pause"] = 0.5  # the last connection served a while: a new outage starts from a short pause
            else:
                wait()  # it broke at once (a peer that drops us, or not a tracker): no tight reconnect loop
        while True:
            try:
                sock = socket.create_connection(tuple(addr), timeout=TRACKER_TIMEOUT_S)
                sock.settimeout(TRACKER_TIMEOUT_S)  # every request to the tracker is bounded too
            except OSError as e:
                if not st["down"]:
                    print(f"RPC server {key!r}: no RPC tracker answers at {host}:{port} ({e.strerror or e}); "
                          f"retrying (every {RECONNECT_MAX_S:g} s at most)", file=sys.stderr, flush=True)
                    st["down"] = True
                wait()
                continue
            if st["returned"] is not None:
                print(f"RPC server {key!r}: connected to tracker {host}:{port} again; registering",
                      file=sys.stderr, flush=True)
            st["returned"], st["down"] = time.monotonic(), False
            return sock

    return connect_with_retry


def run_server(tracker_host: str, tracker_port: int, key: str, host: str = DEFAULT_HOST,
               port: int = DEFAULT_SERVER_PORT, port_end: int | None = None, load_library: str | None = None,
               log_sessions: bool = False) -> None:
    """Run a TVM RPC server registered with a tracker under `key`, in this process, until killed.

    log_sessions: print a line per session (who connected): which device of a farm got work.

    It registers again after the tracker restarts or the way to it breaks (_tracker_connector).
    TVM's listen loop dies when a session child exits abnormally (a crashed session); it is
    restarted here, so one crash costs one session, not the device.
    """
    import tvm_ffi
    from tvm.rpc import server as rpc_server

    logging.getLogger("RPCServer").setLevel(logging.WARNING)
    tvm_ffi.register_global_func(DEVICE_INFO_FUNC, lambda: json.dumps(own_info()), override=True)
    rpc_server.base.connect_with_retry = _tracker_connector(key, tracker_host, tracker_port)
    _exit_on_signals(f"RPC server {key!r}")
    threading.excepthook = lambda a: print(f"RPC server {key!r}: listen loop stopped: "
                                           f"{a.exc_type.__name__}: {a.exc_value}", file=sys.stderr, flush=True)
    first, pause = True, 0.5
    while True:
        try:
            state = rpc_server.PopenRPCServerState(host, port, port_end or port + PORT_RANGE,
                                                   tracker_addr=(tracker_host, tracker_port), key=key,
                                                   load_library=load_library, silent=True)
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: cannot start an RPC server on {host}:{port} ({e})")
        if log_sessions:  # after the state: silent=True has just set TVM's logger to ERROR
            _print_sessions(key)
        if first:
            info = own_info()
            print(f"RPC server {key!r} on {host}:{state.port} ({info['machine']}"
                  f"{', emulated' if info['emulated'] else ''}), registered with tracker {tracker_host}:{tracker_port}",
                  flush=True)
            first = False
        started = time.monotonic()
        state.thread.join()
        state.sock.close()
        pause = 0.5 if time.monotonic() - started > 60 else min(2 * pause, RECONNECT_MAX_S)  # a loop that keeps dying waits longer
        print(f"RPC server {key!r}: listen loop ended; restarting in {pause:g} s", file=sys.stderr, flush=True)
        time.sleep(pause)


def _print_sessions(key: str) -> None:
    """Print TVM's "connected from" log records of this server as one line each on stdout."""

    class Sessions(logging.Handler):
        def emit(self, record):
            msg = record.getMessage()
            if msg.startswith("connected from"):
                print(f"RPC server {key!r}: session {msg}", flush=True)

    lg = logging.getLogger("RPCServer")
    lg.setLevel(logging.INFO)
    lg.propagate = False
    if not any(type(h).__name__ == "Sessions" for h in lg.handlers):
        lg.addHandler(Sessions())


# ----------------------------------------------------------------------------- qemu
WRAPPER = """#!/bin/sh
# Re-enter qemu-user: the emulated Python's sys.executable (it forks/execs itself)
exec {qemu} -L {root} -0 {self} {root}/usr/bin/python3 "$@"
"""


def emulate_command(target: str, tracker_host: str, tracker_port: int, key: str, host: str, port: int,
                    workdir: Path, root: Path | None = None) -> tuple[list[str], dict[str, str]]:
    """argv and environment for an RPC server of `target`'s architecture under qemu-user.

    Writes WRAPPER (a shell script that re-enters qemu) into workdir: passed with
    `qemu-aarch64 -0 WRAPPER`, it becomes the emulated interpreter's sys.executable.
    Raises SystemExit with one line when qemu or the arm64 root is missing.
    """
    arch = EMULATORS.get(target)
    if arch is None:
        raise SystemExit(f"error: no emulator for target {target!r} (known: {', '.join(EMULATORS)})")
    qemu = shutil.which(f"qemu-{arch}")
    if qemu is None:
        raise SystemExit(f"error: qemu-{arch} not found (apt-get install qemu-user)")
    root = Path(root or env.arm64_root())
    site = root / "opt" / "mosc-site"
    if not (site / ".mosc-wheels-done").exists():
        raise SystemExit(f"error: no arm64 root with TVM at {root} (run scripts/setup_arm64_root.sh)")
    workdir.mkdir(parents=True, exist_ok=True)
    wrapper = workdir / "python3-aarch64"
    wrapper.write_text(WRAPPER.format(qemu=qemu, root=root, self=wrapper))
    wrapper.chmod(0o755)
    environ = {**os.environ, "PYTHONPATH": f"{site}:{env.REPO}", "TVM_USE_RUNTIME_LIB": "1", "MOSC_EMULATED": "1",
           "MOSC_EMULATOR": f"qemu-{arch} (user mode)", "PYTHONDONTWRITEBYTECODE": "1"}
    argv = [qemu, "-L", str(root), "-0", str(wrapper), str(root / "usr/bin/python3"), "-m", "mosc.device.server", "serve",
            "--tracker", f"{tracker_host}:{tracker_port}", "--key", key, "--host", host, "--port", str(port)]
    return argv, environ


def _main(argv: list[str] | None = None) -> None:
    """`python -m mosc.device.server serve|tracker ...`: the entry point inside the arm64 root (no typer there)."""
    ap = argparse.ArgumentParser(prog="python -m mosc.device.server")
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tracker")
    t.add_argument("--host", default=DEFAULT_HOST)
    t.add_argument("--port", type=int, default=DEFAULT_TRACKER_PORT)
    s = sub.add_parser("serve")
    s.add_argument("--tracker", required=True)
    s.add_argument("--key", required=True)
    s.add_argument("--host", default=DEFAULT_HOST)
    s.add_argument("--port", type=int, default=DEFAULT_SERVER_PORT)
    s.add_argument("--log-sessions", action="store_true")
    a = ap.parse_args(argv)
    if a.cmd == "tracker":
        run_tracker(a.host, a.port)
    else:
        th, _, tp = a.tracker.rpartition(":")
        run_server(th, int(tp), a.key, a.host, a.port, log_sessions=a.log_sessions)


if __name__ == "__main__":
    _main()
