"""The benchmark harness runs end to end in CPU mode and writes well-formed rows; its roofs count what
they claim to; the per-GEMM reference VJP in jaxmoe.reference matches jax.lax.ragged_dot."""

import dataclasses
import functools
import json
import sys
import unittest.mock
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # benchmarks/ is run from the repo root, not installed
    sys.path.insert(0, str(ROOT))

from benchmarks import moe as bench  # noqa: E402
from benchmarks import peers, report, shapes, timing  # noqa: E402
from jaxmoe import pipeline, reference  # noqa: E402

REQUIRED = {"shape", "T", "impl", "pass", "ms", "gemm_ms", "hbm_ms", "limit_ms", "limit_frac", "roof_ms",
            "roof_frac", "peak_bytes", "card", "tflops", "gbps", "bytes", "active_experts", "jax", "triton",
            "jax_triton", "commit", "date"}


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks the CPU mode of the harness")
def test_cpu_run_writes_rows_and_table(tmp_path, capsys):
    out = tmp_path / "moe.json"
    rows = bench.main(["--quick", "--tokens", "16", "--pass", "fwd,fwd_bwd", "--min-time", "0.01", "--memory",
                       "--json", str(out), "--plot", "none"])
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["rows"] == json.loads(json.dumps(rows))
    assert {(r["impl"], r["shape"], r["T"], r["pass"]) for r in data["rows"]} == {
        ("xla", "tiny", 16, "fwd"), ("xla", "tiny", 16, "fwd_bwd")}
    gbps = data["meta"]["ceilings"]["hbm_read_gbps"]
    for r in data["rows"]:
        assert REQUIRED <= r.keys(), REQUIRED - r.keys()
        assert "error" not in r
        assert r["ms"] > 0 and r["gemm_ms"] > 0 and r["tflops"] > 0 and r["gbps"] > 0
        assert r["hbm_ms"] == pytest.approx(r["bytes"] / (gbps * 1e9) * 1e3)
        assert r["limit_ms"] == max(r["gemm_ms"], r["hbm_ms"])
        assert r["limit_frac"] == pytest.approx(r["limit_ms"] / r["ms"])
        assert r["roof_ms"] == r["gemm_ms"] and r["roof_frac"] == pytest.approx(r["gemm_ms"] / r["ms"])
        assert r["peak_bytes"] > 0 and r["gemm_peak_bytes"] > 0
        assert 1 <= r["active_experts"] <= shapes.SHAPES["tiny"].E
        assert r["card"] == jax.devices()[0].device_kind
    assert data["meta"]["card"] == jax.devices()[0].device_kind
    assert "the Triton rows need a GPU" in printed
    assert "xla       memory: args " in printed
    header = next(line for line in printed.splitlines() if line.startswith("shape "))
    assert header.split() == ["shape", "T", "pass", "impl", "ms", "TFLOP/s", "GB/s", "gemm_ms", "hbm_ms",
                              "limit_ms", "limit/ms", "peak_gib", "vs", "xla", "vs", "tokamax"]
    assert "card: cpu" in printed


def test_a_sweep_cut_off_keeps_the_cells_it_measured(tmp_path, monkeypatch, capsys):
    """The JSON is written after every cell: a run stopped by a time limit (here: interrupted as its second
    cell starts) leaves its finished rows, which `python -m benchmarks.report` prints as cut off."""
    out = tmp_path / "moe.json"
    make_roof, calls = bench.make_gemm_roof, []

    def roof_then_stop(pass_):
        calls.append(pass_)
        if len(calls) == 2:
            raise KeyboardInterrupt  # what a timeout's SIGINT or SIGTERM handler would raise
        return make_roof(pass_)

    monkeypatch.setattr(bench, "make_gemm_roof", roof_then_stop)
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--quick", "--tokens", "16", "--pass", "fwd,fwd_bwd", "--min-time", "0.01", "--json", str(out),
                    "--plot", "none"])
    data = json.loads(out.read_text())
    assert data["meta"]["complete"] is False
    assert [(r["impl"], r["T"], r["pass"]) for r in data["rows"]] == [("xla", 16, "fwd")]
    assert data["rows"][0]["ms"] > 0
    capsys.readouterr()
    report.main([str(out)])
    printed = capsys.readouterr().out
    assert "(cut off: 1 cells measured of the run's 2)" in printed
    assert any(line.split()[:4] == ["tiny", "16", "fwd", "xla"] for line in printed.splitlines())


def test_counting_and_hbm_roof():
    s = shapes.SHAPES["mixtral"]
    w = 3 * 4096 * 14336 * 2  # one expert's three bf16 weights
    assert bench.count_flops(s, 16, "fwd") == 2 * 16 * 2 * 4096 * 14336 * 3
    assert bench.count_flops(s, 16, "fwd_bwd") == 3 * bench.count_flops(s, 16, "fwd")
    # fwd: the weights of the experts that received tokens, x read, y written
    assert bench.count_bytes(s, 16, 7, "fwd") == 7 * w + 2 * 16 * 4096 * 2
    # fwd_bwd: active weights read twice, all E weight gradients written, x twice, dy, y, dx
    assert bench.count_bytes(s, 16, 7, "fwd_bwd") == 2 * 7 * w + 8 * w + 5 * 16 * 4096 * 2
    assert bench.hbm_roof_ms(2e9, 1000.0) == pytest.approx(2.0)  # 2 GB at 1000 GB/s
    assert bench.hbm_roof_ms(2e9, None) is None


def test_gemm_roof_splits_over_the_experts_that_received_tokens():
    """At small T the roof reads only the active experts' weights (E's would make it slower, flattering)."""
    q = shapes.SHAPES["qwen3_30b_a3b"]  # E=128, k=8
    assert bench.roof_split(q, 16, 80.6) == (81, 2)  # 128 rows over 81 experts: 2 rows each (rounded up)
    assert bench.roof_split(q, 8192, 128.0) == (128, 512)
    assert bench.roof_split(q, 1, 0.2) == (1, 8)  # at least one expert


def _flops(jitted, *args) -> float | None:
    """XLA's FLOP count of the compiled fn; None off CPU, where the GEMMs become cuBLAS calls that the
    cost analysis does not count in full."""
    if jax.default_backend() != "cpu":
        return None
    cost = jitted.lower(*args).compile().cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]


def test_gemm_roof_is_the_expert_gemms():
    """Gate/up as one [E, d, 2f] einsum, down as an einsum of its own [E, m, f] input (no slice copy of
    the gate/up output), bf16 out: the layer's GEMM FLOPs and nothing else."""
    E, m, d, f = 4, 8, 64, 128
    k1, k2, k3, k4, k5, k6 = jax.random.split(jax.random.key(0), 6)
    xe = jax.random.normal(k1, (E, m, d), jnp.bfloat16)
    he = jax.random.normal(k5, (E, m, f), jnp.bfloat16)
    w_gate_up = jax.random.normal(k2, (E, d, 2 * f), jnp.bfloat16)
    w_down = jax.random.normal(k3, (E, f, d), jnp.bfloat16)
    dhe = jax.random.normal(k6, (E, m, 2 * f), jnp.bfloat16)
    dye = jax.random.normal(k4, (E, m, d), jnp.bfloat16)
    args = (xe, he, w_gate_up, w_down, dhe, dye)
    gemm_flops = 2 * E * m * d * (2 * f) + 2 * E * m * f * d

    fwd = peers.make_gemm_roof("fwd")
    h, out = fwd(*args)
    assert (h.shape, h.dtype, out.shape, out.dtype) == ((E, m, 2 * f), jnp.bfloat16, (E, m, d), jnp.bfloat16)
    f32 = jnp.float32
    assert jnp.allclose(h.astype(f32), jnp.einsum("emd,edn->emn", xe.astype(f32), w_gate_up.astype(f32)),
                        rtol=2e-2, atol=2e-2)
    assert jnp.allclose(out.astype(f32), jnp.einsum("emf,efd->emd", he.astype(f32), w_down.astype(f32)),
                        rtol=2e-2, atol=2e-2)
    assert _flops(fwd, *args) in (gemm_flops, None)
    hlo = fwd.lower(*args).compile().as_text()
    assert " slice(" not in hlo and "slice-start" not in hlo, "the roof must not copy a slice"

    fwd_bwd = peers.make_gemm_roof("fwd_bwd")
    value, grads = fwd_bwd(*args)
    assert value.dtype == jnp.float32
    assert [(g.shape, g.dtype) for g in grads] == [(a.shape, jnp.bfloat16) for a in (xe, he, w_gate_up, w_down)]
    # 3x the forward GEMMs; XLA also counts the few elementwise ops (the two products, converts).
    flops = _flops(fwd_bwd, *args)
    assert flops is None or 3 * gemm_flops <= flops <= 1.05 * 3 * gemm_flops


def test_planned_memory():
    x = jnp.ones((256, 256), jnp.float32)
    mem = timing.planned_memory(jax.jit(lambda a: a @ a), (x,))
    assert mem.argument_bytes == x.nbytes and mem.output_bytes == x.nbytes
    assert mem.peak_bytes >= 2 * x.nbytes
    assert timing.planned_memory(lambda a: a, (x,)) is None  # not a jitted fn: recorded as None, not raised


def test_table_formatting():
    rows = [{"shape": "tiny", "T": 16, "pass": "fwd", "impl": "triton", "ms": 1.0, "tflops": 2.0, "gbps": 3.0,
             "gemm_ms": 0.5, "hbm_ms": 0.25, "limit_ms": 0.5, "limit_frac": 0.5, "peak_bytes": 3 << 30,
             "speedup_vs_xla": 2.0},
            {"shape": "tiny", "T": 16, "pass": "fwd", "impl": "xla", "ms": 2.0, "tflops": 1.0, "gbps": 1.5,
             "gemm_ms": 0.5, "hbm_ms": None, "limit_ms": 0.5, "limit_frac": 0.25, "peak_bytes": None},
            {"shape": "tiny", "T": 16, "pass": "fwd", "impl": "tokamax", "error": "boom"}]
    lines = report.format_table(rows).splitlines()
    assert lines[2].split() == ["tiny", "16", "fwd", "triton", "1.0000", "2.00", "3.00", "0.5000", "0.2500",
                                "0.5000", "0.50", "3.00", "2.00x"]
    assert lines[3].split()[-2:] == ["0.25", "-"]
    assert "FAILED" in lines[4]


def test_reference_ragged_dot_matches_lax_ragged_dot():
    """make_ragged_dot's VJP (two ragged GEMMs) driven by jax.lax.ragged_dot_general, against
    jax.lax.ragged_dot and its own VJP: values and both gradients, with an empty group."""

    def general(lhs, rhs, group_sizes, dims, precision, preferred_element_type):
        return jax.lax.ragged_dot_general(lhs, rhs, group_sizes, dims, precision=precision,
                                          preferred_element_type=preferred_element_type)

    ragged_dot = reference.make_ragged_dot(general)
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    lhs = jax.random.normal(k1, (10, 6), jnp.float32)
    rhs = jax.random.normal(k2, (3, 6, 5), jnp.float32)
    dout = jax.random.normal(k3, (10, 5), jnp.float32)
    group_sizes = jnp.array([4, 0, 6], jnp.int32)

    def loss(fn, lhs, rhs):
        return jnp.sum(fn(lhs, rhs, group_sizes, preferred_element_type=jnp.float32) * dout)

    got = jax.value_and_grad(functools.partial(loss, ragged_dot), argnums=(0, 1))(lhs, rhs)
    want = jax.value_and_grad(functools.partial(loss, jax.lax.ragged_dot), argnums=(0, 1))(lhs, rhs)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert jnp.allclose(g, w, rtol=1e-4, atol=1e-4)
    assert jnp.all(jax.grad(functools.partial(loss, ragged_dot), argnums=1)(lhs, rhs)[1] == 0)  # empty group


def test_backward_tuner_runs_in_the_interpreter(tmp_path):
    """`benchmarks.tune --backward` end to end on CPU (one candidate per GEMM): the entry it writes carries
    tuned dh, dx and dw configs that jaxmoe.config reads back."""
    from benchmarks import tune
    from jaxmoe import config

    out = tmp_path / "table.json"
    assert tune.main(["--backward", "--shapes", "tiny", "--tokens", "16", "--mode", "interpret", "--limit", "1",
                      "--min-time", "0.01", "--out", str(out)]) == 0
    (entry,) = json.loads(out.read_text()).values()
    cfg = config.MoEConfig.from_json(entry)
    assert cfg.dh is not None and cfg.dx is not None and cfg.dw is not None and entry["bwd_ms"] > 0


def test_tuner_skips_a_candidate_whose_outputs_differ(capsys):
    """benchmarks.tune keeps only candidates whose outputs agree with the first one that ran: a faster
    candidate that computes something else (a miscompiled tile shape) is skipped, and says so; a NaN
    counts as a difference."""
    from benchmarks import tune

    x = jnp.linspace(1.0, 2.0, 64, dtype=jnp.float32)
    outputs = {"right": lambda a: (a * 2, a.sum()), "rounded": lambda a: (a * 2 * (1 + 1e-3), a.sum()),
               "wrong": lambda a: (a * 3, a.sum()), "nan": lambda a: (a * 2, a.sum() * jnp.nan),
               "split_k": lambda a: (jnp.stack([a, a]), a.sum())}  # partial sums, added up: right
    times = {"right": 2.0, "rounded": 1.5, "wrong": 1.0, "nan": 0.5, "split_k": 1.8}

    def make(name):
        return outputs[name], (x,)

    with unittest.mock.patch.object(tune, "_time", lambda fn, args, min_time_s: times[
            next(n for n, f in outputs.items() if f is fn)]):
        assert tune.best_gemm(make, ["right", "wrong", "split_k", "rounded", "nan"], 0.01) == (1.5, "rounded")
    log = capsys.readouterr().out
    assert "skip wrong" in log and "skip nan" in log and "skip rounded" not in log and "skip split_k" not in log


def test_stage_timing_runs_in_the_interpreter(capsys):
    """`benchmarks.tune --stages` end to end on CPU: every stage and nested view of the layer is timed."""
    from benchmarks import tune

    assert tune.main(["--stages", "--shapes", "tiny", "--tokens", "16", "--mode", "interpret",
                      "--min-time", "0.01"]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("tiny"))
    for stage in ("route", "dispatch", "gate_up", "down", "combine", "gemms", "expert_ffn", "moe_no_aux", "moe"):
        assert f" {stage} " in line, (stage, line)


def test_kernel_table_sums_per_call():
    """benchmarks.profile's aggregation: per-kernel time and launches per call, busy time and span."""
    from benchmarks.profile import KernelEvent, kernel_table

    events = [KernelEvent("gemm", 0, 10_000), KernelEvent("route", 12_000, 2_000),
              KernelEvent("gemm", 20_000, 10_000), KernelEvent("route", 32_000, 2_000)]
    rows, busy, span = kernel_table(events, calls=2)
    assert [r.name for r in rows] == ["gemm", "route"]
    assert rows[0].us_per_call == 10.0 and rows[0].launches_per_call == 1.0 and rows[1].us_per_call == 2.0
    assert busy == 12.0 and span == 17.0
    assert kernel_table([], calls=3) == ([], 0.0, 0.0)


def test_peer_routing_matches_jaxmoe_route_on_finite_scores():
    """The peers' plain jax.lax.top_k routing picks what jaxmoe.route picks wherever no score is NaN."""
    import jaxmoe
    from benchmarks.peers import lax_route

    logits = jax.random.normal(jax.random.key(0), (33, 16)) * 2
    bias = jnp.linspace(-0.1, 0.1, 16)
    for kwargs in (dict(), dict(scoring="sigmoid", selection_bias=bias), dict(renormalize=False)):
        (got, stats), want = lax_route(logits, 4, **kwargs), jaxmoe.route(logits, 4, **kwargs)
        for a, b in zip(stats, jaxmoe.reference.router_stats(logits, got, 16)):  # the peers' aux, in jax.lax
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(got, want):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# The shapes with router and expert options: every row runs them with the same options and extra arrays.

def _option_reference_kwargs(name, extras):
    """The tiny option shapes' options, written out here (not read from the shape), as jaxmoe.moe kwargs."""
    from jaxmoe import Experts, Router

    if name == "tiny_deepseek_v3":
        router = Router(2, scoring="sigmoid", renormalize_epsilon=1e-20, num_groups=4, top_groups=2,
                        group_score="top2_sum", scaling_factor=2.5)
        assert set(extras) == {"selection_bias"} and extras["selection_bias"].dtype == jnp.float32
        return dict(router=router, selection_bias=extras["selection_bias"])
    assert name == "tiny_gpt_oss"
    assert set(extras) == {"router_bias", "b_gate", "b_up", "b_down"}
    return dict(router=Router(2), experts=Experts("clamped_swiglu", alpha=1.702, limit=7.0),
                router_bias=extras["router_bias"], b_gate=extras["b_gate"], b_up=extras["b_up"],
                b_down=extras["b_down"])


def test_option_shapes_carry_their_models_options():
    """DeepSeek-V3's and gpt-oss-120b's cells: their dims and options, named into the sweep, not defaults."""
    from jaxmoe import Experts, Router

    ds, go = shapes.SHAPES["deepseek_v3"], shapes.SHAPES["gpt_oss_120b"]
    assert (ds.E, ds.k, ds.d, ds.f) == (256, 8, 7168, 2048)
    assert ds.router == Router(8, scoring="sigmoid", renormalize_epsilon=1e-20, num_groups=8, top_groups=4,
                               group_score="top2_sum", scaling_factor=2.5)
    assert ds.experts == Experts() and ds.selection_bias and not ds.router_bias and not ds.expert_biases
    assert (go.E, go.k, go.d, go.f) == (128, 4, 2880, 2880)
    assert go.router == Router(4) and go.experts == Experts("clamped_swiglu", alpha=1.702, limit=7.0)
    assert go.router_bias and go.expert_biases and not go.selection_bias
    assert shapes.OPTION_SHAPES == ("deepseek_v3", "gpt_oss_120b")
    assert not set(shapes.OPTION_SHAPES) & set(shapes.GPU_SHAPES) and shapes.CPU_SHAPES == ("tiny",)
    assert all(shapes.SHAPES[n].plain for n in shapes.GPU_SHAPES + shapes.CPU_SHAPES)
    # Bytes: the expert biases are read with their expert's weights and their gradients written densely.
    w = 3 * 2880 * 2880 * 2 + (2 * 2880 + 2880) * 2
    assert bench.count_bytes(go, 16, 30, "fwd") == 30 * w + 2 * 16 * 2880 * 2
    assert bench.count_bytes(go, 16, 30, "fwd_bwd") == 2 * 30 * w + 128 * w + 5 * 16 * 2880 * 2
    assert bench.count_flops(go, 16, "fwd") == 2 * 16 * 4 * 2880 * 2880 * 3


@pytest.mark.parametrize("name", ["tiny_deepseek_v3", "tiny_gpt_oss"])
def test_option_rows_equal_the_reference_with_the_same_options(name):
    """Each row's forward (jaxmoe.moe for xla, triton and interpret; the jax.lax pipeline of the GPU xla
    and tokamax rows) equals jaxmoe.moe's reference with the shape's options, and its active-expert count
    follows the shape's routing. With expert biases, fwd_bwd of the jax.lax pipeline gives the gradients
    of x, the expert weights and the biases that jaxmoe.moe's give."""
    import jaxmoe

    shape = shapes.SHAPES[name]
    ((rw, wg, wu, wd, extras),) = bench.make_weights(shape, bench.Normal(0, on_host=True), 1)
    x = bench.Normal(1, on_host=True)((13, shape.d))
    dy = bench.Normal(2, on_host=True)((13, shape.d))
    kwargs = _option_reference_kwargs(name, extras)
    arrays = {n: a for n, a in kwargs.items() if n not in ("router", "experts")}
    options = {n: a for n, a in kwargs.items() if n in ("router", "experts")}
    reference_moe = jax.jit(lambda x, arrays: jaxmoe.reference.moe(x, rw, wg, wu, wd, **options, **arrays))
    y_ref, aux_ref = reference_moe(x, arrays)

    forwards = {"xla": peers.make_forward("xla", shape), "lax pipeline": peers.lax_forward(shape, jax.lax.ragged_dot),
                "interpret": peers.make_forward("interpret", shape)}
    for row, forward in forwards.items():
        try:
            y, aux = peers.make_step(forward, "fwd")(x, rw, wg, wu, wd, extras, dy)
        except NotImplementedError:  # the Triton kernels for these options are not on this branch yet
            assert row == "interpret"
            continue
        np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y_ref, np.float32), rtol=2e-2, atol=2e-2,
                                   err_msg=row)
        np.testing.assert_array_equal(np.asarray(aux.expert_counts), np.asarray(aux_ref.expert_counts), err_msg=row)

    logits = pipeline.router_logits(x, rw, kwargs.get("router_bias"))
    routing = jaxmoe.route(logits, router=kwargs["router"], selection_bias=kwargs.get("selection_bias"))
    assert int(bench._active_experts(x, rw, extras, router=shape.router)) == len(np.unique(np.asarray(routing.ids)))

    if not shape.expert_biases:
        return
    _, want = peers.make_step(forwards["xla"], "fwd_bwd")(x, rw, wg, wu, wd, extras, dy)
    _, got = peers.make_step(forwards["lax pipeline"], "fwd_bwd")(x, rw, wg, wu, wd, extras, dy)
    assert sorted(got[4]) == ["b_down", "b_gate", "b_up"]
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), rtol=3e-2, atol=3e-2)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks the CPU mode of the harness")
def test_cpu_sweep_runs_the_option_shapes(tmp_path):
    out = tmp_path / "moe.json"
    bench.main(["--shapes", "tiny_deepseek_v3,tiny_gpt_oss", "--tokens", "16", "--pass", "fwd,fwd_bwd",
                "--min-time", "0.01", "--no-ceilings", "--json", str(out), "--plot", "none"])
    rows = json.loads(out.read_text())["rows"]
    assert {(r["impl"], r["shape"], r["pass"]) for r in rows} == {
        ("xla", s, p) for s in ("tiny_deepseek_v3", "tiny_gpt_oss") for p in ("fwd", "fwd_bwd")}
    for r in rows:
        assert "error" not in r and r["ms"] > 0 and r["gemm_ms"] > 0
        shape = shapes.SHAPES[r["shape"]]
        assert r["options"] == shape.describe() != "plain"
        assert r["bytes"] == bench.count_bytes(shape, 16, r["active_experts"], r["pass"])
        assert 1 <= r["active_experts"] <= shape.E


def test_twin_table_compares_at_equal_work():
    """The options' cost beside the plain twin counts each layer's own roof: the options row reached more
    experts (a higher roof), so its raw time is 10% longer but its cost at equal work is 0."""
    row = lambda shape, ms, limit_ms, impl="triton": {"shape": shape, "T": 16, "pass": "fwd", "impl": impl, "ms": ms,
                                                      "limit_ms": limit_ms, "limit_frac": limit_ms / ms}
    rows = [row("gpt", 1.1, 0.99), row("gpt_plain", 1.0, 0.9), row("gpt", 3.0, 0.99, impl="xla"),
            row("other", 1.0, 0.5)]
    lines = report.format_twin_table(rows).splitlines()
    assert len(lines) == 3  # header, rule, the one pair (no twin for "other", xla rows left out)
    assert lines[2].split() == ["gpt", "16", "fwd", "1.1000", "1.0000", "1.100", "0.900", "0.900", "+0.0%"]
    assert report.format_twin_table([row("other", 1.0, 0.5)]) == ""


def test_forward_tuning_on_a_host_descriptor_stack_leaves_the_entry_its_own_configs():
    """benchmarks.tune on a stack that builds TMA descriptors on the host writes its winners into the
    entry's host_descriptors object, which jaxmoe.config applies only on such a stack; a later sweep on
    an older stack keeps that object while BLOCK_M is unchanged."""
    from benchmarks import tune
    from jaxmoe.config import GemmConfig, MoEConfig

    pointer = GemmConfig(128, 64, num_warps=8)
    host_down = GemmConfig(256, 64, num_warps=8, num_stages=4, tma=True, host_tma=True)
    old = {**MoEConfig(128, pointer, pointer).to_json(), "ms": 2.0, "dh": dataclasses.asdict(pointer)}
    entry = tune.forward_entry(old, 1.5, MoEConfig(128, pointer, host_down), host=True)
    assert {k: v for k, v in entry.items() if k != "host_descriptors"} == old
    assert MoEConfig.from_json(entry) == MoEConfig.from_json(old)
    assert MoEConfig.from_json(entry, host_descriptors=True) == MoEConfig(128, pointer, host_down, dh=pointer)
    # Notes of a GEMM timed by another tool go with the GEMM they timed; the backward's fields stay.
    noted = {**old, "host_descriptors": {"down": dataclasses.asdict(pointer), "down_ms": 0.8, "measured": "...",
                                         "dx": dataclasses.asdict(pointer), "bwd_ms": 3.0}}
    retuned = tune.forward_entry(noted, 1.5, MoEConfig(128, pointer, host_down), host=True)["host_descriptors"]
    assert sorted(retuned) == ["bwd_ms", "down", "dx", "gate_up", "ms"] and retuned["down"]["host_tma"]
    new = tune.forward_entry({}, 1.5, MoEConfig(128, pointer, host_down), host=True)  # no entry yet
    assert MoEConfig.from_json(new).down == GemmConfig(256, 64, num_warps=8, num_stages=4)
    assert MoEConfig.from_json(new, host_descriptors=True).down == host_down
    older = GemmConfig(64, 64)
    assert "host_descriptors" in tune.forward_entry(entry, 1.8, MoEConfig(128, older, older), host=False)
    assert "host_descriptors" not in tune.forward_entry(entry, 1.8, MoEConfig(64, older, older), host=False)


def test_backward_tuning_writes_per_stack_fields_only():
    """benchmarks.tune --backward changes only dh, dx and dw. On a host-descriptor stack they go into the
    entry's host_descriptors object (beside the forward configs measured there), so older stacks keep
    the backward they ran; a later forward sweep on that stack keeps them."""
    from benchmarks import tune
    from jaxmoe.config import GemmConfig, MoEConfig, WeightGradConfig

    pointer = GemmConfig(128, 64, num_warps=8)
    host_down = GemmConfig(256, 64, num_warps=8, num_stages=4, tma=True, host_tma=True)
    old = {**MoEConfig(128, pointer, pointer).to_json(), "ms": 2.0,
           "host_descriptors": {"down": dataclasses.asdict(host_down), "ms": 1.9}}
    dh, dx, dw = GemmConfig(64, 128, num_warps=4), GemmConfig(256, 64, num_warps=8), WeightGradConfig(256, 128)
    tuned = MoEConfig(128, pointer, host_down, dh, dx, dw)  # the forward as the host stack picks it
    entry = tune.backward_entry(old, 3.0, tuned, host=True)
    assert MoEConfig.from_json(entry) == MoEConfig.from_json(old)  # older stacks: unchanged
    assert MoEConfig.from_json(entry, host_descriptors=True) == tuned
    after_forward = tune.forward_entry(entry, 1.8, MoEConfig(128, pointer, host_down), host=True)
    assert MoEConfig.from_json(after_forward, host_descriptors=True) == tuned
    new = tune.backward_entry({}, 3.0, tuned, host=True)  # no entry yet: its own GEMMs use no host descriptors
    assert MoEConfig.from_json(new) == MoEConfig(128, pointer, GemmConfig(256, 64, num_warps=8, num_stages=4))
    assert MoEConfig.from_json(new, host_descriptors=True) == dataclasses.replace(
        tuned, gate_up=pointer, down=GemmConfig(256, 64, num_warps=8, num_stages=4))
    plain = tune.backward_entry(old, 3.0, dataclasses.replace(tuned, down=pointer), host=False)
    assert MoEConfig.from_json(plain) == dataclasses.replace(tuned, down=pointer)
    assert plain["host_descriptors"] == old["host_descriptors"] and plain["bwd_ms"] == 3.0


def test_variants_tried_beside_a_picked_config():
    """benchmarks.variants times the picked tiles with TMA toggled and the extra tiles, each config once;
    a picked config with host-built descriptors is tried with pointer loads, never as host_tma without tma."""
    from benchmarks import variants
    from jaxmoe.config import GemmConfig

    for picked in (GemmConfig(256, 64, num_warps=8), GemmConfig(256, 64, num_warps=8, tma=True, host_tma=True)):
        found = variants.variants(picked, "down", 128, tma_too=True)
        assert found[0] == picked and len(set(found)) == len(found)
        assert GemmConfig(256, 64, num_warps=8) in found
        assert not any(c.host_tma and not c.tma for c in found)
