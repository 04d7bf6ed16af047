"""GGUF LoRA adapters in a run: the ``lora2gguf adapter`` command, and ``build --lora-gguf``.

- ``adapter BASE_DIR ADAPTER_DIR -o OUT_DIR``: the adapter file alone (lora_gguf.py), from the
  adapter and the base's config and safetensors headers: seconds, whatever the base's size. With
  ``--base-gguf FILE`` (repeatable) each base GGUF is checked against the adapter (architecture,
  every adapted tensor's shape), recorded with its SHA-256 (hashed once: a rerun confirms the
  file by its fingerprint, runstate.RunState.input_sha256), and verify runs base + adapter in
  llama.cpp against the fine-tune.
- ``build ... --lora-gguf``: besides the merged GGUFs, the adapter file and the base GGUFs it pairs
  with: ``NAME-base-<OUTTYPE>.gguf`` (the base without the adapter, with the same tokenizer and
  metadata as the merged file) and one per ``--quant`` type, unless ``--base-gguf`` names base
  GGUFs to pair with instead. verify then shows each base + adapter beside the merged file of the
  same type.

Either way run.json lists the adapter (``role: lora``) and the base files (``role: lora-base``,
which verify runs only with the adapter) among its outputs, and its ``lora`` section says what
the file holds (alpha, each tensor's rank and folds, what was left out) and which base files it
was checked against. Stages resume as the build's do (runstate).
"""

from __future__ import annotations

import datetime as _dt
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from . import __version__
from .errors import InputError
from .lora_gguf import OUTTYPES, BaseFile, LoraPlan, check_base, plan_lora, write_lora

ProgressFn = Callable[[str, int, int, str], None]

ROLE_ADAPTER = "lora"
ROLE_BASE = "lora-base"


@dataclass(frozen=True)
class LoraOptions:
    """What the LoRA GGUF is to be: its type, the parts the user accepts leaving out (codes of
    lora_gguf.LEFT_OUT), and the base GGUFs to pair it with (none: build writes them)."""

    outtype: str = "f16"
    accept: tuple[str, ...] = ()
    base_gguf: tuple[Path, ...] = ()

    @classmethod
    def of(cls, outtype: str = "f16", accept: Sequence[str] = (), base_gguf: Sequence[str | Path] = ()) -> "LoraOptions":
        outtype = (outtype or "f16").lower()
        if outtype not in OUTTYPES:
            raise InputError(f"--lora-gguf / --outtype {outtype!r}: a LoRA GGUF is one of {', '.join(OUTTYPES)}")
        return cls(outtype, tuple(a.upper() for a in accept), tuple(Path(p) for p in base_gguf))


def adapter_file_name(name: str, outtype: str) -> str:
    return f"{name}-LoRA-{outtype.upper()}.gguf"


def prepare(arch, config, ckpt, adapter, options: LoraOptions) -> LoraPlan:
    """The adapter file's plan, with everything llama.cpp cannot apply either accepted or raised
    (BlockedError) before anything is written."""
    from .sources import logical_tensors

    lplan = plan_lora(arch, config, logical_tensors(ckpt), adapter, options.outtype)
    lplan.check_accepted(options.accept)
    return lplan


def _gguf_version() -> str | None:
    from .api import _dist_version

    return _dist_version("gguf")


def write_adapter(lplan: LoraPlan, options: LoraOptions, *, out_dir: Path, name: str, state, inputs: Any,
                  progress: ProgressFn | None = None):
    """The adapter file in OUT_DIR, or the one a previous run wrote with the same inputs and
    options. Returns (OutputFile, resumed)."""
    from .api import OutputFile, _describe
    from .runstate import stage_key

    path = out_dir / adapter_file_name(name, lplan.outtype)
    key = stage_key(inputs, {"outtype": lplan.outtype, "name": name, "accept": sorted(options.accept),
                             "gguf": _gguf_version(), "file": path.name})
    prev = state.done("lora", key)
    if prev is not None:
        if progress:
            progress("lora", 1, 1, "unchanged since the last run: skipped")
        return OutputFile(**prev.info["output"]), True

    def on_progress(done: int, total: int, what: str) -> None:
        if progress:
            progress("lora", done, total, what)

    w = write_lora(lplan, path, name=name, progress=on_progress)
    left = [x for x in lplan.left_out]
    note = ("left out (accepted): " + "; ".join(f"[{x.code}] {x.what}" for x in left)) if left else None
    out = _describe(path, lplan.type_name, w.seconds, None, note, sha256=w.sha256)
    state.record("lora", key, {path: out.sha256}, {"output": asdict(out)})
    return out, False


def pair_bases(lplan: LoraPlan, paths: Sequence[Path], out_dir: Path, known: dict[str, str] | None = None,
               progress: ProgressFn | None = None, state=None) -> list[BaseFile]:
    """Each base GGUF checked against the adapter (lora_gguf.check_base: its header), with its
    SHA-256: the one this run recorded when it wrote the file; else, for a file given with
    --base-gguf (13-40 GB), the one the run manifest ``state`` recorded while the file's
    fingerprint is unchanged (RunState.input_sha256), so that a rerun does not read it again;
    else hashed here. BaseFile.confirmed says which."""
    from .gguf_out import sha256_file

    known = known or {}
    out = []
    for i, p in enumerate(paths):
        if progress:
            progress("lora", i, len(paths), f"checking {Path(p).name}")
        base = check_base(lplan, p, hash_file=False)
        sha, how = known.get(str(Path(p).resolve())), "written"
        if sha is None:
            sha, how = state.input_sha256(p) if state is not None else (sha256_file(Path(p)), "sha256")
        out.append(replace(base, sha256=sha, confirmed=how))
    return out


def section(lplan: LoraPlan, options: LoraOptions, output, bases: Sequence[BaseFile], out_dir: Path) -> dict[str, Any]:
    return {"file": output.file, "type": output.type, "sha256": output.sha256, "bytes": output.bytes,
            **lplan.record(options.accept),
            "pairs": [b.to_dict(out_dir) for b in bases]}


def with_role(outputs, role: str) -> list:
    for o in outputs:
        o.role = role
    return list(outputs)


# --------------------------------------------------------------------------- build --lora-gguf


def build_stage(lplan: LoraPlan, options: LoraOptions, *, arch, config, ckpt, out_dir: Path, name: str,
                outtype: str, quant_list: Sequence[str], state, inputs: Any, add_metadata, nthread: int = 0,
                progress: ProgressFn | None = None, resumed: list[str] | None = None, matrix=None,
                overrides=None, tools=None):
    """build --lora-gguf after the merged files: the base GGUFs (unless --base-gguf names them)
    and the adapter file. ``add_metadata(writer, plan, title)`` writes a model GGUF's metadata as
    the build writes the merged file's. ``matrix`` (path, SHA-256), ``overrides``, ``tools``: the
    base files are quantized as the merged ones (quantrun.quantize_file): the importance matrix of
    the merged model measures the inputs the base weights get with the adapter applied. Returns
    (outputs, run.json's lora section)."""
    from .api import OutputFile, _describe, _dist_version
    from .gguf_out import GGUFStream
    from .plan import make_plan
    from .quantize import TensorTypes
    from .quantrun import quantize_file
    from .runstate import stage_key
    from .sources import logical_tensors
    from .stream import execute, require_space

    resumed = resumed if resumed is not None else []
    outputs: list = []
    known: dict[str, str] = {}
    base_paths: list[Path] = list(options.base_gguf)
    if not base_paths:
        bplan = make_plan(arch, config, logical_tensors(ckpt), None, outtype)
        main = out_dir / f"{name}-base-{outtype.upper()}.gguf"
        key = stage_key(inputs, {"outtype": outtype, "name": name, "gguf": _dist_version("gguf"), "file": main.name})
        prev = state.done("lora-base", key)
        if prev is not None:
            out = OutputFile(**prev.info["output"])
            resumed.append("lora-base")
            if progress:
                progress("base", 1, 1, "unchanged since the last run: skipped")
        else:
            t0 = time.perf_counter()
            require_space(out_dir, bplan.gguf_tensor_bytes + 64 * 1024 * 1024)
            stream = GGUFStream(main, arch.gguf_arch_name, lambda w: add_metadata(w, bplan, f"{name}-base"),
                                bplan.outputs)

            def on_progress(done: int, total: int, what: str) -> None:
                if progress:
                    progress("base", done, total, what)

            execute(bplan, stream, progress=on_progress, threads=nthread)
            stream.finish()
            out = _describe(main, outtype.upper(), time.perf_counter() - t0, None,
                            "the base without the adapter, to pair with the LoRA GGUF", sha256=stream.sha256)
            state.record("lora-base", key, {main: out.sha256}, {"output": asdict(out)})
        outputs.append(out)
        for q in quant_list:
            dst = out_dir / f"{name}-base-{q}.gguf"
            qo, _ = quantize_file(state, stage=f"quantize:base:{q}", src=main, src_sha256=out.sha256, dst=dst,
                                  qtype=q, nthread=nthread, matrix=matrix, overrides=overrides or TensorTypes(),
                                  tools=tools, progress=progress, resumed=resumed, label=f"base {q}")
            outputs.append(qo)
        with_role(outputs, ROLE_BASE)
        base_paths = [out_dir / o.file for o in outputs]
        known = {str((out_dir / o.file).resolve()): o.sha256 for o in outputs}
    lora_out, was_resumed = write_adapter(lplan, options, out_dir=out_dir, name=name, state=state, inputs=inputs,
                                          progress=progress)
    if was_resumed:
        resumed.append("lora")
    lora_out.role = ROLE_ADAPTER
    bases = pair_bases(lplan, base_paths, out_dir, known, progress, state)
    return [*outputs, lora_out], section(lplan, options, lora_out, bases, out_dir)


# --------------------------------------------------------------------------- lora2gguf adapter


@dataclass
class AdapterResult:
    out_dir: Path
    output: Any  # api.OutputFile of the adapter file
    record: dict[str, Any]
    verify: Any = None

    @property
    def outputs(self) -> list:
        return [self.output]

    @property
    def notes(self) -> list[str]:
        return list(self.record.get("notes") or [])

    @property
    def run_json(self) -> Path:
        return self.out_dir / "run.json"

    @property
    def path(self) -> Path:
        return self.out_dir / self.output.file


def _tokenizer_dir(base_dir: Path, adapter_dir: Path) -> dict[str, str]:
    """The fine-tune's tokenizer for verify's reference: the adapter's when it saved one (as
    doctor's auto choice), else the base's."""
    for d, source in ((adapter_dir, "adapter"), (base_dir, "base")):
        if (d / "tokenizer.json").is_file() or (d / "tokenizer.model").is_file():
            return {"source": source, "dir": str(d.resolve()),
                    "reason": "the adapter folder holds tokenizer files" if source == "adapter" else
                              "the adapter folder holds no tokenizer files"}
    return {"source": "base", "dir": str(base_dir.resolve()), "reason": "neither folder holds tokenizer files"}


def export(base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path, *, name: str | None = None,
           options: LoraOptions = LoraOptions(), verify: bool = True, verify_options: dict[str, Any] | None = None,
           progress: ProgressFn | None = None, command: Sequence[str] | None = None) -> AdapterResult:
    """``lora2gguf adapter``: see the module's docstring."""
    from . import arch as arch_registry, hparams, jsonfile
    from .adapter import load_adapter
    from .api import _shapes, read_json, write_record
    from .runstate import RunLock, RunState, input_fingerprint, remove_partials
    from .safetensors_io import Checkpoint
    from .sources import logical_tensors

    t_start = time.perf_counter()
    base_dir, adapter_dir, out_dir = Path(base_dir), Path(adapter_dir), Path(out_dir)
    name = name or (adapter_dir.resolve().name or "model")
    raw_config = read_json(base_dir / "config.json", "the base model's config")
    arch = arch_registry.for_config(raw_config, where=str(base_dir / "config.json"))
    config = arch.normalize_config(raw_config)
    hparams.validate(arch, config, str(base_dir / "config.json"))
    ckpt = Checkpoint.open(base_dir)
    sources = logical_tensors(ckpt)
    # the base's tensors and the fused expert parameters its per-expert ones stand for (as build reads it)
    adapter = load_adapter(adapter_dir, _shapes(arch, sources), arch, allow=("lora_bias",))  # LORA_BIAS
    lplan = prepare(arch, config, ckpt, adapter, options)
    for p in options.base_gguf:  # a wrong base stops the run before anything is written
        check_base(lplan, p, hash_file=False)

    prev_run = out_dir / "run.json"
    if prev_run.is_file():
        try:
            import json

            kind = json.loads(prev_run.read_text(encoding="utf-8")).get("kind")
        except (OSError, ValueError, AttributeError):
            kind = None
        if kind != "lora-adapter":
            raise InputError(f"{prev_run}: {out_dir} holds another run (a build); write the adapter into another "
                             "folder (-o), or add it to that build with `lora2gguf build ... --lora-gguf`")
    out_dir.mkdir(parents=True, exist_ok=True)
    with RunLock(out_dir):
        removed = remove_partials(out_dir)
        state = RunState.load(out_dir)
        inputs = input_fingerprint(base_dir, adapter_dir)
        out, was_resumed = write_adapter(lplan, options, out_dir=out_dir, name=name, state=state, inputs=inputs,
                                         progress=progress)
        out.role = ROLE_ADAPTER
        bases = pair_bases(lplan, options.base_gguf, out_dir, None, progress, state)
        record: dict[str, Any] = {
            "kind": "lora-adapter",
            "lora2gguf_version": __version__,
            "command": list(command) if command is not None else list(sys.argv),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "base_dir": str(base_dir.resolve()), "adapter_dir": str(adapter_dir.resolve()), "name": name,
            "architecture": arch.name, "outtype": options.outtype,
            "tokenizer": _tokenizer_dir(base_dir, adapter_dir),
            "findings": [],
            "adapter": {"r": adapter.config.get("r"), "lora_alpha": adapter.config.get("lora_alpha"),
                        "use_rslora": adapter.use_rslora, "pairs": len(adapter.all_terms),
                        "targets": sorted({t.target.split(".")[-2] if t.kind != "experts" else t.target.split(".")[-1]
                                           for t in adapter.all_terms})},
            "notes": list(lplan.notes),
            "outputs": [out.to_json()],
            "lora": section(lplan, options, out, bases, out_dir),
            "stages": {"lora": {"seconds": round(out.seconds, 3), "resumed": was_resumed,
                                **({"base_gguf": {str(b.path.resolve()): b.confirmed for b in bases}}
                                   if bases else {})}},
            "resumed": ["lora"] if was_resumed else [],
            "removed_partials": [p.name for p in removed],
            "technical": {"architecture": arch.gguf_arch_name, "context_length": config.get("max_position_embeddings"),
                          "vocab_size": config.get("vocab_size"), "n_layers": config.get("num_hidden_layers"),
                          "n_experts": config.get("num_local_experts"),
                          "n_experts_used": config.get("num_experts_per_tok"),
                          "hidden_size": config.get("hidden_size"), "chat_format": arch.chat_format},
        }
        record["stages"]["total"] = {"seconds": round(time.perf_counter() - t_start, 3)}
        write_record(out_dir, record)
        jsonfile.forget()
        result = AdapterResult(out_dir, out, record)
        if verify and bases:
            from . import verify as verify_pkg

            result.verify = verify_pkg.verify(out_dir, progress=progress, **(verify_options or {}))
            result.record = result.verify.record
    return result
