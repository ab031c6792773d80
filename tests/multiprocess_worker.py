"""One of the JAX processes of tests/test_multiprocess.py (not a test file: pytest does not collect it).

    python tests/multiprocess_worker.py PORT PROCESS_ID NUM_PROCESSES IMPLEMENTATION

Each process joins jax.distributed on localhost:PORT with 4 CPU devices, so the mesh spans
4 * NUM_PROCESSES devices, and the processes talk through gloo, JAX's CPU collectives. Every process
builds the same full problem from one seed, feeds only its own rows of x
(`jax.make_array_from_process_local_data`), runs `jaxmoe.moe` and both MoELayers on the mesh, gathers
the global results (`process_allgather`) and holds them against the same computation on one local
device without a mesh: outputs, aux losses and every gradient. It also runs `jaxmoe.expert_ffn`'s
range check of ids outside jit on ids spread over the processes. Any failure exits non-zero at once;
the test reads that and both processes' output.
"""

from __future__ import annotations

import functools
import os
import sys
import time
import traceback

# Every program here is tiny, so compile time is nearly all of the test's time: XLA's cheapest CPU
# code generation roughly halves it.
os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0",
                                    "--xla_llvm_disable_expensive_passes=true"]).strip()

import jax  # noqa: E402

LOCAL_DEVICES = 4
PORT, PROCESS_ID, NUM_PROCESSES = (int(a) for a in sys.argv[1:4])
IMPLEMENTATION = sys.argv[4]

# Before any JAX computation: jax_num_cpu_devices wins over the XLA_FLAGS device count the parent's
# conftest.py sets for its own tests.
jax.config.update("jax_platforms", "cpu")  # on a GPU machine too: the test is about processes
jax.config.update("jax_num_cpu_devices", LOCAL_DEVICES)
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"localhost:{PORT}", num_processes=NUM_PROCESSES, process_id=PROCESS_ID,
                           initialization_timeout=60)

import flax.linen as nn  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.experimental.multihost_utils import process_allgather  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import jaxmoe  # noqa: E402

B, S, D, F, E, K = 8, 4, 16, 24, 8, 2  # T = 32 tokens: 4 per device
TOKENS = P(("data", "expert"))
RULES = (("expert", "expert"), ("embed", None), ("mlp", None))
TOL = 1e-5  # fp32 at "highest" precision


def log(message: str) -> None:
    print(f"[process {PROCESS_ID}] {message}", file=sys.stderr, flush=True)


def rel_err(out, ref) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    if not (np.isfinite(out).all() and np.isfinite(ref).all()):
        return float("inf")
    denom = np.linalg.norm(ref)
    return float(np.linalg.norm(out - ref) / denom) if denom > 0 else float(np.linalg.norm(out))


def assert_trees_close(got, want, what: str) -> None:
    """got holds global (sharded) arrays, gathered here; want one device's arrays."""
    got = process_allgather(got, tiled=True)
    paths = jax.tree_util.tree_flatten_with_path(want)[0]
    worst = 0.0
    for (path, b), a in zip(paths, jax.tree.leaves(got), strict=True):
        name = f"{what}{jax.tree_util.keystr(path)}"
        if jnp.issubdtype(b.dtype, jnp.integer):
            np.testing.assert_array_equal(a, b, err_msg=name)
        else:
            err = rel_err(a, b)
            assert err <= TOL, f"{name}: normalised error {err:.3g} > {TOL}"
            worst = max(worst, err)
    log(f"{what}: {len(paths)} arrays, largest normalised error {worst:.2g}")


def meshes():
    """The (data, expert) meshes over every process's devices. jax.make_mesh's (Explicit axes): each
    process holds one data row, so the all_to_alls stay inside a process and the sums over data cross,
    and the global batch is process 0's rows, then process 1's. And a Mesh (Auto axes) whose expert
    groups span both processes (device i of process p at expert index 2 * (i % 2) + p): the
    all_to_alls cross processes too, and a process's rows of x are not contiguous."""
    by_process = np.array(jax.devices()).reshape(NUM_PROCESSES, 2, 2)  # [process, data, pair]
    across = jax.sharding.Mesh(by_process.transpose(1, 2, 0).reshape(2, 4), ("data", "expert"))
    made = jax.make_mesh((2, 4), ("data", "expert"))
    share = B // NUM_PROCESSES
    assert process_rows(NamedSharding(made, TOKENS), B) == list(range(PROCESS_ID * share, (PROCESS_ID + 1) * share))
    rows = process_rows(NamedSharding(across, TOKENS), B)
    assert rows != list(range(rows[0], rows[0] + len(rows))), rows
    return {"make_mesh": made, "experts_across_processes": across}


def process_rows(sharding: NamedSharding, n: int) -> list[int]:
    """The rows of an [n, ...] array that this process's devices hold under `sharding`."""
    return sorted({r for index in sharding.addressable_devices_indices_map((n,)).values()
                   for r in range(*index[0].indices(n))})


def process_local_array(sharding: NamedSharding, value: np.ndarray) -> jax.Array:
    """The global array of `value` assembled from this process's rows alone, as a data loader feeds it."""
    return jax.make_array_from_process_local_data(sharding, value[process_rows(sharding, value.shape[0])],
                                                  value.shape)


@functools.cache
def problem():
    """The full inputs, the same on every process (numpy: no compilation)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((B, S, D), np.float32)
    router = rng.standard_normal((D, E), np.float32) / np.float32(np.sqrt(D))
    w_gate, w_up = (rng.standard_normal((E, D, F), np.float32) / np.float32(np.sqrt(D)) for _ in range(2))
    w_down = rng.standard_normal((E, F, D), np.float32) / np.float32(np.sqrt(F))
    bias = np.array([0.3, 0.2, 0.1, 0, 0, 0, 0, 0], np.float32)  # skewed: experts 0-2 get most tokens
    g = rng.standard_normal((B, S, D), np.float32)  # the output's cotangent
    return x, router, w_gate, w_up, w_down, bias, g


def loss_of(y, aux, g):
    """What every check differentiates: the output against a fixed cotangent, and both aux losses. The
    checks compare y, aux and the gradients, not this sum, whose cancellation would amplify y's rounding."""
    return jnp.sum(y * g) + aux["load_balancing_loss"] + 0.1 * aux["router_z_loss"]


def moe_value_and_grad(x, router, w_gate, w_up, w_down, bias, g, **options):
    """((y, aux), gradients in x, router, w_gate, w_up, w_down and bias)."""
    def loss(x, router, w_gate, w_up, w_down, bias):
        y, aux = jaxmoe.moe(x, router, w_gate, w_up, w_down, top_k=K, selection_bias=bias, **options)
        return loss_of(y, aux._asdict(), g), (y, aux._asdict())
    (_, out), grads = jax.value_and_grad(loss, argnums=range(6), has_aux=True)(x, router, w_gate, w_up, w_down,
                                                                                bias)
    return out, grads


one_device = jax.jit(functools.partial(moe_value_and_grad, implementation="xla"))  # the reference, on one device


def check_moe(mesh) -> None:
    """jaxmoe.moe under jit: output, aux losses and the gradients in all six inputs."""
    x, router, w_gate, w_up, w_down, bias, g = problem()
    tokens, experts = NamedSharding(mesh, TOKENS), NamedSharding(mesh, P("expert"))
    replicated = NamedSharding(mesh, P())
    x_global, g_global = process_local_array(tokens, x), process_local_array(tokens, g)
    np.testing.assert_array_equal(process_allgather(x_global, tiled=True), x)
    weights = jax.device_put((router, w_gate, w_up, w_down, bias), (replicated, experts, experts, experts,
                                                                    replicated))
    run = jax.jit(functools.partial(moe_value_and_grad, implementation=IMPLEMENTATION, mesh=mesh,
                                    expert_axis="expert", data_axis="data"))
    got = run(x_global, *weights, g_global)
    assert_trees_close(got, one_device(*problem()), "moe ((y, aux), grads)")
    grads = got[1]
    assert grads[2].sharding.spec[0] == "expert" and grads[1].sharding.is_fully_replicated


def layer_reference(params):
    """The layers' output, aux losses and gradients from `one_device` on their parameters (no bias: a
    zero one)."""
    x, *_, g = problem()
    (y, aux), grads = one_device(x, *(params[n] for n in ("router", "w_gate", "w_up", "w_down")),
                                 np.zeros(E, np.float32), g)
    return y, aux, dict(zip(("router", "w_gate", "w_up", "w_down"), grads[1:5]))


def check_nnx(mesh) -> None:
    """The nnx layer created under the mesh and rules, and one SGD step: output, aux losses,
    gradients and the updated parameters, against one device from the same parameters."""
    x, *_, g = problem()
    lr = 0.1

    @nnx.jit
    def train_step(layer, optimizer, x, g):
        def loss(layer):
            y, aux = nnx.capture(layer, nnx.Intermediate)(x)
            # the layers sow the routing too; the checks hold the aux losses and counts
            aux = {name: value.get_value()[0] for name, value in aux.items() if name in jaxmoe.MoEAux._fields}
            return loss_of(y, aux, g), (y, aux)
        (_, (y, aux)), grads = nnx.value_and_grad(loss, has_aux=True)(layer)
        optimizer.update(layer, grads)
        return y, aux, nnx.state(grads, nnx.Param)

    def params_of(state):
        return {name: v.get_value() for name, v in state.items()}

    with jax.set_mesh(mesh), nnx.logical_axis_rules(RULES):
        layer = jaxmoe.MoELayer(D, F, E, K, implementation=IMPLEMENTATION, mesh=mesh, expert_axis="expert",
                                data_axis="data", rngs=nnx.Rngs(0))
    params = params_of(nnx.state(layer, nnx.Param))
    assert params["w_gate"].sharding.spec == P("expert", None, None) and params["router"].sharding.is_fully_replicated
    params = process_allgather(params, tiled=True)  # numpy copies: the step updates the layer's own

    optimizer = nnx.Optimizer(layer, optax.sgd(lr), wrt=nnx.Param)
    tokens = NamedSharding(mesh, TOKENS)
    y, aux, grads = train_step(layer, optimizer, process_local_array(tokens, x), process_local_array(tokens, g))
    want_y, want_aux, want_grads = layer_reference(params)
    assert_trees_close((y, aux, params_of(grads)), (want_y, want_aux, want_grads), "nnx (y, aux, grads)")
    want_stepped = {name: params[name] - np.float32(lr) * np.asarray(want_grads[name]) for name in want_grads}
    assert_trees_close(params_of(nnx.state(layer, nnx.Param)), want_stepped, "nnx params after the SGD step")


def check_linen(mesh) -> None:
    """The linen layer initialised straight into its sharded layout (jit with out_shardings): output,
    aux losses and every gradient, against one device from the same parameters."""
    x, *_, g = problem()
    layer = jaxmoe.linen.MoELayer(D, F, E, K, implementation=IMPLEMENTATION, mesh=mesh, expert_axis="expert",
                                  data_axis="data")

    @jax.jit
    def value_and_grad(params, x, g):
        def loss(params):
            y, state = layer.apply({"params": params}, x, mutable=["intermediates"])
            aux = {name: value[0] for name, value in state["intermediates"].items() if name in jaxmoe.MoEAux._fields}
            return loss_of(y, aux, g), (y, aux)
        (_, (y, aux)), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return y, aux, grads

    key = jax.random.key(0)
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(jax.eval_shape(layer.init, key, x)), mesh, RULES)
    params = nn.unbox(jax.jit(layer.init, out_shardings=shardings)(key, x))["params"]
    assert params["w_gate"].sharding.spec == P("expert", None, None) and params["router"].sharding.is_fully_replicated
    tokens = NamedSharding(mesh, TOKENS)
    got = value_and_grad(params, process_local_array(tokens, x), process_local_array(tokens, g))
    assert_trees_close(got, layer_reference(process_allgather(params, tiled=True)), "linen (y, aux, grads)")


def check_eager(mesh) -> None:
    """Outside jit, where ids are concrete but spread over the processes: `jaxmoe.expert_ffn` checks
    that they lie in [0, E), which must pass on good ids and, on bad ones held by one process alone,
    raise on every process (one raising alone would leave the other waiting in a collective)."""
    x, _, w_gate, w_up, w_down, _, _ = problem()
    tokens, replicated = NamedSharding(mesh, TOKENS), NamedSharding(mesh, P())
    T = B * S
    x2d = x.reshape(T, D)
    ids = ((np.arange(T)[:, None] + np.arange(K)) % E).astype(np.int32)
    routing_weights = np.linspace(0.1, 1.0, T * K, dtype=np.float32).reshape(T, K)
    token_args = [process_local_array(tokens, a) for a in (x2d, routing_weights, ids)]
    experts = jax.device_put((w_gate, w_up, w_down), replicated)
    # "xla" whatever IMPLEMENTATION is: the check runs before any implementation, and the kernels'
    # pure_callback does not run outside jit on sharded arrays, on one process either (jax: "Cannot
    # convert GSPMDSharding {maximal device=0} into SdyArray").
    got = jaxmoe.expert_ffn(*token_args, *experts, implementation="xla")
    assert_trees_close(got, jaxmoe.expert_ffn(x2d, routing_weights, ids, w_gate, w_up, w_down,
                                              implementation="xla"), "eager expert_ffn")

    owner = {index[0].indices(T)[0]: device.process_index
             for device, index in tokens.devices_indices_map((T, K)).items()}
    bad_row = max(row for row, process in owner.items() if process == NUM_PROCESSES - 1)
    bad = ids.copy()
    bad[bad_row, 0] = E
    try:
        jaxmoe.expert_ffn(*token_args[:2], process_local_array(tokens, bad), *experts, implementation=IMPLEMENTATION)
    except ValueError as err:
        assert f"ids must lie in [0, E={E})" in str(err) and f"got values in [0, {E}]" in str(err), err
    else:
        raise AssertionError(f"ids with {E} on process {NUM_PROCESSES - 1} gave no error on process {PROCESS_ID}")


def main() -> None:
    assert jax.process_count() == NUM_PROCESSES and jax.local_device_count() == LOCAL_DEVICES, (
        jax.process_count(), jax.local_device_count())
    mesh = meshes()
    # moe on both meshes; each layer on one of them, to keep the test cheap.
    checks = [(check_moe, "make_mesh"), (check_moe, "experts_across_processes"), (check_nnx, "make_mesh"),
              (check_linen, "experts_across_processes"), (check_eager, "experts_across_processes")]
    with jax.default_matmul_precision("highest"):
        for check, name in checks:
            start = time.perf_counter()
            check(mesh[name])
            log(f"{check.__name__} on {name}: ok ({time.perf_counter() - start:.1f} s)")
    log("all ok")


if __name__ == "__main__":
    try:
        main()
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)  # at once: a normal exit waits in jax.distributed's shutdown barrier for the peer
