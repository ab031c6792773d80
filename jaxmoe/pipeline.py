"""The MoE layer as a pipeline of stages, shared by every implementation (and the benchmark's peers):

    logits   = x @ router_weight (+ router_bias)                      float32
    routing  = routing_fn(logits, router=, selection_bias=)          ids, weights (and aux losses)
    y        = expert_ffn_fn(x, routing, expert weights and biases)   the routed experts
    y       += shared experts (x)                                     unscaled by the routing, after it

An implementation supplies routing_fn and expert_ffn_fn (jaxmoe.api picks them; jaxmoe.reference holds
the jax.lax ones); jaxmoe/sharding.py runs the same stages on every device of a mesh.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from jaxmoe import _validate
from jaxmoe.options import Experts, Router
from jaxmoe.reference import MoERouting, shared_experts


class MoEParams(NamedTuple):
    """The arrays of a MoE layer besides its input; see `jaxmoe.moe` for their shapes. Optional ones are None."""

    router_weight: jax.Array
    w_gate: jax.Array
    w_up: jax.Array
    w_down: jax.Array
    router_bias: jax.Array | None = None  # trained, added to the logits (gpt-oss)
    selection_bias: jax.Array | None = None  # not trained, added to the scores for selection only (DeepSeek-V3)
    b_gate: jax.Array | None = None
    b_up: jax.Array | None = None
    b_down: jax.Array | None = None
    shared_w_gate: jax.Array | None = None
    shared_w_up: jax.Array | None = None
    shared_w_down: jax.Array | None = None
    shared_output_gate: jax.Array | None = None

    @property
    def expert_biases(self) -> tuple:
        return self.b_gate, self.b_up, self.b_down

    @property
    def shared(self) -> tuple | None:
        if self.shared_w_gate is None:
            return None
        return self.shared_w_gate, self.shared_w_up, self.shared_w_down, self.shared_output_gate


def check(x, params: MoEParams, router: Router) -> tuple[int, int]:
    """Every argument checked against the others; returns (d, E)."""
    return _validate.check_moe_args(x, params.router_weight, params.w_gate, params.w_up, params.w_down, router,
                                    router_bias=params.router_bias, selection_bias=params.selection_bias,
                                    b_gate=params.b_gate, b_up=params.b_up, b_down=params.b_down,
                                    shared=params.shared)


def router_logits(x2d: jax.Array, router_weight: jax.Array, router_bias=None) -> jax.Array:
    """[T, E] float32 logits: the float32 product of x and the router weight (+ the router bias).

    When both are bfloat16 (or both float16) they are multiplied as they are with float32
    accumulation: every product of two 16-bit floats is exact in float32 (and in tf32), so this is the
    float32 dot of the upcast inputs up to the order of its sum, without a float32 copy of x (on an
    H200 the upcast dot took 34 us of a Qwen3-sized layer at T = 8192).
    """
    if x2d.dtype == router_weight.dtype and jnp.dtype(x2d.dtype).itemsize == 2:
        logits = jnp.dot(x2d, router_weight, preferred_element_type=jnp.float32)
    else:
        logits = jnp.dot(x2d.astype(jnp.float32), router_weight.astype(jnp.float32))
    if router_bias is not None:
        logits = logits + router_bias.astype(jnp.float32)
    return logits


def route_tokens(x2d, params: MoEParams, router: Router, routing_fn: Callable):
    """x2d [T, d] -> (logits, *routing_fn(logits, router=, selection_bias=)): the router matmul and the
    routing stage.

    routing_fn has the signature of `reference.route_with_aux` (-> (Routing, MoEAux)) or of
    `reference.route_with_stats` (-> (Routing, RouterStats)); the Triton stage computes both parts in one kernel.
    """
    logits = router_logits(x2d, params.router_weight, params.router_bias)
    return logits, *routing_fn(logits, router=router, selection_bias=params.selection_bias)


def add_shared(y2d, x2d, params: MoEParams):
    """y2d plus the shared experts' output (when the layer has them), rounded once to x's dtype."""
    if params.shared is None:
        return y2d
    return (y2d.astype(jnp.float32) + shared_experts(x2d, *params.shared)).astype(x2d.dtype)


def moe_pipeline(x, params: MoEParams, router: Router, experts: Experts, *, routing_fn: Callable,
                 expert_ffn_fn: Callable, with_routing: bool = False):
    """x [..., d] -> (y [..., d], MoEAux), with the routing (signature of `reference.route_with_aux`) and
    expert stages (signature of `reference.grouped_expert_ffn`) supplied by the caller; with_routing adds
    a MoERouting with x's leading dims."""
    d, _ = check(x, params, router)
    lead = x.shape[:-1]
    x2d = x.reshape(-1, d)
    logits, routing, aux = route_tokens(x2d, params, router, routing_fn)
    y = expert_ffn_fn(x2d, routing.weights, routing.ids, params.w_gate, params.w_up, params.w_down, 0,
                      *params.expert_biases, experts=experts)
    y = add_shared(y, x2d, params).reshape(*lead, d)
    if with_routing:
        return y, aux, MoERouting(*(a.reshape(*lead, -1) for a in (logits, routing.ids, routing.weights)))
    return y, aux
