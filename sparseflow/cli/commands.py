"""``sparseflow sparsify | generate | info | bench``: thin layers over the package API."""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Any

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def pick_device(name: str | None) -> torch.device:
    """``--device`` (default: the GPU when there is one); a missing GPU is a clear error, not a crash later."""
    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU is available here")
    return device


def pick_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """``--dtype`` (default: float32 on the CPU, where 2:4 runs a float32 reference path; bfloat16 on GPUs)."""
    return DTYPES[name] if name else (torch.float32 if device.type == "cpu" else torch.bfloat16)


def check_source(src: str) -> Path:
    """The SRC of ``sparsify``: a .gguf file or a model directory whose config.json parses;
    checked before anything else, so a typo is reported first and nothing is loaded."""
    path = Path(src)
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"{src}: no such .gguf file")
        return path
    from sparseflow.convert.validation import CheckpointError

    config = path / "config.json"
    if not config.is_file():
        what = "no config.json in the directory" if path.is_dir() else "no such file or directory"
        raise FileNotFoundError(f"{src}: {what}; SRC must be a model directory (with config.json) or a .gguf file")
    try:
        raw = json.loads(config.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{config}: corrupt JSON ({err})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{config}: expected a JSON object")
    if "sparseflow" in raw:
        raise ValueError(f"{src} is already a sparseflow 2:4 checkpoint")
    return path


def load_source(src: str, dtype: torch.dtype, device: torch.device) -> tuple[Any, Any]:
    """(model, tokenizer or None) from a Hugging Face model directory or a .gguf file."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    from sparseflow.data import load_gguf

    path = check_source(src)
    if path.suffix.lower() == ".gguf":
        return load_gguf(path, dtype, device)
    config = AutoConfig.from_pretrained(path)
    cls = AutoModelForCausalLM if type(config) in AutoModelForCausalLM._model_mapping else AutoModel
    model = cls.from_pretrained(path, dtype=dtype).to(device).eval()
    return model, AutoTokenizer.from_pretrained(path) if tokenizer_files(path) else None


def cmd_sparsify(args: argparse.Namespace) -> None:
    from sparseflow.convert import report, sparsify, text_windows
    from sparseflow.convert.atomic import refuse_existing
    from sparseflow.convert.checkpoint import save_pretrained
    from sparseflow.convert.info import checkpoint_info

    check_source(args.src)
    if not args.overwrite:  # before the minutes of pruning, not after
        refuse_existing(args.out, "--out", "--overwrite")
    if args.method != "magnitude" and args.calibration is None:
        raise ValueError(f"--method {args.method} needs --calibration FILE (a text file), or use --method magnitude")
    if args.samples < 1 or args.seqlen < 2:
        raise ValueError("--samples must be >= 1 and --seqlen >= 2")
    text = Path(args.calibration).read_text(encoding="utf-8") if args.calibration else None
    device = pick_device(args.device)
    model, tok = load_source(args.src, pick_dtype(args.dtype, device), device)
    calibration = None
    if text is not None:
        if tok is None:
            raise ValueError(f"{args.src} has no tokenizer to turn --calibration text into tokens")
        calibration = text_windows(text, tok, n=args.samples, seq_len=args.seqlen, seed=0)
    sparsify(model, args.method, calibration=calibration, fallback=args.fallback, verbose=args.verbose)
    rep = report(model)
    print(rep.summary())
    if not rep.counts()["sparse"]:
        raise ValueError(f"{args.src}: no layer could be converted to 2:4; nothing was written to {args.out}")
    save_pretrained(model, args.out, tokenizer=tok, overwrite=args.overwrite)
    info = checkpoint_info(args.out)
    print(f"saved {args.out}: " + "; ".join(line.strip() for line in info.lines()[3:]))


def tokenizer_files(directory: str | Path) -> list[str]:
    from sparseflow.convert.info import TOKENIZER_FILES

    return [f for f in TOKENIZER_FILES if (Path(directory) / f).is_file()]


def load_checkpoint(directory: str, device: torch.device):
    """(model, tokenizer) from a sparseflow checkpoint directory."""
    from transformers import AutoTokenizer

    from sparseflow.convert.checkpoint import from_pretrained

    if Path(directory, "config.json").is_file() and not tokenizer_files(directory):
        # Checked first: transformers' own message for a missing tokenizer talks about sentencepiece.
        raise FileNotFoundError(
            f"{directory} has no tokenizer files (tokenizer.json, tokenizer_config.json, ...); save the checkpoint with "
            "save_pretrained(..., tokenizer=tok) or copy the tokenizer files of the original model into it"
        )
    model = from_pretrained(directory, device_map=None if device.type == "cpu" else device).eval()
    return model, AutoTokenizer.from_pretrained(directory)


def cmd_generate(args: argparse.Namespace) -> None:
    from sparseflow.data import greedy_answer

    if args.max_new_tokens < 1:
        raise ValueError("--max-new-tokens must be >= 1")
    model, tok = load_checkpoint(args.dir, pick_device(args.device))
    if args.raw:
        tok.chat_template = None
    print(greedy_answer(model, tok, args.prompt, args.max_new_tokens))


def cmd_info(args: argparse.Namespace) -> None:
    from sparseflow.convert.info import checkpoint_info, to_json

    info = checkpoint_info(args.dir)
    print(to_json(info) if args.json else "\n".join(info.lines()))


def cmd_bench(args: argparse.Namespace) -> None:
    from sparseflow.cli.speed import measure, table
    from sparseflow.convert.checkpoint import from_pretrained
    from sparseflow.convert.densify import densify

    device = pick_device(args.device)
    sparse = from_pretrained(args.dir, device_map=None if device.type == "cpu" else device).eval()
    if not callable(getattr(sparse, "can_generate", None)) or not sparse.can_generate():
        raise ValueError(f"{args.dir}: bench measures causal LMs (prefill + decode); this is a {type(sparse).__name__}")
    dense = densify(copy.deepcopy(sparse))
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}{threads}")
    results = {}
    for name, model in (("dense", dense), ("2:4", sparse)):
        results[name] = measure(model, args.prompt_tokens, args.tokens, args.repeats)
    print(table(results["dense"], results["2:4"]))
    if device.type == "cpu":
        print("note: on the CPU 2:4 layers run a reference path (decompress + dense matmul); the speed path is the GPU")
