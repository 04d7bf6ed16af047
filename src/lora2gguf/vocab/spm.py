"""A SentencePiece tokenizer.model -> tokens, scores and token types (GGUF
``tokenizer.ggml.model`` for SentencePiece, ``tokenizer.ggml.pre = default``), as llama.cpp's
converter's ``_set_vocab_sentencepiece`` writes them.

Every piece with its score; its type from the model (unknown, control, unused, byte, else
normal); then the added tokens: added_tokens.json's as user-defined, tokenizer_config.json's
``added_tokens_decoder`` as control (``special`` or looking special) or user-defined
(SentencePiece's ``\u2581`` written as a space), both with score -1000; ids the model and the
added tokens leave free up to the embedding rows are ``[PAD{i}]`` (unused, score -10000).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import gguf

from ..errors import FormatError, InputError, UnsupportedError
from ..jsonfile import read_json_object
from .common import SENTENCEPIECE, SPIECE_UNDERLINE, Vocab, looks_special, too_large
from .pre import TOKENIZER_MODELS

MODEL_FILE = "tokenizer.model"


def _looks_like_tiktoken(raw: bytes) -> bool:
    """A tiktoken rank file (``base64 rank`` lines), as some repositories ship in original/tokenizer.model."""
    lines = raw[:4096].splitlines()[:8]
    return bool(lines) and all(len(parts := line.split(b" ")) == 2 and parts[1].isdigit() for line in lines)


def load_sentencepiece(path: Path):
    """A ``sentencepiece.SentencePieceProcessor`` for the model at ``path``; FormatError naming
    the file when it is not a SentencePiece model."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: missing")
    try:
        import sentencepiece
    except ImportError as e:
        raise UnsupportedError(f"{path}: reading a SentencePiece tokenizer needs the sentencepiece package: "
                               "pip install sentencepiece") from e
    raw = path.read_bytes()
    sp = sentencepiece.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(raw)
        ok = sp.vocab_size() > 0
        problem = "it has no pieces"
    except Exception as e:  # sentencepiece raises RuntimeError / OSError with a C++ status text
        ok, problem = False, str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if not ok:
        if _looks_like_tiktoken(raw):
            raise FormatError(f"{path}: not a SentencePiece model but a tiktoken rank file (as some "
                              "repositories ship in original/); remove it from the folder: the tokenizer.json beside it "
                              "is the tokenizer to convert")
        raise FormatError(f"{path}: not a SentencePiece model ({problem}); download it again, or copy the "
                          "tokenizer.model of the model you fine-tuned from")
    return sp


def _added_tokens_json(folder: Path) -> dict[str, int]:
    path = folder / "added_tokens.json"
    if not path.is_file():
        return {}
    data = read_json_object(path, missing="")
    if not all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0
               for k, v in data.items()):
        raise FormatError(f"{path}: expected a map of token text to integer id")
    return data


def _added_tokens_decoder(tokenizer_config: Mapping[str, Any], folder: Path) -> list[tuple[int, dict[str, Any]]]:
    path = folder / "tokenizer_config.json"
    decoder = tokenizer_config.get("added_tokens_decoder") or {}
    if not isinstance(decoder, dict):
        raise FormatError(f"{path}: added_tokens_decoder is not an object")
    out = []
    for key, entry in decoder.items():
        try:
            i = int(key)
        except ValueError:
            raise FormatError(f"{path}: added_tokens_decoder key {key!r} is not a token id") from None
        if i < 0 or not isinstance(entry, dict) or not isinstance(entry.get("content"), str):
            raise FormatError(f"{path}: added_tokens_decoder[{key!r}] lacks a content string")
        out.append((i, entry))
    return out


def _tokenizer_json_added(folder: Path) -> list[tuple[int, dict[str, Any]]]:
    """tokenizer.json's added tokens as (id, entry) ([] without a tokenizer.json)."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        return []
    from .bpe import load_tokenizer_json

    added = load_tokenizer_json(folder).get("added_tokens") or []
    out = []
    for entry in added if isinstance(added, list) else []:
        i = entry.get("id") if isinstance(entry, dict) else None
        if isinstance(i, bool) or not isinstance(i, int) or i < 0 or not isinstance(entry.get("content"), str):
            raise FormatError(f"{path}: an added token without an id and a content string: {entry!r}")
        out.append((i, entry))
    return out


def sentencepiece_vocab(folder: Path, vocab_size: int, tokenizer_config: Mapping[str, Any] | None = None, *,
                        added_types_from_special: bool = False) -> Vocab:
    """The tokens, scores and types of ``folder``'s tokenizer.model and added tokens for a model
    with ``vocab_size`` embedding rows; InputError for a token id at or past it.
    ``added_types_from_special``: see :class:`lora2gguf.vocab.VocabOptions`."""
    folder = Path(folder)
    path = folder / MODEL_FILE
    sp = load_sentencepiece(path)
    n = sp.vocab_size()
    if n > vocab_size:
        raise too_large(path, n - 1, sp.IdToPiece(n - 1), vocab_size)
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [int(gguf.TokenType.UNUSED)] * vocab_size
    for i in range(n):
        if sp.IsUnknown(i):
            t = gguf.TokenType.UNKNOWN
        elif sp.IsControl(i):
            t = gguf.TokenType.CONTROL
        elif sp.IsUnused(i):
            t = gguf.TokenType.UNUSED
        elif sp.IsByte(i):
            t = gguf.TokenType.BYTE
        else:
            t = gguf.TokenType.NORMAL
        tokens[i], scores[i], types[i] = sp.IdToPiece(i), sp.GetScore(i), int(t)

    added: dict[str, int] = {}
    from_json = _added_tokens_json(folder)
    extra = [(i, content, "added_tokens.json") for content, i in from_json.items()]
    decoder = _added_tokens_decoder(tokenizer_config or {}, folder)
    extra += [(i, entry["content"], "tokenizer_config.json") for i, entry in decoder]
    if added_types_from_special:
        from_tj = _tokenizer_json_added(folder)
        extra += [(i, entry["content"], "tokenizer.json") for i, entry in from_tj]
        decoder += from_tj
    if extra and max(extra)[0] >= vocab_size:  # the largest id past the rows, and the file that has it
        i, content, name = max(extra)
        raise too_large(folder / name, i, content, vocab_size)
    for content, i in from_json.items():
        tokens[i], scores[i], types[i] = content, -1000.0, int(gguf.TokenType.USER_DEFINED)
        added[content] = i
    for i, entry in decoder:
        content = entry["content"]
        if added_types_from_special:
            types[i] = int(gguf.TokenType.CONTROL if entry.get("special") else gguf.TokenType.USER_DEFINED)
            tokens[i] = content
        elif entry.get("special") or looks_special(content):
            types[i] = int(gguf.TokenType.CONTROL)
            tokens[i] = content
        else:
            types[i] = int(gguf.TokenType.USER_DEFINED)
            tokens[i] = content.replace(SPIECE_UNDERLINE, " ")
        scores[i] = -1000.0
        added[content] = i
    return Vocab(tokens, types, "default", added, kind=SENTENCEPIECE, model=TOKENIZER_MODELS[SENTENCEPIECE], scores=scores,
                 pre_how="sentencepiece", source=path)


def pieces(path: Path) -> dict[str, int]:
    """piece -> id of a tokenizer.model (for doctor's comparison of two tokenizers)."""
    sp = load_sentencepiece(path)
    return {sp.IdToPiece(i): i for i in range(sp.vocab_size())}
