"""A grouped GEMM in jax.lax whose cost follows the rows, not rows x groups: the reference's CPU path.

For lhs [M, K] with rows grouped (group g holds group_sizes[g] consecutive rows, starting at
start[g] = sum of the sizes before it) and rhs [G, K, N]:

    out[r] = lhs[r] @ rhs[g]                 for each row r of group g (rows of no group: 0)
    dlhs[r] = dout[r] @ rhs[g]^T             (the same product with rhs transposed)
    drhs[g] = sum over rows r of g of lhs[r]^T dout[r]

Rows are cut into blocks of B. Block boundaries and group starts cut them into at most
M / B + G segments, each inside one block and one group; one [B, K] @ [K, N] dot per segment, with
the rows of other groups selected away before and after, computes every row once. That is about
(M + G * B) rows of work, against M * G for one masked dense dot per group, and XLA's CPU ragged_dot
costs like the latter (it multiplies every group's weights by every row, zeros included).

Selecting rather than multiplying keeps a non-finite value in its own rows: an Inf in rhs[g] reaches
the rows of g alone (0 * Inf would make NaN in every row), a NaN in lhs[r] reaches out[r] and drhs[g].
Each output row comes from one dot and drhs[g] adds its segments in row order, so results are the
same bits run to run.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def block_rows(M: int, G: int) -> int:
    """B: about M / (8 G) rows, so the G extra segments cost about M / 8 more rows, a power of two in
    [16, 128]. Smaller blocks trade wasted rows for loop steps; at M = 8192, K = 64, N = 128 on a CPU
    this choice was within 15% of the best B for G = 8, 32 and 128."""
    target = max(1, -(-M // (8 * max(G, 1))))
    return min(128, max(16, 1 << (target - 1).bit_length()))


def _segments(group_sizes, M: int, B: int):
    """(block index, group index) of each of the n_blocks + G segments, in row order. A segment that is
    empty (two cuts at one row) repeats a neighbour's work, which selecting makes harmless."""
    n_blocks = -(-M // B)
    sizes = group_sizes.astype(jnp.int32)
    ends = jnp.cumsum(sizes)
    cuts = jnp.sort(jnp.concatenate([jnp.arange(n_blocks, dtype=jnp.int32) * B, ends - sizes]))
    block = jnp.clip(cuts // B, 0, n_blocks - 1)
    group = jnp.clip(jnp.searchsorted(ends, cuts, side="right"), 0, sizes.shape[0] - 1)
    return block.astype(jnp.int32), group.astype(jnp.int32), ends - sizes, ends


def _padded(a, rows: int):
    return jnp.pad(a, ((0, rows - a.shape[0]), (0, 0)))


def rows_dot(lhs, rhs, group_sizes, *, precision=None, out_dtype=None):
    """out [M, N] = lhs_g @ rhs[g] for each group's rows; rows past the last group are zero."""
    (M, _), (G, _, N) = lhs.shape, rhs.shape
    out_dtype = jnp.dtype(out_dtype or lhs.dtype)
    if M == 0 or G == 0:
        return jnp.zeros((M, N), out_dtype)
    B = block_rows(M, G)
    block, group, starts, ends = _segments(group_sizes, M, B)
    lhs = _padded(lhs, -(-M // B) * B)

    def one_segment(s, out):
        first, g = block[s] * B, group[s]
        rows = first + jnp.arange(B)
        mine = ((rows >= starts[g]) & (rows < ends[g]))[:, None]
        part = jnp.dot(jnp.where(mine, jax.lax.dynamic_slice_in_dim(lhs, first, B), 0), rhs[g],
                       precision=precision, preferred_element_type=out_dtype)
        kept = jax.lax.dynamic_slice_in_dim(out, first, B)
        return jax.lax.dynamic_update_slice_in_dim(out, jnp.where(mine, part, kept), first, 0)

    out = jax.lax.fori_loop(0, block.shape[0], one_segment, jnp.zeros((lhs.shape[0], N), out_dtype))
    return out[:M]


def rows_dot_transposes(lhs, rhs, group_sizes, dout, *, precision=None):
    """(dlhs, drhs) of rows_dot for the cotangent dout, in the cotangent's and lhs's promoted dtype,
    rounded to lhs's and rhs's dtypes at the end."""
    (M, K), (G, _, N) = lhs.shape, rhs.shape
    acc = jnp.promote_types(dout.dtype, lhs.dtype)
    dlhs = rows_dot(dout, jnp.swapaxes(rhs, 1, 2).astype(acc), group_sizes, precision=precision, out_dtype=acc)
    if M == 0 or G == 0:
        return dlhs.astype(lhs.dtype), jnp.zeros(rhs.shape, rhs.dtype)
    B = block_rows(M, G)
    block, group, starts, ends = _segments(group_sizes, M, B)
    rows_padded = -(-M // B) * B
    lhs, dout = _padded(lhs, rows_padded), _padded(dout, rows_padded)
    # Two cuts at one row make two segments of one (block, group), next to each other: add only the first.
    repeat = jnp.concatenate([jnp.zeros(1, bool), (block[1:] == block[:-1]) & (group[1:] == group[:-1])])

    def one_segment(s, drhs):
        first, g = block[s] * B, group[s]
        rows = first + jnp.arange(B)
        mine = ((rows >= starts[g]) & (rows < ends[g]) & ~repeat[s])[:, None]
        a = jnp.where(mine, jax.lax.dynamic_slice_in_dim(lhs, first, B), 0).astype(acc)
        b = jnp.where(mine, jax.lax.dynamic_slice_in_dim(dout, first, B), 0).astype(acc)
        part = jnp.dot(a.T, b, precision=precision, preferred_element_type=acc)
        # A read, an add and a write of one group's slice, in segment order: no scatter-add.
        return jax.lax.dynamic_update_index_in_dim(drhs, drhs[g] + part, g, 0)

    drhs = jax.lax.fori_loop(0, block.shape[0], one_segment, jnp.zeros((G, K, N), acc))
    return dlhs.astype(lhs.dtype), drhs.astype(rhs.dtype)
