"""The jax.lax reference against the dense oracle, plus routing, aux losses and argument checks."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmoe
from jaxmoe import ops, reference
from conftest import Problem, assert_close, dense_expert_ffn, rel_err

pytestmark = pytest.mark.usefixtures("highest_precision")

# (T, d, f, E, k): odd dims, one expert, k = E, a single token, empty batch
SHAPES = [(37, 96, 200, 5, 2), (64, 32, 48, 1, 1), (19, 40, 24, 4, 4), (1, 16, 24, 6, 3), (0, 16, 24, 4, 2)]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}_d{}_f{}_E{}_k{}".format(*s))
def test_matches_dense_oracle(shape, dtype):
    p = Problem(1, *shape, dtype=dtype)
    y = reference.expert_ffn(*p.args)
    assert y.shape == (p.T, p.d) and y.dtype == p.dtype
    assert_close(y, dense_expert_ffn(*p.args), dtype)


@pytest.mark.parametrize("pattern", ["all_on_one", "some_empty"])
def test_skewed_loads(pattern):
    T, E, k = 40, 6, 2
    if pattern == "all_on_one":  # every first choice on expert 3 (k=2 needs distinct experts per token)
        ids = np.stack([np.full(T, 3), np.full(T, 5)], axis=1)
    else:  # experts 0, 2 and 4 get nothing
        ids = np.stack([np.full(T, 1), np.where(np.arange(T) % 2 == 0, 3, 5)], axis=1)
    p = Problem(2, T, 24, 40, E, k, ids=ids)
    assert_close(reference.expert_ffn(*p.args), dense_expert_ffn(*p.args), jnp.float32)


def test_gradients_match_dense_oracle():
    p = Problem(3, 23, 24, 40, 4, 2)

    def loss(fn):
        def inner(x, weights, w_gate, w_up, w_down):
            y = fn(x, weights, p.ids, w_gate, w_up, w_down)
            return jnp.sum(y * jnp.cos(jnp.arange(y.size).reshape(y.shape)))  # not a plain sum: mixes rows
        return inner

    argnums = (0, 1, 2, 3, 4)
    args = (p.x, p.weights, p.w_gate, p.w_up, p.w_down)
    got = jax.grad(loss(reference.expert_ffn), argnums)(*args)
    want = jax.grad(loss(dense_expert_ffn), argnums)(*args)
    for name, g, w in zip(["x", "weights", "w_gate", "w_up", "w_down"], got, want):
        assert rel_err(g, w) <= 1e-5, name


def test_jit_and_grad_of_moe():
    p = Problem(4, 16, 24, 40, 4, 2)
    router = jax.random.normal(jax.random.key(9), (p.d, p.E))

    @jax.jit
    def loss(x, router, w_gate, w_up, w_down):
        y, aux = jaxmoe.moe(x, router, w_gate, w_up, w_down, top_k=2, implementation="xla")
        return jnp.mean(y ** 2) + 0.01 * aux.load_balancing_loss + 1e-3 * aux.router_z_loss

    grads = jax.grad(loss, (0, 1, 2, 3, 4))(p.x, router, p.w_gate, p.w_up, p.w_down)
    for g in grads:
        assert np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).sum() > 0


def test_bitwise_deterministic():
    p = Problem(5, 50, 24, 40, 4, 2)
    router = jax.random.normal(jax.random.key(1), (p.d, p.E))

    def run():
        fn = jax.jit(jax.value_and_grad(
            lambda x, wg: jnp.sum(jaxmoe.moe(x, router, wg, p.w_up, p.w_down, top_k=2, implementation="xla")[0] ** 2),
            argnums=(0, 1)))
        value, grads = fn(p.x, p.w_gate)
        return [np.asarray(a) for a in (value, *grads)]

    for a, b in zip(run(), run()):
        assert a.tobytes() == b.tobytes()


def test_moe_flattens_leading_dims_and_matches_parts():
    p = Problem(6, 12, 16, 24, 4, 2)
    router = jax.random.normal(jax.random.key(2), (p.d, p.E))
    x3 = p.x.reshape(3, 4, p.d)
    y, aux = jaxmoe.moe(x3, router, p.w_gate, p.w_up, p.w_down, top_k=2)
    logits = p.x @ router
    r = jaxmoe.route(logits, 2)
    y_parts = reference.expert_ffn(p.x, r.weights, r.ids, p.w_gate, p.w_up, p.w_down)
    assert y.shape == x3.shape
    assert_close(y.reshape(p.T, p.d), y_parts, jnp.float32)
    assert int(aux.expert_counts.sum()) == p.T * 2


def test_empty_batch_moe():
    p = Problem(7, 0, 16, 24, 4, 2)
    router = jnp.ones((p.d, p.E))
    y, aux = jax.jit(lambda x: jaxmoe.moe(x, router, p.w_gate, p.w_up, p.w_down, top_k=2))(p.x)
    assert y.shape == (0, p.d)
    assert float(aux.load_balancing_loss) == 0.0 and float(aux.router_z_loss) == 0.0
    assert aux.expert_counts.tolist() == [0] * p.E


# ------------------------------------------------------------------------------------------ routing

@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renormalize", [True, False])
def test_route_semantics(scoring, renormalize):
    logits = jax.random.normal(jax.random.key(0), (33, 7)) * 3
    r = jaxmoe.route(logits, 3, scoring=scoring, renormalize=renormalize)
    probs = jax.nn.softmax(logits) if scoring == "softmax" else jax.nn.sigmoid(logits)
    np.testing.assert_allclose(r.probs, probs, rtol=1e-6)
    order = np.argsort(-np.asarray(probs), axis=1, kind="stable")[:, :3]
    np.testing.assert_array_equal(r.ids, order)
    want = np.take_along_axis(np.asarray(probs), order, 1)
    if renormalize:
        want = want / want.sum(1, keepdims=True)
    np.testing.assert_allclose(r.weights, want, rtol=1e-6)
    assert r.ids.dtype == jnp.int32 and r.weights.dtype == jnp.float32 and r.probs.dtype == jnp.float32


def test_route_bias_changes_selection_only():
    logits = jax.random.normal(jax.random.key(1), (20, 6))
    bias = jnp.array([0.0, 0.0, 10.0, 0.0, 0.0, 0.0])  # forces expert 2 into every selection
    plain = jaxmoe.route(logits, 2, renormalize=False)
    biased = jaxmoe.route(logits, 2, renormalize=False, selection_bias=bias)
    assert (biased.ids[:, 0] == 2).all()
    np.testing.assert_array_equal(biased.probs, plain.probs)
    np.testing.assert_allclose(biased.weights, np.take_along_axis(np.asarray(plain.probs), np.asarray(biased.ids), 1))


def test_route_ties_go_to_lower_id():
    logits = jnp.array([[1.0, 3.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0, 2.0]])
    r = jaxmoe.route(logits, 2)
    np.testing.assert_array_equal(r.ids, [[1, 2], [0, 1]])


def test_aux_loss_formulas():
    T, E, k = 24, 5, 2
    logits = jax.random.normal(jax.random.key(2), (T, E)) * 2
    r = jaxmoe.route(logits, k)
    aux = reference.aux_losses(logits, r, E)
    counts = np.bincount(np.asarray(r.ids).ravel(), minlength=E)
    np.testing.assert_array_equal(aux.expert_counts, counts)
    share = counts / (T * k)
    mean_prob = np.asarray(jax.nn.softmax(logits)).mean(0)
    np.testing.assert_allclose(aux.load_balancing_loss, E * np.sum(share * mean_prob), rtol=1e-5)
    lse = np.log(np.exp(np.asarray(logits, np.float64)).sum(1))
    np.testing.assert_allclose(aux.router_z_loss, np.mean(lse ** 2), rtol=1e-5)
    # perfectly balanced routing with uniform probs gives exactly 1
    uniform = jaxmoe.Routing(jnp.ones((E, 1)), jnp.arange(E, dtype=jnp.int32)[:, None], jnp.full((E, E), 1 / E))
    np.testing.assert_allclose(reference.aux_losses(jnp.zeros((E, E)), uniform, E).load_balancing_loss, 1.0, rtol=1e-6)


# ---------------------------------------------------------------------------------------- bad input

def _ffn_args(**overrides):
    p = Problem(8, 6, 16, 24, 4, 2)
    args = dict(x=p.x, weights=p.weights, ids=p.ids, w_gate=p.w_gate, w_up=p.w_up, w_down=p.w_down)
    args.update(overrides)
    return args


# Each message names every argument involved; a disagreement also names the dimension and the shapes.
@pytest.mark.parametrize("impl", ["xla", "interpret"])
@pytest.mark.parametrize("overrides, error, needle", [
    (dict(x=jnp.ones((2, 3, 16))), ValueError, "x must be [T, d], got shape (2, 3, 16)"),
    (dict(x=jnp.ones((6, 33))), ValueError,
     "x has d=33 but w_gate, w_up, w_down have d=16 (x [T, d] = (6, 33), w_gate [E, d, f] = (4, 16, 24), "
     "w_up [E, d, f] = (4, 16, 24), w_down [E, f, d] = (4, 24, 16))"),
    (dict(w_gate=jnp.ones((4, 17, 24))), ValueError, "x, w_up, w_down have d=16 but w_gate has d=17"),
    (dict(w_up=jnp.ones((4, 16, 25))), ValueError, "w_gate, w_down have f=24 but w_up has f=25"),
    (dict(w_down=jnp.ones((3, 24, 16))), ValueError, "w_gate, w_up have E=4 but w_down has E=3"),
    (dict(ids=jnp.zeros((5, 2), jnp.int32)), ValueError, "x, weights have T=6 but ids has T=5"),
    (dict(weights=jnp.ones((6, 3))), ValueError, "weights has k=3 but ids has k=2"),
    (dict(ids=jnp.zeros((6, 5), jnp.int32), weights=jnp.ones((6, 5))), ValueError,
     "k must satisfy 1 <= k <= E, but ids, weights have k=5 and w_gate, w_up, w_down have E=4"),
    (dict(ids=jnp.zeros((6, 2), jnp.float32)), TypeError, "ids must be an integer array"),
    (dict(ids=jnp.full((6, 2), 4, jnp.int32)), ValueError, "ids must lie in [0, E=4) where E is w_gate's"),
    (dict(x=jnp.ones((6, 16), jnp.int32)), TypeError, "x must be float32, bfloat16 or float16"),
    (dict(x=jnp.ones((6, 16), jnp.float64) if jax.config.jax_enable_x64 else jnp.ones((6, 16), jnp.int8)),
     TypeError, "x must be float32, bfloat16 or float16"),
    (dict(w_up=jnp.ones((4, 16, 24), jnp.bfloat16)), TypeError,
     "x, w_gate, w_down have dtype float32 but w_up has dtype bfloat16"),
    (dict(x=[[1.0] * 16] * 6), TypeError, "x must be a jax.Array or numpy.ndarray, got list"),
    (dict(ids=[[0, 1]] * 6), TypeError, "ids must be a jax.Array or numpy.ndarray, got list"),
])
def test_expert_ffn_bad_input(impl, overrides, error, needle):
    with pytest.raises(error, match=_escape(needle)):
        jaxmoe.expert_ffn(**_ffn_args(**overrides), implementation=impl)


def test_expert_ffn_takes_numpy_arrays():
    args = _ffn_args()
    y = jaxmoe.expert_ffn(**{name: np.asarray(a) for name, a in args.items()}, implementation="xla")
    np.testing.assert_array_equal(y, jaxmoe.expert_ffn(**args, implementation="xla"))


@pytest.mark.parametrize("kwargs, error, needle", [
    (dict(top_k=0), ValueError, "top_k must satisfy 1 <= top_k <= E, but top_k=0 and router_weight, w_gate, "
                                "w_up, w_down have E=4 (router_weight [d, E] = (16, 4))"),
    (dict(top_k=5), ValueError, "top_k=5 and router_weight, w_gate, w_up, w_down have E=4"),
    (dict(top_k=2.0), TypeError, "top_k must be a Python int"),
    (dict(top_k=2, router_weight=jnp.ones((15, 4))), ValueError,
     "x, w_gate, w_up, w_down have d=16 but router_weight has d=15"),
    (dict(top_k=2, router_weight=jnp.ones((16, 5))), ValueError,
     "router_weight has E=5 but w_gate, w_up, w_down have E=4"),
    (dict(top_k=2, x=jnp.ones((2, 3, 15))), ValueError,
     "x has d=15 but router_weight, w_gate, w_up, w_down have d=16 (x [..., d] = (2, 3, 15), "
     "router_weight [d, E] = (16, 4), w_gate [E, d, f] = (4, 16, 24)"),
    (dict(top_k=2, x=jnp.ones(())), ValueError, "x must be [..., d], got shape ()"),
    (dict(top_k=2, scoring="relu"), ValueError, "scoring must be 'softmax' or 'sigmoid'"),
    (dict(top_k=2, selection_bias=jnp.ones(3)), ValueError, "router_weight, w_gate, w_up, w_down have E=4 but selection_bias has E=3"),
    (dict(top_k=2, x=jnp.ones((2, 16), jnp.int32)), TypeError, "x must be float32, bfloat16 or float16"),
    (dict(top_k=2, w_gate=jnp.ones((4, 16, 24), jnp.float16)), TypeError,
     "x, w_up, w_down have dtype float32 but w_gate has dtype float16"),
    (dict(top_k=2, router_weight=jnp.ones((16, 4), jnp.int32)), TypeError, "router_weight must be float32"),
    (dict(top_k=2, x=[[1.0] * 16] * 2), TypeError, "x must be a jax.Array or numpy.ndarray, got list"),
    (dict(top_k=2, implementation="cuda"), ValueError, "implementation must be None or one of"),
])
def test_moe_bad_input(kwargs, error, needle):
    p = Problem(9, 6, 16, 24, 4, 2)
    args = dict(x=p.x, router_weight=jnp.ones((16, 4)), w_gate=p.w_gate, w_up=p.w_up, w_down=p.w_down)
    args.update(kwargs)
    with pytest.raises(error, match=_escape(needle)):
        jaxmoe.moe(**args)


@pytest.mark.parametrize("route", [jaxmoe.route, functools.partial(ops.route, mode="interpret")],
                         ids=["reference", "interpret"])
@pytest.mark.parametrize("kwargs, error, needle", [
    (dict(selection_bias=jnp.ones(3)), ValueError, "logits has E=4 but selection_bias has E=3 (logits [T, E] = (6, 4), selection_bias [E] = (3,))"),
    (dict(top_k=5), ValueError, "top_k must satisfy 1 <= top_k <= E, but top_k=5 and logits has E=4"),
    (dict(logits=jnp.ones((2, 3, 4))), ValueError, "logits must be [T, E], got shape (2, 3, 4)"),
    (dict(logits=[[0.0] * 4] * 6), TypeError, "logits must be a jax.Array or numpy.ndarray, got list"),
    (dict(selection_bias=jnp.ones(4, jnp.int32)), TypeError, "selection_bias must be float32, bfloat16 or float16"),
])
def test_route_bad_input(route, kwargs, error, needle):
    args = dict(logits=jnp.ones((6, 4)), top_k=2) | kwargs
    with pytest.raises(error, match=_escape(needle)):
        route(**args)


def test_unknown_implementation_lists_valid_names():
    p = Problem(10, 4, 16, 24, 4, 2)
    with pytest.raises(ValueError, match="'xla', 'triton', 'interpret'"):
        jaxmoe.expert_ffn(*p.args, implementation="pallas")


def test_out_of_range_ids_under_jit_contribute_zero():
    p = Problem(11, 8, 16, 24, 4, 2)
    bad_ids = p.ids.at[0, 1].set(7).at[3, 0].set(-1)
    y = jax.jit(reference.grouped_expert_ffn)(p.x, p.weights, bad_ids, p.w_gate, p.w_up, p.w_down)
    keep = jnp.where((bad_ids >= 0) & (bad_ids < p.E), p.weights, 0.0)
    want = dense_expert_ffn(p.x, keep, jnp.clip(bad_ids, 0, p.E - 1), p.w_gate, p.w_up, p.w_down)
    assert_close(y, want, jnp.float32)


def _escape(text: str) -> str:
    import re

    return re.escape(text)


def test_route_ranks_a_nan_score_first():
    """score_keys orders like the floats, -0.0 tied with 0.0, every NaN above every number, whatever
    jax.lax.top_k does with NaN on this backend; route picks a NaN-scored expert first."""
    from jaxmoe.routing import score_keys

    keys = np.asarray(score_keys(jnp.array([-0.0, 0.0, -1.0, jnp.nan, -jnp.inf, 1.0, jnp.inf, -jnp.nan])))
    assert keys[0] == keys[1] and keys[3] == keys[7] == np.iinfo(np.int32).max
    assert keys[4] < keys[2] < keys[0] < keys[5] < keys[6] < keys[3]
    r = jaxmoe.route(jnp.array([[0.0, jnp.nan, 1.0], [0.0, 2.0, 1.0]]), 2, scoring="sigmoid")
    np.testing.assert_array_equal(r.ids, [[1, 2], [1, 2]])
    assert np.isnan(np.asarray(r.weights)[0]).all() and np.isfinite(np.asarray(r.weights)[1]).all()
