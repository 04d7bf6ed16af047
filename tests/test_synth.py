"""lora2gguf.synth: synthetic GPT-OSS bases and adapters, checked against transformers and PEFT."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest

from lora2gguf import synth
from lora2gguf.errors import InputError, UnsupportedError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

IDS = np.array([200006, 1428, 200008, 13225, 11, 2375, 0, 10, 20, 30, 40, 555, 6666, 199999])


def _header(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n)), 8 + n


def _layout(path):
    """{key: (shape, dtype)} of a safetensors file."""
    h, _ = _header(path)
    return {k: (tuple(v["shape"]), v["dtype"]) for k, v in h.items() if k != "__metadata__"}


# ---------------------------------------------------------------------------------------------- config

@pytest.mark.parametrize("preset", ["TINY", "K256", "REAL_WIDTH"])
def test_config_is_what_transformers_saves(tmp_path, preset):
    ours = synth.gpt_oss_config(**getattr(synth, preset))
    cfg = transformers.GptOssConfig.from_dict(ours)
    cfg.save_pretrained(tmp_path)
    theirs = json.loads((tmp_path / "config.json").read_text())
    # the layout is transformers'; the version stamp is whichever transformers saved it
    assert theirs.pop("transformers_version") == transformers.__version__
    assert ours.pop("transformers_version") == synth.TRANSFORMERS_VERSION
    assert theirs == ours


def test_presets():
    k = synth.gpt_oss_config(**synth.K256)
    for key in ("hidden_size", "intermediate_size"):
        assert k[key] % 256 == 0
    assert k["head_dim"] == 64 and k["num_attention_heads"] == 4 and k["num_key_value_heads"] == 2
    r = synth.gpt_oss_config(**synth.REAL_WIDTH, num_hidden_layers=4)
    assert (r["hidden_size"], r["num_attention_heads"], r["num_key_value_heads"], r["head_dim"],
            r["intermediate_size"], r["num_local_experts"], r["num_experts_per_tok"], r["vocab_size"]) == \
        (2880, 64, 8, 64, 2880, 32, 4, 201088)
    assert r["layer_types"] == ["sliding_attention", "full_attention"] * 2
    t = synth.gpt_oss_config()
    assert t["rope_parameters"] == {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                                    "original_max_position_embeddings": 4096, "rope_theta": 150000.0,
                                    "rope_type": "yarn", "truncate": False}
    assert (t["eos_token_id"], t["pad_token_id"], t["dtype"], t["swiglu_limit"]) == (200002, 199999, "bfloat16", 7.0)
    assert t["tie_word_embeddings"] is False and t["attention_bias"] is True
    with pytest.raises(InputError, match="layer_types"):
        synth.gpt_oss_config(num_hidden_layers=3, layer_types=["full_attention"])


def test_legacy_config_loads_to_the_same_rope():
    new = synth.gpt_oss_config()
    old = synth.legacy_config(new)
    assert "rope_parameters" not in old and old["rope_theta"] == 150000.0
    assert old["rope_scaling"]["rope_type"] == "yarn" and "rope_theta" not in old["rope_scaling"]
    assert old["torch_dtype"] == "bfloat16" and "dtype" not in old
    a = transformers.GptOssConfig.from_dict(new)
    b = transformers.GptOssConfig.from_dict(old)
    assert a.rope_parameters == b.rope_parameters


# ---------------------------------------------------------------------------------------------- numerics

def test_bf16_rounding_known_values():
    x = np.array([1.0, 1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-20, -2.0, 0.0, np.inf, 3.0e38, np.nan],
                 dtype=np.float32)
    bits = synth.bf16_bits(x)
    assert bits[:8].tolist() == [0x3F80, 0x3F80, 0x3F82, 0x3F81, 0xC000, 0x0000, 0x7F80, 0x7F62]
    assert np.isnan(synth.bf16_to_f32(bits[8:])).all()


def test_bf16_rounding_matches_torch():
    rng = np.random.default_rng(1)
    with np.errstate(over="ignore", invalid="ignore"):
        x = np.concatenate([rng.standard_normal(100_000).astype(np.float32) * 10.0 ** rng.integers(-30, 30, 100_000),
                            rng.integers(0, 2**32, 100_000, dtype=np.uint64).astype(np.uint32).view(np.float32)])
    x = x[np.isfinite(x)]
    ref = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(synth.bf16_bits(x), ref)


# ---------------------------------------------------------------------------------------------- base

def test_tiny_base_files(tiny_base):
    names = sorted(p.name for p in tiny_base.iterdir())
    assert names == ["chat_template.jinja", "config.json", "generation_config.json",
                     "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                     "model.safetensors.index.json", "special_tokens_map.json", "tokenizer.json",
                     "tokenizer_config.json"]
    gen = json.loads((tiny_base / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [200002, 199999, 200012] and gen["bos_token_id"] == 199998
    index = json.loads((tiny_base / "model.safetensors.index.json").read_text())
    cfg = json.loads((tiny_base / "config.json").read_text())
    specs = dict(synth.tensor_specs(cfg))
    assert set(index["weight_map"]) == set(specs)
    total = 0
    seen = {}
    for shard in sorted(set(index["weight_map"].values())):
        h, start = _header(tiny_base / shard)
        assert h["__metadata__"] == {"format": "pt"}
        end = 0
        for k, v in h.items():
            if k == "__metadata__":
                continue
            assert index["weight_map"][k] == shard
            assert v["dtype"] == "BF16"
            seen[k] = tuple(v["shape"])
            end = max(end, v["data_offsets"][1])
            total += v["data_offsets"][1] - v["data_offsets"][0]
        assert (tiny_base / shard).stat().st_size == start + end
    assert seen == specs
    assert index["metadata"]["total_size"] == total


def test_tiny_base_layout_equals_transformers(tiny_base):
    cfg = transformers.GptOssConfig.from_pretrained(str(tiny_base))
    with torch.device("meta"):
        model = transformers.GptOssForCausalLM(cfg)
    theirs = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    ours = synth.tensor_specs(json.loads((tiny_base / "config.json").read_text()))
    assert dict(ours) == theirs
    # gate_up_proj is (E, H, 2I): interleaved gate/up columns, as GptOssExperts reads them
    assert theirs["model.layers.0.mlp.experts.gate_up_proj"] == (4, 64, 128)
    assert theirs["model.layers.0.mlp.experts.down_proj"] == (4, 64, 64)


def test_tiny_base_loads_in_transformers_with_peaked_outputs(tiny_base):
    model, info = transformers.GptOssForCausalLM.from_pretrained(
        str(tiny_base), dtype=torch.float32, output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    w = model.model.layers[1].mlp.experts.down_proj.detach().numpy()
    cfg = json.loads((tiny_base / "config.json").read_text())
    assert np.array_equal(w, synth.synth_tensor("model.layers.1.mlp.experts.down_proj", cfg, dtype="bfloat16"))
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(IDS[None])).logits[0].numpy()
    assert np.isfinite(logits).all()
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    entropy = -(p * np.log(np.maximum(p, 1e-30))).sum(-1)
    assert entropy.mean() < 0.5 * np.log(synth.VOCAB_SIZE)
    # the top token depends on the context, not the same everywhere
    assert len(set(logits.argmax(-1).tolist())) > len(IDS) // 2


def test_base_is_deterministic_and_seeded(tmp_path):
    cfg = synth.gpt_oss_config(vocab_size=512)
    a = synth.make_base(tmp_path / "a", cfg, tokenizer=False)
    b = synth.make_base(tmp_path / "b", cfg, tokenizer=False, max_shard_bytes=40_000)
    c = synth.make_base(tmp_path / "c", cfg, tokenizer=False, seed=1)
    assert not (a / "tokenizer.json").exists()
    assert len(json.loads((b / "model.safetensors.index.json").read_text())["weight_map"]) == 37
    assert len(set(json.loads((b / "model.safetensors.index.json").read_text())["weight_map"].values())) > 2
    from safetensors import safe_open

    def load(d):
        idx = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
        out = {}
        for k, f in idx.items():
            with safe_open(d / f, "pt") as s:
                out[k] = s.get_tensor(k).float().numpy()
        return out
    ta, tb, tc = load(a), load(b), load(c)
    assert all(np.array_equal(ta[k], tb[k]) for k in ta)  # sharding does not change values
    assert not np.array_equal(ta["model.layers.0.self_attn.q_proj.weight"], tc["model.layers.0.self_attn.q_proj.weight"])


def test_dtypes_progress_and_hf_init(tmp_path):
    cfg = synth.gpt_oss_config(vocab_size=512, num_hidden_layers=1)
    calls = []
    d = synth.make_base(tmp_path / "f32", cfg, dtype="float32", tokenizer=False, init="hf",
                        progress=lambda n, i, t: calls.append((n, i, t)))
    assert json.loads((d / "config.json").read_text())["dtype"] == "float32"
    lay = _layout(d / "model-00001-of-00001.safetensors")
    assert {v[1] for v in lay.values()} == {"F32"}
    assert [c[1] for c in calls] == list(range(1, len(lay) + 1)) and calls[-1][2] == len(lay)
    x = synth.synth_tensor("model.layers.0.self_attn.q_proj.weight", cfg, init="hf")
    assert abs(float(x.std()) - 0.02) < 0.002
    assert not synth.synth_tensor("model.layers.0.self_attn.q_proj.bias", cfg, init="hf").any()
    with pytest.raises(InputError, match="dtype"):
        synth.make_base(tmp_path / "x", cfg, dtype="int8")


def test_legacy_base_loads_with_same_logits(tmp_path, tiny_base):
    cfg = synth.gpt_oss_config(**synth.TINY)
    old = synth.make_base(tmp_path / "legacy", cfg, legacy=True, tokenizer=False)
    assert "rope_scaling" in json.loads((old / "config.json").read_text())
    a = synth.peft_logits(old, None, IDS)
    b = synth.peft_logits(tiny_base, None, IDS)
    np.testing.assert_array_equal(a, b)


def test_k256_base_loads(k256_base):
    model, info = transformers.GptOssForCausalLM.from_pretrained(str(k256_base), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.model.layers[0].mlp.experts.gate_up_proj.shape == (4, 256, 512)
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (256, 256)


# ---------------------------------------------------------------------------------------------- adapters

def test_tiny_adapter_peft_layout(tiny_adapter, tiny_base):
    names = sorted(p.name for p in tiny_adapter.iterdir())
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja"} <= set(names)
    assert (tiny_adapter / "tokenizer.json").read_bytes() == (tiny_base / "tokenizer.json").read_bytes()
    lay = _layout(tiny_adapter / "adapter_model.safetensors")
    p = "base_model.model.model.layers.0."
    assert lay[p + "self_attn.q_proj.lora_A.weight"] == ((4, 64), "F32")
    assert lay[p + "self_attn.k_proj.lora_B.weight"] == ((32, 4), "F32")
    assert lay[p + "mlp.experts.base_layer.lora_A.weight"] == ((16, 64), "F32")   # gate_up_proj
    assert lay[p + "mlp.experts.base_layer.lora_B.weight"] == ((128, 16), "F32")
    assert lay[p + "mlp.experts.lora_A.weight"] == ((16, 64), "F32")              # down_proj
    assert lay[p + "mlp.experts.lora_B.weight"] == ((64, 16), "F32")
    assert len(lay) == 2 * 2 * 6
    cfg = json.loads((tiny_adapter / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["base_model_name_or_path"] == str(tiny_base)
    assert set(cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert cfg["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def test_tiny_adapter_has_a_sizeable_delta(tiny_base, tiny_adapter):
    merged = synth.peft_merged_state_dict(tiny_base, tiny_adapter)
    cfg = json.loads((tiny_base / "config.json").read_text())
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.v_proj.weight",
                 "model.layers.0.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"):
        base = synth.synth_tensor(name, cfg, dtype="bfloat16")
        delta = merged[name] - base
        ratio = float(np.sqrt((delta ** 2).mean() / (base ** 2).mean()))
        assert 0.3 < ratio < 0.8, (name, ratio)   # init_scale 0.5
    untouched = "model.layers.0.mlp.router.weight"
    assert np.array_equal(merged[untouched], synth.synth_tensor(untouched, cfg, dtype="bfloat16"))
    a = synth.peft_logits(tiny_base, None, IDS)
    b = synth.peft_logits(tiny_base, tiny_adapter, IDS)
    assert np.isfinite(b).all() and np.abs(a - b).max() > 1.0


CASES = [
    dict(),
    dict(target_parameters=()),
    dict(target_modules=()),
    dict(target_parameters=("mlp.experts.down_proj", "mlp.experts.gate_up_proj")),
    dict(target_parameters=("mlp.experts.down_proj",), target_modules=("q_proj", "o_proj"), r=8,
         lora_alpha=16, use_rslora=True),
]


@pytest.fixture(scope="module")
def small_base(tmp_path_factory):
    return synth.make_base(tmp_path_factory.mktemp("small_base"), synth.gpt_oss_config(vocab_size=512),
                           tokenizer=False)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_numpy_adapter_matches_peft_layout(tmp_path, small_base, case):
    kw = CASES[case]
    a = synth.make_adapter(small_base, tmp_path / "peft", tokenizer="none", **kw)
    b = synth.make_adapter_numpy(small_base, tmp_path / "np", tokenizer="none", **kw)
    assert _layout(a / "adapter_model.safetensors") == _layout(b / "adapter_model.safetensors")
    ca = json.loads((a / "adapter_config.json").read_text())
    cb = json.loads((b / "adapter_config.json").read_text())
    assert set(ca) == set(cb)
    for k in ca:
        if k == "target_modules":
            assert set(ca[k] or []) == set(cb[k] or []), k
        else:
            assert ca[k] == cb[k], k
    # PEFT loads the numpy-written adapter and it changes the outputs
    ids = np.array([1, 5, 7, 100, 300])
    base = synth.peft_logits(small_base, None, ids)
    lora = synth.peft_logits(small_base, b, ids)
    assert np.isfinite(lora).all() and np.abs(lora - base).max() > 0.5


def test_numpy_adapter_real_width_without_weights(tmp_path):
    base = tmp_path / "rw"
    base.mkdir()
    (base / "config.json").write_text(json.dumps(synth.gpt_oss_config(**synth.REAL_WIDTH, num_hidden_layers=1)))
    d = synth.make_adapter_numpy(base, tmp_path / "ad", r=8, tokenizer="none", save_dtype="bfloat16")
    lay = _layout(d / "adapter_model.safetensors")
    p = "base_model.model.model.layers.0."
    assert lay[p + "mlp.experts.base_layer.lora_A.weight"] == ((8 * 32, 2880), "BF16")
    assert lay[p + "mlp.experts.base_layer.lora_B.weight"] == ((5760, 8 * 32), "BF16")
    assert lay[p + "mlp.experts.lora_B.weight"] == ((2880, 8 * 32), "BF16")
    assert lay[p + "self_attn.q_proj.lora_B.weight"] == ((4096, 8), "BF16")
    assert lay[p + "self_attn.k_proj.lora_B.weight"] == ((512, 8), "BF16")
    with pytest.raises(UnsupportedError, match="target module"):
        synth.make_adapter_numpy(base, tmp_path / "bad", target_modules=("gate_proj",))


def test_adapter_tokenizer_variants(tmp_path, tiny_base):
    from lora2gguf import o200k
    none = synth.make_adapter_numpy(tiny_base, tmp_path / "none", tokenizer="none")
    assert not (none / "tokenizer.json").exists()
    mod = synth.make_adapter_numpy(
        tiny_base, tmp_path / "mod",
        tokenizer=lambda d: o200k.write_tokenizer(d, extra_tokens=["<|xyrus|>"], eos_token="<|end|>"),
        base_model_name_or_path="unsloth/gpt-oss-20b-BF16")
    assert json.loads((mod / "adapter_config.json").read_text())["base_model_name_or_path"] == "unsloth/gpt-oss-20b-BF16"
    assert json.loads((mod / "tokenizer_config.json").read_text())["eos_token"] == "<|end|>"
    assert (mod / "tokenizer.json").read_bytes() != (tiny_base / "tokenizer.json").read_bytes()
    resaved = synth.make_adapter_numpy(tiny_base, tmp_path / "resaved", tokenizer="resaved")
    tok = transformers.AutoTokenizer.from_pretrained(str(resaved))
    assert len(tok) == synth.VOCAB_SIZE and tok.eos_token == "<|return|>"
    with pytest.raises(InputError, match="tokenizer="):
        synth.make_adapter_numpy(tiny_base, tmp_path / "bad", tokenizer="weird")


def test_adapter_bf16_and_patterns(tmp_path, small_base):
    d = synth.make_adapter(small_base, tmp_path / "a", target_parameters=(), rank_pattern={"q_proj": 8},
                           alpha_pattern={"q_proj": 32}, save_dtype="bfloat16", tokenizer="none")
    lay = _layout(d / "adapter_model.safetensors")
    assert lay["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] == ((8, 64), "BF16")
    assert lay["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"] == ((4, 64), "BF16")
    cfg = json.loads((d / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] == {"q_proj": 8} and cfg["alpha_pattern"] == {"q_proj": 32}
    merged = synth.peft_merged_state_dict(small_base, d)
    scfg = json.loads((small_base / "config.json").read_text())
    name = "model.layers.0.self_attn.q_proj.weight"
    base = synth.synth_tensor(name, scfg, dtype="bfloat16")
    ratio = float(np.sqrt(((merged[name] - base) ** 2).mean() / (base ** 2).mean()))
    assert 0.3 < ratio < 0.8, ratio
    with pytest.raises(InputError, match="empty"):
        synth.make_adapter(small_base, tmp_path / "b", target_modules=(), target_parameters=())


def test_fixture_dirs_are_usable_copies(tmp_path, tiny_base):
    # the documented way for a test to modify a fixture: copy it
    c = shutil.copytree(tiny_base, tmp_path / "copy")
    assert (c / "model.safetensors.index.json").is_file()


@pytest.mark.slow
def test_reference_converter_and_llama_cpp_accept_the_fixture(tmp_path, reference_llama_cpp):
    """The fixture is a real GPT-OSS checkpoint: llama.cpp's own converter turns it into a GGUF
    (detecting the gpt-4o pre-tokenizer), llama.cpp tokenizes like transformers and computes the
    same next tokens. rope_truncate=True because llama.cpp always truncates the YaRN range."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import gguf

    from lora2gguf import o200k

    base = synth.make_base(tmp_path / "b", synth.gpt_oss_config(**synth.TINY, rope_truncate=True))
    out = tmp_path / "b.gguf"
    r = subprocess.run([sys.executable, str(reference_llama_cpp / "convert_hf_to_gguf.py"), str(base),
                        "--outfile", str(out), "--outtype", "f32"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    reader = gguf.GGUFReader(str(out))
    pre = reader.get_field(gguf.Keys.Tokenizer.PRE)
    assert pre.contents() == "gpt-4o"
    llm = llama_cpp.Llama(str(out), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    try:
        text = o200k.render_chat([{"role": "user", "content": "Hello Ünïcödé 🚀, 3.14159!"}],
                                 add_generation_prompt=True)
        tok = transformers.AutoTokenizer.from_pretrained(str(base))
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok.encode(text, add_special_tokens=False)
        llm.eval(IDS.tolist())
        got = np.array(llm.scores[: len(IDS)], dtype=np.float32)
    finally:
        llm.close()
    ref = synth.peft_logits(base, None, IDS)
    assert (got.argmax(-1) == ref.argmax(-1)).all()
    assert np.abs(got - ref).max() < 0.05  # logits spread about 6; measured about 0.015
