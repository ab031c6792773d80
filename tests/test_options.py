"""The options of real models (jaxmoe.Router, jaxmoe.Experts, biases, shared experts): the reference held
against independent oracles, then every implementation held against the reference, forward and backward."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxmoe
from jaxmoe import Experts, Router, ops, reference
from jaxmoe.config import GemmConfig, MoEConfig, WeightGradConfig
from conftest import TOLERANCE, Problem, assert_close, rel_err

IMPLEMENTATIONS = ["xla", "interpret", pytest.param("triton", marks=pytest.mark.gpu)]
HI = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------------------------------------
# Oracles: written apart from the reference (numpy loops for routing, every token through every expert).

def route_oracle(logits, router: Router, selection_bias=None):
    """(weights, ids) per token in numpy float64 loops."""
    logits = np.asarray(logits, np.float64)
    T, E = logits.shape
    if router.scoring == "softmax":
        scores = np.exp(logits - logits.max(-1, keepdims=True))
        scores /= scores.sum(-1, keepdims=True)
    else:
        scores = 1 / (1 + np.exp(-logits))
    choice = scores + (0 if selection_bias is None else np.asarray(selection_bias, np.float64))
    weights, ids = np.zeros((T, router.top_k)), np.zeros((T, router.top_k), np.int64)
    size = E // router.num_groups
    for t in range(T):
        candidates = list(range(E))
        if router.grouped:
            groups = []
            for g in range(router.num_groups):
                members = sorted(choice[t, g * size:(g + 1) * size], reverse=True)
                groups.append(members[0] if router.group_score == "max" else members[0] + members[1])
            kept = sorted(range(router.num_groups), key=lambda g: (-groups[g], g))[:router.top_groups]
            candidates = [e for e in range(E) if e // size in kept]
        picked = sorted(candidates, key=lambda e: (-choice[t, e], e))[:router.top_k]
        w = scores[t, picked]
        if router.renormalize:
            w = w / (w.sum() + router.renormalize_epsilon)
        weights[t], ids[t] = w * router.scaling_factor, picked
    return weights, ids


def dense_oracle(x, weights, ids, w_gate, w_up, w_down, b_gate=None, b_up=None, b_down=None, *,
                 experts=Experts()):
    """Every token through every expert in float32 at HIGHEST precision, then mixed by the routing weights."""
    E = w_gate.shape[0]
    x, w_gate, w_up, w_down = (a.astype(jnp.float32) for a in (x, w_gate, w_up, w_down))
    mix = jnp.einsum("tk,tke->te", weights.astype(jnp.float32), jax.nn.one_hot(ids, E, dtype=jnp.float32))
    if experts.weight_on == "input":
        gate = jnp.einsum("te,td,edf->tef", mix, x, w_gate, precision=HI)  # the expert sees w * x
        up = jnp.einsum("te,td,edf->tef", mix, x, w_up, precision=HI)
    else:
        gate = jnp.einsum("td,edf->tef", x, w_gate, precision=HI)
        up = jnp.einsum("td,edf->tef", x, w_up, precision=HI)
    if b_gate is not None:
        gate, up = gate + b_gate.astype(jnp.float32), up + b_up.astype(jnp.float32)
    if experts.activation == "swiglu":
        h = jax.nn.silu(gate) * up
    else:
        g = jnp.minimum(gate, experts.limit)
        h = (jnp.clip(up, -experts.limit, experts.limit) + 1) * g * jax.nn.sigmoid(experts.alpha * g)
    out = jnp.einsum("tef,efd->ted", h, w_down, precision=HI)
    if b_down is not None:
        out = out + b_down.astype(jnp.float32)
    used = mix if experts.weight_on == "output" else (mix != 0).astype(jnp.float32)
    return jnp.einsum("ted,te->td", out, used, precision=HI)


# ----------------------------------------------------------------------------------------------------------
# Routers

GROUPED = Router(3, scoring="sigmoid", renormalize_epsilon=1e-20, num_groups=4, top_groups=2, group_score="top2_sum",
                 scaling_factor=2.5)
ROUTERS = {
    "plain": Router(2),
    "no_renormalize": Router(3, renormalize=False),
    "eps_and_scaling": Router(2, scoring="sigmoid", renormalize_epsilon=1e-20, scaling_factor=16.0),
    "groups_max": Router(4, num_groups=4, top_groups=2, group_score="max", renormalize=False, scaling_factor=1.5),
    "groups_top2_sum": GROUPED,
    "k_is_E_of_kept": Router(8, num_groups=4, top_groups=2, group_score="top2_sum"),
}


@pytest.mark.parametrize("name", ROUTERS)
@pytest.mark.parametrize("with_bias", [False, True])
def test_route_matches_oracle(name, with_bias):
    router = ROUTERS[name]
    logits = jax.random.normal(jax.random.key(1), (29, 16)) * 2
    bias = jax.random.uniform(jax.random.key(2), (16,), jnp.float32, -0.3, 0.3) if with_bias else None
    got = jaxmoe.route(logits, router=router, selection_bias=bias)
    weights, ids = route_oracle(logits, router, bias)
    np.testing.assert_array_equal(np.asarray(got.ids), ids)
    np.testing.assert_allclose(np.asarray(got.weights), weights, rtol=1e-6)


def test_groups_tie_to_the_lower_group():
    """Two groups with the same score: the lower group is kept, as the lower expert id wins an expert tie."""
    router = Router(2, num_groups=4, top_groups=1, group_score="top2_sum")
    logits = jnp.array([[0.0, 1.0, 3.0, -1.0, 3.0, -1.0, 0.0, 1.0]])  # groups 1 and 2 score 2.0 each
    got = jaxmoe.route(logits, router=router, selection_bias=None)
    weights, ids = route_oracle(logits, router)
    np.testing.assert_array_equal(np.asarray(got.ids), ids)
    assert set(np.asarray(got.ids)[0]) == {2, 3}


def test_bad_router_options():
    with pytest.raises(ValueError, match="top_groups must satisfy top_groups <= num_groups"):
        Router(2, num_groups=2, top_groups=3)
    with pytest.raises(ValueError, match="num_groups=3 must divide the E=8 experts"):
        jaxmoe.route(jnp.zeros((2, 8)), router=Router(2, num_groups=3))
    with pytest.raises(ValueError, match="top_k=5 exceeds the 1 kept groups' 4 experts"):
        jaxmoe.route(jnp.zeros((2, 8)), router=Router(5, num_groups=2, top_groups=1))
    with pytest.raises(ValueError, match="group_score must be 'max' or 'top2_sum'"):
        Router(2, group_score="mean")
    with pytest.raises(TypeError, match="pass either router=jaxmoe.Router"):
        jaxmoe.route(jnp.zeros((2, 8)), 2, router=Router(2))
    with pytest.raises(ValueError, match="renormalize_epsilon must be a non-negative finite float"):
        Router(2, renormalize_epsilon=-1.0)


@pytest.mark.parametrize("impl", ["interpret", pytest.param("triton", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("name", ROUTERS)
def test_routing_kernel_matches_route(impl, name):
    """The routing kernel's ids, weights and aux losses, and the gradient of the weights, at every router."""
    router = ROUTERS[name]
    logits = jax.random.normal(jax.random.key(3), (21, 16)) * 2
    bias = jax.random.uniform(jax.random.key(4), (16,), jnp.float32, -0.3, 0.3)
    got_routing, got_aux = ops.route_with_aux(logits, router=router, selection_bias=bias, mode=impl)
    want_routing, want_aux = reference.route_with_aux(logits, router=router, selection_bias=bias)
    np.testing.assert_array_equal(np.asarray(got_routing.ids), np.asarray(want_routing.ids))
    np.testing.assert_allclose(np.asarray(got_routing.weights), np.asarray(want_routing.weights), rtol=1e-6)
    for a, b in zip(got_aux, want_aux):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
    g = jax.random.normal(jax.random.key(5), (21, router.top_k))

    def loss(fn):
        return jax.grad(lambda lg: jnp.sum(fn(lg, router=router, selection_bias=bias)[0].weights * g))(logits)

    assert rel_err(loss(functools.partial(ops.route_with_aux, mode=impl)), loss(reference.route_with_aux)) < 1e-6


def _group_rows(E: int, size: int):
    """Rows of logits (for a selection bias tiled per group) on which groups tie: every group equal (the
    lower groups are kept), groups 1 and 3 equal and best, groups 1, 2 and 3 equal and best; each group's
    own experts tie in pairs too."""
    one = np.repeat(np.linspace(-1.0, 1.0, (size + 1) // 2), 2)[:size]
    low = one - 3.0
    groups = E // size
    return np.stack([np.tile(one, groups), np.concatenate([low, one, low, one][:groups]),
                     np.concatenate([low, one, one, one][:groups])]).astype(np.float32)


GROUP_CASES = {
    # E = 24 in 4 groups of 6 (a 32-wide tile), 37 tokens over 3 programs, the first rows tying groups
    "max_ties": (Router(4, num_groups=4, top_groups=2, group_score="max"), True),
    # k is every kept expert
    "top2_sum_ties_k_all_kept": (Router(12, scoring="sigmoid", renormalize_epsilon=1e-20, num_groups=4,
                                        top_groups=2, group_score="top2_sum", scaling_factor=2.5), False),
}


@pytest.mark.parametrize("name", GROUP_CASES)
def test_routing_kernel_groups(name):
    """Group-limited selection in the kernel on ties between groups and experts, E not a power of two,
    k = every kept expert and several programs: ids equal to the reference's, and the stats of both
    kernel variants (the losses in the kernel, and the programs' sums added by XLA)."""
    router, with_bias = GROUP_CASES[name]
    E, size = 24, 6
    logits = jax.random.normal(jax.random.key(6), (37, E)).at[:3].set(_group_rows(E, size))
    bias = jnp.tile(jnp.array([0.1, -0.2, 0.0, 0.3, 0.1, -0.1]), 4) if with_bias else None
    for kernel, spec in ((ops.route_with_aux, reference.route_with_aux),
                         (ops.route_with_stats, reference.route_with_stats)):
        got_routing, got_stats = kernel(logits, router=router, selection_bias=bias, mode="interpret")
        want_routing, want_stats = spec(logits, router=router, selection_bias=bias)
        np.testing.assert_array_equal(np.asarray(got_routing.ids), np.asarray(want_routing.ids))
        np.testing.assert_allclose(np.asarray(got_routing.weights), np.asarray(want_routing.weights), rtol=1e-6)
        for a, b in zip(got_stats, want_stats):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
    _, ids = route_oracle(logits[:3], router, bias)  # the tie rows kept the lower groups
    np.testing.assert_array_equal(np.asarray(got_routing.ids[:3]), ids)


@pytest.mark.parametrize("group_score", ["max", "top2_sum"])
def test_routing_kernel_groups_nan_and_no_tokens(group_score):
    """A NaN choice ranks its group above every other and its expert first, as in the reference (sigmoid
    scores keep the NaN to one expert); infinite logits; and T = 0."""
    router = Router(3, scoring="sigmoid", num_groups=4, top_groups=2, group_score=group_score)
    logits = jax.random.normal(jax.random.key(7), (4, 24))
    logits = logits.at[0, 15].set(jnp.nan).at[1, 2].set(jnp.nan).at[1, 20].set(jnp.nan)
    logits = logits.at[2, 7].set(jnp.inf).at[2, 19].set(jnp.inf).at[3, :6].set(-jnp.inf)
    got = ops.route(logits, router=router, mode="interpret")
    want = jaxmoe.route(logits, router=router)
    np.testing.assert_array_equal(np.asarray(got.ids), np.asarray(want.ids))
    assert got.ids[0, 0] == 15 and list(got.ids[1, :2]) == [2, 20]
    np.testing.assert_allclose(np.asarray(got.weights), np.asarray(want.weights), rtol=1e-6)
    empty = ops.route_with_aux(jnp.zeros((0, 24)), router=router, mode="interpret")[0]
    assert empty.ids.shape == (0, 3) and empty.weights.shape == (0, 3)


# ----------------------------------------------------------------------------------------------------------
# Experts

EXPERTS = {
    "biases": (Experts(), True),
    # A small limit so that the clamps bind on both sides for many rows.
    "clamped_biases": (Experts("clamped_swiglu", alpha=1.702, limit=0.5), True),
    "input": (Experts(weight_on="input"), False),
    "input_clamped_biases": (Experts("clamped_swiglu", limit=0.5, weight_on="input"), True),
}
# Every option at an odd shape; the edge shapes (T = 1 with k = E, E = 1, T = 0) with all options at once.
ODD_SHAPE = (37, 40, 24, 5, 2)
CASES = [(name, ODD_SHAPE) for name in EXPERTS] + [
    ("input_clamped_biases", shape) for shape in ((1, 16, 24, 6, 6), (9, 16, 8, 1, 1), (0, 16, 24, 4, 2))]


def make_biases(p: Problem, seed: int = 11):
    keys = jax.random.split(jax.random.key(seed), 3)
    return tuple(jax.random.normal(key, shape).astype(p.dtype)
                 for key, shape in zip(keys, ((p.E, p.f), (p.E, p.f), (p.E, p.d))))


def option_args(p: Problem, with_biases: bool):
    return (*p.args, *(make_biases(p) if with_biases else (None, None, None)))


@pytest.mark.parametrize("name", EXPERTS)
def test_reference_expert_options_match_oracle(name, highest_precision):
    experts, with_biases = EXPERTS[name]
    p = Problem(5, 37, 40, 24, 5, 2)
    args = option_args(p, with_biases)
    got = reference.grouped_expert_ffn(*args[:6], 0, *args[6:], experts=experts)
    assert_close(got, dense_oracle(*args, experts=experts), jnp.float32)


def _ffn(impl):
    def fn(x, weights, ids, wg, wu, wd, bg, bu, bd, *, experts):
        return jaxmoe.expert_ffn(x, weights, ids, wg, wu, wd, b_gate=bg, b_up=bu, b_down=bd, experts=experts,
                                 implementation=impl)
    return fn


def _reference_ffn(x, weights, ids, wg, wu, wd, bg, bu, bd, *, experts):
    return reference.grouped_expert_ffn(x, weights, ids, wg, wu, wd, 0, bg, bu, bd, experts=experts)


def option_grads(fn, p: Problem, args, experts):
    """Gradients of <y, g> in x, the routing weights, the expert weights and (when given) the biases."""
    g = jax.random.normal(jax.random.key(p.T + 7), (p.T, p.d), jnp.float32)
    ids = args[2]
    argnums = (0, 1, 3, 4, 5) + ((6, 7, 8) if args[6] is not None else ())

    def loss(*a):
        return jnp.sum(fn(*a, experts=experts).astype(jnp.float32) * g)

    differentiable = [a if i != 2 else ids for i, a in enumerate(args)]
    return jax.jit(jax.grad(loss, argnums=argnums))(*differentiable)


@functools.cache
def _reference_results(name: str, shape, dtype: str):
    """The reference's output and gradients for test_expert_options_match_reference, computed once for
    every implementation (compiling the reference's gradient is most of each case's time on CPU).
    Its callers all run at "highest" precision."""
    experts, with_biases = EXPERTS[name]
    p = Problem(sum(shape), *shape, dtype=dtype)
    args = option_args(p, with_biases)
    return (jax.jit(functools.partial(_reference_ffn, experts=experts))(*args),
            option_grads(_reference_ffn, p, args, experts))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("name, shape", CASES, ids=lambda c: c if isinstance(c, str) else "T{}_d{}_f{}_E{}_k{}".format(*c))
def test_expert_options_match_reference(impl, name, shape, highest_precision):
    """Forward and every gradient, odd shapes, k = E, E = 1 and T = 0; bfloat16 at the odd shape (not in
    the interpreter, whose bfloat16 tl.dot is wrong: triton issue 11584)."""
    experts, with_biases = EXPERTS[name]
    dtypes = [jnp.float32] if impl == "interpret" or shape != ODD_SHAPE else [jnp.float32, jnp.bfloat16]
    for dtype in dtypes:
        p = Problem(sum(shape), *shape, dtype=dtype)
        args = option_args(p, with_biases)
        y = jax.jit(functools.partial(_ffn(impl), experts=experts))(*args)
        want, want_grads = _reference_results(name, shape, jnp.dtype(dtype).name)
        assert y.dtype == p.dtype and y.shape == (p.T, p.d)
        assert_close(y, want, dtype)
        got_grads = option_grads(_ffn(impl), p, args, experts)
        for i, (a, b) in enumerate(zip(got_grads, want_grads)):
            assert a.shape == b.shape and a.dtype == b.dtype, (i, a.shape, b.shape, a.dtype, b.dtype)
            assert rel_err(a, b) <= TOLERANCE[jnp.dtype(dtype)], f"gradient {i}: {rel_err(a, b):.3g}"


# Tiles small enough for several N tiles in every GEMM (the dH kernel's routing-weight planes), split-M
# gate/up row tiles and split-K down and dX projections (the bias in the first plane alone).
SMALL_SPLIT_TILES = MoEConfig(32, GemmConfig(16, 16, 2, split_m=2), GemmConfig(16, 16, 1, split_k=3),
                              dh=GemmConfig(16, 16, 2), dx=GemmConfig(16, 16, 1, split_k=2),
                              dw=WeightGradConfig(16, 16, 16, 4, 2))


@pytest.mark.parametrize("impl", ["interpret", pytest.param("triton", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("name", ["clamped_biases", "input_clamped_biases"])
def test_expert_options_split_tiles_and_other_devices_experts(impl, name, highest_precision):
    """The options with split tiles, and with the weights holding experts [1, 4) of 5 (expert_first = 1):
    assignments to experts 0 and 4 belong to other devices and add nothing, nor any bias gradient."""
    experts, _ = EXPERTS[name]
    p = Problem(3, 23, 40, 40, 5, 2)
    x, weights, ids, *expert_weights = p.args
    assert np.isin([0, 4], np.asarray(ids)).all() and np.isin([1, 2, 3], np.asarray(ids)).all()
    local = [a[1:4] for a in (*expert_weights, *make_biases(p))]

    def kernels(*a):
        return ops.expert_ffn(*a[:6], 1, *a[6:], experts=experts, mode=impl, config=SMALL_SPLIT_TILES)

    def want(*a):
        return reference.grouped_expert_ffn(*a[:6], 1, *a[6:], experts=experts)

    args = (x, weights, ids, *local)
    assert_close(jax.jit(kernels)(*args), jax.jit(want)(*args), jnp.float32)
    for i, (a, b) in enumerate(zip(option_grads(lambda *a, experts: kernels(*a), p, args, experts),
                                   option_grads(lambda *a, experts: want(*a), p, args, experts))):
        assert rel_err(a, b) <= 1e-5, f"gradient {i}: {rel_err(a, b):.3g}"


@pytest.mark.parametrize("impl", ["interpret", pytest.param("triton", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("name", ["clamped_biases", "input_clamped_biases"])
def test_clamped_gradients_follow_the_forward_in_bfloat16(impl, name, highest_precision):
    """In bfloat16 the backward rebuilds gate and up from products rounded to bfloat16, and a value near a
    limit (0.5 here: many are) may land on the other side of it; its gradient must still follow the
    forward's decision, as the reference's float32 gate and up do (rebuilt decisions missed by 3e-2)."""
    experts, _ = EXPERTS[name]
    p = Problem(5, 37, 40, 24, 5, 2, dtype=jnp.bfloat16)
    args = option_args(p, True)
    got = option_grads(_ffn(impl), p, args, experts)
    want = option_grads(_reference_ffn, p, args, experts)
    for i, (a, b) in enumerate(zip(got, want)):
        assert rel_err(a, b) <= TOLERANCE[jnp.dtype(jnp.bfloat16)], f"gradient {i}: {rel_err(a, b):.3g}"


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_nonfinite_bias_stays_in_its_expert(impl):
    """An Inf in one expert's down bias reaches exactly the tokens routed to that expert."""
    p = Problem(8, 12, 16, 8, 4, 2)
    b_gate, b_up, b_down = make_biases(p)
    b_down = b_down.at[2, 3].set(jnp.inf)
    y = _ffn(impl)(*p.args, b_gate, b_up, b_down, experts=Experts())
    routed_to_2 = np.asarray((p.ids == 2).any(1))
    assert routed_to_2.any() and not routed_to_2.all()
    y = np.asarray(y)
    assert np.isfinite(y[~routed_to_2]).all()
    assert not np.isfinite(y[routed_to_2, 3]).any()


# ----------------------------------------------------------------------------------------------------------
# The whole layer: moe() with every option at once, against the reference and against the oracles.

def full_problem(seed=21, T=18, d=32, f=16, E=8, fs=24):
    keys = jax.random.split(jax.random.key(seed), 12)
    p = Problem(seed, T, d, f, E, 2)
    arrays = dict(
        router_weight=jax.random.normal(keys[0], (d, E)) / np.sqrt(d),
        router_bias=jax.random.normal(keys[1], (E,)) * 0.1,
        selection_bias=jax.random.uniform(keys[2], (E,), jnp.float32, -0.05, 0.05),
        w_gate=p.w_gate, w_up=p.w_up, w_down=p.w_down,
        **dict(zip(("b_gate", "b_up", "b_down"), make_biases(p))),
        shared_w_gate=jax.random.normal(keys[3], (d, fs)) / np.sqrt(d),
        shared_w_up=jax.random.normal(keys[4], (d, fs)) / np.sqrt(d),
        shared_w_down=jax.random.normal(keys[5], (fs, d)) / np.sqrt(fs),
        shared_output_gate=jax.random.normal(keys[6], (d,)) / np.sqrt(d),
    )
    return p.x.reshape(3, T // 3, d), arrays


LAYERS = {
    "deepseek_v3": (GROUPED, Experts(), ("router_bias", "b_gate", "b_up", "b_down", "shared_output_gate")),
    "gpt_oss": (Router(2), Experts("clamped_swiglu", limit=0.5), ("selection_bias", "shared_w_gate", "shared_w_up",
                                                                 "shared_w_down", "shared_output_gate")),
    "llama4": (Router(1, scoring="sigmoid", renormalize=False), Experts(weight_on="input"),
               ("router_bias", "selection_bias", "b_gate", "b_up", "b_down", "shared_output_gate")),
    "qwen2": (Router(2, renormalize=False), Experts(), ("router_bias", "selection_bias", "b_gate", "b_up", "b_down")),
}


def layer_arrays(name):
    x, arrays = full_problem()
    router, experts, left_out = LAYERS[name]
    return x, {k: v for k, v in arrays.items() if k not in left_out}, router, experts


@pytest.mark.parametrize("name", LAYERS)
def test_reference_moe_matches_oracles(name, highest_precision):
    x, arrays, router, experts = layer_arrays(name)
    y, _ = reference.moe(x, **arrays, router=router, experts=experts)
    x2d = x.reshape(-1, x.shape[-1])
    logits = jnp.dot(x2d, arrays["router_weight"], precision=HI) + arrays.get("router_bias", 0.0)
    weights, ids = route_oracle(logits, router, arrays.get("selection_bias"))
    want = dense_oracle(x2d, jnp.asarray(weights, jnp.float32), jnp.asarray(ids, jnp.int32), arrays["w_gate"],
                        arrays["w_up"], arrays["w_down"], arrays.get("b_gate"), arrays.get("b_up"),
                        arrays.get("b_down"), experts=experts)
    if "shared_w_gate" in arrays:
        gate, up = x2d @ arrays["shared_w_gate"], x2d @ arrays["shared_w_up"]
        shared = (jax.nn.silu(gate) * up) @ arrays["shared_w_down"]
        if "shared_output_gate" in arrays:
            shared = shared * jax.nn.sigmoid(x2d @ arrays["shared_output_gate"])[:, None]
        want = want + shared
    assert_close(y.reshape(x2d.shape), want, jnp.float32)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("name", LAYERS)
def test_moe_options_match_reference(impl, name, highest_precision):
    """Forward, aux losses and the gradient of every array (the selection bias's is zero everywhere)."""
    x, arrays, router, experts = layer_arrays(name)
    g = jax.random.normal(jax.random.key(9), x.shape)
    names = tuple(arrays)

    def loss(moe_fn):
        def inner(x, *values):
            y, aux = moe_fn(x, **dict(zip(names, values)), router=router, experts=experts)
            return jnp.sum(y * g) + aux.load_balancing_loss + 0.1 * aux.router_z_loss, (y, aux)
        return jax.jit(jax.grad(inner, argnums=tuple(range(len(names) + 1)), has_aux=True))

    got, (y, aux) = loss(functools.partial(jaxmoe.moe, implementation=impl))(x, *arrays.values())
    want, (y_ref, aux_ref) = loss(reference.moe)(x, *arrays.values())
    assert_close(y, y_ref, jnp.float32)
    np.testing.assert_array_equal(np.asarray(aux.expert_counts), np.asarray(aux_ref.expert_counts))
    assert_close(aux.load_balancing_loss, aux_ref.load_balancing_loss, jnp.float32)
    for arg, a, b in zip(("x",) + names, got, want):
        if arg == "selection_bias":
            assert not np.asarray(a).any(), "the selection bias is not trained"
            continue
        assert rel_err(a, b) <= 1e-5, f"d{arg}: {rel_err(a, b):.3g}"


@pytest.mark.parametrize("name", LAYERS)
def test_layers_hold_the_options(name):
    """nnx and linen MoELayers with a family's options compute `moe` with their parameters; the
    selection bias is state, not a parameter."""
    _, arrays, router, experts = layer_arrays(name)
    flags = dict(router_bias="router_bias" in arrays, expert_bias="b_gate" in arrays,
                 selection_bias="selection_bias" in arrays, shared_d_ff=24 if "shared_w_gate" in arrays else None,
                 shared_gate="shared_output_gate" in arrays)
    layer = jaxmoe.MoELayer(32, 16, 8, router=router, experts=experts, implementation="xla", **flags,
                            rngs=nnx.Rngs(0))
    params = nnx.state(layer, nnx.Param)
    assert "selection_bias" not in params and ("selection_bias" in nnx.state(layer, jaxmoe.SelectionBias)) == \
        flags["selection_bias"]
    names = {_param_name(k) for k, _ in arrays.items()} | {"router"} - {"router_weight"}
    assert set(params.keys()) == names - {"selection_bias", "router_weight"}
    x = jax.random.normal(jax.random.key(1), (2, 9, 32))
    for k, v in arrays.items():
        getattr(layer, _param_name(k))[...] = v
    y = layer(x)
    want, _ = reference.moe(x, **arrays, router=router, experts=experts)
    np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=1e-6, atol=1e-6)

    twin = jaxmoe.linen.MoELayer(32, 16, 8, router=router, experts=experts, implementation="xla", **flags)
    variables = twin.init(jax.random.key(0), x)
    variables = {"params": {_param_name(k): v for k, v in arrays.items() if k != "selection_bias"},
                 **({"router_state": {"selection_bias": arrays["selection_bias"]}} if flags["selection_bias"] else {})}
    np.testing.assert_allclose(np.asarray(twin.apply(variables, x)), np.asarray(want), rtol=1e-6, atol=1e-6)


def _param_name(moe_argument: str) -> str:
    return "router" if moe_argument == "router_weight" else moe_argument


def test_update_selection_bias():
    bias = jnp.array([0.0, 0.1, -0.1, 0.0])
    counts = jnp.array([1, 5, 2, 4])  # mean 3
    np.testing.assert_allclose(jaxmoe.update_selection_bias(bias, counts, 0.01), [0.01, 0.09, -0.09, -0.01],
                               rtol=1e-6)


@pytest.mark.parametrize("impl", ["xla", "interpret"])
def test_options_under_vmap_and_scan(impl):
    """vmap over a batch of inputs (folded into tokens) and scan over it give what one call per element
    gives, with expert biases, the clamp and the weight on the input in play."""
    x, arrays, router, experts = layer_arrays("gpt_oss")
    experts = Experts("clamped_swiglu", limit=0.5, weight_on="input")
    moe = functools.partial(jaxmoe.moe, **arrays, router=router, experts=experts, implementation=impl)
    per_element = jnp.stack([moe(x[i])[0] for i in range(x.shape[0])])
    vmapped = jax.jit(jax.vmap(lambda xi: moe(xi)[0]))(x)
    _, scanned = jax.jit(lambda xs: jax.lax.scan(lambda c, xi: (c, moe(xi)[0]), 0, xs))(x)
    np.testing.assert_allclose(np.asarray(vmapped), np.asarray(per_element), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(scanned), np.asarray(per_element), rtol=1e-5, atol=1e-5)
