"""Gemma 2, Gemma 3 (and the text model of Gemma3ForConditionalGeneration) and Phi-3 end to end,
as tests/test_families.py does for the dense families: tiny random models made with transformers,
adapters made with PEFT, lora2gguf's BF16 GGUF against llama.cpp's own converter on the float64
reference merge (every tensor's bytes, every key), then llama.cpp's logits of the F32 GGUF
against transformers + PEFT. The layouts these families add are each shown to matter: Gemma's
norms without their + 1, Phi-3's long and short rope factors swapped, fail the logits test."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest

from lora2gguf import arch, synth
from lora2gguf.api import build, doctor
from lora2gguf.doctor import findings as F
from lora2gguf.errors import UnsupportedError
from lora2gguf.testing import families
from lora2gguf.testing import tokenizers as toks
from lora2gguf.verify.logits import gguf_logits
from lora2gguf.verify.metrics import kl_divergence, top1_agreement
from reference import assert_same_gguf, run_converter

pytest.importorskip("peft")

GEMMA_IDS = {"bos_token_id": 2, "pad_token_id": 0}
PHI3 = toks.phi3_ids(512)
PHI3_ROWS = 512 + toks.PHI3_EXTRA_ROWS
#: rotary dims / 2 = 8 factors (hidden 64, 4 heads); long ones far from the short ones
LONG_FACTORS = [1.0 + 0.4 * i for i in range(8)]
SHORT_FACTORS = [1.0 + 0.02 * i for i in range(8)]

#: (id, fixture family, tokenizer, extra config, generation_config, target modules)
CASES = [
    # softcapping set low enough to shape attention and logits; sliding window 16 < the text's tokens
    ("gemma2", "gemma2", lambda d: toks.gemma_tokenizer(d, generation=2),
     {"vocab_size": 640, **GEMMA_IDS, "eos_token_id": 1, "num_hidden_layers": 4, "attn_logit_softcapping": 3.0,
      "final_logit_softcapping": 15.0},
     {**GEMMA_IDS, "eos_token_id": [1, 107]}, families.ALL_LINEAR),
    # six layers: five sliding (local rope base 10000) and one full (1e6), as llama.cpp's pattern
    ("gemma3", "gemma3", lambda d: toks.gemma_tokenizer(d, generation=3),
     {"vocab_size": 704, **GEMMA_IDS, "eos_token_id": [1, 106], "num_hidden_layers": 6},
     None, families.ALL_LINEAR),
    # the hub's layout: a vision tower beside the text model, its config as transformers 4.x wrote it
    # (rope_theta, rope_local_base_freq, a linear rope scaling), LoRA reaching the vision tower too
    ("gemma3-vlm-4x-config", "gemma3-vlm", lambda d: toks.gemma_tokenizer(d, generation=3),
     {"vocab_size": 704, **GEMMA_IDS, "eos_token_id": [1, 106], "num_hidden_layers": 6,
      "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
                          "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}},
     None, families.ALL_LINEAR),
    ("phi3", "phi3", toks.phi3_tokenizer,
     {"vocab_size": PHI3_ROWS, "bos_token_id": 1, "eos_token_id": PHI3["<|endoftext|>"],
      "pad_token_id": PHI3["<|endoftext|>"], "sliding_window": 2047},
     {"bos_token_id": 1, "eos_token_id": [PHI3["<|endoftext|>"], PHI3["<|assistant|>"], PHI3["<|end|>"]],
      "pad_token_id": PHI3["<|endoftext|>"]}, families.PHI3_LINEAR),
    # long context: the text is longer than original_max_position_embeddings, so transformers and
    # llama.cpp both rotate with the long factors; a fine-tune's own token, not marked special
    ("phi3-longrope", "phi3", lambda d: toks.phi3_tokenizer(d, extra_tokens=[("<|persona|>", False)]),
     {"vocab_size": PHI3_ROWS, "bos_token_id": 1, "eos_token_id": PHI3["<|endoftext|>"],
      "pad_token_id": PHI3["<|endoftext|>"], "max_position_embeddings": 256, "original_max_position_embeddings": 32,
      "rope_scaling": {"type": "longrope", "long_factor": LONG_FACTORS, "short_factor": SHORT_FACTORS}},
     {"bos_token_id": 1, "eos_token_id": [PHI3["<|endoftext|>"], PHI3["<|assistant|>"], PHI3["<|end|>"]]},
     families.PHI3_LINEAR),
]

TEXT = ("What is 2+2? The sum of 2 and 2 is 4. Tell me about the stars and the sea: the stars are far "
        "away, the sea is near, and a lighthouse keeper watches both through the long winter night.")


def _as_4x_config(base: Path) -> None:
    """Rewrite a Gemma3ForConditionalGeneration config.json as transformers 4.x saved it (and the
    hub's gemma-3 repositories have it): rope_theta / rope_local_base_freq / rope_scaling and
    sliding_window_pattern instead of rope_parameters and layer_types."""
    path = base / "config.json"
    cfg = json.loads(path.read_text())
    text = cfg["text_config"]
    rope = text.pop("rope_parameters")
    text.pop("layer_types")
    text.pop("_sliding_window_pattern", None)
    full = rope["full_attention"]
    text.update(rope_theta=full["rope_theta"], rope_local_base_freq=rope["sliding_attention"]["rope_theta"],
                rope_scaling={"rope_type": full["rope_type"], "factor": full["factor"]}, sliding_window_pattern=6)
    path.write_text(json.dumps(cfg, indent=2))


#: built once per case, shared by the fixtures below (each test sees only the cases it concerns)
_MADE: dict[str, tuple] = {}
_F32: dict[str, tuple] = {}
GEMMA_CASES = [c for c in CASES if c[0].startswith("gemma")]
LONGROPE_CASES = [c for c in CASES if "longrope" in c[0]]


def _case(param, tmp_path_factory):
    if param[0] not in _MADE:
        _MADE[param[0]] = _make(param, tmp_path_factory)
    return _MADE[param[0]]


@pytest.fixture(scope="module", params=CASES, ids=[c[0] for c in CASES])
def case(request, tmp_path_factory):
    return _case(request.param, tmp_path_factory)


@pytest.fixture(scope="module", params=GEMMA_CASES, ids=[c[0] for c in GEMMA_CASES])
def gemma_case(request, tmp_path_factory):
    return _case(request.param, tmp_path_factory)


@pytest.fixture(scope="module", params=LONGROPE_CASES, ids=[c[0] for c in LONGROPE_CASES])
def longrope_case(request, tmp_path_factory):
    return _case(request.param, tmp_path_factory)


def _make(param, tmp_path_factory):
    cid, fam, write_tokenizer, cfg, gen, targets = param
    root = tmp_path_factory.mktemp(cid)
    config = families.small_config(fam, **cfg)
    base = families.make_model(root / "base", fam, config, tokenizer=write_tokenizer, generation_config=gen)
    if "4x-config" in cid:
        _as_4x_config(base)
    adapter = synth.make_adapter(base, root / "adapter", target_modules=targets, target_parameters=(), r=4,
                                 lora_alpha=8, use_rslora=True, rank_pattern={"o_proj": 8},
                                 alpha_pattern={"down_proj": 3})
    return cid, base, adapter, root


def test_bf16_equals_llama_cpp_converter_on_the_float64_merge(case, reference_llama_cpp):
    cid, base, adapter, root = case
    res = build(base, adapter, root / "out", name="m")
    family = cid.split("-")[0]
    assert res.record["architecture"] == family
    model_dir = synth.write_reference_merge(base, adapter, root / "reference")
    assert_same_gguf(root / "out" / "m-BF16.gguf", run_converter(reference_llama_cpp, model_dir, root / "ref.gguf"))
    names = res.outputs[0].tensors
    if family.startswith("gemma"):
        assert "output.weight" not in names  # tied (Gemma 2 drops lm_head in any case)
        assert names["blk.0.post_ffw_norm.weight"] == "F32" and names["blk.0.post_attention_norm.weight"] == "F32"
    if family == "gemma3":
        assert names["blk.0.attn_q_norm.weight"] == "F32"
        assert not [n for n in names if n.startswith(("v.", "mm."))]
    if "vlm" in cid:
        notes = res.record["notes"]
        assert any("another modality" in n and "vision_tower." in n for n in notes), notes
    if family == "phi3":
        assert names["blk.0.attn_qkv.weight"] == "BF16" and names["blk.0.ffn_up.weight"] == "BF16"
        assert ("rope_factors_long.weight" in names) == ("longrope" in cid)
    kv = _kv(root / "out" / "m-BF16.gguf")
    if cid == "gemma2":
        assert kv["gemma2.attn_logit_softcapping"] == 3.0 and kv["gemma2.final_logit_softcapping"] == 15.0
        assert kv["gemma2.attention.sliding_window"] == 16 and "gemma2.rope.freq_base" not in kv
    if family == "gemma3":
        assert kv["gemma3.rope.freq_base"] == 1_000_000.0 and kv["gemma3.rope.freq_base_swa"] == 10_000.0
        assert kv["gemma3.attention.sliding_window"] == 16
        assert kv["tokenizer.ggml.add_space_prefix"] is False
        assert ("gemma3.rope.scaling.factor" in kv) == ("vlm" in cid)
    if cid == "phi3-longrope":
        assert kv["phi3.rope.scaling.attn_factor"] == pytest.approx(np.sqrt(1 + np.log(8) / np.log(32)), rel=1e-6)
        assert kv["phi3.rope.scaling.original_context_length"] == 32
        persona = PHI3_ROWS - toks.PHI3_EXTRA_ROWS + len(toks.PHI3_ADDED)
        assert kv["tokenizer.ggml.token_type"][persona] == int(gguf.TokenType.USER_DEFINED)  # not special
        assert kv["tokenizer.ggml.token_type"][PHI3["<|end|>"]] == int(gguf.TokenType.CONTROL)


def _kv(path: Path) -> dict:
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def _f32(case) -> tuple[Path, list[int], np.ndarray, np.ndarray]:
    """(F32 GGUF, token ids of TEXT, logits of transformers + PEFT, of the base alone)."""
    cid, base, adapter, root = case
    if cid not in _F32:
        build(base, adapter, root / "out32", name="m", outtype="f32")
        from transformers import AutoTokenizer

        ids = AutoTokenizer.from_pretrained(str(base))(TEXT, add_special_tokens=False)["input_ids"]
        _F32[cid] = (root / "out32" / "m-F32.gguf", ids, synth.peft_logits(base, adapter, ids),
                     synth.peft_logits(base, None, ids))
    return _F32[cid]


def _score(path: Path, ids, ref) -> tuple[float, float]:
    ours = gguf_logits(path, list(ids))
    return float(kl_divergence(ref, ours).mean()), top1_agreement(ref, ours)


# as tests/test_families.py measured (F32 vs transformers + PEFT float32: mean KL ~1e-6 .. 1e-5)
F32_MAX_MEAN_KL = 1e-4
F32_MIN_TOP1 = 0.95


def test_f32_logits_match_transformers_peft(case):
    path, ids, ref, base = _f32(case)
    # longer than Gemma's sliding window and Phi-3's original_max_position_embeddings (long factors used)
    assert len(ids) > 32
    # the fixtures are not degenerate: the adapter moves the distribution far beyond the tolerance
    assert float(kl_divergence(ref, base).mean()) > 1.0
    kl, top1 = _score(path, ids, ref)
    assert kl < F32_MAX_MEAN_KL and top1 >= F32_MIN_TOP1, (kl, top1)


def _edited(path: Path, dest: Path, edit) -> Path:
    """A copy of the F32 GGUF at ``path`` whose tensors ``edit(name, values)`` changes (returns
    new values, or None to leave a tensor as it is)."""
    reader = gguf.GGUFReader(path)
    data = bytearray(path.read_bytes())
    changed = 0
    for t in reader.tensors:
        new = edit(t.name, np.asarray(t.data, dtype=np.float32))
        if new is not None:
            data[t.data_offset:t.data_offset + t.n_bytes] = np.ascontiguousarray(new, np.float32).tobytes()
            changed += 1
    assert changed
    dest.write_bytes(bytes(data))
    return dest


def test_gemma_norms_without_the_plus_one_fail(gemma_case, tmp_path):
    """llama.cpp multiplies by the stored norm weight, Gemma by 1 + w: a GGUF whose norms lack the
    + 1 (what a converter that forgets it writes) fails the logits test."""
    path, ids, ref, _ = _f32(gemma_case)
    broken = _edited(path, tmp_path / "no_plus_one.gguf",
                     lambda name, w: w - np.float32(1.0) if name.endswith("norm.weight") else None)
    kl, top1 = _score(broken, ids, ref)
    assert kl > 100 * F32_MAX_MEAN_KL and top1 < F32_MIN_TOP1, (kl, top1)


def test_phi3_long_and_short_rope_factors_swapped_fail(longrope_case, tmp_path):
    path, ids, ref, _ = _f32(longrope_case)
    values = {t.name: np.asarray(t.data, np.float32).copy() for t in gguf.GGUFReader(path).tensors
              if t.name.startswith("rope_factors_")}
    swap = {"rope_factors_long.weight": values["rope_factors_short.weight"],
            "rope_factors_short.weight": values["rope_factors_long.weight"]}
    broken = _edited(path, tmp_path / "swapped.gguf", lambda name, w: swap.get(name))
    kl, top1 = _score(broken, ids, ref)
    assert kl > 100 * F32_MAX_MEAN_KL, (kl, top1)


# --------------------------------------------------------------------------- doctor and the chat format


def test_doctor_names_the_family_and_gemmas_chat_format(case):
    cid, base, adapter, root = case
    report = doctor(base, adapter)
    codes = {f.code for f in report.findings}
    assert "ARCH_UNSUPPORTED" not in codes and "LLAMACPP_ARCH_UNKNOWN" not in codes
    assert not [f for f in report.findings if f.severity == F.BLOCKER], report.findings
    chat = next(f for f in report.findings if f.code == "CHAT_FORMAT")
    if cid.startswith("gemma"):
        assert chat.data["known"] == "gemma" and chat.data["turn_end"] == "<end_of_turn>"
        # Google's tokenizer_config says <eos>; only generation_config.json lists <end_of_turn>
        assert "TURN_END_NOT_IN_GGUF" in codes
    else:
        assert chat.data["known"] is None and chat.data["turn_end"] == "<|end|>"


@pytest.mark.parametrize("generation", [2, 3])
def test_gemma_ollama_template_renders_as_the_model_template(generation):
    from lora2gguf.chat.jinja import JinjaFormat, _strip_bos

    from gotemplate import ollama_data, render as go_render

    tpl = toks.GEMMA2_CHAT_TEMPLATE if generation == 2 else toks.GEMMA3_CHAT_TEMPLATE
    sp = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}
    fmt = JinjaFormat(tpl, sp)
    assert fmt.known is not None and fmt.known.key == "gemma"
    spec = fmt.ollama(["<eos>", "<end_of_turn>"])
    assert spec.template is not None and "<end_of_turn>" in spec.stops
    convs = [[{"role": "user", "content": "Hi there"}],
             [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
              {"role": "user", "content": "What is 2+2?"}]]
    if generation == 3:  # Gemma 3 puts a system message before the first user turn
        convs.append([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    for conv in convs:
        system = conv[0]["content"] if conv[0]["role"] == "system" else None
        msgs = conv[1:] if system else conv
        want = _strip_bos(fmt.render_messages(conv, add_generation_prompt=True), "<bos>")
        assert go_render(spec.template, ollama_data(msgs, system if system is not None else spec.system)) == want


# --------------------------------------------------------------------------- what llama.cpp cannot compute


@pytest.mark.parametrize("edit, words", [
    ({"query_pre_attn_scalar": 24}, "query_pre_attn_scalar"),
    ({"layer_types": ["full_attention"] * 6}, "layer_types"),
    ({"attn_logit_softcapping": 50.0}, "attention softcapping"),
])
def test_gemma3_configs_llama_cpp_would_compute_differently_are_refused(edit, words):
    from lora2gguf import hparams

    fam = arch.known()["gemma3"]
    cfg = {"architectures": ["Gemma3ForCausalLM"], **families.small_config("gemma3", vocab_size=704,
                                                                           num_hidden_layers=6)}
    cfg["layer_types"] = ["sliding_attention"] * 5 + ["full_attention"]
    hparams.validate(fam, fam.normalize_config(cfg))  # as transformers makes it: fine
    with pytest.raises(UnsupportedError, match=words):
        hparams.validate(fam, fam.normalize_config({**cfg, **edit}))


def test_an_adapter_on_gemma2s_dropped_lm_head_is_refused(tmp_path):
    """llama.cpp's gemma2 has no output tensor: a fine-tune that trained lm_head would lose it."""
    from lora2gguf.plan import shape_plan

    fam = arch.known()["gemma2"]
    cfg = fam.normalize_config(families.small_config("gemma2", vocab_size=640, num_hidden_layers=1))
    shapes = {"model.embed_tokens.weight": (640, 64), "lm_head.weight": (640, 64), "model.norm.weight": (64,)}
    plan = shape_plan(fam, cfg, shapes)  # the base's lm_head: dropped, as the converter does
    assert [t.tensor.name for t in plan.tensors] == ["token_embd.weight", "output_norm.weight"]
    assert plan.tensors[1].add == 1.0
    with pytest.raises(UnsupportedError, match="lm_head"):
        shape_plan(fam, cfg, shapes, {"lm_head.weight"})
