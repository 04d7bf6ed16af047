"""The comparison of several adapters built on one base (:mod:`lora2gguf.batch`): comparison.json,
COMPARISON.md and a self-contained comparison.html, all derived from each adapter's own run.json.

The ranking is computed here and only here, from what each run.json recorded for its file of the
ranked type (``rank_by``, e.g. Q4_K_M), in this order:

1. required checks that file fails against its own fine-tune (fewer first): the gate on agreement
   with the fine-tune, the tokenizer check and the suite's required checks, as verify counts them;
2. suite checks it passes, greedy (more first): what the checkpoint does, persona, 2+2, refusal;
3. mean KL divergence from its own fine-tune (lower first);
4. size (smaller first); then the name.

Adapters not verified rank after the verified ones (by size); skipped and failed ones are listed
with their reasons and not ranked.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from html import escape
from pathlib import Path
from typing import Any, Sequence

from ..errors import OutputError
from .facts import human_bytes, num, pct

SCHEMA = "lora2gguf.comparison/1"
RULE = ["required checks failed against its own fine-tune (fewer first)",
        "suite checks passed, greedy (more first)",
        "mean KL divergence from its own fine-tune (lower first)",
        "file size (smaller first)"]


def _read_run(folder: Path) -> dict[str, Any] | None:
    try:
        rec = json.loads((folder / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def file_rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per output file of a run.json: its type and size, and verify's measurements of it."""
    v = record.get("verify") or {}
    vfiles = {f.get("file"): f for f in v.get("files") or []}
    checks = v.get("checks") or []
    failures = v.get("failures") or []
    rows = []
    for o in record.get("outputs") or []:
        f = o.get("file")
        m = (vfiles.get(f) or {}).get("metrics") or {}
        gate = (vfiles.get(f) or {}).get("gate") or {}
        results = [c["results"][f] for c in checks if f in (c.get("results") or {})]
        rows.append({
            "file": f, "type": str(o.get("type", "")).upper(), "bytes": o.get("bytes"),
            "verified": bool(v) and f in vfiles,
            "kl_mean": m.get("kl_mean"), "top1": m.get("top1"), "ppl": m.get("ppl"),
            "gate_passed": gate.get("passed"),
            "checks_passed": sum(1 for r in results if r.get("passed")) if results else None,
            "checks_total": len(results) if results else None,
            "required_failed": sum(1 for x in failures if x.get("file") == f) if v else None,
        })
    return rows


def fine_tune_checks(record: dict[str, Any]) -> dict[str, Any] | None:
    """How the fine-tune itself (verify's reference) did on the suite."""
    v = record.get("verify") or {}
    checks = v.get("checks") or []
    if not checks:
        return None
    ref = [c["results"].get("reference") or {} for c in checks]
    return {"passed": sum(1 for r in ref if r.get("passed")), "total": len(ref),
            "reference": (v.get("reference") or {}).get("label")}


def rank_key(row: dict[str, Any], name: str) -> tuple:
    """The sort key of an adapter's ranked file (see the module docstring); smaller is better."""
    if not row.get("verified"):
        return (1, 0, 0, 0.0, row.get("bytes") or 0, name)
    kl = row.get("kl_mean")
    return (0, row.get("required_failed") or 0, -(row.get("checks_passed") or 0),
            kl if isinstance(kl, (int, float)) and math.isfinite(kl) else math.inf, row.get("bytes") or 0, name)


def comparison(out_dir: str | Path, base: dict[str, Any], entries: Sequence[dict[str, Any]], rank_by: str,
               *, seconds: float | None = None) -> dict[str, Any]:
    """The comparison's facts: each entry's files and measurements read back from its run.json,
    and the ranking of the built ones by their ``rank_by`` file."""
    out = Path(out_dir)
    rows = []
    for e in entries:
        row = dict(e)
        row.update({"files": [], "fine_tune": None, "ranked_file": None, "rank": None, "key": None})
        rec = _read_run(out / e["folder"]) if e.get("status") == "built" else None
        if rec is not None:
            row["files"] = file_rows(rec)
            row["fine_tune"] = fine_tune_checks(rec)
            row["verify_passed"] = (rec.get("verify") or {}).get("passed")
            row["report"] = f"{e['folder']}/REPORT.md" if (out / e["folder"] / "REPORT.md").is_file() else None
            row["suite"] = _suite_marks(rec, next((f["file"] for f in row["files"] if f["type"] == rank_by), None))
            ranked = next((f for f in row["files"] if f["type"] == rank_by), None)
            if ranked is not None:
                row["ranked_file"] = ranked["file"]
                row["key"] = list(rank_key(ranked, e["name"]))
        rows.append(row)
    ranked_rows = sorted((r for r in rows if r["key"] is not None), key=lambda r: tuple(r["key"]))
    for i, r in enumerate(ranked_rows, 1):
        r["rank"] = i
    return {
        "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "base": base, "rank_by": {"type": rank_by, "rule": RULE},
        "entries": rows, "ranking": [r["name"] for r in ranked_rows],
        "counts": {s: sum(1 for r in rows if r.get("status") == s) for s in ("built", "skipped", "failed")},
        "seconds": round(seconds, 3) if seconds is not None else None,
    }


def _suite_marks(rec: dict[str, Any], file: str | None) -> dict[str, bool | None]:
    """(prompt / check) -> whether ``file`` passes it (greedy)."""
    out: dict[str, bool | None] = {}
    for c in (rec.get("verify") or {}).get("checks") or []:
        res = (c.get("results") or {}).get(file) if file else None
        out[f"{c.get('prompt')} / {c.get('check')}"] = None if res is None else bool(res.get("passed"))
    return out


# ------------------------------------------------------------------------------- renderings


def _ranked(c: dict[str, Any]) -> list[dict[str, Any]]:
    return sorted((r for r in c["entries"] if r.get("rank")), key=lambda r: r["rank"])


def _file(r: dict[str, Any]) -> dict[str, Any]:
    return next(f for f in r["files"] if f["file"] == r["ranked_file"])


def _checks(f: dict[str, Any]) -> str:
    return "n/a" if f.get("checks_total") is None else f"{f['checks_passed']}/{f['checks_total']}"


def _base_line(c: dict[str, Any]) -> str:
    b = c["base"]
    how = f"inspected {b.get('inspections', 0)} time(s)"
    if b.get("seconds") is not None:
        how += f" ({num(b['seconds'])} s, {human_bytes(b.get('header_bytes_read'))} of safetensors headers read)"
    return f"{b.get('label') or b.get('path')}; {how}"


def _unranked(c: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in c["entries"] if not r.get("rank")]


def summary_lines(c: dict[str, Any]) -> list[str]:
    """A few lines for a terminal."""
    t = c["rank_by"]["type"]
    lines = [f"base: {_base_line(c)}", f"ranking by the {t} files:"]
    for r in _ranked(c):
        f = _file(r)
        lines.append(f"  {r['rank']}. {r['name']}: {f['file']}  checks {_checks(f)}, required failed "
                     f"{f.get('required_failed') if f.get('verified') else 'n/a'}, KL {num(f.get('kl_mean'))}, "
                     f"{human_bytes(f.get('bytes'))}")
    for r in _unranked(c):
        codes = [f.get("code", "?") for f in r.get("findings") or []]
        first = (f"doctor blocked it ({', '.join(codes)})" if codes else
                 (r.get("reason") or "").splitlines()[0] if r.get("reason") else f"no {t} file")
        lines.append(f"  -  {r['name']}: {r['status']}: {first}")
    return lines


def _md_cell(s: Any) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def _md_table(head: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    return out + ["| " + " | ".join(_md_cell(x) for x in r) + " |" for r in rows] + [""]


def _mark(v: bool | None) -> str:
    return "n/a" if v is None else ("✅" if v else "❌")


def render_markdown(c: dict[str, Any]) -> str:
    t = c["rank_by"]["type"]
    ranked = _ranked(c)
    L = ["# Checkpoint comparison", "", f"Generated by lora2gguf from each adapter's run.json ({c['created']}).", "",
         f"Base: {_base_line(c)}.", ""]
    if ranked:
        best = ranked[0]
        L += [f"**Best by the ranking: {best['name']}** (`{best['folder']}/{best['ranked_file']}`).", ""]
    L += [f"## Ranking of the {t} files", ""]
    L += _md_table(["Rank", "Adapter", "Step", "Required checks failed", "Suite checks passed",
                    "Fine-tune passes", "Mean KL vs its fine-tune", "Top-1", "Size", "File"],
                   [[r["rank"], r["name"], "" if r.get("step") is None else r["step"],
                     _file(r).get("required_failed") if _file(r).get("verified") else "n/a", _checks(_file(r)),
                     f"{r['fine_tune']['passed']}/{r['fine_tune']['total']}" if r.get("fine_tune") else "n/a",
                     num(_file(r).get("kl_mean")), pct(_file(r).get("top1")), human_bytes(_file(r).get("bytes")),
                     f"`{r['folder']}/{r['ranked_file']}`"] for r in ranked])
    L += ["Ranked by, in this order: " + "; ".join(f"({i}) {x}" for i, x in enumerate(c["rank_by"]["rule"], 1))
          + ". Every figure is read from the adapter's own run.json.", ""]
    keys = sorted({k for r in ranked for k in (r.get("suite") or {})})
    if keys:
        L += [f"## Suite results of the {t} files (greedy)", ""]
        L += _md_table(["Prompt / check"] + [r["name"] for r in ranked],
                       [[k] + [_mark((r.get("suite") or {}).get(k)) for r in ranked] for k in keys])
    L += ["## Every file", ""]
    rows = []
    for r in c["entries"]:
        for f in r.get("files") or []:
            rows.append([r["name"], f"`{r['folder']}/{f['file']}`", f["type"], human_bytes(f.get("bytes")),
                         num(f.get("kl_mean")), pct(f.get("top1")), _checks(f),
                         "n/a" if f.get("gate_passed") is None else ("pass" if f["gate_passed"] else "FAIL")])
    L += _md_table(["Adapter", "File", "Type", "Size", "Mean KL", "Top-1", "Checks passed", "Gate"], rows) if rows \
        else ["No files were built.", ""]
    un = _unranked(c)
    if un:
        L += ["## Skipped or failed", ""]
        for r in un:
            codes = ", ".join(f.get("code", "?") for f in r.get("findings") or [])
            first = (r.get("reason") or "no file of the ranked type").splitlines()
            L += [f"- **{r['name']}** ({r['status']}{': ' + codes if codes else ''}): {_md_cell(first[0])}"]
            L += [f"  {_md_cell(x.strip())}" for x in first[1:8] if x.strip()]
        L += [""]
    L += ["## Per-adapter reports", ""]
    L += [f"- {r['name']}: `{r['report']}`" for r in c["entries"] if r.get("report")] or ["(none)"]
    return "\n".join(L) + "\n"


CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0;background:#f7fafc;color:#1a202c}
main{max-width:1100px;margin:0 auto;padding:24px 32px;background:#fff}h1{font-size:26px}
h2{font-size:20px;border-bottom:2px solid #e2e8f0;padding-bottom:4px;margin-top:32px}
table{border-collapse:collapse;margin:8px 0 16px;font-size:13px;width:100%}
th,td{border:1px solid #e2e8f0;padding:4px 8px;text-align:left}th{background:#edf2f7}
td.num{text-align:right;font-variant-numeric:tabular-nums}
code{font-family:SFMono-Regular,Consolas,monospace;font-size:12px}
.best{background:#c6f6d5}.ok{color:#22543d}.bad{color:#9b2c2c;font-weight:bold}.muted{color:#718096}
"""


def _h_table(head: list[str], rows: list[list[Any]], row_cls: list[str] | None = None) -> str:
    h = "".join(f"<th>{escape(str(x))}</th>" for x in head)
    body = []
    for i, r in enumerate(rows):
        cls = f' class="{row_cls[i]}"' if row_cls and row_cls[i] else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{escape(str(x))}</td>" for x in r) + "</tr>")
    return f"<table><thead><tr>{h}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def render_html(c: dict[str, Any]) -> str:
    t = c["rank_by"]["type"]
    ranked = _ranked(c)
    H = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8"><title>Checkpoint comparison</title>',
         f"<style>{CSS}</style></head><body><main>", "<h1>Checkpoint comparison</h1>",
         f"<p class='muted'>Generated by lora2gguf from each adapter's run.json ({escape(c['created'])}).</p>",
         f"<p>Base: {escape(_base_line(c))}.</p>"]
    if ranked:
        H.append(f"<p><b>Best by the ranking: {escape(ranked[0]['name'])}</b> "
                 f"(<code>{escape(ranked[0]['folder'] + '/' + ranked[0]['ranked_file'])}</code>).</p>")
    H.append(f"<h2>Ranking of the {escape(t)} files</h2>")
    H.append(_h_table(["Rank", "Adapter", "Step", "Required checks failed", "Suite checks passed", "Fine-tune passes",
                       "Mean KL vs its fine-tune", "Top-1", "Size", "File"],
                      [[r["rank"], r["name"], "" if r.get("step") is None else r["step"],
                        _file(r).get("required_failed") if _file(r).get("verified") else "n/a", _checks(_file(r)),
                        f"{r['fine_tune']['passed']}/{r['fine_tune']['total']}" if r.get("fine_tune") else "n/a",
                        num(_file(r).get("kl_mean")), pct(_file(r).get("top1")), human_bytes(_file(r).get("bytes")),
                        f"{r['folder']}/{r['ranked_file']}"] for r in ranked],
                      ["best" if r["rank"] == 1 else "" for r in ranked]))
    H.append("<p>Ranked by, in this order: " + escape("; ".join(f"({i}) {x}" for i, x in
                                                                enumerate(c["rank_by"]["rule"], 1)))
             + ". Every figure is read from the adapter's own run.json.</p>")
    keys = sorted({k for r in ranked for k in (r.get("suite") or {})})
    if keys:
        H.append(f"<h2>Suite results of the {escape(t)} files (greedy)</h2>")
        H.append(_h_table(["Prompt / check"] + [r["name"] for r in ranked],
                          [[k] + ["n/a" if (r.get("suite") or {}).get(k) is None else
                                  ("pass" if r["suite"][k] else "FAIL") for r in ranked] for k in keys]))
    rows = [[r["name"], f"{r['folder']}/{f['file']}", f["type"], human_bytes(f.get("bytes")), num(f.get("kl_mean")),
             pct(f.get("top1")), _checks(f),
             "n/a" if f.get("gate_passed") is None else ("pass" if f["gate_passed"] else "FAIL")]
            for r in c["entries"] for f in r.get("files") or []]
    H.append("<h2>Every file</h2>")
    H.append(_h_table(["Adapter", "File", "Type", "Size", "Mean KL", "Top-1", "Checks passed", "Gate"], rows)
             if rows else "<p>No files were built.</p>")
    un = _unranked(c)
    if un:
        H.append("<h2>Skipped or failed</h2><ul>")
        for r in un:
            codes = ", ".join(f.get("code", "?") for f in r.get("findings") or [])
            H.append(f"<li><b>{escape(r['name'])}</b> ({escape(r['status'])}{': ' + escape(codes) if codes else ''})"
                     f"<pre>{escape(r.get('reason') or 'no file of the ranked type')}</pre></li>")
        H.append("</ul>")
    H.append("</main></body></html>")
    return "\n".join(H)


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".partial")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e}") from e


def write_comparison(out_dir: str | Path, base: dict[str, Any], entries: Sequence[dict[str, Any]], rank_by: str,
                     *, seconds: float | None = None) -> tuple[tuple[Path, Path, Path], dict[str, Any]]:
    """comparison.json, COMPARISON.md and comparison.html in ``out_dir``, each written whole or not at all."""
    out = Path(out_dir)
    c = comparison(out, base, entries, rank_by, seconds=seconds)
    paths = (out / "comparison.json", out / "COMPARISON.md", out / "comparison.html")
    _write(paths[0], json.dumps(c, indent=2, default=str) + "\n")
    _write(paths[1], render_markdown(c))
    _write(paths[2], render_html(c))
    return paths, c
