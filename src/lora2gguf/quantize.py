"""Quantization by llama.cpp's own quantizer: every llama.cpp file type by name, with an importance
matrix and per-tensor types when asked.

Two routes to the same code (llama.cpp's ``llama_model_quantize``), chosen per file:

- without a matrix and without per-tensor types: in this process, through llama-cpp-python (no
  external program needed; it is the library verify loads the files with);
- with an importance matrix or per-tensor types: llama.cpp's ``llama-quantize`` tool
  (:mod:`lora2gguf.llama_tools`), because the matrix and the overrides are C++ objects the tool
  builds (it also writes llama.cpp's ``quantize.imatrix.*`` keys). It runs in the output folder
  with relative names, so no absolute path ends up in a file's metadata.

The tests show the two routes give the same bytes for the same inputs. Which file types need a
matrix (llama.cpp refuses them without one) and which ignore one are facts of llama.cpp, kept
here and checked against llama.cpp by the tests (:data:`NEEDS_MATRIX`, :data:`IGNORES_MATRIX`)."""

from __future__ import annotations

import ctypes
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import gguf

from .errors import FormatError, InputError, OutputError
from .gguf_header import read_header
from .gguf_out import partial_path

#: file types llama.cpp refuses to make without an importance matrix: some of their tensors are
#: IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S or IQ3_XXS (or Q2_K inside a Q2_K_S file), which llama.cpp's
#: quantizer calls garbage without a matrix (llama-quant.cpp, tensor_requires_imatrix)
NEEDS_MATRIX = frozenset({"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS", "Q2_K_S"})
#: file types whose every tensor type's quantizer ignores a matrix (float types, Q8_0, MXFP4,
#: the ternary types): a matrix changes nothing in them
IGNORES_MATRIX = frozenset({"F32", "F16", "BF16", "Q8_0", "MXFP4_MOE", "TQ1_0", "TQ2_0", "Q1_0", "Q2_0"})
#: file types llama.cpp's headers name but its quantizer does not make (llama-quantize: "invalid ftype")
NOT_MADE = frozenset({"NVFP4"})
#: a file type's main tensor type where it is not the file type's own name (llama.cpp's
#: llama_ftype_get_default_type); K-quant mixtures (Q4_K_M...) are their Qn_K
_MAIN_TENSOR_TYPE = {"MXFP4_MOE": "MXFP4", "IQ2_M": "IQ2_S", "IQ3_M": "IQ3_S", "IQ3_XS": "IQ3_S"}


def main_tensor_type(ftype: str) -> str:
    """A file type's main tensor type name: Q4_K_M -> Q4_K, MXFP4_MOE -> MXFP4, IQ2_M -> IQ2_S."""
    m = re.fullmatch(r"(Q\d_K)(?:_[SML])?", ftype)
    return m.group(1) if m else _MAIN_TENSOR_TYPE.get(ftype, ftype)


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
    """llama.cpp file type names (as llama-quantize spells them) -> ids: every one whose tensor
    type the installed gguf-py knows (lora2gguf reads back every file it writes with it)."""
    llama_cpp = _llama_cpp()
    known = {t.name for t in gguf.GGMLQuantizationType}
    out = {}
    for attr in dir(llama_cpp):
        if attr.startswith("LLAMA_FTYPE_MOSTLY_"):
            name = attr[len("LLAMA_FTYPE_MOSTLY_"):]
            if name != "GUESSED" and name not in NOT_MADE and main_tensor_type(name) in known:
                out[name] = getattr(llama_cpp, attr)
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
            raise InputError(f"--quant {raw.strip()!r} is not a llama.cpp type. Available: {', '.join(sorted(known))}"
                             " (or auto, auto:KL)")
        if name not in out:
            out.append(name)
    return out


def uses_matrix(ftype: str) -> bool:
    """Does an importance matrix change a file of this type?"""
    return ftype.upper() not in IGNORES_MATRIX


def ggml_type_names() -> dict[str, str]:
    """ggml tensor type names as llama-quantize takes them (lower case) by upper-case name."""
    return {t.name.upper(): t.name.lower() for t in gguf.GGMLQuantizationType}


def _ggml_type(value: str, what: str) -> str:
    names = ggml_type_names()
    key = str(value).strip().upper()
    if key not in names:
        raise InputError(f"{what} {value!r} is not a ggml tensor type. Available: {', '.join(sorted(names))}")
    return names[key]


@dataclass(frozen=True)
class TensorTypes:
    """Per-tensor types as llama-quantize takes them: ``--tensor-type PATTERN=TYPE`` (a regular
    expression searched in the GGUF tensor name, first match wins), ``--output-tensor-type`` and
    ``--token-embedding-type``. Types are ggml tensor type names (q8_0, q6_k, bf16...)."""

    patterns: tuple[tuple[str, str], ...] = ()
    output: str | None = None
    token_embedding: str | None = None

    @classmethod
    def parse(cls, patterns=(), output: str | None = None, token_embedding: str | None = None) -> "TensorTypes":
        pairs = []
        for raw in patterns or ():
            if isinstance(raw, (tuple, list)):
                pat, typ = raw
            else:
                pat, sep, typ = str(raw).rpartition("=")
                if not sep or not pat.strip() or not typ.strip():
                    raise InputError(f"--tensor-type {raw!r}: expected PATTERN=TYPE, e.g. attn_v=q8_0 or "
                                     "'blk\\.[0-3]\\.ffn_down=q6_k'")
            pat = str(pat).strip()
            try:
                re.compile(pat)
            except re.error as e:
                raise InputError(f"--tensor-type {pat}={typ}: {pat!r} is not a regular expression ({e})") from None
            pairs.append((pat.lower(), _ggml_type(typ, f"--tensor-type {pat}=")))
        return cls(tuple(pairs),
                   _ggml_type(output, "--output-tensor-type") if output else None,
                   _ggml_type(token_embedding, "--token-embedding-type") if token_embedding else None)

    def __bool__(self) -> bool:
        return bool(self.patterns or self.output or self.token_embedding)

    def args(self) -> list[str]:
        out: list[str] = []
        for pat, typ in self.patterns:
            out += ["--tensor-type", f"{pat}={typ}"]
        if self.output:
            out += ["--output-tensor-type", self.output]
        if self.token_embedding:
            out += ["--token-embedding-type", self.token_embedding]
        return out

    def record(self) -> dict:
        return {"tensor_types": [f"{p}={t}" for p, t in self.patterns], "output_tensor_type": self.output,
                "token_embedding_type": self.token_embedding}


@dataclass
class QuantResult:
    path: Path
    ftype: str
    tensor_types: dict[str, str]
    note: str | None
    #: how it was made: "llama_model_quantize" (in this process) or "llama-quantize" (the tool)
    route: str = "llama_model_quantize"
    imatrix: str | None = None
    overrides: dict = field(default_factory=dict)


def quantize(src: Path, dst: Path, ftype: str, *, nthread: int = 0, imatrix: Path | None = None,
             overrides: TensorTypes = TensorTypes(), tools=None) -> QuantResult:
    """``src`` (an unquantized GGUF) quantized to ``dst`` as ``ftype``, written under a temporary
    name and renamed when it reads back. ``imatrix``: an importance matrix file in ``dst``'s
    folder; ``overrides``: per-tensor types; either takes llama.cpp's ``llama-quantize`` from
    ``tools`` (:class:`lora2gguf.llama_tools.LlamaTools`)."""
    ftype = ftype.upper()
    ids = ftypes()
    if ftype not in ids:
        raise InputError(f"quantization type {ftype!r} is not a llama.cpp type. Available: {', '.join(sorted(ids))}")
    if imatrix is None and ftype in NEEDS_MATRIX:
        raise InputError(f"{ftype} needs an importance matrix (llama.cpp refuses to make it without one): "
                         "build with --imatrix-data FILE, --imatrix FILE or the built-in calibration "
                         "(leave out --no-imatrix)")
    dst = Path(dst)
    tmp = partial_path(dst)
    threads = nthread or (os.cpu_count() or 1)
    if imatrix is not None or overrides:
        route = "llama-quantize"
        _quantize_tool(src, tmp, ftype, threads, imatrix, overrides, tools)
    else:
        route = "llama_model_quantize"
        _quantize_in_process(src, dst, tmp, ftype, ids[ftype], threads)
    try:
        header = read_header(tmp)
    except FormatError as e:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{dst}: llama.cpp's output does not read back ({e})") from None
    types = {t.name: t.qtype.name for t in header.tensors.values()}
    shapes = {t.name: [int(d) for d in t.shape] for t in header.tensors.values()}
    os.replace(tmp, dst)
    return QuantResult(dst, ftype, types, fallback_note(ftype, types, shapes), route,
                       imatrix.name if imatrix is not None else None, overrides.record() if overrides else {})


def _quantize_in_process(src: Path, dst: Path, tmp: Path, ftype: str, ftype_id: int, threads: int) -> None:
    llama_cpp = _llama_cpp()
    quiet_llama()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype_id
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0 or not tmp.exists():
        tmp.unlink(missing_ok=True)
        _raise_failed(src, dst, ftype, f"return code {rc}")


def _raise_failed(src: Path, dst: Path, ftype: str, how: str) -> None:
    import shutil

    free = shutil.disk_usage(Path(dst).parent).free
    raise OutputError(
        f"llama.cpp failed to quantize {src} to {dst} ({ftype}, {how}). The file needs up to "
        f"{Path(src).stat().st_size:,} bytes (at most the source's size) and {free:,} are free in {Path(dst).parent}; "
        "the unfinished file was removed and earlier files are untouched. Free space and run again.")


def _quantize_tool(src: Path, tmp: Path, ftype: str, threads: int, imatrix: Path | None, overrides: TensorTypes,
                   tools) -> None:
    from .llama_tools import QUANTIZE, find_tools

    tools = tools or find_tools()
    folder = tmp.parent
    args: list[str] = []
    if imatrix is not None:
        if Path(imatrix).resolve().parent != folder.resolve():
            raise InputError(f"the importance matrix {imatrix} must be in the output folder {folder}")
        args += ["--imatrix", Path(imatrix).name]  # the file name is what the GGUF records
    args += overrides.args()
    src_arg = Path(src).name if Path(src).resolve().parent == folder.resolve() else str(Path(src).resolve())
    args += [src_arg, tmp.name, ftype, str(threads)]
    try:
        tools.run(QUANTIZE, args, cwd=folder, what=f"{src_arg} -> {ftype}")
    except OutputError as e:
        tmp.unlink(missing_ok=True)
        if not Path(src).exists():
            raise
        raise OutputError(f"{e}\nThe unfinished {tmp.name} was removed; earlier files are untouched.") from None
    if not tmp.exists():
        _raise_failed(src, tmp.with_suffix(""), ftype, "no file written")


def fallback_note(ftype: str, types: dict[str, str], shapes: dict[str, list[int]]) -> str | None:
    """Say what llama.cpp does silently: K-quants need rows that are a multiple of 256, so a
    "Q4_K_M" of a model whose rows are, say, 2880 wide is mostly Q5_0/Q8_0 tensors."""
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
        f"not a multiple of {block}, so llama.cpp could not use K-quants for them and fell back to: {mix}."
        + (" For a mixture-of-experts model, MXFP4_MOE (MXFP4 experts, Q8_0 elsewhere) is often the better "
           "file: compare the sizes and KL in the report." if any("_exps." in n for n in types) else
           " Compare the sizes and KL of the other types in the report.")
    )


def type_counts(types: dict[str, str]) -> dict[str, int]:
    return dict(Counter(types.values()).most_common())
