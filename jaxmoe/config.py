"""Launch configurations for the grouped GEMMs: a checked-in table, then a heuristic.

A config is chosen at trace time from static facts only (device kind, dtype, E, d, f and a bucket of
the average rows per expert, T*k/E), so the first call never stalls on autotuning and the same
shapes always run the same kernels, which keeps results bitwise reproducible. Batch sizes of one
bucket share a config, and so their compiled kernels; buckets may pick different configs, each
compiled once (the kernels take the token count at run time).

`tuned_configs.json` is written by `python -m benchmarks.tune` on the GPU; keys are
"<device>/<dtype>/E<E>/d<d>/f<f>/m<bucket>". An entry may hold a "host_descriptors" object: GEMM
configs (any of "gate_up", "down", "dh", "dx", "dw") that replace the entry's own on a stack that builds
TMA descriptors on the host (jax-triton 0.4 with jaxlib 0.12, launch.host_descriptors_available): the
configs measured on that stack, host-built descriptors or not (the backward GEMMs use none; their tiles
were tuned there). The entry's own configs stay what older stacks run, so each stack keeps the kernels
that were measured on it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
from typing import NamedTuple

TABLE_PATH = pathlib.Path(__file__).with_name("tuned_configs.json")


@dataclasses.dataclass(frozen=True)
class GemmConfig:
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3
    split_k: int = 1  # K slices summed by the combine; only the down projection (no epilogue) uses it
    split_m: int = 1  # row tiles per dispatch row block: this GEMM's tiles have block_m / split_m rows
    tma: bool = False  # weights (and the down projection's sorted rows) through TMA tensor descriptors
    # with tma, on a stack that can (launch.host_descriptors_available): the descriptors built on the
    # host by jaxlib's kernel call, not by every program on the device; off until measured (issue 23)
    host_tma: bool = False


@dataclasses.dataclass(frozen=True)
class WeightGradConfig:
    """A weight-gradient GEMM: BLOCK_M x BLOCK_N output tiles, BLOCK_K rows of the expert per step."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    num_warps: int = 8
    num_stages: int = 3


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """One config per pass of the expert FFN.

    block_m is shared by every GEMM that walks the dispatch's row blocks (gate_up, down, dh, dx):
    they read the same block-to-expert map. The weight gradients (dw) contract over each expert's
    rows instead and tile their own outputs. Backward fields left out of a table entry come from
    the heuristic for that entry's shape.

    Table entries may carry extra keys (the tuner records the time it measured); they are ignored.
    """

    HOST_FIELDS = ("gate_up", "down", "dh", "dx", "dw")  # what an entry's "host_descriptors" object may replace

    block_m: int
    gate_up: GemmConfig  # forward: x @ [W_gate | W_up] with the SwiGLU epilogue
    down: GemmConfig  # forward: h @ W_down with the routing weight in the epilogue
    dh: GemmConfig | None = None  # backward: dy @ W_down^T with the dSwiGLU epilogue
    dx: GemmConfig | None = None  # backward: [dgate | dup] @ [W_gate; W_up]^T
    dw: WeightGradConfig | None = None  # backward: dW_gate, dW_up and dW_down

    def to_json(self) -> dict:
        return {key: value for key, value in dataclasses.asdict(self).items() if value is not None}

    @classmethod
    def from_json(cls, data: dict, host_descriptors: bool = False) -> "MoEConfig":
        """An entry's config; with host_descriptors, its "host_descriptors" configs in place of its own."""
        if host_descriptors:
            data = {**data, **{key: value for key, value in data.get("host_descriptors", {}).items()
                               if key in cls.HOST_FIELDS}}

        def gemm(key):
            return GemmConfig(**data[key]) if key in data else None

        dw = WeightGradConfig(**data["dw"]) if "dw" in data else None
        return cls(data["block_m"], gemm("gate_up"), gemm("down"), gemm("dh"), gemm("dx"), dw)

    def with_backward(self, dtype: str) -> "MoEConfig":
        """This config with every backward field filled (from the heuristic where unset)."""
        dh, dx, dw = _backward_defaults(self.block_m, dtype)
        return dataclasses.replace(self, dh=self.dh or dh, dx=self.dx or dx, dw=self.dw or dw)


def rows_bucket(n_tokens: int, top_k: int, num_experts: int) -> int:
    """Average rows per expert, rounded up to a power of two (1 .. 4096)."""
    average = max(1, math.ceil(n_tokens * top_k / num_experts))
    return min(4096, 1 << (average - 1).bit_length())


def device_key(device_kind: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100'; other cards keep a lowercased, dash-joined name."""
    kind = device_kind.lower()
    for known in ("h200", "h100", "a100", "mi300x", "mi325x"):
        if known in kind:
            return known
    return "-".join(kind.split())


class TableKey(NamedTuple):
    """What a table entry is looked up by; written in the JSON as "<device>/<dtype>/E<E>/d<d>/f<f>/m<bucket>"."""

    device: str
    dtype: str
    E: int
    d: int
    f: int
    bucket: int

    def __str__(self) -> str:
        return f"{self.device}/{self.dtype}/E{self.E}/d{self.d}/f{self.f}/m{self.bucket}"

    @classmethod
    def parse(cls, text: str) -> "TableKey":
        device, dtype, E, d, f, bucket = text.split("/")
        return cls(device, dtype, int(E[1:]), int(d[1:]), int(f[1:]), int(bucket[1:]))


def table_key(device: str, dtype: str, E: int, d: int, f: int, bucket: int) -> str:
    """The JSON key of an entry (see TableKey)."""
    return str(TableKey(device, dtype, E, d, f, bucket))


@functools.cache
def _table(host_descriptors: bool = False) -> dict[TableKey, MoEConfig]:
    if not TABLE_PATH.exists():
        return {}
    entries = json.loads(TABLE_PATH.read_text())
    return {TableKey.parse(key): MoEConfig.from_json(value, host_descriptors) for key, value in entries.items()}


def heuristic(bucket: int, dtype: str, d: int, f: int) -> MoEConfig:
    """A reasonable config for shapes and cards the table has not seen; it follows the tuned winners.

    Few rows per expert: the GEMMs stream weights, so a small BLOCK_M (little padding) and wide tiles
    keep many bytes in flight. Many rows: 128-row tiles, 8 warps, for tensor-core throughput.
    """
    if bucket <= 4:
        cfg = MoEConfig(16, GemmConfig(128, 128, 8, 4, 3), GemmConfig(128, 64, 8, 4, 4))
    elif bucket <= 16:
        # Rows per expert spread around the mean: 32-row blocks hold most experts' rows in one block, so
        # each weight tile is streamed once (Mixtral at T=64 on an H200: 0.77 ms against 0.88 at 16 rows).
        cfg = MoEConfig(32, GemmConfig(128, 128, 8, 4, 3), GemmConfig(128, 64, 8, 4, 4))
    elif bucket <= 64:
        cfg = MoEConfig(64, GemmConfig(128, 64, 8, 4, 4), GemmConfig(128, 64, 8, 4, 4))
    else:
        cfg = MoEConfig(128, GemmConfig(128, 64, 8, 8, 4), GemmConfig(256, 64, 8, 8, 3))
    if dtype == "float32":  # twice the bytes per element: halve the K tile to fit shared memory
        cfg = dataclasses.replace(cfg, gate_up=_halve_k(cfg.gate_up), down=_halve_k(cfg.down))
    return cfg


def _halve_k(gemm):
    return dataclasses.replace(gemm, block_k=max(32, gemm.block_k // 2), num_stages=min(gemm.num_stages, 3))


def _backward_defaults(block_m: int, dtype: str) -> tuple[GemmConfig, GemmConfig, WeightGradConfig]:
    """Backward GEMM configs for a forward's block_m: the dH and dX GEMMs tile like the down projection
    (K = d and K = 2f are long), the weight gradients use square 128 tiles over 64-row steps."""
    wide = block_m >= 64
    dh = GemmConfig(128, 64, 8, 8 if wide else 4, 3)
    dx = GemmConfig(128, 64, 8, 8 if wide else 4, 3)
    dw = WeightGradConfig(128, 128, 64, 8, 3)
    if dtype == "float32":
        dh, dx, dw = _halve_k(dh), _halve_k(dx), _halve_k(dw)
    return dh, dx, dw


# LDS (AMD's shared memory) a program may use on CDNA3 (MI300X, MI325X).
ROCM_LDS_BYTES = 64 * 1024


def _fit_lds(gemm, rows: int, b_tiles: int, itemsize: int):
    """gemm (a GemmConfig or WeightGradConfig) unchanged if its pipelined operand tiles fit ROCM_LDS_BYTES;
    else at most 2 stages, and the K tile halved (down to 16) until they fit."""
    def lds_bytes(g):
        # AMD's stream pipeliner keeps num_stages - 1 copies of the operand tiles in LDS.
        return max(1, g.num_stages - 1) * (rows * g.block_k + b_tiles * g.block_k * g.block_n) * itemsize

    if lds_bytes(gemm) <= ROCM_LDS_BYTES:
        return gemm
    gemm = dataclasses.replace(gemm, num_stages=min(gemm.num_stages, 2))
    while lds_bytes(gemm) > ROCM_LDS_BYTES and gemm.block_k > 16:
        gemm = dataclasses.replace(gemm, block_k=gemm.block_k // 2)
    return gemm


def for_rocm(cfg: MoEConfig, dtype: str) -> MoEConfig:
    """cfg (backward fields filled) with every GEMM fitted to an AMD CDNA3 GPU's 64 KiB of LDS.

    The table's and the heuristic's tiles come from Hoppers (up to 227 KiB of shared memory per
    program); compiled for gfx942 the heuristic's forward grouped GEMMs needed 72-144 KiB, which an
    MI300 refuses to launch. A GEMM that fits is left as it is (a config the caller chose, too); one
    that does not gets at most 2 stages (what AMD's own MoE tunings use) and a smaller K tile.
    jaxmoe.portability compiles the result for gfx942 and checks the LDS the compiler reports.
    """
    itemsize = 4 if dtype == "float32" else 2
    return dataclasses.replace(
        cfg,
        gate_up=_fit_lds(cfg.gate_up, cfg.block_m // cfg.gate_up.split_m, 2, itemsize),  # gate and up tiles
        down=_fit_lds(cfg.down, cfg.block_m // cfg.down.split_m, 1, itemsize),
        dh=_fit_lds(cfg.dh, cfg.block_m, 1, itemsize),
        dx=_fit_lds(cfg.dx, cfg.block_m, 1, itemsize),
        dw=_fit_lds(cfg.dw, cfg.dw.block_m, 1, itemsize),
    )


def select(device_kind: str, dtype: str, n_tokens: int, top_k: int, E: int, d: int, f: int,
           host_descriptors: bool = False) -> MoEConfig:
    """The config for these static facts; host_descriptors: the running stack builds TMA descriptors on
    the host (the caller asks launch.host_descriptors_available), so entries' overrides for it apply."""
    bucket = rows_bucket(n_tokens, top_k, E)
    device = device_key(device_kind)
    # float16 tiles behave as bfloat16 ones (same bytes, same tensor-core rate): share their entries.
    for table_dtype in (dtype, "bfloat16") if dtype == "float16" else (dtype,):
        tuned = _table(host_descriptors).get(TableKey(device, table_dtype, E, d, f, bucket))
        if tuned is not None:
            return tuned
    return heuristic(bucket, dtype, d, f)


def shipped_configs(devices=None, rocm: bool = False) -> list[tuple[str, MoEConfig]]:
    """Every distinct (dtype, config, backward filled) this package can pick: the table's entries for the
    given device keys (all when None) and the heuristic's; with rocm, each as for_rocm fits it."""
    pairs = {(key.dtype, cfg.with_backward(key.dtype)) for host in (False, True) for key, cfg in _table(host).items()
             if devices is None or key.device in devices}
    pairs |= {("float16", cfg) for dtype, cfg in list(pairs) if dtype == "bfloat16"}  # see select()
    for bucket in (1, 16, 64, 4096):  # one per heuristic branch
        for dtype in ("bfloat16", "float16", "float32"):
            pairs.add((dtype, heuristic(bucket, dtype, 128, 128).with_backward(dtype)))
    if rocm:
        pairs = {(dtype, for_rocm(cfg, dtype)) for dtype, cfg in pairs}
    return sorted(pairs, key=lambda pair: (pair[0], json.dumps(pair[1].to_json(), sort_keys=True)))
