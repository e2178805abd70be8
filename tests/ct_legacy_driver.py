"""Run by tests/test_compressed_tensors.py in a subprocess whose PYTHONPATH puts a compressed-tensors
release that still has the sparse-24-bitmask compressor (<= 0.14) first. Uses only that library's
own API, exactly as llm-compressor does when it saves and as the library does when it loads.

    write DENSE_DIR OUT_DIR   compress a dense (2:4-pruned) model into a sparse-24-bitmask checkpoint
    read CKPT_DIR OUT_FILE    decompress a sparse-24-bitmask checkpoint, save its dense state dict
"""

import os
import sys

from compressed_tensors.compressors import ModelCompressor, Sparse24BitMaskCompressor
from compressed_tensors.config import Sparse24BitMaskConfig
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM


def write(dense_dir: str, out_dir: str) -> None:
    model = AutoModelForCausalLM.from_pretrained(dense_dir)
    compressor = ModelCompressor(sparsity_config=Sparse24BitMaskConfig(targets=["Linear"], ignore=["lm_head"]))
    state = compressor.compress(model)
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # as transformers' save_pretrained drops tied weights
    os.makedirs(out_dir, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, f"{out_dir}/model.safetensors", metadata={"format": "pt"})
    model.config.save_pretrained(out_dir)
    compressor.update_config(out_dir)


def read(ckpt_dir: str, out_file: str) -> None:
    compressor = ModelCompressor.from_pretrained(ckpt_dir)
    assert isinstance(compressor.sparsity_compressor, Sparse24BitMaskCompressor), compressor.sparsity_compressor
    config = AutoConfig.from_pretrained(ckpt_dir)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    compressor.decompress(ckpt_dir, model)
    model.tie_weights()
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}, out_file)


if __name__ == "__main__":
    {"write": write, "read": read}[sys.argv[1]](sys.argv[2], sys.argv[3])
    print("ok")
