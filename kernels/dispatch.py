"""Dispatch: a stable sort of the T*k assignments by expert, plus the GEMMs' block-to-expert map.

Assignment a = t * k + j sends token t to expert ids[t, j]. No atomics: every position comes from
integer prefix sums, so the order within an expert is assignment order and runs are reproducible.

1. count_chunks_kernel (skipped when one chunk holds everything, or with RECOUNT when the chunks are
   so few, as at a decode step, that each scatter program counts all assignments itself sooner than
   a launch would): program c counts, per expert, the assignments of its CHUNK-long slice
                                                                      -> chunk_counts [n_chunks, E]
2. chunk_prefix_kernel (skipped with few chunks, as a decode step has: then each scatter program
   sums all chunks' counts itself, in one tile): per expert, the exclusive prefix sum over chunks
   and the total                                   -> chunk_before [n_chunks, E], expert_totals [E]
3. scatter_kernel: program c takes the expert totals (their prefix sum is where each expert's rows
   start) and its own row of chunk_before (the rows of each expert in earlier chunks), then ranks
   each assignment among the earlier ones of its expert in the slice (a cumulative sum of one-hot
   rows) and writes
       sorted_assignments[expert_offsets[e] + rows of e in chunks < c + rank] = a
       assignment_rows[a] = that sorted row (-1 for assignments that are not local, below).
   The same programs also write the map from GEMM row blocks to experts, a strided share each:
   expert e owns cdiv(count_e, BLOCK_M) blocks, and block b of the concatenation starts at sorted
   row block_rows[b]. Blocks past the last real one get expert -1, so the GEMMs, launched over a
   static worst-case grid, skip them on the device.
The prefix pass keeps every program's reads short, so chunks can be small and many: with each
scatter program summing all chunks' counts itself, its reads grew with the square of the chunk
count, and Qwen3's dispatch at T=8192 took 57 us on an H200 in 128 chunks of 512 assignments.

Local expert range: this device holds experts expert_first .. expert_first + E - 1 (expert_first is 0
on one device; under expert parallelism, jaxmoe/sharding.py, each device holds E of the global
experts). Every id is read as local = id - expert_first, and an assignment is local iff
0 <= local < E. A non-local assignment belongs to another device (or is out of range): it gets no
sorted row and assignment_rows = -1, so the GEMMs never see it, the combine adds nothing for it and
its routing weight gets a zero gradient. All the outputs (offsets, block map) are in local ids.
expert_first comes as a 1-element int32 array: jax-triton passes only Python ints as scalars.

Tiling: assignments are read SUB at a time as [SUB, BLOCK_E] one-hot tiles (BLOCK_E >= E, a power of
two), so counting and ranking are column sums and cumulative sums of small register tiles.
Non-local assignments have all-zero one-hot rows, so they are dropped. Padding exists only in index
space: rows of a block past its expert's end are masked by the GEMMs, never copied.

n_assignments, n_chunks and n_blocks follow the token count and are runtime arguments. The tile
sizes (CHUNK, SUB, CHUNK_TILE, EXPERT_TILE, BLOCK_TILE) shape register tiles and so are compile-time; the
launcher picks them from a power-of-two bucket of n_assignments (jaxmoe/ops/dispatch.py), so batch
sizes of one bucket share a compile.
"""

import triton
import triton.language as tl


@triton.jit
def _is_local(local, E: tl.constexpr):
    """The local-expert-range rule: an assignment is this device's iff its local id is in [0, E)."""
    return (local >= 0) & (local < E)


@triton.jit
def _one_hot(ids_ptr, first, n_assignments, expert_first, E: tl.constexpr, SUB: tl.constexpr,
             BLOCK_E: tl.constexpr):
    """[SUB, BLOCK_E] int32 one-hot rows (local ids) of assignments first .. first+SUB, the rows, and
    their local ids; rows of non-local assignments and rows past the end are all zero."""
    rows = first + tl.arange(0, SUB)
    in_range = rows < n_assignments
    local = tl.load(ids_ptr + rows, mask=in_range, other=0) - expert_first
    local = tl.where(in_range & _is_local(local, E), local, -1)
    experts = tl.arange(0, BLOCK_E)
    hit = local[:, None] == experts[None, :]
    return hit.to(tl.int32), rows, local


@triton.jit
def _count_chunk(ids_ptr, chunk, n_assignments, expert_first, E: tl.constexpr, CHUNK: tl.constexpr,
                 SUB: tl.constexpr, BLOCK_E: tl.constexpr):
    counts = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for sub in range(0, CHUNK, SUB):
        hit, _, _ = _one_hot(ids_ptr, tl.cast(chunk, tl.int64) * CHUNK + sub, n_assignments, expert_first, E, SUB,
                             BLOCK_E)
        counts += tl.sum(hit, axis=0)
    return counts


@triton.jit
def count_chunks_kernel(
    ids_ptr,  # [n_assignments] int32, global expert ids
    expert_first_ptr,  # [1] int32: the first expert of the local range
    n_assignments,
    chunk_counts_ptr,  # [n_chunks, E] int32
    E: tl.constexpr,
    CHUNK: tl.constexpr,
    SUB: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    chunk = tl.program_id(0)
    counts = _count_chunk(ids_ptr, chunk, n_assignments, tl.load(expert_first_ptr), E, CHUNK, SUB, BLOCK_E)
    experts = tl.arange(0, BLOCK_E)
    tl.store(chunk_counts_ptr + chunk.to(tl.int64) * E + experts, counts, mask=experts < E)


@triton.jit
def chunk_prefix_kernel(
    chunk_counts_ptr,  # [n_chunks, E] int32
    n_chunks,
    chunk_before_ptr,  # [n_chunks, E] int32: assignments of each expert in earlier chunks
    expert_totals_ptr,  # [E] int32
    E: tl.constexpr,
    CHUNK_TILE: tl.constexpr,
    EXPERT_TILE: tl.constexpr,
):
    """Program g scans the chunk counts of experts [g * EXPERT_TILE, (g + 1) * EXPERT_TILE)."""
    experts = tl.program_id(0) * EXPERT_TILE + tl.arange(0, EXPERT_TILE)
    expert_ok = experts < E
    carry = tl.zeros((EXPERT_TILE,), dtype=tl.int32)
    for first in range(0, n_chunks, CHUNK_TILE):
        chunks = first + tl.arange(0, CHUNK_TILE)
        ok = (chunks[:, None] < n_chunks) & expert_ok[None, :]
        offsets = chunks.to(tl.int64)[:, None] * E + experts[None, :]
        counts = tl.load(chunk_counts_ptr + offsets, mask=ok, other=0)
        tl.store(chunk_before_ptr + offsets, carry[None, :] + tl.cumsum(counts, axis=0) - counts, mask=ok)
        carry += tl.sum(counts, axis=0)
    tl.store(expert_totals_ptr + experts, carry, mask=expert_ok)


@triton.jit
def scatter_kernel(
    ids_ptr,  # [n_assignments] int32, global expert ids
    expert_first_ptr,  # [1] int32: the first expert of the local range
    chunk_counts_ptr,  # [n_chunks, E] int32 (read only without PREFIXED, with several chunks)
    chunk_before_ptr,  # [n_chunks, E] int32 (read only with PREFIXED)
    expert_totals_ptr,  # [E] int32 (read only with PREFIXED)
    n_assignments,
    n_chunks,
    n_blocks,  # static worst-case number of row blocks
    sorted_assignments_ptr,  # [n_assignments] int32: assignment at each sorted row
    assignment_rows_ptr,  # [n_assignments] int32: sorted row of each assignment, -1 if not local
    expert_offsets_ptr,  # [E + 1] int32: first sorted row of each local expert; [E] = local assignments
    block_experts_ptr,  # [n_blocks] int32: local expert of each row block, -1 past the end
    block_rows_ptr,  # [n_blocks] int32: first sorted row of each row block
    E: tl.constexpr,
    BLOCK_M: tl.constexpr,
    CHUNK: tl.constexpr,
    SUB: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_TILE: tl.constexpr,
    CHUNK_TILE: tl.constexpr,
    SINGLE_CHUNK: tl.constexpr,
    PREFIXED: tl.constexpr,  # chunk_prefix_kernel ran; else the chunks are few and summed here
    RECOUNT: tl.constexpr,  # count_chunks_kernel did not run: each program counts all assignments itself
):
    chunk = tl.program_id(0)
    experts = tl.arange(0, BLOCK_E)
    expert_ok = experts < E
    expert_first = tl.load(expert_first_ptr)

    # totals[e]: assignments of expert e; before[e]: those in chunks before this one.
    if SINGLE_CHUNK:
        totals = _count_chunk(ids_ptr, chunk, n_assignments, expert_first, E, CHUNK, SUB, BLOCK_E)
        before = tl.zeros((BLOCK_E,), dtype=tl.int32)
    elif RECOUNT:
        totals = tl.zeros((BLOCK_E,), dtype=tl.int32)
        before = tl.zeros((BLOCK_E,), dtype=tl.int32)
        for other in range(0, n_chunks):
            counts = _count_chunk(ids_ptr, other, n_assignments, expert_first, E, CHUNK, SUB, BLOCK_E)
            totals += counts
            before += tl.where(other < chunk, counts, 0)
    elif PREFIXED:
        totals = tl.load(expert_totals_ptr + experts, mask=expert_ok, other=0)
        before = tl.load(chunk_before_ptr + chunk.to(tl.int64) * E + experts, mask=expert_ok, other=0)
    else:
        chunks = tl.arange(0, CHUNK_TILE)
        counts = tl.load(chunk_counts_ptr + chunks[:, None] * E + experts[None, :],
                         mask=(chunks[:, None] < n_chunks) & expert_ok[None, :], other=0)
        totals = tl.sum(counts, axis=0)
        before = tl.sum(tl.where(chunks[:, None] < chunk, counts, 0), axis=0)
    expert_ends = tl.cumsum(totals, axis=0)
    expert_starts = expert_ends - totals

    next_row = expert_starts + before
    for sub in range(0, CHUNK, SUB):
        hit, rows, local = _one_hot(ids_ptr, chunk.to(tl.int64) * CHUNK + sub, n_assignments, expert_first, E,
                                    SUB, BLOCK_E)
        rank = tl.cumsum(hit, axis=0) - hit  # earlier rows of the same expert within this tile
        sorted_row = tl.sum(hit * (rank + next_row[None, :]), axis=1)
        is_local = local >= 0  # _one_hot marked non-local assignments -1
        in_range = rows < n_assignments
        tl.store(sorted_assignments_ptr + sorted_row, rows.to(tl.int32), mask=in_range & is_local)
        tl.store(assignment_rows_ptr + rows, tl.where(is_local, sorted_row, -1), mask=in_range)
        next_row += tl.sum(hit, axis=0)

    if chunk == 0:
        tl.store(expert_offsets_ptr + experts, expert_starts, mask=expert_ok)
        tl.store(expert_offsets_ptr + E, tl.sum(totals, axis=0))

    blocks_per_expert = (totals + BLOCK_M - 1) // BLOCK_M
    block_ends = tl.cumsum(blocks_per_expert, axis=0)
    block_starts = block_ends - blocks_per_expert
    used_blocks = tl.sum(blocks_per_expert, axis=0)
    for first in range(chunk * BLOCK_TILE, n_blocks, n_chunks * BLOCK_TILE):
        blocks = first + tl.arange(0, BLOCK_TILE)
        # Expert of block b = number of experts whose blocks all end at or before b.
        owner = tl.sum((block_ends[None, :] <= blocks[:, None]).to(tl.int32), axis=1)
        is_owner = experts[None, :] == owner[:, None]
        owner_row = tl.sum(tl.where(is_owner, expert_starts[None, :], 0), axis=1)
        owner_block = tl.sum(tl.where(is_owner, block_starts[None, :], 0), axis=1)
        live = blocks < used_blocks
        in_range = blocks < n_blocks
        tl.store(block_experts_ptr + blocks, tl.where(live, owner, -1), mask=in_range)
        tl.store(block_rows_ptr + blocks, tl.where(live, owner_row + (blocks - owner_block) * BLOCK_M, 0),
                 mask=in_range)
