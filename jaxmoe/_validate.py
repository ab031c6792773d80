"""Argument checks shared by every implementation.

Shapes are static under jit, so every check here runs at trace time and costs nothing on the device.
Each message names the argument and what was expected, so a user never has to guess.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_SUPPORTED_NAMES = "float32, bfloat16 or float16"


def _shape(a, name: str) -> tuple[int, ...]:
    try:
        return tuple(jnp.shape(a))
    except Exception as err:  # not an array at all
        raise TypeError(f"{name} must be an array, got {type(a).__name__}") from err


def check_float(a, name: str) -> jnp.dtype:
    dtype = jnp.result_type(a)
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be {_SUPPORTED_NAMES}, got {dtype}")
    return dtype


def check_expert_weights(w_gate, w_up, w_down, d: int | None = None) -> tuple[int, int, int]:
    """Returns (E, d, f) after checking the three expert weights agree with each other and with d."""
    sg, su, sd = _shape(w_gate, "w_gate"), _shape(w_up, "w_up"), _shape(w_down, "w_down")
    if len(sg) != 3:
        raise ValueError(f"w_gate must be [E, d, f], got shape {sg}")
    E, dg, f = sg
    if d is not None and dg != d:
        raise ValueError(f"w_gate must be [E, d={d}, f], got shape {sg}")
    if su != sg:
        raise ValueError(f"w_up must be [E, d, f] = {sg} like w_gate, got shape {su}")
    if sd != (E, f, dg):
        raise ValueError(f"w_down must be [E, f, d] = {(E, f, dg)}, got shape {sd}")
    if E < 1:
        raise ValueError(f"w_gate must hold at least one expert, got shape {sg}")
    for name, w in (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
        check_float(w, name)
    return E, dg, f


def check_expert_ffn_args(x, weights, ids, w_gate, w_up, w_down) -> tuple[int, int, int, int, int]:
    """Returns (T, d, f, E, k)."""
    sx = _shape(x, "x")
    if len(sx) != 2:
        raise ValueError(f"x must be [T, d], got shape {sx}")
    T, d = sx
    x_dtype = check_float(x, "x")
    E, _, f = check_expert_weights(w_gate, w_up, w_down, d)
    for name, w in (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
        if jnp.result_type(w) != x_dtype:
            raise TypeError(f"{name} must have x's dtype {x_dtype}, got {jnp.result_type(w)}; cast one of them")
    si, sw = _shape(ids, "ids"), _shape(weights, "weights")
    if len(si) != 2 or si[0] != T:
        raise ValueError(f"ids must be [T={T}, k], got shape {si}")
    k = si[1]
    if not 1 <= k <= E:
        raise ValueError(f"ids must be [T, k] with 1 <= k <= E={E}, got shape {si}")
    if not jnp.issubdtype(jnp.result_type(ids), jnp.integer):
        raise TypeError(f"ids must be an integer array, got {jnp.result_type(ids)}")
    if sw != si:
        raise ValueError(f"weights must be [T, k] = {si} like ids, got shape {sw}")
    if not jnp.issubdtype(jnp.result_type(weights), jnp.floating):
        raise TypeError(f"weights must be a float array, got {jnp.result_type(weights)}")
    check_ids_in_range(ids, E)
    return T, d, f, E, k


def check_ids_in_range(ids, E: int) -> None:
    """Out-of-range ids would be a silent wrong answer: reject them whenever their values are known.

    Under jit the values are unknown without a host sync; every implementation then gives an
    out-of-range assignment zero weight (see README), which is the best defined behaviour left.
    """
    if isinstance(ids, jax.core.Tracer):
        return
    values = np.asarray(ids)
    if values.size and (values.min() < 0 or values.max() >= E):
        raise ValueError(f"ids must lie in [0, E={E}), got values in [{values.min()}, {values.max()}]")


def check_top_k(top_k, E: int) -> int:
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)):
        raise TypeError(f"top_k must be a Python int, got {type(top_k).__name__}")
    if not 1 <= top_k <= E:
        raise ValueError(f"top_k must satisfy 1 <= top_k <= E={E}, got {top_k}")
    return int(top_k)


def check_logits(logits) -> tuple[int, int]:
    s = _shape(logits, "logits")
    if len(s) != 2:
        raise ValueError(f"logits must be [T, E], got shape {s}")
    if s[1] < 1:
        raise ValueError(f"logits must have at least one expert column, got shape {s}")
    check_float(logits, "logits")
    return s


def check_bias(bias, E: int) -> None:
    if bias is None:
        return
    s = _shape(bias, "bias")
    if s != (E,):
        raise ValueError(f"bias must be [E={E}], got shape {s}")
    check_float(bias, "bias")


def check_scoring(scoring: str) -> None:
    if scoring not in ("softmax", "sigmoid"):
        raise ValueError(f"scoring must be 'softmax' or 'sigmoid', got {scoring!r}")


def check_moe_args(x, router_weight, w_gate, w_up, w_down, top_k, scoring, bias) -> tuple[int, int]:
    """Returns (d, E)."""
    sx = _shape(x, "x")
    if len(sx) < 1:
        raise ValueError(f"x must be [..., d], got a scalar of shape {sx}")
    d = sx[-1]
    x_dtype = check_float(x, "x")
    sr = _shape(router_weight, "router_weight")
    if len(sr) != 2 or sr[0] != d:
        raise ValueError(f"router_weight must be [d={d}, E], got shape {sr}")
    check_float(router_weight, "router_weight")
    E = sr[1]
    E_w, _, _ = check_expert_weights(w_gate, w_up, w_down, d)
    if E_w != E:
        raise ValueError(f"w_gate must be [E={E}, d, f] to match router_weight's E, got shape {_shape(w_gate, 'w_gate')}")
    for name, w in (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
        if jnp.result_type(w) != x_dtype:
            raise TypeError(f"{name} must have x's dtype {x_dtype}, got {jnp.result_type(w)}; cast one of them")
    check_top_k(top_k, E)
    check_scoring(scoring)
    check_bias(bias, E)
    return d, E
