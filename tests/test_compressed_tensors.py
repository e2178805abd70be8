"""compressed-tensors sparse-24-bitmask interop, checked against the compressed-tensors library itself.

The library removed this format after 0.14 (the installed one may be newer): the bit layout
and config schema are checked against whatever release is installed, and the full compressor
round trip runs against a release that still has it, given as SPARSEFLOW_CT_LEGACY=<dir>
(``pip install --no-deps --target <dir> compressed-tensors==0.14.0.1``).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import sparseflow as sf
from sparseflow.convert.checkpoint import CheckpointError, from_pretrained, save_pretrained
from sparseflow.convert.compressed_tensors import bitmask_to_meta, meta_to_bitmask
from sparseflow.nn import SparseLinear
from tests.ckpt_helpers import inputs, outputs, read_file, rewrite, sparse_names, sparsify, tiny

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.config import SparsityCompressionConfig
from compressed_tensors.utils import pack_bitmasks, unpack_bitmasks

REPO = Path(__file__).resolve().parents[1]
UP = "model.layers.0.mlp.up_proj"


def _legacy_path() -> str | None:
    path = os.environ.get("SPARSEFLOW_CT_LEGACY")
    if path and (Path(path) / "compressed_tensors").is_dir():
        return path
    return None


needs_legacy = pytest.mark.skipif(
    _legacy_path() is None,
    reason="set SPARSEFLOW_CT_LEGACY to a dir with compressed-tensors<=0.14 (pip install --no-deps --target DIR "
    "compressed-tensors==0.14.0.1)",
)


@pytest.mark.parametrize("k", [64, 132, 8, 4])
def test_bitmask_layout_is_the_librarys(k):
    """Our meta -> bitmask equals the library's pack_bitmasks of the kept positions, and back."""
    w = sf.prune_2_4(torch.randn(24, k) + 3.0)  # no zeros: exactly 2 kept per group
    compressed = sf.compress_2_4(w)
    keep = w != 0
    bitmask = meta_to_bitmask(compressed.meta, k)
    assert torch.equal(bitmask, pack_bitmasks(keep))
    assert torch.equal(unpack_bitmasks(bitmask, [24, k]), keep)
    assert torch.equal(bitmask_to_meta(bitmask, k), compressed.meta)
    assert torch.equal(compressed.values, w[keep].reshape(24, k // 2))  # the library's `compressed` tensor


def test_every_2_of_4_pattern_and_rejects_others():
    pairs = [(a, b) for a in range(4) for b in range(a + 1, 4)]
    rows = []
    for p in pairs:
        for q in pairs:
            row = torch.zeros(8)
            row[list(p)] = 1.0
            row[[4 + i for i in q]] = 1.0
            rows.append(row)
    w = torch.stack(rows)
    bitmask = pack_bitmasks(w != 0)
    assert torch.equal(bitmask_to_meta(bitmask, 8), sf.compress_2_4(w).meta)
    bad = bitmask.clone()
    bad[7, 0] |= 0xF0  # all four columns of the second group kept
    with pytest.raises(CheckpointError, match="row 7.*each group of 4 must keep exactly 2"):
        bitmask_to_meta(bad, 8)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "opt"])
def test_round_trip_through_compressed_tensors_format(tmp_path, arch):
    model = sparsify(tiny(arch, dtype=torch.float16))
    save_pretrained(model, tmp_path / "ct", format="compressed-tensors")
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and "sparseflow" not in cfg
    sparsity = SparsityCompressionConfig.load_from_registry(qc["sparsity_config"]["format"], **qc["sparsity_config"])
    assert sparsity.format == "sparse-24-bitmask" and sparsity.sparsity_structure == "2:4"
    assert "lm_head" in sparsity.ignore and sparsity.targets == ["Linear"]
    stored, _ = read_file(tmp_path / "ct" / "model.safetensors")
    for layer in sparse_names(model):
        mod = model.get_submodule(layer)
        assert stored[f"{layer}.shape"].flatten().tolist() == [mod.out_features, mod.in_features]
        assert (
            stored[f"{layer}.compressed"].nbytes + stored[f"{layer}.bitmask"].nbytes
            <= 0.57 * mod.in_features * mod.out_features * 2
        )
    loaded = from_pretrained(tmp_path / "ct")
    assert sparse_names(loaded) == sparse_names(model)
    assert torch.equal(outputs(loaded, inputs()), outputs(model, inputs()))
    assert not hasattr(loaded.config, "quantization_config")
    save_pretrained(loaded, tmp_path / "ours")  # and on into our own format
    assert torch.equal(outputs(from_pretrained(tmp_path / "ours"), inputs()), outputs(model, inputs()))


def _library_style_checkpoint(tmp_path):
    """A sparse-24-bitmask checkpoint built with the library's own primitives, as its compressor does."""
    dense = tiny("llama")
    with torch.no_grad():
        for name, mod in dense.named_modules():
            if isinstance(mod, nn.Linear) and name != "lm_head":
                mod.weight.copy_(sf.prune_2_4(mod.weight + 1e-3))
    ours = sparsify(tiny("llama"))  # same seed: the pruned weights are identical
    save_pretrained(ours, tmp_path / "ct", format="compressed-tensors")
    state = {}
    for name, t in dense.state_dict().items():
        layer = name.removesuffix(".weight")
        mod = dense.get_submodule(layer) if name.endswith(".weight") else None
        if isinstance(mod, nn.Linear) and layer != "lm_head":
            keep = t != 0
            state[f"{layer}.compressed"] = t[keep].reshape(t.shape[0], -1)
            state[f"{layer}.bitmask"] = pack_bitmasks(keep)
            state[f"{layer}.shape"] = torch.tensor(list(t.shape)).reshape(-1, 1)
        elif name != "lm_head.weight":
            state[name] = t
    from safetensors.torch import save_file

    save_file(state, str(tmp_path / "ct" / "model.safetensors"), metadata={"format": "pt"})
    return dense, tmp_path / "ct"


def test_reads_library_primitives_checkpoint(tmp_path):
    dense, path = _library_style_checkpoint(tmp_path)
    loaded = from_pretrained(path)
    assert isinstance(loaded.get_submodule(UP), SparseLinear)
    assert torch.equal(loaded.get_submodule(UP).dense_weight(), dense.get_submodule(UP).weight)
    assert torch.allclose(outputs(loaded, inputs()), outputs(dense, inputs()), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "mutate,pattern",
    [
        (lambda t: t[f"{UP}.bitmask"][3].__ior__(0xFF), f"tensor '{UP}.bitmask': not 2:4: row 3"),
        (lambda t: t.__setitem__(f"{UP}.shape", torch.tensor([[132], [60]])), rf"tensor '{UP}.shape' is \[132, 60\]"),
        (lambda t: t.pop(f"{UP}.bitmask"), rf"missing tensor {UP}.bitmask"),
        (lambda t: t.pop("model.norm.weight"), "missing tensor 'model.norm.weight'"),
        (lambda t: t.__setitem__(f"{UP}.compressed", torch.zeros(132, 30)), r"has shape \[132, 30\]"),
    ],
)
def test_damaged_compressed_tensors_checkpoint(tmp_path, mutate, pattern):
    _, path = _library_style_checkpoint(tmp_path)
    rewrite(path / "model.safetensors", mutate)
    with pytest.raises(CheckpointError, match=pattern):
        from_pretrained(path)


def _run_legacy(*args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([_legacy_path(), str(REPO)]))
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "ct_legacy_driver.py"), *map(str, args)],
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


@needs_legacy
def test_library_writes_we_read(tmp_path):
    dense, _ = _library_style_checkpoint(tmp_path)
    dense.save_pretrained(tmp_path / "dense")
    _run_legacy("write", tmp_path / "dense", tmp_path / "lib")
    loaded = from_pretrained(tmp_path / "lib")
    assert len(sparse_names(loaded)) == 14
    for name, mod in loaded.named_modules():
        if isinstance(mod, SparseLinear):
            assert torch.equal(mod.dense_weight(), dense.get_submodule(name).weight)
    assert torch.allclose(outputs(loaded, inputs()), outputs(dense, inputs()), atol=1e-6, rtol=1e-5)


@needs_legacy
def test_we_write_library_reads(tmp_path):
    model = sparsify(tiny("llama"))  # odd group count in down_proj, tied head
    save_pretrained(model, tmp_path / "ours", format="compressed-tensors")
    _run_legacy("read", tmp_path / "ours", tmp_path / "back.safetensors")
    back, _ = read_file(tmp_path / "back.safetensors")
    for name, mod in model.named_modules():
        if isinstance(mod, SparseLinear):
            assert torch.equal(back[f"{name}.weight"], mod.dense_weight()), name
    for name, t in model.state_dict().items():
        if name in back:
            assert torch.equal(back[name], t), name
