"""Reading and writing safetensors one tensor at a time.

The fuse stage must handle models far larger than memory allows to hold
twice, so it never materialises a whole model: shards are read lazily
(`safe_open`), and `write_safetensors` writes the header first (shapes and
dtypes are known up front) and then each tensor as it is produced.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import json
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from .artifacts import atomic_file

_DTYPE_NAMES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
_DTYPES = {name: dtype for dtype, name in _DTYPE_NAMES.items()}


def return_freed_memory_eagerly() -> None:
    """Make glibc give freed memory back to the system at once (elsewhere: nothing).

    Two settings, both measured:
      - M_TRIM_THRESHOLD 0: freed memory at the top of the heap is returned on every free
        (glibc otherwise keeps it, up to a threshold that grows with use). bench/fuse.py
        (476M parameters): peak 491 -> 395 MiB, no slower.
      - M_MMAP_THRESHOLD 1 MiB: every tensor of 1 MiB or more gets its own mapping, unmapped
        when freed. glibc's default threshold grows with the largest block freed so far (to
        32 MiB), and setting the trim threshold freezes it wherever it stands, so activations
        of a few MB to 32 MB came from the heap, which fragments and keeps growing: a training
        step at 512 tokens on a 6-layer Qwen3-4B-wide model (NF4, gradient checkpointing, CPU)
        grew by 130 MB per layer in the checkpointed forward alone, none of it live tensors
        (RssAnon read by a hook per layer); with the fixed threshold it grew by 5 MB per layer,
        and RssAnon after the first step was 2.66 GB instead of 3.79 (README, Model families).
    """
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        return
    if mallopt is not None:
        mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        mallopt(_M_TRIM_THRESHOLD, 0)
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)


_M_TRIM_THRESHOLD = -1  # glibc malloc.h
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 20


class SafetensorsReader:
    """Reads one tensor at a time from a .safetensors file with plain reads.

    safe_open memory-maps the file, and every page a tensor read touches stays
    in the process's resident set until the file is closed: a 5 GB shard
    would count 5 GB. Reading each tensor's bytes into its own buffer keeps
    memory at the tensor being processed. Raises ValueError naming the file
    when the header is malformed or a tensor lies past the end of the file.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._f = open(self.path, "rb")
        size = self.path.stat().st_size
        try:
            (n,) = struct.unpack("<Q", self._f.read(8))
            if n > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(self._f.read(n))
        except (struct.error, ValueError) as e:
            self._f.close()
            raise ValueError(f"{self.path}: not a valid safetensors file ({e})") from None
        self.metadata = header.pop("__metadata__", {}) or {}
        self._start = 8 + n
        self._entries = header
        for name, e in header.items():
            if e["dtype"] not in _DTYPES or self._start + e["data_offsets"][1] > size:
                self._f.close()
                raise ValueError(f"{self.path}: tensor {name} is truncated or has an unknown dtype")

    def keys(self) -> list[str]:
        return list(self._entries)

    def spec(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        e = self._entries[name]
        return _DTYPES[e["dtype"]], tuple(e["shape"])

    def get(self, name: str) -> torch.Tensor:
        dtype, shape = self.spec(name)
        begin, end = self._entries[name]["data_offsets"]
        buf = bytearray(end - begin)
        self._f.seek(self._start + begin)
        if self._f.readinto(buf) != len(buf):
            raise ValueError(f"{self.path}: tensor {name} is truncated")
        if not buf:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(shape)

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def weight_shards(model_dir: Path) -> list[Path]:
    """The safetensors files of a model folder, in index order when sharded."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()
        return [model_dir / n for n in dict.fromkeys(names)]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")


def write_safetensors(
    path: Path,
    specs: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
    produce: Callable[[str], torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write a safetensors file tensor by tensor, atomically.

    specs: (name, dtype, shape) for every tensor, in file order.
    produce(name): returns that tensor, or an iterator of consecutive row blocks
    of it (a tensor too large to hold twice is then written as it is computed);
    it must match its spec. Only one produced tensor is alive at a time.
    """
    specs = list(specs)
    header: dict[str, object] = {}
    offset = 0
    for name, dtype, shape in specs:
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned

    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, dtype, shape in specs:
            produced = produce(name)
            rows = 0
            for part in [produced] if isinstance(produced, torch.Tensor) else produced:
                if part.dtype != dtype or tuple(part.shape[1:]) != tuple(shape[1:]) or part.ndim != len(shape):
                    raise ValueError(f"{name}: produced {part.dtype} {tuple(part.shape)}, "
                                     f"expected {dtype} {tuple(shape)}")
                f.write(part.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
                rows += part.shape[0] if part.ndim else 1
            if rows != (shape[0] if shape else 1):
                raise ValueError(f"{name}: produced {rows} rows, expected {dtype} {tuple(shape)}")
