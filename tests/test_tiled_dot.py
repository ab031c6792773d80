"""The reference's grouped GEMM on CPU (jaxmoe/_tiled_dot.py): what it computes, where a non-finite
value goes, and what it costs (counted from the jaxpr, so the test does not time anything)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmoe import _tiled_dot, reference

# Group sizes over 45 rows: empty groups (first, middle, last) with rows past the last group (the expert
# FFN sorts other devices' assignments there), one group holding everything, uneven groups, one row.
SIZES = [[0, 5, 0, 9, 3, 0], [0, 0, 45, 0, 0, 0], [3, 1, 4, 1, 5, 31], [1, 0, 0, 0, 0, 0]]


def _oracle(lhs, rhs, sizes, dout):
    """out, dlhs, drhs per group in float64 numpy, one group's rows at a time."""
    lhs, rhs, dout = (np.asarray(a, np.float64) for a in (lhs, rhs, dout))
    out, dlhs, drhs = np.zeros((lhs.shape[0], rhs.shape[2])), np.zeros_like(lhs), np.zeros_like(rhs)
    start = 0
    for g, n in enumerate(sizes):
        rows = slice(start, start + n)
        out[rows] = lhs[rows] @ rhs[g]
        dlhs[rows] = dout[rows] @ rhs[g].T
        drhs[g] = lhs[rows].T @ dout[rows]
        start += n
    return out, dlhs, drhs


@pytest.mark.parametrize("M, sizes", [(45, SIZES), (1, [[1]])])
def test_matches_per_group_products(M, sizes):
    """Every row through its own group's weights, forward and both transposes (one compile per shape)."""
    G, K, N = len(sizes[0]), 7, 5
    keys = jax.random.split(jax.random.key(M), 3)
    lhs, rhs, dout = (jax.random.normal(k, s) for k, s in zip(keys, [(M, K), (G, K, N), (M, N)]))
    forward, transposes = jax.jit(_tiled_dot.rows_dot), jax.jit(_tiled_dot.rows_dot_transposes)
    for case in sizes:
        group_sizes = jnp.array(case, jnp.int32)
        with jax.default_matmul_precision("highest"):
            got = (forward(lhs, rhs, group_sizes), *transposes(lhs, rhs, group_sizes, dout))
        for name, a, b in zip(("out", "dlhs", "drhs"), got, _oracle(lhs, rhs, case, dout)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=f"{name} for sizes {case}")


def test_nonfinite_values_stay_in_their_group():
    """An Inf in one group's weights reaches that group's rows and weight gradient only; a NaN in one
    row of lhs reaches that row and its group's weight gradient only."""
    sizes, K, N = [4, 0, 6, 5], 3, 2
    M, G = sum(sizes) + 2, len(sizes)
    lhs = jnp.ones((M, K)).at[12, 1].set(jnp.nan)  # row 12: group 3 (rows 10-14)
    rhs = jnp.ones((G, K, N)).at[0, 2, 1].set(jnp.inf)  # group 0: rows 0-3
    dout = jnp.ones((M, N))
    group_sizes = jnp.array(sizes, jnp.int32)
    out = jax.jit(_tiled_dot.rows_dot)(lhs, rhs, group_sizes)
    dlhs, drhs = jax.jit(_tiled_dot.rows_dot_transposes)(lhs, rhs, group_sizes, dout)
    bad_rows = lambda a: np.flatnonzero(~np.isfinite(np.asarray(a)).reshape(a.shape[0], -1).all(axis=1))
    np.testing.assert_array_equal(bad_rows(out), [0, 1, 2, 3, 12])
    np.testing.assert_array_equal(bad_rows(dlhs), [0, 1, 2, 3])  # dlhs reads dout and rhs, not lhs
    np.testing.assert_array_equal(bad_rows(drhs), [3])  # the NaN row's group; rhs's Inf is not read
    assert (np.asarray(out)[15:] == 0).all()  # rows past the last group


def _flops(jaxpr) -> int:
    """Multiply-adds x 2 of every dot in a jaxpr, loops counted by their trip count."""
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        assert name not in ("while", "ragged_dot_general"), f"{name}: its cost is not counted here"
        if name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * int(np.prod(eqn.outvars[0].aval.shape)) * int(np.prod([lhs[i] for i in contract]))
            continue
        inner = []
        for value in eqn.params.values():
            for v in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(v, jax.extend.core.ClosedJaxpr):
                    inner.append(v.jaxpr)
                elif isinstance(v, jax.extend.core.Jaxpr):
                    inner.append(v)
        cost = max((_flops(j) for j in inner), default=0)  # cond: the dearer branch
        total += cost * (eqn.params["length"] if name == "scan" else 1)
    return total


@pytest.mark.parametrize("E", [8, 128])
def test_cpu_cost_follows_the_rows_not_the_experts(E):
    """On the CPU, the reference's grouped GEMM forward and backward cost about what one dense dot of
    the rows costs, whatever E is (one masked dense dot per expert cost E times that)."""
    if jax.default_backend() != "cpu":
        pytest.skip("the CPU path")
    M, K, N = 4096, 64, 128
    lhs, rhs = jnp.zeros((M, K)), jnp.zeros((E, K, N))
    group_sizes = jnp.full((E,), M // E, jnp.int32)
    useful = 2 * M * K * N

    def loss(lhs, rhs):
        return jnp.sum(reference.default_ragged_dot(lhs, rhs, group_sizes, preferred_element_type=jnp.float32))

    forward = _flops(jax.make_jaxpr(loss)(lhs, rhs).jaxpr)
    both = _flops(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(lhs, rhs).jaxpr)
    assert forward <= 1.5 * useful, forward / useful
    assert both <= 3 * 1.5 * useful, both / useful  # forward, dlhs and drhs
