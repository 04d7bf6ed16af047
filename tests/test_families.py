"""Every dense family end to end: tiny random models made with transformers, adapters made with
PEFT, and lora2gguf's GGUF against llama.cpp's own converter on the float64 reference merge
(every tensor's bytes, every key), then llama.cpp's logits against transformers + PEFT."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest

from lora2gguf import synth
from lora2gguf.api import build
from lora2gguf.gguf_header import read_header
from lora2gguf.testing import families
from lora2gguf.testing import tokenizers as toks
from lora2gguf.verify.logits import gguf_logits
from lora2gguf.verify.metrics import kl_divergence, top1_agreement
from reference import assert_same_gguf, read_gguf, read_gguf_gguf_py, run_converter

pytest.importorskip("peft")

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 512}

#: each tokenizer with the embedding rows and config ids its models have
TOKENIZERS = {
    "llama3": (toks.llama3_tokenizer, toks.LLAMA3_VOCAB_SIZE,
               {"bos_token_id": 128000, "eos_token_id": list(toks.LLAMA3_EOS_IDS)}),
    "qwen3": (toks.qwen3_tokenizer, toks.QWEN3_VOCAB_SIZE,
              {"bos_token_id": None, "eos_token_id": list(toks.QWEN3_EOS_IDS)}),
    "spm-llama2": (lambda d: toks.sentencepiece_tokenizer(d, style="llama2"), 512,
                   {"bos_token_id": 1, "eos_token_id": 2}),
    "spm-mistral": (lambda d: toks.sentencepiece_tokenizer(d, style="mistral"), 512,
                    {"bos_token_id": 1, "eos_token_id": 2}),
}

#: (id, family, tokenizer, extra config): GQA everywhere; Llama 3 with a llama3 rope scaling
#: (rope_freqs) and untied embeddings, Llama 2 (SentencePiece) with tied ones; Mistral v0.3's
#: SentencePiece; Qwen2.5 with its q/k/v biases; Qwen3 with q_norm/k_norm
CASES = [
    ("llama3-rope", "llama", "llama3", {"rope_scaling": LLAMA3_ROPE, "rope_theta": 500000.0}),
    ("llama2-spm-tied", "llama", "spm-llama2", {"tie_word_embeddings": True}),
    ("mistral-spm", "mistral", "spm-mistral", {}),
    ("qwen2", "qwen2", "qwen3", {}),
    ("qwen3", "qwen3", "qwen3", {}),
]

TEXT = ("What is 2+2? The sum of 2 and 2 is 4. Tell me about the stars and the sea: the stars are far "
        "away, the sea is near, and a lighthouse keeper watches both through the long winter night.")


_BASES: dict[str, Path] = {}


def _base(cid: str, tmp_path_factory) -> Path:
    """The base of case ``cid``, made once per module (the DoRA tests reuse it with their adapters)."""
    if cid not in _BASES:
        _, family, tok, extra = next(c for c in CASES if c[0] == cid)
        write_tokenizer, vocab, ids = TOKENIZERS[tok]
        config = families.small_config(family, vocab_size=vocab, **ids, **extra)
        _BASES[cid] = families.make_model(tmp_path_factory.mktemp(cid + "-base"), family, config,
                                          tokenizer=write_tokenizer)
    return _BASES[cid]


@pytest.fixture(scope="module", params=CASES, ids=[c[0] for c in CASES])
def case(request, tmp_path_factory):
    cid, family, tok, extra = request.param
    root = tmp_path_factory.mktemp(cid)
    base = _base(cid, tmp_path_factory)
    adapter = synth.make_adapter(base, root / "adapter", target_modules=families.ALL_LINEAR, target_parameters=(),
                                 r=4, lora_alpha=8, use_rslora=True, rank_pattern={"v_proj": 8},
                                 alpha_pattern={"down_proj": 3})
    return cid, family, base, adapter, root


def test_bf16_equals_llama_cpp_converter_on_the_float64_merge(case, reference_llama_cpp):
    cid, family, base, adapter, root = case
    res = build(base, adapter, root / "out", name="m")
    assert res.record["architecture"] == family
    model_dir = synth.write_reference_merge(base, adapter, root / "reference")
    assert_same_gguf(root / "out" / "m-BF16.gguf", run_converter(reference_llama_cpp, model_dir, root / "ref.gguf"))
    types = res.outputs[0].tensor_types
    names = res.outputs[0].tensors
    if "tied" in cid:
        assert "output.weight" not in names
    else:
        assert names["output.weight"] == "BF16"
    if "llama3" in cid:
        assert names["rope_freqs.weight"] == "F32"
    assert types["BF16"] > 0


#: the cheapest of CASES (a 512-piece SentencePiece vocabulary, tied embeddings): the F16 output on it
CHEAPEST = CASES[1]


@pytest.mark.parametrize("case", [CHEAPEST], ids=[CHEAPEST[0]], indirect=True)
def test_f16_equals_llama_cpp_converter_on_the_float64_merge(case, reference_llama_cpp):
    """--outtype f16: lora2gguf's F16 GGUF is the converter's ``--outtype f16`` GGUF of the float64
    merge rounded once to f16 (every tensor's bytes, every key, file type MOSTLY_F16 included):
    matrices F16, norms F32."""
    cid, family, base, adapter, root = case
    res = build(base, adapter, root / "out16", name="m", outtype="f16")
    model_dir = synth.write_reference_merge(base, adapter, root / "reference16", dtype="f16")
    ours = root / "out16" / "m-F16.gguf"
    assert_same_gguf(ours, run_converter(reference_llama_cpp, model_dir, root / "ref16.gguf", outtype="f16"))
    names = res.outputs[0].tensors
    assert set(names.values()) == {"F16", "F32"}
    assert names["token_embd.weight"] == "F16" and names["blk.0.attn_q.weight"] == "F16"
    assert names["blk.0.attn_norm.weight"] == "F32"
    tensors, kv = read_gguf(ours)
    assert kv["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    # the merged matrices keep f16's 10 mantissa bits (not a bf16 merge widened: its low 3 bits 0)
    q = np.frombuffer(tensors["blk.0.attn_q.weight"][2], np.uint16)
    assert np.mean(q & 0x7 != 0) > 0.5


@pytest.fixture(scope="module")
def f32_case(case):
    cid, family, base, adapter, root = case
    build(base, adapter, root / "out32", name="m", outtype="f32")
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(base))(TEXT, add_special_tokens=False)["input_ids"]
    ref = synth.peft_logits(base, adapter, ids)
    return root / "out32" / "m-F32.gguf", ids, ref


def _score(path: Path, ids, ref) -> tuple[float, float]:
    ours = gguf_logits(path, list(ids))
    return float(kl_divergence(ref, ours).mean()), top1_agreement(ref, ours)


# measured on these fixtures: F32 GGUF vs transformers + PEFT float32, mean KL ~1e-6 .. 1e-5 and
# 100% top-1; a layout error (q/k rows not permuted) gives mean KL of order 1
F32_MAX_MEAN_KL = 1e-4
F32_MIN_TOP1 = 0.95


def test_f32_logits_match_transformers_peft(f32_case):
    path, ids, ref = f32_case
    kl, top1 = _score(path, ids, ref)
    assert kl < F32_MAX_MEAN_KL and top1 >= F32_MIN_TOP1, (kl, top1)


def test_a_wrong_permute_fails(f32_case, case, tmp_path):
    """Undo llama.cpp's rotary row order on q and k (what a converter that forgets the permute, or
    permutes the LoRA delta differently from the base, would write): the same test fails. For the
    NEOX-rope families (no permute) the rows are permuted instead, which is just as wrong."""
    path, ids, ref = f32_case
    reader = gguf.GGUFReader(path)
    data = bytearray(path.read_bytes())
    heads = {"attn_q": reader.fields["%s.attention.head_count" % _arch(reader)].contents(),
             "attn_k": reader.fields["%s.attention.head_count_kv" % _arch(reader)].contents()}
    for t in reader.tensors:
        kind = t.name.split(".")[2] if t.name.startswith("blk.") else ""
        if kind in heads and t.name.endswith(".weight"):
            w = np.asarray(t.data).reshape(tuple(int(d) for d in reversed(t.shape)))
            n = heads[kind]
            unpermuted = w.reshape(n, w.shape[0] // n // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)
            data[t.data_offset:t.data_offset + t.n_bytes] = np.ascontiguousarray(unpermuted, np.float32).tobytes()
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(bytes(data))
    kl, top1 = _score(broken, ids, ref)
    assert kl > 100 * F32_MAX_MEAN_KL and top1 < F32_MIN_TOP1, (kl, top1)


def _arch(reader) -> str:
    return reader.fields["general.architecture"].contents()


# --------------------------------------------------------------------------- Llama variants

#: Llama configs beyond CASES, on the cheapest model (SentencePiece, tied embeddings): (id, config,
#: config.json as a transformers 4.x checkpoint has it, GGUF keys both files must hold). Rope
#: scalings other than llama3 become rope.scaling.* keys (no rope_freqs tensor): linear from a 4.x
#: ``rope_scaling`` (``type``, top-level rope_theta), YaRN with its beta and attention factors from
#: 5.x ``rope_parameters``. The linear case also has SmolLM's 49,152-row vocabulary, which the
#: converter writes with add_bos_token False (one converter run fewer than a case of its own).
VARIANTS = [
    ("rope-linear-smollm-vocab", {"rope_scaling": {"rope_type": "linear", "factor": 4.0}, "vocab_size": 49152},
     {"rope_scaling": {"type": "linear", "factor": 4.0}, "rope_theta": 10000.0},
     {"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0, "tokenizer.ggml.add_bos_token": False}),
    ("rope-yarn", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024,
                                    "beta_fast": 16.0, "beta_slow": 2.0, "attention_factor": 1.25}}, None,
     {"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0,
      "llama.rope.scaling.original_context_length": 1024, "llama.rope.scaling.yarn_beta_fast": 16.0,
      "llama.rope.scaling.yarn_beta_slow": 2.0, "llama.rope.scaling.yarn_attn_factor": 1.25,
      "tokenizer.ggml.add_bos_token": True}),
]


@pytest.mark.parametrize("cid,extra,legacy,keys", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_llama_variant_equals_llama_cpp_converter(cid, extra, legacy, keys, reference_llama_cpp, tmp_path):
    """Each variant's BF16 GGUF is the converter's on the float64 merge, and holds ``keys``."""
    write_tokenizer, vocab, ids = TOKENIZERS["spm-llama2"]
    config = families.small_config("llama", **{"vocab_size": vocab, **ids, "tie_word_embeddings": True,
                                               "num_hidden_layers": 2, **extra})
    base = families.make_model(tmp_path / "base", "llama", config, tokenizer=write_tokenizer)
    if legacy is not None:
        cfg = synth.read_config(base)
        cfg.pop("rope_parameters", None)
        (base / "config.json").write_text(json.dumps({**cfg, **legacy}, indent=2))
    adapter = synth.make_adapter(base, tmp_path / "adapter", target_modules=families.ALL_LINEAR,
                                 target_parameters=(), r=4, lora_alpha=8)
    res = build(base, adapter, tmp_path / "out", name="m")
    ours = tmp_path / "out" / "m-BF16.gguf"
    model_dir = synth.write_reference_merge(base, adapter, tmp_path / "reference")
    assert_same_gguf(ours, run_converter(reference_llama_cpp, model_dir, tmp_path / "ref.gguf"))
    kv = read_header(ours).values  # gguf-py's reader takes seconds on a 49,152-token vocabulary
    assert {k: kv.get(k) for k in keys} == keys
    assert "rope_freqs.weight" not in res.outputs[0].tensors


# --------------------------------------------------------------------------- chat fine-tunes

#: embedding changes chat fine-tunes make: (id, family, tokenizer, extra config, adapter options)
CHAT_CASES = [
    # two added tokens, embeddings resized, embed_tokens and lm_head trained in full (modules_to_save)
    ("llama3-added-tokens", "llama", "llama3", {},
     dict(resize_vocab=toks.LLAMA3_VOCAB_SIZE + 8, modules_to_save=("embed_tokens", "lm_head"),
          tokenizer=lambda d: toks.llama3_tokenizer(d, extra_tokens=[("<|persona|>", True), ("<|tool|>", True)]))),
    # PEFT's trainable tokens: only some rows of the (tied) embedding trained
    ("qwen3-trainable-tokens", "qwen3", "qwen3", {"tie_word_embeddings": True},
     dict(trainable_token_indices=[151644, 151645, 9707])),
    # LoRA on the embedding and the lm_head as well (Unsloth's "embed_tokens", "lm_head" targets)
    ("llama2-embedding-lora", "llama", "spm-llama2", {},
     dict(target_modules=(*families.ALL_LINEAR, "embed_tokens", "lm_head"))),
]


@pytest.fixture(scope="module", params=CHAT_CASES, ids=[c[0] for c in CHAT_CASES])
def chat_case(request, tmp_path_factory):
    cid, family, tok, extra, opts = request.param
    root = tmp_path_factory.mktemp(cid)
    write_tokenizer, vocab, ids = TOKENIZERS[tok]
    base = families.make_model(root / "base", family, families.small_config(family, vocab_size=vocab, **ids, **extra),
                               tokenizer=write_tokenizer)
    kw = dict(target_modules=families.ALL_LINEAR, target_parameters=(), r=4, lora_alpha=8)
    kw.update(opts)
    adapter = synth.make_adapter(base, root / "adapter", **kw)
    return cid, base, adapter, root


def test_chat_finetune_embeddings_merged_as_llama_cpp_would(chat_case, reference_llama_cpp):
    """The GGUF of a fine-tune that changed its embeddings is the converter's on PEFT's float64
    merge (resized rows and the adapter's tokenizer included), and llama.cpp runs it like
    transformers + PEFT."""
    cid, base, adapter, root = chat_case
    res = build(base, adapter, root / "out", name="m")
    model_dir = synth.write_reference_merge(base, adapter, root / "reference")
    assert_same_gguf(root / "out" / "m-BF16.gguf", run_converter(reference_llama_cpp, model_dir, root / "ref.gguf"))
    rec = res.record
    if "added" in cid:
        assert rec["technical"]["vocab_size"] == toks.LLAMA3_VOCAB_SIZE + 8
        assert any("resize the vocabulary" in n for n in rec["notes"])
        assert set(rec["adapter"]["full_weights"]) == {"model.embed_tokens.weight", "lm_head.weight"}
    if "trainable" in cid:
        assert rec["adapter"]["trained_token_rows"] == {"model.embed_tokens.weight": [151644, 151645, 9707]}
    build(base, adapter, root / "out32", name="m", outtype="f32")
    from transformers import AutoTokenizer

    text = TEXT + (" <|persona|> hello <|tool|>" if "added" in cid else "")
    tok_ids = AutoTokenizer.from_pretrained(str(adapter))(text, add_special_tokens=False)["input_ids"]
    if "added" in cid:
        assert max(tok_ids) >= toks.LLAMA3_VOCAB_SIZE  # the added tokens are in the text
    ref = synth.peft_logits(base, adapter, tok_ids)
    kl, top1 = _score(root / "out32" / "m-F32.gguf", tok_ids, ref)
    assert kl < F32_MAX_MEAN_KL and top1 >= F32_MIN_TOP1, (kl, top1)


# --------------------------------------------------------------------------- DoRA


@pytest.fixture(scope="module")
def dora_case(tmp_path_factory):
    root = tmp_path_factory.mktemp("dora")
    write_tokenizer, vocab, ids = TOKENIZERS["spm-llama2"]
    base = families.make_model(root / "base", "llama", families.small_config("llama", vocab_size=vocab, **ids),
                               tokenizer=write_tokenizer)
    adapter = synth.make_adapter(base, root / "adapter", target_modules=families.ALL_LINEAR, target_parameters=(),
                                 r=4, lora_alpha=8, use_rslora=True, rank_pattern={"v_proj": 8}, use_dora=True)
    return base, adapter, root


def test_dora_merged_as_peft_merges_it(dora_case, reference_llama_cpp, tmp_path):
    """DoRA on attention and MLP: the converter's GGUF of PEFT's float64 merge (magnitude times
    the merged weight normalized per output row), and llama.cpp's logits of the F32 GGUF match
    PEFT; the same merge with the norm over the other axis (columns) fails that test."""
    base, adapter, root = dora_case
    build(base, adapter, root / "out", name="m")
    model_dir = synth.write_reference_merge(base, adapter, root / "reference")
    assert_same_gguf(root / "out" / "m-BF16.gguf", run_converter(reference_llama_cpp, model_dir, root / "ref.gguf"))
    build(base, adapter, root / "out32", name="m", outtype="f32")
    from transformers import AutoTokenizer

    tok_ids = AutoTokenizer.from_pretrained(str(adapter))(TEXT, add_special_tokens=False)["input_ids"]
    ref = synth.peft_logits(base, adapter, tok_ids)
    f32 = root / "out32" / "m-F32.gguf"
    kl, top1 = _score(f32, tok_ids, ref)
    assert kl < F32_MAX_MEAN_KL and top1 >= F32_MIN_TOP1, (kl, top1)

    # the wrong axis: o_proj (square) with each row scaled by magnitude / norm of a column
    from safetensors.numpy import load_file

    from lora2gguf.safetensors_io import Checkpoint, read_raw, to_f32

    ck = Checkpoint.open(base)
    lora = load_file(str(adapter / "adapter_model.safetensors"))
    scale = 8 / np.sqrt(4)  # rsLoRA, r=4 for o_proj
    reader = gguf.GGUFReader(f32)
    data = bytearray(f32.read_bytes())
    n_layers = synth.read_config(base)["num_hidden_layers"]
    for layer in range(n_layers):
        key = f"model.layers.{layer}.self_attn.o_proj"
        info = ck.tensors[key + ".weight"]
        v = to_f32(read_raw(info), info.dtype).astype(np.float64) + scale * (lora[f"base_model.model.{key}.lora_B.weight"].astype(np.float64)
                                            @ lora[f"base_model.model.{key}.lora_A.weight"].astype(np.float64))
        m = lora[f"base_model.model.{key}.lora_magnitude_vector"].astype(np.float64)
        wrong = v * (m / np.linalg.norm(v, axis=0))[:, None]
        t = next(t for t in reader.tensors if t.name == f"blk.{layer}.attn_output.weight")
        data[t.data_offset:t.data_offset + t.n_bytes] = wrong.astype(np.float32).tobytes()
    broken = tmp_path / "wrong-axis.gguf"
    broken.write_bytes(bytes(data))
    kl, top1 = _score(broken, tok_ids, ref)
    assert kl > 10 * F32_MAX_MEAN_KL, (kl, top1)


def test_read_gguf_matches_gguf_py(tmp_path):
    """The comparison's own reader (reference.read_gguf, one pass) gives what gguf-py's
    GGUFReader gives, for every value type GGUF has, string and numeric arrays, and an aligned
    tensor data section."""
    w = gguf.GGUFWriter(tmp_path / "t.gguf", "llama")
    w.add_uint8("t.u8", 7)
    w.add_int8("t.i8", -7)
    w.add_uint16("t.u16", 65535)
    w.add_int16("t.i16", -300)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -5)
    w.add_float32("t.f32", 0.1)
    w.add_uint64("t.u64", 2**63 + 5)
    w.add_int64("t.i64", -(2**40))
    w.add_float64("t.f64", 1e-300)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo <|im_end|>")
    w.add_array("t.strings", ["a", "", "ü ✓", "<s>"])
    w.add_array("t.ints", [1, -2, 3])
    w.add_array("t.floats", [0.5, -1.25, 3.0e-5])
    w.add_array("t.bools", [True, False])
    w.add_tensor("a", np.arange(12, dtype=np.float32).reshape(3, 4))
    w.add_tensor("b", np.arange(5, dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ours, theirs = read_gguf(tmp_path / "t.gguf"), read_gguf_gguf_py(tmp_path / "t.gguf")
    assert ours[0] == theirs[0] and ours[1] == theirs[1]
    assert {k: type(v) for k, v in ours[1].items()} == {k: type(v) for k, v in theirs[1].items()}
    assert ours[1]["t.strings"] == ["a", "", "ü ✓", "<s>"] and ours[0]["b"][1] == (5,)


@pytest.fixture(scope="module")
def dora_qwen2_case(tmp_path_factory):
    """DoRA on the qwen2 case's base: q/k/v carry biases, which DoRA leaves as they are."""
    root = tmp_path_factory.mktemp("dora-qwen2")
    base = _base("qwen2", tmp_path_factory)
    adapter = synth.make_adapter(base, root / "adapter", target_modules=families.ALL_LINEAR, target_parameters=(),
                                 r=4, lora_alpha=8, rank_pattern={"v_proj": 8}, alpha_pattern={"down_proj": 3},
                                 use_dora=True)
    return base, adapter, root


def test_dora_on_qwen2_with_biases_equals_llama_cpp_converter_on_the_float64_merge(dora_qwen2_case,
                                                                                  reference_llama_cpp):
    """A second family for DoRA (biased q/k/v, NEOX rope, no permute): the BF16 GGUF is the
    converter's on PEFT's float64 merge, every tensor and key."""
    base, adapter, root = dora_qwen2_case
    from safetensors import safe_open

    with safe_open(str(adapter / "adapter_model.safetensors"), "np") as f:
        mags = [k for k in f.keys() if k.endswith("lora_magnitude_vector")]
    assert len(mags) == 7 * synth.read_config(base)["num_hidden_layers"]  # every Linear layer is DoRA
    res = build(base, adapter, root / "out", name="m")
    assert res.record["architecture"] == "qwen2"
    model_dir = synth.write_reference_merge(base, adapter, root / "reference")
    assert_same_gguf(root / "out" / "m-BF16.gguf", run_converter(reference_llama_cpp, model_dir, root / "ref.gguf"))
    assert res.outputs[0].tensors["blk.0.attn_q.bias"] == "F32"
