"""Weak scaling of expert parallelism: a fixed number of tokens per GPU as the expert-parallel degree grows.

For each degree P (1, 2, 4, ... up to the devices present), shape and tokens per GPU T_l:
  - the layer, `jaxmoe.moe(..., mesh=Mesh(P devices, ("expert",)), expert_axis="expert")`, on P * T_l
    tokens with the experts split over the P devices, timed for the forward and for forward+backward
    (value_and_grad with respect to x and the expert weights, as in benchmarks/moe.py);
  - tokens per second per GPU = T_l / step time, and efficiency = that over degree 1's;
  - the exchange alone: the padded all-to-all of [P, T_l, d] rows the layer sends out and back,
    timed on its own (benchmarks/exchange.py), its achieved bandwidth per device, and its share of the
    step (two exchanges in the forward, four in forward+backward: the backward sends dY out and
    dX back). The share is an estimate from the collective timed alone: inside the step it may
    overlap or contend with other work.

    python -m benchmarks.scaling --shapes qwen3_30b_a3b,deepseek_v2_lite --tokens 4096,16384
"""

from __future__ import annotations

import argparse
import gc
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jaxmoe
from benchmarks import exchange, shapes as shapes_lib
from benchmarks.moe import Normal, environment, log
from benchmarks.peers import make_step
from benchmarks.timing import time_fn

AXIS = "expert"
EXCHANGES = {"fwd": 2, "fwd_bwd": 4}


def degrees(n_devices: int) -> list[int]:
    """1, 2, 4, ... up to n_devices, and n_devices itself (any count, not only powers of two)."""
    out = [1 << i for i in range(int(math.log2(n_devices)) + 1)]
    return out if out[-1] == n_devices else [*out, n_devices]


def sharded_forward(mesh: Mesh, k: int, implementation: str):
    """The plain layer (softmax top-k, SwiGLU) on the mesh, in benchmarks.peers.make_step's signature; the
    shapes with router and expert options (and their extra arrays) are not run here."""

    def forward(x, rw, wg, wu, wd, extras):
        assert not extras, "benchmarks.scaling runs the plain layer only"
        return jaxmoe.moe(x, rw, wg, wu, wd, top_k=k, implementation=implementation, mesh=mesh, expert_axis=AXIS)

    return forward


def place(mesh: Mesh, x, rw, wg, wu, wd, dy):
    """The step's arguments on the mesh, with no extra arrays (see sharded_forward)."""
    tokens, experts, replicated = (NamedSharding(mesh, P(AXIS, None)), NamedSharding(mesh, P(AXIS, None, None)),
                                   NamedSharding(mesh, P()))
    return (jax.device_put(x, tokens), jax.device_put(rw, replicated), jax.device_put(wg, experts),
            jax.device_put(wu, experts), jax.device_put(wd, experts), {}, jax.device_put(dy, tokens))


def run(shape_names, tokens, passes, implementation: str, min_time_s: float, out=None) -> list[dict]:
    env = environment()
    n_devices = len(jax.devices())
    on_gpu = jax.default_backend() == "gpu"
    normal = Normal(0, on_host=not on_gpu)
    rows = []

    def emit(row):
        row = {**row, **env, "gpus_present": n_devices}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if out:
            out.write(json.dumps(row) + "\n")
            out.flush()

    for name in shape_names:
        s = shapes_lib.get(name)
        if not s.plain:
            raise SystemExit(f"benchmarks.scaling runs the plain layer; shape {name!r} has options ({s.describe()})")
        weights = (normal((s.d, s.E), 1 / math.sqrt(s.d)), normal((s.E, s.d, s.f), 1 / math.sqrt(s.d)),
                   normal((s.E, s.d, s.f), 1 / math.sqrt(s.d)), normal((s.E, s.f, s.d), 1 / math.sqrt(s.f)))
        for t_l in tokens:
            base = {}
            for degree in degrees(n_devices):
                if s.E % degree:
                    continue
                mesh = Mesh(np.array(jax.devices()[:degree]), (AXIS,))
                args = place(mesh, normal((degree * t_l, s.d)), *weights, normal((degree * t_l, s.d)))
                a2a_ms = None
                if degree > 1:
                    fn = exchange.exchanges(mesh, axis=AXIS)["all_to_all"]
                    a2a_ms = time_fn(fn, [(args[0],)], min_time_s=min_time_s, sync_each=not on_gpu).ms
                sent = (degree - 1) * t_l * s.d * 2
                for pass_ in passes:
                    tag = f"[{name} T_l={t_l} P={degree} {pass_}]"
                    row = {"shape": name, "tokens_per_gpu": t_l, "degree": degree, "pass": pass_,
                           "impl": implementation}
                    try:
                        step = make_step(sharded_forward(mesh, s.k, implementation), pass_)
                        t = time_fn(step, [args], min_time_s=min_time_s, sync_each=not on_gpu)
                    except Exception as err:
                        log(f"{tag} FAILED: {type(err).__name__}: {str(err).splitlines()[0][:300]}")
                        emit({**row, "error": f"{type(err).__name__}: {str(err)[:300]}"})
                        continue
                    tput = t_l / (t.ms * 1e-3)
                    base.setdefault(pass_, tput)
                    row.update(ms=t.ms, tokens_per_s_per_gpu=tput, efficiency=tput / base[pass_])
                    if a2a_ms is not None:
                        row.update(a2a_ms=a2a_ms, a2a_gbps_per_device=sent / (a2a_ms * 1e-3) / 1e9,
                                   a2a_share=EXCHANGES[pass_] * a2a_ms / t.ms)
                    emit(row)
                    del step
                del args
                gc.collect()
        del weights
        gc.collect()
    return rows


def format_table(rows) -> str:
    lines = ["| shape | T/GPU | pass | GPUs | ms | tokens/s/GPU | efficiency | a2a ms | a2a GB/s/GPU | a2a share |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "ms" not in r:
            continue
        a2a = (f"{r['a2a_ms']:.3f} | {r['a2a_gbps_per_device']:.0f} | {r['a2a_share']:.2f}" if "a2a_ms" in r
               else "- | - | -")
        lines.append(f"| {r['shape']} | {r['tokens_per_gpu']} | {r['pass']} | {r['degree']} | {r['ms']:.3f} | "
                     f"{r['tokens_per_s_per_gpu']:,.0f} | {r['efficiency']:.3f} | {a2a} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="qwen3_30b_a3b,deepseek_v2_lite")
    p.add_argument("--tokens", default="4096,16384", help="tokens per GPU, comma list")
    p.add_argument("--passes", default="fwd,fwd_bwd")
    p.add_argument("--impl", default=None, help="default: triton on a GPU, else xla")
    p.add_argument("--min-time", type=float, default=0.5)
    p.add_argument("--out", help="also append JSON rows to this file")
    args = p.parse_args(argv)
    impl = args.impl or ("triton" if jax.default_backend() == "gpu" else "xla")
    out = open(args.out, "a") if args.out else None
    try:
        rows = run(args.shapes.split(","), [int(t) for t in args.tokens.split(",")], args.passes.split(","), impl,
                   args.min_time, out)
    finally:
        if out:
            out.close()
    print(format_table(rows))


if __name__ == "__main__":
    main()
