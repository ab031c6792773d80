"""The wheel ships jaxmoe with its kernels as jaxmoe.kernels, and never a top-level `kernels` module
(that name belongs to Hugging Face's package, which transformers probes for)."""

import pathlib
import subprocess
import sys
import zipfile

REPO = pathlib.Path(__file__).resolve().parent.parent


def test_wheel_contents(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(REPO)], check=True)
    (wheel,) = tmp_path.glob("jaxmoe-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names}
    assert "kernels" not in top_level
    assert {"jaxmoe"} == {t for t in top_level if not t.endswith(".dist-info")}
    for kernel in ("routing", "dispatch", "grouped_gemm", "combine"):
        assert f"jaxmoe/kernels/{kernel}.py" in names
    assert "jaxmoe/tuned_configs.json" in names
    (license,) = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
    assert "Apache License" in zipfile.ZipFile(wheel).read(license).decode()
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)


def test_kernels_import_no_jax():
    """kernels/ is framework-free: importing it must not pull in JAX."""
    # jaxmoe/__init__ imports jax, so the kernel files are loaded directly, not through the package
    code = ("import importlib.util, sys, pathlib\n"
            f"root = pathlib.Path({str(REPO / 'kernels')!r})\n"
            "for name in ('routing', 'dispatch', 'grouped_gemm', 'combine'):\n"
            "    spec = importlib.util.spec_from_file_location(name, root / f'{name}.py')\n"
            "    spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
            "print('jax' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "False"


def test_xla_path_runs_without_triton():
    """With triton and jax-triton unimportable (as on a Mac), jaxmoe imports, "xla" runs forward and
    backward, the default picks "xla", and asking for a kernel path says which extra to install."""
    code = """
import sys
sys.modules["triton"] = None  # any `import triton` now raises ImportError
sys.modules["jax_triton"] = None
import jax, jax.numpy as jnp
import jaxmoe
assert jaxmoe.resolve_implementation(None) == "xla"
k = jax.random.split(jax.random.key(0), 5)
x = jax.random.normal(k[0], (8, 16))
args = (jax.random.normal(k[1], (16, 4)), jax.random.normal(k[2], (4, 16, 24)),
        jax.random.normal(k[3], (4, 16, 24)), jax.random.normal(k[4], (4, 24, 16)))
g = jax.grad(lambda x: jnp.sum(jaxmoe.moe(x, *args, top_k=2)[0]))(x)
assert g.shape == x.shape and bool(jnp.isfinite(g).all())
try:
    jaxmoe.moe(x, *args, top_k=2, implementation="interpret")
except ImportError as err:
    assert "jaxmoe[gpu]" in str(err), err
else:
    raise AssertionError("interpret ran without triton")
"""
    subprocess.run([sys.executable, "-c", code], check=True)
