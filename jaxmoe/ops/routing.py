"""Top-k routing in one Triton kernel; the VJP differentiates the jax.lax formulas at the kernel's ids."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jaxmoe import _validate
from jaxmoe.kernels import routing as routing_kernels
from jaxmoe.launch import launch
from jaxmoe.ops._util import F32 as _F32, I32 as _I32, cdiv as _cdiv, next_pow2 as _next_pow2, out as _out
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
    top_k = _validate.check_route_args(logits, top_k, scoring, bias)
    options = _RouteOptions(top_k, scoring, bool(renormalize), mode)
    logits = logits.astype(_F32)
    bias = None if bias is None else bias.astype(_F32)
    return Routing(*_fused_route(logits, bias, options))


def _route_forward(logits, bias, options: _RouteOptions):
    T, E = logits.shape
    k = options.top_k
    if T == 0:
        return jnp.zeros((0, k), _F32), jnp.zeros((0, k), _I32), jnp.zeros((0, E), _F32)
    block_e = _next_pow2(E)
    # Each warp owns whole rows, 4 scores per lane (one row per warp from 128 experts up), so the k
    # rounds of row maxima are warp shuffles with no shared memory; rows of different warps run in
    # parallel. One warp holding 8 rows of 128 experts ran ~5000 dependent instructions: 15 us for
    # Qwen3's routing on an H200 at every T.
    block_t = _ROUTE_WARPS * max(1, 128 // block_e)
    weights, ids, probs = launch(
        routing_kernels.topk_routing_kernel, logits, logits if bias is None else bias, T,
        grid=(_cdiv(T, block_t),), mode=options.mode, num_warps=_ROUTE_WARPS,
        out_shapes=[_out((T, k), _F32), _out((T, k), _I32), _out((T, E), _F32)],
        E=E, TOP_K=k, BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_K=_next_pow2(k),
        SIGMOID=options.scoring == "sigmoid", RENORMALIZE=options.renormalize, HAS_BIAS=bias is not None)
    return weights, ids, probs


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _fused_route(logits, bias, options):
    return _route_forward(logits, bias, options)


def _fused_route_fwd(logits, bias, options):
    weights, ids, probs = _route_forward(logits, bias, options)
    # ids are kept so the backward differentiates the selection the kernel actually made.
    return (weights, ids, probs), (logits, ids, bias)


def _fused_route_bwd(options, residuals, cotangents):
    logits, ids, bias = residuals
    d_weights, _, d_probs = cotangents

    def weights_and_probs(lg):
        probs = expert_probs(lg, options.scoring)
        return selected_weights(probs, ids, options.renormalize), probs

    _, vjp = jax.vjp(weights_and_probs, logits)
    (d_logits,) = vjp((d_weights, d_probs))
    return d_logits, None if bias is None else jnp.zeros_like(bias)


_fused_route.defvjp(_fused_route_fwd, _fused_route_bwd)


