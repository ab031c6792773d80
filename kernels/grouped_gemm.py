"""Grouped GEMM over dispatched rows: one kernel, switched by flags, for every row-block expert matmul.

    for each row block b (expert e = block_experts[b], sorted rows r of that expert, routing weight w_r):
        GATED:      gate = A[src(r)] @ B[e],  up = A[src(r)] @ B2[e]      (one A tile, two accumulators)
                    (both * w_r if WEIGHT_ON_INPUT: (w x) W = w (x W), the expert's input scaled)
                    (+ bias[e], + bias2[e] if HAS_BIAS, after the scaling)
                    out[r, :N] = h = act(gate, up)      (ACTIVATION, ALPHA, LIMIT: see epilogue.py)
                    with STORE_PREACT also out[r, N:2N] = A @ B[e], out[r, 2N:3N] = A @ B2[e], the
                    products before the weight and the bias, and for clamped_swiglu
                    clamps[r, :] = the clamp decisions on gate and up (epilogue.py says why)
        otherwise:  out[s, r, :] = A[src(r), Ks] @ B[e, Ks]  (+ A[src(r), K + Ks] @ B2[e, Ks] if CONCAT_K)
                    (+ bias[e] if HAS_BIAS, in the first K slice's plane only)
                    (* w_r if SCALE_ROWS)
                    for each of SPLIT_K slices Ks of the K range (partial sums, added up by the combine)
    src(r) = sorted_assignments[r] // TOP_K if GATHER_A (rows of a token-order A, gathered inside the tile
             load, no permuted copy), else r (A already in sorted order).

B is addressed through its strides, so a transposed weight is just other strides: the backward's
dX = dGate @ W_gate^T + dUp @ W_up^T runs here with CONCAT_K and B, B2 = W_gate, W_up read transposed.
STORE_PREACT keeps the gate and up products beside h for the backward's dActivation (see
grouped_gemm_bwd.py), which rebuilds the pre-activations from them (products without the weight, so
the routing weight's gradient needs no division by it); the down projection then reads h with row
stride 3N. With every option off (plain SwiGLU, the weight on the output, no biases) the constexpr
flags leave exactly the plain kernel.

Tiling: a program computes a BLOCK_M x BLOCK_N tile of one row block, looping over K in BLOCK_K
steps. With SPLIT_M > 1 each of the dispatch's row blocks is cut into SPLIT_M tiles of BLOCK_M rows,
so one GEMM can use smaller tiles than the row blocks the others share: an expert whose rows just pass
a multiple of the block then pays for a part of it, not for a whole mostly empty block. With GATED,
the A tile is loaded once and multiplied by both B tiles (two accumulators).
SPLIT_K > 1 adds a second grid axis over K slices: with few rows per expert and a long K (Mixtral's
down projection has K = 14336), whole-K tiles are too few to fill the card evenly. The partial sums
go to separate float32 planes, and the combine adds them in a fixed order, so no atomics are needed.
With TMA (16-bit operands, K a multiple of BLOCK_K) the weight tiles, and the down projection's
sorted A rows, arrive through tensor descriptors (Hopper's bulk tensor copies, built on the device
in the per-program scratch that jaxmoe.launch supplies, or with HOST_TMA built on the host by the
launch and passed in place of the pointers) instead of per-thread pointer loads. B is
viewed as [E*K, N]: K tiles never cross into the next expert because BLOCK_K divides K, and columns
past N read 0. An A tile may read rows past its expert's end (the next expert's rows, or zeros past
the last row); those rows are computed and never stored, and GEMM rows are independent, so a
non-finite value there reaches no output.
Program ids are swizzled in groups of GROUP_M row blocks so that consecutive programs reuse the
same B tiles from L2: one expert's weights are far larger than L2 when T is large, and without the
swizzle every row block would stream them from memory again.

The grid is static (worst-case number of row blocks x N tiles); blocks with expert -1 return at
once, so empty experts and unused worst-case blocks cost a few cycles. Row, expert and column
offsets are int64 because row * stride and expert * d * f pass 2^31 on large models.

Compile-time values are the model's (shapes, strides, tiles, flags); what follows the token count
(n_blocks, n_assignments) is a runtime argument, so every batch size reuses one compiled kernel.
"""

import triton
import triton.language as tl

from .epilogue import activation, clamp_decisions, expert_bias


@triton.jit
def _round_to_tf32(x):
    """Round-to-nearest to tf32's 10 mantissa bits, in portable integer ops.

    Tensor cores given float32 operands at tf32 precision drop the low 13 mantissa bits (truncation),
    which biases every product; rounding first brings the error down to what XLA's tf32 dots show.
    NaN passes through unchanged: adding to the bits of 0x7FFFFFFF (the NaN GPUs produce) would wrap
    around to -0.0 and hide it.
    """
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x1000) & 0xFFFFE000
    return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))


@triton.jit
def program_tile(n_blocks, N, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row block, N tile) of this program, swizzled in groups of GROUP_M row blocks for L2 reuse of B."""
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(N, BLOCK_N)
    programs_per_group = GROUP_M * n_tiles
    group = pid // programs_per_group
    first_block = group * GROUP_M
    group_size = min(n_blocks - first_block, GROUP_M)
    block = first_block + (pid % programs_per_group) % group_size
    tile_n = (pid % programs_per_group) // group_size
    return block, tile_n


@triton.jit
def tile_start(tile_m, block_experts_ptr, block_rows_ptr, expert_offsets_ptr, BLOCK_M: tl.constexpr,
               SPLIT_M: tl.constexpr):
    """(expert, first sorted row, end row of the expert) of row tile tile_m; expert -1 for a dead tile.

    Row tile tile_m is part tile_m % SPLIT_M of the dispatch's row block tile_m // SPLIT_M: BLOCK_M rows
    from block_rows + part * BLOCK_M. A part that starts past its expert's last row is dead, as are
    blocks with expert -1 (empty experts, unused worst-case blocks)."""
    block = tile_m // SPLIT_M
    expert = tl.load(block_experts_ptr + block)
    first_row = tl.load(block_rows_ptr + block) + (tile_m % SPLIT_M) * BLOCK_M
    end_row = tl.load(expert_offsets_ptr + tl.maximum(expert, 0) + 1)
    if SPLIT_M > 1:
        expert = tl.where(first_row < end_row, expert, -1)
    return expert, first_row, end_row


@triton.jit
def block_rows(expert, first_row, end_row, sorted_assignments_ptr, BLOCK_M: tl.constexpr):
    """(expert as int64, sorted rows of a live row tile, which of them are valid, their assignments)."""
    expert = expert.to(tl.int64)
    rows = first_row + tl.arange(0, BLOCK_M)
    row_ok = rows < end_row
    assignments = tl.load(sorted_assignments_ptr + rows, mask=row_ok, other=0)
    return expert, rows, row_ok, assignments


@triton.jit
def load_a_tile(a_ptrs, row_ok, k_ok, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """A [BLOCK_M, BLOCK_K] tile: rows past the block's end (and K past the end unless EVEN_K) read 0."""
    if EVEN_K:
        a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
    else:
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
    if DOT_PRECISION == "tf32":
        a = _round_to_tf32(a)
    return a


@triton.jit
def load_b_tile(b_ptrs, col_ok, k_ok, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """A [BLOCK_K, BLOCK_N] tile: columns past N (and K past the end unless EVEN_K) read 0."""
    if EVEN_K:
        b = tl.load(b_ptrs, mask=col_ok[None, :], other=0.0)
    else:
        b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
    if DOT_PRECISION == "tf32":
        b = _round_to_tf32(b)
    return b


@triton.jit
def accumulate(acc, a_ptr, a_rows, row_ok, stride_am, b_ptr, cols, col_ok, k_first, k_last,
               stride_bk, stride_bn, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc += A[a_rows, k_first:k_last] @ B[k_first:k_last, cols], B already offset to its expert."""
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + (k_first + ks)[None, :]
    b_ptrs = b_ptr + (k_first + ks)[:, None] * stride_bk + cols[None, :] * stride_bn
    for k0 in range(k_first, k_last, BLOCK_K):
        k_ok = ks < k_last - k0  # unused when EVEN_K
        a = load_a_tile(a_ptrs, row_ok, k_ok, EVEN_K, DOT_PRECISION)
        b = load_b_tile(b_ptrs, col_ok, k_ok, EVEN_K, DOT_PRECISION)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_bk
    return acc


@triton.jit
def accumulate_tma(acc, acc2, a_desc, a_ptr, a_rows, row_ok, stride_am, first_row, b_desc, b2_desc, b_row, col,
                   k_first, k_last, BLOCK_K: tl.constexpr, TMA_A: tl.constexpr, GATED: tl.constexpr):
    """acc (+ acc2 if GATED) += A[rows, k_first:k_last] @ B_2d[b_row + k_first : b_row + k_last, col:] (and B2),
    the weights through their descriptors; A through its descriptor from first_row if TMA_A, else
    gathered at a_rows. One A tile serves both weights."""
    if TMA_A:  # a_ptr may itself be the descriptor (host-built): no pointer arithmetic on it
        for k0 in range(k_first, k_last, BLOCK_K):
            a = a_desc.load([first_row, k0])
            acc = tl.dot(a, b_desc.load([b_row + k0, col]), acc)
            if GATED:
                acc2 = tl.dot(a, b2_desc.load([b_row + k0, col]), acc2)
    else:
        ks = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + a_rows[:, None] * stride_am + (k_first + ks)[None, :]
        for k0 in range(k_first, k_last, BLOCK_K):
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
            acc = tl.dot(a, b_desc.load([b_row + k0, col]), acc)
            if GATED:
                acc2 = tl.dot(a, b2_desc.load([b_row + k0, col]), acc2)
            a_ptrs += BLOCK_K
    return acc, acc2


@triton.jit
def grouped_gemm_kernel(
    # pointers
    a_ptr,  # [rows of A, K]: x [T, K] if GATHER_A, else sorted activations [n_assignments, K] (2K if CONCAT_K)
    b_ptr,  # [E, K, N] through its strides
    b2_ptr,  # [E, K, N], read only if GATED or CONCAT_K
    row_weights_ptr,  # [n_assignments] float32, read only if SCALE_ROWS or WEIGHT_ON_INPUT
    bias_ptr,  # [E, N] in B's dtype, read only if HAS_BIAS
    bias2_ptr,  # [E, N], read only if HAS_BIAS and GATED (the up projection's)
    sorted_assignments_ptr,  # [n_assignments] int32
    expert_offsets_ptr,  # [E + 1] int32
    block_experts_ptr,  # [n_blocks] int32
    block_rows_ptr,  # [n_blocks] int32
    # dimensions that follow the token count: runtime, so a new batch size compiles nothing new
    n_blocks,
    n_assignments,  # T * TOP_K: the rows of each SPLIT_K output plane
    # outputs
    out_ptr,  # [n_assignments, N] sorted order ([n_assignments, 3N] with STORE_PREACT; [SPLIT_K, ...])
    clamps_ptr,  # [n_assignments, N] uint8, written only with STORE_PREACT and clamped_swiglu
    # shapes and strides are the model's, so constexpr: the compiler must know they are multiples of 8
    # elements to emit 16-byte vector loads and asynchronous copies (jax-triton passes int scalars
    # without that hint)
    N: tl.constexpr,
    K: tl.constexpr,
    TOP_K: tl.constexpr,
    stride_am: tl.constexpr,
    stride_be: tl.constexpr,
    stride_bk: tl.constexpr,
    stride_bn: tl.constexpr,
    stride_om: tl.constexpr,
    # meta-parameters
    BLOCK_M: tl.constexpr,  # rows of a tile: the dispatch's row block / SPLIT_M
    SPLIT_M: tl.constexpr,  # row tiles per dispatch row block
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    GATHER_A: tl.constexpr,
    GATED: tl.constexpr,
    STORE_PREACT: tl.constexpr,
    SCALE_ROWS: tl.constexpr,
    WEIGHT_ON_INPUT: tl.constexpr,  # GATED only: the row weight scales gate and up before the bias
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,  # GATED only: "swiglu" or "clamped_swiglu"
    ALPHA: tl.constexpr,  # clamped_swiglu's sigmoid slope (0.0 for swiglu)
    LIMIT: tl.constexpr,  # clamped_swiglu's clamp (0.0 for swiglu)
    CONCAT_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    K_PER_SPLIT: tl.constexpr,  # a multiple of BLOCK_K
    DOT_PRECISION: tl.constexpr,
    TMA: tl.constexpr,  # B (and A unless GATHER_A) through tensor descriptors: 16-bit, EVEN_K, no CONCAT_K
    E: tl.constexpr,  # experts in B (read only with TMA: the descriptor's row count)
    HOST_TMA: tl.constexpr,  # with TMA: a_ptr (unless GATHER_A), b_ptr and b2_ptr (if GATED) are descriptors
):
    tile_m, tile_n = program_tile(n_blocks * SPLIT_M, N, BLOCK_N, GROUP_M)
    expert, first_row, end_row = tile_start(tile_m, block_experts_ptr, block_rows_ptr, expert_offsets_ptr,
                                            BLOCK_M, SPLIT_M)
    if expert < 0:  # an empty expert's, an unused worst-case block or a part past its expert's rows
        return
    expert, rows, row_ok, assignments = block_rows(expert, first_row, end_row, sorted_assignments_ptr, BLOCK_M)
    if GATHER_A:
        a_rows = (assignments // TOP_K).to(tl.int64)
    else:
        a_rows = rows.to(tl.int64)

    cols = tile_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    k_first = tl.program_id(1) * K_PER_SPLIT
    k_last = min(k_first + K_PER_SPLIT, K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # the up projection's, with GATED
    if TMA:
        # B viewed as [E*K, N] (stride_bn == 1); descriptor offsets are int32: E*K < 2^31 (launcher).
        if HOST_TMA:  # the same views, built on the host (jaxmoe.launch.HostDescriptor)
            b_desc = b_ptr
            b2_desc = b2_ptr if GATED else b_ptr
            a_desc = b_ptr if GATHER_A else a_ptr
        else:
            b_desc = tl.make_tensor_descriptor(b_ptr, shape=[E * K, N], strides=[stride_bk, 1],
                                               block_shape=[BLOCK_K, BLOCK_N])
            b2_desc = b_desc  # a stand-in, unused unless GATED
            if GATED:
                b2_desc = tl.make_tensor_descriptor(b2_ptr, shape=[E * K, N], strides=[stride_bk, 1],
                                                    block_shape=[BLOCK_K, BLOCK_N])
            a_desc = b_desc  # a stand-in, unused when GATHER_A
            if not GATHER_A:
                a_desc = tl.make_tensor_descriptor(a_ptr, shape=[n_assignments, K], strides=[stride_am, 1],
                                                   block_shape=[BLOCK_M, BLOCK_K])
        acc, acc2 = accumulate_tma(acc, acc2, a_desc, a_ptr, a_rows, row_ok, stride_am, first_row, b_desc, b2_desc,
                                   expert.to(tl.int32) * K, tile_n * BLOCK_N, k_first, k_last, BLOCK_K,
                                   not GATHER_A, GATED)
    elif GATED:
        # The A tile is loaded once for both weights, so this loop is written out rather than
        # calling accumulate() twice.
        ks = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + a_rows[:, None] * stride_am + (k_first + ks)[None, :]
        b_offsets = expert * stride_be + (k_first + ks)[:, None] * stride_bk + cols[None, :] * stride_bn
        b_ptrs = b_ptr + b_offsets
        b2_ptrs = b2_ptr + b_offsets
        for k0 in range(k_first, k_last, BLOCK_K):
            k_ok = ks < k_last - k0  # unused when EVEN_K
            a = load_a_tile(a_ptrs, row_ok, k_ok, EVEN_K, DOT_PRECISION)
            b = load_b_tile(b_ptrs, col_ok, k_ok, EVEN_K, DOT_PRECISION)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
            b2 = load_b_tile(b2_ptrs, col_ok, k_ok, EVEN_K, DOT_PRECISION)
            acc2 = tl.dot(a, b2, acc2, input_precision=DOT_PRECISION)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K * stride_bk
            b2_ptrs += BLOCK_K * stride_bk
    else:
        acc = accumulate(acc, a_ptr, a_rows, row_ok, stride_am, b_ptr + expert * stride_be, cols, col_ok,
                         k_first, k_last, stride_bk, stride_bn, BLOCK_K, EVEN_K, DOT_PRECISION)
        if CONCAT_K:
            acc = accumulate(acc, a_ptr + K, a_rows, row_ok, stride_am, b2_ptr + expert * stride_be, cols,
                             col_ok, k_first, k_last, stride_bk, stride_bn, BLOCK_K, EVEN_K, DOT_PRECISION)

    out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :]
    if SPLIT_K > 1:
        # Planes are n_assignments * N apart (int64: it passes 2^31 for large batches). The product
        # with the constexpr N keeps N's alignment known to the compiler, as a constexpr stride would.
        out_ptrs += tl.program_id(1).to(tl.int64) * n_assignments * N
    out_ok = row_ok[:, None] & col_ok[None, :]
    if GATED:
        if STORE_PREACT:
            tl.store(out_ptrs + N, acc.to(out_ptr.dtype.element_ty), mask=out_ok)
            tl.store(out_ptrs + 2 * N, acc2.to(out_ptr.dtype.element_ty), mask=out_ok)
        if WEIGHT_ON_INPUT:
            w = tl.load(row_weights_ptr + assignments, mask=row_ok, other=0.0)[:, None]
            acc = acc * w
            acc2 = acc2 * w
        if HAS_BIAS:
            acc += expert_bias(bias_ptr, expert, cols, col_ok, N)
            acc2 += expert_bias(bias2_ptr, expert, cols, col_ok, N)
        if STORE_PREACT:
            if ACTIVATION == "clamped_swiglu":
                clamps_ptrs = clamps_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :]
                tl.store(clamps_ptrs, clamp_decisions(acc, acc2, LIMIT), mask=out_ok)
        acc = activation(acc, acc2, ACTIVATION, ALPHA, LIMIT)
    elif HAS_BIAS:
        if SPLIT_K == 1:
            acc += expert_bias(bias_ptr, expert, cols, col_ok, N)
        elif tl.program_id(1) == 0:  # the first plane alone carries the bias (the combine adds the planes)
            acc += expert_bias(bias_ptr, expert, cols, col_ok, N)
    if SCALE_ROWS:
        acc = acc * tl.load(row_weights_ptr + assignments, mask=row_ok, other=0.0)[:, None]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_ok)
