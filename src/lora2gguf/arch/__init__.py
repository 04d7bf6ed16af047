"""Architecture registry: what lora2gguf knows about each model family, as data.

An architecture module defines an `Architecture` value and registers it; adding a family
means adding one module here (and its fixture test), not editing the pipeline.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Mapping

import gguf
import numpy as np

from ..errors import UnsupportedError

# A layout transform takes a float32 slab of the source tensor (a run of its leading axis)
# and returns one slab per output tensor, in the order of `Rule.outputs`.
Transform = Callable[[np.ndarray], tuple[np.ndarray, ...]]


@dataclass(frozen=True)
class Rule:
    """How one kind of source tensor becomes GGUF tensors.

    `suffix` is matched against the end of the HF tensor name; `outputs` are HF-style names
    (relative to the same prefix) that gguf-py's TensorNameMap turns into GGUF names.
    """

    suffix: str
    transform: str
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class Architecture:
    name: str  # our key, e.g. "gpt_oss"
    hf_architectures: tuple[str, ...]
    model_type: str
    gguf_arch: gguf.MODEL_ARCH
    rules: tuple[Rule, ...]
    transforms: Mapping[str, Transform]
    # 3-D expert parameters PEFT can target, in the order the HF module registers them:
    # PEFT nests its ParamWrappers in this order (the first is the innermost `base_layer`).
    expert_params: tuple[str, ...]
    # (gguf writer method, config keys to try in order, required)
    hparams: tuple[tuple[str, tuple[str, ...], bool], ...]
    # tensors kept in F32 whatever the output type (beyond 1-D tensors and norms)
    f32_tensors: frozenset[gguf.MODEL_TENSOR] = field(default_factory=frozenset)
    chat_format: str = "generic"
    # names of the end-of-generation tokens the chat format needs
    eog_tokens: tuple[str, ...] = ()
    eos_token: str | None = None
    hparam_extras: Callable[[Mapping, "gguf.GGUFWriter"], None] | None = None

    @property
    def gguf_arch_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]

    def rule_for(self, hf_name: str) -> tuple[str, Rule] | None:
        """(prefix, rule) for an HF tensor name that needs a layout transform, else None."""
        for rule in self.rules:
            if hf_name.endswith("." + rule.suffix):
                return hf_name[: -len(rule.suffix)], rule
        return None


_REGISTRY: dict[str, Architecture] = {}


def register(arch: Architecture) -> Architecture:
    _REGISTRY[arch.name] = arch
    return arch


def known() -> dict[str, Architecture]:
    _load_builtin()
    return dict(_REGISTRY)


def for_config(config: Mapping, *, where: str = "config.json") -> Architecture:
    """The architecture of a Hugging Face config, or UnsupportedError naming what is supported."""
    _load_builtin()
    archs = config.get("architectures") or []
    model_type = config.get("model_type")
    for arch in _REGISTRY.values():
        if any(a in arch.hf_architectures for a in archs) or model_type == arch.model_type:
            return arch
    supported = ", ".join(f"{a.hf_architectures[0]} ({a.model_type})" for a in _REGISTRY.values())
    raise UnsupportedError(
        f"{where}: architecture {archs or model_type!r} is not supported by lora2gguf yet. Supported: {supported}."
    )


def _load_builtin() -> None:
    if not _REGISTRY:
        from . import gpt_oss  # noqa: F401  (registers itself)


LAYER_RE = re.compile(r"\.(\d+)\.")


def block_id(name: str) -> int | None:
    m = LAYER_RE.search(name)
    return int(m.group(1)) if m else None
