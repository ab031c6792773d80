"""GPU-only checks of implementation="triton" on model-sized shapes (run: pytest -m gpu on the GPU machine).

Odd shapes, edge cases and every dtype on small shapes run through tests/test_implementations.py,
whose "triton" rows are GPU-marked too.
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmoe
from jaxmoe import config, launch, ops, reference
from conftest import TOLERANCE, Problem, assert_close, dense_expert_ffn, rel_err

pytestmark = pytest.mark.gpu

# (name, E, k, d, f): the benchmark's shapes
MODEL_SHAPES = [("mixtral", 8, 2, 4096, 14336), ("qwen3_30b_a3b", 128, 8, 2048, 768),
                ("deepseek_v2_lite", 64, 6, 2048, 1408)]


def _moe_pair(x, router, p: Problem, k):
    run = jax.jit(lambda *a: jaxmoe.moe(*a, top_k=k, implementation="triton"))
    ref = jax.jit(lambda *a: reference.moe(*a, top_k=k))
    args = (x, router, p.w_gate, p.w_up, p.w_down)
    return run(*args), ref(*args)


@pytest.mark.parametrize("T", [16, 512, 4096])
@pytest.mark.parametrize("shape", MODEL_SHAPES, ids=lambda s: s[0])
def test_model_shapes_bf16(shape, T):
    _, E, k, d, f = shape
    p = Problem(T, T, d, f, E, k, dtype=jnp.bfloat16)
    router = (jax.random.normal(jax.random.key(T), (d, E)) / np.sqrt(d)).astype(jnp.bfloat16)
    (y, aux), (y_ref, aux_ref) = _moe_pair(p.x, router, p, k)
    assert_close(y, y_ref, jnp.bfloat16)
    np.testing.assert_array_equal(aux.expert_counts, aux_ref.expert_counts)
    np.testing.assert_allclose(aux.load_balancing_loss, aux_ref.load_balancing_loss, rtol=1e-5)
    np.testing.assert_allclose(aux.router_z_loss, aux_ref.router_z_loss, rtol=1e-5)


@pytest.mark.parametrize("T", [1, 16, 64, 128, 129])
def test_aux_losses_from_the_routing_kernel(T):
    """At few programs the routing kernel's last program applies the aux-loss formulas: the values
    equal jax.lax's whichever program finishes last, and repeated runs are bitwise equal (its ticket
    is the only atomic). T = 129 takes XLA's sums."""
    E, k = 128, 8
    logits = jax.random.normal(jax.random.key(T), (T, E)) * 2
    run = jax.jit(lambda lg: ops.route_with_aux(lg, k)[1])
    aux = run(logits)
    want = reference.route_with_aux(logits, k)[1]
    np.testing.assert_array_equal(aux.expert_counts, want.expert_counts)
    np.testing.assert_allclose(aux.load_balancing_loss, want.load_balancing_loss, rtol=1e-5)
    np.testing.assert_allclose(aux.router_z_loss, want.router_z_loss, rtol=1e-5)
    first = [np.asarray(a).tobytes() for a in aux]
    for _ in range(50):
        assert [np.asarray(a).tobytes() for a in run(logits)] == first


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.float32])
def test_model_shape_other_dtypes(dtype):
    _, E, k, d, f = MODEL_SHAPES[2]
    p = Problem(7, 300, d, f, E, k, dtype=dtype)
    with jax.default_matmul_precision("highest"):
        y = jax.jit(lambda *a: jaxmoe.expert_ffn(*a, implementation="triton"))(*p.args)
        y_ref = jax.jit(reference.grouped_expert_ffn)(*p.args)
    assert_close(y, y_ref, dtype)


def test_float32_default_precision_is_no_worse_than_xla():
    """At JAX's default matmul precision, float32 may run on tf32 tensor cores, as XLA's dots may:
    the kernel's error against a true-float32 result must stay within XLA's own at that setting.

    Each function is jitted afresh and the exact result comes from the dense oracle, whose precision
    is explicit: an earlier test jits the same reference at the same shape under "highest", and this
    test once failed after it in a full run (and passed alone), as if that executable were reused.
    """
    _, E, k, d, f = MODEL_SHAPES[2]
    p = Problem(10, 300, d, f, E, k)
    y = jax.jit(lambda *a: jaxmoe.expert_ffn(*a, implementation="triton"))(*p.args)
    y_xla = jax.jit(lambda *a: reference.grouped_expert_ffn(*a))(*p.args)
    exact = jax.jit(lambda *a: dense_expert_ffn(*a))(*p.args)
    err, xla_err = rel_err(y, exact), rel_err(y_xla, exact)
    print(f"float32 at default precision: triton {err:.3g}, xla {xla_err:.3g}")
    assert err <= max(1.5 * xla_err, TOLERANCE[jnp.dtype(jnp.float32)])


def test_huge_token_count_int64_offsets():
    """T = 65536, d = 4096, k = 8: the n x d expert-row buffer holds 2.1e9 elements, past 2^31.

    Each token's output depends on its own row only, so the reference runs on the first and last
    tokens (the last are where a 32-bit offset would have wrapped): on all 65536 it needs 64 GiB.
    """
    T, d, f, E, k = 65536, 4096, 256, 16, 8
    p = Problem(8, T, d, f, E, k, dtype=jnp.bfloat16)
    y = jax.jit(lambda *a: jaxmoe.expert_ffn(*a, implementation="triton"))(*p.args)
    rows = np.r_[0:1024, T - 3072:T]
    y_ref = jax.jit(reference.grouped_expert_ffn)(p.x[rows], p.weights[rows], p.ids[rows], p.w_gate, p.w_up,
                                                  p.w_down)
    assert_close(y[rows], y_ref, jnp.bfloat16)
    assert_close(y[-64:], y_ref[-64:], jnp.bfloat16)


@pytest.mark.parametrize("shape", MODEL_SHAPES[1:], ids=lambda s: s[0])
def test_bitwise_reproducible(shape):
    _, E, k, d, f = shape
    p = Problem(9, 2048, d, f, E, k, dtype=jnp.bfloat16)
    router = (jax.random.normal(jax.random.key(1), (d, E)) / np.sqrt(d)).astype(jnp.bfloat16)
    run = jax.jit(lambda *a: jaxmoe.moe(*a, top_k=k, implementation="triton")[0])
    first = np.asarray(run(p.x, router, p.w_gate, p.w_up, p.w_down))
    second = np.asarray(run(p.x, router, p.w_gate, p.w_up, p.w_down))
    assert first.tobytes() == second.tobytes()


def test_auto_picks_triton_on_gpu():
    assert jaxmoe.resolve_implementation(None) == "triton"


# ------------------------------------------------------------------------------------------ backward


def _grads(fn, x, weights, ids, w_gate, w_up, w_down, g):
    def loss(x, w, wg, wu, wd, ids):
        return jnp.sum(fn(x, w, ids, wg, wu, wd).astype(jnp.float32) * g)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(x, weights, w_gate, w_up, w_down, ids)


def _assert_grads_close(got, want, dtype):
    for name, a, b in zip(("x", "weights", "w_gate", "w_up", "w_down"), got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        err = rel_err(a, b)
        print(f"d{name}: {err:.3g}")
        assert err <= TOLERANCE[jnp.dtype(dtype)], f"d{name}: normalised error {err:.3g}"


TRITON_FFN = functools.partial(jaxmoe.expert_ffn, implementation="triton")


@pytest.mark.parametrize("T", [16, 512, 2048])
@pytest.mark.parametrize("shape", MODEL_SHAPES, ids=lambda s: s[0])
def test_grads_model_shapes_bf16(shape, T):
    _, E, k, d, f = shape
    p = Problem(T + 1, T, d, f, E, k, dtype=jnp.bfloat16)
    g = jax.random.normal(jax.random.key(T), (T, d), jnp.float32)
    got = _grads(TRITON_FFN, *p.args, g)
    want = _grads(reference.grouped_expert_ffn, *p.args, g)
    _assert_grads_close(got, want, jnp.bfloat16)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.float32])
def test_grads_other_dtypes(dtype):
    _, E, k, d, f = MODEL_SHAPES[2]
    p = Problem(11, 300, d, f, E, k, dtype=dtype)
    g = jax.random.normal(jax.random.key(2), (300, d), jnp.float32)
    with jax.default_matmul_precision("highest"):
        got = _grads(TRITON_FFN, *p.args, g)
        want = _grads(reference.grouped_expert_ffn, *p.args, g)
    _assert_grads_close(got, want, dtype)


def test_grads_odd_shape_all_dtypes():
    for dtype in (jnp.float32, jnp.float16, jnp.bfloat16):
        p = Problem(12, 333, 200, 328, 7, 3, dtype=dtype)
        g = jax.random.normal(jax.random.key(3), (333, 200), jnp.float32)
        with jax.default_matmul_precision("highest"):
            _assert_grads_close(_grads(TRITON_FFN, *p.args, g), _grads(reference.grouped_expert_ffn, *p.args, g),
                                dtype)


def test_qwen3_8192_fwd_bwd_matches_reference_on_a_slice():
    """Qwen3-30B-A3B's expert shape at T = 8192: the jax.lax VJP alone asks for a 64 GiB buffer here.

    dx and the routing-weight gradient of a token depend on that token only, so the reference runs on
    a slice of tokens; the weight gradients are sums over tokens, so the reference adds them up over
    512-token chunks in float32 (with 2048-token chunks, a run beside other test workers on one H200
    failed a 32 GiB allocation).
    """
    _, E, k, d, f = MODEL_SHAPES[1]
    T = 8192
    p = Problem(13, T, d, f, E, k, dtype=jnp.bfloat16)
    g = jax.random.normal(jax.random.key(4), (T, d), jnp.float32)
    got = _grads(TRITON_FFN, *p.args, g)
    jax.block_until_ready(got)
    rows = np.r_[0:512, T - 512:T]
    sliced = (p.x[rows], p.weights[rows], p.ids[rows], p.w_gate, p.w_up, p.w_down)
    want_slice = _grads(reference.grouped_expert_ffn, *sliced, g[rows])
    assert_close(got[0][rows], want_slice[0], jnp.bfloat16)
    assert_close(got[1][rows], want_slice[1], jnp.bfloat16)
    sums = None
    for start in range(0, T, 512):
        chunk = slice(start, start + 512)
        part = _grads(reference.grouped_expert_ffn, p.x[chunk], p.weights[chunk], p.ids[chunk], p.w_gate,
                      p.w_up, p.w_down, g[chunk])[2:]
        part = [a.astype(jnp.float32) for a in part]
        sums = part if sums is None else [s + a for s, a in zip(sums, part)]
    for name, a, b in zip(("w_gate", "w_up", "w_down"), got[2:], sums):
        err = rel_err(a, b)
        print(f"d{name}: {err:.3g}")
        assert err <= TOLERANCE[jnp.dtype(jnp.bfloat16)], name


def test_training_step_t65536_matches_reference_in_chunks():
    """A whole training step of `moe` at T = 65536 (n = T * k = 524288 sorted rows): finite, and equal
    to the reference's. Routing and dX of a token depend on that token alone and the parameter
    gradients are sums over tokens, so the reference runs on 1024-token chunks (its VJP would not fit
    at once; a 2048-token chunk asked for 7.8 GiB) and its parameter gradients are added up in float32.
    """
    T, E, k, d, f, chunk = 65536, 64, 8, 2048, 768, 1024
    p = Problem(15, T, d, f, E, k, dtype=jnp.bfloat16)
    router = (jax.random.normal(jax.random.key(6), (d, E)) / np.sqrt(d)).astype(jnp.bfloat16)
    g = jax.random.normal(jax.random.key(7), (T, d), jnp.float32)

    def step(impl):
        def loss(x, rw, wg, wu, wd, g):
            y, _ = (reference.moe if impl == "xla" else functools.partial(jaxmoe.moe, implementation=impl))(
                x, rw, wg, wu, wd, top_k=k)
            return jnp.sum(y.astype(jnp.float32) * g)

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))

    loss, got = step("triton")(p.x, router, p.w_gate, p.w_up, p.w_down, g)
    assert np.isfinite(float(loss)) and all(bool(jnp.isfinite(a).all()) for a in got)
    ref_step = step("xla")
    ref_loss, dx_parts, sums = 0.0, [], None
    for start in range(0, T, chunk):
        rows = slice(start, start + chunk)
        part_loss, part = ref_step(p.x[rows], router, p.w_gate, p.w_up, p.w_down, g[rows])
        ref_loss += float(part_loss)
        dx_parts.append(part[0])
        params = [a.astype(jnp.float32) for a in part[1:]]
        sums = params if sums is None else [s + a for s, a in zip(sums, params)]
    assert abs(float(loss) - ref_loss) <= 1e-2 * abs(ref_loss)
    assert_close(got[0], jnp.concatenate(dx_parts), jnp.bfloat16)
    for name, a, b in zip(("router_weight", "w_gate", "w_up", "w_down"), got[1:], sums):
        err = rel_err(a, b)
        print(f"d{name}: {err:.3g}")
        assert err <= TOLERANCE[jnp.dtype(jnp.bfloat16)], name


@pytest.mark.parametrize("shape", MODEL_SHAPES[1:], ids=lambda s: s[0])
def test_grads_bitwise_reproducible(shape):
    _, E, k, d, f = shape
    p = Problem(14, 2048, d, f, E, k, dtype=jnp.bfloat16)
    router = (jax.random.normal(jax.random.key(1), (d, E)) / np.sqrt(d)).astype(jnp.bfloat16)
    g = jax.random.normal(jax.random.key(5), (2048, d), jnp.bfloat16)

    def loss(x, rw, wg, wu, wd):
        y, aux = jaxmoe.moe(x, rw, wg, wu, wd, top_k=k, implementation="triton")
        return jnp.sum(y.astype(jnp.float32) * g) + aux.load_balancing_loss

    step = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))
    first = step(p.x, router, p.w_gate, p.w_up, p.w_down)
    second = step(p.x, router, p.w_gate, p.w_up, p.w_down)
    for a, b in zip(first, second):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


TABLE_KEYS = sorted(json.loads(config.TABLE_PATH.read_text()))


@pytest.mark.parametrize("key", TABLE_KEYS)
def test_table_configs_match_reference(key):
    """Every table entry for this card, as this stack picks it (host_descriptors or not), forward and
    backward on an odd problem against the reference: the tuner checks candidates only against each
    other on its own inputs, so a tile shape that miscompiles on this compiler must fail here, not in a
    user's run."""
    entry_key = config.TableKey.parse(key)
    if entry_key.device != config.device_key(jax.devices()[0].device_kind):
        pytest.skip(f"an entry for {entry_key.device}")
    cfg = config._table(launch.host_descriptors_available())[entry_key]
    dtype = jnp.dtype(entry_key.dtype)
    p = Problem(15, 333, 264, 328, 5, 2, dtype=dtype)  # ~133 rows per expert: ragged 16- to 256-row tiles
    fn = functools.partial(ops.expert_ffn, mode="triton", config=cfg)
    assert_close(jax.jit(fn)(*p.args), jax.jit(reference.grouped_expert_ffn)(*p.args), dtype)
    g = jax.random.normal(jax.random.key(6), (p.T, p.d), jnp.float32)
    _assert_grads_close(_grads(fn, *p.args, g), _grads(reference.grouped_expert_ffn, *p.args, g), dtype)


def test_demo_trains_with_triton_like_xla():
    """The demo's loss curve with "triton" follows "xla" in full float32.

    At the default precision both take tf32 products, rounded differently (and XLA's pick of GEMM
    algorithm may change between processes); over 150 steps training amplifies that difference past any
    fixed bound (a mean gap of 0.043 in one H200 run, under 0.03 in others). In full float32 the two differ
    only by summation order, so the bound below tests the kernels, not the chaos of training.
    test_float32_default_precision_is_no_worse_than_xla covers tf32 itself."""
    from jaxmoe import demo

    args = ["--steps", "150", "--batch", "16", "--seed", "5"]
    with jax.default_matmul_precision("highest"):
        triton = demo.main([*args, "--implementation", "triton"])
        xla = demo.main([*args, "--implementation", "xla"])
    a, b = np.asarray(triton["losses"]), np.asarray(xla["losses"])
    print("triton", a[::15].round(3), "\nxla   ", b[::15].round(3))
    assert triton["final_loss"] < triton["initial_loss"] - 1.0
    assert abs(a[0] - b[0]) < 1e-3
    assert np.mean(np.abs(a - b)) < 0.03
    assert abs(triton["final_loss"] - xla["final_loss"]) < 0.03


# ------------------------------------------------------------------------------- several GPUs


def _sharded_value_and_grads(args, g, k, mesh, **axes):
    """(y, aux) and the gradients of <y, g> + the aux losses in x, router and the expert weights."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    def loss(x, rw, wg, wu, wd):
        y, aux = jaxmoe.moe(x, rw, wg, wu, wd, top_k=k, implementation="triton", mesh=mesh, **axes)
        return jnp.sum(y.astype(jnp.float32) * g) + aux.load_balancing_loss + aux.router_z_loss, (y, aux)

    if mesh is not None:
        token_axes = tuple(a for a in (axes.get("data_axis"), axes.get("expert_axis")) if a)
        experts = NamedSharding(mesh, P(axes.get("expert_axis")))
        args = jax.device_put(args, (NamedSharding(mesh, P(token_axes)), NamedSharding(mesh, P()), experts, experts,
                                     experts))
    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=range(5), has_aux=True))(*args)
    return out, grads


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("dp, ep", [(1, 2), (2, 1), (1, 4), (2, 2)])
def test_several_gpus_match_one(dp, ep, dtype):
    """Expert parallelism (degree ep) with data parallelism (degree dp) over dp * ep GPUs, with the
    Triton kernels on each: output, aux losses and every gradient equal one GPU's; and the sharded
    step is bitwise reproducible."""
    if jax.device_count() < dp * ep:
        pytest.skip(f"needs {dp * ep} GPUs")
    E, k, d, f, T = (8, 2, 256, 384, 512) if dtype == jnp.float32 else (64, 6, 2048, 1408, 4096)
    p = Problem(16, T, d, f, E, k, dtype=dtype)
    router = (jax.random.normal(jax.random.key(8), (d, E)) / np.sqrt(d)).astype(dtype)
    g = jax.random.normal(jax.random.key(9), (T, d), jnp.float32)
    args = (p.x, router, p.w_gate, p.w_up, p.w_down)
    mesh = jax.make_mesh((dp, ep), ("data", "expert"), devices=jax.devices()[:dp * ep])
    axes = dict(data_axis="data" if dp > 1 else None, expert_axis="expert" if ep > 1 else None)
    with jax.default_matmul_precision("highest"):
        (y, aux), grads = _sharded_value_and_grads(args, g, k, mesh, **axes)
        (y1, aux1), grads1 = _sharded_value_and_grads(args, g, k, None)
        (y_again, _), grads_again = _sharded_value_and_grads(args, g, k, mesh, **axes)
    assert_close(y, y1, dtype)
    np.testing.assert_array_equal(aux.expert_counts, aux1.expert_counts)
    assert_close(aux.load_balancing_loss, aux1.load_balancing_loss, jnp.float32)
    for name, a, b in zip(("x", "router_weight", "w_gate", "w_up", "w_down"), grads, grads1):
        err = rel_err(a, b)
        print(f"d{name}: {err:.3g}")
        assert err <= TOLERANCE[jnp.dtype(dtype)], f"d{name}: {err:.3g}"
    for a, b in zip((y, *grads), (y_again, *grads_again)):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
