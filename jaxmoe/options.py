"""The static options of a MoE layer: how tokens are routed (`Router`) and what an expert computes (`Experts`).

Both are frozen dataclasses: hashable, so they are static under jit (a new value compiles anew, the
same value reuses the compile), and each field has one meaning in every implementation.

Router, for logits [T, E] (= x @ router_weight (+ router_bias), in float32):

    scores    = softmax(logits) or sigmoid(logits)                                 (scoring)
    choice    = scores (+ selection_bias)                                          (selection only)
    groups    : the E experts in num_groups groups of E / num_groups; each group scores
                max(choice over the group) or the sum of its top two (group_score); only the
                top_groups best groups stay candidates (the others' choice is -inf)
    ids       = top_k(choice), lower id first on ties, NaN above every number
    weights   = scores[ids] (/ sum of them, + renormalize_epsilon, if renormalize) * scaling_factor

Experts, for the rows of expert e (x a token's input, w its routing weight):

    gate, up  = x @ W_gate[e] (+ b_gate[e]), x @ W_up[e] (+ b_up[e])    (times w first, with weight_on="input")
    h         = silu(gate) * up                                           (activation="swiglu")
              = (clip(up, -limit, limit) + 1) * g * sigmoid(alpha * g),  g = min(gate, limit)
                                                                          (activation="clamped_swiglu", gpt-oss)
    out       = h @ W_down[e] (+ b_down[e]), times w with weight_on="output"

With weight_on="input" the expert computes on w * x (Llama 4); (w x) W = w (x W), so the kernels scale
the gate and up accumulators instead of the input, and the bias (if any) is added after the scaling.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

SCORINGS = ("softmax", "sigmoid")
GROUP_SCORES = ("max", "top2_sum")
ACTIVATIONS = ("swiglu", "clamped_swiglu")
WEIGHT_ON = ("output", "input")


def _check_int(name: str, value, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be a Python int, got {type(value).__name__}")
    if value < least:
        raise ValueError(f"{name} must be at least {least}, got {value}")
    return int(value)


def _check_float(name: str, value, *, positive: bool = False, non_negative: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a Python float, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or (positive and value <= 0) or (non_negative and value < 0):
        what = "a positive" if positive else "a non-negative" if non_negative else "a finite"
        raise ValueError(f"{name} must be {what} finite float, got {value}")
    return value


def _check_choice(name: str, value, choices) -> str:
    if value not in choices:
        listed = ", ".join(repr(c) for c in choices[:-1]) + f" or {choices[-1]!r}"
        raise ValueError(f"{name} must be {listed}, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class Router:
    """How each token picks its experts and their weights; see the module docstring for the math.

    Presets of real models: `jaxmoe.hf` builds one from a checkpoint's config.json.
      Mixtral, Qwen3-MoE: Router(k); OLMoE, Qwen2-MoE: Router(k, renormalize=False);
      DeepSeek-V3, Kimi K2, GLM-4.5: Router(8, scoring="sigmoid", renormalize_epsilon=1e-20, num_groups=8,
        top_groups=4, group_score="top2_sum", scaling_factor=2.5) with a selection bias;
      gpt-oss: Router(4) with a router bias (softmax over the k picked logits is the renormalised softmax);
      Llama 4: Router(1, scoring="sigmoid", renormalize=False) with Experts(weight_on="input").
    """

    top_k: int
    scoring: str = "softmax"
    renormalize: bool = True
    # 0: divide by the sum, guarded by float32's tiny against sigmoid weights that all underflow;
    # > 0: divide by sum + epsilon (DeepSeek's 1e-20).
    renormalize_epsilon: float = 0.0
    num_groups: int = 1
    top_groups: int = 1  # groups kept; with num_groups = 1 every expert is a candidate
    group_score: str = "max"
    scaling_factor: float = 1.0  # DeepSeek's routed_scaling_factor, applied after renormalisation

    def __post_init__(self):
        # Only the type here: the range needs E, and check_experts names where E came from.
        object.__setattr__(self, "top_k", _check_int("top_k", self.top_k, -2**31))
        _check_choice("scoring", self.scoring, SCORINGS)
        if not isinstance(self.renormalize, (bool, np.bool_)):
            raise TypeError(f"renormalize must be a bool, got {type(self.renormalize).__name__}")
        object.__setattr__(self, "renormalize", bool(self.renormalize))
        object.__setattr__(self, "renormalize_epsilon",
                           _check_float("renormalize_epsilon", self.renormalize_epsilon, non_negative=True))
        object.__setattr__(self, "num_groups", _check_int("num_groups", self.num_groups, 1))
        object.__setattr__(self, "top_groups", _check_int("top_groups", self.top_groups, 1))
        if self.top_groups > self.num_groups:
            raise ValueError(f"top_groups must satisfy top_groups <= num_groups, got top_groups={self.top_groups} "
                             f"and num_groups={self.num_groups}")
        _check_choice("group_score", self.group_score, GROUP_SCORES)
        object.__setattr__(self, "scaling_factor", _check_float("scaling_factor", self.scaling_factor))

    @property
    def grouped(self) -> bool:
        """Whether selection is group-limited (some groups are left out)."""
        return self.top_groups < self.num_groups

    def check_experts(self, E: int, E_from: str) -> None:
        """top_k and the groups against E experts; E_from says which arguments E was read from."""
        if not 1 <= self.top_k <= E:
            raise ValueError(f"top_k must satisfy 1 <= top_k <= E, but top_k={self.top_k} and {E_from}")
        if E % self.num_groups:
            raise ValueError(f"num_groups={self.num_groups} must divide the E={E} experts ({E_from})")
        per_group = E // self.num_groups
        if self.grouped and self.top_k > self.top_groups * per_group:
            raise ValueError(f"top_k={self.top_k} exceeds the {self.top_groups} kept groups' "
                             f"{self.top_groups * per_group} experts (E={E}, num_groups={self.num_groups})")
        if self.grouped and self.group_score == "top2_sum" and per_group < 2:
            raise ValueError(f"group_score='top2_sum' needs at least 2 experts a group, got E={E} over "
                             f"num_groups={self.num_groups}")


@dataclasses.dataclass(frozen=True)
class Experts:
    """What each routed expert computes; see the module docstring for the math."""

    activation: str = "swiglu"
    alpha: float = 1.702  # clamped_swiglu's sigmoid slope
    limit: float = 7.0  # clamped_swiglu's clamp
    weight_on: str = "output"  # the routing weight multiplies the expert's output, or its input (Llama 4)

    def __post_init__(self):
        _check_choice("activation", self.activation, ACTIVATIONS)
        object.__setattr__(self, "alpha", _check_float("alpha", self.alpha))
        object.__setattr__(self, "limit", _check_float("limit", self.limit, positive=True))
        _check_choice("weight_on", self.weight_on, WEIGHT_ON)

    @property
    def plain(self) -> bool:
        """SwiGLU with the weight on the output: what every implementation ran before these options."""
        return self == Experts()


def make_router(router: Router | None, top_k, scoring, renormalize) -> Router:
    """A Router from either `router` or the shortcut arguments top_k, scoring and renormalize (not both)."""
    if router is None:
        if top_k is None:
            raise TypeError("pass top_k (an int) or router=jaxmoe.Router(...)")
        return Router(top_k, scoring, renormalize)
    if not isinstance(router, Router):
        raise TypeError(f"router must be a jaxmoe.Router, got {type(router).__name__}")
    if top_k is not None or scoring != "softmax" or renormalize is not True:
        raise TypeError("pass either router=jaxmoe.Router(...) or top_k/scoring/renormalize, not both")
    return router


def make_experts(experts: Experts | None) -> Experts:
    if experts is None:
        return Experts()
    if not isinstance(experts, Experts):
        raise TypeError(f"experts must be a jaxmoe.Experts, got {type(experts).__name__}")
    return experts
