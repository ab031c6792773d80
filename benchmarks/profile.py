"""Per-kernel GPU time of one MoE layer call, from a JAX profiler trace (no external profiler needed).

    python -m benchmarks.profile --shapes qwen3_30b_a3b --tokens 16,128

For each (shape, T) it jits `jaxmoe.moe` (implementation "triton" unless --impl says otherwise) on the
tuner's fixed random inputs (benchmarks/tune.py, Cell), runs it --calls times back to back under
`jax.profiler.trace`, reads the trace's GPU plane with `jax.profiler.ProfileData` and prints, per kernel
name, the launches and microseconds per layer call. The last lines give the GPU's busy time per call
(the sum of kernel times) and its span per call (first kernel start to last kernel end, divided by
the calls), so span - busy is the idle time between kernels: what fewer launches could win.
"""

from __future__ import annotations

import argparse
import collections
import functools
import glob
import sys
import tempfile
from typing import Iterable, NamedTuple

import jax

import jaxmoe
from benchmarks import shapes as shapes_lib


class KernelEvent(NamedTuple):
    name: str
    start_ns: float
    duration_ns: float


class KernelRow(NamedTuple):
    name: str
    launches_per_call: float
    us_per_call: float


def kernel_table(events: Iterable[KernelEvent], calls: int) -> tuple[list[KernelRow], float, float]:
    """(rows by descending time, busy us per call, span us per call) of the kernels of `calls` calls."""
    events = list(events)
    if not events:
        return [], 0.0, 0.0
    total = collections.defaultdict(float)
    count = collections.Counter()
    for event in events:
        total[event.name] += event.duration_ns
        count[event.name] += 1
    rows = [KernelRow(name, count[name] / calls, total[name] / calls / 1e3) for name in total]
    rows.sort(key=lambda row: -row.us_per_call)
    busy = sum(total.values()) / calls / 1e3
    span = (max(e.start_ns + e.duration_ns for e in events) - min(e.start_ns for e in events)) / calls / 1e3
    return rows, busy, span


def gpu_kernel_events(trace_dir: str) -> list[KernelEvent]:
    """The kernel events of GPU 0 in the trace written under trace_dir (its stream lines)."""
    (path,) = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)
    data = jax.profiler.ProfileData.from_file(path)
    plane = data.find_plane_with_name("/device:GPU:0")
    if plane is None:
        raise RuntimeError(f"no GPU plane in {path}: planes {[p.name for p in data.planes]}")
    return [KernelEvent(e.name, e.start_ns, e.duration_ns)
            for line in plane.lines if line.name.startswith("Stream") for e in line.events]


def profile_layer(fn, args, calls: int) -> tuple[list[KernelRow], float, float]:
    jax.block_until_ready(fn(*args))  # compile and warm up outside the trace
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            for _ in range(calls):
                out = fn(*args)
            jax.block_until_ready(out)
        return kernel_table(gpu_kernel_events(trace_dir), calls)


def main(argv=None) -> int:
    from benchmarks.tune import Cell  # the tuner's fixed random inputs and routing

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="qwen3_30b_a3b")
    parser.add_argument("--tokens", default="16,128")
    parser.add_argument("--impl", default="triton", choices=("triton", "xla"))
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args(argv)
    if jax.default_backend() != "gpu":
        print("benchmarks.profile needs a GPU")
        return 1
    print(f"card: {jax.devices()[0].device_kind} | jax {jax.__version__}")
    for name in args.shapes.split(","):
        shape = shapes_lib.get(name)
        for T in map(int, args.tokens.split(",")):
            cell = Cell(shape, T)
            fn = jax.jit(functools.partial(jaxmoe.moe, top_k=shape.k, implementation=args.impl))
            rows, busy, span = profile_layer(fn, (cell.x, cell.router, cell.w_gate, cell.w_up, cell.w_down),
                                             args.calls)
            print(f"\n{name} T={T} impl={args.impl}: {args.calls} calls")
            print(f"  {'us/call':>9s}  {'launches':>8s}  kernel")
            for row in rows:
                print(f"  {row.us_per_call:9.1f}  {row.launches_per_call:8.1f}  {row.name[:110]}")
            print(f"  busy {busy:.1f} us/call, span {span:.1f} us/call, idle between kernels {span - busy:.1f} us/call")
    return 0


if __name__ == "__main__":
    sys.exit(main())
