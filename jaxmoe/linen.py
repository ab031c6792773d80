"""`MoELayer` for flax.linen: the twin of `jaxmoe.MoELayer`, with the same parameters and math."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import flax.linen as nn

from jaxmoe.layers import (Initializer, LayerOptions, layer_options, moe_layer_apply, param_specs, selection_bias_spec,
                           sown)
from jaxmoe.options import Experts, Router

# The collection that holds the selection bias (jaxmoe.update_selection_bias moves it; no optimizer does).
ROUTER_STATE = "router_state"


class MoELayer(nn.Module):
    """A routed Mixture-of-Experts SwiGLU feed-forward layer; see `jaxmoe.MoELayer` for the options.

    Parameter names, shapes, initializers and logical axis names are those of `jaxmoe.MoELayer`, so
    parameters move between the two unchanged; mesh, expert_axis and data_axis shard it as there
    (with linen, lay the parameters out with ``nn.logical_to_mesh_sharding`` and the same rules). Each
    With selection_bias=True the [E] selection bias lives in the "router_state" collection, apart from
    "params", so an optimizer over params leaves it alone. Each call sows "load_balancing_loss",
    "router_z_loss", "expert_counts", "router_logits", "routing_ids" and "routing_weights" into the
    "intermediates" collection when it is mutable:

    >>> import jax, jax.numpy as jnp
    >>> from jaxmoe import linen
    >>> layer = linen.MoELayer(16, 32, num_experts=4, top_k=2, implementation="xla")
    >>> x = jnp.ones((2, 5, 16))
    >>> variables = layer.init(jax.random.key(0), x)
    >>> y, state = layer.apply(variables, x, mutable=["intermediates"])
    >>> (counts,) = state["intermediates"]["expert_counts"]  # one entry: the layer ran once
    >>> int(counts.sum())  # 2 * 5 tokens, 2 experts each
    20
    """

    d_model: int
    d_ff: int
    num_experts: int
    top_k: int | None = None
    _: dataclasses.KW_ONLY
    scoring: str = "softmax"
    renormalize: bool = True
    router: Router | None = None
    experts: Experts | None = None
    router_bias: bool = False
    expert_bias: bool = False
    selection_bias: bool = False
    num_shared_experts: int = 0
    shared_d_ff: int | None = None
    shared_gate: bool = False
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32
    implementation: str | None = None
    kernel_init: Initializer | None = None
    mesh: jax.sharding.Mesh | None = None
    expert_axis: str | None = None
    data_axis: str | tuple[str, ...] | None = None

    def __post_init__(self):
        # Here rather than in setup(), which flax runs lazily at init or apply: a bad option then fails
        # where the layer is constructed.
        self._options()
        super().__post_init__()

    def _options(self) -> LayerOptions:
        return layer_options(
            self.d_model, self.d_ff, self.num_experts, self.top_k, scoring=self.scoring, renormalize=self.renormalize,
            router=self.router, experts=self.experts, router_bias=self.router_bias, expert_bias=self.expert_bias,
            selection_bias=self.selection_bias, num_shared_experts=self.num_shared_experts,
            shared_d_ff=self.shared_d_ff, shared_gate=self.shared_gate, dtype=self.dtype,
            param_dtype=self.param_dtype, implementation=self.implementation, mesh=self.mesh,
            expert_axis=self.expert_axis, data_axis=self.data_axis)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        options = self._options()
        specs = param_specs(options, self.kernel_init)
        params = {name: self.param(name, nn.with_logical_partitioning(spec.init, spec.logical_axes),
                                   spec.shape, self.param_dtype)
                  for name, spec in specs.items()}
        if options.selection_bias:
            spec = selection_bias_spec(options)
            params["selection_bias"] = self.variable(ROUTER_STATE, "selection_bias", spec.init,
                                                     self.make_rng("params") if self.is_initializing() else None,
                                                     spec.shape, jnp.float32).value
        y, aux, routing = moe_layer_apply(params, x, options=options, dtype=self.dtype,
                                          implementation=self.implementation, mesh=self.mesh,
                                          expert_axis=self.expert_axis, data_axis=self.data_axis)
        for name, value in sown(aux, routing).items():
            self.sow("intermediates", name, value)
        return y
