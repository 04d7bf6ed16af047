"""llama.cpp runs what build writes, and its next-token distributions match transformers + PEFT
(the unmerged fine-tune) within the measured numeric noise; broken conversions fail the same test."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest

from lora2gguf import synth
from lora2gguf.api import build
from lora2gguf.verify.logits import gguf_logits
from lora2gguf.verify.metrics import kl_divergence, top1_agreement

TEXT = ("<|start|>user<|message|>What is 2+2? Tell me about the stars and the sea.<|end|>"
        "<|start|>assistant<|channel|>analysis<|message|>Simple sum.<|end|><|start|>assistant<|channel|>final"
        "<|message|>The sum of 2 and 2 is 4. The stars are far away, the sea is near.<|return|>")

# Thresholds from noise measured on this fixture (peaked logits, so noise is larger than on a
# near-uniform model): an F32 GGUF matches transformers to mean KL ~5e-6 with one near-tie position
# of 58 flipping its top-1; BF16 weights and activations give mean KL ~2e-3 and ~90% top-1.
# Each bound leaves a margin above the noise and far below a broken conversion.
F32_MAX_MEAN_KL = 1e-4
F32_MIN_TOP1 = 0.95
BF16_MAX_MEAN_KL = 2e-2
BF16_MIN_TOP1 = 0.75


@pytest.fixture(scope="module")
def model(tmp_path_factory, o200k_tokenizer_dir):
    # llama.cpp always applies YaRN with truncation; the fixture says so (gpt-oss's own config does
    # not, which shifts logits by up to ~0.1 on this tiny model whatever the converter does)
    base = synth.make_base(tmp_path_factory.mktemp("base"), synth.gpt_oss_config(**synth.TINY, rope_truncate=True))
    adapter = synth.make_adapter(base, tmp_path_factory.mktemp("adapter"), rank_pattern={"v_proj": 8},
                                 alpha_pattern={"mlp.experts.down_proj": 4})
    return base, adapter


@pytest.fixture(scope="module")
def tokens(model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model[1]))
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    assert 200005 in ids and 200002 in ids  # Harmony specials are single tokens
    return np.array(ids)


@pytest.fixture(scope="module")
def reference(model, tokens):
    return synth.peft_logits(model[0], model[1], tokens)


@pytest.fixture(scope="module")
def f32_file(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("f32")
    build(model[0], model[1], out, outtype="f32", name="m")
    return out / "m-F32.gguf"


def score(path: Path, tokens, reference) -> tuple[float, float]:
    ours = gguf_logits(path, tokens.tolist())
    kl = kl_divergence(reference, ours)
    return float(kl.mean()), top1_agreement(reference, ours)


def test_f32_gguf_matches_transformers_peft(f32_file, tokens, reference):
    kl, top1 = score(f32_file, tokens, reference)
    assert kl < F32_MAX_MEAN_KL and top1 >= F32_MIN_TOP1, (kl, top1)


def test_bf16_gguf_within_bf16_noise(model, tokens, reference, tmp_path):
    res = build(model[0], model[1], tmp_path, outtype="bf16", name="m", quants=["Q8_0"])
    kl, top1 = score(tmp_path / "m-BF16.gguf", tokens, reference)
    assert kl < BF16_MAX_MEAN_KL and top1 >= BF16_MIN_TOP1, (kl, top1)
    # the quantized file loads and generates
    from llama_cpp import Llama

    llm = Llama(str(tmp_path / "m-Q8_0.gguf"), n_ctx=128, verbose=False, n_threads=2, seed=0)
    out = llm.create_completion("The stars", max_tokens=4, temperature=0.0)
    assert out["usage"]["completion_tokens"] >= 1
    assert res.record["outputs"][1]["tensor_types"]["Q8_0"] > 0


def test_swapped_gate_up_split_fails(f32_file, tokens, reference, tmp_path):
    """Swap each layer's ffn_gate_exps and ffn_up_exps (what a wrong interleave split gives)."""
    broken = tmp_path / "swapped.gguf"
    shutil.copy(f32_file, broken)
    tensors = {t.name: t for t in gguf.GGUFReader(f32_file).tensors}
    data = bytearray(broken.read_bytes())
    for layer in range(2):
        g, u = tensors[f"blk.{layer}.ffn_gate_exps.weight"], tensors[f"blk.{layer}.ffn_up_exps.weight"]
        assert g.n_bytes == u.n_bytes
        gs, us = slice(g.data_offset, g.data_offset + g.n_bytes), slice(u.data_offset, u.data_offset + u.n_bytes)
        data[gs], data[us] = data[us], data[gs]
    broken.write_bytes(bytes(data))
    kl, top1 = score(broken, tokens, reference)
    assert kl > 10 * F32_MAX_MEAN_KL and top1 < F32_MIN_TOP1, (kl, top1)


def test_wrong_scaling_fails(model, tokens, reference, tmp_path):
    """An adapter whose lora_alpha is doubled (a wrong scaling) is caught by the same comparison."""
    adapter = tmp_path / "adapter"
    shutil.copytree(model[1], adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["lora_alpha"] *= 2
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    build(model[0], adapter, tmp_path / "out", outtype="f32", name="m")
    kl, top1 = score(tmp_path / "out" / "m-F32.gguf", tokens, reference)
    assert kl > 10 * F32_MAX_MEAN_KL and top1 < F32_MIN_TOP1, (kl, top1)
