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
from jaxmoe.options import Router, make_router
from jaxmoe.reference import MoEAux, RouterStats, finalize_aux, router_stats
from jaxmoe.routing import Routing, expert_probs, selected_weights

_ROUTE_WARPS = 4
# route_with_aux adds up the programs' sums in the kernel when a launch has at most this many programs
# (T <= 128 for 128 experts, 4 tokens a program): its last program reads them all, which is cheap for a
# few programs and would be a serial tail for thousands. Above it, XLA adds them and applies the formulas.
FINALIZE_MAX_PROGRAMS = 32


@dataclasses.dataclass(frozen=True)
class _RouteOptions:
    router: Router
    mode: str
    finalize: bool = False  # the kernel returns MoEAux's losses instead of RouterStats' sums


def _checked(logits, router: Router, selection_bias) -> Router:
    _validate.check_route_args(logits, router, selection_bias)
    if router.grouped:
        raise NotImplementedError("group-limited routing (Router.top_groups < num_groups) is not in the Triton "
                                  "routing kernel yet; use implementation='xla'")
    return router


def route(logits, top_k=None, *, scoring="softmax", renormalize=True, selection_bias=None, router=None,
          mode="triton") -> Routing:
    """`jaxmoe.route` (the same arguments) with the forward in one Triton kernel; the VJP is the jax.lax one."""
    return route_with_stats(logits, top_k, scoring=scoring, renormalize=renormalize, selection_bias=selection_bias,
                            router=router, mode=mode)[0]


def route_with_stats(logits, top_k=None, *, scoring="softmax", renormalize=True, selection_bias=None, router=None,
                     mode="triton") -> tuple[Routing, RouterStats]:
    """`jaxmoe.reference.route_with_stats` from the same kernel: the aux losses' sums over tokens come
    from the rows the kernel holds anyway, instead of a dozen small XLA reductions over probs, logits
    and ids (about 14 us of a Qwen3 decode step on an H200)."""
    router = make_router(router, top_k, scoring, renormalize)
    options = _RouteOptions(_checked(logits, router, selection_bias), mode)
    logits = logits.astype(_F32)
    bias = None if selection_bias is None else selection_bias.astype(_F32)
    weights, ids, probs, counts, prob_sums, z_squared_sum = _fused_route(logits, bias, options)
    stats = RouterStats(counts, prob_sums, z_squared_sum, jnp.int32(logits.shape[0]))
    return Routing(weights, ids, probs), stats


def route_with_aux(logits, top_k=None, *, scoring="softmax", renormalize=True, selection_bias=None, router=None,
                   mode="triton") -> tuple[Routing, MoEAux]:
    """`jaxmoe.reference.route_with_aux` from the same kernel. With few programs (a decode step's) the
    kernel also applies the aux-loss formulas, so no XLA launch follows it; otherwise route_with_stats'
    sums go through `finalize_aux`."""
    router = _checked(logits, make_router(router, top_k, scoring, renormalize), selection_bias)
    T, E = logits.shape
    if T == 0 or _cdiv(T, _tokens_per_program(E)) > FINALIZE_MAX_PROGRAMS:
        routing, stats = route_with_stats(logits, router=router, selection_bias=selection_bias, mode=mode)
        return routing, finalize_aux(stats, router.top_k)
    options = _RouteOptions(router, mode, finalize=True)
    bias = None if selection_bias is None else selection_bias.astype(_F32)
    weights, ids, probs, counts, load_balancing, z_loss = _fused_route(logits.astype(_F32), bias, options)
    return Routing(weights, ids, probs), MoEAux(load_balancing, z_loss, counts)


def _tokens_per_program(E: int) -> int:
    # Each warp owns whole rows, 4 scores per lane (one row per warp from 128 experts up), so the k
    # rounds of row maxima are warp shuffles with no shared memory; rows of different warps run in
    # parallel. One warp holding 8 rows of 128 experts ran ~5000 dependent instructions: 15 us for
    # Qwen3's routing on an H200 at every T.
    return _ROUTE_WARPS * max(1, 128 // _next_pow2(E))


def _route_forward(logits, bias, options: _RouteOptions):
    """(weights, ids, probs, expert_counts, prob_sums, z_squared_sum) of RouterStats' meaning, or with
    options.finalize (weights, ids, probs, expert_counts, load_balancing_loss, router_z_loss) of MoEAux's."""
    T, E = logits.shape
    router = options.router
    k = router.top_k
    if T == 0:
        return (jnp.zeros((0, k), _F32), jnp.zeros((0, k), _I32), jnp.zeros((0, E), _F32), jnp.zeros((E,), _I32),
                jnp.zeros((E,), _F32), jnp.zeros((), _F32))
    block_t = _tokens_per_program(E)
    programs = _cdiv(T, block_t)
    finalize = options.finalize
    # Without finalize the last outputs (ticket counter, totals, losses) are 1-element stand-ins. The two
    # losses are outputs of their own: scalars sliced from one array would cost XLA a copy kernel each.
    weights, ids, probs, counts, prob_sums, z_squared, _, expert_counts, load_balancing, z_loss = launch(
        routing_kernels.topk_routing_kernel, logits, logits if bias is None else bias, T,
        grid=(programs,), mode=options.mode, num_warps=_ROUTE_WARPS,
        out_shapes=[_out((T, k), _F32), _out((T, k), _I32), _out((T, E), _F32), _out((E, programs), _I32),
                    _out((E, programs), _F32), _out((programs,), _F32), _out((1,), _I32),
                    _out((E if finalize else 1,), _I32), _out((1,), _F32), _out((1,), _F32)],
        zeroed_outputs=(6,) if finalize else (),
        E=E, TOP_K=k, BLOCK_T=block_t, BLOCK_E=_next_pow2(E), BLOCK_K=_next_pow2(k),
        SIGMOID=router.scoring == "sigmoid", RENORMALIZE=router.renormalize, RENORM_EPS=router.renormalize_epsilon,
        SCALE=router.scaling_factor, HAS_BIAS=bias is not None,
        FINALIZE=finalize, MAX_PROGRAMS=_next_pow2(programs) if finalize else 1)  # one compile per bucket of T
    if finalize:
        return weights, ids, probs, expert_counts, load_balancing.reshape(()), z_loss.reshape(())
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
    d_weights, _, d_probs, _, d_sums_or_losses, d_z = cotangents

    def differentiable_outputs(lg):
        probs = expert_probs(lg, options.router.scoring)
        weights = selected_weights(probs, ids, options.router)
        stats = router_stats(lg, Routing(weights, ids, probs), lg.shape[1])
        if options.finalize:
            aux = finalize_aux(stats, options.router.top_k)
            return weights, probs, aux.load_balancing_loss, aux.router_z_loss
        return weights, probs, stats.prob_sums, stats.z_squared_sum

    _, vjp = jax.vjp(differentiable_outputs, logits)
    (d_logits,) = vjp((d_weights, d_probs, d_sums_or_losses, d_z))
    return d_logits, None if bias is None else jnp.zeros_like(bias)


_fused_route.defvjp(_fused_route_fwd, _fused_route_bwd)


