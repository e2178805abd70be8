import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

# The dispatcher's crash-isolated cuSPARSELt sweep (sparseflow.kernels.cusparselt_tuner) starts a child process
# and times every algorithm id per new shape: seconds per shape, too slow for the many shapes the
# tests use. It is off here except where a test turns it on (tests/test_cusparselt_tuner.py).
os.environ.setdefault("SPARSEFLOW_CSLT_TUNER", "0")


def random_2_4(n: int, k: int, dtype=torch.float32, device="cpu", generator=None) -> torch.Tensor:
    """A fresh random 2:4 weight: magnitude-pruned Gaussian."""
    from sparseflow import prune_2_4

    w = torch.randn(n, k, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)
    return prune_2_4(w)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    assert torch.isfinite(out).all(), "non-finite values in the output"
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def benchmark_script(name: str):
    """``benchmarks/<name>.py`` imported as a module (the benchmarks are scripts, not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # torch.compile looks a traced function's module up by name
    spec.loader.exec_module(module)
    return module
