"""One base that holds every implementation against the jax.lax reference, forward and backward.

"interpret" runs the Triton kernels, forward and backward, in Triton's interpreter on CPU; "triton"
runs them on the GPU. Each implementation declares its dtypes in jaxmoe.SUPPORTED_DTYPES.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmoe
from jaxmoe import launch, ops, reference
from jaxmoe.ops import ffn
from jaxmoe.config import GemmConfig, MoEConfig
from conftest import TOLERANCE, Problem, assert_close, rel_err

IMPLEMENTATIONS = ["xla", "interpret", pytest.param("triton", marks=pytest.mark.gpu)]
KERNEL_IMPLEMENTATIONS = ["interpret", pytest.param("triton", marks=pytest.mark.gpu)]

# Small tiles force several row blocks, N tiles and K steps (with a ragged last K step) on tiny shapes.
SMALL_TILES = MoEConfig(16, GemmConfig(block_n=32, block_k=32, group_m=2, num_warps=4, num_stages=2),
                        GemmConfig(block_n=16, block_k=32, group_m=3, num_warps=4, num_stages=2))

# Split-K down projection: partial-sum planes added by the combine.
SPLIT_K = MoEConfig(16, GemmConfig(block_n=32, block_k=32, group_m=8, num_warps=4, num_stages=2),
                    GemmConfig(block_n=32, block_k=16, group_m=1, num_warps=4, num_stages=2, split_k=3))

# Row tiles smaller than the dispatch's row blocks: each 32-row block runs as two 16-row tiles, the
# second dead when its expert has 16 rows or fewer in that block.
SPLIT_M = MoEConfig(32, GemmConfig(block_n=32, block_k=32, group_m=3, num_warps=4, num_stages=2, split_m=2),
                    GemmConfig(block_n=16, block_k=32, group_m=2, num_warps=4, num_stages=2, split_m=2))

# Weights (and the down projection's sorted rows) through TMA tensor descriptors; K tiles divide
# d = 64 and f = 96, as the descriptor path needs. float32 operands keep the pointer path.
TMA = MoEConfig(32, GemmConfig(block_n=32, block_k=32, group_m=3, num_warps=4, num_stages=2, tma=True),
                GemmConfig(block_n=64, block_k=32, group_m=2, num_warps=4, num_stages=2, tma=True))
POINTERS = MoEConfig(32, dataclasses.replace(TMA.gate_up, tma=False), dataclasses.replace(TMA.down, tma=False))
HOST_TMA = MoEConfig(32, dataclasses.replace(TMA.gate_up, host_tma=True), dataclasses.replace(TMA.down, host_tma=True))

SHAPES = [(37, 96, 200, 5, 2), (64, 32, 48, 1, 1), (19, 40, 24, 4, 4), (1, 16, 24, 6, 3), (0, 16, 24, 4, 2)]


def dtypes_for(impl):
    return [jnp.dtype(name) for name in jaxmoe.SUPPORTED_DTYPES[impl]]


def run(impl, p: Problem, config=None):
    if config is not None and impl != "xla":
        return jax.jit(lambda *a: ops.expert_ffn(*a, mode=impl, config=config))(*p.args)
    return jax.jit(lambda *a: jaxmoe.expert_ffn(*a, implementation=impl))(*p.args)


def reference_of(p: Problem):
    return jax.jit(reference.grouped_expert_ffn)(*p.args)


@pytest.fixture(autouse=True)
def _highest(request):
    if "default_precision" in request.keywords:
        yield
        return
    with jax.default_matmul_precision("highest"):
        yield


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}_d{}_f{}_E{}_k{}".format(*s))
def test_matches_reference(impl, shape):
    for dtype in dtypes_for(impl):
        p = Problem(hash(shape) % 1000, *shape, dtype=dtype)
        y = run(impl, p)
        assert y.shape == (p.T, p.d) and y.dtype == p.dtype
        assert_close(y, reference_of(p), dtype)


@pytest.mark.parametrize("impl", KERNEL_IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16])
def test_small_tiles_ragged_k(impl, dtype):
    p = Problem(20, 53, 72, 40, 3, 2, dtype=dtype)  # d=72: K tiles of 32 leave a ragged last step
    assert_close(run(impl, p, SMALL_TILES), reference_of(p), dtype)


@pytest.mark.parametrize("impl", KERNEL_IMPLEMENTATIONS)
def test_split_k_down_projection(impl):
    p = Problem(27, 29, 40, 72, 4, 2)  # f=72 over 3 slices of 32: the last slice is partial, the middle full
    assert_close(run(impl, p, SPLIT_K), reference_of(p), jnp.float32)


@pytest.mark.parametrize("impl", KERNEL_IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_split_m_row_tiles(impl, dtype):
    p = Problem(28, 53, 72, 40, 3, 2, dtype=dtype)  # ~35 rows per expert: live and dead second tiles
    assert_close(run(impl, p, SPLIT_M), reference_of(p), dtype)


@pytest.mark.parametrize("impl", KERNEL_IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_tma_descriptors_match_pointer_loads(impl, dtype):
    """~45 rows per expert in 32-row blocks: the down projection's A tiles read past their expert's rows
    into the next expert's (and past the last row). Bitwise equal to the pointer path: same tiles, same
    products, same order."""
    p = Problem(31, 90, 64, 96, 4, 2, dtype=dtype)
    y = run(impl, p, TMA)
    assert_close(y, reference_of(p), dtype)
    assert np.asarray(y).tobytes() == np.asarray(run(impl, p, POINTERS)).tobytes()
    assert_grads_close(grads(impl, p, TMA), grads("reference", p), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_host_built_tma_descriptors_match_pointer_loads(dtype):
    """The descriptors of test_tma_descriptors_match_pointer_loads built on the host (jax-triton 0.4 with
    jaxlib 0.12): the same bits as the pointer path, and the gradients of the reference."""
    if not launch.host_descriptors_available():
        pytest.skip("host-built descriptors need jax-triton 0.4 with jaxlib 0.12")
    p = Problem(31, 90, 64, 96, 4, 2, dtype=dtype)
    y = run("triton", p, HOST_TMA)
    assert_close(y, reference_of(p), dtype)
    assert np.asarray(y).tobytes() == np.asarray(run("triton", p, POINTERS)).tobytes()
    assert_grads_close(grads("triton", p, HOST_TMA), grads("reference", p), dtype)


@pytest.mark.parametrize("impl", KERNEL_IMPLEMENTATIONS)
@pytest.mark.parametrize("case", ["nan_in_x", "inf_in_w_down"])
def test_tma_nonfinite_stays_in_its_rows(impl, case):
    """A tile of one expert's rows also reads the next expert's rows through its descriptor: a NaN or
    Inf there must still reach only the outputs that touch it."""
    p = Problem(44, 23, 64, 96, 4, 2, dtype=jnp.bfloat16)
    value = jnp.array(jnp.nan if case == "nan_in_x" else -jnp.inf, p.dtype)  # set in the array's own dtype
    if case == "nan_in_x":
        p.x = p.x.at[3, 1].set(value)
    else:
        p.w_down = p.w_down.at[0, 6, 2].set(value)
    y, y_ref = run(impl, p, TMA), reference_of(p)
    assert _nonfinite_rows(y_ref).any()
    np.testing.assert_array_equal(_nonfinite_rows(y), _nonfinite_rows(y_ref))
    finite = ~_nonfinite_rows(y_ref)
    assert rel_err(np.asarray(y.astype(jnp.float32))[finite], np.asarray(y_ref.astype(jnp.float32))[finite]) \
        <= TOLERANCE[jnp.dtype(jnp.bfloat16)]


UNSPLIT = dataclasses.replace(SPLIT_K, down=dataclasses.replace(SPLIT_K.down, split_k=1))


def _bf16_ulp(a) -> np.ndarray:
    return np.spacing(np.abs(np.asarray(a, np.float32))) * 2.0**16  # float32 spacing has 16 more bits


@pytest.mark.parametrize("impl", KERNEL_IMPLEMENTATIONS)
def test_one_rounding_whatever_the_down_config(impl):
    """README, Numerics: a token's k weighted rows (and split-K's partial sums) add in float32 and round
    once to the output dtype. So each bfloat16 output is its exact sum, computed from the kernels' own h
    rows, rounded once (within half an ulp, plus float32's error over the f + k * splits additions), and
    the split-K and unsplit down projections differ by at most one ulp, where their float32 sums
    straddle a rounding boundary. Rows rounded to bfloat16 before the sum miss both by many ulps."""
    p = Problem(35, 40, 48, 72, 6, 4, dtype=jnp.bfloat16)
    outputs = []
    for cfg in (UNSPLIT, SPLIT_K):
        options = ffn._FFNOptions(impl, cfg, ops.dot_precision(p.dtype, impl))
        y, disp, (hgu, _) = jax.jit(lambda *a: ffn._ffn_forward(*a, jnp.int32(0), options, keep=True))(*p.args)
        # The exact sum, in float64, of w_a * h_r @ W_down[e] over each token's sorted rows r.
        assignments = np.asarray(disp.sorted_assignments)
        h = np.asarray(hgu[:, :p.f].astype(jnp.float32), np.float64)
        w = np.asarray(p.weights, np.float64).reshape(-1)[assignments, None]
        w_down = np.asarray(p.w_down.astype(jnp.float32), np.float64)[np.asarray(p.ids).reshape(-1)[assignments]]
        exact, magnitude = np.zeros((p.T, p.d)), np.zeros((p.T, p.d))
        np.add.at(exact, assignments // p.k, w * np.einsum("rf,rfd->rd", h, w_down))
        np.add.at(magnitude, assignments // p.k, np.abs(w) * np.einsum("rf,rfd->rd", np.abs(h), np.abs(w_down)))
        y = np.asarray(y.astype(jnp.float32))
        float32_error = (p.f + p.k * cfg.down.split_k + 2) * 2.0**-24 * magnitude
        assert np.all(np.abs(y - exact) <= 0.5 * _bf16_ulp(y) + float32_error), cfg.down
        outputs.append(y)
    unsplit, split = outputs
    assert np.all(np.abs(unsplit - split) <= np.maximum(_bf16_ulp(unsplit), _bf16_ulp(split)))


@pytest.mark.parametrize("impl", KERNEL_IMPLEMENTATIONS)
def test_every_empty_expert_pattern_for_four_experts(impl):
    """For each non-empty set of live experts among 4, route every token only to live experts."""
    E, T = 4, 21
    rng = np.random.default_rng(0)
    for live in itertools.chain.from_iterable(itertools.combinations(range(E), n) for n in range(1, E + 1)):
        k = min(2, len(live))
        ids = np.stack([rng.choice(live, size=k, replace=False) for _ in range(T)])
        p = Problem(len(live), T, 24, 40, E, k, ids=ids)
        y = run(impl, p, SMALL_TILES)
        assert_close(y, reference_of(p), jnp.float32)


@pytest.mark.parametrize("impl", KERNEL_IMPLEMENTATIONS)
def test_all_tokens_on_one_expert(impl):
    T = 70  # 70 rows on one expert: five 16-row blocks, the last one partly padding
    p = Problem(21, T, 24, 40, 6, 1, ids=np.full((T, 1), 4))
    assert_close(run(impl, p, SMALL_TILES), reference_of(p), jnp.float32)


@pytest.mark.parametrize("impl", KERNEL_IMPLEMENTATIONS)
def test_out_of_range_ids_under_jit_contribute_zero(impl):
    p = Problem(22, 9, 16, 24, 4, 2)
    p.ids = p.ids.at[0, 1].set(7).at[3, 0].set(-1)
    assert_close(run(impl, p), reference_of(p), jnp.float32)


@pytest.mark.parametrize("impl", KERNEL_IMPLEMENTATIONS)
@pytest.mark.parametrize("config", [None, SPLIT_K, SPLIT_M], ids=["table", "split_k", "split_m"])
def test_bitwise_deterministic(impl, config):
    for dtype in (jnp.float32, jnp.bfloat16):
        p = Problem(23, 45, 32, 48, 4, 2, dtype=dtype)
        a, b = np.asarray(run(impl, p, config)), np.asarray(run(impl, p, config))
        assert a.tobytes() == b.tobytes()


def grads(impl, p: Problem, config=None):
    """Gradients of <y, g> (g a fixed random cotangent) in x, the routing weights and the three expert weights."""
    if impl == "reference":
        fn = reference.grouped_expert_ffn
    elif config is not None:
        fn = functools.partial(ops.expert_ffn, mode=impl, config=config)
    else:
        fn = functools.partial(jaxmoe.expert_ffn, implementation=impl)
    g = jax.random.normal(jax.random.key(p.T + 7), (p.T, p.d), jnp.float32)

    def loss(x, w, wg, wu, wd, ids):  # ids traced, as under a user's jit: no eager range check
        return jnp.sum(fn(x, w, ids, wg, wu, wd).astype(jnp.float32) * g)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(p.x, p.weights, p.w_gate, p.w_up, p.w_down, p.ids)


GRAD_NAMES = ("x", "weights", "w_gate", "w_up", "w_down")


def assert_grads_close(got, want, dtype):
    for name, a, b in zip(GRAD_NAMES, got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, (name, a.shape, b.shape, a.dtype, b.dtype)
        err = rel_err(a, b)
        assert err <= TOLERANCE[jnp.dtype(dtype)], f"d{name}: normalised error {err:.3g}"


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}_d{}_f{}_E{}_k{}".format(*s))
def test_grads_match_reference(impl, shape):
    """Odd dims, E = 1, k = E, T = 1 and T = 0, in every dtype the implementation supports."""
    for dtype in dtypes_for(impl):
        p = Problem(hash(shape) % 1000 + 1, *shape, dtype=dtype)
        assert_grads_close(grads(impl, p), grads("reference", p), dtype)


@pytest.mark.parametrize("impl", KERNEL_IMPLEMENTATIONS)
@pytest.mark.parametrize("config", [SMALL_TILES, SPLIT_K, SPLIT_M], ids=["small_tiles", "split_k", "split_m"])
def test_grads_small_tiles_ragged_k(impl, config):
    """Several row blocks, N tiles and routing-weight planes; ragged last K steps in every GEMM."""
    for dtype in (jnp.float32, jnp.bfloat16):
        p = Problem(30, 53, 72, 40, 3, 2, dtype=dtype)
        assert_grads_close(grads(impl, p, config), grads("reference", p), dtype)


@pytest.mark.parametrize("impl", KERNEL_IMPLEMENTATIONS)
def test_grads_empty_experts_and_one_expert(impl):
    """Experts with no rows get exact zero weight gradients; all tokens on one expert."""
    E, T = 5, 37
    rng = np.random.default_rng(1)
    ids = np.stack([rng.choice([0, 3], size=2, replace=False) for _ in range(T)])
    for ids in (ids, np.full((T, 1), 2)):
        p = Problem(31, T, 24, 40, E, ids.shape[1], ids=ids)
        got, want = grads(impl, p, SMALL_TILES), grads("reference", p)
        assert_grads_close(got, want, jnp.float32)
        unused = np.setdiff1d(np.arange(E), np.unique(ids))
        for g in got[2:]:
            assert np.all(np.asarray(g)[unused] == 0)


@pytest.mark.parametrize("impl", KERNEL_IMPLEMENTATIONS)
def test_grads_out_of_range_ids_under_jit(impl):
    p = Problem(32, 9, 16, 24, 4, 2)
    p.ids = p.ids.at[0, 1].set(7).at[3, 0].set(-1)
    got = grads(impl, p)
    assert_grads_close(got, grads("reference", p), jnp.float32)
    assert got[1][0, 1] == 0 and got[1][3, 0] == 0


@pytest.mark.parametrize("impl", KERNEL_IMPLEMENTATIONS)
def test_grads_bitwise_deterministic(impl):
    p = Problem(33, 45, 32, 48, 4, 2, dtype=jnp.bfloat16)
    first, second = grads(impl, p, SPLIT_K), grads(impl, p, SPLIT_K)
    for a, b in zip(first, second):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("scoring, renormalize, with_bias", [("softmax", True, False), ("sigmoid", False, True)])
def test_moe_grads_match_reference(impl, scoring, renormalize, with_bias):
    """Through `moe`: x, the router weight (through routing and the aux losses) and the expert weights."""
    p = Problem(34, 30, 32, 48, 6, 2)
    router = jax.random.normal(jax.random.key(6), (p.d, p.E)) / np.sqrt(p.d)
    bias = jnp.linspace(-0.1, 0.1, p.E) if with_bias else None
    g = jax.random.normal(jax.random.key(7), (5, 6, p.d))

    def loss(moe_fn):
        def inner(x, rw, wg, wu, wd):
            y, aux = moe_fn(x, rw, wg, wu, wd, top_k=2, scoring=scoring, renormalize=renormalize, selection_bias=bias)
            return jnp.sum(y * g) + aux.load_balancing_loss + 0.1 * aux.router_z_loss
        return jax.jit(jax.grad(inner, argnums=(0, 1, 2, 3, 4)))

    args = (p.x.reshape(5, 6, p.d), router, p.w_gate, p.w_up, p.w_down)
    got = loss(functools.partial(jaxmoe.moe, implementation=impl))(*args)
    want = loss(reference.moe)(*args)
    for name, a, b in zip(("x", "router_weight", "w_gate", "w_up", "w_down"), got, want):
        assert rel_err(a, b) <= 1e-5, name


@pytest.mark.parametrize("impl", KERNEL_IMPLEMENTATIONS)
@pytest.mark.parametrize("scoring, renormalize, with_bias", [
    ("softmax", True, False), ("softmax", False, True), ("sigmoid", True, True), ("sigmoid", False, False)])
def test_routing_kernel_matches_route(impl, scoring, renormalize, with_bias):
    T, E, k = 45, 12, 3
    logits = jax.random.normal(jax.random.key(3), (T, E)) * 2
    bias = jnp.linspace(-0.2, 0.2, E) if with_bias else None
    got = ops.route(logits, k, scoring=scoring, renormalize=renormalize, selection_bias=bias, mode=impl)
    want = jaxmoe.route(logits, k, scoring=scoring, renormalize=renormalize, selection_bias=bias)
    np.testing.assert_array_equal(got.ids, want.ids)
    np.testing.assert_allclose(got.weights, want.weights, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got.probs, want.probs, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("impl", KERNEL_IMPLEMENTATIONS)
def test_routing_kernel_ties_and_grad(impl):
    logits = jnp.array([[1.0, 3.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0, 2.0]])
    np.testing.assert_array_equal(ops.route(logits, 2, mode=impl).ids, [[1, 2], [0, 1]])
    logits = jax.random.normal(jax.random.key(4), (9, 6))

    def loss(route_fn):
        def inner(lg):
            r = route_fn(lg, 2)
            return jnp.sum(r.weights * jnp.arange(1.0, 3.0)) + jnp.sum(r.probs ** 2)
        return inner

    got = jax.grad(loss(lambda lg, k: ops.route(lg, k, mode=impl)))(logits)
    want = jax.grad(loss(jaxmoe.route))(logits)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("impl", KERNEL_IMPLEMENTATIONS)
def test_routing_kernel_edge_scores(impl):
    """Many experts over several programs; experts whose biased score is -inf still rank above the ones
    already picked, so k = E - 1 picks distinct ids as jax.lax.top_k does; a NaN score ranks first."""
    logits = jax.random.normal(jax.random.key(6), (37, 128)) * 3
    for scoring in ("softmax", "sigmoid"):
        got, want = ops.route(logits, 8, scoring=scoring, mode=impl), jaxmoe.route(logits, 8, scoring=scoring)
        np.testing.assert_array_equal(got.ids, want.ids)
        np.testing.assert_allclose(got.weights, want.weights, rtol=1e-6, atol=1e-7)
    logits = jnp.array([[0.5, 1.5, 2.0, -1.0, 0.0], [1.0, 2.0, 3.0, 4.0, 5.0]])
    bias = jnp.array([0.0, -jnp.inf, -jnp.inf, 0.0, 0.0])
    for scoring in ("softmax", "sigmoid"):
        got = ops.route(logits, 4, scoring=scoring, selection_bias=bias, mode=impl)
        want = jaxmoe.route(logits, 4, scoring=scoring, selection_bias=bias)
        np.testing.assert_array_equal(got.ids, want.ids)  # [0, 3, 4, 1] and [4, 3, 0, 1]
        np.testing.assert_allclose(got.weights, want.weights, rtol=1e-6, atol=1e-7)
    # A NaN score ranks first (in jaxmoe.route too, whatever jax.lax.top_k does with NaN on this backend).
    nan_logits = logits.at[0, 3].set(jnp.nan)
    nan_row = ops.route(nan_logits, 2, scoring="sigmoid", mode=impl)
    np.testing.assert_array_equal(nan_row.ids, [[3, 2], [4, 3]])
    np.testing.assert_array_equal(jaxmoe.route(nan_logits, 2, scoring="sigmoid").ids, [[3, 2], [4, 3]])
    assert np.isnan(np.asarray(nan_row.weights)[0]).all() and np.isfinite(np.asarray(nan_row.weights)[1]).all()


def _assert_stats_match(got, want):
    np.testing.assert_array_equal(got.expert_counts, want.expert_counts)
    np.testing.assert_allclose(got.prob_sums, want.prob_sums, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.z_squared_sum, want.z_squared_sum, rtol=1e-5)
    assert int(got.tokens) == int(want.tokens)


@pytest.mark.parametrize("impl", KERNEL_IMPLEMENTATIONS)
@pytest.mark.parametrize("T, E, k, scoring, with_bias", [
    (70, 12, 3, "softmax", False),  # 3 programs of 32 rows, the last part padding
    (37, 128, 8, "sigmoid", True),  # 10 programs of 4 rows
    (5, 1, 1, "softmax", False),  # E = 1: every token on expert 0, prob 1, logsumexp = the logit
    (6, 4, 4, "softmax", False),  # k = E
])
def test_routing_kernel_stats_match_reference(impl, T, E, k, scoring, with_bias):
    """The aux losses' sums over tokens from the routing kernel (partial sums per program, added in
    program order) equal jax.lax's over the same routing, and their gradients flow to the logits."""
    logits = jax.random.normal(jax.random.key(T), (T, E)) * 3
    bias = jnp.linspace(-0.2, 0.2, E) if with_bias else None
    kw = dict(scoring=scoring, selection_bias=bias)
    routing, stats = ops.route_with_stats(logits, k, mode=impl, **kw)
    want_routing, want_stats = jaxmoe.reference.route_with_stats(logits, k, **kw)
    np.testing.assert_array_equal(routing.ids, want_routing.ids)
    _assert_stats_match(stats, want_stats)

    def loss(fn):
        def inner(lg):
            r, s = fn(lg)
            return (jnp.sum(r.weights * jnp.arange(1.0, k + 1.0)) + jnp.sum(s.prob_sums * jnp.arange(E))
                    + 0.1 * s.z_squared_sum)
        return inner

    got = jax.grad(loss(lambda lg: ops.route_with_stats(lg, k, mode=impl, **kw)))(logits)
    want = jax.grad(loss(lambda lg: jaxmoe.reference.route_with_stats(lg, k, **kw)))(logits)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def _assert_aux_match(got, want):
    np.testing.assert_array_equal(got.expert_counts, want.expert_counts)
    for name in ("load_balancing_loss", "router_z_loss"):
        a, b = np.asarray(getattr(got, name)), np.asarray(getattr(want, name))
        assert np.array_equal(a, b, equal_nan=True) or np.isclose(a, b, rtol=1e-5), (name, a, b)


@pytest.mark.parametrize("impl", KERNEL_IMPLEMENTATIONS)
@pytest.mark.parametrize("T, E, k, scoring, with_bias", [
    (16, 128, 8, "softmax", False),  # a Qwen3 decode step: 4 programs, the losses from the kernel
    (37, 128, 8, "sigmoid", True),  # 10 programs, the last part padding
    (128, 128, 2, "softmax", False),  # FINALIZE_MAX_PROGRAMS programs: still the kernel
    (129, 128, 2, "softmax", True),  # one program more: XLA adds the sums and applies the formulas
    (70, 12, 3, "softmax", False),  # 3 programs of 32 rows
    (5, 1, 1, "softmax", False),  # E = 1
    (6, 4, 4, "sigmoid", False),  # k = E
])
def test_routing_kernel_aux_matches_reference(impl, T, E, k, scoring, with_bias):
    """route_with_aux: the aux losses equal jax.lax's formulas over the same routing, whether the last
    program of the routing kernel applied them (few programs) or XLA did, and so do their gradients."""
    logits = jax.random.normal(jax.random.key(T + E), (T, E)) * 3
    bias = jnp.linspace(-0.2, 0.2, E) if with_bias else None
    kw = dict(scoring=scoring, selection_bias=bias)
    in_kernel = -(-T // ops.routing._tokens_per_program(E)) <= ops.routing.FINALIZE_MAX_PROGRAMS
    jaxpr = str(jax.make_jaxpr(lambda lg: ops.route_with_aux(lg, k, mode=impl, **kw))(logits))
    assert ("reduce_sum" not in jaxpr) == in_kernel, "the losses come from the kernel exactly when it has few programs"
    routing, aux = jax.jit(lambda lg: ops.route_with_aux(lg, k, mode=impl, **kw))(logits)
    want_routing, want_aux = jaxmoe.reference.route_with_aux(logits, k, **kw)
    np.testing.assert_array_equal(routing.ids, want_routing.ids)
    np.testing.assert_allclose(routing.weights, want_routing.weights, rtol=1e-6)
    _assert_aux_match(aux, want_aux)

    def loss(fn):
        def inner(lg):
            r, a = fn(lg)
            return jnp.sum(r.weights * jnp.arange(1.0, k + 1.0)) + 3.0 * a.load_balancing_loss + 0.1 * a.router_z_loss
        return inner

    got = jax.grad(loss(lambda lg: ops.route_with_aux(lg, k, mode=impl, **kw)))(logits)
    want = jax.grad(loss(lambda lg: jaxmoe.reference.route_with_aux(lg, k, **kw)))(logits)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", KERNEL_IMPLEMENTATIONS)
def test_routing_kernel_stats_nonfinite_and_empty(impl):
    """A NaN logit makes its row's logsumexp NaN, so z_squared_sum and (softmax) every prob sum are NaN,
    as in jax.lax; a row of -inf logits has logsumexp -inf (z^2 = inf); +inf gives +inf. The losses
    the kernel applies the formulas to follow. T = 0: zeros."""
    E = 6
    base = jax.random.normal(jax.random.key(11), (9, E))
    cases = {"nan": base.at[4, 2].set(jnp.nan), "neg_inf_row": base.at[3].set(-jnp.inf),
             "pos_inf": base.at[7, 0].set(jnp.inf)}
    for name, logits in cases.items():
        for scoring in ("softmax", "sigmoid"):
            _, stats = ops.route_with_stats(logits, 2, scoring=scoring, mode=impl)
            _, want = jaxmoe.reference.route_with_stats(logits, 2, scoring=scoring)
            np.testing.assert_array_equal(np.isnan(stats.prob_sums), np.isnan(want.prob_sums), err_msg=name)
            assert np.array_equal(np.asarray(stats.z_squared_sum), np.asarray(want.z_squared_sum), equal_nan=True) \
                or np.isclose(stats.z_squared_sum, want.z_squared_sum, rtol=1e-5), (name, scoring)
            assert not np.isfinite(want.z_squared_sum), (name, "the case must reach the z loss")
            _, aux = ops.route_with_aux(logits, 2, scoring=scoring, mode=impl)  # the losses from the kernel
            _assert_aux_match(aux, jaxmoe.reference.route_with_aux(logits, 2, scoring=scoring)[1])
    _, stats = ops.route_with_stats(jnp.zeros((0, E)), 2, mode=impl)
    _assert_stats_match(stats, jaxmoe.reference.route_with_stats(jnp.zeros((0, E)), 2)[1])
    _, aux = ops.route_with_aux(jnp.zeros((0, E)), 2, mode=impl)
    _assert_aux_match(aux, jaxmoe.reference.route_with_aux(jnp.zeros((0, E)), 2)[1])


@pytest.mark.parametrize("impl", KERNEL_IMPLEMENTATIONS)
def test_moe_end_to_end(impl):
    p = Problem(25, 30, 32, 48, 6, 2)
    router = jax.random.normal(jax.random.key(5), (p.d, p.E))
    x3 = p.x.reshape(5, 6, p.d)
    y, aux = jax.jit(lambda x: jaxmoe.moe(x, router, p.w_gate, p.w_up, p.w_down, top_k=2, implementation=impl))(x3)
    y_ref, aux_ref = jaxmoe.reference.moe(x3, router, p.w_gate, p.w_up, p.w_down, top_k=2)
    assert_close(y, y_ref, jnp.float32)
    np.testing.assert_array_equal(aux.expert_counts, aux_ref.expert_counts)
    np.testing.assert_allclose(aux.load_balancing_loss, aux_ref.load_balancing_loss, rtol=1e-5)


@pytest.mark.default_precision
@pytest.mark.parametrize("impl", KERNEL_IMPLEMENTATIONS)
def test_float32_follows_default_matmul_precision(impl):
    """At "highest" float32 runs exactly; at JAX's default it may use (rounded) tf32 operands, as XLA does."""
    p = Problem(28, 40, 64, 96, 4, 2)
    with jax.default_matmul_precision("highest"):
        exact = reference_of(p)
        assert rel_err(run(impl, p), exact) <= 1e-5
    with jax.default_matmul_precision("default"):
        assert rel_err(run(impl, p), exact) <= 2e-3


def test_interpreted_launches_raise_no_numpy_warnings():
    """Triton's interpreter computes in numpy, which warns where a GPU just computes: log(0) of the
    routing kernel's masked-off rows (12 tokens fill part of a block), Inf - Inf and 0 * Inf of an Inf
    input, a max over a NaN token's logits. The launches keep those warnings to themselves."""
    p = Problem(41, 12, 16, 24, 4, 2)
    router = jax.random.normal(jax.random.key(8), (p.d, p.E))
    w_gate = p.w_gate.at[1, 3, 5].set(jnp.inf)
    x = p.x.at[5, 2].set(jnp.nan)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        jax.block_until_ready(jax.jit(lambda x: jaxmoe.moe(x, router, w_gate, p.w_up, p.w_down, top_k=2,
                                                           implementation="interpret"))(x))
    assert not [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


@pytest.mark.default_precision
def test_interpret_on_a_cpu_is_exact_float32_like_xla():
    """XLA's CPU dots are exact float32 at every precision setting, so at JAX's default "interpret" on a
    CPU takes no tf32 operands either: it matches "xla" there, forward and gradients, to float32's
    rounding (tf32 operands were 5e-4 apart)."""
    if jax.default_backend() != "cpu":
        pytest.skip("XLA's CPU precision")
    p = Problem(28, 16, 64, 48, 4, 2)
    assert rel_err(run("interpret", p), run("xla", p)) <= 1e-6
    for name, a, b in zip(GRAD_NAMES, grads("interpret", p), grads("xla", p)):
        assert rel_err(a, b) <= 1e-6, name


def _nonfinite_rows(a, axis=-1):
    a = np.asarray(jnp.asarray(a, jnp.float32))
    return ~np.isfinite(a).reshape(a.shape[0], -1).all(axis=1)


GPU_NAN = np.array(0x7FFFFFFF, np.uint32).view(np.float32)  # the NaN bit pattern NVIDIA GPUs produce

NONFINITE_CASES = {
    "nan_in_x": lambda p: p.x.at[3, 5].set(GPU_NAN),
    "inf_in_x": lambda p: p.x.at[4, 0].set(jnp.inf),
    "nan_in_routing_weight": lambda p: p.weights.at[2, 1].set(jnp.nan),
    "inf_in_w_gate": lambda p: p.w_gate.at[1, 3, 5].set(jnp.inf),
    "nan_in_w_up": lambda p: p.w_up.at[2, 0, 7].set(jnp.nan),
    "inf_in_w_down": lambda p: p.w_down.at[0, 6, 2].set(-jnp.inf),
}
_FIELD = {"nan_in_x": "x", "inf_in_x": "x", "nan_in_routing_weight": "weights", "inf_in_w_gate": "w_gate",
          "nan_in_w_up": "w_up", "inf_in_w_down": "w_down"}


@pytest.mark.default_precision
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("case, precision", [(case, "highest") for case in NONFINITE_CASES]
                         + [("nan_in_x", "default"), ("nan_in_w_up", "default")])
def test_nonfinite_inputs_reach_exactly_the_rows_they_touch(impl, precision, case):
    """NaN and Inf propagate as the math says, forward and backward: the non-finite rows of y, of every
    gradient's rows, and of every expert's weight gradient are those of the reference, and every finite
    value still matches it. (At the default precision float32 may run on rounded tf32 operands.)"""
    p = Problem(40, 11, 16, 24, 4, 2)
    setattr(p, _FIELD[case], NONFINITE_CASES[case](p))
    tol = 1e-5 if precision == "highest" else 2e-3
    with jax.default_matmul_precision(precision):
        y, y_ref = run(impl, p), reference_of(p)
        got, want = grads(impl, p), grads("reference", p)
    assert _nonfinite_rows(y_ref).any()
    for name, a, b in [("y", y, y_ref), *zip(GRAD_NAMES, got, want)]:
        np.testing.assert_array_equal(_nonfinite_rows(a), _nonfinite_rows(b), err_msg=name)
        finite = ~_nonfinite_rows(b)
        if finite.any():
            assert rel_err(np.asarray(a)[finite], np.asarray(b)[finite]) <= tol, name


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_nan_in_x_through_moe_stays_in_its_token(impl):
    """A NaN in one token's x makes its router logits NaN; it must reach that token's output, not vanish."""
    p = Problem(41, 12, 16, 24, 4, 2)
    router = jax.random.normal(jax.random.key(8), (p.d, p.E))
    x = p.x.at[5, 2].set(jnp.nan)
    with jax.default_matmul_precision("highest"):
        y, _ = jax.jit(lambda x: jaxmoe.moe(x, router, p.w_gate, p.w_up, p.w_down, top_k=2,
                                            implementation=impl))(x)
        y_ref, _ = jaxmoe.reference.moe(x, router, p.w_gate, p.w_up, p.w_down, top_k=2)
    np.testing.assert_array_equal(_nonfinite_rows(y), _nonfinite_rows(y_ref))
    assert _nonfinite_rows(y)[5] and _nonfinite_rows(y).sum() == 1


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_training_step_edge_cases(impl):
    """A training step through `moe` where one layer gets no tokens, and one where every token picks
    the same expert (a large selection bias): finite, and equal to the reference's."""
    p = Problem(42, 24, 16, 24, 4, 2)
    router = jax.random.normal(jax.random.key(9), (p.d, p.E)) / np.sqrt(p.d)

    def step(moe_fn, x, bias):
        def loss(x, rw, wg, wu, wd):
            y, aux = moe_fn(x, rw, wg, wu, wd, top_k=2, selection_bias=bias)
            return jnp.sum(jnp.tanh(y)) + aux.load_balancing_loss + aux.router_z_loss
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))(x, router, p.w_gate, p.w_up, p.w_down)

    one_expert = jnp.array([0.0, 0.0, 10.0, 0.0])  # top-2 is then expert 2 and another, for every token
    for x, bias in ((p.x[:0], None), (p.x, one_expert)):
        got = step(functools.partial(jaxmoe.moe, implementation=impl), x, bias)
        want = step(reference.moe, x, bias)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            assert np.isfinite(np.asarray(a)).all()
            assert rel_err(a, b) <= 1e-5
