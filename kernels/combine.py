"""Combine: each token's output is the sum of its k expert rows, already scaled by routing weights.

    y[t, :] = sum_j sum_s expert_rows[s, assignment_rows[t * k + j], :]   (rows of dropped ids skipped)

s runs over the SPLITS partial-sum planes of a split-K GEMM (one plane without split-K); the backward
also sums the routing-weight gradient's per-tile planes here, with T*k rows of width 1 and k = 1.

Tiling: a program owns BLOCK_T tokens x BLOCK_D columns and adds the k rows in slot order j = 0..k-1
(each row's planes in order s = 0..SPLITS-1) in float32 registers, so the sum is the same every run (no
atomics decide its order) and is rounded to y's dtype once. The forward's rows arrive in float32 too,
split or not, so y does not depend on the config (README, Numerics).
"""

import triton
import triton.language as tl


@triton.jit
def combine_kernel(
    expert_rows_ptr,  # [SPLITS, T * TOP_K, D] sorted order, weighted
    assignment_rows_ptr,  # [T * TOP_K] int32, -1 for dropped assignments
    T,  # runtime: a new batch size compiles nothing new
    y_ptr,  # [T, D]
    D: tl.constexpr,  # constexpr so the compiler sees rows are 16-byte aligned and vectorises
    TOP_K: tl.constexpr,
    SPLITS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    token_ok = tokens < T
    col_ok = cols < D
    # Planes hold one row per assignment, T * TOP_K * D elements apart: int64, as it passes 2^31 for large
    # batches, and a multiple of the constexpr D, so their rows keep D's known alignment.
    plane_stride = tl.cast(T, tl.int64) * TOP_K * D
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        row = tl.load(assignment_rows_ptr + tokens * TOP_K + j, mask=token_ok, other=-1)
        row_ok = token_ok & (row >= 0)
        for s in range(SPLITS):  # a loop, not unrolled: the routing-weight gradient adds up to f/BLOCK_N planes
            values = tl.load(expert_rows_ptr + s * plane_stride + row.to(tl.int64)[:, None] * D + cols[None, :],
                             mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            acc += values.to(tl.float32)
    tl.store(y_ptr + tokens[:, None] * D + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=token_ok[:, None] & col_ok[None, :])
