"""Tiny random models of every dense family, made offline with transformers, for tests and benchmarks.

:func:`make_model` builds a ``LlamaForCausalLM`` / ``MistralForCausalLM`` / ``Qwen2ForCausalLM``
/ ``Qwen3ForCausalLM`` / ``Gemma2ForCausalLM`` / ``Gemma3ForCausalLM`` /
``Gemma3ForConditionalGeneration`` / ``Phi3ForCausalLM`` (or another registered HF class) from a small config, sets every weight to
seeded values from numpy (a "peaked" init, as :mod:`lora2gguf.synth` documents: logits spread
over the vocabulary, so comparing next-token distributions means something), and saves it with
``save_pretrained`` in bfloat16, as a hub checkpoint is laid out, with tokenizer files written
by ``tokenizer(dest)``. Adapters come from :func:`lora2gguf.synth.make_adapter` (PEFT itself).

Needs torch and transformers (the ``reference`` extra); nothing here is used by the converter.
"""

from __future__ import annotations

import math
import zlib
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from ..errors import InputError

_GEMMA_INIT = {"norm_mean": 0.0, "embed_std": 0.5, "post_norm_mean": 3.0}

#: the HF class and config class of each family (and how its peaked init differs)
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {"cls": "LlamaForCausalLM", "config": "LlamaConfig", "model_type": "llama"},
    "mistral": {"cls": "MistralForCausalLM", "config": "MistralConfig", "model_type": "mistral"},
    "qwen2": {"cls": "Qwen2ForCausalLM", "config": "Qwen2Config", "model_type": "qwen2"},
    "qwen3": {"cls": "Qwen3ForCausalLM", "config": "Qwen3Config", "model_type": "qwen3"},
    "qwen2_moe": {"cls": "Qwen2MoeForCausalLM", "config": "Qwen2MoeConfig", "model_type": "qwen2_moe"},
    "qwen3_moe": {"cls": "Qwen3MoeForCausalLM", "config": "Qwen3MoeConfig", "model_type": "qwen3_moe"},
    "mixtral": {"cls": "MixtralForCausalLM", "config": "MixtralConfig", "model_type": "mixtral"},
    # Gemma's RMSNorm computes x * (1 + w): its norm weights are centred on 0, not 1. Its tied
    # embedding is scaled by sqrt(hidden) on input: with std 1 the input would swamp every layer
    # (the model would predict its input token with certainty), so the embedding is smaller and the
    # post-attention / post-feedforward norms scale each layer's output up (measured: mean top-1
    # probability ~0.3-0.5, the adapter moves the logits by a mean KL of 4-7)
    "gemma2": {"cls": "Gemma2ForCausalLM", "config": "Gemma2Config", "model_type": "gemma2", **_GEMMA_INIT},
    "gemma3": {"cls": "Gemma3ForCausalLM", "config": "Gemma3TextConfig", "model_type": "gemma3_text",
               **_GEMMA_INIT},
    # the text model of a vision-language Gemma 3 (a tiny SigLIP tower beside it)
    "gemma3-vlm": {"cls": "Gemma3ForConditionalGeneration", "config": "Gemma3Config", "model_type": "gemma3",
                   **_GEMMA_INIT},
    "phi3": {"cls": "Phi3ForCausalLM", "config": "Phi3Config", "model_type": "phi3"},
}

#: the MoE families' expert settings for small models: several experts, top-k 2
MOE = {
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48),
    # as the released Qwen3-MoE models: top-k weights renormalized (llama.cpp's qwen3moe always does)
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
}

#: every Linear layer of a dense decoder block: what "all linear modules" targets
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: Phi-3's: q/k/v and gate/up fused
PHI3_LINEAR = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
#: the vision tower of :func:`small_config`'s ``gemma3-vlm`` (SigLIP: 28x28 images, 14x14 patches)
TINY_SIGLIP = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
               "image_size": 28, "patch_size": 14}
LOGIT_STD = 6.0


def small_config(family: str, *, vocab_size: int, hidden_size: int = 64, num_hidden_layers: int = 3,
                 num_attention_heads: int = 4, num_key_value_heads: int = 2, intermediate_size: int = 96,
                 **extra: Any) -> dict[str, Any]:
    """Keyword arguments for the family's config class: GQA (kv heads != heads) so the q/k permute
    is exercised, several layers, and whatever ``extra`` adds (rope_scaling, tie_word_embeddings...)."""
    if family not in FAMILIES:
        raise InputError(f"family {family!r}: one of {sorted(FAMILIES)}")
    cfg = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
               num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads,
               intermediate_size=intermediate_size, max_position_embeddings=4096)
    if family in ("qwen3", "qwen3_moe", "gemma2", "gemma3", "gemma3-vlm"):
        cfg["head_dim"] = hidden_size // num_attention_heads  # Qwen3's default is 128, Gemma's 256
    if family.startswith("gemma"):
        # llama.cpp scales Gemma's queries by 1/sqrt(head_dim) (hidden / heads for 27B shapes)
        cfg["query_pre_attn_scalar"] = cfg["head_dim"]
        cfg["sliding_window"] = 16
    cfg.update(MOE.get(family, {}))
    cfg.update(extra)
    if family == "gemma3-vlm":
        top = {k: cfg.pop(k) for k in ("tie_word_embeddings", "mm_tokens_per_image", "boi_token_index",
                                        "eoi_token_index", "image_token_index") if k in cfg}
        return {"text_config": cfg, "vision_config": dict(TINY_SIGLIP), "mm_tokens_per_image": 4, **top}
    return cfg


def _init(name: str, shape: tuple[int, ...], cfg: Mapping[str, Any],
          spec: Mapping[str, Any] | None = None) -> tuple[float, float]:
    """(mean, std) of the peaked init for one parameter (``cfg``: the text model's config;
    ``spec``: the family's entry of :data:`FAMILIES`)."""
    spec = spec or {}
    h = cfg["hidden_size"]
    heads = cfg["num_attention_heads"]
    hd = cfg.get("head_dim") or h // heads
    if name.endswith(("post_attention_layernorm.weight", "post_feedforward_layernorm.weight")) \
            and "post_norm_mean" in spec:
        return spec["post_norm_mean"], 0.1
    if name.endswith("norm.weight"):
        return spec.get("norm_mean", 1.0), 0.1
    if "vision_tower." in name or "multi_modal_projector." in name:
        return (1.0, 0.1) if name.endswith(("norm1.weight", "norm2.weight")) else (0.0, 1.0 / math.sqrt(shape[-1]))
    if name.endswith(".bias"):
        return 0.0, 0.1
    if name.endswith("embed_tokens.weight"):
        return 0.0, spec.get("embed_std", 1.0)
    if name == "lm_head.weight":
        return 0.0, LOGIT_STD / math.sqrt(h)
    if name.endswith("o_proj.weight"):
        return 0.0, 1.0 / math.sqrt(heads * hd)
    if name.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight", "shared_expert_gate.weight")):
        return 0.0, 2.0 / math.sqrt(h)  # routers: distinct expert choices per token
    if name.endswith(("down_proj.weight", ".w2.weight")):
        inner = cfg.get("moe_intermediate_size") if ".experts." in name else None
        return 0.0, 1.0 / math.sqrt(inner or cfg["intermediate_size"])
    return 0.0, 1.0 / math.sqrt(h)


def make_model(dest: str | Path, family: str, config: Mapping[str, Any], *, seed: int = 0,
               tokenizer: Callable[[Path], Any] | None = None,
               generation_config: Mapping[str, Any] | None = None) -> Path:
    """A tiny random ``family`` model saved in ``dest`` (bfloat16 safetensors, config.json,
    generation_config.json: the one save_pretrained writes, or ``generation_config`` as the model's
    repository has it) with the tokenizer files ``tokenizer(dest)`` writes."""
    import torch
    import transformers

    spec = FAMILIES[family]
    cfg = getattr(transformers, spec["config"])(**config)
    torch.manual_seed(seed)
    model = getattr(transformers, spec["cls"])(cfg)
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    text = config.get("text_config", config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            mean, std = _init(name, tuple(p.shape), text, spec)
            rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
            values = rng.standard_normal(tuple(p.shape)).astype(np.float32) * np.float32(std) + np.float32(mean)
            p.copy_(torch.from_numpy(values))
        if tied:
            model.tie_weights()
    model = model.to(torch.bfloat16)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(dest))
    if generation_config is not None:
        import json

        (dest / "generation_config.json").write_text(json.dumps(dict(generation_config), indent=2))
    if tokenizer is not None:
        tokenizer(dest)
    return dest


# --------------------------------------------------------------------------- large bases without torch


def tensor_specs(family: str, config: Mapping[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """The tensors a ``family`` checkpoint holds for ``config`` (HF names and shapes): the
    Llama-layout families (llama, mistral, qwen2, qwen3) and Qwen3-MoE (experts per expert, as
    transformers saves them)."""
    if family not in ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe"):
        raise InputError(f"tensor_specs: family {family!r} is not one of the Llama-layout families; make its "
                         "base with make_model")
    h, n_layers = config["hidden_size"], config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    hd = config.get("head_dim") or h // heads
    inter, vocab = config["intermediate_size"], config["vocab_size"]
    bias = family == "qwen2"
    specs: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, h))]
    for i in range(n_layers):
        p = f"model.layers.{i}."
        specs += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
        for name, rows in (("q_proj", heads * hd), ("k_proj", kv * hd), ("v_proj", kv * hd)):
            specs.append((p + f"self_attn.{name}.weight", (rows, h)))
            if bias:
                specs.append((p + f"self_attn.{name}.bias", (rows,)))
        specs.append((p + "self_attn.o_proj.weight", (h, heads * hd)))
        if family in ("qwen3", "qwen3_moe"):
            specs += [(p + "self_attn.q_norm.weight", (hd,)), (p + "self_attn.k_norm.weight", (hd,))]
        if family == "qwen3_moe":
            n_exp, moe = config["num_experts"], config["moe_intermediate_size"]
            specs.append((p + "mlp.gate.weight", (n_exp, h)))
            for e in range(n_exp):
                q = p + f"mlp.experts.{e}."
                specs += [(q + "gate_proj.weight", (moe, h)), (q + "up_proj.weight", (moe, h)),
                          (q + "down_proj.weight", (h, moe))]
            continue
        specs += [(p + "mlp.gate_proj.weight", (inter, h)), (p + "mlp.up_proj.weight", (inter, h)),
                  (p + "mlp.down_proj.weight", (h, inter))]
    specs.append(("model.norm.weight", (h,)))
    if not config.get("tie_word_embeddings"):
        specs.append(("lm_head.weight", (vocab, h)))
    return specs


def make_base_numpy(dest: str | Path, family: str, config: Mapping[str, Any], *, seed: int = 0,
                    tokenizer: Callable[[Path], Any] | None = None, max_shard_bytes: int = 5_000_000_000) -> Path:
    """A ``family`` base of any width written by numpy, tensor by tensor in chunks (memory bounded
    by a chunk): config.json as the family's config class saves it, bf16 shards and their index,
    peaked values (:func:`_init`); for benchmarks at real width, where torch would need the whole
    model in memory."""
    import json

    import transformers

    from .. import synth

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    spec = FAMILIES[family]
    cfg = getattr(transformers, spec["config"])(**config).to_dict()
    cfg["architectures"] = [spec["cls"]]
    cfg["dtype"] = "bfloat16"
    (dest / "config.json").write_text(json.dumps(cfg, indent=2))
    gen = {k: cfg.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id") if cfg.get(k) is not None}
    (dest / "generation_config.json").write_text(json.dumps(gen, indent=2))
    specs = tensor_specs(family, config)
    shapes = dict(specs)

    def chunks(name: str):
        mean, std = _init(name, shapes[name], config)
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        n = math.prod(shapes[name])
        step = 1 << 22
        for i in range(0, n, step):
            k = min(step, n - i)
            x = rng.random(k, dtype=np.float32)  # triangular (sum of two uniforms), std 1/sqrt(6)
            x += rng.random(k, dtype=np.float32)
            x -= np.float32(1.0)
            x *= np.float32(std * math.sqrt(6.0))
            x += np.float32(mean)
            yield synth.bf16_bits(x)

    shards = synth._plan_shards(specs, 2, max_shard_bytes)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        total += synth.write_safetensors_streamed(dest / fname, [(n, s, "bfloat16") for n, s in shard], chunks)
        weight_map.update({n: fname for n, _ in shard})
    (dest / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    if tokenizer is not None:
        tokenizer(dest)
    return dest


def make_adapter_numpy(base: str | Path, dest: str | Path, family: str, *, r: int = 16, lora_alpha: float = 32,
                       target_modules=ALL_LINEAR, seed: int = 0, init_scale: float = 0.5) -> Path:
    """A PEFT LoRA adapter on ``target_modules`` of every layer, written by numpy in PEFT's layout
    (adapter_config.json from PEFT's own LoraConfig), for bases too large to load into torch."""
    import json

    from peft import LoraConfig

    from .. import synth

    base, dest = Path(base), Path(dest)
    cfg = json.loads((base / "config.json").read_text())
    shapes = dict(tensor_specs(family, cfg))
    arrays = {}
    scale = lora_alpha / r
    for name, shape in shapes.items():
        module = name[: -len(".weight")]
        if not name.endswith(".weight") or module.rsplit(".", 1)[-1] not in target_modules or len(shape) != 2:
            continue
        a, b = synth._lora_values(synth._rng(seed, module), (r, shape[1]), (shape[0], r), r, scale, init_scale)
        arrays[f"base_model.model.{module}.lora_A.weight"] = a
        arrays[f"base_model.model.{module}.lora_B.weight"] = b
    dest.mkdir(parents=True, exist_ok=True)
    synth.write_safetensors_streamed(dest / "adapter_model.safetensors",
                                     [(k, v.shape, "float32") for k, v in arrays.items()],
                                     lambda k: iter([arrays[k].reshape(-1)]))
    lc = LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=list(target_modules), lora_dropout=0.0,
                    bias="none", inference_mode=True, base_model_name_or_path=str(base)).to_dict()
    lc = {k: (list(v) if isinstance(v, set) else v) for k, v in lc.items()}
    (dest / "adapter_config.json").write_text(json.dumps(lc, indent=2, sort_keys=True, default=str))
    for f in base.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            (dest / f.name).write_bytes(f.read_bytes())
    return dest


def save_fused(base: str | Path, dest: str | Path) -> Path:
    """A copy of a per-expert MoE checkpoint with its experts as transformers 5.x holds them in
    memory (``mlp.experts.gate_up_proj`` / ``down_proj``), the other checkpoint layout hubs carry."""
    import shutil

    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    base, dest = Path(base), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.bfloat16)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(state, str(dest / "model.safetensors"), metadata={"format": "pt"})
    for f in base.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copy(f, dest / f.name)
    return dest


def make_per_expert_adapter(base: str | Path, dest: str | Path, *, r: int = 4, lora_alpha: float = 8,
                            experts_pattern: str = "mlp.experts.{e}.{p}", parts=("gate_proj", "up_proj", "down_proj"),
                            attention=("q_proj", "k_proj", "v_proj", "o_proj"), seed: int = 0,
                            init_scale: float = 0.5) -> Path:
    """An adapter as PEFT saves it for a transformers 4.x MoE model: one Linear LoRA pair per
    expert (``experts.{e}.gate_proj.lora_A.weight`` ...) and on attention, written by numpy (PEFT
    itself loads it onto transformers 5.x's fused experts, which makes it the reference)."""
    import json

    from peft import LoraConfig

    from .. import synth
    from ..safetensors_io import Checkpoint

    base, dest = Path(base), Path(dest)
    shapes = {n: i.shape for n, i in Checkpoint.open(base).tensors.items()}
    scale = lora_alpha / r
    arrays = {}
    wanted = set(parts) | set(attention)
    for name, shape in sorted(shapes.items()):
        module = name[: -len(".weight")]
        if not name.endswith(".weight") or len(shape) != 2 or module.rsplit(".", 1)[-1] not in wanted:
            continue
        if module.rsplit(".", 1)[-1] in parts and ".experts." not in module:
            continue  # a dense or shared-expert MLP: not this adapter's
        a, b = synth._lora_values(synth._rng(seed, module), (r, shape[1]), (shape[0], r), r, scale, init_scale)
        arrays[f"base_model.model.{module}.lora_A.weight"] = a
        arrays[f"base_model.model.{module}.lora_B.weight"] = b
    dest.mkdir(parents=True, exist_ok=True)
    synth.write_safetensors_streamed(dest / "adapter_model.safetensors",
                                     [(k, v.shape, "float32") for k, v in arrays.items()],
                                     lambda k: iter([arrays[k].reshape(-1)]))
    lc = LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=sorted(wanted), lora_dropout=0.0, bias="none",
                    inference_mode=True, base_model_name_or_path=str(base)).to_dict()
    lc = {k: (sorted(v) if isinstance(v, set) else v) for k, v in lc.items()}
    (dest / "adapter_config.json").write_text(json.dumps(lc, indent=2, sort_keys=True, default=str))
    for f in base.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            (dest / f.name).write_bytes(f.read_bytes())
    return dest
