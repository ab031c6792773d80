"""Top-k routing and the aux losses' statistics in one Triton kernel; the VJP differentiates the jax.lax
formulas at the kernel's ids."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jaxmoe import _validate
from jaxmoe.kernels import routing as routing_kernels
from jaxmoe.launch import launch
from jaxmoe.ops._util import F32 as _F32, I32 as _I32, cdiv as _cdiv, next_pow2 as _next_pow2, out as _out
from jaxmoe.reference import RouterStats, router_stats
from jaxmoe.routing import Routing, expert_probs, selected_weights

_ROUTE_WARPS = 4


@dataclasses.dataclass(frozen=True)
class _RouteOptions:
    top_k: int
    scoring: str
    renormalize: bool
    mode: str


def route(logits, top_k, *, scoring="softmax", renormalize=True, bias=None, mode="triton") -> Routing:
    """`jaxmoe.route` with the forward in one Triton kernel; the VJP is the jax.lax one."""
    return route_with_stats(logits, top_k, scoring=scoring, renormalize=renormalize, bias=bias, mode=mode)[0]


def route_with_stats(logits, top_k, *, scoring="softmax", renormalize=True, bias=None,
                     mode="triton") -> tuple[Routing, RouterStats]:
    """`jaxmoe.reference.route_with_stats` from the same kernel: the aux losses' sums over tokens come
    from the rows the kernel holds anyway, instead of a dozen small XLA reductions over probs, logits
    and ids (about 14 us of a Qwen3 decode step on an H200)."""
    top_k = _validate.check_route_args(logits, top_k, scoring, bias)
    options = _RouteOptions(top_k, scoring, bool(renormalize), mode)
    logits = logits.astype(_F32)
    bias = None if bias is None else bias.astype(_F32)
    weights, ids, probs, counts, prob_sums, z_squared_sum = _fused_route(logits, bias, options)
    stats = RouterStats(counts, prob_sums, z_squared_sum, jnp.int32(logits.shape[0]))
    return Routing(weights, ids, probs), stats


def _route_forward(logits, bias, options: _RouteOptions):
    """(weights, ids, probs, expert_counts, prob_sums, z_squared_sum) of RouterStats' meaning."""
    T, E = logits.shape
    k = options.top_k
    if T == 0:
        return (jnp.zeros((0, k), _F32), jnp.zeros((0, k), _I32), jnp.zeros((0, E), _F32), jnp.zeros((E,), _I32),
                jnp.zeros((E,), _F32), jnp.zeros((), _F32))
    block_e = _next_pow2(E)
    # Each warp owns whole rows, 4 scores per lane (one row per warp from 128 experts up), so the k
    # rounds of row maxima are warp shuffles with no shared memory; rows of different warps run in
    # parallel. One warp holding 8 rows of 128 experts ran ~5000 dependent instructions: 15 us for
    # Qwen3's routing on an H200 at every T.
    block_t = _ROUTE_WARPS * max(1, 128 // block_e)
    programs = _cdiv(T, block_t)
    weights, ids, probs, counts, prob_sums, z_squared = launch(
        routing_kernels.topk_routing_kernel, logits, logits if bias is None else bias, T,
        grid=(programs,), mode=options.mode, num_warps=_ROUTE_WARPS,
        out_shapes=[_out((T, k), _F32), _out((T, k), _I32), _out((T, E), _F32), _out((E, programs), _I32),
                    _out((E, programs), _F32), _out((programs,), _F32)],
        E=E, TOP_K=k, BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_K=_next_pow2(k),
        SIGMOID=options.scoring == "sigmoid", RENORMALIZE=options.renormalize, HAS_BIAS=bias is not None)
    # The programs' partial sums, added by XLA in a fixed order (integers: exactly). Putting a decode
    # step's 16 tokens in one program of 16 warps instead, so that XLA had nothing to add, made the kernel
    # 8.1 us against 3.1 on an H200 (Qwen3), more than the three reductions it saved.
    return weights, ids, probs, counts.sum(1), prob_sums.sum(1), z_squared.sum()


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _fused_route(logits, bias, options):
    return _route_forward(logits, bias, options)


def _fused_route_fwd(logits, bias, options):
    outputs = _route_forward(logits, bias, options)
    ids = outputs[1]
    # ids are kept so the backward differentiates the selection the kernel actually made.
    return outputs, (logits, ids, bias)


def _fused_route_bwd(options, residuals, cotangents):
    logits, ids, bias = residuals
    d_weights, _, d_probs, _, d_prob_sums, d_z_squared_sum = cotangents

    def differentiable_outputs(lg):
        probs = expert_probs(lg, options.scoring)
        weights = selected_weights(probs, ids, options.renormalize)
        stats = router_stats(lg, Routing(weights, ids, probs), lg.shape[1])
        return weights, probs, stats.prob_sums, stats.z_squared_sum

    _, vjp = jax.vjp(differentiable_outputs, logits)
    (d_logits,) = vjp((d_weights, d_probs, d_prob_sums, d_z_squared_sum))
    return d_logits, None if bias is None else jnp.zeros_like(bias)


_fused_route.defvjp(_fused_route_fwd, _fused_route_bwd)


