"""GPU-only checks of implementation="triton" on model-sized shapes (run: pytest -m gpu on the GPU machine).

Odd shapes, edge cases and every dtype on small shapes run through tests/test_implementations.py,
whose "triton" rows are GPU-marked too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmoe
from jaxmoe import reference
from conftest import TOLERANCE, Problem, assert_close, rel_err

pytestmark = pytest.mark.gpu

# (name, E, k, d, f): the benchmark's shapes
MODEL_SHAPES = [("mixtral", 8, 2, 4096, 14336), ("qwen3_30b_a3b", 128, 8, 2048, 768),
                ("deepseek_v2_lite", 64, 6, 2048, 1408)]


def _moe_pair(x, router, p: Problem, k):
    run = jax.jit(lambda *a: jaxmoe.moe(*a, top_k=k, implementation="triton"))
    ref = jax.jit(lambda *a: reference.moe(*a, top_k=k))
    args = (x, router, p.w_gate, p.w_up, p.w_down)
    return run(*args), ref(*args)


@pytest.mark.parametrize("T", [16, 512, 4096])
@pytest.mark.parametrize("shape", MODEL_SHAPES, ids=lambda s: s[0])
def test_model_shapes_bf16(shape, T):
    _, E, k, d, f = shape
    p = Problem(T, T, d, f, E, k, dtype=jnp.bfloat16)
    router = (jax.random.normal(jax.random.key(T), (d, E)) / np.sqrt(d)).astype(jnp.bfloat16)
    (y, aux), (y_ref, aux_ref) = _moe_pair(p.x, router, p, k)
    assert_close(y, y_ref, jnp.bfloat16)
    np.testing.assert_array_equal(aux.expert_counts, aux_ref.expert_counts)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.float32])
def test_model_shape_other_dtypes(dtype):
    _, E, k, d, f = MODEL_SHAPES[2]
    p = Problem(7, 300, d, f, E, k, dtype=dtype)
    with jax.default_matmul_precision("highest"):
        y = jax.jit(lambda *a: jaxmoe.expert_ffn(*a, implementation="triton"))(*p.args)
        y_ref = jax.jit(reference.grouped_expert_ffn)(*p.args)
    assert_close(y, y_ref, dtype)


def test_float32_default_precision_is_no_worse_than_xla():
    """At JAX's default matmul precision, float32 may run on tf32 tensor cores, as XLA's dots may:
    the kernel's error against a true-float32 result must stay within XLA's own at that setting."""
    _, E, k, d, f = MODEL_SHAPES[2]
    p = Problem(10, 300, d, f, E, k)
    y = jax.jit(lambda *a: jaxmoe.expert_ffn(*a, implementation="triton"))(*p.args)
    y_xla = jax.jit(reference.grouped_expert_ffn)(*p.args)
    with jax.default_matmul_precision("highest"):
        exact = jax.jit(reference.grouped_expert_ffn)(*p.args)
    err, xla_err = rel_err(y, exact), rel_err(y_xla, exact)
    print(f"float32 at default precision: triton {err:.3g}, xla {xla_err:.3g}")
    assert err <= max(1.5 * xla_err, TOLERANCE[jnp.dtype(jnp.float32)])


def test_huge_token_count_int64_offsets():
    """T = 65536, d = 4096, k = 8: the n x d expert-row buffer holds 2.1e9 elements, past 2^31.

    Each token's output depends on its own row only, so the reference runs on the first and last
    tokens (the last are where a 32-bit offset would have wrapped): on all 65536 it needs 64 GiB.
    """
    T, d, f, E, k = 65536, 4096, 256, 16, 8
    p = Problem(8, T, d, f, E, k, dtype=jnp.bfloat16)
    y = jax.jit(lambda *a: jaxmoe.expert_ffn(*a, implementation="triton"))(*p.args)
    rows = np.r_[0:1024, T - 3072:T]
    y_ref = jax.jit(reference.grouped_expert_ffn)(p.x[rows], p.weights[rows], p.ids[rows], p.w_gate, p.w_up,
                                                  p.w_down)
    assert_close(y[rows], y_ref, jnp.bfloat16)
    assert_close(y[-64:], y_ref[-64:], jnp.bfloat16)


@pytest.mark.parametrize("shape", MODEL_SHAPES[1:], ids=lambda s: s[0])
def test_bitwise_reproducible(shape):
    _, E, k, d, f = shape
    p = Problem(9, 2048, d, f, E, k, dtype=jnp.bfloat16)
    router = (jax.random.normal(jax.random.key(1), (d, E)) / np.sqrt(d)).astype(jnp.bfloat16)
    run = jax.jit(lambda *a: jaxmoe.moe(*a, top_k=k, implementation="triton")[0])
    first = np.asarray(run(p.x, router, p.w_gate, p.w_up, p.w_down))
    second = np.asarray(run(p.x, router, p.w_gate, p.w_up, p.w_down))
    assert first.tobytes() == second.tobytes()


def test_auto_picks_triton_on_gpu():
    assert jaxmoe.resolve_implementation(None) == "triton"
