"""Peak memory of ``sparseflow.from_pretrained``: about the compressed size, not the dense size.

Writes a Llama-shaped checkpoint whose linears are all 2:4 (built straight in compressed
form, no dense copy), then loads it in a fresh process and reads the process's peak
resident set (``VmHWM`` in /proc/self/status: what the kernel really held, including the
memory-mapped safetensors pages, which tracemalloc cannot see) before and after. On a CUDA
device it also reports ``torch.cuda.max_memory_allocated`` against what the model holds once
loaded (``cuda_peak_over_final``). Prints one JSON line.

    python benchmarks/load_memory.py --hidden 2048 --intermediate 8192 --layers 8
    python benchmarks/load_memory.py --device cuda:0
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _status(key: str) -> int:
    """A /proc/self/status field in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def write_checkpoint(path: Path, hidden: int, intermediate: int, layers: int) -> dict:
    import torch
    import transformers as T

    from sparseflow.convert.checkpoint import save_pretrained
    from sparseflow.format import Sparse24Weight, compress_2_4
    from sparseflow.nn import SparseLinear

    cfg = T.LlamaConfig(
        vocab_size=256,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 128),
        num_key_value_heads=max(1, hidden // 128),
        tie_word_embeddings=True,
    )
    with torch.device("meta"):  # no dense init of weights that are replaced below (minutes at 8B widths)
        model = T.LlamaForCausalLM._from_config(cfg, dtype=torch.float16)
    pattern = compress_2_4(torch.tensor([[1.0, 0, 1, 0] * 2])).meta[0, 0]  # any valid byte
    dense_bytes = 0
    for name, mod in list(model.named_modules()):
        if isinstance(mod, torch.nn.Linear) and name != "lm_head":
            n, k = mod.out_features, mod.in_features
            # the values do not change what loading holds, and a constant costs a fifth of randn's
            # time (randn was a third of the write time per 8B-width layer on a 2-core host)
            values = torch.full((n, k // 2), 0.02, dtype=torch.float16)
            meta = torch.full((n, (k + 7) // 8), int(pattern), dtype=torch.uint8)
            parent, _, attr = name.rpartition(".")
            setattr(
                model.get_submodule(parent), attr, SparseLinear.from_compressed(Sparse24Weight(values, meta, (n, k)))
            )
            dense_bytes += n * k * 2
    for module in model.modules():  # what stays dense (embedding, norms): small random tensors
        for key, t in list(module._parameters.items()) + list(module._buffers.items()):
            if t is not None and t.device.type == "meta":
                real = (
                    torch.randn(t.shape, dtype=t.dtype) * 0.02
                    if t.is_floating_point()
                    else torch.zeros_like(t, device="cpu")
                )
                if key in module._parameters:
                    module._parameters[key] = torch.nn.Parameter(real, requires_grad=False)
                else:
                    module._buffers[key] = real
    save_pretrained(model, path)
    sparse_bytes = sum(
        m.weight_nbytes for m in model.modules() if isinstance(m, SparseLinear)
    )  # compressed 2:4 layers only
    return {"dense_linear_bytes": dense_bytes, "sparse_linear_bytes": sparse_bytes}


def measure_load(path: str, device: str) -> dict:
    """Runs in a fresh process: baseline after imports, peak after loading and touching every byte."""
    import torch
    import transformers.models.llama.modeling_llama  # noqa: F401 - imports are not part of the load

    import sparseflow.convert.checkpoint as ck

    try:  # reset the peak to the current RSS, so earlier peaks (imports) are not counted
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    if device.startswith("cuda"):
        torch.zeros(1, device=device)  # start CUDA here: its peak statistics cannot be reset before
    base_rss = _status("VmRSS")
    base_cuda = torch.cuda.memory_allocated(device) if device.startswith("cuda") else 0
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    # (allocated before, peak growth during) of each make_resident: where a load's peak is made. Each
    # call resets the peak statistics, so the whole load's peak is assembled from the pieces.
    steps: list[tuple[int, int]] = []
    if device.startswith("cuda"):
        from sparseflow.nn import SparseLinear

        make_resident = SparseLinear.make_resident

        def tracked(self):
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            try:
                return make_resident(self)
            finally:
                steps.append((before - base_cuda, torch.cuda.max_memory_allocated(device) - before))

        SparseLinear.make_resident = tracked
        placed = {"peak": 0}
        real_finish = ck.finish

        def finish(model, *a, **kw):  # every tensor placed, nothing made resident yet
            placed["peak"] = torch.cuda.max_memory_allocated(device) - base_cuda
            placed["allocated"] = torch.cuda.memory_allocated(device) - base_cuda
            return real_finish(model, *a, **kw)

        ck.finish = finish
    model = ck.from_pretrained(path, device_map=None if device == "cpu" else device)
    after_load = _status("VmHWM")
    for t in list(model.parameters()) + list(model.buffers()):  # fault in any page still untouched
        if t.numel():  # (a compact 2:4 layer's portable buffers on a GPU are empty placeholders)
            t.detach().reshape(-1).view(torch.uint8).max()
    out = {
        "host_peak_growth_bytes": _status("VmHWM") - base_rss,
        "host_peak_growth_during_load_bytes": after_load - base_rss,
        "model_tensor_bytes": sum(t.numel() * t.element_size() for t in model.state_dict().values()),
    }
    if device.startswith("cuda"):
        # compact layers (the default) hold one layout each from the end of loading: the peak
        # against what stays is the loading's overhead
        out["cuda_placed_peak_bytes"] = placed["peak"]  # every tensor placed, before make_resident
        out["cuda_placed_bytes"] = placed["allocated"]
        out["cuda_make_resident_calls"] = len(steps)
        out["cuda_make_resident_max_step_bytes"] = max((g for _, g in steps), default=0)
        out["cuda_peak_growth_bytes"] = max(
            [placed["peak"], torch.cuda.max_memory_allocated(device) - base_cuda] + [b + g for b, g in steps]
        )
        out["cuda_final_bytes"] = torch.cuda.memory_allocated(device) - base_cuda
        out["cuda_peak_over_final"] = out["cuda_peak_growth_bytes"] / max(out["cuda_final_bytes"], 1)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=8192)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--measure", help=argparse.SUPPRESS)  # internal: the child process
    args = ap.parse_args(argv)
    if args.measure:
        print(json.dumps(measure_load(args.measure, args.device)))
        return {}
    with tempfile.TemporaryDirectory(prefix="sparseflow-loadmem-") as tmp:
        path = Path(tmp) / "ckpt"
        t0 = time.perf_counter()
        print(f"load_memory: writing a {args.layers}-layer checkpoint to {path}", file=sys.stderr, flush=True)
        sizes = write_checkpoint(path, args.hidden, args.intermediate, args.layers)
        print(f"load_memory: checkpoint written in {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        sizes["checkpoint_file_bytes"] = sum(p.stat().st_size for p in path.glob("*.safetensors"))
        child = subprocess.run(
            [sys.executable, __file__, "--measure", str(path), "--device", args.device],
            capture_output=True,
            text=True,
            check=False,
        )
        if child.returncode:
            sys.stderr.write(child.stderr[-4000:])
            raise SystemExit(f"load_memory: the loading process failed (exit {child.returncode}); its stderr is above")
        result = {**sizes, **json.loads(child.stdout.strip().splitlines()[-1])}
        print(f"load_memory: loaded in a fresh process in {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
    result["host_growth_over_checkpoint"] = result["host_peak_growth_bytes"] / result["checkpoint_file_bytes"]
    result["checkpoint_over_dense_linears"] = result["checkpoint_file_bytes"] / result["dense_linear_bytes"]
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
