"""Many adapters on one base: a training run's checkpoints (or any adapters) converted in one run.

    from lora2gguf.batch import build_many
    result = build_many("org/base-model", [], "out", checkpoints="runs/xyrus", quants=["Q4_K_M"], verify=True)
    result.ranking          # entry names, best first, from each one's recorded measurements
    result.comparison_md    # out/COMPARISON.md (also comparison.json and comparison.html)

The base (a folder or a hub id) is resolved once (downloaded once, when it must be) and inspected
once (:func:`lora2gguf.inspect.inspect_base`: config, tokenizer, safetensors headers); each adapter
then goes through the build's stages (doctor, merge while writing, quantize, verify, report) with
that inspection, into its own subfolder ``OUT_DIR/<name>/`` with its own run.json and report. An
adapter that doctor blocks, or whose build fails on its input, is recorded with the reason and
skipped; the others go on. The comparison (:mod:`lora2gguf.report.compare`) ranks the built ones
from what their run.json files recorded: required checks failed against each one's own fine-tune,
suite checks passed, mean KL against its own fine-tune, size.

When the base must be downloaded, doctor first checks every adapter against the base's
header-only stand-in (:mod:`lora2gguf.hub`), the download counted in its disk check; adapters it
blocks are skipped before a byte of the base's weights is fetched, and nothing is downloaded when
none is left.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from . import hub
from .errors import BlockedError, InputError, Lora2GGUFError

ProgressFn = Callable[[str, int, int, str], None]

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
BUILT, SKIPPED, FAILED = "built", "skipped", "failed"


@dataclass
class Entry:
    """One adapter of the run: where its outputs went and what became of it."""

    name: str  # its subfolder of OUT_DIR, and its label in the comparison
    spec: str
    out_dir: Path
    step: int | None = None
    status: str = "pending"
    reason: str | None = None
    findings: list[dict[str, Any]] = field(default_factory=list)
    source: hub.Source | None = None
    result: Any = None  # the api.BuildResult

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "spec": self.spec, "folder": self.out_dir.name, "step": self.step,
                "status": self.status, "reason": self.reason, "findings": self.findings,
                "input": self.source.to_json() if self.source is not None else None}


@dataclass
class BatchResult:
    out_dir: Path
    base: hub.Source
    entries: list[Entry]
    comparison: dict[str, Any]
    comparison_json: Path
    comparison_md: Path
    comparison_html: Path

    @property
    def ranking(self) -> list[str]:
        return list(self.comparison["ranking"])

    @property
    def exit_code(self) -> int:
        """2 when an adapter was skipped or failed, 3 when a built one failed verification, else 0."""
        if any(e.status != BUILT for e in self.entries):
            return 2
        if any(getattr(e.result.verify, "required_failed", False) for e in self.entries if e.result is not None):
            return 3
        return 0

    def summary(self) -> str:
        from .report.compare import summary_lines

        return "\n".join(summary_lines(self.comparison) + [f"comparison: {self.comparison_md}"])


def find_checkpoints(run_dir: str | Path) -> list[tuple[str, Path, int | None]]:
    """(name, folder, step) of a training run's adapters: each ``checkpoint-N/`` holding an
    adapter_config.json, by step, then RUN_DIR's own adapter (``final``) if it has one."""
    run = Path(run_dir)
    if not run.is_dir():
        raise InputError(f"--checkpoints {run}: no such folder")
    found, other = [], []
    for p in run.iterdir():
        m = CHECKPOINT_RE.match(p.name)
        if p.is_dir() and m:
            (found if (p / hub.ADAPTER_CONFIG).is_file() else other).append((p.name, p, int(m.group(1))))
    found.sort(key=lambda t: t[2])
    if (run / hub.ADAPTER_CONFIG).is_file():
        found.append(("final", run, None))
    if not found:
        hint = (f" ({', '.join(sorted(n for n, _, _ in other)[:3])} hold no adapter_config.json: checkpoints of a full "
                "fine-tune, not of a LoRA adapter?)" if other else "")
        raise InputError(f"--checkpoints {run}: no checkpoint-*/ folder with an adapter_config.json, and none in the "
                         f"folder itself{hint}. Point it at the output_dir of a PEFT training run")
    return found


def _label(spec: str | Path) -> str:
    text = str(spec)
    parsed = hub.parse_spec(text) if hub.is_hub_id(text) else None
    if parsed is not None:
        repo, rev = parsed
        return repo.split("/")[-1] + (f"@{rev}" if rev else "")
    return Path(text).resolve().name or "adapter"


def _unique(names: Sequence[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        n = re.sub(r"[^A-Za-z0-9_.@-]+", "-", n).strip("-.") or "adapter"
        k = seen.get(n, 0) + 1
        seen[n] = k
        out.append(n if k == 1 else f"{n}-{k}")
    return out


def build_many(base: str | Path, adapters: Sequence[str | Path], out_dir: str | Path, *,
               checkpoints: str | Path | None = None, name: str | None = None, rank_by: str | None = None,
               base_revision: str | None = None, adapter_revision: str | None = None,
               progress: ProgressFn | None = None, outtype: str = "bf16", quants: Any = (),
               accept: Sequence[str] = (), tokenizer: str = "auto", **options: Any) -> BatchResult:
    """Convert each adapter (and each checkpoint of ``checkpoints``) against one ``base`` into
    ``OUT_DIR/<name>/``, then write the comparison (comparison.json, COMPARISON.md,
    comparison.html) into OUT_DIR. ``options`` are :func:`lora2gguf.api.build`'s (verify,
    verify_options, nthread, keep_mxfp4, command...). ``rank_by``: the output type ranked
    (default: the first of ``quants``, else ``outtype``)."""
    from . import api
    from .inspect import inspect_base
    from .quantrun import QuantOptions
    from .report.compare import write_comparison
    from .runstate import RunLock

    t_start = time.perf_counter()
    out = Path(out_dir)
    qopts = quants if isinstance(quants, QuantOptions) else QuantOptions.of(quants)
    quant_list = list(qopts.types)
    types = [outtype.upper(), *quant_list]
    rank_type = (rank_by or (quant_list[0] if quant_list else outtype)).upper()
    if rank_type not in types:
        raise InputError(f"--rank-by {rank_by}: not one of the outputs asked for ({', '.join(types)})")
    items: list[tuple[str, str, int | None]] = [(_label(a), str(a), None) for a in adapters]
    run_name = None
    if checkpoints is not None:
        run_name = Path(checkpoints).resolve().name
        items += [(n, str(p), step) for n, p, step in find_checkpoints(checkpoints)]
    if not items:
        raise InputError("no adapters: give one or more ADAPTERs, or --checkpoints RUN_DIR")
    names = _unique([n for n, _, _ in items])
    entries = [Entry(n, spec, out / n, step) for n, (_, spec, step) in zip(names, items)]

    def stem(e: Entry) -> str:
        prefix = name or (run_name if e.step is not None or e.name == "final" else None)
        return f"{prefix}-{e.name}" if prefix else e.name

    out.mkdir(parents=True, exist_ok=True)
    with RunLock(out):
        base_src = hub.resolve(base, hub.BASE, revision=base_revision, progress=progress, weights=False)
        try:
            for e in entries:
                try:
                    e.source = hub.resolve(e.spec, hub.ADAPTER, progress=progress,
                                           revision=adapter_revision if hub.is_hub_id(e.spec) else None)
                except Lora2GGUFError as err:
                    e.status, e.reason = FAILED, str(err)
            live = [e for e in entries if e.status == "pending"]
            if base_src.pending:
                if base_src.preview is not None:
                    _preflight(base_src, live, types, accept, tokenizer)
                    live = [e for e in entries if e.status == "pending"]
                if live:
                    base_src.fetch(progress)
        finally:
            base_src.close()

        base_stats: dict[str, Any] = {"inspections": 0}
        base_info = None
        if live:
            t0 = time.perf_counter()
            if progress:
                progress("inspect", 0, 1, f"the base {base_src.label}")
            with api._gc_paused():
                base_info = inspect_base(base_src.path)
            base_stats = {"inspections": 1, "seconds": round(time.perf_counter() - t0, 3),
                          "header_bytes_read": base_info.checkpoint.header_bytes_read
                          if base_info.checkpoint is not None else 0}
            if progress:
                progress("inspect", 1, 1, f"the base {base_src.label}")
        for i, e in enumerate(live):
            if progress:
                progress("adapters", i, len(live), e.name)
            try:
                e.result = api.build(base_src, e.source, e.out_dir, name=stem(e), outtype=outtype, quants=qopts,
                                     accept=accept, tokenizer=tokenizer, progress=progress, base_info=base_info,
                                     **options)
                e.status = BUILT
            except BlockedError as err:
                e.status, e.reason = SKIPPED, str(err)
                e.findings = list(getattr(err, "findings", []))
            except Lora2GGUFError as err:
                e.status, e.reason = FAILED, str(err)
        if progress and live:
            progress("adapters", len(live), len(live), "done")
        paths, comparison = write_comparison(out, base_src.to_json() | {"label": base_src.label, **base_stats},
                                             [e.to_json() for e in entries], rank_type,
                                             seconds=time.perf_counter() - t_start)
    return BatchResult(out, base_src, entries, comparison, *paths)


def _preflight(base_src: hub.Source, live: list[Entry], types: list[str], accept: Sequence[str],
               tokenizer: str) -> None:
    """doctor on the base's header-only stand-in and each adapter, before the base's weights are
    downloaded: the download counted in the disk check; a blocked adapter is skipped."""
    from . import api
    from .inspect import inspect_base

    with api._gc_paused(), api._forgetting_json():
        preview = inspect_base(base_src.path)
        download = base_src.to_download()
        for e in live:
            try:
                api._run_doctor(base_src.path, e.source.path, e.out_dir, types, accept, tokenizer,
                                download=download, base_info=preview, stand_in=base_src)
            except BlockedError as err:
                e.status, e.reason = SKIPPED, str(err)
                e.findings = list(getattr(err, "findings", []))
