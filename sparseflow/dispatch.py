"""Per-shape choice between the 2:4 kernel and dense cuBLAS, measured on the GPU in use.

For each (dtype, N, K, M-bucket) we run ``cusparseLtMatmulSearch`` once, time the searched
sparse kernel against ``F.linear`` on the same shapes, and remember both the winning algorithm
and the faster path. Decisions persist in a JSON file keyed by GPU name and cuSPARSELt version
(``$SPARSEFLOW_CACHE_DIR``, default ``~/.cache/sparseflow``), so a new process neither searches
nor measures again. Buckets are powers of two (>= 16): M in (b/2, b] uses bucket b.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import tempfile
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from sparseflow._ext import _C, CSLT_LAYOUT, warn_once

# The seed's rule, kept where nothing can be measured (CPU, or inside CUDA-graph capture before
# any measurement): sparse pays from M >= 2048.
STATIC_SPARSE_MIN_M = 2048


def m_bucket(m: int) -> int:
    return max(16, 1 << max(0, (int(m) - 1)).bit_length())


@dataclass
class Decision:
    choice: str  # "sparse" or "dense"
    cfg: list[int] = field(default_factory=lambda: [-1, 1, 0, 0])  # cuSPARSELt config id, split-k, mode, buffers
    sparse_ms: float | None = None
    dense_ms: float | None = None
    measured: bool = False
    search: str = ""  # how cfg was found: "cusparselt" (cusparseLtMatmulSearch) or "sweep"

    @property
    def speedup(self) -> float | None:
        if self.sparse_ms and self.dense_ms:
            return self.dense_ms / self.sparse_ms
        return None


def static_decision(m: int) -> Decision:
    return Decision("sparse" if m >= STATIC_SPARSE_MIN_M else "dense")


def _median_ms(fn, iters: int = 7, warmup: int = 3, batch: int = 8) -> float:
    """Median over ``iters`` samples of the mean time of ``batch`` back-to-back calls (CUDA events):
    batching keeps host launch gaps of small problems out of the figure."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(batch):
            fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / batch)
    return statistics.median(times)


def _search(x: torch.Tensor, packed: torch.Tensor, n: int) -> tuple[list[int], float, str]:
    """Best cuSPARSELt config for this problem and its time: the library's own search, timed
    against a sweep of every algorithm id when the search fails (it does for some small shapes)."""
    try:
        cfg = [int(v) for v in _C.cslt_search(x, packed, n, CSLT_LAYOUT)[:4]]
        return cfg, _median_ms(lambda: _C.cslt_mm(x, packed, n, cfg, CSLT_LAYOUT)), "cusparselt"
    except RuntimeError:
        pass
    best: tuple[list[int], float] | None = None
    for alg in range(int(_C.cslt_alg_count(x, packed, n, CSLT_LAYOUT))):
        cfg = [alg, 1, 0, 0]
        try:
            ms = _median_ms(lambda cfg=cfg: _C.cslt_mm(x, packed, n, cfg, CSLT_LAYOUT), iters=3, warmup=1, batch=4)
        except RuntimeError:
            continue
        if best is None or ms < best[1]:
            best = (cfg, ms)
    if best is None:
        cfg = [-1, 1, 0, 0]
        return cfg, _median_ms(lambda: _C.cslt_mm(x, packed, n, cfg, CSLT_LAYOUT)), "default"
    return best[0], _median_ms(lambda: _C.cslt_mm(x, packed, n, best[0], CSLT_LAYOUT)), "sweep"


class Dispatcher:
    """Decisions for one process; thread-safe; persisted per GPU model."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._decisions: dict[tuple, Decision] = {}
        self._loaded: set[str] = set()
        self.searches = 0  # cusparseLtMatmulSearch runs in this process (tests read it)

    # -- persistence -------------------------------------------------------------------
    @staticmethod
    def cache_dir() -> Path:
        return Path(os.environ.get("SPARSEFLOW_CACHE_DIR", Path.home() / ".cache" / "sparseflow"))

    def cache_file(self, device: torch.device) -> Path:
        name = re.sub(r"[^A-Za-z0-9]+", "_", torch.cuda.get_device_name(device)).strip("_")
        version = _C.cslt_version() if _C is not None else 0
        return self.cache_dir() / f"dispatch-{name}-cusparselt{version}-layout{CSLT_LAYOUT}.json"

    @staticmethod
    def _key_str(key: tuple) -> str:
        dtype, n, k, bucket = key[1:]
        return f"{str(dtype).replace('torch.', '')}:{n}x{k}:m{bucket}"

    def _load(self, device: torch.device) -> None:
        path = self.cache_file(device)
        if str(path) in self._loaded:
            return
        self._loaded.add(str(path))
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            warn_once(f"badcache:{path}", f"sparseflow: ignoring unreadable dispatch cache {path}: {exc}")
            return
        for ks, d in data.get("decisions", {}).items():
            m = re.fullmatch(r"(\w+):(\d+)x(\d+):m(\d+)", ks)
            if not m or not hasattr(torch, m.group(1)):
                continue
            key = (str(device), getattr(torch, m.group(1)), int(m.group(2)), int(m.group(3)), int(m.group(4)))
            self._decisions.setdefault(key, Decision(**d))

    def _save(self, device: torch.device) -> None:
        path = self.cache_file(device)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            old = json.loads(path.read_text()).get("decisions", {})
        except (OSError, ValueError):
            old = {}
        mine = {self._key_str(k): asdict(d) for k, d in self._decisions.items() if k[0] == str(device) and d.measured}
        data = {"gpu": torch.cuda.get_device_name(device), "decisions": {**old, **mine}}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)  # atomic: concurrent processes never see half a file

    # -- decisions ---------------------------------------------------------------------
    def lookup(self, device: torch.device, dtype: torch.dtype, n: int, k: int, m: int) -> Decision | None:
        key = (str(device), dtype, n, k, m_bucket(m))
        d = self._decisions.get(key)
        if d is None:
            with self._lock:
                self._load(device)
                d = self._decisions.get(key)
        return d

    def decide(self, weight, m: int) -> Decision:
        """The decision for ``weight`` (a CUDA Sparse24Weight) at M rows; measures on first use."""
        device, dtype, (n, k) = weight.device, weight.dtype, weight.shape
        d = self.lookup(device, dtype, n, k, m)
        if d is not None:
            return d
        if torch.cuda.is_current_stream_capturing():
            warn_once(
                f"capture:{n}x{k}:{m}",
                f"sparseflow: no measured decision for {n}x{k} at M={m} during CUDA-graph capture; using the "
                "default sparse plan. Run one eager forward at this size before capturing.",
            )
            return Decision("sparse")
        with self._lock:
            key = (str(device), dtype, n, k, m_bucket(m))
            if key not in self._decisions:
                self._decisions[key] = self._measure(weight, m_bucket(m))
                self._save(device)
            return self._decisions[key]

    def _measure(self, weight, bucket: int) -> Decision:
        n, k = weight.shape
        with torch.cuda.device(weight.device), torch.no_grad():
            x = torch.randn(bucket, k, dtype=weight.dtype, device=weight.device)
            packed = weight.cslt_packed()
            cfg, sparse_ms, how = _search(x, packed, n)
            self.searches += 1
            dense = weight.dense_on_device(keep=False)  # the cached copy if a dense route made one
            dense_ms = _median_ms(lambda: F.linear(x, dense))
        choice = "sparse" if sparse_ms <= dense_ms else "dense"
        return Decision(choice, cfg, sparse_ms, dense_ms, measured=True, search=how)

    def table(self, device: torch.device, dtype: torch.dtype, n: int, k: int) -> list[dict]:
        """Every decision known for this shape, for inspection (one row per M-bucket)."""
        self.lookup(device, dtype, n, k, 1)
        rows = []
        for key, d in sorted(self._decisions.items(), key=lambda kv: kv[0][4]):
            if key[:4] == (str(device), dtype, n, k):
                rows.append(
                    {
                        "m_bucket": key[4],
                        "choice": d.choice,
                        "speedup_vs_dense": d.speedup,
                        "sparse_ms": d.sparse_ms,
                        "dense_ms": d.dense_ms,
                        "cusparselt_cfg": d.cfg,
                    }
                )
        return rows

    def clear(self) -> None:
        with self._lock:
            self._decisions.clear()
            self._loaded.clear()


DISPATCHER = Dispatcher()
