"""The benchmark harness runs end to end in CPU mode and writes well-formed rows."""

import functools
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


def test_peer_ragged_dot_wrapper_matches_lax_ragged_dot():
    """The custom-VJP wrapper the tokamax rows use, driven by jax.lax.ragged_dot_general on CPU."""
    import jax.numpy as jnp

    def general(lhs, rhs, group_sizes, dims, precision, preferred_element_type):
        return jax.lax.ragged_dot_general(lhs, rhs, group_sizes, dims, precision=precision,
                                          preferred_element_type=preferred_element_type)

    wrapped = bench.make_ragged_dot(general)
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    lhs = jax.random.normal(k1, (10, 6), jnp.float32)
    rhs = jax.random.normal(k2, (3, 6, 5), jnp.float32)
    dout = jax.random.normal(k3, (10, 5), jnp.float32)
    group_sizes = jnp.array([4, 0, 6], jnp.int32)

    def loss(fn, lhs, rhs):
        return jnp.sum(fn(lhs, rhs, group_sizes, preferred_element_type=jnp.float32) * dout)

    got = jax.value_and_grad(functools.partial(loss, wrapped), argnums=(0, 1))(lhs, rhs)
    want = jax.value_and_grad(functools.partial(loss, jax.lax.ragged_dot), argnums=(0, 1))(lhs, rhs)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert jnp.allclose(g, w, rtol=1e-4, atol=1e-4)
