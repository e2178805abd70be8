"""GPU timing shared by the dispatcher and the benchmarks.

A pass over the calls is captured once in a CUDA graph and replayed between CUDA events, so the
figure is the GPU's time for the kernels, not the Python/launch cost of issuing them (host cost
is measured separately: ``benchmarks/bench_dense_vs_sparse.py`` reports it per call). Where a
call cannot be captured, timing falls back to eager back-to-back launches.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence

import torch

__all__ = ["interleaved_ms", "median_ms"]


def _events_ms(run: Callable[[], None], samples: int) -> list[float]:
    out = []
    for _ in range(samples):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b))
    return out


_STREAMS: dict[int, torch.cuda.Stream] = {}


def _capture_stream() -> torch.cuda.Stream:
    """One side stream per GPU for every capture. cuBLAS keeps a workspace (tens of MB, counted by
    ``torch.cuda.memory_allocated``) for each stream it has run on, for the life of the process,
    and the dispatcher times hundreds of calls: with a new stream per timing, a 2:4 Llama-3-8B held
    1.8 GB beyond its weights after its first measurements (H100; this and the decode kernel's
    per-capture scratch, since fixed, are the two retainers found)."""
    device = torch.cuda.current_device()
    stream = _STREAMS.get(device)
    if stream is None:
        stream = _STREAMS[device] = torch.cuda.Stream()
    return stream


def _captured(fns: Sequence[Callable[[], object]]) -> Callable[[], None] | None:
    stream = _capture_stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.stream(stream):
            for f in fns:  # warm-up on the capture stream: plans, routes, per-stream workspaces
                f()
            with torch.cuda.graph(graph, stream=stream):
                for f in fns:
                    f()
    except RuntimeError:
        torch.cuda.synchronize()
        return None
    torch.cuda.current_stream().wait_stream(stream)
    return graph.replay


def _runner(calls: list[Callable[[], object]], graph: bool) -> Callable[[], None]:
    """One pass over ``calls``, warmed up: a CUDA-graph replay where capture works, else eager."""
    for f in calls:
        f()
    torch.cuda.synchronize()
    run = _captured(calls) if graph else None
    if run is None:

        def run() -> None:
            for f in calls:
                f()

    run()
    return run


def _reader(scrub: torch.Tensor) -> Callable[[], object]:
    """One pass that reads all of ``scrub`` and writes 8 KB. Reading, not writing: L2 is left full
    of clean lines, as when other layers' weights pass through it in a model. A written scrub
    (``zero_``) leaves dirty lines whose write-back the next kernel pays for, and that cost fell
    unevenly on the kernels compared (benchmarks/NOTES.md)."""
    src = scrub.view(torch.int16).view(-1, 4096)
    out = torch.empty(4096, dtype=torch.int16, device=scrub.device)
    return lambda: torch.amax(src, dim=0, out=out)


def median_ms(
    fns: Sequence[Callable[[], object]], samples: int = 7, graph: bool = True, scrub: torch.Tensor | None = None
) -> float:
    """Median over ``samples`` of the time of one pass over ``fns``, divided by ``len(fns)``.

    ``scrub``: a buffer (larger than L2, a multiple of 8 KB) read before every call, so each call
    reads its operands from HBM as in a model; the read's own time is measured alone and subtracted.
    """
    calls = list(fns)
    if scrub is not None:
        read = _reader(scrub)
        calls = [g for f in fns for g in (read, f)]
    run = _runner(calls, graph)
    total = statistics.median(_events_ms(run, samples))
    if scrub is not None:
        total -= median_ms([read] * len(fns), samples, graph) * len(fns)
    return max(total, 1e-6) / len(fns)


def interleaved_ms(columns: dict[str, Sequence[Callable[[], object]]], samples: int = 7) -> dict[str, float]:
    """``median_ms`` for several alternatives at once, their samples interleaved (a, b, a, b, ...),
    so clock or temperature drift over a long run does not favour whichever was timed first."""
    runs = {name: _runner(list(fns), graph=True) for name, fns in columns.items()}
    times: dict[str, list[float]] = {name: [] for name in columns}
    for _ in range(samples):
        for name, run in runs.items():
            times[name] += _events_ms(run, 1)
    return {name: max(statistics.median(t), 1e-6) / len(columns[name]) for name, t in times.items()}
