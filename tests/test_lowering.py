"""The "triton" path lowers for NVIDIA GPUs on a CPU, on every stack the suite runs.

`jax.jit(f).trace(*shapes).lower(lowering_platforms=("cuda",))` runs what a user's first call runs before
anything executes: tracing, the VJP, shard_map, dead-code elimination of the jaxpr and jax-triton's
lowering, which compiles each Triton kernel for the GPU's compute capability. The CPU has no GPU to ask,
so the tests answer 90 (an H100 or H200) for it, and check that every kernel call carries PTX for sm_90a.

This needs jaxlib's CUDA plugin (jax-cuda13-plugin, no CUDA libraries: `make` installs it with
--no-deps, at jaxlib's version) for the GPU lowering rules and jax-triton's kernel-call bindings. Without
it the tests skip, except where the Makefile sets JAXMOE_REQUIRE_CUDA_LOWERING=1 (`make test`, so CI).

jaxmoe's launches sit inside `jax.custom_batching.sequential_vmap`, which DCE does not enter; the plain
launch below is lowered outside it, so that a jax/jax-triton pair whose DCE rule breaks fails here
(jaxmoe/launch.py, _register_dce_rule).
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import warnings
import zlib

import jax
import jax.numpy as jnp
import jaxlib
import pytest
import triton
import triton.language as tl
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import jaxmoe
from jaxmoe import api, launch, ops
from jaxmoe.config import GemmConfig, MoEConfig

COMPUTE_CAPABILITY = 90
PLUGIN = "jax-cuda13-plugin"


def _missing_cuda_lowering() -> str | None:
    """Why "cuda" lowering cannot run here, or None when it can."""
    try:
        version = importlib.metadata.version(PLUGIN)
    except importlib.metadata.PackageNotFoundError:
        return f"{PLUGIN} is not installed (pip install --no-deps {PLUGIN}=={jaxlib.__version__}; make does)"
    if version != jaxlib.__version__:
        return f"{PLUGIN} {version} does not match jaxlib {jaxlib.__version__}, and jaxlib does not load it"
    from jax._src.lib import gpu_triton

    if not hasattr(gpu_triton, "get_compute_capability"):
        return f"jaxlib did not load {PLUGIN}'s Triton bindings"
    return None


@pytest.fixture(scope="module", autouse=True)
def cuda_lowering():
    """jax-triton compiles for compute capability 90, and jaxmoe takes "triton" without a GPU."""
    missing = _missing_cuda_lowering()
    if missing:
        if os.environ.get("JAXMOE_REQUIRE_CUDA_LOWERING") == "1":
            pytest.fail(f"the CUDA lowering gate must run here: {missing}")
        pytest.skip(missing)
    jax_triton = launch._jax_triton()[0]
    with pytest.MonkeyPatch.context() as patch:
        # Both jax-triton 0.3 and 0.4 ask jaxlib's gpu_triton module (0.4 then falls back to Pallas's
        # gpu_info, which finds no GPU here either); every kernel call's PTX is checked for the answer.
        patch.setattr(jax_triton.triton_lib.triton_kernel_call_lib, "get_compute_capability",
                      lambda device: COMPUTE_CAPABILITY)
        # resolve_implementation refuses "triton" without a GPU backend; lowering needs none.
        patch.setattr(api, "_triton_gpu_available", lambda: True)
        yield


def kernel_call_ops(lowered) -> list:
    """The jax-triton kernel calls (custom calls) of a lowered module, in every function of it."""
    found = []

    def visit(op):
        for region in op.regions:
            for block in region.blocks:
                for inner in block.operations:
                    inner = inner.operation
                    if (inner.name == "stablehlo.custom_call"
                            and "triton_kernel_call" in str(inner.attributes["call_target_name"])):
                        found.append(inner)
                    visit(inner)

    visit(lowered.compiler_ir("stablehlo").operation)
    return found


def kernel_calls(lowered) -> list[set[bytes]]:
    """Per kernel call of the lowered module, every CUDA target its compiled PTX names."""
    calls = []
    for op in kernel_call_ops(lowered):
        attrs = op.attributes
        # jaxlib 0.12 (FFI): {opaque = "..."} in mhlo.backend_config; jaxlib 0.11: backend_config
        config = attrs["mhlo.backend_config"]["opaque"] if "mhlo.backend_config" in attrs else attrs["backend_config"]
        serialized = zlib.decompress(config.value_bytes)  # the kernel call, with the kernel's PTX
        calls.append(set(re.findall(rb"\.target (sm_\w+)", serialized)))
    return calls


def lower_for_cuda(fn, *args):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))


def assert_sm90(calls):
    assert calls, "no Triton kernel call in the lowered module"
    assert all(targets == {b"sm_90a"} for targets in calls), calls


# ------------------------------------------------------------------------------------ the plain launch


@triton.jit
def _double_and_count(x_ptr, n, y_ptr, count_ptr, BLOCK: tl.constexpr):
    """y = 2 x; count[0] = n. Two outputs, so that a call with one of them used is checked too."""
    i = tl.arange(0, BLOCK)
    tl.store(y_ptr + i, 2 * tl.load(x_ptr + i, mask=i < n), mask=i < n)
    tl.store(count_ptr, n)


def _plain_launch(x):
    """launch()'s jax-triton call without its sequential_vmap wrapper: DCE sees the kernel call."""
    out_shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct((1,), jnp.int32)]
    return launch._launch_triton(_double_and_count, [x, x.size], (1,), out_shapes, num_warps=1, num_stages=1,
                                 scratch_per_program=0, zeroed_outputs=(), constexprs={"BLOCK": 64})


X = jax.ShapeDtypeStruct((37,), jnp.float32)


def test_plain_launch_lowers():
    """One output used: the call is kept, with both its outputs; none used: the call goes."""
    one_used = lower_for_cuda(lambda x: _plain_launch(x)[0], X)
    assert_sm90(kernel_calls(one_used))
    assert [len(op.results) for op in kernel_call_ops(one_used)] == [2]
    assert_sm90(kernel_calls(lower_for_cuda(lambda x: tuple(_plain_launch(x)), X)))
    unused = lower_for_cuda(lambda x: (_plain_launch(x), x + 1)[1], X)
    assert kernel_calls(unused) == []


def test_launches_compile_with_jaxmoe_options(monkeypatch):
    """Every launch names its Triton compile options (launch.COMPILE_OPTIONS) on both jax-triton APIs:
    FMA contraction stays on when Triton 3.10 turns its default off (3.9 warns about it)."""
    from triton.backends.nvidia.compiler import CUDABackend
    seen = []
    parse = CUDABackend.parse_options
    monkeypatch.setattr(CUDABackend, "parse_options", lambda self, opts: (seen.append(dict(opts)), parse(self, opts))[1])
    out_shapes = [jax.ShapeDtypeStruct(X.shape, X.dtype), jax.ShapeDtypeStruct((1,), jnp.int32)]
    # BLOCK=128, a specialisation no other test compiles, so jax-triton's kernel cache cannot answer
    launch_ = lambda x: launch._launch_triton(_double_and_count, [x, x.size], (1,), out_shapes, num_warps=1,
                                              num_stages=1, scratch_per_program=0, zeroed_outputs=(),
                                              constexprs={"BLOCK": 128})[0]
    assert_sm90(kernel_calls(lower_for_cuda(launch_, X)))
    assert seen, "jax-triton compiled nothing"
    assert all(opts.get("enable_fp_fusion") is True for opts in seen), seen


def test_dce_rule_takes_both_call_styles():
    """jax <= 0.11 calls a DCE rule as rule(used_outputs, eqn), jax 0.12 as rule(used_outputs,
    live_inputs, eqn): jaxmoe's rule answers both alike, whichever this jax uses."""
    from jax._src.interpreters import partial_eval

    (eqn,) = [e for e in jax.make_jaxpr(_plain_launch)(X).eqns if e.primitive.name == "triton_kernel_call"]
    rule = partial_eval.dce_rules[eqn.primitive]
    n = len(eqn.invars)
    for used, want in (([False, True], ([True] * n, eqn)), ([False, False], ([False] * n, None))):
        assert rule(used, eqn) == want
        assert rule(used, [True] * n, eqn) == want


def test_wrapped_launch_lowers():
    """launch() itself, under jit and under vmap (one kernel call per element)."""
    def run(x):
        return launch.launch(_double_and_count, x, x.size, grid=(1,), num_warps=1, num_stages=1, mode="triton",
                             out_shapes=[jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct((1,), jnp.int32)],
                             BLOCK=64)[0]

    assert_sm90(kernel_calls(lower_for_cuda(run, X)))
    assert_sm90(kernel_calls(lower_for_cuda(jax.vmap(run), jax.ShapeDtypeStruct((3, 37), jnp.float32))))


# ----------------------------------------------------------------------------------------- the layer

# (T, d, f, E, k): one token, and odd sizes (T, d and f off every tile and vector width). Both take the
# heuristic's smallest tiles, so the second compiles almost nothing new: a kernel compiles per dtype and
# config, and each costs about 0.5 s (CI's cost of this file is mostly these compiles).
SHAPES = [(1, 72, 40, 20, 2), (37, 72, 40, 20, 2)]


def _moe_args(T, d, f, E, dtype, shardings=(None,) * 5):
    shapes = ((T, d), (d, E), (E, d, f), (E, d, f), (E, f, d))
    return [jax.ShapeDtypeStruct(s, dtype, sharding=sh) for s, sh in zip(shapes, shardings)]


def _forward_and_value_and_grad(**moe_options):
    def forward(*args):
        return jaxmoe.moe(*args, implementation="triton", **moe_options)

    def loss(*args):
        y, aux = forward(*args)
        return jnp.sum(y.astype(jnp.float32)) + aux.load_balancing_loss + aux.router_z_loss

    return forward, jax.value_and_grad(loss, argnums=range(5))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_moe_lowers(dtype):
    """The forward and value_and_grad of the layer, at each of SHAPES (one test per dtype keeps the
    shapes' shared kernels in one process's compile cache, wherever pytest-xdist sends it)."""
    for T, d, f, E, k in SHAPES:
        forward, value_and_grad = _forward_and_value_and_grad(top_k=k)
        args = _moe_args(T, d, f, E, dtype)
        forward_calls = kernel_calls(lower_for_cuda(forward, *args))
        backward_calls = kernel_calls(lower_for_cuda(value_and_grad, *args))
        assert_sm90(forward_calls)
        assert_sm90(backward_calls)
        assert len(backward_calls) > len(forward_calls), T  # the backward runs in kernels too


def test_launches_raise_no_jax_triton_deprecation(monkeypatch):
    """The layer's launches, the routing kernel's zeroed ticket counter among them, lower without a
    warning reaching the user (jax-triton 0.4.1 deprecates zeroed_outputs)."""
    zeroed = []
    launch_triton = launch._launch_triton
    monkeypatch.setattr(launch, "_launch_triton", lambda *a: (zeroed.append(a[7]), launch_triton(*a))[1])
    forward, value_and_grad = _forward_and_value_and_grad(top_k=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for fn in (forward, value_and_grad):
            assert_sm90(kernel_calls(lower_for_cuda(fn, *_moe_args(37, 64, 96, 4, "bfloat16"))))
    assert any(zeroed), "no launch with zeroed outputs: the test no longer covers them"
    assert not [w for w in caught if issubclass(w.category, DeprecationWarning) and "deprecated" in str(w.message)], \
        [str(w.message) for w in caught]


HOST_TMA = MoEConfig(32, GemmConfig(block_n=32, block_k=32, group_m=3, num_warps=4, num_stages=2, tma=True, host_tma=True),
                     GemmConfig(block_n=64, block_k=32, group_m=2, num_warps=4, num_stages=2, tma=True, host_tma=True))


def test_host_built_tma_descriptors_lower(monkeypatch):
    """GemmConfig.host_tma: on jax-triton 0.4 with jaxlib 0.12 the weights' (and the down projection's
    rows') descriptors are built on the host and the kernels compiled for them; elsewhere the same
    config builds them on the device. Forward and value_and_grad lower either way."""
    built = []
    make = launch._descriptor
    monkeypatch.setattr(launch, "_descriptor", lambda spec, array: (built.append(spec.shape), make(spec, array))[1])
    T, d, f, E, k = 37, 64, 96, 4, 2
    args = [jax.ShapeDtypeStruct(s, t) for s, t in [((T, d), jnp.bfloat16), ((T, k), jnp.float32), ((T, k), jnp.int32),
                                                    ((E, d, f), jnp.bfloat16), ((E, d, f), jnp.bfloat16),
                                                    ((E, f, d), jnp.bfloat16)]]
    forward = lambda *a: ops.expert_ffn(*a, mode="triton", config=HOST_TMA)
    loss = lambda *a: jnp.sum(forward(*a).astype(jnp.float32))
    assert_sm90(kernel_calls(lower_for_cuda(forward, *args)))
    if launch.host_descriptors_available():
        # gate/up: w_gate and w_up; down: w_down and its sorted rows
        assert sorted(built) == sorted([(E * d, f), (E * d, f), (E * f, d), (T * k, f)]), built
    else:
        assert built == []
    assert_sm90(kernel_calls(lower_for_cuda(jax.value_and_grad(loss, argnums=(0, 3, 4, 5)), *args)))


def test_shipped_host_descriptor_configs_run_on_the_stack_that_builds_them(monkeypatch):
    """The table's H100 entry for DeepSeek-V2-Lite at T = 8192 holds a down GEMM with host-built
    descriptors (measured on jax-triton 0.4.1): a jitted expert FFN picks it, and lowers with the
    down GEMM's two descriptors built on the host, only where they can be; elsewhere it runs the
    entry's own pointer-load configs and builds none."""
    from jaxmoe.ops import ffn

    monkeypatch.setattr(ffn, "device_kind", lambda mode: "NVIDIA H100 80GB HBM3")
    built = []
    make = launch._descriptor
    monkeypatch.setattr(launch, "_descriptor", lambda spec, array: (built.append(spec.shape), make(spec, array))[1])
    T, d, f, E, k = 8192, 2048, 1408, 64, 6
    host = launch.host_descriptors_available()
    picked = ffn.picked_config("triton", jnp.bfloat16, T, k, E, d, f)
    assert (picked.down.tma, picked.down.host_tma) == (host, host), picked
    args = [jax.ShapeDtypeStruct(s, t) for s, t in [((T, d), jnp.bfloat16), ((T, k), jnp.float32), ((T, k), jnp.int32),
                                                    ((E, d, f), jnp.bfloat16), ((E, d, f), jnp.bfloat16),
                                                    ((E, f, d), jnp.bfloat16)]]
    assert_sm90(kernel_calls(lower_for_cuda(lambda *a: ops.expert_ffn(*a, mode="triton"), *args)))
    assert sorted(built) == (sorted([(E * f, d), (T * k, f)]) if host else []), built


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (conftest.py simulates them)")
def test_sharded_moe_lowers():
    """Experts over 4 devices, tokens over those and 2 more on a data axis (shard_map, all_to_all)."""
    T, d, f, E, k = 16, 72, 40, 20, 2
    mesh = jax.make_mesh((2, 4), ("data", "expert"), axis_types=(AxisType.Auto,) * 2, devices=jax.devices()[:8])
    tokens, experts, replicated = (NamedSharding(mesh, spec) for spec in (P(("data", "expert")), P("expert"), P()))
    args = _moe_args(T, d, f, E, "bfloat16", (tokens, replicated, experts, experts, experts))
    forward, value_and_grad = _forward_and_value_and_grad(top_k=k, mesh=mesh, expert_axis="expert",
                                                          data_axis="data")
    for fn in (forward, value_and_grad):
        lowered = lower_for_cuda(fn, *args)
        assert "all_to_all" in lowered.as_text()
        assert_sm90(kernel_calls(lowered))

