"""Time cuSPARSELt's algorithms in a child process, so one that crashes cannot take the caller down.

On an H200 with cuSPARSELt 0.8.0 the fastest way to pose y = x W^T (layout 4 in
csrc/cusparselt_gemm.cpp: 1.3-1.45x over cuBLAS at M >= 1024 on Llama-3-8B's qkv/o) has no
working ``cusparseLtMatmulSearch``, and a few of its algorithm ids hit an illegal instruction at
some shapes, which poisons the CUDA context for good. So the dispatcher sweeps the ids here: a
long-lived child (started once per process, ~5-10 s) runs each id on random data of the right
shape, checks it against a float32 reference and times it; if the child dies, the id it was
running is recorded as crashing and a new child carries on past it. The parent then runs only
ids that completed. Results are cached with the dispatcher's decisions, so this happens once per
(GPU, dtype, N, K, M-bucket).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

__all__ = ["TUNER", "Tuner"]

_REL_TOL = 2e-2  # an algorithm whose output is further than this from the reference is not used
_TIMEOUT_S = float(os.environ.get("SPARSEFLOW_TUNER_TIMEOUT", "180"))


class Tuner:
    """Parent side: one child process, restarted after a crash."""

    def __init__(self, cmd: list[str] | None = None, timeout_s: float = _TIMEOUT_S) -> None:
        self.cmd = cmd or [sys.executable, "-m", "sparseflow.cslt_tuner"]
        self.timeout_s = timeout_s  # per request; a child silent for longer is killed
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self.crashed: list[tuple] = []  # (request, algorithm id) pairs that killed a child
        self.children = 0

    def _start(self) -> subprocess.Popen:
        if self._proc is None or self._proc.poll() is not None:
            self._proc = subprocess.Popen(
                self.cmd,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
                bufsize=1,
            )
            self.children += 1
        return self._proc

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._proc = None

    def sweep(self, device: int, dtype: str, n: int, k: int, m: int, layout: int) -> dict[int, float]:
        """{algorithm id: ms} for every id that ran and gave a right answer; ids that crashed a
        child, failed, or gave a wrong answer are left out."""
        req = {"device": device, "dtype": dtype, "n": n, "k": k, "m": m, "layout": layout, "start": 0}
        times: dict[int, float] = {}
        with self._lock:
            for _ in range(64):  # a crash costs one id; this bounds the restarts
                proc = self._start()
                last, done = None, False
                watchdog = threading.Timer(self.timeout_s, proc.kill)  # a hung child counts as a crash
                watchdog.start()
                try:
                    proc.stdin.write(json.dumps(req) + "\n")
                    proc.stdin.flush()
                    for line in proc.stdout:  # ends at EOF when the child dies
                        f = line.split()
                        if not f:
                            continue
                        if f[0] == "TRY":
                            last = int(f[1])
                        elif f[0] == "OK" and float(f[3]) <= _REL_TOL:
                            times[int(f[1])] = float(f[2])
                        elif f[0] == "END":
                            done = True
                            break
                except (BrokenPipeError, OSError):
                    pass
                finally:
                    watchdog.cancel()
                if done:
                    return times
                self.close()
                if last is None:  # the child could not even start the sweep
                    return times
                self.crashed.append((dict(req), last))
                req["start"] = last + 1
        return times


TUNER = Tuner()


def _sweep_one(r: dict) -> None:
    """Child side of one request: print TRY before each id, OK with its time and error after."""
    import torch
    import torch.nn.functional as F

    from sparseflow._ext import _C
    from sparseflow.dispatch import _median_ms
    from sparseflow.format import prune_2_4

    torch.cuda.set_device(r["device"])
    dtype = getattr(torch, r["dtype"])
    n, k, m, layout = r["n"], r["k"], r["m"], r["layout"]
    g = torch.Generator(device="cuda").manual_seed(0)
    w = prune_2_4(torch.randn(n, k, device="cuda", dtype=dtype, generator=g))
    x = torch.randn(m, k, device="cuda", dtype=dtype, generator=g)
    ref = F.linear(x.float(), w.float())
    scale = ref.abs().max().item() or 1.0
    packed = _C.cslt_compress(w, layout)
    for alg in range(r["start"], int(_C.cslt_alg_count(x, packed, n, layout))):
        print("TRY", alg, flush=True)
        cfg = [alg, 1, 0, 0]
        try:
            err = (_C.cslt_mm(x, packed, n, cfg, layout).float() - ref).abs().max().item() / scale
            ms = _median_ms(lambda cfg=cfg: _C.cslt_mm(x, packed, n, cfg, layout), iters=3, batch=2)
        except RuntimeError:
            _exit_if_context_lost()
            continue
        print("OK", alg, ms, err, flush=True)


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
