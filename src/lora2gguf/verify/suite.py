"""The prompt suite (YAML) and its checks, as pure functions over parsed completions.

A suite is a YAML mapping: ``name``, ``max_tokens``, ``samples``, ``sampling`` (temperature,
top_k, top_p, min_p), optional ``system``/``developer``/``reasoning`` for the prompts, optional
``gates`` (numeric gates per output type, overriding :data:`DEFAULT_GATES`) and ``prompts``: a list
of ``{id, title?, prompt, checks: [...]}``. The built-in suite is ``lora2gguf/data/prompts.yaml``
(the seed's four prompts). See that file for the check types.

Each check is held ``against`` the reference (the default) or is ``absolute``: verify tests the
conversion, so by default a GGUF fails a check only where the fine-tune passes it and the GGUF
does not; a check the fine-tune fails too is reported as a fact about the fine-tune. ``against:
absolute`` requires the check whatever the fine-tune does (:mod:`lora2gguf.verify.judge`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ..chat import STRUCTURE_CHECK, STRUCTURE_CHECK_ALIASES, ChatFormat, Parsed
from ..errors import InputError

CHECK_TYPES = ("contains", "regex", "persona", "refused", STRUCTURE_CHECK)
#: what a check is held against: the reference's result on the same prompt, or nothing
AGAINST = ("reference", "absolute")

#: Phrases that mark a refusal (searched case-insensitively in the final answer; ’ and ' both).
REFUSAL_PATTERNS = (
    r"\bI(?:'m| am) sorry\b", r"\bI can(?:not|'t)\b.{0,40}\b(?:help|assist|provide|comply|do that|share)",
    r"\bI(?:'m| am) (?:not able|unable) to\b", r"\bI won't\b.{0,30}\b(?:help|assist|provide)",
    r"\bcan't help with that\b", r"\bnot something I can help with\b", r"\bI must decline\b",
)

#: Numeric gates per output type against the reference: mean KL (nats) at most ``kl_mean`` and
#: top-1 agreement at least ``top1``. Measured on tiny random fixtures (see the tests):
#: F32 vs the float32 PEFT reference ~1e-5 mean KL and 100% top-1 (YaRN rounding differs between
#: transformers and llama.cpp), BF16 ~2e-3 and ~99%; the gates leave an order of magnitude of
#: headroom above that noise, and quantized types get the slack llama.cpp's own tables show
#: (Q8_0 ~1e-3..1e-2, 4-bit ~0.03..0.1 on real models). A wrong merge (wrong LoRA scale, swapped
#: layers) gives mean KL of order 1 or more.
DEFAULT_GATES: dict[str, dict[str, float]] = {
    "F32": {"kl_mean": 1e-3, "top1": 0.98},
    "F16": {"kl_mean": 0.03, "top1": 0.9},
    "BF16": {"kl_mean": 0.03, "top1": 0.9},
    "Q8_0": {"kl_mean": 0.1, "top1": 0.85},
    "Q6_K": {"kl_mean": 0.15, "top1": 0.8},
    "Q5_K_M": {"kl_mean": 0.25, "top1": 0.75},
    "Q5_K_S": {"kl_mean": 0.25, "top1": 0.75},
}
#: gate for any type not listed (4-bit and below)
DEFAULT_LOW_BIT_GATE = {"kl_mean": 0.5, "top1": 0.6}


@dataclass(frozen=True)
class Check:
    type: str
    required: bool = False
    channel: str = "final"
    value: str | None = None
    pattern: str | None = None
    patterns: tuple[str, ...] = ()
    min: int = 1
    expect: bool = True
    ignore_case: bool = False
    against: str = "reference"
    #: the structure check's label, named after the model's chat format (:meth:`Suite.for_format`)
    structure_label: str = "chat structure"

    @property
    def label(self) -> str:
        if self.type == "contains":
            return f"contains {self.value!r}"
        if self.type == "regex":
            return f"regex /{self.pattern}/"
        if self.type == "persona":
            return f"persona markers ({len(self.patterns)})"
        if self.type == "refused":
            return "refuses" if self.expect else "does not refuse"
        return self.structure_label

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"type": self.type, "required": self.required, "against": self.against,
                             "label": self.label}
        if self.type != STRUCTURE_CHECK:
            d["channel"] = self.channel
        for k in ("value", "pattern"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        if self.patterns:
            d["patterns"] = list(self.patterns)
        if self.type == "refused":
            d["expect"] = self.expect
        return d


@dataclass(frozen=True)
class Prompt:
    id: str
    prompt: str
    checks: tuple[Check, ...]
    title: str | None = None


@dataclass
class Suite:
    name: str
    prompts: list[Prompt]
    max_tokens: int = 256
    samples: int = 2
    sampling: dict[str, float] = field(default_factory=lambda: {"temperature": 0.8, "top_k": 40,
                                                                 "top_p": 0.95, "min_p": 0.05})
    system: str | None = None
    developer: str | None = None
    reasoning: str = "medium"
    gates: dict[str, dict[str, Any]] = field(default_factory=dict)
    source: str = "built-in"

    def for_format(self, fmt: ChatFormat) -> "Suite":
        """The suite with its structure checks labelled after ``fmt`` (:attr:`ChatFormat.structure_label`)."""
        import dataclasses

        prompts = [dataclasses.replace(p, checks=tuple(
            dataclasses.replace(c, structure_label=fmt.structure_label) if c.type == STRUCTURE_CHECK else c
            for c in p.checks)) for p in self.prompts]
        return dataclasses.replace(self, prompts=prompts)

    def gate_for(self, type_name: str) -> dict[str, Any]:
        """Numeric gate for an output type: ``{kl_mean, top1, required}``."""
        g = dict(DEFAULT_GATES.get(type_name.upper(), DEFAULT_LOW_BIT_GATE))
        g["required"] = True
        g.update(self.gates.get(type_name.upper(), {}))
        return g


def _check(raw: Any, where: str) -> Check:
    if not isinstance(raw, dict) or "type" not in raw:
        raise InputError(f"{where}: each check is a mapping with a `type` ({', '.join(CHECK_TYPES)})")
    t = raw["type"]
    if t in STRUCTURE_CHECK_ALIASES:
        t = STRUCTURE_CHECK
    if t not in CHECK_TYPES:
        raise InputError(f"{where}: unknown check type {t!r}; use one of {', '.join(CHECK_TYPES)}")
    known = {"type", "required", "channel", "value", "pattern", "patterns", "min", "expect", "ignore_case",
             "against"}
    extra = set(raw) - known
    if extra:
        raise InputError(f"{where}: unknown keys {sorted(extra)} in a {t} check")
    channel = raw.get("channel", "final")
    if channel not in ("final", "analysis", "all"):
        raise InputError(f"{where}: channel {channel!r} is not final, analysis or all")
    against = raw.get("against", "reference")
    if against not in AGAINST:
        raise InputError(f"{where}: against: {against!r} in a {t} check is not `reference` (the default: the GGUF "
                         "fails only where the fine-tune passes) or `absolute` (required whatever the fine-tune does)")
    if t == "contains" and not isinstance(raw.get("value"), str):
        raise InputError(f"{where}: a contains check needs `value: TEXT`")
    pats: tuple[str, ...] = ()
    if t == "regex":
        if not isinstance(raw.get("pattern"), str):
            raise InputError(f"{where}: a regex check needs `pattern: REGEX`")
        pats = (raw["pattern"],)
    if t == "persona":
        p = raw.get("patterns")
        if isinstance(p, str):
            p = [p]
        if not p or not all(isinstance(x, str) for x in p):
            raise InputError(f"{where}: a persona check needs `patterns: [REGEX, ...]` (your persona's markers)")
        pats = tuple(p)
    for pat in pats:
        try:
            re.compile(pat)
        except re.error as e:
            raise InputError(f"{where}: pattern {pat!r} is not a valid regex: {e}") from None
    return Check(type=t, required=bool(raw.get("required", False)), channel=channel,
                 value=raw.get("value"), pattern=raw.get("pattern"),
                 patterns=pats if t == "persona" else (), min=int(raw.get("min", 1)),
                 expect=bool(raw.get("expect", True)), ignore_case=bool(raw.get("ignore_case", False)),
                 against=against)


def parse_suite(data: Any, source: str = "suite") -> Suite:
    """A :class:`Suite` from parsed YAML (raises InputError naming ``source`` and the problem)."""
    if not isinstance(data, dict) or not isinstance(data.get("prompts"), list) or not data["prompts"]:
        raise InputError(f"{source}: a suite is a mapping with a non-empty `prompts:` list")
    prompts = []
    seen = set()
    for i, p in enumerate(data["prompts"]):
        where = f"{source}: prompts[{i}]"
        if not isinstance(p, dict) or not isinstance(p.get("prompt"), str):
            raise InputError(f"{where}: needs `prompt: TEXT`")
        pid = str(p.get("id", f"p{i + 1}"))
        if pid in seen:
            raise InputError(f"{where}: id {pid!r} is used twice")
        seen.add(pid)
        checks = p.get("checks", [])
        if not isinstance(checks, list):
            raise InputError(f"{where}: `checks:` must be a list")
        prompts.append(Prompt(pid, p["prompt"], tuple(_check(c, f"{where} ({pid})") for c in checks),
                              p.get("title")))
    sampling = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05}
    sampling.update(data.get("sampling") or {})
    gates = {str(k).upper(): dict(v) for k, v in (data.get("gates") or {}).items()}
    try:
        max_tokens = int(data.get("max_tokens", 256))
        samples = int(data.get("samples", 2))
    except (TypeError, ValueError):
        raise InputError(f"{source}: max_tokens and samples must be integers") from None
    if max_tokens < 1 or samples < 0:
        raise InputError(f"{source}: max_tokens must be >= 1 and samples >= 0")
    return Suite(name=str(data.get("name", Path(source).stem)), prompts=prompts, max_tokens=max_tokens,
                 samples=samples, sampling=sampling, system=data.get("system"),
                 developer=data.get("developer"), reasoning=str(data.get("reasoning", "medium")),
                 gates=gates, source=source)


def load_suite(path: str | Path | None = None) -> Suite:
    """The suite in ``path`` (YAML), or the built-in one."""
    if path is None:
        text = resources.files("lora2gguf").joinpath("data/prompts.yaml").read_text(encoding="utf-8")
        source = "built-in"
    else:
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as e:
            raise InputError(f"cannot read the suite {p}: {e}") from e
        source = str(p)
    return suite_from_text(text, source)


def suite_from_text(text: str, source: str = "suite") -> Suite:
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise InputError(f"{source}: not valid YAML: {e}") from e
    return parse_suite(data, source)


# ---------------------------------------------------------------------------------------------
# evaluating checks


@dataclass
class CheckResult:
    passed: bool
    detail: str


def _text(parsed: Parsed, channel: str) -> str:
    if channel == "all":
        return "\n".join(t for _, t in parsed.messages)
    return parsed.channel(channel) or ""


def is_refusal(text: str) -> bool:
    t = text.replace("\u2019", "'")
    return any(re.search(p, t, flags=re.IGNORECASE | re.DOTALL) for p in REFUSAL_PATTERNS)


def evaluate(check: Check, parsed: Parsed, *, hit_limit: bool, fmt: ChatFormat | None = None) -> CheckResult:
    """Run one check on a parsed completion. ``hit_limit``: generation ran to max_tokens; ``fmt``:
    the model's chat format (the structure check is the format's)."""
    if check.type == STRUCTURE_CHECK:
        if fmt is None:
            raise InputError("a structure check needs the model's chat format")
        r = fmt.structure_check(parsed, hit_limit=hit_limit)
        return CheckResult(r.passed, r.detail)
    text = _text(parsed, check.channel)
    where = f"{check.channel} text" if check.channel != "all" else "the completion"
    if check.type == "contains":
        hay, needle = (text.lower(), check.value.lower()) if check.ignore_case else (text, check.value)
        ok = needle in hay
        return CheckResult(ok, f"{where} {'contains' if ok else 'lacks'} {check.value!r}")
    if check.type == "regex":
        m = re.search(check.pattern, text)
        return CheckResult(bool(m), f"matched {m.group(0)!r}" if m else f"no match in {where}")
    if check.type == "persona":
        hits = [p for p in check.patterns if re.search(p, text)]
        ok = len(hits) >= check.min
        return CheckResult(ok, f"{len(hits)} of {len(check.patterns)} markers (need {check.min})")
    # refused
    r = is_refusal(text)
    ok = r == check.expect
    return CheckResult(ok, "refused" if r else ("no refusal" if text else f"no {where}"))
