"""The token exchange of expert parallelism, measured alone: XLA's collectives over one mesh axis.

Each device holds T_l rows of width d and sends its rows to every device of the axis, as the
expert-parallel forward does (jaxmoe/sharding.py): a padded `all_to_all` of [P, T_l, d], the same
bytes through `ragged_all_to_all`, and `all_gather` for reference. `ragged_all_to_all` is also timed
sending only a share of the rows (the routing-dependent traffic it could save).

Bandwidth is the bytes each device sends to other devices, (P - 1) * rows * d * itemsize, over the
time: one direction of the device's links.

    python -m benchmarks.exchange --devices 2 --tokens 4096,16384 --d 2048
"""

from __future__ import annotations

import argparse
import functools
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from benchmarks.timing import time_fn

AXIS = "x"


def _shard_map(fn, mesh, in_specs, out_specs):
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False))


def exchanges(mesh: Mesh, share: float = 1.0, axis: str = AXIS) -> dict:
    """name -> jitted fn of x [P * T_l, d] (sharded over `axis`) doing one exchange of each kind."""
    n_dev = mesh.shape[axis]

    def padded_all_to_all(x):
        send = jnp.broadcast_to(x[None], (n_dev, *x.shape))
        return jax.lax.all_to_all(send, axis, 0, 0, tiled=True)

    def all_gather(x):
        return jax.lax.all_gather(x, axis, tiled=True)

    def ragged(x):
        t_l = x.shape[0]
        rows = int(t_l * share)
        send = jnp.broadcast_to(x[None], (n_dev, *x.shape)).reshape(n_dev * t_l, -1)
        out = jnp.zeros_like(send)
        me = jax.lax.axis_index(axis)
        peers = jnp.arange(n_dev, dtype=jnp.int32)
        sizes = jnp.full((n_dev,), rows, jnp.int32)
        return jax.lax.ragged_all_to_all(send, out, peers * t_l, sizes, jnp.full((n_dev,), me * t_l, jnp.int32),
                                         sizes, axis_name=axis)

    spec = P(axis, None)
    out = {"all_to_all": _shard_map(padded_all_to_all, mesh, spec, P(axis, None, None)),
           "all_gather": _shard_map(all_gather, mesh, spec, P(axis, None)),
           f"ragged_all_to_all_{share:g}": _shard_map(ragged, mesh, spec, P(axis, None))}
    return out


def run(n_devices: int, tokens: list[int], d: int, dtype, shares: list[float], min_time_s: float, out=None):
    mesh = Mesh(np.array(jax.devices()[:n_devices]), (AXIS,))
    itemsize = jnp.dtype(dtype).itemsize
    rows = []
    for t_l in tokens:
        x = jax.device_put(jnp.ones((n_devices * t_l, d), dtype), jax.sharding.NamedSharding(mesh, P(AXIS, None)))
        fns = {}
        for share in shares:
            fns.update(exchanges(mesh, share))
        for name, fn in fns.items():
            share = float(name.rsplit("_", 1)[1]) if name.startswith("ragged") else 1.0
            try:
                timing = time_fn(fn, [(x,)], min_time_s=min_time_s, sync_each=False)
            except jax.errors.JaxRuntimeError as err:  # XLA:CPU has no ragged-all-to-all
                print(json.dumps({"op": name, "tokens_per_device": t_l, "error": str(err).splitlines()[0]}))
                continue
            sent = (n_devices - 1) * int(t_l * share) * d * itemsize
            row = {"devices": n_devices, "tokens_per_device": t_l, "d": d, "op": name, "ms": timing.ms,
                   "sent_mb_per_device": sent / 1e6, "gbps_per_device": sent / (timing.ms * 1e-3) / 1e9}
            rows.append(row)
            print(json.dumps(row), flush=True)
            if out:
                out.write(json.dumps(row) + "\n")
                out.flush()
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=len(jax.devices()))
    p.add_argument("--tokens", default="4096,16384", help="rows per device, comma list")
    p.add_argument("--d", type=int, default=2048)
    p.add_argument("--shares", default="1,0.5", help="ragged_all_to_all: share of each device's rows sent")
    p.add_argument("--min-time", type=float, default=0.5)
    p.add_argument("--out", help="also append JSON rows to this file")
    args = p.parse_args(argv)
    if args.devices < 2:
        sys.exit("an exchange needs at least 2 devices")
    with open(args.out, "a") if args.out else _null() as out:
        run(args.devices, [int(t) for t in args.tokens.split(",")], args.d, jnp.bfloat16,
            [float(s) for s in args.shares.split(",")], args.min_time, out)


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    main()
