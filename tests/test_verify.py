"""verify is a real gate: a correct GGUF passes; broken ones fail, each by the right check.

The fine-tune is the behaving fixture of test_verify_fixture (a tiny GPT-OSS whose LoRA answers
three Harmony prompts). The broken files are made from the correct build:
- EOS set to a token that never comes (tokenizer.ggml.eos_token_id edited with gguf-py);
- the two layers' tensors swapped;
- a merge with the wrong LoRA scale (api.build on a copy of the adapter with lora_alpha doubled).
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest

pytest.importorskip("llama_cpp")
pytest.importorskip("peft")
pytest.importorskip("openai_harmony")

from lora2gguf.errors import InputError  # noqa: E402
from lora2gguf.o200k import HARMONY_SPECIAL_TOKENS  # noqa: E402
from lora2gguf.verify import verify  # noqa: E402
from lora2gguf.verify.logits import declared_stop_tokens, gguf_metadata  # noqa: E402
from lora2gguf.verify.suite import suite_from_text  # noqa: E402

from test_verify_fixture import (FIXTURE_SUITE, VERIFY_KW, behaving_dirs, built_good,  # noqa: E402
                                 scaled_adapter, verified_good)

NEVER = HARMONY_SPECIAL_TOKENS["<|reserved_200017|>"]


def gguf_layout(path: Path) -> tuple[dict[str, tuple[int, int]], dict[str, tuple[int, int, int]]]:
    """A fast walk over a GGUF header (gguf-py's reader parses every token string in Python, which
    takes half a minute here): key -> (value type, offset of the value) and tensor name ->
    (ggml type, absolute data offset, bytes). Types and sizes come from gguf-py's constants."""
    VT = gguf.GGUFValueType
    fixed = {VT.UINT8: "B", VT.INT8: "b", VT.UINT16: "H", VT.INT16: "h", VT.UINT32: "I", VT.INT32: "i",
             VT.FLOAT32: "f", VT.BOOL: "?", VT.UINT64: "Q", VT.INT64: "q", VT.FLOAT64: "d"}
    buf = path.read_bytes()
    assert buf[:4] == b"GGUF"
    n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)
    pos = 24

    def string(p: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", buf, p)
        return buf[p + 8:p + 8 + n].decode("utf-8", "replace"), p + 8 + n

    def skip(t: int, p: int) -> int:
        if t == VT.STRING:
            return string(p)[1]
        if t == VT.ARRAY:
            et, n = struct.unpack_from("<IQ", buf, p)
            p += 12
            if et in fixed:
                return p + n * struct.calcsize("<" + fixed[VT(et)])
            for _ in range(n):
                p = skip(et, p)
            return p
        return p + struct.calcsize("<" + fixed[VT(t)])

    kv: dict[str, tuple[int, int]] = {}
    alignment = gguf.GGUF_DEFAULT_ALIGNMENT
    for _ in range(n_kv):
        key, pos = string(pos)
        (t,) = struct.unpack_from("<I", buf, pos)
        pos += 4
        kv[key] = (t, pos)
        if key == gguf.Keys.General.ALIGNMENT:
            (alignment,) = struct.unpack_from("<I", buf, pos)
        pos = skip(t, pos)
    infos = []
    for _ in range(n_tensors):
        name, pos = string(pos)
        (nd,) = struct.unpack_from("<I", buf, pos)
        dims = struct.unpack_from(f"<{nd}Q", buf, pos + 4)
        t, off = struct.unpack_from("<IQ", buf, pos + 4 + 8 * nd)
        pos += 4 + 8 * nd + 12
        infos.append((name, dims, t, off))
    start = -(-pos // alignment) * alignment
    tensors = {}
    for name, dims, t, off in infos:
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(t)]
        tensors[name] = (t, start + off, int(np.prod(dims)) // block * size)
    return kv, tensors


def set_eos(path: Path, token_id: int) -> None:
    """Set tokenizer.ggml.eos_token_id (a UINT32) in place; the file is a copy."""
    kv, _ = gguf_layout(path)
    t, off = kv[gguf.Keys.Tokenizer.EOS_ID]
    assert t == gguf.GGUFValueType.UINT32
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(struct.pack("<I", token_id))


def swap_layers(path: Path, a: int = 0, b: int = 1) -> int:
    """Swap the data of every blk.a.* tensor with its blk.b.* twin in place; returns the count."""
    _, tensors = gguf_layout(path)
    n = 0
    with open(path, "r+b") as f:
        for name, (t, off, size) in tensors.items():
            if not name.startswith(f"blk.{a}."):
                continue
            t2, off2, size2 = tensors[f"blk.{b}." + name[len(f"blk.{a}."):]]
            assert (t, size) == (t2, size2)
            f.seek(off)
            x = f.read(size)
            f.seek(off2)
            y = f.read(size)
            assert x != y
            f.seek(off)
            f.write(y)
            f.seek(off2)
            f.write(x)
            n += 1
    return n


def _entry(record: dict, src: str, new: Path, note: str) -> dict:
    from lora2gguf.gguf_out import sha256_file

    e = dict(next(o for o in record["outputs"] if o["file"] == src))
    e.update(file=new.name, bytes=new.stat().st_size, sha256=sha256_file(new), note=note)
    return e


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return verified_good(tmp_path_factory)


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    """One OUT_DIR with the three broken files (the reference is the real fine-tune)."""
    from lora2gguf.api import build

    src = built_good(tmp_path_factory)
    base, adapter = behaving_dirs(tmp_path_factory)
    d = tmp_path_factory.mktemp("broken")
    record = json.loads((src / "run.json").read_text())
    record.pop("verify", None)
    outs = []
    eos = d / "tiny-eos-BF16.gguf"
    shutil.copyfile(src / "tiny-BF16.gguf", eos)
    set_eos(eos, NEVER)
    outs.append(_entry(record, "tiny-BF16.gguf", eos, "EOS set to <|reserved_200017|>"))
    swp = d / "tiny-swapped-BF16.gguf"
    shutil.copyfile(src / "tiny-BF16.gguf", swp)
    assert swap_layers(swp) > 10
    outs.append(_entry(record, "tiny-BF16.gguf", swp, "layers 0 and 1 swapped"))
    wrong = scaled_adapter(adapter, d / "adapter-x2", 2.0)
    build(base, wrong, d / "wrong", name="tiny-scale", outtype="bf16")
    sc = d / "tiny-scale-BF16.gguf"
    shutil.move(d / "wrong" / "tiny-scale-BF16.gguf", sc)
    outs.append(_entry(record, "tiny-BF16.gguf", sc, "merged with lora_alpha x2"))
    record["outputs"] = outs
    (d / "run.json").write_text(json.dumps(record))
    res = verify(d, suite=suite_from_text(FIXTURE_SUITE, "fixture-suite.yaml"), speed=False, **VERIFY_KW)
    return d, res


def failed_checks(result, file: str) -> set[str]:
    return {f["check"] for f in result.failures if f["file"] == file}


def test_correct_gguf_passes(good):
    out, res = good
    rec = json.loads((out / "run.json").read_text())
    v = rec["verify"]
    assert v["passed"] is True and v["failures"] == []
    assert v["reference"]["kind"] == "peft" and v["reference"]["dtype"] == "float32"
    files = {f["file"]: f for f in v["files"]}
    assert set(files) == {"tiny-BF16.gguf", "tiny-Q8_0.gguf"}
    bf = files["tiny-BF16.gguf"]["metrics"]
    # BF16 rounding of the merged weights is all that separates the file from the fine-tune
    assert 0 < bf["kl_mean"] < 0.01 and bf["top1"] > 0.95
    assert files["tiny-Q8_0.gguf"]["metrics"]["kl_mean"] > bf["kl_mean"]
    for f in files.values():
        assert f["gate"]["passed"] is True
        assert f["speed"]["threads"] == VERIFY_KW["n_threads"]
        assert f["speed"]["pp_tokens_per_s"] > 0 and f["speed"]["tg_tokens_per_s"] > 0
        assert f["stop_tokens"]["eos"] == {"id": 200002, "token": "<|return|>"}
    # every greedy run of every model answers in Harmony and stops at <|return|>
    for runs in [v["reference_runs"], *v["runs"].values()]:
        for g in runs:
            if g["mode"] == "greedy":
                assert g["channels"] == ["analysis", "final"] and g["stop"] == "<|return|>", g
                assert not g["hit_limit"]
    finals = {g["prompt"]: g["final"] for g in v["runs"]["tiny-Q8_0.gguf"] if g["mode"] == "greedy"}
    assert finals["math"] == "4"
    assert finals["refusal"] == "I'm sorry, but I can't help with that."
    assert rec["stages"]["verify"]["seconds"] > 0


def test_eos_never_coming_fails_harmony_structure(broken):
    _, res = broken
    f = "tiny-eos-BF16.gguf"
    assert failed_checks(res, f) == {"Harmony structure"}
    details = {x["detail"] for x in res.failures if x["file"] == f}
    assert all("token limit" in d for d in details)
    vf = next(x for x in res.section["files"] if x["file"] == f)
    assert vf["stop_tokens"]["eos"]["id"] == NEVER
    assert vf["gate"]["passed"] is True  # the weights are right: only the stop is wrong


@pytest.mark.parametrize("f", ["tiny-swapped-BF16.gguf", "tiny-scale-BF16.gguf"], ids=["swapped-layers", "wrong-lora-scale"])
def test_broken_weights_fail_agreement(broken, f):
    _, res = broken
    assert "agreement with the reference" in failed_checks(res, f)
    m = next(x for x in res.section["files"] if x["file"] == f)["metrics"]
    assert m["kl_mean"] > 0.1


def test_broken_run_is_a_failed_gate(broken):
    d, res = broken
    assert res.passed is False
    rec = json.loads((d / "run.json").read_text())
    assert rec["verify"]["passed"] is False
    assert {f["file"] for f in rec["verify"]["failures"]} == {
        "tiny-eos-BF16.gguf", "tiny-swapped-BF16.gguf", "tiny-scale-BF16.gguf"}
    assert "FAILED" in (d / "REPORT.md").read_text()


def test_set_eos_and_swap_edit_only_what_they_say(tmp_path, tmp_path_factory):
    """The broken files differ from the good one exactly as intended: the edited copy is read back
    with gguf-py, the original with llama.cpp (metadata) and as raw bytes (tensor data)."""
    src = built_good(tmp_path_factory) / "tiny-BF16.gguf"
    dst = tmp_path / "x.gguf"
    shutil.copyfile(src, dst)
    set_eos(dst, NEVER)
    assert swap_layers(dst) > 10
    before, after = gguf_metadata(src), gguf_metadata(dst)
    assert {k for k in before if before[k] != after.get(k)} == {gguf.Keys.Tokenizer.EOS_ID}
    assert set(before) == set(after)
    r = gguf.GGUFReader(str(dst))
    assert r.fields[gguf.Keys.Tokenizer.EOS_ID].contents() == NEVER
    _, layout = gguf_layout(src)
    raw = src.read_bytes()
    for t in r.tensors:
        twin = t.name.replace("blk.0.", "blk.1.") if t.name.startswith("blk.0.") else (
            t.name.replace("blk.1.", "blk.0.") if t.name.startswith("blk.1.") else t.name)
        _, off, size = layout[twin]
        assert np.asarray(t.data).tobytes() == raw[off:off + size], t.name
    assert declared_stop_tokens(after) == {"eos": NEVER}


def test_verify_without_run_json_names_the_file(tmp_path):
    with pytest.raises(InputError, match="run.json"):
        verify(tmp_path)


def test_gguf_reference_when_asked(tmp_path, tmp_path_factory):
    """reference="gguf": the BF16 file is the reference (no numbers of its own), the others are
    compared with it, and the report says so."""
    src = built_good(tmp_path_factory)
    d = tmp_path / "out"
    d.mkdir()
    rec = json.loads((src / "run.json").read_text())
    rec.pop("verify", None)
    for o in rec["outputs"]:
        shutil.copyfile(src / o["file"], d / o["file"])
    (d / "run.json").write_text(json.dumps(rec))
    seen = []
    res = verify(d, suite=suite_from_text(FIXTURE_SUITE, "s.yaml"), reference="gguf", speed=False,
                 samples=0, max_tokens=32, n_threads=VERIFY_KW["n_threads"],
                 progress=lambda *a: seen.append(a))
    v = res.section
    assert v["reference"]["kind"] == "gguf" and v["reference"]["file"] == "tiny-BF16.gguf"
    files = {f["file"]: f for f in v["files"]}
    assert files["tiny-BF16.gguf"]["metrics"] is None and files["tiny-BF16.gguf"]["gate"]["passed"] is None
    q8 = files["tiny-Q8_0.gguf"]["metrics"]
    assert 0 < q8["kl_mean"] < 0.1 and q8["top1"] > 0.9
    assert v["runs"]["tiny-BF16.gguf"] == v["reference_runs"]
    assert res.passed, res.failures
    assert "tiny-BF16.gguf (llama.cpp)" in (d / "REPORT.md").read_text()
    # one progress count from 1 to its total
    assert [s[1] for s in seen] == list(range(1, seen[-1][2] + 1)) and {s[0] for s in seen} == {"verify"}
