"""How a step is measured: time per call, device memory as XLA plans it, and the machine's ceilings.

Timing: warm-up calls (compilation and every input set) outside timing; then rounds of n calls between
one pair of device syncs (jax.block_until_ready), per-call time = round time / n, reported as the median
over rounds. n is chosen from a short estimate so a round takes ~1/5 of min_time_s, and rounds continue
until min_time_s has passed (at least MIN_ROUNDS rounds).
"""

from __future__ import annotations

import dataclasses
import gc
import statistics
import time

import jax
import jax.numpy as jnp

MIN_ROUNDS = 5
MAX_ROUNDS = 50
MAX_CALLS_PER_ROUND = 1000


@dataclasses.dataclass
class Timing:
    ms: float  # median per-call time over rounds
    calls_per_round: int
    rounds: int
    compile_s: float  # first call, compilation included
    min_ms: float
    max_ms: float


def time_fn(fn, arg_sets, *, min_time_s: float, sync_each: bool) -> Timing:
    """Median per-call time of fn over rounds of n calls between one pair of device syncs.

    Calls rotate over arg_sets. sync_each syncs every call (the CPU client may overlap independent calls).
    """
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


@dataclasses.dataclass
class Memory:
    """Device bytes of one compiled step, from XLA's buffer assignment (not measured at run time)."""

    argument_bytes: int
    output_bytes: int
    temp_bytes: int  # intermediates, residuals of the backward included
    alias_bytes: int  # outputs written into an argument's buffer: counted in both, held once

    @property
    def peak_bytes(self) -> int:
        return self.argument_bytes + self.output_bytes + self.temp_bytes - self.alias_bytes


def planned_memory(jitted, args) -> Memory | None:
    """Memory of jitted(*args) as XLA plans it; None where the backend does not report it."""
    try:
        stats = jitted.lower(*args).compile().memory_analysis()
        if stats is None:
            return None
        return Memory(argument_bytes=int(stats.argument_size_in_bytes),
                      output_bytes=int(stats.output_size_in_bytes),
                      temp_bytes=int(stats.temp_size_in_bytes),
                      alias_bytes=int(stats.alias_size_in_bytes))
    except Exception:  # an older jaxlib without the fields, a backend without the analysis, out of memory
        return None


def measure_ceilings(normal, on_gpu: bool, min_time_s: float, sync_each: bool) -> dict:
    """HBM read bandwidth (a large f32 reduction) and the dense bf16 matmul rate (an XLA dot).

    normal(shape, dtype=...) draws the probes' inputs.
    """
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
