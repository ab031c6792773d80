"""Invariants of the dispatch metadata that every GEMM, the backward and the sharded path rely on."""

from __future__ import annotations

import importlib

import jax
import numpy as np
import pytest

from jaxmoe import ops

MODES = ["interpret", pytest.param("triton", marks=pytest.mark.gpu)]


def check_dispatch(ids: np.ndarray, E: int, block_m: int, mode: str, expert_first: int = 0):
    """ids are global; the device holds experts [expert_first, expert_first + E), traced under jit."""
    n = ids.size
    d = jax.jit(lambda i, first: ops.dispatch(i, E, block_m, mode, first))(ids.reshape(-1), np.int32(expert_first))
    sorted_assignments, assignment_rows, offsets, block_experts, block_rows = (np.asarray(a) for a in d)
    flat = ids.reshape(-1) - expert_first  # local ids
    valid = (flat >= 0) & (flat < E)
    counts = np.bincount(flat[valid], minlength=E)

    # offsets are the exclusive prefix sums of the counts; the last entry counts valid assignments
    np.testing.assert_array_equal(offsets, np.concatenate([[0], np.cumsum(counts)]))
    n_valid = int(valid.sum())
    # every valid assignment appears exactly once, grouped by expert, in assignment order within one
    np.testing.assert_array_equal(sorted_assignments[:n_valid], np.argsort(np.where(valid, flat, E), kind="stable")[:n_valid])
    # assignment_rows inverts the sort; dropped assignments are marked -1
    for a in np.flatnonzero(valid):
        assert sorted_assignments[assignment_rows[a]] == a
    assert (assignment_rows[~valid] == -1).all()

    # the block map covers each expert's rows exactly, in order; unused blocks are marked -1
    assert block_experts.size == ops.max_row_blocks(n, E, block_m)
    want_experts, want_rows = [], []
    for e in range(E):
        for start in range(0, counts[e], block_m):
            want_experts.append(e)
            want_rows.append(offsets[e] + start)
    used = len(want_experts)
    np.testing.assert_array_equal(block_experts[:used], want_experts)
    np.testing.assert_array_equal(block_rows[:used], want_rows)
    assert (block_experts[used:] == -1).all()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("T, E, k, block_m", [(1, 1, 1, 16), (33, 5, 2, 16), (200, 8, 2, 64), (150, 130, 6, 16),
                                              (16, 128, 8, 16), (16, 64, 6, 16), (11, 64, 6, 16)])
def test_random_ids(mode, T, E, k, block_m):
    """Qwen3's decode step (4 chunks) and DeepSeek's (2 chunks, which each scatter program counts itself:
    RECOUNT), and one of 2 chunks whose last is partly past the end."""
    rng = np.random.default_rng(T * E)
    ids = np.stack([rng.choice(E, size=k, replace=False) for _ in range(T)]).astype(np.int32)
    check_dispatch(ids, E, block_m, mode)


@pytest.mark.parametrize("mode", MODES)
def test_skewed_and_invalid_ids(mode):
    ids = np.zeros((100, 1), np.int32)  # all on expert 0: several blocks of one expert
    check_dispatch(ids, 3, 16, mode)
    ids = np.array([[0, 9], [-1, 2], [2, 0], [5, 1]], np.int32)  # 9, -1 and 5 are out of range for E=3
    check_dispatch(ids, 3, 16, mode)


@pytest.mark.parametrize("mode", MODES)
def test_many_chunks(mode):
    """Enough assignments for several dispatch chunks, so chunk prefix sums are exercised (9 chunks: each
    scatter program adds them; test_random_ids' E = 130 case has 57, through the prefix pass)."""
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 4, size=(4500, 2)).astype(np.int32)
    check_dispatch(ids, 4, 32, mode)


@pytest.mark.parametrize("mode", MODES)
def test_chunk_prefix_over_several_tiles(mode, monkeypatch):
    """The prefix pass carries its running sums from one tile of chunks to the next, and scans experts
    in several programs (E = 11 over tiles of 4, the last part padding)."""
    dispatch_module = importlib.import_module("jaxmoe.ops.dispatch")
    monkeypatch.setattr(dispatch_module, "PREFIX_CHUNK_TILE", 4)
    monkeypatch.setattr(dispatch_module, "UNPREFIXED_CHUNKS", 2)
    rng = np.random.default_rng(2)
    ids = rng.integers(0, 11, size=(1300, 3)).astype(np.int32)  # 3900 assignments: 16 chunks of 256
    ids[:400] = 7  # a run of one expert across several chunks
    tiles = dispatch_module._tiles(ids.size, 11, 16)
    assert tiles["PREFIXED"] and tiles["CHUNK_TILE"] == 4 and tiles["EXPERT_TILE"] == 4
    assert ids.size // tiles["CHUNK"] > 3 * tiles["CHUNK_TILE"]  # 4 tiles of chunks
    check_dispatch(ids, 11, 16, mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("T, first, path", [(40, 3, "SINGLE_CHUNK"), (1000, 5, "RECOUNT"), (2300, 4, "counted")])
def test_local_expert_range(mode, T, first, path):
    """A device holding global experts [first, first + 4) of 12: assignments to the others are dropped.
    path: one program; few chunks, each scatter program counting all of them; chunks counted by a launch."""
    tiles = importlib.import_module("jaxmoe.ops.dispatch")._tiles(2 * T, 4, 16)
    assert {"SINGLE_CHUNK": tiles["SINGLE_CHUNK"], "RECOUNT": tiles["RECOUNT"],
            "counted": not (tiles["SINGLE_CHUNK"] or tiles["RECOUNT"] or tiles["PREFIXED"])}[path]
    rng = np.random.default_rng(T)
    ids = np.stack([rng.choice(12, size=2, replace=False) for _ in range(T)]).astype(np.int32)
    check_dispatch(ids, 4, 16, mode, expert_first=first)


def test_worst_case_block_bound_is_tight():
    # 7 experts with one row each plus one expert with the other 25 rows needs 7 + 2 = 9 blocks
    assert ops.max_row_blocks(32, 8, 16) == 9
    for n, E, bm in [(1, 1, 16), (5, 8, 16), (1000, 64, 64), (16, 1, 16)]:
        rng = np.random.default_rng(n)
        for _ in range(50):
            counts = np.bincount(rng.integers(0, E, n), minlength=E)
            assert sum(-(-c // bm) for c in counts) <= ops.max_row_blocks(n, E, bm)
