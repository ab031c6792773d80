"""Top-k routing: scores, selection bias, top-k and renormalisation for a block of tokens.

    probs[t]  = softmax(logits[t]) or sigmoid(logits[t])
    ids[t]    = top_k(probs[t] + bias), lower id first on ties, NaN above every number
    weights[t] = probs[t, ids[t]] / (sum of them (+ RENORM_EPS), if RENORMALIZE) * SCALE

and, per program, the sums over its tokens that the aux losses need (jaxmoe.reference.RouterStats;
the caller adds up the programs' partial sums in one fixed order, so the totals are deterministic):

    expert_counts[e, p] = #{(t, j) : ids[t, j] = e},   prob_sums[e, p] = sum_t probs[t, e],
    z_squared[p] = sum_t logsumexp(logits[t])^2

(t over program p's tokens; expert-major, so the caller's sums over programs run along contiguous rows).

With FINALIZE (a launch of at most MAX_PROGRAMS programs, as a decode step's is), the kernel also adds
up the programs' sums and applies the aux-loss formulas (jaxmoe.reference.finalize_aux), so that no
XLA reduction follows it (those were five small launches; without them a Qwen3 or DeepSeek decode step
took about 5 us less on an H200): each program stores its sums, then takes a ticket from an integer
counter (zeroed by the launch); the program that takes the last ticket reads every program's sums and
writes

    expert_counts[e] = sum_p counts[e, p]
    load_balancing = E * sum_e counts_e / (T * TOP_K) * prob_sums_e / T,  z_loss = sum_p z_squared[p] / T
    (T at least 1)

It sums along a fixed tile, so the result does not depend on which program finishes last, and the
only atomic is the integer ticket.

Tiling: each program owns BLOCK_T tokens; each warp owns whole rows (BLOCK_E >= E, a power of two),
so softmax and top-k are row reductions in registers and warp shuffles, with no shared memory or
barriers between the k rounds (a decode step's routing is a chain of such rounds; with each row
spread over 4 warps it took 27 us for Qwen3's 16 tokens on an H200). Only the per-program sums over
tokens cross warps, once each, at the end.

Top-k is TOP_K rounds of one max each, over a 64-bit key per expert that orders (score, lower id):
the score's float bits mapped to an integer of the same order in the high half (NaN above every
number, as jaxmoe.routing.score_keys orders the reference), BLOCK_E - 1 - id in the low half. A
picked expert's key drops to the minimum, below every real expert's, so it is never picked twice.
Without a bias the score is the weight, so the weight is decoded from the key; with a bias it is
summed out of the probs.
"""

import triton
import triton.language as tl


# Keys below every real expert's: experts past E, then experts already picked.
_NOT_A_CANDIDATE = tl.constexpr(-(2**31))
_PICKED = tl.constexpr(-(2**63))


@triton.jit
def _score_key(score):
    """int32 with the order of the float32 scores: negative floats have their magnitude bits flipped;
    every NaN maps to the largest key. -inf stays above _NOT_A_CANDIDATE."""
    bits = score.to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return tl.where(score != score, 0x7FFFFFFF, key)


@triton.jit
def _score_of_key(key):
    """The float32 score of a _score_key (a NaN for the NaN key: 0x7FFFFFFF is a NaN's bits)."""
    bits = key ^ ((key >> 31) & 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def topk_routing_kernel(
    # pointers
    logits_ptr,  # [T, E] float32
    bias_ptr,  # [E] float32 (read only if HAS_BIAS)
    # dimensions
    T,
    # outputs
    weights_ptr,  # [T, TOP_K] float32
    ids_ptr,  # [T, TOP_K] int32
    probs_ptr,  # [T, E] float32
    counts_ptr,  # [E, programs] int32
    prob_sums_ptr,  # [E, programs] float32
    z_squared_ptr,  # [programs] float32
    counter_ptr,  # [1] int32, zeroed by the launch (read only with FINALIZE)
    expert_counts_ptr,  # [E] int32 (written only with FINALIZE)
    load_balancing_ptr,  # [1] float32 (written only with FINALIZE)
    z_loss_ptr,  # [1] float32 (written only with FINALIZE)
    # meta-parameters
    E: tl.constexpr,  # the row stride: constexpr so loads of whole rows vectorise
    TOP_K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SIGMOID: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    RENORM_EPS: tl.constexpr,  # > 0: weights / (sum + RENORM_EPS) (DeepSeek's 1e-20); 0: guarded by float32 tiny
    SCALE: tl.constexpr,  # the routed scaling factor, applied after renormalisation
    HAS_BIAS: tl.constexpr,
    FINALIZE: tl.constexpr,
    MAX_PROGRAMS: tl.constexpr,  # with FINALIZE: a power of two, at least the programs
):
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    experts = tl.arange(0, BLOCK_E)
    token_ok = tokens < T
    expert_ok = experts < E
    tile_ok = token_ok[:, None] & expert_ok[None, :]

    logits = tl.load(logits_ptr + tokens[:, None] * E + experts[None, :], mask=tile_ok, other=-float("inf"))
    if SIGMOID:
        probs = tl.sigmoid(logits)
    else:
        # Padded rows are all -inf; subtracting a finite stand-in keeps them free of NaN.
        row_max = tl.max(logits, axis=1)
        row_max = tl.where(token_ok, row_max, 0.0)
        numer = tl.exp(logits - row_max[:, None])
        denom = tl.where(token_ok, tl.sum(numer, axis=1), 1.0)
        probs = numer / denom[:, None]
    probs = tl.where(tile_ok, probs, 0.0)
    tl.store(probs_ptr + tokens[:, None] * E + experts[None, :], probs, mask=tile_ok)

    # logsumexp as jax.nn.logsumexp computes it: an infinite row maximum is replaced by 0, so a row of
    # -inf gives -inf and a row holding +inf gives +inf; a NaN anywhere in the row gives NaN.
    lse_max = tl.max(logits, axis=1)
    lse_max = tl.where((lse_max == lse_max) & (tl.abs(lse_max) != float("inf")), lse_max, 0.0)
    lse = tl.log(tl.sum(tl.exp(logits - lse_max[:, None]), axis=1)) + lse_max
    program = tl.program_id(0)
    partial_sums = experts.to(tl.int64) * tl.num_programs(0) + program  # [E, programs] offsets
    tl.store(z_squared_ptr + program, tl.sum(tl.where(token_ok, lse * lse, 0.0), axis=0))
    tl.store(prob_sums_ptr + partial_sums, tl.sum(probs, axis=0), mask=expert_ok)

    scores = probs + 0.0  # + 0.0 turns -0.0 into +0.0, which the float comparison ties with it
    if HAS_BIAS:
        scores = scores + tl.load(bias_ptr + experts, mask=expert_ok, other=0.0)[None, :]
    keys = tl.where(expert_ok[None, :], _score_key(scores), _NOT_A_CANDIDATE)
    keys = (keys.to(tl.int64) << 32) | (BLOCK_E - 1 - experts)[None, :].to(tl.int64)

    slots = tl.arange(0, BLOCK_K)
    picked_ids = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)
    picked_weights = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    for slot in tl.static_range(TOP_K):
        best = tl.max(keys, axis=1)
        best_id = BLOCK_E - 1 - (best & 0xFFFFFFFF).to(tl.int32)
        chosen = experts[None, :] == best_id[:, None]
        if HAS_BIAS:
            weight = tl.sum(tl.where(chosen, probs, 0.0), axis=1)
        else:
            weight = _score_of_key((best >> 32).to(tl.int32))
        picked_ids = tl.where(slots[None, :] == slot, best_id[:, None], picked_ids)
        picked_weights = tl.where(slots[None, :] == slot, weight[:, None], picked_weights)
        keys = tl.where(chosen, _PICKED, keys)

    # Picked experts hold _PICKED keys now (every other key is above it).
    picked = token_ok[:, None] & (keys == _PICKED)
    tl.store(counts_ptr + partial_sums, tl.sum(picked.to(tl.int32), axis=0), mask=expert_ok)

    if FINALIZE:
        # The barrier orders every warp's stores of this program's sums before the one atomic, whose
        # release publishes them; the last ticket's acquire makes every program's sums visible to it.
        # (Taken before the stores below, so the release need not wait for them.)
        tl.debug_barrier()
        ticket = tl.atomic_add(counter_ptr, 1, sem="acq_rel")

    if RENORMALIZE:
        if RENORM_EPS > 0:
            total = tl.sum(picked_weights, axis=1) + RENORM_EPS
        else:
            # float32 tiny guards sigmoid weights that all underflow; a NaN sum stays NaN, as in jnp.maximum
            total = tl.maximum(tl.sum(picked_weights, axis=1), 1.1754943508222875e-38,
                               propagate_nan=tl.PropagateNan.ALL)
        picked_weights = picked_weights / total[:, None]
    if SCALE != 1.0:
        picked_weights = picked_weights * SCALE
    out_ok = token_ok[:, None] & (slots[None, :] < TOP_K)
    out_offsets = tokens[:, None] * TOP_K + slots[None, :]
    tl.store(ids_ptr + out_offsets, picked_ids, mask=out_ok)
    tl.store(weights_ptr + out_offsets, picked_weights, mask=out_ok)

    if FINALIZE:
        if ticket == tl.num_programs(0) - 1:
            _finalize(T, counts_ptr, prob_sums_ptr, z_squared_ptr, expert_counts_ptr, load_balancing_ptr, z_loss_ptr,
                      E, TOP_K, BLOCK_E, MAX_PROGRAMS)


@triton.jit
def _finalize(T, counts_ptr, prob_sums_ptr, z_squared_ptr, expert_counts_ptr, load_balancing_ptr, z_loss_ptr,
              E: tl.constexpr, TOP_K: tl.constexpr, BLOCK_E: tl.constexpr, MAX_PROGRAMS: tl.constexpr):
    """Every program's sums added up, and the aux losses (the formulas of jaxmoe.reference.finalize_aux).

    The loads are volatile: they bypass this SM's L1, which is not coherent with other SMs' stores."""
    programs = tl.num_programs(0)
    experts = tl.arange(0, BLOCK_E)
    ps = tl.arange(0, MAX_PROGRAMS)
    ok = (experts < E)[:, None] & (ps < programs)[None, :]
    offsets = experts[:, None] * programs + ps[None, :]
    counts = tl.sum(tl.load(counts_ptr + offsets, mask=ok, other=0, volatile=True), axis=1)
    prob_sums = tl.sum(tl.load(prob_sums_ptr + offsets, mask=ok, other=0.0, volatile=True), axis=1)
    z_squared = tl.sum(tl.load(z_squared_ptr + ps, mask=ps < programs, other=0.0, volatile=True), axis=0)
    tl.store(expert_counts_ptr + experts, counts, mask=experts < E)
    tokens = tl.maximum(T, 1).to(tl.float32)
    share = counts.to(tl.float32) / (tokens * TOP_K)
    tl.store(load_balancing_ptr, E * tl.sum(share * (prob_sums / tokens), axis=0))
    tl.store(z_loss_ptr, z_squared / tokens)
