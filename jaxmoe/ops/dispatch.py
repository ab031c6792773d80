"""Dispatch: assignments sorted by expert on the device, and the row blocks the grouped GEMMs walk."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxmoe.kernels import dispatch as dispatch_kernels
from jaxmoe.launch import launch
from jaxmoe.ops._util import I32 as _I32, cdiv as _cdiv, next_pow2 as _next_pow2, out as _out

class Dispatch(NamedTuple):
    """Assignments sorted by expert, and the row blocks the grouped GEMMs iterate over.

    Assignment a = t * k + j. Sorted rows are grouped by expert, in assignment order within one.
    """

    sorted_assignments: jax.Array  # [n] int32: assignment at each sorted row (rows past the valid ones unset)
    assignment_rows: jax.Array  # [n] int32: sorted row of each assignment, -1 where the id is not local
    expert_offsets: jax.Array  # [E + 1] int32: first sorted row of each local expert; last entry = valid rows
    block_experts: jax.Array  # [n_blocks] int32: local expert of each BLOCK_M row block, -1 for unused blocks
    block_rows: jax.Array  # [n_blocks] int32: first sorted row of each row block


def max_row_blocks(n_assignments: int, E: int, block_m: int) -> int:
    """Worst case of sum_e cdiv(count_e, block_m) over all ways to split n assignments among E experts."""
    nonempty = min(E, n_assignments)
    return max(1, (n_assignments + nonempty * (block_m - 1)) // block_m)


def dispatch_bucket(n_assignments: int) -> int:
    """The power of two of n = T*k from which dispatch's tile sizes are chosen (one compile per bucket)."""
    return _next_pow2(n_assignments)


# The largest one-hot tile (bucket of n x BLOCK_E) the one-program path sorts. Above it the two-launch
# path is faster: Qwen3 at T=16 (128 x 128 entries) took 15.0 us in one program, 6.1 us in two launches
# on an H200; at 128 x 64 (DeepSeek, T=16) the two paths tie.
SINGLE_CHUNK_ENTRIES = 4096
# Chunks (programs) of the two-launch path, for the largest batches; smaller ones get fewer. Every scatter
# program reads all chunks' counts, so more chunks cost quadratically: on an H200, 256 chunks took Qwen3's
# T=8192 dispatch from 57 to 45 us but T=2048's from 20 to 23 us, 512 or more were slower everywhere.
TARGET_CHUNKS = 128


def _tiles(n_assignments: int, E: int, block_m: int) -> dict:
    """Dispatch's constexprs, from the bucket of n alone.

    CHUNK, SUB, CHUNK_TILE and BLOCK_TILE size register tiles (or loops over them), so they stay
    compile-time values: choosing them from dispatch_bucket(n), not from n, makes every batch size of a
    bucket share one compile, and a model a log-many set of them. n itself, the chunk count and the row
    blocks are runtime arguments, which the tiles cover for every n of the bucket.
    """
    bucket = dispatch_bucket(n_assignments)
    block_e = _next_pow2(E)
    # Small batches: one program takes all assignments in a single one-hot tile of up to
    # SINGLE_CHUNK_ENTRIES entries (serial tile loops would dominate a decode step). Larger ones: 4K-entry
    # tiles, many programs.
    single_chunk = bucket * block_e <= SINGLE_CHUNK_ENTRIES
    if single_chunk:
        chunk = sub = bucket
        chunk_tile = 16  # one chunk: the chunk counts are not read
        block_tile = max(16, min(_next_pow2(max_row_blocks(bucket, E, block_m)), 16384 // block_e))
    else:
        sub = max(16, 4096 // block_e)
        chunk = max(sub, min(4096, bucket // TARGET_CHUNKS))  # bucket // chunk bounds their count
        chunk_tile = max(16, min(bucket // chunk, 4096 // block_e))
        block_tile = max(16, 4096 // block_e)
    return dict(E=E, BLOCK_E=block_e, BLOCK_M=block_m, CHUNK=chunk, SUB=sub, CHUNK_TILE=chunk_tile,
                BLOCK_TILE=block_tile, SINGLE_CHUNK=single_chunk)


def dispatch(flat_ids: jax.Array, E: int, block_m: int, mode: str, expert_first=None) -> Dispatch:
    """Sorts assignments by expert on the device: one launch for small batches, two otherwise.

    The device holds experts [expert_first, expert_first + E) (expert_first: a traced or Python int,
    None for 0); ids outside that range are not local and are dropped (kernels/dispatch.py). Every
    output is in local expert ids.
    """
    n = flat_ids.shape[0]
    # A 1-element array because jax-triton passes only Python ints as scalars; 0 is a constant.
    expert_first = jnp.zeros((1,), _I32) if expert_first is None else jnp.reshape(expert_first, (1,)).astype(_I32)
    n_blocks = max_row_blocks(n, E, block_m)
    tiles = _tiles(n, E, block_m)
    single_chunk = tiles["SINGLE_CHUNK"]
    n_chunks = _cdiv(n, tiles["CHUNK"])
    flat_ids = flat_ids.astype(_I32)

    if single_chunk:
        chunk_counts = flat_ids  # not read
    else:
        count_tiles = {key: tiles[key] for key in ("E", "CHUNK", "SUB", "BLOCK_E")}
        (chunk_counts,) = launch(dispatch_kernels.count_chunks_kernel, flat_ids, expert_first, n, grid=(n_chunks,),
                                 mode=mode, out_shapes=[_out((n_chunks, E), _I32)], **count_tiles)
    outs = launch(
        dispatch_kernels.scatter_kernel, flat_ids, expert_first, chunk_counts, n, n_chunks, n_blocks,
        grid=(n_chunks,), mode=mode, num_warps=8 if single_chunk else 4,
        out_shapes=[_out((n,), _I32), _out((n,), _I32), _out((E + 1,), _I32), _out((n_blocks,), _I32),
                    _out((n_blocks,), _I32)], **tiles)
    return Dispatch(*outs)
