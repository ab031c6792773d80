"""The wheel ships jaxmoe with its kernels as jaxmoe.kernels, and never a top-level `kernels` module
(that name belongs to Hugging Face's package, which transformers probes for). The dependency floors
are the tested GPU-image stack; jaxmoe installs without triton and never breaks later Triton compiles."""

import os
import pathlib
import re
import subprocess
import sys
import tomllib
import zipfile

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

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
    assert "jaxmoe/py.typed" in names  # PEP 561: type checkers read jaxmoe's annotations
    (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    metadata = zipfile.ZipFile(wheel).read(metadata).decode()
    for classifier in ("Typing :: Typed", "Programming Language :: Python :: 3.12"):
        assert f"Classifier: {classifier}" in metadata
    (license,) = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
    assert "Apache License" in zipfile.ZipFile(wheel).read(license).decode()
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)


def test_readme_links_work_off_the_repository():
    """The README is the package's long description (PyPI shows it without the repository): every
    link in it is an absolute URL, none a path into the source tree."""
    targets = re.findall(r"\]\(([^)\s]+)\)", (REPO / "README.md").read_text())
    assert all(t.startswith(("https://", "http://")) for t in targets), targets


def test_kernels_import_no_jax():
    """kernels/ is framework-free: importing it must not pull in JAX."""
    # jaxmoe/__init__ imports jax, so kernels/ is loaded as a package of its own (its modules import
    # each other relatively), not through jaxmoe; then every module in it.
    code = ("import importlib, importlib.util, sys, pathlib\n"
            f"root = pathlib.Path({str(REPO / 'kernels')!r})\n"
            "spec = importlib.util.spec_from_file_location('standalone_kernels', root / '__init__.py',\n"
            "                                              submodule_search_locations=[str(root)])\n"
            "package = importlib.util.module_from_spec(spec)\n"
            "sys.modules['standalone_kernels'] = package\n"
            "spec.loader.exec_module(package)\n"
            "names = sorted(path.stem for path in root.glob('*.py') if path.stem != '__init__')\n"
            "assert {'routing', 'dispatch', 'grouped_gemm', 'grouped_gemm_bwd', 'combine'} <= set(names), names\n"
            "for name in names:\n"
            "    importlib.import_module('standalone_kernels.' + name)\n"
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
try:  # on a CPU, "triton" points to "interpret": the message says that one needs the extra too
    jaxmoe.moe(x, *args, top_k=2, implementation="triton")
except ValueError as err:
    assert "'interpret'" in str(err) and "gpu extra" in str(err) and "jaxmoe[gpu]" in str(err), err
else:
    raise AssertionError("triton ran without triton")
"""
    subprocess.run([sys.executable, "-c", code], check=True)


def test_floors_are_the_pinned_gpu_image_stack():
    """Every floor of what `pip install 'jaxmoe[gpu]'` installs is the version .ci/gpu-image.txt pins,
    the stack `make test` runs the suite on: the floors resolve together and are tested."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    floors = {}
    for line in project["dependencies"] + project["optional-dependencies"]["gpu"]:
        req = Requirement(line)
        (spec,) = req.specifier  # a floor and nothing else: the newest releases are tested too
        assert spec.operator == ">=", line
        floors[canonicalize_name(req.name)] = Version(spec.version)
    pins = {}
    for line in (REPO / ".ci" / "gpu-image.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", line
            pins[canonicalize_name(req.name)] = Version(spec.version)
    assert {"jax", "jaxlib", "flax", "triton", "jax-triton", "numpy"} <= pins.keys()
    assert floors == {name: pins.get(name) for name in floors}, (floors, pins)


def test_jax_triton_imports_leave_triton_able_to_compile(tmp_path):
    """jax-triton 0.3.x empties TRITON_CACHE_DIR as it loads, even where the import then fails (a CPU),
    and every later triton.compile in the process fails. After importing jaxmoe and every path that
    imports jax_triton (the GPU probe, the benchmark's version header, the import "triton" mode makes,
    then a user's own `import jax_triton`), Triton still compiles, into the cache dir that was set, and
    "interpret" runs."""
    code = f"""
import os
import jax, jax.numpy as jnp
import numpy as np
import jaxmoe
from jaxmoe import launch, portability
from benchmarks import moe as bench

jaxmoe.resolve_implementation(None)
bench.environment()
for load in (launch._jax_triton, lambda: __import__("jax_triton")):
    try:
        load()
    except ImportError:  # a CPU jaxlib has no GPU Triton support
        pass
assert os.environ.get("TRITON_CACHE_DIR") == {str(tmp_path)!r}, os.environ.get("TRITON_CACHE_DIR")

record = next(r for r in portability.shipped_launches() if r.kernel.__name__ == "combine_kernel")
assert portability.compile_record(record, "sm_90").asm["cubin"]

k = jax.random.split(jax.random.key(0), 6)
args = (jax.random.normal(k[0], (8, 16)), jax.random.uniform(k[1], (8, 2)),
        jax.lax.top_k(jax.random.uniform(k[2], (8, 4)), 2)[1], jax.random.normal(k[3], (4, 16, 24)),
        jax.random.normal(k[4], (4, 16, 24)), jax.random.normal(k[5], (4, 24, 16)))
with jax.default_matmul_precision("highest"):
    y = jaxmoe.expert_ffn(*args, implementation="interpret")
    y_ref = jaxmoe.expert_ffn(*args, implementation="xla")
np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
"""
    env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path)}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env=env)
    assert any(tmp_path.iterdir()), "the compile did not use the cache dir that was set"
