"""benchmarks/results_tool.py finish: a layer grid cut short by a device call's time limit gets its
summary from the rows it measured, and says which rows it did not reach (CPU only)."""

import math

import pytest

from tests.conftest import benchmark_script


def _row(name: str, m: int, dtype: str, cublas_ms: float, ours_ms: float) -> dict:
    return {
        "name": name,
        "M": m,
        "dtype": dtype,
        "cublas_ms": cublas_ms,
        "sparseflow_ms": ours_ms,
        "sparseflow_fast_ms": cublas_ms,
        "sparse_kernel_ms": None,
        "bytes_vs_dense": {"compact": 0.5625, "fast": 1.5625},
        "torch_error": None,
    }


def test_finish_summarises_the_rows_measured_and_lists_the_rest():
    rt = benchmark_script("results_tool")
    partial = {
        "device": "NVIDIA H100 80GB HBM3",
        "partial": True,
        "grid": [["o", 300, "float16"], ["o", 1024, "float16"], ["down", 5000, "bfloat16"]],
        "rows": [_row("o", 300, "float16", 0.020, 0.025), _row("o", 1024, "float16", 0.040, 0.020)],
    }
    done = rt.finish(partial)

    assert "partial" not in done and "partial" in partial  # the input is left as it was
    assert done["missing_rows"] == [["down", 5000, "bfloat16"]]
    s = done["summary"]
    assert s["sparselinear_min_ratio"] == pytest.approx(0.8)
    assert s["below_floor"] == ["o float16 M=300 0.800x"]
    assert s["sparselinear_geomean_m_ge_256"] == pytest.approx(math.sqrt(0.8 * 2.0))
    line = rt.summary_line(done["device"], done["rows"], s, None, None)
    assert line.startswith("SUMMARY device=NVIDIA H100 80GB HBM3 rows=2 ")
    assert "FAIL 1 rows below 0.98x: o float16 M=300 0.800x" in line
    assert "host us/call not measured" in line and "1 of 3 rows not measured" in done["note"]


def test_finish_refuses_a_run_that_has_its_summary():
    rt = benchmark_script("results_tool")
    with pytest.raises(ValueError, match="not cut short"):
        rt.finish({"device": "x", "rows": [], "summary": {}})


def test_finish_without_a_recorded_grid_counts_against_the_default_grid():
    rt = benchmark_script("results_tool")
    default = [list(rt.row_key(g)) for g in rt.grid_of(rt.parser().parse_args([]))]
    done = rt.finish({"device": "x", "rows": [_row("o", 300, "float16", 0.02, 0.01)]})
    assert ["o", 300, "float16"] in default and len(done["missing_rows"]) == len(default) - 1
    assert ["o", 300, "float16"] not in done["missing_rows"]


def test_merge_into_a_finished_run_fills_its_missing_rows_without_inventing_a_bandwidth():
    """A cut-short base (``finish``: no copy bandwidth) merged with a run of its missing row: the
    row is no longer missing, and the base's rows get no copy bandwidth it never measured."""
    rt = benchmark_script("results_tool")
    base = rt.finish(
        {
            "device": "NVIDIA H100 80GB HBM3",
            "grid": [["o", 300, "float16"], ["down", 5000, "bfloat16"]],
            "rows": [_row("o", 300, "float16", 0.020, 0.010)],
        }
    )
    new = {
        "device": "NVIDIA H100 80GB HBM3",
        "rows": [_row("down", 5000, "bfloat16", 0.300, 0.200)],
        "summary": {"copy_bandwidth_gbps": 2950.0},
    }
    merged = rt.merge(base, new, "later call")
    assert "missing_rows" not in merged and base["missing_rows"] == [["down", 5000, "bfloat16"]]
    old, added = merged["rows"]
    assert "copy_bandwidth_gbps" not in old and added["copy_bandwidth_gbps"] == 2950.0
    assert added["run"] == "later call" and merged["summary"]["sparselinear_min_ratio"] == pytest.approx(1.5)
