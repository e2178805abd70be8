"""compressed-tensors checkpoints stored dense with a 2:4 ``sparsity_config`` (how several
published 2:4 models ship), and that parsing such a config never runs what it names."""

import json
import sys
import weakref

import pytest
import torch
from torch import nn

import sparseflow as sf
from sparseflow.convert import compressed_tensors as ct
from sparseflow.convert.checkpoint import CheckpointError, from_pretrained, save_pretrained
from sparseflow.convert.info import checkpoint_info
from sparseflow.nn import SparseLinear
from tests.ckpt_helpers import edit_config, inputs, outputs, rewrite, sparse_names, tiny

UP = "model.layers.0.mlp.up_proj"
SPARSITY = {
    "format": "dense",
    "sparsity_structure": "2:4",
    "targets": ["Linear"],
    "ignore": ["lm_head"],
    "global_sparsity": 0.45,
    "registry_requires_subclass": False,
}


def _dense_24(tmp_path, key="quantization_config", dtype=torch.float32, sparsity=None, name="ct"):
    """A tiny Llama whose linears (not the head) are 2:4 in their values, saved by transformers
    as plain dense weights plus a compressed-tensors dense 2:4 config."""
    model = tiny("llama", dtype=dtype)
    with torch.no_grad():
        for n, mod in model.named_modules():
            if isinstance(mod, nn.Linear) and n != "lm_head":
                mod.weight.copy_(sf.prune_2_4(mod.weight))
    path = tmp_path / name
    model.save_pretrained(path)
    edit_config(
        path,
        lambda c: c.update(
            {key: {"quant_method": "compressed-tensors", "format": "dense", "sparsity_config": sparsity or SPARSITY}}
        ),
    )
    return model, path


@pytest.mark.parametrize("key", ["quantization_config", "compression_config"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reads_dense_2_4_checkpoint_as_sparse_linear(tmp_path, key, dtype):
    dense, path = _dense_24(tmp_path, key, dtype)
    loaded = from_pretrained(path)
    assert len(sparse_names(loaded)) == 14 and type(loaded.lm_head) is nn.Linear
    for name, mod in loaded.named_modules():
        if isinstance(mod, SparseLinear):
            assert "weight" not in dict(mod.named_parameters()) and mod.weight_values.dtype == dtype
            assert torch.equal(mod.dense_weight(), dense.get_submodule(name).weight)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # tied head kept tied and dense
    torch.testing.assert_close(outputs(loaded, inputs()), outputs(dense, inputs()), rtol=1e-2, atol=1e-2)
    assert not hasattr(loaded.config, "quantization_config") and not hasattr(loaded.config, "compression_config")
    save_pretrained(loaded, tmp_path / "ours")  # and it saves as an ordinary sparseflow checkpoint
    assert sparse_names(from_pretrained(tmp_path / "ours")) == sparse_names(loaded)
    info = checkpoint_info(path)
    assert info.format == "compressed-tensors dense (2:4 weights stored dense)"


def test_targets_and_ignore_patterns_pick_the_2_4_layers(tmp_path):
    dense, path = _dense_24(tmp_path, sparsity=dict(SPARSITY, targets=["re:.*mlp\\..*_proj$"], ignore=["lm_head"]))
    with torch.no_grad():  # attention is not targeted: it may be anything
        dense.model.layers[0].self_attn.q_proj.weight.normal_()
    rewrite(
        path / "model.safetensors",
        lambda t: t.update(
            {"model.layers.0.self_attn.q_proj.weight": dense.model.layers[0].self_attn.q_proj.weight.clone()}
        ),
    )
    loaded = from_pretrained(path)
    assert sparse_names(loaded) == [
        f"model.layers.{i}.mlp.{p}" for i in range(2) for p in ("gate_proj", "up_proj", "down_proj")
    ]
    assert torch.equal(loaded.model.layers[0].self_attn.q_proj.weight, dense.model.layers[0].self_attn.q_proj.weight)
    _, path = _dense_24(tmp_path, sparsity=dict(SPARSITY, ignore=["lm_head", "re:.*self_attn"]), name="ct2")
    assert len(sparse_names(from_pretrained(path))) == 6


def test_layer_that_is_not_2_4_is_refused_by_name(tmp_path):
    _, path = _dense_24(tmp_path)

    def spoil(t):
        t[f"{UP}.weight"][5, 8:12] = torch.tensor([1.0, 2.0, 3.0, 0.0])

    rewrite(path / "model.safetensors", spoil)
    with pytest.raises(CheckpointError, match=rf"layer '{UP}' is not 2:4 .*row 5, columns 8\.\.11"):
        from_pretrained(path)


def test_dense_weights_do_not_linger(tmp_path, monkeypatch):
    """Each dense 2:4 weight is gone once converted: when the next one arrives, the previous
    one has been freed, so peak memory is the compressed model plus one layer."""
    _, path = _dense_24(tmp_path)
    real, previous, calls = ct._compress_dense, [], []

    def watched(weight, *args):
        assert not previous or previous[-1]() is None, "the previous dense weight is still alive"
        out = real(weight, *args)
        previous.append(weakref.ref(weight))
        calls.append(1)
        return out

    monkeypatch.setattr(ct, "_compress_dense", watched)
    loaded = from_pretrained(path)
    assert len(calls) == 14 and previous[-1]() is None
    assert not [n for n, _ in loaded.named_parameters() if n.endswith("_proj.weight")]


@pytest.mark.parametrize(
    "change,pattern",
    [
        (lambda sc: sc.update(sparsity_structure="4:8"), "sparsity_structure is '4:8', not '2:4'"),
        (lambda sc: sc.pop("targets"), "sparsity_config.targets must be a list"),
        (lambda sc: sc.update(targets=["re:("]), r"bad pattern 're:\('"),
        (lambda sc: sc.update(targets=["Conv2d"]), "targets no nn.Linear"),
    ],
)
def test_bad_sparsity_configs_are_refused(tmp_path, change, pattern):
    sc = dict(SPARSITY)
    change(sc)
    _, path = _dense_24(tmp_path, sparsity=sc)
    with pytest.raises(CheckpointError, match=pattern):
        from_pretrained(path)


def test_quantized_2_4_is_refused(tmp_path):
    _, path = _dense_24(tmp_path)
    edit_config(path, lambda c: c["quantization_config"].update(config_groups={"group_0": {"targets": ["Linear"]}}))
    with pytest.raises(CheckpointError, match="combined with quantization"):
        from_pretrained(path)


@pytest.mark.parametrize(
    "fmt",
    [
        "evil_ct_format.Compressor",
        "evil_ct_format",
        "__import__('evil_ct_format')",
        "__import__('os').system('touch {marker}')",
        {"__class__": "evil_ct_format.Compressor"},
    ],
)
def test_hostile_format_is_refused_and_nothing_runs(tmp_path, monkeypatch, fmt):
    """A config names a format; that name is compared, never imported or evaluated."""
    marker = tmp_path / "MARKER"
    (tmp_path / "evil_ct_format.py").write_text(
        f"open({str(marker)!r}, 'w').write('imported')\nclass Compressor: pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    if isinstance(fmt, str):
        fmt = fmt.format(marker=marker)
    _, path = _dense_24(tmp_path)
    for key in ("quantization_config", "compression_config"):
        edit_config(path, lambda c: c.pop("quantization_config", None) or c.pop("compression_config", None))
        edit_config(
            path,
            lambda c, key=key: c.update(
                {key: {"quant_method": "compressed-tensors", "sparsity_config": dict(SPARSITY, format=fmt)}}
            ),
        )
        with pytest.raises(
            CheckpointError, match=rf"{key}\.sparsity_config\.format is .*reads sparse-24-bitmask and dense only"
        ):
            from_pretrained(path)
        with pytest.raises(CheckpointError, match="sparsity_config.format is"):
            checkpoint_info(path)
    assert not marker.exists() and "evil_ct_format" not in sys.modules


def test_compressed_tensors_config_without_sparsity_is_refused(tmp_path):
    _, path = _dense_24(tmp_path)
    edit_config(path, lambda c: c["quantization_config"].pop("sparsity_config"))
    with pytest.raises(CheckpointError, match="without a sparsity_config; only 2:4 sparse checkpoints"):
        from_pretrained(path)
    assert json.loads((path / "config.json").read_text())["quantization_config"]["quant_method"] == "compressed-tensors"
