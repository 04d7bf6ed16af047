"""A corpus of malformed inputs (issue 7): each is made here from a good tiny base + adapter by
breaking one thing. For each, `build` must raise the documented error class with a message naming
the file and the problem, the CLI must print one error line (no traceback) and exit with the
error's code, and the output folder must be left empty (no partial file, no lock, no manifest).

Folders are made with hard links to the good files (cheap); a file that a case breaks is replaced
(unlinked, then written), never edited in place, so the shared fixtures stay intact.
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from lora2gguf import synth
from lora2gguf.api import build, doctor
from lora2gguf.errors import (BlockedError, FormatError, InputError, Lora2GGUFError, NumericError,
                              UnsupportedError)

SHARD1 = "model-00001-of-00002.safetensors"  # embed_tokens + layers
SHARD2 = "model-00002-of-00002.safetensors"  # lm_head only
INDEX = "model.safetensors.index.json"
ADAPTER = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
Q_PROJ_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
Q_PROJ_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


# --------------------------------------------------------------------------- helpers


def replace(path: Path, data: bytes | str) -> None:
    """Replace a (possibly hard-linked) file with new contents without touching the shared inode."""
    path.unlink(missing_ok=True)
    if isinstance(data, str):
        path.write_text(data, encoding="utf-8")
    else:
        path.write_bytes(data)


def read_st(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_st(path: Path, header: dict | bytes, data: bytes, declared: int | None = None) -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    replace(path, struct.pack("<Q", len(raw) if declared is None else declared) + raw + data)


def edit_header(path: Path, fn: Callable[[dict], None]) -> None:
    header, data = read_st(path)
    fn(header)
    write_st(path, header, data)


def edit_json(path: Path, fn: Callable[[dict], object]) -> None:
    """Edit a JSON object in place (``fn`` mutates it; its return value is ignored)."""
    obj = json.loads(path.read_text(encoding="utf-8"))
    fn(obj)
    replace(path, json.dumps(obj))


def link_tree(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for p in src.iterdir():
        if p.is_file():
            os.link(p, dst / p.name)
    return dst


@dataclass
class Case:
    id: str
    where: str  # "base" or "adapter": the folder the broken file is in
    file: str | None  # the file the message must name (None: the folder)
    mutate: Callable[[Path, Path], None]  # (base_dir, adapter_dir)
    error: type[Lora2GGUFError]
    problem: str  # regex the message must match
    accept: tuple[str, ...] = ()


def _truncate(name: str, keep: float | int) -> Callable[[Path, Path], None]:
    def f(base: Path, ad: Path) -> None:
        folder = ad if name.startswith("adapter") else base
        raw = (folder / name).read_bytes()
        n = keep if isinstance(keep, int) else int(len(raw) * keep)
        replace(folder / name, raw[:n])
    return f


def _header(name: str, fn: Callable[[dict], None]) -> Callable[[Path, Path], None]:
    def f(base: Path, ad: Path) -> None:
        edit_header((ad if name.startswith("adapter") else base) / name, fn)
    return f


def _raw_header(name: str, raw: bytes, declared: int | None = None) -> Callable[[Path, Path], None]:
    def f(base: Path, ad: Path) -> None:
        folder = ad if name.startswith("adapter") else base
        _, data = read_st(folder / name)
        write_st(folder / name, raw, data, declared)
    return f


def _json(where: str, name: str, fn: Callable[[dict], object]) -> Callable[[Path, Path], None]:
    def f(base: Path, ad: Path) -> None:
        edit_json((base if where == "base" else ad) / name, fn)
    return f


def _text(where: str, name: str, text: str | bytes) -> Callable[[Path, Path], None]:
    def f(base: Path, ad: Path) -> None:
        replace((base if where == "base" else ad) / name, text)
    return f


def _remove(where: str, *names: str) -> Callable[[Path, Path], None]:
    def f(base: Path, ad: Path) -> None:
        for n in names:
            ((base if where == "base" else ad) / n).unlink()
    return f


def _both_tokenizers(text: str) -> Callable[[Path, Path], None]:
    def f(base: Path, ad: Path) -> None:
        replace(base / "tokenizer.json", text)
        replace(ad / "tokenizer.json", text)
    return f


def _first_tensor(h: dict) -> str:
    return next(k for k in h if k != "__metadata__")


def _set(key: str, field: str, value) -> Callable[[dict], None]:
    def f(h: dict) -> None:
        h[key if key in h else _first_tensor(h)][field] = value
    return f


def _overlap(h: dict) -> None:
    names = [k for k in h if k != "__metadata__"]
    a, b = h[names[1]], h[names[2]]
    # b starts inside a, keeping its own length
    length = b["data_offsets"][1] - b["data_offsets"][0]
    start = a["data_offsets"][0] + 2
    b["data_offsets"] = [start, start + length]


def _index_entry(value: str) -> Callable[[Path, Path], None]:
    def f(base: Path, ad: Path) -> None:
        edit_json(base / INDEX, lambda d: d["weight_map"].__setitem__("lm_head.weight", value))
    return f


def _shard_links_outside(base: Path, ad: Path) -> None:
    outside = base.parent / "elsewhere.safetensors"
    os.link(base / SHARD2, outside)
    (base / SHARD2).unlink()
    (base / SHARD2).symlink_to(outside)


def _pickle_only_base(base: Path, ad: Path) -> None:
    for p in list(base.glob("*.safetensors")) + [base / INDEX]:
        p.unlink()
    (base / "pytorch_model.bin").write_bytes(b"\x80\x04\x95 not really a pickle, never opened")


def _pickle_only_adapter(base: Path, ad: Path) -> None:
    (ad / ADAPTER).unlink()
    (ad / "adapter_model.bin").write_bytes(b"\x80\x04\x95 not really a pickle, never opened")


def _drop_lora_b(base: Path, ad: Path) -> None:
    header, data = read_st(ad / ADAPTER)
    del header[Q_PROJ_B]
    write_st(ad / ADAPTER, header, data)


def _extra_key(base: Path, ad: Path) -> None:
    header, data = read_st(ad / ADAPTER)
    header["base_model.model.model.embed_tokens.hada_w1_a"] = {  # a LoHa tensor: not a LoRA adapter
        "dtype": "F32", "shape": [4, 8], "data_offsets": [len(data), len(data) + 128]}
    write_st(ad / ADAPTER, header, data + bytes(128))


def _remove_tokenizers(base: Path, ad: Path) -> None:
    from lora2gguf.inspect import TOKENIZER_FILES

    for d in (base, ad):
        for n in TOKENIZER_FILES:
            (d / n).unlink(missing_ok=True)


def _three_d(base: Path, ad: Path) -> None:
    header, data = read_st(ad / ADAPTER)
    r, n = header[Q_PROJ_A]["shape"]
    header[Q_PROJ_A]["shape"] = [1, r, n]
    write_st(ad / ADAPTER, header, data)


def _nan_in_adapter(base: Path, ad: Path) -> None:
    header, data = read_st(ad / ADAPTER)
    info = header[Q_PROJ_B]
    assert info["dtype"] == "F32"
    begin = info["data_offsets"][0]
    buf = bytearray(data)
    buf[begin + 4 * 5: begin + 4 * 6] = np.array([np.nan], dtype="<f4").tobytes()
    write_st(ad / ADAPTER, header, bytes(buf))


def _adapter_for_other_model(base: Path, ad: Path) -> None:
    other = base.parent / "other_base"
    other.mkdir()
    (other / "config.json").write_text(json.dumps(synth.gpt_oss_config(**{**synth.TINY, "hidden_size": 32}, vocab_size=1024)))
    for p in ad.iterdir():
        p.unlink()
    synth.make_adapter_numpy(other, ad, tokenizer="none")


def _config(fn: Callable[[dict], object]) -> Callable[[Path, Path], None]:
    return _json("base", "config.json", fn)


EXPERTS_DOWN = "base_model.model.model.layers.0.mlp.experts"  # + .lora_A.weight: down_proj (the outer wrapper)


def _rewrite_adapter(ad: Path, fn: Callable[[dict], None]) -> None:
    """Load the adapter's tensors, let ``fn`` change them, save them again (a new file)."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(ad / ADAPTER))
    fn(tensors)
    (ad / ADAPTER).unlink()
    save_file(tensors, str(ad / ADAPTER), metadata={"format": "pt"})


def _expert_rows(rows: int) -> Callable[[Path, Path], None]:
    """The layer-0 down_proj expert pair saved with ``rows`` rank rows (rank x experts in a good one)."""
    def f(base: Path, ad: Path) -> None:
        def resize(t: dict) -> None:
            a, b = t[EXPERTS_DOWN + ".lora_A.weight"], t[EXPERTS_DOWN + ".lora_B.weight"]
            rng = np.random.default_rng(rows)
            t[EXPERTS_DOWN + ".lora_A.weight"] = rng.standard_normal((rows, a.shape[1])).astype(np.float32)
            t[EXPERTS_DOWN + ".lora_B.weight"] = rng.standard_normal((b.shape[0], rows)).astype(np.float32)
        _rewrite_adapter(ad, resize)
    return f


def _dora_on_experts(base: Path, ad: Path) -> None:
    """A DoRA magnitude on the experts' target_parameters wrapper and use_dora in the config: what
    PEFT itself refuses to make (test_peft_refuses_dora_on_target_parameters)."""
    _rewrite_adapter(ad, lambda t: t.__setitem__(EXPERTS_DOWN + ".lora_magnitude_vector",
                                                  np.ones(t[EXPERTS_DOWN + ".lora_B.weight"].shape[0], np.float32)))
    edit_json(ad / ADAPTER_CONFIG, lambda c: c.update(use_dora=True))


CASES: list[Case] = [
    # --- base safetensors shards
    Case("shard-truncated", "base", SHARD2, _truncate(SHARD2, 0.5), BlockedError, r"data ends at byte \d+ but the data section has \d+"),
    Case("shard-shorter-than-length", "base", SHARD2, _truncate(SHARD2, 5), BlockedError, r"fewer than the 8-byte header length"),
    Case("shard-empty", "base", SHARD2, _truncate(SHARD2, 0), BlockedError, r"has 0 bytes"),
    Case("header-length-past-eof", "base", SHARD2, lambda b, a: write_st(b / SHARD2, b"{}", b"", declared=10**9), BlockedError,
         r"header length 1000000000 is larger than the rest of the file"),
    Case("header-length-2^64-1", "base", SHARD2, lambda b, a: write_st(b / SHARD2, b"{}", b"", declared=2**64 - 1), BlockedError,
         r"header length \d+ is larger than the rest of the file"),
    Case("header-json-cut", "base", SHARD2, _raw_header(SHARD2, b'{"lm_head.weight": {"dtype": "BF16", "sha'), BlockedError,
         r"header is not valid UTF-8 JSON"),
    Case("header-not-utf8", "base", SHARD2, _raw_header(SHARD2, b'{"\xff\xfe": 1}'), BlockedError, r"not valid UTF-8 JSON"),
    Case("header-a-list", "base", SHARD2, _raw_header(SHARD2, b"[1, 2, 3]"), BlockedError, r"header is not a JSON object"),
    Case("header-nested-100k", "base", SHARD2, _raw_header(SHARD2, b"[" * 100_000 + b"]" * 100_000), BlockedError,
         r"not valid UTF-8 JSON"),
    Case("unknown-dtype", "base", SHARD2, _header(SHARD2, _set("lm_head.weight", "dtype", "F7")), BlockedError,
         r"unknown dtype 'F7'"),
    Case("negative-dim", "base", SHARD2, _header(SHARD2, _set("lm_head.weight", "shape", [-201088, -64])), BlockedError,
         r"is not a list of non-negative integers"),
    Case("float-dim", "base", SHARD2, _header(SHARD2, _set("lm_head.weight", "shape", [201088.0, 64])), BlockedError,
         r"is not a list of non-negative integers"),
    Case("offsets-not-a-pair", "base", SHARD2, _header(SHARD2, _set("lm_head.weight", "data_offsets", [0])), BlockedError,
         r"data_offsets \[0\] is not a pair of integers"),
    Case("offsets-reversed", "base", SHARD2, _header(SHARD2, _set("lm_head.weight", "data_offsets", [25739264, 0])), BlockedError,
         r"are not ordered"),
    Case("overlapping-offsets", "base", SHARD1, _header(SHARD1, _overlap), BlockedError, r"overlap"),
    Case("shape-length-disagree", "base", SHARD2, _header(SHARD2, _set("lm_head.weight", "shape", [201088, 32])), BlockedError,
         r"bytes for shape \[201088, 32\] of BF16, which needs 12869632"),
    Case("metadata-not-strings", "base", SHARD2, _header(SHARD2, lambda h: h.__setitem__("__metadata__", {"format": 1})),
         BlockedError, r"__metadata__ must map strings to strings"),
    Case("entry-not-object", "base", SHARD2, _header(SHARD2, lambda h: h.__setitem__("lm_head.weight", [1, 2])),
         BlockedError, r"entry is not an object"),
    # --- shard index
    Case("index-dotdot", "base", INDEX, _index_entry("../" + SHARD2), BlockedError, r"outside the model folder"),
    Case("index-absolute", "base", INDEX, _index_entry("/etc/passwd"), BlockedError, r"'/etc/passwd', outside the model folder"),
    Case("index-missing-shard", "base", INDEX, _index_entry("model-00003-of-00003.safetensors"), BlockedError,
         r"shard 'model-00003-of-00003.safetensors' .* is missing"),
    Case("index-not-json", "base", INDEX, _text("base", INDEX, "{\"weight_map\": {"), BlockedError, r"not valid JSON"),
    Case("index-no-weight-map", "base", INDEX, _text("base", INDEX, json.dumps({"metadata": {}})), BlockedError,
         r"has no 'weight_map' object"),
    Case("index-lists-absent-tensor", "base", INDEX,
         _json("base", INDEX, lambda d: d["weight_map"].__setitem__("model.layers.9.mlp.router.weight", SHARD2)),
         BlockedError, r"lists 1 tensor\(s\) in .* that the file does not hold"),
    Case("shard-symlink-outside", "base", INDEX, _shard_links_outside, BlockedError, r"resolves outside the model folder"),
    Case("base-pickle-only", "base", None, _pickle_only_base, BlockedError, r"pytorch_model\.bin: pickle files, which lora2gguf never unpickles"),
    # --- base config
    Case("config-missing", "base", "config.json", _remove("base", "config.json"), InputError, r"config\.json: missing"),
    Case("config-not-json", "base", "config.json", _text("base", "config.json", "{'hidden_size': 64}"), FormatError, r"not valid JSON"),
    Case("config-a-list", "base", "config.json", _text("base", "config.json", "[]"), FormatError, r"expected a JSON object"),
    Case("config-nested-100k", "base", "config.json", _text("base", "config.json", "[" * 100_000 + "]" * 100_000), FormatError,
         r"not valid JSON"),
    Case("config-no-architectures", "base", "config.json", _config(lambda c: [c.pop("architectures"), c.pop("model_type")]),
         UnsupportedError, r"architecture None is not supported"),
    Case("config-other-architecture", "base", "config.json",
         _config(lambda c: c.update(architectures=["FalconForCausalLM"], model_type="falcon")), UnsupportedError,
         r"architecture \['FalconForCausalLM'\] is not supported.*LlamaForCausalLM"),
    # doctor plans the shapes before any tensor is read: a config that disagrees with the weights blocks
    Case("config-missing-hidden-size", "base", "config.json", _config(lambda c: c.pop("hidden_size")), BlockedError,
         r"hidden_size is 2880 \(or absent and defaulted\), but the checkpoint's '(lm_head|model.embed_tokens).weight' is "
         r"\[201088, 64\]"),
    Case("config-vocab-size-off", "base", "config.json", _config(lambda c: c.update(vocab_size=201090)), BlockedError,
         r"vocab_size is 201090, but the checkpoint's '(lm_head|model.embed_tokens).weight' has 201088 rows"),
    Case("config-layers-a-string", "base", "config.json", _config(lambda c: c.update(num_hidden_layers="2")), InputError,
         r"'num_hidden_layers' is '2'"),
    Case("config-experts-a-float", "base", "config.json", _config(lambda c: c.update(num_local_experts=4.5)), InputError,
         r"field 'num_local_experts' is 4.5, expected a non-negative integer"),
    Case("config-layers-negative", "base", "config.json", _config(lambda c: c.update(num_hidden_layers=-2)), InputError,
         r"field 'num_hidden_layers' is -2, expected a non-negative integer"),
    Case("config-vocab-negative", "base", "config.json", _config(lambda c: c.update(vocab_size=-1)), InputError,
         r"field 'vocab_size' is -1, expected a positive integer"),
    Case("config-rope-a-string", "base", "config.json", _config(lambda c: c.update(rope_parameters="yarn")), InputError,
         r"'rope_parameters' is 'yarn', expected an object"),
    Case("config-window-negative", "base", "config.json", _config(lambda c: c.update(sliding_window=-128)), InputError,
         r"field 'sliding_window' is -128, expected a non-negative integer"),
    Case("config-eps-nan", "base", "config.json", _text("base", "config.json", (lambda c: json.dumps({**c, "rms_norm_eps": float("nan")}))(
        synth.gpt_oss_config(**synth.TINY))), InputError, r"field 'rms_norm_eps' is nan, expected a finite number"),
    # --- tokenizer
    Case("tokenizer-not-json", "adapter", "tokenizer.json", _both_tokenizers("{\"model\": "), BlockedError, r"not valid JSON"),
    Case("tokenizer-no-model", "adapter", "tokenizer.json", _both_tokenizers(json.dumps({"version": "1.0"})), BlockedError,
         r"model"),
    Case("tokenizer-missing", "adapter", "tokenizer.json", _remove_tokenizers, BlockedError,
         r"TOKENIZER_MISSING.*neither folder holds tokenizer\.json"),
    # --- adapter config
    Case("adapter-folder-missing", "adapter", None, lambda b, a: [p.unlink() for p in a.iterdir()] and None or a.rmdir(),
         BlockedError, r"adapter"),
    Case("adapter-config-missing", "adapter", None, _remove("adapter", ADAPTER_CONFIG), BlockedError, r"adapter_config\.json: missing"),
    Case("adapter-config-not-json", "adapter", ADAPTER_CONFIG, _text("adapter", ADAPTER_CONFIG, "r: 4\n"), BlockedError,
         r"not valid JSON"),
    Case("adapter-r-a-string", "adapter", ADAPTER_CONFIG, _json("adapter", ADAPTER_CONFIG, lambda c: c.update(r="4")),
         BlockedError, r"field 'r' is '4', expected a positive number"),
    Case("adapter-alpha-nan", "adapter", ADAPTER_CONFIG,
         _text("adapter", ADAPTER_CONFIG, '{"peft_type": "LORA", "r": 4, "lora_alpha": NaN, "target_modules": ["q_proj"]}'),
         BlockedError, r"field 'lora_alpha' is nan"),
    Case("adapter-not-lora", "adapter", ADAPTER_CONFIG, _json("adapter", ADAPTER_CONFIG, lambda c: c.update(peft_type="LOHA")),
         BlockedError, r"peft_type is 'LOHA'"),
    Case("adapter-dora", "adapter", ADAPTER_CONFIG, _json("adapter", ADAPTER_CONFIG, lambda c: c.update(use_dora=True)),
         BlockedError, r"DoRA"),
    # --- adapter weights
    Case("adapter-for-other-shapes", "adapter", ADAPTER, _adapter_for_other_model, BlockedError, r"do not fit"),
    Case("adapter-missing-lora-b", "adapter", ADAPTER, _drop_lora_b, BlockedError, r"has lora_A but no lora_B"),
    Case("adapter-3d-factor", "adapter", ADAPTER, _three_d, BlockedError, r"must be 2-D"),
    Case("adapter-unknown-key", "adapter", ADAPTER, _extra_key, BlockedError, r"hada_w1_a.*not a LoRA matrix"),
    Case("adapter-truncated", "adapter", ADAPTER, _truncate(ADAPTER, 0.6), BlockedError, r"data ends at byte"),
    Case("adapter-header-overlap", "adapter", ADAPTER, _header(ADAPTER, _overlap), BlockedError, r"overlap"),
    Case("adapter-pickle-only", "adapter", "adapter_model.bin", _pickle_only_adapter, BlockedError,
         r"adapter_model\.bin: pickle files, which lora2gguf never unpickles.*weights_only=True"),
    # target_parameters on experts: A (rank x experts, in), B (out, rank x experts); a layout that does not
    # split into the base's 4 experts at the configured rank 4 is named, never guessed
    Case("adapter-experts-rows-not-a-multiple", "adapter", ADAPTER, _expert_rows(14), BlockedError,
         r"ADAPTER_BASE_MISMATCH.*layers\.0\.mlp\.experts\.lora_A\.weight \(14, 64\) .* do not fit "
         r"model\.layers\.0\.mlp\.experts\.down_proj .*expected A \(16, 64\), B \(64, 16\)\): lora_A's 14 rows "
         r"are not a multiple of the base's 4 experts\. lora2gguf does not guess.*the same expert count"),
    Case("adapter-experts-other-count", "adapter", ADAPTER, _expert_rows(32), BlockedError,
         r"ADAPTER_BASE_MISMATCH.*layers\.0\.mlp\.experts\.lora_A\.weight \(32, 64\) .* do not fit "
         r"model\.layers\.0\.mlp\.experts\.down_proj .*lora_A's 32 rows are 4 experts at rank 8 or 8 experts "
         r"at rank 4, but adapter_config\.json gives this parameter rank 4\. lora2gguf does not guess"),
    Case("adapter-dora-on-experts", "adapter", ADAPTER, _dora_on_experts, BlockedError,
         r"ADAPTER_UNSUPPORTED_FEATURE.*layers\.0\.mlp\.experts\.lora_magnitude_vector: DoRA on the expert "
         r"parameter model\.layers\.0\.mlp\.experts\.down_proj \(target_parameters\) is not merged.*"
         r"Train the experts with plain LoRA"),
    Case("adapter-nan", "adapter", None, _nan_in_adapter, BlockedError,
         r"ADAPTER_NONFINITE.*layers\.0\.self_attn\.q_proj\.lora_B\.weight \(1 values\)"),
    Case("adapter-nan-accepted", "adapter", ADAPTER, _nan_in_adapter, NumericError,
         r"merged tensor 'model\.layers\.0\.self_attn\.q_proj\.weight' .*has NaN/Inf: the LoRA pair "
         r"model\.layers\.0\.self_attn\.q_proj \(lora_A/lora_B\) in \S+adapter_model\.safetensors holds NaN",
         accept=("ADAPTER_NONFINITE",)),
]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def good(tmp_path_factory, tiny_base) -> tuple[Path, Path]:
    ad = synth.make_adapter_numpy(tiny_base, tmp_path_factory.mktemp("rel_adapter") / "adapter")
    return tiny_base, ad


def make_case(root: Path, good: tuple[Path, Path], case: Case) -> tuple[Path, Path, Path]:
    base = link_tree(good[0], root / "base")
    ad = link_tree(good[1], root / "adapter")
    case.mutate(base, ad)
    return base, ad, root / "out"


def test_corpus_size():
    assert len(CASES) >= 40
    assert len({c.id for c in CASES}) == len(CASES)


def _names_file(msg: str, case: Case, base: Path, ad: Path) -> bool:
    folder = base if case.where == "base" else ad
    if case.file is None:
        return str(folder) in msg
    return case.file in msg


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_malformed_input(tmp_path, good, case, capsys):
    base, ad, out = make_case(tmp_path, good, case)
    with pytest.raises(Lora2GGUFError) as info:
        build(base, ad, out, name="x", accept=case.accept)
    err = info.value
    msg = str(err)
    assert type(err) is case.error, f"{type(err).__name__}: {msg}"
    assert re.search(case.problem, msg, re.S), msg
    assert _names_file(msg, case, base, ad), f"the message does not name {case.file or case.where}: {msg}"
    # nothing left behind: no partial file, no lock, no manifest, no run.json
    assert not out.exists() or sorted(p.name for p in out.iterdir()) == []

    # the CLI: one error line with the same message, the error's exit code, no traceback
    from lora2gguf import cli

    capsys.readouterr()
    argv = ["build", str(base), str(ad), "-o", str(out), "--name", "x", "--no-verify"]
    for code in case.accept:
        argv += ["--accept", code]
    rc = cli.main(argv)
    captured = capsys.readouterr()
    assert rc == err.exit_code != 0
    assert "Traceback" not in captured.err + captured.out
    errors = [line for line in captured.err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0] == "error: " + msg.splitlines()[0], captured.err
    assert not out.exists() or sorted(p.name for p in out.iterdir()) == []


@pytest.mark.parametrize("case_id", ["header-length-past-eof", "index-dotdot", "config-layers-a-string"])
def test_cli_subprocess_no_traceback(tmp_path, good, case_id):
    """A real `python -m lora2gguf.cli build` process: exit code 2, one error line, no traceback."""
    case = next(c for c in CASES if c.id == case_id)
    base, ad, out = make_case(tmp_path, good, case)
    proc = subprocess.run([sys.executable, "-m", "lora2gguf.cli", "build", str(base), str(ad), "-o", str(out),
                           "--no-verify"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NO_COLOR": "1"})
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ")
    assert re.search(case.problem, proc.stderr, re.S), proc.stderr
    assert not out.exists() or sorted(p.name for p in out.iterdir()) == []


def test_remote_code_reported_never_executed(tmp_path, good):
    """trust_remote_code / auto_map in the configs and a modeling .py file: doctor reports them;
    nothing is imported or run (the .py would leave a marker file)."""
    base = link_tree(good[0], tmp_path / "base")
    ad = link_tree(good[1], tmp_path / "adapter")
    marker = tmp_path / "EXECUTED"
    code = f"open({str(marker)!r}, 'w').write('remote code ran')\n"
    (base / "modeling_evil.py").write_text(code)
    (base / "configuration_evil.py").write_text(code)
    edit_json(base / "config.json", lambda c: c.update(
        trust_remote_code=True, auto_map={"AutoConfig": "configuration_evil.EvilConfig",
                                          "AutoModelForCausalLM": "modeling_evil.EvilModel"}))
    edit_json(ad / ADAPTER_CONFIG, lambda c: c.update(auto_mapping=None, auto_map={"AutoModel": "modeling_evil.X"}))
    report = doctor(base, ad)
    found = report.by_code("REMOTE_CODE")
    assert len(found) == 1
    what = found[0].what
    assert f"{base / 'config.json'}: auto_map" in what and f"{base / 'config.json'}: trust_remote_code = True" in what
    assert f"{ad / ADAPTER_CONFIG}: auto_map" in what
    assert "modeling_evil.py" in what
    assert not marker.exists()


# --------------------------------------------------------------------------- the families' readers

#: the readers the families brought (SentencePiece, BPE pre-tokenizers, embeddings, MoE experts,
#: DoRA): each case breaks one thing in a good Llama-2-style pair (a SentencePiece tokenizer)
FAMILY_CASES = [
    Case("spm-model-not-sentencepiece", "adapter", "tokenizer.model",
         _text("adapter", "tokenizer.model", b"\x00\x01 this is not a protobuf " * 8), BlockedError,
         r"tokenizer\.model"),
    Case("bpe-pre-tokenizer-unknown", "adapter", "tokenizer.json",
         lambda base, ad: _unknown_split(ad), BlockedError, r"TOKENIZER_PRE_UNKNOWN"),
    Case("embeddings-rows-disagree-with-config", "base", "config.json",
         _config(lambda c: c.update(vocab_size=c["vocab_size"] + 64)), BlockedError,
         r"vocab_size"),
    Case("dora-magnitude-wrong-length", "adapter", ADAPTER, lambda base, ad: _dora_wrong_length(ad), BlockedError,
         r"magnitude .* does not fit"),
    Case("dora-without-magnitudes", "adapter", ADAPTER_CONFIG, _json("adapter", ADAPTER_CONFIG,
                                                                      lambda c: c.update(use_dora=True)),
         BlockedError, r"use_dora=True"),
    Case("trainable-tokens-without-indices", "adapter", ADAPTER_CONFIG, lambda base, ad: _token_rows_without_indices(ad),
         BlockedError, r"trainable_token_indices"),
    # DoRA where PEFT normalizes columns: on the embedding (made by PEFT), on a Conv1D-layout (fan_in_fan_out) layer
    Case("dora-on-embedding", "adapter", ADAPTER, lambda base, ad: None, BlockedError,
         r"ADAPTER_UNSUPPORTED_FEATURE.*embed_tokens\.lora_magnitude_vector: DoRA on an embedding "
         r"\(model\.embed_tokens\.weight\) is not merged.*over columns.*merge_and_unload"),
    Case("dora-conv1d-layout", "adapter", ADAPTER, lambda base, ad: _dora_fan_in_fan_out(ad), BlockedError,
         r"ADAPTER_UNSUPPORTED_FEATURE.*q_proj\.lora_magnitude_vector: DoRA on a fan_in_fan_out \(Conv1D\) layer "
         r"\(model\.layers\.0\.self_attn\.q_proj\.weight\) is not merged.*merge_and_unload"),
]

#: the good adapter each family case starts from (the plain one unless named here)
FAMILY_START = {"dora-magnitude-wrong-length": "dora", "dora-conv1d-layout": "dora", "dora-on-embedding": "dora_embed"}


def _unknown_split(ad: Path) -> None:
    """A BPE tokenizer.json whose split regex llama.cpp does not know (and no tokenizer.model)."""
    from lora2gguf.testing import tokenizers as toks

    (ad / "tokenizer.model").unlink()
    data = json.loads((ad / "tokenizer.json").read_text())
    data["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"\p{L}+|[0-9]{1,2}|\s+|."}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]}
    data["model"] = {"type": "BPE", "vocab": {chr(33 + i) if i < 94 else f"t{i}": i for i in range(512)},
                     "merges": [["t", "1"]], "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                     "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False}
    data["added_tokens"] = []
    data["decoder"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    replace(ad / "tokenizer.json", json.dumps(data))
    assert toks  # the fixture module is importable (its tokenizers are what this case breaks)


def _dora_wrong_length(ad: Path) -> None:
    from safetensors.numpy import load_file, save_file

    t = load_file(str(ad / ADAPTER))
    key = next(k for k in t if k.endswith("q_proj.lora_magnitude_vector"))
    t[key] = np.ones(t[key].shape[0] + 3, np.float32)
    (ad / ADAPTER).unlink()
    save_file(t, str(ad / ADAPTER), metadata={"format": "pt"})


def _dora_fan_in_fan_out(ad: Path) -> None:
    """The DoRA adapter on q_proj alone (square: its pair fits either orientation) saved as for a
    Conv1D layer, whose weight is stored (in, out): fan_in_fan_out in the config."""
    from safetensors.numpy import load_file, save_file

    t = {k: v for k, v in load_file(str(ad / ADAPTER)).items() if ".q_proj." in k}
    (ad / ADAPTER).unlink()
    save_file(t, str(ad / ADAPTER), metadata={"format": "pt"})
    edit_json(ad / ADAPTER_CONFIG, lambda c: c.update(fan_in_fan_out=True, target_modules=["q_proj"]))


def _token_rows_without_indices(ad: Path) -> None:
    from safetensors.numpy import load_file, save_file

    t = load_file(str(ad / ADAPTER))
    t["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"] = np.ones((2, 64), np.float32)
    (ad / ADAPTER).unlink()
    save_file(t, str(ad / ADAPTER), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def good_spm(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama with a SentencePiece tokenizer; a plain and a DoRA adapter, and a DoRA adapter
    that also targets the embedding (PEFT makes it: DoRA on an Embedding normalizes columns)."""
    from lora2gguf.testing import families
    from lora2gguf.testing import tokenizers as toks

    root = tmp_path_factory.mktemp("good_spm")
    base = families.make_model(root / "base", "llama", families.small_config(
        "llama", vocab_size=512, bos_token_id=1, eos_token_id=2, num_hidden_layers=1),
        tokenizer=lambda d: toks.sentencepiece_tokenizer(d, style="llama2"))
    plain = synth.make_adapter(base, root / "adapter", target_modules=("q_proj", "v_proj"), target_parameters=())
    dora = synth.make_adapter(base, root / "dora", target_modules=("q_proj", "v_proj"), target_parameters=(),
                              use_dora=True)
    dora_embed = synth.make_adapter(base, root / "dora_embed", target_modules=("embed_tokens", "q_proj"),
                                    target_parameters=(), use_dora=True)
    return {"base": base, "plain": plain, "dora": dora, "dora_embed": dora_embed}


@pytest.mark.parametrize("case", FAMILY_CASES, ids=lambda c: c.id)
def test_malformed_family_input(tmp_path, good_spm, case, capsys):
    base, ad, out = make_case(tmp_path, (good_spm["base"], good_spm[FAMILY_START.get(case.id, "plain")]), case)
    with pytest.raises(Lora2GGUFError) as info:
        build(base, ad, out, name="x", accept=case.accept)
    err = info.value
    msg = str(err)
    assert type(err) is case.error, f"{type(err).__name__}: {msg}"
    assert re.search(case.problem, msg, re.S), msg
    assert _names_file(msg, case, base, ad), f"the message does not name {case.file or case.where}: {msg}"
    assert not out.exists() or sorted(p.name for p in out.iterdir()) == []
    from lora2gguf import cli

    capsys.readouterr()
    rc = cli.main(["build", str(base), str(ad), "-o", str(out), "--name", "x", "--no-verify"])
    captured = capsys.readouterr()
    assert rc == err.exit_code != 0 and "Traceback" not in captured.err + captured.out


def test_peft_refuses_dora_on_target_parameters():
    """The premise of the adapter-dora-on-experts case: PEFT itself will not put DoRA on an MoE's
    expert parameters, so there is no PEFT merge for lora2gguf to match. If PEFT learns to, this
    fails, and the refusal in adapter._with_magnitude should become a merge checked against it."""
    pytest.importorskip("peft")
    import transformers
    from peft import LoraConfig, get_peft_model

    cfg = transformers.Qwen3MoeConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=1, head_dim=16, intermediate_size=48, num_experts=4,
                                      num_experts_per_tok=2, moe_intermediate_size=16)
    model = transformers.Qwen3MoeForCausalLM(cfg)
    assert "model.layers.0.mlp.experts.gate_up_proj" in dict(model.named_parameters())
    with pytest.raises(ValueError, match="use_dora"):
        get_peft_model(model, LoraConfig(r=2, target_modules=[], target_parameters=["mlp.experts.gate_up_proj"],
                                         use_dora=True))
