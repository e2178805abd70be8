"""Per-shape choice among dense cuBLAS, cuSPARSELt, CUTLASS's sm90 kernels and our decode kernel,
measured on the GPU.

For each (dtype, N, K, M-bucket) we time, once, on the shapes themselves: ``F.linear``;
cuSPARSELt with the algorithm ``cusparseLtMatmulSearch`` (or our tuner) picks; on Hopper, each
compiled CUTLASS configuration (``sparseflow.kernels.cutlass``); and, for M <= 64, our small-M
kernel (``sparseflow.kernels.decode``) at a few split-K factors. The decision (with every time measured)
persists in a JSON file keyed by GPU name and cuSPARSELt version (``$SPARSEFLOW_CACHE_DIR``,
default ``~/.cache/sparseflow``), so a new process neither searches nor measures again.

Buckets are narrow (``m_bucket``: steps of 8 tokens up to 128, then 8 per octave) and every
candidate is timed at both ends of its bucket: a kernel is chosen only if it beats dense at both.
Dense cuBLAS's time falls with M while a tiled 2:4 kernel's falls in steps, so a choice measured at
the top of a wide (power-of-two) bucket could lose 2x at its bottom. Inside a bucket CUTLASS's
configuration is chosen per M (``cutlass_plan``): a configuration whose token tiles are full at
M = 1337 may need one more tile at the bucket's top (1408), where it measures slow. The cuSPARSELt
tuner's sweep (seconds) runs at power-of-two anchors only; the buckets between re-time the
anchors' plans beside the library's own in-process search.
"""

from __future__ import annotations

import functools
import json
import os
import re
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from sparseflow._ext import _C, CSLT_LAYOUT_OVERRIDE, env_number, warn_once
from sparseflow.kernels import cusparselt, cutlass
from sparseflow.kernels.cusparselt import cslt_candidates, cslt_unsupported, search_works
from sparseflow.kernels.cutlass import Step
from sparseflow.kernels.decode import DECODE_MAX_M
from sparseflow.kernels.timing import median_ms

# Where nothing can be measured (inside CUDA-graph capture before any eager call at that size):
# our decode kernel up to this M, dense above: on the H200 the decode kernel beat cuBLAS on every
# Llama-3-8B layer at M <= 16 (1.13-1.74x) and
# lost at M = 64, and cuSPARSELt lost to cuBLAS on most shapes even at M >= 2048.
STATIC_DECODE_MAX_M = 16


# cuSPARSELt is measured from this M-bucket up (alongside our decode kernel up to M = 64). At
# M <= 8 our kernel runs at 86-95% of cuBLAS's bandwidth, which no GEMM library beats; from 16 up
# cuSPARSELt's layout-4 kernels may (the vendor reports 1.5-1.9x at M = 16-64 on an H100 with
# searched plans), and the dispatcher keeps whichever is measured fastest.
CSLT_MIN_BUCKET = 16
# The tuner's sweep of a layout without a working library search costs seconds per (shape,
# M-bucket). Below this dense time the GEMM is launch-bound (a 135M model's layers), a better
# cuSPARSELt algorithm can save a microsecond or two, and layout 1's in-process search is kept.
# Llama-3-8B's layers take >= 12 us at every M on an H200, so they are always swept.
TUNER_MIN_DENSE_MS = env_number("SPARSEFLOW_TUNER_MIN_US", 10.0) / 1000


def portable_enabled() -> bool:
    """Whether the decode kernel may read the portable form in place (``SPARSEFLOW_DECODE_PORTABLE=0``
    keeps the packed copy, as the kernel's first versions always did)."""
    return os.environ.get("SPARSEFLOW_DECODE_PORTABLE", "1") != "0"


def _worth_measuring(layout: int, dense_ms: float) -> bool:
    """A layout that needs the tuner's sweep is measured only where the GEMM is not launch-bound
    (``TUNER_MIN_DENSE_MS``), unless the user forced that layout."""
    return search_works(layout) or bool(CSLT_LAYOUT_OVERRIDE) or dense_ms >= TUNER_MIN_DENSE_MS


# Cache format version: bump when Decision's meaning changes so old files are not misread.
_CACHE_VERSION = 15
# The decode kernel reading the portable form in place is used when it is at most this much slower
# than its packed-layout variants: it saves the packed copy (0.5625x the dense weight per layer).
# H200 (benchmarks/NOTES.md): the in-place ring pipeline ties the packed ring one at
# M <= 8 (3-5% slower at M = 16), but the packed register pipeline beats both, and no Llama-3-8B
# decision took the in-place reading. A packed copy kept for one M-bucket costs it for all.
PORTABLE_SLACK = 1.05
# A 2:4 kernel replaces dense only when measured at least this much faster: the first-call
# measurement is a few CUDA-graph replays, and a near-tie can flip to a loss at run time (seen on
# the H200: a 4096x4096 bf16 layer at M = 16 measured faster by the dispatcher ran at 0.89-0.93x dense
# in the benchmark). Forgoing a < 3% gain keeps "never slower than dense".
SPARSE_MIN_GAIN = 1.03
# Kernels a decision can be measured for alone (``Dispatcher.decide(only=...)``): those a compact
# layer keeps the layout of and runs at every M.
_SCOPES = ("cutlass", "cusparselt")
# CUTLASS variants (configuration, padded or not) timed at the bottom of a bucket too: the
# fastest ones at its top, and those within _CUTLASS_STEP_SLACK of the fastest whose token-tile
# count steps inside the bucket (the top's extra tile makes them look slower than they are below it).
_CUTLASS_RETIMED = 4
_CUTLASS_STEP_SLACK = 1.6
# Finalists at the top within this factor of the fastest are timed a second time before ranking.
_CUTLASS_NEAR_TIE = 1.15
# Token tiles of more than this many times a bucket's largest M (and more than _CUTLASS_TILE_FLOOR
# rows) are not timed there: one such tile is mostly empty rows. Of the 539 variants the
# 26-configuration H100 run kept in its plans (results/dispatch_h100_notuner_cutlass26.json), two
# had such a tile, both on test-sized weights (128 and 512 rows at M <= 24).
_CUTLASS_TILE_OVER_M = 2
_CUTLASS_TILE_FLOOR = 64
# Nor are token tiles narrower than a bucket's largest M / _CUTLASS_M_OVER_TILE (up to
# _CUTLASS_TILE_WIDE rows): they run many waves at large M, at several times cuBLAS's time, and
# timing them was most of the tuning there (the H100 grid spent 406 of its 608 s at M >= 3000).
# None of the 1,155 variants the H100 runs' plans kept (results/dispatch_h100_notuner_cutlass20,
# 26, 29_model and 29_probe) had a narrower tile; with 24 instead of 32, three would have been.
_CUTLASS_M_OVER_TILE = 32
_CUTLASS_TILE_WIDE = 128
# Compiled configurations the dispatcher does not time (the probes still run them): no decision
# of the H100 runs since configuration 23 was added used them, as the choice or as a variant of a
# plan (results/dispatch_h100_notuner_cutlass26.json, 438 decisions; ..._cutlass29_model.json and
# ..._cutlass29_probe.json, 108). 8 (128 x 256 stream-K) and 16 (128 x 256 in 2 x 1 clusters,
# stream-K) last ran before configuration 23 (256 x 128 in 2 x 1 clusters) took their rows; 22
# (256 x 64 in 2 x 1) never ran; 26 (256 x 160 in 2 x 1) ran 0.53-1.06x cuBLAS in the six-layer
# probe where 27 and 28 (256 x 192) ran up to 1.5x. Each costs two or four timings per bucket.
_CUTLASS_UNTIMED = frozenset({8, 16, 22, 26})


# (largest M, step): M is rounded up to a multiple of the step of the first range that holds it.
# Steps are multiples of 8 (the decode kernel's token tile) and 1/8 of each octave's bottom, so
# the two ends of a bucket differ by at most ~12% in work: 8 buckets per octave above 64 rows.
_BUCKET_STEPS = ((8, 8), (128, 8), (256, 16), (512, 32), (1024, 64), (2048, 128), (4096, 256), (8192, 512))
_BUCKET_STEP_MAX = 1024


@functools.lru_cache(maxsize=1 << 16)  # on every forward's hot path: a dict hit, not the loop
def m_bucket(m: int) -> int:
    """The bucket (its largest M) that M rows belong to."""
    m = max(1, int(m))
    for top, step in _BUCKET_STEPS:
        if m <= top:
            return -(-m // step) * step
    return -(-m // _BUCKET_STEP_MAX) * _BUCKET_STEP_MAX


def bucket_range(bucket: int) -> tuple[int, int]:
    """(smallest, largest) M of a bucket: the two sizes every candidate is timed at."""
    if bucket <= _BUCKET_STEPS[0][0]:
        return 1, bucket
    step = next((s for top, s in _BUCKET_STEPS if bucket <= top), _BUCKET_STEP_MAX)
    return bucket - step + 1, bucket


def anchor(bucket: int) -> int:
    """The power-of-two bucket whose cuSPARSELt search serves ``bucket``."""
    return max(8, 1 << (bucket - 1).bit_length())


@dataclass
class Decision:
    choice: str  # "dense", "cusparselt", "cutlass" or "decode"
    cfg: list[int] = field(default_factory=lambda: [-1, 1, 0, 0])  # cuSPARSELt config id, split-k, mode, buffers
    layout: int = 1  # cuSPARSELt GEMM layout cfg applies to
    sparse_ms: float | None = None  # cuSPARSELt, searched
    dense_ms: float | None = None
    decode_ms: float | None = None  # our decode kernel at its best split
    decode_split: int = 0
    decode_ring: bool = False  # the decode kernel's weight pipeline: shared-memory ring or registers
    decode_portable: bool = False  # the decode kernel reads the portable form in place (no packed copy)
    in_place_vs_packed: float | None = None  # its best time over the packed layout's (taken or not)
    measured: bool = False
    search: str = ""  # how cfg was found: "cusparselt" (cusparseLtMatmulSearch) or "tuner" (cusparselt_tuner)
    cutlass_ms: float | None = None  # CUTLASS's sm90 kernel at its best configuration
    cutlass_cfg: int = -1  # that configuration (an index into sparseflow.kernels.cutlass.configs)
    cutlass_pad: bool = False  # run it on x padded to whole token tiles (measured faster)
    # The bucket's smallest M and each kernel's time there ("dense" included); the *_ms fields
    # above are at its largest M. A kernel's standing is its worse ratio to dense over the two.
    m_lo: int = 0
    lo_ms: dict[str, float] = field(default_factory=dict)
    # CUTLASS variants timed at both ends, [cfg, pad, ms at the top, ms at m_lo], those that win
    # at some M of the bucket by ``cutlass_plan``'s estimate; cutlass_ms and lo_ms["cutlass"] are
    # the fastest of them at each end.
    cutlass_variants: list[list] = field(default_factory=list)

    def _sparse_times(self) -> dict[str, float]:
        times = {"cusparselt": self.sparse_ms, "cutlass": self.cutlass_ms, "decode": self.decode_ms}
        return {name: t for name, t in times.items() if t is not None}

    def _worst_ratio(self, name: str, hi_ms: float) -> float:
        """The kernel's time over dense's, at whichever end of the bucket it does worse."""
        if not self.dense_ms:
            return hi_ms
        ratio = hi_ms / self.dense_ms
        lo, dense_lo = self.lo_ms.get(name), self.lo_ms.get("dense")
        return max(ratio, lo / dense_lo) if lo and dense_lo else ratio

    @property
    def best_sparse(self) -> str:
        """The fastest measured 2:4 kernel over the bucket (what backend='sparse' runs);
        cuSPARSELt if none was."""
        times = self._sparse_times()
        return min(times, key=lambda name: self._worst_ratio(name, times[name])) if times else "cusparselt"

    @property
    def speedup(self) -> float | None:
        """Dense time over the fastest 2:4 kernel's, at the end of the bucket where it is lower."""
        times = self._sparse_times()
        if not times or not self.dense_ms:
            return None
        return 1.0 / min(self._worst_ratio(name, t) for name, t in times.items())

    def fastest(self) -> str:
        """The kernel its times pick: the faster 2:4 kernel if it beats dense by
        ``SPARSE_MIN_GAIN`` at both ends of the bucket, else dense."""
        speedup = self.speedup
        return self.best_sparse if speedup is not None and speedup >= SPARSE_MIN_GAIN else "dense"


class Variant(NamedTuple):
    """One CUTLASS way of running a bucket: a configuration, with x padded to whole token tiles
    or not, and its times at the bucket's top and bottom M."""

    cfg: int
    pad: bool
    hi_ms: float
    lo_ms: float


def estimate_ms(v: Variant, m: int, m_lo: int, m_hi: int, tile: int) -> float:
    """A variant's time at M rows inside [m_lo, m_hi], from its two measured ends. A tiled
    kernel's time is set by its token-tile count ceil(M / tile): it is interpolated between the
    two ends' counts, or in M where both ends have the same count."""
    t_lo, t_hi = -(-m_lo // tile), -(-m_hi // tile)
    if t_hi == t_lo:
        frac = (m - m_lo) / (m_hi - m_lo) if m_hi > m_lo else 0.0
    else:
        frac = (-(-m // tile) - t_lo) / (t_hi - t_lo)
    return v.lo_ms + frac * (v.hi_ms - v.lo_ms)


def cutlass_plan(variants: Sequence[Variant], m_lo: int, m_hi: int, tile_of: Callable[[int], int]) -> list[Step]:
    """Which variant runs at each M of [m_lo, m_hi]: the one with the lowest ``estimate_ms``, as
    steps of consecutive M (usually one or two). ``tile_of``: a configuration's token tile."""
    if not variants:
        return []
    tiles = {v.cfg: tile_of(v.cfg) for v in variants}
    steps: list[Step] = []
    for m in range(m_lo, m_hi + 1):
        v = min(variants, key=lambda v: estimate_ms(v, m, m_lo, m_hi, tiles[v.cfg]))
        step = Step(m, v.cfg, tiles[v.cfg] if v.pad else 0)
        if steps and steps[-1][1:] == step[1:]:
            steps[-1] = step
        else:
            steps.append(step)
    return steps


def cutlass_steps(d: Decision, bucket: int, dtype: torch.dtype) -> list[Step]:
    """``cutlass_plan`` of a decision's CUTLASS variants over its bucket (computed once per
    decision and dtype), or its one configuration where it kept no variants."""
    cached = d.__dict__.setdefault("_steps", {})
    steps = cached.get(dtype)
    if steps is None:
        tile_of = functools.partial(cutlass.token_tile, dtype)
        variants = [Variant(*v) for v in d.cutlass_variants]
        lo = d.m_lo or bucket_range(bucket)[0]
        steps = cutlass_plan(variants, lo, bucket, tile_of) if variants else []
        if not steps:
            steps = [Step(bucket, d.cutlass_cfg, tile_of(d.cutlass_cfg) if d.cutlass_pad else 0)]
        cached[dtype] = steps
    return steps


def static_decision(m: int) -> Decision:
    return Decision("decode" if m <= STATIC_DECODE_MAX_M else "dense")


def _cutlass_on(device: torch.device) -> bool:
    """CUTLASS's sm90 kernels are candidates on ``device``: built, Hopper, not turned off
    (``SPARSEFLOW_CUTLASS=0``)."""
    return os.environ.get("SPARSEFLOW_CUTLASS", "1") != "0" and cutlass.available(device)


def cutlass_wanted(weight) -> bool:
    """Whether CUTLASS's sm90 kernels are timed for this weight: where they are candidates, for
    shapes they take, at every M (their 16-token tiles ran gate_up/down at 1.6x cuBLAS at M = 16
    on the H200, beside our decode kernel's 1.3x)."""
    return _cutlass_on(weight.device) and cutlass.unsupported(*weight.shape) is None


def default_resident(weight, backend: str = "auto") -> str:
    """The kernel whose layout a compact layer keeps when nothing chose one (``autotune``
    chooses by measurement): CUTLASS's sm90 kernels where they run (Hopper; every M, and the
    fastest 2:4 kernel at most sizes measured there), else cuSPARSELt, else our decode kernel for
    ``backend="sparse"``, else dense."""
    if cutlass_wanted(weight):
        return "cutlass"
    if cusparselt.KERNEL.refusal(weight.device, weight.dtype, *weight.shape) is None:
        return "cusparselt"
    return "decode" if backend == "sparse" else "dense"


def default_sparse(m: int) -> str:
    """The 2:4 kernel to use when nothing is measured."""
    return "decode" if m <= DECODE_MAX_M else "cusparselt"


_SCRUB: dict[torch.device, torch.Tensor] = {}


def _median_ms(fn, iters: int = 5, batch: int = 4) -> float:
    """GPU time of one call, with L2 scrubbed before each (operands come from HBM, as in a model
    where other layers' weights pass through L2 in between) and host launch cost excluded."""
    dev = torch.device("cuda", torch.cuda.current_device())
    scrub = _SCRUB.get(dev)
    if scrub is None:
        scrub = _SCRUB[dev] = torch.empty(128 << 20, dtype=torch.uint8, device=dev)
    return median_ms([fn] * batch, samples=iters, scrub=scrub)


def _search(x: torch.Tensor, packed: torch.Tensor, n: int, layout: int) -> tuple[list[int], float, str] | None:
    """Best cuSPARSELt config for this problem and its time (in this process, L2 scrubbed): the
    library's own search where it works for this layout, else the fastest algorithm id that ran
    correctly in the tuner's child process. None when nothing usable was found."""
    if search_works(layout):
        try:
            cfg = [int(v) for v in _C.cslt_search(x, packed, n, layout, 256)[:4]]
            return cfg, _median_ms(lambda: _C.cslt_mm(x, packed, n, cfg, layout)), "cusparselt"
        except RuntimeError:
            return None
    from sparseflow.kernels.cusparselt_tuner import TUNER

    m, k = x.shape
    try:
        times = TUNER.sweep(x.device.index, str(x.dtype).replace("torch.", ""), n, k, m, layout)
    except Exception as exc:  # noqa: BLE001 -- tuning must never break a forward: measure without it
        warn_once(
            f"tuner:{type(exc).__name__}", f"sparseflow: cuSPARSELt tuner failed ({exc}); layout {layout} skipped"
        )
        return None
    best: tuple[list[int], float] | None = None
    for alg, split_k in sorted(times, key=times.get)[:2]:  # the child's two fastest, timed again here
        cfg = [alg, split_k, 0, 0]
        ms = _median_ms(lambda cfg=cfg: _C.cslt_mm(x, packed, n, cfg, layout))
        if best is None or ms < best[1]:
            best = (cfg, ms)
    return (best[0], best[1], "tuner") if best else None


def _tuner_checked(weight, cfg: list[int], layout: int, ms: set[int]) -> bool:
    """Whether a configuration the tuner found at one M runs correctly at each of ``ms`` (checked
    in the tuner's child process: an id that crashes at some M would take this process down)."""
    from sparseflow.kernels.cusparselt_tuner import TUNER

    dtype = str(weight.dtype).replace("torch.", "")
    for m in sorted(ms):
        try:
            ok = TUNER.check(weight.device.index, dtype, *weight.shape, m, layout, cfg[:2]) is not None
        except Exception as exc:  # noqa: BLE001 -- tuning must never break a forward
            warn_once(f"tuner:{type(exc).__name__}", f"sparseflow: cuSPARSELt tuner failed ({exc})")
            ok = False
        if not ok:
            return False
    return True


def worth_timing(tile: int, m_hi: int) -> bool:
    """Whether a CUTLASS configuration of ``tile``-token tiles is timed for a bucket whose largest
    M is ``m_hi``: not mostly empty (``_CUTLASS_TILE_OVER_M``), not too narrow
    (``_CUTLASS_M_OVER_TILE``)."""
    wide_enough = tile * _CUTLASS_M_OVER_TILE >= min(m_hi, _CUTLASS_TILE_WIDE * _CUTLASS_M_OVER_TILE)
    return wide_enough and tile <= max(_CUTLASS_TILE_OVER_M * m_hi, _CUTLASS_TILE_FLOOR)


def timed_configs(dtype: torch.dtype, m_hi: int) -> list[int]:
    """The CUTLASS configurations timed for a bucket whose largest M is ``m_hi``: those whose
    token tile is worth it there (``worth_timing``), less ``_CUTLASS_UNTIMED``."""
    return [
        cfg
        for cfg in range(len(cutlass.configs(dtype)))
        if cfg not in _CUTLASS_UNTIMED and worth_timing(cutlass.token_tile(dtype, cfg), m_hi)
    ]


def _time_cutlass(weight, xs: tuple[torch.Tensor, torch.Tensor]) -> list[Variant]:
    """CUTLASS's variants timed at both ends of the bucket (``xs``: inputs at its largest and
    smallest M), fastest at the top first; empty if none ran.

    Each configuration ``timed_configs`` names for the bucket is timed at the largest M as it is
    and, where M is not a whole number of its token tiles, with x padded to whole tiles
    (``mm_padded``: a part-filled last tile can cost more than a full one). The fastest few of
    these are timed at the smallest M too, the same way, and so are those whose token-tile count
    is lower there (``_CUTLASS_STEP_SLACK``).
    A failure costs that configuration (reported once), never the forward."""
    cutlass_mm, mm_padded = cutlass.cutlass_mm, cutlass.mm_padded
    try:
        cw = weight.layout("cutlass")
    except RuntimeError as exc:
        warn_once(f"cutlass-pack:{exc}", f"sparseflow: CUTLASS's 2:4 form could not be built ({exc}); not used")
        return []

    def call(x: torch.Tensor, cfg: int, pad: bool):
        if not pad:
            return lambda: cutlass_mm(x, cw, cfg)
        rows = cutlass.padded_rows(x.shape[0], cutlass.token_tile(weight.dtype, cfg))
        return lambda: mm_padded(x, cw, cfg, rows)

    m_hi, m_lo = xs[0].shape[0], xs[1].shape[0]
    top = []
    for cfg in timed_configs(weight.dtype, m_hi):
        pads = [False]
        if m_hi % cutlass.token_tile(weight.dtype, cfg):
            pads.append(True)
        try:
            for x in xs:
                for pad in pads:
                    call(x, cfg, pad)()  # once eagerly: a refusal raises here, not inside graph capture
        except RuntimeError as exc:
            warn_once(f"cutlass:{cfg}:{exc}", f"sparseflow: CUTLASS configuration {cfg} failed ({exc}); not used")
            continue
        top += [(_median_ms(call(xs[0], cfg, pad)), cfg, pad) for pad in pads]
    top.sort()
    # The fastest of many single timings is partly the luckiest: the finalists are timed once
    # more and ranked by the mean of both (H100, 26 configurations: the plan ran configuration 25
    # on Llama q/k/v at M = 256 at 1.04x cuBLAS where configuration 0 took 1.18x in a later timing).
    finalists = [t for t in top[:_CUTLASS_RETIMED] if t[0] <= _CUTLASS_NEAR_TIE * top[0][0]]
    if len(finalists) > 1:
        again = [((t + _median_ms(call(xs[0], cfg, pad))) / 2, cfg, pad) for t, cfg, pad in finalists]
        top = sorted(again + top[len(finalists) :])
    variants = []
    for i, (t_hi, cfg, pad) in enumerate(top):
        tile = cutlass.token_tile(weight.dtype, cfg)
        steps = -(-m_lo // tile) < -(-m_hi // tile)
        if i < _CUTLASS_RETIMED or (steps and t_hi <= _CUTLASS_STEP_SLACK * top[0][0]):
            t_lo = t_hi if xs[1] is xs[0] else _median_ms(call(xs[1], cfg, pad))
            variants.append(Variant(cfg, pad, t_hi, t_lo))
    return variants


def _unchosen(d: Decision, had: set) -> list[tuple]:
    """Layouts (``Sparse24Weight.cached_layouts`` pairs) a measurement builds for the 2:4 kernels,
    less those there before it (``had``) and the one the decision runs on."""
    layouts = [("cusparselt", key) for key in sorted({cusparselt.cache_key(v) for v in range(5)})]
    layouts += [("cutlass", None), ("decode", None)]
    keep = ("cusparselt", cusparselt.cache_key(d.layout)) if d.choice == "cusparselt" else (d.choice, None)
    if d.decode_portable:
        keep = None  # the decode kernel reads the portable form: its packed copy is not kept either
    return [c for c in layouts if c not in had and c != keep]


class Dispatcher:
    """Decisions for one process; thread-safe; persisted per GPU model."""

    def __init__(self) -> None:
        self._lock = threading.RLock()  # a bucket's measurement may measure its anchor first
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
        # Decisions measured over other candidates than the default's are kept apart from them.
        layouts = cslt_candidates()
        if CSLT_LAYOUT_OVERRIDE:
            suffix = f"-layout{CSLT_LAYOUT_OVERRIDE}"
        elif layouts == [1, 4]:
            suffix = ""
        elif layouts == [1]:
            suffix = "-notuner"
        else:
            suffix = "-layouts" + "".join(map(str, layouts))
        if not _cutlass_on(device):
            suffix += "-nocutlass"
        else:  # decisions measured over fewer CUTLASS configurations are stale once more are built
            suffix += f"-cutlass{len(cutlass.configs(torch.float16))}"
        return self.cache_dir() / f"dispatch-v{_CACHE_VERSION}-{name}-cusparselt{version}{suffix}.json"

    @staticmethod
    def _key(device, dtype: torch.dtype, n: int, k: int, m: int, only: str | None = None) -> tuple:
        return (str(device), dtype, n, k, m_bucket(m), only)

    @staticmethod
    def _key_str(key: tuple) -> str:
        dtype, n, k, bucket, only = key[1:]
        return f"{str(dtype).replace('torch.', '')}:{n}x{k}:m{bucket}" + (f":only-{only}" if only else "")

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
            m = re.fullmatch(r"(\w+):(\d+)x(\d+):m(\d+)(?::only-(\w+))?", ks)
            if not m or not hasattr(torch, m.group(1)) or m.group(5) not in (None, *_SCOPES):
                continue
            key = (
                str(device),
                getattr(torch, m.group(1)),
                int(m.group(2)),
                int(m.group(3)),
                int(m.group(4)),
                m.group(5),
            )
            try:
                self._decisions.setdefault(key, Decision(**d))
            except TypeError:  # written by another version: measure again
                continue

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
    def lookup(
        self, device: torch.device, dtype: torch.dtype, n: int, k: int, m: int, only: str | None = None
    ) -> Decision | None:
        """The decision measured for this bucket, or None. ``only``: one kernel's (with dense
        beside it), which a decision over every kernel also serves."""
        only = only if only in _SCOPES else None
        keys = [self._key(device, dtype, n, k, m)] + ([self._key(device, dtype, n, k, m, only)] if only else [])
        d = next((self._decisions[key] for key in keys if key in self._decisions), None)
        if d is None:
            with self._lock:
                self._load(device)
                d = next((self._decisions[key] for key in keys if key in self._decisions), None)
        return d

    def decide(self, weight, m: int, only: str | None = None) -> Decision:
        """The decision for ``weight`` (a CUDA Sparse24Weight) at M rows; measures on first use.
        ``only`` (a kernel name in ``_SCOPES``): a layer that runs that kernel alone (one layout)
        needs only its configurations timed beside dense, which saves the other kernels' first-use
        cost (cuSPARSELt's tuner child, the decode kernel's variants)."""
        if only is not None and only not in _SCOPES:
            only = None  # dense needs no measurement; the decode kernel's split is part of a full one
        device, dtype, (n, k) = weight.device, weight.dtype, weight.shape
        d = self.lookup(device, dtype, n, k, m, only)
        if d is not None:
            return d
        if torch.cuda.is_current_stream_capturing():
            warn_once(
                f"capture:{n}x{k}:{m}",
                f"sparseflow: no measured decision for {n}x{k} at M={m} during CUDA-graph capture; using the "
                f"static rule ({static_decision(m).choice}). Run one eager forward at this size before capturing.",
            )
            return static_decision(m)
        with self._lock:
            d = self.lookup(device, dtype, n, k, m, only)  # measured meanwhile by another thread
            if d is None:
                d = self._decisions[self._key(device, dtype, n, k, m, only)] = self._measure(weight, m_bucket(m), only)
                self._save(device)
            return d

    def _measure(self, weight, bucket: int, only: str | None = None) -> Decision:
        from sparseflow.kernels.decode import decode_mm, decode_mm_portable, portable_ok, split_candidates

        # A weight that keeps one layout only is measured on a temporary portable copy read back
        # from it: the candidates' layouts are built on that copy and freed with it.
        weight = weight.materialized()
        n, k = weight.shape
        lo, hi = bucket_range(bucket)
        # an anchor's search (measured first) or this bucket's
        plans = self._cslt_plans(weight, bucket, only) if only in (None, "cusparselt") else None
        had = weight.cached_layouts()
        d = Decision("dense", measured=True, m_lo=lo)
        with torch.cuda.device(weight.device), torch.no_grad():
            x = torch.randn(hi, k, dtype=weight.dtype, device=weight.device)
            x_lo = torch.randn(lo, k, dtype=weight.dtype, device=weight.device) if lo < hi else x
            dense = weight.layout("dense", keep=False)
            d.dense_ms = _median_ms(functools.partial(F.linear, x, dense))
            d.lo_ms["dense"] = _median_ms(functools.partial(F.linear, x_lo, dense)) if lo < hi else d.dense_ms
            del dense
            if only in (None, "cusparselt") and bucket >= CSLT_MIN_BUCKET and cslt_unsupported(n, k) is None:
                # At an anchor every candidate layout is searched; between anchors only those
                # with an in-process library search (fractions of a second: a plan with split-K
                # for this M's tile count), beside the anchors' plans.
                anchor_here = plans is None
                plans = plans or []
                for layout in cslt_candidates():
                    if not (anchor_here or search_works(layout)) or not _worth_measuring(layout, d.dense_ms):
                        continue
                    found = _search(x, weight.layout("cusparselt", layout).packed, n, layout)
                    self.searches += 1
                    if found and (found[0], layout, found[2]) not in plans:
                        plans.append((found[0], layout, found[2]))
                best = None
                for cfg, layout, how in plans:
                    if how == "tuner" and not _tuner_checked(weight, cfg, layout, {lo, hi} - {anchor(bucket)}):
                        continue
                    packed = weight.layout("cusparselt", layout).packed
                    try:
                        t_hi = _median_ms(lambda cfg=cfg, p=packed, v=layout: _C.cslt_mm(x, p, n, cfg, v))
                        t_lo = _median_ms(lambda cfg=cfg, p=packed, v=layout: _C.cslt_mm(x_lo, p, n, cfg, v))
                    except RuntimeError as exc:
                        warn_once(f"cslt:{cfg}:{layout}", f"sparseflow: cuSPARSELt plan {cfg} failed ({exc}); not used")
                        continue
                    worst = max(t_hi / d.dense_ms, t_lo / d.lo_ms["dense"])
                    if best is None or worst < best[0]:
                        best = (worst, t_hi, t_lo, cfg, layout, how)
                if best:
                    _, d.sparse_ms, d.lo_ms["cusparselt"], d.cfg, d.layout, d.search = best
            if only in (None, "cutlass") and cutlass_wanted(weight):
                scoped = None if only else self._measured_cutlass(weight, bucket)
                if scoped is not None:
                    # A compact layer of this shape measured CUTLASS here already, the same way: a
                    # full decision (sf.autotune, memory="fast") takes its times instead of timing
                    # every configuration again; dense is timed afresh beside the other kernels.
                    d.cutlass_variants = [list(v) for v in scoped.cutlass_variants]
                    d.cutlass_ms, d.lo_ms["cutlass"] = scoped.cutlass_ms, scoped.lo_ms["cutlass"]
                    d.cutlass_cfg, d.cutlass_pad = scoped.cutlass_cfg, scoped.cutlass_pad
                else:
                    variants = _time_cutlass(weight, (x, x_lo))
                    if variants:
                        tile_of = functools.partial(cutlass.token_tile, weight.dtype)
                        used = {(s.cfg, s.tile > 0) for s in cutlass_plan(variants, lo, hi, tile_of)}
                        d.cutlass_variants = [list(v) for v in variants if (v.cfg, v.pad) in used]
                        d.cutlass_ms = min(v.hi_ms for v in variants)
                        d.lo_ms["cutlass"] = min(v.lo_ms for v in variants)
                        d.cutlass_cfg, d.cutlass_pad = variants[0].cfg, variants[0].pad  # the fastest at the top
            if only is None and bucket <= DECODE_MAX_M:
                w = weight.layout("decode")

                def variants(portable: bool) -> list[tuple[int, bool]]:
                    bf16 = x.dtype == torch.bfloat16
                    return [
                        (split, ring)
                        for ring in (False, True)
                        for split in split_candidates(w, bucket, ring=ring, portable=portable, bf16=bf16)
                    ]

                d.decode_ms, d.decode_split, d.decode_ring = min(
                    (_median_ms(lambda s=split, r=ring: decode_mm(x, w, None, s, r)), split, ring)
                    for split, ring in variants(False)
                )
                if portable_enabled() and portable_ok(weight):
                    best = min(
                        (
                            _median_ms(lambda s=split, r=ring: decode_mm_portable(x, weight, None, s, ring=r)),
                            split,
                            ring,
                        )
                        for split, ring in variants(True)
                    )
                    d.in_place_vs_packed = best[0] / d.decode_ms
                    if best[0] <= PORTABLE_SLACK * d.decode_ms:
                        d.decode_ms, d.decode_split, d.decode_ring, d.decode_portable = best[0], best[1], best[2], True
                s_, r_ = d.decode_split, d.decode_ring
                if d.decode_portable:
                    d.lo_ms["decode"] = _median_ms(lambda: decode_mm_portable(x_lo, weight, None, s_, ring=r_))
                else:
                    d.lo_ms["decode"] = _median_ms(lambda: decode_mm(x_lo, w, None, s_, r_))
        _SCRUB.clear()  # back to the caching allocator
        d.choice = d.fastest()
        # Free layouts this measurement built for kernels it did not choose (rebuilt if ever needed).
        weight.drop_layouts(*_unchosen(d, had))
        return d

    def _measured_cutlass(self, weight, bucket: int) -> Decision | None:
        """The CUTLASS-only decision of ``weight``'s shape at ``bucket``, where one timed CUTLASS."""
        d = self._decisions.get(self._key(weight.device, weight.dtype, *weight.shape, bucket, "cutlass"))
        return d if d is not None and d.cutlass_ms is not None and "cutlass" in d.lo_ms else None

    def _cslt_plans(self, weight, bucket: int, only: str | None = None) -> list[tuple[list[int], int, str]] | None:
        """cuSPARSELt plans (config, layout, how found) for a bucket between anchors: those the
        anchor above searched, and the one below where measured. None for an anchor itself."""
        top = anchor(bucket)
        if top == bucket or bucket < CSLT_MIN_BUCKET or cslt_unsupported(*weight.shape) is not None:
            return None
        plans, shape = [], weight.shape
        for a in (top, top // 2):
            d = self.decide(weight, a, only) if a == top else self.lookup(weight.device, weight.dtype, *shape, a, only)
            if d is not None and d.sparse_ms is not None and (d.cfg, d.layout, d.search) not in plans:
                plans.append((d.cfg, d.layout, d.search))
        # Layout 4's default algorithm too (what PyTorch's _cslt_sparse_mm runs): between anchors
        # it can beat the plan tuned at an anchor (H100, qkv at M = 3000: 1.33x cuBLAS against
        # 1.18x). Checked in the tuner's child first, like any id not verified at this M.
        d = self.lookup(weight.device, weight.dtype, *weight.shape, top, only)
        default = ([0, 1, 0, 0], 4, "tuner")
        if 4 in cslt_candidates() and d is not None and _worth_measuring(4, d.dense_ms or 0) and default not in plans:
            plans.append(default)
        return plans

    def table(self, device: torch.device, dtype: torch.dtype, n: int, k: int) -> list[dict]:
        """Every decision known for this shape, for inspection (one row per M-bucket)."""
        self.lookup(device, dtype, n, k, 1)
        rows = []
        for key, d in sorted(self._decisions.items(), key=lambda kv: (kv[0][4], kv[0][5] or "")):
            if key[:4] == (str(device), dtype, n, k):
                rows.append(
                    {
                        "m_bucket": key[4],
                        "only": key[5],  # None: every kernel timed; else that kernel alone (beside dense)
                        "m_lo": d.m_lo,  # the bucket's smallest M; the *_ms below are at its largest
                        "lo_ms": d.lo_ms,  # each kernel's time at m_lo
                        "choice": d.choice,
                        "speedup_vs_dense": d.speedup,
                        "dense_ms": d.dense_ms,
                        "cusparselt_ms": d.sparse_ms,
                        "decode_ms": d.decode_ms,
                        "decode_split": d.decode_split,
                        "decode_ring": d.decode_ring,
                        "decode_in_place": d.decode_portable,
                        "decode_in_place_vs_packed": d.in_place_vs_packed,
                        "cusparselt_cfg": d.cfg,
                        "cusparselt_layout": d.layout,
                        "cutlass_ms": d.cutlass_ms,
                        "cutlass_cfg": d.cutlass_cfg,
                        "cutlass_pad": d.cutlass_pad,  # x padded to whole token tiles
                    }
                )
        return rows

    def clear(self) -> None:
        with self._lock:
            self._decisions.clear()
            self._loaded.clear()


DISPATCHER = Dispatcher()


def _on_gpu(weight) -> bool:
    return weight.device.type == "cuda"


def resident_speedup(d: Decision, kernel: str) -> float | None:
    """Dense time over ``kernel``'s at the worse end of ``d``'s bucket, for a layer keeping that
    kernel's layout only (cuSPARSELt's plan counts only if it reads the shared buffer)."""
    if kernel == "dense":
        return 1.0
    if kernel == "cusparselt":
        t = d.sparse_ms if cusparselt.cache_key(d.layout) == cusparselt.cache_key(1) else None
    else:
        t = {"cutlass": d.cutlass_ms, "decode": d.decode_ms}.get(kernel)
    return 1.0 / d._worst_ratio(kernel, t) if t and d.dense_ms else None


def choose_resident(weight, decisions: dict[int, Decision]) -> tuple[str, dict[int, float | None]]:
    """The layout a compact layer should keep for the row counts it will serve (``decisions``:
    the dispatcher's, per M), by measurement: the 2:4 kernel (CUTLASS or cuSPARSELt; the decode
    kernel cannot serve M > 64) with the best geometric-mean speedup over dense across them, or
    dense when none beats dense by ``SPARSE_MIN_GAIN`` overall. Returns it with its speedup at
    each M."""
    candidates = [k for k in ("cutlass", "cusparselt") if k != "cutlass" or cutlass_wanted(weight)]
    candidates = [k for k in candidates if _kernel(k).refusal(weight.device, weight.dtype, *weight.shape) is None]
    best, best_score = "dense", SPARSE_MIN_GAIN
    for kernel in candidates:
        # cuSPARSELt is not measured below CSLT_MIN_BUCKET: those sizes do not count against it
        found = [s for s in (resident_speedup(d, kernel) for d in decisions.values()) if s is not None]
        if not found or (kernel == "cutlass" and len(found) < len(decisions)):
            continue
        score = float(torch.tensor(found).log().mean().exp())
        if score >= best_score:
            best, best_score = kernel, score
    return best, {m: resident_speedup(d, best) for m, d in decisions.items()}


def _kernel(name: str):
    from sparseflow.kernels import KERNELS

    return KERNELS[name]


def autotune(model: torch.nn.Module, tokens: Sequence[int] = (1, 16, 64, 512, 2048)) -> list[dict]:
    """Measure now what the first forward at each size would measure: for every distinct 2:4
    layer shape (dtype, N, K) on a GPU in ``model`` and every row count in ``tokens`` (M = batch
    x sequence length), the dispatcher's decision (cuBLAS vs our decode kernel vs cuSPARSELt,
    including the cuSPARSELt tuner's sweep). Decisions persist on disk, so this is the one-time
    cost of a new GPU/shape, paid before serving instead of inside the first requests.
    A layer in the default ``memory="compact"`` mode keeps one layout on the GPU: the one that
    serves ``tokens`` fastest (``choose_resident``) becomes its ``resident`` (set on every layer
    of that shape), and each row says which (``resident``, ``resident_speedup``).
    Returns one row per (shape, M); empty for a model on the CPU."""
    from sparseflow.nn import SparseLinear

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"autotune: model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(tokens, (int, str)) or not all(isinstance(t, int) and t >= 1 for t in tokens):
        raise ValueError(f"autotune: tokens must be a sequence of positive row counts, got {tokens!r}")
    weights, layers = {}, {}
    runs = {}  # the layers as they run: a fused q/k/v group's one layer for its three members
    for mod in model.modules():
        if isinstance(mod, SparseLinear):
            if mod.memory == "compact" and mod.__dict__.get("_group") is not None:
                mod.make_resident()  # builds the group where it can be fused (sparseflow.nn.projections)
            mod = mod._fused() or mod
            runs[id(mod)] = mod
    for mod in runs.values():
        if _on_gpu(mod.weight_2_4):
            w = mod.weight_2_4
            key = (str(w.device), w.dtype, *w.shape)
            weights.setdefault(key, w)
            layers.setdefault(key, []).append(mod)
    rows = []
    for key, w in weights.items():
        device, dtype, n, k = key
        decisions = {m: DISPATCHER.decide(w, m) for m in sorted(set(tokens))}
        compact = [mod for mod in layers[key] if mod.memory == "compact" and mod.backend in ("auto", "sparse")]
        resident, speedups = choose_resident(w, decisions) if compact else (None, {})
        for mod in compact:  # backend="sparse" never runs dense: it keeps the default 2:4 layout
            mod.resident = resident if resident != "dense" or mod.backend == "auto" else None
        for m, d in decisions.items():
            rows.append(
                {
                    "device": device,
                    "dtype": str(dtype).replace("torch.", ""),
                    "N": n,
                    "K": k,
                    "M": m,
                    "m_bucket": m_bucket(m),
                    "choice": d.choice,
                    "speedup_vs_dense": d.speedup,
                    "decode_in_place": d.decode_portable,  # the decode kernel reads the portable form
                    # its time over the packed layout's (> PORTABLE_SLACK: the packed copy is kept)
                    "in_place_vs_packed": d.in_place_vs_packed,
                    "resident": resident,  # the layout compact layers of this shape keep (None: fast mode)
                    "resident_speedup": speedups.get(m),
                }
            )
    return rows
