"""The demo's table from verify's record, plus the one row verify does not make: the base
without the adapter.

Every model is run through :mod:`lora2gguf.verify`'s own runner and checks on the demo's suite
(``prompts.yaml``, verify's suite format): verify runs the fine-tune (transformers + PEFT, its
reference) and every GGUF (llama.cpp); :func:`base_runs` runs the base alone with the same
runner. The table reads greedy results only: persona rate (the share of prompts with a persona
check whose answer shows a persona marker), 2+2, refusal, mean KL against the reference, size.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import InputError

#: Prompt ids the table reads: the 2+2 prompt and the harmful request.
TWO_PLUS_TWO = "two_plus_two"
REFUSAL = "refusal"


def suite_path() -> Path:
    """The demo's prompt suite (verify's YAML format)."""
    return Path(str(resources.files("lora2gguf.demo").joinpath("prompts.yaml")))


def load_suite():
    from ..verify.suite import load_suite as _load

    return _load(suite_path())


@dataclass
class Summary:
    persona_rate: float
    two_plus_two: bool | None
    refusal: bool | None
    n_persona: int


def summarize(runs: list[dict[str, Any]]) -> Summary:
    """Greedy results of one model (verify's generation records: ``prompt``, ``mode``,
    ``checks: [{type, passed}, ...]``) as the table's columns."""
    greedy = {g["prompt"]: g for g in runs if g["mode"] == "greedy"}
    persona = [any(c["passed"] for c in g["checks"] if c["type"] == "persona")
               for g in greedy.values() if any(c["type"] == "persona" for c in g["checks"])]

    def passed(pid: str, types: tuple[str, ...]) -> bool | None:
        g = greedy.get(pid)
        if g is None:
            return None
        cs = [c for c in g["checks"] if c["type"] in types]
        return all(c["passed"] for c in cs) if cs else None

    return Summary(sum(persona) / len(persona) if persona else 0.0,
                   passed(TWO_PLUS_TWO, ("contains", "regex")), passed(REFUSAL, ("refused",)), len(persona))


def base_runs(base_dir: str | Path, suite, *, progress=None) -> list[dict[str, Any]]:
    """The suite on the base alone (no adapter), through verify's runner and transformers, one
    torch thread (the demo's model is too small for threads to pay off)."""
    import torch

    from ..chat.harmony import HarmonyFormat
    from ..verify.logits import load_reference_model
    from ..verify.runner import PeftEngine, Prompts, run_suite

    fmt = HarmonyFormat()
    suite = suite.for_format(fmt)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = load_reference_model(base_dir, None)
        gens = run_suite(PeftEngine(model, fmt.reference_stops({})), suite, fmt=fmt,
                         prompts=Prompts.render(fmt, suite, None, own_ids=True), tokenizer=fmt.reference_tokens(),
                         progress=progress, label="base")
    finally:
        torch.set_num_threads(threads)
    return [g.to_dict() for g in gens]


def table_rows(record: dict[str, Any], base: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows (model, persona_rate, two_plus_two, refusal, kl_mean, bytes, file) from run.json's
    verify section and the base's runs."""
    v = record.get("verify")
    if not v:
        raise InputError("run.json has no verify section: run verify on the demo's output first")
    rows = []
    s = summarize(base)
    rows.append({"model": "base (no adapter)", "persona_rate": s.persona_rate, "two_plus_two": s.two_plus_two,
                 "refusal": s.refusal, "kl_mean": None, "bytes": None, "file": None})
    ref = v["reference"]
    s = summarize(v["reference_runs"])
    label = "fine-tune (transformers + PEFT)" if ref.get("kind") == "peft" else f"fine-tune ({ref.get('label')})"
    rows.append({"model": label, "persona_rate": s.persona_rate, "two_plus_two": s.two_plus_two,
                 "refusal": s.refusal, "kl_mean": None, "bytes": None, "file": None})
    for f in v["files"]:
        s = summarize(v["runs"][f["file"]])
        m = f.get("metrics") or {}
        rows.append({"model": f["file"], "persona_rate": s.persona_rate, "two_plus_two": s.two_plus_two,
                     "refusal": s.refusal, "kl_mean": m.get("kl_mean"), "bytes": f.get("bytes"),
                     "file": f["file"]})
    return rows
