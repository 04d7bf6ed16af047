"""The report: REPORT.md, report.html (rendered by headless Chromium) and the Modelfiles, all from
run.json."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp")
pytest.importorskip("peft")
pytest.importorskip("openai_harmony")

from lora2gguf.report import facts, render_html, render_markdown, write_report  # noqa: E402

from test_verify_fixture import verified_good  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out, _ = verified_good(tmp_path_factory)
    return out, json.loads((out / "run.json").read_text())


def test_report_files_written_next_to_the_ggufs(run):
    out, rec = run
    assert (out / "REPORT.md").is_file() and (out / "report.html").is_file()
    for o in rec["outputs"]:
        assert (out / (Path(o["file"]).stem + ".Modelfile")).is_file()


def test_markdown_shows_the_run(run):
    out, rec = run
    md = (out / "REPORT.md").read_text()
    for section in ("## Findings and how they were resolved", "## Reproduce", "## Files", "### Tensor types per file",
                    "## Agreement with the reference", "## Test results", "## Speed", "## Technical details",
                    "## Stage times", "## Running the files"):
        assert section in md
    assert "**Verification passed**" in md
    assert " ".join(rec["command"]) in md
    v = rec["verify"]
    assert v["reference"]["label"] in md
    # table cells escape "|" (GitHub renders `<\|return\|>` as <|return|>)
    assert "| Vocabulary size | 201088 |" in md and r"`<\|return\|>` (id 200002)" in md
    for o in rec["outputs"]:
        assert f"`{o['file']}`" in md
        assert f"llama-server -m {out / o['file']}" in md


def test_every_figure_comes_from_run_json(run):
    """Change numbers in the record: the rendering changes with them (nothing is typed by hand)."""
    out, rec = run
    r2 = copy.deepcopy(rec)
    f0 = r2["verify"]["files"][1]
    f0["metrics"]["kl_mean"] = 0.0123456
    f0["metrics"]["top1"] = 0.4321
    f0["speed"]["tg_tokens_per_s"] = 98765.0
    r2["outputs"][1]["bytes"] = 12_340_000
    r2["technical"]["context_length"] = 4242
    r2["stages"]["build"]["seconds"] = 77.125
    for render in (render_markdown, render_html):
        text = render(facts(r2, out))
        for s in ("0.0123", "43.2%", "98765", "12.34 MB", "4242", "77.1"):
            assert s in text, (render.__name__, s)
        old = render(facts(rec, out))
        assert "0.0123" not in old and "4242" not in old and "98765" not in old


def test_reduction_is_computed_from_sizes(run):
    out, rec = run
    f = facts(rec, out)
    by = {x["type"]: x for x in f["files"]}
    bf, q8 = rec["outputs"][0]["bytes"], rec["outputs"][1]["bytes"]
    assert by["Q8_0"]["reduction"] == pytest.approx(1 - q8 / bf)
    assert by["BF16"]["reduction"] == 0


def test_modelfile_harmony_template_and_stops(run):
    out, rec = run
    text = (out / "tiny-Q8_0.Modelfile").read_text()
    assert "FROM ./tiny-Q8_0.gguf" in text.splitlines()
    stops = re.findall(r'^PARAMETER stop "(.*)"$', text, flags=re.M)
    # the EOS the GGUF declares and Harmony's own reply ends (not <|end|>, which ends a message)
    assert stops == ["<|return|>", "<|call|>"]
    tpl = re.search(r'TEMPLATE """(.*?)"""', text, flags=re.S).group(1)
    assert tpl.startswith("<|start|>system<|message|>") and tpl.endswith("<|start|>assistant")
    assert "<|channel|>final<|message|>{{ $m.Content }}" in tpl
    # Go template blocks balance: every if/range has its end
    opens = len(re.findall(r"{{-?\s*(?:if|range)\b", tpl))
    ends = len(re.findall(r"{{-?\s*end\s*-?}}", tpl))
    assert opens == ends > 0


def test_html_is_self_contained(run):
    out, _ = run
    html = (out / "report.html").read_text()
    assert "<script" not in html.lower()
    assert not re.search(r"""(?:src|href)\s*=\s*["'](?:https?:)?//""", html)
    assert "@import" not in html and "url(" not in html
    assert html.count("<svg") == 2
    assert not re.search(r"&amp;(?:#x?[0-9a-fA-F]+|[a-z]+);", html), "text escaped twice"


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        p = shutil.which(name)
        if p:
            return p
    return None


def _chrome(args: list[str], url: str) -> subprocess.CompletedProcess:
    exe = _chromium()
    with tempfile.TemporaryDirectory() as prof:
        return subprocess.run(
            [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={prof}",
             *args, url], capture_output=True, text=True, timeout=120)


def test_html_renders_in_headless_chromium(run, tmp_path):
    if _chromium() is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    out, rec = run
    url = (out / "report.html").resolve().as_uri()
    dom = _chrome(["--dump-dom"], url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    d = dom.stdout
    assert "<h1>tiny: GGUF conversion report</h1>" in d
    assert d.count("<svg") == 2 and d.count("<table") >= 8
    n_quant = sum(1 for o in rec["outputs"] if o["type"] not in ("BF16", "F16", "F32"))
    assert d.count('class="point"') == n_quant
    assert d.count('class="bar"') == 2 * len(rec["outputs"])
    assert 'id="verdict"' in d and "Verification passed" in d
    shot = tmp_path / "report.png"
    r = _chrome([f"--screenshot={shot}", "--window-size=1200,2000", "--hide-scrollbars"], url)
    assert r.returncode == 0 and shot.is_file()
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000  # a page with content, not a blank one
    keep = Path(tempfile.gettempdir()) / "lora2gguf-report-screenshot.png"
    shutil.copyfile(shot, keep)


def test_write_report_from_run_json_alone(run, tmp_path):
    out, rec = run
    d = tmp_path / "copy"
    d.mkdir()
    (d / "run.json").write_text(json.dumps(rec))
    paths = write_report(d)
    assert paths.markdown.read_text() == render_markdown(facts(rec, d))
    assert [p.name for p in paths.modelfiles] == [Path(o["file"]).stem + ".Modelfile" for o in rec["outputs"]]
