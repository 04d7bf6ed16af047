"""The Python API: the same stages the CLI runs.

    from lora2gguf.api import build
    result = build("base-model", "my-adapter", "out", quants=["Q4_K_M", "MXFP4_MOE"])

Flow: inputs -> doctor -> plan -> stream (BF16/F16/F32 GGUF, optional merged safetensors) ->
quantize (llama.cpp) -> verify -> report. Progress goes through a callback; nothing prints.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from . import __version__, arch as arch_registry
from .adapter import load_adapter
from .errors import BlockedError, InputError
from .gguf_out import GGUFStream, sha256_file, tensor_types
from . import hparams, jsonfile, kernel
from .hparams import write_hparams
from .jsonfile import read_json_object
from .merge import RULE as MERGE_RULE
from .plan import make_plan, merged_plan
from .quantize import type_counts
from . import quantrun
from .quantrun import QuantOptions
from .runstate import RunLock, RunState, input_fingerprint, remove_partials, stage_key
from .safetensors_io import Checkpoint
from .sources import apply_adapter, logical_tensors
from .stream import MergedShards, execute, require_space
from .vocab import write_vocab

# progress(stage, done, total, detail)
ProgressFn = Callable[[str, int, int, str], None]


def read_json(path: Path, what: str) -> dict[str, Any]:
    return read_json_object(path, missing=f"expected {what}")


def default_name(adapter_dir: Path) -> str:
    name = Path(adapter_dir).resolve().name
    return name or "model"


@dataclass
class OutputFile:
    file: str
    type: str
    bytes: int
    sha256: str
    seconds: float
    tensor_types: dict[str, int]
    tensors: dict[str, str]
    source: str | None = None
    note: str | None = None
    role: str | None = None  # "lora": a LoRA GGUF; "lora-base": a base GGUF it pairs with (lora_run)
    imatrix: str | None = None  # the importance matrix file it was quantized with
    overrides: dict | None = None  # per-tensor types it was quantized with (quantize.TensorTypes.record)

    def to_json(self) -> dict[str, Any]:
        out = {"file": self.file, "type": self.type, "bytes": self.bytes, "sha256": self.sha256,
               "seconds": round(self.seconds, 3), "from": self.source, "tensor_types": self.tensor_types,
               "tensors": self.tensors, "note": self.note}
        if self.imatrix or self.source:
            out["imatrix"] = self.imatrix
        if self.overrides:
            out["overrides"] = self.overrides
        return out | {"role": self.role} if self.role else out


@dataclass
class BuildResult:
    out_dir: Path
    outputs: list[OutputFile]
    record: dict[str, Any]
    verify: Any = None
    notes: list[str] = field(default_factory=list)

    @property
    def run_json(self) -> Path:
        return self.out_dir / "run.json"


def _run_doctor(base_dir: Path, adapter_dir: Path, out_dir: Path, outputs: Sequence[str], accept: Sequence[str],
                tokenizer: str, free_bytes: int | None = None, *, download=None, base_info=None, stand_in=None):
    """doctor, raising BlockedError on a blocker not accepted. ``stand_in``: the hub.Source whose
    header-only stand-in ``base_dir`` is (the findings then name its snapshot)."""
    from . import doctor as doctor_pkg

    report = doctor_pkg.run(base_dir, adapter_dir, out_dir=out_dir, outputs=tuple(outputs), tokenizer=tokenizer,
                            free_bytes=free_bytes, download=download, base_info=base_info)
    if stand_in is not None:
        stand_in.relabel(report)
    blocking = report.blocking(set(accept))
    if blocking:
        lines = "\n".join(f"  [{f.code}] {f.title}\n      {_indent(f.what)}\n      fix: {f.fix}" for f in blocking)
        err = BlockedError(
            "doctor found blocking problems; nothing was " + ("downloaded or " if download is not None else "")
            + "written:\n" + lines
            + "\nFix them, or accept one you understand with --accept CODE (run `lora2gguf doctor` for details)."
        )
        err.findings = [f.to_dict() for f in blocking]
        raise err
    if report.tokenizer_choice.dir is None:
        raise InputError(f"no tokenizer.json in {adapter_dir} or {base_dir}: {report.tokenizer_choice.reason}")
    return report


def _indent(text: str, max_lines: int = 6) -> str:
    lines = str(text).splitlines() or [""]
    if len(lines) > max_lines:
        lines = lines[:max_lines] + [f"... ({len(lines) - max_lines} more lines: run `lora2gguf doctor`)"]
    return "\n      ".join(lines)


def build(base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path, *, name: str | None = None,
          outtype: str = "bf16", quants: Sequence[str] | str | QuantOptions = (), accept: Sequence[str] = (),
          save_merged: str | Path | None = None, tokenizer: str = "auto", verify: bool = False,
          nthread: int = 0, progress: ProgressFn | None = None, command: Sequence[str] | None = None,
          verify_options: dict[str, Any] | None = None, keep_mxfp4: bool = False,
          lora_gguf: str | None = None, base_gguf: Sequence[str | Path] = (),
          base_revision: str | None = None, adapter_revision: str | None = None,
          base_info=None) -> BuildResult:
    """Merge `adapter_dir` into `base_dir` while writing OUT_DIR/NAME-<OUTTYPE>.gguf, quantize it
    to each of `quants` with llama.cpp, record everything in OUT_DIR/run.json, and verify when
    asked. `quants`: llama.cpp types by name (``"Q4_K_M,IQ4_XS"``, ``"auto:0.05"``), or a
    :class:`lora2gguf.quantrun.QuantOptions` with the importance matrix's source and per-tensor
    types (``QuantOptions.of("Q4_K_M", imatrix_data="chats.jsonl")``); a matrix is computed (on
    the built-in calibration unless given) for every type that uses one. ``lora_gguf`` (f32,
    f16, bf16, q8_0): also write the adapter as a GGUF LoRA
    (NAME-LoRA-<TYPE>.gguf) and the base GGUFs it pairs with (NAME-base-*.gguf), or pair it with
    the base GGUFs ``base_gguf`` names (lora_run). Raises a Lora2GGUFError subclass with an
    actionable message on bad input.

    `base_dir` and `adapter_dir` are folders or hub ids (a str ``org/name``, ``org/name@revision``,
    or `base_revision` / `adapter_revision`; a Path is always a folder), resolved by
    :mod:`lora2gguf.hub` from the Hugging Face cache first; a base to download is checked by doctor
    (the download counted in its disk check) before a byte of its weights is fetched. `base_info`:
    the base's inspection made before (:func:`lora2gguf.inspect.inspect_base`; :mod:`lora2gguf.batch`
    inspects a base once)."""
    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    outtype = outtype.lower()
    qopts = quants if isinstance(quants, QuantOptions) else QuantOptions.of(quants)
    quant_list = list(qopts.types)
    if qopts.auto is not None and not verify:
        raise InputError("--quant auto chooses the file by verifying every candidate against the fine-tune: "
                         "leave out --no-verify (or name the types yourself)")
    if keep_mxfp4 and qopts.auto is not None:
        raise InputError("--keep-mxfp4 with --quant auto: with kept MXFP4 experts only MXFP4_MOE can be made; "
                         "use --quant MXFP4_MOE, or build without --keep-mxfp4 to try the other types")
    if keep_mxfp4 and set(quant_list) - {"MXFP4_MOE"}:
        raise InputError(
            f"--keep-mxfp4 with --quant {','.join(q for q in quant_list if q != 'MXFP4_MOE')}: llama.cpp does not "
            "requantize MXFP4 tensors to other types. With --keep-mxfp4 use --quant MXFP4_MOE (experts stay MXFP4, "
            "the rest becomes Q8_0); for other types build without --keep-mxfp4 (the experts are then decoded).")
    with _resolved(base_dir, adapter_dir, out_dir, [outtype.upper(), *qopts.planned_types()], accept, tokenizer,
                   base_revision, adapter_revision, progress) as inputs:
        base_dir, adapter_dir = Path(inputs.base.path), Path(inputs.adapter.path)
    name = name or (inputs.adapter.repo.split("/")[-1] if inputs.adapter.is_hub else default_name(adapter_dir))
    stages: dict[str, Any] = {}
    if base_gguf and not lora_gguf:
        raise InputError("--base-gguf names base GGUFs for a LoRA GGUF: add --lora-gguf")
    lora_options = None
    if lora_gguf:
        from .lora_run import LoraOptions

        lora_options = LoraOptions.of(lora_gguf, accept, base_gguf)

    raw_config = read_json(base_dir / "config.json", "the base model's config")
    arch = arch_registry.for_config(raw_config, where=str(base_dir / "config.json"))
    config = arch.normalize_config(raw_config)
    hparams.validate(arch, config, str(base_dir / "config.json"))

    out_dir.mkdir(parents=True, exist_ok=True)
    with RunLock(out_dir), _forgetting_json():
        return _build_locked(base_dir, adapter_dir, out_dir, config=config, arch=arch, name=name, outtype=outtype,
                             qopts=qopts, accept=accept, save_merged=save_merged, tokenizer=tokenizer,
                             verify=verify, nthread=nthread, progress=progress, command=command,
                             verify_options=verify_options, stages=stages, t_start=t_start, keep_mxfp4=keep_mxfp4,
                             lora_options=lora_options, base_info=base_info, inputs_record=inputs.record())


def _resolved(base, adapter, out_dir: Path, outputs: Sequence[str], accept: Sequence[str], tokenizer: str,
              base_revision: str | None, adapter_revision: str | None, progress: ProgressFn | None):
    """BASE and ADAPTER resolved to folders (lora2gguf.hub): a base whose weights must be downloaded
    is first checked by doctor on its header-only stand-in, the download counted, then fetched."""
    from . import hub

    inputs = hub.open_inputs(base, [adapter], base_revision=base_revision, adapter_revision=adapter_revision,
                             progress=progress)
    try:
        if inputs.base.pending:
            if inputs.base.preview is not None:
                # outputs a previous run finished count as free, as in the build's own doctor
                credit = RunState.load(out_dir).recorded_bytes()
                free = shutil.disk_usage(out_dir).free + credit if credit else None
                with _gc_paused(), _forgetting_json():
                    _run_doctor(inputs.base.path, inputs.adapter.path, out_dir, outputs, accept, tokenizer, free,
                                download=inputs.base.to_download(), stand_in=inputs.base)
            inputs.base.fetch(progress)
    except BaseException:
        inputs.close()
        raise
    return inputs


def _build_locked(base_dir: Path, adapter_dir: Path, out_dir: Path, *, config, arch, name, outtype, qopts,
                  accept, save_merged, tokenizer, verify, nthread, progress, command, verify_options, stages,
                  t_start, keep_mxfp4=False, lora_options=None, base_info=None, inputs_record=None) -> BuildResult:
    """The build with OUT_DIR locked: stages whose key (input fingerprints, options, version) and
    outputs (SHA-256) match the manifest (runstate) are skipped; the others run."""
    removed = remove_partials(out_dir)
    state = RunState.load(out_dir)
    quant_list = list(qopts.types)
    resumed: list[str] = []

    t0 = time.perf_counter()
    # files a previous run finished count as free space for doctor's estimate: a resumed stage
    # does not write them again, a redone one replaces them
    credit = state.recorded_bytes()
    free = shutil.disk_usage(out_dir).free + credit if credit else None
    with _gc_paused():
        report = _run_doctor(base_dir, adapter_dir, out_dir, [outtype.upper(), *qopts.planned_types()], accept,
                             tokenizer, free, base_info=base_info)
    stages["doctor"] = {"seconds": round(time.perf_counter() - t0, 3)}
    choice = report.tokenizer_choice
    base_generation_config = report.inspection.base.generation_config if report.inspection else {}

    t0 = time.perf_counter()
    inspected = report.inspection.base.checkpoint if report.inspection is not None else None
    ckpt = inspected if inspected is not None else Checkpoint.open(base_dir)  # the headers doctor read
    sources = logical_tensors(ckpt)
    adapter = load_adapter(adapter_dir, _shapes(arch, sources), arch)
    sources = apply_adapter(sources, adapter)
    plan = make_plan(arch, config, sources, adapter, outtype, keep_mxfp4=keep_mxfp4)
    config = plan.config  # a vocabulary resized by the adapter's embeddings says so
    moe = any("_exps." in t.name for t in plan.outputs)
    tools = qopts.tools(moe)  # llama.cpp's tools, when the matrix or per-tensor types need them: found now
    vocab_size = int(config.get("vocab_size", 0))
    lplan = None
    if lora_options is not None:  # what llama.cpp cannot apply stops the run before anything is written
        from . import lora_run

        lplan = lora_run.prepare(arch, config, ckpt, adapter, lora_options)

    main_file = out_dir / f"{name}-{outtype.upper()}.gguf"
    info: dict[str, Any] = {}

    def add_metadata(w, p=plan, title=name) -> None:
        w.add_type("model")
        w.add_name(title)
        w.add_file_type(int(p.file_type))
        w.add_quantization_version(2)
        write_hparams(w, arch, config, str(base_dir / "config.json"))
        vocab, special = write_vocab(w, choice.dir, vocab_size, arch.vocab_for(config), config=config,
                                     generation_config=base_generation_config)
        info["vocab"], info["special"] = vocab, special

    build_key = stage_key(
        input_fingerprint(base_dir, adapter_dir),
        {"outtype": outtype, "name": name, "tokenizer": choice.source,
         "save_merged": str(Path(save_merged).resolve()) if save_merged else None, "gguf": _dist_version("gguf"),
         "keep_mxfp4": keep_mxfp4})
    prev = state.done("build", build_key)
    if prev is not None:
        import gguf

        with _gc_paused():
            add_metadata(gguf.GGUFWriter(None, arch.gguf_arch_name))  # vocab facts for the record; writes nothing
        jsonfile.forget()
        stages["build"] = dict(prev.info.get("stats") or {}) | {"resumed": True, "confirmed": prev.confirmed}
        outputs = [OutputFile(**prev.info["output"])]
        resumed.append("build")
        if progress:
            progress("build", 1, 1, "unchanged since the last run: skipped")
    else:
        require_space(out_dir, plan.gguf_tensor_bytes + 64 * 1024 * 1024)
        if save_merged and plan.kept_mxfp4:
            raise InputError("--save-merged with --keep-mxfp4: the merged safetensors need the experts decoded; "
                             "run --save-merged without --keep-mxfp4")
        def header_metadata(w) -> None:  # on the stream's header thread, while the workers start merging
            try:
                with _gc_paused():
                    add_metadata(w)
            finally:
                jsonfile.forget()  # tokenizer.json, parsed once for doctor and the vocabulary

        stream = GGUFStream(main_file, arch.gguf_arch_name, header_metadata, plan.outputs, background=True)

        def on_progress(done: int, total: int, what: str) -> None:
            if progress:
                progress("build", done, total, what)

        stats = execute(plan, stream, progress=on_progress, threads=nthread)
        stream.finish()
        merged_files: list[Path] = []
        if save_merged:
            mplan = merged_plan(plan)
            merged = MergedShards.create(Path(save_merged), mplan)
            execute(mplan, merged, threads=nthread)
            merged.finish(base_dir)
            merged_files = sorted(p for p in Path(save_merged).iterdir() if p.is_file())
        build_seconds = time.perf_counter() - t0
        stages["build"] = {"seconds": round(build_seconds, 3), "bytes_read": stats.bytes_read,
                           "bytes_written": stats.bytes_written, "threads": stats.threads,
                           "merged_units": stats.merged_units, "merge_kernel": kernel.status(),
                           "peak_rss_bytes": _peak_rss()}
        out = _describe(main_file, outtype.upper(), build_seconds, None, None, sha256=stream.sha256,
                        types=stream.header_types)
        outputs = [out]
        state.record("build", build_key, {main_file: out.sha256, **{p: None for p in merged_files}},
                     {"output": asdict(out), "stats": stages["build"]})

    t_q = time.perf_counter()
    main_sha = outputs[0].sha256
    q_confirmed: dict[str, str] = {}  # resumed quantize stages: how each file was confirmed
    matrix = None
    imatrix_section = None
    if qopts.wants_matrix(moe):
        t0 = time.perf_counter()
        from .verify.suite import load_suite

        mpath, msha, imatrix_section = quantrun.matrix_stage(
            state, qopts, tools, main_file=main_file, main_sha256=main_sha, out_dir=out_dir, name=name, family=arch,
            prompts=load_suite((verify_options or {}).get("suite")).prompts,
            context_length=config.get("max_position_embeddings"),
            shapes={t.name: list(reversed(t.shape)) for t in plan.outputs}, nthread=nthread, progress=progress,
            resumed=resumed)
        matrix = (mpath, msha)
        stages["imatrix"] = {"seconds": round(time.perf_counter() - t0, 3)}
    quantized = [(q, out_dir / f"{name}-{q}.gguf", f"quantize:{q}", True) for q in quant_list]
    auto_prev = None
    candidates: dict[str, quantrun.Candidate] = {}
    if qopts.auto is not None:
        auto_key = _auto_key(qopts, main_sha, matrix, verify_options)
        auto_prev = state.done("auto", auto_key)
        if auto_prev is None:
            ladder = qopts.ladder(moe, matrix is not None)
            twins = {c.type for c in ladder if not c.matrix} & {c.type for c in ladder if c.matrix}
            for c in ladder:
                fname = f"{name}-{c.suffix(c.type in twins)}.gguf"
                candidates[fname] = c
                if all(dst.name != fname for _, dst, _, _ in quantized):  # a type --quant names is made once
                    quantized.append((c.type, out_dir / fname, f"quantize:{c.suffix(c.type in twins)}", c.matrix))
    for q, dst, stage, with_matrix in quantized:
        out, confirmed = quantrun.quantize_file(
            state, stage=stage, src=main_file, src_sha256=main_sha, dst=dst, qtype=q, nthread=nthread,
            matrix=matrix if with_matrix else None, overrides=qopts.overrides, tools=tools, progress=progress,
            resumed=resumed, label=stage.split(":", 1)[1])
        outputs.append(out)
        q_confirmed.update(confirmed or {})
    if auto_prev is not None:
        outputs += [OutputFile(**o) for o in auto_prev.info["outputs"]]
        resumed.append("auto")
    if quantized or auto_prev is not None:
        stages["quantize"] = {"seconds": round(time.perf_counter() - t_q, 3)}
        if q_confirmed:
            stages["quantize"]["confirmed"] = q_confirmed
    lora_section = None
    if lplan is not None:
        t_l = time.perf_counter()
        made, lora_section = lora_run.build_stage(
            lplan, lora_options, arch=arch, config=config, ckpt=ckpt, out_dir=out_dir, name=name, outtype=outtype,
            quant_list=quant_list, state=state, inputs=build_key["inputs"], add_metadata=add_metadata,
            nthread=nthread, progress=progress, resumed=resumed, matrix=matrix, overrides=qopts.overrides,
            tools=tools)
        outputs += made
        stages["lora"] = {"seconds": round(time.perf_counter() - t_l, 3)}

    vocab, special = info["vocab"], info["special"]
    eos_id = special.special_token_ids.get("eos")
    from .doctor.findings import accepted_codes

    accepted = accepted_codes(accept)  # renamed codes too
    record: dict[str, Any] = {
        "lora2gguf_version": __version__,
        "command": list(command) if command is not None else list(sys.argv),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "base_dir": str(base_dir.resolve()),
        "adapter_dir": str(adapter_dir.resolve()),
        # what BASE and ADAPTER were: folders, or hub repos (the revision asked for, the commit resolved)
        "inputs": inputs_record or {},
        "name": name,
        "architecture": arch.name,
        "outtype": outtype,
        "tokenizer": {"source": choice.source, "dir": str(Path(choice.dir).resolve()), "reason": choice.reason},
        "findings": [f.to_dict() | {"accepted": f.code in accepted} for f in report.findings],
        "adapter": {
            "r": adapter.config.get("r"), "lora_alpha": adapter.config.get("lora_alpha"),
            "use_rslora": adapter.use_rslora, "pairs": len(adapter.all_terms),
            "targets": sorted({t.target.split(".")[-2] if t.kind != "experts" else t.target.split(".")[-1]
                               for t in adapter.all_terms}),
            "full_weights": {n: list(info.shape) for n, info in sorted(adapter.replaced.items())},
            "trained_token_rows": {n: list(r.indices) for n, r in sorted(adapter.token_rows.items())},
        },
        "base_storage": dict(type_counts({n: s.storage for n, s in sources.items()})),
        "keep_mxfp4": {"requested": keep_mxfp4, "tensors": plan.kept_mxfp4},
        "rounding": MERGE_RULE,
        "quantization": {"options": qopts.record(), "tools": tools.record() if tools is not None else None,
                         "routes": "files with an importance matrix or per-tensor types: llama.cpp's llama-quantize; "
                                   "the others: llama_model_quantize in this process (the same code)"},
        **({"imatrix": imatrix_section} if imatrix_section is not None else {}),
        **({"quant_auto": auto_prev.info["section"]} if auto_prev is not None else {}),
        "notes": list(plan.notes),
        "outputs": [o.to_json() for o in outputs],
        **({"lora": lora_section} if lora_section is not None else {}),
        "stages": stages,
        "resumed": resumed,
        "removed_partials": [p.name for p in removed],
        "technical": {
            "architecture": arch.gguf_arch_name,
            "context_length": config.get("max_position_embeddings"),
            "vocab_size": vocab_size,
            "n_layers": config.get("num_hidden_layers"),
            "n_experts": config.get("num_local_experts"),
            "n_experts_used": config.get("num_experts_per_tok"),
            "hidden_size": config.get("hidden_size"),
            "eos_token_id": eos_id,
            "eos_token": vocab.tokens[eos_id] if eos_id is not None and eos_id < len(vocab.tokens) else None,
            # every end-of-generation token: the tokenizer's and the configs' (vocab.eog_ids) and
            # the ones the family's chat format ends turns with
            "eog_tokens": _eog_tokens(vocab, arch),
            "special_tokens": {k: {"id": v, "token": vocab.tokens[v] if v < len(vocab.tokens) else None}
                               for k, v in special.special_token_ids.items()},
            "chat_template": special.chat_template if isinstance(special.chat_template, str) else None,
            "chat_format": arch.chat_format,
        },
    }
    stages["total"] = {"seconds": round(time.perf_counter() - t_start, 3)}
    write_record(out_dir, record)
    result = BuildResult(out_dir, outputs, record, notes=list(plan.notes) + (lplan.notes if lplan else []))
    if candidates:
        result.verify = _auto_stage(out_dir, state, result, candidates, qopts, auto_key, verify_options or {},
                                    progress)
    elif verify:
        result.verify = _verify_stage(out_dir, state, outputs, record, verify_options or {}, progress)
    return result


def _verify_key(outputs: list[OutputFile], record: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """What verify's result depends on: the outputs (SHA-256), the base GGUFs a LoRA GGUF is
    paired with (outside OUT_DIR, by SHA-256), the options and the versions."""
    pairs = (record.get("lora") or {}).get("pairs") or []
    return stage_key({**{o.file: o.sha256 for o in outputs}, **({"lora_pairs": pairs} if pairs else {})},
                     {"options": options, "llama_cpp": _dist_version("llama_cpp_python"),
                      "transformers": _dist_version("transformers"), "peft": _dist_version("peft")})


def _record_verify(state: RunState, key: dict[str, Any], result) -> None:
    made = [p for p in (result.report_md, result.report_html, *result.modelfiles) if p is not None]
    state.record("verify", key, {p: None for p in made},
                 {"section": result.section,
                  "files": {"report_md": result.report_md.name if result.report_md else None,
                            "report_html": result.report_html.name if result.report_html else None,
                            "modelfiles": [Path(m).name for m in result.modelfiles]}})


def _verify_stage(out_dir: Path, state: RunState, outputs: list[OutputFile], record: dict[str, Any],
                  options: dict[str, Any], progress: ProgressFn | None):
    """verify, or its recorded result when the outputs (SHA-256 as recorded), options and versions
    are those it verified last time and its report files are unchanged."""
    from . import verify as verify_pkg

    key = _verify_key(outputs, record, options)
    prev = state.done("verify", key)
    if prev is not None and isinstance(prev.info.get("section"), dict):
        section = prev.info["section"]
        record["verify"] = section
        record["stages"]["verify"] = {"seconds": section.get("seconds"), "resumed": True,
                                      "confirmed": prev.confirmed}
        record["resumed"].append("verify")
        write_record(out_dir, record)
        if progress:
            progress("verify", 1, 1, "unchanged since the last run: skipped")
        files = prev.info.get("files") or {}
        return verify_pkg.VerifyResult(
            out_dir, bool(section.get("passed")), list(section.get("failures") or []), record,
            report_md=out_dir / files["report_md"] if files.get("report_md") else None,
            report_html=out_dir / files["report_html"] if files.get("report_html") else None,
            modelfiles=[out_dir / m for m in files.get("modelfiles", [])])
    result = verify_pkg.verify(out_dir, progress=progress, **options)
    record["verify"] = result.section  # the BuildResult's record says what run.json now says
    record["stages"]["verify"] = result.record.get("stages", {}).get("verify")
    _record_verify(state, key, result)
    return result


def _auto_key(qopts: QuantOptions, main_sha: str, matrix, verify_options: dict[str, Any] | None) -> dict[str, Any]:
    return stage_key({"source_sha256": main_sha, "imatrix_sha256": matrix[1] if matrix else None},
                     {"budget": qopts.auto, "ladder": qopts.auto_types or quantrun.LADDER, "keep_all": qopts.keep_all,
                      "overrides": qopts.overrides.record(), "verify": verify_options or {},
                      "llama_cpp": _dist_version("llama_cpp_python")})


def _auto_stage(out_dir: Path, state: RunState, result: BuildResult, candidates: dict[str, "quantrun.Candidate"],
                qopts: QuantOptions, key: dict[str, Any], verify_options: dict[str, Any], progress: ProgressFn | None):
    """``--quant auto``: verify every candidate (with the other outputs) against the fine-tune in
    one run, choose the smallest within the budget that passes every required check
    (quantrun.choose), remove the others (unless ``keep_all``; the types named in --quant stay),
    and write the report on what remains, with the measurements of all in run.json's
    ``quant_auto``. No candidate within the budget: nothing is removed and the run fails."""
    from . import report as report_pkg, verify as verify_pkg

    record = result.record
    vres = verify_pkg.verify(out_dir, progress=progress, report=False, **verify_options)
    record.update(vres.record)
    from .gguf_header import read_header

    data_bytes = {f: sum(t.nbytes for t in read_header(out_dir / f).tensors.values()) for f in candidates}
    chosen, rows = quantrun.choose(quantrun.measurements(vres.section, candidates, data_bytes), qopts.auto)
    named = {f"{record['name']}-{t}.gguf" for t in qopts.types}
    removed = set() if (chosen is None or qopts.keep_all) else {f for f in candidates if f != chosen and f not in named}
    for f in sorted(removed):
        (out_dir / f).unlink(missing_ok=True)
    section = quantrun.prune_verify(vres.section, removed)
    auto = {"budget": qopts.auto, "chosen": chosen, "kept_all": qopts.keep_all, "removed": sorted(removed),
            "candidates": rows, "imatrix": (record.get("imatrix") or {}).get("file")}
    if chosen is None:
        best = min((r for r in rows if r["kl_mean"] is not None), key=lambda r: r["kl_mean"], default=None)
        section["failures"] = section["failures"] + [{
            "file": "--quant auto", "check": "KL budget", "prompt": None, "against": "reference",
            "detail": f"no candidate has a mean KL within {qopts.auto:g} nats and passes every required check"
                      + (f" (the closest: {best['file']}, mean KL {best['kl_mean']:.4g})" if best else ""),
            "why": "every candidate was kept for you to compare; raise the budget (auto:KL) or ship a larger type"}]
        section["passed"] = False
    record["verify"] = section
    record["quant_auto"] = auto
    kept = [o for o in result.outputs if o.file not in removed]
    result.outputs[:] = kept
    record["outputs"] = [o.to_json() for o in kept]
    write_record(out_dir, record)
    paths = report_pkg.write_report(out_dir, record)
    vres = verify_pkg.VerifyResult(out_dir, bool(section["passed"]), list(section["failures"]), record,
                                   report_md=paths.markdown, report_html=paths.html, modelfiles=list(paths.modelfiles))
    _record_verify(state, _verify_key(kept, record, verify_options), vres)
    if chosen is not None:
        auto_outputs = [o for o in kept if o.file in candidates and o.file not in named]
        state.record("auto", key, {out_dir / o.file: o.sha256 for o in auto_outputs},
                     {"section": auto, "outputs": [asdict(o) for o in auto_outputs]})
    return vres


def _shapes(family, sources) -> dict[str, tuple[int, ...]]:
    """The base's tensor shapes an adapter can target: its tensors, and the fused expert
    parameters its per-expert tensors stand for (the family's ``fused``)."""
    shapes = {n: tuple(s.shape) for n, s in sources.items()}
    return {**family.fused_shapes(shapes), **shapes}


def _eog_tokens(vocab, family) -> dict[str, int]:
    ids = set(vocab.eog_ids) | {i for t in family.eog_tokens if (i := vocab.id_of(t)) is not None}
    return {vocab.tokens[i]: i for i in sorted(ids) if i < len(vocab.tokens)}


def _dist_version(dist: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:  # not installed, or no metadata
        return None


@contextlib.contextmanager
def _forgetting_json():
    """Whatever happens, the run does not leave parsed tokenizer files in jsonfile's keep."""
    try:
        yield
    finally:
        jsonfile.forget()


@contextlib.contextmanager
def _gc_paused():
    """Reading a tokenizer.json (a 27 MB one for a 200k-token vocabulary) makes millions of small objects and no
    reference cycles; the cyclic collector would walk them again and again (~0.15 s a parse)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _describe(path: Path, type_name: str, seconds: float, source: str | None, note: str | None,
              sha256: str | None = None, types: dict[str, str] | None = None) -> OutputFile:
    types = types if types is not None else tensor_types(path)
    return OutputFile(path.name, type_name, path.stat().st_size, sha256 or sha256_file(path), seconds,
                      type_counts(types), types, source, note)


def write_record(out_dir: Path, record: dict[str, Any]) -> Path:
    path = Path(out_dir) / "run.json"
    tmp = path.with_name("run.json.partial")
    tmp.write_text(json.dumps(record, indent=2, default=str))
    tmp.replace(path)
    return path


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def doctor(base_dir: str | Path, adapter_dir: str | Path, *, base_revision: str | None = None,
           adapter_revision: str | None = None, download_progress: ProgressFn | None = None, **kwargs):
    """doctor on a base and an adapter, folders or hub ids (:mod:`lora2gguf.hub`). A base that is
    not in the Hugging Face cache is not downloaded: its small files are, and its safetensors
    headers are read from the hub, and the resources finding counts the download still to come.
    An adapter repo is downloaded (it is small)."""
    from . import doctor as doctor_pkg, hub

    try:
        with hub.open_inputs(base_dir, [adapter_dir], base_revision=base_revision, adapter_revision=adapter_revision,
                             progress=download_progress) as inputs:
            report = doctor_pkg.run(Path(inputs.base.path), Path(inputs.adapter.path),
                                    download=inputs.base.to_download(), **kwargs)
            inputs.base.relabel(report)
            if inputs.base.is_hub or inputs.adapter.is_hub:
                report.inputs = inputs.record()
            return report
    finally:
        jsonfile.forget()  # the tokenizer.json doctor parsed, kept for a build that is not coming


def export_adapter(base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path, *, name: str | None = None,
                   outtype: str = "f16", accept: Sequence[str] = (), base_gguf: Sequence[str | Path] = (),
                   verify: bool = True, verify_options: dict[str, Any] | None = None,
                   progress: ProgressFn | None = None, command: Sequence[str] | None = None):
    """Write the adapter as a GGUF LoRA, OUT_DIR/NAME-LoRA-<OUTTYPE>.gguf (f32, f16, bf16, q8_0), that
    llama.cpp applies at load time on a base GGUF; read are the adapter and the base's config and
    headers only. ``accept``: codes of lora_gguf.LEFT_OUT to leave out what llama.cpp cannot apply
    (otherwise BlockedError names it). ``base_gguf``: base GGUFs to check the adapter against
    (architecture, tensor shapes; SHA-256 recorded) and, with ``verify``, to run it on in llama.cpp
    against the fine-tune. Returns lora_run.AdapterResult; OUT_DIR/run.json records the run."""
    from . import lora_run

    options = lora_run.LoraOptions.of(outtype, accept, base_gguf)
    with _forgetting_json():
        return lora_run.export(base_dir, adapter_dir, out_dir, name=name, options=options, verify=verify,
                               verify_options=verify_options, progress=progress, command=command)


def verify(out_dir: str | Path, **kwargs):
    """Verify the GGUF files of a build's output folder (which is locked meanwhile)."""
    from . import verify as verify_pkg

    with RunLock(out_dir):
        return verify_pkg.verify(Path(out_dir), **kwargs)
