"""`lora2gguf doctor` on the command line: exit codes, the table, --json, --accept, no tracebacks."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from lora2gguf import doctor, o200k, synth
from lora2gguf.doctor import cli
from lora2gguf.doctor.render import render_text


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lora2gguf.doctor.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def pair(tiny_base, tmp_path_factory):
    ad = synth.make_adapter_numpy(tiny_base, tmp_path_factory.mktemp("cli_adapter"))
    return tiny_base, ad


@pytest.fixture(scope="module")
def blocked_pair(tiny_base, tmp_path_factory):
    ad = synth.make_adapter_numpy(tiny_base, tmp_path_factory.mktemp("cli_blocked"), init_scale=0.0,
                                  tokenizer=lambda d: o200k.write_tokenizer(d, eos_token="<|end|>"))
    return tiny_base, ad


def test_clean_pair_exits_0_with_json(pair, tmp_path):
    base, ad = pair
    r = run_cli(base, ad, "--json", "--out", tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    data = json.loads(r.stdout)
    assert data["schema"] == doctor.SCHEMA and data["exit_code"] == 0
    assert data["counts"]["blocker"] == 0 and data["counts"]["warning"] == 0
    assert data["tokenizer"]["source"] == "adapter"


def test_blockers_exit_2_and_accept_lowers_it(blocked_pair):
    base, ad = blocked_pair
    r = run_cli(base, ad, "--no-color", "--outputs", "BF16")
    assert r.returncode == 2, r.stdout + r.stderr
    out = r.stdout
    assert "BLOCKERS (1)" in out and "ADAPTER_ZERO" in out and "WARNINGS" in out
    assert "fix: save the adapter after training" in out
    assert out.index("BLOCKERS") < out.index("WARNINGS") < out.index("INFO")
    assert "\033[" not in out
    r = run_cli(base, ad, "--accept", "ADAPTER_ZERO", "--json")
    assert r.returncode == 1  # warnings remain (eos <|end|>)
    data = json.loads(r.stdout)
    assert [f["accepted"] for f in data["findings"] if f["code"] == "ADAPTER_ZERO"] == [True]


def test_bad_input_is_findings_not_a_traceback(tmp_path):
    r = run_cli(tmp_path / "nope", tmp_path / "nada")
    assert r.returncode == 2
    flat = " ".join(r.stdout.split())  # the table wraps long lines at word boundaries, wherever the path ends
    assert "Traceback" not in r.stderr and "BASE_INVALID" in flat and "nope: base model folder not found" in flat


def test_parser_registers_with_subparsers(pair, capsys):
    base, ad = pair
    parser = argparse.ArgumentParser(prog="lora2gguf")
    sub = parser.add_subparsers(dest="command")
    cli.add_parser(sub)
    args = parser.parse_args(["doctor", str(base), str(ad), "--json", "--outputs", "BF16,Q8_0"])
    assert args.func is cli.main
    assert args.func(args) == 0
    data = json.loads(capsys.readouterr().out)
    assert [o["name"] for o in data["resources"]["outputs"]] == ["BF16", "Q8_0"]


def test_render_colours_by_severity(blocked_pair):
    report = doctor.run(*blocked_pair, free_bytes=10**12)
    text = render_text(report, colour=True, width=100)
    assert "\033[1;31mBLOCKERS (1)" in text and "\033[33mWARNINGS" in text
    plain = render_text(report, colour=False, width=100, accepted={"ADAPTER_ZERO"})
    assert "ADAPTER_ZERO (accepted)" in plain
    assert all(len(line) <= 100 for line in plain.splitlines() if "sha256" not in line)
