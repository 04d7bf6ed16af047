"""llama.cpp's own converter as the reference: run it on a model folder, and compare two GGUF
files tensor by tensor (names, shapes, types, bytes) and key by key (every key but provenance)."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

PROVENANCE_KEEP = ("general.architecture", "general.file_type", "general.quantization_version", "general.type")


def run_converter(ref: Path, model_dir: Path, outfile: Path, outtype: str = "bf16") -> Path:
    """llama.cpp's convert_hf_to_gguf.py (from the llama-cpp-python source package) on a folder."""
    env = dict(os.environ, PYTHONPATH=str(ref / "gguf-py"), NO_LOCAL_GGUF="")
    proc = subprocess.run([sys.executable, str(ref / "convert_hf_to_gguf.py"), str(model_dir), "--outfile",
                           str(outfile), "--outtype", outtype], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return outfile


def read_gguf(path: Path) -> tuple[dict, dict]:
    """(tensors: name -> (type name, shape, raw bytes), kv: key -> python value), the values
    gguf-py's ``GGUFReader`` gives (``t.data``, ``field.contents()``; :func:`read_gguf_gguf_py`),
    parsed here in one pass: the reader builds a numpy view per string and takes 10-30 s on a
    150k-token vocabulary (test_read_gguf_matches_gguf_py checks the two agree)."""
    raw = Path(path).read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        v = struct.unpack_from(fmt, raw, pos)
        pos += struct.calcsize(fmt)
        return v[0] if len(v) == 1 else v

    def string() -> str:
        nonlocal pos
        n = take("<Q")
        pos += n
        return raw[pos - n:pos].decode("utf-8")

    def value(vtype: int):
        nonlocal pos
        t = gguf.GGUFValueType(vtype)
        if t == gguf.GGUFValueType.STRING:
            return string()
        if t == gguf.GGUFValueType.ARRAY:
            itype, count = take("<I"), take("<Q")
            if gguf.GGUFValueType(itype) in (gguf.GGUFValueType.STRING, gguf.GGUFValueType.ARRAY):
                return [value(itype) for _ in range(count)]
            dt = np.dtype(_NP[gguf.GGUFValueType(itype)])
            items = np.frombuffer(raw, dt, count, pos)
            pos += dt.itemsize * count
            return items.tolist()
        dt = np.dtype(_NP[t])
        pos += dt.itemsize
        return np.frombuffer(raw, dt, 1, pos - dt.itemsize).tolist()[0]

    assert take("<I") == gguf.GGUF_MAGIC, f"{path}: not a GGUF file"
    take("<I")  # version
    n_tensors, n_kv = take("<Q"), take("<Q")
    kv = {}
    for _ in range(n_kv):
        key = string()
        kv[key] = value(take("<I"))
    infos = []
    for _ in range(n_tensors):
        name = string()
        shape = tuple(take("<Q") for _ in range(take("<I")))
        qtype = gguf.GGMLQuantizationType(take("<I"))
        infos.append((name, qtype, shape, take("<Q")))
    alignment = kv.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT)
    start = -(-pos // alignment) * alignment
    tensors = {}
    for name, qtype, shape, offset in infos:
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        n = int(np.prod(shape, dtype=np.int64)) // block * size
        tensors[name] = (qtype.name, shape, raw[start + offset:start + offset + n])
    return tensors, kv


#: numpy types of GGUF's scalar value types
_NP = {gguf.GGUFValueType.UINT8: "<u1", gguf.GGUFValueType.INT8: "<i1", gguf.GGUFValueType.UINT16: "<u2",
       gguf.GGUFValueType.INT16: "<i2", gguf.GGUFValueType.UINT32: "<u4", gguf.GGUFValueType.INT32: "<i4",
       gguf.GGUFValueType.FLOAT32: "<f4", gguf.GGUFValueType.BOOL: "?", gguf.GGUFValueType.UINT64: "<u8",
       gguf.GGUFValueType.INT64: "<i8", gguf.GGUFValueType.FLOAT64: "<f8"}


def read_gguf_gguf_py(path: Path) -> tuple[dict, dict]:
    """:func:`read_gguf` through gguf-py's ``GGUFReader`` (slow on large vocabularies). Not
    cached: a reader of a 150k-token vocabulary holds hundreds of MB of Python objects."""
    reader = gguf.GGUFReader(Path(path))
    tensors = {t.name: (t.tensor_type.name, tuple(int(d) for d in t.shape), bytes(t.data.tobytes()))
               for t in reader.tensors}
    kv = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return tensors, kv


def _provenance(kv: dict) -> set[str]:
    return {k for k in kv if k.startswith("general.") and k not in PROVENANCE_KEEP}


def assert_same_gguf(ours: Path, ref: Path, *, ignore_keys: tuple[str, ...] = ()) -> None:
    """Every tensor (name, shape, type, bytes) and every metadata key but provenance equal."""
    ours_t, ours_kv = read_gguf(ours)
    ref_t, ref_kv = read_gguf(ref)
    assert sorted(ours_t) == sorted(ref_t), (sorted(set(ours_t) - set(ref_t)), sorted(set(ref_t) - set(ours_t)))
    differ = [n for n in ref_t if ours_t[n] != ref_t[n]]
    assert not differ, "tensors differ: " + ", ".join(
        f"{n} ({ours_t[n][:2]} vs {ref_t[n][:2]}{', bytes' if ours_t[n][:2] == ref_t[n][:2] else ''})"
        for n in differ[:8])
    skip = _provenance(ref_kv) | _provenance(ours_kv) | set(ignore_keys)
    ref_keys, our_keys = set(ref_kv) - skip, set(ours_kv) - skip
    assert our_keys == ref_keys, (sorted(our_keys - ref_keys), sorted(ref_keys - our_keys))
    for key in sorted(ref_keys):
        a, b = ours_kv[key], ref_kv[key]
        if isinstance(b, float):
            assert a == pytest.approx(b, rel=1e-7), key
        else:
            assert a == b, key
