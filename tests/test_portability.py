"""The portability gate: every kernel variant jaxmoe can launch compiles for sm_80, sm_90 and gfx942.

No GPU is needed: Triton compiles for any target on the CPU. The variants come from tracing the real
launch layer (jaxmoe/portability.py), so this compiles exactly what "triton" would launch.
"""

import subprocess
import sys
import types

import pytest

from jaxmoe import launch, portability

RECORDS = portability.shipped_launches()


def test_gate_covers_every_kernel():
    names = {r.kernel.__name__ for r in RECORDS}
    assert names == {"topk_routing_kernel", "count_chunks_kernel", "chunk_prefix_kernel", "scatter_kernel",
                     "grouped_gemm_kernel", "combine_kernel", "dh_kernel", "weight_grad_kernel"}


@pytest.mark.parametrize("target", list(portability.TARGETS))
@pytest.mark.parametrize("record", RECORDS, ids=portability.describe)
def test_compiles(record, target):
    if not portability.supported(record, target):
        pytest.skip(f"{target} has no {record.constexprs.get('DOT_PRECISION')}")
    compiled = portability.compile_record(record, target)
    binary = "cubin" if target.startswith("sm_") else "hsaco"
    assert compiled.asm[binary], f"no {binary} for {portability.describe(record)}"


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
    tma = [r for r in RECORDS if r.constexprs.get("TMA")]
    assert tma, "the shipped table has a TMA config (the Mixtral down projection)"
    for record in tma + [r for r in RECORDS if not r.constexprs.get("TMA")][:3]:
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
    dtypes = ["*bf16"] * 8 + ["i32", "i32", "*bf16"]
    assert len(dtypes) == n_params

    kernel, attrs = triton_lib.get_or_create_triton_kernel(None, "cuda", fn, dtypes, ())
    assert calls[-1] == dtypes and (n_params,) not in attrs  # a kernel without scratch: unchanged

    launch._SCRATCH_KERNELS.add(fn.fn)
    kernel, attrs = triton_lib.get_or_create_triton_kernel(None, "cuda", fn, dtypes + ["*i8"], ())
    assert calls[-1] == dtypes  # compiled with the kernel's own signature
    assert attrs[(n_params,)] == [["tt.divisibility", 16]]
