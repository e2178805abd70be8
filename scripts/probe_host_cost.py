"""Host time per call at each level of the call stack, where the GPU is not the bottleneck (a
256 x 256 layer at M = 16: every kernel runs in a few microseconds, so a loop without a sync per
call is bound by the CPU). Tells where the time over ``F.linear`` goes (the target: <= 10 us).
Diagnostic, one GPU call:
    python scripts/probe_host_cost.py [--calls 3000] [--reps 5]
    python scripts/probe_host_cost.py --generate [--out DIR]   # a small Llama's eager generate:
        ms per token dense and 2:4 (compact, after sf.autotune), and where the 2:4 model's host
        time goes (cProfile of its generate, top functions to DIR/host_generate_profile.txt, and of
        dense's to DIR/host_generate_profile_dense.txt)
"""

import argparse
import collections
import cProfile
import io
import pstats
import statistics
import time
import traceback
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

import sparseflow as sf
from sparseflow import ops
from sparseflow._ext import _C, _CUTLASS
from sparseflow.kernels import KERNELS, cutlass
from sparseflow.kernels.dispatch import m_bucket


def per_call_us(fn, calls: int, reps: int) -> float:
    for _ in range(200):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        out.append((time.perf_counter() - t0) / calls * 1e6)
        torch.cuda.synchronize()
    return statistics.median(out)


def synchronizing_calls(fn) -> collections.Counter:
    """Where ``fn`` makes the host wait for the GPU (CUDA's sync debug mode, one warning per
    synchronizing op): file:line of the innermost frame outside torch, and how often. A sync per
    layer turns a host-bound eager loop that overlaps the GPU into host time plus GPU time."""
    found: collections.Counter = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None) -> None:
        if "synchroniz" in str(message):
            ours = [f for f in traceback.extract_stack()[:-1] if "/torch/" not in f.filename]
            found[" <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in ours[-1:-4:-1])] += 1

    torch.cuda.synchronize()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return found


def generate_probe(args: argparse.Namespace) -> None:
    """Eager HF generate, dense against 2:4 in the default (compact) mode after ``sf.autotune``:
    the case where the 2:4 model's host time per call showed (the whole-model benchmark)."""
    import transformers as T

    T.logging.set_verbosity_error()
    cfg = T.LlamaConfig(
        vocab_size=32000,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 7 // 2 // 256 * 256,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 128,
        num_key_value_heads=max(1, args.hidden // 512),
    )
    torch.manual_seed(0)
    with torch.device("cuda"):  # initialised on the GPU: an 8B model's CPU init takes minutes
        model = T.LlamaForCausalLM(cfg).to(torch.float16).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, args.context), device="cuda")
    kw = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens, "do_sample": False}

    def ms_per_token() -> float:
        out = []
        for _ in range(3):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
            torch.cuda.synchronize()
            out.append((time.perf_counter() - t0) * 1e3 / args.new_tokens)
        return statistics.median(out)

    def host_profile() -> cProfile.Profile:
        prof = cProfile.Profile()
        prof.enable()
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
        torch.cuda.synchronize()
        prof.disable()
        return prof

    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2)
        dense = ms_per_token()
        gen = lambda: model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
        dense_syncs = synchronizing_calls(gen)
        dense_prof = host_profile()  # the baseline the 2:4 profile is read against
        sf.sparsify(model, fallback="never")
        sf.autotune(model, tokens=(1, args.context))
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2)
        sparse = ms_per_token()
        linears = sum(isinstance(m, sf.SparseLinear) for m in model.modules())
        syncs = synchronizing_calls(gen)
        prof = host_profile()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    texts = {}
    for name, p in (("host_generate_profile_dense.txt", dense_prof), ("host_generate_profile.txt", prof)):
        text = io.StringIO()
        pstats.Stats(p, stream=text).sort_stats("tottime").print_stats(40)
        texts[name] = text.getvalue()
        (out / name).write_text(texts[name])
    extra_us = (sparse - dense) * 1e3 / max(linears, 1)
    print(texts["host_generate_profile.txt"][:6000])  # the 2:4 model's
    for where, count in syncs.most_common(10):
        print(f"synchronizing call x{count}: {where}")
    print(
        f"HOST generate {args.layers} layers x {args.hidden}: dense {dense:.2f} ms/token, 2:4 {sparse:.2f} "
        f"ms/token ({dense / sparse:.2f}x), {extra_us:+.1f} us per 2:4 linear call, "
        f"synchronizing calls per generate: dense {sum(dense_syncs.values())}, 2:4 {sum(syncs.values())}"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=3000)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--m", type=int, default=16)
    ap.add_argument("--generate", action="store_true", help="time a small Llama's eager generate instead")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--context", type=int, default=128, help="prompt tokens of --generate")
    ap.add_argument("--out", default="probe_out")
    args = ap.parse_args()
    if args.generate:
        return generate_probe(args)
    dt, dev, n, k, m = torch.float16, "cuda", 256, 256, args.m
    x = torch.randn(m, k, device=dev, dtype=dt)
    w = sf.prune_2_4(torch.randn(n, k, device=dev, dtype=dt))
    c = sf.compress_2_4(w)
    ref = F.linear(x.float(), w.float())
    cases = {
        "F.linear": lambda: F.linear(x, w),  # first: the baseline of every line
        "torch.empty (M x N)": lambda: torch.empty((m, n), device=dev, dtype=dt),
    }
    if cutlass.available(torch.device(dev)):
        cw = c.layout("cutlass")  # configuration 5 (128 x 16 tile) is one of those for M <= 16
        y = torch.empty(m, n, device=dev, dtype=dt)
        cases |= {
            "cutlass: _cutlass.mm (y given)": lambda: _CUTLASS.mm(x, cw.A, cw.E, y, None, 5),
            "cutlass: _cutlass.linear (y made in C++)": lambda: _CUTLASS.linear(x, cw.A, cw.E, n, 0, 5),
            "cutlass: mm_unchecked": lambda: cutlass.mm_unchecked(x, cw, 5),
            "cutlass: cutlass_mm (checked)": lambda: cutlass.cutlass_mm(x, cw, 5),
        }
    layers = {}
    for backend in ("cutlass", "decode", "cusparselt", "auto"):
        try:
            # fast mode: every layer reads one shared compressed weight (a compact layer would free it)
            lin = sf.SparseLinear.from_compressed(c, None, backend=backend, memory="fast")
            got = lin(x)
        except (ValueError, RuntimeError) as e:
            print(f"  {backend}: not run ({e})")
            continue
        err = (got.float() - ref).abs().max().item() / ref.abs().max().item()
        assert err < 1e-2, f"{backend}: relative error {err}"
        cases[f"sparse_mm backend={backend}"] = lambda b=backend: sf.sparse_mm(x, c, backend=b)
        cases[f"SparseLinear backend={backend}"] = lambda lin=lin: lin(x)
        layers[backend] = lin
    compact = sf.SparseLinear.from_compressed(sf.compress_2_4(w), None)  # the default mode
    compact(x)
    cases[f"SparseLinear compact ({compact.resident})"] = lambda: compact(x)
    x3 = x.view(1, m, k)
    cases[f"SparseLinear compact ({compact.resident}), 3-D x"] = lambda: compact(x3)
    # the raw extension calls behind the routes the layers took (ops._routes: ops.Route)
    for backend in ("cusparselt", "decode"):
        lin = layers.get(backend)  # its own Sparse24Weight: the route is under that weight's handle
        r = ops._routes.get((lin._route.handle, m_bucket(m), ops.BACKENDS[backend])) if lin is not None else None
        if r is not None and r.run == KERNELS["cusparselt"].run:
            (cfg, layout) = r.cfg
            cases[f"cusparselt: _C.cslt_mm (layout {layout}, cfg {cfg})"] = lambda r=r, cfg=cfg, v=layout: _C.cslt_mm(
                x, r.layout.packed, n, cfg, v
            )
            p1 = c.layout("cusparselt", 1).packed  # layout 1 (y^T, then our transpose), the library's default
            cases["cusparselt: _C.cslt_mm (layout 1, default)"] = lambda p1=p1: _C.cslt_mm(x, p1, n, [-1, 1, 0, 0], 1)
        elif r is not None and r.run == KERNELS["decode"].run and not r.layout.portable:
            cases["decode: _C.decode24_mm"] = lambda r=r: _C.decode24_mm(
                x, r.layout.A, r.layout.E, None, n, False, *r.cfg
            )
    print(f"host time per call, {n} x {k} fp16 weight, M = {m} (median of {args.reps} x {args.calls} calls):")
    res = {}
    for label, fn in cases.items():  # printed as measured: a crash still leaves the lines before it
        res[label] = us = per_call_us(fn, args.calls, args.reps)
        base = res.get("F.linear", us)
        print(f"  {label:44s} {us:7.2f} us   ({us - base:+6.2f} vs F.linear)", flush=True)
    print("HOST " + " | ".join(f"{label}={us:.1f}" for label, us in res.items() if label.startswith("SparseLinear")))


if __name__ == "__main__":
    main()
