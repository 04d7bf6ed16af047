"""Findings: what doctor found, why it matters for the GGUF, and how to fix it.

Every finding has a stable code from :data:`CODES`; the code fixes its severity and title, so
scripts (``--json``) and ``build --accept CODE`` can rely on them across versions. The codes name
no model family or chat format: a chat format raises the shared chat codes (its name and tokens
go in the finding's text and data). A code that was renamed stays accepted by ``--accept``
(:data:`RENAMED`, :func:`accepted_codes`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

BLOCKER = "blocker"
WARNING = "warning"
INFO = "info"
SEVERITIES = (BLOCKER, WARNING, INFO)

# code -> (severity, title). Append new codes; never reuse one; a renamed code goes into RENAMED.
CODES: dict[str, tuple[str, str]] = {
    # tokenizer
    "TOKENIZER_MISMATCH": (BLOCKER, "The adapter's tokenizer gives different token ids than the base's"),
    "TOKENIZER_RESIZED": (WARNING, "The adapter's tokenizer adds tokens and the adapter carries resized embeddings"),
    "TOKENIZER_DIFFERS": (WARNING, "The adapter's tokenizer differs from the base's in special-token or text-processing settings"),
    "TEMPLATE_DIFFERS": (WARNING, "The adapter's chat template differs from the base's"),
    "TOKENIZER_FROM_BASE": (INFO, "The adapter folder has no tokenizer; the base's is used"),
    "TOKENIZER_MISSING": (BLOCKER, "No tokenizer found in the base or the adapter folder"),
    "TOKENIZER_INVALID": (BLOCKER, "A tokenizer file cannot be read"),
    "TOKENIZER_TOO_LARGE": (BLOCKER, "The tokenizer has token ids beyond the model's embedding rows"),
    "TOKENIZER_SAME": (INFO, "The adapter's and the base's tokenizer files are identical"),
    "TOKENIZER_EQUIVALENT": (INFO, "The adapter's tokenizer files differ from the base's but mean the same"),
    # base weights
    "BASE_MXFP4": (INFO, "The base stores its MoE experts as MXFP4"),
    "BASE_BNB_4BIT": (BLOCKER, "The base is a bitsandbytes 4-bit checkpoint"),
    "BASE_BNB_8BIT": (BLOCKER, "The base is a bitsandbytes 8-bit (LLM.int8) checkpoint"),
    "BASE_FP8": (BLOCKER, "The base is an FP8 checkpoint"),
    "BASE_GPTQ": (BLOCKER, "The base is a GPTQ checkpoint"),
    "BASE_AWQ": (BLOCKER, "The base is an AWQ checkpoint"),
    "BASE_COMPRESSED_TENSORS": (BLOCKER, "The base is a compressed-tensors checkpoint"),
    "BASE_QUANTIZED_UNKNOWN": (BLOCKER, "The base declares a quantization lora2gguf does not know"),
    "BASE_INVALID": (BLOCKER, "The base model folder cannot be read"),
    # architecture and tools
    "ARCH_UNSUPPORTED": (BLOCKER, "lora2gguf does not convert this architecture"),
    "LLAMACPP_MISSING": (BLOCKER, "llama-cpp-python is not installed"),
    "LLAMACPP_ARCH_UNKNOWN": (BLOCKER, "The installed llama.cpp does not know this architecture"),
    "TRANSFORMERS_ARCH_UNKNOWN": (INFO, "The installed transformers does not know this architecture (reference checks only)"),
    "VERSIONS": (INFO, "Architecture and tool versions"),
    "REMOTE_CODE": (WARNING, "A config asks for custom Python code (trust_remote_code / auto_map)"),
    # adapter
    "ADAPTER_INVALID": (BLOCKER, "The adapter folder cannot be read"),
    "ADAPTER_UNSUPPORTED_FEATURE": (BLOCKER, "The adapter uses a feature lora2gguf does not merge"),
    "ADAPTER_BASE_MISMATCH": (BLOCKER, "The adapter's tensors do not fit the base model"),
    "ADAPTER_BASE_NAME": (WARNING, "The adapter names a different base model"),
    "ADAPTER_ZERO": (BLOCKER, "The adapter's weights are all zero: merging changes nothing"),
    "ADAPTER_PARTLY_ZERO": (WARNING, "Some LoRA pairs of the adapter are all zero"),
    "ADAPTER_NONFINITE": (BLOCKER, "The adapter's weights contain NaN or Inf"),
    "ADAPTER_SUMMARY": (INFO, "Adapter summary"),
    "ADAPTER_FULL_WEIGHTS": (INFO, "The adapter replaces base tensors with full weights or trained rows"),
    # chat format
    "CHAT_TEMPLATE_MISSING": (BLOCKER, "No chat template"),
    "CHAT_TEMPLATE_WRONG_FORMAT": (BLOCKER, "The chat template is not the chat format the architecture needs"),
    "CHAT_TEMPLATE_NO_EOG": (BLOCKER, "The chat template never ends a turn with an end-of-generation token"),
    "EOS_NOT_EOG": (BLOCKER, "The EOS token is not an end-of-generation token of the chat format"),
    "EOS_NOT_ANSWER_END": (WARNING, "The EOS token is not the chat format's end-of-answer token"),
    "EOG_TOKEN_MISSING": (BLOCKER, "An end-of-generation token of the chat format is missing from the vocabulary"),
    "CHAT_TEMPLATE_INVALID": (BLOCKER, "The chat template fails to render a plain conversation"),
    "TURN_END_NOT_EOG": (BLOCKER, "The token that ends an assistant turn in the template is not an end-of-generation token"),
    "CHAT_FORMAT": (INFO, "The chat format and the token that ends an assistant turn"),
    "TURN_END_NOT_IN_GGUF": (WARNING, "The token that ends an assistant turn is an end-of-generation token only in the model's configs, not in the GGUF"),
    # resources
    "DISK_SPACE": (BLOCKER, "Not enough free disk space for the outputs or the download"),
    "DISK_SPACE_LOW": (WARNING, "Free disk space is only just enough"),
    "RESOURCES": (INFO, "Bytes to read and write, memory and time"),
    "OUTPUT_TYPE_UNKNOWN": (BLOCKER, "A requested output type is not a llama.cpp file type"),
    # tokenizer -> GGUF vocabulary (doctor/vocab_checks.py)
    "TOKENIZER_PRE_UNKNOWN": (BLOCKER, "llama.cpp does not recognise the tokenizer's pre-tokenizer"),
    "TOKENIZER_PRE_BY_PATTERN": (INFO, "The pre-tokenizer is known by its split pattern, not by llama.cpp's hash"),
    "TOKENIZER_SENTENCEPIECE_MISSING": (BLOCKER, "A SentencePiece tokenizer converted to tokenizer.json lacks its tokenizer.model"),
    "TOKENIZER_VOCAB": (INFO, "The GGUF vocabulary: tokenizer file, model, pre-tokenizer, end-of-generation ids"),
}

#: old code -> the code it became: the first versions named one chat format in these two
RENAMED: dict[str, str] = {
    "CHAT_TEMPLATE_NOT_HARMONY": "CHAT_TEMPLATE_WRONG_FORMAT",
    "EOS_NOT_RETURN": "EOS_NOT_ANSWER_END",
}


def accepted_codes(codes: Iterable[str]) -> set[str]:
    """The codes ``--accept`` names, in upper case, each renamed one as its current code too (so
    a script written for an older version still accepts the same finding)."""
    out = {c.strip().upper() for c in codes}
    return out | {RENAMED[c] for c in out if c in RENAMED}


@dataclass
class Finding:
    code: str
    severity: str
    title: str
    what: str
    why: str
    fix: str
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "severity": self.severity, "title": self.title, "what": self.what,
                "why": self.why, "fix": self.fix, "data": self.data}


def make(code: str, what: str, why: str = "", fix: str = "", data: dict[str, Any] | None = None) -> Finding:
    """A finding with the severity and title that :data:`CODES` fixes for ``code``."""
    severity, title = CODES[code]
    return Finding(code, severity, title, what, why, fix, dict(data or {}))


def sort_key(f: Finding) -> tuple[int, str]:
    return SEVERITIES.index(f.severity), f.code
