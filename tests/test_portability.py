"""The portability gate: every kernel variant jaxmoe can launch compiles for sm_80, sm_90 and gfx942.

No GPU is needed: Triton compiles for any target on the CPU. The variants come from tracing the real
launch layer (jaxmoe/portability.py), so this compiles exactly what "triton" would launch.
"""

import subprocess
import sys

import pytest

from jaxmoe import portability

RECORDS = portability.shipped_launches()


def test_gate_covers_every_kernel():
    names = {r.kernel.__name__ for r in RECORDS}
    assert names == {"topk_routing_kernel", "count_chunks_kernel", "scatter_kernel", "grouped_gemm_kernel",
                     "combine_kernel", "dh_kernel", "weight_grad_kernel"}


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
