"""Shared test helpers: problem generators, the dense oracle, one tolerance table, the GPU marker."""

from __future__ import annotations

import os

# 8 simulated CPU devices for the sharded tests (tests/test_sharding.py); it must be set before jax is
# first imported, and a device count the caller already chose wins.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

# JAXMOE_SPREAD_GPUS=N spreads pytest-xdist workers over N GPUs, one each (worker gwK takes GPU K mod N):
# the GPU tests mostly compile kernels, CPU work that several processes share out, while the tests'
# memory then splits over the cards (benchmarks/GPU.md).
if os.environ.get("JAXMOE_SPREAD_GPUS") and os.environ.get("PYTEST_XDIST_WORKER", "").startswith("gw"):
    worker = int(os.environ["PYTEST_XDIST_WORKER"][2:])
    os.environ["CUDA_VISIBLE_DEVICES"] = str(worker % int(os.environ["JAXMOE_SPREAD_GPUS"]))

# Workers that share one card each get an equal share of its memory, so that one worker's pool, grown by a
# large test, cannot starve the other's next allocation (with two workers on an H200, XLA's autotuner
# for one test failed to get 16 GiB while the other held the rest). A fraction the caller set wins.
elif os.environ.get("PYTEST_XDIST_WORKER_COUNT") and "XLA_PYTHON_CLIENT_MEM_FRACTION" not in os.environ:
    os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{0.9 / int(os.environ['PYTEST_XDIST_WORKER_COUNT']):.3f}"

import jax
import jax.numpy as jnp
import numpy as np
import pytest

# Normalised error ||out - ref|| / ||ref|| allowed per dtype. Never widen one to make a test pass.
TOLERANCE = {
    jnp.dtype(jnp.float32): 1e-5,
    jnp.dtype(jnp.float16): 5e-3,
    jnp.dtype(jnp.bfloat16): 1e-2,
}


def has_gpu() -> bool:
    try:
        return jax.default_backend() == "gpu"
    except Exception:
        return False


def pytest_addoption(parser):
    parser.addoption("--skip-impl", action="append", default=[], metavar="NAME",
                     help="deselect the tests parametrized with impl=NAME (repeatable)")


def pytest_collection_modifyitems(config, items):
    skipped = set(config.getoption("--skip-impl"))
    if skipped:
        def dropped(item):
            return getattr(item, "callspec", None) is not None and item.callspec.params.get("impl") in skipped

        deselected = [item for item in items if dropped(item)]
        if deselected:
            config.hook.pytest_deselected(items=deselected)
            items[:] = [item for item in items if not dropped(item)]
    if has_gpu():
        return
    skip = pytest.mark.skip(reason="needs a GPU (run on the GPU machine: pytest -m gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def rel_err(out, ref) -> float:
    """Normalised error in float64; NaN or inf anywhere gives inf, so it never passes."""
    out = np.asarray(jnp.asarray(out, jnp.float32), np.float64)
    ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    if not (np.isfinite(out).all() and np.isfinite(ref).all()):
        return float("inf")
    denom = np.linalg.norm(ref)
    return float(np.linalg.norm(out - ref) / denom) if denom > 0 else float(np.linalg.norm(out))


def assert_close(out, ref, dtype, tol=None):
    tol = TOLERANCE[jnp.dtype(dtype)] if tol is None else tol
    err = rel_err(out, ref)
    assert err <= tol, f"normalised error {err:.3g} > {tol:.3g}"


class Problem:
    """Random expert-FFN inputs; ids come from `id_pattern` so tests can force any load pattern."""

    def __init__(self, seed, T, d, f, E, k, dtype=jnp.float32, ids=None):
        keys = jax.random.split(jax.random.key(seed), 6)
        self.T, self.d, self.f, self.E, self.k, self.dtype = T, d, f, E, k, jnp.dtype(dtype)
        self.x = jax.random.normal(keys[0], (T, d), jnp.float32).astype(dtype)
        self.w_gate = (jax.random.normal(keys[1], (E, d, f)) / np.sqrt(d)).astype(dtype)
        self.w_up = (jax.random.normal(keys[2], (E, d, f)) / np.sqrt(d)).astype(dtype)
        self.w_down = (jax.random.normal(keys[3], (E, f, d)) / np.sqrt(f)).astype(dtype)
        if ids is None:  # k distinct experts per token, uniformly at random
            scores = jax.random.uniform(keys[4], (T, E))
            ids = jax.lax.top_k(scores, k)[1]
        self.ids = jnp.asarray(ids, jnp.int32).reshape(T, k)
        self.weights = jax.random.uniform(keys[5], (T, k), jnp.float32, 0.1, 1.0)

    @property
    def args(self):
        return self.x, self.weights, self.ids, self.w_gate, self.w_up, self.w_down


def dense_expert_ffn(x, weights, ids, w_gate, w_up, w_down):
    """The oracle: every token through every expert in float32 at HIGHEST precision, then masked."""
    E = w_gate.shape[0]
    hi = jax.lax.Precision.HIGHEST
    x, w_gate, w_up, w_down = (a.astype(jnp.float32) for a in (x, w_gate, w_up, w_down))
    gate = jnp.einsum("td,edf->tef", x, w_gate, precision=hi)
    up = jnp.einsum("td,edf->tef", x, w_up, precision=hi)
    out = jnp.einsum("tef,efd->ted", jax.nn.silu(gate) * up, w_down, precision=hi)
    mix = jnp.einsum("tk,tke->te", weights.astype(jnp.float32), jax.nn.one_hot(ids, E, dtype=jnp.float32))
    return jnp.einsum("ted,te->td", out, mix, precision=hi)


@pytest.fixture
def highest_precision():
    """fp32 checks at 1e-5 need true float32 matmuls in the reference (XLA may use tf32 by default)."""
    with jax.default_matmul_precision("highest"):
        yield
