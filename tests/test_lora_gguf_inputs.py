"""The malformed corpus for `lora2gguf adapter` (issue 13): each case breaks one thing of a good tiny
GPT-OSS base + adapter (or hands it a wrong base GGUF). The API must raise the documented error
class with a message naming the file and the problem, the CLI must print one error line (no
traceback) and exit with the error's code, and the output folder must be left without a file.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import gguf
import numpy as np
import pytest

from lora2gguf import synth
from lora2gguf.api import export_adapter
from lora2gguf.errors import InputError, Lora2GGUFError, NumericError
from test_reliability_inputs import (ADAPTER, ADAPTER_CONFIG, Q_PROJ_B, _adapter_for_other_model, edit_json,
                                     link_tree, read_st, write_st)


@dataclass
class Case:
    id: str
    names: str  # what the message must name: "adapter", "config", "gguf" (the --base-gguf file)
    mutate: Callable[[Path, Path, Path], Path | None]  # (base, adapter, tmp) -> a --base-gguf file or None
    error: type[Lora2GGUFError]
    problem: str  # regex the message must match
    outtype: str = "f16"


def _gguf(path: Path, arch: str, tensors: dict[str, tuple[int, ...]] = {}, kind: str = "model") -> Path:
    """A small GGUF written by gguf-py: ``arch``, ``general.type`` and zero-filled F32 tensors."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_type(kind)
    for name, shape in tensors.items():
        w.add_tensor(name, np.zeros(shape, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _config(fn) -> Callable[[Path, Path, Path], None]:
    def f(base: Path, ad: Path, tmp: Path) -> None:
        edit_json(ad / ADAPTER_CONFIG, fn)
    return f


def _nan(base: Path, ad: Path, tmp: Path) -> None:
    header, data = read_st(ad / ADAPTER)
    begin = header[Q_PROJ_B]["data_offsets"][0]
    buf = bytearray(data)
    buf[begin:begin + 4] = np.array([np.nan], "<f4").tobytes()
    write_st(ad / ADAPTER, header, bytes(buf))


def _huge_b(base: Path, ad: Path, tmp: Path) -> None:
    header, data = read_st(ad / ADAPTER)
    begin = header[Q_PROJ_B]["data_offsets"][0]
    buf = bytearray(data)
    buf[begin:begin + 4] = np.array([1e6], "<f4").tobytes()  # times the fold, beyond float16's 65504
    write_st(ad / ADAPTER, header, bytes(buf))


def _pair_on_a_norm(base: Path, ad: Path, tmp: Path) -> None:
    """A LoRA pair on layer 0's input norm (a vector), as no PEFT version writes one."""
    header, data = read_st(ad / ADAPTER)
    buf = bytearray(data)
    module = "base_model.model.model.layers.0.input_layernorm"
    for which, shape in (("A", (4, 64)), ("B", (64, 4))):
        values = np.full(shape, 0.01, "<f4").tobytes()
        header[f"{module}.lora_{which}.weight"] = {"dtype": "F32", "shape": list(shape),
                                                   "data_offsets": [len(buf), len(buf) + len(values)]}
        buf += values
    write_st(ad / ADAPTER, header, bytes(buf))


def _other_shapes(base: Path, ad: Path, tmp: Path) -> None:
    _adapter_for_other_model(base, ad)


def _base_of(arch: str, **kw) -> Callable[[Path, Path, Path], Path]:
    def f(base: Path, ad: Path, tmp: Path) -> Path:
        return _gguf(tmp / "other.gguf", arch, **kw)
    return f


def _not_gguf(base: Path, ad: Path, tmp: Path) -> Path:
    p = tmp / "base.gguf"
    p.write_text("not a gguf file")
    return p


CASES: list[Case] = [
    Case("adapter-for-another-base", "adapter", _other_shapes, InputError, r"do not fit"),
    Case("rank-zero", "config", _config(lambda c: c.update(r=0)), InputError, r"field 'r' is 0, expected a positive"),
    Case("rank-pattern-zero", "config", _config(lambda c: c.update(rank_pattern={"q_proj": 0})), InputError,
         r"rank_pattern\['q_proj'\] is 0, expected a positive integer"),
    Case("alpha-pattern-negative", "config", _config(lambda c: c.update(alpha_pattern={"q_proj": -2})), InputError,
         r"alpha_pattern\['q_proj'\] is -2, expected a positive number"),
    Case("lora-pair-on-a-norm", "adapter", _pair_on_a_norm, InputError,
         r"input_layernorm.lora_A.weight .*: a LoRA pair on model.layers.0.input_layernorm.weight \(64,\), which is "
         r"not a matrix"),
    Case("nan-in-lora-b", "adapter", _nan, NumericError, r"q_proj.*NaN or Inf"),
    Case("b-beyond-f16", "adapter", _huge_b, NumericError, r"beyond the range of F16.*--outtype f32 or bf16"),
    Case("base-gguf-other-architecture", "gguf", _base_of("llama", tensors={"blk.0.attn_q.weight": (64, 64)}),
         InputError, r"its architecture is 'llama', but the adapter is for a gpt_oss base"),
    Case("base-gguf-other-size", "gguf", _base_of("gpt-oss", tensors={"blk.0.attn_q.weight": (32, 32)}), InputError,
         r"tensor 'blk.0.attn_q.weight' is \[32, 32\] \(ggml order\) there, but the adapter was made for \[64, 64\]"),
    Case("base-gguf-missing-tensor", "gguf", _base_of("gpt-oss"), InputError, r"holds no tensor 'blk\.0\.\w+\.weight' \(and \d+ more\)"),
    Case("base-gguf-is-an-adapter", "gguf", _base_of("gpt-oss", kind="adapter"), InputError,
         r"this is an adapter GGUF"),
    Case("base-gguf-not-gguf", "gguf", _not_gguf, InputError, r"not a readable GGUF"),
    Case("base-gguf-absent", "gguf", lambda b, a, t: t / "nowhere.gguf", InputError, r"no such file"),
]


@pytest.fixture(scope="module")
def good(tmp_path_factory, tiny_base) -> tuple[Path, Path]:
    ad = synth.make_adapter_numpy(tiny_base, tmp_path_factory.mktemp("lora_inputs_adapter") / "adapter")
    return tiny_base, ad


def test_the_good_pair_exports(good, tmp_path):
    res = export_adapter(*good, tmp_path / "out", name="x")
    assert res.path.is_file() and res.record["lora"]["left_out"] == []


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_malformed_adapter_input(tmp_path, good, case, capsys):
    base = link_tree(good[0], tmp_path / "base")
    ad = link_tree(good[1], tmp_path / "adapter")
    gguf_file = case.mutate(base, ad, tmp_path)
    out = tmp_path / "out"
    extra = [gguf_file] if gguf_file else []
    with pytest.raises(Lora2GGUFError) as info:
        export_adapter(base, ad, out, name="x", outtype=case.outtype, base_gguf=extra)
    err, msg = info.value, str(info.value)
    assert type(err) is case.error, f"{type(err).__name__}: {msg}"
    import re

    assert re.search(case.problem, msg, re.S), msg
    named = {"adapter": str(ad), "config": str(ad / ADAPTER_CONFIG), "gguf": str(gguf_file)}[case.names]
    assert named in msg, f"the message does not name {named}: {msg}"
    assert not out.exists() or not any(p.suffix in (".gguf", ".partial") for p in out.iterdir())

    from lora2gguf import cli

    capsys.readouterr()
    argv = ["adapter", str(base), str(ad), "-o", str(out), "--name", "x", "--outtype", case.outtype]
    for p in extra:
        argv += ["--base-gguf", str(p)]
    rc = cli.main(argv)
    captured = capsys.readouterr()
    assert rc == err.exit_code != 0
    assert "Traceback" not in captured.err + captured.out
    errors = [line for line in captured.err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0] == "error: " + msg.splitlines()[0], captured.err
    assert not out.exists() or not any(p.suffix in (".gguf", ".partial") for p in out.iterdir())


def test_an_output_folder_of_a_build_is_not_taken_over(good, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"outputs": [{"file": "m-BF16.gguf"}]}))
    with pytest.raises(InputError, match=r"holds another run \(a build\)"):
        export_adapter(*good, out)
    assert json.loads((out / "run.json").read_text()) == {"outputs": [{"file": "m-BF16.gguf"}]}


def test_unknown_outtype(good, tmp_path):
    with pytest.raises(InputError, match=r"'q4_k'.*f32, f16, bf16, q8_0"):
        export_adapter(*good, tmp_path / "out", outtype="q4_k")
    with pytest.raises(InputError, match=r"--base-gguf .* add --lora-gguf"):
        from lora2gguf.api import build

        build(*good, tmp_path / "out2", base_gguf=[tmp_path / "x.gguf"])


# --------------------------------------------------------------------------- a base GGUF is hashed once


def _base_gguf_for(good, tmp: Path, pad_bytes: int = 32 << 20) -> Path:
    """A base GGUF the good adapter pairs with: every tensor it adapts, in the shape it was made
    for (zeros), and a padding tensor that makes the file far larger than a fingerprint reads."""
    res = export_adapter(*good, tmp / "shapes", name="x")
    shapes: dict[str, tuple[int, ...]] = {}
    for t in gguf.GGUFReader(res.path).tensors:
        target, which = t.name.rsplit(".lora_", 1)
        ne = [int(d) for d in t.shape]  # a: [in, r(, E)], b: [r, out(, E)]
        got = shapes.setdefault(target, (0, 0, *ne[2:]))
        shapes[target] = (ne[0], got[1], *ne[2:]) if which == "a" else (got[0], ne[1], *ne[2:])
    tensors = {name: tuple(reversed(ne)) for name, ne in shapes.items()}
    tensors["zz_padding.weight"] = (8, pad_bytes // 32)
    return _gguf(tmp / "base.gguf", "gpt-oss", tensors)


def _count_reads(monkeypatch, path: Path) -> list[int]:
    """Bytes read from ``path`` through open() and os.pread (how sha256_file and
    output_fingerprint read), appended per read; read_header maps the file and touches its
    header only."""
    import builtins

    reads: list[int] = []
    target = str(path.resolve())
    real_open, real_pread = builtins.open, os.pread

    class Counting:
        def __init__(self, f):
            self._f = f

        def read(self, *a):
            b = self._f.read(*a)
            reads.append(len(b))
            return b

        def readinto(self, buf):
            n = self._f.readinto(buf)
            reads.append(n or 0)
            return n

        def __getattr__(self, k):
            return getattr(self._f, k)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self._f.__exit__(*exc)

    def counting_open(file, mode="r", *a, **kw):
        f = real_open(file, mode, *a, **kw)
        if isinstance(file, (str, Path)) and "r" in mode and str(Path(file).resolve()) == target:
            return Counting(f)
        return f

    def counting_pread(fd, n, off):
        b = real_pread(fd, n, off)
        if os.readlink(f"/proc/self/fd/{fd}") == target:
            reads.append(len(b))
        return b

    monkeypatch.setattr(builtins, "open", counting_open)
    monkeypatch.setattr(os, "pread", counting_pread)
    return reads


def test_a_base_gguf_is_hashed_once(good, tmp_path, monkeypatch):
    """--base-gguf FILE (13-40 GB in real use) is hashed in full on the first run only: an unchanged
    rerun takes its recorded SHA-256, confirmed by the file's fingerprint (at most 2.5 MiB read);
    a touched file is hashed again (same SHA-256), an edited one or one replaced by a file of the
    same size, mtime and sampled bytes is hashed again and its new SHA-256 recorded."""
    from lora2gguf.gguf_out import sha256_file
    from lora2gguf.runstate import FINGERPRINT_MAX_BYTES
    from test_resume import _flip, _unsampled_offset

    base_gguf = _base_gguf_for(good, tmp_path)
    size = base_gguf.stat().st_size
    assert size > 10 * FINGERPRINT_MAX_BYTES
    out = tmp_path / "out"
    reads = _count_reads(monkeypatch, base_gguf)

    def run() -> tuple[str, str, int]:
        reads.clear()
        rec = export_adapter(*good, out, name="x", base_gguf=[base_gguf], verify=False).record
        (pair,) = rec["lora"]["pairs"]
        assert json.loads((out / "run.json").read_text())["lora"]["pairs"] == [pair]
        return pair["sha256"], rec["stages"]["lora"]["base_gguf"][str(base_gguf.resolve())], sum(reads)

    first, how, n = run()
    assert how == "sha256" and n >= size and first == sha256_file(base_gguf)
    for _ in range(2):
        sha, how, n = run()
        assert (sha, how) == (first, "fingerprint") and n <= FINGERPRINT_MAX_BYTES, n

    t = base_gguf.stat().st_mtime_ns + 10**9
    os.utime(base_gguf, ns=(t, t))  # touched: the same bytes
    sha, how, n = run()
    assert (sha, how) == (first, "sha256") and n >= size
    sha, how, n = run()
    assert (sha, how) == (first, "fingerprint") and n <= FINGERPRINT_MAX_BYTES

    off = _unsampled_offset(size)
    _flip(base_gguf, off)  # edited where the fingerprint does not read
    edited, how, n = run()
    assert how == "sha256" and n >= size and edited != first
    assert edited == sha256_file(base_gguf)

    new = tmp_path / "replacement.gguf"
    shutil.copyfile(base_gguf, new)
    _flip(new, off)  # back to the first bytes: same size, same sampled bytes, same mtime
    st = base_gguf.stat()
    os.utime(new, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(new, base_gguf)
    replaced, how, n = run()
    assert how == "sha256" and n >= size and replaced == first == sha256_file(base_gguf)
    assert run()[:2] == (first, "fingerprint")
