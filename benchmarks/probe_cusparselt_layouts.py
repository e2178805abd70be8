"""Which cuSPARSELt algorithms run, give right answers, and are fastest, per layout and shape?

cuSPARSELt 0.8.0 on an H200 hits an illegal instruction (which poisons the CUDA context, so the
process is lost) for some algorithm ids of some layouts at some shapes. Every (layout, shape,
algorithm id) is therefore run in a child process that the parent restarts just past the id that
killed it. Per shape the child also times cuBLAS and PyTorch's own cuSPARSELt path, checks each
algorithm's output against a float32 reference, and finally tries cusparseLtMatmulSearch (with
the plan's own workspace, as PyTorch does). Prints one line per (layout, shape) and writes JSON.
    python benchmarks/probe_cusparselt_layouts.py --layouts 3,4 --ms 256,1024,4096 --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

LLAMA = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}

CHILD = r"""
import json, os, re, sys, torch, torch.nn.functional as F, sparseflow as sf
from sparseflow._ext import _C
from sparseflow.kernels.timing import median_ms
jobs = json.loads(sys.argv[1])
start_job, start_alg = int(sys.argv[2]), int(sys.argv[3])
ONLY = json.loads(sys.argv[4])  # algorithm ids to try ([]: all)
def say(*a): print(*a, flush=True)
for j, (L, m, n, k) in enumerate(jobs):
    if j < start_job: continue
    torch.manual_seed(j)
    w = sf.prune_2_4(torch.randn(n, k, device="cuda", dtype=torch.float16))
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    ref = F.linear(x.float(), w.float())
    scale = ref.abs().max().item()
    packed = _C.cslt_compress(w, L)
    t = lambda fn: median_ms([fn] * 4, samples=5)
    first = start_alg if j == start_job else 0
    if first == 0:
        say("JOB", j, "DENSE", t(lambda: F.linear(x, w)))
        say("JOB", j, "DEFAULT", t(lambda: _C.cslt_mm(x, packed, n, [-1, 1, 0, 0], L)))
        if L == 3:  # PyTorch's own path poses the GEMM this way (alg 0, result transposed view)
            tp = torch._cslt_compress(w)
            say("JOB", j, "TORCH", t(lambda: torch._cslt_sparse_mm(tp, x.t())))
    count = int(_C.cslt_alg_count(x, packed, n, L))
    ids = [a for a in (ONLY or range(count)) if a >= first]
    for alg in ids:
        say("JOB", j, "TRY", alg)
        try:
            y = _C.cslt_mm(x, packed, n, [alg, 1, 0, 0], L)
            err = ((y.float() - ref).abs().max().item()) / scale
            say("JOB", j, "ALG", alg, t(lambda: _C.cslt_mm(x, packed, n, [alg, 1, 0, 0], L)), err)
        except RuntimeError as e:
            r = re.search(r"call (\w+).*\((CUSPARSE_STATUS_\w+)\)", str(e), re.S)
            say("JOB", j, "ERR", alg, ":".join(r.groups()) if r else str(e)[:60].replace(" ", "_"))
            os._exit(3)  # an error can leave the library or the context in a state that fails later ids
    if ONLY:
        say("JOB", j, "DONE")
        continue
    say("JOB", j, "TRY", count)  # the search: a crash here is reported as id == count
    try:
        cfg = [int(v) for v in _C.cslt_search(x, packed, n, L, -1)[:4]]
        say("JOB", j, "SEARCH", t(lambda: _C.cslt_mm(x, packed, n, cfg, L)), *cfg)
    except RuntimeError as e:
        say("JOB", j, "SEARCHERR", str(e)[:60].replace(" ", "_"))
    say("JOB", j, "DONE")
"""


def run_jobs(jobs: list, deadline: float, only: list[int]) -> dict:
    res = {j: {"algs": {}, "crashed": [], "wrong": [], "errors": [], "why": {}} for j in range(len(jobs))}
    start_job, start_alg = 0, 0
    while start_job < len(jobs) and time.time() < deadline:
        err = ""
        try:
            r = subprocess.run(
                [sys.executable, "-c", CHILD, json.dumps(jobs), str(start_job), str(start_alg), json.dumps(only)],
                check=False,
                capture_output=True,
                text=True,
                timeout=max(5.0, deadline - time.time()),
            )
            out, err = r.stdout, r.stderr
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        last = None
        for line in out.splitlines():
            f = line.split()
            if len(f) < 3 or f[0] != "JOB":
                continue
            j, what, rest = int(f[1]), f[2], f[3:]
            d = res[j]
            if what in ("DENSE", "DEFAULT", "TORCH"):
                d[what.lower()] = float(rest[0])
            elif what == "TRY":
                last = (j, int(rest[0]))
            elif what == "ALG":
                d["algs"][int(rest[0])] = float(rest[1])
                if float(rest[2]) > 2e-2:
                    d["wrong"].append(int(rest[0]))
            elif what == "ERR":
                d["errors"].append(int(rest[0]))
                d["why"].setdefault(rest[1] if len(rest) > 1 else "?", []).append(int(rest[0]))
            elif what == "SEARCH":
                d["search"] = float(rest[0])
                d["search_cfg"] = [int(v) for v in rest[1:]]
            elif what == "SEARCHERR":
                d["search"] = "error: " + rest[0]
            elif what == "DONE":
                last = (j + 1, -1)
        if last is None:  # the child died before starting (import error?)
            print("child produced nothing:", err[-2000:], flush=True)
            break
        j, alg = last
        if alg >= 0:  # it died at (j, alg)
            if alg not in res[j]["errors"]:  # an error exits the child too: that is not a crash
                res[j]["crashed"].append(alg)
            start_job, start_alg = j, alg + 1
        else:
            start_job, start_alg = j, 0
    return res


def fmt(job, d) -> str:
    L, m, n, k = job
    us = lambda v: f"{v * 1e3:8.1f}us" if isinstance(v, float) else f"{v!s:>10}"
    dense = d.get("dense")
    ok = {a: t for a, t in d["algs"].items() if a not in d["wrong"]}
    line = f"layout {L} M={m:5d} N={n:5d} K={k:5d} dense={us(dense)} default={us(d.get('default'))}"
    if "torch" in d and dense:
        line += f" torch={us(d['torch'])} ({dense / d['torch']:.2f}x)"
    if ok and dense:
        top = sorted(ok.items(), key=lambda kv: kv[1])[:3]
        line += " best " + " ".join(f"alg {a}={us(t)} ({dense / t:.2f}x)" for a, t in top)
    s = d.get("search")
    line += f" search={us(s)}" + (
        f" ({dense / s:.2f}x, cfg {d['search_cfg']})" if isinstance(s, float) and dense else ""
    )
    why = " ".join(f"{r}:{min(ids)}-{max(ids)}({len(ids)})" for r, ids in d.get("why", {}).items())
    return line + f" ids ok={len(ok)} crashed={d['crashed']} wrong={d['wrong']} errors={len(d['errors'])} {why}"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget-s", type=float, default=300.0)
    ap.add_argument("--layouts", default="3,4")
    ap.add_argument("--layers", default="qkv,o,gate_up,down")
    ap.add_argument("--ms", default="256,1024,4096,16384")
    ap.add_argument("--square", default="2048,4096,8192", help="square M=N=K sizes ('' for none)")
    ap.add_argument("--out", default="")
    ap.add_argument("--ws-mb", default="0", help="comma-separated: offer every call this much workspace (MB)")
    ap.add_argument("--ids", default="", help="comma-separated algorithm ids to try (default: all, then the search)")
    args = ap.parse_args()
    only = [int(a) for a in args.ids.split(",") if a]
    shapes = [(int(m), *LLAMA[name]) for name in args.layers.split(",") if name for m in args.ms.split(",")]
    shapes += [(int(s), int(s), int(s)) for s in args.square.split(",") if s]
    jobs = [(int(L), *s) for L in args.layouts.split(",") for s in shapes]
    rows, deadline = [], time.time() + args.budget_s
    wss = [int(v) for v in args.ws_mb.split(",")]
    for i, ws in enumerate(wss):  # the children's extension reads the workspace floor at start
        os.environ["SPARSEFLOW_CSLT_MIN_WS_MB"] = str(ws)
        res = run_jobs(jobs, time.time() + (deadline - time.time()) / (len(wss) - i), only)
        for j, job in enumerate(jobs):
            print(f"ws>={ws}MB " * bool(ws) + fmt(job, res[j]), flush=True)
            rows.append({"layout": job[0], "M": job[1], "N": job[2], "K": job[3], "ws_mb": ws, **res[j]})
    if args.out:
        with open(os.path.join(args.out, "probe_cusparselt.json"), "w") as f:
            json.dump(rows, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
