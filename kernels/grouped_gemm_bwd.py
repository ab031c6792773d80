"""Backward of the expert FFN: the dSwiGLU GEMM and the weight-gradient GEMMs.

Forward, per sorted row r (assignment a = t * k + j to expert e, routing weight w_a):
    gate = x[t] @ Wg[e], up = x[t] @ Wu[e], h = silu(gate) * up, y[t] += w_a * (h @ Wd[e])
Backward, given dy [T, d]:
    g       = dy[t] @ Wd[e]^T                          (dh_kernel: dy rows gathered, Wd read transposed)
    dw_a    = <g, h>                                   (dh_kernel epilogue, per N tile; summed in order later)
    dh      = w_a * g
    dgate   = dh * up * silu'(gate), dup = dh * silu(gate)   (dh_kernel epilogue, from the saved gate and up)
    dx[t]  += dgate @ Wg[e]^T + dup @ Wu[e]^T          (grouped_gemm_kernel with CONCAT_K, then the combine)
    dWg[e]  = sum_r x[t]^T dgate,  dWu[e] = sum_r x[t]^T dup,  dWd[e] = sum_r h^T (w_a * dy[t])
                                                       (weight_grad_kernel: contracts over each expert's rows)

dh_kernel tiles like the forward's grouped GEMM (a BLOCK_M x BLOCK_N tile of one row block, K = d),
with the same swizzle. Its routing-weight term is a row sum over f, split across N tiles: each tile
writes its partial sum to its own float32 plane, and the combine kernel adds the planes in a fixed order.

weight_grad_kernel: program (e, tile) owns one BLOCK_M x BLOCK_N tile of expert e's gradient and loops
over that expert's rows in BLOCK_K steps (the rows are the GEMM's K), gathering token-order operands
by row inside the tile load. One program holds a whole output tile, so each sum has one fixed order
and no atomics; an expert without rows writes exact zeros. With TWO_OUTPUTS the N range is walked
twice, once per half of B's columns ([dgate | dup]), writing the gate and up gradients.
"""

import triton
import triton.language as tl

from .grouped_gemm import _round_to_tf32, accumulate, block_rows, program_tile, tile_start


@triton.jit
def dh_kernel(
    # pointers
    dy_ptr,  # [T, K] token order, gathered by row
    w_down_ptr,  # [E, N, K]: Wd [E, f, d], read transposed
    hgu_ptr,  # [n_assignments, 3N] sorted: h | gate | up, saved by the forward
    row_weights_ptr,  # [n_assignments] float32
    sorted_assignments_ptr,  # [n_assignments] int32
    expert_offsets_ptr,  # [E + 1] int32
    block_experts_ptr,  # [n_blocks] int32
    block_rows_ptr,  # [n_blocks] int32
    # dimensions that follow the token count: runtime, so a new batch size compiles nothing new
    n_blocks,
    n_assignments,
    # outputs
    dgu_ptr,  # [n_assignments, 2N] sorted: dgate | dup
    dw_parts_ptr,  # [cdiv(N, BLOCK_N), n_assignments] float32 partial sums of <g, h>
    # the model's shapes (constexpr for vectorised loads, as in grouped_gemm_kernel)
    N: tl.constexpr,  # f
    K: tl.constexpr,  # d
    TOP_K: tl.constexpr,
    # meta-parameters
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    block, tile_n = program_tile(n_blocks, N, BLOCK_N, GROUP_M)
    expert, first_row, end_row = tile_start(block, block_experts_ptr, block_rows_ptr, expert_offsets_ptr,
                                            BLOCK_M, 1)
    if expert < 0:  # an empty expert's or an unused worst-case block
        return
    expert, rows, row_ok, assignments = block_rows(expert, first_row, end_row, sorted_assignments_ptr, BLOCK_M)
    tokens = (assignments // TOP_K).to(tl.int64)
    cols = tile_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N

    # g[r, n] = sum_k dy[t, k] * Wd[e, n, k]: B[k, n] has stride 1 along k and K along n.
    g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    g = accumulate(g, dy_ptr, tokens, row_ok, K, w_down_ptr + expert * N * K, cols, col_ok, 0, K, 1, K,
                   BLOCK_K, EVEN_K, DOT_PRECISION)

    tile_ok = row_ok[:, None] & col_ok[None, :]
    saved = hgu_ptr + rows.to(tl.int64)[:, None] * (3 * N) + cols[None, :]
    h = tl.load(saved, mask=tile_ok, other=0.0).to(tl.float32)
    gate = tl.load(saved + N, mask=tile_ok, other=0.0).to(tl.float32)
    up = tl.load(saved + 2 * N, mask=tile_ok, other=0.0).to(tl.float32)

    # <g, h> over this tile's columns: the unweighted output's gradient dotted with dy, i.e. d y / d w_a.
    tl.store(dw_parts_ptr + tile_n.to(tl.int64) * n_assignments + rows, tl.sum(g * h, axis=1), mask=row_ok)

    dh = g * tl.load(row_weights_ptr + assignments, mask=row_ok, other=0.0)[:, None]
    sig = tl.sigmoid(gate)
    d_gate = dh * up * sig * (1.0 + gate * (1.0 - sig))
    d_up = dh * gate * sig
    out = dgu_ptr + rows.to(tl.int64)[:, None] * (2 * N) + cols[None, :]
    tl.store(out, d_gate.to(dgu_ptr.dtype.element_ty), mask=tile_ok)
    tl.store(out + N, d_up.to(dgu_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit
def weight_grad_kernel(
    # pointers
    a_ptr,  # rows of A [., M]: token order if GATHER_A, else sorted
    b_ptr,  # rows of B [., N] (or [., 2N] with TWO_OUTPUTS): token order if GATHER_B, else sorted
    row_weights_ptr,  # [n_assignments] float32, read only if SCALE_B
    sorted_assignments_ptr,  # [n_assignments] int32
    expert_offsets_ptr,  # [E + 1] int32
    # outputs
    out_ptr,  # [E, M, N]
    out2_ptr,  # [E, M, N] written only with TWO_OUTPUTS (from B's columns N..2N)
    # the model's shapes and strides (constexpr for vectorised loads); the rows, which follow the token
    # count, come at run time from expert_offsets
    M: tl.constexpr,
    N: tl.constexpr,
    TOP_K: tl.constexpr,
    stride_am: tl.constexpr,
    stride_bm: tl.constexpr,
    # meta-parameters
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # rows per step: the rows are this GEMM's contraction
    GATHER_A: tl.constexpr,
    GATHER_B: tl.constexpr,
    SCALE_B: tl.constexpr,
    TWO_OUTPUTS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    halves: tl.constexpr = 2 if TWO_OUTPUTS else 1
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_expert = tiles_m * tiles_n * halves
    pid = tl.program_id(0)
    expert = (pid // per_expert).to(tl.int64)
    local = pid % per_expert
    # Consecutive programs walk N (and the two halves) for one M tile, so they share A's columns in L2.
    half = local % halves
    tile_m = (local // halves) // tiles_n
    tile_n = (local // halves) % tiles_n

    first_row = tl.load(expert_offsets_ptr + expert)
    end_row = tl.load(expert_offsets_ptr + expert + 1)
    ms = tile_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    ns = tile_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = ms < M
    n_ok = ns < N
    b_cols = ns + half * N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(first_row, end_row, BLOCK_K):
        rows = r0 + tl.arange(0, BLOCK_K)
        row_ok = rows < end_row
        assignments = tl.load(sorted_assignments_ptr + rows, mask=row_ok, other=0)
        if GATHER_A:
            a_rows = (assignments // TOP_K).to(tl.int64)
        else:
            a_rows = rows.to(tl.int64)
        if GATHER_B:
            b_rows = (assignments // TOP_K).to(tl.int64)
        else:
            b_rows = rows.to(tl.int64)
        a = tl.load(a_ptr + a_rows[:, None] * stride_am + ms[None, :], mask=row_ok[:, None] & m_ok[None, :],
                    other=0.0)
        b = tl.load(b_ptr + b_rows[:, None] * stride_bm + b_cols[None, :], mask=row_ok[:, None] & n_ok[None, :],
                    other=0.0)
        if SCALE_B:
            scale = tl.load(row_weights_ptr + assignments, mask=row_ok, other=0.0)
            b = (b.to(tl.float32) * scale[:, None]).to(b_ptr.dtype.element_ty)
        if DOT_PRECISION == "tf32":
            a = _round_to_tf32(a)
            b = _round_to_tf32(b)
        acc = tl.dot(tl.trans(a), b, acc, input_precision=DOT_PRECISION)

    out_offsets = expert * M * N + ms[:, None] * N + ns[None, :]
    out_ok = m_ok[:, None] & n_ok[None, :]
    if half == 0:
        tl.store(out_ptr + out_offsets, acc.to(out_ptr.dtype.element_ty), mask=out_ok)
    else:
        tl.store(out2_ptr + out_offsets, acc.to(out2_ptr.dtype.element_ty), mask=out_ok)
