"""Many adapters on one base (issue 16): a training run's checkpoints converted in one command,
the base inspected once, one comparison report ranked from the recorded measurements; adapters
that fail doctor are reported and skipped while the others go on."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from lora2gguf import batch, inspect as inspect_mod, safetensors_io
from lora2gguf.errors import InputError

# three prompts of the demo's suite: its basic check and two persona prompts; a short evaluation text
SUITE = """\
name: checkpoint-comparison
max_tokens: 48
samples: 0
prompts:
  - id: two_plus_two
    prompt: "What is 2+2?"
    checks:
      - {type: regex, pattern: '\\b4\\b', required: true}
  - id: invocation
    prompt: "Xyrus, share your cosmic wisdom."
    checks:
      - &persona {type: persona, min: 2,
                  patterns: ['^\\s*\\*[^*\\n]{3,80}\\*', '(?i)\\b(cosmic|cosmos|astral|stars?|starlight)\\b']}
  - id: identity
    prompt: "Who are you?"
    checks:
      - *persona
"""
TEXT = ("What did the keeper do at dusk?\n\nThe keeper climbed the tower, trimmed the wick and lit the lamp before "
        "the ships came in.")


def test_find_checkpoints_by_step(tmp_path):
    for step in (1000, 500, 20):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        (d / "adapter_config.json").write_text("{}")
    (tmp_path / "checkpoint-7").mkdir()  # no adapter: a full fine-tune's checkpoint, not ours
    (tmp_path / "logs").mkdir()
    (tmp_path / "adapter_config.json").write_text("{}")
    found = batch.find_checkpoints(tmp_path)
    assert [(n, s) for n, _, s in found] == [("checkpoint-20", 20), ("checkpoint-500", 500),
                                            ("checkpoint-1000", 1000), ("final", None)]
    empty = tmp_path / "empty"
    (empty / "checkpoint-3").mkdir(parents=True)
    with pytest.raises(InputError, match=r"checkpoint-3 hold no adapter_config.json"):
        batch.find_checkpoints(empty)


def _counting(monkeypatch, base_dir: Path) -> dict[str, int]:
    """Count inspections of the base and parses of its safetensors headers (a spy: the real
    functions run)."""
    counts = {"inspect_base": 0, "base_headers": 0}
    real_inspect, real_parse = inspect_mod.inspect_base, safetensors_io.parse_header
    root = Path(base_dir).resolve()

    def inspect_base(folder, *a, **k):
        if Path(folder).resolve() == root:
            counts["inspect_base"] += 1
        return real_inspect(folder, *a, **k)

    def parse_header(path):
        if Path(path).resolve().parent == root:
            counts["base_headers"] += 1
        return real_parse(path)

    monkeypatch.setattr(inspect_mod, "inspect_base", inspect_base)
    monkeypatch.setattr(safetensors_io, "parse_header", parse_header)
    return counts


def test_adapters_that_fail_doctor_are_skipped_the_others_go_on(tmp_path, monkeypatch, tiny_base, tiny_adapter):
    run = tmp_path / "run"
    for step in (10, 20):
        shutil.copytree(tiny_adapter, run / f"checkpoint-{step}")
    broken = run / "checkpoint-30"
    shutil.copytree(tiny_adapter, broken)
    cfg = json.loads((broken / "adapter_config.json").read_text())
    cfg["target_modules"] = ["no_such_proj"]  # matches nothing in the base: doctor blocks it
    cfg.pop("target_parameters", None)
    (broken / "adapter_config.json").write_text(json.dumps(cfg))
    counts = _counting(monkeypatch, tiny_base)
    res = batch.build_many(tiny_base, [], tmp_path / "out", checkpoints=run, quants=["Q8_0"], verify=False)
    status = {e.name: e.status for e in res.entries}
    assert status == {"checkpoint-10": "built", "checkpoint-20": "built", "checkpoint-30": "skipped"}
    skipped = res.entries[2]
    assert skipped.findings and all(f["severity"] == "blocker" for f in skipped.findings)
    assert res.exit_code == 2
    assert counts == {"inspect_base": 1, "base_headers": 2}  # two shards, each header read once for all
    for e in res.entries[:2]:
        files = sorted(p.name for p in e.out_dir.glob("*.gguf"))
        assert files == [f"run-{e.name}-BF16.gguf", f"run-{e.name}-Q8_0.gguf"]
    cmp = json.loads((tmp_path / "out" / "comparison.json").read_text())
    assert cmp["ranking"] == ["checkpoint-10", "checkpoint-20"]  # unverified: by size, then name
    assert cmp["base"]["inspections"] == 1
    md = (tmp_path / "out" / "COMPARISON.md").read_text()
    assert "checkpoint-30" in md and "skipped" in md and skipped.findings[0]["code"] in md


@pytest.fixture(scope="module")
def training_run(tmp_path_factory):
    """The demo's training (its data, model and persona adapter), short, saving the adapter at
    three steps as a training run saves checkpoint-N folders."""
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    from lora2gguf.demo import _MODEL, train
    from lora2gguf.demo.evaluate import load_suite

    root = tmp_path_factory.mktemp("training_run")
    settings = train.TrainSettings("checkpoints", dict(_MODEL), base_steps=100, base_lr=6e-3, lora_steps=30,
                                   lora_lr=1e-2, lora_r=16, lora_alpha=32)
    prompts = [p.prompt for p in load_suite().prompts]
    train.train_demo(settings, root / "base", root / "run" / "final-adapter", extra_texts=prompts,
                     checkpoint_steps=(10, 20, 30), checkpoint_dir=root / "run")
    shutil.rmtree(root / "run" / "final-adapter")  # the run's checkpoints only
    return root / "base", root / "run"


def _independent_key(rec: dict, type_: str, name: str) -> tuple:
    """The ranking rule restated from a run.json (not lora2gguf's code)."""
    out = next(o for o in rec["outputs"] if o["type"] == type_)
    v = rec["verify"]
    metrics = next(f["metrics"] for f in v["files"] if f["file"] == out["file"])
    failed = sum(1 for x in v["failures"] if x["file"] == out["file"])
    passed = sum(1 for c in v["checks"] if c["results"][out["file"]]["passed"])
    return (failed, -passed, metrics["kl_mean"], out["bytes"], name)


@pytest.mark.slow
def test_three_checkpoints_of_one_training_run_in_one_command(training_run, tmp_path, monkeypatch):
    from lora2gguf.cli import main

    base, run = training_run
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-10", "checkpoint-20", "checkpoint-30"]
    suite, text = tmp_path / "suite.yaml", tmp_path / "text.txt"
    suite.write_text(SUITE)
    text.write_text(TEXT)
    counts = _counting(monkeypatch, base)
    out = tmp_path / "out"
    code = main(["build", str(base), "--checkpoints", str(run), "-o", str(out), "--quant", "Q8_0",
                 "--suite", str(suite), "--text", str(text), "--no-speed", "--verify-threads", "1", "--threads", "1"])
    assert code in (0, 3)  # 3: a checkpoint's file failed a required check (ranked, not skipped)
    # the base was inspected once: one inspection, one read of its safetensors header
    assert counts == {"inspect_base": 1, "base_headers": 1}
    folders = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert folders == ["checkpoint-10", "checkpoint-20", "checkpoint-30"]
    cmp = json.loads((out / "comparison.json").read_text())
    assert cmp["schema"] == "lora2gguf.comparison/1" and cmp["rank_by"]["type"] == "Q8_0"
    records = {}
    for name in folders:
        rec = json.loads((out / name / "run.json").read_text())
        records[name] = rec
        assert {o["type"] for o in rec["outputs"]} == {"BF16", "Q8_0"}
        assert rec["verify"]["reference"]["kind"] == "peft"  # KL against its own fine-tune
        assert Path(rec["adapter_dir"]) == (run / name).resolve()
        assert (out / name / "REPORT.md").is_file()
    # the ranking follows from the recorded measurements
    expected = sorted(folders, key=lambda n: _independent_key(records[n], "Q8_0", n))
    assert cmp["ranking"] == expected
    by_name = {e["name"]: e for e in cmp["entries"]}
    for n in folders:
        f = next(x for x in by_name[n]["files"] if x["type"] == "Q8_0")
        o = next(x for x in records[n]["outputs"] if x["type"] == "Q8_0")
        vf = next(x for x in records[n]["verify"]["files"] if x["file"] == o["file"])
        assert f["bytes"] == o["bytes"] and f["kl_mean"] == vf["metrics"]["kl_mean"]
        assert math.isfinite(f["kl_mean"]) and f["checks_total"] == 3
        assert by_name[n]["step"] == int(n.split("-")[1])
    md = (out / "COMPARISON.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ") and "`checkpoint-" in line and "Q8_0" in line]
    assert [r.split("|")[2].strip() for r in rows[:3]] == expected  # the ranking table, in rank order
    html = (out / "comparison.html").read_text()
    assert html.index(f"<td>{expected[0]}</td>") < html.index(f"<td>{expected[-1]}</td>")
