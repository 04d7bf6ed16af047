"""Gemma 2 (`Gemma2ForCausalLM`) and Gemma 3 (`Gemma3ForCausalLM`, and the text model of
`Gemma3ForConditionalGeneration`).

Facts (llama.cpp's converter, conversion/gemma.py, and transformers' Gemma modules):
- Gemma's RMSNorm computes ``x * (1 + w)``; llama.cpp's multiplies by its weight, so the
  converter stores every tensor whose name ends with ``norm.weight`` as ``w + 1`` (F32): per
  block ``input_layernorm`` (attn_norm), ``post_attention_layernorm`` (post_attention_norm),
  ``pre_feedforward_layernorm`` (ffn_norm), ``post_feedforward_layernorm`` (post_ffw_norm),
  Gemma 3's ``self_attn.q_norm`` / ``k_norm`` (attn_q_norm / attn_k_norm), and the final
  ``norm`` (output_norm). The one is added after the merge, before the one rounding
  (layout.AddOne); a LoRA delta on a norm (modules_to_save) is merged first.
- NEOX rope (no q/k permute); the embedding scale sqrt(hidden_size) and the GELU-tanh MLP are
  llama.cpp's own code, not in the weights. Embeddings are tied.
- Gemma 2: ``lm_head.weight`` is dropped (llama.cpp's gemma2 has no output tensor); its
  converter writes its keys itself, no rope keys among them: context, widths, heads, key/value
  length (head_dim), RMS eps, ``attn_logit_softcapping``, ``final_logit_softcapping`` and the
  sliding window (llama.cpp slides every other layer, the first included, as transformers'
  default ``layer_types`` do).
- Gemma 3: the common keys, the full-attention rope base (``rope.freq_base``) and the local one
  of the sliding layers (``rope.freq_base_swa``, transformers' ``rope_local_base_freq``), the
  final softcapping when the config has one (it has no attention softcapping), the sliding
  window (llama.cpp slides five layers of every six, as transformers' default ``layer_types``),
  an ``lm_head.weight`` kept when the checkpoint holds one. The converter trims the embedding
  rows to the tokenizer's tokens; with a tokenizer.model that list is ``vocab_size`` long
  (padded with ``[PAD{i}]``), so every row stays.
- Gemma3ForConditionalGeneration: the text model's tensors are under ``language_model.model.``
  in the checkpoint (the hub's, and what transformers 5 saves) and under ``model.language_model.``
  in the loaded model, so in an adapter trained with transformers >= 4.52; the vision tower and
  the projector go to llama.cpp's separate mmproj file, not into this GGUF (an adapter's changes
  to them are noted); the text config is ``text_config``.
- tokenizer: SentencePiece ``tokenizer.model`` (no dummy prefix: ``add_space_prefix`` false);
  chat template ``<start_of_turn>user`` ... ``<end_of_turn>``, the assistant's role named
  ``model``.
"""

from __future__ import annotations

from typing import Any, Mapping

import gguf

from ..errors import UnsupportedError
from ..layout import AddOne
from ..vocab import VocabOptions
from . import NOT_WEIGHTS, Family, Rule, register

_PLUS_ONE = AddOne()
#: every RMSNorm of a Gemma block and the final one: stored as w + 1
NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight", "pre_feedforward_layernorm.weight",
         "post_feedforward_layernorm.weight", "self_attn.q_norm.weight", "self_attn.k_norm.weight", "norm.weight")
RULES = tuple(Rule(suffix, _PLUS_ONE) for suffix in NORMS)

#: the converter reads tokenizer.model; a tokenizer.json converted from it alone is refused
#: with the fix (lora2gguf.vocab's llama_hf message)
GEMMA_VOCAB = VocabOptions(kinds=("sentencepiece", "llama_hf"), space_prefix=False)


def _gemma2_hparams(config: Mapping[str, Any], put) -> None:
    """Gemma 2's keys, as its converter writes them (none of the common ones)."""
    put("add_context_length", config.get("max_position_embeddings"), "max_position_embeddings")
    put("add_embedding_length", config.get("hidden_size"), "hidden_size")
    put("add_block_count", config.get("num_hidden_layers"), "num_hidden_layers")
    put("add_feed_forward_length", config.get("intermediate_size"), "intermediate_size")
    put("add_head_count", config.get("num_attention_heads"), "num_attention_heads")
    kv = config.get("num_key_value_heads")
    put("add_head_count_kv", config.get("num_attention_heads") if kv is None else kv, "num_key_value_heads")
    put("add_layer_norm_rms_eps", config.get("rms_norm_eps"), "rms_norm_eps")
    put("add_key_length", config.get("head_dim"), "head_dim")
    put("add_value_length", config.get("head_dim"), "head_dim")
    put("add_attn_logit_softcapping", config.get("attn_logit_softcapping"), "attn_logit_softcapping")
    put("add_final_logit_softcapping", config.get("final_logit_softcapping"), "final_logit_softcapping")
    put("add_sliding_window", config.get("sliding_window"), "sliding_window")
    _check_layer_types(config, 2)
    _check_query_scale(config)


def _gemma3_hparams(config: Mapping[str, Any], put) -> None:
    """Gemma 3's keys beyond the common ones (the rope bases are common: hparams.py)."""
    if config.get("attn_logit_softcapping") is not None:
        raise UnsupportedError(
            f"config.json: attn_logit_softcapping is {config['attn_logit_softcapping']!r}, but Gemma 3 has no "
            "attention softcapping (llama.cpp's gemma3 does not apply one): this is not a Gemma 3 config")
    if config.get("final_logit_softcapping"):
        put("add_final_logit_softcapping", config["final_logit_softcapping"], "final_logit_softcapping")
    if config.get("sliding_window_pattern") != 1:
        put("add_sliding_window", config.get("sliding_window"), "sliding_window")
        _check_layer_types(config, 6)
    _check_query_scale(config)


def _check_query_scale(config: Mapping[str, Any]) -> None:
    """Gemma scales queries by query_pre_attn_scalar ** -0.5; the GGUF has no key for it, and
    llama.cpp scales by head_dim ** -0.5 (hidden_size / heads for the 27B models, whose
    query_pre_attn_scalar that is). Any other value would make llama.cpp compute another model."""
    q, hd = config.get("query_pre_attn_scalar"), config.get("head_dim")
    h, n = config.get("hidden_size"), config.get("num_attention_heads")
    allowed = {hd, h // n if isinstance(h, int) and isinstance(n, int) and n else None} - {None}
    if q is not None and allowed and q not in allowed:
        raise UnsupportedError(
            f"config.json: query_pre_attn_scalar is {q!r}, but llama.cpp scales Gemma's attention by head_dim "
            f"({hd}) or hidden_size / num_attention_heads and the GGUF has no key for another value: the GGUF "
            "would not compute what the model does")


_NTH = {2: "second", 6: "sixth"}


def _check_layer_types(config: Mapping[str, Any], period: int) -> None:
    """llama.cpp's Gemma graphs slide all layers but every ``period``-th (its fixed pattern, not
    read from the GGUF); a config whose ``layer_types`` say otherwise would run differently there."""
    types = config.get("layer_types")
    if not isinstance(types, list) or not types:
        pattern = config.get("sliding_window_pattern")  # a 4.x config: the pattern's period
        if isinstance(pattern, int) and pattern != period:
            raise UnsupportedError(
                f"config.json: sliding_window_pattern is {pattern}, but llama.cpp's Gemma graph makes every "
                f"{_NTH[period]} layer full attention (the GGUF has no key for another pattern): the GGUF would not "
                "compute what the model does")
        return
    fixed = ["full_attention" if (i + 1) % period == 0 else "sliding_attention" for i in range(len(types))]
    if list(types) != fixed:
        raise UnsupportedError(
            f"config.json: layer_types {types} differ from the pattern llama.cpp's Gemma graph uses (every "
            f"{_NTH[period]} layer full attention, the others sliding): the GGUF would not "
            "compute what the model does")


def _gemma3_rope(config: Mapping[str, Any]) -> dict[str, Any]:
    """transformers 5's ``rope_parameters`` of a Gemma 3 config saved by transformers 4.x
    (``rope_theta``, ``rope_scaling`` for the full-attention layers, ``rope_local_base_freq`` for
    the sliding ones), as AutoConfig makes them for llama.cpp's converter."""
    full = dict(config.get("rope_scaling") or {})
    if "type" in full and "rope_type" not in full:
        full["rope_type"] = full.pop("type")
    full.setdefault("rope_type", "default")
    full["rope_theta"] = config.get("rope_theta", 1_000_000.0)
    local = {"rope_type": "default", "rope_theta": config.get("rope_local_base_freq", 10_000.0)}
    return {"sliding_attention": local, "full_attention": full}


GEMMA2 = register(
    Family(
        name="gemma2",
        hf_architectures=("Gemma2ForCausalLM",),
        model_types=("gemma2",),
        gguf_arch=gguf.MODEL_ARCH.GEMMA2,
        rules=RULES,
        # Gemma2Config's defaults (transformers 5.x)
        config_defaults={"max_position_embeddings": 8192, "rms_norm_eps": 1e-06, "vocab_size": 256000,
                         "hidden_size": 2304, "intermediate_size": 9216, "num_attention_heads": 8,
                         "num_key_value_heads": 4, "num_hidden_layers": 26, "head_dim": 256,
                         "query_pre_attn_scalar": 256, "sliding_window": 4096, "final_logit_softcapping": 30.0,
                         "attn_logit_softcapping": 50.0, "tie_word_embeddings": True},
        hparams=_gemma2_hparams,
        common_hparams=False,
        skip_suffixes=(*NOT_WEIGHTS, "lm_head.weight"),
        vocab_options=GEMMA_VOCAB,
        checked="SentencePiece tokenizer (Gemma's specials, no dummy prefix) and chat template; norms stored "
                "w + 1; attention and final softcapping; sliding window; parity with llama.cpp's converter; logits "
                "vs transformers + PEFT (a missing + 1 fails)",
    )
)

GEMMA3 = register(
    Family(
        name="gemma3",
        hf_architectures=("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration"),
        model_types=("gemma3_text", "gemma3"),
        gguf_arch=gguf.MODEL_ARCH.GEMMA3,
        rules=RULES,
        # Gemma3TextConfig's defaults (transformers 5.x)
        config_defaults={"max_position_embeddings": 131072, "rms_norm_eps": 1e-06, "vocab_size": 262208,
                         "hidden_size": 2304, "intermediate_size": 9216, "num_attention_heads": 8,
                         "num_key_value_heads": 4, "num_hidden_layers": 26, "head_dim": 256,
                         "query_pre_attn_scalar": 256, "sliding_window": 4096, "tie_word_embeddings": True},
        derived=(("rope_parameters", _gemma3_rope),),
        hparams=_gemma3_hparams,
        skip_prefixes=("model.vision_tower.", "vision_tower.", "model.multi_modal_projector.",
                       "multi_modal_projector."),
        rename_prefixes=(("model.language_model.", "model."), ("language_model.model.", "model."),
                         ("language_model.lm_head.", "lm_head.")),
        # transformers >= 4.52 loads the 4.x checkpoint names under new ones (and saves the old)
        module_aliases=(("model.language_model.", "language_model.model."), ("model.vision_tower.", "vision_tower."),
                        ("model.multi_modal_projector.", "multi_modal_projector."),
                        ("lm_head.", "language_model.lm_head.")),
        vocab_options=GEMMA_VOCAB,
        checked="SentencePiece tokenizer (Gemma's specials, no dummy prefix) and chat template; norms and q/k norms "
                "stored w + 1; sliding-window pattern and local rope base; linear rope scaling (4.x config); "
                "Gemma3ForConditionalGeneration's text model (vision skipped); parity with llama.cpp's converter; "
                "logits vs transformers + PEFT (a missing + 1 fails)",
    )
)
