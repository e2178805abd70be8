"""Driver for compute-sanitizer: the decode kernel on small shapes (every n-tile count, split-K
on and off, SwiGLU, ragged N and K), checked against float64. Run by scripts/gpu_check.sh:

    compute-sanitizer --tool memcheck python scripts/sanitize_decode.py
    compute-sanitizer --tool racecheck python scripts/sanitize_decode.py
"""

import torch
import torch.nn.functional as F

import sparseflow as sf
from sparseflow.kernels.decode import decode_mm, pack_decode, pack_decode_swiglu


def main() -> None:
    torch.manual_seed(0)
    worst = 0.0
    for m, n, k, split in [(1, 16, 128, 1), (3, 40, 200, 2), (9, 136, 1028, 3), (17, 64, 512, 1), (40, 24, 260, 2)]:
        for dtype in (torch.float16, torch.bfloat16):
            dense = sf.prune_2_4(torch.randn(n, k, device="cuda", dtype=dtype))
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            b = torch.randn(n, device="cuda", dtype=dtype)
            ref = F.linear(x.double(), dense.double(), b.double())
            for ring in (False, True):
                y = decode_mm(x, pack_decode(sf.compress_2_4(dense)), b, split, ring)
                worst = max(worst, float((y.double() - ref).norm() / ref.norm()))
            up = sf.prune_2_4(torch.randn(n, k, device="cuda", dtype=dtype))
            w = pack_decode_swiglu(sf.compress_2_4(dense), sf.compress_2_4(up))
            y = decode_mm(x, w, None, split, True)
            ref = F.silu(F.linear(x.double(), dense.double())) * F.linear(x.double(), up.double())
            worst = max(worst, float((y.double() - ref).norm() / ref.norm()))
    torch.cuda.synchronize()
    print(f"sanitize_decode: worst rel err {worst:.2e}")
    assert worst < 2e-2


if __name__ == "__main__":
    main()
