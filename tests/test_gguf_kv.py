"""gguf_kv.FastKVWriter packs metadata exactly as gguf-py does (same bytes, same errors), and
vocab.write_vocab's own merges (tokenizer.json parsed once) give the same GGUF KV section as
gguf-py's SpecialVocab(load_merges=True)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lora2gguf import vocab
from lora2gguf.errors import FormatError
from lora2gguf.gguf_kv import FastKVWriter, interleave_lengths

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


# --- merges from the tokenizer.json write_vocab already parsed, against gguf-py's SpecialVocab ---

def _write_vocab_vanilla(writer, folder: Path, vocab_size: int) -> None:
    """write_vocab as it was before it made the merges itself: all of them through
    gguf.SpecialVocab(load_merges=True)."""
    v = vocab.read_vocab(folder, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(v.pre)
    writer.add_token_list(v.tokens)
    writer.add_token_types(v.types)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
    if vocab._bytelevel_post_processor(vocab.load_tokenizer_json(folder)):
        special.add_special_token.setdefault("bos", False)
        special.add_special_token.setdefault("eos", False)
    special.add_to_gguf(writer, quiet=True)


TINY_MERGES = [["a", "b"], ["a b", "c"], [" ", "x"], ["x", "y  z"], ["Ġ", "Ġ"], ["ab", "c"]]


def _tiny_tokenizer(folder: Path, merges, *, merges_txt: str | None = None) -> tuple[Path, int]:
    """A small byte-level BPE tokenizer folder (tokenizer.json, tokenizer_config.json) whose merges
    are `merges` (None: no merges key); returns it and a vocab_size with a few unused ids."""
    tokens = ["a", "b", "c", " ", "x", "y", "z", "Ġ", "ab", "a b", "a bc", " x", "y  z", "xy  z", "ĠĠ", "abc"]
    data = {
        "version": "1.0",
        "added_tokens": [{"id": len(tokens), "content": "<|endoftext|>", "special": True},
                         {"id": len(tokens) + 1, "content": "<|user|>", "special": False}],
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": next(iter(vocab.PRE_TOKENIZERS))}, "behavior": "Isolated"},
            {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]},
        "post_processor": {"type": "ByteLevel", "trim_offsets": False},
        "model": {"type": "BPE", "vocab": {t: i for i, t in enumerate(tokens)}},
    }
    if merges is not None:
        data["model"]["merges"] = merges
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "chat_template": "{{ messages }}"}))
    if merges_txt is not None:
        (folder / "merges.txt").write_text(merges_txt, encoding="utf-8")
    return folder, len(tokens) + 2 + 3


TINY_CASES = {
    "list-form with spaces in parts": dict(merges=TINY_MERGES),
    "string-form": dict(merges=["a b", "ab c", "Ġ Ġ", "x y"]),
    "no merges, merges.txt": dict(merges=None, merges_txt="#version: 0.2\na b\nab c\n"),
}


@pytest.mark.parametrize("case", sorted(TINY_CASES))
def test_merges_same_as_gguf_py_on_a_tiny_tokenizer(case, tmp_path):
    folder, n = _tiny_tokenizer(tmp_path / "tok", **TINY_CASES[case])
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=n)
    assert special.merges  # the case means something
    mine = vocab.merges_of(vocab.load_tokenizer_json(folder), folder / "tokenizer.json")
    assert mine == (special.merges if TINY_CASES[case]["merges"] is not None else [])
    if case.startswith("list-form"):
        assert "a\u0120b c" in mine and "x y\u0120\u0120z" in mine  # the space inside a part, as gguf-py writes it
    _, got = vocab.write_vocab(gguf.GGUFWriter(None, "gpt-oss"), folder, n)
    assert got.merges == special.merges


@pytest.mark.parametrize("case", sorted(TINY_CASES))
def test_vocab_kv_unchanged_on_a_tiny_tokenizer(case, tmp_path):
    folder, n = _tiny_tokenizer(tmp_path / "tok", **TINY_CASES[case])
    new = _kv_bytes(tmp_path / "new.gguf", gguf.GGUFWriter, lambda w: vocab.write_vocab(w, folder, n))
    old = _kv_bytes(tmp_path / "old.gguf", gguf.GGUFWriter, lambda w: _write_vocab_vanilla(w, folder, n))
    assert new == old
    assert _kv_bytes(tmp_path / "fast.gguf", FastKVWriter, lambda w: vocab.write_vocab(w, folder, n)) == old


def test_merges_same_as_gguf_py_on_o200k(o200k_tokenizer_dir):
    special = gguf.SpecialVocab(o200k_tokenizer_dir, load_merges=True, n_vocab=O200K_VOCAB)
    data = vocab.load_tokenizer_json(o200k_tokenizer_dir)
    assert isinstance(data["model"]["merges"][0], list)  # the list form, converted
    mine = vocab.merges_of(data, o200k_tokenizer_dir / "tokenizer.json")
    assert len(mine) == len(special.merges) == 446189
    assert mine == special.merges


def test_vocab_kv_unchanged_on_o200k(o200k_tokenizer_dir, tmp_path):
    new = _kv_bytes(tmp_path / "new.gguf", FastKVWriter,
                    lambda w: vocab.write_vocab(w, o200k_tokenizer_dir, O200K_VOCAB))
    old = _kv_bytes(tmp_path / "old.gguf", gguf.GGUFWriter,
                    lambda w: _write_vocab_vanilla(w, o200k_tokenizer_dir, O200K_VOCAB))
    assert new == old


@pytest.mark.parametrize("merges", [
    ["a b", ["a", "b"]],
    [["a", "b"], ["a", "b", "c"]],
    [["a", "b"], ["a"]],
    [["a", 1]],
    [{"a": 1, "b": 2}],
    [["a", "b"], "ab"],
])
def test_malformed_merges_are_a_format_error(merges, tmp_path):
    folder, n = _tiny_tokenizer(tmp_path / "tok", merges)
    with pytest.raises(FormatError, match="merges"):
        vocab.write_vocab(gguf.GGUFWriter(None, "gpt-oss"), folder, n)


def test_interleave_lengths_is_the_gguf_string_layout():
    """Each item preceded by its uint64 length, for lengths of 0, 1, multi-byte text and over
    255 and 65535 bytes (length fields with several non-zero bytes)."""
    rng = np.random.default_rng(7)
    items = [b"", b"a", "é😀".encode(), bytes(300), rng.bytes(70_000), b"", b"x y"]
    items += [rng.bytes(int(n)) for n in rng.integers(0, 40, 500)]
    expected = b"".join(struct.pack("<Q", len(b)) + b for b in items)
    assert interleave_lengths(items) == expected
    assert interleave_lengths([]) == b""


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=6), min_size=64, max_size=200))
def test_texts_packed_in_one_encode_are_each_encoded(val):
    """The whole-text packing (UTF-8 widths read from the code points) gives what encoding each
    string does, for any mix of 1- to 4-byte characters and empty strings."""
    expected = b"".join(struct.pack("<Q", len(b)) + b for b in (v.encode() for v in val))
    w = FastKVWriter(None, "llama")
    assert w._pack_val(val, gguf.GGUFValueType.ARRAY, False)[12:] == expected
