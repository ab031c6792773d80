"""Runs Triton kernels in Triton's interpreter on numpy arrays (implementation="interpret").

The interpreter expects torch-like tensors. HostTensor is the small part of that interface it uses:
`data_ptr`, `dtype`, `untyped_storage()` (with `data_ptr`, `cpu`, `copy_`), `new_empty`, `set_`,
`storage_offset`, `size`, `stride` and `copy_`. The interpreter reads and writes through raw
addresses, so the kernel works on the numpy buffers in place and `cpu()` can return the same object.

The interpreter keeps bfloat16 values as their raw uint16 bits. Two of its bfloat16 operations are
replaced for each launch here, so that "interpret" computes what a GPU computes:
- tl.dot multiplied those bits as integers (triton issue 11584; results near 1e11): bfloat16 operands
  now become float32 first (their products are exact in float32; the sum runs in float32, as on
  tensor cores);
- float32 -> bfloat16 casts truncated the mantissa: they now round to nearest even, as GPUs do, and
  keep NaN a NaN.
"""

from __future__ import annotations

import contextlib
import threading
import types
import warnings

import numpy as np


class _HostStorage:
    def __init__(self, array: np.ndarray):
        self.array = array

    def data_ptr(self) -> int:
        return self.array.ctypes.data

    def cpu(self) -> "_HostStorage":
        return self

    def copy_(self, other: "_HostStorage") -> None:
        if other.array is not self.array:
            np.copyto(self.array, other.array)


class HostTensor:
    """A contiguous numpy array dressed as the torch tensor Triton's interpreter expects."""

    def __init__(self, array: np.ndarray):
        self.array = np.ascontiguousarray(array)

    @property
    def dtype(self):
        return self.array.dtype

    def data_ptr(self) -> int:
        return self.array.ctypes.data

    def untyped_storage(self) -> _HostStorage:
        return _HostStorage(self.array)

    def new_empty(self, *shape, **_) -> "HostTensor":
        return HostTensor(np.empty(shape, self.array.dtype))

    def set_(self, storage: _HostStorage, offset: int, size, stride) -> "HostTensor":
        assert offset == 0, "HostTensor views always start at their buffer"
        self.array = storage.array
        return self

    def storage_offset(self) -> int:
        return 0

    def size(self):
        return self.array.shape

    def stride(self):
        return tuple(s // self.array.itemsize for s in self.array.strides)

    def copy_(self, other: "HostTensor") -> None:
        np.copyto(self.array, other.array)


def poison_like(shape, dtype) -> np.ndarray:
    """An output buffer full of values no kernel writes, so an unwritten element cannot pass a test."""
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.integer):
        return np.full(shape, np.iinfo(dtype).min // 2 + 7, dtype)
    return np.full(shape, np.nan, dtype)


@contextlib.contextmanager
def _interpreter_language():
    """Puts triton.language in interpreter form for one launch, and lets kernels call @triton.jit helpers.

    Without TRITON_INTERPRET=1 set before triton is imported, helpers (tl.max, tl.cumsum, ours) are
    compiled-mode JITFunctions that refuse Python calls; setting it would turn every kernel of the
    process into an interpreted one, the GPU path's too. Triton's own nested-call path patches the
    language for each helper and never restores it, which breaks later compilation in the same
    process. So the language is patched here once, for tl and tl.core alike, helpers run unpatched
    inside that, and everything is restored on exit.
    """
    # A module imported for the first time while the language is patched keeps patched objects for
    # good: the code generator, imported late, would map Python's min/max to interpreter functions
    # and every later compilation in the process would fail. Importing it first keeps it clean.
    import triton.compiler.code_generator  # noqa: F401
    import triton.language as tl
    from triton.runtime import interpreter
    from triton.runtime.jit import JITFunction

    # Triton 3.6's interpreter turns a scalar into an index with int() of a one-element array, which
    # numpy 2.4 made an error (newer Triton squeezes the array first). Every _patch_lang call, ours
    # and the one each launch makes, goes through _patch_lang_tensor, so the index is fixed there.
    original_patch_tensor = interpreter._patch_lang_tensor

    def patch_tensor(tensor, patch_scope):
        original_patch_tensor(tensor, patch_scope)
        patch_scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    interpreter._patch_lang_tensor = patch_tensor
    anchor = types.FunctionType(_anchor.__code__, {"tl": tl, "core": tl.core})  # globals _patch_lang scans
    scope = interpreter._patch_lang(anchor)
    original_call = JITFunction.__call__
    JITFunction.__call__ = lambda self, *args, **kwargs: interpreter.InterpretedFunction(self.fn).rewrite()(
        *args, **kwargs)
    builder = interpreter.InterpreterBuilder
    original_dot, original_cast = builder.create_dot, builder.cast_impl

    def cast(self, src, dst_type):
        source, target = src.dtype.scalar, dst_type.scalar
        if source == tl.bfloat16 and target == tl.float32:
            return interpreter.TensorHandle(bfloat16_bits_to_float32(src.data), tl.float32)
        if source == tl.float32 and target == tl.bfloat16:
            return interpreter.TensorHandle(float32_to_bfloat16_bits(src.data), tl.bfloat16)
        return original_cast(self, src, dst_type)

    def dot(self, a, b, *rest):
        a, b = (cast(self, v, tl.float32) if v.dtype.scalar == tl.bfloat16 else v for v in (a, b))
        return original_dot(self, a, b, *rest)

    builder.create_dot, builder.cast_impl = dot, cast
    try:
        yield
    finally:
        builder.create_dot, builder.cast_impl = original_dot, original_cast
        JITFunction.__call__ = original_call
        interpreter._patch_lang_tensor = original_patch_tensor
        scope.restore()


def _anchor():
    pass


def bfloat16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    return (np.asarray(bits).astype(np.uint32) << 16).view(np.float32)


def float32_to_bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """Round to nearest, ties to even; NaN stays NaN (quiet, same sign), infinities stay infinite."""
    x = np.ascontiguousarray(x, np.float32)
    bits = x.view(np.uint32)
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    nan = ((bits >> 16) | np.uint32(0x40)).astype(np.uint16)
    return np.where(np.isnan(x), nan, rounded)


_LOCK = threading.Lock()  # the patches above are process-wide; keep interpreted launches one at a time


def run_interpreted(kernel, grid, args, out_shapes, zeroed_outputs, constexprs) -> list[np.ndarray]:
    """kernel[grid](*args, *outputs, **constexprs) in the interpreter; returns the outputs. Outputs
    listed in zeroed_outputs start as zeros, the others poisoned."""
    from triton.runtime.interpreter import InterpretedFunction

    wrapped = [HostTensor(np.array(a)) if isinstance(a, np.ndarray) else a for a in args]
    outputs = [HostTensor(np.zeros(s.shape, s.dtype) if i in zeroed_outputs else poison_like(s.shape, s.dtype))
               for i, s in enumerate(out_shapes)]
    fn = getattr(kernel, "fn", kernel)
    # The interpreter runs the kernels' float math in numpy, which warns where a GPU just computes:
    # log(0) = -inf of a masked-off row, Inf - Inf = NaN of a non-finite input. Those values are the
    # kernels' semantics, so numpy's floating-point warnings are off for the launch (errstate is
    # per-thread), and so is the one warning numpy raises through `warnings` instead, a max over a
    # row of NaN logits (by its message, for the launch: the lock already holds other launches off).
    with _LOCK, _interpreter_language(), np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "All-NaN (slice|axis) encountered", RuntimeWarning)
        InterpretedFunction(fn)[grid](*wrapped, *outputs, **constexprs)
    return [o.array for o in outputs]
