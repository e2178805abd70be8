"""What sparsify did to each layer, as data and as a printable table."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

__all__ = ["LayerReport", "SparsifyReport"]

ACTIONS = ("sparse", "dense-fallback", "skipped")


@dataclass
class LayerReport:
    name: str
    kind: str  # "Linear" or "Conv1D"
    shape: tuple[int, int]  # (out_features, in_features)
    action: str  # "sparse", "dense-fallback" (kept dense and unpruned) or "skipped" (not selected / impossible)
    reason: str
    speedup: dict[int, float | None] | None = None  # measured dense_ms / sparse_ms per M (tokens), GPU only
    rel_error: float | None = None  # ||XW^T - XW'^T|| / ||XW^T|| on calibration inputs (data methods)
    aliases: list[str] = field(default_factory=list)  # other names of the same module
    resident: str | None = None  # on a GPU, compact mode: the kernel whose layout the layer keeps
    resident_bytes: int | None = None  # the bytes of that one layout (the weight's whole GPU footprint)


@dataclass
class SparsifyReport:
    method: str
    fallback: str
    layers: list[LayerReport]
    seconds: float = 0.0
    calibration: str = "none"

    def names(self, action: str) -> list[str]:
        return [r.name for r in self.layers if r.action == action]

    def counts(self) -> dict[str, int]:
        return {a: sum(r.action == a for r in self.layers) for a in ACTIONS}

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "fallback": self.fallback,
            "seconds": self.seconds,
            "calibration": self.calibration,
            "counts": self.counts(),
            "layers": [asdict(r) for r in self.layers],
        }

    def summary(self) -> str:
        c = self.counts()
        return (
            f"sparsify(method={self.method!r}, fallback={self.fallback!r}): {c['sparse']} sparse, "
            f"{c['dense-fallback']} dense-fallback, {c['skipped']} skipped in {self.seconds:.1f} s; "
            f"calibration: {self.calibration}"
        )

    def table(self) -> str:
        def speed(r: LayerReport) -> str:
            if not r.speedup:
                return "-"
            return " ".join(f"{'?' if s is None else f'{s:.2f}x'}@{m}" for m, s in r.speedup.items())

        def kept(r: LayerReport) -> str:
            return "-" if r.resident is None else f"{r.resident} {r.resident_bytes / 2**20:.1f} MiB"

        rows = [("layer", "shape", "action", "speedup", "rel.err", "GPU layout", "why")]
        for r in self.layers:
            err = "-" if r.rel_error is None else f"{r.rel_error:.4f}"
            rows.append((r.name, f"{r.shape[0]}x{r.shape[1]}", r.action, speed(r), err, kept(r), r.reason))
        widths = [max(len(row[i]) for row in rows) for i in range(6)]
        lines = ["  ".join(v.ljust(w) for v, w in zip(row[:6], widths)) + "  " + row[6] for row in rows]
        lines.insert(1, "-" * len(lines[0]))
        return "\n".join([*lines, self.summary()])

    def __str__(self) -> str:
        return self.table()
