"""MoELayer in flax.nnx and flax.linen: parameters, metadata, sown aux, jit, training, options."""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxmoe

D, F, E, K = 16, 24, 4, 2
OPTIONS = dict(implementation="xla")
ROUTED_AXES = {
    "router": ("embed", None),
    "w_gate": ("expert", "embed", "mlp"),
    "w_up": ("expert", "embed", "mlp"),
    "w_down": ("expert", "mlp", "embed"),
}
SHARED_AXES = {
    "shared_w_gate": ("embed", "mlp"),
    "shared_w_up": ("embed", "mlp"),
    "shared_w_down": ("mlp", "embed"),
}


# What every call sows: the aux losses and counts, then the routing.
SOWN = jaxmoe.MoEAux._fields + jaxmoe.reference.MoERouting._fields


def make_nnx(seed=0, **options):
    return jaxmoe.MoELayer(D, F, E, K, **OPTIONS, **options, rngs=nnx.Rngs(seed))


moe = jax.jit(functools.partial(jaxmoe.moe, top_k=K, implementation="xla"))


@nnx.jit
def run(layer, x):
    """(y, intermediates); jitted because op-by-op dispatch of the layer is what makes tests slow."""
    return nnx.capture(layer, nnx.Intermediate)(x)


def tokens(shape=(2, 5), seed=1):
    return jax.random.normal(jax.random.key(seed), (*shape, D))


def nnx_params(layer) -> dict[str, jax.Array]:
    return {name: variable.get_value() for name, variable in nnx.state(layer, nnx.Param).items()}


def captured_aux(intermediates) -> dict[str, jax.Array]:
    """{name: value} for a layer called once under nnx.capture."""
    return {name: variable.get_value()[0] for name, variable in intermediates.items()}


def expected_shapes(num_shared_experts):
    shapes = {"router": (D, E), "w_gate": (E, D, F), "w_up": (E, D, F), "w_down": (E, F, D)}
    if num_shared_experts:
        S = num_shared_experts * F
        shapes |= {"shared_w_gate": (D, S), "shared_w_up": (D, S), "shared_w_down": (S, D)}
    return shapes


@pytest.mark.parametrize("num_shared_experts", [0, 2])
def test_parameter_names_and_shapes(num_shared_experts):
    layer = nnx.eval_shape(lambda: make_nnx(num_shared_experts=num_shared_experts))
    assert {name: p.shape for name, p in nnx_params(layer).items()} == expected_shapes(num_shared_experts)

    twin = jaxmoe.linen.MoELayer(D, F, E, K, num_shared_experts=num_shared_experts, **OPTIONS)
    params = nn.unbox(jax.eval_shape(twin.init, jax.random.key(0), tokens()))["params"]
    assert {name: p.shape for name, p in params.items()} == expected_shapes(num_shared_experts)


def test_partitioning_metadata_names_logical_axes():
    layer = nnx.eval_shape(lambda: make_nnx(num_shared_experts=1))
    specs = nnx.get_partition_spec(nnx.state(layer, nnx.Param))
    assert {name: tuple(spec.get_value()) for name, spec in specs.items()} == ROUTED_AXES | SHARED_AXES

    twin = jaxmoe.linen.MoELayer(D, F, E, K, num_shared_experts=1, **OPTIONS)
    specs = nn.get_partition_spec(jax.eval_shape(twin.init, jax.random.key(0), tokens()))["params"]
    assert {name: tuple(spec) for name, spec in specs.items()} == ROUTED_AXES | SHARED_AXES


def test_parameters_are_sharded_when_created_under_a_mesh_with_rules():
    mesh = jax.make_mesh((1,), ("model",), axis_types=(jax.sharding.AxisType.Auto,))
    with jax.set_mesh(mesh):
        unsharded = make_nnx()  # no rules say where "expert" goes: the names are only recorded
        with nnx.logical_axis_rules((("expert", "model"), ("embed", None), ("mlp", None))):
            sharded = make_nnx()
    assert unsharded.w_gate.get_metadata()["out_sharding"] == ("expert", "embed", "mlp")
    assert sharded.w_gate[...].sharding.spec == jax.sharding.PartitionSpec("model", None, None)


def test_initial_scale_follows_fan_in():
    layer = jaxmoe.MoELayer(64, 256, 8, 2, rngs=nnx.Rngs(0))
    assert np.std(layer.w_gate[...]) == pytest.approx(64 ** -0.5, rel=0.05)
    assert np.std(layer.w_down[...]) == pytest.approx(256 ** -0.5, rel=0.05)


@pytest.mark.parametrize("num_shared_experts", [0, 1])
def test_nnx_and_linen_agree_given_the_same_parameters(num_shared_experts):
    layer = make_nnx(num_shared_experts=num_shared_experts)
    twin = jaxmoe.linen.MoELayer(D, F, E, K, num_shared_experts=num_shared_experts, **OPTIONS)
    x = tokens()

    y, intermediates = run(layer, x)
    y_twin, state = jax.jit(twin.apply, static_argnames="mutable")({"params": nnx_params(layer)}, x,
                                                                   mutable=("intermediates",))

    np.testing.assert_array_equal(y_twin, y)
    aux = captured_aux(intermediates)
    aux_twin = {name: values[0] for name, values in state["intermediates"].items()}
    assert aux_twin.keys() == aux.keys() == set(SOWN)
    for name in aux:
        np.testing.assert_array_equal(aux_twin[name], aux[name])


def test_sown_aux_and_routing_are_moes():
    """The layer sows moe's aux losses and counts, and what it routed: the router logits x @ router and
    route()'s ids and weights, with x's leading dims."""
    layer = make_nnx()
    x = tokens()
    _, intermediates = run(layer, x)
    params = nnx_params(layer)
    moe_and_routing = jax.jit(functools.partial(jaxmoe.moe, top_k=K, implementation="xla", return_routing=True))
    _, expected, routing = moe_and_routing(x, params["router"], params["w_gate"], params["w_up"], params["w_down"])
    aux = captured_aux(intermediates)
    assert aux.keys() == set(SOWN)
    for name, value in {**expected._asdict(), **routing._asdict()}.items():
        np.testing.assert_array_equal(aux[name], value, err_msg=name)
    assert int(aux["expert_counts"].sum()) == x.shape[0] * x.shape[1] * K
    with jax.default_matmul_precision("highest"):
        logits = jnp.einsum("bsd,de->bse", x, params["router"])
    want = jaxmoe.route(logits.reshape(-1, E), K)
    np.testing.assert_allclose(aux["router_logits"], logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(aux["routing_ids"], want.ids.reshape(*x.shape[:-1], K))
    np.testing.assert_allclose(aux["routing_weights"], want.weights.reshape(*x.shape[:-1], K), rtol=1e-5)


def test_sown_aux_collects_one_entry_per_call():
    layer = make_nnx()

    def twice(layer, x):
        return layer(layer(x))

    _, intermediates = nnx.jit(nnx.capture(twice, nnx.Intermediate))(layer, tokens())
    assert len(intermediates["router_z_loss"].get_value()) == 2


def test_a_plain_call_records_nothing():
    layer = make_nnx()
    layer(tokens())
    assert not nnx.state(layer, nnx.Intermediate)


def test_a_plain_nnx_jit_loop_traces_once(monkeypatch):
    """nnx.jit of the layer, or of a function of it, outside nnx.capture: the module does not change
    between calls (nothing sown piles up on it), so each traces once, on every flax we support; and
    nnx.capture still records after that."""
    traces = []
    apply = jaxmoe.layers.moe_layer_apply
    monkeypatch.setattr(jaxmoe.layers, "moe_layer_apply", lambda *a, **kw: traces.append(1) or apply(*a, **kw))
    layer, x = make_nnx(), tokens()
    forward = nnx.jit(lambda layer, x: layer(x))
    for _ in range(3):
        forward(layer, x)
    assert len(traces) == 1
    jitted_layer = nnx.jit(layer)
    for _ in range(3):
        jitted_layer(x)
    assert len(traces) == 2
    assert not nnx.state(layer, nnx.Intermediate)
    _, intermediates = run(layer, x)
    assert len(intermediates["expert_counts"].get_value()) == 1


def test_linen_sows_only_into_a_mutable_collection():
    twin = jaxmoe.linen.MoELayer(D, F, E, K, **OPTIONS)
    variables = twin.init(jax.random.key(0), tokens())
    assert "intermediates" not in variables  # init's intermediates are not returned to keep
    _, state = twin.apply(variables, tokens(), mutable=["intermediates"])
    assert set(state["intermediates"]) == set(SOWN)


def test_eager_matches_jit():
    layer = make_nnx()
    x = tokens()
    y, intermediates = nnx.capture(layer, nnx.Intermediate)(x)
    y_jit, intermediates_jit = run(layer, x)
    np.testing.assert_allclose(y, y_jit, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(captured_aux(intermediates)["expert_counts"],
                                  captured_aux(intermediates_jit)["expert_counts"])


def test_trains_with_optax():
    layer = make_nnx()
    x = tokens((8, 16))
    target = jnp.tanh(x[..., ::-1])  # a fixed function of each token that the experts can fit
    optimizer = nnx.Optimizer(layer, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(layer, optimizer):
        def loss_fn(layer):
            y, intermediates = nnx.capture(layer, nnx.Intermediate)(x)
            aux = captured_aux(intermediates)
            return jnp.mean((y - target) ** 2) + 0.01 * aux["load_balancing_loss"] + 1e-3 * aux["router_z_loss"]

        loss, grads = nnx.value_and_grad(loss_fn)(layer)
        optimizer.update(layer, grads)
        return loss

    losses = [float(step(layer, optimizer)) for _ in range(20)]
    assert losses[-1] < 0.7 * losses[0]


def test_shared_experts_add_a_dense_swiglu():
    layer = make_nnx(num_shared_experts=2)
    x = tokens()
    p = nnx_params(layer)
    routed, _ = moe(x, p["router"], p["w_gate"], p["w_up"], p["w_down"])
    shared = (jax.nn.silu(x @ p["shared_w_gate"]) * (x @ p["shared_w_up"])) @ p["shared_w_down"]
    y, _ = run(layer, x)
    np.testing.assert_allclose(y, routed + shared, rtol=1e-5, atol=1e-5)


def test_bfloat16_compute_with_float32_parameters():
    layer = make_nnx(dtype=jnp.bfloat16)
    x = tokens()
    y, _ = run(layer, x)
    assert y.dtype == jnp.bfloat16
    assert all(p.dtype == jnp.float32 for p in nnx_params(layer).values())

    y_float32, _ = run(make_nnx(), x)
    np.testing.assert_allclose(y.astype(jnp.float32), y_float32, rtol=0.05, atol=0.05)


def test_compute_dtype_defaults_to_the_input_dtype():
    layer = make_nnx()
    assert run(layer, tokens().astype(jnp.bfloat16))[0].dtype == jnp.bfloat16
    assert run(layer, tokens())[0].dtype == jnp.float32


def test_batch_and_sequence_dimensions_are_tokens():
    layer = make_nnx()
    x = tokens()  # [B, S, d]
    y, _ = run(layer, x)
    assert y.shape == x.shape
    y_flat, _ = run(layer, x.reshape(-1, D))
    np.testing.assert_allclose(y_flat.reshape(x.shape), y, rtol=1e-6)


# Both layers check their options as they are constructed, naming the constructor argument.
BAD_OPTIONS = [
    (dict(num_experts=2, top_k=3), ValueError,
     "top_k must satisfy top_k <= num_experts, but top_k=3 and num_experts=2"),
    (dict(num_experts=0, top_k=1), ValueError, "num_experts must be at least 1, got 0"),
    (dict(top_k=0), ValueError, "top_k must be at least 1, got 0"),
    (dict(top_k=2.0), TypeError, "top_k must be an int, got float"),
    (dict(d_model=0), ValueError, "d_model must be at least 1, got 0"),
    (dict(d_ff=-4), ValueError, "d_ff must be at least 1, got -4"),
    (dict(num_shared_experts=-1), ValueError, "num_shared_experts must be at least 0, got -1"),
    (dict(scoring="relu"), ValueError, "scoring must be 'softmax' or 'sigmoid', got 'relu'"),
    (dict(implementation="bogus"), ValueError, "implementation must be None or one of ('xla', 'triton', 'interpret'), "
                                               "got 'bogus'"),
    (dict(dtype=jnp.int32), ValueError, "dtype must be None or float32, bfloat16 or float16, got int32"),
    (dict(dtype="bogus"), ValueError, "dtype must be None or float32, bfloat16 or float16, got 'bogus'"),
    (dict(param_dtype=jnp.int8), ValueError, "param_dtype must be float32, bfloat16 or float16, got int8"),
    (dict(param_dtype=np.float64), ValueError, "param_dtype must be float32, bfloat16 or float16, got float64"),
]


def _options(**overrides):
    return dict(d_model=D, d_ff=F, num_experts=E, top_k=K) | OPTIONS | overrides


@pytest.mark.parametrize("overrides, error, needle", BAD_OPTIONS)
def test_nnx_construction_rejects_bad_options(overrides, error, needle):
    with pytest.raises(error, match=re.escape(needle)):
        jaxmoe.MoELayer(**_options(**overrides), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("overrides, error, needle", BAD_OPTIONS)
def test_linen_construction_rejects_bad_options(overrides, error, needle):
    # linen checks in __post_init__, so constructing the module fails before any init or apply
    with pytest.raises(error, match=re.escape(needle)):
        jaxmoe.linen.MoELayer(**_options(**overrides))


@pytest.mark.parametrize("x, error, needle", [
    (jnp.ones((2, 5, D + 1)), ValueError,
     f"x has d={D + 1} but the MoELayer has d_model={D} (x [..., d] = (2, 5, {D + 1}))"),
    (jnp.ones(()), ValueError, f"x must be [..., d] with d = the MoELayer's d_model={D}, got shape ()"),
    ([[1.0] * D] * 3, TypeError, "x must be a jax.Array or numpy.ndarray, got list"),
])
def test_layers_name_x_and_d_model_when_x_does_not_fit(x, error, needle):
    with pytest.raises(error, match=re.escape(needle)):
        make_nnx()(x)
    twin = jaxmoe.linen.MoELayer(D, F, E, K, **OPTIONS)
    variables = twin.init(jax.random.key(0), tokens())
    with pytest.raises(error, match=re.escape(needle)):
        twin.apply(variables, x)


def test_layers_take_numpy_input():
    x = np.asarray(tokens())
    layer = make_nnx()
    np.testing.assert_array_equal(layer(x), layer(jnp.asarray(x)))
