"""save_pretrained / from_pretrained: round trips, sharding, atomicity, and every damaged checkpoint."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers as T
from safetensors import safe_open

from sparseflow.convert import shards
from sparseflow.convert.checkpoint import CheckpointError, from_pretrained, save_pretrained
from sparseflow.nn import SparseLinear
from tests.ckpt_helpers import edit_config, inputs, outputs, read_file, rewrite, sparse_names, sparsify, tiny

REPO = Path(__file__).resolve().parents[1]
ARCHS = ["llama", "qwen2", "opt", "bert"]


@pytest.fixture(scope="module")
def llama():
    return sparsify(tiny("llama"))


@pytest.fixture
def ckpt(tmp_path, llama):
    path = tmp_path / "ckpt"
    save_pretrained(llama, path)
    return path


def _same_model(a, b):
    x = inputs()
    assert torch.equal(outputs(a, x), outputs(b, x))
    assert sparse_names(a) == sparse_names(b)
    assert a.state_dict().keys() == b.state_dict().keys()
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]) and v.dtype == b.state_dict()[k].dtype, k


# ------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip_identical_logits(tmp_path, arch):
    model = sparsify(tiny(arch))
    save_pretrained(model, tmp_path / arch)
    loaded = from_pretrained(tmp_path / arch)
    assert type(loaded) is type(model) and not loaded.training
    _same_model(model, loaded)
    for name, t in list(loaded.named_parameters()) + list(loaded.named_buffers()):
        assert t.device.type == "cpu", name
    # The tied head is one tensor again, as in memory.
    out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    if out_emb.weight is in_emb.weight:
        assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_round_trip_half_dtypes_and_cast_on_load(tmp_path, dtype):
    model = sparsify(tiny("llama", dtype=dtype))
    save_pretrained(model, tmp_path / "m")
    _same_model(model, from_pretrained(tmp_path / "m"))
    wide = from_pretrained(tmp_path / "m", dtype=torch.float32)
    assert wide.model.layers[0].mlp.up_proj.weight_values.dtype == torch.float32
    assert wide.model.layers[0].mlp.up_proj.weight_meta.dtype == torch.uint8
    assert wide.config.dtype == torch.float32
    x = inputs()
    assert torch.allclose(outputs(wide, x), outputs(model, x).float(), atol=0.1, rtol=0.05)


def test_non_persistent_buffers_recomputed(tmp_path, llama):
    save_pretrained(llama, tmp_path / "m")
    loaded = from_pretrained(tmp_path / "m")
    assert "model.rotary_emb.inv_freq" not in read_file(tmp_path / "m" / "model.safetensors")[0]
    assert torch.equal(loaded.model.rotary_emb.inv_freq, llama.model.rotary_emb.inv_freq)
    bert = sparsify(tiny("bert"))
    save_pretrained(bert, tmp_path / "b")
    loaded = from_pretrained(tmp_path / "b")
    assert torch.equal(loaded.bert.embeddings.position_ids, bert.bert.embeddings.position_ids)


def test_layout_config_and_no_pickle(ckpt, llama):
    files = sorted(p.name for p in ckpt.iterdir())
    assert files == ["config.json", "generation_config.json", "model.safetensors"]
    cfg = json.loads((ckpt / "config.json").read_text())
    section = cfg["sparseflow"]
    assert section["format_version"] == 1
    assert section["sparse_layers"] == sparse_names(llama) and len(section["sparse_layers"]) == 14
    assert section["dtype"] == "float32"
    assert section["tied_weights"] == {"lm_head.weight": "model.embed_tokens.weight"}
    assert cfg["quantization_config"]["quant_method"] == "sparseflow"
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    stored, metadata = read_file(ckpt / "model.safetensors")
    assert metadata["format"] == "pt"
    assert "lm_head.weight" not in stored  # tied: stored once
    assert set(stored) == set(llama.state_dict()) - {"lm_head.weight"}
    up = "model.layers.0.mlp.up_proj"
    assert stored[f"{up}.weight_values"].shape == (132, 32) and stored[f"{up}.weight_meta"].dtype == torch.uint8


def test_stored_2_4_layers_at_most_0_57_of_dense(tmp_path):
    model = sparsify(tiny("llama", dtype=torch.float16))
    save_pretrained(model, tmp_path / "m")
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        for layer in sparse_names(model):
            mod = model.get_submodule(layer)
            stored = sum(
                f.get_slice(f"{layer}.{part}").get_shape()[0] * f.get_slice(f"{layer}.{part}").get_shape()[1] * size
                for part, size in (("weight_values", 2), ("weight_meta", 1))
            )
            assert stored <= 0.57 * mod.out_features * mod.in_features * 2, layer
    # Whole files: a model that is mostly 2:4 linears, against transformers' dense save of it.
    big = tiny("qwen2", dtype=torch.float16)
    big.save_pretrained(tmp_path / "dense")
    save_pretrained(sparsify(big), tmp_path / "sparse")
    ratio = (tmp_path / "sparse/model.safetensors").stat().st_size / (
        tmp_path / "dense/model.safetensors"
    ).stat().st_size
    assert ratio < 0.8  # embeddings and head stay dense; the 2:4 part alone is checked above


def test_partially_sparse_and_lm_head_sparse(tmp_path):
    model = sparsify(tiny("llama"), keep=lambda n: "self_attn" in n)
    head = model.lm_head  # tied head made sparse too: it stops being tied, and must load as such
    model.lm_head = SparseLinear.from_dense(head, prune=True)
    save_pretrained(model, tmp_path / "m")
    loaded = from_pretrained(tmp_path / "m")
    assert isinstance(loaded.lm_head, SparseLinear) and isinstance(
        loaded.model.layers[0].self_attn.q_proj, torch.nn.Linear
    )
    _same_model(model, loaded)


def test_from_pretrained_device_maps(ckpt, llama):
    maps = ["cpu", {"": "cpu"}, {"model": "cpu", "lm_head": "cpu"}]
    if not torch.cuda.is_available():  # where there is a GPU "auto" means the GPU: next test
        maps.append("auto")
    for device_map in maps:
        loaded = from_pretrained(ckpt, device_map=device_map)
        _same_model(llama, loaded)
        assert loaded.hf_device_map
    with pytest.raises(NotImplementedError, match="disk"):
        from_pretrained(ckpt, device_map={"": "disk"})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_from_pretrained_device_map_auto_on_gpu(ckpt, llama):
    loaded = from_pretrained(ckpt, device_map="auto")
    assert loaded.hf_device_map and all(p.is_cuda for p in loaded.parameters())
    state = loaded.state_dict()
    for k, v in llama.state_dict().items():
        assert torch.equal(v, state[k].cpu()), k


def _param_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
@pytest.mark.parametrize("how", ["dict", "sequential", "auto"])
def test_from_pretrained_across_two_gpus(tmp_path, how):
    """A checkpoint split over two GPUs (accelerate's hooks move activations between them) gives
    the logits and greedy tokens of the same checkpoint on one GPU; the 2:4 kernels run on each."""
    model = sparsify(tiny("llama", dtype=torch.float16))
    save_pretrained(model, tmp_path / "m")
    one = from_pretrained(tmp_path / "m", device_map="cuda:0")
    if how == "dict":
        layers = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": 1}
        # lm_head is tied to embed_tokens: it stays with it
        two = from_pretrained(tmp_path / "m", device_map={**layers, "model.norm": 1, "lm_head": 0})
    elif how == "sequential":  # cap GPU 0 below the model size so the rest goes to GPU 1
        cap = _param_bytes(model) * 3 // 4
        two = from_pretrained(tmp_path / "m", device_map="sequential", max_memory={0: cap, 1: 1 << 30})
    else:
        two = from_pretrained(tmp_path / "m", device_map="auto")
    devices = {str(t.device) for t in two.parameters()}
    if how != "auto":  # "auto" balances by size and may keep a model this small on one GPU
        assert devices == {"cuda:0", "cuda:1"}, two.hf_device_map
    x = inputs().to("cuda:0")
    with torch.no_grad():
        a, b = one(x).logits.float(), two(x).logits.float()
    assert b.device.type == "cuda" and torch.isfinite(b).all()
    assert (a - b.to(a.device)).abs().max() <= 2e-3 * a.abs().max(), how
    g1 = one.generate(x[:1, :4], max_new_tokens=6, do_sample=False)
    g2 = two.generate(x[:1, :4], max_new_tokens=6, do_sample=False)
    assert g1.shape == g2.shape and g1.shape[1] == 10


def test_transformers_auto_model_loads_our_checkpoint(ckpt, llama):
    loaded = T.AutoModelForCausalLM.from_pretrained(ckpt)
    assert isinstance(loaded.model.layers[1].mlp.down_proj, SparseLinear)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    _same_model(llama, loaded)


def test_transformers_auto_model_refuses_missing_tensors(ckpt, llama):
    for name in ("model.layers.0.mlp.up_proj.weight_values", "model.norm.weight"):
        save_pretrained(llama, ckpt, overwrite=True)
        rewrite(ckpt / "model.safetensors", lambda t, name=name: t.pop(name))
        with pytest.raises(CheckpointError, match=name):
            T.AutoModelForCausalLM.from_pretrained(ckpt)


# ----------------------------------------------------------------------------------------- shards


def test_sharding_index_and_round_trip(tmp_path, llama):
    save_pretrained(llama, tmp_path / "m", max_shard_size="40KB")
    files = sorted(p.name for p in (tmp_path / "m").glob("*.safetensors"))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((tmp_path / "m" / shards.INDEX_NAME).read_text())
    assert sorted(set(index["weight_map"].values())) == files
    assert set(index["weight_map"]) == set(llama.state_dict()) - {"lm_head.weight"}
    total = 0
    for f in files:
        tensors, _ = read_file(tmp_path / "m" / f)
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        assert size <= 40_000 or len(tensors) == 1
        total += size
    assert index["metadata"]["total_size"] == total
    _same_model(llama, from_pretrained(tmp_path / "m"))
    _same_model(llama, T.AutoModelForCausalLM.from_pretrained(tmp_path / "m"))


def test_parse_size():
    assert shards.parse_size("5GB") == 5 * 10**9 and shards.parse_size("2MiB") == 2 * 2**20
    assert shards.parse_size(123) == 123
    with pytest.raises(ValueError, match="max_shard_size"):
        shards.parse_size("lots")


# ----------------------------------------------------------------------------------------- atomic


def test_resave_replaces_weights_keeps_foreign_files(tmp_path, llama):
    path = tmp_path / "m"
    save_pretrained(llama, path, max_shard_size="40KB")
    (path / "README.md").write_text("mine")
    (path / "tokenizer.json").write_text("{}")
    before = (path / "tokenizer.json").stat().st_ino
    other = sparsify(tiny("llama", seed=5))
    save_pretrained(other, path, overwrite=True)  # unsharded now: stale shards and index must go
    names = sorted(p.name for p in path.iterdir())
    assert names == ["README.md", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json"]
    assert (path / "README.md").read_text() == "mine" and (path / "tokenizer.json").stat().st_ino == before
    _same_model(other, from_pretrained(path))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp or backup dirs left


def test_save_over_the_checkpoint_it_was_loaded_from(ckpt, llama):
    loaded = from_pretrained(ckpt)  # CPU tensors memory-map the files being replaced
    save_pretrained(loaded, ckpt, max_shard_size="40KB", overwrite=True)
    _same_model(llama, loaded)
    _same_model(llama, from_pretrained(ckpt))


def test_failure_midway_leaves_old_checkpoint(ckpt, llama, monkeypatch):
    calls = []
    real = shards.save_file

    def failing(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        real(tensors, path, metadata=metadata)

    monkeypatch.setattr(shards, "save_file", failing)
    with pytest.raises(OSError, match="simulated"):
        save_pretrained(sparsify(tiny("llama", seed=9)), ckpt, max_shard_size="40KB", overwrite=True)
    assert len(calls) == 2
    assert sorted(p.name for p in ckpt.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    _same_model(llama, from_pretrained(ckpt))
    assert not [p for p in ckpt.parent.iterdir() if p.name.startswith(".")]


def test_save_refuses_an_existing_checkpoint_unless_overwrite(tmp_path, llama):
    path = tmp_path / "m"
    save_pretrained(llama, path)
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    other = sparsify(tiny("llama", seed=5))
    for fmt in ("sparseflow", "compressed-tensors"):
        with pytest.raises(FileExistsError, match=r"already holds a checkpoint \(config\.json\); pass overwrite=True"):
            save_pretrained(other, path, format=fmt)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before  # nothing lost
    save_pretrained(other, path, overwrite=True)
    _same_model(other, from_pretrained(path))
    # A directory without a checkpoint in it (a README, a tokenizer) is no checkpoint to lose.
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "README.md").write_text("mine")
    save_pretrained(llama, plain)
    assert (plain / "README.md").read_text() == "mine"
    _same_model(llama, from_pretrained(plain))


def test_save_accepts_the_gguf_config_of_a_dequantized_model(tmp_path, llama):
    """transformers leaves a `gguf` quantization_config on models it dequantized from a .gguf file."""
    model = sparsify(tiny("llama"))
    # a GgufConfig object where transformers has the class (5.17 on); the plain dict form follows
    gguf = getattr(T, "GgufConfig", None)
    model.config.quantization_config = gguf(dequantize=True) if gguf else {"quant_method": "gguf"}
    save_pretrained(model, tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["quantization_config"]["quant_method"] == "sparseflow"
    _same_model(model, from_pretrained(tmp_path / "m"))
    model.config.quantization_config = {"quant_method": "gguf"}  # as a plain dict too
    save_pretrained(model, tmp_path / "ct", format="compressed-tensors")
    assert json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]["quant_method"] == (
        "compressed-tensors"
    )
    # Weights still packed in GGUF blocks, or another quantization: refused, nothing written.
    model.model.norm.weight = torch.nn.Parameter(torch.zeros(64, dtype=torch.uint8), requires_grad=False)
    with pytest.raises(ValueError, match="GGUF-packed weights.*'model.norm.weight'.*dequantize=True"):
        save_pretrained(model, tmp_path / "packed")
    model.config.quantization_config = {"quant_method": "bitsandbytes"}
    with pytest.raises(ValueError, match="already carries a 'bitsandbytes' quantization_config"):
        save_pretrained(model, tmp_path / "bnb")
    assert not (tmp_path / "packed").exists() and not (tmp_path / "bnb").exists()


_KILL_SCRIPT = """
import os, signal, sys
sys.path.insert(0, {repo!r})
import sparseflow.convert.shards as shards
from sparseflow.convert.checkpoint import save_pretrained
from tests.ckpt_helpers import sparsify, tiny
real, n = shards.save_file, []
def dying(tensors, path, metadata=None):
    n.append(path)
    real(tensors, path, metadata=metadata)
    if len(n) == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # killed mid-save, after two shards hit the disk
shards.save_file = dying
save_pretrained(sparsify(tiny("llama", seed=9)), sys.argv[1], max_shard_size="40KB", overwrite=True)
"""


@pytest.mark.parametrize("existing", [True, False])
def test_killed_midway_leaves_old_or_nothing(tmp_path, llama, existing):
    path = tmp_path / "m"
    if existing:
        save_pretrained(llama, path)
    script = textwrap.dedent(_KILL_SCRIPT.format(repo=str(REPO)))
    proc = subprocess.run(
        [sys.executable, "-c", script, str(path)], check=False, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    if existing:
        assert sorted(p.name for p in path.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
        _same_model(llama, from_pretrained(path))
    else:
        assert not path.exists()
        with pytest.raises(FileNotFoundError, match="interrupted save"):
            from_pretrained(path)
    # The next save goes through despite the leftover temp directory.
    save_pretrained(llama, path, overwrite=True)
    _same_model(llama, from_pretrained(path))


# ------------------------------------------------------------------------------ damaged checkpoints

UP = "model.layers.0.mlp.up_proj"


def test_truncated_file(ckpt):
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated or corrupt"):
        from_pretrained(ckpt)


def test_garbage_header(ckpt):
    f = ckpt / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:40] = b"\xff" * 32
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated or corrupt"):
        from_pretrained(ckpt)


def test_damaged_bytes_caught_by_checksum(ckpt):
    rewrite(ckpt / "model.safetensors", lambda t: t[f"{UP}.weight_values"].mul_(1.5), fix_crc=False)
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor '{UP}.weight_values' is corrupt"):
        from_pretrained(ckpt)
    _ = from_pretrained(ckpt, verify_checksums=False)  # the escape hatch loads it (values are valid 2:4)


def test_missing_tensor_is_an_error_not_a_reinit(ckpt, llama):
    for name in (f"{UP}.weight_meta", "model.norm.weight"):
        save_pretrained(llama, ckpt, overwrite=True)
        rewrite(ckpt / "model.safetensors", lambda t, name=name: t.pop(name))
        with pytest.raises(CheckpointError, match=f"missing tensor '{name}'.*Refusing to initialise it at random"):
            from_pretrained(ckpt)


def test_extra_tensor(ckpt):
    rewrite(ckpt / "model.safetensors", lambda t: t.update({"model.layers.0.mlp.extra": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: extra tensor 'model\.layers\.0\.mlp\.extra'"):
        from_pretrained(ckpt)


@pytest.mark.parametrize(
    "name,new,pattern",
    [
        (f"{UP}.weight_values", torch.zeros(132, 16), r"has shape \[132, 16\] but the config implies \[132, 32\]"),
        (f"{UP}.weight_meta", torch.zeros(132, 8, dtype=torch.int8), "has dtype int8, the model needs uint8"),
        (
            f"{UP}.weight_values",
            torch.zeros(132, 32, dtype=torch.float16),
            "has dtype float16 but config.json records float32",
        ),
        ("model.norm.weight", torch.zeros(64, dtype=torch.int32), "has dtype int32; the model needs a floating dtype"),
        ("model.embed_tokens.weight", torch.zeros(63, 64), r"has shape \[63, 64\] but the config implies \[64, 64\]"),
    ],
)
def test_shape_or_dtype_disagrees_with_config(ckpt, name, new, pattern):
    rewrite(ckpt / "model.safetensors", lambda t: t.__setitem__(name, new))
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor '{name}' {pattern}"):
        from_pretrained(ckpt)


@pytest.mark.parametrize("bad", [0x00, 0x07, 0x0F, 0x30, 0xC5])
def test_out_of_range_indices(ckpt, bad):
    def corrupt(t):
        t[f"{UP}.weight_meta"][5, 2] = bad

    rewrite(ckpt / "model.safetensors", corrupt)  # checksums recomputed: only the 2:4 check can catch it
    with pytest.raises(
        CheckpointError, match=rf"tensor '{UP}.weight_meta': out-of-range 2:4 indices.*row 5, group [45]"
    ):
        from_pretrained(ckpt)


def test_odd_group_padding_nibble_is_ignored(ckpt, llama):
    down = "model.layers.0.mlp.down_proj"  # K=132: 33 groups, the last byte's high nibble is padding
    rewrite(ckpt / "model.safetensors", lambda t: t[f"{down}.weight_meta"][:, -1].__ior__(0xF0))
    loaded = from_pretrained(ckpt)
    assert torch.equal(loaded.get_submodule(down).dense_weight(), llama.get_submodule(down).dense_weight())
    assert torch.equal(outputs(loaded, inputs()), outputs(llama, inputs()))


def test_sharded_damage_missing_shard_and_bad_index(tmp_path, llama):
    path = tmp_path / "m"
    save_pretrained(llama, path, max_shard_size="40KB")
    index_path = path / shards.INDEX_NAME
    index = json.loads(index_path.read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (path / victim).rename(tmp_path / "away")
    with pytest.raises(CheckpointError, match=f"{victim}: shard file is missing"):
        from_pretrained(path)
    (tmp_path / "away").rename(path / victim)
    moved = next(k for k, v in index["weight_map"].items() if v == victim)
    first = min(set(index["weight_map"].values()))
    index["weight_map"][moved] = first
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"{first}: missing tensor '{moved}' \({shards.INDEX_NAME} says"):
        from_pretrained(path)
    index["weight_map"][moved] = victim
    del index["weight_map"][next(k for k, v in index["weight_map"].items() if v == first)]
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"{first}: extra tensor '.*' that {shards.INDEX_NAME} does not list"):
        from_pretrained(path)
    index_path.write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt shard index"):
        from_pretrained(path)


def test_bad_config(ckpt):
    edit_config(ckpt, lambda c: c["sparseflow"].update(format_version=2))
    with pytest.raises(CheckpointError, match="upgrade sparseflow"):
        from_pretrained(ckpt)
    edit_config(ckpt, lambda c: c["sparseflow"].update(format_version=1, sparse_layers=["model.layers.0.mlp.act_fn"]))
    with pytest.raises(CheckpointError, match="'model.layers.0.mlp.act_fn' is a SiLU.*, not an nn.Linear"):
        from_pretrained(ckpt)
    edit_config(ckpt, lambda c: c["sparseflow"].update(sparse_layers=["model.nowhere"]))
    with pytest.raises(CheckpointError, match="sparse layer 'model.nowhere' does not exist"):
        from_pretrained(ckpt)
    edit_config(ckpt, lambda c: c["sparseflow"].pop("sparse_layers"))
    with pytest.raises(CheckpointError, match="sparse_layers must be a list"):
        from_pretrained(ckpt)
    edit_config(ckpt, lambda c: c.pop("sparseflow"))
    with pytest.raises(CheckpointError, match="not a sparseflow checkpoint"):
        from_pretrained(ckpt)
    (ckpt / "config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match=r"config\.json: corrupt JSON"):
        from_pretrained(ckpt)
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        from_pretrained(ckpt.parent / "nothing")


def test_save_rejects_non_hf_models_and_meta_tensors(tmp_path):
    with pytest.raises(TypeError, match="PreTrainedModel"):
        save_pretrained(SparseLinear(8, 4), tmp_path / "x")
    with torch.device("meta"):
        model = T.LlamaForCausalLM(tiny("llama").config)
    with pytest.raises(ValueError, match="meta device"):
        save_pretrained(model, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_directory_permissions_are_ordinary(ckpt):
    assert oct(ckpt.stat().st_mode & 0o777) == oct(0o777 & ~_umask())


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


# ----------------------------------------------------------------------------------------- memory


def test_peak_load_memory_is_the_compressed_size():
    """Loading in a fresh process grows its peak RSS by about the checkpoint's size, far below dense."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import load_memory
    finally:
        sys.path.pop(0)
    r = load_memory.main(["--hidden", "1024", "--intermediate", "4096", "--layers", "4"])
    assert r["checkpoint_file_bytes"] <= 0.57 * r["dense_linear_bytes"] + 2**20  # + dense embeddings and norms
    assert r["host_peak_growth_bytes"] <= r["checkpoint_file_bytes"] + 24 * 2**20  # imports excluded; ~10 MB of objects
    assert r["host_peak_growth_bytes"] < 0.8 * r["dense_linear_bytes"]


def test_round_trip_of_a_model_from_sparsify(tmp_path):
    """Integration with the walker: whatever ``sparsify`` produces saves and loads back identically."""
    try:
        from sparseflow.convert import sparsify as walk
    except ImportError:
        pytest.skip("sparseflow.convert.sparsify is not available")
    model = tiny("llama")
    walk(model, fallback="never")  # tiny layers would all stay dense under the default speed rule
    assert sparse_names(model)
    save_pretrained(model, tmp_path / "m")
    _same_model(model, from_pretrained(tmp_path / "m"))
