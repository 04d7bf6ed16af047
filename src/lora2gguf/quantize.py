"""Quantization by llama.cpp's own quantizer (llama_model_quantize through llama-cpp-python):
every llama.cpp file type is available, and the result is exactly what `llama-quantize` makes."""

from __future__ import annotations

import ctypes
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import gguf

from .errors import FormatError, InputError, OutputError
from .gguf_header import read_header
from .gguf_out import partial_path


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError as e:  # pragma: no cover - a broken install
        raise InputError(
            f"llama-cpp-python is not importable ({e}); run scripts/setup.sh, which installs a portable build"
        ) from None
    return llama_cpp


def quiet_llama(force: bool = False) -> None:
    """Route llama.cpp's own log lines away from the terminal (library code does not print);
    ``force`` sets it again after someone else installed a log callback."""
    llama_cpp = _llama_cpp()
    global _LOG_CB
    if _LOG_CB is None or force:
        if _LOG_CB is None:
            @llama_cpp.llama_log_callback
            def _cb(level, text, user_data):  # noqa: ARG001
                return None
            _LOG_CB = _cb
        llama_cpp.llama_log_set(_LOG_CB, ctypes.c_void_p(0))


_LOG_CB = None


def ftypes() -> dict[str, int]:
    """llama.cpp file type names (as llama-quantize spells them) -> ids."""
    llama_cpp = _llama_cpp()
    out = {}
    for attr in dir(llama_cpp):
        if attr.startswith("LLAMA_FTYPE_MOSTLY_"):
            out[attr[len("LLAMA_FTYPE_MOSTLY_"):]] = getattr(llama_cpp, attr)
    out.pop("GUESSED", None)
    return out


def parse_quants(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    known = ftypes()
    out = []
    for raw in names:
        name = raw.strip().upper()
        if not name:
            continue
        if name not in known:
            raise InputError(f"--quant {raw.strip()!r} is not a llama.cpp type. Available: {', '.join(sorted(known))}")
        if name not in out:
            out.append(name)
    return out


@dataclass
class QuantResult:
    path: Path
    ftype: str
    tensor_types: dict[str, str]
    note: str | None


def quantize(src: Path, dst: Path, ftype: str, *, nthread: int = 0) -> QuantResult:
    llama_cpp = _llama_cpp()
    quiet_llama()
    ftype = ftype.upper()
    ids = ftypes()
    if ftype not in ids:
        raise InputError(f"quantization type {ftype!r} is not a llama.cpp type. Available: {', '.join(sorted(ids))}")
    tmp = partial_path(Path(dst))
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ids[ftype]
    params.nthread = nthread or (os.cpu_count() or 1)
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0 or not tmp.exists():
        tmp.unlink(missing_ok=True)
        import shutil

        free = shutil.disk_usage(Path(dst).parent).free
        raise OutputError(
            f"llama.cpp failed to quantize {src} to {dst} ({ftype}, return code {rc}). The file needs up to "
            f"{Path(src).stat().st_size:,} bytes (at most the source's size) and {free:,} are free in {Path(dst).parent}; "
            "the unfinished file was removed and earlier files are untouched. Free space and run again."
        )
    try:
        header = read_header(tmp)
    except FormatError as e:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{dst}: llama.cpp's output does not read back ({e})") from None
    types = {t.name: t.qtype.name for t in header.tensors.values()}
    shapes = {t.name: [int(d) for d in t.shape] for t in header.tensors.values()}
    os.replace(tmp, dst)
    return QuantResult(Path(dst), ftype, types, fallback_note(ftype, types, shapes))


def fallback_note(ftype: str, types: dict[str, str], shapes: dict[str, list[int]]) -> str | None:
    """Say what llama.cpp does silently: K-quants need rows that are a multiple of 256, so a
    "Q4_K_M" of a model with 2880-wide rows is mostly Q5_0/Q8_0 tensors."""
    if "_K" not in ftype:
        return None
    block = gguf.QK_K
    floats = {"F32", "F16", "BF16"}  # tensors llama.cpp keeps in float on purpose (router, norms)
    narrow = [n for n, shp in shapes.items() if len(shp) >= 2 and shp[0] % block and types[n] not in floats]
    if not narrow:
        return None
    got = Counter(types[n] for n in narrow)
    mix = ", ".join(f"{c} x {t}" for t, c in got.most_common())
    width = Counter(shapes[n][0] for n in narrow).most_common(1)[0][0]
    return (
        f"{len(narrow)} of {sum(1 for n, s in shapes.items() if len(s) >= 2 and types[n] not in floats)} quantized tensors have rows of {width}, "
        f"not a multiple of {block}, so llama.cpp could not use K-quants for them and fell back to: {mix}. "
        "For GPT-OSS, MXFP4_MOE is usually the better file: compare the sizes and KL in the report."
    )


def type_counts(types: dict[str, str]) -> dict[str, int]:
    return dict(Counter(types.values()).most_common())
