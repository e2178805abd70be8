"""Our small-M 2:4 kernel: the packed layout (CPU, by emulating mma.sp) and the kernel (GPU)."""

import pytest
import torch
import torch.nn.functional as F

import sparseflow as sf
from sparseflow._ext import _C
from sparseflow.kernels.decode import (
    _effective_split,
    _lane_positions,
    decode_mm,
    decode_mm_portable,
    pack_decode,
    pack_decode_swiglu,
    portable_ok,
    split_candidates,
)
from tests.conftest import TOL, random_2_4, rel_err

needs_ext = pytest.mark.skipif(_C is None or not torch.cuda.is_available(), reason="needs the CUDA extension and a GPU")


def _meta_position(r: int, q: int, layout: str) -> tuple[int, int]:
    """(lane, bit shift) holding row r's nibble for k-group q (0..7) of an m16n8k32 step."""
    if layout == "k-halves":  # our reading of the PTX ISA (sparseflow/kernels/decode.py)
        return 4 * (r % 8) + q // 4, 16 * (r // 8) + 4 * (q % 4)
    if layout == "rows":  # the other plausible reading: thread 0 row g, thread 1 row g + 8
        return 4 * (r % 8) + r // 8, 4 * q
    raise ValueError(layout)


def emulate_mma_sp(a, b, e, dtype, layout="k-halves"):
    """What one mma.sp m16n8k32 computes from per-lane registers (a, b: 32 x 4 int32, e: 32
    int32), per lane as 32 x 4 float64 (c0..c3), under the given metadata reading."""
    rows, cols = _lane_positions("cpu")
    av = a.contiguous().view(dtype).double()  # 32 x 8
    comp = torch.zeros(16, 16, dtype=torch.float64)
    comp[rows, cols] = av
    ev = e.to(torch.int64) & 0xFFFFFFFF
    dense = torch.zeros(16, 32, dtype=torch.float64)
    for r in range(16):
        for q in range(8):
            lane, shift = _meta_position(r, q, layout)
            nib = int(ev[lane] >> shift) & 0xF
            dense[r, 4 * q + (nib & 3)] = comp[r, 2 * q]
            dense[r, 4 * q + (nib >> 2)] = comp[r, 2 * q + 1]
    bv = b.contiguous().view(dtype).double()  # lane (g, t), half h = 2q + s -> k = 2t + 8q + s, n = g
    B = torch.zeros(32, 8, dtype=torch.float64)
    for lane in range(32):
        g, t = divmod(lane, 4)
        for h in range(8):
            B[2 * t + 8 * (h // 2) + h % 2, g] = bv[lane, h]
    D = dense @ B
    out = torch.zeros(32, 4, dtype=torch.float64)
    for lane in range(32):
        g, t = divmod(lane, 4)
        for c in range(4):
            out[lane, c] = D[g + 8 * (c // 2), 2 * t + c % 2]
    return out


def _x_fragment(x_tile):
    """x_tile: 8 tokens x 32 k -> the 32 x 4 int32 B registers."""
    regs = torch.zeros(32, 8, dtype=x_tile.dtype)
    for lane in range(32):
        g, t = divmod(lane, 4)
        for h in range(8):
            regs[lane, h] = x_tile[g, 2 * t + 8 * (h // 2) + h % 2]
    return regs.view(torch.int32)


def emulate_decode(x, w, dtype):
    """The decode kernel's arithmetic on the CPU, from the packed layout alone."""
    tiles, ks = w.A.shape[:2]
    m, k = x.shape
    xp = torch.zeros(8, ks * 32, dtype=dtype)
    out = torch.zeros(m, tiles * 16, dtype=torch.float64)
    for n0 in range(0, m, 8):
        xp.zero_()
        xp[: min(8, m - n0), :k] = x[n0 : n0 + 8]
        for s in range(ks):
            b = _x_fragment(xp[:, 32 * s : 32 * s + 32])
            for tile in range(tiles):
                e = w.E[tile, s // 4, :, s % 4]
                e32 = e[torch.arange(32) // 4 * 2 + torch.arange(32) % 2]  # lane 4g + t reads slot 2g + (t & 1)
                c = emulate_mma_sp(w.A[tile, s], b, e32, dtype)
                for lane in range(32):
                    g, t = divmod(lane, 4)
                    for q in range(4):
                        tok = n0 + 2 * t + q % 2
                        if tok < m:
                            out[tok, tile * 16 + g + 8 * (q // 2)] += c[lane, q]
    return out


@pytest.mark.parametrize("n,k,m", [(16, 128, 1), (40, 200, 3), (24, 132, 9)])
def test_packed_layout_reproduces_the_weight(n, k, m):
    torch.manual_seed(n + k)
    dense = random_2_4(n, k, torch.float16)
    w = pack_decode(sf.compress_2_4(dense))
    assert w.A.shape[0] % 8 == 0 and w.A.shape[1] % 4 == 0
    x = torch.randn(m, k, dtype=torch.float16)
    got = emulate_decode(x, w, torch.float16)[:, :n]
    assert rel_err(got, F.linear(x.double(), dense.double())) < 1e-12


def test_swiglu_layout_interleaves_gate_and_up_tiles():
    torch.manual_seed(0)
    gate, up = random_2_4(20, 128, torch.bfloat16), random_2_4(20, 128, torch.bfloat16)
    w = pack_decode_swiglu(sf.compress_2_4(gate), sf.compress_2_4(up))
    x = torch.randn(2, 128, dtype=torch.bfloat16)
    y = emulate_decode(x, w, torch.bfloat16)  # tiles: gate0, up0, gate1, up1, pad...
    ref_g, ref_u = F.linear(x.double(), gate.double()), F.linear(x.double(), up.double())
    assert rel_err(y[:, 0:16], ref_g[:, :16]) < 1e-12 and rel_err(y[:, 16:32], ref_u[:, :16]) < 1e-12
    assert rel_err(y[:, 32:36], ref_g[:, 16:]) < 1e-12 and rel_err(y[:, 48:52], ref_u[:, 16:]) < 1e-12


def emulate_portable_fragments(ws, tile: int, c: int, u: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The A registers (32 x 4 int32) and metadata word (32 int32) of k-step u of chunk c that the
    kernel's portable path hands mma.sp for ``tile``, modelled step by step on its code: the
    row-contiguous copy into the swizzled ring stage, ldmatrix.x4 (lane l addresses row l % 8 of
    matrix l / 8; register i of lane (g, t) = bytes 4t..4t+3 of matrix i's row g) and the
    metadata pairing of rows g and g + 8. ``ws``: one weight, or (gate, up) for SwiGLU."""
    ws = ws if isinstance(ws, tuple) else (ws,)
    w = ws[tile % 2] if len(ws) == 2 else ws[0]
    row0 = (tile // len(ws)) * 16
    n = w.shape[0]
    vbytes = w.values.contiguous().view(torch.uint8)  # n x K bytes
    stage = torch.zeros(160, 16, dtype=torch.uint8)
    for p in range(128):
        r, q = p >> 3, p & 7
        if row0 + r < n:
            stage[r * 8 + (q ^ (r & 7))] = vbytes[row0 + r, c * 128 + q * 16 : c * 128 + q * 16 + 16]
    for r in range(16):
        stage[128 + r] = w.meta[row0 + r, c * 16 : c * 16 + 16] if row0 + r < n else 0x44
    a = torch.zeros(32, 16, dtype=torch.uint8)
    for lane in range(32):
        g, t = divmod(lane, 4)
        for i in range(4):
            src = 8 * i + g  # the lane that gave matrix i's row g
            mat, rr = src >> 3, (src & 7) + ((src >> 3 & 1) << 3)
            q = 2 * u + (mat >> 1)
            a[lane, 4 * i : 4 * i + 4] = stage[rr * 8 + (q ^ (rr & 7)), 4 * t : 4 * t + 4]
    meta = stage[128:144].reshape(-1).view(torch.int16).to(torch.int64) & 0xFFFF  # 16 rows x 8
    e = torch.zeros(32, dtype=torch.int64)
    for lane in range(32):
        g, t = divmod(lane, 4)
        h = 2 * u + (t & 1)
        e[lane] = meta[g * 8 + h] | (meta[(g + 8) * 8 + h] << 16)
    return a.view(torch.int32), torch.where(e >= 2**31, e - 2**32, e).to(torch.int32)


@pytest.mark.parametrize("n,k,swiglu", [(16, 128, False), (40, 256, False), (200, 384, False), (20, 256, True)])
def test_portable_path_feeds_mma_the_packed_layouts_fragments(n, k, swiglu):
    """The kernel's in-place reading of the portable form gives mma.sp exactly the registers of
    the packed layout (whose reading the hardware test below confirms), padding rows included."""
    torch.manual_seed(n + k)
    ws = tuple(sf.compress_2_4(random_2_4(n, k, torch.float16)) for _ in range(2 if swiglu else 1))
    packed = pack_decode_swiglu(*ws) if swiglu else pack_decode(ws[0])
    for tile in range(packed.A.shape[0]):
        for c in range(k // 128):
            for u in range(4):
                a, e = emulate_portable_fragments(ws if swiglu else ws[0], tile, c, u)
                assert torch.equal(a, packed.A[tile, 4 * c + u]), (tile, c, u)
                slots = torch.arange(32) // 4 * 2 + torch.arange(32) % 2  # lane 4g + t reads slot 2g + (t & 1)
                assert torch.equal(e, packed.E[tile, c, slots, u]), (tile, c, u)


def _gather_nibbles(lo: int, hi: int, u: int) -> int:
    """decode_gemm.cu's gather_nibbles, in Python integers."""
    a, b = (lo >> (4 * u)) & 0x000F000F, (hi >> (4 * u)) & 0x000F000F
    c = a | (b << 8)
    return (c | (c >> 12)) & 0xFFFF


def emulate_portable_registers(x, w, dtype):
    """The register pipeline's in-place reading of the portable form (transposed chunk order),
    modelled on the kernel's index arithmetic, through emulated mma.sp: lane (g, t) loads 16 bytes
    at byte 16t and 64 + 16t of the chunk's rows g and g + 8 (register u of each = k-step u),
    8 metadata bytes at 8 (t & 1) of each row (gather_nibbles), and x as XStage<NT, true> stages
    it (piece (token, u, a): 8 bytes at k = 32a + 4u and 8 bytes 16 k further)."""
    n, k = w.shape
    m = x.shape[0]
    vb = w.values.contiguous().view(torch.uint8)  # n x K bytes
    xw = x.contiguous().view(torch.int32)  # m x K/2 words
    word = lambda row, byte: int(vb[row, byte : byte + 4].view(torch.int32)) if row < n else 0
    meta32 = lambda row, byte: (
        int(w.meta[row, byte : byte + 4].view(torch.int32)) & 0xFFFFFFFF if row < n else 0x44444444
    )
    out = torch.zeros(m, n, dtype=torch.float64)
    for n0 in range(0, m, 8):
        for c in range(k // 128):
            for u in range(4):
                b = torch.zeros(32, 4, dtype=torch.int32)
                for lane in range(32):
                    g, t = divmod(lane, 4)
                    if n0 + g < m:
                        for a in range(4):
                            kk = c * 128 + 32 * a + 4 * u + 16 * (t >> 1) + 2 * (t & 1)
                            b[lane, a] = xw[n0 + g, kk // 2]
                for row0 in range(0, n, 16):
                    regs = torch.zeros(32, 4, dtype=torch.int32)
                    e = torch.zeros(32, dtype=torch.int64)
                    for lane in range(32):
                        g, t = divmod(lane, 4)
                        r0, r1 = row0 + g, row0 + g + 8
                        for i, (row, off) in enumerate(((r0, 0), (r1, 0), (r0, 64), (r1, 64))):
                            regs[lane, i] = word(row, c * 128 + off + 16 * t + 4 * u)
                        mb = c * 16 + 8 * (t & 1)
                        lo0, hi0, lo1, hi1 = meta32(r0, mb), meta32(r0, mb + 4), meta32(r1, mb), meta32(r1, mb + 4)
                        e[lane] = _gather_nibbles(lo0, hi0, u) | (_gather_nibbles(lo1, hi1, u) << 16)
                    e32 = torch.where(e >= 2**31, e - 2**32, e).to(torch.int32)
                    d = emulate_mma_sp(regs, b, e32, dtype)
                    for lane in range(32):
                        g, t = divmod(lane, 4)
                        for q in range(4):
                            tok, row = n0 + 2 * t + q % 2, row0 + g + 8 * (q // 2)
                            if tok < m and row < n:
                                out[tok, row] += d[lane, q]
    return out


@pytest.mark.parametrize("n,k,m", [(16, 128, 1), (40, 256, 3), (24, 384, 9)])
def test_portable_register_path_computes_the_product(n, k, m):
    """The transposed k order is consistent between weight fragments, metadata and x (a sum does
    not care about order, a mismatch would), padding rows and tokens included."""
    torch.manual_seed(n + k + m)
    dense = random_2_4(n, k, torch.float16)
    x = torch.randn(m, k, dtype=torch.float16)
    got = emulate_portable_registers(x, sf.compress_2_4(dense), torch.float16)
    assert rel_err(got, F.linear(x.double(), dense.double())) < 1e-12


# ---------------------------------------------------------------------------------------- GPU
def _random_regs(cases, dtype):
    """Random A/B registers and valid ordered metadata (positions i0 < i1) for every lane."""
    a = torch.randn(cases, 32, 8).to(dtype).view(torch.int32)
    b = torch.randn(cases, 32, 8).to(dtype).view(torch.int32)
    pairs = torch.tensor([[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]])
    p = pairs[torch.randint(0, 6, (cases, 32, 8))]
    nib = (p[..., 0] | (p[..., 1] << 2)) << (4 * torch.arange(8))
    e = nib.sum(-1)
    return a, b, torch.where(e >= 2**31, e - 2**32, e).to(torch.int32)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mma_sp_fragment_and_metadata_layout_on_hardware(dtype):
    """The layout sparseflow/kernels/decode.py packs for is the one the tensor cores read."""
    torch.manual_seed(1)
    a, b, e = _random_regs(4, dtype)
    got = _C.mma_sp_probe(a.cuda(), b.cuda(), e.cuda(), dtype == torch.bfloat16).cpu().double()
    errs = {}
    for layout in ("k-halves", "rows"):
        want = torch.stack([emulate_mma_sp(a[i], b[i], e[i], dtype, layout) for i in range(4)])
        errs[layout] = float((got - want).abs().max() / want.abs().max())
    assert errs["k-halves"] < 1e-5, f"metadata layout differs from our reading; max rel err per reading: {errs}"


DECODE_SHAPES = [
    (1, 16, 128),
    (3, 40, 200),
    (8, 4096, 4096),
    (9, 6144, 4096),
    (16, 4096, 14336),
    (17, 1000, 1028),
    (33, 512, 1024),
    (64, 2048, 4096),
    (1, 28672, 4096),
    (5, 4096, 14336),
]


def _poison():
    junk = torch.empty(64 << 20, device="cuda", dtype=torch.float16).fill_(float("nan"))
    del junk


def _each_variant(run, ref, shape, dtype) -> dict:
    """run(split, ring) for splits 0 (default), 1, 3 and both weight pipelines, each on freshly
    poisoned memory and checked against the float64 ``ref``; returns {(split, ring): output}."""
    out = {}
    for split in (0, 1, 3):
        for ring in (False, True):
            _poison()
            y = out[split, ring] = run(split, ring)
            torch.cuda.synchronize()
            assert y.shape == shape and y.dtype == dtype
            assert rel_err(y, ref) < TOL[dtype], f"split={split} ring={ring}"
    return out


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,n,k", DECODE_SHAPES)
def test_decode_kernel_matches_float64(dtype, m, n, k):
    torch.manual_seed(m + n + k)
    dense = random_2_4(n, k, dtype, "cuda")
    w = pack_decode(sf.compress_2_4(dense))
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    bias = torch.randn(n, device="cuda", dtype=dtype)
    ref = F.linear(x.double(), dense.double(), bias.double())
    _each_variant(lambda split, ring: decode_mm(x, w, bias, split=split, ring=ring), ref, (m, n), dtype)
    assert rel_err(decode_mm(x, w), F.linear(x.double(), dense.double())) < TOL[dtype]


def test_effective_split_is_what_the_kernel_launches():
    # decode_ops.cpp deals ceil(chunks / split) chunks to each block: 18 splits of 112 chunks are 16 of 7
    assert _effective_split(18, 112) == 16
    assert _effective_split(9, 112) == 9
    assert _effective_split(500, 112) == 112
    assert _effective_split(0, 112) == 1
    assert _effective_split(3, 1) == 1


@needs_ext
@pytest.mark.parametrize("m,n,k", [(1, 4096, 14336), (16, 28672, 4096), (40, 1024, 4096)])
def test_every_split_the_dispatcher_times_is_correct(m, n, k):
    """The candidates (fixed ones and the per-pipeline one-wave split) are valid and compute the product."""
    torch.manual_seed(n + m)
    dense = random_2_4(n, k, torch.float16, "cuda")
    c = sf.compress_2_4(dense)
    w = pack_decode(c)
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    ref = F.linear(x.double(), dense.double())
    chunks = -(-k // 128)
    for portable in (False, True):
        for ring in (False, True):
            cands = split_candidates(w, m, ring=ring, portable=portable)
            assert cands and all(1 <= s <= chunks and _effective_split(s, chunks) == s for s in cands), cands
            for s in cands:
                _poison()
                y = decode_mm_portable(x, c, None, s, ring=ring) if portable else decode_mm(x, w, None, s, ring)
                assert rel_err(y, ref) < TOL[torch.float16], f"split={s} ring={ring} portable={portable}"


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 4, 16, 40])
def test_fused_swiglu_matches_reference(dtype, m):
    torch.manual_seed(m)
    n, k = 1040, 1024  # 65 tiles of 16: exercises pair padding
    gate, up = random_2_4(n, k, dtype, "cuda"), random_2_4(n, k, dtype, "cuda")
    w = pack_decode_swiglu(sf.compress_2_4(gate), sf.compress_2_4(up))
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    bias = torch.randn(2 * n, device="cuda", dtype=dtype)
    g = F.linear(x.double(), gate.double(), bias[:n].double())
    u = F.linear(x.double(), up.double(), bias[n:].double())
    for ring in (False, True):
        _poison()
        y = decode_mm(x, w, bias, ring=ring)
        assert y.shape == (m, n)
        assert rel_err(y, F.silu(g) * u) < 2 * TOL[dtype]


@needs_ext
def test_decode_kernel_deterministic_and_graph_capturable():
    dense = random_2_4(4096, 4096, torch.float16, "cuda")
    w = pack_decode(sf.compress_2_4(dense))
    x = torch.randn(4, 4096, device="cuda", dtype=torch.float16)
    y0 = decode_mm(x, w, split=8)
    assert all(torch.equal(decode_mm(x, w, split=8), y0) for _ in range(5))
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        decode_mm(x, w, split=8)  # warm: workspace allocated outside capture
        with torch.cuda.graph(g):
            yg = decode_mm(x, w, split=8)
    x.copy_(torch.randn_like(x))
    g.replay()
    torch.cuda.synchronize()
    assert rel_err(yg, F.linear(x.double(), dense.double())) < TOL[torch.float16]


@needs_ext
def test_decode_kernel_two_streams():
    dense = random_2_4(4096, 14336, torch.bfloat16, "cuda")
    w = pack_decode(sf.compress_2_4(dense))
    xs = [torch.randn(8, 14336, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    streams = [torch.cuda.Stream() for _ in range(2)]
    outs = [None, None]
    for _ in range(3):
        for i in range(2):
            with torch.cuda.stream(streams[i]):
                outs[i] = decode_mm(xs[i], w, split=14)
    torch.cuda.synchronize()
    for i in range(2):
        assert rel_err(outs[i], F.linear(xs[i].double(), dense.double())) < TOL[torch.bfloat16]


@needs_ext
def test_decode_kernel_rejects_bad_input():
    w = pack_decode(sf.compress_2_4(random_2_4(64, 256, torch.float16, "cuda")))
    with pytest.raises(ValueError, match="M must be in 1..64"):
        decode_mm(torch.randn(65, 256, device="cuda", dtype=torch.float16), w)
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        decode_mm(torch.randn(2, 256, device="cuda"), w)
    with pytest.raises(ValueError, match="the weight has K=256"):
        decode_mm(torch.randn(2, 512, device="cuda", dtype=torch.float16), w)
    with pytest.raises(ValueError, match="bias must be"):
        decode_mm(torch.randn(2, 256, device="cuda", dtype=torch.float16), w, torch.zeros(3, device="cuda"))


# every decode shape whose K the in-place reading takes (K % 128 == 0), and two that replace the others
PORTABLE_SHAPES = [s for s in DECODE_SHAPES if s[2] % 128 == 0] + [(3, 40, 256), (17, 1000, 1024)]


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,n,k", PORTABLE_SHAPES)
def test_portable_kernel_matches_float64_and_the_packed_kernel(dtype, m, n, k):
    torch.manual_seed(m + n + k)
    dense = random_2_4(n, k, dtype, "cuda")
    c = sf.compress_2_4(dense)
    assert portable_ok(c)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    bias = torch.randn(n, device="cuda", dtype=dtype)
    ref = F.linear(x.double(), dense.double(), bias.double())
    packed = pack_decode(c)
    ys = _each_variant(lambda split, ring: decode_mm_portable(x, c, bias, split=split, ring=ring), ref, (m, n), dtype)
    for split in (0, 1, 3):  # the ring path: same fragments, same order of accumulation as the packed ring path
        assert torch.equal(ys[split, True], decode_mm(x, packed, bias, split=split, ring=True)), f"split={split}"


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 16, 40])
def test_portable_kernel_fused_swiglu(dtype, m):
    torch.manual_seed(m)
    n, k = 1040, 1024  # 65 tiles of 16 per weight
    gate, up = random_2_4(n, k, dtype, "cuda"), random_2_4(n, k, dtype, "cuda")
    cg, cu = sf.compress_2_4(gate), sf.compress_2_4(up)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    bias = torch.randn(2 * n, device="cuda", dtype=dtype)
    g = F.linear(x.double(), gate.double(), bias[:n].double())
    u = F.linear(x.double(), up.double(), bias[n:].double())
    for ring in (False, True):
        _poison()
        y = decode_mm_portable(x, cg, bias, up=cu, ring=ring)
        assert y.shape == (m, n)
        assert rel_err(y, F.silu(g) * u) < 2 * TOL[dtype], f"ring={ring}"
    assert torch.equal(y, decode_mm(x, pack_decode_swiglu(cg, cu), bias, ring=True))


@needs_ext
def test_portable_kernel_rejects_what_it_cannot_read():
    c = sf.compress_2_4(random_2_4(64, 200, torch.float16, "cuda"))  # K not a multiple of 128
    assert not portable_ok(c)
    with pytest.raises(ValueError, match="cannot be read in place"):
        decode_mm_portable(torch.randn(2, 200, device="cuda", dtype=torch.float16), c)
    c = sf.compress_2_4(random_2_4(64, 256, torch.float16, "cuda"))
    with pytest.raises(TypeError, match="x is torch.bfloat16"):
        decode_mm_portable(torch.randn(2, 256, device="cuda", dtype=torch.bfloat16), c)
    with pytest.raises(ValueError, match="M must be in 1..64"):
        decode_mm_portable(torch.randn(65, 256, device="cuda", dtype=torch.float16), c)
    with pytest.raises(ValueError, match="differ in shape"):
        decode_mm_portable(
            torch.randn(2, 256, device="cuda", dtype=torch.float16),
            c,
            up=sf.compress_2_4(random_2_4(32, 256, torch.float16, "cuda")),
        )
