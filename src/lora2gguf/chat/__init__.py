"""Chat formats: one interface (:class:`~lora2gguf.chat.base.ChatFormat`) for doctor, verify and
report, with two implementations:

- :class:`~lora2gguf.chat.harmony.HarmonyFormat`: GPT-OSS's Harmony, through openai-harmony;
- :class:`~lora2gguf.chat.jinja.JinjaFormat`: the model's own Jinja chat template (ChatML,
  Llama 3, Mistral ``[INST]``, Gemma, Qwen3's ``<think>`` blocks, or any other template),
  rendered as transformers renders it; the families it knows by name for Ollama are data in
  :mod:`lora2gguf.chat.templates`.

A family names its format (``Family.chat_format`` in :mod:`lora2gguf.arch`); :func:`chat_format`
makes it from the family and the tokenizer's template and special tokens.

    fmt = chat_format(family, template=tok.chat_template, specials={"bos_token": "<s>", ...})
    prompt = fmt.render_prompt("What is 2+2?")          # Rendered(text, ids or None)
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from ..errors import UnsupportedError
from ..vocab import token_ids
from .base import (ANSWER, EOS, REASONING, ChatFormat, Issue, Message, OllamaSpec, Parsed, Rendered, StructureResult,
                   TokenizerFacts, TokenizerView)

__all__ = ["ChatFormat", "Parsed", "Rendered", "Message", "Issue", "OllamaSpec", "StructureResult",
           "TokenizerFacts", "TokenizerView", "REASONING", "ANSWER", "chat_format", "tokenizer_facts",
           "STRUCTURE_CHECK", "STRUCTURE_CHECK_ALIASES", "FORMATS"]

#: the suite's check type for "the reply has the structure of the model's chat format"
STRUCTURE_CHECK = "structure"
#: older names of that check type, still accepted in suite files
STRUCTURE_CHECK_ALIASES = ("harmony",)


def _harmony(family: Any, template: str | None, specials: Mapping[str, str | None], where: str) -> ChatFormat:
    from .harmony import HarmonyFormat

    if family is not None and getattr(family, "eog_tokens", ()):
        return HarmonyFormat(family.eog_tokens, family.eos_token or family.eog_tokens[0])
    return HarmonyFormat()


def _jinja(family: Any, template: str | None, specials: Mapping[str, str | None], where: str) -> ChatFormat:
    from .jinja import JinjaFormat

    return JinjaFormat(template, specials, where=where)


#: format name (``Family.chat_format``) -> maker(family, template, specials, where)
FORMATS: dict[str, Callable[[Any, str | None, Mapping[str, str | None], str], ChatFormat]] = {
    "harmony": _harmony,
    "jinja": _jinja,
}


def chat_format(family: Any = None, *, name: str | None = None, template: str | None = None,
                specials: Mapping[str, str | None] | None = None, where: str = "the tokenizer") -> ChatFormat:
    """The chat format of ``family`` (an :class:`lora2gguf.arch.Family`, or ``name``: a
    format name as run.json records it), for a tokenizer whose chat template is ``template``
    and whose special tokens by role are ``specials`` (``{"bos_token": ..., "eos_token": ...}``);
    ``where`` names the tokenizer folder or GGUF in messages."""
    key = name or (getattr(family, "chat_format", None) if family is not None else None) or "jinja"
    maker = FORMATS.get(key)
    if maker is None:
        raise UnsupportedError(f"chat format {key!r} is not one lora2gguf knows ({', '.join(FORMATS)})")
    return maker(family, template, dict(specials or {}), where)


def tokenizer_facts(tok, generation_config: Mapping[str, Any] | None = None,
                    config: Mapping[str, Any] | None = None) -> TokenizerFacts:
    """What doctor's chat checks need of an inspected tokenizer (:class:`lora2gguf.inspect.TokenizerInfo`):
    its template, special tokens, added tokens, and the end-of-generation ids: the EOS (the one the
    GGUF's metadata declares) and the ``eos_token_id`` of the base's generation_config.json and
    config.json (an id or a list; transformers stops on them, llama.cpp reads none of them)."""
    from .jinja import SPECIAL_ROLES

    specials = {role: tok.special(role) for role in SPECIAL_ROLES}
    model = tok.model
    added = dict(model.added) if model is not None else {}
    vocab = model.vocab if model is not None else {}
    eog: dict[int, str] = {}
    eos_id = tok.token_id(specials.get("eos_token"))
    if eos_id is not None:
        eog[eos_id] = EOS
    for name, cfg in (("generation_config.json", generation_config), ("config.json", config)):
        for i in token_ids((cfg or {}).get("eos_token_id")):
            eog.setdefault(i, f"{name} eos_token_id")
    return TokenizerFacts(str(tok.folder), tok.chat_template, tok.chat_template_source, specials, added, vocab, eog)
