"""A fast, strict reader of a GGUF file's header: its metadata keys (values skipped) and tensor infos.

gguf-py's ``GGUFReader`` builds a numpy view for every part of every metadata field; for a
200k-token vocabulary (and 446k merges) that takes 10-30 s per file, longer than
streaming a real-width layer. Checking that a written file reads back and listing its tensor
types needs only the header, which this walks in well under a second. Type ids and sizes come
from gguf-py's constants.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import gguf

from .errors import FormatError

_SCALAR = {
    gguf.GGUFValueType.UINT8: "<B", gguf.GGUFValueType.INT8: "<b", gguf.GGUFValueType.UINT16: "<H",
    gguf.GGUFValueType.INT16: "<h", gguf.GGUFValueType.UINT32: "<I", gguf.GGUFValueType.INT32: "<i",
    gguf.GGUFValueType.FLOAT32: "<f", gguf.GGUFValueType.BOOL: "<?", gguf.GGUFValueType.UINT64: "<Q",
    gguf.GGUFValueType.INT64: "<q", gguf.GGUFValueType.FLOAT64: "<d",
}
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    qtype: gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # ggml order (ne0 first), as gguf-py's reader gives it
    offset: int  # from the start of the data section
    nbytes: int


@dataclass(frozen=True)
class Header:
    version: int
    keys: tuple[str, ...]
    alignment: int
    data_start: int
    tensors: dict[str, TensorInfo]
    #: the value of every scalar and string key (arrays are skipped: the vocabulary stays unread)
    values: dict[str, object] = field(default_factory=dict)


class _Cursor:
    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path, self.size = buf, 0, path, len(buf)

    def need(self, n: int) -> None:
        if self.pos + n > self.size:
            raise FormatError(f"{self.path}: GGUF header ends past the end of the file (truncated?)")

    def u32(self) -> int:
        self.need(4)
        v = _U32.unpack_from(self.buf, self.pos)[0]
        self.pos += 4
        return v

    def u64(self) -> int:
        self.need(8)
        v = _U64.unpack_from(self.buf, self.pos)[0]
        self.pos += 8
        return v

    def string(self) -> str:
        n = self.u64()
        self.need(n)
        s = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return s.decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError(f"{self.path}: a GGUF string at byte {self.pos - n} is not UTF-8") from None

    def skip_strings(self, count: int) -> None:
        buf, pos, unpack = self.buf, self.pos, _U64.unpack_from
        size = self.size
        for _ in range(count):
            if pos + 8 > size:
                pos = size + 1
                break
            pos += 8 + unpack(buf, pos)[0]
        self.pos = pos
        self.need(0)

    def value(self, vtype: int) -> object:
        """Read a scalar (returned) or skip a string/array (returns None, except for strings)."""
        try:
            t = gguf.GGUFValueType(vtype)
        except ValueError:
            raise FormatError(f"{self.path}: unknown GGUF value type {vtype} at byte {self.pos}") from None
        if t == gguf.GGUFValueType.STRING:
            return self.string()
        if t == gguf.GGUFValueType.ARRAY:
            itype, count = self.u32(), self.u64()
            try:
                it = gguf.GGUFValueType(itype)
            except ValueError:
                raise FormatError(f"{self.path}: unknown GGUF array item type {itype}") from None
            if it == gguf.GGUFValueType.STRING:
                self.skip_strings(count)
            elif it == gguf.GGUFValueType.ARRAY:
                for _ in range(count):
                    self.value(itype)
            else:
                n = struct.calcsize(_SCALAR[it]) * count
                self.need(n)
                self.pos += n
            return None
        fmt = _SCALAR[t]
        self.need(struct.calcsize(fmt))
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return v


def read_header(path: str | os.PathLike[str], *, file_size: int | None = None) -> Header:
    """Parse and check a GGUF header: magic, version, every key (scalar and string values kept, arrays
    skipped), every tensor info;
    tensor data must lie, aligned and in order of its offsets without overlap, inside the file
    (``file_size``: the size a file still being written will have; default its size now)."""
    path = Path(path)
    now = path.stat().st_size
    size = now if file_size is None else file_size
    if now < 24:
        raise FormatError(f"{path}: {now} bytes is too short for a GGUF file")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        c = _Cursor(memoryview(mm), path)
        try:
            if bytes(c.buf[:4]) != struct.pack("<I", gguf.GGUF_MAGIC):
                raise FormatError(f"{path}: not a GGUF file (magic {bytes(c.buf[:4])!r})")
            c.pos = 4
            version = c.u32()
            if version not in (2, 3):
                raise FormatError(f"{path}: GGUF version {version} is not supported")
            n_tensors, n_kv = c.u64(), c.u64()
            keys = []
            values: dict[str, object] = {}
            alignment = gguf.GGUF_DEFAULT_ALIGNMENT
            for _ in range(n_kv):
                key = c.string()
                v = c.value(c.u32())
                if key == gguf.Keys.General.ALIGNMENT:
                    if not isinstance(v, int) or v <= 0 or v & (v - 1):
                        raise FormatError(f"{path}: {key} = {v!r} is not a power of two")
                    alignment = v
                keys.append(key)
                if v is not None:
                    values[key] = v
            infos = []
            for _ in range(n_tensors):
                name = c.string()
                n_dims = c.u32()
                if n_dims > 8:
                    raise FormatError(f"{path}: tensor {name!r} has {n_dims} dimensions")
                shape = tuple(c.u64() for _ in range(n_dims))
                raw_type, offset = c.u32(), c.u64()
                try:
                    qtype = gguf.GGMLQuantizationType(raw_type)
                    block, tsize = gguf.GGML_QUANT_SIZES[qtype]
                except (ValueError, KeyError):
                    raise FormatError(f"{path}: tensor {name!r} has unknown ggml type {raw_type}") from None
                n = 1
                for d in shape:
                    n *= d
                if shape and shape[0] % block:
                    raise FormatError(f"{path}: tensor {name!r} rows of {shape[0]} are not whole {qtype.name} blocks")
                infos.append(TensorInfo(name, qtype, shape, offset, n // block * tsize))
            data_start = -(-c.pos // alignment) * alignment
        finally:
            c.buf.release()
    tensors: dict[str, TensorInfo] = {}
    end = 0
    for t in sorted(infos, key=lambda t: t.offset):
        if t.name in tensors:
            raise FormatError(f"{path}: tensor {t.name!r} is listed twice")
        if t.offset % alignment or t.offset < end:
            raise FormatError(f"{path}: tensor {t.name!r} at data offset {t.offset} is misaligned or overlaps")
        end = t.offset + t.nbytes
        tensors[t.name] = t
    if data_start + end > size:
        raise FormatError(f"{path}: tensor data ends at byte {data_start + end}, past the file's {size} bytes")
    return Header(version, tuple(keys), alignment, data_start, {t.name: t for t in infos}, values)


def tensor_types(path: str | os.PathLike[str]) -> dict[str, str]:
    """GGUF tensor name -> ggml type name, in file order."""
    return {n: t.qtype.name for n, t in read_header(path).tensors.items()}
