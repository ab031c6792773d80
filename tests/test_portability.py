"""The portability gate: every kernel variant jaxmoe can launch compiles for sm_80, sm_90 and gfx942.

No GPU is needed: Triton compiles for any target on the CPU. The variants come from tracing the real
launch layer (jaxmoe/portability.py), so this compiles exactly what "triton" would launch.
"""

import pytest

from jaxmoe import portability

RECORDS = portability.shipped_launches()


def test_gate_covers_every_kernel():
    names = {r.kernel.__name__ for r in RECORDS}
    assert names == {"topk_routing_kernel", "count_chunks_kernel", "scatter_kernel", "grouped_gemm_kernel",
                     "combine_kernel"}


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
