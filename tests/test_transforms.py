"""Every implementation under JAX's transformations, forward and backward, against the unbatched reference.

vmap (folded into tokens, and one call per element), grad inside vmap and grad of vmap, lax.scan over
stacked layers, jax.checkpoint, jit with a donated input, eval_shape, and nnx.scan + nnx.remat over
stacked `jaxmoe.MoELayer`s. The reference (jaxmoe.reference) runs unbatched, once per element or layer.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxmoe
from jaxmoe import reference
from conftest import Problem, assert_close

IMPLEMENTATIONS = ["xla", "interpret", pytest.param("triton", marks=pytest.mark.gpu)]

B, T, D, F, E, K = 2, 8, 16, 24, 4, 2  # tiny: the interpreter is slow
ARG_NAMES = ("x", "weights", "ids", "w_gate", "w_up", "w_down")
DIFF_ARGNUMS = (0, 1, 3, 4, 5)  # everything but the ids
TOKENS = (0, 0, 0, None, None, None)  # experts shared by the batch: folded into tokens
EXPERTS = (0, 0, 0, 0, 0, 0)  # experts per element: one call per element
F32 = jnp.float32


@pytest.fixture(autouse=True)
def _highest():
    with jax.default_matmul_precision("highest"):
        yield


def stacked(n, seed=0):
    """n independent problems' arguments, each stacked on a new leading axis."""
    problems = [Problem(seed + i, T, D, F, E, K) for i in range(n)]
    return [jnp.stack([getattr(p, name) for p in problems]) for name in ARG_NAMES]


def select(args, in_axes):
    """Batched arguments where in_axes is 0, element 0 where it is None."""
    return [a if axis == 0 else a[0] for a, axis in zip(args, in_axes)]


def per_element(fn, args, in_axes):
    """fn once per batch element, outputs stacked: what vmap must compute."""
    n = next(a.shape[0] for a, axis in zip(args, in_axes) if axis == 0)
    fn = jax.jit(fn)  # one compile for all elements: eager op-by-op dispatch was most of these tests' time
    outs = [fn(*[a[b] if axis == 0 else a for a, axis in zip(args, in_axes)]) for b in range(n)]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)


def ffn(impl):
    return functools.partial(jaxmoe.expert_ffn, implementation=impl)


def dot_loss(fn):
    """<fn(x, weights, ids, ...), g>: its gradient is the VJP of fn at the cotangent g."""
    def loss(x, weights, ids, w_gate, w_up, w_down, g):
        return jnp.sum(fn(x, weights, ids, w_gate, w_up, w_down).astype(F32) * g)
    return loss


def assert_trees_close(got, want):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
        assert_close(a, b, F32)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("in_axes", [TOKENS, (0, None, None, None, None, None), EXPERTS],
                         ids=["tokens", "x_only", "experts"])
def test_vmap_forward(impl, in_axes):
    args = select(stacked(B), in_axes)
    y = jax.jit(jax.vmap(ffn(impl), in_axes=in_axes))(*args)
    assert_trees_close(y, per_element(reference.expert_ffn, args, in_axes))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_nested_vmap_forward(impl):
    """vmap of vmap over a [2, 2] batch: both axes fold into the tokens."""
    flat = select(stacked(4), TOKENS)
    args = [a.reshape(2, 2, *a.shape[1:]) if axis == 0 else a for a, axis in zip(flat, TOKENS)]
    y = jax.jit(jax.vmap(jax.vmap(ffn(impl), in_axes=TOKENS), in_axes=TOKENS))(*args)
    assert_trees_close(y.reshape(4, T, D), per_element(reference.expert_ffn, flat, TOKENS))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("in_axes", [TOKENS, EXPERTS], ids=["tokens", "experts"])
def test_grad_inside_vmap(impl, in_axes):
    args = select(stacked(B), in_axes)
    g = jax.random.normal(jax.random.key(1), (B, T, D))
    grad = jax.jit(jax.vmap(jax.grad(dot_loss(ffn(impl)), argnums=DIFF_ARGNUMS), in_axes=(*in_axes, 0)))
    want = per_element(jax.grad(dot_loss(reference.expert_ffn), argnums=DIFF_ARGNUMS), [*args, g], (*in_axes, 0))
    assert_trees_close(grad(*args, g), want)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_grad_of_vmap(impl):
    """Gradients of a batch-summed loss: per element for x and the routing weights, summed for the experts."""
    args = select(stacked(B), TOKENS)
    g = jax.random.normal(jax.random.key(2), (B, T, D))

    def batch_loss(*args):
        return jnp.sum(jax.vmap(dot_loss(ffn(impl)), in_axes=(*TOKENS, 0))(*args, g))

    got = jax.jit(jax.grad(batch_loss, argnums=DIFF_ARGNUMS))(*args)
    each = per_element(jax.grad(dot_loss(reference.expert_ffn), argnums=DIFF_ARGNUMS), [*args, g], (*TOKENS, 0))
    want = [w if TOKENS[i] == 0 else w.sum(axis=0) for i, w in zip(DIFF_ARGNUMS, each)]
    assert_trees_close(got, want)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_vmap_moe_keeps_aux_per_element(impl):
    """vmap over a batch axis of `moe`: outputs and aux losses (counts included) are each element's own."""
    x, _, _, w_gate, w_up, w_down = select(stacked(B), TOKENS)
    router = jax.random.normal(jax.random.key(3), (D, E)) / np.sqrt(D)
    g = jax.random.normal(jax.random.key(4), (B, T, D))

    def run(moe_fn, x, router, w_gate, w_up, w_down):
        return moe_fn(x, router, w_gate, w_up, w_down, top_k=K)

    def loss(moe_fn, x, router, w_gate, w_up, w_down, g):
        y, aux = run(moe_fn, x, router, w_gate, w_up, w_down)
        return jnp.sum(y * g) + aux.load_balancing_loss + 0.1 * aux.router_z_loss

    in_axes = (0, None, None, None, None)
    moe_fn = functools.partial(jaxmoe.moe, implementation=impl)
    args = (x, router, w_gate, w_up, w_down)
    got = jax.jit(jax.vmap(functools.partial(run, moe_fn), in_axes=in_axes))(*args)
    want = per_element(functools.partial(run, reference.moe), args, in_axes)
    assert_trees_close(got, want)
    np.testing.assert_array_equal(got[1].expert_counts, want[1].expert_counts)

    def batch_loss(*args):
        return jnp.sum(jax.vmap(functools.partial(loss, moe_fn), in_axes=(*in_axes, 0))(*args, g))

    got = jax.jit(jax.grad(batch_loss, argnums=range(5)))(*args)
    each = per_element(jax.grad(functools.partial(loss, reference.moe), argnums=range(5)), [*args, g],
                       (*in_axes, 0))
    assert_trees_close(got, [each[0], *(w.sum(axis=0) for w in each[1:])])


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("remat", [False, True], ids=["scan", "scan_checkpoint"])
def test_scan_over_stacked_layers(impl, remat):
    """jax.lax.scan over 2 layers (and with a jax.checkpoint body), against a Python loop of the reference."""
    x, weights, ids, w_gate, w_up, w_down = stacked(2, seed=10)  # axis 0: the layer
    x = x[0]
    g = jax.random.normal(jax.random.key(5), (T, D))

    def body(x, layer):
        weights, ids, w_gate, w_up, w_down = layer
        return x + ffn(impl)(x, weights, ids, w_gate, w_up, w_down), None

    if remat:
        body = jax.checkpoint(body)

    def loss(x, weights, w_gate, w_up, w_down):
        return jnp.sum(jax.lax.scan(body, x, (weights, ids, w_gate, w_up, w_down))[0] * g)

    def reference_loss(x, weights, w_gate, w_up, w_down):
        for i in range(2):
            x = x + reference.expert_ffn(x, weights[i], ids[i], w_gate[i], w_up[i], w_down[i])
        return jnp.sum(x * g)

    args = (x, weights, w_gate, w_up, w_down)
    got = jax.jit(jax.value_and_grad(loss, argnums=range(5)))(*args)
    assert_trees_close(got, jax.value_and_grad(reference_loss, argnums=range(5))(*args))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_checkpoint(impl):
    args = select(stacked(1), (None,) * 6)
    g = jax.random.normal(jax.random.key(6), (T, D))
    fn = jax.checkpoint(ffn(impl), policy=jax.checkpoint_policies.nothing_saveable)
    got = jax.jit(jax.value_and_grad(dot_loss(fn), argnums=DIFF_ARGNUMS))(*args, g)
    want = jax.value_and_grad(dot_loss(reference.expert_ffn), argnums=DIFF_ARGNUMS)(*args, g)
    assert_trees_close(got, want)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.filterwarnings("ignore:Some donated buffers were not usable")
def test_jit_with_donated_input(impl):
    args = select(stacked(1), (None,) * 6)
    g = jax.random.normal(jax.random.key(7), (T, D))
    forward = jax.jit(ffn(impl), donate_argnums=0)
    assert_trees_close(forward(jnp.copy(args[0]), *args[1:]), reference.expert_ffn(*args))
    step = jax.jit(jax.value_and_grad(dot_loss(ffn(impl)), argnums=DIFF_ARGNUMS), donate_argnums=0)
    want = jax.value_and_grad(dot_loss(reference.expert_ffn), argnums=DIFF_ARGNUMS)(*args, g)
    assert_trees_close(step(jnp.copy(args[0]), *args[1:], g), want)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_eval_shape(impl):
    """Shapes and dtypes of the forward, the vmapped forward and vmapped gradients; nothing is launched."""
    args = select(stacked(B), TOKENS)
    one = [a[0] if axis == 0 else a for a, axis in zip(args, TOKENS)]
    assert jax.eval_shape(ffn(impl), *one) == jax.ShapeDtypeStruct((T, D), F32)
    assert jax.eval_shape(jax.vmap(ffn(impl), in_axes=TOKENS), *args) == jax.ShapeDtypeStruct((B, T, D), F32)
    grad = jax.vmap(jax.grad(dot_loss(ffn(impl)), argnums=DIFF_ARGNUMS), in_axes=(*TOKENS, 0))
    grads = jax.eval_shape(grad, *args, jnp.zeros((B, T, D)))
    for got, i in zip(grads, DIFF_ARGNUMS, strict=True):
        assert got == jax.ShapeDtypeStruct((B, *one[i].shape), one[i].dtype)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_nnx_scan_and_remat_over_stacked_layers(impl):
    """Two MoELayers made by nnx.vmap, run by nnx.scan with an nnx.remat body; a Python loop of
    reference.moe over the same parameters is the oracle."""
    layers_count = 2

    @nnx.split_rngs(splits=layers_count)
    @nnx.vmap(in_axes=0, out_axes=0)
    def make_layers(rngs):
        return jaxmoe.MoELayer(D, F, num_experts=E, top_k=K, implementation=impl, rngs=rngs)

    layers = make_layers(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(8), (T, D))
    g = jax.random.normal(jax.random.key(9), (T, D))

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    @nnx.remat
    def forward(x, layer):
        return x + layer(x)

    @nnx.jit
    def loss_and_grads(layers):
        return nnx.value_and_grad(lambda layers: jnp.sum(forward(x, layers) * g))(layers)

    names = ("router", "w_gate", "w_up", "w_down")

    def reference_loss(params):
        h = x
        for i in range(layers_count):
            y, _ = reference.moe(h, *(params[name][i] for name in names), top_k=K)
            h = h + y
        return jnp.sum(h * g)

    loss, grads = loss_and_grads(layers)
    params = {name: getattr(layers, name)[...] for name in names}
    want_loss, want_grads = jax.value_and_grad(reference_loss)(params)
    assert_close(loss, want_loss, F32)
    for name in names:
        assert_close(grads[name][...], want_grads[name], F32)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_vmap_folds_into_tokens_only_when_experts_are_shared(impl):
    """Shared experts: one call on the B*T tokens, no loop. Per-element experts: a loop over the elements."""
    args = stacked(B)
    folded = str(jax.make_jaxpr(jax.vmap(ffn(impl), in_axes=TOKENS))(*select(args, TOKENS)))
    looped = str(jax.make_jaxpr(jax.vmap(ffn(impl), in_axes=EXPERTS))(*args))
    # (On CPU the reference's grouped GEMM loops over experts itself, so count loops rather than look for one.)
    assert f"f32[{B * T},{D}]" in folded
    assert folded.count("scan[") < looped.count("scan[")
