"""How the expert FFN runs under `jax.vmap`, for every implementation.

The expert FFN is per token: while the expert weights are shared by the batch, vmapping x, the
routing weights and the ids computes exactly what one call on all B*T tokens computes. `batchable`
wraps an implementation's expert FFN so that a vmap does that (a `jax.custom_batching.custom_vmap`
rule); when the expert weights are batched too, no single call computes every element, and the rule
makes one call per element. Nested vmaps fold again, one level at a time.

custom_vmap functions have no reverse-mode autodiff, so the fold sits under a `jax.custom_vjp` whose
forward and backward are the implementation's own VJP (`jax.vjp`). Under differentiation JAX batches
that forward and backward, not the folded primal, so vmap of grad and grad of vmap run one
implementation call per element: the kernel paths through jaxmoe.launch's per-element launches,
"xla" through `ragged_dot` below. Only a vmapped forward that is not differentiated is folded.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from jaxmoe import reference
from jaxmoe.options import Experts


def batchable(expert_ffn_fn: Callable) -> Callable:
    """expert_ffn_fn(x, weights, ids, w_gate, w_up, w_down, expert_first, b_gate, b_up, b_down, *, experts) ->
    the same function (expert_first defaulting to 0, the biases to None), folded under vmap."""

    @functools.cache
    def folded(experts: Experts):
        return _fold(functools.partial(expert_ffn_fn, experts=experts))

    def call(x, weights, ids, w_gate, w_up, w_down, expert_first=0, b_gate=None, b_up=None, b_down=None, *,
             experts: Experts = Experts()):
        return folded(experts)(x, weights, ids, w_gate, w_up, w_down, jnp.asarray(expert_first, jnp.int32),
                               b_gate, b_up, b_down)

    return call


def _fold(expert_ffn_fn: Callable) -> Callable:
    """expert_ffn_fn (every argument positional; the biases may be None) under a custom_vmap that folds
    the batch into tokens, and a custom_vjp that gives the custom_vmap reverse mode."""

    @jax.custom_vjp
    @jax.custom_batching.custom_vmap
    def ffn(x, weights, ids, w_gate, w_up, w_down, expert_first, b_gate, b_up, b_down):
        return expert_ffn_fn(x, weights, ids, w_gate, w_up, w_down, expert_first, b_gate, b_up, b_down)

    @ffn.def_vmap
    def ffn_vmap(axis_size, in_batched, x, weights, ids, w_gate, w_up, w_down, expert_first, b_gate, b_up, b_down):
        args = (x, weights, ids, w_gate, w_up, w_down, expert_first, b_gate, b_up, b_down)
        # A bias left out is None, whose in_batched entry is None too: falsy, as for an unbatched one.
        if any(in_batched[3:]):  # per-element experts (or expert ranges): one call per element

            def one_element(batched):
                rest = iter(batched)
                return ffn(*[next(rest) if b else a for a, b in zip(args, in_batched)])

            return jax.lax.map(one_element, [a for a, b in zip(args, in_batched) if b]), True
        x, weights, ids = (a if b else jnp.broadcast_to(a, (axis_size, *a.shape))
                           for a, b in zip(args[:3], in_batched[:3]))
        B, T, d = x.shape
        k = ids.shape[-1]
        # ffn, not expert_ffn_fn: an outer vmap folds its batch axis into these tokens too.
        y = ffn(x.reshape(B * T, d), weights.reshape(B * T, k), ids.reshape(B * T, k), *args[3:])
        return y.reshape(B, T, d), True

    def ffn_fwd(x, weights, ids, w_gate, w_up, w_down, expert_first, b_gate, b_up, b_down):
        def differentiable(x, weights, w_gate, w_up, w_down, b_gate, b_up, b_down):
            return expert_ffn_fn(x, weights, ids, w_gate, w_up, w_down, expert_first, b_gate, b_up, b_down)

        return jax.vjp(differentiable, x, weights, w_gate, w_up, w_down, b_gate, b_up, b_down)

    def ffn_bwd(vjp, d_y):
        d_x, d_weights, d_gate, d_up, d_down, d_b_gate, d_b_up, d_b_down = vjp(d_y)
        return d_x, d_weights, None, d_gate, d_up, d_down, None, d_b_gate, d_b_up, d_b_down

    ffn.defvjp(ffn_fwd, ffn_bwd)
    return ffn


def ragged_dot(lhs, rhs, group_sizes, *, precision=None, preferred_element_type=None):
    """The reference's `ragged_dot`, forward and VJP, that also runs under vmap: one call per batch element.

    JAX's own batching rule of ragged_dot needs lhs, rhs and group_sizes all batched ("ragged_dot vmap
    over any dim but 0 - NYI" otherwise), and the expert weights (rhs) usually are not. Outside vmap
    it computes what jax.lax.ragged_dot and its transposes compute.
    """
    return _sequential_ragged_dot(precision, None if preferred_element_type is None
                                  else jnp.dtype(preferred_element_type))(lhs, rhs, group_sizes)


@functools.cache
def _sequential_ragged_dot(precision, preferred_element_type):
    def dot(lhs, rhs, group_sizes):
        # The reference's grouped GEMM: jax.lax.ragged_dot, or on CPU its row-selecting form.
        return reference.default_ragged_dot(lhs, rhs, group_sizes, precision=precision,
                                            preferred_element_type=preferred_element_type)

    def dot_transposes(lhs, rhs, group_sizes, d_out):
        # The VJP of the reference's grouped GEMM, with no forward recomputed.
        return reference.ragged_dot_transposes(lhs, rhs, group_sizes, d_out, precision=precision)

    per_element_dot = jax.custom_batching.sequential_vmap(dot)
    per_element_transposes = jax.custom_batching.sequential_vmap(dot_transposes)

    # custom_vmap functions have no reverse-mode autodiff of their own: this custom_vjp gives them one.
    @jax.custom_vjp
    def batchable_dot(lhs, rhs, group_sizes):
        return per_element_dot(lhs, rhs, group_sizes)

    def batchable_dot_fwd(lhs, rhs, group_sizes):
        return per_element_dot(lhs, rhs, group_sizes), (lhs, rhs, group_sizes)

    def batchable_dot_bwd(residuals, d_out):
        return (*per_element_transposes(*residuals, d_out), None)

    batchable_dot.defvjp(batchable_dot_fwd, batchable_dot_bwd)
    return batchable_dot
