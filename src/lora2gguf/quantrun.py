"""Quantization in a run: the importance matrix stage, every quantized file as a resumable stage,
and ``--quant auto`` (a ladder of candidates, each verified against the fine-tune, the smallest
within the KL budget kept).

- :class:`QuantOptions`: everything ``build`` was asked about quantization, checked before any
  work (types, a type that needs a matrix when none will exist, the matrix's source, per-tensor
  types, llama.cpp's tools found when they are needed).
- The matrix (:mod:`lora2gguf.imatrix`) is a stage of the run manifest keyed by the unquantized
  file's SHA-256, the data's SHA-256, the options and the tools' version: a rerun reuses it. It is
  made when a requested type uses one (every type but the float types, Q8_0, MXFP4_MOE and the
  ternary ones), from ``--imatrix-data``, from a matrix given with ``--imatrix``, or from the
  built-in calibration; ``--no-imatrix`` turns it off.
- Each file is a stage keyed by its source's SHA-256, its type, the matrix's SHA-256 and the
  per-tensor types (:func:`quantize_file`), shared with the LoRA GGUF's base files.
- ``auto``: :func:`ladder` names the candidates, verify measures them all in one run, and
  :func:`choose` (a pure function of the measurements) names the smallest file whose mean KL
  against the fine-tune is within the budget and which fails no required check.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from .errors import InputError
from .quantize import NEEDS_MATRIX, TensorTypes, ftypes, parse_quants, quantize, uses_matrix

ProgressFn = Callable[[str, int, int, str], None]

#: ``--quant auto`` without a budget: the mean KL (nats) a candidate may have against the fine-tune
DEFAULT_BUDGET = 0.05
#: the types ``auto`` tries, largest first; MoE models also get :data:`MOE_CANDIDATES`
LADDER = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "IQ4_XS", "Q3_K_M", "IQ3_XXS", "IQ2_M")
MOE_CANDIDATES = ("MXFP4_MOE",)
#: the suffix of a candidate made without the matrix, beside the same type made with it
NO_MATRIX_SUFFIX = "-no-imatrix"


@dataclass(frozen=True)
class QuantOptions:
    """What quantization was asked for. ``types``: llama.cpp file types by name; ``auto``: the
    mean-KL budget of ``--quant auto`` (None: no auto); ``imatrix``: "auto" (computed when a type
    uses one), "off", or the path of a matrix to use; ``imatrix_data``: the calibration data file;
    ``imatrix_chunks``: at most this many chunks; ``overrides``: per-tensor types; ``llama_cpp``:
    a llama.cpp build folder (:mod:`lora2gguf.llama_tools`); ``keep_all``: keep every ``auto``
    candidate; ``auto_types``: the types ``auto`` tries (None: :data:`LADDER`, and
    :data:`MOE_CANDIDATES` for a MoE model)."""

    types: tuple[str, ...] = ()
    auto: float | None = None
    imatrix: str = "auto"
    imatrix_data: str | None = None
    imatrix_chunks: int | None = None
    overrides: TensorTypes = field(default_factory=TensorTypes)
    llama_cpp: str | None = None
    keep_all: bool = False
    auto_types: tuple[str, ...] | None = None

    @classmethod
    def of(cls, quants: str | Sequence[str] = (), *, imatrix: str | os.PathLike[str] | None = None,
           imatrix_data: str | os.PathLike[str] | None = None, no_imatrix: bool = False,
           imatrix_chunks: int | None = None, tensor_types: Sequence[str] = (), output_tensor_type: str | None = None,
           token_embedding_type: str | None = None, llama_cpp: str | os.PathLike[str] | None = None,
           keep_all: bool = False, auto_types: str | Sequence[str] | None = None) -> "QuantOptions":
        """Parse and check the options (InputError naming the option and the fix)."""
        names = quants.split(",") if isinstance(quants, str) else list(quants or ())
        auto = None
        plain = []
        for raw in names:
            word = str(raw).strip()
            if not word:
                continue
            if word.lower().split(":", 1)[0] == "auto":
                auto = _budget(word)
            else:
                plain.append(word)
        types = tuple(parse_quants(plain)) if plain else ()
        if no_imatrix and (imatrix or imatrix_data):
            raise InputError("--no-imatrix with --imatrix/--imatrix-data: choose one")
        if imatrix and imatrix_data:
            raise InputError("--imatrix FILE (a matrix made before) and --imatrix-data FILE (data to make one from): "
                             "give one of them")
        for value, opt in ((imatrix, "--imatrix"), (imatrix_data, "--imatrix-data")):
            if value is not None and not Path(value).is_file():
                raise InputError(f"{opt} {value}: no such file")
        if imatrix_chunks is not None and int(imatrix_chunks) < 1:
            raise InputError(f"--imatrix-chunks {imatrix_chunks}: give at least 1")
        mode = "off" if no_imatrix else (str(Path(imatrix).resolve()) if imatrix else "auto")
        if auto_types is not None:
            if auto is None:
                raise InputError("--auto-types names the candidates of --quant auto: add --quant auto (or auto:KL)")
            auto_types = tuple(parse_quants(auto_types))
            if not auto_types:
                raise InputError("--auto-types: name at least one llama.cpp type")
        opts = cls(types, auto, mode, str(Path(imatrix_data).resolve()) if imatrix_data else None,
                   int(imatrix_chunks) if imatrix_chunks is not None else None,
                   TensorTypes.parse(tensor_types, output_tensor_type, token_embedding_type),
                   str(llama_cpp) if llama_cpp else None, bool(keep_all), auto_types)
        if mode == "off":
            need = [t for t in types if t in NEEDS_MATRIX]
            if need:
                raise InputError(f"--quant {','.join(need)} with --no-imatrix: llama.cpp makes "
                                 f"{'these types' if len(need) > 1 else 'this type'} only with an importance matrix. "
                                 "Leave out --no-imatrix (the built-in calibration is used), or give --imatrix-data "
                                 "FILE or --imatrix FILE")
        if (imatrix or imatrix_data) and not opts.any_uses_matrix(moe=True):
            raise InputError(f"{'--imatrix' if imatrix else '--imatrix-data'} with --quant "
                             f"{','.join(types) or '(none)'}: no requested type uses an importance matrix (the float "
                             "types, Q8_0 and MXFP4_MOE ignore it). Add a type that does (Q4_K_M, IQ4_XS, ...) or "
                             "leave the matrix out")
        if (opts.overrides or keep_all) and not (types or auto is not None):
            raise InputError("--tensor-type / --output-tensor-type / --token-embedding-type / --keep-all apply to "
                             "quantized files: add --quant")
        return opts

    def __bool__(self) -> bool:
        return bool(self.types) or self.auto is not None

    def any_uses_matrix(self, moe: bool) -> bool:
        return any(uses_matrix(t) for t in self.types) or (
            self.auto is not None and any(uses_matrix(c.type) for c in self.ladder(moe, True)))

    def ladder(self, moe: bool, matrix: bool) -> list["Candidate"]:
        return ladder(moe, matrix, self.auto_types)

    def planned_types(self) -> list[str]:
        """Every quantized file this run may write at once (doctor's disk estimate): the named
        types and, with ``auto``, every candidate (MoE or not, with and without the matrix)."""
        extra = [c.type for c in self.ladder(True, self.imatrix != "off")] if self.auto is not None else []
        return [*self.types, *extra]

    def wants_matrix(self, moe: bool) -> bool:
        return self.imatrix != "off" and self.any_uses_matrix(moe)

    def needs_tools(self, moe: bool) -> bool:
        return self.wants_matrix(moe) or bool(self.overrides)

    def tools(self, moe: bool):
        """llama.cpp's tools when this run needs them (found now, before any work), else None."""
        if not self.needs_tools(moe):
            return None
        from .llama_tools import find_tools

        try:
            return find_tools(self.llama_cpp)
        except InputError as e:
            if self.overrides or self.imatrix != "auto":
                raise
            raise InputError(f"{e}. Or quantize without an importance matrix: --no-imatrix") from None

    def record(self) -> dict[str, Any]:
        return {"types": list(self.types), "auto": self.auto, "imatrix": self.imatrix,
                "imatrix_data": self.imatrix_data, "imatrix_chunks": self.imatrix_chunks,
                **self.overrides.record(), "keep_all": self.keep_all,
                "auto_types": list(self.auto_types) if self.auto_types is not None else None}


def _budget(word: str) -> float:
    _, sep, value = word.partition(":")
    if not sep:
        return DEFAULT_BUDGET
    try:
        budget = float(value)
    except ValueError:
        budget = -1.0
    if not budget > 0 or budget != budget or budget == float("inf"):
        raise InputError(f"--quant {word}: auto:KL takes a mean-KL budget in nats above 0, e.g. auto:0.05")
    return budget


@dataclass(frozen=True)
class Candidate:
    """One file ``auto`` makes: its type, and whether it is made with the importance matrix."""

    type: str
    matrix: bool

    def suffix(self, with_twin: bool) -> str:
        return self.type + (NO_MATRIX_SUFFIX if with_twin and not self.matrix else "")


def ladder(moe: bool, matrix: bool, types: Sequence[str] | None = None) -> list[Candidate]:
    """The candidates of ``auto``: each of ``types`` (default: each :data:`LADDER` type, and
    :data:`MOE_CANDIDATES` for a MoE model) with the matrix when there is one, and without it too
    where the type can be made without and the matrix changes it; without a matrix, the types that
    can be made without."""
    names = types if types is not None else (*LADDER, *(MOE_CANDIDATES if moe else ()))
    types = [t for t in names if t in ftypes()]
    out = []
    for t in types:
        if matrix:
            out.append(Candidate(t, uses_matrix(t)))
            if uses_matrix(t) and t not in NEEDS_MATRIX:
                out.append(Candidate(t, False))
        elif t not in NEEDS_MATRIX:
            out.append(Candidate(t, False))
    return out


# ------------------------------------------------------------------------------------ stages


def quantize_file(state, *, stage: str, src: Path, src_sha256: str, dst: Path, qtype: str, nthread: int,
                  matrix: tuple[Path, str] | None = None, overrides: TensorTypes = TensorTypes(), tools=None,
                  progress: ProgressFn | None = None, resumed: list[str] | None = None, label: str | None = None):
    """``src`` quantized to ``dst`` as one stage of the run manifest (skipped when its key and its
    output are unchanged). ``matrix``: (path, SHA-256) of the importance matrix. Returns
    (OutputFile, how a resumed output was confirmed or None)."""
    from .api import OutputFile, _describe, _dist_version
    from .runstate import stage_key

    uses = matrix if matrix is not None and uses_matrix(qtype) else None
    via_tool = uses is not None or bool(overrides)
    key = stage_key({"source_sha256": src_sha256, "imatrix_sha256": uses[1] if uses else None},
                    {"type": qtype, "file": dst.name, "llama_cpp": _dist_version("llama_cpp_python"),
                     **({"overrides": overrides.record()} if overrides else {}),
                     **({"tools": tools.record()["version"]} if via_tool and tools is not None else {})})
    what = label or qtype
    prev = state.done(stage, key)
    if prev is not None:
        if resumed is not None:
            resumed.append(stage)
        if progress:
            progress("quantize", 1, 1, f"{what}: unchanged since the last run: skipped")
        return OutputFile(**prev.info["output"]), prev.confirmed
    if progress:
        progress("quantize", 0, 1, what)
    t0 = time.perf_counter()
    res = quantize(src, dst, qtype, nthread=nthread, imatrix=uses[0] if uses else None, overrides=overrides,
                   tools=tools)
    out = _describe(dst, qtype, time.perf_counter() - t0, src.name, res.note)
    out.imatrix = res.imatrix
    out.overrides = res.overrides or None
    state.record(stage, key, {dst: out.sha256}, {"output": asdict(out)})
    if progress:
        progress("quantize", 1, 1, what)
    return out, None


def matrix_stage(state, options: QuantOptions, tools, *, main_file: Path, main_sha256: str, out_dir: Path,
                 name: str, family, prompts: Sequence[Any], context_length: int | None, shapes: dict[str, list[int]],
                 nthread: int, progress: ProgressFn | None = None, resumed: list[str] | None = None
                 ) -> tuple[Path, str, dict[str, Any]]:
    """The importance matrix OUT_DIR/NAME.imatrix.gguf: computed by llama-imatrix on ``main_file``
    (from ``options.imatrix_data`` or the built-in calibration with ``prompts``), or the matrix
    ``options.imatrix`` names, checked against the model and copied in. A stage of the manifest.
    Returns (path, SHA-256, run.json's ``imatrix`` section)."""
    from . import imatrix as im
    from .api import _dist_version
    from .gguf_out import partial_path, sha256_file
    from .runstate import stage_key

    dst = out_dir / f"{name}.imatrix.gguf"
    tool_version = tools.record()["version"] if tools is not None else None
    if options.imatrix not in ("auto", "off"):  # a matrix made before
        given = Path(options.imatrix)
        given_sha = sha256_file(given)
        key = stage_key({"source_sha256": main_sha256, "given_sha256": given_sha}, {"file": dst.name})
        prev = state.done("imatrix", key)
        if prev is not None:
            if resumed is not None:
                resumed.append("imatrix")
            return dst, prev.info["sha256"], prev.info["section"]
        info = im.describe(given)
        coverage = im.check_fits(info, shapes, f"--imatrix {given}")
        tmp = partial_path(dst)
        shutil.copyfile(given, tmp)
        os.replace(tmp, dst)
        section = {"file": dst.name, "computed": False, "given": str(given), "given_sha256": given_sha,
                   "chunks": info["chunks"], "chunk_size": info["chunk_size"], "coverage": coverage,
                   **im._public(info)}
        state.record("imatrix", key, {dst: given_sha}, {"sha256": given_sha, "section": section})
        return dst, given_sha, section
    t0 = time.perf_counter()
    if progress:
        progress("imatrix", 0, 1, "rendering the calibration data")
    data, n_tokens = im.prepare(main_file, family, options.imatrix_data, prompts)
    key = stage_key({"source_sha256": main_sha256, "data_sha256": data.sha256, "tokens": n_tokens},
                    {"file": dst.name, "label": data.label, "chunks": options.imatrix_chunks,
                     "context_length": context_length, "tools": tool_version})
    prev = state.done("imatrix", key)
    if prev is not None:
        if resumed is not None:
            resumed.append("imatrix")
        if progress:
            progress("imatrix", 1, 1, "unchanged since the last run: skipped")
        return dst, prev.info["sha256"], prev.info["section"]
    threads = nthread or (os.cpu_count() or 1)
    section = im.compute(tools, main_file, data, n_tokens, dst, context_length=context_length, threads=threads,
                         max_chunks=options.imatrix_chunks, progress=progress)
    sha = sha256_file(dst)
    section = {"file": dst.name, **section, "sha256": sha,
               "coverage": im.check_fits(im.describe(dst), shapes, str(dst)),
               "tools": tools.record(), "llama_cpp_python": _dist_version("llama_cpp_python"),
               "seconds": round(time.perf_counter() - t0, 3)}
    state.record("imatrix", key, {dst: sha}, {"sha256": sha, "section": section})
    return dst, sha, section


# ------------------------------------------------------------------------------------ auto


def measurements(verify_section: dict[str, Any], candidates: dict[str, Candidate],
                 tensor_bytes: dict[str, int] | None = None) -> list[dict[str, Any]]:
    """One row per candidate file from verify's section: type, matrix, size, mean KL, top-1,
    suite checks passed, the required checks it fails; ``tensor_bytes``: each file's tensor data
    (what :func:`choose` compares: the matrix's few metadata keys are no reason to prefer a file)."""
    files = {f["file"]: f for f in verify_section.get("files") or []}
    fails: dict[str, list[dict[str, Any]]] = {}
    for x in verify_section.get("failures") or []:
        fails.setdefault(x["file"], []).append(x)
    rows = []
    for fname, cand in candidates.items():
        f = files.get(fname) or {}
        m = f.get("metrics") or {}
        passed = total = 0
        for c in verify_section.get("checks") or []:
            r = (c.get("results") or {}).get(fname)
            if r is not None:
                total += 1
                passed += bool(r.get("passed"))
        rows.append({"file": fname, "type": cand.type, "imatrix": cand.matrix, "bytes": f.get("bytes"),
                     "tensor_bytes": (tensor_bytes or {}).get(fname, f.get("bytes")),
                     "kl_mean": m.get("kl_mean"), "kl_p99": m.get("kl_p99"), "top1": m.get("top1"),
                     "checks_passed": passed, "checks": total,
                     "failures": [f"{x['check']}" + (f" [{x['prompt']}]" if x.get("prompt") else "")
                                  for x in fails.get(fname, [])]})
    return rows


def choose(rows: list[dict[str, Any]], budget: float) -> tuple[str | None, list[dict[str, Any]]]:
    """The smallest file (by tensor data, ``tensor_bytes``, else ``bytes``) whose mean KL is at most
    ``budget`` and which fails no required check (ties: the lower KL, then the name); every row
    gets its ``verdict``. Returns (the chosen file or None, the rows)."""
    ok = [r for r in rows if r["kl_mean"] is not None and r["kl_mean"] <= budget and not r["failures"]]
    best = min(ok, key=lambda r: (r.get("tensor_bytes") or r["bytes"], r["kl_mean"], r["file"])) if ok else None
    out = []
    for r in rows:
        if best is not None and r["file"] == best["file"]:
            verdict = "chosen: the smallest file within the budget that passes every required check"
        elif r["failures"]:
            verdict = f"fails {len(r['failures'])} required check(s): {', '.join(r['failures'])}"
        elif r["kl_mean"] is None:
            verdict = "not measured"
        elif r["kl_mean"] > budget:
            verdict = f"over the budget (mean KL {r['kl_mean']:.4g} > {budget:g})"
        else:
            verdict = "within the budget, larger than the chosen file"
        out.append(r | {"chosen": best is not None and r["file"] == best["file"], "verdict": verdict})
    return (best["file"] if best else None), out


def prune_verify(section: dict[str, Any], removed: set[str]) -> dict[str, Any]:
    """verify's section without the files that were removed (their measurements stay in the
    ``quant_auto`` section); ``passed`` follows the failures of the files that remain."""
    s = dict(section)
    s["files"] = [f for f in section.get("files") or [] if f["file"] not in removed]
    s["runs"] = {k: v for k, v in (section.get("runs") or {}).items() if k not in removed}
    s["checks"] = [c | {"results": {k: v for k, v in (c.get("results") or {}).items() if k not in removed}}
                   for c in section.get("checks") or []]
    s["failures"] = [x for x in section.get("failures") or [] if x["file"] not in removed]
    for fact in s.get("fine_tune_facts") or []:
        fact["files_also_failing"] = [f for f in fact.get("files_also_failing") or [] if f not in removed]
    s["passed"] = not s["failures"]
    return s
