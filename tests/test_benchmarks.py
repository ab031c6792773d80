"""The benchmark harness runs end to end in CPU mode and writes well-formed rows."""

import json
import sys
from pathlib import Path

import jax
import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # benchmarks/ is run from the repo root, not installed
    sys.path.insert(0, str(ROOT))

from benchmarks import moe as bench  # noqa: E402
from benchmarks import shapes  # noqa: E402

REQUIRED = {"shape", "T", "impl", "pass", "ms", "roof_ms", "card", "tflops", "gbps", "active_experts",
            "jax", "triton", "jax_triton", "commit", "date"}


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks the CPU mode of the harness")
def test_cpu_run_writes_rows_and_table(tmp_path, capsys):
    out = tmp_path / "moe.json"
    rows = bench.main(["--quick", "--tokens", "16", "--pass", "fwd,fwd_bwd", "--min-time", "0.01",
                       "--no-ceilings", "--json", str(out), "--plot", "none"])
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["rows"] == json.loads(json.dumps(rows))
    assert {(r["impl"], r["shape"], r["T"], r["pass"]) for r in data["rows"]} == {
        ("xla", "tiny", 16, "fwd"), ("xla", "tiny", 16, "fwd_bwd")}
    for r in data["rows"]:
        assert REQUIRED <= r.keys(), REQUIRED - r.keys()
        assert "error" not in r
        assert r["ms"] > 0 and r["roof_ms"] > 0 and r["tflops"] > 0 and r["gbps"] > 0
        assert 1 <= r["active_experts"] <= shapes.SHAPES["tiny"].E
        assert r["card"] == jax.devices()[0].device_kind
    assert data["meta"]["card"] == jax.devices()[0].device_kind
    assert "the Triton rows need a GPU" in printed
    header = next(line for line in printed.splitlines() if line.startswith("shape "))
    for column in ("T", "impl", "ms", "TFLOP/s", "GB/s", "roof_ms", "roof/ms", "vs xla", "vs tokamax"):
        assert column in header
    assert "card: cpu" in printed


def test_counting_and_table_formatting():
    s = shapes.SHAPES["mixtral"]
    assert bench.count_flops(s, 16, "fwd") == 2 * 16 * 2 * 4096 * 14336 * 3
    assert bench.count_flops(s, 16, "fwd_bwd") == 3 * bench.count_flops(s, 16, "fwd")
    assert bench.count_bytes(s, 16, 8, "fwd") == 8 * 3 * 4096 * 14336 * 2 + 2 * 16 * 4096 * 2
    rows = [{"shape": "tiny", "T": 16, "pass": "fwd", "impl": "triton", "ms": 1.0, "tflops": 2.0, "gbps": 3.0,
             "roof_ms": 0.5, "roof_frac": 0.5, "speedup_vs_xla": 2.0},
            {"shape": "tiny", "T": 16, "pass": "fwd", "impl": "xla", "ms": 2.0, "tflops": 1.0, "gbps": 1.5,
             "roof_ms": 0.5, "roof_frac": 0.25},
            {"shape": "tiny", "T": 16, "pass": "fwd", "impl": "tokamax", "error": "boom"}]
    table = bench.format_table(rows)
    assert "2.00x" in table and "FAILED" in table
