"""Test helpers: re-encode a BF16 GPT-OSS base folder into the quantized layouts users meet.

- :func:`bf16_base_to_mxfp4`: the layout of the official ``openai/gpt-oss-*`` checkpoints (MoE
  experts as MXFP4 ``*_blocks`` + ``*_scales``, everything else BF16, ``quantization_config``
  ``{"quant_method": "mxfp4", ...}``), plus the BF16 base it decodes to exactly.
- :func:`bf16_base_to_bnb4`: the layout transformers + bitsandbytes save for a 4-bit (NF4/FP4)
  model, with or without double quantization: each attention ``nn.Linear`` weight becomes a
  ``Params4bit`` state (bitsandbytes leaves the 3-D expert parameters and the router alone).

The source folder is one written by ``lora2gguf.synth.make_base`` (or transformers): config.json,
safetensors shards with ``model.safetensors.index.json`` (or a single ``model.safetensors``),
tokenizer files. Tensors are read and written with lora2gguf's own safetensors reader/writer,
one tensor at a time; other files are copied unchanged. No test functions live here.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np

from lora2gguf import numerics
from lora2gguf.safetensors_io import INDEX_NAME, NUMPY_TO_DTYPE, Checkpoint, StreamingWriter, TensorSpec

#: The official gpt-oss-20b/120b config's ``quantization_config``.
MXFP4_QUANTIZATION_CONFIG = {
    "modules_to_not_convert": [
        "model.layers.*.self_attn",
        "model.layers.*.mlp.router",
        "model.embed_tokens",
        "lm_head",
    ],
    "quant_method": "mxfp4",
}

_EXPERT_RE = re.compile(r"^(model\.layers\.\d+\.mlp\.experts\.)(gate_up_proj|down_proj)$")
#: The nn.Linear weights of GPT-OSS that bitsandbytes quantizes (lm_head is kept, as transformers does).
_BNB_LINEAR_RE = re.compile(r"^model\.layers\.\d+\.self_attn\.(q|k|v|o)_proj\.weight$")


def _bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    return numerics.bf16_bits_to_f32(raw)


def _shard_groups(ck: Checkpoint) -> dict[Path, list[str]]:
    """Tensor names per shard file, in the shard's own (header) order."""
    groups: dict[Path, list[str]] = {p: [] for p in ck.files}
    for name, info in ck.tensors.items():
        groups[info.path].append(name)
    return groups


def _copy_other_files(src: Path, dest: Path, skip: set[str]) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for p in sorted(src.iterdir()):
        if p.is_file() and p.name not in skip and not p.name.endswith(".safetensors"):
            shutil.copy2(p, dest / p.name)


def _rewrite(src: Path, dest: Path, convert, config_update: dict) -> Path:
    """Copy ``src`` into ``dest``, passing each tensor through ``convert(name, dtype, raw)``, which
    returns a list of (name, safetensors dtype, array) to write in its place. Shards keep their
    file names; the index (if any) is rewritten; config.json gets ``config_update``."""
    ck = Checkpoint.open(src)
    _copy_other_files(src, dest, skip={"config.json", INDEX_NAME})
    weight_map: dict[str, str] = {}
    total = 0
    for path, names in _shard_groups(ck).items():
        out: list[tuple[str, str, np.ndarray]] = []
        for name in names:
            info = ck.info(name)
            out += convert(name, info.dtype, ck.raw(name))
        out.sort(key=lambda t: t[0])  # safetensors files list tensors by name
        specs = [TensorSpec(n, dt, tuple(a.shape)) for n, dt, a in out]
        w = StreamingWriter(dest / path.name, specs, metadata={"format": "pt"})
        try:
            for n, _, a in out:
                w.write(n, a)
        finally:
            w.close()
        for s in specs:
            weight_map[s.name] = path.name
            total += s.nbytes
    if (src / INDEX_NAME).exists():
        index = json.loads((src / INDEX_NAME).read_text(encoding="utf-8"))
        index.setdefault("metadata", {})["total_size"] = total
        index["weight_map"] = dict(sorted(weight_map.items()))
        (dest / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    config.update(config_update)
    (dest / "config.json").write_text(json.dumps(dict(sorted(config.items())), indent=2) + "\n", encoding="utf-8")
    return dest


def _expert_to_mxfp4(bf16_layout: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(E, in, out) float32 BF16-layout expert weights -> (blocks, scales) of the transposed
    (E, out, in) rows, and the (E, in, out) values they decode to (exactly representable in bf16)."""
    rows = np.ascontiguousarray(np.swapaxes(bf16_layout, 1, 2))
    blocks, scales = numerics.encode_mxfp4(rows)
    snapped = numerics.decode_mxfp4_expert(blocks, scales)
    return blocks, scales, snapped


def bf16_base_to_mxfp4(src_dir, dest_dir) -> tuple[Path, Path]:
    """Re-encode a BF16 GPT-OSS base as the official MXFP4 checkpoints store it.

    Writes two folders under ``dest_dir`` and returns ``(mxfp4_dir, bf16_dir)``:

    - ``mxfp4/``: every ``model.layers.N.mlp.experts.gate_up_proj`` (E, H, 2I) becomes
      ``gate_up_proj_blocks`` uint8 (E, 2I, H/32, 16) + ``gate_up_proj_scales`` uint8 (E, 2I, H/32),
      every ``down_proj`` (E, I, H) becomes ``down_proj_blocks`` (E, H, I/32, 16) +
      ``down_proj_scales`` (E, H, I/32) (in the shard that held the BF16 tensor); the expert
      biases and all other tensors are copied as they are; config.json gains the official
      ``quantization_config`` (:data:`MXFP4_QUANTIZATION_CONFIG`).
    - ``bf16/``: the same base with each expert tensor replaced by the BF16 values the MXFP4
      tensors decode to (the source snapped to the MXFP4 grid; exact in bf16), so a build from
      ``mxfp4/`` can be compared byte for byte with a build from ``bf16/``.
    """
    src = Path(src_dir)
    dest = Path(dest_dir)
    mx_dir, bf_dir = dest / "mxfp4", dest / "bf16"
    snapped_cache: dict[str, np.ndarray] = {}

    def to_mxfp4(name: str, dtype: str, raw: np.ndarray):
        m = _EXPERT_RE.match(name)
        if not m:
            return [(name, dtype, raw)]
        if dtype != "BF16":
            raise ValueError(f"{name}: expected a BF16 expert tensor, found {dtype}")
        blocks, scales, snapped = _expert_to_mxfp4(_bf16_to_f32(raw))
        snapped_cache[name] = numerics.f32_to_bf16_bits(snapped)
        base = m.group(1) + m.group(2)
        return [(base + "_blocks", "U8", blocks), (base + "_scales", "U8", scales)]

    def to_snapped(name: str, dtype: str, raw: np.ndarray):
        if _EXPERT_RE.match(name):
            bits = snapped_cache.pop(name)
            assert bits.shape == raw.shape
            return [(name, "BF16", bits)]
        return [(name, dtype, raw)]

    _rewrite(src, mx_dir, to_mxfp4, {"quantization_config": MXFP4_QUANTIZATION_CONFIG})
    _rewrite(src, bf_dir, to_snapped, {})
    return mx_dir, bf_dir


def bnb4_quantization_config(quant_type: str = "nf4", nested: bool = True) -> dict:
    """``quantization_config`` as transformers saves a ``BitsAndBytesConfig(load_in_4bit=True, ...)``."""
    return {
        "_load_in_4bit": True,
        "_load_in_8bit": False,
        "bnb_4bit_compute_dtype": "bfloat16",
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": quant_type,
        "bnb_4bit_use_double_quant": nested,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": None,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": True,
        "load_in_8bit": False,
        "quant_method": "bitsandbytes",
    }


def bf16_base_to_bnb4(src_dir, dest_dir, quant_type: str = "nf4", nested: bool = True,
                      blocksize: int = 64) -> Path:
    """Re-encode a BF16 GPT-OSS base in the bitsandbytes 4-bit layout; returns ``dest_dir``.

    Each attention projection weight ``model.layers.N.self_attn.{q,k,v,o}_proj.weight`` is replaced by
    the tensors bitsandbytes saves for a ``Params4bit`` (``...weight`` uint8 [n/2, 1],
    ``.absmax``, ``.quant_map``, with ``nested``: ``.nested_absmax``, ``.nested_quant_map``, and
    ``.quant_state.bitsandbytes__{quant_type}`` holding the JSON quant state); everything else
    (embeddings, norms, biases, sinks, router, experts, lm_head) is copied. config.json gains
    :func:`bnb4_quantization_config`.
    """
    src = Path(src_dir)
    dest = Path(dest_dir)

    def convert(name: str, dtype: str, raw: np.ndarray):
        if not _BNB_LINEAR_RE.match(name):
            return [(name, dtype, raw)]
        if dtype != "BF16":
            raise ValueError(f"{name}: expected a BF16 weight, found {dtype}")
        tensors = numerics.encode_bnb_4bit(_bf16_to_f32(raw), quant_type, blocksize, nested,
                                           prefix=name, dtype="bfloat16")
        return [(k, NUMPY_TO_DTYPE[v.dtype], v) for k, v in tensors.items()]

    return _rewrite(src, dest, convert, {"quantization_config": bnb4_quantization_config(quant_type, nested)})
