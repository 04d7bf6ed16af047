"""Small GPT-OSS models and PEFT LoRA adapters, made locally for tests, the demo and the benchmark.

Nothing comes from a model hub. A base is written as transformers' ``save_pretrained`` lays out a
GPT-OSS checkpoint (config.json, generation_config.json, sharded safetensors plus
``model.safetensors.index.json``, the o200k_harmony tokenizer files); adapters are written by PEFT
itself (:func:`make_adapter`) or, for bases too large to load into torch, in the same layout by
numpy (:func:`make_adapter_numpy`).

Weights are generated with numpy, one tensor at a time, in chunks, and streamed into the
safetensors files, so memory stays bounded by a chunk (not a tensor, not a shard) even for the
REAL_WIDTH bases. Every tensor has its own seeded random stream (seed, tensor name), so its values
do not depend on sharding or on the other tensors.

Values are drawn from a symmetric triangular distribution (the sum of two uniforms, bounded at
about 2.45 standard deviations; much faster to draw than normals) with these means and standard
deviations, written N(mean, std) below. ``init="peaked"`` (documented so that tests can reason
about the scales; ``H`` hidden size, ``I`` intermediate size, ``A = n_heads * head_dim``):

=====================================  ==================================
embed_tokens                            N(0, 1)
q/k/v_proj.weight                       N(0, 1/sqrt(H))
o_proj.weight                           N(0, 1/sqrt(A))
attention biases, router/expert biases  N(0, 0.1)
self_attn.sinks                         N(0, 1)
router.weight                           N(0, 2/sqrt(H))
experts.gate_up_proj (E, H, 2I)         N(0, 1/sqrt(H))
experts.down_proj (E, I, H)             N(0, 1/sqrt(I))
layer norms, final norm                 1 + N(0, 0.1)
lm_head                                 N(0, LOGIT_STD/sqrt(H)), LOGIT_STD = 6
=====================================  ==================================

The final RMSNorm makes the last hidden state's RMS about 1, so logits have a spread of about
LOGIT_STD (6) across the 201,088-token vocabulary: next-token distributions are peaked (entropy
well below log(vocab) = 12.2 nats) and differ from position to position, so comparing logits
means something. ``init="hf"`` instead mimics a fresh transformers init (N(0, 0.02) weights,
zero biases, unit norms): near-uniform outputs, for tests that want that.

torch, transformers and PEFT are needed only by :func:`make_adapter`, :func:`peft_merged_state_dict`,
:func:`peft_logits` and :func:`load_base_model`; the rest needs numpy only (and the tokenizer
extras if ``tokenizer=True``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import struct
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import numerics
from .errors import InputError, OutputError, UnsupportedError

log = logging.getLogger(__name__)

BOS_TOKEN_ID = 199998
PAD_TOKEN_ID = 199999  # <|endoftext|>
EOS_TOKEN_ID = 200002  # <|return|>
CALL_TOKEN_ID = 200012  # <|call|>
VOCAB_SIZE = 201088
LOGIT_STD = 6.0
TRANSFORMERS_VERSION = "5.24.0"  # the version whose save_pretrained layout these files follow

#: Presets: keyword arguments for :func:`gpt_oss_config` (2 layers unless overridden), e.g.
#: ``gpt_oss_config(**K256, num_hidden_layers=1)``.
TINY: dict[str, Any] = dict(hidden_size=64, intermediate_size=64, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2)
#: Widths that are multiples of 256, so k-quants (Q4_K_M...) really produce K-quant tensors.
K256: dict[str, Any] = dict(hidden_size=256, intermediate_size=256, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=64, num_local_experts=4, num_experts_per_tok=2)
#: gpt-oss-20b widths (the benchmark picks 1, 2 or 4 layers); about 2.8 GB of bf16 weights per
#: layer plus 2.3 GB for embeddings and lm_head.
REAL_WIDTH: dict[str, Any] = dict(hidden_size=2880, intermediate_size=2880, num_attention_heads=64, num_key_value_heads=8, head_dim=64,
                                  num_local_experts=32, num_experts_per_tok=4)

_DTYPES = {  # name -> (safetensors dtype, bytes per element)
    "bfloat16": ("BF16", 2),
    "float16": ("F16", 2),
    "float32": ("F32", 4),
}
_CHUNK = 1 << 22  # elements generated per step (16 MiB of float32)


# ----------------------------------------------------------------------------------------------
# config


def gpt_oss_config(
    *,
    hidden_size: int = 64,
    intermediate_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    head_dim: int = 16,
    num_local_experts: int = 4,
    num_experts_per_tok: int = 2,
    vocab_size: int = VOCAB_SIZE,
    sliding_window: int = 128,
    max_position_embeddings: int = 131072,
    rope_theta: float = 150000.0,
    rope_factor: float = 32.0,
    original_max_position_embeddings: int = 4096,
    rope_truncate: bool = False,
    layer_types: Sequence[str] | None = None,
    rms_norm_eps: float = 1e-05,
    swiglu_limit: float = 7.0,
    dtype: str = "bfloat16",
    **extra: Any,
) -> dict[str, Any]:
    """A config.json dict exactly as transformers 5.x saves ``GptOssConfig`` (``rope_parameters``
    with yarn; ``dtype``). ``extra`` keys are added (or override) at the top level. A vocabulary
    smaller than gpt-oss's (for quick tests) gets ``eos_token_id``/``pad_token_id`` None, since
    transformers rejects ids outside the vocabulary.

    ``rope_truncate`` is YaRN's ``truncate`` (gpt-oss ships False). llama.cpp always rounds the
    YaRN correction range (the ``truncate=True`` behaviour), so with the default False
    transformers' and llama.cpp's logits differ slightly at positions > 0 (about 0.1 on TINY in
    f32); pass True when a test compares the two tightly."""
    if layer_types is None:
        layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_hidden_layers)]
    if len(layer_types) != num_hidden_layers:
        raise InputError(f"layer_types has {len(layer_types)} entries for {num_hidden_layers} layers")
    cfg: dict[str, Any] = {
        "architectures": ["GptOssForCausalLM"],
        "attention_bias": True,
        "attention_dropout": 0.0,
        "bos_token_id": None,
        "dtype": dtype,
        "eos_token_id": EOS_TOKEN_ID,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "hidden_size": hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": intermediate_size,
        "layer_types": list(layer_types),
        "max_position_embeddings": max_position_embeddings,
        "model_type": "gpt_oss",
        "num_attention_heads": num_attention_heads,
        "num_experts_per_tok": num_experts_per_tok,
        "num_hidden_layers": num_hidden_layers,
        "num_key_value_heads": num_key_value_heads,
        "num_local_experts": num_local_experts,
        "output_router_logits": False,
        "pad_token_id": PAD_TOKEN_ID,
        "rms_norm_eps": rms_norm_eps,
        "rope_parameters": {
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "factor": float(rope_factor),
            "original_max_position_embeddings": original_max_position_embeddings,
            "rope_theta": float(rope_theta),
            "rope_type": "yarn",
            "truncate": rope_truncate,
        },
        "router_aux_loss_coef": 0.9,
        "sliding_window": sliding_window,
        "swiglu_alpha": 1.702,
        "swiglu_limit": swiglu_limit,
        "tie_word_embeddings": False,
        "transformers_version": TRANSFORMERS_VERSION,
        "use_cache": True,
        "vocab_size": vocab_size,
    }
    if vocab_size <= EOS_TOKEN_ID:
        cfg["eos_token_id"] = cfg["pad_token_id"] = None
    cfg.update(extra)
    return dict(sorted(cfg.items()))


def legacy_config(config: dict[str, Any]) -> dict[str, Any]:
    """The same config in the transformers 4.x style (as openai/gpt-oss-20b and
    unsloth/gpt-oss-20b-BF16 ship it): ``rope_scaling`` without ``rope_theta`` plus a top-level
    ``rope_theta``, ``torch_dtype`` instead of ``dtype``, ``experts_per_token`` and
    ``initial_context_length``, no ``swiglu_alpha``."""
    cfg = dict(config)
    rope = dict(cfg.pop("rope_parameters"))
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = dict(sorted(rope.items()))
    cfg["torch_dtype"] = cfg.pop("dtype", "bfloat16")
    cfg["experts_per_token"] = cfg["num_experts_per_tok"]
    cfg["initial_context_length"] = rope["original_max_position_embeddings"]
    cfg.pop("swiglu_alpha", None)
    cfg["transformers_version"] = "4.55.0"
    return dict(sorted(cfg.items()))


def generation_config() -> dict[str, Any]:
    """generation_config.json of gpt-oss."""
    return {
        "bos_token_id": BOS_TOKEN_ID,
        "do_sample": True,
        "eos_token_id": [EOS_TOKEN_ID, PAD_TOKEN_ID, CALL_TOKEN_ID],
        "pad_token_id": PAD_TOKEN_ID,
        "transformers_version": TRANSFORMERS_VERSION,
    }


def _get(config: dict[str, Any], key: str) -> Any:
    try:
        return config[key]
    except KeyError:
        raise InputError(f"GPT-OSS config has no {key!r}; make it with synth.gpt_oss_config()") from None


# ----------------------------------------------------------------------------------------------
# tensors


def tensor_specs(config: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of a GPT-OSS checkpoint, in transformers' state-dict order."""
    H = _get(config, "hidden_size")
    I = _get(config, "intermediate_size")  # noqa: E741
    E = _get(config, "num_local_experts")
    nh = _get(config, "num_attention_heads")
    nkv = _get(config, "num_key_value_heads")
    hd = config.get("head_dim") or H // nh
    V = _get(config, "vocab_size")
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (V, H))]
    for n in range(_get(config, "num_hidden_layers")):
        p = f"model.layers.{n}."
        out += [
            (p + "self_attn.sinks", (nh,)),
            (p + "self_attn.q_proj.weight", (nh * hd, H)),
            (p + "self_attn.q_proj.bias", (nh * hd,)),
            (p + "self_attn.k_proj.weight", (nkv * hd, H)),
            (p + "self_attn.k_proj.bias", (nkv * hd,)),
            (p + "self_attn.v_proj.weight", (nkv * hd, H)),
            (p + "self_attn.v_proj.bias", (nkv * hd,)),
            (p + "self_attn.o_proj.weight", (H, nh * hd)),
            (p + "self_attn.o_proj.bias", (H,)),
            (p + "mlp.router.weight", (E, H)),
            (p + "mlp.router.bias", (E,)),
            (p + "mlp.experts.gate_up_proj", (E, H, 2 * I)),
            (p + "mlp.experts.gate_up_proj_bias", (E, 2 * I)),
            (p + "mlp.experts.down_proj", (E, I, H)),
            (p + "mlp.experts.down_proj_bias", (E, H)),
            (p + "input_layernorm.weight", (H,)),
            (p + "post_attention_layernorm.weight", (H,)),
        ]
    out += [("model.norm.weight", (H,)), ("lm_head.weight", (V, H))]
    return out


def _init_params(name: str, config: dict[str, Any], init: str) -> tuple[float, float]:
    """(mean, std) of a tensor's normal init."""
    H = config["hidden_size"]
    if init == "hf":
        if name.endswith("norm.weight"):
            return 1.0, 0.0
        if name.endswith("bias") or name.endswith("sinks"):
            return 0.0, 0.0
        return 0.0, float(config.get("initializer_range", 0.02))
    if init != "peaked":
        raise InputError(f"init={init!r}: use 'peaked' or 'hf'")
    nh = config["num_attention_heads"]
    hd = config.get("head_dim") or H // nh
    if name.endswith("norm.weight"):
        return 1.0, 0.1
    if name.endswith("sinks") or name == "model.embed_tokens.weight":
        return 0.0, 1.0
    if name.endswith("bias"):
        return 0.0, 0.1
    if name == "lm_head.weight":
        return 0.0, LOGIT_STD / math.sqrt(H)
    if name.endswith("o_proj.weight"):
        return 0.0, 1.0 / math.sqrt(nh * hd)
    if name.endswith("router.weight"):
        return 0.0, 2.0 / math.sqrt(H)
    if name.endswith("down_proj"):
        return 0.0, 1.0 / math.sqrt(config["intermediate_size"])
    return 0.0, 1.0 / math.sqrt(H)  # q/k/v, gate_up


def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest, ties to even; NaN stays NaN."""
    return numerics.f32_to_bf16_bits(np.asarray(x, dtype=np.float32))


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32."""
    return numerics.bf16_bits_to_f32(np.asarray(bits, dtype=np.uint16))


def _encode(x: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return bf16_bits(x)
    if dtype == "float16":
        return x.astype(np.float16)
    return x.astype(np.float32, copy=False)


def tensor_values(name: str, shape: Sequence[int], config: dict[str, Any], *, seed: int = 0,
                  init: str = "peaked") -> Iterator[np.ndarray]:
    """The float32 values of a synthetic tensor as flat chunks (C order), deterministic in
    (seed, name). ``np.concatenate(list(...)).reshape(shape)`` is the whole tensor."""
    mean, std = _init_params(name, config, init)
    rng = _rng(seed, name)
    n = int(np.prod(shape, dtype=np.int64))
    scale = np.float32(std * math.sqrt(6.0))
    done = 0
    while done < n:
        k = min(_CHUNK, n - done)
        # triangular on [-1, 1] (sum of two uniforms), std 1/sqrt(6): 3-5x faster than
        # numpy's normal generator, which matters for the REAL_WIDTH bases
        x = rng.random(k, dtype=np.float32)
        x += rng.random(k, dtype=np.float32)
        x -= np.float32(1.0)
        x *= scale
        x += np.float32(mean)
        yield x
        done += k


def synth_tensor(name: str, config: dict[str, Any], *, seed: int = 0, init: str = "peaked",
                 dtype: str = "float32") -> np.ndarray:
    """One whole synthetic tensor as :func:`make_base` writes it, as float32 (rounded through
    ``dtype`` first, so it equals what the file holds)."""
    shapes = dict(tensor_specs(config))
    if name not in shapes:
        raise InputError(f"{name!r} is not a GPT-OSS tensor of this config")
    x = np.concatenate(list(tensor_values(name, shapes[name], config, seed=seed, init=init)))
    if dtype == "bfloat16":
        x = bf16_to_f32(bf16_bits(x))
    elif dtype == "float16":
        x = x.astype(np.float16).astype(np.float32)
    return x.reshape(shapes[name])


# ----------------------------------------------------------------------------------------------
# safetensors writing (streamed: header first, then each tensor chunk by chunk)


def write_safetensors_streamed(path: str | os.PathLike[str],
                               tensors: Sequence[tuple[str, tuple[int, ...], str]],
                               chunks: Callable[[str], Iterator[np.ndarray]],
                               metadata: dict[str, str] | None = None) -> int:
    """Write a safetensors file tensor by tensor. ``tensors`` lists (name, shape, dtype name in
    bfloat16/float16/float32); ``chunks(name)`` yields that tensor's already-encoded flat chunks
    (uint16 bit patterns for bfloat16). Data is laid out in name order. Returns the data size."""
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    order = sorted(tensors, key=lambda t: t[0])
    off = 0
    for name, shape, dt in order:
        st, size = _DTYPES[dt]
        nbytes = int(np.prod(shape, dtype=np.int64)) * size
        header[name] = {"dtype": st, "shape": list(shape), "data_offsets": [off, off + nbytes]}
        off += nbytes
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    try:
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(hb)))
            f.write(hb)
            for name, shape, dt in order:
                want = header[name]["data_offsets"][1] - header[name]["data_offsets"][0]
                got = 0
                for c in chunks(name):
                    b = memoryview(np.ascontiguousarray(c)).cast("B")
                    f.write(b)
                    got += len(b)
                if got != want:
                    raise InputError(f"{name}: wrote {got} bytes, header says {want}")
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e}") from e
    return off


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _plan_shards(specs: list[tuple[str, tuple[int, ...]]], esize: int, max_shard_bytes: int
                 ) -> list[list[tuple[str, tuple[int, ...]]]]:
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    cur = 0
    for name, shape in specs:
        nb = int(np.prod(shape, dtype=np.int64)) * esize
        if shards[-1] and cur + nb > max_shard_bytes:
            shards.append([])
            cur = 0
        shards[-1].append((name, shape))
        cur += nb
    return shards


def make_base(
    dest_dir: str | os.PathLike[str],
    config: dict[str, Any] | None = None,
    *,
    seed: int = 0,
    dtype: str = "bfloat16",
    max_shard_bytes: int = 5_000_000_000,
    tokenizer: bool | Callable[[Path], Any] = True,
    init: str = "peaked",
    legacy: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
) -> Path:
    """Write a synthetic GPT-OSS base model into ``dest_dir`` and return it.

    Files: config.json (``config``, default :data:`TINY`; ``legacy=True`` writes the transformers
    4.x style), generation_config.json, ``model-0000i-of-0000N.safetensors`` shards of at most
    ``max_shard_bytes`` each (a larger tensor gets a shard of its own, as transformers does) with
    ``model.safetensors.index.json``, and, if ``tokenizer`` is true, the o200k_harmony tokenizer
    files (``tokenizer`` may be a callable ``f(dest_dir)`` that writes its own variant).
    ``progress(tensor_name, done_tensors, total_tensors)`` is called after each tensor.
    """
    if dtype not in _DTYPES:
        raise InputError(f"dtype={dtype!r}: use one of {sorted(_DTYPES)}")
    cfg = gpt_oss_config() if config is None else dict(config)
    if "rope_parameters" in cfg:
        cfg["dtype"] = dtype
    elif "torch_dtype" in cfg:
        cfg["torch_dtype"] = dtype
    dest = Path(dest_dir)
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create {dest}: {e}") from e
    _write_json(dest / "config.json", legacy_config(cfg) if legacy and "rope_parameters" in cfg else cfg)
    _write_json(dest / "generation_config.json", generation_config())

    specs = tensor_specs(cfg)
    esize = _DTYPES[dtype][1]
    shards = _plan_shards(specs, esize, max_shard_bytes)
    n = len(shards)
    weight_map: dict[str, str] = {}
    total = 0
    shapes = dict(specs)
    done = 0

    def chunks(name: str) -> Iterator[np.ndarray]:
        for c in tensor_values(name, shapes[name], cfg, seed=seed, init=init):
            yield _encode(c, dtype)

    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        total += write_safetensors_streamed(dest / fname, [(nm, sh, dtype) for nm, sh in shard], chunks)
        for nm, _ in shard:
            weight_map[nm] = fname
            done += 1
            if progress is not None:
                progress(nm, done, len(specs))
    n_params = sum(int(np.prod(s, dtype=np.int64)) for _, s in specs)
    _write_json(dest / "model.safetensors.index.json",
                {"metadata": {"total_parameters": n_params, "total_size": total},
                 "weight_map": dict(sorted(weight_map.items()))})
    if callable(tokenizer):
        tokenizer(dest)
    elif tokenizer:
        from . import o200k
        o200k.write_tokenizer(dest)
    return dest


def read_config(base_dir: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(base_dir) / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path} not found: is {base_dir} a base model folder?") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path} is not valid JSON: {e}") from e


# ----------------------------------------------------------------------------------------------
# adapters

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "added_tokens.json")
#: The GPT-OSS expert parameters PEFT can target, in the order of GptOssExperts' parameters.
#: PEFT wraps targeted parameters of one module in this order (it walks
#: ``module.named_parameters()``), whatever the order of ``target_parameters``: the first one
#: wrapped becomes the innermost ParamWrapper, whose keys carry ``base_layer.``.
EXPERT_PARAMS = ("gate_up_proj", "down_proj")


def _copy_tokenizer(base_dir: Path, dest: Path, tokenizer: str | Callable[[Path], Any]) -> None:
    if tokenizer == "none":
        return
    if tokenizer == "resaved":
        # what TRL/Unsloth do at the end of training: tokenizer.save_pretrained(output_dir)
        from transformers import AutoTokenizer
        AutoTokenizer.from_pretrained(str(base_dir)).save_pretrained(str(dest))
        return
    if tokenizer == "same" or callable(tokenizer):
        for f in TOKENIZER_FILES:
            if (base_dir / f).is_file():
                shutil.copyfile(base_dir / f, dest / f)
        if callable(tokenizer):
            tokenizer(dest)
        return
    raise InputError(f"tokenizer={tokenizer!r}: use 'same', 'resaved', 'none' or a callable f(dest_dir)")


def _lora_scaling(r: int, alpha: float, use_rslora: bool) -> float:
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def _lora_values(rng: np.random.Generator, a_shape: tuple[int, int], b_shape: tuple[int, int], r: int,
                 scaling: float, init_scale: float) -> tuple[np.ndarray, np.ndarray]:
    """A ~ N(0, 1/sqrt(in)), B ~ N(0, init_scale / (scaling * sqrt(r))): then
    scaling * B @ A has entries of RMS about init_scale / sqrt(in), i.e. ``init_scale`` times the
    RMS of a "peaked" base weight with the same fan-in."""
    a = rng.standard_normal(a_shape, dtype=np.float32) * np.float32(1.0 / math.sqrt(a_shape[1]))
    b = rng.standard_normal(b_shape, dtype=np.float32) * np.float32(init_scale / (scaling * math.sqrt(r)))
    return a, b


def make_adapter(
    base_dir: str | os.PathLike[str],
    dest_dir: str | os.PathLike[str],
    *,
    r: int = 4,
    lora_alpha: float = 8,
    target_modules: Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj"),
    target_parameters: Sequence[str] = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
    use_rslora: bool = False,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
    seed: int = 0,
    init_scale: float = 0.5,
    tokenizer: str | Callable[[Path], Any] = "same",
    base_model_name_or_path: str | None = None,
    save_dtype: str = "float32",
    modules_to_save: Sequence[str] = (),
    trainable_token_indices: Sequence[int] | dict[str, Sequence[int]] | None = None,
    resize_vocab: int | None = None,
    use_dora: bool = False,
    lora_bias: bool = False,
) -> Path:
    """Make a LoRA adapter for the base in ``base_dir`` with PEFT itself and return ``dest_dir``.

    Chat fine-tunes: ``resize_vocab`` resizes the base's embeddings first (added tokens), and
    ``modules_to_save`` (e.g. embed_tokens, lm_head) trains full copies of those modules (PEFT then
    saves them whole: seeded changes to every row here); ``trainable_token_indices`` trains only
    those rows of the input embedding (seeded new values). ``use_dora``: DoRA (PEFT initializes
    the magnitudes to the row norms; here they are changed by about 10%, as training would).
    ``lora_bias``: lora_B gets a bias (PEFT's lora_bias, on layers that have one; seeded values).

    The base is loaded with transformers (float32), wrapped with ``get_peft_model(LoraConfig(...))``,
    every lora_A/lora_B is set to seeded random values (PEFT's own init makes B zero, hence a zero
    delta; here the delta ``scaling * B @ A`` has an RMS of ``init_scale`` times the base weight
    RMS of a "peaked" base, per module, with each module's own r and scaling, so rsLoRA and the
    patterns are honoured), and PEFT's ``save_pretrained`` writes adapter_config.json and
    adapter_model.safetensors (``save_dtype`` "bfloat16" casts the LoRA weights first, as a bf16
    training run saves them). Tokenizer files: ``"same"`` copies the base's, ``"resaved"`` loads
    and re-saves them with transformers like a trainer does, ``"none"`` writes none, a callable
    ``f(dest_dir)`` is called after copying the base's files (to modify them).
    ``base_model_name_or_path`` (default: ``base_dir``) is recorded in adapter_config.json.
    """
    try:
        import torch
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        raise UnsupportedError("make_adapter() needs torch, transformers and peft: "
                               "pip install 'lora2gguf[reference]' (or use make_adapter_numpy)") from e
    if not target_modules and not target_parameters:
        raise InputError("make_adapter: both target_modules and target_parameters are empty")
    base = Path(base_dir)
    dest = Path(dest_dir)
    model = load_base_model(base)
    if resize_vocab is not None:
        model.resize_token_embeddings(resize_vocab, mean_resizing=False)
    extra: dict[str, Any] = {}
    if modules_to_save:
        extra["modules_to_save"] = list(modules_to_save)
    if use_dora:
        extra["use_dora"] = True
    if lora_bias:
        extra["lora_bias"] = True
    if trainable_token_indices is not None:
        extra["trainable_token_indices"] = (dict(trainable_token_indices) if isinstance(trainable_token_indices, dict)
                                            else list(trainable_token_indices))
    lcfg = LoraConfig(
        r=r, lora_alpha=lora_alpha, target_modules=list(target_modules) or None,
        target_parameters=list(target_parameters) or None, use_rslora=use_rslora,
        rank_pattern=dict(rank_pattern or {}), alpha_pattern=dict(alpha_pattern or {}),
        lora_dropout=0.0, bias="none", **extra,
    )
    if not target_modules:
        lcfg.target_modules = []  # PEFT needs an empty list, not None, when only parameters are targeted
    pm = get_peft_model(model, lcfg)
    from peft.tuners.lora import LoraLayer
    with torch.no_grad():
        for mname, module in sorted(pm.named_modules(), key=lambda kv: kv[0]):
            if not isinstance(module, LoraLayer) or "default" not in module.lora_A:
                continue
            A = module.lora_A["default"].weight
            B = module.lora_B["default"].weight
            rr = module.r["default"]
            a, b = _lora_values(_rng(seed, mname), tuple(A.shape), tuple(B.shape), rr,
                                float(module.scaling["default"]), init_scale)
            A.copy_(torch.from_numpy(a))
            B.copy_(torch.from_numpy(b))
            bias = module.lora_B["default"].bias
            if bias is not None:  # lora_bias (PEFT initializes it to zero): seeded, as training would change it
                noise = _rng(seed, mname + ".bias").standard_normal(tuple(bias.shape)).astype(np.float32)
                bias.copy_(torch.from_numpy(noise * np.float32(0.1 * init_scale)))
            if save_dtype == "bfloat16":
                A.data = A.data.to(torch.bfloat16)
                B.data = B.data.to(torch.bfloat16)
        # full modules and token rows: what training would have changed, seeded
        for pname, p in sorted(pm.named_parameters(), key=lambda kv: kv[0]):
            if ".modules_to_save." in pname or "trainable_tokens_delta" in pname:
                noise = _rng(seed, pname).standard_normal(tuple(p.shape)).astype(np.float32)
                scale = float(p.detach().float().std()) or 1.0
                p.copy_(p.detach() + torch.from_numpy(noise * np.float32(0.2 * scale)).to(p.dtype))
            elif "lora_magnitude_vector" in pname:  # DoRA: trained magnitudes, about 10% off the row norms
                noise = _rng(seed, pname).standard_normal(tuple(p.shape)).astype(np.float32)
                p.copy_(p.detach() * torch.from_numpy(1 + np.float32(0.1) * noise).to(p.dtype))
    dest.mkdir(parents=True, exist_ok=True)
    pm.peft_config["default"].base_model_name_or_path = (
        str(base) if base_model_name_or_path is None else base_model_name_or_path)
    pm.save_pretrained(str(dest))
    _copy_tokenizer(base, dest, tokenizer)
    return dest


def _peft_adapter_config(*, r: int, lora_alpha: float, target_modules: Sequence[str],
                         target_parameters: Sequence[str], use_rslora: bool,
                         base_model_name_or_path: str) -> dict[str, Any]:
    auto_mapping = {"base_model_class": "GptOssForCausalLM",
                    "parent_library": "transformers.models.gpt_oss.modeling_gpt_oss"}
    try:
        from peft import LoraConfig
    except ImportError:
        LoraConfig = None  # noqa: N806
    if LoraConfig is not None:
        c = LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=list(target_modules) or None,
                       target_parameters=list(target_parameters) or None, use_rslora=use_rslora,
                       lora_dropout=0.0, bias="none", inference_mode=True,
                       base_model_name_or_path=base_model_name_or_path)
        if not target_modules:
            c.target_modules = []
        d = c.to_dict()
        for k, v in d.items():
            if isinstance(v, set):
                d[k] = list(v)
        d["auto_mapping"] = auto_mapping
        return dict(sorted(d.items()))
    # Without PEFT: the fields PEFT 0.21 writes for a plain LoRA.
    d = {
        "alora_invocation_tokens": None, "alpha_pattern": {}, "arrow_config": None, "auto_mapping": auto_mapping,
        "base_model_name_or_path": base_model_name_or_path, "bias": "none", "corda_config": None,
        "ensure_weight_tying": False, "eva_config": None, "exclude_modules": None, "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "kasa_config": None, "layer_replication": None,
        "layers_pattern": None, "layers_to_transform": None, "loftq_config": {}, "lora_alpha": lora_alpha,
        "lora_bias": False, "lora_dropout": 0.0, "lora_ga_config": None, "megatron_config": None,
        "megatron_core": "megatron.core", "modules_to_save": None, "monteclora_config": None,
        "peft_type": "LORA", "peft_version": "0.21.2", "qalora_group_size": 16, "r": r, "rank_pattern": {},
        "revision": None, "target_modules": list(target_modules),
        "target_parameters": list(target_parameters) or None, "task_type": None,
        "trainable_token_indices": None, "use_bdlora": None, "use_dora": False, "use_qalora": False,
        "use_rslora": use_rslora, "velora_config": None,
    }
    return d


def adapter_tensor_specs(config: dict[str, Any], *, r: int, target_modules: Sequence[str],
                         target_parameters: Sequence[str]) -> list[tuple[str, str, tuple[int, int], tuple[int, int]]]:
    """The LoRA tensors PEFT saves for a GPT-OSS model: (module key, rank, A shape, B shape) as
    (key prefix without ``.lora_A.weight``, ...). Module targets: ``q_proj``, ``k_proj``,
    ``v_proj``, ``o_proj`` (attention) and ``router``. Parameter targets: ``mlp.experts.gate_up_proj``
    and ``mlp.experts.down_proj`` (A (r*E, in), B (out, r*E)); when both are targeted the
    gate_up_proj keys carry ``.base_layer`` (see :data:`EXPERT_PARAMS`)."""
    H = config["hidden_size"]
    I = config["intermediate_size"]  # noqa: E741
    E = config["num_local_experts"]
    nh = config["num_attention_heads"]
    nkv = config["num_key_value_heads"]
    hd = config.get("head_dim") or H // nh
    linear = {"q_proj": ("self_attn", H, nh * hd), "k_proj": ("self_attn", H, nkv * hd),
              "v_proj": ("self_attn", H, nkv * hd), "o_proj": ("self_attn", nh * hd, H),
              "router": ("mlp", H, E)}
    experts = {"gate_up_proj": (H, 2 * I), "down_proj": (I, H)}
    for t in target_modules:
        if t not in linear:
            raise UnsupportedError(f"make_adapter_numpy: target module {t!r} is not one of {sorted(linear)}")
    wanted = []
    for t in target_parameters:
        short = t.rsplit(".", 1)[-1]
        if short not in experts or not ("mlp.experts." + short).endswith(t):
            raise UnsupportedError(f"make_adapter_numpy: target parameter {t!r} is not one of "
                                   "mlp.experts.gate_up_proj, mlp.experts.down_proj")
        wanted.append(short)
    order = [p for p in EXPERT_PARAMS if p in wanted]
    out = []
    for n in range(config["num_hidden_layers"]):
        for t in sorted(set(target_modules)):
            sub, fin, fout = linear[t]
            out.append((f"base_model.model.model.layers.{n}.{sub}.{t}", t, (r, fin), (fout, r)))
        for depth, p in enumerate(order):
            fin, fout = experts[p]
            inner = ".base_layer" * (len(order) - 1 - depth)
            out.append((f"base_model.model.model.layers.{n}.mlp.experts{inner}", p, (r * E, fin), (fout, r * E)))
    return out


def make_adapter_numpy(
    base_dir: str | os.PathLike[str],
    dest_dir: str | os.PathLike[str],
    *,
    r: int = 4,
    lora_alpha: float = 8,
    target_modules: Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj"),
    target_parameters: Sequence[str] = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
    use_rslora: bool = False,
    seed: int = 0,
    init_scale: float = 0.5,
    tokenizer: str | Callable[[Path], Any] = "same",
    base_model_name_or_path: str | None = None,
    save_dtype: str = "float32",
) -> Path:
    """Write the adapter :func:`make_adapter` would, without torch: the same keys, shapes and
    adapter_config.json fields (PEFT's own ``LoraConfig`` when PEFT is installed), values drawn the
    same way (not the same numbers). Reads only the base's config.json, so it works for
    REAL_WIDTH bases. rank_pattern/alpha_pattern are not supported here (use make_adapter)."""
    if not target_modules and not target_parameters:
        raise InputError("make_adapter_numpy: both target_modules and target_parameters are empty")
    if save_dtype not in _DTYPES:
        raise InputError(f"save_dtype={save_dtype!r}: use one of {sorted(_DTYPES)}")
    base = Path(base_dir)
    dest = Path(dest_dir)
    cfg = read_config(base)
    specs = adapter_tensor_specs(cfg, r=r, target_modules=target_modules, target_parameters=target_parameters)
    scaling = _lora_scaling(r, lora_alpha, use_rslora)
    arrays: dict[str, np.ndarray] = {}
    for key, _t, a_shape, b_shape in specs:
        a, b = _lora_values(_rng(seed, key + "/" + _t), a_shape, b_shape, r, scaling, init_scale)
        arrays[key + ".lora_A.weight"] = a
        arrays[key + ".lora_B.weight"] = b
    dest.mkdir(parents=True, exist_ok=True)
    write_safetensors_streamed(
        dest / "adapter_model.safetensors",
        [(k, v.shape, save_dtype) for k, v in arrays.items()],
        lambda k: iter([_encode(arrays[k].reshape(-1), save_dtype)]),
    )
    acfg = _peft_adapter_config(r=r, lora_alpha=lora_alpha, target_modules=target_modules,
                                target_parameters=target_parameters, use_rslora=use_rslora,
                                base_model_name_or_path=str(base) if base_model_name_or_path is None
                                else base_model_name_or_path)
    (dest / "adapter_config.json").write_text(json.dumps(acfg, indent=2, sort_keys=True), encoding="utf-8")
    (dest / "README.md").write_text("# Synthetic LoRA adapter\n\nWritten by lora2gguf.synth.make_adapter_numpy "
                                    "in PEFT's layout, for tests and benchmarks.\n", encoding="utf-8")
    _copy_tokenizer(base, dest, tokenizer)
    return dest


# ----------------------------------------------------------------------------------------------
# references through transformers + PEFT


def load_base_model(base_dir: str | os.PathLike[str], dtype: str = "float32"):
    """The base through transformers' AutoModelForCausalLM in float32 (or float64; eager
    attention), in eval mode."""
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        raise UnsupportedError("loading the base needs torch and transformers: pip install 'lora2gguf[reference]'") from e
    td = {"float32": torch.float32, "float64": torch.float64}[dtype]
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=td, attn_implementation="eager")
    model.eval()
    return model


def _peft_model(base_dir, adapter_dir, dtype: str = "float32"):
    model = load_base_model(base_dir, dtype)
    if adapter_dir is None:
        return model
    from .adapter import saved_vocab_rows

    rows = saved_vocab_rows(adapter_dir)
    if rows is not None and rows != model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(rows, mean_resizing=False)  # as the fine-tune was, before training
    from peft import PeftModel
    pm = PeftModel.from_pretrained(model, str(adapter_dir))
    pm.eval()
    return pm


def peft_merged_state_dict(base_dir: str | os.PathLike[str], adapter_dir: str | os.PathLike[str],
                           dtype: str = "float32") -> dict[str, np.ndarray]:
    """The merged model's state dict (HF names) from PEFT's ``merge_and_unload()`` on the base
    loaded in ``dtype`` ("float32", or "float64" for the correctly rounded reference)."""
    import torch
    pm = _peft_model(base_dir, adapter_dir, dtype)
    with torch.no_grad():
        merged = pm.merge_and_unload()
        out_dtype = torch.float64 if dtype == "float64" else torch.float32
        return {k: v.detach().to(out_dtype).cpu().numpy().copy() for k, v in merged.state_dict().items()}


def write_reference_merge(base_dir: str | os.PathLike[str], adapter_dir: str | os.PathLike[str],
                          dest_dir: str | os.PathLike[str], *, tokenizer_dir: str | os.PathLike[str] | None = None,
                          dtype: str = "bf16") -> Path:
    """The float64 reference merge as a model folder llama.cpp's converter can read: PEFT's
    ``merge_and_unload()`` on the base loaded in float64, every tensor rounded once to ``dtype``
    ("bf16" with :func:`numerics.f64_to_bf16_bits`: torch's float64 -> bfloat16 rounds twice,
    through float32; or "f16"), then saved by transformers' ``save_pretrained`` in that type (its
    own checkpoint layout: tied tensors once, MoE experts per expert, the config's vocab_size after
    a resize) with the tokenizer files of ``tokenizer_dir`` (default: the adapter's, else the
    base's). The converter run with the same ``--outtype`` then writes the values unchanged."""
    import torch

    to_f64 = {"bf16": lambda v: numerics.bf16_bits_to_f32(numerics.f64_to_bf16_bits(v)),
              "f16": lambda v: numerics.f64_to_f16_bits(v).view(np.float16)}
    if dtype not in to_f64:
        raise InputError(f"write_reference_merge: dtype {dtype!r} is not one of {', '.join(to_f64)}")
    base, dest = Path(base_dir), Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    pm = _peft_model(base, adapter_dir, "float64")
    with torch.no_grad():
        merged = pm.merge_and_unload() if adapter_dir is not None else pm
        for _, p in merged.named_parameters():
            p.copy_(torch.from_numpy(to_f64[dtype](p.detach().cpu().numpy()).astype(np.float64)))  # rounded once
        merged = merged.to(torch.bfloat16 if dtype == "bf16" else torch.float16)  # exact: every value is one
    merged.save_pretrained(str(dest))
    if (base / "generation_config.json").exists():
        shutil.copy(base / "generation_config.json", dest / "generation_config.json")
    tok = Path(tokenizer_dir) if tokenizer_dir is not None else Path(adapter_dir) if adapter_dir else base
    if not any((tok / f).exists() for f in ("tokenizer.json", "tokenizer.model")):
        tok = base
    for f in tok.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template", "added_tokens")) and f.is_file():
            shutil.copy(f, dest / f.name)
    return dest


def _checkpoint_names(folder: Path) -> list[str]:
    from .safetensors_io import Checkpoint

    return list(Checkpoint.open(folder).tensors)


def peft_logits(base_dir: str | os.PathLike[str], adapter_dir: str | os.PathLike[str] | None,
                token_ids: Sequence[int] | np.ndarray) -> np.ndarray:
    """Logits (float32) of the base with the adapter applied unmerged through PEFT (``adapter_dir``
    None: the base alone). ``token_ids`` 1-D gives (T, vocab); 2-D (B, T) gives (B, T, vocab)."""
    import torch
    ids = np.asarray(token_ids, dtype=np.int64)
    if ids.ndim not in (1, 2):
        raise InputError(f"token_ids must be 1-D or 2-D, got shape {ids.shape}")
    pm = _peft_model(base_dir, adapter_dir)
    with torch.no_grad():
        out = pm(input_ids=torch.from_numpy(ids.reshape(1, -1) if ids.ndim == 1 else ids)).logits
    out = out.to(torch.float32).numpy()
    return out[0] if ids.ndim == 1 else out

