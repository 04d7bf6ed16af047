"""Architecture registry: what lora2gguf knows about each model family, as data.

A family module (``arch/llama.py``, ``arch/qwen.py``, ...) defines one or more :class:`Family`
values and registers them; adding a family means adding one module here (and its fixture
tests), not editing the pipeline. A family is data plus a few named override points:

- ``rules``: which Hugging Face tensors need a layout operation (layout.py) and which GGUF
  tensors they become (names through gguf-py's TensorNameMap); every other tensor is a rename;
- ``config_defaults`` / ``derived``: the values transformers' config class fills in when a key
  is absent from config.json (llama.cpp's converter reads the config through ``AutoConfig``, so
  they decide the GGUF as much as config.json does);
- ``hparams``: the GGUF keys beyond the ones every text model gets (:mod:`lora2gguf.hparams`);
  ``common_hparams`` False when llama.cpp's converter writes the family's keys itself, without
  the common ones (``hparams`` then writes every key);
- ``generated``: tensors made from the config alone (Llama 3's ``rope_freqs``), written first;
- ``f32_tensors``: tensors kept in F32 whatever the output type (routers);
- ``skip_suffixes`` / ``skip_prefixes``: HF tensors the GGUF does not hold (not model weights,
  a tensor llama.cpp's architecture has no place for; a multimodal checkpoint's vision tower and
  projector, which llama.cpp keeps in a separate mmproj file); ``rename_prefixes``: HF name
  prefixes replaced before the GGUF name lookup (a multimodal checkpoint's text model under
  ``model.language_model.``); ``module_aliases``: module prefixes transformers renames on loading
  (an adapter names the loaded model's modules, the base's files may use the other name);
- ``expert_params``: 3-D expert parameters PEFT can target (``target_parameters``), in the order
  the HF module registers them (PEFT nests its ParamWrappers in that order), and their
  ``expert_layout``; ``wrapped_params``: those and the 2-D parameters beside them (GPT-OSS's expert
  biases), in registration order; ``stacks``: per-expert checkpoint tensors stacked into one GGUF tensor;
  ``fused``: how transformers 5.x's fused expert parameters relate to the per-expert tensors;
- ``chat_format`` and its end-of-generation tokens; ``vocab_options``: which tokenizer kinds the
  converter tries, in which order, and the few per-family quirks (lora2gguf.vocab.VocabOptions).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import gguf
import numpy as np

from ..errors import UnsupportedError
from ..layout import LayoutOp


@dataclass(frozen=True)
class Rule:
    """HF tensors whose name ends with ``suffix`` go through ``op``; ``outputs`` are HF-style names
    (relative to the same prefix) that gguf-py's TensorNameMap turns into GGUF names, one per
    output of the op (empty: the tensor's own name)."""

    suffix: str
    op: LayoutOp
    outputs: tuple[str, ...] = ()


@dataclass(frozen=True)
class Stack:
    """Per-expert tensors stacked into one 3-D GGUF tensor: the HF tensors ``template`` names for
    experts 0..n-1 (``{e}`` the expert index, relative to a layer's prefix) become the output
    ``output`` (an HF-style name gguf-py's TensorNameMap knows), expert ``e`` its matrix ``e``."""

    template: str  # e.g. "mlp.experts.{e}.gate_proj.weight"
    output: str  # e.g. "mlp.experts.gate_proj.weight"

    def match(self, name: str) -> tuple[str, int] | None:
        """(layer prefix, expert index) when ``name`` is one of the stacked tensors."""
        head, _, tail = self.template.partition("{e}")
        m = re.search(re.escape(head) + r"(\d+)" + re.escape(tail) + "$", name)
        if m is None:
            return None
        return name[: m.start()], int(m.group(1))


@dataclass(frozen=True)
class Fused:
    """A 3-D expert parameter as transformers 5.x holds it (and PEFT's ``target_parameters``
    target it): expert ``e``'s matrix is the per-expert tensors ``parts`` (``{e}`` the index)
    one above the other, in rows. Lets an adapter made for one layout merge into the other."""

    name: str  # e.g. "mlp.experts.gate_up_proj"
    parts: tuple[str, ...]  # e.g. ("mlp.experts.{e}.gate_proj.weight", "mlp.experts.{e}.up_proj.weight")


# config -> {GGUF name: float32 values}: tensors made from the config alone
Generated = Callable[[Mapping[str, Any]], dict[str, np.ndarray]]
# (config, put) -> None: extra GGUF keys; put(method, value, config key) checks and writes
HParams = Callable[[Mapping[str, Any], Callable[[str, Any, str], None]], None]


#: HF tensor name suffixes that are not model weights (llama.cpp's converter skips them too)
NOT_WEIGHTS = (".rotary_emb.inv_freq", ".attention.masked_bias", ".attention.bias")


@dataclass(frozen=True)
class Family:
    name: str  # our key, e.g. "llama"
    hf_architectures: tuple[str, ...]
    model_types: tuple[str, ...]
    gguf_arch: gguf.MODEL_ARCH
    rules: tuple[Rule, ...] = ()
    config_defaults: Mapping[str, Any] = field(default_factory=dict)
    # (key, function of the config) filled in when the key is absent or None, in order
    derived: tuple[tuple[str, Callable[[Mapping[str, Any]], Any]], ...] = ()
    hparams: HParams | None = None
    # False: llama.cpp's converter writes none of the common text-model keys for this family
    # (its set_gguf_parameters starts from scratch): ``hparams`` writes every key
    common_hparams: bool = True
    generated: Generated | None = None
    f32_tensors: frozenset[gguf.MODEL_TENSOR] = field(default_factory=frozenset)
    expert_params: tuple[str, ...] = ()
    # every parameter of the experts module PEFT can target, in the order the module registers them
    # (PEFT nests its ParamWrappers in that order): the expert_params and the 2-D ones beside them
    # (GPT-OSS's expert biases, each one matrix to PEFT); empty: the expert_params alone
    wrapped_params: tuple[str, ...] = ()
    # how the 3-D expert parameters hold each expert's matrix: "in_out" (x @ W[e], GPT-OSS) or
    # "out_in" (a Linear's weight, W[e] @ x); it decides the orientation of PEFT's expert deltas
    expert_layout: str = "in_out"
    stacks: tuple[Stack, ...] = ()
    fused: tuple[Fused, ...] = ()
    # HF tensor name suffixes that are not model weights (llama.cpp's converter skips them too)
    skip_suffixes: tuple[str, ...] = NOT_WEIGHTS
    # HF tensor name prefixes of another modality (vision tower, projector): not in the text GGUF
    skip_prefixes: tuple[str, ...] = ()
    # (old, new) HF name prefixes, replaced before the GGUF name lookup
    rename_prefixes: tuple[tuple[str, str], ...] = ()
    # (loaded model's prefix, checkpoint's prefix): transformers renames these modules when it
    # loads a checkpoint, so an adapter may name them one way and the base's files the other
    module_aliases: tuple[tuple[str, str], ...] = ()
    chat_format: str = "jinja"
    # end-of-generation tokens the chat format itself needs (Harmony's), and its EOS
    eog_tokens: tuple[str, ...] = ()
    eos_token: str | None = None
    # tokenizer options for lora2gguf.vocab: a VocabOptions, or a function of the config giving one
    # (None: the vocabulary writer's defaults, a BPE tokenizer.json)
    vocab_options: Any = None
    checked: str = ""  # what the tests check for this family (README's table)

    @property
    def gguf_arch_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]

    def rule_for(self, hf_name: str) -> tuple[str, Rule] | None:
        """(prefix, rule) for an HF tensor name that needs a layout operation, else None."""
        for rule in self.rules:
            if hf_name.endswith("." + rule.suffix) or hf_name == rule.suffix:
                return hf_name[: len(hf_name) - len(rule.suffix)], rule
        return None

    def fused_shapes(self, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        """The shapes of the fused expert parameters (``fused``) of a per-expert checkpoint, per
        layer: what an adapter trained on transformers 5.x's fused experts targets."""
        out: dict[str, tuple[int, ...]] = {}
        for f in self.fused:
            first = f.parts[0].format(e=0)
            for name in shapes:
                if not name.endswith(first):
                    continue
                prefix = name[: -len(first)]
                n = 0
                while all(prefix + p.format(e=n) in shapes for p in f.parts):
                    n += 1
                mats = [shapes[prefix + p.format(e=0)] for p in f.parts]
                if n and all(len(m) == 2 and m[1] == mats[0][1] for m in mats):
                    out[prefix + f.name] = (n, sum(m[0] for m in mats), mats[0][1])
        return out

    def skipped(self, hf_name: str) -> str | None:
        """Why the GGUF does not hold an HF tensor ("weights": not a weight of llama.cpp's
        architecture; "modality": another modality's), or None when it does."""
        if self.skip_prefixes and hf_name.startswith(self.skip_prefixes):
            return "modality"
        if hf_name.endswith(self.skip_suffixes):
            return "weights"
        return None

    def text_name(self, hf_name: str) -> str:
        """The HF name as the GGUF name lookup takes it (``rename_prefixes`` applied)."""
        for old, new in self.rename_prefixes:
            if hf_name.startswith(old):
                return new + hf_name[len(old):]
        return hf_name

    def alias_renames(self, names) -> tuple[tuple[str, str], ...]:
        """(prefix, replacement) pairs that turn an adapter's module names into the names a
        checkpoint holding ``names`` uses (each alias in the direction the checkpoint needs)."""
        names = list(names)
        out = []
        for loaded, saved in self.module_aliases:
            has_loaded = any(n.startswith(loaded) for n in names)
            has_saved = any(n.startswith(saved) for n in names)
            if has_saved and not has_loaded:
                out.append((loaded, saved))
            elif has_loaded and not has_saved:
                out.append((saved, loaded))
        return tuple(out)

    def vocab_for(self, config: Mapping[str, Any]):
        """The vocabulary options for this config (lora2gguf.vocab.VocabOptions or None)."""
        return self.vocab_options(config) if callable(self.vocab_options) else self.vocab_options

    def normalize_config(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """config.json as llama.cpp's converter sees it through transformers' AutoConfig: the
        family's defaults for absent keys, derived values (head_dim), a text_config lifted up."""
        cfg = dict(config)
        text = cfg.get("text_config")
        if isinstance(text, dict):
            cfg = {**cfg, **text}
        for key, value in self.config_defaults.items():
            if key not in cfg:
                cfg[key] = value
        for key, fn in self.derived:
            if cfg.get(key) is None:
                try:
                    cfg[key] = fn(cfg)
                except (KeyError, TypeError, ZeroDivisionError):
                    pass  # hparams' validation names the missing field
        return cfg


_REGISTRY: dict[str, Family] = {}
_MODULES = ("gpt_oss", "llama", "qwen", "qwen_moe", "mixtral", "gemma", "phi3")


def register(family: Family) -> Family:
    _REGISTRY[family.name] = family
    return family


def known() -> dict[str, Family]:
    _load_builtin()
    return dict(_REGISTRY)


def supported_text() -> str:
    """The supported families, for messages: 'LlamaForCausalLM (llama), ...'."""
    return ", ".join(f"{', '.join(a.hf_architectures)} ({a.name})" for a in known().values())


def for_config(config: Mapping, *, where: str = "config.json") -> Family:
    """The family of a Hugging Face config, or UnsupportedError naming what is supported."""
    _load_builtin()
    archs = config.get("architectures") or []
    model_type = config.get("model_type")
    for fam in _REGISTRY.values():
        if any(a in fam.hf_architectures for a in archs):
            return fam
    if not archs:
        for fam in _REGISTRY.values():
            if model_type in fam.model_types:
                return fam
    raise UnsupportedError(
        f"{where}: architecture {archs or model_type!r} is not supported by lora2gguf yet. Supported: "
        f"{supported_text()}."
    )


def _load_builtin() -> None:
    if not _REGISTRY:
        import importlib

        for mod in _MODULES:
            importlib.import_module(f"{__name__}.{mod}")  # each registers itself


# Architecture is the old name of Family (the registry's values)
Architecture = Family

LAYER_RE = re.compile(r"\.(\d+)\.")


def block_id(name: str) -> int | None:
    m = LAYER_RE.search(name)
    return int(m.group(1)) if m else None
