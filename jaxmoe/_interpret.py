"""Runs Triton kernels in Triton's interpreter on numpy arrays (implementation="interpret").

The interpreter expects torch-like tensors. HostTensor is the small part of that interface it uses:
`data_ptr`, `dtype`, `untyped_storage()` (with `data_ptr`, `cpu`, `copy_`), `new_empty`, `set_`,
`storage_offset`, `size`, `stride` and `copy_`. The interpreter reads and writes through raw
addresses, so the kernel works on the numpy buffers in place and `cpu()` can return the same object.
bfloat16 tl.dot is wrong in the interpreter (triton issue 11584): test float32 and float16 there.
"""

from __future__ import annotations

import contextlib
import threading

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
def _jit_calls_interpreted():
    """Lets interpreted code call other @triton.jit functions (tl.max, tl.cumsum, our helpers).

    Without TRITON_INTERPRET=1 set before triton is imported, those are compiled-mode JITFunctions that
    refuse to be called from Python; setting it would turn every kernel of the process into an
    interpreted one, the GPU path's too. So the redirect lives only as long as one interpreted launch.
    """
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    original = JITFunction.__call__
    JITFunction.__call__ = lambda self, *args, **kwargs: InterpretedFunction(self.fn)(*args, **kwargs)
    try:
        yield
    finally:
        JITFunction.__call__ = original


_LOCK = threading.Lock()  # the redirect above is process-wide; keep interpreted launches one at a time


def run_interpreted(kernel, grid, args, out_shapes, constexprs) -> list[np.ndarray]:
    """kernel[grid](*args, *outputs, **constexprs) in the interpreter; returns the outputs."""
    from triton.runtime.interpreter import InterpretedFunction

    wrapped = [HostTensor(np.array(a)) if isinstance(a, np.ndarray) else a for a in args]
    outputs = [HostTensor(poison_like(s.shape, s.dtype)) for s in out_shapes]
    fn = getattr(kernel, "fn", kernel)
    with _LOCK, _jit_calls_interpreted():
        InterpretedFunction(fn)[grid](*wrapped, *outputs, **constexprs)
    return [o.array for o in outputs]
