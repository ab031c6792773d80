"""Named MoE layer shapes for the benchmarks.

E experts, top-k routing, model width d, expert FFN width f (SwiGLU: w_gate and w_up are [E, d, f],
w_down is [E, f, d]). The big shapes follow the published configs of the models they are named after.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class MoEShape:
    name: str
    E: int  # experts
    k: int  # experts per token
    d: int  # model width
    f: int  # expert FFN width
    tags: tuple[str, ...] = ()

    def expert_weight_bytes(self, itemsize: int = 2) -> int:
        """Bytes of all three expert weights of all E experts."""
        return self.E * 3 * self.d * self.f * itemsize


SHAPES: dict[str, MoEShape] = {
    s.name: s
    for s in (
        MoEShape("mixtral", E=8, k=2, d=4096, f=14336, tags=("gpu", "model")),
        MoEShape("qwen3_30b_a3b", E=128, k=8, d=2048, f=768, tags=("gpu", "model")),
        MoEShape("deepseek_v2_lite", E=64, k=6, d=2048, f=1408, tags=("gpu", "model")),
        MoEShape("tiny", E=8, k=2, d=128, f=256, tags=("cpu", "smoke")),
    )
}

# Defaults of the sweep.
GPU_SHAPES = tuple(name for name, s in SHAPES.items() if "gpu" in s.tags)
CPU_SHAPES = tuple(name for name, s in SHAPES.items() if "cpu" in s.tags)
GPU_TOKENS = (16, 64, 128, 512, 2048, 8192)
QUICK_GPU_TOKENS = (128, 2048)
CPU_TOKENS = (16, 128)


def get(name: str) -> MoEShape:
    try:
        return SHAPES[name]
    except KeyError:
        raise ValueError(f"unknown shape {name!r}; known: {', '.join(SHAPES)}") from None
