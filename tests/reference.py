"""llama.cpp's own converter as the reference: run it on a model folder, and compare two GGUF
files tensor by tensor (names, shapes, types, bytes) and key by key (every key but provenance)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import gguf
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
    """(tensors: name -> (type name, shape, raw bytes), kv: key -> python value). Not cached: a
    reader of a 150k-token vocabulary holds hundreds of MB of Python objects."""
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
