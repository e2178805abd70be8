"""Never slower than dense at any token count: a benchmark-style GPU test (skipped without CUDA).

A coarse sweep of M = 1..4096, mostly values that are not powers of two, on two layer shapes of two
model families; at each M, ``SparseLinear`` (backend "auto", after its one-time measurement) and
``F.linear`` on the same pruned weight are timed as CUDA-graph replays in this process, with the
L2 scrubbed before each call as the dispatcher does. Run it alone on a quiet GPU
(``pytest -m bench tests/test_every_m.py``): it asserts a speed ratio.
"""

import pytest
import torch
import torch.nn.functional as F

import sparseflow as sf
from sparseflow._ext import _C
from sparseflow.kernels.dispatch import _median_ms
from sparseflow.nn import SparseLinear
from tests.conftest import needs_cuda

pytestmark = [needs_cuda, pytest.mark.gpu, pytest.mark.bench]

MS = [1, 3, 7, 12, 23, 40, 57, 100, 129, 200, 300, 333, 512, 700, 1000, 1337, 2047, 3000, 4096]
SHAPES = {"llama_down": (4096, 14336), "qwen_o": (3584, 3584)}
FLOOR = 0.95  # the benchmark's floor is 0.98 over rotated weights; a single-weight timing is noisier


# The compact mode runs one kernel at every M. On the H100 (twenty and then 26 CUTLASS
# configurations) it passed on llama_down and fell below the floor at some M on qwen_o, the
# narrower layer (28 row tiles of 128; at M = 333 and 1337 no configuration reaches cuBLAS,
# benchmarks/NOTES.md): a known gap on one shape, not a passing case.
COMPACT_GAP = pytest.mark.xfail(reason="one layout: its kernel loses to dense at some M (README Limits)", strict=False)


def _best_of(dense_fn, ours_fn, rounds: int) -> tuple[float, float]:
    """Each call's best over ``rounds`` alternated timings: two timings of the very same cuBLAS
    call differ by up to ~6% on a shared GPU, the size of the margin being tested."""
    dense = ours = float("inf")
    for _ in range(rounds):
        dense = min(dense, _median_ms(dense_fn, iters=7))
        ours = min(ours, _median_ms(ours_fn, iters=7))
    return dense, ours


@pytest.mark.skipif(_C is None, reason="CUDA extension not built")
@pytest.mark.parametrize("memory", ["fast", pytest.param("compact", marks=COMPACT_GAP)])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_sparselinear_is_not_slower_than_dense_at_any_m(shape, memory):
    n, k = SHAPES[shape]
    torch.manual_seed(0)
    w = sf.prune_2_4(torch.randn(n, k, device="cuda", dtype=torch.float16))
    layer = SparseLinear.from_compressed(sf.compress_2_4(w), memory=memory)
    slow = []
    for m in MS:
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        y = layer(x)  # measures this bucket once (untimed), as a first request would
        torch.testing.assert_close(y, F.linear(x, w), rtol=2e-2, atol=2e-2)
        calls = (lambda x=x: F.linear(x, w), lambda x=x: layer(x))
        dense, ours = _best_of(*calls, rounds=3)
        if dense / ours < FLOOR:
            # a point below the floor is timed again, longer, before it counts: on a 12-17 us
            # layer one best-of-three moved by 7% between two runs on the same H100
            dense, ours = _best_of(*calls, rounds=7)
        if dense / ours < FLOOR:
            slow.append(f"M={m}: {dense / ours:.2f}x ({ours * 1e3:.1f} us vs dense {dense * 1e3:.1f} us)")
    assert not slow, f"{shape}, memory={memory!r}: SparseLinear below {FLOOR}x F.linear at " + "; ".join(slow)
