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


def _stream(path, meta=lambda w: None):
    import numpy as np
    from lora2gguf.gguf_out import GGUFStream
    from lora2gguf.plan import OutTensor
    t = OutTensor("a.weight", (4, 8), gguf.GGMLQuantizationType.F32)
    s = GGUFStream(path, "llama", meta, [t])
    s.write("a.weight", np.arange(32, dtype=np.float32).reshape(4, 8))
    return s


def test_a_stream_checks_its_header_read_back(tmp_path):
    """The written header is read back (on a thread, while tensors stream) before the file is
    renamed into place; the types recorded come from that read-back."""
    s = _stream(tmp_path / "ok.gguf")
    path = s.finish()
    assert s.header_types == {"a.weight": "F32"} == tensor_types(path)


def test_a_header_that_does_not_read_back_leaves_no_file(tmp_path, monkeypatch):
    from lora2gguf import gguf_out
    from lora2gguf.errors import OutputError

    def unreadable(path, **kw):
        raise FormatError("a string is not UTF-8")

    monkeypatch.setattr(gguf_out, "read_header", unreadable)
    s = _stream(tmp_path / "bad.gguf")
    with pytest.raises(OutputError, match="does not read back"):
        s.finish()
    assert not list(tmp_path.iterdir())


def test_a_header_packed_on_a_thread_is_waited_for_and_its_error_raised(tmp_path):
    """background=True: the metadata callback runs on a thread; the first write waits for it
    (the file is the same as the one written without the thread), and an error in it is raised
    by the first write, by finish() or by ready(), with no file left behind."""
    import threading

    import numpy as np
    from lora2gguf.gguf_out import GGUFStream
    from lora2gguf.plan import OutTensor

    t = OutTensor("a.weight", (4, 8), gguf.GGMLQuantizationType.F32)
    data = np.arange(32, dtype=np.float32).reshape(4, 8)
    threads = []

    def meta(w):
        threads.append(threading.current_thread())
        w.add_string("general.name", "x" * 5000)

    paths = []
    for background in (False, True):
        s = GGUFStream(tmp_path / f"bg{background}.gguf", "llama", meta, [t], background=background)
        s.write("a.weight", data)
        paths.append(s.finish())
    assert threads[0] is threading.main_thread() and threads[1] is not threading.main_thread()
    assert paths[0].read_bytes() == paths[1].read_bytes()

    def bad(w):
        raise ValueError("no such key type")

    for call in ("write", "finish", "ready"):
        folder = tmp_path / call
        folder.mkdir()
        s = GGUFStream(folder / "bad.gguf", "llama", bad, [t], background=True)
        with pytest.raises(ValueError, match="no such key type"):
            s.write("a.weight", data) if call == "write" else getattr(s, call)()
        s.abort()
        assert not list(folder.iterdir())
