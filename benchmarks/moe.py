"""Times the MoE layer (router matmul + routing + expert FFN + combine) per (shape, T, implementation).

    python -m benchmarks.moe                      # the GPU sweep (or the CPU smoke run without a GPU)
    python -m benchmarks.moe --quick              # fewer T, shorter timing
    python -m benchmarks.moe --shapes mixtral --tokens 512,2048 --impls triton,xla --pass fwd_bwd --memory

This module is the sweep and its command line; the rest of the harness is split by role:
  benchmarks/peers.py    what runs: the implementations triton (GPU only), xla and tokamax (GPU only),
                         the step of each pass, and the GEMM roof
  benchmarks/timing.py   how it is measured: time per call, planned device memory, the ceilings probe
  benchmarks/report.py   what is printed and drawn: header lines, table, plot
  benchmarks/shapes.py   the named shapes

Every row runs the shape's router and expert options and its extra arrays (router bias, selection bias,
expert biases; benchmarks/shapes.py), as real arguments of the jitted step. Shapes with options
(deepseek_v3, gpt_oss_120b) run only when named:

    python -m benchmarks.moe --shapes deepseek_v3,gpt_oss_120b --pass fwd,fwd_bwd

Passes: "fwd" times the jitted layer, y and the aux losses; "fwd_bwd" times
jax.value_and_grad(<y, dy>) with respect to x, w_gate, w_up and w_down (and b_gate, b_up and b_down where
the shape has expert biases), dy a fixed random cotangent.

Per cell two roofs, and the limit, the larger of the two (limit_ms / ms > 1: faster than both):
  GEMM roof (gemm_ms)  XLA batched einsums with the FLOPs of the expert GEMMs and the tokens split evenly
          over the A experts that received tokens (A counted as below, rounded; m = ceil(T*k/A) rows each):
          gate and up as one einsum against a [A, d, 2f] weight, down as an einsum on an input of its own
          [A, m, f]; bf16 outputs, no elementwise work (no biases, no activation); value_and_grad for
          fwd_bwd. The roof's weights are made for each cell and freed before the rows run. Splitting
          over all E experts instead would read weights no token needs and make the roof slower (at
          qwen3 T=16, 128 experts' weights where about 81 are read), which flatters the layer.
  HBM roof (hbm_ms)    the counted bytes below at the HBM read bandwidth measured in the same run (none with
          --no-ceilings).

Counting (documented in benchmarks/RESULTS.md):
  FLOPs   fwd: 2*T*k*d*f*3 (the three expert GEMMs; the 2*T*d*E router matmul is left out, and so are
          the elementwise biases and activation)
          fwd_bwd: 3x that (forward, input gradient, weight gradient).
  bytes   fwd: A*w + 2*T*d*2, w = 3*d*f*2 (one expert's weights) + (2*f + d)*2 (its biases, where the shape
          has expert biases), A = experts that received tokens (counted from the shape's routing of the
          benchmark inputs, outside timing): active expert weights read, x read, y written.
          fwd_bwd: 2*A*w (weights read twice) + E*w (dense weight and bias gradients written)
          + 5*T*d*2 (x read twice, dy read, y and dx written). The router's weight and biases are left
          out, as its matmul is.

--memory adds each step's device memory as XLA plans it (arguments + outputs + temporaries - aliased,
from the compiled step's memory_analysis()): the peak_gib column and a breakdown line in the log.

Timing (benchmarks/timing.py): jit; warm-up calls outside timing; the median over rounds of n calls between
one pair of device syncs. Calls rotate over 3 sets of x (and of the weights when three sets of them fit
in 256 MiB) so small inputs are not served from L2. On CPU every call is synced (the CPU client may
overlap independent calls).

The header's commit is `git rev-parse --short HEAD` (+dirty); without a .git (the GPU machine's copy of
the tree) set BENCH_COMMIT=<sha> in the command.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import importlib.metadata
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jaxmoe
from jaxmoe import pipeline

from benchmarks import shapes as shapes_lib
from benchmarks.peers import IMPLS, PASSES, PEERS, impl_availability, make_forward, make_gemm_roof, make_step
from benchmarks import report
from benchmarks.report import fmt_num, header_line, memory_line, write_plot
from benchmarks.timing import measure_ceilings, planned_memory, time_fn

REPO = Path(__file__).resolve().parent.parent
OUT_DIR = REPO / "benchmarks" / "out"
DTYPE = jnp.bfloat16
N_INPUT_SETS = 3
WEIGHT_ROTATION_BYTES = 256 << 20  # replicate the weights per input set only when all sets fit in this


def log(msg: str = "") -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------------------------------
# Environment


def _version(distribution: str) -> str:
    # Read from the installed metadata, not by importing: a first `import jax_triton` (0.3.x) in this
    # process would leave Triton without a cache dir (see jaxmoe/launch.py).
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "n/a"


def git_commit() -> str:
    """The BENCH_COMMIT environment variable when set (the GPU machine's copy of the tree may carry a stale
    .git), else `git rev-parse --short HEAD` (+dirty), else "unknown"."""
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]
    fallback = "unknown"
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


BIAS_SCALE = 0.1  # router and expert biases: N(0, 0.1^2), small beside the N(0, 1) logits and pre-activations
SELECTION_BIAS_SCALE = 0.01  # beside sigmoid scores in (0, 1): it moves a few close selections


def make_weights(shape: shapes_lib.MoEShape, normal: Normal, n_sets: int):
    """n_sets tuples (router_weight [d, E], w_gate, w_up [E, d, f], w_down [E, f, d], extras), bf16.

    Router weights are N(0, 1/d) so logits of N(0, 1) inputs are ~N(0, 1): the routing is spread.
    Expert weights are N(0, 1/fan_in). extras: the shape's extra arrays by their `jaxmoe.moe` names,
    drawn after the weights (none for a plain shape, whose draws are as before): router_bias [E] and
    b_gate, b_up [E, f], b_down [E, d] in bf16, selection_bias [E] in float32 (as DeepSeek-V3 keeps it).
    """
    E, d, f = shape.E, shape.d, shape.f
    sets = []
    for _ in range(n_sets):
        weights = (normal((d, E), 1 / math.sqrt(d)), normal((E, d, f), 1 / math.sqrt(d)),
                   normal((E, d, f), 1 / math.sqrt(d)), normal((E, f, d), 1 / math.sqrt(f)))
        extras = {}
        if shape.router_bias:
            extras["router_bias"] = normal((E,), BIAS_SCALE)
        if shape.selection_bias:
            extras["selection_bias"] = normal((E,), SELECTION_BIAS_SCALE, jnp.float32)
        if shape.expert_biases:
            extras.update(b_gate=normal((E, f), BIAS_SCALE), b_up=normal((E, f), BIAS_SCALE),
                          b_down=normal((E, d), BIAS_SCALE))
        sets.append(jax.block_until_ready((*weights, extras)))
    return sets


@functools.partial(jax.jit, static_argnames=("router",))
def _active_experts(x, router_weight, extras, *, router):
    """How many experts receive tokens under the shape's routing (its router, router and selection biases)."""
    logits = pipeline.router_logits(x, router_weight, extras.get("router_bias"))
    routing = jaxmoe.route(logits, router=router, selection_bias=extras.get("selection_bias"))
    E = router_weight.shape[1]
    return jnp.sum(jnp.zeros(E, jnp.int32).at[routing.ids.reshape(-1)].add(1) > 0)


def count_flops(shape, T: int, pass_: str) -> float:
    fwd = 2.0 * T * shape.k * shape.d * shape.f * 3
    return fwd if pass_ == "fwd" else 3 * fwd


def count_bytes(shape, T: int, active: float, pass_: str, itemsize: int = 2) -> float:
    w = 3.0 * shape.d * shape.f * itemsize + shape.expert_bias_bytes(itemsize)  # one expert's weights and biases
    act = float(T) * shape.d * itemsize
    if pass_ == "fwd":
        return active * w + 2 * act
    return 2 * active * w + shape.E * w + 5 * act



def roof_split(shape, T: int, active: float) -> tuple[int, int]:
    """(experts, rows each) of the GEMM roof: the T*k rows spread evenly over the experts that received
    tokens (active, a mean over input sets, rounded to the nearest count)."""
    n = max(1, min(shape.E, round(active)))
    return n, -(-T * shape.k // n)


def hbm_roof_ms(nbytes: float, hbm_read_gbps: float | None) -> float | None:
    """Milliseconds to move the counted bytes at the measured HBM read bandwidth (None: not measured)."""
    if not hbm_read_gbps:
        return None
    return nbytes / (hbm_read_gbps * 1e9) * 1e3


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
                                    f"(default: {','.join(shapes_lib.GPU_SHAPES)} on GPU, "
                                    f"{','.join(shapes_lib.CPU_SHAPES)} on CPU; the shapes with router and "
                                    f"expert options, {','.join(shapes_lib.OPTION_SHAPES)}, run when named)")
    p.add_argument("--tokens", help="comma list of T (default: 16,64,128,512,2048,8192 on GPU; 16,128 on CPU)")
    p.add_argument("--impls", help=f"comma list of {', '.join(IMPLS)} (default: all)")
    p.add_argument("--pass", dest="passes", default="fwd",
                   help="fwd (default) or fwd_bwd (value_and_grad w.r.t. x and the expert weights and biases); "
                        "a comma list runs both")
    p.add_argument("--json", default=str(OUT_DIR / "moe.json"), help="where the rows go (default: %(default)s)")
    p.add_argument("--plot", default=str(OUT_DIR / "moe.png"),
                   help="PNG plot path (default: %(default)s); 'none' skips it")
    p.add_argument("--quick", action="store_true", help="fewer T (128,2048 on GPU; 16 on CPU), shorter timing")
    p.add_argument("--min-time", type=float, default=None,
                   help="seconds of timed calls per cell (default 0.3 on GPU, 0.1 with --quick or on CPU)")
    p.add_argument("--no-ceilings", action="store_true",
                   help="skip the HBM and matmul ceiling probes (and so the HBM roof)")
    p.add_argument("--memory", action="store_true",
                   help="also report each step's device memory as XLA plans it (peak_gib, a breakdown in the log)")
    return p


def _check(values, allowed, what):
    bad = [v for v in values if v not in allowed]
    if bad:
        raise SystemExit(f"unknown {what} {bad}; choose from {', '.join(allowed)}")
    return values


def run_sweep(shapes, tokens, impls, passes, *, on_gpu: bool, min_time_s: float, env: dict,
              hbm_read_gbps: float | None, memory: bool, on_cell=None) -> list[dict]:
    """The rows of every (shape, T, pass) cell; on_cell(rows so far) after each cell, so that a run cut off
    by a time limit keeps what it measured."""
    sync_each = not on_gpu
    rows: list[dict] = []
    normal = Normal(0, on_host=not on_gpu)
    for shape in shapes:
        log(f"== {shape.name}: E={shape.E} k={shape.k} d={shape.d} f={shape.f} "
            f"({shape.expert_weight_bytes() / 2**30:.2f} GiB of expert weights), options: {shape.describe()}")
        n_wsets = N_INPUT_SETS if N_INPUT_SETS * shape.expert_weight_bytes() <= WEIGHT_ROTATION_BYTES else 1
        t0 = time.perf_counter()
        wsets = make_weights(shape, normal, n_wsets)
        log(f"   weights: {n_wsets} set(s) in {time.perf_counter() - t0:.1f}s")
        for T in tokens:
            xs = [normal((T, shape.d)) for _ in range(N_INPUT_SETS)]
            dys = [normal((T, shape.d)) for _ in range(N_INPUT_SETS)]
            arg_sets = [(xs[i], *wsets[i % n_wsets], dys[i]) for i in range(N_INPUT_SETS)]
            per_set = [int(_active_experts(x, wsets[i % n_wsets][0], wsets[i % n_wsets][4], router=shape.router))
                       for i, x in enumerate(xs)]
            active = sum(per_set) / len(per_set)
            n_roof, m = roof_split(shape, T, active)
            xes = [normal((n_roof, m, shape.d)) for _ in range(N_INPUT_SETS)]
            hes = [normal((n_roof, m, shape.f)) for _ in range(N_INPUT_SETS)]
            dhes = [normal((n_roof, m, 2 * shape.f)) for _ in range(N_INPUT_SETS)]
            dyes = [normal((n_roof, m, shape.d)) for _ in range(N_INPUT_SETS)]
            for pass_ in passes:
                tag = f"[{shape.name} T={T} {pass_}]"
                flops, nbytes = count_flops(shape, T, pass_), count_bytes(shape, T, active, pass_)
                hbm_ms = hbm_roof_ms(nbytes, hbm_read_gbps)
                gemm_ms = gemm_peak_bytes = None
                roof = roof_sets = None
                try:
                    # The roof's (w_gate_up [n_roof, d, 2f], w_down [n_roof, f, d]): the first n_roof experts'
                    # weights, copied here outside timing and freed before the rows (DeepSeek-V3's weights
                    # are 22 GiB a copy).
                    roof_w = [(jnp.concatenate([wg[:n_roof], wu[:n_roof]], axis=2),
                               wd[:n_roof] if n_roof < shape.E else wd) for _, wg, wu, wd, _ in wsets]
                    roof_sets = [(xes[i], hes[i], *roof_w[i % n_wsets], dhes[i], dyes[i])
                                 for i in range(N_INPUT_SETS)]
                    del roof_w
                    roof = make_gemm_roof(pass_)
                    rt = time_fn(roof, roof_sets, min_time_s=min_time_s, sync_each=sync_each)
                    gemm_ms = rt.ms
                    log(f"{tag} {'gemm roof':9s} {rt.ms:9.4f} ms  ({n_roof} experts x {m} rows, {rt.calls_per_round}x"
                        f"{rt.rounds} calls, compile {rt.compile_s:.1f}s)")
                    if memory:
                        mem = planned_memory(roof, roof_sets[0])
                        gemm_peak_bytes = mem.peak_bytes if mem else None
                        log(f"{tag} {'gemm roof':9s} memory: {memory_line(mem) if mem else 'not reported'}")
                except Exception as err:  # e.g. out of memory
                    log(f"{tag} gemm roof FAILED: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
                del roof, roof_sets
                gc.collect()
                known = [v for v in (gemm_ms, hbm_ms) if v is not None]
                limit_ms = max(known) if known else None
                cell = []
                for impl in impls:
                    row = {"shape": shape.name, "E": shape.E, "k": shape.k, "d": shape.d, "f": shape.f,
                           "options": shape.describe(), "T": T, "impl": impl, "pass": pass_, "ms": None,
                           "tflops": None, "gbps": None,
                           "gemm_ms": gemm_ms, "hbm_ms": hbm_ms, "limit_ms": limit_ms, "limit_frac": None,
                           "roof_ms": gemm_ms, "roof_frac": None,  # the GEMM roof, under the older key names
                           "peak_bytes": None, "flops": flops, "bytes": nbytes, "active_experts": active,
                           "roof_m": m, "roof_experts": n_roof, **env}
                    if memory:
                        row["gemm_peak_bytes"] = gemm_peak_bytes
                    step = None
                    try:
                        step = make_step(make_forward(impl, shape), pass_)
                        t = time_fn(step, arg_sets, min_time_s=min_time_s, sync_each=sync_each)
                        row.update(ms=t.ms, tflops=flops / (t.ms * 1e-3) / 1e12,
                                   gbps=nbytes / (t.ms * 1e-3) / 1e9, min_ms=t.min_ms, max_ms=t.max_ms,
                                   calls_per_round=t.calls_per_round, rounds=t.rounds, compile_s=t.compile_s)
                        if gemm_ms is not None:
                            row["roof_frac"] = gemm_ms / t.ms
                        if limit_ms is not None:
                            row["limit_frac"] = limit_ms / t.ms
                        log(f"{tag} {impl:9s} {t.ms:9.4f} ms  {fmt_num(row['tflops']):>6s} TFLOP/s "
                            f"{fmt_num(row['gbps']):>6s} GB/s  ({t.calls_per_round}x{t.rounds} calls, "
                            f"compile {t.compile_s:.1f}s)")
                        if memory:  # after timing, so compile_s above is the first call's compilation
                            mem = planned_memory(step, arg_sets[0])
                            row["peak_bytes"] = mem.peak_bytes if mem else None
                            log(f"{tag} {impl:9s} memory: {memory_line(mem) if mem else 'not reported'}")
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
                if on_cell is not None:
                    on_cell(rows)
            del xs, dys, arg_sets, xes, hes, dhes, dyes
            gc.collect()
        del wsets
        gc.collect()
    return rows


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
        f"pass={','.join(passes)} min_time={min_time}s per cell, dtype=bf16, each shape's routing and experts")

    ceilings = None
    if not args.no_ceilings:
        t0 = time.perf_counter()
        ceilings = measure_ceilings(Normal(1234, on_host=not on_gpu), on_gpu, min_time, sync_each=not on_gpu)
        log(f"ceilings ({time.perf_counter() - t0:.1f}s): HBM read {fmt_num(ceilings['hbm_read_gbps'])} GB/s, "
            f"dense bf16 {fmt_num(ceilings['matmul_tflops'])} TFLOP/s"
            + ("" if on_gpu else " (CPU probes are small: indicative only)"))

    json_path = Path(args.json)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    meta = {**env, "ceilings": ceilings, "argv": list(argv) if argv is not None else sys.argv[1:],
            "min_time_s": min_time, "shapes": shapes, "tokens": tokens, "impls": impls, "passes": passes,
            "memory": args.memory}

    def write_json(rows, complete):
        if ceilings:
            for r in rows:
                r["hbm_read_gbps"], r["matmul_tflops"] = ceilings["hbm_read_gbps"], ceilings["matmul_tflops"]
        with open(json_path, "w") as fh:
            json.dump({"meta": {**meta, "complete": complete}, "rows": rows}, fh, indent=1, default=float)

    t0 = time.perf_counter()
    resolved = [shapes_lib.get(s) for s in shapes]
    hbm_read_gbps = ceilings["hbm_read_gbps"] if ceilings else None
    rows = run_sweep(resolved, tokens, impls, passes, on_gpu=on_gpu, min_time_s=min_time, env=env,
                     hbm_read_gbps=hbm_read_gbps, memory=args.memory,
                     on_cell=lambda rows: write_json(rows, complete=False)) if impls else []
    write_json(rows, complete=True)
    log(f"sweep took {time.perf_counter() - t0:.1f}s")

    log("")
    log(report.report(meta, rows))
    if not on_gpu:
        log("(CPU run: the triton and tokamax rows need a GPU)")
    log(f"json written to {json_path}")
    if args.plot and args.plot.lower() != "none":
        log(write_plot(rows, Path(args.plot)))
    return rows


if __name__ == "__main__":
    main()
