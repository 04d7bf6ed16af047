"""The streaming build for GPT-OSS (issue 2): merged weights, parity with llama.cpp's own converter,
and llama.cpp running the result against transformers + PEFT."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from lora2gguf import kernel, synth
from lora2gguf.api import build
from lora2gguf.numerics import bf16_bits_to_f32, f32_to_bf16_bits

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
# a fixed evaluation text (Harmony-formatted so special tokens are exercised too)
EVAL_TEXT = ("<|start|>user<|message|>What is 2+2? Tell me about the stars and the sea.<|end|>"
             "<|start|>assistant<|channel|>final<|message|>The sum of 2 and 2 is 4. Stars burn far away.<|return|>")


@functools.lru_cache(maxsize=3)
def reader_of(path: Path) -> gguf.GGUFReader:
    """gguf-py's reader, once per file (it takes tens of seconds on the 201k-token vocabulary)."""
    return gguf.GGUFReader(path)


def read_gguf(path: Path) -> tuple[dict, dict]:
    """(tensors: name -> (type name, shape, raw bytes), kv: key -> python value)."""
    reader = reader_of(path)
    tensors = {t.name: (t.tensor_type.name, tuple(int(d) for d in t.shape), bytes(t.data.tobytes()))
               for t in reader.tensors}
    kv = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        kv[key] = field.contents()
    return tensors, kv


def gguf_f32(path: Path) -> dict[str, np.ndarray]:
    reader = reader_of(path)
    out = {}
    for t in reader.tensors:
        data = np.asarray(t.data)
        if t.tensor_type == gguf.GGMLQuantizationType.BF16:
            arr = bf16_bits_to_f32(data.view(np.uint16))
        else:
            arr = data.astype(np.float32)
        out[t.name] = arr.reshape(tuple(int(d) for d in reversed(t.shape)))
    return out


def hf_to_gguf_layout(name: str, x: np.ndarray) -> dict[str, np.ndarray]:
    """The test's own statement of the GPT-OSS layout facts (independent of lora2gguf.layout)."""
    if name.endswith("mlp.experts.gate_up_proj"):
        return {"gate": np.transpose(x[..., 0::2], (0, 2, 1)), "up": np.transpose(x[..., 1::2], (0, 2, 1))}
    if name.endswith("mlp.experts.gate_up_proj_bias"):
        return {"gate": x[..., 0::2], "up": x[..., 1::2]}
    if name.endswith("mlp.experts.down_proj"):
        return {"down": np.transpose(x, (0, 2, 1))}
    return {"": x}


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_base, tiny_adapter):
    out = tmp_path_factory.mktemp("built")
    merged = tmp_path_factory.mktemp("merged")
    result = build(tiny_base, tiny_adapter, out, quants=["Q8_0", "MXFP4_MOE"], save_merged=merged, name="tiny")
    f32 = build(tiny_base, tiny_adapter, tmp_path_factory.mktemp("built32"), outtype="f32", name="tiny")
    return result, f32, merged


@pytest.fixture(scope="module")
def peft_merged(tiny_base, tiny_adapter):
    return synth.peft_merged_state_dict(tiny_base, tiny_adapter)


def test_outputs_named_and_recorded(built):
    result, f32, _ = built
    files = sorted(p.name for p in result.out_dir.glob("*.gguf"))
    assert files == ["tiny-BF16.gguf", "tiny-MXFP4_MOE.gguf", "tiny-Q8_0.gguf"]
    assert not list(result.out_dir.glob("*.partial"))
    record = json.loads((result.out_dir / "run.json").read_text())
    by_file = {o["file"]: o for o in record["outputs"]}
    for name in files:
        path = result.out_dir / name
        assert by_file[name]["bytes"] == path.stat().st_size
        types = {t.name: t.tensor_type.name for t in reader_of(path).tensors}
        assert by_file[name]["tensors"] == types
    assert by_file["tiny-MXFP4_MOE.gguf"]["tensor_types"].get("MXFP4", 0) == 6  # 3 expert tensors x 2 layers
    assert record["technical"]["eos_token"] == "<|return|>"
    # generation_config.json's eos ids and Harmony's message end
    assert record["technical"]["eog_tokens"] == {"<|return|>": 200002, "<|end|>": 200007, "<|call|>": 200012,
                                                 "<|endoftext|>": 199999}


def test_f32_output_equals_peft_merge(built, peft_merged):
    """The F32 GGUF holds PEFT's merge_and_unload() weights, in GGUF layout, to float32 rounding."""
    _, f32, _ = built
    ours = gguf_f32(f32.out_dir / "tiny-F32.gguf")
    checked = 0
    for name, x in peft_merged.items():
        layer = name.split(".")[2] if name.startswith("model.layers.") else None
        for part, ref in hf_to_gguf_layout(name, x).items():
            gname = _gguf_name(name, part, layer)
            assert gname in ours, gname
            np.testing.assert_allclose(ours[gname], ref, rtol=2e-6, atol=2e-6, err_msg=gname)
            checked += 1
    assert checked == len(ours)


def test_bf16_output_within_one_ulp_of_peft(built, peft_merged):
    result, _, _ = built
    ours = reader_of(result.out_dir / "tiny-BF16.gguf")
    raw = {t.name: np.asarray(t.data) for t in ours.tensors}
    types = {t.name: t.tensor_type for t in ours.tensors}
    exact = total = 0
    for name, x in peft_merged.items():
        layer = name.split(".")[2] if name.startswith("model.layers.") else None
        for part, ref in hf_to_gguf_layout(name, x).items():
            gname = _gguf_name(name, part, layer)
            if types[gname] != gguf.GGMLQuantizationType.BF16:
                continue
            ref_bits = f32_to_bf16_bits(np.ascontiguousarray(ref)).astype(np.int32).reshape(-1)
            our_bits = raw[gname].view(np.uint16).astype(np.int32).reshape(-1)
            diff = np.abs(ref_bits - our_bits)
            assert diff.max() <= 1, f"{gname}: {diff.max()} bf16 ulps from PEFT's merge"
            exact += int((diff == 0).sum())
            total += diff.size
    assert total > 0 and exact / total > 0.999


def test_same_bytes_with_any_thread_count(built, tiny_base, tiny_adapter, tmp_path):
    """The merge is correctly rounded (merge.RULE), so the bytes depend on nothing but the inputs:
    1 and 2 worker threads (and the `built` fixture's run, which also wrote --save-merged) write
    the same file, and the SHA-256 recorded while streaming is the file's."""
    result, _, _ = built
    want = (result.out_dir / "tiny-BF16.gguf").read_bytes()
    for threads in (1, 2):
        res = build(tiny_base, tiny_adapter, tmp_path / f"t{threads}", name="tiny", nthread=threads)
        data = (res.out_dir / "tiny-BF16.gguf").read_bytes()
        assert data == want, f"{threads} thread(s) wrote other bytes"
        record = json.loads((res.out_dir / "run.json").read_text())
        assert record["stages"]["build"]["threads"] == threads
        recorded = {o["file"]: o["sha256"] for o in record["outputs"]}
        assert recorded["tiny-BF16.gguf"] == hashlib.sha256(data).hexdigest()
    assert "rounded once" in record["rounding"] and "do not depend on the CPU" in record["rounding"]
    assert record["stages"]["build"]["merge_kernel"] == "compiled"


def test_compiled_kernel_and_numpy_write_the_same_bytes(built, tiny_base, tiny_adapter, tmp_path, monkeypatch):
    """Both merge routes round every element once, correctly: the numpy route (no compiled
    kernel, or LORA2GGUF_KERNEL=numpy) writes the compiled route's file, byte for byte."""
    result, _, _ = built
    monkeypatch.setattr(kernel, "_lib", None)
    res = build(tiny_base, tiny_adapter, tmp_path / "numpy", name="tiny")
    assert (res.out_dir / "tiny-BF16.gguf").read_bytes() == (result.out_dir / "tiny-BF16.gguf").read_bytes()
    record = json.loads((res.out_dir / "run.json").read_text())
    assert record["stages"]["build"]["merge_kernel"].startswith("numpy")


def _gguf_name(hf: str, part: str, layer: str | None) -> str:
    table = {
        "model.embed_tokens.weight": "token_embd.weight", "lm_head.weight": "output.weight",
        "model.norm.weight": "output_norm.weight",
    }
    if hf in table:
        return table[hf]
    rest = hf.split(".", 3)[3]
    per_layer = {
        "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_proj.bias": "attn_q.bias",
        "self_attn.k_proj.weight": "attn_k.weight", "self_attn.k_proj.bias": "attn_k.bias",
        "self_attn.v_proj.weight": "attn_v.weight", "self_attn.v_proj.bias": "attn_v.bias",
        "self_attn.o_proj.weight": "attn_output.weight", "self_attn.o_proj.bias": "attn_output.bias",
        "self_attn.sinks": "attn_sinks.weight", "mlp.router.weight": "ffn_gate_inp.weight",
        "mlp.router.bias": "ffn_gate_inp.bias", "input_layernorm.weight": "attn_norm.weight",
        "post_attention_layernorm.weight": "post_attention_norm.weight",
        "mlp.experts.down_proj_bias": "ffn_down_exps.bias",
    }
    if rest == "mlp.experts.gate_up_proj":
        return f"blk.{layer}.ffn_{part}_exps.weight"
    if rest == "mlp.experts.down_proj":
        return f"blk.{layer}.ffn_down_exps.weight"
    if rest == "mlp.experts.gate_up_proj_bias":
        return f"blk.{layer}.ffn_{part}_exps.bias"
    return f"blk.{layer}.{per_layer[rest]}"


def _run_reference(ref: Path, model_dir: Path, outfile: Path, outtype: str = "bf16") -> None:
    env = dict(os.environ, PYTHONPATH=str(ref / "gguf-py"), NO_LOCAL_GGUF="")
    proc = subprocess.run([sys.executable, str(ref / "convert_hf_to_gguf.py"), str(model_dir), "--outfile",
                           str(outfile), "--outtype", outtype], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_parity_with_llama_cpp_converter(built, reference_llama_cpp, tmp_path, tiny_adapter):
    """llama.cpp's convert_hf_to_gguf.py on the same merged model writes the same GGUF:
    tensor names, shapes, types and bytes, and every metadata key but provenance."""
    result, _, merged = built
    model_dir = tmp_path / "merged"
    shutil.copytree(merged, model_dir)
    for f in TOKENIZER_FILES:  # the GGUF took the adapter's tokenizer; give the reference the same
        if (tiny_adapter / f).exists():
            shutil.copy(tiny_adapter / f, model_dir / f)
    ref_file = tmp_path / "ref.gguf"
    _run_reference(reference_llama_cpp, model_dir, ref_file)
    from reference import assert_same_gguf

    assert_same_gguf(result.out_dir / "tiny-BF16.gguf", ref_file)


def test_legacy_rope_config_gives_same_metadata(tmp_path, tiny_base, tiny_adapter, built):
    """A config written by transformers 4.x (rope_scaling + rope_theta) gives the same GGUF metadata."""
    base = tmp_path / "legacy"
    shutil.copytree(tiny_base, base)
    cfg = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps(synth.legacy_config(cfg)))
    res = build(base, tiny_adapter, tmp_path / "out", name="tiny")
    _, new_kv = read_gguf(res.out_dir / "tiny-BF16.gguf")
    _, old_kv = read_gguf(built[0].out_dir / "tiny-BF16.gguf")
    assert {k: v for k, v in new_kv.items() if k != "general.name"} == {k: v for k, v in old_kv.items() if k != "general.name"}


def test_k_quants_on_256_multiple_widths(tmp_path, k256_base):
    """With widths that are multiples of 256, Q4_K_M really makes K-quant tensors (and no fallback
    note); llama.cpp loads and generates from it."""
    adapter = synth.make_adapter(k256_base, tmp_path / "adapter", r=8, lora_alpha=16, use_rslora=True)
    res = build(k256_base, adapter, tmp_path / "out", name="k", quants=["Q4_K_M"])
    q = res.outputs[1]
    assert q.file == "k-Q4_K_M.gguf" and q.note is None
    assert q.tensor_types.get("Q4_K", 0) > 0 and q.tensor_types.get("Q6_K", 0) > 0, q.tensor_types
    assert q.bytes < 0.5 * res.outputs[0].bytes
    from llama_cpp import Llama

    llm = Llama(str(tmp_path / "out" / "k-Q4_K_M.gguf"), n_ctx=64, verbose=False, n_threads=2)
    out = llm.create_completion("What is 2+2?", max_tokens=3, temperature=0.0)
    assert out["usage"]["completion_tokens"] >= 1


def test_narrow_rows_fallback_is_reported(built):
    """TINY rows are 64 wide: llama.cpp cannot use K-quants and falls back silently; build says so."""
    from lora2gguf.quantize import fallback_note

    result = built[0]
    tensors = reader_of(result.out_dir / "tiny-Q8_0.gguf").tensors
    types = {t.name: t.tensor_type.name for t in tensors}
    shapes = {t.name: [int(d) for d in t.shape] for t in tensors}
    assert fallback_note("Q8_0", types, shapes) is None
    fake_k = {n: ("Q5_0" if t == "Q8_0" else t) for n, t in types.items()}
    note = fallback_note("Q4_K_M", fake_k, shapes)
    assert note and "not a multiple of 256" in note and "MXFP4_MOE" in note and "Q5_0" in note


@pytest.fixture(scope="module")
def rslora_adapter(tmp_path_factory, tiny_base):
    """rsLoRA with a rank pattern and an alpha pattern (on attention and on an expert parameter)."""
    return synth.make_adapter(tiny_base, tmp_path_factory.mktemp("rslora_adapter"), r=4, lora_alpha=8,
                              use_rslora=True, rank_pattern={"v_proj": 8, "o_proj": 2},
                              alpha_pattern={"k_proj": 3, "mlp.experts.gate_up_proj": 5})


@pytest.mark.parametrize("which", ["plain", "rslora_patterns"])
def test_equals_float64_reference_merge_through_llama_cpp(which, built, rslora_adapter, tiny_base, tiny_adapter,
                                                          reference_llama_cpp, tmp_path):
    """The correctly rounded merge, end to end: PEFT's merge_and_unload on the base loaded in
    float64, rounded once to bf16 (with our own tested rounding; torch's rounds twice), converted
    by llama.cpp's convert_hf_to_gguf.py, is the BF16 GGUF lora2gguf writes, byte for byte: every
    tensor and every key."""
    from reference import assert_same_gguf, run_converter

    adapter = tiny_adapter if which == "plain" else rslora_adapter
    if which == "plain":
        ours = built[0].out_dir / "tiny-BF16.gguf"
    else:
        ours = build(tiny_base, adapter, tmp_path / "ours", name="tiny").out_dir / "tiny-BF16.gguf"
    model_dir = synth.write_reference_merge(tiny_base, adapter, tmp_path / "reference")
    assert_same_gguf(ours, run_converter(reference_llama_cpp, model_dir, tmp_path / "ref.gguf"))
