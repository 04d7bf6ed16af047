"""The fast GGUF header reader against gguf-py's GGUFReader, on a real build output."""

from __future__ import annotations

import shutil

import gguf
import pytest

from lora2gguf import synth
from lora2gguf.api import build
from lora2gguf.errors import FormatError
from lora2gguf.gguf_header import read_header, tensor_types


@pytest.fixture(scope="module")
def small_gguf(tiny_base, tmp_path_factory):
    ad = synth.make_adapter_numpy(tiny_base, tmp_path_factory.mktemp("ad"), target_parameters=())
    return build(tiny_base, ad, tmp_path_factory.mktemp("out"), name="t", quants=["Q8_0"]).out_dir


def test_header_equals_gguf_py_reader(small_gguf):
    for path in sorted(small_gguf.glob("*.gguf")):
        h = read_header(path)
        r = gguf.GGUFReader(path)
        assert list(h.keys) == [k for k in r.fields if not k.startswith("GGUF.")]
        assert len(h.tensors) == len(r.tensors) > 0
        for t in r.tensors:
            mine = h.tensors[t.name]
            assert mine.qtype == t.tensor_type and mine.shape == tuple(int(d) for d in t.shape)
            assert h.data_start + mine.offset == t.data_offset and mine.nbytes == t.n_bytes
        assert tensor_types(path) == {t.name: t.tensor_type.name for t in r.tensors}
        assert {"Q8_0", "BF16"} & set(tensor_types(path).values())


def test_truncated_or_foreign_files_are_format_errors(small_gguf, tmp_path):
    src = small_gguf / "t-BF16.gguf"
    data = src.read_bytes()
    h = read_header(src)
    cut = tmp_path / "cut.gguf"
    for size in (10, 4096, h.data_start - 7, h.data_start + 100):
        cut.write_bytes(data[:size])
        with pytest.raises(FormatError):
            read_header(cut)
    other = tmp_path / "x.gguf"
    shutil.copy(src, other)
    with open(other, "r+b") as f:
        f.write(b"GGML")
    with pytest.raises(FormatError, match="not a GGUF file"):
        read_header(other)
