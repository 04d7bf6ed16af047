"""gguf_kv.FastKVWriter packs metadata exactly as gguf-py does (same bytes, same errors)."""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lora2gguf import vocab
from lora2gguf.gguf_kv import FastKVWriter

T = gguf.GGUFValueType
O200K_VOCAB = 201088


def _writer(cls, bulk_min_items: int | None = None, endianess=gguf.GGUFEndian.LITTLE):
    w = cls(None, "gpt-oss", endianess=endianess)
    if bulk_min_items is not None:
        w.bulk_min_items = bulk_min_items
    return w


def _outcome(writer, *args):
    """What `_pack_val(*args)` gives: the bytes, or the exception's type and message."""
    try:
        return writer._pack_val(*args)
    except Exception as e:  # noqa: BLE001 - the point is to compare whatever is raised
        return type(e), str(e)


def _assert_same(val, sub_type, add_vtype=True, bulk_min_items=1, endianess=gguf.GGUFEndian.LITTLE):
    ref = _outcome(_writer(gguf.GGUFWriter, endianess=endianess), val, T.ARRAY, add_vtype, sub_type)
    got = _outcome(_writer(FastKVWriter, bulk_min_items, endianess), val, T.ARRAY, add_vtype, sub_type)
    assert got == ref


class LoudStr(str):
    """A str whose encode() differs from str's: gguf-py calls it, so must we."""

    def encode(self, *args, **kwargs):
        return super().encode(*args, **kwargs).upper()


# items of one kind each; some values gguf-py refuses (out of range, too large for float32, lone surrogates)
KINDS = {
    "str": st.text() | st.sampled_from(["", " ", "a b", "Ġ", "日本語", "\U0001f600", "\ud800", "x\udfffy"]),
    "int": st.integers(-2**31, 2**31 - 1) | st.integers(0, 255) | st.integers(-2**63, 2**64 - 1) | st.integers(),
    "float": st.floats() | st.floats(width=32) | st.sampled_from([3.5e38, 3.4028235e38, 3.4028235677973366e38, -0.0]),
    "bool": st.booleans(),
    "bytes": st.binary(max_size=8),
    "token_type": st.sampled_from(list(gguf.TokenType)),
}
SUB_TYPES = st.none() | st.sampled_from(list(T))


def _arrays(items):
    return st.lists(items, min_size=0, max_size=40).flatmap(lambda v: st.sampled_from([v, tuple(v)]))


@pytest.mark.parametrize("kind", sorted(KINDS))
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_bulk_pack_same_as_gguf_py_for_one_item_kind(kind, data):
    val = data.draw(_arrays(KINDS[kind]), label="val")
    sub_type = data.draw(SUB_TYPES, label="sub_type")
    _assert_same(val, sub_type, add_vtype=data.draw(st.booleans(), label="add_vtype"))


OTHER_ITEMS = (
    st.builds(np.int32, st.integers(-2**31, 2**31 - 1)) | st.builds(np.float64, st.floats())
    | st.builds(np.float32, st.floats(width=32)) | st.builds(np.bool_, st.booleans())
    | st.builds(LoudStr, st.text(max_size=4)) | st.builds(bytearray, st.binary(max_size=4))
    | st.lists(st.integers(-5, 5), max_size=3) | st.none()
)


@settings(max_examples=400, deadline=None)
@given(val=_arrays(st.one_of(*KINDS.values(), OTHER_ITEMS)), sub_type=SUB_TYPES, add_vtype=st.booleans())
def test_bulk_pack_same_as_gguf_py_for_mixed_and_odd_items(val, sub_type, add_vtype):
    _assert_same(val, sub_type, add_vtype)


@settings(max_examples=100, deadline=None)
@given(val=_arrays(st.one_of(*KINDS.values())), sub_type=SUB_TYPES)
def test_big_endian_writer_same_as_gguf_py(val, sub_type):
    _assert_same(val, sub_type, endianess=gguf.GGUFEndian.BIG)


@pytest.mark.parametrize("sub_type", [None, *T])
def test_large_arrays_same_as_gguf_py(sub_type):
    """Arrays long enough for the default bulk threshold, every item type, each with every sub_type."""
    rng = np.random.default_rng(0)
    n = 3000
    arrays = [
        ["".join(map(chr, rng.integers(32, 0x2FFF, size=rng.integers(0, 6)))) for _ in range(n)],
        [str(i) for i in range(n)],
        rng.integers(-2**31, 2**31, size=n).tolist(),
        rng.integers(0, 256, size=n).tolist(),
        rng.integers(-2**63, 2**63, size=n).tolist(),
        rng.integers(0, 2**64, size=n, dtype=np.uint64).tolist(),
        rng.standard_normal(n).tolist(),
        (rng.standard_normal(n) * 1e300).tolist(),
        (rng.integers(0, 2, size=n) == 1).tolist(),
        [gguf.TokenType.NORMAL, gguf.TokenType.CONTROL] * (n // 2),
    ]
    for val in arrays:
        assert len(val) >= FastKVWriter.bulk_min_items
        _assert_same(val, sub_type, bulk_min_items=None)
        _assert_same(tuple(val), sub_type, bulk_min_items=None)


@pytest.mark.parametrize("val, sub_type, error", [
    ([], None, ValueError),  # empty array
    ([True, 1], None, ValueError),  # bool is not int to gguf-py: mixed types
    ([1, 2**31], None, struct.error),  # out of INT32: no silent wrap
    ([-1, 0], T.UINT32, struct.error),
    ([0, 2**64], T.UINT64, struct.error),
    ([1.0, 1e39], None, OverflowError),  # too large for float32
    (["ok", "\ud800"], None, UnicodeEncodeError),
    ([np.int32(1), np.int32(2)], None, ValueError),  # numpy scalars: gguf-py knows no type for them
])
def test_refusals_are_gguf_py_s(val, sub_type, error):
    with pytest.raises(error):
        _writer(gguf.GGUFWriter)._pack_val(val, T.ARRAY, True, sub_type)
    _assert_same(val, sub_type)


def _kv_bytes(path: Path, writer_cls, fill) -> bytes:
    """The header and KV section `fill(writer)` gives (no tensors), as written to `path`."""
    w = writer_cls(path, "gpt-oss")
    fill(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    return path.read_bytes()


def test_fast_writer_writes_the_o200k_vocabulary_kv_byte_for_byte(o200k_tokenizer_dir, tmp_path):
    fill = lambda w: vocab.write_vocab(w, o200k_tokenizer_dir, O200K_VOCAB)  # noqa: E731
    fast = _kv_bytes(tmp_path / "fast.gguf", FastKVWriter, fill)
    ref = _kv_bytes(tmp_path / "ref.gguf", gguf.GGUFWriter, fill)
    assert len(ref) > 10_000_000 and fast == ref
