"""The LoRA math (lora2gguf.lora) against PEFT itself, and the layout transforms on known values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lora2gguf import layout, lora

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")


def test_scaling_plain_and_rslora():
    assert lora.scaling(16, 8) == 2.0
    assert lora.scaling(16, 16, use_rslora=True) == 4.0
    assert lora.scaling(8, 2, use_rslora=True) == pytest.approx(8 / math.sqrt(2))
    with pytest.raises(ValueError):
        lora.scaling(8, 0)


@pytest.mark.parametrize("key", [
    "model.layers.0.self_attn.q_proj", "model.layers.10.self_attn.v_proj", "model.layers.1.mlp.experts.down_proj",
    "model.layers.1.mlp.experts.gate_up_proj", "xq_proj", "model.layers.0.self_attn.o_proj",
])
def test_pattern_lookup_agrees_with_peft(key):
    from peft.utils.other import get_pattern_key

    patterns = {"v_proj": 8, r"layers\.1\..*down_proj": 2, "q_proj": 32, "experts.gate_up_proj": 4}
    want = patterns.get(get_pattern_key(patterns.keys(), key), 16)
    assert lora.pattern_value(patterns, key, 16) == want


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_linear_delta_matches_peft(fan_in_fan_out):
    from peft import LoraConfig, get_peft_model

    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    # GPT-2's Conv1D stores its weight (in, out): the case fan_in_fan_out is for
    layer0 = Conv1D(10, 12) if fan_in_fan_out else torch.nn.Linear(12, 10, bias=False)
    model = torch.nn.Sequential(layer0)
    cfg = LoraConfig(r=3, lora_alpha=7, target_modules=["0"], fan_in_fan_out=fan_in_fan_out, init_lora_weights=False)
    pm = get_peft_model(model, cfg)
    layer = pm.base_model.model[0]
    want = layer.get_delta_weight("default").detach().numpy()
    a = layer.lora_A["default"].weight.detach().numpy()
    b = layer.lora_B["default"].weight.detach().numpy()
    got = lora.linear_delta(a, b, lora.scaling(7, 3), fan_in_fan_out=fan_in_fan_out)
    assert got.shape == tuple(layer.base_layer.weight.shape)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    rows = slice(2, 5)
    np.testing.assert_allclose(lora.linear_delta(a, b, lora.scaling(7, 3), fan_in_fan_out=fan_in_fan_out, rows=rows),
                               want[rows], rtol=1e-6, atol=1e-7)


def test_expert_delta_matches_peft_param_wrapper():
    """PEFT's ParamWrapper on GPT-OSS experts: A (r*E, in) read as (E, r, in), B (out, r*E) read as
    (out, r, E); the delta has the parameter's (E, in, out) layout."""
    from peft import LoraConfig, get_peft_model
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(0)
    cfg = GptOssConfig(vocab_size=64, hidden_size=32, intermediate_size=24, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_local_experts=3,
                       num_experts_per_tok=2)
    model = GptOssForCausalLM(cfg)
    pm = get_peft_model(model, LoraConfig(r=2, lora_alpha=5, target_modules=[], init_lora_weights=False,
                                           target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
    outer = pm.base_model.model.model.layers[0].mlp.experts  # wraps down_proj; base_layer wraps gate_up_proj
    for wrapper, param in ((outer, "down_proj"), (outer.base_layer, "gate_up_proj")):
        assert wrapper.parameter_name == param
        want = wrapper.get_delta_weight("default").detach().numpy()
        a = wrapper.lora_A["default"].weight.detach().numpy()
        b = wrapper.lora_B["default"].weight.detach().numpy()
        got = lora.expert_delta(a, b, lora.scaling(5, 2), 3)
        assert got.shape == tuple(getattr(model.model.layers[0].mlp.experts.base_layer.base_layer, param).shape)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(lora.expert_delta(a, b, lora.scaling(5, 2), 3, experts=slice(1, 3)), want[1:3],
                                   rtol=1e-5, atol=1e-6)


def test_layout_split_and_transpose_known_values():
    x = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)  # (E, in, 2n) with n = 2
    gate, up = layout.Split(2, interleaved=True, transpose=True).apply({}, x)
    assert gate.shape == up.shape == (2, 2, 3)
    assert gate[0].tolist() == [[0, 4, 8], [2, 6, 10]]
    assert up[1].tolist() == [[13, 17, 21], [15, 19, 23]]
    (down,) = layout.Transpose().apply({}, x)
    assert down.shape == (2, 4, 3) and down[1, 3, 2] == x[1, 2, 3]
    g, u = layout.Split(2, interleaved=True, axis="cols").apply({}, np.array([[1, 2, 3, 4]], np.float32))
    assert g.tolist() == [[1, 3]] and u.tolist() == [[2, 4]]
    lo, hi = layout.Split(2, interleaved=False).apply({}, np.arange(8, dtype=np.float32).reshape(4, 2))
    assert lo.tolist() == [[0, 1], [2, 3]] and hi.tolist() == [[4, 5], [6, 7]]
    (q,) = layout.PermuteHeads("h").apply({"h": 1}, np.arange(4, dtype=np.float32))  # a bias: one head of 4
    assert q.tolist() == [0, 2, 1, 3]
    (n,) = layout.AddOne().apply({}, np.zeros(3, np.float32))
    assert n.tolist() == [1, 1, 1]