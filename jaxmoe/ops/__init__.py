"""The Triton pipeline as JAX functions, one module per op.

routing.py   top-k routing and the aux losses' statistics or, for few tokens, the losses themselves
             (one kernel; its VJP is the jax.lax one)
dispatch.py  the counting sort of assignments by expert, and the row blocks the GEMMs walk
gemm.py      launchers of the grouped GEMMs (forward, dH, dX, weight gradients) and the combine
ffn.py       the expert FFN: forward pipeline, named residuals and the custom VJP over the kernels

Each launcher computes its grid, config and scalars once, for every mode; `jaxmoe.launch` then
either calls jax-triton ("triton") or runs Triton's interpreter under `jax.pure_callback`
("interpret"). All sizes are static worst-case bounds, so nothing syncs with the host and
everything works under jit.
"""

from jaxmoe.ops.dispatch import Dispatch, dispatch, dispatch_bucket, max_row_blocks
from jaxmoe.ops.ffn import Residuals, expert_ffn
from jaxmoe.ops.gemm import combine, dot_precision, grouped_gemm
from jaxmoe.ops.routing import route, route_with_aux, route_with_stats

__all__ = ["Dispatch", "Residuals", "combine", "dispatch", "dot_precision", "expert_ffn", "grouped_gemm",
           "max_row_blocks", "route", "route_with_aux", "route_with_stats"]
