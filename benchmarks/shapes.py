"""Named MoE layer shapes for the benchmarks, with the routing and expert options of their models.

E experts, top-k routing, model width d, expert FFN width f (w_gate and w_up are [E, d, f], w_down is
[E, f, d]). The big shapes follow the published configs of the models they are named after.

A shape also carries its layer's options, and every implementation runs it with them:
  router    a jaxmoe.Router; None means Router(k): softmax top-k, renormalised (the plain shapes)
  experts   a jaxmoe.Experts; the default is plain SwiGLU with the weight on the output
  router_bias, selection_bias, expert_biases: whether the layer has a router bias [E] (bf16, trained),
            a selection bias [E] (float32, not trained) and expert biases b_gate, b_up [E, f] and
            b_down [E, d] (bf16). They are arrays of the benchmark inputs (benchmarks.moe.make_weights).
The defaults are the plain layer, so the plain shapes time what they timed before these fields.

Shapes tagged "options" are left out of the default sweeps (they are large, and the default GPU sweep's
time matters): name them, e.g. `--shapes deepseek_v3,gpt_oss_120b`.
  deepseek_v3   DeepSeek-V3's (and Kimi K2's) routed layer: sigmoid scores, selection by score plus a
                correction bias, 4 of 8 groups kept by the sum of each group's top two, renormalised
                with +1e-20, times 2.5. Its one shared expert is a dense SwiGLU outside the routed experts
                and is left out, so the cell times the routed layer, as the other shapes do.
  gpt_oss_120b  gpt-oss-120b's layer: a router bias, softmax over the 4 picked logits (= the renormalised
                softmax), clamped SwiGLU (alpha 1.702, limit 7) with biases on gate, up and down.
  deepseek_v3_plain, gpt_oss_120b_plain: the same dims as the plain layer (tagged "plain_twin", also run
                only when named), to measure what the options cost.
  tiny_deepseek_v3, tiny_gpt_oss: the same options at CPU size, for tests/test_benchmarks.py.
"""

from __future__ import annotations

import dataclasses

from jaxmoe.options import Experts, Router


@dataclasses.dataclass(frozen=True)
class MoEShape:
    name: str
    E: int  # experts
    k: int  # experts per token
    d: int  # model width
    f: int  # expert FFN width
    tags: tuple[str, ...] = ()
    router: Router | None = None  # None: Router(k); set to it after construction
    experts: Experts = Experts()
    router_bias: bool = False
    selection_bias: bool = False
    expert_biases: bool = False

    def __post_init__(self):
        if self.router is None:
            object.__setattr__(self, "router", Router(self.k))
        if self.router.top_k != self.k:
            raise ValueError(f"shape {self.name}: router.top_k={self.router.top_k} differs from k={self.k}")
        self.router.check_experts(self.E, f"shape {self.name} has E={self.E}")

    @property
    def plain(self) -> bool:
        """Softmax top-k and SwiGLU without biases: the layer every shape was before the options."""
        return (self.router == Router(self.k) and self.experts.plain and not self.router_bias
                and not self.selection_bias and not self.expert_biases)

    def describe(self) -> str:
        """The options in one line ("plain" for the plain layer)."""
        if self.plain:
            return "plain"
        parts = [f"{name}={value!r}"
                 for options, default in ((self.router, Router(self.k)), (self.experts, Experts()))
                 for name, value in _changed(options, default)]
        parts += [name for name in ("router_bias", "selection_bias", "expert_biases") if getattr(self, name)]
        return " ".join(parts)

    def expert_weight_bytes(self, itemsize: int = 2) -> int:
        """Bytes of all three expert weights of all E experts."""
        return self.E * 3 * self.d * self.f * itemsize

    def expert_bias_bytes(self, itemsize: int = 2) -> int:
        """Bytes of one expert's biases (b_gate, b_up, b_down); 0 without expert biases."""
        return (2 * self.f + self.d) * itemsize if self.expert_biases else 0


def _changed(options, default):
    """(name, value) of the fields of a Router or Experts that differ from default's."""
    return [(f.name, getattr(options, f.name)) for f in dataclasses.fields(options)
            if getattr(options, f.name) != getattr(default, f.name)]


# DeepSeek-V3's routing (config.json: n_group 8, topk_group 4, routed_scaling_factor 2.5, norm_topk_prob).
_DEEPSEEK_V3_ROUTER = dict(scoring="sigmoid", renormalize_epsilon=1e-20, num_groups=8, top_groups=4,
                           group_score="top2_sum", scaling_factor=2.5)
_GPT_OSS_EXPERTS = Experts("clamped_swiglu", alpha=1.702, limit=7.0)

SHAPES: dict[str, MoEShape] = {
    s.name: s
    for s in (
        MoEShape("mixtral", E=8, k=2, d=4096, f=14336, tags=("gpu", "model")),
        MoEShape("qwen3_30b_a3b", E=128, k=8, d=2048, f=768, tags=("gpu", "model")),
        MoEShape("deepseek_v2_lite", E=64, k=6, d=2048, f=1408, tags=("gpu", "model")),
        MoEShape("deepseek_v3", E=256, k=8, d=7168, f=2048, tags=("gpu", "model", "options"),
                 router=Router(8, **_DEEPSEEK_V3_ROUTER), selection_bias=True),
        MoEShape("gpt_oss_120b", E=128, k=4, d=2880, f=2880, tags=("gpu", "model", "options"),
                 router_bias=True, experts=_GPT_OSS_EXPERTS, expert_biases=True),
        # The same dims with the plain layer (softmax top-k, SwiGLU, no biases): the options' cost is the
        # difference between the two rows of one sweep.
        MoEShape("deepseek_v3_plain", E=256, k=8, d=7168, f=2048, tags=("gpu", "model", "plain_twin")),
        MoEShape("gpt_oss_120b_plain", E=128, k=4, d=2880, f=2880, tags=("gpu", "model", "plain_twin")),
        MoEShape("tiny", E=8, k=2, d=128, f=256, tags=("cpu", "smoke")),
        # 4 groups of 2 experts, 2 kept: top2_sum is each group's sum, and k=2 of the 4 candidates.
        MoEShape("tiny_deepseek_v3", E=8, k=2, d=128, f=256, tags=("cpu", "smoke", "options"),
                 router=Router(2, **{**_DEEPSEEK_V3_ROUTER, "num_groups": 4, "top_groups": 2}),
                 selection_bias=True),
        MoEShape("tiny_gpt_oss", E=8, k=2, d=128, f=128, tags=("cpu", "smoke", "options"),
                 router=Router(2), router_bias=True, experts=_GPT_OSS_EXPERTS, expert_biases=True),
    )
}

# Defaults of the sweep: shapes tagged "options" run only when named.
GPU_SHAPES = tuple(name for name, s in SHAPES.items()
                   if "gpu" in s.tags and "options" not in s.tags and "plain_twin" not in s.tags)
CPU_SHAPES = tuple(name for name, s in SHAPES.items() if "cpu" in s.tags and "options" not in s.tags)
OPTION_SHAPES = tuple(name for name, s in SHAPES.items() if "gpu" in s.tags and "options" in s.tags)
GPU_TOKENS = (16, 64, 128, 512, 2048, 8192)
QUICK_GPU_TOKENS = (128, 2048)
CPU_TOKENS = (16, 128)


def get(name: str) -> MoEShape:
    try:
        return SHAPES[name]
    except KeyError:
        raise ValueError(f"unknown shape {name!r}; known: {', '.join(SHAPES)}") from None
