"""The crash-isolated cuSPARSELt sweep (sparseflow.cslt_tuner): the parent's restart logic runs
here against a scripted child; the real child runs in the GPU tests."""

import sys
import textwrap

import pytest
import torch

from sparseflow.cslt_tuner import Tuner

# A stand-in child: ids 0..4; id 1 kills the process, id 3 gives a wrong answer, id 4 fails.
FAKE = textwrap.dedent(
    """
    import json, os, sys, time
    for line in sys.stdin:
        r = json.loads(line)
        for alg in range(r["start"], 5):
            print("TRY", alg, flush=True)
            if alg == 1:
                os._exit(134)  # as an illegal instruction would end it
            if alg == 2 and r["m"] == 7:
                time.sleep(60)  # hangs
            if alg == 4:
                continue  # the library refused this id
            print("OK", alg, 0.1 * (alg + 1), 0.5 if alg == 3 else 1e-4, flush=True)
        print("END", flush=True)
    """
)


def test_tuner_skips_crashing_wrong_and_failing_ids():
    t = Tuner([sys.executable, "-c", FAKE])
    try:
        times = t.sweep(0, "float16", 64, 64, 16, 4)
        assert times == pytest.approx({0: 0.1, 2: 0.3})
        assert [alg for _, alg in t.crashed] == [1] and t.children == 2
        again = t.sweep(0, "float16", 64, 64, 32, 4)  # the restarted child serves the next request
        assert again.keys() == {0, 2} and t.children == 3  # (id 1 crashes it once more)
    finally:
        t.close()


def test_tuner_kills_a_hung_child_and_goes_on():
    t = Tuner([sys.executable, "-c", FAKE], timeout_s=3)
    try:
        times = t.sweep(0, "float16", 64, 64, 7, 4)
        assert times.keys() == {0} and [alg for _, alg in t.crashed] == [1, 2]
    finally:
        t.close()


def test_tuner_reports_nothing_when_the_child_cannot_start():
    t = Tuner([sys.executable, "-c", "import sys; sys.exit(1)"])
    assert t.sweep(0, "float16", 64, 64, 16, 4) == {} and t.crashed == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_real_child_sweeps_cusparselt_layout_4():
    from sparseflow import extension_available

    if not extension_available():
        pytest.skip("extension not built")
    t = Tuner()
    try:
        times = t.sweep(0, "float16", 1024, 1024, 256, 4)
        assert times and all(ms > 0 for ms in times.values())
    finally:
        t.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_dispatcher_with_the_tuner_measures_layout_4(monkeypatch, tmp_path):
    import sparseflow as sf
    from sparseflow import extension_available
    from sparseflow.dispatch import Dispatcher
    from tests.conftest import TOL, random_2_4, rel_err

    if not extension_available():
        pytest.skip("extension not built")
    from sparseflow.cslt_tuner import TUNER

    monkeypatch.setenv("SPARSEFLOW_CSLT_TUNER", "1")
    monkeypatch.setenv("SPARSEFLOW_CACHE_DIR", str(tmp_path))
    swept = []
    real = TUNER.sweep
    monkeypatch.setattr(TUNER, "sweep", lambda *a: swept.append(a) or real(*a))
    w = random_2_4(2048, 2048, torch.float16, "cuda")
    c = sf.compress_2_4(w)
    d = Dispatcher().decide(c, 512)
    assert [a[-1] for a in swept] == [4] and swept[0][2:5] == (2048, 2048, 512)
    assert d.measured and d.sparse_ms and d.layout in (1, 4) and d.search in ("cusparselt", "tuner"), d
    monkeypatch.setattr(sf.ops, "DISPATCHER", Dispatcher())  # route through a fresh dispatcher
    x = torch.randn(512, 2048, device="cuda", dtype=torch.float16)
    y = sf.sparse_mm(x, c, backend="cusparselt")
    assert rel_err(y, x.double() @ w.double().t()) < TOL[torch.float16]
