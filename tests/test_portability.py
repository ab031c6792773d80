"""The portability gate: every kernel variant jaxmoe can launch compiles for sm_80, sm_90 and gfx942, and
fits the shared memory (LDS) of that target's cards.

No GPU is needed: Triton compiles for any target on the CPU. The variants come from tracing the real
launch layer (jaxmoe/portability.py), so this compiles exactly what "triton" would launch.
"""

import dataclasses
import subprocess
import sys
import types

import jax.numpy as jnp
import pytest

from jaxmoe import config, launch, portability

RECORDS = {target: portability.shipped_launches(target) for target in portability.TARGETS}
CASES = [(record, target) for target, records in RECORDS.items() for record in records]


@pytest.mark.parametrize("target", list(portability.TARGETS))
def test_gate_covers_every_kernel(target):
    names = {r.kernel.__name__ for r in RECORDS[target]}
    options = {"bias_grad_kernel"} if target in portability._OPTION_TARGETS else set()  # the bias gradients
    assert names == {"topk_routing_kernel", "count_chunks_kernel", "chunk_prefix_kernel", "scatter_kernel",
                     "grouped_gemm_kernel", "combine_kernel", "dh_kernel", "weight_grad_kernel"} | options


@pytest.mark.parametrize("target", portability._OPTION_TARGETS)
def test_gate_covers_the_expert_options(target):
    """Every epilogue flag of the options is compiled on, in the forward and the backward kernels."""
    seen = {(r.kernel.__name__, flag, r.constexprs.get(flag)) for r in RECORDS[target]
            for flag in ("HAS_BIAS", "WEIGHT_ON_INPUT", "ACTIVATION")}
    for kernel in ("grouped_gemm_kernel", "dh_kernel"):
        assert {(kernel, "HAS_BIAS", True), (kernel, "WEIGHT_ON_INPUT", True),
                (kernel, "ACTIVATION", "clamped_swiglu")} <= seen


@pytest.mark.parametrize(("record", "target"), CASES,
                         ids=[f"{target}-{portability.describe(record)}" for record, target in CASES])
def test_compiles(record, target):
    """Compiles as jax-triton compiles it, within the shared memory (LDS) the target's cards have."""
    if not portability.supported(record, target):
        pytest.skip(f"{target} has no {record.constexprs.get('DOT_PRECISION')}")
    compiled = portability.compile_record(record, target)
    binary = "cubin" if target.startswith("sm_") else "hsaco"
    assert compiled.asm[binary], f"no {binary} for {portability.describe(record)}"
    portability.check_shared_memory(compiled, target)


def test_rocm_configs_fit_the_lds():
    """for_rocm leaves a config that fits alone and cuts one that does not (the gate then compiles both)."""
    fits = config.heuristic(4096, "bfloat16", 128, 128).with_backward("bfloat16")
    big = dataclasses.replace(fits, gate_up=config.GemmConfig(128, 128, num_stages=4))
    cut = config.for_rocm(big, "bfloat16")
    assert cut.gate_up.num_stages == 2 and cut.gate_up.block_k < 128
    assert (128 * cut.gate_up.block_k + 2 * cut.gate_up.block_k * 128) * 2 <= config.ROCM_LDS_BYTES
    small = config.MoEConfig(16, config.GemmConfig(64, 32, num_stages=3), config.GemmConfig(64, 32, num_stages=3))
    small = small.with_backward("bfloat16")
    assert config.for_rocm(small, "bfloat16").gate_up == small.gate_up  # (3 - 1) stages x 10 KiB fit


def test_rocm_launches_take_the_fitted_configs(monkeypatch):
    """On ROCm the expert FFN launches with for_rocm's config: the heuristic's 4-stage 128-row gate/up
    tiles (144 KiB of LDS by for_rocm's count) would not launch on an MI300."""
    from jaxmoe.ops import ffn

    args = (ffn._FFNOptions("triton", None, "ieee"), jnp.bfloat16, 8192, 8, 128, 2048, 768)
    on_nvidia = ffn._config(*args)
    monkeypatch.setattr(ffn, "on_rocm", lambda mode: True)
    on_amd = ffn._config(*args)
    assert on_amd == config.for_rocm(on_nvidia, "bfloat16") and on_amd.gate_up != on_nvidia.gate_up


@pytest.mark.parametrize("record", portability.int64_launches(), ids=portability.describe)
def test_compiles_where_offsets_pass_int32(record):
    assert portability.compile_record(record, "sm_90").asm["cubin"]


def test_interpreter_leaves_triton_able_to_compile(tmp_path, monkeypatch):
    """An interpreted launch patches triton.language; afterwards compiling must work as before.

    Runs in a fresh process with an empty Triton cache: a cached kernel would skip the front end,
    where a leaked patch shows.
    """
    code = (
        "import jax, jax.numpy as jnp\n"
        "from jaxmoe import ops, portability\n"
        "jax.block_until_ready(ops.route(jnp.ones((4, 8)), 2, mode='interpret'))\n"
        "record = next(r for r in portability.shipped_launches() if r.kernel.__name__ == 'grouped_gemm_kernel')\n"
        "assert portability.compile_record(record, 'sm_90').asm['cubin']\n")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    subprocess.run([sys.executable, "-c", code], check=True)


def test_tma_launches_supply_the_scratch_their_descriptors_need():
    """Kernels that build TMA descriptors write them to per-program global scratch; the launch must
    supply at least what the compiled kernel asks for (jaxmoe.launch passes it on jax-triton 0.3)."""
    records = RECORDS["sm_90"]
    tma = [r for r in records if r.constexprs.get("TMA")]
    assert tma, "the shipped table has a TMA config (the Mixtral down projection)"
    for record in tma + [r for r in records if not r.constexprs.get("TMA")][:3]:
        needed = portability.compile_record(record, "sm_90").metadata.global_scratch_size
        assert needed <= record.scratch_per_program, portability.describe(record)
        assert (needed > 0) == bool(record.constexprs.get("TMA")), portability.describe(record)


def test_scratch_output_lands_in_the_global_scratch_slot():
    """On jax-triton 0.3, launch() adds one output past a TMA kernel's parameters; the wrapped compile
    step sees the kernel's own signature and gives that extra array a pointer attribute, so jax-triton
    passes it right after the kernel's parameters: the global scratch slot of Triton's launch ABI."""
    from jaxmoe.kernels import grouped_gemm

    calls = []

    def original(backend_init_func, platform, fn, arg_dtypes, scalar_args, **kwargs):
        calls.append(list(arg_dtypes))
        return "kernel", {(i,): [["tt.divisibility", 16]] if t.startswith("*") else [] for i, t in enumerate(arg_dtypes)}

    triton_lib = types.SimpleNamespace(get_or_create_triton_kernel=original)
    launch._supply_scratch(triton_lib)
    launch._supply_scratch(triton_lib)  # idempotent: wraps once
    fn = grouped_gemm.grouped_gemm_kernel
    n_params = len(fn.arg_names) - len(fn.constexprs)
    dtypes = ["*bf16"] * 10 + ["i32", "i32", "*bf16", "*u8"]
    assert len(dtypes) == n_params

    kernel, attrs = triton_lib.get_or_create_triton_kernel(None, "cuda", fn, dtypes, ())
    assert calls[-1] == dtypes and (n_params,) not in attrs  # a kernel without scratch: unchanged

    launch._SCRATCH_KERNELS.add(fn.fn)
    kernel, attrs = triton_lib.get_or_create_triton_kernel(None, "cuda", fn, dtypes + ["*i8"], ())
    assert calls[-1] == dtypes  # compiled with the kernel's own signature
    assert attrs[(n_params,)] == [["tt.divisibility", 16]]
