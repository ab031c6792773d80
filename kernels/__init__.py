"""Framework-free Triton kernels of the MoE pipeline (installed as `jaxmoe.kernels`).

routing.py       scores, top-k, selection bias, renormalisation
dispatch.py      stable counting sort of assignments by expert and the GEMMs' block-to-expert map
grouped_gemm.py  grouped GEMM over dispatched rows: fused gate+up with the activation, down with row weights,
                 both with expert biases, and the backward's dX (weights read transposed)
grouped_gemm_bwd.py  the backward's dH GEMM (dActivation and routing-weight gradient in its epilogue), the
                 weight-gradient GEMM that contracts over each expert's rows, and the bias-gradient column sums
epilogue.py      the activations (SwiGLU, gpt-oss's clamped SwiGLU), their derivatives and the bias loads
combine.py       deterministic weighted sum of each token's k rows

This package imports triton and nothing else; jaxmoe/ launches these kernels from JAX.
"""
