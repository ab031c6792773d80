"""Times GEMM config variants side by side on the tuner's cells, each checked against the picked config.

    python -m benchmarks.variants --cells qwen3_30b_a3b:2048,mixtral:512 --min-time 0.05

For each cell (shape:T, the tuner's fixed random bf16 inputs and routing) it takes the config jaxmoe
picks today (table or heuristic), then times the gate/up GEMM and the down GEMM under that config and
under variants of it: the same tiles through TMA descriptors (GemmConfig.tma), and the extra tiles of
EXTRA for the cell's BLOCK_M class, with and without TMA; on a stack that builds descriptors on the
host (jax-triton 0.4 with jaxlib 0.12), each TMA variant also with host-built ones (GemmConfig.host_tma).
Every variant's output is compared with the picked config's: the largest absolute difference, and
whether the two are bitwise equal. Rows print as they come, so a run cut off by a time limit keeps
what it measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe import config as configs
from jaxmoe import ops
from jaxmoe.launch import host_descriptors_available
from jaxmoe.ops.ffn import picked_config
from benchmarks import shapes as shapes_lib
from benchmarks.timing import time_fn
from benchmarks.tune import Cell

# (block_n, block_k, num_warps, num_stages) tried beside the picked tiles, per GEMM and BLOCK_M class
EXTRA = {
    ("gate_up", "large"): [(128, 64, 8, 4)],
    ("down", "large"): [(128, 64, 4, 3), (128, 64, 8, 3), (256, 64, 8, 4), (128, 128, 8, 3)],
    ("gate_up", "small"): [(64, 128, 4, 4)],
    ("down", "small"): [(128, 128, 4, 3), (64, 128, 4, 4)],
}


def variants(picked: configs.GemmConfig, gemm: str, block_m: int, tma_too: bool) -> list[configs.GemmConfig]:
    size = "large" if block_m >= 64 else "small"
    found = [picked, dataclasses.replace(picked, tma=not picked.tma, host_tma=False)] if tma_too else [picked]
    for bn, bk, w, s in EXTRA[(gemm, size)]:
        for tma in (False, True) if tma_too else (picked.tma,):
            found.append(configs.GemmConfig(bn, bk, picked.group_m, w, s, tma=tma))
    if tma_too and host_descriptors_available():
        found += [dataclasses.replace(c, host_tma=True) for c in found if c.tma]
    return list(dict.fromkeys(found))  # in order, each config once


def compare(out, baseline) -> tuple[float, bool]:
    a = np.asarray(out.astype(jnp.float32))
    b = np.asarray(baseline.astype(jnp.float32))
    return float(np.max(np.abs(a - b))), bool(np.array_equal(a, b, equal_nan=True))


def run_cell(cell: Cell, min_time_s: float, tma_too: bool) -> None:
    s = cell.shape
    cfg = picked_config(cell.mode, "bfloat16", cell.T, s.k, s.E, s.d, s.f)
    disp = jax.jit(lambda ids: ops.dispatch(ids.reshape(-1), s.E, cfg.block_m, cell.mode))(cell.ids)
    print(f"== {s.name} T={cell.T}: picked {cfg}", flush=True)
    h = None
    for gemm in ("gate_up", "down"):
        baseline = None
        for variant in variants(getattr(cfg, gemm), gemm, cfg.block_m, tma_too):
            if gemm == "gate_up":
                fn, args = cell.gate_up(disp, cfg.block_m, variant)
            else:
                fn, args = cell.down(h, disp, cfg.block_m, variant)
            try:
                out = jax.block_until_ready(fn(*args))
                ms = time_fn(fn, [args], min_time_s=min_time_s, sync_each=False).ms
            except Exception as err:  # typically: out of shared memory for this tile shape
                print(f"   {gemm:8s} skip {variant}: {str(err).splitlines()[0][:150]}", flush=True)
                continue
            if baseline is None:
                baseline = out
                if gemm == "gate_up":
                    h = out
            diff, same = compare(out, baseline)
            print(f"   {gemm:8s} {ms:8.4f} ms  max|diff| {diff:.3g}  bitwise {'yes' if same else 'no '}  {variant}",
                  flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", default="qwen3_30b_a3b:2048", help="shape:T pairs, comma-separated")
    parser.add_argument("--min-time", type=float, default=0.05, help="seconds of timing per variant")
    parser.add_argument("--no-tma", action="store_true", help="leave out the TMA variants")
    args = parser.parse_args(argv)
    if jax.default_backend() != "gpu":
        print("benchmarks.variants needs a GPU")
        return 1
    print(f"card: {jax.devices()[0].device_kind}", flush=True)
    for item in args.cells.split(","):
        name, T = item.split(":")
        run_cell(Cell(shapes_lib.get(name), int(T)), args.min_time, not args.no_tma)
    return 0


if __name__ == "__main__":
    sys.exit(main())
