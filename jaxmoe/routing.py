"""Routing and top-k in jax.lax: the specification the Triton routing kernel is held against.

`jaxmoe.Router` (jaxmoe/options.py) states the math; this is it, written out.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxmoe import _validate
from jaxmoe.options import Router, make_router


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


def selected_weights(probs: jax.Array, ids: jax.Array, router: Router) -> jax.Array:
    """probs at the selected ids, renormalised to sum to one per token when asked, times the scaling factor."""
    weights = jnp.take_along_axis(probs, ids, axis=-1)
    if router.renormalize:
        total = weights.sum(-1, keepdims=True)
        if router.renormalize_epsilon:
            total = total + router.renormalize_epsilon
        else:
            # max() only guards sigmoid scores that all underflow to 0; for any normal sum it is a no-op.
            total = jnp.maximum(total, jnp.finfo(jnp.float32).tiny)
        weights = weights / total
    if router.scaling_factor != 1.0:
        weights = weights * router.scaling_factor
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


def group_scores(choice: jax.Array, router: Router) -> jax.Array:
    """[T, num_groups]: each group's max choice score, or the sum of its two best (a NaN in a group's
    best ranks first, so it reaches the group's score)."""
    T, E = choice.shape
    grouped = choice.reshape(T, router.num_groups, E // router.num_groups)
    if router.group_score == "max":
        return grouped.max(-1)
    _, best = jax.lax.top_k(score_keys(grouped), 2)
    return jnp.take_along_axis(grouped, best, axis=-1).sum(-1)


def kept_groups(choice: jax.Array, router: Router) -> jax.Array:
    """[T, E] bool: whether each expert's group is among the token's top_groups groups (ties: lower group)."""
    T, E = choice.shape
    _, groups = jax.lax.top_k(score_keys(group_scores(choice, router)), router.top_groups)
    kept = (groups[:, :, None] == jnp.arange(router.num_groups)[None, None, :]).any(1)  # [T, num_groups]
    return jnp.repeat(kept, E // router.num_groups, axis=1)


def route(logits, top_k: int | None = None, *, scoring: str = "softmax", renormalize: bool = True,
          selection_bias=None, router: Router | None = None) -> Routing:
    """Picks each token's experts and their weights.

    Args:
      logits: [T, E] router logits; the math runs in float32.
      top_k, scoring, renormalize: shortcuts for router=jaxmoe.Router(top_k, scoring, renormalize).
      selection_bias: optional [E] added to the scores for selection only (DeepSeek-V3's
        e_score_correction_bias); the weights are always the scores at the selected ids.
      router: a `jaxmoe.Router`: every routing option (groups, renormalisation epsilon, scaling).

    Ties go to the lower expert id (and group id); a NaN score ranks above every number (see score_keys).
    """
    router = make_router(router, top_k, scoring, renormalize)
    _validate.check_route_args(logits, router, selection_bias)
    probs = expert_probs(logits, router.scoring)
    choice = probs if selection_bias is None else probs + selection_bias.astype(jnp.float32)
    if router.grouped:
        choice = jnp.where(kept_groups(choice, router), choice, -jnp.inf)
    _, ids = jax.lax.top_k(score_keys(choice), router.top_k)  # lower index first on ties
    ids = ids.astype(jnp.int32)
    return Routing(selected_weights(probs, ids, router), ids, probs)
