"""``checkpoint_info``: what a checkpoint holds, from ``config.json`` and safetensors headers only.

No tensor data is read (the model skeleton is built on the meta device only to tell linear
layers from other weights), so it is instant even for checkpoints larger than memory.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from sparseflow.convert import checkpoint as ck
from sparseflow.convert.shards import read_headers

__all__ = ["TOKENIZER_FILES", "CheckpointInfo", "checkpoint_info"]

KINDS = ("2:4 linears", "dense linears", "other")
# Any of these makes AutoTokenizer.from_pretrained(directory) find a tokenizer.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
)


@dataclass
class CheckpointInfo:
    path: Path
    format: str  # "sparseflow checkpoint v1", "compressed-tensors sparse-24-bitmask" or "... dense ..."
    architecture: str
    dtype: str | None
    sparse_layers: int = 0
    dense_linears: list[str] = field(default_factory=list)
    stored: dict[str, int] = field(default_factory=dict)  # tensor bytes per kind (KINDS)
    dense_equivalent: dict[str, int] = field(default_factory=dict)  # the same tensors stored dense
    disk_bytes: int = 0  # every file in the directory (tokenizer included)
    tokenizer: list[str] = field(default_factory=list)  # its tokenizer files (none: generate cannot run)

    def lines(self) -> list[str]:
        """Human-readable report (``sparseflow info``)."""
        out = [
            f"checkpoint:    {self.path}",
            f"format:        {self.format}",
            f"architecture:  {self.architecture} ({self.dtype or 'dtype unknown'})",
            f"linears:       {self.sparse_layers} 2:4, {len(self.dense_linears)} dense"
            + (
                f" ({', '.join(self.dense_linears[:4])}{', ...' if len(self.dense_linears) > 4 else ''})"
                if self.dense_linears
                else ""
            ),
        ]
        for kind in KINDS:
            if self.stored.get(kind):
                dense = self.dense_equivalent[kind]
                out.append(
                    f"  {kind:<14} {mb(self.stored[kind]):>11}   dense {mb(dense):>11}   {self.stored[kind] / dense:.4f}x"
                )
        total, dense = sum(self.stored.values()), sum(self.dense_equivalent.values())
        if total:
            out.append(f"  {'weights':<14} {mb(total):>11}   dense {mb(dense):>11}   {total / dense:.4f}x")
        out.append(f"on disk:       {mb(self.disk_bytes)} (all files)")
        out.append(
            f"tokenizer:     {', '.join(self.tokenizer)}"
            if self.tokenizer
            else "tokenizer:     none (`sparseflow generate` needs one: save with tokenizer=, or copy its files here)"
        )
        return out


def mb(n: int) -> str:
    return f"{n / 1e6:,.2f} MB"


def checkpoint_info(path: str | os.PathLike) -> CheckpointInfo:
    """Layers, sizes and format of a checkpoint directory written by ``save_pretrained``.

    Raises ``FileNotFoundError`` / :class:`~sparseflow.CheckpointError` like ``from_pretrained``.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint directory at {path}")
    raw = ck._read_config_json(path)
    disk = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    tokenizer = [f for f in TOKENIZER_FILES if (path / f).is_file()]
    arch = ", ".join(raw.get("architectures") or [raw.get("model_type", "?")])
    section = raw.get(ck.SECTION)
    if section is None:
        from sparseflow.convert import compressed_tensors as ct

        fmt = ct.sparsity_format(raw, path / "config.json")
        if fmt is None:
            raise ck.CheckpointError(f"{path / 'config.json'}: no {ck.SECTION!r} section: not a sparseflow checkpoint")
        what = f"compressed-tensors {fmt}" + (" (2:4 weights stored dense)" if fmt == ct.DENSE else "")
        return CheckpointInfo(path, what, arch, raw.get("dtype"), disk_bytes=disk, tokenizer=tokenizer)
    version = section.get("format_version") if isinstance(section, dict) else None
    section = ck._check_section(section, path / "config.json")
    infos = read_headers(path)
    skeleton = ck.build_skeleton(path, section["sparse_layers"], section["dtype"], None, {})
    sparse = set(section["sparse_layers"])
    dense = [n for n, m in skeleton.named_modules() if isinstance(m, nn.Linear) and n not in sparse]
    stored = dict.fromkeys(KINDS, 0)
    equivalent = dict.fromkeys(KINDS, 0)
    for name, info in infos.items():
        owner, _, attr = name.rpartition(".")
        kind = KINDS[0] if owner in sparse else KINDS[1] if owner in dense else KINDS[2]
        stored[kind] += info.nbytes
        if kind == KINDS[0] and attr == "weight_values":  # N x K/2 values -> N x K dense
            equivalent[kind] += 2 * info.nbytes
        elif not (kind == KINDS[0] and attr == "weight_meta"):
            equivalent[kind] += info.nbytes
    dtype = section["dtype"]
    return CheckpointInfo(
        path,
        f"sparseflow checkpoint v{version}",
        arch,
        None if dtype is None else str(dtype).removeprefix("torch."),
        len(sparse),
        dense,
        stored,
        equivalent,
        disk,
        tokenizer,
    )


def to_json(info: CheckpointInfo) -> str:
    return json.dumps({**info.__dict__, "path": str(info.path)}, indent=1)
