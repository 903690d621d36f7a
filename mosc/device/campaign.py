"""A measurement campaign: many archs, one backend, one device -> rows of the latency database.

    Campaign(target, backend, db, remote=...)   probe() the device, then run(archs, prepare)
    CampaignResult                              rows written and archs skipped

Each arch is prepared (the caller's callback builds or reuses its artifact), timed
(mosc.device.backends) and committed as its own row at once, so a run that fails part-way
keeps what it measured and the same command resumes it. Failures of the device or the way
to it (mosc.rpc.device_failure) are retried with exponential backoff; anything else (a bug,
a MoscError) propagates at once.

Knows nothing of how artifacts are built (torch world: mosc.jobs.artifacts) nor of how a
backend times a model (mosc.device.backends) or what the statistics are (mosc.device.protocol).
No torch or tvm at module level.
"""

from __future__ import annotations

import gc
import socket
import time
from dataclasses import dataclass, field
from typing import Callable, TypeVar

from mosc.compiler.targets import Target
from mosc.device.backends import BACKENDS, Prepared, measure_prepared
from mosc.device.protocol import Measurement, noisy
from mosc.errors import MoscError
from mosc.rpc import Remote, connect, device_failure, device_info, machine_info
from mosc.space import Arch

TRIES = 3  # attempts per step before giving up (prepare; connect, upload, load, measure)
BACKOFF_S = 0.5  # first pause between attempts; doubles each time
STAT_COLUMNS = ("latency_ms", "mean_ms", "trimmed_mean_ms", "median_ms", "p90_ms", "std_ms", "min_ms", "max_ms",
                "encoder_ms", "decoder_ms", "encoder_std_ms", "decoder_std_ms")
T = TypeVar("T")


def _one_line(e: BaseException) -> str:
    lines = [l.strip() for l in str(e).strip().splitlines() if l.strip()]
    # TVM errors carry a traceback; the last line is the message
    msg = lines[-1] if lines else type(e).__name__
    for marker in ("RPCSessionTimeoutError", "Connection reset", "connection closed", "Broken pipe"):
        for l in lines:
            if marker.lower() in l.lower():
                return l[:300]
    return f"{type(e).__name__}: {msg}"[:300]


class _Failed(Exception):
    """Internal: retries exhausted (turned into a MoscError with context by the caller)."""


@dataclass
class CampaignResult:
    measured: list[dict] = field(default_factory=list)  # rows written (id None: kept in the DB's pending file)
    skipped: list[str] = field(default_factory=list)  # arch hashes already in the DB

    @property
    def kept(self) -> int:
        """Rows the database could not take (locked), kept in its side file until the next writer merges them."""
        return sum(r.get("id") is None for r in self.measured)


class Campaign:
    """Measure archs one by one into the latency DB; each row is committed as soon as it is taken.

    Preparing an arch and measuring it each get TRIES attempts with exponential backoff when
    the device or the connection fails; a failure after the last one raises MoscError (one
    line) with what was saved. Archs already in the DB for (target, backend, device key,
    emulated, shapes) are skipped unless force=True, so re-running the same command continues
    where it stopped.
    """

    def __init__(self, target: Target, backend: str, db, *, remote: Remote | None = None, force: bool = False,
                 tries: int = TRIES, backoff_s: float = BACKOFF_S, log: Callable[[str], None] = print,
                 source: str = "mosc measure"):
        if backend not in BACKENDS:
            raise MoscError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        if remote is not None and backend != "tvm":
            raise MoscError(f"--backend {backend} measures on this machine; --tracker/--key are for tvm artifacts")
        self.target, self.backend, self.db, self.remote = target, backend, db, remote
        self.force, self.tries, self.backoff_s, self.log, self.source = force, tries, backoff_s, log, source
        self.device: dict = {}
        self.key = remote.key if remote else f"local:{socket.gethostname()}"
        self.result = CampaignResult()  # of the current run(), filled as it goes (what an interrupted run kept)

    # -- device ------------------------------------------------------------------------
    def _retry(self, what: str, fn: Callable[[], T], over_session: bool = False) -> T:
        """fn(), again after a device/connection failure (up to self.tries in all); _Failed when
        every try failed. Any other exception propagates from the first try, traceback and all."""
        last = None
        for attempt in range(1, self.tries + 1):
            try:
                return fn()
            except Exception as e:
                if not device_failure(e, over_session):
                    raise
                last = _one_line(e)
            if attempt < self.tries:
                pause = self.backoff_s * 2 ** (attempt - 1)
                self.log(f"  try {attempt}/{self.tries} of {what} failed: {last}; retrying in {pause:g} s")
                time.sleep(pause)
        raise _Failed(f"{what} failed after {self.tries} tries: {last}")

    def probe(self) -> dict:
        """Check the device before building anything: tracker up, key registered, device info."""
        if self.remote is None:
            self.device = machine_info()
            return self.device

        def once():
            sess = connect(self.remote)
            try:
                return device_info(sess)
            finally:
                del sess
                gc.collect()  # end the session now (an RPC session ends when its last handle is freed)

        try:
            self.device = self._retry(f"connecting to {self.remote.key!r} via tracker {self.remote.addr}", once,
                                      over_session=True)
        except _Failed as e:
            raise MoscError(str(e)) from None
        return self.device

    @property
    def emulated(self) -> bool:
        return bool(self.device.get("emulated"))

    @property
    def shapes(self) -> dict[str, int]:
        p = self.target.protocol
        return {"batch": p.batch, "source_len": p.source_len, "decoder_steps": p.decoder_steps}

    # -- archs -------------------------------------------------------------------------
    def run(self, archs: list[Arch], prepare: Callable[[Arch], Prepared],
            done: Callable[[], None] | None = None) -> CampaignResult:
        """Measure (or skip) every arch in order; `done()` is called after each one (a progress bar)."""
        res = self.result = CampaignResult()
        if not self.device:
            self.probe()
        for i, arch in enumerate(archs, 1):
            where = f"[{i}/{len(archs)}] {arch.hash}"
            if not self.force and self.db.has(arch.hash, self.target.name, self.backend, self.key, self.emulated,
                                              self.shapes):
                res.skipped.append(arch.hash)
                self.log(f"{where}: already in the database, skipped (--force re-measures)")
            else:
                self._measure_one(arch, prepare, where)
            if done:
                done()
        return res

    def _measure_one(self, arch: Arch, prepare: Callable[[Arch], Prepared], where: str) -> dict:
        """Prepare, time and store one arch -> its row (committed, and added to self.result)."""
        t0 = time.perf_counter()
        try:
            prep = self._retry(f"preparing arch {arch.hash}", lambda: prepare(arch))
            m, sha = self._retry(f"measuring arch {arch.hash} on {self.key}",
                                 lambda: measure_prepared(self.backend, prep, self.target.protocol, self.remote),
                                 over_session=self.remote is not None)
        except _Failed as e:
            raise MoscError(f"{e}; {self.saved_where()}; re-run the same command to measure the rest") from None
        if m.shapes != self.shapes:
            raise MoscError(f"arch {arch.hash}: graphs have shapes {m.shapes}, the {self.target.name} protocol "
                            f"says {self.shapes} (stale artifact? rebuild it)")
        row = self._row(arch, m, sha, prep)
        noise = noisy(m.stats)
        if noise:
            row["extra"]["noisy"] = noise
        # committed now: a later failure loses nothing (a database locked too long: kept in its side file)
        row["id"] = self.db.insert_or_keep(row)
        self.result.measured.append(row)
        self._report(where, m, time.perf_counter() - t0, noise)
        return row

    def saved_where(self) -> str:
        """Where this run's measurements are: "N arch(s) measured and saved in DB"."""
        kept = self.result.kept
        side = f" ({kept} of them kept in {self.db.pending_path} until the database takes them)" if kept else ""
        return f"{len(self.result.measured)} arch(s) measured and saved in {self.db.path}{side}"

    def _report(self, where: str, m: Measurement, seconds: float, noise: str | None) -> None:
        s = m.stats
        tag = " [emulated: timings check function, not speed]" if self.emulated else ""
        kernel = f", kernels alone {s['kernel_ms']:.2f}" if "kernel_ms" in s else ""
        self.log(f"{where}: {s['trimmed_mean_ms']:.2f} ms trimmed mean "
                 f"(encoder {s['encoder_ms']:.2f} + decoder {s['decoder_ms']:.2f}{kernel}; median {s['median_ms']:.2f}, "
                 f"p90 {s['p90_ms']:.2f}, std {s['std_ms']:.2f}; {len(m.total_ms)} runs, {seconds:.1f} s){tag}")
        if noise:
            self.log(f"  warning: noisy measurement ({noise}); is something else running? "
                     "`--force` re-measures (the row is kept, marked noisy in its extra)")

    def _row(self, arch: Arch, m: Measurement, sha: str | None, prep: Prepared) -> dict:
        tvm_version = None
        if self.backend == "tvm":
            from importlib.metadata import version

            tvm_version = f"apache-tvm {version('apache-tvm')}, apache-tvm-ffi {version('apache-tvm-ffi')}"
        host = {"client": machine_info()}
        kernel = {} if m.kernel_ms is None else {"kernel_ms": round(m.stats["kernel_ms"], 6),
                                                 "kernel_samples": [round(x, 6) for x in m.kernel_ms]}
        if self.remote is not None:
            host["device"] = self.device
        return {
            "target": self.target.name, "backend": self.backend, "device_key": self.key,
            "emulated": self.emulated, "arch_hash": arch.hash, "arch_json": arch.to_json(),
            "features": arch.hat_features(), **m.shapes, **{k: m.stats[k] for k in STAT_COLUMNS},
            "runs": len(m.total_ms), "warmup": m.warmup, "trim": m.trim,
            "samples": [round(x, 6) for x in m.total_ms], "artifact_sha256": sha, "tvm_version": tvm_version,
            "host": host, "source": self.source,
            "extra": {"method": m.method, "protocol": m.protocol, "encoder_samples": [round(x, 6) for x in m.encoder_ms],
                      "decoder_samples": [round(x, 6) for x in m.decoder_ms], **kernel, **prep.notes},
        }
