"""The one place where a kernel launch turns into either a jax-triton call or an interpreter run.

Everything upstream (grids, configs, strides, scalars) is computed once in ops.py for both modes;
only this final step differs. Kernel parameters follow jax-triton's order: inputs (arrays and int
scalars, positionally), then one pointer per output, then constexprs by keyword.

A kernel that builds TMA descriptors on the device (`tl.make_tensor_descriptor`) writes them to a
global scratch buffer that Triton's launch ABI passes after the kernel's own parameters. jax-triton
0.4 with jaxlib > 0.11 allocates it; jax-triton 0.3 on jaxlib 0.11 passes a null pointer there, and
such a kernel dies with CUDA_ERROR_ILLEGAL_ADDRESS. `launch(..., scratch_per_program=...)` supplies it
on that stack (see _supply_scratch).

Under `jax.vmap` a launch runs once per batch element (`jax.lax.map` over the batched arrays, the
unbatched ones shared): neither jax-triton's triton_call nor a vmap_method-less pure_callback has a
batching rule, and a launch's outputs depend only on its inputs, so this is right for every kernel
without knowing what it computes. The launchers' custom VJPs batch by batching their forward and
backward, which launch through here, so vmap of grad and grad of vmap take the same path. Where a
batch can be folded into tokens exactly, jaxmoe.api does that first, so most vmaps never get here.
A launch does not rely on that wrapper to lower: the DCE rule registered at the jax-triton import
(_register_dce_rule) lets a plain jax-triton call lower on every supported jax (tests/test_lowering.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import json
import math
import os
import warnings
from typing import Sequence

import jax
import numpy as np

from jaxmoe import _interpret


@functools.cache
def _jax_triton():
    """(jax_triton, its output keyword, whether launch() supplies the global scratch, the keywords that
    pass COMPILE_OPTIONS). Every import of jax_triton in jaxmoe goes through here."""
    # jax-triton 0.3.x sets TRITON_CACHE_DIR to "" as it loads, even when the import then fails (as on
    # a CPU), and every later triton.compile in the process fails ("Could not create or locate cache
    # dir"); 0.4.x deletes the variable, dropping a user's choice. jax-triton compiles without that
    # cache, so the variable is put back as it was. jax_triton.triton_lib, which does this, stays
    # loaded even when the import fails, so a later `import jax_triton` does not run it again.
    saved = os.environ.get("TRITON_CACHE_DIR")
    try:
        import jax_triton
    finally:
        if saved is None:
            os.environ.pop("TRITON_CACHE_DIR", None)
        else:
            os.environ["TRITON_CACHE_DIR"] = saved

    _register_dce_rule(jax_triton.triton_lib.triton_kernel_call_p)

    # jax-triton 0.3.x names the outputs `out_shape`; 0.4.x renamed it `out_type`. 0.3.x takes compile
    # options as keywords, 0.4.x inside backend_options.
    params = inspect.signature(jax_triton.triton_call).parameters
    new_api = "out_type" in params
    if not new_api:
        _supply_scratch(jax_triton.triton_lib)
    options = {"backend_options": dict(COMPILE_OPTIONS)} if "backend_options" in params else dict(COMPILE_OPTIONS)
    return jax_triton, "out_type" if new_api else "out_shape", not new_api, options


# Triton compile options every launch names, not left to Triton's defaults. enable_fp_fusion (a*b+c as
# one FMA): Triton 3.9 warns when it is left unset, and 3.10 turns its default off; every GPU test and
# number so far ran with it on (the default up to 3.9), so it stays on until a measured change says
# otherwise. The portability gate compiles with the same options (portability.compile_record).
COMPILE_OPTIONS = {"enable_fp_fusion": True}


def _register_dce_rule(kernel_call_p) -> None:
    """Dead-code elimination of a kernel call that works with every supported jax.

    jax <= 0.11 calls a DCE rule as rule(used_outputs, eqn), jax 0.12 as rule(used_outputs,
    live_inputs, eqn). jax-triton 0.4.1 registers a rule of the old form, so on jax 0.12 a jitted
    triton_call outside any wrapper fails to lower ("takes 2 positional arguments but 3 were given");
    jaxmoe's launches only lowered because sequential_vmap hid them from DCE. jax-triton 0.3.1 has no
    rule and gets jax's default, which is what this rule does: the call, a pure function of its
    inputs unless it has effects (Refs) or says it has side effects, is dropped when none of its
    outputs is used and otherwise kept whole, every input live (one launch writes all its outputs;
    zeroed and aliased outputs stay as they are). jax-triton 0.4.1's own rule keeps even an unused
    call. This can go once every supported jax-triton registers a rule in the form its jax calls
    (tests/test_lowering.py lowers a plain launch on both stacks).
    """

    def rule(used_outputs, *live_inputs_and_eqn):
        eqn = live_inputs_and_eqn[-1]
        if any(used_outputs) or eqn.effects or eqn.params.get("has_side_effect", False):
            return [True] * len(eqn.invars), eqn
        return [False] * len(eqn.invars), None

    from jax._src.interpreters import partial_eval  # DCE rules have no public registry

    partial_eval.dce_rules[kernel_call_p] = rule


# The kernels a scratch buffer is appended to (by the function behind their JITFunction).
_SCRATCH_KERNELS: set = set()


def _supply_scratch(triton_lib) -> None:
    """Lets a launch on jax-triton 0.3 pass a global scratch buffer to kernels that build TMA descriptors.

    Triton's launch ABI passes, after the kernel's own parameters, a global scratch pointer and a
    profile scratch pointer; jaxlib 0.11 appends two null pointers for them. launch() gives such a
    kernel one more output than it has parameters: jax-triton turns it into one more array parameter,
    which lands in the global scratch slot, and jaxlib's first null lands in the profile slot (read only
    under Triton's profiler). Here the compile step is told the kernel's real signature (without that
    output), and the output gets a 16-byte-aligned pointer attribute like any other array.
    """
    original = triton_lib.get_or_create_triton_kernel
    if getattr(original, "_jaxmoe_scratch", False):
        return

    def get_or_create_triton_kernel(backend_init_func, platform, fn, arg_dtypes, scalar_args, **kwargs):
        n_params = len(fn.arg_names) - len(fn.constexprs)
        if fn.fn not in _SCRATCH_KERNELS or len(arg_dtypes) != n_params + 1:
            return original(backend_init_func, platform, fn, arg_dtypes, scalar_args, **kwargs)
        kernel, attrs = original(backend_init_func, platform, fn, arg_dtypes[:n_params], scalar_args, **kwargs)
        pointer_attrs = next(attrs[(i,)] for i in range(n_params) if arg_dtypes[i].startswith("*"))
        return kernel, {**attrs, (n_params,): pointer_attrs}

    get_or_create_triton_kernel._jaxmoe_scratch = True
    triton_lib.get_or_create_triton_kernel = get_or_create_triton_kernel


@dataclasses.dataclass(frozen=True)
class HostDescriptor:
    """An array a "triton" launch passes as a TMA descriptor built on the host (host_descriptors_available):
    the kernel's parameter is then a tensor descriptor, not a pointer. The array is read as a row-major
    view of `shape` with `strides` (elements), in block_shape tiles, zeros past the view's edges, as a
    descriptor the kernel builds itself with tl.make_tensor_descriptor reads it."""

    array: jax.Array
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    block_shape: tuple[int, ...]


@functools.cache
def host_descriptors_available() -> bool:
    """Whether launches can take HostDescriptors: jax-triton's TensorDescriptor (0.4) on a jaxlib whose
    kernel call builds them (0.12 and later)."""
    import jaxlib

    major, minor = (int(v) for v in jaxlib.__version__.split(".")[:2])
    return (major, minor) >= (0, 12) and hasattr(_jax_triton()[0], "TensorDescriptor")


def launch(kernel, *args, grid: tuple[int, ...], out_shapes: Sequence[jax.ShapeDtypeStruct], mode: str,
           num_warps: int = 4, num_stages: int = 2, scratch_per_program: int = 0, zeroed_outputs: Sequence[int] = (),
           **constexprs) -> list[jax.Array]:
    """Launches `kernel` over `grid`; returns one array per entry of out_shapes.

    scratch_per_program: bytes of global scratch each program uses (128 per TMA descriptor it builds).
    zeroed_outputs: indices into out_shapes of outputs that hold zeros when the kernel starts (others
    start with any content).
    """
    out_shapes = list(out_shapes)
    if mode != "triton" and any(isinstance(a, HostDescriptor) for a in args):
        raise ValueError(f"host-built TMA descriptors run only on mode='triton', not {mode!r}")
    if mode in ("triton", "interpret"):
        array_slots = [i for i, a in enumerate(args) if isinstance(a, (jax.Array, HostDescriptor))]

        # Only the arrays are arguments: the int scalars and constexprs stay Python values, closed over.
        # A HostDescriptor travels as its array and becomes jax-triton's descriptor inside.
        @jax.custom_batching.sequential_vmap
        def run(*arrays):
            full_args = list(args)
            for slot, array in zip(array_slots, arrays):
                full_args[slot] = _descriptor(args[slot], array) if isinstance(args[slot], HostDescriptor) else array
            if mode == "triton":
                return _launch_triton(kernel, full_args, grid, out_shapes, num_warps, num_stages, scratch_per_program,
                                      tuple(zeroed_outputs), constexprs)
            return _launch_interpreted(kernel, full_args, grid, out_shapes, tuple(zeroed_outputs), constexprs)

        return list(run(*[args[i].array if isinstance(args[i], HostDescriptor) else args[i] for i in array_slots]))
    if mode == "record":
        # jax-triton (as Triton's own launcher) compiles an int argument equal to 1 in as a constant, so
        # that value is part of what compiles: the record keeps it among the constexprs.
        ones = {name: 1 for name, a in zip(kernel.arg_names, args) if not isinstance(a, jax.Array) and a == 1}
        arg_types = tuple(_triton_type(a) for name, a in zip(kernel.arg_names, args) if name not in ones)
        arg_types += tuple(_triton_type(s) for s in out_shapes)
        _RECORDS.append(LaunchRecord(kernel, arg_types, grid, num_warps, num_stages, {**ones, **constexprs},
                                     scratch_per_program))
        return [jax.numpy.zeros(s.shape, s.dtype) for s in out_shapes]
    raise ValueError(f"unknown launch mode {mode!r}")


@dataclasses.dataclass(frozen=True)
class LaunchRecord:
    """What a launch would compile: enough to build the kernel for any target (see portability.py)."""

    kernel: object
    arg_types: tuple[str, ...]  # Triton signature types, inputs then outputs
    grid: tuple[int, ...]
    num_warps: int
    num_stages: int
    constexprs: dict  # with the int arguments equal to 1, which jax-triton compiles in
    scratch_per_program: int = 0  # global scratch bytes the launch supplies per program (TMA descriptors)

    @property
    def compile_key(self) -> str:
        """What selects the binary: kernel, signature types, constexprs, warps and stages (not the grid)."""
        return json.dumps([self.kernel.__name__, self.arg_types, self.num_warps, self.num_stages,
                           sorted(self.constexprs.items())], default=str)

    @property
    def signature(self) -> dict[str, str]:
        names = [n for n in self.kernel.arg_names if n not in self.constexprs]
        return {**dict(zip(names, self.arg_types)), **{n: "constexpr" for n in self.constexprs}}


_RECORDS: list[LaunchRecord] = []


@contextlib.contextmanager
def recording():
    """Within this block, mode="record" launches are collected instead of run; yields the list."""
    start = len(_RECORDS)
    collected: list[LaunchRecord] = []
    try:
        yield collected
    finally:
        collected.extend(_RECORDS[start:])
        del _RECORDS[start:]


_TRITON_TYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "int32": "i32", "int64": "i64",
                 "uint8": "u8"}


def _triton_type(arg) -> str:
    if isinstance(arg, bool):
        return "i1"
    if isinstance(arg, int):
        return "i32" if -2**31 <= arg < 2**31 else "i64"
    return "*" + _TRITON_TYPES[jax.numpy.dtype(arg.dtype).name]


def _launch_triton(kernel, args, grid, out_shapes, num_warps, num_stages, scratch_per_program, zeroed_outputs,
                   constexprs) -> list[jax.Array]:
    """One jax-triton call: a "triton" launch without launch()'s batching wrapper."""
    jt, out_keyword, supply_scratch, compile_options = _jax_triton()
    shapes = list(out_shapes)
    if scratch_per_program and supply_scratch:
        _SCRATCH_KERNELS.add(kernel.fn)
        shapes.append(jax.ShapeDtypeStruct((math.prod(grid) * scratch_per_program,), np.int8))
    with warnings.catch_warnings():
        # jax-triton 0.4 deprecates zeroed_outputs for Ref arguments (jax.new_ref), which 0.3 lacks; the
        # warning is ours to act on, not our users'. Switch the routing kernel's ticket counter to a Ref
        # once jax-triton 0.3 is no longer supported (or once a release drops zeroed_outputs).
        warnings.filterwarnings("ignore", "zeroed_outputs is deprecated", DeprecationWarning)
        outs = jt.triton_call(*args, kernel=kernel, grid=grid, num_warps=num_warps, num_stages=num_stages,
                              zeroed_outputs=tuple(zeroed_outputs), **compile_options,
                              **{out_keyword: shapes}, **constexprs)
    return list(outs)[:len(out_shapes)]


def _descriptor(spec: HostDescriptor, array):
    return _jax_triton()[0].TensorDescriptor(array, spec.shape, spec.strides, spec.block_shape)


def _launch_interpreted(kernel, args, grid, out_shapes, zeroed_outputs, constexprs):
    array_slots = [i for i, a in enumerate(args) if isinstance(a, jax.Array)]

    def on_host(*arrays):
        full_args = list(args)
        for slot, array in zip(array_slots, arrays):
            full_args[slot] = np.asarray(array)
        return _interpret.run_interpreted(kernel, grid, full_args, out_shapes, zeroed_outputs, constexprs)

    outs = jax.pure_callback(on_host, out_shapes, *[args[i] for i in array_slots])
    return list(outs)
