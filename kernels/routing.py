"""Top-k routing: scores, selection bias, top-k and renormalisation for a block of tokens.

Tiling: each program owns BLOCK_T tokens and the whole expert row (BLOCK_E >= E, a power of two),
so softmax and top-k are row reductions in registers. Top-k is TOP_K rounds of "take the max, break
ties by the lowest id, mask it out"; selected weights collect in a [BLOCK_T, BLOCK_K] tile so that
renormalisation and the stores happen once.

    probs[t]  = softmax(logits[t]) or sigmoid(logits[t])
    ids[t]    = top_k(probs[t] + bias), lower id first on ties, NaN above every number
    weights[t] = probs[t, ids[t]] / (sum of them, if RENORMALIZE)
"""

import triton
import triton.language as tl


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
    # meta-parameters
    E: tl.constexpr,  # the row stride: constexpr so loads of whole rows vectorise
    TOP_K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SIGMOID: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
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

    scores = probs
    if HAS_BIAS:
        scores = scores + tl.load(bias_ptr + experts, mask=expert_ok, other=0.0)[None, :]
    scores = tl.where(expert_ok[None, :], scores, -float("inf"))

    slots = tl.arange(0, BLOCK_K)
    picked_ids = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)
    picked_weights = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    for slot in tl.static_range(TOP_K):
        # NaN ranks above every number, as in jax.lax.top_k, so a token with a NaN score still picks
        # experts (its NaN weights then reach its output) instead of matching none and being dropped.
        is_nan = scores != scores
        row_has_nan = tl.max(is_nan.to(tl.int32), axis=1) > 0
        best = tl.max(tl.where(is_nan, -float("inf"), scores), axis=1)
        hit = tl.where(row_has_nan[:, None], is_nan, scores == best[:, None])
        best_id = tl.min(tl.where(hit, experts[None, :], BLOCK_E), axis=1)
        chosen = experts[None, :] == best_id[:, None]
        weight = tl.sum(tl.where(chosen, probs, 0.0), axis=1)
        picked_ids = tl.where(slots[None, :] == slot, best_id[:, None], picked_ids)
        picked_weights = tl.where(slots[None, :] == slot, weight[:, None], picked_weights)
        scores = tl.where(chosen, -float("inf"), scores)

    if RENORMALIZE:
        total = tl.maximum(tl.sum(picked_weights, axis=1), 1.1754943508222875e-38)  # float32 tiny
        picked_weights = picked_weights / total[:, None]
    out_ok = token_ok[:, None] & (slots[None, :] < TOP_K)
    out_offsets = tokens[:, None] * TOP_K + slots[None, :]
    tl.store(ids_ptr + out_offsets, picked_ids, mask=out_ok)
    tl.store(weights_ptr + out_offsets, picked_weights, mask=out_ok)
