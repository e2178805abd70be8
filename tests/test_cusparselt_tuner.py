"""The crash-isolated cuSPARSELt sweep (sparseflow.kernels.cusparselt_tuner): the parent's restart logic runs
here against a scripted child; the real child runs in the GPU tests."""

import sys
import textwrap

import pytest
import torch

from sparseflow.kernels.cusparselt_tuner import Tuner

# A stand-in child with ids 0..6: id 1 kills the process (as an illegal instruction would), id 2
# hangs when M == 7 and kills it too when M == 9, id 3 gives a wrong answer, ids 4..6 are refused
# by the library (an error; the child lives on). Segment-K variants run twice as fast, except at
# M == 48, where every one of them kills the child.
FAKE = textwrap.dedent(
    """
    import json, os, sys, time
    for line in sys.stdin:
        r = json.loads(line)
        if "variants" in r:
            for i in range(r["start"], min(r["stop"], len(r["variants"]))):
                alg, split = r["variants"][i]
                print("TRY", i, flush=True)
                if r["m"] == 48:
                    os._exit(134)
                print("OK", i, 0.05 * (alg + 1), 1e-4, flush=True)
            print("END", flush=True)
            continue
        for alg in range(r["start"], min(r["stop"], 7)):
            print("TRY", alg, flush=True)
            if alg == 1 or (alg == 2 and r["m"] == 9):
                os._exit(134)
            if alg == 2 and r["m"] == 7:
                time.sleep(60)
            if alg >= 4:
                print("FAIL", alg, flush=True)
                continue
            print("OK", alg, 0.1 * (alg + 1), 0.5 if alg == 3 else 1e-4, flush=True)
        print("END", flush=True)
    """
)


def _fake(**kw) -> Tuner:
    return Tuner([sys.executable, "-c", FAKE], **kw)


def _ids(times: dict, split_k: int = 1) -> set[int]:
    return {alg for alg, s in times if s == split_k}


def test_tuner_skips_crashing_wrong_and_refused_ids_then_tries_segment_k():
    t = _fake()
    try:
        got = t.sweep(0, "float16", 64, 64, 16, 4)
        assert got == pytest.approx({(0, 1): 0.1, (2, 1): 0.3, (0, -1): 0.05, (2, -1): 0.15})
        assert [alg for _, alg in t.crashed] == [1] and [alg for _, alg in t.failed] == [4, 5, 6]
        assert t.stop_at == {(4, "float16"): 4}  # the refused tail is not tried again
        assert t.children == 3  # restarted after the crash; replaced after the refusals
        again = t.sweep(0, "float16", 64, 64, 32, 4)
        assert _ids(again) == {0, 2} and _ids(again, -1) == {0, 2}
        assert [alg for _, alg in t.failed] == [4, 5, 6] and t.children == 4
    finally:
        t.close()


def test_segment_k_that_crashes_is_given_up():
    t = _fake()
    try:
        got = t.sweep(0, "float16", 64, 64, 48, 4)
        assert _ids(got) == {0, 2} and _ids(got, -1) == set()
        assert t.stop_at[(4, "float16", "segment-k")] == 0
        crashes = len(t.crashed)
        assert _ids(t.sweep(0, "float16", 64, 64, 16, 4), -1) == set()  # not tried again
        assert len(t.crashed) == crashes + 1  # (only id 1's usual crash)
    finally:
        t.close()


def test_two_crashes_in_a_row_end_the_sweep():
    t = _fake()
    try:
        assert _ids(t.sweep(0, "float16", 64, 64, 9, 4)) == {0}
        assert [alg for _, alg in t.crashed] == [1, 2] and t.stop_at[(4, "float16")] == 1
        t.sweep(0, "float16", 64, 64, 16, 4)  # later sweeps of the layout stop before id 1
        assert len(t.crashed) == 2
    finally:
        t.close()


def test_a_hung_child_is_killed_within_the_request_budget():
    t = _fake(timeout_s=4)
    try:
        assert _ids(t.sweep(0, "float16", 64, 64, 7, 4)) == {0}
        assert 2 in [alg for _, alg in t.crashed]
    finally:
        t.close()


def test_no_interpreter_for_the_child_is_not_an_error():
    t = Tuner(["/nonexistent/python3", "-m", "sparseflow.kernels.cusparselt_tuner"])
    assert t.sweep(0, "float16", 64, 64, 16, 4) == {} and t.children == 0


def test_a_child_that_cannot_start_turns_the_tuner_off():
    t = Tuner([sys.executable, "-c", "import sys; sys.exit(1)"])
    assert t.sweep(0, "float16", 64, 64, 16, 4) == {} and t.sweep(0, "float16", 64, 64, 16, 4) == {}
    with pytest.warns(RuntimeWarning, match="tuner"):
        t.sweep(0, "float16", 64, 64, 16, 4)  # the third failed request
    assert t.disabled and t.crashed == []
    started = t.children
    assert t.sweep(0, "float16", 64, 64, 16, 4) == {} and t.children == started


def test_an_idle_child_is_ended_and_the_next_request_starts_one():
    t = _fake(idle_s=0.5)
    try:
        t.sweep(0, "float16", 64, 64, 32, 4)  # learns the refused tail (that child is replaced)
        t.sweep(0, "float16", 64, 64, 32, 4)  # crash at id 1, then a child that finishes cleanly
        live = t._proc
        assert live is not None and live.poll() is None
        live.wait(timeout=10)  # ended by the idle timer
        assert _ids(t.sweep(0, "float16", 64, 64, 32, 4)) == {0, 2}
    finally:
        t.close()


def test_the_child_finds_sparseflow_through_the_parents_sys_path(tmp_path, monkeypatch):
    (tmp_path / "probe_child.py").write_text(
        "import sys\nfor line in sys.stdin:\n    print('TRY', 0, flush=True)\n"
        "    print('OK', 0, 0.25, 0.0, flush=True)\n    print('END', flush=True)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))  # importable here only through sys.path
    monkeypatch.delenv("PYTHONPATH", raising=False)
    t = Tuner([sys.executable, "-m", "probe_child"])
    try:
        assert t.sweep(0, "float16", 64, 64, 16, 4) == {(0, 1): 0.25, (0, -1): 0.25}
    finally:
        t.close()


def test_the_default_child_command_starts_the_tuner_module():
    """The default command runs this module as the child (it exits cleanly at end of input)."""
    import os
    import subprocess

    cmd = Tuner().cmd
    assert cmd[1:] == ["-m", "sparseflow.kernels.cusparselt_tuner"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    done = subprocess.run(cmd, check=False, input="", capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr


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
    from sparseflow.kernels import dispatch
    from sparseflow.kernels.dispatch import Dispatcher
    from tests.conftest import TOL, random_2_4, rel_err

    if not extension_available():
        pytest.skip("extension not built")
    from sparseflow.kernels.cusparselt_tuner import TUNER

    monkeypatch.setenv("SPARSEFLOW_CSLT_TUNER", "1")
    monkeypatch.setenv("SPARSEFLOW_CACHE_DIR", str(tmp_path))
    swept = []
    real = TUNER.sweep
    monkeypatch.setattr(TUNER, "sweep", lambda *a: swept.append(a) or real(*a))
    w = random_2_4(2048, 2048, torch.float16, "cuda")
    c = sf.compress_2_4(w)
    monkeypatch.setattr(dispatch, "TUNER_MIN_DENSE_MS", 1e9)  # every GEMM counts as launch-bound
    d = Dispatcher().decide(c, 256)
    assert swept == [] and d.measured and d.layout == 1, d  # no sweep; layout 1 (in-process search)
    monkeypatch.setattr(dispatch, "TUNER_MIN_DENSE_MS", 0.0)
    d = Dispatcher().decide(c, 512)
    assert [a[-1] for a in swept] == [4] and swept[0][2:5] == (2048, 2048, 512)
    assert d.measured and d.sparse_ms and d.layout in (1, 4) and d.search in ("cusparselt", "tuner"), d
    monkeypatch.setattr(sf.ops, "DISPATCHER", Dispatcher())  # route through a fresh dispatcher
    x = torch.randn(512, 2048, device="cuda", dtype=torch.float16)
    y = sf.sparse_mm(x, c, backend="cusparselt")
    assert rel_err(y, x.double() @ w.double().t()) < TOL[torch.float16]
