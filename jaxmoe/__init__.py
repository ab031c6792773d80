"""jaxmoe: a fused Mixture-of-Experts layer for JAX, with kernels written in Triton."""

from jaxmoe import linen
from jaxmoe import reference
from jaxmoe.api import IMPLEMENTATIONS, SUPPORTED_DTYPES, expert_ffn, moe, resolve_implementation
from jaxmoe.layers import MoELayer, SelectionBias, update_selection_bias
from jaxmoe.options import Experts, Router
from jaxmoe.reference import MoEAux, MoERouting
from jaxmoe.routing import Routing, route
from jaxmoe import hf  # after the layers it builds

__version__ = "0.1.0"

__all__ = [
    "Experts",
    "IMPLEMENTATIONS",
    "MoEAux",
    "MoELayer",
    "MoERouting",
    "SUPPORTED_DTYPES",
    "Router",
    "Routing",
    "SelectionBias",
    "expert_ffn",
    "hf",
    "linen",
    "moe",
    "reference",
    "resolve_implementation",
    "route",
    "update_selection_bias",
]
