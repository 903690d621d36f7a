"""Devices: the tracker and server commands on 127.0.0.1, and an emulated Raspberry Pi under qemu."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from rpc_helpers import ENV, REPO, Proc, free_port, start_server, start_tracker

from mosc.rpc import Remote, connect, device_info

ARM64_ROOT = Path(os.environ.get("MOSC_ARM64_ROOT") or Path.home() / ".cache/mosc/arm64-root")
CLI = "from mosc.cli import app; app()"


def _listen_addrs(pid):
    return {c.laddr for c in psutil.Process(pid).net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN}


def test_cli_tracker_and_serve_bind_localhost():
    port = free_port()
    tracker = Proc([sys.executable, "-c", CLI, "device", "tracker", "--port", str(port)])
    server = None
    try:
        assert f"listening on 127.0.0.1:{port}" in tracker.wait_line("listening", 30)
        assert {a.ip for a in _listen_addrs(tracker.p.pid)} == {"127.0.0.1"}
        server = start_server(port, "cli-dev", argv=[sys.executable, "-c", CLI, "device", "serve", "--tracker",
                                                     f"127.0.0.1:{port}", "--key", "cli-dev", "--port", str(free_port())])
        assert {a.ip for a in _listen_addrs(server.p.pid)} == {"127.0.0.1"}
        r = subprocess.run([sys.executable, "-c", CLI, "device", "list", "--tracker", f"127.0.0.1:{port}"],
                           capture_output=True, text=True, env={**ENV, "COLUMNS": "200"}, timeout=60)
        assert r.returncode == 0 and "cli-dev" in r.stdout, r.stdout + r.stderr
        sess = connect(Remote("127.0.0.1", port, "cli-dev"))
        info = device_info(sess)
        assert info["emulated"] is False and info["machine"] == os.uname().machine
        del sess
        # SIGTERM stops the tracker at once
        tracker.p.send_signal(signal.SIGTERM)
        assert tracker.p.wait(timeout=10) == 0
    finally:
        if server:
            server.kill()
        tracker.kill()


def test_emulate_refuses_unknown_target():
    r = subprocess.run([sys.executable, "-c", CLI, "device", "emulate", "xeon"], capture_output=True, text=True,
                       env=ENV, timeout=60)
    assert r.returncode == 2 and "no emulator for target 'xeon'" in r.stderr


@pytest.mark.slow
@pytest.mark.skipif(not (ARM64_ROOT / "opt/mosc-site/.mosc-wheels-done").exists() or not shutil.which("qemu-aarch64")
                    or not shutil.which("aarch64-linux-gnu-gcc"),
                    reason=f"needs qemu-aarch64, aarch64-linux-gnu-gcc and the arm64 root at {ARM64_ROOT} "
                           "(scripts/setup_arm64_root.sh)")
def test_emulated_rpi4_measurement_is_marked(tmp_path):
    """`mosc device emulate rpi4` + `mosc measure --target rpi4`: rows carry emulated=1 and are
    left out of the predictor's query unless asked."""
    tdir = tmp_path / "targets"
    tdir.mkdir()
    text = (REPO / "targets" / "rpi4.toml").read_text()
    for k, v in {"source_len": 8, "decoder_steps": 4, "warmup": 1, "repeats": 5}.items():
        text = re.sub(rf"(?m)^{k} = .*$", f"{k} = {v}", text)
    (tdir / "rpi4.toml").write_text(text)
    env = {**ENV, "MOSC_TARGETS_DIR": str(tdir), "MOSC_ARTIFACT_CACHE": str(tmp_path / "cache"),
           "MOSC_TUNE_DIR": str(tmp_path / "tune"), "COLUMNS": "200"}
    tracker, port = start_tracker()
    emu = None
    try:
        emu = start_server(port, "rpi4", timeout=240, env=env, argv=[
            sys.executable, "-c", CLI, "device", "emulate", "rpi4", "--tracker", f"127.0.0.1:{port}",
            "--port", str(free_port())])
        db = tmp_path / "lat.db"
        r = subprocess.run([sys.executable, "-c", CLI, "measure", "-t", "rpi4", "--sample", "1", "--no-tune",
                            "--db", str(db), "--tracker", f"127.0.0.1:{port}", "--timeout", "300"],
                           capture_output=True, text=True, env=env, timeout=600)
        assert r.returncode == 0, r.stderr
        assert "EMULATED" in r.stderr and "(emulated)" in r.stdout, r.stdout + r.stderr
    finally:
        if emu:
            emu.kill()
        tracker.kill()
    from mosc.device.db import LatencyDB

    with LatencyDB(db) as ldb:
        (row,) = ldb.query("rpi4", include_emulated=True)
        assert row["emulated"] == 1 and row["device_key"] == "rpi4"
        assert json.loads(row["host"])["device"]["machine"] == "aarch64"
        assert ldb.rows("rpi4") == [] and len(ldb.rows("rpi4", include_emulated=True)) == 1


# ----------------------------------------------------------------------------- the tracker comes and goes
def _registered(port, key, within):
    import time

    from mosc.rpc import registered_keys, tracker_summary

    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if key in registered_keys(tracker_summary("127.0.0.1", port)):
                return True
        except ConnectionError:
            pass
        time.sleep(0.25)
    return False


def test_server_registers_again_after_the_tracker_restarts():
    tracker, port = start_tracker()
    server = None
    try:
        server = start_server(port, "farm")
        tracker.kill()
        tracker, _ = start_tracker(port)  # same port, empty: knows no device
        assert _registered(port, "farm", 20), "the server did not register with the restarted tracker"
    finally:
        if server:
            server.kill()
        tracker.kill()


class _Forwarder:
    """127.0.0.1:<port> -> 127.0.0.1:<dest>. silence() makes every open connection drop what it
    carries without closing anything: a tracker machine that vanished (reboot, cable pulled)."""

    def __init__(self, dest: int):
        import socket
        import threading

        self.dest, self.pairs = dest, []
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.port = self.lsock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        import socket
        import threading

        while True:
            try:
                client, _ = self.lsock.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.dest))
            except OSError:
                client.close()
                continue
            pair = {"silent": False, "socks": (client, upstream)}
            self.pairs.append(pair)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b, pair), daemon=True).start()

    @staticmethod
    def _pump(a, b, pair):
        import socket

        while True:
            try:
                data = a.recv(65536)
            except OSError:
                return
            if pair["silent"]:
                continue
            try:
                if not data:
                    b.shutdown(socket.SHUT_WR)
                    return
                b.sendall(data)
            except OSError:
                return

    def silence(self):
        for p in self.pairs:
            p["silent"] = True

    def close(self):
        self.lsock.close()
        for p in self.pairs:
            for s in p["socks"]:
                s.close()


@pytest.mark.slow
def test_server_registers_again_when_the_tracker_vanishes_silently():
    """TVM waits for ever on a tracker connection that went silent; ours times out and reconnects."""
    tracker, port = start_tracker()
    fwd = _Forwarder(port)
    server = None
    try:
        server = start_server(fwd.port, "farm")
        fwd.silence()  # the server's tracker connection now carries nothing, and never closes
        tracker.kill()
        tracker, _ = start_tracker(port)
        assert _registered(port, "farm", 30), "the server did not notice the tracker was gone"
    finally:
        if server:
            server.kill()
        tracker.kill()
        fwd.close()


def test_tracker_address_problems_are_named(monkeypatch):
    """Nothing listening, closed at once, silent: "no RPC tracker answers"; something else: "not an RPC tracker"."""
    import socket
    import threading

    from mosc import rpc

    def listener(behaviour):
        srv = socket.create_server(("127.0.0.1", 0))

        def serve():
            conns = []
            while True:
                try:
                    c, _ = srv.accept()
                except OSError:
                    return
                conns.append(c)
                c.recv(4)
                if behaviour == "close":
                    c.close()
                elif behaviour == "http":
                    c.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

        threading.Thread(target=serve, daemon=True).start()
        return srv

    nobody = free_port()
    with pytest.raises(ConnectionError, match=rf"no RPC tracker answers at 127.0.0.1:{nobody} \(Connection refused\)"):
        rpc.tracker_summary("127.0.0.1", nobody)
    for behaviour, needle in (("close", r"no RPC tracker answers at .*connection closed without an answer"),
                              ("silent", r"no RPC tracker answers at .*(timed out|no answer within)"),
                              ("http", r"answers, but is not an RPC tracker")):
        srv = listener(behaviour)
        try:
            with pytest.raises(ConnectionError, match=needle):
                rpc.tracker_summary("127.0.0.1", srv.getsockname()[1], timeout=0.5)
        finally:
            srv.close()
