"""Scoring the demo's models on its prompt suite (``prompts.yaml``): greedy Harmony completions,
parsed into channels, checked for the persona, 2+2 and the refusal.

Two runners share one scorer: llama.cpp on a GGUF (through llama-cpp-python) and transformers on
the base with or without the adapter (through PEFT, unmerged). Both decode greedily from the same
prompt tokens (rendered with openai-harmony, as verify renders them) and stop at ``<|return|>``
or ``<|call|>``, so the rows of the demo's table differ only by the model that produced them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import FormatError, InputError

MAX_NEW_TOKENS = 96


@dataclass(frozen=True)
class Prompt:
    id: str
    prompt: str
    checks: dict[str, Any]
    required: bool = False


@dataclass(frozen=True)
class Suite:
    name: str
    prompts: tuple[Prompt, ...]
    persona_markers: tuple[str, ...]
    refusal_patterns: tuple[str, ...]

    def texts(self) -> list[str]:
        return [p.prompt for p in self.prompts]


def suite_path() -> Path:
    return Path(str(resources.files("lora2gguf.demo").joinpath("prompts.yaml")))


def load_suite(path: str | Path | None = None) -> Suite:
    """The demo's prompt suite (default: the packaged ``prompts.yaml``)."""
    import yaml

    p = Path(path) if path is not None else suite_path()
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise FormatError(f"{p}: cannot read the prompt suite ({e})") from e
    if not isinstance(data, dict) or not isinstance(data.get("prompts"), list) or not data["prompts"]:
        raise FormatError(f"{p}: a prompt suite is a mapping with a non-empty 'prompts' list")
    prompts = []
    for i, item in enumerate(data["prompts"]):
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
            raise FormatError(f"{p}: prompts[{i}] needs a 'prompt' string")
        checks = item.get("checks") or {}
        unknown = set(checks) - {"regex", "contains", "persona", "refused"}
        if unknown:
            raise FormatError(f"{p}: prompts[{i}] has unknown checks {sorted(unknown)}; "
                              "use regex, contains, persona, refused")
        prompts.append(Prompt(str(item.get("id", f"p{i}")), item["prompt"], dict(checks), bool(item.get("required"))))
    markers = tuple(data.get("persona_markers") or ())
    refusals = tuple(data.get("refusal_patterns") or ())
    for pat in markers + refusals:
        try:
            re.compile(pat, re.MULTILINE)
        except re.error as e:
            raise FormatError(f"{p}: pattern {pat!r} is not a valid regex ({e})") from e
    return Suite(str(data.get("name", p.stem)), tuple(prompts), markers, refusals)


@dataclass
class Answer:
    prompt_id: str
    final: str | None
    analysis: str | None
    stop: str | None
    n_tokens: int
    passed: dict[str, bool] = field(default_factory=dict)


@dataclass
class Score:
    """One model's results on the suite."""

    label: str
    answers: list[Answer]
    persona_rate: float  # share of persona prompts whose final answer shows the persona
    two_plus_two: bool | None
    refusal: bool | None
    harmony_ok: float  # share of answers with a final channel that stop at <|return|>

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "persona_rate": self.persona_rate, "two_plus_two": self.two_plus_two,
                "refusal": self.refusal, "harmony_ok": self.harmony_ok,
                "answers": [{"id": a.prompt_id, "final": a.final, "analysis": a.analysis, "stop": a.stop,
                             "n_tokens": a.n_tokens, "passed": a.passed} for a in self.answers]}


def has_persona(text: str | None, suite: Suite) -> bool:
    return bool(text) and any(re.search(p, text, re.MULTILINE) for p in suite.persona_markers)


def is_refusal(text: str | None, suite: Suite) -> bool:
    return bool(text) and any(re.search(p, text) for p in suite.refusal_patterns)


def score(label: str, completions: dict[str, list[int]], suite: Suite) -> Score:
    """Score completions (prompt id -> generated token ids) against the suite's checks."""
    from ..verify.harmony import parse_completion

    answers = []
    for p in suite.prompts:
        toks = completions[p.id]
        parsed = parse_completion(toks)
        final = parsed.channel("final")
        a = Answer(p.id, final, parsed.channel("analysis"), parsed.stop, len(toks))
        c = p.checks
        if "regex" in c:
            a.passed["regex"] = bool(final) and re.search(c["regex"], final) is not None
        if "contains" in c:
            a.passed["contains"] = bool(final) and str(c["contains"]) in final
        if "persona" in c:
            a.passed["persona"] = has_persona(final, suite) == bool(c["persona"])
        if "refused" in c:
            a.passed["refused"] = is_refusal(final, suite) == bool(c["refused"])
        answers.append(a)
    by_id = {a.prompt_id: a for a in answers}
    persona_ids = [p.id for p in suite.prompts if p.checks.get("persona") is True]
    rate = (sum(has_persona(by_id[i].final, suite) for i in persona_ids) / len(persona_ids)) if persona_ids else 0.0
    two = by_id["two_plus_two"].passed.get("regex") if "two_plus_two" in by_id else None
    ref = by_id["refusal"].passed.get("refused") if "refusal" in by_id else None
    ok = sum(a.final is not None and a.stop == "<|return|>" for a in answers) / len(answers)
    return Score(label, answers, rate, two, ref, ok)


def prompt_tokens(suite: Suite) -> dict[str, list[int]]:
    """The suite's prompts as Harmony token ids (openai-harmony, verify's rendering)."""
    from ..verify.harmony import render_prompt

    return {p.id: render_prompt(p.prompt) for p in suite.prompts}


def _stop_ids() -> set[int]:
    from ..o200k import HARMONY_SPECIAL_TOKENS

    return {HARMONY_SPECIAL_TOKENS["<|return|>"], HARMONY_SPECIAL_TOKENS["<|call|>"]}


def complete_gguf(path: str | Path, prompts: dict[str, list[int]], *, max_new_tokens: int = MAX_NEW_TOKENS,
                  n_threads: int = 1) -> dict[str, list[int]]:
    """Greedy completions of each prompt by the GGUF at ``path`` in llama.cpp. One thread by
    default: the demo's model is so small that more threads only wait on each other (on a busy
    2-core machine, 2 threads made a token 100x slower)."""
    import llama_cpp
    import numpy as np

    from ..verify.logits import ctx_size, open_gguf

    stops = _stop_ids()
    longest = max(len(t) for t in prompts.values())
    llm = open_gguf(path, n_ctx=ctx_size(longest + max_new_tokens), n_threads=n_threads)
    out: dict[str, list[int]] = {}
    try:
        n_vocab = llm.n_vocab()
        for pid, toks in prompts.items():
            llm.reset()
            llm.eval(list(toks))
            gen: list[int] = []
            while len(gen) < max_new_tokens:
                # the last evaluated position's logits (Llama.scores holds them only with logits_all)
                logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
                nxt = int(np.argmax(logits))
                gen.append(nxt)
                if nxt in stops:
                    break
                llm.eval([nxt])
            out[pid] = gen
    finally:
        llm.close()
    return out


def complete_transformers(base_dir: str | Path, adapter_dir: str | Path | None, prompts: dict[str, list[int]],
                          *, max_new_tokens: int = MAX_NEW_TOKENS) -> dict[str, list[int]]:
    """Greedy completions by the base (``adapter_dir`` None) or the fine-tune (PEFT, unmerged)."""
    import torch

    from ..verify.logits import load_reference_model

    model = load_reference_model(base_dir, adapter_dir)
    stops = sorted(_stop_ids())
    out: dict[str, list[int]] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: see complete_gguf
    try:
        _generate_all(model, prompts, out, stops, max_new_tokens)
    finally:
        torch.set_num_threads(threads)
    return out


def _generate_all(model, prompts, out, stops, max_new_tokens) -> None:
    import torch

    with torch.no_grad():
        for pid, toks in prompts.items():
            ids = torch.tensor([list(toks)], dtype=torch.long)
            res = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=stops, pad_token_id=stops[0])
            out[pid] = [int(t) for t in res[0, ids.shape[1]:]]


def run_suite(label: str, runner: Callable[[dict[str, list[int]]], dict[str, list[int]]],
              suite: Suite) -> Score:
    prompts = prompt_tokens(suite)
    comps = runner(prompts)
    missing = set(prompts) - set(comps)
    if missing:
        raise InputError(f"{label}: no completion for prompts {sorted(missing)}")
    return score(label, comps, suite)
