"""What the benchmark prints and draws: the header lines, the table and the PNG plot.

    python -m benchmarks.report benchmarks/out/moe.json    # the printout of a run's JSON (also of a run cut
                                                           # off by a time limit: the sweep writes it per cell)

Columns of the table (benchmarks/RESULTS.md says how each number is made):
  ms        median milliseconds per call
  TFLOP/s   expert-GEMM FLOPs / time;  GB/s  counted bytes / time
  gemm_ms   the GEMM roof: XLA batched einsums with the layer's expert-GEMM FLOPs, tokens spread evenly
  hbm_ms    the HBM roof: counted bytes at the HBM read bandwidth measured in the same run
  limit_ms  max(gemm_ms, hbm_ms);  limit/ms = limit_ms / ms (above 1: faster than both roofs)
  peak_gib  device memory of the jitted step as XLA plans it (--memory)
  vs xla, vs tokamax  on triton rows: peer ms / triton ms
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from benchmarks.peers import IMPLS, PEERS


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def fmt_num(v) -> str:
    """A rate with about three significant digits (CPU rates are tiny, GPU rates are in the hundreds)."""
    if v is None:
        return "-"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"


def _gib(nbytes) -> str:
    return "-" if nbytes is None else fmt_num(nbytes / 2**30)


def memory_line(memory) -> str:
    """One log line: where a step's planned bytes go (memory: a timing.Memory)."""
    return (f"args {_gib(memory.argument_bytes)} GiB, outputs {_gib(memory.output_bytes)} GiB, "
            f"temps {_gib(memory.temp_bytes)} GiB, aliased {_gib(memory.alias_bytes)} GiB, "
            f"peak {_gib(memory.peak_bytes)} GiB")


HEADERS = ["shape", "T", "pass", "impl", "ms", "TFLOP/s", "GB/s", "gemm_ms", "hbm_ms", "limit_ms", "limit/ms",
           "peak_gib", "vs xla", "vs tokamax"]


def format_table(rows: list[dict]) -> str:
    body = []
    for r in rows:
        if r.get("error"):
            body.append([r["shape"], str(r["T"]), r["pass"], r["impl"], "FAILED"] + [""] * (len(HEADERS) - 5))
            continue
        vs = [f"{r[f'speedup_vs_{p}']:.2f}x" if f"speedup_vs_{p}" in r else "" for p in PEERS]
        body.append([r["shape"], str(r["T"]), r["pass"], r["impl"], _fmt(r["ms"], ".4f"),
                     fmt_num(r["tflops"]), fmt_num(r["gbps"]), _fmt(r.get("gemm_ms"), ".4f"),
                     _fmt(r.get("hbm_ms"), ".4f"), _fmt(r.get("limit_ms"), ".4f"),
                     _fmt(r.get("limit_frac"), ".2f"), _gib(r.get("peak_bytes")), *vs])
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(HEADERS)]
    left = {0, 2, 3}

    def line(cells):
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [line(HEADERS), "  ".join("-" * w for w in widths)]
    prev = None
    for b in body:
        if prev is not None and b[0] != prev:
            out.append("")
        prev = b[0]
        out.append(line(b))
    return "\n".join(out)


TWIN_SUFFIX = "_plain"
TWIN_HEADERS = ["shape", "T", "pass", "ms", "plain ms", "ms ratio", "limit/ms", "plain limit/ms", "equal-work cost"]


def format_twin_table(rows: list[dict]) -> str:
    """What a shape's options cost beside its plain twin (the shape named + "_plain": same dims, plain
    layer), triton rows of one run. "ms ratio" compares raw times, but the two layers route differently,
    so at small T they send tokens to different numbers of experts and read different bytes (decode is
    HBM-bound). "equal-work cost" compares each against its own roof, which counts the experts it reached
    and the bias bytes: plain limit/ms over the options' limit/ms, minus one. Empty when no pair ran."""
    triton = {(r["shape"], r["T"], r["pass"]): r for r in rows if r["impl"] == "triton" and not r.get("error")}
    body = []
    for (shape, T, pass_), r in triton.items():
        twin = triton.get((shape + TWIN_SUFFIX, T, pass_))
        if twin is None:
            continue
        cost = (twin["limit_frac"] / r["limit_frac"] - 1) if r.get("limit_frac") and twin.get("limit_frac") else None
        body.append([shape, str(T), pass_, f"{r['ms']:.4f}", f"{twin['ms']:.4f}", f"{r['ms'] / twin['ms']:.3f}",
                     _fmt(r.get("limit_frac"), ".3f"), _fmt(twin.get("limit_frac"), ".3f"),
                     "-" if cost is None else f"{cost:+.1%}"])
    if not body:
        return ""
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(TWIN_HEADERS)]
    lines = ["  ".join(c.ljust(w) if i in (0, 2) else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
             for cells in [TWIN_HEADERS, ["-" * w for w in widths], *body]]
    return "\n".join(lines)


def header_line(env: dict, ceilings: dict | None) -> str:
    s = (f"card: {env['card']} | jax {env['jax']} (jaxlib {env['jaxlib']}) | triton {env['triton']} | "
         f"jax-triton {env['jax_triton']} | {env['date']} | commit {env['commit']}")
    if ceilings:
        s += (f"\nceilings: HBM read {fmt_num(ceilings['hbm_read_gbps'])} GB/s ({ceilings['hbm_probe']}) | "
              f"dense bf16 {fmt_num(ceilings['matmul_tflops'])} TFLOP/s ({ceilings['matmul_probe']})")
    else:
        s += "\nceilings: not measured (no HBM roof)"
    return s


def report(meta: dict, rows: list[dict]) -> str:
    """What a sweep prints after its rows: the header, the table and, where twins ran, their comparison."""
    out = [header_line(meta, meta.get("ceilings")), format_table(rows)]
    twins = format_twin_table(rows)
    if twins:
        out += ["", "the options against the plain twin (triton; equal-work cost = plain limit/ms / limit/ms - 1):",
                twins]
    if meta.get("complete") is False:
        out += ["", f"(cut off: {len({(r['shape'], r['T'], r['pass']) for r in rows})} cells measured of the run's "
                    f"{len(meta['shapes']) * len(meta['tokens']) * len(meta['passes'])})"]
    return "\n".join(out)


def write_plot(rows: list[dict], path: Path) -> str:
    """One column per shape: ms vs T with the limit (top), limit_ms / ms vs T (bottom)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as err:
        return f"plot skipped: matplotlib unavailable ({type(err).__name__}: {err})"
    ok = [r for r in rows if r.get("ms")]
    shape_names = list(dict.fromkeys(r["shape"] for r in ok))
    if not shape_names:
        return "plot skipped: no rows timed"
    passes = list(dict.fromkeys(r["pass"] for r in ok))
    fig, axes = plt.subplots(2, len(shape_names), figsize=(4.8 * len(shape_names), 7.5), squeeze=False)
    styles = {"fwd": "-", "fwd_bwd": "--"}
    colors = {"triton": "tab:red", "xla": "tab:blue", "tokamax": "tab:green"}
    for col, name in enumerate(shape_names):
        ax_ms, ax_frac = axes[0, col], axes[1, col]
        for pass_ in passes:
            suffix = f" {pass_}" if len(passes) > 1 else ""
            for impl in IMPLS:
                pts = sorted((r["T"], r["ms"], r.get("limit_frac")) for r in ok
                             if r["shape"] == name and r["pass"] == pass_ and r["impl"] == impl)
                if not pts:
                    continue
                Ts = [p[0] for p in pts]
                ax_ms.plot(Ts, [p[1] for p in pts], styles.get(pass_, "-"), marker="o",
                           color=colors.get(impl), label=impl + suffix)
                fr = [(p[0], p[2]) for p in pts if p[2] is not None]
                if fr:
                    ax_frac.plot([p[0] for p in fr], [p[1] for p in fr], styles.get(pass_, "-"), marker="o",
                                 color=colors.get(impl), label=impl + suffix)
            limit = sorted({(r["T"], r["limit_ms"]) for r in ok
                            if r["shape"] == name and r["pass"] == pass_ and r.get("limit_ms")})
            if limit:
                ax_ms.plot([p[0] for p in limit], [p[1] for p in limit], styles.get(pass_, "-"), color="black",
                           alpha=0.6, label="limit (GEMM, HBM roofs)" + suffix)
        ax_frac.axhline(1.0, color="black", alpha=0.6, lw=1)
        for ax in (ax_ms, ax_frac):
            ax.set_xscale("log", base=2)
            ax.grid(True, which="both", alpha=0.3)
            ax.set_xlabel("T (tokens)")
        ax_ms.set_yscale("log")
        ax_ms.set_title(name)
        ax_ms.set_ylabel("ms (median)")
        ax_frac.set_ylabel("limit_ms / ms (higher is better)")
        ax_ms.legend(fontsize=8)
    card = ok[0]["card"]
    fig.suptitle(f"jaxmoe MoE layer, bf16, {card}\ncommit {ok[0]['commit']}, {ok[0]['date']}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"plot written to {path}"


def main(argv: list[str] | None = None) -> None:
    """Prints the report of each JSON a sweep wrote (benchmarks.moe --json)."""
    for path in sys.argv[1:] if argv is None else argv:
        data = json.loads(Path(path).read_text())
        print(report(data["meta"], data["rows"]))


if __name__ == "__main__":
    main()
