"""The report of a run: REPORT.md, a self-contained report.html (inline CSS and SVG, no JS, no
network) and an Ollama Modelfile per GGUF, all rendered from run.json (nothing typed by hand).

    from lora2gguf.report import write_report
    paths = write_report(out_dir, json.load(open(out_dir / "run.json")))
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError, OutputError
from .facts import facts
from .html import render_html
from .markdown import render_markdown
from .run_files import commands, modelfile_text, write_modelfiles

__all__ = ["write_report", "ReportPaths", "render_markdown", "render_html", "modelfile_text", "commands", "facts"]


@dataclass
class ReportPaths:
    markdown: Path
    html: Path
    modelfiles: list[Path] = field(default_factory=list)


def write_report(out_dir: str | Path, record: dict[str, Any] | None = None) -> ReportPaths:
    """Write REPORT.md, report.html and the Modelfiles into ``out_dir`` from ``record`` (default:
    ``out_dir/run.json``)."""
    out = Path(out_dir)
    if record is None:
        try:
            record = json.loads((out / "run.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise InputError(f"cannot read {out / 'run.json'}: {e}; run `lora2gguf build` first") from e
    f = facts(record, out)
    md, html = out / "REPORT.md", out / "report.html"
    try:
        md.write_text(render_markdown(f), encoding="utf-8")
        html.write_text(render_html(f), encoding="utf-8")
    except OSError as e:
        raise OutputError(f"cannot write the report into {out}: {e}") from e
    return ReportPaths(md, html, write_modelfiles(out, record))
