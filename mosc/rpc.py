"""The RPC client: how mosc reaches a device through a TVM RPC tracker.

    Remote              where a device is: tracker address + key, with the session timeouts
    tracker_summary     the tracker's queue and server lists (a real handshake, bounded waits)
    registered_keys     the device keys registered there
    connect(remote)     an RPC session on a free device of the key (waits are polled, bounded)
    device_info         what a device says about itself (`mosc device serve` registers it)
    machine_info        this machine (hostname, architecture, CPU model, OS, Python, CPUs, emulated)
    device_failure      whether an exception is the device or the network failing (retry) or a bug
    parse_hostport      "HOST:PORT" -> (host, port), with a one-line error

Used by the compiler (tuning measures candidates on the device) and by the device world
(measuring). Knows nothing of artifacts, targets or what is run in a session. Imports
tvm.rpc only inside functions.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import struct
import sys
import time
from dataclasses import dataclass
from typing import Callable

from mosc import env
from mosc.errors import MoscError

CONNECT_TIMEOUT_S = 3.0  # TCP connect / tracker answer
REQUEST_TIMEOUT_S = 30.0  # waiting for a free server of the key at the tracker
SESSION_TIMEOUT_S = 600.0  # a session (one arch) longer than this is killed by the server
DEVICE_INFO_FUNC = "mosc.device_info"  # registered by `mosc device serve/emulate` (mosc.device.server)


def parse_hostport(text: str, what: str = "--tracker") -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise MoscError(f"{what} must be HOST:PORT (e.g. 127.0.0.1:9190), got {text!r}")
    return host, int(port)


@dataclass(frozen=True)
class Remote:
    """Where the device is: a tracker address and the device key registered there."""

    host: str
    port: int
    key: str
    session_timeout: float = SESSION_TIMEOUT_S
    request_timeout: float = REQUEST_TIMEOUT_S

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"


def _no_tracker(host: str, port: int, e: BaseException) -> ConnectionError:
    why = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
    return ConnectionError(f"no RPC tracker answers at {host}:{port} ({why})")


def _tracker_socket(host: str, port: int, timeout: float) -> socket.socket:
    """A connection to the tracker after the magic-number handshake. Nothing listening, refused,
    timed out, or closed before answering: "no RPC tracker answers"; only a peer that answers
    something else is "not an RPC tracker"."""
    from tvm.rpc import base

    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        raise _no_tracker(host, port, e) from None
    answer = b""
    try:
        sock.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
        while len(answer) < 4:
            chunk = sock.recv(4 - len(answer))
            if not chunk:  # closed without answering: a port forwarder with nothing behind it, say
                break
            answer += chunk
    except OSError as e:  # reset, or connected but silent (socket.timeout has no text)
        sock.close()
        raise _no_tracker(host, port, e if str(e) else TimeoutError(f"no answer within {timeout:g} s")) from None
    if len(answer) < 4:
        sock.close()
        raise _no_tracker(host, port, ConnectionError("connection closed without an answer"))
    if struct.unpack("<i", answer)[0] != base.RPC_TRACKER_MAGIC:
        sock.close()
        raise ConnectionError(f"{host}:{port} answers, but is not an RPC tracker (handshake answer {answer!r})")
    return sock


def _tracker_request(host: str, port: int, message: list, timeout: float, wait: Callable[[], None] | None = None):
    """Send one message to the tracker and return its answer; ConnectionError on any failure.
    wait(): called about once a second while no answer has come (it raises to give up)."""
    import select

    from tvm.rpc import base

    sock = _tracker_socket(host, port, timeout)
    try:
        base.sendjson(sock, message)
        if wait is not None:
            while not select.select([sock], [], [], 1.0)[0]:
                wait()
        return base.recvjson(sock)
    except ConnectionError:
        raise
    except OSError as e:
        raise ConnectionError(f"RPC tracker at {host}:{port} dropped the connection ({e})") from None
    finally:
        sock.close()


def tracker_summary(host: str, port: int, timeout: float = CONNECT_TIMEOUT_S) -> dict:
    """The tracker's summary (queue_info, server_info); ConnectionError when it does not answer."""
    from tvm.rpc import base

    return _tracker_request(host, port, [base.TrackerCode.SUMMARY], timeout)[1]


def device_count(summary: dict, key: str) -> int:
    """How many devices are registered under `key` (a farm of equal devices shares one key)."""
    return sum(1 for s in summary.get("server_info", []) if s.get("key", "") == f"server:{key}")


def registered_keys(summary: dict) -> list[str]:
    return sorted({s["key"].removeprefix("server:") for s in summary.get("server_info", [])
                   if s.get("key", "").startswith("server:")})


def connect(remote: Remote):
    """An RPC session on a device of remote.key, with bounded waits.

    TVM's TrackerSession retries a refused tracker for 60 s and waits for a free device
    forever; here the wait is polled: it ends as soon as no device of the key is registered
    any more (it dropped), and after remote.request_timeout at most. A request abandoned
    this way is harmless: the tracker skips requests whose connection is closed.
    """
    from tvm.rpc import base
    from tvm.rpc.client import connect as rpc_connect

    def check_registered():
        keys = registered_keys(tracker_summary(remote.host, remote.port))
        if remote.key not in keys:
            raise ConnectionError(f"no device with key {remote.key!r} is registered at the tracker {remote.addr} "
                                  f"(registered: {', '.join(keys) or 'none'})")

    deadline = time.monotonic() + remote.request_timeout

    def still_waiting():
        if time.monotonic() > deadline:
            raise ConnectionError(f"no free device {remote.key!r} at {remote.addr} within "
                                  f"{remote.request_timeout:g} s (busy with another client?)")
        check_registered()  # the device dropped while we waited: stop waiting

    check_registered()
    value = _tracker_request(remote.host, remote.port, [base.TrackerCode.REQUEST, remote.key, "", 1],
                             CONNECT_TIMEOUT_S, wait=still_waiting)
    if value[0] != base.TrackerCode.SUCCESS:
        raise ConnectionError(f"RPC tracker at {remote.addr} answered {value!r}")
    url, port, matchkey = value[1]
    return rpc_connect(url, port, matchkey, remote.session_timeout)


def device_info(session=None) -> dict:
    """What the device says about itself (machine_info() there, plus pid and TVM version).
    Locally: machine_info(). A stock TVM RPC server (not `mosc device serve`) has no such
    function: {} then. Any other failure (the session dropped) propagates."""
    if session is None:
        return machine_info()
    try:
        func = session.get_function(DEVICE_INFO_FUNC)
    except AttributeError:  # TVM's "Module has no function": a stock server
        return {}
    return json.loads(func())


def cpu_model() -> str | None:
    """The CPU's model name (/proc/cpuinfo; platform.processor() elsewhere), None when unknown."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model", "Hardware", "cpu model") and value.strip():
            return value.strip()
    return platform.processor() or None


def machine_info() -> dict:
    """This machine: the one description recorded with measurements and bench results, and the
    base of what a device answers over RPC. Standard library only (the emulated device's Python
    computes it too); `emulated` and `emulator` come from the environment `mosc device emulate` sets."""
    info = {"hostname": socket.gethostname(), "machine": platform.machine(), "system": platform.system(),
            "release": platform.release(), "python": platform.python_version(),
            "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "cpu_model": cpu_model(), "emulated": env.emulated()}
    if info["emulated"]:
        info["emulator"] = env.emulator()
    return info


# local file problems are OSErrors too, but no retry fixes them
_NOT_TRANSPORT = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)
# kinds of TVM errors that carry no Python meaning (a failed check, a socket error in C++); the
# others map to TypeError, ValueError, ... and mean what those mean
_TVM_RUNTIME_KINDS = ("InternalError", "RuntimeError", "TVMError")


def device_failure(e: BaseException, over_session: bool = False) -> bool:
    """Whether `e` is the device or the way to it failing (worth another try), not a bug or a
    user error: connection and socket errors, timeouts, TVM's RPC errors and, when a TVM RPC
    session was in use (over_session), any runtime error TVM raised (a dropped session shows up
    as tvm.error.InternalError "Broken pipe" or "code=kShutdown"). MoscError, and Python errors
    such as TypeError, KeyError or ValueError (also when TVM maps them), are not."""
    if isinstance(e, MoscError) or isinstance(e, _NOT_TRANSPORT):
        return False
    if isinstance(e, OSError):  # ConnectionError, TimeoutError, socket.timeout, socket.gaierror, ...
        return True
    tvm_error = sys.modules.get("tvm.error")  # not imported: no TVM error can have been raised
    if tvm_error is not None and isinstance(e, tvm_error.RPCError):  # RPCSessionTimeoutError too
        return True
    kind = getattr(getattr(e, "__tvm_ffi_error__", None), "kind", None)  # set on errors TVM raised
    return over_session and kind in _TVM_RUNTIME_KINDS
