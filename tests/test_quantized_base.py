"""Quantized bases in the build (issue 4): MXFP4 decoded exactly (same GGUF as from the BF16 base
it decodes to), MXFP4 experts kept as ggml MXFP4 with --keep-mxfp4 (same bytes as llama.cpp's own
converter writes), and bitsandbytes 4-bit / LLM.int8 bases decoded after --accept, with llama.cpp
running every file."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from lora2gguf import numerics, synth
from lora2gguf.api import build
from lora2gguf.errors import BlockedError, InputError
from lora2gguf.gguf_header import read_header
from lora2gguf.safetensors_io import Checkpoint, read_raw

EVAL_TEXT = ("<|start|>user<|message|>What is 2+2? Tell me about the stars and the sea.<|end|>"
             "<|start|>assistant<|channel|>final<|message|>The sum of 2 and 2 is 4.<|return|>")
EXPERT_GGUF_RE = re.compile(r"^blk\.\d+\.ffn_(gate|up|down)_exps\.weight$")
ATTN_RE = re.compile(r"^model\.layers\.(\d+)\.self_attn\.(q|k|v|o)_proj\.weight$")
ATTN_GGUF = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output"}


# ------------------------------------------------------------------------------------- helpers


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def gguf_tensors(path: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """name -> (type name, ggml shape, raw bytes), through the header reader (checked against
    gguf-py's GGUFReader in test_gguf_header.py; GGUFReader takes 10-30 s on the o200k vocab)."""
    h = read_header(path)
    with open(path, "rb") as f:
        out = {}
        for name, t in h.tensors.items():
            f.seek(h.data_start + t.offset)
            out[name] = (t.qtype.name, t.shape, f.read(t.nbytes))
    return out


def gguf_kv(path: Path) -> dict:
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def bf16_rows(path: Path, name: str) -> np.ndarray:
    """A BF16 GGUF tensor as uint16 bits in numpy (row-major) shape."""
    t = read_header(path).tensors[name]
    assert t.qtype == gguf.GGMLQuantizationType.BF16, (name, t.qtype)
    data = gguf_tensors(path)[name][2]
    return np.frombuffer(data, np.uint16).reshape(tuple(reversed(t.shape)))


def lora_delta(adapter: Path, layer: str, proj: str) -> np.ndarray:
    """s * B @ A of one attention projection, from the adapter files (float64, then float32)."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    prefix = f"base_model.model.model.layers.{layer}.self_attn.{proj}_proj"
    tensors = _adapter_tensors(adapter)
    a = tensors[prefix + ".lora_A.weight"].astype(np.float64)
    b = tensors[prefix + ".lora_B.weight"].astype(np.float64)
    r = cfg["r"]
    scale = cfg["lora_alpha"] / (np.sqrt(r) if cfg.get("use_rslora") else r)
    return (scale * (b @ a)).astype(np.float32)


def _adapter_tensors(adapter: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file
    return load_file(str(adapter / "adapter_model.safetensors"))


def run_reference(ref: Path, model_dir: Path, outfile: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ref / "gguf-py"), NO_LOCAL_GGUF="")
    proc = subprocess.run([sys.executable, str(ref / "convert_hf_to_gguf.py"), str(model_dir), "--outfile",
                           str(outfile), "--outtype", "bf16"], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]


def llama_logits(path: Path, text: str = EVAL_TEXT) -> np.ndarray:
    from lora2gguf.verify.logits import gguf_logits, open_gguf

    llm = open_gguf(path, n_ctx=256)
    try:
        tokens = llm.tokenize(text.encode(), add_bos=False, special=True)
    finally:
        llm.close()
    assert len(tokens) > 20
    return gguf_logits(path, tokens)


# ------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def mxfp4_pair(tiny_base, tmp_path_factory):
    from quantized_layouts import bf16_base_to_mxfp4
    return bf16_base_to_mxfp4(tiny_base, tmp_path_factory.mktemp("mxfp4"))


@pytest.fixture(scope="module")
def attn_adapter(tiny_base, tmp_path_factory):
    """A rank-4 LoRA on q/k/v/o only (the experts untouched)."""
    return synth.make_adapter_numpy(tiny_base, tmp_path_factory.mktemp("attn_adapter"), target_parameters=())


@pytest.fixture(scope="module")
def kept(mxfp4_pair, attn_adapter, tmp_path_factory):
    mx, bf = mxfp4_pair
    keep = build(mx, attn_adapter, tmp_path_factory.mktemp("keep"), name="tiny", keep_mxfp4=True,
                 quants=["MXFP4_MOE"])
    decoded = build(bf, attn_adapter, tmp_path_factory.mktemp("decoded"), name="tiny")
    return keep, decoded


# ------------------------------------------------------------------------------------- MXFP4


def test_mxfp4_base_builds_the_same_gguf_as_its_bf16_decoding(mxfp4_pair, tiny_adapter, kept, tmp_path):
    """Adapter on attention and experts: the MXFP4 base, decoded per expert slab while streaming,
    gives byte for byte the GGUF of the BF16 base it decodes to."""
    mx, bf = mxfp4_pair
    assert any(n.endswith("_blocks") for n in Checkpoint.open(mx).tensors)
    a = build(mx, tiny_adapter, tmp_path / "mx", name="tiny")
    b = build(bf, tiny_adapter, tmp_path / "bf", name="tiny")
    fa, fb = a.out_dir / "tiny-BF16.gguf", b.out_dir / "tiny-BF16.gguf"
    assert fa.stat().st_size == fb.stat().st_size
    assert sha256(fa) == sha256(fb)
    rec = json.loads(a.run_json.read_text())
    assert rec["base_storage"]["MXFP4"] == 2 * synth.read_config(mx)["num_hidden_layers"]
    assert rec["keep_mxfp4"] == {"requested": False, "tensors": []}
    # the experts really were changed by the adapter: the comparison covers a merge into decoded
    # MXFP4 (kept[1] is the BF16 base with an attention-only adapter: its experts are the base's)
    ta, tp = gguf_tensors(fa), gguf_tensors(kept[1].out_dir / "tiny-BF16.gguf")
    for n in ("blk.0.ffn_gate_exps.weight", "blk.1.ffn_down_exps.weight"):
        assert ta[n][:2] == tp[n][:2] and ta[n][2] != tp[n][2]


def test_mxfp4_expert_slabs_bound_memory(mxfp4_pair, tiny_adapter):
    """The plan decodes MXFP4 experts one expert at a time, in units within the slab budget."""
    from lora2gguf import arch as arch_registry
    from lora2gguf.adapter import load_adapter
    from lora2gguf.plan import make_plan
    from lora2gguf.sources import logical_tensors

    mx, bf = mxfp4_pair
    plans = {}
    for key, folder in (("mx", mx), ("bf", bf)):
        config = synth.read_config(folder)
        arch = arch_registry.for_config(config, where="config.json")
        sources = logical_tensors(Checkpoint.open(folder))
        adapter = load_adapter(tiny_adapter, {n: s.shape for n, s in sources.items()}, arch)
        plans[key] = make_plan(arch, config, sources, adapter, "bf16", slab_bytes=100_000)
    tps = [t for t in plans["mx"].tensors if t.inputs and t.inputs[0].source.storage == "MXFP4"]
    assert tps
    ck = Checkpoint.open(bf)
    for t in tps:
        src = t.inputs[0].source
        # one output matrix per expert, each made from its own expert: a unit decodes one expert
        assert [p.matrix for p in t.parts] == list(range(src.shape[0]))
        units = t.blocks()
        assert len(units) >= len(t.parts) and len({(m, r.start) for m, r in units}) == len(units)
        # the unit's rows keep its float32 work within the slab budget (or are a single row)
        cols = t.tensor.shape[-1]
        assert t.block_rows == 1 or t.block_rows * cols * 4 * (3 + src.slab_cost) <= 100_000
        # reading one expert gives exactly the values the BF16 base holds
        ref = numerics.bf16_bits_to_f32(read_raw(ck.tensors[src.name], rows=slice(1, 2)))
        np.testing.assert_array_equal(src.read(slice(1, 2)), ref)


def test_keep_mxfp4_experts_equal_llama_cpp_converter(kept, mxfp4_pair, attn_adapter, reference_llama_cpp,
                                                       tmp_path):
    """--keep-mxfp4: the expert tensors are MXFP4 with the bytes llama.cpp's converter writes for the
    MXFP4 base with the attention LoRA merged; every other tensor matches it within 1 bf16 ulp
    (the test merges with float64 math), and every metadata key is the same."""
    from quantized_layouts import _rewrite

    keep, _ = kept
    mx, _ = mxfp4_pair
    ck = Checkpoint.open(mx)

    def merge_attention(name, dtype, raw):
        m = ATTN_RE.match(name)
        if not m:
            return [(name, dtype, raw)]
        w = numerics.bf16_bits_to_f32(raw) + lora_delta(attn_adapter, m.group(1), m.group(2))
        return [(name, "BF16", numerics.f32_to_bf16_bits(w))]

    model_dir = _rewrite(mx, tmp_path / "merged-mxfp4", merge_attention, {})
    assert (model_dir / "config.json").read_text().count("mxfp4") >= 1
    assert sum(n.endswith("_blocks") for n in Checkpoint.open(model_dir).tensors) == \
        sum(n.endswith("_blocks") for n in ck.tensors)
    ref_file = tmp_path / "ref.gguf"
    run_reference(reference_llama_cpp, model_dir, ref_file)

    ours_file = keep.out_dir / "tiny-BF16.gguf"
    ours, ref = gguf_tensors(ours_file), gguf_tensors(ref_file)
    assert sorted(ours) == sorted(ref)
    experts = [n for n in ref if EXPERT_GGUF_RE.match(n)]
    assert len(experts) == 3 * synth.read_config(mx)["num_hidden_layers"]
    for name in experts:
        assert ref[name][0] == "MXFP4" and ours[name][:2] == ref[name][:2], name
        assert ours[name][2] == ref[name][2], f"{name}: MXFP4 bytes differ from llama.cpp's converter"
    for name in sorted(set(ref) - set(experts)):
        assert ours[name][:2] == ref[name][:2], name
        if ref[name][0] == "BF16":
            a = np.frombuffer(ours[name][2], np.uint16).astype(np.int32)
            b = np.frombuffer(ref[name][2], np.uint16).astype(np.int32)
            assert np.abs(a - b).max() <= 1, name
        else:
            assert ours[name][2] == ref[name][2], name
    ours_kv, ref_kv = gguf_kv(ours_file), gguf_kv(ref_file)
    keep_keys = {"general.architecture", "general.file_type", "general.quantization_version"}
    prov = {k for k in set(ours_kv) | set(ref_kv) if k.startswith("general.") and k not in keep_keys}
    assert set(ours_kv) - prov == set(ref_kv) - prov
    for key in sorted(set(ref_kv) - prov):
        assert ours_kv[key] == (pytest.approx(ref_kv[key], rel=1e-7) if isinstance(ref_kv[key], float)
                                else ref_kv[key]), key
    assert ours_kv["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_MXFP4_MOE)


def test_keep_mxfp4_is_recorded_and_llama_cpp_runs_it(kept):
    keep, decoded = kept
    rec = json.loads(keep.run_json.read_text())
    assert rec["keep_mxfp4"]["requested"] is True
    assert sorted(rec["keep_mxfp4"]["tensors"]) == sorted(
        f"model.layers.{i}.mlp.experts.{p}" for i in range(2) for p in ("gate_up_proj", "down_proj"))
    assert any("--keep-mxfp4" in n for n in keep.notes) and rec["notes"] == keep.notes
    types = rec["outputs"][0]["tensors"]
    assert sorted(n for n, t in types.items() if t == "MXFP4") == sorted(
        f"blk.{i}.ffn_{p}_exps.weight" for i in range(2) for p in ("gate", "up", "down"))
    f_keep, f_dec = keep.out_dir / "tiny-BF16.gguf", decoded.out_dir / "tiny-BF16.gguf"
    assert f_keep.stat().st_size < f_dec.stat().st_size
    lk, ld = llama_logits(f_keep), llama_logits(f_dec)
    assert np.isfinite(lk).all() and np.isfinite(ld).all()
    # the kept file holds the very expert values the decoded one does: same next token everywhere
    assert (lk.argmax(-1) == ld.argmax(-1)).all()
    assert not np.array_equal(lk, ld)  # a different kernel (MXFP4 x Q8) really ran


def test_keep_mxfp4_quantizes_to_mxfp4_moe_only(kept, mxfp4_pair, attn_adapter, tmp_path):
    """MXFP4_MOE copies the kept experts as they are (llama.cpp does not requantize them); other
    types are refused before anything is written."""
    keep, _ = kept
    main, q = keep.out_dir / "tiny-BF16.gguf", keep.out_dir / "tiny-MXFP4_MOE.gguf"
    a, b = gguf_tensors(main), gguf_tensors(q)
    experts = [n for n in a if EXPERT_GGUF_RE.match(n)]
    assert experts and all(b[n] == a[n] for n in experts)
    assert b["blk.0.attn_q.weight"][0] == "Q8_0"
    assert np.isfinite(llama_logits(q)).all()
    mx, _ = mxfp4_pair
    with pytest.raises(InputError, match=r"--keep-mxfp4 with --quant Q8_0.*MXFP4_MOE"):
        build(mx, attn_adapter, tmp_path / "out", name="tiny", keep_mxfp4=True, quants=["Q8_0", "MXFP4_MOE"])
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.gguf*"))


def test_keep_mxfp4_refuses_when_the_adapter_changes_the_experts(mxfp4_pair, tiny_adapter, tmp_path):
    mx, _ = mxfp4_pair
    with pytest.raises(InputError, match=r"--keep-mxfp4: the adapter changes the MXFP4 expert tensor") as e:
        build(mx, tiny_adapter, tmp_path / "out", name="tiny", keep_mxfp4=True)
    assert "without --keep-mxfp4" in str(e.value)
    assert not list((tmp_path / "out").glob("*.gguf*"))


def test_keep_mxfp4_refuses_a_base_without_mxfp4(tiny_base, attn_adapter, tmp_path):
    with pytest.raises(InputError, match="no MXFP4 tensors"):
        build(tiny_base, attn_adapter, tmp_path / "out", name="tiny", keep_mxfp4=True)
    assert not list((tmp_path / "out").glob("*.gguf*"))


# ------------------------------------------------------------------------------------- bitsandbytes


@pytest.mark.parametrize("quant_type,nested", [("nf4", True), ("fp4", False)])
def test_bnb_4bit_base_builds_after_accept(tiny_base, attn_adapter, tmp_path, quant_type, nested):
    """A bitsandbytes 4-bit base: blocked until --accept BASE_BNB_4BIT; then the merged attention
    weights are decode(bnb) + s*B@A rounded to bf16, the acceptance is in run.json, and llama.cpp runs
    the file."""
    from quantized_layouts import bf16_base_to_bnb4

    b4 = bf16_base_to_bnb4(tiny_base, tmp_path / "bnb", quant_type=quant_type, nested=nested)
    with pytest.raises(BlockedError, match="BASE_BNB_4BIT"):
        build(b4, attn_adapter, tmp_path / "blocked", name="tiny")
    assert not list((tmp_path / "blocked").glob("*.gguf*"))

    res = build(b4, attn_adapter, tmp_path / "out", name="tiny", accept=["BASE_BNB_4BIT"])
    rec = json.loads(res.run_json.read_text())
    f = [x for x in rec["findings"] if x["code"] == "BASE_BNB_4BIT"]
    assert len(f) == 1 and f[0]["accepted"] is True
    assert rec["base_storage"][f"BNB_{quant_type.upper()}"] == 8
    out = res.out_dir / "tiny-BF16.gguf"

    ck = Checkpoint.open(b4)
    exact = total = 0
    for layer in range(2):
        for proj in "qkvo":
            prefix = f"model.layers.{layer}.self_attn.{proj}_proj.weight"
            parts = {k: read_raw(ck.tensors[k]) for k in ck.tensors if k == prefix or k.startswith(prefix + ".")}
            w = numerics.decode_bnb_4bit_state(parts, prefix)
            expect = numerics.f32_to_bf16_bits(w + lora_delta(attn_adapter, str(layer), proj)).astype(np.int32)
            got = bf16_rows(out, f"blk.{layer}.{ATTN_GGUF[proj]}.weight").astype(np.int32)
            assert got.shape == expect.shape
            diff = np.abs(got - expect)
            assert diff.max() <= 1, prefix  # float32 merge vs the test's float64 delta
            exact += int((diff == 0).sum())
            total += diff.size
    assert exact / total > 0.999
    # and it is not just the original bf16 weights: the 4-bit error is there
    orig = numerics.bf16_bits_to_f32(read_raw(Checkpoint.open(tiny_base).tensors["model.layers.0.self_attn.q_proj.weight"]))
    merged_orig = numerics.f32_to_bf16_bits(orig + lora_delta(attn_adapter, "0", "q"))
    assert not np.array_equal(bf16_rows(out, "blk.0.attn_q.weight"), merged_orig)
    if quant_type == "nf4":
        logits = llama_logits(out)
        assert np.isfinite(logits).all() and logits.std() > 0


def _to_int8(src: Path, dest: Path) -> Path:
    """The LLM.int8 layout bitsandbytes saves (Int8Params): int8 weight [out, in], SCB float32 [out]
    (row absmax), weight_format; config gains load_in_8bit."""
    from quantized_layouts import _rewrite

    def convert(name, dtype, raw):
        if not ATTN_RE.match(name):
            return [(name, dtype, raw)]
        w = numerics.bf16_bits_to_f32(raw)
        scb = np.abs(w).max(axis=1).astype(np.float32)
        q = np.clip(np.rint(w * (127.0 / scb[:, None])), -127, 127).astype(np.int8)
        stem = name[: -len(".weight")]
        return [(name, "I8", q), (stem + ".SCB", "F32", scb), (name + "_format", "U8", np.array([0], np.uint8))]

    qc = {"quant_method": "bitsandbytes", "load_in_8bit": True, "load_in_4bit": False,
          "_load_in_8bit": True, "_load_in_4bit": False, "llm_int8_threshold": 6.0}
    return _rewrite(src, dest, convert, {"quantization_config": qc})


def test_bnb_int8_base_builds_after_accept(tiny_base, attn_adapter, tmp_path):
    b8 = _to_int8(tiny_base, tmp_path / "int8")
    with pytest.raises(BlockedError, match="BASE_BNB_8BIT"):
        build(b8, attn_adapter, tmp_path / "blocked", name="tiny")
    res = build(b8, attn_adapter, tmp_path / "out", name="tiny", accept=["BASE_BNB_8BIT"])
    rec = json.loads(res.run_json.read_text())
    assert [x["accepted"] for x in rec["findings"] if x["code"] == "BASE_BNB_8BIT"] == [True]
    out = res.out_dir / "tiny-BF16.gguf"
    ck = Checkpoint.open(b8)
    prefix = "model.layers.1.self_attn.k_proj"
    w = read_raw(ck.tensors[prefix + ".weight"]).astype(np.float32) * read_raw(ck.tensors[prefix + ".SCB"])[:, None] / 127
    expect = numerics.f32_to_bf16_bits((w + lora_delta(attn_adapter, "1", "k")).astype(np.float32)).astype(np.int32)
    diff = np.abs(bf16_rows(out, "blk.1.attn_k.weight").astype(np.int32) - expect)
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99
    assert np.isfinite(llama_logits(out)).all()
