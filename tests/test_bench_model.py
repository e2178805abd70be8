"""benchmarks/bench_model.py end to end on a tiny model on the CPU: both architectures, eager and compiled
(aot_eager traces what inductor would get, without inductor's C++ compile time), and the JSON keys the
GPU run's consumers read."""

import json

import pytest

from sparseflow.nn import register_packed_gqa
from tests.conftest import benchmark_script


def _bench_model():
    return benchmark_script("bench_model")


# One compile per prefill shape and model, ~2 s each here: a shape that is not a power of two for one arch only.
@pytest.mark.parametrize(("arch", "prefill"), [("llama3-8b", ["b1x2048", "b1x300"]), ("qwen2.5-7b", ["b1x2048"])])
def test_tiny_cpu_smoke_writes_eager_and_compiled_figures(arch, prefill, tmp_path):
    bm = _bench_model()
    argv = ["--tiny", "--device", "cpu", "--arch", arch, "--out", str(tmp_path), "--layers", "1"]
    argv += ["--modes", "eager,compiled", "--compile-mode", "default", "--compile-backend", "aot_eager"]
    argv += ["--prefill", ",".join(prefill), "--context", "16", "--decode-steps", "1", "--new-tokens", "2"]
    argv += ["--reps", "1"]
    bm.main(argv)
    # a run of some of the modes is named after them: it does not overwrite a full run's file
    name = ("model_cpu" if arch == "llama3-8b" else f"model_cpu_{arch}") + "_eager-compiled.json"
    result = json.loads((tmp_path / name).read_text())

    assert result["arch"] == arch and result["config"]["tiny"]
    assert result["compile"]["mode"] == "default" and result["compile"]["backend"] == "aot_eager"
    assert result["settings"]["decode_batches"] == [1, 16, 64] and result["settings"]["context"] == 16
    assert result["dense"]["errors"] is None and result["sparse"]["errors"] is None
    suffixes = ["" if name == "b1x2048" else f"_{name}" for name in prefill]
    measured = [f"{mode}prefill_speedup{s}" for mode in ("", "compiled_") for s in suffixes]
    measured += [f"compiled_decode_speedup_b{b}" for b in (1, 16, 64)]
    for key in [*measured, "eager_generate_speedup_b1", "linear_weight_memory_ratio"]:
        assert result[key] > 0, key
    for side in ("dense", "sparse"):
        for key in [f"prefill_{name}" for name in prefill] + [f"decode_b{b}" for b in (1, 16, 64)]:
            assert result[side]["compile_seconds"][key] > 0, (side, key)
            assert result[side]["compile_graphs"][key] == 1, (side, key)  # decode steps must not recompile
    assert set(result["headline"]) == {"decode_speedup_b1", "decode_speedup_b16", "prefill_speedup"} | {
        "gpu_memory_vs_dense"
    }
    for key in ("decode_speedup_b1", "decode_speedup_b16", "prefill_speedup"):
        assert result["headline"][key] == result[f"compiled_{key}"] > 0
    # not measured here: the graph mode (no CUDA), shapes left out, GPU memory
    assert result["decode_speedup_b1"] is None and result["settings"]["skipped"] is None
    assert result["compiled_prefill_speedup_b4x700"] is None
    assert result["headline"]["gpu_memory_vs_dense"] is None and "gpu_memory_vs_dense" in result
    assert result["linear_weight_bytes"]["converted"] == 7  # q, k, v, o, gate, up, down of the one layer


def test_causal_prefill_and_tag_name_the_result_file(tmp_path):
    """``--attn sdpa_packed_gqa --causal-prefill --tag t``: the run says it used causal prefill, in its settings
    and file name, and ``--causal-prefill`` without that attention is refused by name."""
    bm = _bench_model()
    argv = ["--tiny", "--device", "cpu", "--out", str(tmp_path), "--layers", "1", "--modes", "compiled"]
    argv += ["--compile-backend", "aot_eager", "--prefill", "b1x300", "--decode-batches", "1", "--context", "16"]
    argv += ["--decode-steps", "1", "--reps", "1"]
    try:
        bm.main([*argv, "--attn", "sdpa_packed_gqa", "--causal-prefill", "--tag", "t"])
    finally:
        register_packed_gqa()  # the default mask again for the tests after this one
    result = json.loads((tmp_path / "model_cpu_attn-sdpa_packed_gqa-causal_compiled_t.json").read_text())
    assert result["settings"]["causal_prefill"] is True and result["settings"]["attn"] == "sdpa_packed_gqa"
    assert result["compiled_prefill_speedup_b1x300"] > 0
    with pytest.raises(ValueError, match="--causal-prefill needs --attn sdpa_packed_gqa"):
        bm.main([*argv, "--causal-prefill"])


def test_a_time_limit_stops_the_run_and_what_it_measured_is_written(tmp_path, monkeypatch):
    """SIGTERM (``timeout`` at a device call's limit) in the middle of the 2:4 measurements: the run stops
    there, writes the JSON with the dense figures it has and nulls for the rest, says where it stopped,
    and gives SIGTERM its previous handler back."""
    import os
    import signal

    bm = _bench_model()
    real = bm.compiled_prefill_tok_s
    calls = []

    def limited(model, *args):
        calls.append(type(model.model.layers[0].mlp).__name__)
        if len(calls) == 2:  # the 2:4 model's prompt: the limit strikes during its measurement
            os.kill(os.getpid(), signal.SIGTERM)
        return real(model, *args)

    monkeypatch.setattr(bm, "compiled_prefill_tok_s", limited)
    before = signal.getsignal(signal.SIGTERM)
    argv = ["--tiny", "--device", "cpu", "--out", str(tmp_path), "--layers", "1", "--modes", "compiled"]
    argv += ["--compile-backend", "aot_eager", "--prefill", "b1x300", "--decode-batches", "1", "--context", "16"]
    argv += ["--decode-steps", "1", "--reps", "1"]
    bm.main(argv)
    assert signal.getsignal(signal.SIGTERM) is before
    assert calls == ["LlamaMLP", "SparseGatedMLP"]
    result = json.loads((tmp_path / "model_cpu_compiled.json").read_text())
    assert "while measuring 2:4" in result["stopped"]
    assert result["dense"]["compiled_prefill_tok_s_b1x300"] > 0 and result["dense"]["compiled_decode_tok_s_b1"] > 0
    assert result["sparse"]["compiled_prefill_tok_s_b1x300"] is None
    assert result["sparse"]["compiled_decode_tok_s_b1"] is None  # never reached
    assert result["compiled_prefill_speedup_b1x300"] is None and result["autotune_seconds"] is not None
    assert result["dense"]["compile_seconds"]["prefill_b1x300"] > 0
    assert result["linear_weight_memory_ratio"] > 0  # stopped after the conversion: its bytes are known
