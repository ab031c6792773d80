"""What the benchmark runs: the implementations (rows), the step of each pass, and the GEMM roof.

Implementations:
  triton   jaxmoe.moe(..., implementation="triton")                   (GPU only)
  xla      the jax.lax reference: jaxmoe.moe(..., implementation="xla") on CPU, the same pipeline with
           jax.lax.ragged_dot as it is on a GPU (see make_forward)
  tokamax  jaxmoe.pipeline.moe_pipeline with tokamax.ragged_dot_general(implementation="mosaic") as the
           grouped GEMM (GPU only, and only when `import tokamax` works), through
           jaxmoe.reference.make_ragged_dot: its VJP is two more tokamax ragged GEMMs. tokamax runs its
           heuristic kernel config (no autotuning cache).
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp

import jaxmoe
from jaxmoe import pipeline, reference
from jaxmoe.options import Experts, Router, make_router
from jaxmoe.routing import Routing, expert_probs, selected_weights

IMPLS = ("triton", "xla", "tokamax")
PEERS = ("xla", "tokamax")  # the rows a triton row is compared with
PASSES = ("fwd", "fwd_bwd")


def _tokamax_general(lhs, rhs, group_sizes, dims, precision, preferred_element_type):
    import tokamax

    return tokamax.ragged_dot_general(lhs, rhs, group_sizes, dims, precision=precision,
                                      preferred_element_type=preferred_element_type, implementation="mosaic")


tokamax_ragged_dot = reference.make_ragged_dot(_tokamax_general)


def lax_route(logits, top_k=None, *, scoring="softmax", renormalize=True, selection_bias=None, router=None):
    """Routing as plain jax.lax code writes it, for the peer rows: jax.lax.top_k on the float scores,
    then the aux losses' statistics in jax.lax (reference.router_stats). Returns (Routing, RouterStats).

    jaxmoe.route selects by integer keys (jaxmoe.routing.score_keys: a NaN ranks first on every
    backend); XLA may run an integer top-k by another, slower kernel, which would slow the peers and
    flatter us.
    """
    router = make_router(router, top_k, scoring, renormalize)
    if router.grouped:  # the peers' own group-limited selection is the reference's, in jax.lax already
        routing = jaxmoe.route(logits, router=router, selection_bias=selection_bias)
        return routing, reference.router_stats(logits, routing, logits.shape[-1])
    probs = expert_probs(logits, router.scoring)
    scores = probs if selection_bias is None else probs + selection_bias.astype(jnp.float32)
    ids = jax.lax.top_k(scores, router.top_k)[1].astype(jnp.int32)
    routing = Routing(selected_weights(probs, ids, router), ids, probs)
    return routing, reference.router_stats(logits, routing, logits.shape[-1])


def impl_availability(impls, on_gpu: bool) -> dict[str, str | None]:
    """impl -> None when it can run here, else the reason it is skipped."""
    reasons: dict[str, str | None] = {}
    for impl in impls:
        if impl == "xla":
            reasons[impl] = None
        elif not on_gpu:
            reasons[impl] = ("the Triton rows need a GPU (jaxmoe.moe(implementation='triton') runs only "
                             "on a GPU with jax-triton)" if impl == "triton" else
                             "tokamax's Mosaic GPU ragged_dot needs a GPU")
        elif impl == "tokamax":
            try:
                import tokamax  # noqa: F401

                # Without a tuned cache for these shapes tokamax uses its heuristic config and logs an
                # "Autotuning cache miss" warning (through absl) at every trace; keep them out of the log.
                logging.getLogger("absl").setLevel(logging.ERROR)
                reasons[impl] = None
            except Exception as err:
                reasons[impl] = f"`import tokamax` failed ({type(err).__name__}: {err})"
        else:
            reasons[impl] = None
    return reasons


def make_forward(impl: str, k: int):
    """(x, router_weight, w_gate, w_up, w_down) -> (y, MoEAux) for one implementation.

    The xla row on a GPU is the plain jax.lax pipeline, with jax.lax.ragged_dot and jax.lax.top_k as
    they are: jaxmoe's "xla" implementation adds a finiteness check of the weights there (see
    reference.default_ragged_dot) and selects by integer keys (lax_route), which would slow the peer
    and flatter us.
    """
    if impl == "tokamax" or (impl == "xla" and jax.default_backend() == "gpu"):
        ragged_dot = tokamax_ragged_dot if impl == "tokamax" else jax.lax.ragged_dot
        expert_ffn = functools.partial(reference.grouped_expert_ffn, ragged_dot=ragged_dot)
        def forward(x, router_weight, w_gate, w_up, w_down):
            params = pipeline.MoEParams(router_weight, w_gate, w_up, w_down)
            return pipeline.moe_pipeline(x, params, Router(k), Experts(), routing_fn=reference.finalized(lax_route),
                                         expert_ffn_fn=expert_ffn)

        return forward
    return functools.partial(jaxmoe.moe, top_k=k, scoring="softmax", renormalize=True, implementation=impl)


def make_step(forward, pass_: str):
    """A jitted fn(x, router_weight, w_gate, w_up, w_down, dy) for the pass (dy unused by "fwd").

    fwd_bwd is value_and_grad of <y, dy> with respect to x and the expert weights; dy is a random
    cotangent because a plain sum would give XLA a ones cotangent to simplify.
    """
    if pass_ == "fwd":
        return jax.jit(lambda x, rw, wg, wu, wd, dy: forward(x, rw, wg, wu, wd))

    def loss(x, wg, wu, wd, rw, dy):
        y, _ = forward(x, rw, wg, wu, wd)
        return jnp.sum(y.astype(jnp.float32) * dy.astype(jnp.float32))

    value_and_grad = jax.value_and_grad(loss, argnums=(0, 1, 2, 3))
    return jax.jit(lambda x, rw, wg, wu, wd, dy: value_and_grad(x, wg, wu, wd, rw, dy))


def gemm_roof_ffn(xe, he, w_gate_up, w_down):
    """The expert GEMMs' FLOPs and nothing else: (xe [E, m, d] @ w_gate_up [E, d, 2f], he [E, m, f] @ w_down).

    Gate and up are one einsum against [E, d, 2f]. The down einsum reads its own input he, the shape of
    h, rather than the first f columns of the gate/up output: that slice is a copy in XLA (83 us of 1.15
    ms at DeepSeek-V2-Lite T=8192 on an H200), elementwise work that made the roof slower. The two
    GEMMs are independent, with the same FLOPs and operand bytes as the chained pair. Outputs are bf16.
    """
    h = jnp.einsum("emd,edn->emn", xe, w_gate_up)
    return h, jnp.einsum("emf,efd->emd", he, w_down)


def make_gemm_roof(pass_: str):
    """A jitted fn(xe [E, m, d], he [E, m, f], w_gate_up [E, d, 2f], w_down [E, f, d], dhe [E, m, 2f],
    dye [E, m, d]) for the pass.

    fwd_bwd is value_and_grad of <h, dhe> + <out, dye> (the products in float32 only for the scalar)
    with respect to xe, he, w_gate_up and w_down: the four backward GEMMs of the layer (dX, dW_gate_up,
    dH, dW_down), so 3x the forward's GEMM FLOPs, as the layer's backward.
    """
    if pass_ == "fwd":
        return jax.jit(lambda xe, he, wgu, wd, dhe, dye: gemm_roof_ffn(xe, he, wgu, wd))

    def loss(xe, he, wgu, wd, dhe, dye):
        h, out = gemm_roof_ffn(xe, he, wgu, wd)
        f32 = jnp.float32
        return jnp.sum(h.astype(f32) * dhe.astype(f32)) + jnp.sum(out.astype(f32) * dye.astype(f32))

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
