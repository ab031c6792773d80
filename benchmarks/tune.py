"""Regenerates jaxmoe/tuned_configs.json on the GPU, and times the pipeline stage by stage.

    python -m benchmarks.tune --stages                 # per-stage ms with the configs jaxmoe picks today, and
                                                       # the layer, expert FFN and GEMMs as nested jitted calls
    python -m benchmarks.tune --out $OUT/table.json    # sweep configs per (shape, T), write the table
    python -m benchmarks.tune --backward --out ...     # sweep the backward GEMMs' configs (dh, dx, dw)
    python -m benchmarks.tune --down-only --out ...    # sweep only the down GEMM, keeping BLOCK_M and gate/up

For each (shape, T) the sweep fixes the routing of random bf16 inputs, then for each candidate BLOCK_M
times the gate+up GEMM and the down GEMM separately over a short list of tile shapes (for BLOCK_M >= 64
also tiles of BLOCK_M/2 rows over the same row blocks, split_m=2), and keeps the
BLOCK_M whose best pair (plus its dispatch) is fastest. Entries are keyed by device, dtype, E, d, f
and the rows-per-expert bucket (see jaxmoe/config.py), so every T of a bucket shares an entry.
Candidates that do not fit the card (shared memory) are reported and skipped, and so are candidates
whose outputs differ from the first candidate's by more than rounding (AGREE): the sweep times tile
shapes it never checks otherwise, and a miscompiled one may well be the fastest.

--backward keeps the forward config jaxmoe picks today (its BLOCK_M fixes the row blocks the dH and dX
GEMMs walk) and times, from the forward's saved activations and a random dY, the dH GEMM, the dX GEMM
and the two weight-gradient launches over their own candidate lists; the fastest of each is merged
into the entry (fields dh, dx, dw). `--mode interpret --limit 1` runs the same code on a CPU, slowly,
as a smoke test.

On a stack that builds TMA descriptors on the host (jax-triton 0.4 with jaxlib 0.12) the forward sweep
also tries host-built TMA tiles, keeps an existing entry's BLOCK_M, and writes its winners into the
entry's "host_descriptors" object (jaxmoe/config.py): run on that stack, it tunes that stack's kernels
and leaves the configs older stacks run as they were. --backward there writes dh, dx and dw into the
same object, for the same reason.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
import time

import jax
import jax.numpy as jnp

import jaxmoe
from jaxmoe import config as configs
from jaxmoe import ops, pipeline
from jaxmoe.launch import host_descriptors_available
from jaxmoe.ops import gemm as gemm_ops
from jaxmoe.ops.ffn import device_kind, picked_config
from benchmarks import shapes as shapes_lib
from benchmarks.timing import time_fn

# (block_n, block_k, num_warps, num_stages) per BLOCK_M class
# Small tiles stream weights: 8 warps keep more loads in flight per program (on an H200 at T = 16, the
# down GEMM alone took 73.0 us at 8 warps against 75.3 at 4 for DeepSeek-V2-Lite, 69.5 against 70.3 for Qwen3).
SMALL_M = [(64, 128, 4, 4), (128, 128, 4, 3), (64, 256, 4, 3), (32, 256, 4, 4), (128, 64, 4, 4), (64, 64, 4, 5),
           (128, 64, 8, 4), (128, 64, 8, 5), (128, 128, 8, 3), (256, 64, 8, 3)]
MID_M = [(64, 64, 4, 4), (128, 64, 4, 4), (128, 64, 8, 3), (64, 128, 4, 3), (256, 64, 8, 3), (128, 128, 8, 3)]
LARGE_M = [(64, 64, 4, 4), (128, 64, 8, 3), (128, 64, 8, 4), (256, 64, 8, 3), (256, 64, 8, 4), (128, 128, 8, 3),
           (64, 128, 8, 3)]


def block_m_candidates(bucket: int) -> list[int]:
    if bucket <= 4:
        return [16]
    if bucket <= 16:
        return [16, 32]
    if bucket <= 32:
        return [16, 32, 64]
    if bucket <= 128:
        return [32, 64, 128]
    return [64, 128]


# split-K candidates for the down projection when few rows meet a long K (block_n, block_k, warps, stages, splits)
SPLIT_DOWN = [(64, 128, 4, 4, 2), (64, 128, 4, 4, 4), (128, 128, 4, 3, 4), (64, 256, 4, 3, 4)]


def gemm_candidates(block_m: int, gated: bool, K: int, host: bool = False) -> list[configs.GemmConfig]:
    """The tiles tried for one GEMM; host: the stack builds TMA descriptors on the host, so the TMA
    candidates are tried that way too (for both GEMMs: without the per-program descriptor setup, on an
    H100 with Triton 3.9 they beat pointer loads for the down GEMM by 6-7% at Mixtral T=2048 and
    DeepSeek-V2-Lite T=8192, and the gate/up GEMM by 3% at Mixtral T=2048; benchmarks/RESULTS.md)."""
    table = SMALL_M if block_m <= 32 else MID_M if block_m == 64 else LARGE_M
    found = [configs.GemmConfig(bn, bk, 8, w, s) for bn, bk, w, s in table]
    if block_m >= 64:  # the same row blocks run as two half-height tiles: less padding past an expert's rows
        half = SMALL_M if block_m // 2 <= 32 else MID_M
        found += [configs.GemmConfig(bn, bk, 8, w, s, split_m=2) for bn, bk, w, s in half[:3]]
    if not gated and block_m <= 32 and K >= 4096:
        found += [configs.GemmConfig(bn, bk, 8, w, s, split) for bn, bk, w, s, split in SPLIT_DOWN]
    if not gated and block_m >= 64:
        # Weights and rows through TMA descriptors: on an H200 (Triton 3.6) 3-5% faster for Mixtral's
        # long-K down projection, 2-10% slower for short K, where building the descriptors in every
        # program costs more than the tile's loads save (benchmarks/RESULTS.md, 2026-11-30).
        found += [dataclasses.replace(g, tma=True) for g in found if g.split_m == 1 and g.block_n == 256]
    if host and block_m >= 64:
        found += [dataclasses.replace(g, tma=True, host_tma=True) for g in found
                  if g.split_m == 1 and g.split_k == 1 and g.block_n >= 128]
    return list(dict.fromkeys(found))  # in order, each once


# weight-gradient candidates: (block_m, block_n, block_k (rows per step), num_warps, num_stages)
WEIGHT_GRAD = [(128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
               (128, 256, 64, 8, 3), (256, 128, 64, 8, 3)]


def log(*args):
    print(*args, flush=True)


class Cell:
    """Fixed random inputs and routing for one (shape, T)."""

    def __init__(self, shape: shapes_lib.MoEShape, T: int, seed: int = 0, mode: str = "triton"):
        self.mode = mode
        keys = jax.random.split(jax.random.key(seed), 6)
        E, d, f, k = shape.E, shape.d, shape.f, shape.k
        bf16 = jnp.bfloat16
        self.shape, self.T = shape, T
        self.x = jax.random.normal(keys[0], (T, d), bf16)
        self.router = (jax.random.normal(keys[1], (d, E)) / math.sqrt(d)).astype(bf16)
        self.w_gate = (jax.random.normal(keys[2], (E, d, f), bf16) / math.sqrt(d)).astype(bf16)
        self.w_up = (jax.random.normal(keys[3], (E, d, f), bf16) / math.sqrt(d)).astype(bf16)
        self.w_down = (jax.random.normal(keys[4], (E, f, d), bf16) / math.sqrt(f)).astype(bf16)
        self.logits = jax.jit(pipeline.router_logits)(self.x, self.router)
        routing = jax.jit(functools.partial(jaxmoe.route, top_k=k))(self.logits)
        self.weights, self.ids = routing.weights, routing.ids
        self.row_weights = routing.weights.reshape(-1)
        self.dy = jax.random.normal(keys[5], (T, d), bf16)
        jax.block_until_ready(self.ids)

    def gate_up(self, disp, block_m, gemm):
        fn = jax.jit(lambda x, wg, wu, w, dp: ops.grouped_gemm(
            x, wg, wu, w, dp, top_k=self.shape.k, block_m=block_m, gemm=gemm, gather_a=True,
            gated=True, scale_rows=False, precision="ieee", out_dtype=x.dtype, mode=self.mode))
        return fn, (self.x, self.w_gate, self.w_up, self.row_weights, disp)

    def down(self, h, disp, block_m, gemm):
        fn = jax.jit(lambda hh, wd, w, dp: ops.grouped_gemm(
            hh, wd, wd, w, dp, top_k=self.shape.k, block_m=block_m, gemm=gemm, gather_a=False,
            gated=False, scale_rows=True, precision="ieee", out_dtype=jnp.float32, mode=self.mode))
        return fn, (h, self.w_down, self.row_weights, disp)  # float32 rows, as the forward writes them

    # The backward GEMMs, on the activations the forward keeps (hgu = h | gate | up per sorted row).

    def saved_activations(self, disp, block_m, gemm):
        fn = jax.jit(lambda x, wg, wu, w, dp: ops.grouped_gemm(
            x, wg, wu, w, dp, top_k=self.shape.k, block_m=block_m, gemm=gemm, gather_a=True, gated=True,
            scale_rows=False, store_preact=True, precision="ieee", out_dtype=x.dtype, mode=self.mode)[0])
        return fn(self.x, self.w_gate, self.w_up, self.row_weights, disp)

    def dh(self, hgu, disp, block_m, gemm):
        def fn(dy, wd, s, w, dp):  # (dgu, the routing weights' gradient terms): the planes per f tile summed,
            # as the layer's combine does, so that candidates with other N tiles can be compared
            dgu, dw_parts = gemm_ops.dh_gemm(dy, wd, s, w, dp, top_k=self.shape.k, block_m=block_m, gemm=gemm,
                                             precision="ieee", mode=self.mode)
            return dgu, dw_parts.sum(axis=0)

        return jax.jit(fn), (self.dy, self.w_down, hgu, self.row_weights, disp)

    def dx(self, dgu, disp, block_m, gemm):
        fn = jax.jit(lambda g, wg, wu, w, dp: ops.grouped_gemm(
            g, wg, wu, w, dp, top_k=self.shape.k, block_m=block_m, gemm=gemm, gather_a=False, gated=False,
            scale_rows=False, concat_k=True, transpose_b=True, precision="ieee", out_dtype=jnp.float32,
            mode=self.mode))
        return fn, (dgu, self.w_gate, self.w_up, self.row_weights, disp)

    def dw(self, hgu, dgu, disp, cfg):
        s = self.shape
        common = dict(E=s.E, top_k=s.k, cfg=cfg, precision="ieee", out_dtype=self.x.dtype, mode=self.mode)

        def both(x, g, hh, dy, w, dp):
            gate_up = gemm_ops.weight_grad(x, g, w, dp, m_out=s.d, n_out=s.f, gather_a=True, gather_b=False,
                                           scale_b=False, two_outputs=True, **common)
            down = gemm_ops.weight_grad(hh, dy, w, dp, m_out=s.f, n_out=s.d, gather_a=False, gather_b=True,
                                        scale_b=True, two_outputs=False, **common)
            return gate_up, down

        return jax.jit(both), (self.x, dgu, hgu, self.dy, self.row_weights, disp)


def _time(fn, args, min_time_s) -> float:
    return time_fn(fn, [args], min_time_s=min_time_s, sync_each=False).ms


# Outputs of two candidates for one GEMM differ only by the order of their float32 sums (K tiles, split-K)
# and one bf16 rounding of the stored values: about 4e-3 normalised at bf16. A tile shape that miscompiles
# misses by far more.
AGREE = 2e-2


def disagreement(out, first) -> float:
    """Largest normalised error, ||a - b|| / ||b||, over the arrays of two candidates' outputs (NaN
    anywhere makes it NaN, which no comparison passes)."""
    def summed(a, like):  # a split-K candidate's [split_k, n, N] partial sums, added up as the combine does
        a = jnp.asarray(a, jnp.float32)
        return a.sum(axis=0) if a.ndim == jnp.ndim(like) + 1 else a

    errors = [jnp.linalg.norm(summed(a, b) - summed(b, a)) / jnp.maximum(jnp.linalg.norm(summed(b, a)), 1e-30)
              for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(first))]
    return float(jnp.max(jnp.stack(errors)))  # jnp.max keeps a NaN (Python's max would drop it)


def best_gemm(make, candidates, min_time_s):
    """(ms, candidate) of the fastest candidate whose outputs agree with the first one that ran: the
    table must never ship a tile shape that is fast because it computes something else."""
    best, first = None, None
    for gemm in candidates:
        fn, args = make(gemm)
        try:
            out = fn(*args)
            ms = _time(fn, args, min_time_s)
        except Exception as err:  # typically: out of shared memory for this tile shape
            log(f"      skip {gemm}: {str(err).splitlines()[0][:120]}")
            continue
        if first is None:
            first = out
        elif not (error := disagreement(out, first)) <= AGREE:
            log(f"      skip {gemm}: its outputs differ from the first candidate's (normalised error {error:.3g})")
            continue
        log(f"      {ms:8.4f} ms  {gemm}")
        if best is None or ms < best[0]:
            best = (ms, gemm)
    return best


def tune_cell(cell: Cell, min_time_s: float, limit: int | None = None, down_only: bool = False,
              block_ms: list[int] | None = None, host: bool = False):
    """(total ms, best config) of one cell. down_only keeps the picked config's BLOCK_M and gate/up GEMM
    (timed once) and sweeps the down GEMM alone; block_ms: the BLOCK_M values tried (default: by bucket);
    host: also the host-built TMA candidates (gemm_candidates)."""
    s = cell.shape
    bucket = configs.rows_bucket(cell.T, s.k, s.E)
    picked = picked_config(cell.mode, "bfloat16", cell.T, s.k, s.E, s.d, s.f)
    results = []
    for block_m in [picked.block_m] if down_only else block_ms or block_m_candidates(bucket):
        dispatch_fn = jax.jit(lambda ids: ops.dispatch(ids.reshape(-1), s.E, block_m, cell.mode))
        disp = dispatch_fn(cell.ids)
        dispatch_ms = _time(dispatch_fn, (cell.ids,), min_time_s)
        log(f"    BLOCK_M={block_m}: dispatch {dispatch_ms:.4f} ms; gate+up:")
        gate_candidates = [picked.gate_up] if down_only else gemm_candidates(block_m, True, s.d, host)[:limit]
        gate = best_gemm(lambda g: cell.gate_up(disp, block_m, g), gate_candidates, min_time_s)
        if gate is None:
            continue
        fn, args = cell.gate_up(disp, block_m, gate[1])
        h = fn(*args)
        log("    down:")
        down = best_gemm(lambda g: cell.down(h, disp, block_m, g),
                         gemm_candidates(block_m, False, s.f, host)[:limit], min_time_s)
        if down is None:
            continue
        total = dispatch_ms + gate[0] + down[0]
        log(f"    BLOCK_M={block_m}: total {total:.4f} ms")
        results.append((total, configs.MoEConfig(block_m, gate[1], down[1])))
    return min(results, key=lambda r: r[0]) if results else None


# The backward GEMMs' fields of a table entry (jaxmoe/config.py, MoEConfig)
BACKWARD_FIELDS = ("dh", "dx", "dw")


def forward_entry(old: dict, ms: float, cfg: configs.MoEConfig, host: bool) -> dict:
    """The table entry after a forward sweep found cfg (ms) where the entry was old ({} if none).

    Without host-built descriptors, cfg becomes the entry's own config; backward fields and
    host-descriptor configs tuned earlier stay while BLOCK_M (the row blocks they walk) is unchanged.
    With them (host), the sweep kept an existing entry's BLOCK_M, and cfg's GEMMs go into the entry's
    "host_descriptors" object (jaxmoe/config.py), leaving its own configs to older stacks; a new entry
    gets cfg without host-built descriptors as its own."""
    if host:
        base = old or {**_for_older_stacks(cfg).to_json(), "ms": round(ms, 4)}
        # Earlier host-descriptor GEMMs, timed by other tools (their notes: down_ms, measured), give way;
        # the backward's fields and its time stay.
        kept = {f: v for f, v in old.get("host_descriptors", {}).items() if f in (*BACKWARD_FIELDS, "bwd_ms")}
        return {**base, "host_descriptors": {**kept, "gate_up": dataclasses.asdict(cfg.gate_up),
                                             "down": dataclasses.asdict(cfg.down), "ms": round(ms, 4)}}
    same_blocks = old.get("block_m") == cfg.block_m
    kept = {f: old[f] for f in (*BACKWARD_FIELDS, "bwd_ms", "host_descriptors") if f in old and same_blocks}
    return {**cfg.to_json(), "ms": round(ms, 4), **kept}


def backward_entry(old: dict, ms: float, cfg: configs.MoEConfig, host: bool) -> dict:
    """The table entry after a backward sweep found cfg's dh, dx and dw (ms in all) where it was old.

    Only the backward fields change. On a stack with host-built descriptors they go into the entry's
    "host_descriptors" object, beside the forward configs measured there: tiles timed against that
    stack's compiler need not pay on older stacks, which keep the entry's own (or the heuristic's)."""
    tuned = {f: value for f, value in cfg.to_json().items() if f in BACKWARD_FIELDS}
    # A new entry's own forward: the picked one, which on a host stack may hold host-built GEMMs.
    base = old or {f: value for f, value in _for_older_stacks(cfg).to_json().items()
                   if f in ("block_m", "gate_up", "down")}
    if host:
        return {**base, "host_descriptors": {**old.get("host_descriptors", {}), **tuned, "bwd_ms": round(ms, 4)}}
    return {**base, **tuned, "bwd_ms": round(ms, 4)}


def _without_host(gemm: configs.GemmConfig) -> configs.GemmConfig:
    """gemm as a stack without host-built descriptors should run it: pointer loads in place of them."""
    return dataclasses.replace(gemm, tma=False, host_tma=False) if gemm.host_tma else gemm


def _for_older_stacks(cfg: configs.MoEConfig) -> configs.MoEConfig:
    """cfg with its forward GEMMs as _without_host gives them."""
    return dataclasses.replace(cfg, gate_up=_without_host(cfg.gate_up), down=_without_host(cfg.down))


def tune_backward(cell: Cell, min_time_s: float, limit: int | None = None):
    """(total ms, the forward config jaxmoe picks with the fastest dh, dx and dw configs) for one cell."""
    s = cell.shape
    cfg = picked_config(cell.mode, "bfloat16", cell.T, s.k, s.E, s.d, s.f)
    disp = jax.jit(lambda ids: ops.dispatch(ids.reshape(-1), s.E, cfg.block_m, cell.mode))(cell.ids)
    hgu = cell.saved_activations(disp, cfg.block_m, cfg.gate_up)
    cut = slice(0, limit)
    # Neither backward GEMM reads through TMA descriptors (dH's kernel has no such path; dX's weights are
    # read transposed and concatenated, which the descriptors' view does not cover: gemm._tma_fits), so
    # a TMA candidate would time the same kernel again and could win on noise alone.
    def pointer(K):
        return [g for g in gemm_candidates(cfg.block_m, False, K) if not g.tma]

    log(f"    BLOCK_M={cfg.block_m} (the forward's); dh:")
    dh = best_gemm(lambda g: cell.dh(hgu, disp, cfg.block_m, g), [g for g in pointer(s.d) if g.split_k == 1][cut],
                   min_time_s)
    if dh is None:
        return None
    fn, args = cell.dh(hgu, disp, cfg.block_m, dh[1])
    dgu, _ = fn(*args)
    log("    dx:")
    dx = best_gemm(lambda g: cell.dx(dgu, disp, cfg.block_m, g), pointer(s.f)[cut], min_time_s)
    log("    dw:")
    dw = best_gemm(lambda c: cell.dw(hgu, dgu, disp, c),
                   [configs.WeightGradConfig(*c) for c in WEIGHT_GRAD][cut], min_time_s)
    if dx is None or dw is None:
        return None
    return dh[0] + dx[0] + dw[0], dataclasses.replace(cfg, dh=dh[1], dx=dx[1], dw=dw[1])


def stages(cell: Cell, min_time_s: float) -> dict[str, float]:
    """Per-stage ms with the config jaxmoe picks for this cell."""
    s = cell.shape
    mode = cell.mode
    cfg = picked_config(mode, "bfloat16", cell.T, s.k, s.E, s.d, s.f)
    dispatch_fn = jax.jit(lambda ids: ops.dispatch(ids.reshape(-1), s.E, cfg.block_m, mode))
    disp = dispatch_fn(cell.ids)
    gate_fn, gate_args = cell.gate_up(disp, cfg.block_m, cfg.gate_up)
    h = gate_fn(*gate_args)
    down_fn, down_args = cell.down(h, disp, cfg.block_m, cfg.down)
    rows = down_fn(*down_args)
    moe = jax.jit(functools.partial(jaxmoe.moe, top_k=s.k, implementation=mode))
    moe_no_aux = jax.jit(lambda *a: jaxmoe.moe(*a, top_k=s.k, implementation=mode)[0])
    expert_ffn = jax.jit(lambda *a: jaxmoe.expert_ffn(*a, implementation=mode))
    gemms = jax.jit(lambda x, wg, wu, w, dp, wd: down_fn(gate_fn(x, wg, wu, w, dp), wd, w, dp))
    layer_args = (cell.x, cell.router, cell.w_gate, cell.w_up, cell.w_down)
    return {
        "route": _time(jax.jit(lambda lg: ops.route(lg, s.k, mode=mode)), (cell.logits,), min_time_s),
        "dispatch": _time(dispatch_fn, (cell.ids,), min_time_s),
        "gate_up": _time(gate_fn, gate_args, min_time_s),
        "down": _time(down_fn, down_args, min_time_s),
        "combine": _time(jax.jit(lambda r, a: ops.combine(r, a, cell.T, s.k, cell.x.dtype, mode)),
                         (rows, disp.assignment_rows), min_time_s),
        # Nested views of the layer, each one jitted call: their differences are what the pieces
        # around the GEMMs cost inside the layer (a small launch timed alone is host-bound).
        "gemms": _time(gemms, (cell.x, cell.w_gate, cell.w_up, cell.row_weights, disp, cell.w_down), min_time_s),
        "expert_ffn": _time(expert_ffn, (cell.x, cell.weights, cell.ids, cell.w_gate, cell.w_up, cell.w_down),
                            min_time_s),
        "moe_no_aux": _time(moe_no_aux, layer_args, min_time_s),
        "moe": _time(moe, layer_args, min_time_s),
        "config": str(cfg),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(shapes_lib.GPU_SHAPES))
    parser.add_argument("--tokens", default=",".join(map(str, shapes_lib.GPU_TOKENS)))
    parser.add_argument("--stages", action="store_true", help="time each stage instead of sweeping configs")
    parser.add_argument("--out", default=str(configs.TABLE_PATH), help="table to merge the results into")
    parser.add_argument("--min-time", type=float, default=0.05, help="seconds of timing per candidate")
    parser.add_argument("--budget", type=float, default=480, help="stop starting new cells after this many s")
    parser.add_argument("--backward", action="store_true", help="sweep the backward GEMMs' configs (dh, dx, dw)")
    parser.add_argument("--down-only", action="store_true",
                        help="keep each entry's BLOCK_M and gate/up config; sweep the down GEMM's configs")
    parser.add_argument("--mode", default="triton", choices=("triton", "interpret"),
                        help="interpret: run the sweep in Triton's interpreter on a CPU (a smoke test)")
    parser.add_argument("--limit", type=int, default=None, help="try at most this many candidates per GEMM")
    args = parser.parse_args(argv)
    if args.mode == "triton" and jax.default_backend() != "gpu":
        log("benchmarks.tune needs a GPU (or --mode interpret)")
        return 1
    device = configs.device_key(device_kind(args.mode))
    host = args.mode == "triton" and host_descriptors_available()
    log(f"card: {device_kind(args.mode)} -> '{device}'"
        + ("; host-built TMA descriptors: winners go to the entries' host_descriptors" if host else ""))
    try:
        table = json.load(open(args.out))
    except (FileNotFoundError, json.JSONDecodeError):
        table = {}
    start = time.perf_counter()
    for name in args.shapes.split(","):
        shape = shapes_lib.get(name)
        for T in map(int, args.tokens.split(",")):
            if time.perf_counter() - start > args.budget:
                log(f"budget of {args.budget:.0f} s spent; stopping before {name} T={T}")
                break
            cell = Cell(shape, T, mode=args.mode)
            if args.stages:
                st = stages(cell, args.min_time)
                parts = "  ".join(f"{k} {v:.4f}" for k, v in st.items() if k != "config")
                alone = ("route", "dispatch", "gate_up", "down", "combine")
                log(f"{name:17s} T={T:5d}  {parts}  sum of stages {sum(st[k] for k in alone):.4f}"
                    f"  [{st['config']}]")
                continue
            bucket = configs.rows_bucket(T, shape.k, shape.E)
            log(f"{name} T={T} (bucket {bucket}), {time.perf_counter() - start:.0f} s in")
            key = configs.table_key(device, "bfloat16", shape.E, shape.d, shape.f, bucket)
            old = table.get(key, {})
            if args.backward:
                best = tune_backward(cell, args.min_time, args.limit)
                if best is None:
                    continue
                table[key] = backward_entry(old, *best, host)
            else:
                best = tune_cell(cell, args.min_time, args.limit, args.down_only,
                                 block_ms=[old["block_m"]] if host and old else None, host=host)
                if best is None:
                    continue
                table[key] = forward_entry(old, *best, host)
            log(f"  best {best[0]:.4f} ms: {best[1]}")
            with open(args.out, "w") as fh:  # after every cell, so a cut-off run keeps what it found
                json.dump(dict(sorted(table.items())), fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
