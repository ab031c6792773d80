"""The Triton pipeline as JAX functions: routing, dispatch, grouped GEMMs and combine.

Each stage computes its grid, config and scalars here once, for both modes; `launch` then either
calls jax-triton ("triton") or runs Triton's interpreter under `jax.pure_callback` ("interpret").

All sizes are static worst-case bounds, so nothing here syncs with the host and everything works
under jit. `Dispatch` is the metadata the forward computes once and that the backward kernels and
the expert-parallel path are meant to reuse.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxmoe import _validate, reference
from jaxmoe import config as configs
from jaxmoe.kernels import combine as combine_kernels
from jaxmoe.kernels import dispatch as dispatch_kernels
from jaxmoe.kernels import grouped_gemm as gemm_kernels
from jaxmoe.kernels import routing as routing_kernels
from jaxmoe.launch import launch
from jaxmoe.routing import Routing, expert_probs, selected_weights

_I32 = jnp.int32
_F32 = jnp.float32


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _out(shape, dtype) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))


# --------------------------------------------------------------------------------------- routing

@dataclasses.dataclass(frozen=True)
class _RouteOptions:
    top_k: int
    scoring: str
    renormalize: bool
    mode: str


def route(logits, top_k, *, scoring="softmax", renormalize=True, bias=None, mode="triton") -> Routing:
    """`jaxmoe.route` with the forward in one Triton kernel; the VJP is the jax.lax one."""
    _, E = _validate.check_logits(logits)
    top_k = _validate.check_top_k(top_k, E)
    _validate.check_scoring(scoring)
    _validate.check_bias(bias, E)
    options = _RouteOptions(top_k, scoring, bool(renormalize), mode)
    logits = logits.astype(_F32)
    bias = None if bias is None else bias.astype(_F32)
    return Routing(*_fused_route(logits, bias, options))


def _route_forward(logits, bias, options: _RouteOptions):
    T, E = logits.shape
    k = options.top_k
    if T == 0:
        return jnp.zeros((0, k), _F32), jnp.zeros((0, k), _I32), jnp.zeros((0, E), _F32)
    block_e = _next_pow2(E)
    block_t = max(1, min(64, 4096 // block_e))
    weights, ids, probs = launch(
        routing_kernels.topk_routing_kernel, logits, logits if bias is None else bias, T,
        grid=(_cdiv(T, block_t),), mode=options.mode, num_warps=4,
        out_shapes=[_out((T, k), _F32), _out((T, k), _I32), _out((T, E), _F32)],
        E=E, TOP_K=k, BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_K=_next_pow2(k),
        SIGMOID=options.scoring == "sigmoid", RENORMALIZE=options.renormalize, HAS_BIAS=bias is not None)
    return weights, ids, probs


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _fused_route(logits, bias, options):
    return _route_forward(logits, bias, options)


def _fused_route_fwd(logits, bias, options):
    weights, ids, probs = _route_forward(logits, bias, options)
    # ids are kept so the backward differentiates the selection the kernel actually made.
    return (weights, ids, probs), (logits, ids, bias)


def _fused_route_bwd(options, residuals, cotangents):
    logits, ids, bias = residuals
    d_weights, _, d_probs = cotangents

    def weights_and_probs(lg):
        probs = expert_probs(lg, options.scoring)
        return selected_weights(probs, ids, options.renormalize), probs

    _, vjp = jax.vjp(weights_and_probs, logits)
    (d_logits,) = vjp((d_weights, d_probs))
    return d_logits, None if bias is None else jnp.zeros_like(bias)


_fused_route.defvjp(_fused_route_fwd, _fused_route_bwd)


# -------------------------------------------------------------------------------------- dispatch

class Dispatch(NamedTuple):
    """Assignments sorted by expert, and the row blocks the grouped GEMMs iterate over.

    Assignment a = t * k + j. Sorted rows are grouped by expert, in assignment order within one.
    """

    sorted_assignments: jax.Array  # [n] int32: assignment at each sorted row (rows past the valid ones unset)
    assignment_rows: jax.Array  # [n] int32: sorted row of each assignment, -1 where the id was out of range
    expert_offsets: jax.Array  # [E + 1] int32: first sorted row of each expert; last entry = valid rows
    block_experts: jax.Array  # [n_blocks] int32: expert of each BLOCK_M row block, -1 for unused blocks
    block_rows: jax.Array  # [n_blocks] int32: first sorted row of each row block


def max_row_blocks(n_assignments: int, E: int, block_m: int) -> int:
    """Worst case of sum_e cdiv(count_e, block_m) over all ways to split n assignments among E experts."""
    nonempty = min(E, n_assignments)
    return max(1, (n_assignments + nonempty * (block_m - 1)) // block_m)


def dispatch(flat_ids: jax.Array, E: int, block_m: int, mode: str) -> Dispatch:
    """Sorts assignments by expert on the device: one launch for small batches, two otherwise."""
    n = flat_ids.shape[0]
    block_e = _next_pow2(E)
    n_blocks = max_row_blocks(n, E, block_m)
    # Small batches: one program takes all assignments in a single one-hot tile of up to 16K entries
    # (serial tile loops would dominate a decode step). Larger ones: 4K-entry tiles, many programs.
    single_chunk = _next_pow2(n) * block_e <= 16384
    if single_chunk:
        chunk = sub = _next_pow2(n)
        block_tile = max(16, min(_next_pow2(n_blocks), 16384 // block_e))
    else:
        sub = max(16, 4096 // block_e)
        chunk = max(sub, min(4096, _next_pow2(_cdiv(n, 128))))
        block_tile = max(16, 4096 // block_e)
    n_chunks = _cdiv(n, chunk)
    flat_ids = flat_ids.astype(_I32)
    tiles = dict(E=E, CHUNK=chunk, SUB=sub, BLOCK_E=block_e)

    if single_chunk:
        chunk_counts = flat_ids  # not read
    else:
        (chunk_counts,) = launch(dispatch_kernels.count_chunks_kernel, flat_ids, n, grid=(n_chunks,), mode=mode,
                                 out_shapes=[_out((n_chunks, E), _I32)], **tiles)
    outs = launch(
        dispatch_kernels.scatter_kernel, flat_ids, chunk_counts, n, n_chunks, n_blocks, grid=(n_chunks,),
        mode=mode, num_warps=8 if single_chunk else 4,
        out_shapes=[_out((n,), _I32), _out((n,), _I32), _out((E + 1,), _I32), _out((n_blocks,), _I32),
                    _out((n_blocks,), _I32)],
        BLOCK_M=block_m, CHUNK_TILE=max(16, min(_next_pow2(n_chunks), 4096 // block_e)),
        BLOCK_TILE=block_tile, SINGLE_CHUNK=single_chunk, **tiles)
    return Dispatch(*outs)


# ----------------------------------------------------------------------------------- expert FFN

def dot_precision(dtype, mode: str) -> str:
    """tl.dot input precision for float32 operands, following jax.default_matmul_precision as XLA does."""
    if jnp.dtype(dtype) != jnp.float32:
        return "ieee"  # unused for 16-bit operands
    setting = str(jax.config.jax_default_matmul_precision or "default").lower()
    if setting in ("highest", "float32"):
        return "ieee"
    if setting in ("high", "bfloat16_3x", "tensorfloat32_3x"):
        return "ieee" if _on_rocm(mode) else "tf32x3"  # AMD's Triton backend has no tf32x3
    return "tf32"


def _on_rocm(mode: str) -> bool:
    return mode == "triton" and "rocm" in jax.devices()[0].client.platform_version.lower()


def grouped_gemm(a, b, b2, row_weights, d: Dispatch, *, n_out: int, top_k: int, block_m: int,
                 gemm: configs.GemmConfig, gather_a: bool, gated: bool, scale_rows: bool, precision: str,
                 out_dtype, mode: str) -> jax.Array:
    """epilogue(A[rows] @ B[expert]) in sorted row order; see kernels/grouped_gemm.py.

    Returns [n, N] in out_dtype, or [split_k, n, N] float32 partial sums when gemm.split_k > 1.
    """
    E, K, N = b.shape
    n = d.sorted_assignments.shape[0]
    n_blocks = d.block_experts.shape[0]
    splits = gemm.split_k
    if gated and splits > 1:
        raise ValueError("split-K cannot apply to the gated GEMM: its SwiGLU epilogue needs whole sums")
    k_per_split = _cdiv(_cdiv(K, gemm.block_k), splits) * gemm.block_k
    out_shape = _out((n, n_out), out_dtype) if splits == 1 else _out((splits, n, n_out), _F32)
    (out,) = launch(
        gemm_kernels.grouped_gemm_kernel, a, b, b2, row_weights, d.sorted_assignments, d.expert_offsets,
        d.block_experts, d.block_rows, n_blocks,
        grid=(n_blocks * _cdiv(N, gemm.block_n), splits), mode=mode, out_shapes=[out_shape],
        num_warps=gemm.num_warps, num_stages=gemm.num_stages,
        N=N, K=K, top_k=top_k, stride_am=a.shape[1], stride_be=K * N, stride_bk=N, stride_bn=1, stride_om=N,
        stride_os=n * N, BLOCK_M=block_m, BLOCK_N=gemm.block_n, BLOCK_K=gemm.block_k, GROUP_M=gemm.group_m,
        GATHER_A=gather_a, GATED=gated, SCALE_ROWS=scale_rows, EVEN_K=K % gemm.block_k == 0,
        SPLIT_K=splits, K_PER_SPLIT=k_per_split, DOT_PRECISION=precision)
    return out


def combine(expert_rows, assignment_rows, T: int, top_k: int, out_dtype, mode: str) -> jax.Array:
    """Sums each token's k weighted rows; expert_rows is [n, D] or split-K planes [splits, n, D]."""
    if expert_rows.ndim == 2:
        expert_rows = expert_rows[None]
    splits, n, D = expert_rows.shape
    block_d = min(1024, _next_pow2(D))
    block_t = max(1, 4096 // block_d)
    (y,) = launch(combine_kernels.combine_kernel, expert_rows, assignment_rows, T,
                  grid=(_cdiv(T, block_t), _cdiv(D, block_d)), mode=mode, out_shapes=[_out((T, D), out_dtype)],
                  D=D, top_k=top_k, SPLITS=splits, stride_split=n * D, BLOCK_T=block_t, BLOCK_D=block_d)
    return y


@dataclasses.dataclass(frozen=True)
class _FFNOptions:
    mode: str
    config: configs.MoEConfig | None  # None: pick from the table / heuristic
    precision: str


def _device_kind(mode: str) -> str:
    return jax.devices()[0].device_kind if mode == "triton" else "cpu"


def _ffn_forward(x, weights, ids, w_gate, w_up, w_down, options: _FFNOptions):
    T, d = x.shape
    k = ids.shape[1]
    E, _, f = w_gate.shape
    if T == 0:
        return jnp.zeros((0, d), x.dtype)
    cfg = options.config or configs.select(_device_kind(options.mode), jnp.dtype(x.dtype).name, T, k, E, d, f)
    mode = options.mode
    row_weights = weights.reshape(-1).astype(_F32)
    disp = dispatch(ids.reshape(-1), E, cfg.block_m, mode)
    common = dict(d=disp, top_k=k, block_m=cfg.block_m, precision=options.precision, out_dtype=x.dtype, mode=mode)
    h = grouped_gemm(x, w_gate, w_up, row_weights, n_out=f, gemm=cfg.gate_up, gather_a=True, gated=True,
                     scale_rows=False, **common)
    rows = grouped_gemm(h, w_down, w_down, row_weights, n_out=d, gemm=cfg.down, gather_a=False, gated=False,
                        scale_rows=True, **common)
    return combine(rows, disp.assignment_rows, T, k, x.dtype, mode)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _fused_expert_ffn(x, weights, ids, w_gate, w_up, w_down, options):
    return _ffn_forward(x, weights, ids, w_gate, w_up, w_down, options)


def _fused_expert_ffn_fwd(x, weights, ids, w_gate, w_up, w_down, options):
    y = _ffn_forward(x, weights, ids, w_gate, w_up, w_down, options)
    # Inputs only: the backward recomputes what it needs, so no expert activations are kept.
    return y, (x, weights, ids, w_gate, w_up, w_down)


def _fused_expert_ffn_bwd(options, residuals, d_y):
    x, weights, ids, w_gate, w_up, w_down = residuals

    def ffn(x_, weights_, w_gate_, w_up_, w_down_):
        return reference.grouped_expert_ffn(x_, weights_, ids, w_gate_, w_up_, w_down_)

    _, vjp = jax.vjp(ffn, x, weights, w_gate, w_up, w_down)
    d_x, d_weights, d_gate, d_up, d_down = vjp(d_y)
    return d_x, d_weights, None, d_gate, d_up, d_down


_fused_expert_ffn.defvjp(_fused_expert_ffn_fwd, _fused_expert_ffn_bwd)


def expert_ffn(x, weights, ids, w_gate, w_up, w_down, *, mode: str = "triton",
               config: configs.MoEConfig | None = None):
    """`jaxmoe.expert_ffn` through the Triton kernels (arguments already validated).

    The backward is the jax.lax reference's VJP until the Triton backward kernels land: exact, slower,
    and the forward stays fused.
    """
    options = _FFNOptions(mode, config, dot_precision(x.dtype, mode))
    return _fused_expert_ffn(x, weights, ids, w_gate, w_up, w_down, options)
