"""safetensors, read strictly and written in a stream.

Every header field is checked before a byte of tensor data is trusted: the header length is
bounded by the file, the header is a JSON object of known dtypes with integer shapes, and the
data offsets lie inside the file, do not overlap, and hold exactly shape x itemsize bytes.

Tensor data is read one tensor (or one slab of it) at a time: with positioned reads into a
fresh (or reused) buffer, or mapped read-only (`map_raw`) where a copy would be wasted. A map
covers one slab and is unmapped when its array is dropped: a long-lived mmap of the whole file
would count every touched page in the process' RSS.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from .errors import FormatError, InputError, OutputError
from .numerics import bf16_bits_to_f32

# safetensors dtype code -> (numpy dtype used to hold the raw bytes, itemsize, is_float)
# BF16 and the 8-bit floats have no numpy dtype: they are held as their bit patterns.
DTYPES: dict[str, tuple[np.dtype, int]] = {
    "F64": (np.dtype("<f8"), 8),
    "F32": (np.dtype("<f4"), 4),
    "F16": (np.dtype("<f2"), 2),
    "BF16": (np.dtype("<u2"), 2),
    "F8_E4M3": (np.dtype("u1"), 1),
    "F8_E5M2": (np.dtype("u1"), 1),
    "F8_E8M0": (np.dtype("u1"), 1),
    "I64": (np.dtype("<i8"), 8),
    "I32": (np.dtype("<i4"), 4),
    "I16": (np.dtype("<i2"), 2),
    "I8": (np.dtype("i1"), 1),
    "U64": (np.dtype("<u8"), 8),
    "U32": (np.dtype("<u4"), 4),
    "U16": (np.dtype("<u2"), 2),
    "U8": (np.dtype("u1"), 1),
    "BOOL": (np.dtype("?"), 1),
}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})
FP8_DTYPES = frozenset({"F8_E4M3", "F8_E5M2"})
NUMPY_TO_DTYPE = {
    np.dtype("float64"): "F64",
    np.dtype("float32"): "F32",
    np.dtype("float16"): "F16",
    np.dtype("int64"): "I64",
    np.dtype("int32"): "I32",
    np.dtype("int16"): "I16",
    np.dtype("int8"): "I8",
    np.dtype("uint64"): "U64",
    np.dtype("uint32"): "U32",
    np.dtype("uint16"): "U16",
    np.dtype("uint8"): "U8",
    np.dtype("bool"): "BOOL",
}

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit the safetensors library itself enforces
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, dtype code, shape and absolute byte range."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    path: Path
    begin: int  # absolute offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def np_dtype(self) -> np.dtype:
        return DTYPES[self.dtype][0]


def _bad(path: Path, what: str) -> FormatError:
    return FormatError(
        f"{path}: not a valid safetensors file: {what}. "
        "The file is probably truncated or corrupted: download it again (compare its size and "
        "SHA-256 with the ones the hub shows)."
    )


def parse_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    """Read and check the header of one safetensors file.

    Returns (tensors by name, __metadata__, bytes read). Raises FormatError naming the file and
    the problem; no tensor data is read.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _bad(path, f"the file has {size} bytes, fewer than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise _bad(path, f"header length {n} is larger than the rest of the file ({size - 8} bytes)")
            if n > MAX_HEADER_BYTES:
                raise _bad(path, f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
            raw = f.read(n)
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a folder, expected a .safetensors file") from None
    except PermissionError:
        raise InputError(f"{path}: permission denied") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise _bad(path, f"the header is not valid UTF-8 JSON ({e})") from None
    if not isinstance(header, dict):
        raise _bad(path, "the header is not a JSON object")
    data_start = 8 + n
    data_len = size - data_start
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _bad(path, "__metadata__ must map strings to strings")
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise _bad(path, f"tensor {name!r}: entry is not an object")
        dtype = entry.get("dtype")
        shape = entry.get("shape")
        offsets = entry.get("data_offsets")
        if dtype not in DTYPES:
            raise _bad(path, f"tensor {name!r}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise _bad(path, f"tensor {name!r}: shape {shape!r} is not a list of non-negative integers")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        ):
            raise _bad(path, f"tensor {name!r}: data_offsets {offsets!r} is not a pair of integers")
        begin, end = offsets
        if not 0 <= begin <= end:
            raise _bad(path, f"tensor {name!r}: data_offsets {offsets} are not ordered")
        if end > data_len:
            raise _bad(path, f"tensor {name!r}: data ends at byte {end} but the data section has {data_len} bytes")
        expected = math.prod(shape) * DTYPES[dtype][1]
        if end - begin != expected:
            raise _bad(
                path,
                f"tensor {name!r}: {end - begin} bytes for shape {shape} of {dtype}, which needs {expected}",
            )
        tensors[name] = TensorInfo(name, dtype, tuple(shape), path, data_start + begin, data_start + end)
    spans = sorted((t.begin, t.end, t.name) for t in tensors.values() if t.end > t.begin)
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise _bad(path, f"tensors {n0!r} and {n1!r} overlap")
    return tensors, metadata, 8 + n


def read_raw(info: TensorInfo, *, rows: slice | None = None) -> np.ndarray:
    """Read a tensor (or a slab of its leading axis) into a fresh array of its raw dtype.

    BF16 comes back as uint16 bit patterns, FP8 as uint8.
    """
    dt, _ = DTYPES[info.dtype]
    begin, shape = _slab_range(info, rows)
    out = np.empty(shape, dtype=dt)
    nbytes = out.nbytes
    if nbytes:
        with open(info.path, "rb", buffering=0) as f:
            f.seek(begin)
            got = f.readinto(memoryview(out.reshape(-1).view(np.uint8)))
        if got != nbytes:
            raise _bad(info.path, f"tensor {info.name!r}: file ended while reading ({got} of {nbytes} bytes)")
    return out


def _slab_range(info: TensorInfo, rows: slice | None) -> tuple[int, tuple[int, ...]]:
    """(absolute byte offset, shape) of a tensor or of a run of its leading axis."""
    _, itemsize = DTYPES[info.dtype]
    if rows is None:
        return info.begin, info.shape
    if not info.shape:
        raise ValueError("cannot slice a scalar")
    start, stop, step = rows.indices(info.shape[0])
    if step != 1:
        raise ValueError("only contiguous row slices are supported")
    row_bytes = math.prod(info.shape[1:]) * itemsize
    return info.begin + start * row_bytes, (max(stop - start, 0),) + tuple(info.shape[1:])


_MAP_FLAGS = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)  # populate: map the pages in one go


def map_raw(info: TensorInfo, *, rows: slice | None = None) -> np.ndarray:
    """A read-only array of a tensor (or a slab of its leading axis) mapped from the file: no
    copy. The mapping lives as long as the array (and its views) do; map one slab at a time."""
    dt, _ = DTYPES[info.dtype]
    begin, shape = _slab_range(info, rows)
    nbytes = math.prod(shape) * dt.itemsize
    if not nbytes:
        return np.empty(shape, dtype=dt)
    fd = os.open(info.path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if begin + nbytes > size:  # the file shrank since its header was read: a map would SIGBUS
            raise _bad(info.path, f"tensor {info.name!r}: file ended while reading ({size} bytes, "
                                  f"the tensor ends at {begin + nbytes})")
        skip = begin % mmap.ALLOCATIONGRANULARITY
        mm = mmap.mmap(fd, skip + nbytes, flags=_MAP_FLAGS, prot=mmap.PROT_READ, offset=begin - skip)
    finally:
        os.close(fd)
    return np.frombuffer(mm, dtype=dt, count=math.prod(shape), offset=skip).reshape(shape)


def to_f32(raw: np.ndarray, dtype: str, *, name: str = "?") -> np.ndarray:
    """Raw array of a safetensors dtype -> float32 (a new array)."""
    if dtype == "BF16":
        return bf16_bits_to_f32(raw)
    if dtype in ("F32", "F16", "F64"):
        return raw.astype(np.float32)
    raise InputError(f"tensor {name!r} has dtype {dtype}, which is not a 16/32-bit float; it cannot be merged as is")


@dataclass
class Checkpoint:
    """The safetensors files of one model folder, as a single name -> TensorInfo map.

    Either `model.safetensors.index.json` with its shards, or a single `model.safetensors`
    (or another single *.safetensors file name given explicitly).
    """

    folder: Path
    tensors: dict[str, TensorInfo]
    files: list[Path]
    metadata: dict[str, dict[str, str]] = field(default_factory=dict)
    header_bytes_read: int = 0

    @classmethod
    def open(cls, folder: Path | str, *, single_name: str = SINGLE_NAME, index_name: str = INDEX_NAME) -> "Checkpoint":
        folder = Path(folder)
        if not folder.is_dir():
            raise InputError(f"{folder}: not a folder")
        index_path = folder / index_name
        single_path = folder / single_name
        if index_path.exists():
            files = _index_files(index_path, folder)
        elif single_path.exists():
            files = {single_path: None}
        else:
            pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
            hint = ""
            if pickles:
                hint = (
                    f" It holds {', '.join(pickles)}: pickle files, which lora2gguf never unpickles (they can run "
                    "code). Convert them to safetensors with a tool you trust, for example: python -c \"import torch; "
                    "from safetensors.torch import save_file; save_file(torch.load('FILE.bin', weights_only=True), "
                    "'FILE.safetensors')\""
                )
            raise InputError(f"{folder}: no {index_name} and no {single_name}.{hint}")
        tensors: dict[str, TensorInfo] = {}
        metadata: dict[str, dict[str, str]] = {}
        read = 0
        for path, expected in files.items():
            t, meta, n = parse_header(path)
            read += n
            metadata[path.name] = meta
            if expected is not None:
                missing = sorted(expected - t.keys())
                if missing:
                    raise FormatError(
                        f"{index_path}: lists {len(missing)} tensor(s) in {path.name} that the file does not hold "
                        f"(first: {missing[0]!r}). The shard or the index is from another download: fetch both again."
                    )
            for name, info in t.items():
                if name in tensors:
                    raise FormatError(f"{folder}: tensor {name!r} is stored twice ({tensors[name].path.name} and {path.name})")
                tensors[name] = info
        return cls(folder, tensors, list(files), metadata, read)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise InputError(f"{self.folder}: tensor {name!r} not found in the checkpoint") from None

    def raw(self, name: str, rows: slice | None = None) -> np.ndarray:
        return read_raw(self.info(name), rows=rows)

    def f32(self, name: str, rows: slice | None = None) -> np.ndarray:
        info = self.info(name)
        return to_f32(read_raw(info, rows=rows), info.dtype, name=name)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def _index_files(index_path: Path, folder: Path) -> dict[Path, set[str]]:
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise FormatError(f"{index_path}: not valid JSON ({e}); download it again") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise FormatError(f"{index_path}: has no 'weight_map' object mapping tensor names to shard files")
    root = folder.resolve()
    # a Hugging Face cache snapshot (<repo>/snapshots/<commit>/) links its files to <repo>/blobs/
    blobs = root.parent.parent / "blobs" if root.parent.name == "snapshots" else None
    files: dict[Path, set[str]] = {}
    for name, fname in weight_map.items():
        if not isinstance(fname, str) or not fname:
            raise FormatError(f"{index_path}: tensor {name!r} maps to {fname!r}, not a file name")
        if os.path.isabs(fname) or ".." in Path(fname).parts:
            raise FormatError(
                f"{index_path}: tensor {name!r} points to {fname!r}, outside the model folder. "
                "Refusing to read it: a shard must be a file inside the folder."
            )
        path = folder / fname
        target = path.resolve()
        if target.parent != root and root not in target.parents and (blobs is None or target.parent != blobs):
            raise FormatError(f"{index_path}: shard {fname!r} resolves outside the model folder (a link?); refusing it")
        if not path.is_file():
            raise InputError(f"{index_path}: shard {fname!r} (for tensor {name!r}) is missing; download it")
        files.setdefault(path, set()).add(name)
    return files


# --------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # safetensors dtype code
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype][1]


class StreamingWriter:
    """Writes one safetensors file whose tensors are all declared up front, then filled in any
    order, slab by slab, with positioned writes. Memory: one slab."""

    def __init__(self, path: Path, specs: Iterable[TensorSpec], metadata: Mapping[str, str] | None = None):
        self.path = Path(path)
        self.specs = {s.name: s for s in specs}
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = dict(metadata)
        offset = 0
        self.offsets: dict[str, int] = {}
        for s in self.specs.values():
            header[s.name] = {"dtype": s.dtype, "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
            self.offsets[s.name] = offset
            offset += s.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data section starts 8-aligned
        self.data_start = 8 + len(raw)
        self.size = self.data_start + offset
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            os.pwrite(self._fd, struct.pack("<Q", len(raw)) + raw, 0)
        except OSError as e:
            raise OutputError(f"{self.path}: cannot write ({e.strerror})") from None

    def write(self, name: str, array: np.ndarray, *, byte_offset: int = 0) -> None:
        data = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        pos = self.data_start + self.offsets[name] + byte_offset
        if byte_offset + data.nbytes > self.specs[name].nbytes:
            raise ValueError(f"write past the end of tensor {name}")
        _pwrite_all(self._fd, data, pos, self.path)

    def close(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, self.size)
            os.close(self._fd)
            self._fd = None


def _pwrite_all(fd: int, data: np.ndarray, pos: int, path: Path) -> None:
    mv = memoryview(data)
    try:
        while mv:
            n = os.pwrite(fd, mv, pos)
            mv = mv[n:]
            pos += n
    except OSError as e:
        raise OutputError(f"{path}: write failed at byte {pos}: {e.strerror}") from None
