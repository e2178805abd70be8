"""GPU tests: run on the device (skipped without CUDA)."""

import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
from torch import nn

import sparseflow as sf
from sparseflow._ext import _C
from sparseflow.kernels import cutlass
from sparseflow.kernels.dispatch import CSLT_MIN_BUCKET, PORTABLE_SLACK, Decision, m_bucket, portable_enabled
from sparseflow.nn import SparseLinear
from tests.conftest import TOL, needs_cuda, random_2_4, rel_err

pytestmark = [needs_cuda, pytest.mark.gpu]
needs_ext = pytest.mark.skipif(_C is None, reason="CUDA extension not built")


def _poison():
    """Fill freed allocator blocks with NaN so an unwritten output element shows up."""
    junk = torch.empty(64 << 20, device="cuda", dtype=torch.float16).fill_(float("nan"))
    del junk


def _ref(x, w, b=None):
    return nn.functional.linear(x.double(), w.double(), None if b is None else b.double())


SHAPES = [  # (M, N, K)
    (1, 256, 256),
    (7, 4096, 4096),
    (16, 6144, 4096),
    (33, 512, 1024),
    (64, 4096, 14336),
    (1, 4096, 14336),
    (257, 1024, 2048),
    (1000, 768, 3072),
    (2048, 2048, 2048),
    (3, 96, 160),
]


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("backend", ["sparse", "auto"])
def test_sparse_mm_matches_reference(dtype, m, n, k, backend):
    torch.manual_seed(m * 7 + n + k)
    w = random_2_4(n, k, dtype, "cuda")
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    b = torch.randn(n, device="cuda", dtype=dtype)
    c = sf.compress_2_4(w)
    _poison()
    out = sf.sparse_mm(x, c, b, backend=backend)
    torch.cuda.synchronize()
    assert out.shape == (m, n) and out.dtype == dtype
    assert rel_err(out, _ref(x, w, b)) < TOL[dtype]


@needs_ext
def test_nd_input_and_odd_m_forced_sparse():
    w = random_2_4(512, 1024, torch.bfloat16, "cuda")
    x = torch.randn(3, 5, 1024, device="cuda", dtype=torch.bfloat16)
    _poison()
    out = sf.sparse_mm(x, sf.compress_2_4(w), backend="sparse")
    assert out.shape == (3, 5, 512)
    assert rel_err(out, _ref(x, w)) < TOL[torch.bfloat16]


@needs_ext
def test_gpu_decompress_kernel_matches_cpu():
    w = random_2_4(300, 1028, torch.float16)
    c = sf.compress_2_4(w)
    assert torch.equal(sf.decompress_2_4(c.cuda()).cpu(), w)
    # compress on the GPU gives the same portable bytes as on the CPU
    g = sf.compress_2_4(w.cuda())
    assert torch.equal(g.values.cpu(), c.values) and torch.equal(g.meta.cpu(), c.meta)


@needs_ext
def test_sparse_linear_matches_and_dispatch_is_inspectable():
    lin = nn.Linear(2048, 1024, bias=True).cuda().half()
    sl = SparseLinear.from_dense(lin, prune=True, memory="fast")  # each M-bucket's own choice
    w = sl.dense_weight()
    for m in (1, 100, 2048):
        x = torch.randn(m, 2048, device="cuda", dtype=torch.float16)
        assert rel_err(sl(x), _ref(x, w, sl.bias)) < TOL[torch.float16]
    info = [r for r in sl.dispatch_info() if r["only"] is None]  # (compact layers of this shape add CUTLASS-only rows)
    assert {r["m_bucket"] for r in info} >= {m_bucket(m) for m in (1, 100, 2048)}
    for r in info:
        measured = Decision(
            "dense",
            sparse_ms=r["cusparselt_ms"],
            dense_ms=r["dense_ms"],
            decode_ms=r["decode_ms"],
            cutlass_ms=r["cutlass_ms"],
            m_lo=r["m_lo"],
            lo_ms=r["lo_ms"],
        )
        assert 1 <= r["m_lo"] <= r["m_bucket"] and r["lo_ms"]["dense"] > 0  # timed at both ends
        assert (r["cutlass_ms"] is not None) == cutlass.available(w.device)  # 1024 x 2048: a shape it takes
        assert r["dense_ms"] > 0 and (r["cusparselt_ms"] is not None) == (r["m_bucket"] >= CSLT_MIN_BUCKET)
        assert (r["decode_ms"] is not None) == (r["m_bucket"] <= 64)
        assert r["choice"] == measured.fastest()  # the fastest, if a 2:4 kernel beats dense by the margin
        # K % 128 == 0: the in-place reading was timed too, and taken exactly when within the slack
        assert (r["decode_in_place_vs_packed"] is not None) == (r["m_bucket"] <= 64 and portable_enabled())
        if r["decode_in_place_vs_packed"] is not None:
            assert r["decode_in_place_vs_packed"] > 0
            assert r["decode_in_place"] == (r["decode_in_place_vs_packed"] <= PORTABLE_SLACK)
    # the table is per shape (other tests may have measured more buckets); this layer ran three
    ran = [r for r in info if r["m_bucket"] in {m_bucket(m) for m in (1, 100, 2048)}]
    mem = sl.memory_bytes()
    assert mem["portable"] == 1024 * 2048 * 2 * 0.5625
    assert (mem["dense_fallback"] > 0) == any(r["choice"] == "dense" for r in ran)
    assert (mem["decode"] > 0) == any(r["choice"] == "decode" and not r["decode_in_place"] for r in ran)
    assert (mem["cutlass"] > 0) == any(r["choice"] == "cutlass" for r in ran)


@needs_ext
def test_torch_compile_fullgraph():
    sl = SparseLinear.from_dense(nn.Linear(1024, 512).cuda().half(), prune=True)
    x = torch.randn(8, 1024, device="cuda", dtype=torch.float16)
    eager = sl(x)
    compiled = torch.compile(sl, fullgraph=True)
    assert torch.equal(compiled(x), eager)
    x2 = torch.randn(8, 1024, device="cuda", dtype=torch.float16)
    assert torch.equal(compiled(x2), sl(x2))


@needs_ext
def test_cuda_graph_capture_and_replay():
    sl = SparseLinear.from_dense(nn.Linear(1024, 2048).cuda().bfloat16(), prune=True, backend="sparse")
    static_x = torch.randn(16, 1024, device="cuda", dtype=torch.bfloat16)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            sl(static_x)  # warm-up: plans and caches are built outside capture
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_y = sl(static_x)
    w = sl.dense_weight()
    for _ in range(3):
        static_x.copy_(torch.randn_like(static_x))
        g.replay()
        torch.cuda.synchronize()
        assert rel_err(static_y, _ref(static_x, w, sl.bias)) < TOL[torch.bfloat16]


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,n,k", [(1, 256, 256), (7, 4128, 512), (33, 96, 160), (100, 512, 1024), (16, 64, 64)])
def test_cusparselt_transposed_output_layout(dtype, m, n, k):
    """Layout 1 writes y^T (N x M padded to 16) and transposes it with our kernel: every row of y,
    the padding columns cut, the partial 32 x 32 tiles included."""
    w = random_2_4(n, k, dtype, "cuda")
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    packed = sf.compress_2_4(w).layout("cusparselt", 1).packed
    _poison()
    y = _C.cslt_mm(x, packed, n, [-1, 1, 0, 0], 1)
    torch.cuda.synchronize()
    assert y.shape == (m, n) and y.is_contiguous()
    assert rel_err(y, _ref(x, w)) < TOL[dtype]


@needs_ext
def test_plan_cache_reused_across_calls():
    c = sf.compress_2_4(random_2_4(1024, 1024, torch.float16, "cuda"))
    x = torch.randn(200, 1024, device="cuda", dtype=torch.float16)
    sf.sparse_mm(x, c, backend="cusparselt")
    before = _C.plan_cache_stats()[1]
    for _ in range(5):
        sf.sparse_mm(x, c, backend="cusparselt")
    assert _C.plan_cache_stats()[1] == before


@needs_ext
def test_decisions_persist_across_processes(tmp_path):
    script = textwrap.dedent(
        """
        import torch, sparseflow as sf
        c = sf.compress_2_4(sf.prune_2_4(torch.randn(768, 1536, device="cuda", dtype=torch.float16)))
        sf.sparse_mm(torch.randn(200, 1536, device="cuda", dtype=torch.float16), c)
        print("SEARCHES", sf.DISPATCHER.searches)
        """
    )
    env = {**os.environ, "SPARSEFLOW_CACHE_DIR": str(tmp_path)}
    runs = [
        subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=False)
        for _ in range(2)
    ]
    for r in runs:
        assert r.returncode == 0, r.stderr
    searches = [int(r.stdout.split("SEARCHES")[1].split()[0]) for r in runs]
    assert searches[0] >= 1 and searches[1] == 0, searches
    assert list(tmp_path.glob("dispatch-*.json"))


@needs_ext
def test_two_streams_concurrently():
    c = sf.compress_2_4(random_2_4(2048, 2048, torch.float16, "cuda"))
    w = c.decompress()
    xs = [torch.randn(256, 2048, device="cuda", dtype=torch.float16) for _ in range(2)]
    sf.sparse_mm(xs[0], c, backend="cusparselt")  # build caches first
    outs = [None, None]
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]

    def work(i):
        with torch.cuda.stream(streams[i]):
            for _ in range(20):
                outs[i] = sf.sparse_mm(xs[i], c, backend="cusparselt")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    torch.cuda.synchronize()
    for i in range(2):
        assert rel_err(outs[i], _ref(xs[i], w)) < TOL[torch.float16]


def test_fp32_runs_dense_with_warning():
    import sparseflow._ext as ext

    ext._warned.clear()  # warnings are once per process: an earlier test may have used this one
    c = sf.compress_2_4(random_2_4(256, 256, torch.float32, "cuda"))
    x = torch.randn(4, 256, device="cuda")
    with pytest.warns(RuntimeWarning, match="float32"):
        out = sf.sparse_mm(x, c)
    assert rel_err(out, _ref(x, c.decompress())) < 1e-3  # TF32 may be on


@needs_ext
def test_unaligned_shapes_fall_back_or_raise():
    c = sf.compress_2_4(random_2_4(100, 64, torch.float16, "cuda"))
    x = torch.randn(4, 64, device="cuda", dtype=torch.float16)
    with pytest.raises(ValueError, match="out_features N=100 is not a multiple of 32"):
        sf.sparse_mm(x, c, backend="cusparselt")
    # the decode kernel takes any N at small M
    assert rel_err(sf.sparse_mm(x, c, backend="sparse"), _ref(x, c.decompress())) < TOL[torch.float16]
    big = torch.randn(100, 64, device="cuda", dtype=torch.float16)
    with pytest.raises(ValueError, match="exceed the decode kernel's limit"):
        sf.sparse_mm(big, c, backend="sparse")
    with pytest.warns(RuntimeWarning, match="multiple of 32"):
        out = sf.sparse_mm(big, c)
    assert rel_err(out, _ref(big, c.decompress())) < TOL[torch.float16]


def test_cpu_input_into_cuda_weight_is_a_clear_error():
    c = sf.compress_2_4(random_2_4(64, 64, torch.float16, "cuda"))
    with pytest.raises(ValueError, match="device mismatch"):
        sf.sparse_mm(torch.randn(2, 64, dtype=torch.float16), c)


def test_sparse_linear_to_cuda_and_back():
    lin = nn.Linear(256, 128).half()
    sl = SparseLinear.from_dense(lin, prune=True)
    x = torch.randn(5, 256, dtype=torch.float16)
    cpu_out = sl(x)
    sl = sl.cuda()
    assert sl.weight_values.is_cuda and sl.weight_meta.is_cuda
    assert rel_err(sl(x.cuda()).cpu(), cpu_out.float()) < TOL[torch.float16]
    assert torch.equal(sl.cpu()(x), cpu_out)


def test_gpu_below_sm80_falls_back_to_dense_with_warning(monkeypatch):
    import sparseflow._ext as ext

    monkeypatch.setattr(ext, "device_capability", lambda device: (7, 5))
    ext._warned.clear()
    c = sf.compress_2_4(random_2_4(256, 256, torch.float16, "cuda"))
    x = torch.randn(4, 256, device="cuda", dtype=torch.float16)
    with pytest.warns(RuntimeWarning, match="sm_75"):
        out = sf.sparse_mm(x, c)
    assert rel_err(out, _ref(x, c.decompress())) < TOL[torch.float16]
    with pytest.raises(ValueError, match="sm_80"):
        sf.sparse_mm(x, c, backend="sparse")


@needs_ext
def test_autotune_measures_before_the_first_forward(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEFLOW_CACHE_DIR", str(tmp_path))
    sf.DISPATCHER.clear()
    layer = SparseLinear.from_dense(torch.nn.Linear(1536, 768), prune=True).half().cuda()
    rows = sf.autotune(torch.nn.Sequential(layer), tokens=(4, 200))
    assert [(r["M"], r["m_bucket"]) for r in rows] == [(4, 8), (200, m_bucket(200))]
    assert all(r["choice"] in ("dense", "decode", "cusparselt", "cutlass") for r in rows)
    searches = sf.DISPATCHER.searches
    for m in (3, 200):  # same buckets: served from the decisions, nothing measured again
        x = torch.randn(m, 1536, device="cuda", dtype=torch.float16)
        assert rel_err(layer(x), _ref(x, layer.weight_2_4.decompress(), layer.bias)) < TOL[torch.float16]
    assert sf.DISPATCHER.searches == searches
    assert list(tmp_path.glob("dispatch-*.json"))
    sf.DISPATCHER.clear()


@needs_ext
def test_demo_autotune_step_summarises_the_kernels_chosen(tmp_path, monkeypatch):
    """``sparseflow demo``'s GPU-only step: sf.autotune on the reloaded model, one line out."""
    from sparseflow.cli.demo import autotune_summary
    from tests.ckpt_helpers import tiny

    monkeypatch.setenv("SPARSEFLOW_CACHE_DIR", str(tmp_path))
    sf.DISPATCHER.clear()
    model = sf.sparsify(tiny("llama"), "magnitude", fallback="never", verbose=False).half().cuda()
    line = autotune_summary(model, (1, 12, 128))
    n_shapes = len({m.weight_2_4.shape for m in model.modules() if isinstance(m, SparseLinear)})
    assert line.startswith(f"{3 * n_shapes} (layer shape, M) pairs, M in (1, 12, 128): "), line
    assert all(
        part.split()[1] in ("cusparselt", "cutlass", "decode", "dense") for part in line.split(": ", 1)[1].split(", ")
    )
    sf.DISPATCHER.clear()


@needs_ext
@pytest.mark.parametrize("portable", [True, False])
def test_decode_reads_the_portable_form_without_a_packed_copy(tmp_path, monkeypatch, portable):
    from sparseflow.kernels import dispatch

    monkeypatch.setenv("SPARSEFLOW_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("SPARSEFLOW_DECODE_PORTABLE", "1" if portable else "0")
    monkeypatch.setenv("SPARSEFLOW_CUTLASS", "0")  # CUTLASS's 16-token tile beats decode at M = 4 on the H200
    monkeypatch.setattr(dispatch, "PORTABLE_SLACK", 1e9)  # take the in-place reading whenever it may run
    # what is tested is reading in place, not speed: the decode kernel is taken even where it only
    # ties dense (H100, M = 4: 15.2 against 14.5 us in place)
    monkeypatch.setattr(dispatch, "SPARSE_MIN_GAIN", 0.5)
    sf.DISPATCHER.clear()
    layer = SparseLinear.from_dense(torch.nn.Linear(4096, 4096), prune=True, memory="fast").half().cuda()
    x = torch.randn(4, 4096, device="cuda", dtype=torch.float16)
    _poison()
    y = layer(x)
    assert rel_err(y, _ref(x, layer.weight_2_4.decompress(), layer.bias)) < TOL[torch.float16]
    d = sf.DISPATCHER.lookup(x.device, x.dtype, 4096, 4096, 4)
    assert d.choice == "decode" and d.decode_portable == portable, d
    assert (layer.memory_bytes()["decode"] == 0) == portable  # no packed copy when read in place
    sf.DISPATCHER.clear()
