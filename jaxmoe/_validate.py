"""Argument checks shared by every implementation.

Shapes are static under jit, so every check here runs at trace time and costs nothing on the device.
Each message names every argument involved and, for a disagreement, the dimension that disagrees and
the shapes it was read from, so a user never has to guess which argument is the wrong one.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

FLOAT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
FLOAT_DTYPE_NAMES = "float32, bfloat16 or float16"

# The layouts the public functions take; "..." stands for any number of leading dims.
X_TOKENS = ("T", "d")
X_ANY = ("...", "d")
PER_TOKEN = ("T", "k")
ROUTER_WEIGHT = ("d", "E")
LOGITS = ("T", "E")
BIAS = ("E",)
W_IN = ("E", "d", "f")
W_OUT = ("E", "f", "d")
B_IN = ("E", "f")
B_OUT = ("E", "d")
SHARED_IN = ("d", "fs")
SHARED_OUT = ("fs", "d")


def array_shape(a, name: str) -> tuple[int, ...]:
    """a's shape, or a TypeError naming the argument when a is not an array.

    Lists are rejected rather than converted, as most jax.numpy functions do: converting one element by
    element is slow, and a failure inside the conversion prints the whole list instead of its name.
    """
    if not isinstance(a, (jax.Array, np.ndarray, np.generic)):
        raise TypeError(f"{name} must be a jax.Array or numpy.ndarray, got {type(a).__name__}; "
                        f"convert it with jnp.asarray")
    return tuple(a.shape)


def _layout(axes: Sequence[str]) -> str:
    return "[" + ", ".join(axes) + "]"


def _described(args: Sequence[tuple[str, Sequence[str], tuple[int, ...]]]) -> str:
    """'x [T, d] = (6, 33), w_gate [E, d, f] = (4, 32, 48)': what each argument's shape means."""
    return ", ".join(f"{name} {_layout(axes)} = {shape}" for name, axes, shape in args)


def _grouped(pairs: Sequence[tuple[str, object]], what: str) -> str:
    """[(name, value)] -> 'x has d=33 but w_gate, w_up have d=32', groups in order of first appearance."""
    groups: dict[object, list[str]] = {}
    for name, value in pairs:
        groups.setdefault(value, []).append(name)
    parts = [f"{', '.join(names)} {'has' if len(names) == 1 else 'have'} {what}{value}"
             for value, names in groups.items()]
    return parts[0] + " but " + " and ".join(parts[1:])


def check_shapes(*args: tuple[str, Sequence[str], object]) -> dict[str, int]:
    """Checks arguments given as (name, layout, array) against each other; returns {dim: size}.

    Each array must have its layout's rank, and every dim letter must have one size across all the
    arguments that carry it. An argument that is None (an optional one left out) is skipped.
    """
    shapes = [(name, axes, array_shape(a, name)) for name, axes, a in args if a is not None]
    sizes: dict[str, list[tuple[str, int]]] = {}
    carriers: dict[str, list[tuple[str, Sequence[str], tuple[int, ...]]]] = {}
    for name, axes, shape in shapes:
        leading = axes[0] == "..."
        named = axes[1:] if leading else axes
        if len(shape) < len(named) or (not leading and len(shape) > len(named)):
            raise ValueError(f"{name} must be {_layout(axes)}, got shape {shape}")
        for dim, size in zip(named, shape[len(shape) - len(named):]):
            sizes.setdefault(dim, []).append((name, size))
            carriers.setdefault(dim, []).append((name, axes, shape))
    for dim, pairs in sizes.items():
        if len({size for _, size in pairs}) > 1:
            raise ValueError(f"{_grouped(pairs, dim + '=')} ({_described(carriers[dim])})")
    return {dim: pairs[0][1] for dim, pairs in sizes.items()}


def check_float(a, name: str) -> jnp.dtype:
    dtype = jnp.result_type(a)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be {FLOAT_DTYPE_NAMES}, got {dtype}")
    return dtype


def check_same_float(*args: tuple[str, object]) -> jnp.dtype:
    """Each (name, array) must be a supported float, and all must share one dtype; returns it."""
    dtypes = [(name, check_float(a, name)) for name, a in args]
    if len({dtype for _, dtype in dtypes}) > 1:
        raise TypeError(f"{_grouped([(name, str(dtype)) for name, dtype in dtypes], 'dtype ')}; "
                        f"cast them to one dtype")
    return dtypes[0][1]


def check_expert_ffn_args(x, weights, ids, w_gate, w_up, w_down, b_gate=None, b_up=None,
                          b_down=None) -> tuple[int, int, int, int, int]:
    """Returns (T, d, f, E, k)."""
    dims = check_shapes(("x", X_TOKENS, x), ("weights", PER_TOKEN, weights), ("ids", PER_TOKEN, ids),
                        ("w_gate", W_IN, w_gate), ("w_up", W_IN, w_up), ("w_down", W_OUT, w_down),
                        ("b_gate", B_IN, b_gate), ("b_up", B_IN, b_up), ("b_down", B_OUT, b_down))
    check_all_or_none(("b_gate", b_gate), ("b_up", b_up), ("b_down", b_down))
    T, d, f, E, k = (dims[dim] for dim in ("T", "d", "f", "E", "k"))
    if not 1 <= k <= E:
        raise ValueError(f"k must satisfy 1 <= k <= E, but ids, weights have k={k} and w_gate, w_up, w_down "
                         f"have E={E} (ids [T, k] = {ids.shape}, w_gate [E, d, f] = {w_gate.shape})")
    check_same_float(("x", x), ("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down),
                     *[(name, a) for name, a in (("b_gate", b_gate), ("b_up", b_up), ("b_down", b_down))
                       if a is not None])
    if not jnp.issubdtype(jnp.result_type(ids), jnp.integer):
        raise TypeError(f"ids must be an integer array, got {jnp.result_type(ids)}")
    if not jnp.issubdtype(jnp.result_type(weights), jnp.floating):
        raise TypeError(f"weights must be a float array, got {jnp.result_type(weights)}")
    check_ids_in_range(ids, E)
    return T, d, f, E, k


def check_ids_in_range(ids, E: int) -> None:
    """Out-of-range ids would be a silent wrong answer: reject them whenever their values are known.

    Under jit the values are unknown without a host sync; every implementation then gives an
    out-of-range assignment zero weight (see README), which is the best defined behaviour left.
    """
    if isinstance(ids, jax.core.Tracer) or not math.prod(ids.shape):
        return
    if isinstance(ids, jax.Array) and not ids.is_fully_addressable:
        # Spread over processes (multi-host): no process can read the whole array, and a check of its own
        # shards alone would raise on some processes while the others wait in a collective. A global
        # min and max, replicated, give every process the same answer.
        lo, hi = (int(v.addressable_data(0)) for v in _global_min_max(ids))
    else:
        values = np.asarray(ids)
        lo, hi = values.min(), values.max()
    if lo < 0 or hi >= E:
        raise ValueError(f"ids must lie in [0, E={E}) where E is w_gate's, w_up's and w_down's expert count, "
                         f"got values in [{lo}, {hi}]")


@jax.jit
def _global_min_max(ids):
    return jnp.min(ids), jnp.max(ids)


def check_route_args(logits, router, selection_bias) -> None:
    """logits [T, E] and an optional selection_bias [E] against a jaxmoe.Router."""
    E = check_shapes(("logits", LOGITS, logits), ("selection_bias", BIAS, selection_bias))["E"]
    check_float(logits, "logits")
    if selection_bias is not None:
        check_float(selection_bias, "selection_bias")
    router.check_experts(E, f"logits has E={E} (logits [T, E] = {logits.shape})")


def check_scoring(scoring: str) -> None:
    if scoring not in ("softmax", "sigmoid"):
        raise ValueError(f"scoring must be 'softmax' or 'sigmoid', got {scoring!r}")


def check_moe_args(x, router_weight, w_gate, w_up, w_down, router, *, router_bias=None, selection_bias=None,
                   b_gate=None, b_up=None, b_down=None, shared=None) -> tuple[int, int]:
    """Returns (d, E). shared: (shared_w_gate, shared_w_up, shared_w_down, shared_output_gate) or None."""
    shared_w_gate, shared_w_up, shared_w_down, shared_output_gate = shared or (None, None, None, None)
    dims = check_shapes(("x", X_ANY, x), ("router_weight", ROUTER_WEIGHT, router_weight),
                        ("w_gate", W_IN, w_gate), ("w_up", W_IN, w_up), ("w_down", W_OUT, w_down),
                        ("router_bias", BIAS, router_bias), ("selection_bias", BIAS, selection_bias),
                        ("b_gate", B_IN, b_gate), ("b_up", B_IN, b_up), ("b_down", B_OUT, b_down),
                        ("shared_w_gate", SHARED_IN, shared_w_gate), ("shared_w_up", SHARED_IN, shared_w_up),
                        ("shared_w_down", SHARED_OUT, shared_w_down),
                        ("shared_output_gate", ("d",), shared_output_gate))
    d, E = dims["d"], dims["E"]
    check_same_float(("x", x), ("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down),
                     *[(name, a) for name, a in (("b_gate", b_gate), ("b_up", b_up), ("b_down", b_down),
                                                 ("shared_w_gate", shared_w_gate), ("shared_w_up", shared_w_up),
                                                 ("shared_w_down", shared_w_down)) if a is not None])
    check_float(router_weight, "router_weight")  # any float: the logits are computed in float32
    for name, a in (("router_bias", router_bias), ("selection_bias", selection_bias),
                    ("shared_output_gate", shared_output_gate)):
        if a is not None:
            check_float(a, name)
    check_all_or_none(("b_gate", b_gate), ("b_up", b_up), ("b_down", b_down))
    check_all_or_none(("shared_w_gate", shared_w_gate), ("shared_w_up", shared_w_up), ("shared_w_down", shared_w_down))
    if shared_output_gate is not None and shared_w_gate is None:
        raise ValueError("shared_output_gate gates the shared experts: pass shared_w_gate, shared_w_up and "
                         "shared_w_down too")
    router.check_experts(E, f"router_weight, w_gate, w_up, w_down have E={E} "
                            f"(router_weight [d, E] = {router_weight.shape})")
    return d, E


def check_all_or_none(*args: tuple[str, object]) -> None:
    given = [name for name, a in args if a is not None]
    if given and len(given) != len(args):
        missing = [name for name, a in args if a is None]
        raise ValueError(f"{', '.join(given)} given without {', '.join(missing)}: pass all of "
                         f"{', '.join(name for name, _ in args)} or none")
