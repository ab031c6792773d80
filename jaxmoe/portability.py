"""The portability gate: every kernel variant jaxmoe can launch, forward and backward, compiled for
NVIDIA and AMD targets, each within the shared memory (LDS on AMD) a program may use there.

Variants are collected by tracing the real launch layer in "record" mode, so the gate compiles
exactly the signatures and constexprs that ops.py would launch with each shipped config on that
target: the table's entries for its cards and the heuristic's, fitted by config.for_rocm on AMD.
Pointers carry the 16-byte alignment jax-triton declares, as in a real launch: it changes the
vector widths, and so the shared memory a pipelined kernel needs.
Compiling needs no GPU: `python -m jaxmoe.portability` or the test in tests/test_portability.py.
"""

from __future__ import annotations

import functools
import sys
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxmoe import config, launch, ops
from jaxmoe.options import Experts, Router


class Target(NamedTuple):
    backend: str
    arch: object
    warp_size: int
    shared_bytes: int  # the most shared memory (LDS) one program may use
    devices: tuple[str, ...]  # the config table's device keys (config.device_key) of this target's cards


TARGETS = {
    "sm_80": Target("cuda", 80, 32, 163 * 1024, ("a100",)),
    "sm_90": Target("cuda", 90, 32, 227 * 1024, ("h100", "h200")),
    "gfx942": Target("hip", "gfx942", 64, config.ROCM_LDS_BYTES, ("mi300x", "mi325x")),
}

# d = f = 512 is a multiple of every K tile (EVEN_K); 200 leaves a ragged last K tile.
_FFN_SHAPES = [(64, 512, 512, 8, 2), (37, 200, 200, 8, 2)]
# (T, E, router, with a selection bias): plain routers, and both group scores: DeepSeek-V3's router, and
# DeepSeek-V2's kind at a small E whose groups of 6 no power-of-two tile divides (at V2's own E = 160
# it compiled the same code in twice the time).
_ROUTES = [(64, 8, Router(2), False), (64, 128, Router(8, "sigmoid"), True),
           (64, 256, Router(8, "sigmoid", renormalize_epsilon=1e-20, num_groups=8, top_groups=4,
                            group_score="top2_sum", scaling_factor=2.5), True),
           (64, 24, Router(4, num_groups=4, top_groups=2, renormalize=False, scaling_factor=16.0), False)]
# The expert options switch epilogues only (constexpr flags); these two reach every branch of them:
# clamped SwiGLU with biases and the weight on the output (the down bias, the <dy, b_down> plane, the
# clamps' derivatives), and SwiGLU with biases and the weight on the input (gate and up scaled, dX rows
# and the dW_gate/dW_up operand scaled, the routing weight's gradient through gate and up).
_OPTIONS = [Experts("clamped_swiglu", weight_on="output"), Experts(weight_on="input")]
# The targets whose gate compiles the options: the GPU machines' (sm_90) and AMD's. sm_80 compiles the
# same epilogue code as sm_90 (without TMA) and is left out to keep the gate's time in CI.
_OPTION_TARGETS = ("sm_90", "gfx942")


def _record_ffn(dtype: str, cfg: config.MoEConfig, shape, precision: str, backward: bool,
                experts: Experts = Experts(), biases: bool = False) -> list[launch.LaunchRecord]:
    T, d, f, E, k = shape
    args = (jax.ShapeDtypeStruct((T, d), dtype), jax.ShapeDtypeStruct((T, k), jnp.float32),
            jax.ShapeDtypeStruct((T, k), jnp.int32), jax.ShapeDtypeStruct((E, d, f), dtype),
            jax.ShapeDtypeStruct((E, d, f), dtype), jax.ShapeDtypeStruct((E, f, d), dtype))
    if biases:
        args += (jax.ShapeDtypeStruct((E, f), dtype), jax.ShapeDtypeStruct((E, f), dtype),
                 jax.ShapeDtypeStruct((E, d), dtype))
    ffn = functools.partial(ops.expert_ffn, mode="record", config=cfg, experts=experts)

    def forward_and_backward(*a):  # the custom VJP's forward (which keeps residuals) and backward
        y, vjp = jax.vjp(lambda x, w, wg, wu, wd, *b: ffn(x, w, a[2], wg, wu, wd, 0, *b), *a[:2], *a[3:])
        return ffn(a[0], a[1], a[2], a[3], a[4], a[5], 0, *a[6:]), vjp(y)

    with launch.recording() as records, jax.default_matmul_precision(precision):
        jax.eval_shape(forward_and_backward if backward else (lambda *a: ffn(*a[:6], 0, *a[6:])), *args)
    return records


def _record_options(target: str, heuristic, rocm: bool) -> list[launch.LaunchRecord]:
    """The expert options (_OPTIONS, with biases), forward and backward: clamped SwiGLU at the heuristic's
    largest bfloat16 tiles and at the ragged float32 shape, the weight on the input at its smallest
    bfloat16 tiles (the tiles are the plain path's, each compiled in every config above); on NVIDIA,
    the forward at a table config whose down projection reads through TMA."""
    clamped, on_input = _OPTIONS
    records = _record_ffn("bfloat16", heuristic(4096, "bfloat16", 128, 128), _FFN_SHAPES[0], "default",
                          backward=True, experts=clamped, biases=True)
    records += _record_ffn("float32", heuristic(64, "float32", 200, 200), _FFN_SHAPES[1], "default",
                           backward=True, experts=clamped, biases=True)
    records += _record_ffn("bfloat16", heuristic(1, "bfloat16", 128, 128), _FFN_SHAPES[0], "default",
                           backward=True, experts=on_input, biases=True)
    tma = [cfg for dtype, cfg in config.shipped_configs(TARGETS[target].devices, rocm=rocm)
           if dtype == "bfloat16" and (cfg.gate_up.tma or cfg.down.tma)]
    if tma and not rocm:
        records += _record_ffn("bfloat16", tma[0], _FFN_SHAPES[0], "default", backward=False, experts=clamped,
                               biases=True)
    return records


def _record_route(T, E, router: Router, with_bias) -> list[launch.LaunchRecord]:
    bias = jax.ShapeDtypeStruct((E,), jnp.float32) if with_bias else None
    with launch.recording() as records:  # the kernel with the stats, and with the losses (few programs)
        for route in (ops.route_with_stats, ops.route_with_aux):
            jax.eval_shape(lambda lg, b: route(lg, router=router, selection_bias=b, mode="record"),
                           jax.ShapeDtypeStruct((T, E), jnp.float32), bias)
    return records


def _record_dispatch(n: int, E: int) -> list[launch.LaunchRecord]:
    with launch.recording() as records:
        jax.eval_shape(lambda ids: ops.dispatch(ids, E, 64, "record"), jax.ShapeDtypeStruct((n,), jnp.int32))
    return records


def shipped_launches(target: str = "sm_90") -> list[launch.LaunchRecord]:
    """Every forward kernel of every config a card of `target` can pick. The backward kernels (and the
    forward's variants that keep residuals) of the heuristic's smallest and largest tiles in bfloat16
    and float32, and at a ragged shape: the table's configs differ from those only in tile sizes,
    float16 only in the element type, and compiling every combination would triple the gate's time
    in CI. The expert options (_OPTIONS, with biases) forward and backward at a few of those, on
    _OPTION_TARGETS."""
    rocm = TARGETS[target].backend == "hip"

    def heuristic(bucket, dtype, d, f):
        cfg = config.heuristic(bucket, dtype, d, f).with_backward(dtype)
        return config.for_rocm(cfg, dtype) if rocm else cfg

    records = []
    with_backward = {(dt, heuristic(b, dt, 128, 128)) for b in (1, 4096) for dt in ("bfloat16", "float32")}
    for dtype, cfg in config.shipped_configs(TARGETS[target].devices, rocm=rocm):
        records += _record_ffn(dtype, cfg, _FFN_SHAPES[0], "default", backward=(dtype, cfg) in with_backward)
    for precision in ("high", "highest"):
        records += _record_ffn("float32", heuristic(64, "float32", 512, 512), _FFN_SHAPES[0], precision,
                               backward=False)
    for dtype in ("bfloat16", "float32"):
        records += _record_ffn(dtype, heuristic(64, dtype, 200, 200), _FFN_SHAPES[1], "default", backward=True)
    if target in _OPTION_TARGETS:
        records += _record_options(target, heuristic, rocm)
    for route in _ROUTES:
        records += _record_route(*route)
    records += _record_dispatch(96, 64)  # two chunks, each scatter program counting both (RECOUNT)
    records += _record_dispatch(1024, 128)  # several chunks, summed by each scatter program
    records += _record_dispatch(65536, 128)  # many chunks: count, prefix pass, scatter
    unique = {}
    for record in records:
        unique.setdefault(record.compile_key, record)
    return list(unique.values())


def int64_launches() -> list[launch.LaunchRecord]:
    """Launches at a size whose offsets pass 2^31 (T=65536, k=8, d=4096): constexpr strides that large
    must meet only int64 arithmetic in the kernels, or compilation fails. (Offsets built from runtime
    counts, such as the split-K plane stride n * N, are cast to int64 before multiplying; nothing here
    would catch one that is not.)"""
    split = config.MoEConfig(16, config.GemmConfig(64, 64), config.GemmConfig(64, 64, split_k=2))
    records = []
    for cfg, backward in ((config.heuristic(4096, "bfloat16", 4096, 256), True), (split, False)):
        records += _record_ffn("bfloat16", cfg, (65536, 4096, 256, 16, 8), "default", backward=backward)
    unique = {}
    for record in records:
        unique.setdefault(record.compile_key, record)
    return list(unique.values())


def supported(record: launch.LaunchRecord, target: str) -> bool:
    """tf32x3 exists only on NVIDIA; ops.dot_precision never picks it on ROCm."""
    return not (TARGETS[target].backend == "hip" and record.constexprs.get("DOT_PRECISION") == "tf32x3")


def compile_record(record: launch.LaunchRecord, target: str):
    """The binary for target, compiled as jax-triton compiles it: every pointer 16-byte aligned."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = record.kernel.arg_names
    aligned = {(names.index(name),): [["tt.divisibility", 16]]
               for name, kind in record.signature.items() if kind.startswith("*")}
    source = ASTSource(fn=record.kernel, signature=record.signature, constexprs=record.constexprs, attrs=aligned)
    backend, arch, warp_size = TARGETS[target][:3]
    return triton.compile(source, target=GPUTarget(backend, arch, warp_size),
                          options={"num_warps": record.num_warps, "num_stages": record.num_stages,
                                   **launch.COMPILE_OPTIONS})


def check_shared_memory(compiled, target: str) -> None:
    """Raises if the binary needs more shared memory (LDS) per program than target's cards have."""
    used, limit = compiled.metadata.shared, TARGETS[target].shared_bytes
    if used > limit:
        raise ValueError(f"needs {used} bytes of shared memory per program, {target} has {limit}")


def describe(record: launch.LaunchRecord) -> str:
    consts = ",".join(f"{k}={v}" for k, v in record.constexprs.items())
    return f"{record.kernel.__name__}[{record.arg_types[0]}; w{record.num_warps}s{record.num_stages}; {consts}]"


def main() -> int:
    failures = 0
    for target in TARGETS:
        records = [record for record in shipped_launches(target) if supported(record, target)]
        print(f"{target}: {len(records)} kernel variants", flush=True)
        for record in records:
            try:
                check_shared_memory(compile_record(record, target), target)
            except Exception as err:  # report every failure, not just the first
                failures += 1
                print(f"FAIL {target} {describe(record)}: {str(err).splitlines()[0][:200]}", flush=True)
    print("portability gate:", "passed" if not failures else f"{failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
