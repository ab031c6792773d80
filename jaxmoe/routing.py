"""Routing and top-k in jax.lax: the specification the Triton routing kernel is held against."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxmoe import _validate


class Routing(NamedTuple):
    """Which experts each token goes to, and with what weight."""

    weights: jax.Array  # [T, k] float32
    ids: jax.Array  # [T, k] int32
    probs: jax.Array  # [T, E] float32, the scores before selection (for aux losses)


def expert_probs(logits: jax.Array, scoring: str) -> jax.Array:
    logits = logits.astype(jnp.float32)
    if scoring == "softmax":
        return jax.nn.softmax(logits, axis=-1)
    return jax.nn.sigmoid(logits)


def selected_weights(probs: jax.Array, ids: jax.Array, renormalize: bool) -> jax.Array:
    """probs at the selected ids, renormalised to sum to one per token when asked."""
    weights = jnp.take_along_axis(probs, ids, axis=-1)
    if renormalize:
        # max() only guards sigmoid scores that all underflow to 0; for any normal sum it is a no-op.
        weights = weights / jnp.maximum(weights.sum(-1, keepdims=True), jnp.finfo(jnp.float32).tiny)
    return weights


def score_keys(scores: jax.Array) -> jax.Array:
    """int32 keys in the order of the float32 scores, every NaN above every number, -0.0 tied with 0.0.

    jax.lax.top_k's own NaN order differs between backends (a NaN ranked last on CPUs with jax 0.11),
    so a token whose score for one expert is NaN could drop that expert and hide the NaN; ranking it
    first sends the NaN to the token's output. The Triton routing kernel orders by the same keys.
    """
    scores = scores.astype(jnp.float32) + 0.0  # + 0.0 turns -0.0 into +0.0
    bits = jax.lax.bitcast_convert_type(scores, jnp.int32)
    keys = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: flip the magnitude bits
    return jnp.where(jnp.isnan(scores), jnp.iinfo(jnp.int32).max, keys)


def route(logits, top_k: int, *, scoring: str = "softmax", renormalize: bool = True, bias=None) -> Routing:
    """Picks top_k experts per token.

    Args:
      logits: [T, E] router logits; the math runs in float32.
      top_k: experts per token, 1 <= top_k <= E.
      scoring: "softmax" or "sigmoid", applied to the logits to give probs.
      renormalize: divide the selected probs by their sum.
      bias: optional [E] added to probs for selection only (DeepSeek-V3's load-balancing bias);
        the weights are always probs at the selected ids.

    Ties go to the lower expert id; a NaN score ranks above every number (see score_keys).
    """
    top_k = _validate.check_route_args(logits, top_k, scoring, bias)
    probs = expert_probs(logits, scoring)
    selection_scores = probs if bias is None else probs + bias.astype(jnp.float32)
    _, ids = jax.lax.top_k(score_keys(selection_scores), top_k)  # lower index first on ties
    ids = ids.astype(jnp.int32)
    return Routing(selected_weights(probs, ids, renormalize), ids, probs)
