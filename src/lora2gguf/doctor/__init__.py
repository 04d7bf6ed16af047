"""doctor: find the traps in a base + adapter pair before any heavy work, and say how to fix each.

``run(base_dir, adapter_dir)`` inspects the inputs (configs, tokenizer files, safetensors headers;
never the base's tensor data) and returns a :class:`DoctorReport` of findings. ``build`` refuses
to start while a blocker is not accepted by its code (``--accept CODE``).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from ..inspect import Inspection, inspect
from . import checks
from . import findings as F
from .findings import BLOCKER, INFO, WARNING, Finding
from .tokenizer_diff import TokenizerChoice, TokenizerDiff, decide
from .vocab_checks import check_vocab, options_of

log = logging.getLogger(__name__)

SCHEMA = "lora2gguf.doctor/1"

__all__ = ["run", "DoctorReport", "Finding", "TokenizerChoice", "BLOCKER", "WARNING", "INFO", "SCHEMA"]


@dataclass
class DoctorReport:
    base_dir: Path
    adapter_dir: Path
    findings: list[Finding]
    tokenizer_choice: TokenizerChoice
    architecture: str | None = None
    tokenizer_diff: TokenizerDiff | None = None
    resources: checks.Resources | None = None
    inspection: Inspection | None = None
    seconds: float = 0.0
    bytes_read: dict[str, int] = field(default_factory=dict)
    #: what BASE and ADAPTER were resolved to when given as hub ids (lora2gguf.hub.Source.to_json)
    inputs: dict[str, Any] = field(default_factory=dict)

    def by_code(self, code: str) -> list[Finding]:
        return [f for f in self.findings if f.code == code]

    @property
    def codes(self) -> set[str]:
        return {f.code for f in self.findings}

    def blocking(self, accepted: Iterable[str] = ()) -> list[Finding]:
        """Blockers whose code the user did not accept (renamed codes included: F.accepted_codes)."""
        accepted = F.accepted_codes(accepted)
        return [f for f in self.findings if f.severity == BLOCKER and f.code not in accepted]

    @property
    def exit_code(self) -> int:
        sev = {f.severity for f in self.findings}
        return 2 if BLOCKER in sev else 1 if WARNING in sev else 0

    def to_dict(self, accepted: Iterable[str] = ()) -> dict[str, Any]:
        accepted = F.accepted_codes(accepted)
        counts = {s: sum(f.severity == s for f in self.findings) for s in F.SEVERITIES}
        return {
            "schema": SCHEMA,
            "base_dir": str(self.base_dir),
            "adapter_dir": str(self.adapter_dir),
            "architecture": self.architecture,
            "exit_code": self.exit_code,
            "counts": counts,
            "tokenizer": self.tokenizer_choice.to_dict(),
            "findings": [{**f.to_dict(), "accepted": f.code in accepted} for f in self.findings],
            "resources": self.resources.to_dict() if self.resources else None,
            "bytes_read": self.bytes_read,
            "seconds": round(self.seconds, 3),
            **({"inputs": self.inputs} if self.inputs else {}),
        }

    def to_json(self, accepted: Iterable[str] = (), indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(accepted), indent=indent, ensure_ascii=False, default=str)


def run(base_dir: str | Path, adapter_dir: str | Path, *, out_dir: str | Path | None = None,
        outputs: Iterable[str] = ("BF16", "Q4_K_M"), free_bytes: int | None = None, tokenizer: str = "auto",
        tools: checks.Tools | None = None, progress: Callable[[str], None] | None = None,
        download: Any = None, base_info: Any = None) -> DoctorReport:
    """Inspect a base model folder and a PEFT adapter folder and return the findings.

    ``out_dir``: where outputs would go (its filesystem's free space is checked; ``free_bytes``
    overrides the measurement). ``outputs``: llama.cpp output types to size. ``tokenizer``:
    "auto" (the adapter's when it has one), "adapter" or "base". ``tools``: the installed tools'
    facts (default: :func:`checks.probe_tools`). ``download``: a :class:`lora2gguf.hub.Download`
    still to come into the Hugging Face cache (the resources finding counts it against the free
    space). ``base_info``: the base's inspection made before (:func:`lora2gguf.inspect.inspect_base`),
    so several adapters on one base inspect it once.
    """
    t0 = time.perf_counter()
    base_dir, adapter_dir = Path(base_dir), Path(adapter_dir)
    note = progress or (lambda msg: log.info("%s", msg))
    if tokenizer not in ("auto", "adapter", "base"):
        from ..errors import InputError
        raise InputError(f"tokenizer={tokenizer!r}: choose 'auto', 'adapter' or 'base'")
    note("reading configs, tokenizer files and safetensors headers")
    ins = inspect(base_dir, adapter_dir, base=base_info)
    base, ad = ins.base, ins.adapter
    found: list[Finding] = []
    found += checks.check_base_errors(base)
    found += checks.check_base_format(base)

    arch = None
    if base.config:
        from ..arch import known
        names = [a.gguf_arch_name for a in known().values()]
        tools = tools or checks.probe_tools(names)
        arch_findings, arch = checks.check_architecture(base.config, tools, str(base_dir / "config.json"))
        found += arch_findings

        unreadable = {"BASE_FP8", "BASE_GPTQ", "BASE_AWQ", "BASE_COMPRESSED_TENSORS", "BASE_QUANTIZED_UNKNOWN",
                      "BASE_INVALID"}
        if arch is not None and not any(f.code in unreadable for f in found):  # those say enough already
            found += checks.check_base_plan(base, arch)

    note("matching the adapter to the base")
    found += checks.check_adapter(ad, base, arch)

    note("comparing tokenizers")
    vocab = base.config.get("vocab_size") if isinstance(base.config.get("vocab_size"), int) else None
    decision = decide(base.tokenizer, ad.tokenizer, model_vocab=vocab,
                      resized_embeddings=checks.resized_embeddings(ad, vocab), prefer=tokenizer,
                      adapter_dir=adapter_dir)
    found += decision.findings
    chosen = ad.tokenizer if decision.choice.source == "adapter" else base.tokenizer if decision.choice.source == "base" else None
    found += checks.check_chat(chosen, arch, base.generation_config, base.config)
    found += check_vocab(chosen, base.config, options_of(arch, arch.normalize_config(base.config) if arch else None), resized=checks.resized_embeddings(ad, vocab), generation_config=base.generation_config, found=found)  # noqa: E501
    found += checks.check_remote_code(base, ad, (base.tokenizer, ad.tokenizer))

    res = None
    if base.checkpoint is not None:
        fb, where = (free_bytes, str(out_dir) if out_dir else "(given)") if free_bytes is not None \
            else checks.free_space(Path(out_dir) if out_dir else None)
        res = checks.estimate_resources(base, ad, arch, outputs, free_bytes=fb, free_where=where, tokenizer=chosen)
        if download is not None and download.bytes:
            res.download = download
            res.download_shared = checks.same_filesystem(where, download.where)
        found += checks.check_resources(res)

    # MXFP4 experts can stay MXFP4 when the adapter leaves them alone
    summary = next((f for f in found if f.code == "ADAPTER_SUMMARY"), None)
    for f in found:
        if f.code == "BASE_MXFP4" and summary is not None:
            keep = not summary.data.get("touches_experts") and f.data.get("experts_only", False)
            f.data["keep_mxfp4_possible"] = keep
            f.fix += (" The adapter does not touch the experts: --keep-mxfp4 applies." if keep else
                      " The adapter changes the experts, so they are decoded and merged (--keep-mxfp4 does not apply).")

    # one finding per code and text; sorted by severity then code
    seen, unique = set(), []
    for f in found:
        if (f.code, f.what) not in seen:
            seen.add((f.code, f.what))
            unique.append(f)
    unique.sort(key=F.sort_key)
    report = DoctorReport(base_dir, adapter_dir, unique, decision.choice, arch.name if arch else None,
                          decision.diff, res, ins, time.perf_counter() - t0,
                          {"base_weights": ins.base_weight_bytes_read, "base_weights_total": ins.base_weight_bytes,
                           "small_files": ins.small_bytes_read, "adapter_tensors": ad.tensor_bytes_read})
    return report
