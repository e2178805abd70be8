"""Quick start: prune a linear layer to 2:4, compress it, and run it through SparseLinear.

    python examples/quickstart.py
Runs on the CPU (reference path) or a CUDA GPU (cuSPARSELt 2:4 kernel or dense, whichever the
dispatcher measured to be faster for each M).
"""

import torch
from torch import nn

import sparseflow as sf
from sparseflow.nn import SparseLinear

device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.float16 if device == "cuda" else torch.float32

dense = nn.Linear(4096, 4096, bias=False, device=device, dtype=dtype)
layer = SparseLinear.from_dense(dense, prune=True)  # magnitude 2:4, then compress
x = torch.randn(8, 4096, device=device, dtype=dtype)
y = layer(x)

ref = nn.functional.linear(x.float(), sf.prune_2_4(dense.weight).float())
print(f"device={device} out={tuple(y.shape)} max|err|={(y.float() - ref).abs().max().item():.2e}")
print(f"weight bytes: {layer.weight_nbytes / 2**20:.1f} MiB vs dense {dense.weight.nbytes / 2**20:.1f} MiB")

# The functional form: F.linear semantics, weight stored out_features x in_features.
w = sf.compress_2_4(sf.prune_2_4(torch.randn(256, 512, device=device, dtype=dtype)))
print("sparse_mm:", tuple(sf.sparse_mm(torch.randn(3, 5, 512, device=device, dtype=dtype), w).shape))
if device == "cuda":
    print("per-M decisions:", layer.dispatch_info())
