"""Backward of the expert FFN: the dH GEMM, the weight-gradient GEMMs and the bias-gradient column sums.

Forward, per sorted row r (assignment a = t * k + j to expert e, routing weight w_a; jaxmoe.Experts):
    p_g = x[t] @ Wg[e], p_u = x[t] @ Wu[e]               (the products, saved in hgu beside h)
    s_a = w_a if the weight is on the input, else 1;  o_a = w_a if it is on the output, else 1
    gate = s_a * p_g + bg[e], up = s_a * p_u + bu[e], h = act(gate, up)   (biases: zero without HAS_BIAS)
    y[t] += o_a * (h @ Wd[e] + bd[e])
Backward, given dy [T, d]:
    g       = dy[t] @ Wd[e]^T                          (dh_kernel: dy rows gathered, Wd read transposed)
    dh      = o_a * g
    dgate, dup = act'(gate, up) * dh                   (dh_kernel epilogue: gate and up rebuilt from p_g,
                                                        p_u, w_a and the biases, clamped_swiglu's clamps
                                                        as the forward decided them; epilogue.py has act')
    dw_a    = <g, h> + <dy[t], bd[e]>                  (weight on the output)
            = <dgate, p_g> + <dup, p_u>                (weight on the input: no division by w_a, which
                                                        may be 0)
              (dh_kernel epilogue, per N tile; <dy, bd> by the N tile 0 programs into one more plane;
              the planes are summed in order later)
    dx[t]  += s_a * (dgate @ Wg[e]^T + dup @ Wu[e]^T)  (grouped_gemm_kernel with CONCAT_K, SCALE_ROWS if
                                                        the weight is on the input, then the combine)
    dWg[e]  = sum_r x[t]^T (s_a dgate),  dWu[e] = sum_r x[t]^T (s_a dup),  dWd[e] = sum_r h^T (o_a dy[t])
                                                       (weight_grad_kernel: contracts over each expert's rows)
    dbg[e]  = sum_r dgate,  dbu[e] = sum_r dup         (not times s_a: the bias is added after the scaling)
    dbd[e]  = sum_r o_a dy[t]                          (bias_grad_kernel: column sums over each expert's rows)

dh_kernel tiles like the forward's grouped GEMM (a BLOCK_M x BLOCK_N tile of one row block, K = d),
with the same swizzle. Its routing-weight term is a row sum over f, split across N tiles: each tile
writes its partial sum to its own float32 plane, and the combine kernel adds the planes in a fixed order.

weight_grad_kernel: program (e, tile) owns one BLOCK_M x BLOCK_N tile of expert e's gradient and loops
over that expert's rows in BLOCK_K steps (the rows are the GEMM's K), gathering token-order operands
by row inside the tile load. One program holds a whole output tile, so each sum has one fixed order
and no atomics; an expert without rows writes exact zeros. With TWO_OUTPUTS the N range is walked
twice, once per half of B's columns ([dgate | dup]), writing the gate and up gradients.
bias_grad_kernel walks the rows the same way for a column sum (one program per expert and N tile).
"""

import triton
import triton.language as tl

from .epilogue import activation_grad, expert_bias
from .grouped_gemm import _round_to_tf32, accumulate, block_rows, program_tile, tile_start


@triton.jit
def dh_kernel(
    # pointers
    dy_ptr,  # [T, K] token order, gathered by row
    w_down_ptr,  # [E, N, K]: Wd [E, f, d], read transposed
    hgu_ptr,  # [n_assignments, 3N] sorted: h | p_g | p_u, saved by the forward
    clamps_ptr,  # [n_assignments, N] uint8: the forward's clamp decisions, read only with clamped_swiglu
    row_weights_ptr,  # [n_assignments] float32
    b_gate_ptr,  # [E, N], read only if HAS_BIAS
    b_up_ptr,  # [E, N], read only if HAS_BIAS
    b_down_ptr,  # [E, K], read only if HAS_BIAS and the weight is on the output
    sorted_assignments_ptr,  # [n_assignments] int32
    expert_offsets_ptr,  # [E + 1] int32
    block_experts_ptr,  # [n_blocks] int32
    block_rows_ptr,  # [n_blocks] int32
    # dimensions that follow the token count: runtime, so a new batch size compiles nothing new
    n_blocks,
    n_assignments,
    # outputs
    dgu_ptr,  # [n_assignments, 2N] sorted: dgate | dup
    dw_parts_ptr,  # [cdiv(N, BLOCK_N) (+ 1), n_assignments] float32 partial sums of dw_a (the last plane
    #                <dy, bd> with HAS_BIAS and the weight on the output)
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
    HAS_BIAS: tl.constexpr,
    WEIGHT_ON_INPUT: tl.constexpr,
    ACTIVATION: tl.constexpr,
    ALPHA: tl.constexpr,
    LIMIT: tl.constexpr,
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
    if not WEIGHT_ON_INPUT:
        h = tl.load(saved, mask=tile_ok, other=0.0).to(tl.float32)
    p_gate = tl.load(saved + N, mask=tile_ok, other=0.0).to(tl.float32)
    p_up = tl.load(saved + 2 * N, mask=tile_ok, other=0.0).to(tl.float32)

    # d y / d w_a over this tile's columns (weight on the input: below, through gate and up).
    parts = dw_parts_ptr + tile_n.to(tl.int64) * n_assignments + rows
    if not WEIGHT_ON_INPUT:  # the unweighted output's gradient dotted with dy: <g, h>, and <dy, bd>
        tl.store(parts, tl.sum(g * h, axis=1), mask=row_ok)
        if HAS_BIAS:
            if tile_n == 0:  # one program per row block adds the plane after the N tiles' planes
                bias_plane = dw_parts_ptr + (tile_n + tl.cdiv(N, BLOCK_N)).to(tl.int64) * n_assignments + rows
                dy_bias = _row_dot_bias(dy_ptr, tokens, row_ok, b_down_ptr, expert, K, BLOCK_M, BLOCK_K)
                tl.store(bias_plane, dy_bias, mask=row_ok)

    w = tl.load(row_weights_ptr + assignments, mask=row_ok, other=0.0)[:, None]
    if WEIGHT_ON_INPUT:
        gate = p_gate * w
        up = p_up * w
        dh = g
    else:
        gate = p_gate
        up = p_up
        dh = g * w
    if HAS_BIAS:
        gate += expert_bias(b_gate_ptr, expert, cols, col_ok, N)
        up += expert_bias(b_up_ptr, expert, cols, col_ok, N)
    clamps = 0  # what swiglu's activation_grad ignores
    if ACTIVATION == "clamped_swiglu":
        clamps = tl.load(clamps_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :], mask=tile_ok, other=0)
    d_gate, d_up = activation_grad(gate, up, dh, clamps, ACTIVATION, ALPHA, LIMIT)
    if WEIGHT_ON_INPUT:
        tl.store(parts, tl.sum(d_gate * p_gate + d_up * p_up, axis=1), mask=row_ok)

    out = dgu_ptr + rows.to(tl.int64)[:, None] * (2 * N) + cols[None, :]
    tl.store(out, d_gate.to(dgu_ptr.dtype.element_ty), mask=tile_ok)
    tl.store(out + N, d_up.to(dgu_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit
def _row_dot_bias(dy_ptr, tokens, row_ok, b_down_ptr, expert, K: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    """[BLOCK_M] float32: <dy[token], bd[expert]> per row, summed over K in BLOCK_K steps."""
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = k0 + ks < K
        dy = tl.load(dy_ptr + tokens[:, None] * K + (k0 + ks)[None, :], mask=row_ok[:, None] & k_ok[None, :],
                     other=0.0)
        acc += dy.to(tl.float32) * expert_bias(b_down_ptr, expert, k0 + ks, k_ok, K)
    return tl.sum(acc, axis=1)


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


@triton.jit
def bias_grad_kernel(
    # pointers
    b_ptr,  # rows of B [., N]: token order if GATHER_B, else sorted
    row_weights_ptr,  # [n_assignments] float32, read only if SCALE_B
    sorted_assignments_ptr,  # [n_assignments] int32
    expert_offsets_ptr,  # [E + 1] int32
    # outputs
    out_ptr,  # [E, N]: out[e] = sum over expert e's rows r of B[row(r)] (* w_r if SCALE_B)
    # the model's shapes (constexpr); the rows come at run time from expert_offsets
    N: tl.constexpr,
    TOP_K: tl.constexpr,
    stride_bm: tl.constexpr,
    # meta-parameters
    BLOCK_R: tl.constexpr,  # rows per step
    BLOCK_N: tl.constexpr,
    GATHER_B: tl.constexpr,
    SCALE_B: tl.constexpr,
):
    tiles_n = tl.cdiv(N, BLOCK_N)
    pid = tl.program_id(0)
    expert = (pid // tiles_n).to(tl.int64)
    ns = (pid % tiles_n).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = ns < N
    first_row = tl.load(expert_offsets_ptr + expert)
    end_row = tl.load(expert_offsets_ptr + expert + 1)
    # Each row step adds into a [BLOCK_R, BLOCK_N] float32 tile, reduced once at the end: one fixed order.
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    for r0 in range(first_row, end_row, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_ok = rows < end_row
        assignments = tl.load(sorted_assignments_ptr + rows, mask=row_ok, other=0)
        if GATHER_B:
            b_rows = (assignments // TOP_K).to(tl.int64)
        else:
            b_rows = rows.to(tl.int64)
        b = tl.load(b_ptr + b_rows[:, None] * stride_bm + ns[None, :], mask=row_ok[:, None] & n_ok[None, :],
                    other=0.0).to(tl.float32)
        if SCALE_B:
            b = b * tl.load(row_weights_ptr + assignments, mask=row_ok, other=0.0)[:, None]
        acc += b
    tl.store(out_ptr + expert * N + ns, tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty), mask=n_ok)
