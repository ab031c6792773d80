"""Expert and data parallelism (jaxmoe/sharding.py) on 8 simulated CPU devices (see conftest.py).

Every sharded result (output, aux losses, every gradient) is held against the single-device result.
"""

from __future__ import annotations

import contextlib
import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import jaxmoe
from jaxmoe import api
from conftest import assert_close, dense_expert_ffn, rel_err

T, D, F, E, K = 64, 16, 24, 8, 2

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (conftest.py simulates them)")

# Selection biases (DeepSeek-style: they change which experts are picked, not the weights).
ROUTINGS = {
    "balanced": None,
    "skewed": jnp.array([0.3, 0.2, 0.1, 0, 0, 0, 0, 0]),  # experts 0-2 get most tokens
    "one_device": jnp.array([10.0, 10.0] + [0.0] * 6),  # every token to experts 0 and 1
}


@pytest.fixture(autouse=True)
def _highest():
    with jax.default_matmul_precision("highest"):
        yield


def make_mesh(dp, ep, axis_type=AxisType.Auto):
    return jax.make_mesh((dp, ep), ("data", "expert"), axis_types=(axis_type,) * 2,
                         devices=jax.devices()[:dp * ep])


def problem():
    keys = jax.random.split(jax.random.key(0), 6)
    x = jax.random.normal(keys[0], (T, D))
    router = jax.random.normal(keys[1], (D, E)) / np.sqrt(D)
    w_gate, w_up = (jax.random.normal(kk, (E, D, F)) / np.sqrt(D) for kk in keys[2:4])
    w_down = jax.random.normal(keys[4], (E, F, D)) / np.sqrt(F)
    g = jax.random.normal(keys[5], (T, D))  # the output's cotangent
    return (x, router, w_gate, w_up, w_down), g


def value_and_grads(args, g, bias=None, *, mesh=None, hlo=None, **moe_options):
    """(y, aux) and the gradients in x, router_weight, w_gate, w_up, w_down and bias of a loss that
    reads y and both aux losses. With a mesh the inputs are first laid out as `jaxmoe.moe` splits them
    (tokens over the token axes, experts over expert_axis); hlo, a list, gets the compiled HLO text."""

    def loss(x, router, w_gate, w_up, w_down, bias):
        y, aux = jaxmoe.moe(x, router, w_gate, w_up, w_down, top_k=K, selection_bias=bias, mesh=mesh, **moe_options)
        return jnp.sum(y * g) + aux.load_balancing_loss + 0.1 * aux.router_z_loss, (y, aux)

    args = (*args, jnp.zeros(E) if bias is None else bias)
    if mesh is not None:
        tokens = NamedSharding(mesh, P(("data", "expert")))
        experts = NamedSharding(mesh, P(moe_options.get("expert_axis")))
        replicated = NamedSharding(mesh, P())
        args = jax.device_put(args, (tokens, replicated, experts, experts, experts, replicated))
    compiled = jax.jit(jax.value_and_grad(loss, argnums=range(6), has_aux=True)).lower(*args).compile()
    if hlo is not None:
        hlo.append(compiled.as_text())
    (_, out), grads = compiled(*args)
    return out, grads


@functools.cache
def single_device(routing: str):
    return value_and_grads(*problem(), bias=ROUTINGS[routing], implementation="xla")


def axes(dp, ep):
    """Expert-only meshes leave data_axis out and data-only ones expert_axis; (1, 1) names both."""
    return dict(data_axis="data" if dp > 1 or ep == 1 else None, expert_axis="expert" if ep > 1 or dp == 1 else None)


def assert_matches_single_device(got, want):
    (y, aux), grads = got
    (y_ref, aux_ref), grads_ref = want
    assert_close(y, y_ref, jnp.float32)
    np.testing.assert_array_equal(aux.expert_counts, aux_ref.expert_counts)
    assert_close(aux.load_balancing_loss, aux_ref.load_balancing_loss, jnp.float32)
    assert_close(aux.router_z_loss, aux_ref.router_z_loss, jnp.float32)
    for name, a, b in zip(("x", "router_weight", "w_gate", "w_up", "w_down", "bias"), grads, grads_ref):
        assert a.shape == b.shape, name
        assert rel_err(a, b) <= 1e-5, f"d{name}: {rel_err(a, b):.3g}"


# Every expert-parallel degree alone and with data parallelism; the uneven routings ride along
# ("one_device" at ep = 2 or 4 also leaves the other devices of the expert axis without tokens).
XLA_CASES = [(1, 1, "balanced"), (1, 2, "balanced"), (1, 4, "one_device"), (1, 8, "balanced"), (2, 1, "balanced"),
             (8, 1, "skewed"), (2, 2, "one_device"), (2, 4, "balanced"), (4, 2, "skewed")]
INTERPRET_CASES = [(1, 2, "skewed"), (2, 4, "one_device"), (1, 8, "balanced")]


@pytest.mark.parametrize("impl, dp, ep, routing", [("xla", *case) for case in XLA_CASES]
                         + [("interpret", *case) for case in INTERPRET_CASES])
def test_matches_one_device(impl, dp, ep, routing):
    """Forward, aux losses and every gradient equal one device's; and under jit with the inputs laid
    out as moe splits them, value_and_grad compiles to all-to-alls and all-reduces only: no expert
    weight (and nothing else) is all-gathered around the expert FFN."""
    mesh, hlo = make_mesh(dp, ep), []
    got = value_and_grads(*problem(), bias=ROUTINGS[routing], implementation=impl, mesh=mesh, hlo=hlo,
                          **axes(dp, ep))
    assert_matches_single_device(got, single_device(routing))
    assert "all-gather" not in hlo[0]
    assert ("all-to-all" in hlo[0]) == (ep > 1)
    (y, aux), grads = got
    if routing == "one_device":
        assert (np.asarray(aux.expert_counts)[2:] == 0).all()
    # The expert weights' gradients stay split over the expert axis; the router's is replicated.
    if ep > 1:
        assert grads[2].sharding.spec[0] == "expert"
    assert grads[1].sharding.is_fully_replicated


@pytest.mark.parametrize("impl", ["xla", "interpret"])
def test_local_expert_range(impl):
    """The expert FFN of a device holding experts [3, 6) of 8: assignments to the others give no output
    and a zero routing-weight gradient; the local ones match the dense oracle."""
    first, E_l = 3, 3
    (x, _, w_gate, w_up, w_down), g = problem()
    ids = jax.random.randint(jax.random.key(1), (T, K), 0, E)
    weights = jax.random.uniform(jax.random.key(2), (T, K), jnp.float32, 0.1, 1.0)
    local = (ids >= first) & (ids < first + E_l)
    assert local.any() and not local.all()
    experts = [w[first:first + E_l] for w in (w_gate, w_up, w_down)]
    expert_ffn_fn = api._stages(impl).expert_ffn  # what jaxmoe.moe runs on each device

    def oracle(x, weights, ids, w_gate, w_up, w_down, first):
        return dense_expert_ffn(x, jnp.where(local, weights, 0.0), jnp.where(local, ids - first, 0),
                                w_gate, w_up, w_down)

    def value_and_grad(fn, first):
        def loss(x, weights, *experts):
            y = fn(x, weights, ids, *experts, first)
            return jnp.sum(y * g), y
        return jax.value_and_grad(loss, argnums=range(5), has_aux=True)

    (_, y), got = jax.jit(value_and_grad(expert_ffn_fn, jnp.int32(first)))(x, weights, *experts)
    (_, y_ref), want = value_and_grad(oracle, first)(x, weights, *experts)
    assert_close(y, y_ref, jnp.float32)
    assert (np.asarray(y)[~np.asarray(local).any(axis=1)] == 0).all()  # tokens with no local expert
    for a, b in zip(got, want):
        assert rel_err(a, b) <= 1e-5
    assert (np.asarray(got[1])[~np.asarray(local)] == 0).all()


@functools.cache
def _custom_routing():
    """Routing done outside jaxmoe.moe, as `route` + `expert_ffn` users do: (weights, ids)."""
    (x, router, *_), _ = problem()
    routing = jaxmoe.route(x @ router, K, scoring="sigmoid")
    return routing.weights, routing.ids


def _expert_ffn_value_and_grads(impl, x, weights, w_gate, w_up, w_down, **options):
    _, g = problem()
    ids = _custom_routing()[1]

    def loss(x, weights, w_gate, w_up, w_down):
        y = jaxmoe.expert_ffn(x, weights, ids, w_gate, w_up, w_down, implementation=impl, **options)
        return jnp.sum(y * g), y

    return jax.jit(jax.value_and_grad(loss, argnums=range(5), has_aux=True))(x, weights, w_gate, w_up, w_down)


@pytest.mark.parametrize("impl, dp, ep, axis_type", [("xla", 2, 4, AxisType.Auto), ("xla", 1, 8, AxisType.Explicit),
                                                     ("xla", 4, 1, AxisType.Explicit),
                                                     ("interpret", 1, 2, AxisType.Auto)])
def test_expert_ffn_matches_one_device(impl, dp, ep, axis_type):
    """`expert_ffn` with mesh, expert_axis and data_axis, after the caller's own routing: y and the
    gradients in x, the routing weights and the expert weights equal one device's. Auto axes get mesh=
    and inputs laid out as expert_ffn splits them; Explicit ones jax.set_mesh and inputs not placed."""
    (x, _, w_gate, w_up, w_down), _ = problem()
    weights = _custom_routing()[0]
    (_, y_ref), want = _expert_ffn_value_and_grads("xla", x, weights, w_gate, w_up, w_down)
    mesh = make_mesh(dp, ep, axis_type)
    args = (x, weights, w_gate, w_up, w_down)
    options = axes(dp, ep)
    if axis_type == AxisType.Auto:
        tokens, experts = NamedSharding(mesh, P(("data", "expert"))), NamedSharding(mesh, P(options["expert_axis"]))
        args = jax.device_put(args, (tokens, tokens, experts, experts, experts))
        (_, y), got = _expert_ffn_value_and_grads(impl, *args, mesh=mesh, **options)
    else:
        with jax.set_mesh(mesh):
            (_, y), got = _expert_ffn_value_and_grads(impl, *args, **options)
    assert_close(y, y_ref, jnp.float32)
    for name, a, b in zip(("x", "weights", "w_gate", "w_up", "w_down"), got, want):
        assert rel_err(a, b) <= 1e-5, f"d{name}: {rel_err(a, b):.3g}"
    if ep > 1:
        assert got[2].sharding.spec[0] == "expert"


def _axis_types_loss(x, router, w_gate, w_up, w_down, **options):
    y, aux = jaxmoe.moe(x, router, w_gate, w_up, w_down, top_k=K, implementation="xla", **options)
    return jnp.sum(y * y) + aux.load_balancing_loss + 0.1 * aux.router_z_loss  # no cancellation in the sum


@functools.cache
def _axis_types_want():
    (x, router, w_gate, w_up, w_down), _ = problem()
    return jax.jit(jax.value_and_grad(_axis_types_loss, argnums=range(5)))(x.reshape(8, 8, D), router, w_gate,
                                                                           w_up, w_down)


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
def test_axis_types(axis_type):
    """Under jax.set_mesh with Auto or Explicit axes (the mesh taken from the context), x [B, S, d]."""
    (x, router, w_gate, w_up, w_down), _ = problem()
    with jax.set_mesh(make_mesh(2, 4, axis_type)):
        args = (jax.device_put(x.reshape(8, 8, D), P("data")), router,
                *(jax.device_put(w, P("expert")) for w in (w_gate, w_up, w_down)))
        loss = functools.partial(_axis_types_loss, expert_axis="expert", data_axis="data")
        got = jax.jit(jax.value_and_grad(loss, argnums=range(5)))(*args)
    for i, (a, b) in enumerate(zip(jax.tree.leaves(got), jax.tree.leaves(_axis_types_want()))):
        assert rel_err(a, b) <= 1e-5, i
    if axis_type == AxisType.Explicit:
        assert jax.typeof(got[1][2]).sharding.spec[0] == "expert"


def _batch_of_4():
    """x [4, 16, d]: 64 tokens split 8 ways, but B = 4 is not a multiple of the 8 token shards."""
    (x, router, w_gate, w_up, w_down), _ = problem()
    return x.reshape(4, 16, D), router, w_gate, w_up, w_down


# Each of eager/jit and mesh=/set_mesh once with x unplaced and once with x split over S.
@pytest.mark.parametrize("how, placement", [("eager, mesh=", None), ("jit, set_mesh", None),
                                            ("jit, mesh=", P(None, ("data", "expert"))),
                                            ("eager, set_mesh", P(None, ("data", "expert")))])
def test_explicit_axes_3d_batch(how, placement):
    """On Explicit axes (jax.make_mesh's default), x [B, S, d] with B not a multiple of the token shards,
    not placed on the mesh or split over S: the output and the routing equal one device's, in a layout
    over the mesh."""
    x, *weights = _batch_of_4()
    mesh = jax.make_mesh((2, 4), ("data", "expert"), axis_types=(AxisType.Explicit,) * 2)
    if placement is not None:
        x = jax.device_put(x, NamedSharding(mesh, placement))
    in_context = "set_mesh" in how
    run = functools.partial(jaxmoe.moe, top_k=K, implementation="xla", expert_axis="expert", data_axis="data",
                            mesh=None if in_context else mesh, return_routing=True)
    run = jax.jit(run) if how.startswith("jit") else run
    with jax.set_mesh(mesh) if in_context else contextlib.nullcontext():
        y, aux, routing = run(x, *weights)
    y_ref, aux_ref, routing_ref = jax.jit(functools.partial(jaxmoe.moe, top_k=K, implementation="xla",
                                                            return_routing=True))(*_batch_of_4())
    assert y.shape == (4, 16, D) and y.sharding.mesh.shape == mesh.shape
    assert_close(y, y_ref, jnp.float32)
    np.testing.assert_array_equal(aux.expert_counts, aux_ref.expert_counts)
    for got, want in zip(routing, routing_ref):
        assert got.shape == want.shape and rel_err(got, want) <= 1e-6


@pytest.mark.parametrize("impl", ["xla", "interpret"])
@pytest.mark.parametrize("how, placement", [("eager", P(None, ("data", "expert"))), ("jit", P("data", "expert")),
                                            ("eager, set_mesh", P("data")), ("jit, set_mesh", P(None, "expert"))])
def test_x_split_over_explicit_axes_with_no_axes_named(impl, how, placement):
    """x [B, S, d] split over Explicit axes on its token dims, no mesh= and no axes named (with and
    without jax.set_mesh): the layer runs data-parallel over x's axes, as any jnp function follows x's
    split. The output, its gradient in x and the aux losses equal one device's, and y is split as x.
    (Eagerly without set_mesh the forward alone: JAX's own eager grad of an Explicit array needs set_mesh.)"""
    x, *weights = _batch_of_4()
    mesh = jax.make_mesh((2, 4), ("data", "expert"), axis_types=(AxisType.Explicit,) * 2)
    xs = jax.device_put(x, NamedSharding(mesh, placement))

    def loss(x, *weights):
        y, aux = jaxmoe.moe(x, *weights, top_k=K, implementation=impl)
        return jnp.sum(y * y) + aux.load_balancing_loss, y

    (value_ref, y_ref), dx_ref = jax.jit(jax.value_and_grad(loss, has_aux=True))(x, *weights)
    if how == "eager":
        value, y = loss(xs, *weights)
        dx = None
    else:
        run = jax.value_and_grad(loss, has_aux=True)
        run = jax.jit(run) if how.startswith("jit") else run
        with jax.set_mesh(mesh) if "set_mesh" in how else contextlib.nullcontext():
            (value, y), dx = run(xs, *weights)
    assert tuple(y.sharding.spec)[:2] == tuple(placement)[:2] + (None,) * (2 - len(placement))
    assert_close(y, y_ref, jnp.float32)
    assert rel_err(value, value_ref) <= 1e-6
    if dx is not None:
        assert_close(dx, dx_ref, jnp.float32)


def test_explicit_axes_linen_init_3d_batch():
    """linen init and apply of a sharded layer on Explicit axes, with x [4, 16, d] not placed (under jit:
    eagerly they take the path of test_explicit_axes_3d_batch's eager cases)."""
    mesh = jax.make_mesh((2, 4), ("data", "expert"), axis_types=(AxisType.Explicit,) * 2)
    x = _batch_of_4()[0]
    layer = jaxmoe.linen.MoELayer(D, F, E, K, implementation="xla")
    sharded = jaxmoe.linen.MoELayer(D, F, E, K, implementation="xla", mesh=mesh, expert_axis="expert",
                                    data_axis="data")
    variables = jax.jit(sharded.init)(jax.random.key(0), x)
    assert_close(jax.jit(sharded.apply)(variables, x), jax.jit(layer.apply)(variables, x), jnp.float32)


RULES = (("expert", "expert"), ("embed", None), ("mlp", None))


def test_nnx_layer_on_a_mesh():
    """Created under a mesh and logical-axis rules, the nnx layer stores its expert weights split over
    the expert axis; its loss and gradients are those of `jaxmoe.moe` on one device."""
    mesh = make_mesh(2, 4)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(RULES):
        layer = jaxmoe.MoELayer(D, F, E, K, implementation="xla", mesh=mesh, expert_axis="expert",
                                data_axis="data", rngs=nnx.Rngs(0))
    assert layer.w_down[...].sharding.spec == P("expert", None, None)
    x = jax.random.normal(jax.random.key(1), (4, 16, D))

    @nnx.jit
    def layer_grads(layer):
        def loss(layer):
            y, aux = nnx.capture(layer, nnx.Intermediate)(x)
            return jnp.sum(y * y) + aux["load_balancing_loss"].get_value()[0]
        return nnx.value_and_grad(loss)(layer)

    def moe_loss(params):
        y, aux = jaxmoe.moe(x, *(params[n] for n in ("router", "w_gate", "w_up", "w_down")), top_k=K,
                            implementation="xla")
        return jnp.sum(y * y) + aux.load_balancing_loss

    params = {name: np.asarray(v.get_value()) for name, v in nnx.state(layer, nnx.Param).items()}
    loss, grads = layer_grads(layer)
    want_loss, want = jax.jit(jax.value_and_grad(moe_loss))(params)
    assert rel_err(loss, want_loss) <= 1e-5
    for name, value in nnx.state(grads, nnx.Param).items():
        assert rel_err(value.get_value(), want[name]) <= 1e-5, name
    assert nnx.state(grads, nnx.Param)["w_gate"].get_value().sharding.spec[0] == "expert"


def test_linen_layer_on_a_mesh():
    """linen, with shared experts: parameters laid out from their logical names by the rules; the output
    and aux losses match the unsharded layer's."""
    mesh = make_mesh(2, 4)
    layer = jaxmoe.linen.MoELayer(D, F, E, K, implementation="xla", num_shared_experts=1)
    sharded = jaxmoe.linen.MoELayer(D, F, E, K, implementation="xla", num_shared_experts=1, mesh=mesh,
                                    expert_axis="expert", data_axis="data")
    x = jax.random.normal(jax.random.key(1), (4, 16, D))
    variables = jax.jit(layer.init)(jax.random.key(0), x)
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(variables), mesh, RULES)
    placed = jax.device_put(variables, shardings)
    assert nn.unbox(placed)["params"]["w_gate"].sharding.spec == P("expert", None, None)

    def apply(module, variables):
        return jax.jit(functools.partial(module.apply, mutable=["intermediates"]))(variables, x)

    (y, state), (y_ref, state_ref) = apply(sharded, placed), apply(layer, variables)
    assert_close(y, y_ref, jnp.float32)
    for name in jaxmoe.MoEAux._fields + jaxmoe.reference.MoERouting._fields:  # the routing as sown too
        got, want = state["intermediates"][name][0], state_ref["intermediates"][name][0]
        assert got.shape == want.shape and rel_err(got, want) <= 1e-6, name


def test_errors_name_the_axes():
    args, _ = problem()
    run = functools.partial(jaxmoe.moe, *args, top_k=K, implementation="xla")
    with pytest.raises(ValueError, match=r"expert_axis='expert' has size 3, which does not divide the E=8"):
        run(mesh=make_mesh(1, 3), expert_axis="expert")
    with pytest.raises(ValueError, match=re.escape("T=60 tokens (x (60, 16) flattened to [T, d]) do not split "
                                                   "evenly over the 8 devices of data_axis='data' (size 2) and "
                                                   "expert_axis='expert' (size 4)")):
        jaxmoe.moe(args[0][:60], *args[1:], top_k=K, mesh=make_mesh(2, 4), expert_axis="expert", data_axis="data")
    with pytest.raises(ValueError, match=r"expert_axis='model' is not an axis of the mesh"):
        run(mesh=make_mesh(2, 4), expert_axis="model")
    with pytest.raises(ValueError, match="there is no mesh: pass mesh= or call under jax.set_mesh"):
        run(data_axis="data")
    with pytest.raises(ValueError, match="mesh= needs expert_axis and/or data_axis"):
        run(mesh=make_mesh(2, 4))
    with pytest.raises(ValueError, match=r"expert_axis='expert' has size 3, which does not divide num_experts=8"):
        jaxmoe.MoELayer(D, F, E, K, mesh=make_mesh(1, 3), expert_axis="expert", rngs=nnx.Rngs(0))
    y, aux = jaxmoe.moe(args[0][:0], *args[1:], top_k=K, mesh=make_mesh(2, 4), expert_axis="expert",
                        data_axis="data")
    assert y.shape == (0, D) and int(aux.expert_counts.sum()) == 0
