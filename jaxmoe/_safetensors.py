"""Reading and writing the safetensors format with numpy alone.

A .safetensors file is an 8-byte little-endian header length n, n bytes of JSON mapping each tensor name to
{"dtype", "shape", "data_offsets": [begin, end]} (offsets into the bytes after the header), and the raw
little-endian tensor bytes. The `safetensors` package's numpy reader refuses bfloat16 and float8, the dtypes real
checkpoints are stored in, so this reads them as JAX's numpy dtypes for those (ml_dtypes'), memory-mapped: only the
bytes of the tensors asked for are read.
"""

from __future__ import annotations

import json
import os
import struct

import jax.numpy as jnp
import numpy as np

DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype(jnp.bfloat16),
    "F8_E4M3": np.dtype(jnp.float8_e4m3fn), "F8_E5M2": np.dtype(jnp.float8_e5m2),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
if hasattr(jnp, "float8_e8m0fnu"):  # ue8m0 block scales (DeepSeek-V3.2 style)
    DTYPES["F8_E8M0"] = np.dtype(jnp.float8_e8m0fnu)
_NAMES = {dtype: name for name, dtype in DTYPES.items()}


class SafetensorsFile:
    """The tensors of one .safetensors file, read on demand: names, shape(name), dtype_name(name), read(name)."""

    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise ValueError(f"{path} is not a safetensors file: it has fewer than 8 bytes")
            (length,) = struct.unpack("<Q", head)
            try:
                header = json.loads(f.read(length))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{path} is not a safetensors file: its header is not JSON ({e})") from None
        header.pop("__metadata__", None)
        self._header = header
        self._data_start = 8 + length
        self.names = frozenset(header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._header[name]["shape"])

    def dtype_name(self, name: str) -> str:
        return self._header[name]["dtype"]

    def read(self, name: str) -> np.ndarray:
        """The tensor as a read-only numpy array mapped from the file."""
        entry = self._header[name]
        if entry["dtype"] not in DTYPES:
            raise ValueError(f"{self.path}: tensor {name!r} has dtype {entry['dtype']}, which jaxmoe cannot read "
                             f"(it reads {sorted(DTYPES)})")
        dtype = DTYPES[entry["dtype"]]
        begin, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        if end - begin != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
            raise ValueError(f"{self.path}: tensor {name!r} holds {end - begin} bytes, not the "
                             f"{dtype.itemsize} x {shape} its header says")
        if end == begin:
            return np.zeros(shape, dtype)
        data = np.memmap(self.path, dtype=np.uint8, mode="r", offset=self._data_start + begin, shape=(end - begin,))
        return data.view(dtype).reshape(shape)


def save(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Write numpy arrays (bfloat16 and float8 as jnp.bfloat16, jnp.float8_*) as a .safetensors file."""
    header, offset, arrays = {}, 0, []
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
        if dtype not in _NAMES:
            raise ValueError(f"tensor {name!r} has dtype {array.dtype}, which safetensors has no name for")
        array = array.astype(dtype, copy=False)
        header[name] = {"dtype": _NAMES[dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
        arrays.append(array)
    header["__metadata__"] = {"format": "pt", **(metadata or {})}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as the reference writer does
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for array in arrays:
            f.write(array.tobytes())
    os.replace(tmp, path)
