import pytest
import torch
import torch.nn.functional as F

import sparseflow as sf
from tests.conftest import TOL, random_2_4, rel_err


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 7, 64])
@pytest.mark.parametrize("bias", [False, True])
def test_sparse_mm_matches_float64_reference(dtype, m, bias):
    n, k = 48, 96
    w = random_2_4(n, k, dtype)
    x = torch.randn(m, k).to(dtype)
    b = torch.randn(n).to(dtype) if bias else None
    ref = x.double() @ w.double().T + (b.double() if bias else 0)
    out = sf.sparse_mm(x, sf.compress_2_4(w), b)
    assert out.shape == (m, n) and out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]


def test_sparse_mm_nd_input():
    w = random_2_4(32, 64)
    x = torch.randn(2, 3, 5, 64)
    out = sf.sparse_mm(x, sf.compress_2_4(w))
    assert out.shape == (2, 3, 5, 32)
    assert rel_err(out, torch.nn.functional.linear(x.double(), w.double())) < 1e-6


def test_sparse_mm_empty_batch():
    c = sf.compress_2_4(random_2_4(8, 16))
    out = sf.sparse_mm(torch.randn(0, 16), c)
    assert out.shape == (0, 8)


def test_sparse_mm_bad_inputs():
    c = sf.compress_2_4(random_2_4(8, 16))
    with pytest.raises(ValueError, match="last dim must equal in_features K=16"):
        sf.sparse_mm(torch.randn(3, 12), c)
    with pytest.raises(TypeError, match="dtype mismatch"):
        sf.sparse_mm(torch.randn(3, 16, dtype=torch.float16), c)
    with pytest.raises(ValueError, match="device mismatch"):
        sf.sparse_mm(torch.randn(3, 16, device="meta"), c)
    with pytest.raises(TypeError, match="floating point"):
        sf.sparse_mm(torch.ones(3, 16, dtype=torch.int64), c)
    with pytest.raises(ValueError, match="bias must have shape"):
        sf.sparse_mm(torch.randn(3, 16), c, torch.randn(7))
    with pytest.raises(TypeError, match="Sparse24Weight"):
        sf.sparse_mm(torch.randn(3, 16), torch.randn(8, 16))
    with pytest.raises(ValueError, match="need CUDA tensors"):
        sf.sparse_mm(torch.randn(3, 16), c, backend="sparse")
    with pytest.raises(ValueError, match="backend must be one of"):
        sf.sparse_mm(torch.randn(3, 16), c, backend="fast")


def test_cpu_path_warns_once_that_it_is_not_fast(recwarn):
    import sparseflow._ext as ext

    ext._warned.discard("cpu")
    c = sf.compress_2_4(random_2_4(8, 16))
    sf.sparse_mm(torch.randn(2, 16), c)
    sf.sparse_mm(torch.randn(2, 16), c)
    msgs = [str(w.message) for w in recwarn if "reference path" in str(w.message)]
    assert len(msgs) == 1


def test_buckets_and_the_no_measurement_rule():
    from sparseflow.kernels.dispatch import m_bucket, static_decision

    assert [m_bucket(m) for m in (1, 8, 9, 16, 17, 64, 65, 300, 1337, 2048, 2049)] == [
        8, 8, 16, 16, 24, 64, 72, 320, 1408, 2048, 2304
    ]  # fmt: skip
    assert static_decision(1).choice == "decode" and static_decision(16).choice == "decode"
    assert static_decision(17).choice == "dense" and static_decision(4096).choice == "dense"


def test_buckets_are_narrow_and_their_ends_are_what_is_measured():
    """Every M up to 16k falls in a bucket whose two ends map back to it, and no bucket spans more
    than 1/8 of its top above 64 rows (dense and a tiled 2:4 kernel cannot cross far inside)."""
    from sparseflow.kernels.dispatch import anchor, bucket_range, m_bucket

    for m in range(1, 20000):
        b = m_bucket(m)
        lo, hi = bucket_range(b)
        assert lo <= m <= hi == b and m_bucket(lo) == b
        assert lo == 1 or m_bucket(lo - 1) < b
        assert hi - lo < 8 or (hi - lo + 1) <= lo / 8
        a = anchor(b)
        assert a >= b and a & (a - 1) == 0 and m_bucket(a) == a


def test_a_kernel_must_beat_dense_at_both_ends_of_its_bucket():
    """A 2:4 kernel that wins at the top of a bucket but loses at its bottom is not chosen; the
    CUTLASS-vs-cuSPARSELt choice goes by the worse end."""
    from sparseflow.kernels.dispatch import Decision

    d = Decision("dense", dense_ms=1.0, cutlass_ms=0.7, m_lo=257, lo_ms={"dense": 0.5, "cutlass": 0.7})
    assert d.fastest() == "dense" and abs(d.speedup - 0.5 / 0.7) < 1e-9
    d.lo_ms["cutlass"] = 0.4
    assert d.fastest() == "cutlass" and abs(d.speedup - 1.0 / 0.8) < 1e-9
    # cuSPARSELt faster at the top, but CUTLASS's worse end is better: CUTLASS
    d = Decision(
        "dense", dense_ms=1.0, sparse_ms=0.6, cutlass_ms=0.7, lo_ms={"dense": 0.8, "cusparselt": 0.75, "cutlass": 0.5}
    )
    assert d.best_sparse == "cutlass" and d.fastest() == "cutlass"


def test_a_2_4_kernel_must_beat_dense_by_a_margin_to_be_chosen():
    from sparseflow.kernels.dispatch import SPARSE_MIN_GAIN, Decision

    def fastest(cslt, decode):
        return Decision("dense", sparse_ms=cslt, dense_ms=1.0, decode_ms=decode).fastest()

    assert SPARSE_MIN_GAIN > 1
    assert fastest(0.6, 0.5) == "decode"
    assert fastest(0.6, None) == "cusparselt"
    assert fastest(None, 1.0 / SPARSE_MIN_GAIN) == "decode"
    # a near-tie (within the measurement's noise) stays dense, as does a loss
    assert fastest(0.99, 1.01) == "dense"
    assert fastest(None, 1.2) == "dense"
    assert fastest(None, None) == "dense"


def test_route_maps_decisions_to_kernels(monkeypatch):
    """The GPU route table, driven by faked decisions and layouts (the kernels are not called)."""
    from sparseflow import ops
    from sparseflow.kernels import KERNELS
    from sparseflow.kernels.dispatch import Decision

    w = sf.compress_2_4(sf.prune_2_4(torch.randn(64, 128)))
    monkeypatch.setattr(KERNELS["decode"], "pack", lambda weight, key=None: "DECODE")
    monkeypatch.setattr(KERNELS["cusparselt"], "pack", lambda weight, key=None: f"CSLT{key}")
    monkeypatch.setattr(KERNELS["dense"], "pack", lambda weight, key=None: "DENSE")
    dense, decode, cslt = (KERNELS[name].run for name in ("dense", "decode", "cusparselt"))
    d = Decision(
        "dense", cfg=[3, 1, 0, 0], sparse_ms=2.0, dense_ms=1.0, decode_ms=1.5, decode_split=4, decode_ring=True
    )
    monkeypatch.setattr(ops.DISPATCHER, "decide", lambda weight, m, only=None: d)
    monkeypatch.setattr(ops.DISPATCHER, "lookup", lambda *a, only=None: d)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert ops._route(w, 8, ops.BACKENDS["auto"])[1:3] == (dense, "DENSE")
    assert ops._route(w, 8, ops.BACKENDS["sparse"])[1:4] == (decode, "DECODE", (4, True))  # faster 2:4 kernel
    assert ops._route(w, 8, ops.BACKENDS["cusparselt"])[1:] == (cslt, "CSLT1", ([3, 1, 0, 0], 1))
    # the route's layouts are the weight's cached ones: dense, decode and cuSPARSELt's layout-1 buffer
    assert w.cached_layouts() == {("dense", None), ("decode", None), ("cusparselt", 1)}
    d.layout = 4  # layouts 1, 3 and 4 read the same buffer: the cached one serves
    assert ops._route(w, 8, ops.BACKENDS["cusparselt"])[2:] == ("CSLT1", ([3, 1, 0, 0], 4))
    d.layout = 1
    d.decode_ms = None  # M > 64: only cuSPARSELt was measured
    assert ops._route(w, 200, ops.BACKENDS["sparse"])[1] == cslt
    odd = sf.compress_2_4(sf.prune_2_4(torch.randn(100, 128)))  # N not a multiple of 32
    with pytest.raises(ValueError, match="multiples of 32"):
        ops._route(odd, 200, ops.BACKENDS["cusparselt"])


def test_route_takes_cutlass_where_it_measured_fastest(monkeypatch):
    """A decision whose fastest 2:4 kernel is CUTLASS's routes to it with its configuration; a
    forced backend='cutlass' where the kernels cannot run names why."""
    from sparseflow import ops
    from sparseflow.kernels import KERNELS, cutlass
    from sparseflow.kernels.dispatch import Decision

    w = sf.compress_2_4(sf.prune_2_4(torch.randn(128, 256, dtype=torch.float16)))
    monkeypatch.setattr(KERNELS["cutlass"], "pack", lambda weight, key=None: "CUTLASS")
    monkeypatch.setattr(KERNELS["cusparselt"], "pack", lambda weight, key=None: f"CSLT{key}")
    run_cutlass, run_cslt = KERNELS["cutlass"].run, KERNELS["cusparselt"].run
    d = Decision("cutlass", cfg=[3, 1, 0, 0], sparse_ms=0.8, dense_ms=1.0, cutlass_ms=0.6, cutlass_cfg=2)
    assert (d.best_sparse, d.fastest(), d.speedup) == ("cutlass", "cutlass", 1.0 / 0.6)
    monkeypatch.setattr(ops.DISPATCHER, "decide", lambda weight, m, only=None: d)
    monkeypatch.setattr(ops.DISPATCHER, "lookup", lambda *a, only=None: d)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(cutlass, "unavailable_reason", lambda device: None)
    assert ops._route(w, 512, ops.BACKENDS["auto"])[1:4] == (run_cutlass, "CUTLASS", 2)
    assert ops._route(w, 512, ops.BACKENDS["sparse"])[1:4] == (run_cutlass, "CUTLASS", 2)
    assert ops._route(w, 512, ops.BACKENDS["cusparselt"])[1] == run_cslt
    d.cutlass_ms = 0.9  # cuSPARSELt now the faster 2:4 kernel
    d.choice = d.fastest()
    assert ops._route(w, 512, ops.BACKENDS["auto"])[1] == run_cslt
    odd = sf.compress_2_4(sf.prune_2_4(torch.randn(96, 256, dtype=torch.float16)))  # N not a multiple of 64
    with pytest.raises(ValueError, match="multiple of 64"):
        ops._route(odd, 512, ops.BACKENDS["cutlass"])
    monkeypatch.setattr(cutlass, "unavailable_reason", lambda device: "sm_90a only")
    with pytest.raises(ValueError, match="backend='cutlass' cannot run .*sm_90a only"):
        ops._route(w, 512, ops.BACKENDS["cutlass"])


def test_route_during_capture_without_measurement_uses_the_static_rule(monkeypatch):
    from sparseflow import ops
    from sparseflow.kernels import KERNELS

    w = sf.compress_2_4(sf.prune_2_4(torch.randn(64, 128)))
    monkeypatch.setattr(KERNELS["decode"], "pack", lambda weight, key=None: "DECODE")
    monkeypatch.setattr(KERNELS["dense"], "pack", lambda weight, key=None: "DENSE")
    monkeypatch.setattr(ops.DISPATCHER, "lookup", lambda *a, only=None: None)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.warns(RuntimeWarning, match="static rule"):
        assert ops._route(w, 4, ops.BACKENDS["auto"])[1:4] == (KERNELS["decode"].run, "DECODE", (0, False))
    assert ops._route(w, 100, ops.BACKENDS["auto"])[1:3] == (KERNELS["dense"].run, "DENSE")


@pytest.mark.parametrize("shape", [(5, 128), (2, 3, 128), (0, 128)])
def test_cuda_forward_keeps_the_leading_dims(monkeypatch, shape):
    """cuda_forward's shape handling (2-D fast path, N-D reshape), driven on the CPU through a
    faked dense route (the same F.linear call the GPU's dense route makes)."""
    from sparseflow import ops
    from sparseflow.kernels.dispatch import Decision

    dense = sf.prune_2_4(torch.randn(64, 128))
    w = sf.compress_2_4(dense)
    d = Decision("dense", dense_ms=1.0, measured=True)
    monkeypatch.setattr(ops.DISPATCHER, "lookup", lambda *a, only=None: d)
    monkeypatch.setattr(ops, "_routes", {})  # this test's routes stay out of the real table
    monkeypatch.setattr(
        ops,
        "_route",
        lambda weight, m, backend: ops.Route(weight.values._version, ops.KERNELS["dense"].run, dense, None),
    )
    x, bias = torch.randn(*shape), torch.randn(64)
    y = ops.cuda_forward(x, w, bias, handle=1, backend=ops.BACKENDS["auto"])
    assert y.shape == (*shape[:-1], 64)
    assert torch.allclose(y, F.linear(x, dense, bias))


def test_autotune_measures_each_distinct_gpu_shape_once_per_m(monkeypatch):
    """sf.autotune walks the model, dedups layer shapes and asks the dispatcher per M (the
    decisions themselves are faked: on the CPU there is nothing to measure)."""
    from torch import nn

    from sparseflow.kernels import dispatch
    from sparseflow.kernels.dispatch import Decision
    from sparseflow.nn import SparseLinear

    def sl(n, k):
        return SparseLinear.from_dense(nn.Linear(k, n), prune=True)

    model = nn.Sequential(sl(64, 128), sl(64, 128), sl(32, 64))
    assert sf.autotune(model) == []  # on the CPU: nothing to tune
    from sparseflow.cli.demo import autotune_summary

    assert autotune_summary(model, (1, 8)) == "0 (layer shape, M) pairs, M in (1, 8): no 2:4 layer on a GPU"
    asked = []
    monkeypatch.setattr(dispatch, "_on_gpu", lambda w: True)
    monkeypatch.setattr(
        dispatch.DISPATCHER,
        "decide",
        lambda w, m, only=None: asked.append((*w.shape, m)) or Decision("dense", dense_ms=1.0),
    )
    for bad in (0, (16, 0), (1.5,), "16"):
        with pytest.raises(ValueError, match="positive row counts"):
            sf.autotune(model, tokens=bad)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        sf.autotune([model])
    rows = sf.autotune(model, tokens=(16, 1, 16))
    assert asked == [(64, 128, 1), (64, 128, 16), (32, 64, 1), (32, 64, 16)]
    assert [(r["N"], r["K"], r["M"], r["m_bucket"], r["choice"]) for r in rows] == [
        (64, 128, 1, 8, "dense"),
        (64, 128, 16, 16, "dense"),
        (32, 64, 1, 8, "dense"),
        (32, 64, 16, 16, "dense"),
    ]


def test_cslt_candidate_layouts_follow_the_environment(monkeypatch):
    from sparseflow.kernels import cusparselt

    monkeypatch.delenv("SPARSEFLOW_CSLT_LAYOUTS", raising=False)
    monkeypatch.setenv("SPARSEFLOW_CSLT_TUNER", "1")
    assert cusparselt.cslt_candidates() == [1, 4]
    monkeypatch.setenv("SPARSEFLOW_CSLT_LAYOUTS", "1,4,0,4")
    assert cusparselt.cslt_candidates() == [1, 4, 0]
    for bad in ("1,5", "x", ""):
        monkeypatch.setenv("SPARSEFLOW_CSLT_LAYOUTS", bad)
        with pytest.raises(ValueError, match="SPARSEFLOW_CSLT_LAYOUTS"):
            cusparselt.cslt_candidates()
    monkeypatch.setenv("SPARSEFLOW_CSLT_TUNER", "0")  # the tuner off: layout 1 only
    assert cusparselt.cslt_candidates() == [1]


def test_decisions_over_other_layouts_go_to_their_own_cache_file(monkeypatch, tmp_path):
    from sparseflow.kernels import cutlass, dispatch

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    monkeypatch.setattr(cutlass, "available", lambda device: True)
    monkeypatch.setattr(cutlass, "configs", lambda dtype: ["a", "b", "c"])
    monkeypatch.delenv("SPARSEFLOW_CUTLASS", raising=False)
    monkeypatch.setattr(dispatch, "_C", None)
    monkeypatch.setenv("SPARSEFLOW_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("SPARSEFLOW_CSLT_TUNER", "1")
    names = {}
    for layouts in ("1,4", "1,4,0", "1"):
        monkeypatch.setenv("SPARSEFLOW_CSLT_LAYOUTS", layouts)
        names[layouts] = dispatch.Dispatcher().cache_file(torch.device("cuda", 0)).name
    v = dispatch._CACHE_VERSION
    assert names == {
        "1,4": f"dispatch-v{v}-NVIDIA_H200-cusparselt0-cutlass3.json",
        "1,4,0": f"dispatch-v{v}-NVIDIA_H200-cusparselt0-layouts140-cutlass3.json",
        "1": f"dispatch-v{v}-NVIDIA_H200-cusparselt0-notuner-cutlass3.json",
    }
    # decisions measured without CUTLASS's kernels (not built, not Hopper, or turned off) apart too
    monkeypatch.setenv("SPARSEFLOW_CSLT_LAYOUTS", "1,4")
    # a build with more CUTLASS configurations measures again
    monkeypatch.setattr(cutlass, "configs", lambda dtype: ["a", "b", "c", "d"])
    assert dispatch.Dispatcher().cache_file(torch.device("cuda", 0)).name.endswith("cusparselt0-cutlass4.json")
    monkeypatch.setenv("SPARSEFLOW_CUTLASS", "0")
    assert dispatch.Dispatcher().cache_file(torch.device("cuda", 0)).name.endswith("cusparselt0-nocutlass.json")


def test_a_measurement_frees_the_layouts_it_built_but_did_not_choose():
    from sparseflow.kernels.dispatch import Decision, _unchosen

    # cuSPARSELt's buffers by GEMM layout: 1 (shared by layouts 1, 3 and 4), 0 and 2 (their own)
    cslt0, cslt1, cslt2 = ("cusparselt", 0), ("cusparselt", 1), ("cusparselt", 2)
    cut, dec = ("cutlass", None), ("decode", None)
    assert _unchosen(Decision("cusparselt", layout=4), set()) == [cslt0, cslt2, cut, dec]
    assert _unchosen(Decision("cusparselt", layout=3), set()) == [cslt0, cslt2, cut, dec]
    assert _unchosen(Decision("cusparselt", layout=0), set()) == [cslt1, cslt2, cut, dec]
    assert _unchosen(Decision("decode"), set()) == [cslt0, cslt1, cslt2, cut]
    assert _unchosen(Decision("cutlass"), set()) == [cslt0, cslt1, cslt2, dec]
    assert _unchosen(Decision("dense"), {cslt1, dec, cut}) == [cslt0, cslt2]  # there before: kept
    assert _unchosen(Decision("decode", decode_portable=True), set()) == [cslt0, cslt1, cslt2, cut, dec]


def test_numeric_settings_from_the_environment_are_checked(monkeypatch):
    from sparseflow._ext import env_number

    monkeypatch.delenv("SPARSEFLOW_TUNER_MIN_US", raising=False)
    assert env_number("SPARSEFLOW_TUNER_MIN_US", 10.0) == 10.0
    monkeypatch.setenv("SPARSEFLOW_TUNER_MIN_US", "2.5")
    assert env_number("SPARSEFLOW_TUNER_MIN_US", 10.0) == 2.5
    for bad in ("ten", "-1", "nan", ""):
        monkeypatch.setenv("SPARSEFLOW_TUNER_MIN_US", bad)
        with pytest.raises(ValueError, match="SPARSEFLOW_TUNER_MIN_US must be a non-negative number"):
            env_number("SPARSEFLOW_TUNER_MIN_US", 10.0)


def test_the_tuner_is_spent_only_where_the_gemm_is_not_launch_bound(monkeypatch):
    from sparseflow.kernels import dispatch

    limit = dispatch.TUNER_MIN_DENSE_MS
    assert dispatch._worth_measuring(1, 0.001)  # layout 1 searches in-process: always measured
    assert not dispatch._worth_measuring(4, 0.5 * limit)  # a sweep would cost seconds for ~1 us
    assert dispatch._worth_measuring(4, limit)
    monkeypatch.setattr(dispatch, "CSLT_LAYOUT_OVERRIDE", "4")  # a forced layout is always measured
    assert dispatch._worth_measuring(4, 0.001)


def test_layout_4_search_retimes_the_tuners_two_fastest(monkeypatch):
    """dispatch._search for a layout without a library search: the tuner's sweep (faked) ranks
    configurations, the two fastest are timed again in this process, the faster one wins."""
    from types import SimpleNamespace

    from sparseflow.kernels import dispatch
    from sparseflow.kernels.cusparselt_tuner import TUNER

    here = {(5, -1): 0.30, (3, 1): 0.20, (7, 1): 0.10}  # this process's times (id 7: not in the top 2)
    monkeypatch.setattr(TUNER, "sweep", lambda *a: {(5, -1): 0.1, (3, 1): 0.2, (7, 1): 0.9, (9, 1): 0.3})
    monkeypatch.setattr(dispatch, "_C", SimpleNamespace(cslt_mm=lambda x, p, n, cfg, layout: here[tuple(cfg[:2])]))
    monkeypatch.setattr(dispatch, "_median_ms", lambda fn, **kw: fn())
    x = torch.zeros(256, 64, dtype=torch.float16)
    assert dispatch._search(x, None, 128, 4) == ([3, 1, 0, 0], 0.20, "tuner")
    monkeypatch.setattr(TUNER, "sweep", lambda *a: {})  # the tuner found nothing usable
    assert dispatch._search(x, None, 128, 4) is None

    def broken(*a):
        raise RuntimeError("child protocol error")

    monkeypatch.setattr(TUNER, "sweep", broken)  # a tuner bug never reaches the forward
    with pytest.warns(RuntimeWarning, match="tuner failed"):
        assert dispatch._search(x, None, 128, 4) is None


def test_cutlass_kernels_say_why_they_cannot_run_here():
    """CUTLASS's sm90 kernels: shape rule, and a clear refusal off Hopper / without the build."""
    from sparseflow.kernels import KERNELS, cutlass
    from sparseflow.kernels.dispatch import cutlass_wanted

    assert cutlass.unsupported(4096, 14336) is None
    assert "multiple of 64" in cutlass.unsupported(96, 256)
    assert "of 128" in cutlass.unsupported(128, 192)
    w = sf.compress_2_4(sf.prune_2_4(torch.randn(128, 256, dtype=torch.float16)))
    assert not cutlass.available(w.device) and cutlass.unavailable_reason(w.device)
    assert KERNELS["cutlass"].refusal(w.device, w.dtype, *w.shape) == cutlass.unavailable_reason(w.device)
    assert not cutlass_wanted(w)
    with pytest.raises(ValueError, match="CUTLASS 2:4 GEMM unavailable"):
        cutlass.pack_cutlass(w)
    with pytest.raises(ValueError, match="CUTLASS 2:4 GEMM unavailable"):
        w.layout("cutlass")
    with pytest.raises(ValueError, match="backend='cutlass'.*need CUDA tensors"):
        sf.sparse_mm(torch.randn(4, 256, dtype=torch.float16), w, backend="cutlass")


def test_a_failing_cutlass_configuration_is_skipped_not_fatal(monkeypatch):
    """The dispatcher's CUTLASS timing, with the kernel faked: a configuration that refuses to run
    is reported once and left out; if none runs, the decision simply has no CUTLASS time."""
    from sparseflow.kernels import KERNELS, cutlass, dispatch

    w = sf.compress_2_4(sf.prune_2_4(torch.randn(128, 256)))
    monkeypatch.setattr(KERNELS["cutlass"], "pack", lambda weight, key=None: "CUTLASS")
    monkeypatch.setattr(cutlass, "configs", lambda dtype: ["128x8x128 a", "128x8x128 b", "128x8x128 c"])

    def fake_mm(x, cw, cfg):
        if cfg == 1:
            raise RuntimeError("can_implement: Error Misaligned Operand")
        return cfg, x.shape[0]

    monkeypatch.setattr(cutlass, "cutlass_mm", fake_mm)
    xs = (torch.randn(8, 256), torch.randn(1, 256))
    # (configuration, rows) -> ms: configuration 2 is faster at the top of the bucket, 0 at its
    # bottom; both are timed at both ends, the fastest at the top first
    times = {(0, 8): 2.0, (2, 8): 1.5, (0, 1): 1.0, (2, 1): 3.0}
    monkeypatch.setattr(dispatch, "_median_ms", lambda fn: times[fn()])
    with pytest.warns(RuntimeWarning, match="CUTLASS configuration 1 failed"):
        found = dispatch._time_cutlass(w, xs)
    assert found == [dispatch.Variant(2, False, 1.5, 3.0), dispatch.Variant(0, False, 2.0, 1.0)]
    w.drop_layouts("cutlass")
    monkeypatch.setattr(KERNELS["cutlass"], "pack", lambda weight, key=None: (_ for _ in ()).throw(RuntimeError("no")))
    with pytest.warns(RuntimeWarning, match="could not be built"):
        assert dispatch._time_cutlass(w, xs) == []


def test_cutlass_padding_to_whole_tiles_is_timed_and_kept_only_when_faster(monkeypatch):
    """_time_cutlass with the kernels and the timer faked: each call's time is looked up by
    (configuration, rows the kernel ran on), as the GPU would measure it."""
    from sparseflow.kernels import cutlass, dispatch

    ran = []
    monkeypatch.setattr(cutlass, "configs", lambda dtype: ["128x64x128 a", "128x160x128 b"])
    monkeypatch.setattr(cutlass, "cutlass_mm", lambda x, w, cfg: ran.append((cfg, x.shape[0])))
    monkeypatch.setattr(cutlass, "mm_unchecked", lambda x, w, cfg, bias=None: ran.append((cfg, x.shape[0])) or x)

    def timed(times):
        def median_ms(fn, **kw):
            ran.clear()
            fn()
            return times[ran[-1]]

        return median_ms

    w = sf.compress_2_4(sf.prune_2_4(torch.randn(64, 128)))
    monkeypatch.setattr(type(w), "layout", lambda self, kernel, key=None, keep=True: "cw")
    xs = (torch.randn(333, 128), torch.randn(321, 128))
    # H100-like: configuration 0 (64-token tiles) takes 165 us on M = 333 and 119 us on x padded
    # to 384 rows (the same tile count); configuration 1 (160-token tiles) pads to 480 rows
    times = {(0, 333): 165.0, (0, 384): 119.0, (0, 321): 150.0, (1, 333): 200.0, (1, 480): 180.0, (1, 321): 170.0}
    monkeypatch.setattr(dispatch, "_median_ms", timed(times))
    found = dispatch._time_cutlass(w, xs)
    assert found[0] == dispatch.Variant(0, True, 119.0, 119.0)
    assert [(v.cfg, v.pad) for v in found] == [(0, True), (0, False), (1, True), (1, False)]
    # where the plain run is faster, it comes first
    times.update({(0, 333): 100.0, (0, 321): 98.0})
    assert dispatch._time_cutlass(w, xs)[0] == dispatch.Variant(0, False, 100.0, 98.0)
    # a top M of whole tiles has no padded variant to time
    ran_rows = []
    monkeypatch.setattr(dispatch, "_median_ms", lambda fn, **kw: ran.clear() or fn() or ran_rows.append(ran[-1]) or 1.0)
    dispatch._time_cutlass(w, (torch.randn(320, 128), torch.randn(289, 128)))
    assert (0, 320) in ran_rows and (0, 384) not in ran_rows and (1, 320) in ran_rows


def test_only_the_fastest_or_tile_stepping_variants_are_timed_at_the_bucket_bottom(monkeypatch):
    """Beyond the fastest _CUTLASS_RETIMED at the top, a variant is timed at the bottom only if
    its token-tile count is lower there and its top time is within _CUTLASS_STEP_SLACK."""
    from sparseflow.kernels import cutlass, dispatch

    ran = []
    tiles = [192, 160, 128, 64, 96, 256]
    monkeypatch.setattr(cutlass, "configs", lambda dtype: [f"128x{t}x128" for t in tiles])
    monkeypatch.setattr(cutlass, "cutlass_mm", lambda x, w, cfg: ran.append((cfg, x.shape[0])))
    monkeypatch.setattr(cutlass, "mm_unchecked", lambda x, w, cfg, bias=None: ran.append((cfg, x.shape[0])) or x)
    monkeypatch.setattr(dispatch, "_CUTLASS_RETIMED", 1)
    w = sf.compress_2_4(sf.prune_2_4(torch.randn(64, 128)))
    monkeypatch.setattr(type(w), "layout", lambda self, kernel, key=None, keep=True: "cw")
    # bucket 1281-1408; the top's time is the configuration's index + 1 (plain) or + 1.5 (padded)
    timed_at = []

    def median_ms(fn, **kw):
        ran.clear()
        fn()
        cfg, rows = ran[-1]
        timed_at.append((cfg, rows))
        return cfg + 1.0 + (0.5 if rows % tiles[cfg] == 0 and rows not in (1281, 1408) else 0.0)

    monkeypatch.setattr(dispatch, "_median_ms", median_ms)
    found = dispatch._time_cutlass(w, (torch.randn(1408, 128), torch.randn(1281, 128)))
    # 192-token tiles: 7 at 1281, 8 at 1408 (steps); 160: 9 at both; 128: 11 at both; 64: 21 and 22
    # (steps, but 4.0 > 1.6 x 1.0); 96: 14 and 15 (5.0, too slow); 256: 6 at both
    bottom = {cfg for cfg, rows in timed_at if rows in (1281, 1344)}
    assert bottom == {0} and [v.cfg for v in found] == [0, 0]
    monkeypatch.setattr(dispatch, "_CUTLASS_STEP_SLACK", 4.5)
    timed_at.clear()
    found = dispatch._time_cutlass(w, (torch.randn(1408, 128), torch.randn(1281, 128)))
    assert {cfg for cfg, rows in timed_at if rows in (1281, 1344)} == {v.cfg for v in found} == {0, 3}


def test_near_ties_at_the_top_are_timed_again_before_ranking(monkeypatch):
    """A configuration whose one timing was lucky does not win on it: finalists within
    _CUTLASS_NEAR_TIE of the fastest are timed again and ranked by the mean of both timings;
    one far behind is not timed again."""
    from sparseflow.kernels import cutlass, dispatch

    ran = []
    monkeypatch.setattr(cutlass, "configs", lambda dtype: ["128x128x128 a", "128x128x128 b", "128x128x128 c"])
    monkeypatch.setattr(cutlass, "cutlass_mm", lambda x, w, cfg: ran.append((cfg, x.shape[0])))
    w = sf.compress_2_4(sf.prune_2_4(torch.randn(64, 128)))
    monkeypatch.setattr(type(w), "layout", lambda self, kernel, key=None, keep=True: "cw")
    # successive timings per (configuration, rows): 1 measured 90 then 130 at the top (lucky
    # first), 0 steadily 100, 2 far behind at 200
    series = {(0, 256): [100.0, 100.0], (1, 256): [90.0, 130.0], (2, 256): [200.0]}
    timed = []

    def median_ms(fn, **kw):
        ran.clear()
        fn()
        key = ran[-1]
        timed.append(key)
        return series[key].pop(0) if key in series else 50.0

    monkeypatch.setattr(dispatch, "_median_ms", median_ms)
    found = dispatch._time_cutlass(w, (torch.randn(256, 128), torch.randn(241, 128)))
    assert [v.cfg for v in found] == [0, 1, 2]
    assert found[0].hi_ms == 100.0 and found[1].hi_ms == 110.0 and found[2].hi_ms == 200.0
    assert timed.count((2, 256)) == 1 and timed.count((1, 256)) == 2


def test_token_tiles_that_do_not_suit_the_bucket_are_not_timed(monkeypatch):
    """At a bucket of few rows the wide token tiles are skipped (more than twice the bucket's
    largest M, and more than 64): at M <= 16 the 256-token tile is not timed, the 64- and 16-token
    ones are. At many rows the narrow ones are (under M / 32, up to 128): at M = 1408 the 16-token
    tile is not timed; at M = 512 all three are."""
    from sparseflow.kernels import cutlass, dispatch

    assert dispatch.worth_timing(16, 1) and dispatch.worth_timing(64, 1) and not dispatch.worth_timing(128, 16)
    assert dispatch.worth_timing(192, 100) and not dispatch.worth_timing(256, 100)
    # nor, at large M, tiles narrower than M / 32 (up to 128 rows)
    assert dispatch.worth_timing(16, 512) and not dispatch.worth_timing(16, 520)
    assert dispatch.worth_timing(64, 2048) and not dispatch.worth_timing(64, 2176)
    assert dispatch.worth_timing(96, 3072) and not dispatch.worth_timing(96, 3328)
    assert dispatch.worth_timing(128, 16384) and not dispatch.worth_timing(96, 16384)
    ran = []
    monkeypatch.setattr(cutlass, "configs", lambda dtype: ["64x16x256 a", "128x64x128 b", "256x256x128 c"])
    monkeypatch.setattr(cutlass, "cutlass_mm", lambda x, w, cfg: ran.append((cfg, x.shape[0])))
    monkeypatch.setattr(cutlass, "mm_padded", lambda x, w, cfg, rows: ran.append((cfg, rows)))
    w = sf.compress_2_4(sf.prune_2_4(torch.randn(64, 128)))
    monkeypatch.setattr(type(w), "layout", lambda self, kernel, key=None, keep=True: "cw")
    monkeypatch.setattr(dispatch, "_median_ms", lambda fn, **kw: (fn(), 1.0)[1])
    dispatch._time_cutlass(w, (torch.randn(16, 128), torch.randn(9, 128)))
    assert {cfg for cfg, _ in ran} == {0, 1}
    ran.clear()
    dispatch._time_cutlass(w, (torch.randn(1408, 128), torch.randn(1281, 128)))
    assert {cfg for cfg, _ in ran} == {1, 2}  # the 16-token tile is too narrow there (< 1408 / 32)
    ran.clear()
    dispatch._time_cutlass(w, (torch.randn(512, 128), torch.randn(481, 128)))
    assert {cfg for cfg, _ in ran} == {0, 1, 2}


def test_untimed_configurations_are_skipped_at_every_m(monkeypatch):
    """The configurations no measured decision used (``_CUTLASS_UNTIMED``) are not timed at any
    bucket; the others are, where their token tile is worth it (at M = 4096 the 64-token tiles,
    the odd configurations here, are too narrow)."""
    from sparseflow.kernels import cutlass, dispatch

    names = [f"128x{64 if i % 2 else 128}x128 c{i}" for i in range(29)]
    monkeypatch.setattr(cutlass, "configs", lambda dtype: names)
    for m_hi in (16, 300, 4096):
        timed = dispatch.timed_configs(torch.float16, m_hi)
        assert not set(timed) & dispatch._CUTLASS_UNTIMED
        assert timed == [
            c
            for c in range(29)
            if c not in dispatch._CUTLASS_UNTIMED and dispatch.worth_timing(cutlass.token_tile(torch.float16, c), m_hi)
        ]
    assert dispatch.timed_configs(torch.float16, 1024) == [c for c in range(29) if c not in {8, 16, 22, 26}]
    assert dispatch.timed_configs(torch.float16, 4096) == [c for c in range(0, 29, 2) if c not in {8, 16, 22, 26}]
    small = dispatch.timed_configs(torch.float16, 16)
    assert 0 not in small and 1 in small  # a 128-token tile is not timed at M <= 16, a 64-token one is


def test_cutlass_plan_picks_per_m_by_token_tile_count():
    """Qwen's down layer on the H100 at the bucket 1281-1408: 192-token tiles (7 full at 1344,
    8 above) against 160-token tiles padded (9 at every M); the plan takes the first up to 1344."""
    from sparseflow.kernels.dispatch import Step, Variant, cutlass_plan, estimate_ms

    tile = {9: 192, 10: 160}
    v9, v10 = Variant(9, False, 306.0, 241.8), Variant(10, True, 276.0, 279.8)
    assert estimate_ms(v9, 1337, 1281, 1408, 192) == 241.8  # 7 tiles, as at 1281
    assert estimate_ms(v9, 1345, 1281, 1408, 192) == 306.0  # 8 tiles, as at 1408
    assert abs(estimate_ms(v10, 1344, 1281, 1408, 160) - (279.8 - 3.8 * 63 / 127)) < 1e-9  # same count: in M
    plan = cutlass_plan([v10, v9], 1281, 1408, tile.get)
    assert plan == [Step(1344, 9, 0), Step(1408, 10, 160)]
    assert cutlass_plan([v10], 1281, 1408, tile.get) == [Step(1408, 10, 160)]
    assert cutlass_plan([], 1281, 1408, tile.get) == []
    assert cutlass_plan([v9], 8, 8, tile.get) == [Step(8, 9, 0)]  # a one-row bucket


def test_a_decisions_cutlass_variants_survive_the_cache_and_route_per_m(monkeypatch):
    """Variants written to the cache file come back as the same plan; a bucket whose plan has two
    steps routes through one PlannedRun, a one-step plan through the plain run or PaddedRun."""
    import json
    from dataclasses import asdict

    from sparseflow import ops
    from sparseflow.kernels import KERNELS, cutlass
    from sparseflow.kernels.dispatch import Decision, cutlass_steps

    monkeypatch.setattr(cutlass, "configs", lambda dtype: [f"128x{t}x128" for t in (64, 192, 160)])
    d = Decision("cutlass", dense_ms=1.0, cutlass_ms=0.8, cutlass_cfg=2, cutlass_pad=True, m_lo=1281)
    d.cutlass_variants = [[1, False, 0.95, 0.70], [2, True, 0.80, 0.81]]
    back = Decision(**json.loads(json.dumps(asdict(d))))
    assert back == d and "_steps" not in asdict(back)
    steps = cutlass_steps(back, 1408, torch.float16)
    assert steps == [cutlass.Step(1344, 1, 0), cutlass.Step(1408, 2, 160)]
    assert cutlass_steps(back, 1408, torch.float16) is steps  # computed once per decision

    w = sf.compress_2_4(sf.prune_2_4(torch.randn(128, 256, dtype=torch.float16)))
    monkeypatch.setattr(KERNELS["cutlass"], "pack", lambda weight, key=None: "CUTLASS")
    monkeypatch.setattr(ops.DISPATCHER, "decide", lambda weight, m, only=None: back)
    monkeypatch.setattr(ops.DISPATCHER, "lookup", lambda *a, only=None: back)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(cutlass, "unavailable_reason", lambda device: None)
    route = ops._route(w, 1337, ops.BACKENDS["cutlass"])
    assert isinstance(route.run, cutlass.PlannedRun) and route.run.steps == tuple(steps)
    one = Decision("cutlass", dense_ms=1.0, cutlass_ms=0.8, cutlass_cfg=2, cutlass_pad=True, m_lo=1281)
    one.cutlass_variants = [[2, True, 0.80, 0.81]]
    monkeypatch.setattr(ops.DISPATCHER, "lookup", lambda *a, only=None: one)
    route = ops._route(w, 1337, ops.BACKENDS["cutlass"])
    assert isinstance(route.run, cutlass.PaddedRun) and route.run.tile == 160 and route.cfg == 2


def test_planned_run_picks_the_step_by_rows(monkeypatch):
    from sparseflow.kernels import cutlass

    seen = []
    monkeypatch.setattr(cutlass, "mm_unchecked", lambda x, w, cfg, bias=None: seen.append((cfg, x.shape[0])) or x)
    run = cutlass.PlannedRun([cutlass.Step(1344, 9, 0), cutlass.Step(1408, 10, 160)])
    for m in (1281, 1344, 1345, 1408):
        assert run(torch.randn(m, 4), "cw", -1, None).shape == (m, 4)
    assert seen == [(9, 1281), (9, 1344), (10, 1440), (10, 1440)]


def test_padded_run_pads_x_and_returns_its_rows(monkeypatch):
    from sparseflow.kernels import cutlass

    seen = []
    weight = torch.randn(16, 8)

    def fake(x, w, cfg, bias=None):
        seen.append(x.shape[0])
        return x @ weight.T + (0 if bias is None else bias)

    monkeypatch.setattr(cutlass, "mm_unchecked", fake)
    x, b = torch.randn(5, 8), torch.randn(16)
    out = cutlass.PaddedRun(8)(x, "layout", 0, b)
    assert seen == [8] and torch.allclose(out, x @ weight.T + b)
    assert cutlass.PaddedRun(8)(torch.randn(9, 8), "layout", 0, None).shape == (9, 16) and seen[-1] == 16
    assert cutlass.PaddedRun(8)(torch.randn(16, 8), "layout", 0, None).shape == (16, 16) and seen[-1] == 16
    assert cutlass.mm_padded(torch.randn(9, 8), "layout", 0, 8).shape == (9, 16) and seen[-1] == 9


def test_decisions_for_one_kernel_are_kept_apart_and_a_full_one_serves_them(monkeypatch, tmp_path):
    """decide(only="cutlass") (a compact layer's) measures and stores apart from the full decision;
    a full decision serves a scoped lookup, not the other way round; both persist."""
    import json

    from sparseflow.kernels import dispatch
    from sparseflow.kernels.dispatch import Decision

    monkeypatch.setenv("SPARSEFLOW_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(dispatch, "_C", None)
    measured = []

    def fake_measure(self, weight, bucket, only=None):
        measured.append((bucket, only))
        return Decision("cutlass", dense_ms=2.0, cutlass_ms=1.0, measured=True)

    monkeypatch.setattr(dispatch.Dispatcher, "_measure", fake_measure)
    disp = dispatch.Dispatcher()
    w = sf.compress_2_4(sf.prune_2_4(torch.randn(64, 128).half()))
    args = (w.device, w.dtype, 64, 128)
    disp.decide(w, 300, only="cutlass")
    disp.decide(w, 310, only="cutlass")  # same bucket: measured once
    assert measured == [(320, "cutlass")]
    assert disp.lookup(*args, 300) is None and disp.lookup(*args, 300, only="cutlass") is not None
    disp.decide(w, 300)  # a full decision is measured for a layer that needs every kernel
    disp.decide(w, 1000)
    disp.decide(w, 1000, only="cusparselt")  # served by the full one
    disp.decide(w, 1000, only="decode")  # not a scope: the full decision
    assert measured == [(320, "cutlass"), (320, None), (1024, None)]
    saved = json.loads(disp.cache_file(w.device).read_text())["decisions"]
    assert set(saved) == {"float16:64x128:m320:only-cutlass", "float16:64x128:m320", "float16:64x128:m1024"}
    again = dispatch.Dispatcher()  # a new process reads both kinds back
    assert again.lookup(*args, 1000, only="cutlass") is not None and again.lookup(*args, 300) is not None
    assert again._decisions.keys() == disp._decisions.keys()
    assert {r["only"] for r in again.table(*args)} == {"cutlass", None}


def test_measuring_one_kernel_times_only_it_beside_dense(monkeypatch):
    import contextlib

    from sparseflow.kernels import dispatch

    calls = []
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(dispatch, "_median_ms", lambda fn, **kw: 1.0)
    monkeypatch.setattr(dispatch, "cutlass_wanted", lambda w: True)
    monkeypatch.setattr(dispatch, "cslt_unsupported", lambda n, k: None)
    monkeypatch.setattr(dispatch, "cslt_candidates", list)  # no layout searched
    monkeypatch.setattr(
        dispatch, "_time_cutlass", lambda w, xs: calls.append("cutlass") or [dispatch.Variant(3, True, 0.5, 0.5)]
    )
    monkeypatch.setattr(dispatch.cutlass, "token_tile", lambda dtype, cfg: 64)
    monkeypatch.setattr(
        dispatch.Dispatcher, "_cslt_plans", lambda self, w, bucket, only=None: calls.append(("plans", only)) or []
    )
    w = sf.compress_2_4(sf.prune_2_4(torch.randn(64, 128)))
    disp = dispatch.Dispatcher()
    d = disp._measure(w, 128, only="cutlass")
    assert calls == ["cutlass"] and d.choice == "cutlass" and (d.cutlass_cfg, d.cutlass_pad) == (3, True)
    assert d.sparse_ms is None and d.decode_ms is None
    calls.clear()
    d = disp._measure(w, 8, only="cutlass")  # decode-sized: the decode kernel is not timed (or packed)
    assert calls == ["cutlass"] and d.decode_ms is None and ("decode", None) not in w.cached_layouts()
    calls.clear()
    disp._measure(w, 128, only="cusparselt")
    assert calls == [("plans", "cusparselt")]


def test_a_full_decision_takes_cutlass_times_a_compact_layer_measured(monkeypatch):
    """Where a compact layer's CUTLASS-only decision exists for the bucket, the full decision
    (autotune, memory="fast") takes its CUTLASS times and timing instead of timing every
    configuration again; other buckets, and scoped decisions themselves, time CUTLASS."""
    import contextlib

    from sparseflow.kernels import dispatch

    calls = []
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(dispatch, "_median_ms", lambda fn, **kw: 1.0)
    monkeypatch.setattr(dispatch, "cutlass_wanted", lambda w: True)
    monkeypatch.setattr(dispatch, "cslt_unsupported", lambda n, k: "not timed here")
    monkeypatch.setattr(
        dispatch, "_time_cutlass", lambda w, xs: calls.append("cutlass") or [dispatch.Variant(3, True, 0.5, 0.4)]
    )
    monkeypatch.setattr(dispatch.cutlass, "token_tile", lambda dtype, cfg: 64)
    w = sf.compress_2_4(sf.prune_2_4(torch.randn(64, 128)))
    disp = dispatch.Dispatcher()
    scoped = disp._measure(w, 128, only="cutlass")
    disp._decisions[disp._key(w.device, w.dtype, 64, 128, 128, "cutlass")] = scoped
    assert calls == ["cutlass"]
    full = disp._measure(w, 128)
    assert calls == ["cutlass"]  # not timed again
    assert full.cutlass_variants == scoped.cutlass_variants == [[3, True, 0.5, 0.4]]
    assert (full.cutlass_ms, full.lo_ms["cutlass"], full.cutlass_cfg, full.cutlass_pad) == (0.5, 0.4, 3, True)
    assert full.choice == scoped.choice == "cutlass" and full.lo_ms["dense"] == 1.0
    disp._measure(w, 256)  # another bucket
    disp._measure(w, 128, only="cutlass")  # a scoped decision measures for itself
    assert calls == ["cutlass"] * 3
