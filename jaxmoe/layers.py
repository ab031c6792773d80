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


def param_specs(d_model: int, d_ff: int, num_experts: int, num_shared_experts: int,
                kernel_init: Initializer | None) -> dict[str, ParamSpec]:
    """Every parameter of the layer by name: both frameworks build their layer from this table."""
    d, f, E = d_model, d_ff, num_experts
    kernel_init = default_kernel_init if kernel_init is None else kernel_init
    specs = {
        "router": ParamSpec((d, E), ("embed", None), default_router_init),
        "w_gate": ParamSpec((E, d, f), ("expert", "embed", "mlp"), kernel_init),
        "w_up": ParamSpec((E, d, f), ("expert", "embed", "mlp"), kernel_init),
        "w_down": ParamSpec((E, f, d), ("expert", "mlp", "embed"), kernel_init),
    }
    if num_shared_experts:
        shared = num_shared_experts * f
        specs |= {
            "shared_w_gate": ParamSpec((d, shared), ("embed", "mlp"), kernel_init),
            "shared_w_up": ParamSpec((d, shared), ("embed", "mlp"), kernel_init),
            "shared_w_down": ParamSpec((shared, d), ("mlp", "embed"), kernel_init),
        }
    return specs


def _dtype_name(value) -> str | None:
    """The dtype's name, or None when value names no dtype at all."""
    try:
        return jnp.dtype(value).name
    except TypeError:
        return None


def check_layer_options(*, d_model, d_ff, num_experts, top_k, scoring, num_shared_experts, dtype, param_dtype,
                        implementation, mesh=None, expert_axis=None, data_axis=None) -> None:
    """Both MoELayers run this as they are constructed, so a bad option fails there and is named as the
    constructor argument, instead of surfacing at the first call as a complaint about x or E."""
    for name, value, least in (("d_model", d_model, 1), ("d_ff", d_ff, 1), ("num_experts", num_experts, 1),
                               ("top_k", top_k, 1), ("num_shared_experts", num_shared_experts, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < least:
            raise ValueError(f"{name} must be at least {least}, got {value}")
    if top_k > num_experts:
        raise ValueError(f"top_k must satisfy top_k <= num_experts, but top_k={top_k} and num_experts={num_experts}")
    _validate.check_scoring(scoring)
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


def _swiglu(x, w_gate, w_up, w_down):
    """The shared experts' dense SwiGLU, rounded where the routed experts round: after the activation."""
    gate = jnp.dot(x, w_gate, preferred_element_type=jnp.float32)
    up = jnp.dot(x, w_up, preferred_element_type=jnp.float32)
    h = (jax.nn.silu(gate) * up).astype(x.dtype)
    return jnp.dot(h, w_down, preferred_element_type=jnp.float32)


def moe_layer_apply(params: Mapping[str, jax.Array], x: jax.Array, *, top_k: int, scoring: str,
                    renormalize: bool, dtype, implementation: str | None, mesh=None, expert_axis=None,
                    data_axis=None) -> tuple[jax.Array, MoEAux, MoERouting]:
    """The layer's math on plain arrays: x [..., d] -> (y [..., d] in the compute dtype, MoEAux,
    MoERouting): what the layers return and sow.

    `params` holds the arrays named by `param_specs`; dtype None computes in x's dtype. mesh,
    expert_axis and data_axis go to `jaxmoe.moe`; the shared experts are plain jnp under jit.
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
    experts = [params[name].astype(dtype) for name in ("w_gate", "w_up", "w_down")]
    # The router keeps its own dtype: `moe` computes the logits in float32 whatever it gets, so
    # rounding it to the compute dtype first would only make routing decisions noisier.
    y, aux, routing = moe(x, params["router"], *experts, top_k=top_k, scoring=scoring, renormalize=renormalize,
                          implementation=implementation, mesh=mesh, expert_axis=expert_axis, data_axis=data_axis,
                          return_routing=True)
    if "shared_w_gate" in params:
        shared = [params[name].astype(dtype) for name in ("shared_w_gate", "shared_w_up", "shared_w_down")]
        y = (y.astype(jnp.float32) + _swiglu(x, *shared)).astype(dtype)
    return y, aux, routing


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


class MoELayer(nnx.Module):
    """A routed Mixture-of-Experts SwiGLU feed-forward layer, optionally with always-on shared experts.

    Each token goes to its `top_k` highest-scoring experts out of `num_experts`, and the layer returns
    the routing-weighted sum of their outputs: `jaxmoe.moe` with this layer's parameters. With
    `num_shared_experts` = S > 0, a dense SwiGLU of hidden size S * d_ff runs on every token and is
    added to that sum, as in DeepSeek-MoE and Qwen2-MoE.

    Parameters, with their logical axis names. ``nnx.get_partition_spec`` reads them; created under
    a mesh (``jax.set_mesh``) and ``nnx.logical_axis_rules`` that map "expert", "embed" and "mlp" to
    mesh axes or None, the parameters come out sharded.

      router [d, E] ("embed", None); w_gate, w_up [E, d, f] ("expert", "embed", "mlp");
      w_down [E, f, d] ("expert", "mlp", "embed"); and with S > 0, shared_w_gate, shared_w_up
      [d, S*f] ("embed", "mlp") and shared_w_down [S*f, d] ("mlp", "embed").

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
      top_k: experts per token.
      scoring: "softmax" or "sigmoid", applied to the router logits.
      renormalize: make each token's top_k weights sum to one.
      num_shared_experts: S, the width of the dense shared SwiGLU in units of d_ff; 0 for none.
      dtype: the compute dtype; None computes in the input's dtype. The output has this dtype.
      param_dtype: the dtype parameters are stored in.
      implementation: passed to `jaxmoe.moe`; None picks the fused Triton kernels on a GPU, else "xla".
      mesh, expert_axis, data_axis: passed to `jaxmoe.moe`: expert and data parallelism on a mesh
        (mesh None with an axis named takes the mesh of ``jax.set_mesh``). Create the layer under that
        mesh and ``nnx.logical_axis_rules`` mapping "expert" to expert_axis (and "embed", "mlp" to
        None) so that the expert weights are stored where each device computes with them.
      kernel_init: initializer for every expert weight, called with [E, in, out] for the routed
        experts and [in, out] for the shared ones; the default is truncated normal with variance 1/in.
      rngs: the `nnx.Rngs` the parameters are drawn from.
    """

    def __init__(self, d_model: int, d_ff: int, num_experts: int, top_k: int, *, scoring: str = "softmax",
                 renormalize: bool = True, num_shared_experts: int = 0, dtype=None,
                 param_dtype=jnp.float32, implementation: str | None = None,
                 kernel_init: Initializer | None = None, mesh=None, expert_axis: str | None = None,
                 data_axis=None, rngs: nnx.Rngs):
        check_layer_options(d_model=d_model, d_ff=d_ff, num_experts=num_experts, top_k=top_k, scoring=scoring,
                            num_shared_experts=num_shared_experts, dtype=dtype, param_dtype=param_dtype,
                            implementation=implementation, mesh=mesh, expert_axis=expert_axis,
                            data_axis=data_axis)
        self.top_k = top_k
        self.scoring = scoring
        self.renormalize = renormalize
        self.dtype = dtype
        self.implementation = implementation
        self.mesh = mesh
        self.expert_axis = expert_axis
        self.data_axis = data_axis if data_axis is None or isinstance(data_axis, str) else tuple(data_axis)
        specs = param_specs(d_model, d_ff, num_experts, num_shared_experts, kernel_init)
        self.param_names = tuple(specs)
        for name, spec in specs.items():
            init = _logically_partitioned(spec.init, spec.logical_axes)
            setattr(self, name, nnx.Param(init(rngs.params(), spec.shape, param_dtype)))

    def __call__(self, x: jax.Array) -> jax.Array:
        params = {name: getattr(self, name)[...] for name in self.param_names}
        y, aux, routing = moe_layer_apply(params, x, top_k=self.top_k, scoring=self.scoring,
                                          renormalize=self.renormalize, dtype=self.dtype,
                                          implementation=self.implementation, mesh=self.mesh,
                                          expert_axis=self.expert_axis, data_axis=self.data_axis)
        for name, value in sown(aux, routing).items():
            _sow_in_capture(self, name, value)
        return y
