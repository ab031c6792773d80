"""`MoELayer` for flax.nnx, and the parameter table and math it shares with `jaxmoe.linen.MoELayer`."""

from __future__ import annotations

import inspect
from typing import Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import nnx

from jaxmoe import _validate, sharding
from jaxmoe.api import check_implementation, moe
from jaxmoe.options import Experts, Router, make_experts, make_router
from jaxmoe.reference import MoEAux, MoERouting

Initializer = Callable[..., jax.Array]

# Outside nnx.capture, flax stores sown values as module attributes that gain an entry per call, so
# every nnx.jit call sees a new module and retraces. flax >= 0.12.11 can skip that instead.
_SOW_OPTIONS = {"capture_noop": True} if "capture_noop" in inspect.signature(nnx.Module.sow).parameters else {}


def _sow_in_capture(module: nnx.Module, name: str, value) -> None:
    """module.sow(nnx.Intermediate, name, value) inside nnx.capture, nothing outside it, on every flax.

    flax 0.12.10 has no capture_noop; there nnx.capture marks the modules it records by giving each a
    `__captures__` attribute for the call (what its sow looks for, and what flax >= 0.12.11 tests too)."""
    if _SOW_OPTIONS or hasattr(module, "__captures__"):
        module.sow(nnx.Intermediate, name, value, **_SOW_OPTIONS)


def default_kernel_init(key, shape, dtype=jnp.float32) -> jax.Array:
    """Truncated normal with variance 1 / fan-in, the fan-in being the second-to-last axis.

    That is d for w_gate and w_up and f for w_down; a leading expert axis is a batch axis, so every
    expert is scaled like a dense layer of its own rather than by E times its fan-in.
    """
    batch_axes = tuple(range(len(shape) - 2))
    init = jax.nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", batch_axis=batch_axes)
    return init(key, shape, dtype)


# Small logits give near-uniform routing at the start, so every expert gets tokens and gradient.
default_router_init = jax.nn.initializers.normal(stddev=0.02)


class ParamSpec(NamedTuple):
    shape: tuple[int, ...]
    logical_axes: tuple[str | None, ...]
    init: Initializer


class LayerOptions(NamedTuple):
    """What both MoELayers are built from (checked by layer_options); static."""

    d_model: int
    d_ff: int
    num_experts: int
    router: Router
    experts: Experts
    router_bias: bool = False
    expert_bias: bool = False
    selection_bias: bool = False
    shared_d_ff: int = 0  # 0: no shared experts
    shared_gate: bool = False


def param_specs(options: LayerOptions, kernel_init: Initializer | None) -> dict[str, ParamSpec]:
    """Every trained parameter of the layer by name: both frameworks build their layer from this table."""
    d, f, E = options.d_model, options.d_ff, options.num_experts
    kernel_init = default_kernel_init if kernel_init is None else kernel_init
    zeros = jax.nn.initializers.zeros
    specs = {"router": ParamSpec((d, E), ("embed", None), default_router_init)}
    if options.router_bias:
        specs["router_bias"] = ParamSpec((E,), (None,), zeros)
    specs |= {
        "w_gate": ParamSpec((E, d, f), ("expert", "embed", "mlp"), kernel_init),
        "w_up": ParamSpec((E, d, f), ("expert", "embed", "mlp"), kernel_init),
        "w_down": ParamSpec((E, f, d), ("expert", "mlp", "embed"), kernel_init),
    }
    if options.expert_bias:
        specs |= {
            "b_gate": ParamSpec((E, f), ("expert", "mlp"), zeros),
            "b_up": ParamSpec((E, f), ("expert", "mlp"), zeros),
            "b_down": ParamSpec((E, d), ("expert", "embed"), zeros),
        }
    if options.shared_d_ff:
        shared = options.shared_d_ff
        specs |= {
            "shared_w_gate": ParamSpec((d, shared), ("embed", "mlp"), kernel_init),
            "shared_w_up": ParamSpec((d, shared), ("embed", "mlp"), kernel_init),
            "shared_w_down": ParamSpec((shared, d), ("mlp", "embed"), kernel_init),
        }
        if options.shared_gate:
            specs["shared_output_gate"] = ParamSpec((d,), ("embed",), default_router_init)
    return specs


def selection_bias_spec(options: LayerOptions) -> ParamSpec:
    """The selection bias is layer state, not a parameter: `update_selection_bias` moves it, never the
    optimizer (nnx: a `SelectionBias` variable; linen: the "router_state" collection)."""
    return ParamSpec((options.num_experts,), (None,), jax.nn.initializers.zeros)


def update_selection_bias(selection_bias: jax.Array, expert_counts: jax.Array, rate: float) -> jax.Array:
    """DeepSeek-V3's auxiliary-loss-free balancing: each expert's selection bias moves by `rate` towards
    balance, b + rate * sign(mean(counts) - counts): under-loaded experts up, over-loaded ones down.

    expert_counts: [E] assignments per expert, e.g. the layer's sown "expert_counts" (summed over the
    steps since the last update)."""
    counts = expert_counts.astype(jnp.float32)
    step = rate * jnp.sign(counts.mean() - counts)
    return (selection_bias.astype(jnp.float32) + step).astype(selection_bias.dtype)


def _dtype_name(value) -> str | None:
    """The dtype's name, or None when value names no dtype at all."""
    try:
        return jnp.dtype(value).name
    except TypeError:
        return None


def layer_options(d_model, d_ff, num_experts, top_k, *, scoring, renormalize, router, experts, router_bias,
                  expert_bias, selection_bias, num_shared_experts, shared_d_ff, shared_gate, dtype, param_dtype,
                  implementation, mesh=None, expert_axis=None, data_axis=None) -> LayerOptions:
    """Both MoELayers run this as they are constructed, so a bad option fails there and is named as the
    constructor argument, instead of surfacing at the first call as a complaint about x or E."""
    for name, value, least in (("d_model", d_model, 1), ("d_ff", d_ff, 1), ("num_experts", num_experts, 1),
                               ("num_shared_experts", num_shared_experts, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < least:
            raise ValueError(f"{name} must be at least {least}, got {value}")
    if router is None:
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)):
            raise TypeError(f"top_k must be an int, got {type(top_k).__name__}")
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        if top_k > num_experts:
            raise ValueError(f"top_k must satisfy top_k <= num_experts, but top_k={top_k} and "
                             f"num_experts={num_experts}")
        _validate.check_scoring(scoring)
    router = make_router(router, top_k, scoring, renormalize)
    router.check_experts(num_experts, f"num_experts={num_experts}")
    if shared_d_ff is None:
        shared_d_ff = num_shared_experts * d_ff
    elif isinstance(shared_d_ff, bool) or not isinstance(shared_d_ff, (int, np.integer)) or shared_d_ff < 0:
        raise ValueError(f"shared_d_ff must be None or a non-negative int, got {shared_d_ff!r}")
    if shared_gate and not shared_d_ff:
        raise ValueError("shared_gate=True gates the shared experts, but the layer has none: set "
                         "num_shared_experts or shared_d_ff")
    dtype_name, param_dtype_name = _dtype_name(dtype), _dtype_name(param_dtype)
    if dtype is not None and dtype_name not in {dt.name for dt in _validate.FLOAT_DTYPES}:
        raise ValueError(f"dtype must be None or {_validate.FLOAT_DTYPE_NAMES}, got {dtype_name or repr(dtype)}")
    # Every parameter reaches `moe` in param_dtype (the router as it is), which takes these three only.
    if param_dtype_name not in {dt.name for dt in _validate.FLOAT_DTYPES}:
        raise ValueError(f"param_dtype must be {_validate.FLOAT_DTYPE_NAMES}, "
                         f"got {param_dtype_name or repr(param_dtype)}")
    check_implementation(implementation)
    expert_axis, _ = sharding.normalize_axes(mesh, expert_axis, data_axis)
    if mesh is not None and expert_axis is not None and num_experts % mesh.shape[expert_axis]:
        raise ValueError(f"expert_axis={expert_axis!r} has size {mesh.shape[expert_axis]}, which does not divide "
                         f"num_experts={num_experts}: each device must hold an equal share of the experts")
    return LayerOptions(int(d_model), int(d_ff), int(num_experts), router, make_experts(experts), bool(router_bias),
                        bool(expert_bias), bool(selection_bias), int(shared_d_ff), bool(shared_gate))


# The names `jaxmoe.moe` takes the parameters by (the router weight is the one renamed).
_MOE_ARGUMENT = {"router": "router_weight"}
_COMPUTE_DTYPE = ("w_gate", "w_up", "w_down", "b_gate", "b_up", "b_down", "shared_w_gate", "shared_w_up",
                  "shared_w_down")


def moe_layer_apply(params: Mapping[str, jax.Array], x: jax.Array, *, options: LayerOptions, dtype,
                    implementation: str | None, mesh=None, expert_axis=None, data_axis=None
                    ) -> tuple[jax.Array, MoEAux, MoERouting]:
    """The layer's math on plain arrays: x [..., d] -> (y [..., d] in the compute dtype, MoEAux,
    MoERouting): what the layers return and sow.

    `params` holds the arrays named by `param_specs` (and "selection_bias", the layer state, when the
    layer has one); dtype None computes in x's dtype. mesh, expert_axis and data_axis go to `jaxmoe.moe`.
    """
    # The parameters follow param_specs and so agree with each other; what is left to disagree is x's d
    # with d_model, which the router's first dim holds.
    d_model = params["router"].shape[0]
    shape = _validate.array_shape(x, "x")
    if not shape:
        raise ValueError(f"x must be [..., d] with d = the MoELayer's d_model={d_model}, got shape {shape}")
    if shape[-1] != d_model:
        raise ValueError(f"x has d={shape[-1]} but the MoELayer has d_model={d_model} (x [..., d] = {shape})")
    dtype = jnp.result_type(x) if dtype is None else jnp.dtype(dtype)
    x = x.astype(dtype)
    # The router, its biases and the shared gate keep their own dtype: `moe` computes the logits in float32
    # whatever it gets, so rounding them to the compute dtype first would only make routing noisier.
    arrays = {_MOE_ARGUMENT.get(name, name): value.astype(dtype) if name in _COMPUTE_DTYPE else value
              for name, value in params.items()}
    return moe(x, **arrays, router=options.router, experts=options.experts, implementation=implementation,
               mesh=mesh, expert_axis=expert_axis, data_axis=data_axis, return_routing=True)


def sown(aux: MoEAux, routing: MoERouting) -> dict[str, jax.Array]:
    """What each call of a layer sows, by name: the aux losses and counts, then the routing."""
    return {**aux._asdict(), **routing._asdict()}


def _logically_partitioned(init: Initializer, logical_axes) -> Initializer:
    # Flax 0.12 shards an annotated Variable as it is created, and raises unless a mesh is set and
    # logical axis rules map our names onto its axes. Without both, the annotation is only recorded,
    # so the layer also works unsharded and on a mesh meant for data parallelism alone.
    if jax.sharding.get_abstract_mesh().empty or not nn.get_logical_axis_rules():
        return nnx.with_partitioning(init, logical_axes, eager_sharding=False)
    return nnx.with_partitioning(init, logical_axes)


class SelectionBias(nnx.Variable):
    """The layer's selection bias (DeepSeek-V3's e_score_correction_bias): state that routing reads and
    `update_selection_bias` moves. Not an `nnx.Param`, so optimizers over Params leave it alone."""


class MoELayer(nnx.Module):
    """A routed Mixture-of-Experts feed-forward layer, optionally with biases and shared experts.

    Each token goes to its highest-scoring experts out of `num_experts`, and the layer returns the
    routing-weighted sum of their outputs: `jaxmoe.moe` with this layer's parameters. `router` and
    `experts` (`jaxmoe.Router`, `jaxmoe.Experts`) hold every option of real models (groups, scaling,
    gpt-oss's clamped SwiGLU, the weight on the input); `jaxmoe.hf.load_layer` builds one from a
    checkpoint. With shared experts (`num_shared_experts` = S > 0, or `shared_d_ff`), a dense SwiGLU of
    hidden size S * d_ff (or shared_d_ff) runs on every token and is added to that sum, as in
    DeepSeek-MoE, optionally gated per token by sigmoid(x @ shared_output_gate) as in Qwen2-MoE.

    Parameters (`nnx.Param`), with their logical axis names. ``nnx.get_partition_spec`` reads them;
    created under a mesh (``jax.set_mesh``) and ``nnx.logical_axis_rules`` that map "expert", "embed"
    and "mlp" to mesh axes or None, the parameters come out sharded.

      router [d, E] ("embed", None); w_gate, w_up [E, d, f] ("expert", "embed", "mlp");
      w_down [E, f, d] ("expert", "mlp", "embed"); with router_bias, router_bias [E] (None,);
      with expert_bias, b_gate, b_up [E, f] ("expert", "mlp") and b_down [E, d] ("expert", "embed");
      with shared experts of width fs, shared_w_gate, shared_w_up [d, fs] ("embed", "mlp") and
      shared_w_down [fs, d] ("mlp", "embed"); with shared_gate, shared_output_gate [d] ("embed",).

    With selection_bias=True the layer also holds `selection_bias` [E], a `SelectionBias` variable
    (not a Param: the optimizer does not train it); move it with `jaxmoe.update_selection_bias`.

    Each call sows its router statistics as ``nnx.Intermediate`` values named "load_balancing_loss",
    "router_z_loss" and "expert_counts" (see `jaxmoe.MoEAux`), and its routing as "router_logits"
    [..., E], "routing_ids" and "routing_weights" [..., k] (`jaxmoe.MoERouting`, with x's
    leading dims). Read them with ``nnx.capture``, which
    returns them beside the output, each as a tuple with one entry per call. Outside ``nnx.capture``
    nothing is recorded (so a plain ``nnx.jit`` loop traces once).

    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxmoe import MoELayer
    >>> layer = MoELayer(16, 32, num_experts=4, top_k=2, implementation="xla", rngs=nnx.Rngs(0))
    >>> x = jnp.ones((2, 5, 16))
    >>> layer(x).shape
    (2, 5, 16)
    >>> y, aux = nnx.capture(layer, nnx.Intermediate)(x)
    >>> (counts,) = aux["expert_counts"].get_value()  # one entry: the layer ran once
    >>> int(counts.sum())  # 2 * 5 tokens, 2 experts each
    20
    >>> (balance,) = aux["load_balancing_loss"].get_value()
    >>> loss = jnp.mean(y ** 2) + 0.01 * balance

    Args:
      d_model: d, the width of the input and output.
      d_ff: f, each expert's hidden width.
      num_experts: E, the number of routed experts.
      top_k, scoring, renormalize: shortcuts for router=jaxmoe.Router(top_k, scoring, renormalize).
      router: a `jaxmoe.Router` (instead of top_k, scoring and renormalize).
      experts: a `jaxmoe.Experts`; None is SwiGLU with the weight on the output.
      router_bias: a trained [E] bias on the logits (gpt-oss).
      expert_bias: trained biases on the experts' gate, up and down projections (gpt-oss).
      selection_bias: an [E] bias on the scores for selection only, as layer state (DeepSeek-V3).
      num_shared_experts: S, the width of the dense shared SwiGLU in units of d_ff; 0 for none.
      shared_d_ff: the shared SwiGLU's hidden width itself (overrides num_shared_experts; Qwen2-MoE).
      shared_gate: gate the shared experts' output by sigmoid(x @ shared_output_gate) (Qwen2-MoE).
      dtype: the compute dtype; None computes in the input's dtype. The output has this dtype.
      param_dtype: the dtype parameters are stored in.
      implementation: passed to `jaxmoe.moe`; None picks the fused Triton kernels on a GPU, else "xla".
      mesh, expert_axis, data_axis: passed to `jaxmoe.moe`: expert and data parallelism on a mesh
        (mesh None with an axis named takes the mesh of ``jax.set_mesh``). Create the layer under that
        mesh and ``nnx.logical_axis_rules`` mapping "expert" to expert_axis (and "embed", "mlp" to
        None) so that the expert weights are stored where each device computes with them.
      kernel_init: initializer for every expert weight, called with [E, in, out] for the routed
        experts and [in, out] for the shared ones; the default is truncated normal with variance 1/in.
        Biases start at zero.
      rngs: the `nnx.Rngs` the parameters are drawn from.
    """

    def __init__(self, d_model: int, d_ff: int, num_experts: int, top_k: int | None = None, *,
                 scoring: str = "softmax", renormalize: bool = True, router: Router | None = None,
                 experts: Experts | None = None, router_bias: bool = False, expert_bias: bool = False,
                 selection_bias: bool = False, num_shared_experts: int = 0, shared_d_ff: int | None = None,
                 shared_gate: bool = False, dtype=None, param_dtype=jnp.float32, implementation: str | None = None,
                 kernel_init: Initializer | None = None, mesh=None, expert_axis: str | None = None,
                 data_axis=None, rngs: nnx.Rngs):
        self.options = layer_options(
            d_model, d_ff, num_experts, top_k, scoring=scoring, renormalize=renormalize, router=router,
            experts=experts, router_bias=router_bias, expert_bias=expert_bias, selection_bias=selection_bias,
            num_shared_experts=num_shared_experts, shared_d_ff=shared_d_ff, shared_gate=shared_gate, dtype=dtype,
            param_dtype=param_dtype, implementation=implementation, mesh=mesh, expert_axis=expert_axis,
            data_axis=data_axis)
        self.dtype = dtype
        self.implementation = implementation
        self.mesh = mesh
        self.expert_axis = expert_axis
        self.data_axis = data_axis if data_axis is None or isinstance(data_axis, str) else tuple(data_axis)
        specs = param_specs(self.options, kernel_init)
        self.param_names = tuple(specs)
        for name, spec in specs.items():
            init = _logically_partitioned(spec.init, spec.logical_axes)
            setattr(self, name, nnx.Param(init(rngs.params(), spec.shape, param_dtype)))
        if self.options.selection_bias:
            spec = selection_bias_spec(self.options)
            self.selection_bias = SelectionBias(spec.init(rngs.params(), spec.shape, jnp.float32))

    @property
    def top_k(self) -> int:
        return self.options.router.top_k

    def __call__(self, x: jax.Array) -> jax.Array:
        params = {name: getattr(self, name)[...] for name in self.param_names}
        if self.options.selection_bias:
            params["selection_bias"] = self.selection_bias[...]
        y, aux, routing = moe_layer_apply(params, x, options=self.options, dtype=self.dtype,
                                          implementation=self.implementation, mesh=self.mesh,
                                          expert_axis=self.expert_axis, data_axis=self.data_axis)
        for name, value in sown(aux, routing).items():
            _sow_in_capture(self, name, value)
        return y
