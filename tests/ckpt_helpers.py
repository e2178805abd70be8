"""Tiny models, sparsification and checkpoint surgery shared by the checkpoint tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers as T
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn

from sparseflow.convert.shards import CRC_KEY
from sparseflow.convert.validation import crc32_of
from sparseflow.nn import SparseLinear

WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "sat",
    "on",
    "mat",
    "ran",
    "fast",
    "slow",
    "big",
    "small",
    "red",
    "blue",
    "green",
    "house",
    "tree",
]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "</s>"]
VOCAB = 64


def tiny(arch: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    """A small random model of a given architecture (every Linear has in_features % 4 == 0)."""
    torch.manual_seed(seed)
    common = {
        "vocab_size": VOCAB,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "pad_token_id": 0,
    }
    if arch == "llama":  # tied LM head; intermediate 132 -> down_proj has an odd number of 2:4 groups
        cfg = T.LlamaConfig(**common, intermediate_size=132, num_key_value_heads=2, tie_word_embeddings=True)
        model = T.LlamaForCausalLM._from_config(cfg, dtype=dtype)
    elif arch == "qwen2":  # q/k/v biases, untied head
        cfg = T.Qwen2Config(**common, intermediate_size=128, num_key_value_heads=2, tie_word_embeddings=False)
        model = T.Qwen2ForCausalLM._from_config(cfg, dtype=dtype)
    elif arch == "opt":  # biases everywhere, learned positions, tied head
        cfg = T.OPTConfig(**common, ffn_dim=128, word_embed_proj_dim=64, max_position_embeddings=64)
        model = T.OPTForCausalLM._from_config(cfg, dtype=dtype)
    elif arch == "bert":  # masked LM: tied decoder weight and bias, int64 buffers
        cfg = T.BertConfig(**common, intermediate_size=128, max_position_embeddings=64)
        model = T.BertForMaskedLM._from_config(cfg, dtype=dtype)
    elif arch == "bert-base":  # feature extraction
        cfg = T.BertConfig(**common, intermediate_size=128, max_position_embeddings=64)
        model = T.BertModel._from_config(cfg, dtype=dtype)
    else:
        raise ValueError(arch)
    with torch.no_grad():  # non-trivial norms and biases, so a mix-up would show in the logits
        for name, p in model.named_parameters():
            if "norm" in name.lower() or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()  # built in dtype as transformers loads it (a later .to() would also cast rotary buffers)


def sparsify(model: nn.Module, keep=lambda name: False) -> nn.Module:
    """Replace every nn.Linear except the LM heads (and those ``keep`` names) by a pruned SparseLinear."""
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear) and not keep(name) and not name.endswith(("lm_head", "decoder")):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, SparseLinear.from_dense(mod, prune=True))
    return model


def sparse_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, SparseLinear)]


def tokenizer(directory: Path | None = None) -> T.PreTrainedTokenizerFast:
    vocab = {t: i for i, t in enumerate(SPECIAL + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = T.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="[PAD]",
        eos_token="</s>",
        mask_token="[MASK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
    )
    if directory is not None:
        tok.save_pretrained(directory)
    return tok


def inputs(seed: int = 1, batch: int = 2, length: int = 9) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(len(SPECIAL), len(SPECIAL) + len(WORDS), (batch, length), generator=g)


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=x)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def read_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k).clone() for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118 - not iterable


def rewrite(path: Path, mutate, fix_crc: bool = True) -> None:
    """Load a shard, let ``mutate(tensors)`` change it, write it back (checksums recomputed
    unless ``fix_crc=False``, to make damage that only the checksum would catch)."""
    tensors, metadata = read_file(path)
    mutate(tensors)
    if fix_crc:
        metadata[CRC_KEY] = json.dumps({k: crc32_of(t.contiguous()) for k, t in tensors.items()})
    save_file({k: t.contiguous() for k, t in tensors.items()}, str(path), metadata=metadata)


def edit_config(directory: Path, mutate) -> None:
    path = directory / "config.json"
    cfg = json.loads(path.read_text())
    mutate(cfg)
    path.write_text(json.dumps(cfg))
