"""Compile once per model: a new token count T reuses the kernels compiled for another T of the same buckets.

T reaches the kernels as runtime int arguments. What is compiled in and still follows T comes from two
buckets: the config (config.rows_bucket, average rows per expert, picks the table entry or heuristic)
and the dispatch's tile sizes (ops.dispatch_bucket, a power of two of T*k). Launches are recorded
(launch mode "record"): what each would compile, without compiling or running anything.
"""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import pytest

from jaxmoe import config, launch, ops
from jaxmoe.config import GemmConfig, MoEConfig

D, F, E = 64, 96, 8

# (T1, T2, k, rows bucket, dispatch bucket, whether dispatch sorts in one chunk)
PAIRS = [(1000, 1100, 3, 512, 4096, False), (100, 120, 2, 32, 256, True)]

# A split-K down projection (and dX): its partial-sum planes are n = T*k rows apart.
SPLIT = MoEConfig(16, GemmConfig(32, 32), GemmConfig(32, 16, split_k=3), dx=GemmConfig(32, 32, split_k=2))
CONFIGS = {"table": None, "split_k": SPLIT}


def compile_keys(T: int, k: int, cfg: MoEConfig | None, dtype=jnp.bfloat16) -> list[str]:
    """Compile keys of routing, the forward and value_and_grad of the expert FFN, in launch order."""
    ffn = functools.partial(ops.expert_ffn, mode="record", config=cfg)

    def step(logits, x, w_gate, w_up, w_down):
        routing = ops.route(logits, k, mode="record")

        def loss(x, weights, w_gate, w_up, w_down):
            return jnp.sum(ffn(x, weights, routing.ids, w_gate, w_up, w_down).astype(jnp.float32))

        y = ffn(x, routing.weights, routing.ids, w_gate, w_up, w_down)
        return y, jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4))(x, routing.weights, w_gate, w_up, w_down)

    args = [jax.ShapeDtypeStruct(s, t) for s, t in [((T, E), jnp.float32), ((T, D), dtype), ((E, D, F), dtype),
                                                     ((E, D, F), dtype), ((E, F, D), dtype)]]
    with launch.recording() as records:
        jax.eval_shape(step, *args)
    return [record.compile_key for record in records]


@pytest.mark.parametrize("cfg", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("T1, T2, k, rows_bucket, dispatch_bucket, single_chunk", PAIRS,
                         ids=["multi_chunk", "single_chunk"])
def test_same_buckets_same_compile_keys(T1, T2, k, rows_bucket, dispatch_bucket, single_chunk, cfg):
    for T in (T1, T2):
        assert config.rows_bucket(T, k, E) == rows_bucket
        assert ops.dispatch_bucket(T * k) == dispatch_bucket
    first, second = compile_keys(T1, k, cfg), compile_keys(T2, k, cfg)
    kernels = {key.split('"')[1] for key in first}
    expected = {"topk_routing_kernel", "scatter_kernel", "grouped_gemm_kernel", "combine_kernel", "dh_kernel",
                "weight_grad_kernel"} | (set() if single_chunk else {"count_chunks_kernel"})
    assert kernels == expected
    assert len(first) == len(second)
    for i, (a, b) in enumerate(zip(first, second)):
        assert a == b, f"launch {i} compiles apart at T={T1} and T={T2}"


def test_other_buckets_do_compile_apart():
    """The keys do see the buckets: a T of another dispatch bucket gives other dispatch tiles."""
    assert compile_keys(1000, 3, SPLIT) != compile_keys(3000, 3, SPLIT)


def test_host_descriptor_configs_apply_only_where_asked(tmp_path, monkeypatch):
    """A table entry's "host_descriptors" GEMMs replace its own only for a stack that builds descriptors on
    the host; its other fields (BLOCK_M, the backward) and extra keys stay as they are."""
    gemm = {"block_n": 128, "block_k": 64, "num_warps": 8, "num_stages": 3}
    host_down = {**gemm, "block_n": 256, "num_stages": 4, "tma": True, "host_tma": True}
    entry = {"block_m": 128, "gate_up": gemm, "down": gemm, "dh": gemm, "ms": 1.0,
             "host_descriptors": {"down": host_down, "down_ms": 0.9, "measured": "by hand"}}
    table = tmp_path / "table.json"
    table.write_text(json.dumps({config.table_key("h100", "bfloat16", E, D, F, 128): entry}))
    monkeypatch.setattr(config, "TABLE_PATH", table)
    config._table.cache_clear()
    try:
        pick = functools.partial(config.select, "NVIDIA H100 80GB HBM3", "bfloat16", 512, 2, E, D, F)
        plain, host = pick(), pick(host_descriptors=True)
        assert plain == MoEConfig(128, GemmConfig(**gemm), GemmConfig(**gemm), dh=GemmConfig(**gemm))
        assert host == dataclasses.replace(plain, down=GemmConfig(**host_down))
        assert {cfg.down for _, cfg in config.shipped_configs(["h100"])} >= {plain.down, host.down}
    finally:
        config._table.cache_clear()


def test_table_backward_configs_say_what_runs():
    """No table entry asks dH or dX for TMA descriptors: neither runs them (gemm._tma_fits), so such a
    flag would only describe a kernel that never ran, and a tuner that tried it timed one kernel twice."""
    entries = json.loads(config.TABLE_PATH.read_text())
    for key, entry in entries.items():
        for fields in (entry, entry.get("host_descriptors", {})):
            for name in ("dh", "dx"):
                assert not fields.get(name, {}).get("tma"), (key, name)
