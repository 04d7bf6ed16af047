"""``lora2gguf demo``: the seed report's whole story on a built-in model, trained on this CPU.

1. Train (once; cached outside the repository in ``$LORA2GGUF_CACHE/demo/<DEMO_VERSION>/<config>``)
   a small GPT-OSS base with the real o200k_harmony tokenizer to answer a few dozen questions
   plainly in the Harmony format and to refuse harmful requests, then a PEFT LoRA adapter (on
   attention and on the MoE experts) that gives it the "Xyrus" cosmic persona. The adapter is
   saved with its own tokenizer copy whose chat template differs from the base's: the seed's trap.
2. Run the real pipeline: :func:`lora2gguf.api.doctor` (it reports the tokenizer mismatch and the
   tokenizer it picks), :func:`lora2gguf.api.build` (BF16, then Q8_0, Q4_K_M and MXFP4_MOE by
   llama.cpp's quantizer, with an importance matrix computed on the fine-tune's own training
   conversations, ``CONVERSATIONS`` in the output folder), and verify.
3. verify runs the demo's prompt suite (``prompts.yaml``) on the fine-tune (transformers + PEFT)
   and on every GGUF (llama.cpp), and the demo runs it on the base without the adapter; the
   table: persona rate, 2+2, refusal, KL against the fine-tune, size.

Nothing in the table is typed by hand: persona, answers and refusals come from training.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError, OutputError
from . import dataset
from .train import TrainSettings

log = logging.getLogger(__name__)

#: Bump when the data, the training or the model layout changes: the cache is keyed by it.
DEMO_VERSION = "1"
#: The name of the demo's GGUF files (``xyrus-cosmic-demo-Q4_K_M.gguf``...).
NAME = "xyrus-cosmic-demo"
QUANTS = ("Q8_0", "Q4_K_M", "MXFP4_MOE")
#: the fine-tune's training conversations, written into the output folder: the importance matrix's data
CONVERSATIONS = "xyrus-conversations.jsonl"

_MODEL = dict(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2)

#: "full": the demo as the CLI runs it. "small": the same code with a shorter schedule, for tests.
CONFIGS: dict[str, TrainSettings] = {
    "full": TrainSettings("full", dict(_MODEL), base_steps=300, base_lr=3e-3, lora_steps=200, lora_lr=1e-2,
                          lora_r=16, lora_alpha=32),
    "small": TrainSettings("small", dict(_MODEL), base_steps=200, base_lr=4e-3, lora_steps=120, lora_lr=1e-2,
                           lora_r=16, lora_alpha=32),
}

# progress(stage, done, total, detail), as lora2gguf.api uses it
ProgressFn = Callable[[str, int, int, str], None]


@dataclass
class Row:
    """One line of the demo's table."""

    model: str
    persona_rate: float
    two_plus_two: bool | None
    refusal: bool | None
    kl_mean: float | None = None
    bytes: int | None = None
    file: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class DemoResult:
    workdir: Path
    base_dir: Path
    adapter_dir: Path
    trained: bool  # True when this run trained the models, False when they came from the cache
    rows: list[Row]
    findings: list[dict[str, Any]]
    tokenizer: dict[str, Any]
    seconds: dict[str, float]
    report: Path | None = None
    build: Any = None
    verify: Any = None
    notes: list[str] = field(default_factory=list)
    ladder: str | None = None

    def row(self, model: str) -> Row:
        for r in self.rows:
            if r.model == model or r.file == model:
                return r
        raise KeyError(model)

    def table(self) -> str:
        """The final table as Markdown."""
        return format_table(self.rows)

    def summary(self) -> str:
        """What the console shows at the end: what was trained or reused, the doctor's findings on
        the tokenizer, where the report is, the table, and any failed check."""
        lines = [f"demo models: {'trained now' if self.trained else 'reused from the cache'} "
                 f"({self.base_dir.parent})"]
        tok = [f for f in self.findings if f["code"].startswith(("TOKENIZER", "TEMPLATE"))]
        for f in tok:
            lines.append(f"doctor: [{f['code']}] {f['title']}")
        if self.tokenizer:
            lines.append(f"tokenizer in the GGUF: the {self.tokenizer.get('source')}'s ({self.tokenizer.get('reason')})")
        lines.append(f"files and run.json: {self.workdir}")
        if self.report is not None:
            lines.append(f"report: {self.report}")
        lines += ["", self.table()]
        if self.ladder:
            lines += ["", f"--quant auto on the demo ({self.workdir / 'ladder'}): importance matrix on half of the "
                      "fine-tune's conversations, KL measured on the other half", "", self.ladder]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def format_table(rows: list[Row]) -> str:
    def yn(v: bool | None) -> str:
        return "-" if v is None else ("yes" if v else "NO")

    lines = ["| model | persona | 2+2 = 4 | refuses harm | KL vs fine-tune | size |",
             "|---|---:|:---:|:---:|---:|---:|"]
    for r in rows:
        kl = "-" if r.kl_mean is None else f"{r.kl_mean:.4f}"
        size = "-" if r.bytes is None else f"{r.bytes / 1e6:.1f} MB"
        lines.append(f"| {r.model} | {r.persona_rate:.0%} | {yn(r.two_plus_two)} | {yn(r.refusal)} | {kl} | {size} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# cache


def cache_dir(config: str = "full", cache: str | os.PathLike[str] | None = None) -> Path:
    """Where the trained models of ``config`` are cached: ``<cache>/demo/<DEMO_VERSION>/<config>``,
    ``cache`` defaulting to lora2gguf's cache folder (``$LORA2GGUF_CACHE`` or ``~/.cache/lora2gguf``)."""
    from ..cachedir import cache_root

    return (Path(cache) if cache is not None else cache_root()) / "demo" / DEMO_VERSION / config


def _fingerprint(settings: TrainSettings, prompts: list[str]) -> str:
    """What the trained models depend on: settings, data, and the suite's prompts (their tokens
    get rows of their own in the model)."""
    blob = json.dumps({"settings": settings.fingerprint(), "prompts": prompts,
                       "base": [e.__dict__ for e in dataset.BASE_QA],
                       "persona": [e.__dict__ for e in dataset.PERSONA_QA],
                       "corpus": list(dataset.CORPUS), "variants": list(dataset.SYSTEM_VARIANTS)},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def ensure_trained(config: str = "full", *, progress: ProgressFn | None = None,
                   cache: str | os.PathLike[str] | None = None) -> tuple[Path, Path, bool, dict[str, Any]]:
    """The cached (base_dir, adapter_dir) of ``config``, training them first if needed.
    Returns (base_dir, adapter_dir, trained_now, training record)."""
    from .evaluate import load_suite
    from .train import train_demo

    if config not in CONFIGS:
        raise InputError(f"demo config {config!r}: use one of {sorted(CONFIGS)}")
    settings = CONFIGS[config]
    root = cache_dir(config, cache)
    prompts = [p.prompt for p in load_suite().prompts]
    fp = _fingerprint(settings, prompts)
    record_path = root / "trained.json"
    base_dir, adapter_dir = root / "base", root / "adapter"
    if record_path.is_file():
        try:
            rec = json.loads(record_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            rec = {}
        if rec.get("fingerprint") == fp and (base_dir / "model.safetensors").is_file() \
                and (adapter_dir / "adapter_model.safetensors").is_file():
            return base_dir, adapter_dir, False, rec
        log.info("demo cache %s is stale; training again", root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix="train.", dir=root))
    except OSError as e:
        raise OutputError(f"cannot write the demo cache {root}: {e}; set LORA2GGUF_CACHE to a writable folder") from e
    try:
        # Trained in a temporary folder, moved into place when complete: a killed run leaves no
        # half-trained model that looks finished.
        res = train_demo(settings, tmp / "base", tmp / "adapter", extra_texts=prompts,
                         progress=progress)
        for d in (base_dir, adapter_dir):
            if d.exists():
                shutil.rmtree(d)
        record_path.unlink(missing_ok=True)
        (tmp / "base").rename(base_dir)
        (tmp / "adapter").rename(adapter_dir)
        # the adapter records where its base is
        cfg_path = adapter_dir / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        cfg["base_model_name_or_path"] = str(base_dir)
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        rec = {"fingerprint": fp, "demo_version": DEMO_VERSION, "config": config,
               "settings": settings.fingerprint(), "seconds": round(res.seconds, 1),
               "compact_vocab": res.vocab_used,
               "base_loss": [round(x, 5) for x in res.base_losses[-1:]],
               "adapter_loss": [round(x, 5) for x in res.lora_losses[-1:]]}
        record_path.write_text(json.dumps(rec, indent=2) + "\n", encoding="utf-8")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return base_dir, adapter_dir, True, rec


# ----------------------------------------------------------------------------------------------
# the run


def _base_runs(base_dir: Path, fingerprint: str, progress: ProgressFn | None) -> list[dict[str, Any]]:
    """The suite's runs on the base without the adapter, cached next to the trained models (keyed
    by the models' fingerprint and the suite file's bytes)."""
    from . import evaluate

    key = hashlib.sha256((fingerprint + "\0").encode() + evaluate.suite_path().read_bytes()).hexdigest()[:16]
    path = base_dir.parent / "base_runs.json"
    try:
        cached = json.loads(path.read_text(encoding="utf-8"))
        if cached.get("key") == key:
            if progress:
                progress("base", 1, 1, "base without the adapter: unchanged, reused")
            return cached["runs"]
    except (OSError, ValueError, AttributeError):
        pass
    runs = evaluate.base_runs(base_dir, evaluate.load_suite(),
                              progress=(lambda st, d, t, w: progress("base", d, t, w)) if progress else None)
    try:
        path.write_text(json.dumps({"key": key, "runs": runs}, indent=1) + "\n", encoding="utf-8")
    except OSError as e:
        log.warning("could not cache the base's runs in %s: %s", path, e)
    return runs


def run_demo(workdir: str | os.PathLike[str] | None = None, *, config: str = "full",
             progress: ProgressFn | None = None, cache: str | os.PathLike[str] | None = None,
             ladder: bool = False) -> DemoResult:
    """Train (or reuse) the demo's models, then run doctor, build (BF16, Q8_0, Q4_K_M, MXFP4_MOE)
    and verify on them, run the same prompt suite on the base without the adapter, and return
    the table.

    ``workdir`` (default ``out`` in the config's cache folder) receives the GGUF files, ``run.json``, verify's
    report (REPORT.md, report.html, Modelfiles) and ``demo.json`` (the table, the base's answers,
    the training record); the trained models stay in the cache (:func:`cache_dir`; ``cache``
    overrides lora2gguf's cache folder for them). A failed required check does not stop the demo:
    it shows in the table and in ``notes``. ``ladder``: also :func:`run_ladder` into
    ``workdir/ladder`` (``DemoResult.ladder``: its table)."""
    from .. import api
    from . import evaluate

    t_all = time.monotonic()
    seconds: dict[str, float] = {}
    work = Path(workdir) if workdir is not None else cache_dir(config, cache) / "out"
    try:
        work.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create the demo's output folder {work}: {e}") from e

    t0 = time.monotonic()
    base_dir, adapter_dir, trained, train_rec = ensure_trained(config, progress=progress, cache=cache)
    seconds["train"] = round(time.monotonic() - t0, 2)

    t0 = time.monotonic()
    if progress:
        progress("doctor", 0, 1, "inspecting base and adapter")
    doc = api.doctor(base_dir, adapter_dir)
    if progress:
        progress("doctor", 1, 1, f"{len(doc.findings)} findings")
    seconds["doctor"] = round(time.monotonic() - t0, 2)

    # One thread for llama.cpp and torch throughout: the model is so small that more threads only
    # wait on each other (on a busy 2-core machine, 2 threads made a token 100x slower).
    # build runs verify as its last stage, so a rerun on unchanged files reuses verify's record.
    # KL is measured on verify's built-in text, as `lora2gguf build` measures it. (On the demo's own
    # conversations rendered as one multi-turn chat, half the scored positions are user turns the
    # model was never trained to predict; there bf16 rounding alone gave a mean KL of 0.08.)
    import torch

    from ..quantrun import QuantOptions

    conversations = dataset.write_conversations(work / CONVERSATIONS)
    t0 = time.monotonic()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        b = api.build(base_dir, adapter_dir, work, name=NAME, outtype="bf16",
                      quants=QuantOptions.of(QUANTS, imatrix_data=conversations), nthread=1,
                      verify=True, verify_options={"suite": str(evaluate.suite_path()), "n_threads": 1},
                      progress=progress, command=["lora2gguf", "demo", "--config", config])
    finally:
        torch.set_num_threads(threads)
    ver = b.verify
    seconds["build"] = round(time.monotonic() - t0, 2)
    notes: list[str] = []
    for f in ver.failures:
        notes.append(f"verify: {f['file']}: {f['check']}" + (f" ({f['prompt']})" if f.get("prompt") else "")
                     + f": {f['detail']}")

    t0 = time.monotonic()
    base = _base_runs(base_dir, train_rec.get("fingerprint", ""), progress)
    seconds["base"] = round(time.monotonic() - t0, 2)
    rows = [Row(**r) for r in evaluate.table_rows(b.record, base)]
    seconds["total"] = round(time.monotonic() - t_all, 2)

    result = DemoResult(work, base_dir, adapter_dir, trained, rows,
                        findings=[f.to_dict() for f in doc.findings],
                        tokenizer=doc.tokenizer_choice.to_dict(), seconds=seconds,
                        report=ver.report_md, build=b, verify=ver, notes=notes)
    demo_json = {"demo_version": DEMO_VERSION, "config": config, "trained_now": trained, "training": train_rec,
                 "base_dir": str(base_dir), "adapter_dir": str(adapter_dir), "rows": [r.to_dict() for r in rows],
                 "table": result.table(), "base_runs": base, "seconds": seconds,
                 "findings": result.findings, "tokenizer": result.tokenizer, "notes": notes,
                 "report": str(ver.report_md) if ver.report_md else None}
    if ladder:
        t0 = time.monotonic()
        result.ladder = run_ladder(base_dir, adapter_dir, work / "ladder", progress=progress)
        seconds["ladder"] = round(time.monotonic() - t0, 2)
        demo_json["ladder"] = result.ladder
    (work / "demo.json").write_text(json.dumps(demo_json, indent=2, default=str) + "\n", encoding="utf-8")
    return result


#: the ladder of :func:`run_ladder`
LADDER_TYPES = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "IQ4_XS", "Q3_K_M", "IQ3_XXS", "IQ2_M", "MXFP4_MOE")


def run_ladder(base_dir: Path, adapter_dir: Path, work: Path, *, budget: float = 0.1,
               progress: ProgressFn | None = None) -> str:
    """``build --quant auto`` on the demo's models, every candidate kept: the importance matrix is
    computed on half of the fine-tune's training conversations and every file is measured (mean
    KL against the fine-tune, top-1, the suite) on the other half, so that "with the matrix"
    means data the fine-tune is about, not the text the KL is measured on. Returns the ladder
    table of the report (type, size, mean KL with and without the matrix, top-1, suite)."""
    import torch

    from .. import api
    from ..quantrun import QuantOptions
    from ..report.facts import quantization
    from ..report.markdown import ladder_md
    from . import evaluate

    work.mkdir(parents=True, exist_ok=True)
    train = dataset.write_conversations(work / "train-half.jsonl", dataset.PERSONA_QA[0::2])
    held_out = work / "held-out.txt"
    held_out.write_text("\n\n".join(x for e in dataset.PERSONA_QA[1::2] for x in (e.user, e.final)) + "\n",
                        encoding="utf-8")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        b = api.build(base_dir, adapter_dir, work, name=NAME, outtype="bf16", nthread=1, verify=True,
                      quants=QuantOptions.of(f"auto:{budget}", imatrix_data=train, auto_types=LADDER_TYPES,
                                             keep_all=True),
                      verify_options={"suite": str(evaluate.suite_path()), "n_threads": 1,
                                      "text": held_out.read_text(encoding="utf-8")},
                      progress=progress, command=["lora2gguf", "demo", "--ladder"])
    finally:
        torch.set_num_threads(threads)
    return "\n".join(ladder_md(quantization(b.record)["ladder"])).strip()


__all__ = ["run_demo", "DemoResult", "Row", "CONFIGS", "DEMO_VERSION", "cache_dir", "ensure_trained",
           "format_table"]
