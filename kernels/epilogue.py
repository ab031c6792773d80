"""Epilogue pieces of the expert GEMMs: the activation, its derivative and the expert biases.

ACTIVATION "swiglu":          h = silu(gate) * up
ACTIVATION "clamped_swiglu":  h = (u + 1) * (g * sigmoid(ALPHA * g)),  g = min(gate, LIMIT),
                              u = clip(up, -LIMIT, LIMIT)                                   (gpt-oss)
Derivatives, given dh:
    swiglu:   dgate = dh * up * s * (1 + gate * (1 - s)),  dup = dh * silu(gate),  s = sigmoid(gate)
    clamped:  dgate = dh * (u + 1) * (s + ALPHA * g * s * (1 - s)) where gate <= LIMIT, else 0
              dup   = dh * g * s                               where -LIMIT <= up <= LIMIT, else 0
              (s = sigmoid(ALPHA * g))
The clamps pass the gradient up to and at the limit (as torch.clamp does), and a NaN gate or up is
neither clamped nor stopped: every comparison with NaN is false, so it keeps the unclamped branch.

The backward rebuilds gate and up from products the forward saved in the input's dtype; in 16 bits a
value near a limit could land on its other side, and its gradient would flip between 0 and a full
value. So the forward also saves its clamp decisions (clamp_decisions: bit 0 gate > LIMIT, bit 1 up
outside [-LIMIT, LIMIT], one byte per element), and the backward's derivative follows them.
ALPHA and LIMIT are constexpr floats: a model's values are fixed, and plain SwiGLU compiles none of this.
"""

import triton
import triton.language as tl


@triton.jit
def activation(gate, up, ACTIVATION: tl.constexpr, ALPHA: tl.constexpr, LIMIT: tl.constexpr):
    """h from the float32 gate and up pre-activations."""
    if ACTIVATION == "clamped_swiglu":
        g = tl.where(gate > LIMIT, LIMIT, gate)
        u = tl.where(up > LIMIT, LIMIT, up)
        u = tl.where(u < -LIMIT, -LIMIT, u)
        return (u + 1.0) * (g * tl.sigmoid(ALPHA * g))
    else:
        return gate * tl.sigmoid(gate) * up


@triton.jit
def clamp_decisions(gate, up, LIMIT: tl.constexpr):
    """uint8 per element: bit 0 gate > LIMIT, bit 1 up > LIMIT or up < -LIMIT (false for NaN)."""
    gate_clamped = (gate > LIMIT).to(tl.uint8)
    up_clipped = ((up > LIMIT) | (up < -LIMIT)).to(tl.uint8)
    return gate_clamped | (up_clipped << 1)


@triton.jit
def activation_grad(gate, up, dh, clamps, ACTIVATION: tl.constexpr, ALPHA: tl.constexpr, LIMIT: tl.constexpr):
    """(dgate, dup) from the float32 pre-activations and dh = d loss / d h; clamps (clamped_swiglu only)
    are the forward's clamp_decisions for these elements."""
    if ACTIVATION == "clamped_swiglu":
        gate_clamped = (clamps & 1) != 0
        up_clipped = (clamps & 2) != 0
        g = tl.where(gate_clamped, LIMIT, gate)
        u = tl.where(up_clipped, tl.where(up > 0.0, LIMIT, -LIMIT), up)
        sig = tl.sigmoid(ALPHA * g)
        d_gate = tl.where(gate_clamped, 0.0, dh * (u + 1.0) * (sig + ALPHA * g * sig * (1.0 - sig)))
        d_up = tl.where(up_clipped, 0.0, dh * (g * sig))
        return d_gate, d_up
    else:
        sig = tl.sigmoid(gate)
        return dh * up * sig * (1.0 + gate * (1.0 - sig)), dh * gate * sig


@triton.jit
def expert_bias(bias_ptr, expert, cols, col_ok, N: tl.constexpr):
    """[1, BLOCK_N] float32: columns cols of bias [E, N] at one (int64) expert; where col_ok is false
    (columns past N), 0."""
    return tl.load(bias_ptr + expert * N + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
