"""The expert FFN through the Triton kernels, with a custom VJP whose backward runs in kernels too.

Forward: dispatch -> gate/up GEMM (routing weight on the input, biases and activation in its epilogue)
-> down GEMM (bias and routing weight on the output in its epilogue) -> combine. Backward
(kernels/grouped_gemm_bwd.py has the math): the dH GEMM with the dActivation epilogue and the
routing-weight gradient -> the dX GEMM and a combine -> the three weight-gradient GEMMs -> with biases,
their column sums. No float atomics anywhere: every sum has one fixed order, so gradients are bitwise
reproducible.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxmoe import config as configs
from jaxmoe.launch import host_descriptors_available
from jaxmoe.options import Experts
from jaxmoe.ops._util import F32 as _F32
from jaxmoe.ops.dispatch import Dispatch, dispatch
from jaxmoe.ops.gemm import bias_grad, combine, dh_gemm, dot_precision, grouped_gemm, on_rocm, weight_grad


@dataclasses.dataclass(frozen=True)
class _FFNOptions:
    mode: str
    config: configs.MoEConfig | None  # None: pick from the table / heuristic
    precision: str
    experts: Experts = Experts()


class Residuals(NamedTuple):
    """What the forward keeps for the backward. Per token: k * 3f elements in x's dtype (hgu), with
    clamped_swiglu k * f bytes of clamp decisions, plus k * 8 bytes of dispatch indices; the rest are
    the inputs themselves."""

    x: jax.Array  # [T, d] input: the dW_gate/dW_up GEMM gathers its rows (no permuted copy is kept)
    weights: jax.Array  # [T, k] input: scales dH (or the gate and up), dX or the dW operands; has a gradient
    w_gate: jax.Array  # [E, d, f] input: dX reads it transposed
    w_up: jax.Array  # [E, d, f] input: dX reads it transposed
    w_down: jax.Array  # [E, f, d] input: dH reads it transposed
    b_gate: jax.Array | None  # [E, f] input: dH rebuilds the gate from its product
    b_up: jax.Array | None  # [E, f] input: likewise the up
    b_down: jax.Array | None  # [E, d] input: <dy, b_down> is part of the routing weight's gradient
    disp: Dispatch  # the sort and row blocks: reusing them saves the dispatch launches and keeps rows aligned
    hgu: jax.Array  # [n, 3f] = h | x Wg | x Wu per sorted row: h is the dW_down operand and gives the weight
    #                 gradient; the products, with the weight and biases, give the pre-activations for
    #                 dActivation. Recomputing them costs the gate/up GEMM, 2/3 of the forward's FLOPs,
    #                 while the forward writes them for 2f extra elements per row
    clamps: jax.Array | None  # [n, f] uint8 with clamped_swiglu: the forward's clamp decisions (epilogue.py)


def device_kind(mode: str) -> str:
    """The card the configs are looked up for: the GPU's kind for "triton", "cpu" for the interpreter."""
    return jax.devices()[0].device_kind if mode == "triton" else "cpu"


def picked_config(mode: str, dtype, T: int, k: int, E: int, d: int, f: int) -> configs.MoEConfig:
    """The config jaxmoe runs for these shapes in this mode, on this card and stack (the table's entries
    for host-built descriptors apply only where a "triton" launch can build them)."""
    host = mode == "triton" and host_descriptors_available()
    return configs.select(device_kind(mode), jnp.dtype(dtype).name, T, k, E, d, f, host_descriptors=host)


def _config(options: _FFNOptions, dtype, T: int, k: int, E: int, d: int, f: int) -> configs.MoEConfig:
    name = jnp.dtype(dtype).name
    cfg = options.config or picked_config(options.mode, dtype, T, k, E, d, f)
    cfg = cfg.with_backward(name)
    return configs.for_rocm(cfg, name) if on_rocm(options.mode) else cfg


def _ffn_forward(x, weights, ids, w_gate, w_up, w_down, expert_first, options: _FFNOptions, keep: bool,
                 b_gate=None, b_up=None, b_down=None):
    """y, disp and (hgu, clamps) when keep, as in Residuals; without keep, the gated GEMM's output h and None."""
    T, d = x.shape
    k = ids.shape[1]
    E, _, f = w_gate.shape
    cfg = _config(options, x.dtype, T, k, E, d, f)
    mode = options.mode
    row_weights = weights.reshape(-1).astype(_F32)
    # Everything after the dispatch sees only local assignments (kernels/dispatch.py): the rest of the
    # forward and the whole backward reuse disp, so non-local assignments get no rows and no gradient.
    disp = dispatch(ids.reshape(-1), E, cfg.block_m, mode, expert_first)
    common = dict(disp=disp, top_k=k, block_m=cfg.block_m, precision=options.precision, mode=mode)
    hgu = grouped_gemm(x, w_gate, w_up, row_weights, gemm=cfg.gate_up, gather_a=True, gated=True,
                       scale_rows=False, store_preact=keep, out_dtype=x.dtype, bias=b_gate, bias2=b_up,
                       experts=options.experts, **common)
    hgu, clamps = hgu if keep else (hgu, None)
    # With keep, hgu is [n, 3f]: the down GEMM reads its first f columns through the row stride.
    # Its weighted rows stay float32 (as split-K's partial sums are), so the combine rounds each token's
    # sum once and y does not depend on whether the config splits K (README, Numerics).
    rows = grouped_gemm(hgu, w_down, w_down, row_weights, gemm=cfg.down, gather_a=False, gated=False,
                        scale_rows=options.experts.weight_on == "output", out_dtype=_F32, bias=b_down, **common)
    return combine(rows, disp.assignment_rows, T, k, x.dtype, mode), disp, (hgu, clamps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(10,))
def _fused_expert_ffn(x, weights, ids, w_gate, w_up, w_down, expert_first, b_gate, b_up, b_down, options):
    return _ffn_forward(x, weights, ids, w_gate, w_up, w_down, expert_first, options, False, b_gate, b_up, b_down)[0]


def _fused_expert_ffn_fwd(x, weights, ids, w_gate, w_up, w_down, expert_first, b_gate, b_up, b_down, options):
    y, disp, (hgu, clamps) = _ffn_forward(x, weights, ids, w_gate, w_up, w_down, expert_first, options, True, b_gate,
                                          b_up, b_down)
    return y, Residuals(x, weights, w_gate, w_up, w_down, b_gate, b_up, b_down, disp, hgu, clamps)


def _fused_expert_ffn_bwd(options, res: Residuals, d_y):
    x, weights, w_gate, w_up, w_down, b_gate, b_up, b_down, disp, hgu, clamps = res
    T, d = x.shape
    k = weights.shape[1]
    E, _, f = w_gate.shape
    cfg = _config(options, x.dtype, T, k, E, d, f)
    mode, precision, experts = options.mode, options.precision, options.experts
    on_input = experts.weight_on == "input"  # the weight scales the gate and up (s_a), else the output (o_a)
    d_y = d_y.astype(x.dtype)
    row_weights = weights.reshape(-1).astype(_F32)
    common = dict(top_k=k, precision=precision, mode=mode)

    dgu, dw_parts = dh_gemm(d_y, w_down, hgu, row_weights, disp, block_m=cfg.block_m, gemm=cfg.dh, clamps=clamps,
                            b_gate=b_gate, b_up=b_up, b_down=b_down, experts=experts, **common)
    # dX rows stay float32 until the combine has summed each token's k rows.
    dx_rows = grouped_gemm(dgu, w_gate, w_up, row_weights, disp, block_m=cfg.block_m, gemm=cfg.dx,
                           gather_a=False, gated=False, scale_rows=on_input, concat_k=True, transpose_b=True,
                           out_dtype=_F32, **common)
    d_x = combine(dx_rows, disp.assignment_rows, T, k, x.dtype, mode)
    # Routing-weight gradient: each assignment's partial sums over the planes, added in plane order.
    d_weights = combine(dw_parts[:, :, None], disp.assignment_rows, T * k, 1, _F32, mode).reshape(T, k)
    d_gate, d_up = weight_grad(x, dgu, row_weights, disp, E=E, m_out=d, n_out=f, gather_a=True, gather_b=False,
                               scale_b=on_input, two_outputs=True, cfg=cfg.dw, out_dtype=w_gate.dtype, **common)
    (d_down,) = weight_grad(hgu, d_y, row_weights, disp, E=E, m_out=f, n_out=d, gather_a=False, gather_b=True,
                            scale_b=not on_input, two_outputs=False, cfg=cfg.dw, out_dtype=w_down.dtype, **common)
    d_b_gate = d_b_up = d_b_down = None
    if b_gate is not None:
        # The gate and up biases come after the weight's scaling: their gradients are unscaled dgate, dup.
        d_b = bias_grad(dgu, row_weights, disp, E=E, top_k=k, gather_b=False, scale_b=False,
                        out_dtype=b_gate.dtype, mode=mode)
        d_b_gate, d_b_up = d_b[:, :f], d_b[:, f:]
        d_b_down = bias_grad(d_y, row_weights, disp, E=E, top_k=k, gather_b=True, scale_b=not on_input,
                             out_dtype=b_down.dtype, mode=mode)
    return (d_x, d_weights.astype(weights.dtype), None, d_gate, d_up, d_down, None, d_b_gate, d_b_up, d_b_down)


_fused_expert_ffn.defvjp(_fused_expert_ffn_fwd, _fused_expert_ffn_bwd)


def expert_ffn(x, weights, ids, w_gate, w_up, w_down, expert_first=0, b_gate=None, b_up=None, b_down=None, *,
               experts: Experts = Experts(), mode: str = "triton", config: configs.MoEConfig | None = None):
    """`jaxmoe.expert_ffn` through the Triton kernels, forward and backward (arguments already validated).

    The expert weights hold experts [expert_first, expert_first + E) of a larger set (expert_first: an
    int or a traced int32 scalar; 0 on one device). An assignment whose id is outside that range
    belongs to another device: it contributes zero to y and its routing weight gets a zero gradient.
    b_gate, b_up [E, f] and b_down [E, d] are the experts' biases (all or none); experts the static
    options (activation, weight on the output or the input), all applied in the kernels' epilogues.
    """
    T, d = x.shape
    if T == 0:  # nothing to launch; gradients of inputs the result does not touch are zeros
        return jnp.zeros((0, d), x.dtype)
    options = _FFNOptions(mode, config, dot_precision(x.dtype, mode), experts)
    expert_first = jnp.asarray(expert_first, jnp.int32)
    return _fused_expert_ffn(x, weights, ids, w_gate, w_up, w_down, expert_first, b_gate, b_up, b_down, options)
