"""The metadata of a GGUF file as raw bytes per key, read fast (test helper).

gguf-py's GGUFReader takes seconds to tens of seconds on a 128k-token vocabulary; comparing two
files key by key only needs each key's value type and bytes, which this walks in a fraction of a
second. ``decode`` turns one value into Python for a readable assertion message.
"""

from __future__ import annotations

import struct
from pathlib import Path

import gguf

_T = gguf.GGUFValueType
_SIZE = {_T.UINT8: 1, _T.INT8: 1, _T.UINT16: 2, _T.INT16: 2, _T.UINT32: 4, _T.INT32: 4, _T.FLOAT32: 4,
         _T.BOOL: 1, _T.UINT64: 8, _T.INT64: 8, _T.FLOAT64: 8}
_FMT = {_T.UINT8: "B", _T.INT8: "b", _T.UINT16: "H", _T.INT16: "h", _T.UINT32: "I", _T.INT32: "i",
        _T.FLOAT32: "f", _T.BOOL: "?", _T.UINT64: "Q", _T.INT64: "q", _T.FLOAT64: "d"}


def _skip(buf: bytes, pos: int, vtype: int) -> int:
    if vtype == _T.STRING:
        return pos + 8 + struct.unpack_from("<Q", buf, pos)[0]
    if vtype == _T.ARRAY:
        itype, count = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        if itype in _SIZE:
            return pos + _SIZE[itype] * count
        for _ in range(count):
            pos = _skip(buf, pos, itype)
        return pos
    return pos + _SIZE[vtype]


def kv_spans(path: str | Path) -> dict[str, tuple[int, bytes]]:
    """key -> (value type, raw value bytes) for every metadata key of the GGUF file at ``path``."""
    buf = Path(path).read_bytes()
    magic, version, n_tensors, n_kv = struct.unpack_from("<IIQQ", buf, 0)
    assert magic == gguf.GGUF_MAGIC and version == 3, path
    pos, out = 24, {}
    for _ in range(n_kv):
        n = struct.unpack_from("<Q", buf, pos)[0]
        key = buf[pos + 8:pos + 8 + n].decode("utf-8")
        pos += 8 + n
        vtype = struct.unpack_from("<I", buf, pos)[0]
        pos += 4
        end = _skip(buf, pos, vtype)
        assert key not in out, f"{path}: key {key} twice"
        out[key] = (vtype, buf[pos:end])
        pos = end
    return out


def decode(vtype: int, raw: bytes):
    """A value's bytes as Python (str, number, bool or list)."""
    def one(t: int, pos: int):
        if t == _T.STRING:
            n = struct.unpack_from("<Q", raw, pos)[0]
            return raw[pos + 8:pos + 8 + n].decode("utf-8"), pos + 8 + n
        if t == _T.ARRAY:
            it, count = struct.unpack_from("<IQ", raw, pos)
            pos += 12
            items = []
            for _ in range(count):
                v, pos = one(it, pos)
                items.append(v)
            return items, pos
        return struct.unpack_from("<" + _FMT[t], raw, pos)[0], pos + _SIZE[t]
    return one(vtype, 0)[0]


def first_difference(a: tuple[int, bytes], b: tuple[int, bytes]) -> str:
    """Where two values differ, for an assertion message."""
    if a[0] != b[0]:
        return f"value types {_T(a[0]).name} vs {_T(b[0]).name}"
    va, vb = decode(*a), decode(*b)
    if isinstance(va, list) and isinstance(vb, list):
        if len(va) != len(vb):
            return f"{len(va)} vs {len(vb)} items"
        i = next(i for i, (x, y) in enumerate(zip(va, vb)) if x != y)
        return f"item {i}: {va[i]!r} vs {vb[i]!r}"
    return f"{va!r} vs {vb!r}"


def writer_kv_spans(writer, path: str | Path) -> dict[str, tuple[int, bytes]]:
    """kv_spans of what a gguf-py GGUFWriter holds (written to ``path``: header and metadata only)."""
    writer.write_header_to_file(path=Path(path))
    writer.write_kv_data_to_file()
    writer.close()
    return kv_spans(path)
