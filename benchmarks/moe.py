"""Times the MoE layer (router matmul + routing + expert FFN + combine) per (shape, T, implementation).

    python -m benchmarks.moe                      # the GPU sweep (or the CPU smoke run without a GPU)
    python -m benchmarks.moe --quick              # fewer T, shorter timing
    python -m benchmarks.moe --shapes mixtral --tokens 512,2048 --impls triton,xla --pass fwd_bwd

Implementations (rows):
  triton   jaxmoe.moe(..., implementation="triton")                   (GPU only)
  xla      jaxmoe.moe(..., implementation="xla"), the jax.lax reference
  tokamax  jaxmoe.reference.moe_pipeline with tokamax.ragged_dot_general(implementation="mosaic") as the
           grouped GEMM (GPU only, and only when `import tokamax` works), through `make_ragged_dot`:
           preferred_element_type is passed through; its VJP is two more tokamax ragged GEMMs with the
           cotangent rounded to bf16 (tokamax's Mosaic kernels reject an f32 cotangent against bf16).
           tokamax runs its heuristic kernel config (no autotuning cache).

Passes: "fwd" times the jitted layer, y and the aux losses; "fwd_bwd" times
jax.value_and_grad(<y, dy>) with respect to x, w_gate, w_up and w_down, dy a fixed random cotangent
(a plain sum would give XLA a ones cotangent to simplify).

Per cell the "bmm roof" is a batched GEMM through XLA with the FLOPs of the expert GEMMs and the tokens
split evenly over all E experts (m = ceil(T*k/E) rows each): gate and up einsums 'emd,edf->emf', SwiGLU,
down einsum 'emf,efd->emd', bf16 in, f32 out, one jitted function (value_and_grad of it for fwd_bwd).
roof_ms/ms > 1 means the layer beat that roof. The roof reads the weights of all E experts while the
layer reads only those of the experts that received tokens, so at small T with many experts the roof
is a loose one.

Counting (documented in benchmarks/RESULTS.md):
  FLOPs   fwd: 2*T*k*d*f*3 (the three expert GEMMs; the 2*T*d*E router matmul is left out)
          fwd_bwd: 3x that (forward, input gradient, weight gradient).
  bytes   fwd: A*3*d*f*2 + 2*T*d*2, A = experts that received tokens (counted from the routing of the
          benchmark inputs, outside timing): active expert weights read, x read, y written.
          fwd_bwd: 2*A*3*d*f*2 (weights read twice) + E*3*d*f*2 (dense weight gradients written)
          + 5*T*d*2 (x read twice, dy read, y and dx written).

Timing: jit; warm-up calls (compilation and every input set) outside timing; then rounds of n calls
between one pair of device syncs (jax.block_until_ready), per-call time = round time / n, reported as
the median over rounds. n is chosen from a short estimate so a round takes ~1/5 of --min-time, and
rounds continue until --min-time has passed (at least 5 rounds). Calls rotate over 3 sets of x (and of
the weights when three sets of them fit in 256 MiB) so small inputs are not served from L2.
On CPU every call is synced (the CPU client may overlap independent calls).

The header's commit is `git rev-parse --short HEAD` (+dirty); without a .git (the GPU machine's copy of
the tree) set BENCH_COMMIT=<sha> in the command.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import gc
import importlib
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jaxmoe
from jaxmoe import reference

from benchmarks import shapes as shapes_lib

REPO = Path(__file__).resolve().parent.parent
OUT_DIR = REPO / "benchmarks" / "out"
IMPLS = ("triton", "xla", "tokamax")
PEERS = ("xla", "tokamax")
PASSES = ("fwd", "fwd_bwd")
DTYPE = jnp.bfloat16
N_INPUT_SETS = 3
WEIGHT_ROTATION_BYTES = 256 << 20  # replicate the weights per input set only when all sets fit in this
MIN_ROUNDS = 5
MAX_ROUNDS = 50
MAX_CALLS_PER_ROUND = 1000


def log(msg: str = "") -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------------------------------
# Environment


def _version(module: str) -> str:
    try:
        return str(getattr(importlib.import_module(module), "__version__", "?"))
    except Exception:  # not installed, or broken on this machine
        return "n/a"


def git_commit() -> str:
    """`git rev-parse --short HEAD` (+dirty); where there is no git checkout (the GPU machine gets a copy of
    the working tree without .git) the BENCH_COMMIT environment variable, else "unknown"."""
    fallback = os.environ.get("BENCH_COMMIT", "unknown")
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return fallback
        commit = head.stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10)
        if dirty.returncode == 0 and dirty.stdout.strip():
            commit += "+dirty"
        return commit
    except Exception:
        return fallback


def environment() -> dict:
    return {
        "card": jax.devices()[0].device_kind,
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "jaxlib": _version("jaxlib"),
        "triton": _version("triton"),
        "jax_triton": _version("jax_triton"),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(),
    }


# --------------------------------------------------------------------------------------------------
# Timing


@dataclasses.dataclass
class Timing:
    ms: float  # median per-call time over rounds
    calls_per_round: int
    rounds: int
    compile_s: float  # first call, compilation included
    min_ms: float
    max_ms: float


def time_fn(fn, arg_sets, *, min_time_s: float, sync_each: bool) -> Timing:
    """Median per-call time of fn over rounds of n calls between one pair of device syncs."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*arg_sets[0]))
    compile_s = time.perf_counter() - t0
    for args in arg_sets[1:]:
        jax.block_until_ready(fn(*args))

    start = 0

    def run(n: int) -> float:
        nonlocal start
        out = None
        t = time.perf_counter()
        for i in range(n):
            # Only the latest output is kept alive: on a GPU the stream runs calls in order, so its
            # completion implies all earlier ones completed.
            out = fn(*arg_sets[(start + i) % len(arg_sets)])
            if sync_each:
                jax.block_until_ready(out)
        jax.block_until_ready(out)
        start += n
        return time.perf_counter() - t

    estimate = run(3) / 3
    n = int(min(max(1, (min_time_s / MIN_ROUNDS) / max(estimate, 1e-7)), MAX_CALLS_PER_ROUND))
    samples, total = [], 0.0
    while (len(samples) < MIN_ROUNDS or total < min_time_s) and len(samples) < MAX_ROUNDS:
        dt = run(n)
        samples.append(dt / n)
        total += dt
    return Timing(ms=statistics.median(samples) * 1e3, calls_per_round=n, rounds=len(samples),
                  compile_s=compile_s, min_ms=min(samples) * 1e3, max_ms=max(samples) * 1e3)


# --------------------------------------------------------------------------------------------------
# Ceilings


def measure_ceilings(on_gpu: bool, min_time_s: float, sync_each: bool) -> dict:
    """HBM read bandwidth (a large f32 reduction) and the dense bf16 matmul rate (an XLA dot)."""
    normal = Normal(1234, on_host=not on_gpu)
    n_elems = (1 << 29) if on_gpu else (1 << 24)  # 2 GiB on a GPU, 64 MiB on CPU
    a = normal((n_elems,), dtype=jnp.float32)
    t = time_fn(jax.jit(jnp.sum), [(a,)], min_time_s=min_time_s, sync_each=sync_each)
    hbm_gbps = a.nbytes / (t.ms * 1e-3) / 1e9
    sum_bytes = a.nbytes
    del a
    n = 8192 if on_gpu else 512
    A, B = normal((n, n)), normal((n, n))
    t = time_fn(jax.jit(jnp.dot), [(A, B)], min_time_s=min_time_s, sync_each=sync_each)
    mm_tflops = 2 * n**3 / (t.ms * 1e-3) / 1e12
    del A, B
    gc.collect()
    return {"hbm_read_gbps": hbm_gbps, "hbm_probe": f"jnp.sum over {sum_bytes / 2**30:.3g} GiB f32",
            "matmul_tflops": mm_tflops, "matmul_probe": f"{n}^3 bf16 jnp.dot"}


# --------------------------------------------------------------------------------------------------
# Implementations


# jax.lax.RaggedDotDimensionNumbers for lhs [M, K] with rows grouped, rhs [G, K, N]:
_DIMS_FWD = jax.lax.RaggedDotDimensionNumbers(  # out [M, N] = lhs @ rhs[g] per row group
    dot_dimension_numbers=(([1], [1]), ([], [])), lhs_ragged_dimensions=[0], rhs_group_dimensions=[0])
_DIMS_DLHS = jax.lax.RaggedDotDimensionNumbers(  # dlhs [M, K] = dout [M, N] @ rhs[g]^T per row group
    dot_dimension_numbers=(([1], [2]), ([], [])), lhs_ragged_dimensions=[0], rhs_group_dimensions=[0])
_DIMS_DRHS = jax.lax.RaggedDotDimensionNumbers(  # drhs [G, K, N] = lhs_g^T @ dout_g, rows contracted
    dot_dimension_numbers=(([0], [0]), ([], [])), lhs_ragged_dimensions=[0], rhs_group_dimensions=[])


def make_ragged_dot(general):
    """A jax.lax.ragged_dot-style fn over general(lhs, rhs, group_sizes, dims, precision, preferred_element_type).

    The forward passes preferred_element_type through (the pipeline asks for float32 outputs). The
    backward is written out as two ragged GEMMs of the same backend with the cotangent rounded to the
    operands' dtype: tokamax's Mosaic GPU kernels reject a float32 cotangent against bf16 operands.
    """

    @functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
    def ragged_dot(lhs, rhs, group_sizes, precision, preferred_element_type):
        return general(lhs, rhs, group_sizes, _DIMS_FWD, precision, preferred_element_type)

    def fwd(lhs, rhs, group_sizes, precision, preferred_element_type):
        out = general(lhs, rhs, group_sizes, _DIMS_FWD, precision, preferred_element_type)
        return out, (lhs, rhs, group_sizes)

    def bwd(precision, preferred_element_type, residuals, dout):
        lhs, rhs, group_sizes = residuals
        dout = dout.astype(lhs.dtype)
        dlhs = general(dout, rhs, group_sizes, _DIMS_DLHS, precision, lhs.dtype)
        drhs = general(lhs, dout, group_sizes, _DIMS_DRHS, precision, rhs.dtype)
        return dlhs, drhs, None

    ragged_dot.defvjp(fwd, bwd)

    def call(lhs, rhs, group_sizes, *, precision=None, preferred_element_type=None):
        return ragged_dot(lhs, rhs, group_sizes.astype(jnp.int32), precision, preferred_element_type)

    return call


def _tokamax_general(lhs, rhs, group_sizes, dims, precision, preferred_element_type):
    import tokamax

    return tokamax.ragged_dot_general(lhs, rhs, group_sizes, dims, precision=precision,
                                      preferred_element_type=preferred_element_type, implementation="mosaic")


tokamax_ragged_dot = make_ragged_dot(_tokamax_general)


def impl_availability(impls, on_gpu: bool) -> dict[str, str | None]:
    """impl -> None when it can run here, else the reason it is skipped."""
    reasons: dict[str, str | None] = {}
    for impl in impls:
        if impl == "xla":
            reasons[impl] = None
        elif not on_gpu:
            reasons[impl] = ("the Triton rows need a GPU (jaxmoe.moe(implementation='triton') runs only "
                             "on a GPU with jax-triton)" if impl == "triton" else
                             "tokamax's Mosaic GPU ragged_dot needs a GPU")
        elif impl == "tokamax":
            try:
                import tokamax  # noqa: F401

                # Without a tuned cache for these shapes tokamax uses its heuristic config and logs an
                # "Autotuning cache miss" warning (through absl) at every trace; keep them out of the log.
                logging.getLogger("absl").setLevel(logging.ERROR)
                reasons[impl] = None
            except Exception as err:
                reasons[impl] = f"`import tokamax` failed ({type(err).__name__}: {err})"
        else:
            reasons[impl] = None
    return reasons


def make_forward(impl: str, k: int):
    """(x, router_weight, w_gate, w_up, w_down) -> (y, MoEAux) for one implementation."""
    if impl == "tokamax":
        expert_ffn = functools.partial(reference.grouped_expert_ffn, ragged_dot=tokamax_ragged_dot)
        return functools.partial(reference.moe_pipeline, top_k=k, scoring="softmax", renormalize=True,
                                 bias=None, route_fn=jaxmoe.route, expert_ffn_fn=expert_ffn)
    return functools.partial(jaxmoe.moe, top_k=k, scoring="softmax", renormalize=True, implementation=impl)


def make_step(forward, pass_: str):
    """A jitted fn(x, router_weight, w_gate, w_up, w_down, dy) for the pass (dy unused by "fwd")."""
    if pass_ == "fwd":
        return jax.jit(lambda x, rw, wg, wu, wd, dy: forward(x, rw, wg, wu, wd))

    def loss(x, wg, wu, wd, rw, dy):
        y, _ = forward(x, rw, wg, wu, wd)
        return jnp.sum(y.astype(jnp.float32) * dy.astype(jnp.float32))

    value_and_grad = jax.value_and_grad(loss, argnums=(0, 1, 2, 3))
    return jax.jit(lambda x, rw, wg, wu, wd, dy: value_and_grad(x, wg, wu, wd, rw, dy))


def _bmm_ffn(xe, wg, wu, wd):
    gate = jnp.einsum("emd,edf->emf", xe, wg, preferred_element_type=jnp.float32)
    up = jnp.einsum("emd,edf->emf", xe, wu, preferred_element_type=jnp.float32)
    h = (jax.nn.silu(gate) * up).astype(xe.dtype)
    return jnp.einsum("emf,efd->emd", h, wd, preferred_element_type=jnp.float32)


def make_roof(pass_: str):
    """A jitted fn(xe [E, m, d], w_gate, w_up, w_down, dye [E, m, d]): the batched-GEMM roof."""
    if pass_ == "fwd":
        return jax.jit(lambda xe, wg, wu, wd, dye: _bmm_ffn(xe, wg, wu, wd))

    def loss(xe, wg, wu, wd, dye):
        return jnp.sum(_bmm_ffn(xe, wg, wu, wd) * dye.astype(jnp.float32))

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))


# --------------------------------------------------------------------------------------------------
# Inputs and counting


class Normal:
    """Draws N(0, scale^2) bf16 arrays: with jax.random on an accelerator (GBs of weights), with numpy
    on CPU (no RNG programs to compile for the small CPU shapes)."""

    def __init__(self, seed: int, on_host: bool):
        self.on_host = on_host
        self.rng = np.random.default_rng(seed)
        self.key = jax.random.key(seed)

    def __call__(self, shape, scale: float = 1.0, dtype=DTYPE) -> jax.Array:
        if self.on_host:
            a = self.rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)
            return jnp.asarray(a.astype(dtype))
        self.key, key = jax.random.split(self.key)
        return _device_normal(key, tuple(shape), float(scale), jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _device_normal(key, shape, scale, dtype):
    return jax.random.normal(key, shape, dtype) * jnp.asarray(scale, dtype)


def make_weights(shape: shapes_lib.MoEShape, normal: Normal, n_sets: int):
    """n_sets tuples (router_weight [d, E], w_gate, w_up [E, d, f], w_down [E, f, d]), all bf16.

    Router weights are N(0, 1/d) so logits of N(0, 1) inputs are ~N(0, 1): the routing is spread.
    Expert weights are N(0, 1/fan_in).
    """
    E, d, f = shape.E, shape.d, shape.f
    sets = []
    for _ in range(n_sets):
        sets.append(jax.block_until_ready((normal((d, E), 1 / math.sqrt(d)), normal((E, d, f), 1 / math.sqrt(d)),
                                           normal((E, d, f), 1 / math.sqrt(d)), normal((E, f, d), 1 / math.sqrt(f)))))
    return sets


@functools.partial(jax.jit, static_argnames=("k",))
def _active_experts(x, router_weight, *, k: int):
    routing = jaxmoe.route(reference.router_logits(x, router_weight), k, scoring="softmax", renormalize=True)
    E = router_weight.shape[1]
    return jnp.sum(jnp.zeros(E, jnp.int32).at[routing.ids.reshape(-1)].add(1) > 0)


def count_flops(shape, T: int, pass_: str) -> float:
    fwd = 2.0 * T * shape.k * shape.d * shape.f * 3
    return fwd if pass_ == "fwd" else 3 * fwd


def count_bytes(shape, T: int, active: float, pass_: str, itemsize: int = 2) -> float:
    w = 3.0 * shape.d * shape.f * itemsize  # one expert's three weights
    act = float(T) * shape.d * itemsize
    if pass_ == "fwd":
        return active * w + 2 * act
    return 2 * active * w + shape.E * w + 5 * act


# --------------------------------------------------------------------------------------------------
# The sweep


def _parse_list(text: str | None, cast=str):
    if text is None:
        return None
    return [cast(v.strip()) for v in text.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.moe", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", help=f"comma list of {', '.join(shapes_lib.SHAPES)} "
                                    f"(default: {','.join(shapes_lib.GPU_SHAPES)} on GPU, tiny on CPU)")
    p.add_argument("--tokens", help="comma list of T (default: 16,128,512,2048,8192 on GPU; 16,128 on CPU)")
    p.add_argument("--impls", help=f"comma list of {', '.join(IMPLS)} (default: all)")
    p.add_argument("--pass", dest="passes", default="fwd",
                   help="fwd (default) or fwd_bwd (value_and_grad w.r.t. x and the expert weights); "
                        "a comma list runs both")
    p.add_argument("--json", default=str(OUT_DIR / "moe.json"), help="where the rows go (default: %(default)s)")
    p.add_argument("--plot", default=str(OUT_DIR / "moe.png"),
                   help="PNG plot path (default: %(default)s); 'none' skips it")
    p.add_argument("--quick", action="store_true", help="fewer T (128,2048 on GPU; 16 on CPU), shorter timing")
    p.add_argument("--min-time", type=float, default=None,
                   help="seconds of timed calls per cell (default 0.3 on GPU, 0.1 with --quick or on CPU)")
    p.add_argument("--no-ceilings", action="store_true", help="skip the HBM and matmul ceiling probes")
    return p


def _check(values, allowed, what):
    bad = [v for v in values if v not in allowed]
    if bad:
        raise SystemExit(f"unknown {what} {bad}; choose from {', '.join(allowed)}")
    return values


def run_sweep(shapes, tokens, impls, passes, *, on_gpu: bool, min_time_s: float, env: dict) -> list[dict]:
    sync_each = not on_gpu
    rows: list[dict] = []
    normal = Normal(0, on_host=not on_gpu)
    for shape in shapes:
        log(f"== {shape.name}: E={shape.E} k={shape.k} d={shape.d} f={shape.f} "
            f"({shape.expert_weight_bytes() / 2**30:.2f} GiB of expert weights)")
        n_wsets = N_INPUT_SETS if N_INPUT_SETS * shape.expert_weight_bytes() <= WEIGHT_ROTATION_BYTES else 1
        t0 = time.perf_counter()
        wsets = make_weights(shape, normal, n_wsets)
        log(f"   weights: {n_wsets} set(s) in {time.perf_counter() - t0:.1f}s")
        for T in tokens:
            xs = [normal((T, shape.d)) for _ in range(N_INPUT_SETS)]
            dys = [normal((T, shape.d)) for _ in range(N_INPUT_SETS)]
            arg_sets = [(xs[i], *wsets[i % n_wsets], dys[i]) for i in range(N_INPUT_SETS)]
            per_set = [int(_active_experts(x, wsets[i % n_wsets][0], k=shape.k)) for i, x in enumerate(xs)]
            active = sum(per_set) / len(per_set)
            m = -(-T * shape.k // shape.E)  # ceil(T*k/E) rows per expert in the roof
            xes = [normal((shape.E, m, shape.d)) for _ in range(N_INPUT_SETS)]
            dyes = [normal((shape.E, m, shape.d)) for _ in range(N_INPUT_SETS)]
            roof_sets = [(xes[i], *wsets[i % n_wsets][1:], dyes[i]) for i in range(N_INPUT_SETS)]
            for pass_ in passes:
                tag = f"[{shape.name} T={T} {pass_}]"
                flops, nbytes = count_flops(shape, T, pass_), count_bytes(shape, T, active, pass_)
                try:
                    rt = time_fn(make_roof(pass_), roof_sets, min_time_s=min_time_s, sync_each=sync_each)
                    roof_ms = rt.ms
                    log(f"{tag} {'roof':8s} {rt.ms:9.4f} ms  (m={m} rows/expert, {rt.calls_per_round}x"
                        f"{rt.rounds} calls, compile {rt.compile_s:.1f}s)")
                except Exception as err:  # e.g. out of memory
                    roof_ms = None
                    log(f"{tag} roof FAILED: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
                cell = []
                for impl in impls:
                    row = {"shape": shape.name, "E": shape.E, "k": shape.k, "d": shape.d, "f": shape.f,
                           "T": T, "impl": impl, "pass": pass_, "ms": None, "roof_ms": roof_ms,
                           "roof_frac": None, "tflops": None, "gbps": None, "flops": flops, "bytes": nbytes,
                           "active_experts": active, "roof_m": m, **env}
                    step = None
                    try:
                        step = make_step(make_forward(impl, shape.k), pass_)
                        t = time_fn(step, arg_sets, min_time_s=min_time_s, sync_each=sync_each)
                        row.update(ms=t.ms, tflops=flops / (t.ms * 1e-3) / 1e12,
                                   gbps=nbytes / (t.ms * 1e-3) / 1e9, min_ms=t.min_ms, max_ms=t.max_ms,
                                   calls_per_round=t.calls_per_round, rounds=t.rounds, compile_s=t.compile_s)
                        if roof_ms is not None:
                            row["roof_frac"] = roof_ms / t.ms
                        log(f"{tag} {impl:8s} {t.ms:9.4f} ms  {_num(row['tflops']):>6s} TFLOP/s "
                            f"{_num(row['gbps']):>6s} GB/s  ({t.calls_per_round}x{t.rounds} calls, "
                            f"compile {t.compile_s:.1f}s)")
                    except Exception as err:
                        row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:500]
                        log(f"{tag} {impl} FAILED: {row['error'][:300]}")
                    del step
                    cell.append(row)
                triton = next((r for r in cell if r["impl"] == "triton" and r["ms"]), None)
                if triton is not None:
                    for r in cell:
                        if r["impl"] in PEERS and r["ms"]:
                            triton[f"speedup_vs_{r['impl']}"] = r["ms"] / triton["ms"]
                rows.extend(cell)
            del xs, dys, arg_sets, xes, dyes, roof_sets
            gc.collect()
        del wsets
        gc.collect()
    return rows


# --------------------------------------------------------------------------------------------------
# Output


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def _num(v) -> str:
    """A rate with about three significant digits (CPU rates are tiny, GPU rates are in the hundreds)."""
    if v is None:
        return "-"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"


def format_table(rows: list[dict]) -> str:
    headers = ["shape", "T", "pass", "impl", "ms", "TFLOP/s", "GB/s", "roof_ms", "roof/ms",
               "vs xla", "vs tokamax"]
    body = []
    for r in rows:
        if r.get("error"):
            body.append([r["shape"], str(r["T"]), r["pass"], r["impl"], "FAILED", "", "", "", "", "", ""])
            continue
        vs = [f"{r[f'speedup_vs_{p}']:.2f}x" if f"speedup_vs_{p}" in r else "" for p in PEERS]
        body.append([r["shape"], str(r["T"]), r["pass"], r["impl"], _fmt(r["ms"], ".4f"),
                     _num(r["tflops"]), _num(r["gbps"]), _fmt(r["roof_ms"], ".4f"),
                     _fmt(r["roof_frac"], ".2f"), *vs])
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(headers)]
    left = {0, 2, 3}

    def line(cells):
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [line(headers), "  ".join("-" * w for w in widths)]
    prev = None
    for b in body:
        if prev is not None and b[0] != prev:
            out.append("")
        prev = b[0]
        out.append(line(b))
    return "\n".join(out)


def header_line(env: dict, ceilings: dict | None) -> str:
    s = (f"card: {env['card']} | jax {env['jax']} (jaxlib {env['jaxlib']}) | triton {env['triton']} | "
         f"jax-triton {env['jax_triton']} | {env['date']} | commit {env['commit']}")
    if ceilings:
        s += (f"\nceilings: HBM read {_num(ceilings['hbm_read_gbps'])} GB/s ({ceilings['hbm_probe']}) | "
              f"dense bf16 {_num(ceilings['matmul_tflops'])} TFLOP/s ({ceilings['matmul_probe']})")
    else:
        s += "\nceilings: not measured"
    return s


def write_plot(rows: list[dict], path: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as err:
        return f"plot skipped: matplotlib unavailable ({type(err).__name__}: {err})"
    ok = [r for r in rows if r.get("ms")]
    shape_names = list(dict.fromkeys(r["shape"] for r in ok))
    if not shape_names:
        return "plot skipped: no rows timed"
    passes = list(dict.fromkeys(r["pass"] for r in ok))
    fig, axes = plt.subplots(2, len(shape_names), figsize=(4.8 * len(shape_names), 7.5), squeeze=False)
    styles = {"fwd": "-", "fwd_bwd": "--"}
    colors = {"triton": "tab:red", "xla": "tab:blue", "tokamax": "tab:green"}
    for col, name in enumerate(shape_names):
        ax_ms, ax_frac = axes[0, col], axes[1, col]
        for pass_ in passes:
            suffix = f" {pass_}" if len(passes) > 1 else ""
            for impl in IMPLS:
                pts = sorted((r["T"], r["ms"], r["roof_frac"]) for r in ok
                             if r["shape"] == name and r["pass"] == pass_ and r["impl"] == impl)
                if not pts:
                    continue
                Ts = [p[0] for p in pts]
                ax_ms.plot(Ts, [p[1] for p in pts], styles.get(pass_, "-"), marker="o",
                           color=colors.get(impl), label=impl + suffix)
                fr = [(p[0], p[2]) for p in pts if p[2] is not None]
                if fr:
                    ax_frac.plot([p[0] for p in fr], [p[1] for p in fr], styles.get(pass_, "-"), marker="o",
                                 color=colors.get(impl), label=impl + suffix)
            roof = sorted({(r["T"], r["roof_ms"]) for r in ok
                           if r["shape"] == name and r["pass"] == pass_ and r["roof_ms"]})
            if roof:
                ax_ms.plot([p[0] for p in roof], [p[1] for p in roof], styles.get(pass_, "-"), color="black",
                           alpha=0.6, label="bmm roof" + suffix)
        ax_frac.axhline(1.0, color="black", alpha=0.6, lw=1)
        for ax in (ax_ms, ax_frac):
            ax.set_xscale("log", base=2)
            ax.grid(True, which="both", alpha=0.3)
            ax.set_xlabel("T (tokens)")
        ax_ms.set_yscale("log")
        ax_ms.set_title(name)
        ax_ms.set_ylabel("ms (median)")
        ax_frac.set_ylabel("roof_ms / ms (higher is better)")
        ax_ms.legend(fontsize=8)
    card = ok[0]["card"]
    fig.suptitle(f"jaxmoe MoE layer, bf16, {card}\ncommit {ok[0]['commit']}, {ok[0]['date']}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"plot written to {path}"


# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> list[dict]:
    args = build_parser().parse_args(argv)
    backend = jax.default_backend()
    on_gpu = backend != "cpu"
    env = environment()

    shapes = _check(_parse_list(args.shapes), shapes_lib.SHAPES, "shape") if args.shapes else None
    impls = _check(_parse_list(args.impls), IMPLS, "implementation") if args.impls else list(IMPLS)
    passes = _check(_parse_list(args.passes), PASSES, "pass")
    tokens = _parse_list(args.tokens, int)
    if tokens is not None and any(t < 1 for t in tokens):
        raise SystemExit(f"--tokens must be positive, got {tokens}")

    if on_gpu:
        shapes = shapes or list(shapes_lib.GPU_SHAPES)
        tokens = tokens or list(shapes_lib.QUICK_GPU_TOKENS if args.quick else shapes_lib.GPU_TOKENS)
        min_time = args.min_time or (0.1 if args.quick else 0.3)
    else:
        log("NOTE: no GPU (jax backend is 'cpu'): timing only CPU-sized shapes with implementation='xla'.")
        log("NOTE: the Triton rows need a GPU; run this on the GPU machine for triton/tokamax numbers.")
        requested = shapes or list(shapes_lib.CPU_SHAPES)
        shapes = [s for s in requested if "cpu" in shapes_lib.SHAPES[s].tags]
        for s in requested:
            if s not in shapes:
                log(f"NOTE: shape {s!r} skipped on CPU (too large); it runs on a GPU")
        tokens = tokens or list((16,) if args.quick else shapes_lib.CPU_TOKENS)
        min_time = args.min_time or 0.1

    reasons = impl_availability(impls, on_gpu)
    for impl, why in reasons.items():
        if why:
            log(f"NOTE: {impl} rows skipped: {why}")
    impls = [i for i in IMPLS if i in impls and reasons[i] is None]
    if "tokamax" in impls:
        env["tokamax"] = _version("tokamax")
        log(f"NOTE: tokamax {env['tokamax']} ragged_dot(implementation='mosaic') runs its heuristic config "
            "(no autotuning); its cache-miss warnings are silenced")

    log(header_line(env, None).splitlines()[0])
    log(f"shapes={','.join(shapes)} T={','.join(map(str, tokens))} impls={','.join(impls) or '(none)'} "
        f"pass={','.join(passes)} min_time={min_time}s per cell, dtype=bf16, softmax top-k")

    ceilings = None
    if not args.no_ceilings:
        t0 = time.perf_counter()
        ceilings = measure_ceilings(on_gpu, min_time, sync_each=not on_gpu)
        log(f"ceilings ({time.perf_counter() - t0:.1f}s): HBM read {_num(ceilings['hbm_read_gbps'])} GB/s, "
            f"dense bf16 {_num(ceilings['matmul_tflops'])} TFLOP/s"
            + ("" if on_gpu else " (CPU probes are small: indicative only)"))

    t0 = time.perf_counter()
    resolved = [shapes_lib.get(s) for s in shapes]
    rows = run_sweep(resolved, tokens, impls, passes, on_gpu=on_gpu, min_time_s=min_time, env=env) if impls else []
    if ceilings:
        for r in rows:
            r["hbm_read_gbps"], r["matmul_tflops"] = ceilings["hbm_read_gbps"], ceilings["matmul_tflops"]
    log(f"sweep took {time.perf_counter() - t0:.1f}s")

    log("")
    log(header_line(env, ceilings))
    log(format_table(rows))
    if not on_gpu:
        log("(CPU run: the triton and tokamax rows need a GPU)")

    json_path = Path(args.json)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    meta = {**env, "ceilings": ceilings, "argv": list(argv) if argv is not None else sys.argv[1:],
            "min_time_s": min_time, "shapes": shapes, "tokens": tokens, "impls": impls, "passes": passes}
    with open(json_path, "w") as fh:
        json.dump({"meta": meta, "rows": rows}, fh, indent=1, default=float)
    log(f"json written to {json_path}")
    if args.plot and args.plot.lower() != "none":
        log(write_plot(rows, Path(args.plot)))
    return rows


if __name__ == "__main__":
    main()
