"""Framework-free Triton kernels of the MoE pipeline (installed as `jaxmoe.kernels`).

routing.py       scores, top-k, selection bias, renormalisation
dispatch.py      stable counting sort of assignments by expert and the GEMMs' block-to-expert map
grouped_gemm.py  grouped GEMM over dispatched rows: fused gate+up with SwiGLU, down with row weights, and
                 the backward's dX (weights read transposed)
grouped_gemm_bwd.py  the backward's dH GEMM (dSwiGLU and routing-weight gradient in its epilogue) and the
                 weight-gradient GEMM that contracts over each expert's rows
combine.py       deterministic weighted sum of each token's k rows

This package imports triton and nothing else; jaxmoe/ launches these kernels from JAX.
"""
