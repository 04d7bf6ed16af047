"""GGUF LoRA adapters (issue 13): llama.cpp applying lora2gguf's adapter file at load time on the base
GGUF gives the merged GGUF, for GPT-OSS with LoRA on the MoE experts and for a Llama model with the
q/k permute and LoRA on the embeddings, both with rsLoRA, rank_pattern and alpha_pattern; a wrong
fold fails the same comparison; llama.cpp's own convert_lora_to_gguf.py writes the same file where
it can convert the adapter; quantized bases load, generate and are reported beside the merged
quantized files; what llama.cpp cannot apply stops the run unless accepted.

Everything runs for real: PEFT makes the adapters and is the reference, llama.cpp (llama-cpp-python)
loads every base + adapter pair through llama_adapter_lora_init.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

pytest.importorskip("peft")
pytest.importorskip("llama_cpp")

from lora2gguf import synth  # noqa: E402
from lora2gguf.adapter import LoraTerm  # noqa: E402
from lora2gguf.api import build, export_adapter  # noqa: E402
from lora2gguf.errors import BlockedError, InputError  # noqa: E402
from lora2gguf.lora_gguf import fold  # noqa: E402
from lora2gguf.testing import families  # noqa: E402
from lora2gguf.testing import tokenizers as toks  # noqa: E402
from lora2gguf.verify.logits import gguf_logits, open_gguf  # noqa: E402
from lora2gguf.verify.metrics import kl_divergence, top1_agreement  # noqa: E402
from reference import assert_same_gguf  # noqa: E402

THREADS = 2
TEXT = ("What is 2+2? The sum of 2 and 2 is 4. Tell me about the stars and the sea: the stars are far away, "
        "the sea is near, and a lighthouse keeper watches both through the long winter night.")
HARMONY_TEXT = ("<|start|>user<|message|>What is 2+2? Tell me about the stars and the sea.<|end|>"
                "<|start|>assistant<|channel|>analysis<|message|>Simple sum.<|end|><|start|>assistant<|channel|>final"
                "<|message|>The sum of 2 and 2 is 4. The stars are far away, the sea is near.<|return|>")

# Noise measured on these fixtures: the merged F32 GGUF against transformers + PEFT, mean KL ~6e-7
# (Phi-3) to ~5e-6 (GPT-OSS); base F32 + F32 adapter against the merged F32 GGUF, ~1e-8 (Llama,
# Qwen2, Qwen2-MoE), 4e-8 (Mixtral), 6e-8 (Phi-3), 2e-7 (Gemma 3), ~7e-7 (GPT-OSS): llama.cpp adds
# B(Ax) in float32 instead of using the merged weights rounded to float32. A wrong fold is of order 1.
F32_MAX_MEAN_KL = 1e-4  # against PEFT: the bound the merged files are held to (test_families)
RUNTIME_MAX_MEAN_KL = 1e-5  # base + adapter against the merged file
F32_MIN_TOP1 = 0.95
# F16 / BF16 factors against F32 factors, each applied by llama.cpp on the F32 base: measured mean KL
# ~4e-6 (F16) and ~2e-4 (BF16) on the Llama fixture (~1e-5 and ~5e-4 on GPT-OSS)
F16_MAX_MEAN_KL = 5e-5
BF16_MAX_MEAN_KL = 2e-3


SPM = {"vocab_size": 512, "bos_token_id": 1, "eos_token_id": 2}  # a 512-token SentencePiece vocabulary's config
# folds (PEFT's scale times rank / alpha in the file): rsLoRA at r=4, alpha=8 gives 2
RS_V8 = 8 / np.sqrt(8) * 8 / 8  # rsLoRA with rank_pattern 8 (alpha 8): alpha/sqrt(8) over llama.cpp's alpha/8
RS_DOWN3 = 3 / np.sqrt(4) * 4 / 8  # alpha_pattern 3 at rank 4: 3/2 over llama.cpp's 8/4


def _kl(ref: np.ndarray, got: np.ndarray) -> float:
    return float(kl_divergence(ref, got).mean())


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny Llama (SentencePiece, GQA, untied) with rsLoRA + patterns on every linear layer and
    LoRA on the embedding and lm_head; merged F32, base F32 and F32 adapter from one build."""
    root = tmp_path_factory.mktemp("lora_llama")
    cfg = families.small_config("llama", vocab_size=512, bos_token_id=1, eos_token_id=2)
    base = families.make_model(root / "base", "llama", cfg,
                               tokenizer=lambda d: toks.sentencepiece_tokenizer(d, style="llama2"))
    adapter = synth.make_adapter(base, root / "adapter", target_modules=(*families.ALL_LINEAR, "embed_tokens", "lm_head"),
                                 target_parameters=(), r=4, lora_alpha=8, use_rslora=True, rank_pattern={"v_proj": 8},
                                 alpha_pattern={"down_proj": 3})
    res = build(base, adapter, root / "out", name="m", outtype="f32", lora_gguf="f32")
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(base))(TEXT, add_special_tokens=False)["input_ids"]
    out = root / "out"
    return {"family": "llama", "root": root, "base": base, "adapter": adapter, "cfg": cfg, "res": res, "ids": ids,
            "merged": out / "m-F32.gguf", "base_gguf": out / "m-base-F32.gguf", "lora": out / "m-LoRA-F32.gguf",
            "ref": synth.peft_logits(base, adapter, ids),
            "folds": {"blk.0.attn_q.weight": 2.0, "blk.0.attn_v.weight": RS_V8}}


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory, o200k_tokenizer_dir):
    """Tiny GPT-OSS (YaRN truncated, as llama.cpp applies it) with rsLoRA + patterns on attention and
    on the experts' gate_up_proj and down_proj (target_parameters)."""
    root = tmp_path_factory.mktemp("lora_gpt_oss")
    base = synth.make_base(root / "base", synth.gpt_oss_config(**synth.TINY, rope_truncate=True))
    adapter = synth.make_adapter(base, root / "adapter", use_rslora=True, rank_pattern={"v_proj": 8},
                                 alpha_pattern={"mlp.experts.down_proj": 4})
    res = build(base, adapter, root / "out", name="m", outtype="f32", lora_gguf="f32")
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(adapter))(HARMONY_TEXT, add_special_tokens=False)["input_ids"]
    out = root / "out"
    return {"family": "gpt_oss", "root": root, "base": base, "adapter": adapter, "res": res, "ids": ids,
            "merged": out / "m-F32.gguf", "base_gguf": out / "m-base-F32.gguf", "lora": out / "m-LoRA-F32.gguf",
            "ref": synth.peft_logits(base, adapter, ids),
            "folds": {"blk.0.attn_q.weight": 2.0, "blk.0.attn_v.weight": RS_V8}}


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    """Tiny Mixtral saved per expert (each expert's w1/w2/w3 stacked into one 3-D GGUF tensor, the
    llama q/k permute), with rsLoRA on attention and PEFT's target_parameters LoRA on the fused
    expert parameters (routed to each expert's tensors by the plan)."""
    root = tmp_path_factory.mktemp("lora_mixtral")
    cfg = families.small_config("mixtral", vocab_size=512, bos_token_id=1, eos_token_id=2)
    base = families.make_model(root / "base", "mixtral", cfg,
                               tokenizer=lambda d: toks.sentencepiece_tokenizer(d, style="mistral"))
    adapter = synth.make_adapter(base, root / "adapter", target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
                                 target_parameters=("mlp.experts.gate_up_proj", "mlp.experts.down_proj"), r=4,
                                 lora_alpha=8, use_rslora=True, alpha_pattern={"o_proj": 2})
    res = build(base, adapter, root / "out", name="m", outtype="f32", lora_gguf="f32")
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(base))(TEXT, add_special_tokens=False)["input_ids"]
    out = root / "out"
    return {"family": "mixtral", "root": root, "base": base, "adapter": adapter, "cfg": cfg, "res": res, "ids": ids,
            "merged": out / "m-F32.gguf", "base_gguf": out / "m-base-F32.gguf", "lora": out / "m-LoRA-F32.gguf",
            "ref": synth.peft_logits(base, adapter, ids),
            "folds": {"blk.0.attn_q.weight": 2.0, "blk.0.attn_output.weight": 2 / np.sqrt(4) * 4 / 8}}


def _family(tmp_path_factory, family: str, cfg: dict, tokenizer, *, targets, params=(), gen=None, fused=False,
            folds: dict | None = None, **lora) -> dict:
    """A tiny ``family`` model (transformers) and an rsLoRA adapter on it (PEFT, r=4, alpha=8, plus
    ``lora``'s patterns); merged F32, base F32 and F32 adapter from one build (of the base saved
    with transformers 5.x's fused experts when ``fused``). ``folds``: the folds the record must show."""
    root = tmp_path_factory.mktemp(f"lora_{family}")
    cfg = families.small_config(family, **cfg)
    base = families.make_model(root / "base", family, cfg, tokenizer=tokenizer, generation_config=gen)
    adapter = synth.make_adapter(base, root / "adapter", target_modules=targets, target_parameters=params, r=4,
                                 lora_alpha=8, use_rslora=True, **lora)
    conf = json.loads((adapter / "adapter_config.json").read_text())
    folds = {t: f(conf) if callable(f) else f for t, f in (folds or {}).items()}
    built = families.save_fused(base, root / "fused") if fused else base
    res = build(built, adapter, root / "out", name="m", outtype="f32", lora_gguf="f32")
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(base))(TEXT, add_special_tokens=False)["input_ids"]
    out = root / "out"
    return {"family": family, "root": root, "base": base, "built": built, "adapter": adapter, "cfg": cfg, "res": res,
            "ids": ids, "merged": out / "m-F32.gguf", "base_gguf": out / "m-base-F32.gguf",
            "lora": out / "m-LoRA-F32.gguf", "ref": synth.peft_logits(base, adapter, ids), "folds": folds}


def _rs_fold(param: str):
    """The fold of an rsLoRA term on ``param`` (the adapter's alpha/sqrt(r) over llama.cpp's
    lora_alpha/r), with the rank and alpha the saved adapter_config.json gives it by PEFT's pattern
    rule: PEFT from 0.22 saves a fused gate_up_proj with twice the rank and alpha (one r per half)."""
    def fold_of(conf: dict) -> float:
        def pattern(patterns: dict, default):
            return next((v for k, v in patterns.items() if re.match(rf"(.*\.)?({k})$", param)), default)
        r, alpha = pattern(conf.get("rank_pattern") or {}, conf["r"]), pattern(conf.get("alpha_pattern") or {},
                                                                                conf["lora_alpha"])
        return alpha / np.sqrt(r) / (conf["lora_alpha"] / r)
    return fold_of


def _spm(d):
    return toks.sentencepiece_tokenizer(d, style="llama2")


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    """Qwen2 (q/k/v biases, NEOX rope: no permute) with LoRA on every linear layer."""
    return _family(tmp_path_factory, "qwen2", SPM, _spm, targets=families.ALL_LINEAR, rank_pattern={"v_proj": 8},
                   alpha_pattern={"down_proj": 3},
                   folds={"blk.0.attn_q.weight": 2.0, "blk.0.attn_v.weight": RS_V8, "blk.0.ffn_down.weight": RS_DOWN3})


@pytest.fixture(scope="module")
def qwen2_moe(tmp_path_factory):
    """Qwen2-MoE saved with transformers 5.x's fused experts, LoRA on the fused experts (PEFT's
    target_parameters), on the shared expert's linear layers and its gate, and on attention."""
    return _family(tmp_path_factory, "qwen2_moe", SPM, _spm, targets=(*families.ALL_LINEAR, "shared_expert_gate"),
                   params=("mlp.experts.gate_up_proj", "mlp.experts.down_proj"), fused=True,
                   rank_pattern={"v_proj": 8},
                   folds={"blk.0.attn_q.weight": 2.0, "blk.0.attn_v.weight": RS_V8, "blk.0.ffn_up_shexp.weight": 2.0,
                          "blk.0.ffn_gate_inp_shexp.weight": 2.0,
                          "blk.0.ffn_gate_exps.weight": _rs_fold("model.layers.0.mlp.experts.gate_up_proj")})


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    """Gemma 3 (norms stored as w + 1, q/k norms, tied embeddings, sliding and full layers) with
    LoRA on every linear layer."""
    cfg = {"vocab_size": 704, "bos_token_id": 2, "pad_token_id": 0, "eos_token_id": [1, 106], "num_hidden_layers": 6}
    return _family(tmp_path_factory, "gemma3", cfg, lambda d: toks.gemma_tokenizer(d, generation=3),
                   targets=families.ALL_LINEAR, rank_pattern={"v_proj": 8}, alpha_pattern={"down_proj": 3},
                   folds={"blk.0.attn_q.weight": 2.0, "blk.0.attn_v.weight": RS_V8, "blk.0.ffn_down.weight": RS_DOWN3})


@pytest.fixture(scope="module")
def phi3(tmp_path_factory):
    """Phi-3 (q/k/v fused in qkv_proj, gate and up in gate_up_proj: llama.cpp keeps both fused) with
    LoRA on its four linear layers."""
    ids = toks.phi3_ids(512)
    end = ids["<|endoftext|>"]
    cfg = {"vocab_size": 512 + toks.PHI3_EXTRA_ROWS, "bos_token_id": 1, "eos_token_id": end, "pad_token_id": end,
           "sliding_window": 2047}
    gen = {"bos_token_id": 1, "eos_token_id": [end, ids["<|assistant|>"], ids["<|end|>"]], "pad_token_id": end}
    return _family(tmp_path_factory, "phi3", cfg, toks.phi3_tokenizer, targets=families.PHI3_LINEAR, gen=gen,
                   rank_pattern={"qkv_proj": 8}, alpha_pattern={"down_proj": 3},
                   folds={"blk.0.attn_qkv.weight": RS_V8, "blk.0.attn_output.weight": 2.0,
                          "blk.0.ffn_up.weight": 2.0, "blk.0.ffn_down.weight": RS_DOWN3})


@pytest.fixture(scope="module", params=["llama", "gpt_oss", "mixtral", "qwen2", "qwen2_moe", "gemma3", "phi3"])
def case(request):
    c = request.getfixturevalue(request.param)
    c["merged_logits"] = gguf_logits(c["merged"], c["ids"], n_threads=THREADS)
    return c


def _runtime(c, lora: Path | None = None) -> np.ndarray:
    return gguf_logits(c["base_gguf"], c["ids"], n_threads=THREADS, lora=lora or c["lora"])


def test_runtime_lora_equals_merged_gguf(case):
    """llama.cpp's logits of base F32 + F32 adapter equal the merged F32 GGUF's at the noise floor,
    and match transformers + PEFT as the merged file does; the base alone is far from both."""
    ours = _runtime(case)
    ref, merged = case["ref"], case["merged_logits"]
    assert _kl(merged, ours) < RUNTIME_MAX_MEAN_KL, _kl(merged, ours)
    assert _kl(ref, ours) < F32_MAX_MEAN_KL and top1_agreement(ref, ours) >= F32_MIN_TOP1, \
        (_kl(ref, ours), top1_agreement(ref, ours), _kl(ref, merged))
    base_only = gguf_logits(case["base_gguf"], case["ids"], n_threads=THREADS)
    assert _kl(merged, base_only) > 1000 * RUNTIME_MAX_MEAN_KL


def test_adapter_command_on_the_per_expert_checkpoint(qwen2_moe, tmp_path):
    """`lora2gguf adapter` on the MoE checkpoint as transformers saves it (one tensor per expert),
    with the adapter trained on transformers 5.x's fused experts, writes the file that the build
    of the fused checkpoint wrote: the same tensors, bytes and keys."""
    from lora2gguf.safetensors_io import Checkpoint

    names = set(Checkpoint.open(qwen2_moe["base"]).tensors)
    assert "model.layers.0.mlp.experts.0.gate_proj.weight" in names
    assert "model.layers.0.mlp.experts.gate_up_proj" in set(Checkpoint.open(qwen2_moe["built"]).tensors)
    res = export_adapter(qwen2_moe["base"], qwen2_moe["adapter"], tmp_path / "a", name="m", outtype="f32")
    assert_same_gguf(res.path, qwen2_moe["lora"])


def test_the_file_is_what_llama_cpp_checks(case):
    """Keys, one pair per adapted tensor, shapes as llama.cpp's loader checks them (a [in, r],
    b [r, out]; experts [in, r, E] / [r, out, E]; the token embedding flipped), and the record."""
    r = gguf.GGUFReader(case["lora"])
    kv = {k: f.contents() for k, f in r.fields.items()}
    assert kv["general.type"] == "adapter" and kv["adapter.type"] == "lora"
    assert kv["adapter.lora.alpha"] == 8.0
    from lora2gguf.gguf_header import read_header  # gguf-py's reader takes ~20 s on the o200k vocabulary

    header = read_header(case["base_gguf"])
    base = {n: t.shape for n, t in header.tensors.items()}
    assert kv["general.architecture"] == header.values["general.architecture"]
    shapes = {t.name: tuple(int(d) for d in t.shape) for t in r.tensors}
    targets = {n.rsplit(".lora_", 1)[0] for n in shapes}
    assert targets and all(t in base for t in targets)
    for t in targets:
        a, b, w = shapes[t + ".lora_a"], shapes[t + ".lora_b"], base[t]
        if t == "token_embd.weight":
            assert (b[1], a[1]) == (w[0], w[1]) and a[0] == b[0]
        else:
            assert a[0] == w[0] and b[1] == w[1] and a[1] == b[0], (t, a, b, w)
            assert len(a) == len(w) and (len(w) == 2 or a[2] == b[2] == w[2])
    rec = case["res"].record
    assert rec["lora"]["file"] == case["lora"].name and rec["lora"]["left_out"] == []
    assert set(rec["lora"]["tensors"]) == targets
    family = case["family"]
    if family in ("gpt_oss", "mixtral", "qwen2_moe"):  # the experts, stacked (gate and up from gate_up_proj)
        assert {"blk.0.ffn_gate_exps.weight", "blk.0.ffn_up_exps.weight", "blk.0.ffn_down_exps.weight"} <= targets
        assert len(shapes["blk.0.ffn_gate_exps.weight.lora_a"]) == 3
    if family == "llama":
        assert "token_embd.weight" in targets and "output.weight" in targets
    if family == "qwen2_moe":  # the shared expert and its gate (a 1-row matrix llama.cpp multiplies, with its LoRA)
        assert {"blk.0.ffn_gate_shexp.weight", "blk.0.ffn_up_shexp.weight", "blk.0.ffn_down_shexp.weight",
                "blk.0.ffn_gate_inp_shexp.weight"} <= targets
    if family == "phi3":  # fused in the GGUF too: B holds q, k and v's rows (gate and up's) as PEFT's B does
        assert {"blk.0.attn_qkv.weight", "blk.0.ffn_up.weight"} <= targets
        assert shapes["blk.0.attn_qkv.weight.lora_b"][1] == base["blk.0.attn_qkv.weight"][1]
    # nothing of a norm (Gemma stores them as w + 1) or a bias (Qwen's q/k/v) is in the file
    assert all(t.endswith(".weight") and "norm" not in t for t in targets)
    # rsLoRA: alpha/sqrt(r) = 8/2 = 4 where llama.cpp applies alpha/r = 2, so B is doubled; rank_pattern 8
    # (8/sqrt(8) * 8/8) and the patterned alphas get their own factors
    folds = {t: [x["fold"] for x in d["terms"]] for t, d in rec["lora"]["tensors"].items()}
    assert case["folds"]
    for t, want in case["folds"].items():
        assert folds[t] == [pytest.approx(want, rel=1e-15)], (t, folds[t], want)


def _rewrite(src: Path, dst: Path, fn) -> Path:
    """A copy of a GGUF whose tensors ``fn(name, array) -> array or None`` changes (same shapes)."""
    data = bytearray(src.read_bytes())
    reader = gguf.GGUFReader(src)
    arrays = {t.name: np.asarray(t.data).reshape(tuple(int(d) for d in reversed(t.shape))).copy() for t in reader.tensors}
    for t in reader.tensors:
        new = fn(t.name, arrays)
        if new is not None:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32
            data[t.data_offset:t.data_offset + t.n_bytes] = np.ascontiguousarray(new, np.float32).tobytes()
    dst.write_bytes(bytes(data))
    return dst


def test_wrong_folds_fail(case, tmp_path, reference_lora_converter):
    """The same comparison catches every way a fold can go wrong: (GPT-OSS, Mixtral, Qwen2-MoE) gate and
    up swapped; (Phi-3) the halves of the fused gate_up's B swapped; (Llama) B without the rotary
    permute, and the plain alpha/r scaling llama.cpp's own converter writes for an rsLoRA adapter
    with patterns; (Qwen2, Gemma 3) q/k rows of B permuted where their rope wants none."""
    merged = case["merged_logits"]
    broken: dict[str, Path] = {}
    if case["family"] == "phi3":  # the fused gate_up's B rows: gate's half and up's half swapped
        def halves(name, arrays):
            if name.endswith("ffn_up.weight.lora_b"):
                b = arrays[name]
                return np.concatenate([b[b.shape[0] // 2:], b[:b.shape[0] // 2]])
            return None
        broken["gate and up halves of B swapped"] = _rewrite(case["lora"], tmp_path / "halves.gguf", halves)
    elif case["family"] in ("gpt_oss", "mixtral", "qwen2_moe"):
        def swap(name, arrays):
            for a, b in (("gate", "up"), ("up", "gate")):
                if f"ffn_{a}_exps.weight.lora_b" in name:
                    return arrays[name.replace(f"ffn_{a}_exps", f"ffn_{b}_exps")]
            return None
        broken["gate and up swapped"] = _rewrite(case["lora"], tmp_path / "swapped.gguf", swap)
    else:
        cfg = case["cfg"]
        heads = {"attn_q": cfg["num_attention_heads"], "attn_k": cfg["num_key_value_heads"]}

        def unpermute(name, arrays):
            kind = name.split(".")[2]
            if kind in heads and name.endswith(".lora_b"):
                b, n = arrays[name], heads[kind]
                return b.reshape(n, b.shape[0] // n // 2, 2, -1).swapaxes(1, 2).reshape(b.shape)
            return None
        # Llama: B without the permute; the NEOX-rope families (Qwen2, Gemma 3: no permute): a permute applied
        broken["q/k rows of B permuted wrongly"] = _rewrite(case["lora"], tmp_path / "unpermuted.gguf", unpermute)
        if case["family"] == "llama":
            broken["plain alpha/r (llama.cpp's converter)"] = reference_lora_converter(
                case["adapter"], case["base"], tmp_path / "naive.gguf", "f32")
    for what, path in broken.items():
        kl = _kl(merged, _runtime(case, path))
        assert kl > 1000 * RUNTIME_MAX_MEAN_KL, (what, kl)


@pytest.fixture(scope="session")
def reference_lora_converter(reference_llama_cpp):
    """llama.cpp's convert_lora_to_gguf.py (from the llama-cpp-python source package) as a function."""
    script = reference_llama_cpp / "convert_lora_to_gguf.py"
    if not script.is_file():
        pytest.skip(f"{script} not found (scripts/setup.sh unpacks it)")

    def run(adapter: Path, base: Path, outfile: Path, outtype: str) -> Path:
        env = dict(os.environ, PYTHONPATH=str(reference_llama_cpp / "gguf-py"), NO_LOCAL_GGUF="")
        proc = subprocess.run([sys.executable, str(script), str(adapter), "--base", str(base), "--outfile",
                               str(outfile), "--outtype", outtype], env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return outfile
    return run


@pytest.mark.parametrize("outtype", ["f32", "q8_0"])
def test_same_file_as_llama_cpp_converter(llama, tmp_path, reference_lora_converter, outtype):
    """Where llama.cpp's converter can convert the adapter (plain LoRA on attention), our file's
    tensors (names, shapes, types, bytes: the q/k permute on B, Q8_0 with its F16 fallback for B's
    4-wide rows) and keys are its output's."""
    adapter = synth.make_adapter(llama["base"], tmp_path / "plain", target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
                                 target_parameters=(), r=4, lora_alpha=8)
    ref = reference_lora_converter(adapter, llama["base"], tmp_path / "ref.gguf", outtype)
    res = export_adapter(llama["base"], adapter, tmp_path / "ours", name="plain", outtype=outtype)
    assert res.path.name == f"plain-LoRA-{outtype.upper()}.gguf"
    assert_same_gguf(res.path, ref)
    if outtype == "q8_0":
        assert set(res.output.tensor_types) == {"Q8_0", "F16"}
        assert any("not whole Q8_0 blocks" in n for n in res.notes)


def test_f16_adapter_precision(llama, tmp_path):
    """Measured: F16 and BF16 factors against F32 ones, each applied by llama.cpp on the F32 base (its
    LoRA matmuls are float32 either way; only the factors' rounding differs)."""
    f32 = _runtime(llama)
    for outtype, bound in (("f16", F16_MAX_MEAN_KL), ("bf16", BF16_MAX_MEAN_KL)):
        res = export_adapter(llama["base"], llama["adapter"], tmp_path / outtype, name="m", outtype=outtype)
        assert set(res.output.tensor_types) == {outtype.upper()}
        kl = _kl(f32, _runtime(llama, res.path))
        assert 0 < kl < bound, (outtype, kl)


def test_fold_is_exact():
    """The fold that makes llama.cpp's alpha/rank give PEFT's scale: exactly 1 for plain LoRA, exact
    fractions for rsLoRA on a square rank and for patterns, PEFT's float64 scale otherwise."""
    def term(r, alpha, scale):
        return LoraTerm("w", "k", None, None, r, alpha, scale, "linear")  # type: ignore[arg-type]

    assert fold(term(16, 32, 2.0), 16, 32.0, False) == 1.0
    assert fold(term(6, 10, 10 / 6), 6, 10.0, False) == 1.0
    assert fold(term(4, 8, 4.0), 4, 8.0, True) == 2.0
    assert fold(term(8, 3, 3 / 8), 8, 16.0, False) == 3 / 16
    assert fold(term(2, 8, 8 / 2 ** 0.5), 2, 8.0, True) == pytest.approx(2 ** 0.5, rel=1e-15)
    assert fold(term(4, 8, 2.0), 12, 8.0, False) == 3.0  # two terms side by side: rank 12 in the file


def test_llama_cpp_refusing_a_pair_is_an_error(llama, gpt_oss):
    """llama_adapter_lora_init returns NULL (here: the architectures differ): an InputError with
    llama.cpp's reason, not a crash or a silently unadapted model."""
    with pytest.raises(InputError, match=r"could not apply the LoRA adapter .*arch"):
        open_gguf(llama["base_gguf"], n_ctx=256, n_threads=1, lora=gpt_oss["lora"])


# --------------------------------------------------------------------------- quantized bases, verify, report

ONE_PROMPT_SUITE = """
name: one
prompts:
  - id: math
    prompt: "What is 2+2?"
    checks:
      - {type: harmony, required: false}
"""


SHORT_TEXT = ("Can you explain how a lighthouse keeper kept the light burning?\n\nA keeper climbed the tower at dusk, "
              "trimmed the wick and filled the lamp with oil, then wound the clockwork that turned the lens.")


@pytest.fixture(scope="module")
def quantized(gpt_oss, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_quant")
    suite = root / "suite.yaml"
    suite.write_text(ONE_PROMPT_SUITE)
    # F32 rather than BF16 as the unquantized type: llama.cpp's BF16 matmuls are slow on CPUs without
    # native BF16, and verify runs every file
    res = build(gpt_oss["base"], gpt_oss["adapter"], root / "out", name="m", outtype="f32",
                quants=["Q8_0", "MXFP4_MOE"], lora_gguf="f16", verify=True,
                verify_options=dict(samples=0, max_tokens=8, n_threads=THREADS, suite=str(suite), text=SHORT_TEXT))
    return root / "out", res, suite


@pytest.mark.slow
def test_quantized_bases_load_generate_and_are_reported(quantized):
    out, res, _ = quantized
    rec = json.loads((out / "run.json").read_text())
    lo = rec["lora"]
    assert lo["file"] == "m-LoRA-F16.gguf"
    roles = {o["file"]: o.get("role") for o in rec["outputs"]}
    assert roles["m-LoRA-F16.gguf"] == "lora" and roles["m-base-Q8_0.gguf"] == roles["m-base-MXFP4_MOE.gguf"] == "lora-base"
    shas = {o["file"]: o["sha256"] for o in rec["outputs"]}
    from lora2gguf.gguf_out import sha256_file

    assert [p["file"] for p in lo["pairs"]] == ["m-base-F32.gguf", "m-base-Q8_0.gguf", "m-base-MXFP4_MOE.gguf"]
    for p in lo["pairs"]:  # the base each was checked against, by SHA-256
        assert p["sha256"] == shas[p["file"]] == sha256_file(out / p["file"])
    v = rec["verify"]
    pairs = {f["lora"]["base"]: f for f in v["files"] if f.get("lora")}
    assert set(pairs) == {"m-base-F32.gguf", "m-base-Q8_0.gguf", "m-base-MXFP4_MOE.gguf"}
    for f in pairs.values():
        assert f["lora"]["adapter_sha256"] == shas["m-LoRA-F16.gguf"]
        assert f["metrics"]["kl_mean"] < 1.0 and f["speed"]["tg_tokens_per_s"] > 0
        gens = v["runs"][f["file"]]
        assert gens and all(g["n_tokens"] > 0 for g in gens)  # it loads and generates
    merged = {f["file"]: f for f in v["files"] if not f.get("lora")}
    assert set(merged) == {"m-F32.gguf", "m-Q8_0.gguf", "m-MXFP4_MOE.gguf"}  # bases do not run alone
    md = (out / "REPORT.md").read_text()
    section = md.split("### Merged file or base + LoRA", 1)[1].split("##", 1)[0]
    for t in ("Q8_0", "MXFP4_MOE"):
        row = next(line for line in section.splitlines() if line.startswith(f"| {t} |"))
        assert f"`m-{t}.gguf`" in row and f"`m-base-{t}.gguf + m-LoRA-F16.gguf`" in row
        kl = pairs[f"m-base-{t}.gguf"]["metrics"]["kl_mean"]
        from lora2gguf.report.facts import num

        assert num(kl) in row and num(merged[f"m-{t}.gguf"]["metrics"]["kl_mean"]) in row
    assert shas["m-base-Q8_0.gguf"] in md
    mf = (out / "m-LoRA-F16-on-m-base-Q8_0.Modelfile").read_text().splitlines()
    assert "FROM ./m-base-Q8_0.gguf" in mf and "ADAPTER ./m-LoRA-F16.gguf" in mf
    assert not (out / "m-base-Q8_0.Modelfile").exists() and not (out / "m-LoRA-F16.Modelfile").exists()
    html = (out / "report.html").read_text()
    assert "lora-vs-merged" in html and "m-base-MXFP4_MOE.gguf + m-LoRA-F16.gguf" in html


def test_rerun_resumes_the_lora_stages(quantized, gpt_oss):
    out, first, suite = quantized
    res = build(gpt_oss["base"], gpt_oss["adapter"], out, name="m", outtype="f32", quants=["Q8_0", "MXFP4_MOE"],
                lora_gguf="f16")
    assert {"lora", "lora-base", "quantize:base:Q8_0", "quantize:base:MXFP4_MOE"} <= set(res.record["resumed"])
    assert res.record["lora"]["pairs"] == json.loads(json.dumps(first.record["lora"]["pairs"]))


@pytest.mark.slow
def test_adapter_command_pairs_with_a_given_base(quantized, gpt_oss, tmp_path, capsys):
    """`lora2gguf adapter` alone: the file, a record naming the base GGUF it was checked against,
    verify of the pair in llama.cpp against the fine-tune, a resumed rerun; the base GGUF of a
    build --lora-gguf is the one to pair with."""
    from lora2gguf import cli

    out, _, suite = quantized
    text_file = tmp_path / "text.txt"
    text_file.write_text(SHORT_TEXT)
    argv = ["adapter", str(gpt_oss["base"]), str(gpt_oss["adapter"]), "-o", str(tmp_path / "a"), "--name", "ft",
            "--base-gguf", str(out / "m-base-Q8_0.gguf")]
    assert cli.main(argv + ["--suite", str(suite), "--text", str(text_file), "--samples", "0", "--max-tokens", "8",
                            "--verify-threads", str(THREADS), "--no-speed"]) == 0
    text = capsys.readouterr().out
    assert "ft-LoRA-F16.gguf" in text and "checked against" in text and "m-base-Q8_0.gguf + ft-LoRA-F16.gguf" in text
    rec = json.loads((tmp_path / "a" / "run.json").read_text())
    assert rec["kind"] == "lora-adapter" and rec["outputs"][0]["file"] == "ft-LoRA-F16.gguf"
    (pair,) = rec["lora"]["pairs"]
    assert pair["path"] == str((out / "m-base-Q8_0.gguf").resolve()) and pair["type"] == "Q8_0"
    (checked,) = rec["verify"]["files"]
    assert checked["lora"]["base_sha256"] == pair["sha256"] and checked["metrics"]["kl_mean"] < 1.0
    assert (tmp_path / "a" / "ft-LoRA-F16-on-m-base-Q8_0.Modelfile").read_text().splitlines()[2] == \
        f"FROM {(out / 'm-base-Q8_0.gguf').resolve()}"
    argv.append("--no-verify")
    ours, built = (gguf.GGUFReader(p) for p in (tmp_path / "a" / "ft-LoRA-F16.gguf", out / "m-LoRA-F16.gguf"))
    assert [(t.name, t.data.tobytes()) for t in ours.tensors] == [(t.name, t.data.tobytes()) for t in built.tensors]
    assert cli.main(argv) == 0
    assert json.loads((tmp_path / "a" / "run.json").read_text())["resumed"] == ["lora"]


# --------------------------------------------------------------------------- what llama.cpp cannot apply


#: target_parameters on GPT-OSS's experts and on their biases (2-D: one matrix each to PEFT)
EXPERT_BIASES = ("mlp.experts.gate_up_proj", "mlp.experts.gate_up_proj_bias", "mlp.experts.down_proj",
                 "mlp.experts.down_proj_bias")


@pytest.fixture(scope="module")
def expert_bias_adapter(gpt_oss, tmp_path_factory):
    """PEFT's LoRA on GPT-OSS's q_proj, experts and expert biases."""
    return synth.make_adapter(gpt_oss["base"], tmp_path_factory.mktemp("expert_bias") / "ad", target_modules=("q_proj",),
                              target_parameters=EXPERT_BIASES, r=4, lora_alpha=8)


@pytest.mark.parametrize("kind", ["modules_to_save", "trainable_tokens", "tied_embedding", "dora", "lora_bias",
                                  "expert_biases"])
def test_what_llama_cpp_cannot_apply_stops_unless_accepted(request, llama, tmp_path, capsys, kind):
    """The adapter command stops with BlockedError naming the code and the tensor (and writes
    nothing); the CLI prints it as one error line; with --accept CODE the part is left out of the
    file and recorded in run.json's lora section, the rest of the adapter written."""
    base, adapter = llama["base"], None
    if kind == "tied_embedding":
        cfg = dict(llama["cfg"], tie_word_embeddings=True)
        base = families.make_model(tmp_path / "tied", "llama", cfg,
                                   tokenizer=lambda d: toks.sentencepiece_tokenizer(d, style="llama2"))
        opts, code, tensor = dict(target_modules=("q_proj", "embed_tokens")), "LORA_TIED_EMBEDDING", "token_embd.weight"
    elif kind == "dora":
        opts, code, tensor = dict(target_modules=("q_proj",), use_dora=True), "LORA_DORA", "layers.0.self_attn.q_proj"
    elif kind == "modules_to_save":
        opts, code, tensor = dict(target_modules=("q_proj",), modules_to_save=("lm_head",)), "LORA_FULL_WEIGHTS", \
            "lm_head.weight"
    elif kind == "lora_bias":  # Qwen2's q/k/v have biases: PEFT's lora_B gets one
        base = request.getfixturevalue("qwen2")["base"]
        opts, code = dict(target_modules=("q_proj", "k_proj", "v_proj"), lora_bias=True), "LORA_BIAS"
        tensor = "base_model.model.model.layers.0.self_attn.k_proj.lora_B.bias"
    elif kind == "expert_biases":  # llama.cpp adds the expert biases as they are: no LoRA
        base = request.getfixturevalue("gpt_oss")["base"]
        adapter, opts, code = request.getfixturevalue("expert_bias_adapter"), {}, "LORA_NOT_APPLIED"
        tensor = "blk.0.ffn_gate_exps.bias [4, 64]"
    else:
        opts, code = dict(target_modules=("q_proj",), trainable_token_indices=[3, 5]), "LORA_TOKEN_ROWS"
        tensor = "model.embed_tokens.weight: rows [3, 5]"
    if adapter is None:
        adapter = synth.make_adapter(base, tmp_path / "ad", target_parameters=(), r=4, lora_alpha=8, **opts)
    out = tmp_path / "out"
    with pytest.raises(BlockedError, match=rf"(?s)\[{code}\].*--accept {code}") as info:
        export_adapter(base, adapter, out)
    assert tensor in str(info.value), str(info.value)
    assert not out.exists() or not any(out.iterdir())
    from lora2gguf import cli

    capsys.readouterr()
    assert cli.main(["adapter", str(base), str(adapter), "-o", str(out)]) == BlockedError.exit_code
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err and code in err
    res = export_adapter(base, adapter, out, accept=[code], verify=False)
    left = res.record["lora"]["left_out"]
    assert left and all(x["code"] == code and x["accepted"] is True for x in left)
    assert any(tensor in x["what"] for x in left)
    assert json.loads((out / "run.json").read_text())["lora"]["left_out"] == left
    assert "blk.0.attn_q.weight" in res.record["lora"]["tensors"]
    assert code in (res.output.note or "")
    written = {t.name for t in gguf.GGUFReader(res.path).tensors}
    assert not any(".bias." in n or n.startswith(("token_embd.", "output.")) for n in written), written
    if kind == "expert_biases":  # the experts' own LoRA is written, the biases' left out (both layers, 3 each)
        assert {"blk.1.ffn_gate_exps.weight.lora_a", "blk.1.ffn_down_exps.weight.lora_b"} <= written
        assert sorted(x["what"].split()[0] for x in left) == sorted(
            f"blk.{i}.ffn_{p}_exps.bias" for i in range(2) for p in ("gate", "up", "down"))


def test_lora_on_the_expert_biases_merges_like_peft(gpt_oss, expert_bias_adapter, tmp_path):
    """PEFT's LoRA on GPT-OSS's expert biases (gate_up_proj_bias de-interleaved as gate_up_proj is)
    merges: llama.cpp's logits of the merged F32 GGUF equal transformers + PEFT's; the adapter file
    with the biases left out (LORA_NOT_APPLIED accepted) is measurably another model."""
    build(gpt_oss["base"], expert_bias_adapter, tmp_path / "out", name="m", outtype="f32", lora_gguf="f32",
          accept=["LORA_NOT_APPLIED"])
    ids = gpt_oss["ids"]
    ref = synth.peft_logits(gpt_oss["base"], expert_bias_adapter, ids)
    merged = gguf_logits(tmp_path / "out" / "m-F32.gguf", ids, n_threads=THREADS)
    assert _kl(ref, merged) < F32_MAX_MEAN_KL and top1_agreement(ref, merged) >= F32_MIN_TOP1, _kl(ref, merged)
    without = gguf_logits(tmp_path / "out" / "m-base-F32.gguf", ids, n_threads=THREADS,
                          lora=tmp_path / "out" / "m-LoRA-F32.gguf")
    assert _kl(merged, without) > 100 * RUNTIME_MAX_MEAN_KL, _kl(merged, without)
