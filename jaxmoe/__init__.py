"""jaxmoe: a fused Mixture-of-Experts layer for JAX, with kernels written in Triton."""

from jaxmoe import linen
from jaxmoe import reference
from jaxmoe.api import IMPLEMENTATIONS, SUPPORTED_DTYPES, expert_ffn, moe, resolve_implementation
from jaxmoe.layers import MoELayer
from jaxmoe.reference import MoEAux, MoERouting
from jaxmoe.routing import Routing, route

__version__ = "0.1.0"

__all__ = [
    "IMPLEMENTATIONS",
    "MoEAux",
    "MoELayer",
    "MoERouting",
    "SUPPORTED_DTYPES",
    "Routing",
    "expert_ffn",
    "linen",
    "moe",
    "reference",
    "resolve_implementation",
    "route",
]
