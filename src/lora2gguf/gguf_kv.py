"""gguf-py's GGUFWriter with a bulk packer for large metadata arrays.

gguf-py packs a metadata array one item at a time through ``GGUFWriter._pack_val`` (several Python
calls and a ``struct.pack`` per item). A 200k-token vocabulary has about 850,000 items (200k token
strings, 200k token types, 446k merges), which costs seconds before the first tensor is written.
:class:`FastKVWriter` packs large homogeneous lists and tuples of str, int, float or bool in bulk
(numpy; strings as one encoded text) and leaves everything else to gguf-py: the bytes are the
same as gguf-py's for every input, and so are the errors (an input the bulk path is not sure of
goes to gguf-py).
"""

from __future__ import annotations

from typing import Any

import gguf
import numpy as np

_T = gguf.GGUFValueType

# GGUF integer array item type -> little-endian numpy dtype (the same widths as gguf-py's struct formats)
_INT_DTYPES: dict[int, np.dtype] = {
    _T.UINT8: np.dtype("<u1"), _T.INT8: np.dtype("<i1"), _T.UINT16: np.dtype("<u2"), _T.INT16: np.dtype("<i2"),
    _T.UINT32: np.dtype("<u4"), _T.INT32: np.dtype("<i4"), _T.UINT64: np.dtype("<u8"), _T.INT64: np.dtype("<i8"),
}
_FLOAT_DTYPES: dict[int, np.dtype] = {_T.FLOAT32: np.dtype("<f4"), _T.FLOAT64: np.dtype("<f8")}


def _item_type(cls: type) -> _T | None:
    """gguf-py's ``GGUFValueType.get_type`` for an item of class `cls` (same order of checks: bool
    before int), or None where gguf-py would raise."""
    if issubclass(cls, (str, bytes, bytearray)):
        return _T.STRING
    if issubclass(cls, list):
        return _T.ARRAY
    if issubclass(cls, float):
        return _T.FLOAT32
    if issubclass(cls, bool):
        return _T.BOOL
    if issubclass(cls, int):
        return _T.INT32
    return None


def _pack_strings(val: list | tuple, classes: set[type]) -> bytes | None:
    if not classes <= {str, bytes}:
        return None  # str subclasses may encode differently, bytearray and others: gguf-py
    if classes == {str}:
        return _pack_texts(val)
    try:
        encoded = [v.encode("utf-8") if type(v) is str else v for v in val]
    except UnicodeEncodeError:
        return None  # lone surrogates: gguf-py raises
    return interleave_lengths(encoded)


def _pack_texts(val: list | tuple) -> bytes | None:
    """Strings as GGUF strings (each preceded by its UTF-8 length), encoded as one text: the
    length of each item in bytes is the sum, over its characters, of their UTF-8 widths (read
    from the code points), so that 646k tokens and merges are not encoded one by one."""
    joined = "".join(val)
    try:
        blob = joined.encode("utf-8")
    except UnicodeEncodeError:
        return None  # lone surrogates: gguf-py raises
    chars = np.fromiter(map(len, val), dtype=np.int64, count=len(val))
    if len(blob) == len(joined):  # all ASCII: one byte per character
        lens = chars
    else:
        cp = np.frombuffer(joined.encode("utf-32-le"), dtype="<u4")
        width = 1 + (cp >= 0x80).astype(np.uint8) + (cp >= 0x800) + (cp >= 0x10000)
        before = np.empty(cp.size + 1, dtype=np.int64)  # bytes before each character (and the end)
        before[0] = 0
        np.cumsum(width, out=before[1:])
        lens = np.diff(before[np.cumsum(chars)], prepend=0)
    return _interleave(lens, np.frombuffer(blob, dtype=np.uint8))


def interleave_lengths(items: list[bytes]) -> bytes:
    """``items`` each preceded by its length as a little-endian uint64, the GGUF string layout:
    the bytes of ``b"".join(pack_u64(len(b)) + b for b in items)``, placed with numpy instead
    of joining 2n small objects."""
    lens = np.fromiter(map(len, items), dtype=np.int64, count=len(items))
    return _interleave(lens, np.frombuffer(b"".join(items), dtype=np.uint8))


def _interleave(lens: np.ndarray, blob: np.ndarray) -> bytes:
    """``blob`` cut into pieces of ``lens`` bytes, each preceded by its length (uint64 LE)."""
    n = lens.size
    out = np.empty(8 * n + blob.size, dtype=np.uint8)
    starts = np.cumsum(lens + 8) - (lens + 8)  # where each item's length field begins
    length_bytes = (starts[:, None] + np.arange(8)).reshape(-1)
    out[length_bytes] = lens.astype("<u8").view(np.uint8)
    text = np.ones(out.size, dtype=bool)
    text[length_bytes] = False
    out[text] = blob  # the items' bytes, in order, everywhere else
    return out.tobytes()


def _pack_ints(val: list | tuple, classes: set[type], dtype: np.dtype) -> bytes | None:
    if not all(issubclass(c, int) for c in classes):
        return None  # floats and others: gguf-py's struct.pack raises or converts; let it
    ints = list(map(int.__index__, val))  # the int value itself, as struct.pack reads it (bool -> 0/1)
    info = np.iinfo(dtype)
    if min(ints) < info.min or max(ints) > info.max:
        return None  # gguf-py raises struct.error; numpy could wrap
    return np.array(ints, dtype=dtype).tobytes()


def _pack_floats(val: list | tuple, classes: set[type], dtype: np.dtype) -> bytes | None:
    if classes != {float}:
        return None  # ints (rounding through float64 first), float subclasses and others: gguf-py
    f64 = np.fromiter(val, dtype=np.float64, count=len(val))
    if dtype == np.float64:
        return f64.tobytes()
    with np.errstate(over="ignore"):
        f32 = f64.astype(dtype)
    if np.any(np.isinf(f32) & ~np.isinf(f64)):
        return None  # too large for float32: gguf-py raises OverflowError
    return f32.tobytes()


def _pack_bools(val: list | tuple, classes: set[type]) -> bytes | None:
    if not classes <= {bool, int, float}:
        return None
    return bytes(map(bool, val))  # struct's '?' packs the truth value, as bool() does


class FastKVWriter(gguf.GGUFWriter):
    """A ``gguf.GGUFWriter`` that packs large homogeneous metadata arrays in bulk; same bytes."""

    #: arrays shorter than this go through gguf-py's own packer (nothing to gain)
    bulk_min_items: int = 64

    def _pack_val(self, val: Any, vtype: gguf.GGUFValueType, add_vtype: bool,
                  sub_type: gguf.GGUFValueType | None = None) -> bytes:
        if (vtype == _T.ARRAY and type(val) in (list, tuple) and len(val) >= max(self.bulk_min_items, 1)
                and self.endianess == gguf.GGUFEndian.LITTLE):
            packed = self._pack_array(val, sub_type)
            if packed is not None:
                return (self._pack("I", vtype) if add_vtype else b"") + packed
        return super()._pack_val(val, vtype, add_vtype, sub_type)

    def _pack_array(self, val: list | tuple, sub_type: gguf.GGUFValueType | None) -> bytes | None:
        """The array's item type, count and items as gguf-py packs them, or None to leave it to gguf-py."""
        classes = set(map(type, val))
        if sub_type is not None:
            ltype = sub_type
        else:
            kinds = {_item_type(c) for c in classes}
            if len(kinds) != 1 or None in kinds:
                return None  # mixed or unknown item types: gguf-py raises ValueError
            (ltype,) = kinds
        if ltype == _T.STRING:
            items = _pack_strings(val, classes)
        elif ltype in _INT_DTYPES:
            items = _pack_ints(val, classes, _INT_DTYPES[ltype])
        elif ltype in _FLOAT_DTYPES:
            items = _pack_floats(val, classes, _FLOAT_DTYPES[ltype])
        elif ltype == _T.BOOL:
            items = _pack_bools(val, classes)
        else:
            return None  # nested arrays, invalid sub_type: gguf-py
        if items is None:
            return None
        return self._pack("I", ltype) + self._pack("Q", len(val)) + items
