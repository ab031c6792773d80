"""Small helpers shared by the launchers."""

from __future__ import annotations

import jax
import jax.numpy as jnp

I32 = jnp.int32
F32 = jnp.float32


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def out(shape, dtype) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))
