"""doctor's report as text: a table grouped by severity, with the fixes (coloured on a terminal)."""

from __future__ import annotations

import shutil
import textwrap
from typing import Iterable

from .findings import BLOCKER, INFO, SEVERITIES, WARNING, accepted_codes

COLOURS = {BLOCKER: "\033[1;31m", WARNING: "\033[33m", INFO: "\033[36m"}
RESET = "\033[0m"
BOLD = "\033[1m"
HEADINGS = {BLOCKER: "BLOCKERS", WARNING: "WARNINGS", INFO: "INFO"}


def render_text(report, *, colour: bool = False, accepted: Iterable[str] = (), width: int | None = None,
                verbose: bool = False) -> str:
    """The findings as a table grouped by severity. Info findings are shown in one line each
    unless ``verbose``."""
    accepted = accepted_codes(accepted)
    width = width or min(shutil.get_terminal_size((110, 24)).columns, 140)
    c = (lambda s, k: f"{COLOURS.get(k, k)}{s}{RESET}") if colour else (lambda s, k: s)
    bold = (lambda s: f"{BOLD}{s}{RESET}") if colour else (lambda s: s)
    code_w = max((len(f.code) for f in report.findings), default=10) + 2
    body_w = max(width - code_w - 2, 40)
    lines = [bold(f"lora2gguf doctor")]
    tc = report.tokenizer_choice
    hub = getattr(report, "inputs", None) or {}

    def shown(role: str, path) -> str:  # a hub input: the repo, the revision asked for, the commit
        src = hub.get(role) or {}
        if not src.get("hub"):
            return str(path)
        at = src["repo"] + (f"@{src['revision']}" if src.get("revision") else "")
        state = "in the Hugging Face cache" if src.get("from_cache") else "from the hub"
        return f"{at} (commit {str(src.get('commit'))[:12]}, {state})"

    for label, text in (("base", shown("base", report.base_dir)), ("adapter", shown("adapter", report.adapter_dir)),
                        ("tokenizer", f"{tc.source} ({tc.dir}): {tc.reason}")):
        lines.extend(_wrap(f"{label + ':':{code_w}s}{text}", width, 0, hang=code_w))
    for sev in SEVERITIES:
        group = [f for f in report.findings if f.severity == sev]
        if not group:
            continue
        lines.append("")
        lines.append(c(f"{HEADINGS[sev]} ({len(group)})", sev))
        lines.append("-" * min(width, 100))
        for f in group:
            tag = f.code + (" (accepted)" if f.code in accepted else "")
            title = _wrap(f.title, body_w, 0)
            lines.append(f"{c(tag.ljust(code_w), sev)}{bold(title[0])}")
            lines.extend(" " * code_w + bold(t.strip()) for t in title[1:])
            if sev == INFO and not verbose:
                first = f.what.splitlines()[0] if f.what else ""
                lines.extend(_wrap(first, body_w, code_w))
                continue
            for label, text in (("what", f.what), ("why", f.why), ("fix", f.fix)):
                if not text:
                    continue
                for i, para in enumerate(text.splitlines()):
                    prefix = f"{label}: " if i == 0 else "      " if label == "what" else "     "
                    lines.extend(_wrap(prefix + para, body_w, code_w, keep_indent=True))
    counts = {s: sum(f.severity == s for f in report.findings) for s in SEVERITIES}
    lines.append("")
    verdict = ("blocked: fix the blockers or --accept CODE" if counts[BLOCKER]
               else "ok with warnings" if counts[WARNING] else "ok")
    lines.append(bold(f"{counts[BLOCKER]} blocker(s), {counts[WARNING]} warning(s), {counts[INFO]} info: {verdict}"))
    return "\n".join(lines) + "\n"


def _wrap(text: str, width: int, indent: int, keep_indent: bool = False, hang: int = 2) -> list[str]:
    """``text`` in lines of at most ``indent + width`` characters; continuation lines hang by ``hang``."""
    pad = " " * indent
    if len(text) <= width:
        return [pad + text]
    sub = " " * (len(text) - len(text.lstrip(" "))) if keep_indent else ""
    return textwrap.wrap(text, width + indent, initial_indent=pad, subsequent_indent=pad + sub + " " * hang,
                         break_long_words=True, break_on_hyphens=False) or [pad]
