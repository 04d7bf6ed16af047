"""A PEFT LoRA adapter: its config read strictly, and every adapter tensor matched to the base
tensor it changes. Nothing is silently ignored: an adapter feature lora2gguf does not merge
yet stops here with an error that names it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from . import lora
from .arch import Architecture
from .errors import FormatError, InputError, UnsupportedError
from .jsonfile import read_json_object
from .safetensors_io import Checkpoint, TensorInfo

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."

# adapter_config fields that change what the merge must do; a truthy value we do not handle stops the run
UNSUPPORTED_FEATURES: dict[str, str] = {
    "use_dora": "DoRA (weight-decomposed LoRA)",
    "lora_bias": "LoRA bias terms (lora_bias)",
    "modules_to_save": "fully trained modules (modules_to_save)",
    "trainable_token_indices": "trainable token embeddings (trainable_token_indices)",
    "layer_replication": "layer replication",
    "use_qalora": "QA-LoRA",
    "use_bdlora": "block-diagonal LoRA",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "velora_config": "VeLoRA",
    "kasa_config": "KaSA",
}


@dataclass(frozen=True)
class LoraTerm:
    """One LoRA pair and the base tensor it changes: target += scale * (B @ A in target's layout)."""

    target: str  # HF name of the base tensor, e.g. model.layers.0.self_attn.q_proj.weight
    key: str  # adapter key prefix, for messages
    a: TensorInfo
    b: TensorInfo
    rank: int
    alpha: float
    scale: float
    kind: str  # "linear" or "experts"
    num_experts: int = 1
    fan_in_fan_out: bool = False


@dataclass
class Adapter:
    folder: Path
    config: dict[str, Any]
    checkpoint: Checkpoint
    terms: dict[str, list[LoraTerm]] = field(default_factory=dict)

    @property
    def all_terms(self) -> list[LoraTerm]:
        return [t for ts in self.terms.values() for t in ts]

    @property
    def use_rslora(self) -> bool:
        return bool(self.config.get("use_rslora"))


def read_config(folder: Path) -> dict[str, Any]:
    return read_json_object(Path(folder) / CONFIG_NAME,
                            missing="is this a PEFT adapter folder (saved with save_pretrained)?")


def check_config(config: Mapping[str, Any], path: Path) -> None:
    """Raise for adapter types and features that the merge does not handle."""
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise UnsupportedError(f"{path}: peft_type is {peft_type!r}; lora2gguf merges LoRA adapters only (peft_type LORA).")
    for key, label in UNSUPPORTED_FEATURES.items():
        if config.get(key):
            raise UnsupportedError(
                f"{path}: the adapter uses {label} ({key}={config[key]!r}), which lora2gguf does not merge yet. "
                "Merge it with PEFT (merge_and_unload) and convert the merged model, or retrain without it."
            )
    for key, kind in (("r", int), ("lora_alpha", (int, float))):
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value) or value <= 0:
            raise InputError(f"{path}: field {key!r} is {value!r}, expected a positive number")
    for key in ("rank_pattern", "alpha_pattern"):
        value = config.get(key) or {}
        if not isinstance(value, dict):
            raise InputError(f"{path}: field {key!r} is {value!r}, expected an object")


def _split_key(key: str) -> tuple[str, str, int]:
    """'base_model.model.X.base_layer.lora_A.weight' -> ('X', 'A', nesting depth 1)."""
    name = key[len(KEY_PREFIX):] if key.startswith(KEY_PREFIX) else key
    for which in ("A", "B"):
        suffix = f".lora_{which}.weight"
        if name.endswith(suffix):
            module = name[: -len(suffix)]
            depth = 0
            while module.endswith(".base_layer"):
                module = module[: -len(".base_layer")]
                depth += 1
            return module, which, depth
    raise UnsupportedError(
        f"adapter tensor {key!r} is not a LoRA A/B matrix (lora_A.weight / lora_B.weight); "
        "embedding LoRA, extra saved modules and other adapter kinds are not merged yet"
    )


def _targets_param(config: Mapping[str, Any], key: str) -> bool:
    return any(key == t or key.endswith("." + t) for t in (config.get("target_parameters") or []))


def load_adapter(folder: Path | str, base_shapes: Mapping[str, tuple[int, ...]], arch: Architecture) -> Adapter:
    """Read an adapter folder and match each A/B pair to a base tensor, checking shapes.

    `base_shapes` maps the base model's tensor names (as the BF16 checkpoint names them) to
    shapes.
    """
    folder = Path(folder)
    config = read_config(folder)
    check_config(config, folder / CONFIG_NAME)
    if not (folder / WEIGHTS_NAME).exists() and (folder / "adapter_model.bin").exists():
        raise InputError(
            f"{folder / 'adapter_model.bin'}: a pickle file, which lora2gguf never unpickles (it can run code). "
            "Save the adapter as safetensors: model.save_pretrained(DIR, safe_serialization=True), or convert: "
            "python -c \"import torch; from safetensors.torch import save_file; "
            "save_file(torch.load('adapter_model.bin', weights_only=True), 'adapter_model.safetensors')\""
        )
    ckpt = Checkpoint.open(folder, single_name=WEIGHTS_NAME, index_name="adapter_model.safetensors.index.json")
    pairs: dict[tuple[str, int], dict[str, tuple[str, TensorInfo]]] = {}
    for key, info in ckpt.tensors.items():
        try:
            module, which, depth = _split_key(key)
        except UnsupportedError as e:
            raise UnsupportedError(f"{folder / WEIGHTS_NAME}: {e}") from None
        pairs.setdefault((module, depth), {})[which] = (key, info)

    r0, alpha0 = config["r"], config["lora_alpha"]
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    rslora = bool(config.get("use_rslora"))
    fifo = bool(config.get("fan_in_fan_out"))
    where = folder / WEIGHTS_NAME
    adapter = Adapter(folder, dict(config), ckpt)
    for (module, depth), ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            missing = ({"A", "B"} - set(ab)).pop()
            raise FormatError(f"{where}: {module} has lora_{'AB'.replace(missing, '')} but no lora_{missing}")
        (a_key, a), (b_key, b) = ab["A"], ab["B"]
        if len(a.shape) != 2 or len(b.shape) != 2:
            raise FormatError(f"{where}: {a_key} and {b_key} must be 2-D, got {a.shape} and {b.shape}")
        linear_target = f"{module}.weight"
        if depth == 0 and linear_target in base_shapes:
            shape = base_shapes[linear_target]
            out_f, in_f = (shape[1], shape[0]) if fifo else (shape[0], shape[1])
            r = int(lora.pattern_value(rank_pattern, module, r0))
            alpha = float(lora.pattern_value(alpha_pattern, module, alpha0))
            if a.shape != (r, in_f) or b.shape != (out_f, r):
                raise InputError(
                    f"{where}: {module}: lora_A {a.shape} / lora_B {b.shape} do not fit the base weight "
                    f"{linear_target} {shape} with rank {r}. Is this adapter for another model or size?"
                )
            term = LoraTerm(linear_target, module, a, b, r, alpha, lora.scaling(alpha, r, rslora), "linear",
                            fan_in_fan_out=fifo)
        else:
            targeted = [p for p in arch.expert_params
                        if f"{module}.{p}" in base_shapes and _targets_param(config, f"{module}.{p}")]
            if depth >= len(targeted):
                raise InputError(
                    f"{where}: adapter tensors for {module!r} match no tensor of the base model "
                    f"(looked for {linear_target!r} and the expert parameters {list(arch.expert_params)} named in "
                    "target_parameters). Is this adapter for another model?"
                )
            param = targeted[len(targeted) - 1 - depth]
            target = f"{module}.{param}"
            shape = base_shapes[target]
            if len(shape) != 3:
                raise InputError(f"{where}: {target} has shape {shape}; expected (experts, in, out)")
            n_exp, in_f, out_f = shape
            r = int(lora.pattern_value(rank_pattern, target, r0))
            alpha = float(lora.pattern_value(alpha_pattern, target, alpha0))
            if a.shape != (r * n_exp, in_f) or b.shape != (out_f, r * n_exp):
                raise InputError(
                    f"{where}: {a_key} {a.shape} / {b_key} {b.shape} do not fit {target} {shape} "
                    f"({n_exp} experts, rank {r}: expected A {(r * n_exp, in_f)}, B {(out_f, r * n_exp)}). "
                    "Is this adapter for another model, or another expert count?"
                )
            term = LoraTerm(target, a_key.rsplit(".lora_A", 1)[0], a, b, r, alpha,
                            lora.scaling(alpha, r, rslora), "experts", num_experts=n_exp)
        adapter.terms.setdefault(term.target, []).append(term)
    if not adapter.terms:
        raise InputError(f"{where}: holds no LoRA tensors")
    return adapter
