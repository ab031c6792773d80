"""Launchers of the grouped GEMMs (forward, dH, dX, weight gradients), the bias gradients and the combine.

Each one takes its shapes and strides from its operands, picks the grid and passes the config's
tiles; kernels/grouped_gemm.py and kernels/grouped_gemm_bwd.py say what each kernel computes.

Compile keys: what follows the token count T (n = T*k rows, row blocks, T itself) is passed as a
runtime int, never a constexpr, so every batch size runs the kernels compiled for the model's
shapes; only the config (config.select, by a bucket of T) may differ between batch sizes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxmoe import config as configs
from jaxmoe.kernels import combine as combine_kernels
from jaxmoe.kernels import grouped_gemm as gemm_kernels
from jaxmoe.kernels import grouped_gemm_bwd as bwd_kernels
from jaxmoe.launch import HostDescriptor, host_descriptors_available, launch
from jaxmoe.options import Experts
from jaxmoe.ops._util import F32 as _F32, cdiv as _cdiv, next_pow2 as _next_pow2, out as _out
from jaxmoe.ops.dispatch import Dispatch, dispatch_bucket


def dot_precision(dtype, mode: str) -> str:
    """tl.dot input precision for float32 operands, following jax.default_matmul_precision as XLA does on
    the backend that runs the program: on a GPU the default takes tf32 operands; XLA's CPU dots are
    exact float32 at every setting, so "interpret" on a CPU is too ("xla" and "interpret" agree there)."""
    if jnp.dtype(dtype) != jnp.float32:
        return "ieee"  # unused for 16-bit operands
    if mode == "interpret" and _program_platform() == "cpu":
        return "ieee"
    setting = str(jax.config.jax_default_matmul_precision or "default").lower()
    if setting in ("highest", "float32"):
        return "ieee"
    if setting in ("high", "bfloat16_3x", "tensorfloat32_3x"):
        return "ieee" if on_rocm(mode) else "tf32x3"  # AMD's Triton backend has no tf32x3
    return "tf32"


def _program_platform() -> str:
    """The platform jitted code runs on: jax.default_device's when set, else the default backend's."""
    device = jax.config.jax_default_device
    if device is None:
        return jax.default_backend()
    return device if isinstance(device, str) else device.platform


def on_rocm(mode: str) -> bool:
    return mode == "triton" and "rocm" in jax.devices()[0].client.platform_version.lower()


def activation_constexprs(experts: Experts) -> dict:
    """The epilogues' ACTIVATION, ALPHA and LIMIT. SwiGLU reads neither ALPHA nor LIMIT: they are 0.0
    there, so an Experts that differs only in them compiles nothing new."""
    clamped = experts.activation == "clamped_swiglu"
    return dict(ACTIVATION=experts.activation, ALPHA=experts.alpha if clamped else 0.0,
                LIMIT=experts.limit if clamped else 0.0)


def grouped_gemm(a, b, b2, row_weights, disp: Dispatch, *, top_k: int, block_m: int, gemm: configs.GemmConfig,
                 gather_a: bool, gated: bool, scale_rows: bool, precision: str, out_dtype, mode: str,
                 store_preact: bool = False, concat_k: bool = False, transpose_b: bool = False,
                 bias=None, bias2=None, experts: Experts = Experts()):
    """epilogue(A[rows] @ B[expert]) in sorted row order; see kernels/grouped_gemm.py.

    b, b2: [E, K, N], or [E, N, K] read transposed with transpose_b. A has K columns (2K with
    concat_k: [A1 | A2], multiplied by B and B2 and summed); its row stride is its own width, so A
    may be the h part of a wider [h | gate | up] buffer.
    bias: [E, N] added to each row of its expert (with gated, bias2 [E, N] to the up projection's).
    experts: the gated epilogue's activation and weight placement (weight_on="input" scales the gate
    and up products by the row weight); read only with gated.

    Returns [n, N] in out_dtype, or [split_k, n, N] float32 partial sums when gemm.split_k > 1. With
    store_preact, (hgu, clamps): hgu [n, 3N] = [h | gate product | up product], and clamps [n, N] uint8
    the clamp decisions with clamped_swiglu (None otherwise).
    """
    if transpose_b:
        E, N, K = b.shape
        stride_bk, stride_bn = 1, K
    else:
        E, K, N = b.shape
        stride_bk, stride_bn = N, 1
    n = disp.sorted_assignments.shape[0]
    n_blocks = disp.block_experts.shape[0]
    splits = gemm.split_k
    if gated and splits > 1:
        raise ValueError("split-K cannot apply to the gated GEMM: its SwiGLU epilogue needs whole sums")
    if block_m % gemm.split_m or block_m // gemm.split_m < 16:
        raise ValueError(f"split_m={gemm.split_m} must cut block_m={block_m} into tiles of at least 16 rows")
    k_per_split = _cdiv(_cdiv(K, gemm.block_k), splits) * gemm.block_k
    width = 3 * N if store_preact else N
    tma = gemm.tma and _tma_fits(a, b, K, N, gemm.block_k, concat_k or transpose_b, mode)
    host_tma = tma and gemm.host_tma and mode == "triton" and host_descriptors_available()
    descriptors = (1 + gated + (not gather_a)) if tma and not host_tma else 0
    a_arg, b_arg, b2_arg = a, b, b2
    if host_tma:  # the views the kernel would build (see the kernel's TMA branch), built on the host
        tile_m = block_m // gemm.split_m
        b_arg = HostDescriptor(b, (E * K, N), (N, 1), (gemm.block_k, gemm.block_n))
        if gated:
            b2_arg = HostDescriptor(b2, (E * K, N), (N, 1), (gemm.block_k, gemm.block_n))
        if not gather_a:
            a_arg = HostDescriptor(a, (n, K), (a.shape[1], 1), (tile_m, gemm.block_k))
    out_shape = _out((n, width), out_dtype) if splits == 1 else _out((splits, n, N), _F32)
    if bias2 is not None and not gated:
        raise ValueError("bias2 belongs to the gated GEMM's up projection")
    has_bias = bias is not None
    if gated and has_bias != (bias2 is not None):
        raise ValueError("the gated GEMM takes both biases or neither")
    epilogue = activation_constexprs(experts if gated else Experts())
    weight_on_input = gated and experts.weight_on == "input"
    clamped = gated and store_preact and experts.activation == "clamped_swiglu"
    clamps_shape = _out((n, N) if clamped else (1,), jnp.uint8)  # a stub the kernel never writes unless clamped
    # Without biases, row_weights stands in for their pointers (never read).
    out, clamps = launch(
        gemm_kernels.grouped_gemm_kernel, a_arg, b_arg, b2_arg, row_weights, bias if has_bias else row_weights,
        bias2 if has_bias and gated else row_weights, disp.sorted_assignments, disp.expert_offsets,
        disp.block_experts, disp.block_rows, n_blocks, n,
        grid=(n_blocks * gemm.split_m * _cdiv(N, gemm.block_n), splits), mode=mode,
        out_shapes=[out_shape, clamps_shape],
        num_warps=gemm.num_warps, num_stages=gemm.num_stages, scratch_per_program=_TMA_DESCRIPTOR_BYTES * descriptors,
        N=N, K=K, TOP_K=top_k, stride_am=a.shape[1], stride_be=K * N, stride_bk=stride_bk, stride_bn=stride_bn,
        stride_om=width, BLOCK_M=block_m // gemm.split_m, SPLIT_M=gemm.split_m, BLOCK_N=gemm.block_n,
        BLOCK_K=gemm.block_k,
        GROUP_M=gemm.group_m, GATHER_A=gather_a, GATED=gated, STORE_PREACT=store_preact, SCALE_ROWS=scale_rows,
        WEIGHT_ON_INPUT=weight_on_input, HAS_BIAS=has_bias, **epilogue, CONCAT_K=concat_k,
        EVEN_K=K % gemm.block_k == 0, SPLIT_K=splits, K_PER_SPLIT=k_per_split,
        DOT_PRECISION=precision, TMA=tma, E=E if tma and not host_tma else 0,  # E shapes device-built ones
        HOST_TMA=host_tma)
    if store_preact:
        return out, clamps if clamped else None
    return out


_TMA_DESCRIPTOR_BYTES = 128  # one CUtensorMap in the program's global scratch


def _tma_fits(a, b, K: int, N: int, block_k: int, other_layout: bool, mode: str) -> bool:
    """Whether the tensor-descriptor path can run these operands (GemmConfig.tma asks for it).

    16-bit operands (float32 keeps the pointer path: its tf32 rounding happens on loaded tiles), K a
    multiple of the K tile (B is viewed as [E*K, N], so a tile must not cross into the next expert),
    16-byte aligned rows (TMA's stride rule: N and A's row width multiples of 8 elements), int32
    descriptor coordinates (E*K < 2^31), B in its forward layout, and NVIDIA (on AMD the kernels keep
    the pointer path they are tested with).
    """
    return (jnp.dtype(a.dtype).itemsize == 2 and K % block_k == 0 and N % 8 == 0 and a.shape[1] % 8 == 0
            and b.shape[0] * K < 2**31 and not other_layout and not on_rocm(mode))


def dh_gemm(dy, w_down, hgu, row_weights, disp: Dispatch, *, top_k: int, block_m: int, gemm: configs.GemmConfig,
            precision: str, mode: str, clamps=None, b_gate=None, b_up=None, b_down=None,
            experts: Experts = Experts()) -> tuple[jax.Array, jax.Array]:
    """(dgu [n, 2f] = [dgate | dup] in dy's dtype, dw_parts [planes, n] float32); see dh_kernel.

    hgu: the forward's [h | gate product | up product]; clamps its clamp decisions (clamped_swiglu);
    b_gate, b_up [E, f] and b_down [E, d] the biases (all or none), experts the activation and weight
    placement. dw_parts holds a plane per f tile, and one more (<dy, b_down>) with biases and the
    weight on the output.
    """
    E, f, d = w_down.shape
    n = disp.sorted_assignments.shape[0]
    n_blocks = disp.block_experts.shape[0]
    n_tiles = _cdiv(f, gemm.block_n)
    has_bias = b_gate is not None
    weight_on_input = experts.weight_on == "input"
    planes = n_tiles + (has_bias and not weight_on_input)
    if (clamps is None) != (experts.activation != "clamped_swiglu"):
        raise ValueError("clamped_swiglu's backward needs the forward's clamp decisions, and only it")
    # row_weights stands in for the arrays a variant never reads.
    biases = (b_gate, b_up, b_down) if has_bias else (row_weights,) * 3
    dgu, dw_parts = launch(
        bwd_kernels.dh_kernel, dy, w_down, hgu, row_weights if clamps is None else clamps, row_weights, *biases,
        disp.sorted_assignments, disp.expert_offsets, disp.block_experts, disp.block_rows, n_blocks, n,
        grid=(n_blocks * n_tiles,), mode=mode, out_shapes=[_out((n, 2 * f), dy.dtype), _out((planes, n), _F32)],
        num_warps=gemm.num_warps, num_stages=gemm.num_stages,
        N=f, K=d, TOP_K=top_k, BLOCK_M=block_m, BLOCK_N=gemm.block_n, BLOCK_K=gemm.block_k, GROUP_M=gemm.group_m,
        EVEN_K=d % gemm.block_k == 0, DOT_PRECISION=precision, HAS_BIAS=has_bias, WEIGHT_ON_INPUT=weight_on_input,
        **activation_constexprs(experts))
    return dgu, dw_parts


def weight_grad(a, b, row_weights, disp: Dispatch, *, E: int, m_out: int, n_out: int, top_k: int, gather_a: bool,
                gather_b: bool, scale_b: bool, two_outputs: bool, cfg: configs.WeightGradConfig, precision: str,
                out_dtype, mode: str) -> list[jax.Array]:
    """[E, m_out, n_out] = per expert, A[rows]^T @ B[rows] over that expert's rows; see weight_grad_kernel.

    Of A the first m_out columns are read; of B the first n_out (and the next n_out for the second
    output with two_outputs). Row strides are the operands' widths, so A may be part of a wider buffer.
    """
    M = m_out
    halves = 2 if two_outputs else 1
    per_expert = _cdiv(M, cfg.block_m) * _cdiv(n_out, cfg.block_n) * halves
    second = _out((E, M, n_out) if two_outputs else (1,), out_dtype)  # a stub the kernel never writes
    outs = launch(
        bwd_kernels.weight_grad_kernel, a, b, row_weights, disp.sorted_assignments, disp.expert_offsets,
        grid=(E * per_expert,), mode=mode, out_shapes=[_out((E, M, n_out), out_dtype), second],
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        M=M, N=n_out, TOP_K=top_k, stride_am=a.shape[1], stride_bm=b.shape[1], BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GATHER_A=gather_a, GATHER_B=gather_b, SCALE_B=scale_b,
        TWO_OUTPUTS=two_outputs, DOT_PRECISION=precision)
    return outs if two_outputs else outs[:1]


# bias_grad's tiles: [BIAS_GRAD_ROWS, BIAS_GRAD_COLS] float32 per step, 32 values a thread at 4 warps.
# (Not tuned: its reads are the size of one weight-gradient operand, a small part of the backward.)
BIAS_GRAD_ROWS, BIAS_GRAD_COLS = 32, 128


def bias_grad(b, row_weights, disp: Dispatch, *, E: int, top_k: int, gather_b: bool, scale_b: bool, out_dtype,
              mode: str) -> jax.Array:
    """[E, N] = per expert, the sum of B's rows over that expert's rows (times the row weight with
    scale_b; B in token order with gather_b, else sorted); see bias_grad_kernel."""
    N = b.shape[1]
    block_n = min(BIAS_GRAD_COLS, max(16, _next_pow2(N)))
    (out,) = launch(
        bwd_kernels.bias_grad_kernel, b, row_weights, disp.sorted_assignments, disp.expert_offsets,
        grid=(E * _cdiv(N, block_n),), mode=mode, out_shapes=[_out((E, N), out_dtype)], num_warps=4, num_stages=2,
        N=N, TOP_K=top_k, stride_bm=N, BLOCK_R=BIAS_GRAD_ROWS, BLOCK_N=block_n, GATHER_B=gather_b, SCALE_B=scale_b)
    return out


def combine(expert_rows, assignment_rows, T: int, top_k: int, out_dtype, mode: str) -> jax.Array:
    """Sums each token's k rows; expert_rows is [n, D] or split-K planes [splits, n, D]."""
    if expert_rows.ndim == 2:
        expert_rows = expert_rows[None]
    splits, n, D = expert_rows.shape
    if n != T * top_k:  # the kernel finds the planes T * top_k rows apart
        raise ValueError(f"combine needs T * top_k = {T * top_k} rows per plane, got {n}")
    # Tiles from the dispatch's bucket of T * top_k, not from T, so batch sizes of a bucket share a compile.
    block_t, block_d = _combine_tile(max(1, dispatch_bucket(T * top_k) // top_k), D)
    # 8 warps keep more row loads in flight: Qwen3-sized rows (T=8192, k=8, d=2048, float32) took 0.150 ms
    # against 0.176 with 4 warps on an H200 (3.8 against 3.3 TB/s); other tile shapes were slower.
    # Smaller tiles (decode) get a warp per 256 elements.
    num_warps = max(1, min(8, block_t * block_d // 256))
    (y,) = launch(combine_kernels.combine_kernel, expert_rows, assignment_rows, T,
                  grid=(_cdiv(T, block_t), _cdiv(D, block_d)), mode=mode, out_shapes=[_out((T, D), out_dtype)],
                  num_warps=num_warps, D=D, TOP_K=top_k, SPLITS=splits, BLOCK_T=block_t, BLOCK_D=block_d)
    return y


# A combine launch should have at least this many programs (about two per SM of an H100 or H200).
COMBINE_MIN_PROGRAMS = 256


def _combine_tile(tokens: int, D: int) -> tuple[int, int]:
    """(BLOCK_T, BLOCK_D): 4096-element tiles, which run at HBM bandwidth when there are many; with
    few tokens they are halved (tokens first) down to 256 elements until the grid has
    COMBINE_MIN_PROGRAMS programs. A Qwen3 decode step (T=16, d=2048) had 8 programs of 4 x 1024."""
    block_d = min(1024, _next_pow2(D))
    block_t = max(1, 4096 // block_d)
    while _cdiv(tokens, block_t) * _cdiv(D, block_d) < COMBINE_MIN_PROGRAMS and block_t * block_d > 256:
        if block_t > 1:
            block_t //= 2
        else:
            block_d //= 2
    return block_t, block_d
