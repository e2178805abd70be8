"""Time cuSPARSELt's algorithms in a child process, so one that crashes cannot take the caller down.

On an H200 with cuSPARSELt 0.8.0 the fastest way to pose y = x W^T (layout 4 in
csrc/cusparselt/cusparselt_gemm.cpp: 1.17-1.70x over cuBLAS at M >= 1024 on Llama-3-8B's layers) has no
working ``cusparseLtMatmulSearch``, and a few of its algorithm ids hit an illegal instruction at
some shapes, which poisons the CUDA context for good. So the dispatcher sweeps the ids here: a
long-lived child (started once per process, ~5-10 s) runs each id on random data of the right
shape, checks it against a float32 reference and times it; if the child dies, the id it was
running is recorded as crashing and a new child carries on past it. The fastest few ids are then
tried again with Segment-K (split-k -1), the Hopper schedule the library's own search picks for
most shapes of the layout where it works. The parent runs only configurations that completed.
Results are cached with the dispatcher's decisions, so this happens once per (GPU, dtype, N, K,
M-bucket).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time

from sparseflow._ext import env_number, warn_once

__all__ = ["TUNER", "Tuner"]

_REL_TOL = 2e-2  # an algorithm whose output is further than this from the reference is not used
_TIMEOUT_S = env_number("SPARSEFLOW_TUNER_TIMEOUT", 90.0)
_SEGMENT_K_TOP = 6  # how many of the fastest ids are tried again with Segment-K


class Tuner:
    """Parent side: one child process, restarted after a crash, with bounds so that a sweep that
    goes wrong costs seconds, not minutes: two crashes in a row end the sweep (and the ids from
    there up are skipped for that layout from then on, as is a tail of ids the library refuses),
    each request has a time budget, and after repeated trouble the tuner turns itself off."""

    def __init__(self, cmd: list[str] | None = None, timeout_s: float = _TIMEOUT_S, idle_s: float = 60.0) -> None:
        self.cmd = cmd or [sys.executable, "-m", "sparseflow.kernels.cusparselt_tuner"]
        self.timeout_s = timeout_s  # per request: a child still busy after this is killed
        self.idle_s = idle_s  # an idle child is ended after this, giving back its GPU memory
        self._lock = threading.Lock()
        self._idle: threading.Timer | None = None
        self._proc: subprocess.Popen | None = None
        self.crashed: list[tuple[dict, int]] = []  # (request, algorithm id) pairs that killed a child
        self.failed: list[tuple[dict, int]] = []  # ids the library refused (an error, the child lived)
        self.stop_at: dict[tuple, int] = {}  # (layout, dtype) -> ids from here up are not tried
        self.children = 0
        self.troubles = 0  # requests that ended without a finished sweep
        self.disabled = False

    def _start(self) -> subprocess.Popen:
        if self._proc is None or self._proc.poll() is not None:
            # The child imports sparseflow from wherever this process did (sys.path, not just the
            # environment's PYTHONPATH), and sees the same GPUs (CUDA_VISIBLE_DEVICES is inherited).
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
            log = os.environ.get("SPARSEFLOW_TUNER_LOG")  # the child's stderr, for diagnosing crashes
            self._proc = subprocess.Popen(
                self.cmd,
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=open(log, "a") if log else subprocess.DEVNULL,  # noqa: SIM115 -- the child owns it
                text=True,
                bufsize=1,
            )
            self.children += 1
        return self._proc

    def _close_if_idle(self) -> None:
        if self._lock.acquire(blocking=False):  # a sweep in progress keeps its child
            try:
                self.close()
            finally:
                self._lock.release()

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._proc = None

    def _run(self, req: dict, times: dict[int, float], deadline: float) -> tuple[bool, int | None, list[int]]:
        """One child conversation: (finished, last id started, ids refused)."""
        try:
            proc = self._start()
        except OSError:  # no usable interpreter (embedded Python, a frozen app): no child, no sweep
            return False, None, []
        last, done, refused = None, False, []
        watchdog = threading.Timer(max(1.0, deadline - time.time()), proc.kill)
        watchdog.start()
        try:
            proc.stdin.write(json.dumps(req) + "\n")
            proc.stdin.flush()
            for line in proc.stdout:  # ends at EOF when the child dies
                f = line.split()
                try:
                    if f and f[0] == "TRY":
                        last = int(f[1])
                    elif f and f[0] == "OK" and float(f[3]) <= _REL_TOL:
                        times[int(f[1])] = float(f[2])
                    elif f and f[0] == "FAIL":
                        refused.append(int(f[1]))
                    elif f and f[0] == "END":
                        done = True
                        break
                except (IndexError, ValueError):  # a stray line a library printed: not ours
                    continue
        except (BrokenPipeError, OSError):
            pass
        finally:
            watchdog.cancel()
        return done, last, refused

    def sweep(self, device: int, dtype: str, n: int, k: int, m: int, layout: int) -> dict[tuple[int, int], float]:
        """{(algorithm id, split-k): ms} for every configuration that ran and gave a right answer;
        those that crashed a child, failed, or gave a wrong answer are left out. First every id
        with the library's split-k, then the fastest few again with Segment-K (split-k -1, a
        Hopper-specific schedule cuSPARSELt's own search often picks). Empty when the tuner is
        off or the child could not run at all."""
        base = {"device": device, "dtype": dtype, "n": n, "k": k, "m": m, "layout": layout, "start": 0}
        found: dict[tuple[int, int], float] = {}
        with self._busy():
            if not self.disabled:
                family = (layout, dtype)
                times: dict[int, float] = {}
                self._sweep({**base, "stop": self.stop_at.get(family, 1 << 30)}, family, times)
                found = {(alg, 1): ms for alg, ms in times.items()}
                top = sorted(times, key=times.get)[:_SEGMENT_K_TOP]
                family = (layout, dtype, "segment-k")
                if top and not self.disabled and self.stop_at.get(family, 1) > 0:
                    variants = [[alg, -1] for alg in top]
                    times = {}
                    self._sweep({**base, "variants": variants, "stop": len(variants)}, family, times)
                    found.update({(variants[i][0], -1): ms for i, ms in times.items()})
        return found

    def check(self, device: int, dtype: str, n: int, k: int, m: int, layout: int, variant: list[int]) -> float | None:
        """Run one configuration ([algorithm id, split-k]) at M rows in the child: its time if it
        completed with a right answer, else None. A plan searched at one M is run at others (the
        dispatcher's buckets between anchors) only after this, since some ids crash at some M."""
        req = {"device": device, "dtype": dtype, "n": n, "k": k, "m": m, "layout": layout, "start": 0}
        req.update(variants=[list(variant)], stop=1)
        with self._busy():
            if self.disabled:
                return None
            times: dict[int, float] = {}
            self._sweep(req, (layout, dtype, "check"), times)
            return times.get(0)

    @contextlib.contextmanager
    def _busy(self):
        """One request at a time; the idle timer is stopped while it runs and restarted after, so
        an idle child is ended (giving back its GPU memory) only between requests."""
        with self._lock:
            if self._idle is not None:
                self._idle.cancel()
            try:
                yield
            finally:
                self._idle = threading.Timer(self.idle_s, self._close_if_idle)
                self._idle.daemon = True
                self._idle.start()

    def _sweep(self, req: dict, family: tuple, times: dict[int, float]) -> None:
        """Fill ``times``; restart past crashes within the bounds the class docstring names."""
        deadline = time.time() + self.timeout_s
        prev_crash, fresh_retry = None, True
        while time.time() < deadline:
            done, last, refused = self._run(req, times, deadline)
            self.failed += [(dict(req), alg) for alg in refused]
            if done:
                tail = _refused_tail(refused, last)
                if tail is not None:
                    self.stop_at[family] = min(tail, self.stop_at.get(family, 1 << 30))
                if refused:  # the library errored: continue in a fresh child, clean state
                    self.close()
                return
            self.close()
            if last is None:  # died before its first id: retry once in a fresh child
                if not fresh_retry:
                    break
                fresh_retry = False
                continue
            self.crashed.append((dict(req), last))
            if prev_crash == last - 1:  # two in a row: what follows is not worth a child each
                self.stop_at[family] = min(prev_crash, self.stop_at.get(family, 1 << 30))
                return
            prev_crash, req["start"] = last, last + 1
        self.troubles += 1
        if self.troubles >= 3:
            self.disabled = True
            warn_once(
                "tuner-off",
                "sparseflow: the cuSPARSELt tuner's child process keeps failing; measuring only "
                "cuSPARSELt's searched layout from now on",
            )


def _refused_tail(refused: list[int], last: int | None) -> int | None:
    """The first id of a run of refused ids (>= 2) that reaches the last id tried, else None."""
    if last is None or len(refused) < 2 or refused[-1] != last:
        return None
    start = last
    for alg in reversed(refused):
        if alg != start and alg != start - 1:
            break
        start = alg
    return start if last - start >= 1 else None


TUNER = Tuner()


def _sweep_one(r: dict) -> None:
    """Child side of one request: print TRY before each id, OK with its time and error after."""
    import torch
    import torch.nn.functional as F

    from sparseflow._ext import _C
    from sparseflow.format import prune_2_4
    from sparseflow.kernels.dispatch import _median_ms

    torch.cuda.set_device(r["device"])
    dtype = getattr(torch, r["dtype"])
    n, k, m, layout = r["n"], r["k"], r["m"], r["layout"]
    g = torch.Generator(device="cuda").manual_seed(0)
    w = prune_2_4(torch.randn(n, k, device="cuda", dtype=dtype, generator=g))
    x = torch.randn(m, k, device="cuda", dtype=dtype, generator=g)
    ref = F.linear(x.float(), w.float())
    scale = ref.abs().max().item() or 1.0
    packed = _C.cslt_compress(w, layout)
    # Entry i of the list is what "TRY i" refers to: every algorithm id (library split-k), or the
    # parent's explicit [id, split-k] pairs.
    variants = r.get("variants") or [[alg, 1] for alg in range(int(_C.cslt_alg_count(x, packed, n, layout)))]
    for i in range(r["start"], min(r["stop"], len(variants))):
        print("TRY", i, flush=True)
        cfg = [variants[i][0], variants[i][1], 0, 0]
        try:
            err = (_C.cslt_mm(x, packed, n, cfg, layout).float() - ref).abs().max().item() / scale
            ms = _median_ms(lambda cfg=cfg: _C.cslt_mm(x, packed, n, cfg, layout), iters=3, batch=2)
        except RuntimeError:
            _exit_if_context_lost()
            print("FAIL", i, flush=True)
            continue
        print("OK", i, ms, err, flush=True)


def _exit_if_context_lost() -> None:
    """An illegal instruction does not always end the process: it leaves the CUDA context broken,
    so every later call fails. Exit then, so the parent records a crash and starts a fresh child."""
    import torch

    try:
        torch.ones(1, device="cuda").add_(1).item()
    except RuntimeError:
        os._exit(3)


def _child() -> None:
    import torch

    for line in sys.stdin:
        _sweep_one(json.loads(line))
        print("END", flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    _child()
