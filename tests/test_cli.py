"""The ``sparseflow`` command line, run as a user runs it: ``python -m sparseflow ...`` in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from ckpt_helpers import WORDS, sparsify, tiny, tokenizer

from sparseflow.convert.checkpoint import save_pretrained

COMMANDS = ["sparsify", "generate", "info", "bench", "demo"]


def run(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "sparseflow", *args], check=False, capture_output=True, text=True, env=env, timeout=120
    )
    if ok:
        assert proc.returncode == 0, proc.stderr
        assert "Traceback" not in proc.stderr
    return proc


def one_line_error(proc: subprocess.CompletedProcess, command: str, fragment: str) -> None:
    """A user error: non-zero exit, no traceback, one stderr line naming the command and the problem."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1 or lines[0].startswith("usage:"), proc.stderr
    assert lines[-1].startswith(f"sparseflow {command}: error:"), proc.stderr
    assert fragment in lines[-1], proc.stderr


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A tiny 2:4 Llama checkpoint with its tokenizer."""
    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_pretrained(sparsify(tiny("llama")), out, tokenizer=tokenizer())
    return out


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory) -> Path:
    """A tiny dense Hugging Face model directory (model + tokenizer), as `sparseflow sparsify` takes it."""
    out = tmp_path_factory.mktemp("dense")
    tiny("llama").save_pretrained(out)
    tokenizer(out)
    return out


def test_help_for_every_command():
    script = (
        "import contextlib, io, sys\nfrom sparseflow.cli import main\n"
        f"for cmd in {COMMANDS!r}:\n"
        "    buf = io.StringIO()\n"
        "    with contextlib.redirect_stdout(buf):\n"
        "        try: main([cmd, '--help'])\n"
        "        except SystemExit as e: assert e.code == 0, cmd\n"
        "    assert buf.getvalue().startswith('usage: sparseflow ' + cmd), cmd\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
    top = run("--help").stdout
    assert all(cmd in top for cmd in COMMANDS)


def test_info(ckpt):
    out = run("info", str(ckpt)).stdout
    assert "sparseflow checkpoint v1" in out and "LlamaForCausalLM" in out
    assert "14 2:4, 1 dense (lm_head)" in out  # 2 blocks x 7 linears; the tied head stays dense
    data = json.loads(run("info", str(ckpt), "--json").stdout)
    assert data["sparse_layers"] == 14 and data["stored"]["2:4 linears"] > 0
    ratio = data["stored"]["2:4 linears"] / data["dense_equivalent"]["2:4 linears"]
    assert 0.531 < ratio < 0.535  # fp32: half the values + 1 bit of indices per weight = 0.53125x


def test_generate(ckpt):
    proc = run("generate", str(ckpt), "the cat sat on", "--max-new-tokens", "5", "--device", "cpu")
    assert proc.stdout.strip(), proc.stdout


def test_bench(ckpt):
    out = run("bench", str(ckpt), "--tokens", "3", "--prompt-tokens", "8", "--repeats", "1", "--device", "cpu").stdout
    assert "dense" in out and "2:4/dense" in out and "prefill" in out


def test_sparsify_from_hf_dir(dense_dir, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(WORDS[i % len(WORDS)] for i in range(400)))
    out = tmp_path / "out"
    proc = run(
        "sparsify", str(dense_dir), "--method", "sparsegpt", "--calibration", str(text), "--out", str(out),
        "--samples", "4", "--seqlen", "16", "--fallback", "never", "--device", "cpu",
    )  # fmt: skip
    assert "14 sparse" in proc.stdout, proc.stdout
    assert "14 2:4" in run("info", str(out)).stdout
    assert (out / "tokenizer.json").is_file()


def test_bad_arguments(ckpt, dense_dir, tmp_path):
    one_line_error(run("info", str(tmp_path / "nope"), ok=False), "info", "no checkpoint directory")
    one_line_error(
        run("sparsify", str(ckpt), "--method", "random", "--out", "x", ok=False), "sparsify", "invalid choice"
    )
    one_line_error(run("sparsify", str(dense_dir), "--out", "x", ok=False), "sparsify", "needs --calibration")
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in ckpt.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])  # truncated
    one_line_error(run("generate", str(broken), "hi", ok=False), "generate", "truncated or corrupt")


def test_sparsify_refuses_to_overwrite_without_flag(dense_dir, tmp_path, ckpt):
    out = tmp_path / "out"
    out.mkdir()
    for f in ckpt.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    args = ["sparsify", str(dense_dir), "--method", "magnitude", "--out", str(out), "--device", "cpu"]
    one_line_error(run(*args, ok=False), "sparsify", "already holds a checkpoint (config.json); pass --overwrite")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    proc = run(*args, "--overwrite", "--verbose")
    assert "8 sparse" in proc.stdout and "model.layers.0.self_attn.q_proj" in proc.stdout  # --verbose: the table
    assert (out / "model.safetensors").read_bytes() != before["model.safetensors"]


def test_sparsify_without_gpu_converts_by_default_and_refuses_when_nothing_would_be(tmp_path):
    """fallback=auto with no GPU keeps every kernel-aligned layer sparse; a model none of whose
    layers the kernels take is refused and nothing is written."""
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(WORDS[i % len(WORDS)] for i in range(400)))
    good = tmp_path / "good"
    tiny("llama").save_pretrained(good)
    tokenizer(good)
    proc = run(
        "sparsify", str(good), "--method", "sparsegpt", "--calibration", str(text), "--out", str(tmp_path / "a"),
        "--samples", "2", "--seqlen", "16", "--device", "cpu",
    )  # fmt: skip
    # intermediate_size 132 is no multiple of 32: the 6 MLP layers stay dense, the 8 attention ones convert.
    assert "8 sparse, 6 dense-fallback" in proc.stdout, proc.stdout
    odd = tmp_path / "odd"
    (tmp_path / "odd").mkdir()
    import transformers as T

    cfg = T.LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    T.LlamaForCausalLM(cfg).save_pretrained(odd)
    proc = run("sparsify", str(odd), "--method", "magnitude", "--out", str(tmp_path / "b"), ok=False)
    last = proc.stderr.strip().splitlines()[-1]  # after transformers' loading bar
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert last.startswith("sparseflow sparsify: error:") and "nothing would be converted" in last, last
    assert "model.layers.0.self_attn.q_proj: 48x48: in_features K=48 is not a multiple of 32" in last
    assert not (tmp_path / "b").exists()


def test_sparsify_source_errors_come_first_and_name_the_file(tmp_path):
    missing = tmp_path / "nope"
    one_line_error(run("sparsify", str(missing), "--out", "x", ok=False), "sparsify", f"{missing}: no such file")
    one_line_error(run("sparsify", str(tmp_path / "m.gguf"), "--out", "x", ok=False), "sparsify", "no such .gguf")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{oops")
    one_line_error(
        run("sparsify", str(bad), "--out", "x", ok=False), "sparsify", f"{bad / 'config.json'}: corrupt JSON"
    )


def test_generate_and_info_say_when_the_tokenizer_is_missing(tmp_path, ckpt):
    bare = tmp_path / "bare"
    save_pretrained(sparsify(tiny("llama")), bare)
    one_line_error(run("generate", str(bare), "hi", "--device", "cpu", ok=False), "generate", "has no tokenizer files")
    assert "tokenizer:     none (`sparseflow generate` needs one" in run("info", str(bare)).stdout
    assert "tokenizer:     tokenizer.json" in run("info", str(ckpt)).stdout
    assert json.loads(run("info", str(bare), "--json").stdout)["tokenizer"] == []


def test_help_does_not_import_torch():
    """`sparseflow --help` stays fast: neither torch nor transformers is imported for it. A
    library `import sparseflow` still loads everything (so transformers can read our checkpoints)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "sparseflow", "--help"],
        check=False, capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.startswith("usage: sparseflow"), proc.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
    assert "sparseflow" in imported and "sparseflow.cli" in imported
    assert not imported & {"torch", "transformers"}
    script = "import sys, sparseflow\nprint('torch' in sys.modules, 'sparseflow.convert.hf_quantizer' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, env=env)
    assert proc.stdout.split() == ["True", "True"], proc.stderr


def test_bench_model_without_gpu_says_it_needs_one():
    import torch

    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_model.py"
    env = {**os.environ, "PYTHONPATH": str(script.parents[1])}
    proc = subprocess.run(
        [sys.executable, str(script)], check=False, capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 1 and "needs a CUDA GPU" in proc.stderr, proc.stderr
