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


# The largest one-hot tile (bucket of n x BLOCK_E) the one-program path sorts. Above it the multi-launch
# path is faster: Qwen3 at T=16 (128 x 128 entries) took 15.0 us in one program, 6.1 us in two launches
# on an H200; at 128 x 64 (DeepSeek, T=16) the two paths tie.
SINGLE_CHUNK_ENTRIES = 4096
# Sub-tiles of SUB assignments per chunk (program) of the multi-launch path. The chunk prefix pass makes
# many small chunks cheap, and more programs hide the latency of each one's serial steps: on an H200,
# Qwen3's T=2048 dispatch took 9.7 us at 1, 12.1 at 2, 14.9 at 4; at T=8192 all were 22-27 us.
SUBS_PER_CHUNK = 1
# The prefix pass scans [PREFIX_CHUNK_TILE, PREFIX_EXPERT_TILE] tiles of the chunk counts.
PREFIX_CHUNK_TILE = 1024
PREFIX_EXPERT_TILE = 4
UNPREFIXED_CHUNKS = 32
# Up to this many chunks, each scatter program counts all assignments itself (RECOUNT) and the count
# launch is skipped. On an H200 (the layer, alternating trees) this took 1.3 us off DeepSeek's T = 16
# step (2 chunks) and 4 us off Mixtral's T = 512 (2 chunks); at Qwen3's T = 16 (4 chunks) the longer
# scatter cancelled the launch it saved.
RECOUNT_CHUNKS = 2


def _tiles(n_assignments: int, E: int, block_m: int) -> dict:
    """Dispatch's constexprs, from the bucket of n alone.

    CHUNK, SUB, CHUNK_TILE, EXPERT_TILE and BLOCK_TILE size register tiles (or loops over them), so they
    stay compile-time values: choosing them from dispatch_bucket(n), not from n, makes every batch size
    of a bucket share one compile, and a model a log-many set of them. n itself, the chunk count and the
    row blocks are runtime arguments, which the tiles cover for every n of the bucket.
    """
    bucket = dispatch_bucket(n_assignments)
    block_e = _next_pow2(E)
    # Small batches: one program takes all assignments in a single one-hot tile of up to
    # SINGLE_CHUNK_ENTRIES entries (serial tile loops would dominate a decode step). Larger ones: 4K-entry
    # tiles, many programs.
    single_chunk = bucket * block_e <= SINGLE_CHUNK_ENTRIES
    if single_chunk:
        chunk = sub = bucket
        block_tile = max(16, min(_next_pow2(max_row_blocks(bucket, E, block_m)), 16384 // block_e))
    else:
        sub = max(16, 4096 // block_e)
        chunk = sub * SUBS_PER_CHUNK
        block_tile = max(16, 4096 // block_e)
    # Up to UNPREFIXED_CHUNKS chunks, each scatter program sums the chunk counts itself (one tile) and
    # the prefix launch is skipped: Qwen3's T=16 dispatch (4 chunks) took 6.1 us with it, 5.7 without.
    chunks = _cdiv(bucket, chunk)
    prefixed = not single_chunk and chunks > UNPREFIXED_CHUNKS
    chunk_tile = min(PREFIX_CHUNK_TILE, _next_pow2(chunks)) if prefixed else max(16, _next_pow2(chunks))
    recount = not single_chunk and chunks <= RECOUNT_CHUNKS
    return dict(E=E, BLOCK_E=block_e, BLOCK_M=block_m, CHUNK=chunk, SUB=sub, BLOCK_TILE=block_tile,
                SINGLE_CHUNK=single_chunk, PREFIXED=prefixed, RECOUNT=recount, CHUNK_TILE=chunk_tile,
                EXPERT_TILE=min(PREFIX_EXPERT_TILE, block_e))


def _kernel_tiles(tiles: dict, *names: str) -> dict:
    return {name: tiles[name] for name in names}


def dispatch(flat_ids: jax.Array, E: int, block_m: int, mode: str, expert_first=None) -> Dispatch:
    """Sorts assignments by expert on the device: one launch for the smallest batches and for those of at
    most RECOUNT_CHUNKS chunks, two or three otherwise.

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

    chunk_counts = chunk_before = expert_totals = flat_ids  # stand-ins for what is not read
    if not single_chunk and not tiles["RECOUNT"]:
        (chunk_counts,) = launch(dispatch_kernels.count_chunks_kernel, flat_ids, expert_first, n, grid=(n_chunks,),
                                 mode=mode, out_shapes=[_out((n_chunks, E), _I32)],
                                 **_kernel_tiles(tiles, "E", "CHUNK", "SUB", "BLOCK_E"))
    if tiles["PREFIXED"]:
        chunk_before, expert_totals = launch(
            dispatch_kernels.chunk_prefix_kernel, chunk_counts, n_chunks, grid=(_cdiv(E, tiles["EXPERT_TILE"]),),
            mode=mode, out_shapes=[_out((n_chunks, E), _I32), _out((E,), _I32)],
            **_kernel_tiles(tiles, "E", "CHUNK_TILE", "EXPERT_TILE"))
    outs = launch(
        dispatch_kernels.scatter_kernel, flat_ids, expert_first, chunk_counts, chunk_before, expert_totals, n,
        n_chunks, n_blocks,
        grid=(n_chunks,), mode=mode, num_warps=8 if single_chunk else 4,
        out_shapes=[_out((n,), _I32), _out((n,), _I32), _out((E + 1,), _I32), _out((n_blocks,), _I32),
                    _out((n_blocks,), _I32)],
        **_kernel_tiles(tiles, "E", "BLOCK_M", "CHUNK", "SUB", "BLOCK_E", "BLOCK_TILE", "CHUNK_TILE", "SINGLE_CHUNK",
                       "PREFIXED", "RECOUNT"))
    return Dispatch(*outs)
