"""File formats read without their libraries: the GGUF header.

`validate_gguf` tells a complete GGUF from a damaged one by its header alone;
integrity checks every artifact with it and the toolchain every file it
writes. Only the standard library, plus the `gguf` package's table of block
sizes, is used.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

from .errors import BadInputError


class GGUFError(BadInputError, ValueError):
    """A file is not a readable, complete GGUF."""


# GGUF metadata value types (gguf-py GGUFValueType): struct formats of the fixed-size ones.
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_GGUF_VERSIONS = (2, 3)  # what llama.cpp reads; version 1 has been unsupported for years
_GGUF_DEFAULT_ALIGNMENT = 32


@dataclass
class GGUFInfo:
    """What validate_gguf read: the header, all metadata, and each tensor's ggml type name."""

    version: int
    metadata: dict[str, object] = field(default_factory=dict)
    tensor_types: dict[str, str] = field(default_factory=dict)
    tensor_shapes: dict[str, list[int]] = field(default_factory=dict)  # ggml order: the row length first
    tensor_offsets: dict[str, int] = field(default_factory=dict)  # where each tensor's data starts in the file


class _HeaderReader:
    """Sequential little-endian reads that fail cleanly at the end of the file."""

    def __init__(self, f, size: int, path: Path):
        self.f, self.size, self.path = f, size, path

    def take(self, n: int) -> bytes:
        if n > self.size - self.f.tell():
            raise GGUFError(f"{self.path}: truncated GGUF, the header ends early (file is {self.size} bytes)")
        return self.f.read(n)

    def unpack(self, fmt: str) -> object:
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return self.take(self.unpack("Q")).decode("utf-8", errors="replace")

    def value(self, vtype: int) -> object:
        if vtype in _GGUF_SCALARS:
            return self.unpack(_GGUF_SCALARS[vtype])
        if vtype == _GGUF_STRING:
            return self.string()
        if vtype == _GGUF_ARRAY:
            item_type, count = self.unpack("I"), self.unpack("Q")
            if item_type in _GGUF_SCALARS:
                fmt = _GGUF_SCALARS[item_type]
                return list(struct.unpack(f"<{count}{fmt}", self.take(count * struct.calcsize(fmt))))
            return [self.value(item_type) for _ in range(count)]
        raise GGUFError(f"{self.path}: corrupt GGUF, unknown metadata value type {vtype}")


def validate_gguf(path: Path) -> GGUFInfo:
    """Check that a file is a complete GGUF, reading only its header.

    Checks the magic `GGUF`, a version llama.cpp reads (2 or 3), that the metadata and tensor
    table parse to the end without running past the file, and that the file is long enough to
    hold every tensor's data (sizes from the `gguf` package's block-size table; a tensor type
    it does not know is only checked to start inside the file).

    Inputs: path, the file to check.
    Outputs: a GGUFInfo with the version, every metadata key/value (arrays as lists), each
    tensor's type name, e.g. {"blk.0.ffn_down.weight": "Q6_K", ...}, and its dimensions.
    Errors: GGUFError naming the file, for a bad magic, an unsupported version, a corrupt or
    truncated header, or missing tensor data; FileNotFoundError / OSError when it cannot be read.
    """
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        r = _HeaderReader(f, size, path)
        if size < 4 or f.read(4) != b"GGUF":
            raise GGUFError(f"{path}: not a GGUF file (bad magic)")
        version = r.unpack("I")
        if version not in _GGUF_VERSIONS:
            raise GGUFError(f"{path}: unsupported GGUF version {version} (llama.cpp reads {_GGUF_VERSIONS})")
        n_tensors, n_kv = r.unpack("Q"), r.unpack("Q")
        info = GGUFInfo(version=version)
        for _ in range(n_kv):
            key = r.string()
            info.metadata[key] = r.value(r.unpack("I"))
        tensors = []
        for _ in range(n_tensors):
            name = r.string()
            dims = [r.unpack("Q") for _ in range(r.unpack("I"))]
            tensors.append((name, dims, r.unpack("I"), r.unpack("Q")))
        header_end = f.tell()

    alignment = info.metadata.get("general.alignment", _GGUF_DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0:
        raise GGUFError(f"{path}: corrupt GGUF, general.alignment is {alignment!r}")
    data_start = -(-header_end // alignment) * alignment
    needed = data_start if tensors else header_end  # a vocab-only GGUF ends with its header
    for name, dims, type_id, offset in tensors:
        info.tensor_shapes[name] = dims
        info.tensor_offsets[name] = data_start + offset
        try:
            qtype = GGMLQuantizationType(type_id)
        except ValueError:
            info.tensor_types[name] = f"type {type_id}"
            needed = max(needed, data_start + offset + 1)
            continue
        info.tensor_types[name] = qtype.name
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        n_elements = 1
        for d in dims:
            n_elements *= d
        needed = max(needed, data_start + offset + n_elements // block_size * type_size)
    if size < needed:
        raise GGUFError(f"{path}: truncated GGUF, tensor data needs {needed} bytes but the file has {size}")
    return info
