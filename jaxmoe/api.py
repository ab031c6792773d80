"""The public functions: they check arguments and pick an implementation."""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax

from jaxmoe import _batching, _validate, pipeline, reference, sharding
from jaxmoe.options import Experts, Router, make_experts, make_router

IMPLEMENTATIONS = ("xla", "triton", "interpret")

# The dtypes each implementation computes correctly, forward and backward (x and the expert weights).
SUPPORTED_DTYPES = {name: ("float32", "bfloat16", "float16") for name in IMPLEMENTATIONS}


@functools.cache
def _triton_gpu_available() -> bool:
    try:
        if jax.default_backend() != "gpu":
            return False
        from jaxmoe import launch

        launch._jax_triton()  # the import that keeps Triton's cache dir (see there)
    except Exception:
        return False
    return True


def check_implementation(implementation: str | None) -> None:
    """Only the name; whether this machine can run it is resolve_implementation's question."""
    if implementation is not None and implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be None or one of {IMPLEMENTATIONS}, got {implementation!r}")


def resolve_implementation(implementation: str | None) -> str:
    """None picks "triton" on a GPU with jax-triton, else "xla"."""
    check_implementation(implementation)
    if implementation is None:
        return "triton" if _triton_gpu_available() else "xla"
    if implementation == "triton" and not _triton_gpu_available():
        raise ValueError("implementation='triton' needs a GPU backend and jax-triton; use 'interpret' to run "
                         "the same kernels on a CPU (it needs triton, from the gpu extra: pip install "
                         "'jaxmoe[gpu]', or '.[gpu]' in a clone), or 'xla'")
    return implementation


class Stages(NamedTuple):
    """An implementation's stages, with the signatures of the reference functions of the same names."""

    route_with_stats: Callable  # for sharded layers: the stats are summed over devices before the formulas
    route_with_aux: Callable  # for one device: the Triton kernel applies the formulas itself at small T
    expert_ffn: Callable


def _stages(implementation: str | None) -> Stages:
    impl = resolve_implementation(implementation)
    if impl == "xla":
        return Stages(reference.route_with_stats, reference.route_with_aux, _batchable_expert_ffn(impl))
    try:
        from jaxmoe import ops  # imports triton; only paid for when a kernel path is asked for
    except ImportError as err:
        raise ImportError(f"implementation={impl!r} runs Triton kernels and needs triton, from the gpu extra "
                          f"(pip install 'jaxmoe[gpu]', or '.[gpu]' in a clone); implementation='xla' needs "
                          f"neither") from err

    return Stages(functools.partial(ops.route_with_stats, mode=impl), functools.partial(ops.route_with_aux, mode=impl),
                  _batchable_expert_ffn(impl))


@functools.cache
def _batchable_expert_ffn(impl: str):
    """The expert stage of `impl`, with a vmapped batch folded into tokens (see jaxmoe/_batching.py).

    Routing needs no fold: "xla" routing batches natively and the routing kernel launches once per
    element, and `moe`'s aux losses are computed per element from there.
    """
    if impl == "xla":
        return _batching.batchable(functools.partial(reference.grouped_expert_ffn, ragged_dot=_batching.ragged_dot))
    from jaxmoe import ops

    return _batching.batchable(functools.partial(ops.expert_ffn, mode=impl))


def expert_ffn(x, weights, ids, w_gate, w_up, w_down, *, b_gate=None, b_up=None, b_down=None,
               experts: Experts | None = None, implementation: str | None = None, mesh=None,
               expert_axis: str | None = None, data_axis=None):
    """Runs each token through its top-k experts and sums the weighted results.

    y[t] = sum_j weights[t, j] * FFN_e(x[t]), e = ids[t, j], FFN_e(v) = (silu(v @ Wg[e]) * (v @ Wu[e])) @ Wd[e]
    by default; biases, gpt-oss's clamped SwiGLU and the weight on the input as `jaxmoe.Experts` says.

    Args:
      x: [T, d] float32, bfloat16 or float16.
      weights: [T, k] routing weights.
      ids: [T, k] integer expert ids in [0, E). Under jit, ids outside that range contribute zero.
      w_gate, w_up: [E, d, f] in x's dtype.
      w_down: [E, f, d] in x's dtype.
      b_gate, b_up: optional [E, f] and b_down [E, d] expert biases in x's dtype (all three or none).
      experts: a `jaxmoe.Experts`; None is plain SwiGLU with the weight on the output.
      implementation: None (auto: "triton" on a GPU, else "xla"), "xla" (jax.lax), "triton" (fused
        Triton kernels through jax-triton) or "interpret" (the same kernels in Triton's interpreter, CPU).
      mesh, expert_axis, data_axis: as in `moe`: x, weights and ids are split over data_axis and
        expert_axis together, the expert weights over expert_axis, and each token's rows, ids and
        weights go to the devices of expert_axis with an all_to_all.

    Returns:
      y: [T, d] in x's dtype, differentiable with respect to x, weights, the expert weights and biases.
      "triton" and "interpret" differentiate through Triton backward kernels too. With a mesh, y is
      split over the token axes.

    Under jax.vmap with the expert weights shared by the batch, the batch is folded into tokens (one
    call on B*T tokens); otherwise, and under differentiation, it runs once per element.
    """
    _validate.check_expert_ffn_args(x, weights, ids, w_gate, w_up, w_down, b_gate, b_up, b_down)
    expert_ffn_fn = _stages(implementation).expert_ffn
    experts = make_experts(experts)
    if mesh is None and expert_axis is None and data_axis is None:
        return expert_ffn_fn(x, weights, ids, w_gate, w_up, w_down, 0, b_gate, b_up, b_down, experts=experts)
    return sharding.sharded_expert_ffn(x, weights, ids, w_gate, w_up, w_down, b_gate, b_up, b_down, experts=experts,
                                       expert_ffn_fn=expert_ffn_fn, mesh=mesh, expert_axis=expert_axis,
                                       data_axis=data_axis)


def moe(x, router_weight, w_gate, w_up, w_down, *, top_k: int | None = None, scoring: str = "softmax",
        renormalize: bool = True, router: Router | None = None, experts: Experts | None = None,
        router_bias=None, selection_bias=None, b_gate=None, b_up=None, b_down=None, shared_w_gate=None,
        shared_w_up=None, shared_w_down=None, shared_output_gate=None, implementation: str | None = None,
        mesh=None, expert_axis: str | None = None, data_axis=None, return_routing: bool = False):
    """The whole MoE layer: router matmul, routing, expert FFN, weighted combine, shared experts.

    Args:
      x: [..., d]; leading dims are flattened to tokens and restored.
      router_weight: [d, E]; logits = x @ router_weight (+ router_bias), in float32.
      w_gate, w_up, w_down: expert weights as in `expert_ffn`.
      top_k, scoring, renormalize: shortcuts for router=jaxmoe.Router(top_k, scoring, renormalize).
      router: a `jaxmoe.Router`: every routing option (groups, renormalisation epsilon, scaling factor).
      experts: a `jaxmoe.Experts`: the activation and where the routing weight applies.
      router_bias: optional [E], trained, added to the logits (gpt-oss).
      selection_bias: optional [E] added to the scores for selection only (DeepSeek-V3's correction bias;
        `jaxmoe.update_selection_bias` is its aux-loss-free update). It gets no useful gradient.
      b_gate, b_up, b_down: optional expert biases as in `expert_ffn`.
      shared_w_gate, shared_w_up: optional [d, fs] and shared_w_down [fs, d]: always-on shared experts, one
        dense SwiGLU of hidden width fs, added to the routed output unscaled; shared_output_gate [d] gates
        it per token by sigmoid(x @ shared_output_gate) (Qwen2-MoE).
      implementation: as in `expert_ffn`.
      mesh: a `jax.sharding.Mesh` to run on; None takes the mesh of `jax.set_mesh` when an axis is named.
        With no mesh and no axes named, an x split over Explicit mesh axes on its token dims runs
        data-parallel over those axes (data_axis = them), its output split as x was.
      expert_axis: the mesh axis the experts are split over (expert parallelism): each of its P devices
        holds E / P experts and tokens are exchanged with all_to_all. None: no expert parallelism.
      data_axis: a mesh axis (or a sequence of them) the tokens are split over, weights replicated.
        The T tokens are split over data_axis and expert_axis together. jaxmoe/sharding.py says how.
      return_routing: also return what was routed, a `jaxmoe.MoERouting` of router_logits
        [..., E] float32, routing_ids [..., k] int32 and routing_weights [..., k] float32.

    Returns:
      (y [..., d] in x's dtype, MoEAux), and the MoERouting with return_routing. With a mesh, y (and the
      routing) are sharded over the token axes on the flattened leading dims and the aux losses equal
      the unsharded ones.
    """
    router = make_router(router, top_k, scoring, renormalize)
    experts = make_experts(experts)
    params = pipeline.MoEParams(router_weight, w_gate, w_up, w_down, router_bias, selection_bias, b_gate, b_up,
                                b_down, shared_w_gate, shared_w_up, shared_w_down, shared_output_gate)
    stages = _stages(implementation)
    if mesh is None and expert_axis is None and data_axis is None:
        implied = sharding.implied_data_axes(x)
        if implied is None:
            return pipeline.moe_pipeline(x, params, router, experts, routing_fn=stages.route_with_aux,
                                         expert_ffn_fn=stages.expert_ffn, with_routing=return_routing)
        mesh, data_axis = implied  # x split over Explicit axes: data-parallel over them
    return sharding.sharded_moe(x, params, router, experts, routing_fn=stages.route_with_stats,
                                expert_ffn_fn=stages.expert_ffn, mesh=mesh, expert_axis=expert_axis,
                                data_axis=data_axis, with_routing=return_routing)
