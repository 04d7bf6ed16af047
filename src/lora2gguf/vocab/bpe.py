"""A byte-level BPE tokenizer.json -> tokens, token types, merges and the pre-tokenizer name
(GGUF ``tokenizer.ggml.model = gpt2``), as llama.cpp's converter's ``_set_vocab_gpt2`` writes them.

Tokens and types as the converter derives them (``get_vocab_base``): ids the tokenizer does not
use become ``[PAD{i}]`` (unused) up to the model's embedding rows; an added token is a control
token when it is ``special`` or looks special (``<|...|>``), else user-defined (SentencePiece's
``\u2581`` written as a space); an added token that is not ``normalized`` is written as
decode(encode(token)). Read from tokenizer.json directly (no transformers).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import gguf

from .. import jsonfile
from ..errors import FormatError, UnsupportedError
from ..jsonfile import read_json_object
from . import pre as pre_mod
from .common import BPE, SPIECE_UNDERLINE, Vocab, looks_special, too_large
from .pre import TOKENIZER_MODELS


def load_tokenizer_json(folder: Path) -> dict:
    path = Path(folder) / "tokenizer.json"
    data = read_json_object(path, missing="lora2gguf needs the fast tokenizer file to write the GGUF vocabulary",
                            hint="download it again", keep=True)
    if not isinstance(data.get("model"), dict):
        raise FormatError(f"{path}: no 'model' object; not a Hugging Face tokenizer.json")
    return data


def _bytelevel_post_processor(data: dict) -> bool:
    proc = data.get("post_processor") or {}
    procs = proc.get("processors", []) if proc.get("type") == "Sequence" else [proc]
    return any(isinstance(p, dict) and p.get("type") == "ByteLevel" for p in procs)


def _added_tokens(data: Mapping[str, Any], path: Path) -> list[dict[str, Any]]:
    out = []
    for entry in data.get("added_tokens") or []:
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), int) or not isinstance(entry.get("content"), str):
            raise FormatError(f"{path}: an added_tokens entry lacks an integer id or a content string: {entry!r}")
        out.append(entry)
    return out


def _normalized(entry: Mapping[str, Any]) -> bool:
    """An added token's ``normalized`` flag (the tokenizers library's default: not special)."""
    return bool(entry.get("normalized", not entry.get("special", False)))


def vocab_of(data: dict, path: Path, vocab_size: int) -> Vocab:
    """The tokens, token types, merges and pre-tokenizer of a parsed tokenizer.json (``path`` is
    for messages). UnsupportedError if llama.cpp does not know the pre-tokenizer; InputError for a
    token id at or past ``vocab_size``."""
    model = data["model"]
    if model.get("type") != "BPE":
        raise UnsupportedError(f"{path}: tokenizer model {model.get('type')!r}; lora2gguf converts byte-level BPE "
                               "tokenizer.json files and SentencePiece tokenizer.model files")
    vocab = model.get("vocab")
    if not isinstance(vocab, dict):
        raise FormatError(f"{path}: model.vocab is not a map of tokens to integer ids")
    merges, probe, load_error, pre = _analysed(data, path)  # malformed merges: a FormatError first
    added_entries = _added_tokens(data, path)
    reverse: dict[int, str] = dict(zip(vocab.values(), vocab.keys()))  # the last token of an id wins, as a loop
    for entry in added_entries:
        reverse[entry["id"]] = entry["content"]
    if reverse and max(reverse) >= vocab_size:
        i = max(reverse)
        raise too_large(path, i, reverse[i], vocab_size)

    if pre.name is None:
        if load_error is not None:
            raise load_error
        raise UnsupportedError(pre_mod.unknown_message(path, pre))

    added: dict[str, int] = {}
    by_id: dict[int, dict[str, Any]] = {}
    for entry in added_entries:
        added[entry["content"]] = entry["id"]
        by_id[entry["id"]] = entry
    # every id a plain token of the model (NORMAL) at first, in C-level passes (a Python loop over
    # 128k-200k ids took ~0.3 s); then the ids without a token, and those of added tokens (or of
    # a model token with an added token's text), each as the converter treats it
    tokens: list = list(map(reverse.get, range(vocab_size)))
    types: list[int] = [gguf.TokenType.NORMAL] * vocab_size
    if None in tokens:
        for i in [i for i, tok in enumerate(tokens) if tok is None]:
            tokens[i] = f"[PAD{i}]"
            types[i] = gguf.TokenType.UNUSED
    maybe_added = set(by_id) | {vocab[t] for t in added.keys() & vocab.keys()}
    for i in sorted(i for i in maybe_added if isinstance(i, int) and 0 <= i < vocab_size):
        tok = reverse.get(i)
        if tok is None:
            continue
        entry = by_id.get(i)
        if entry is None and tok in added:  # the same text as an added token, at another id
            entry = by_id[added[tok]]
        if entry is None:
            continue
        if not _normalized(entry) and probe is not None:
            tok = probe.roundtrip(tok)
        if entry.get("special") or looks_special(tok):
            types[i] = gguf.TokenType.CONTROL
        else:
            tok = tok.replace(SPIECE_UNDERLINE, " ")
            types[i] = gguf.TokenType.USER_DEFINED
        tokens[i] = tok
    return Vocab(tokens, types, pre.name, added, kind=BPE, model=TOKENIZER_MODELS[BPE], pre_how=pre.how, chkhsh=pre.chkhsh,
                 source=path, merges=merges)


def identify_pre(data: dict, path: Path) -> pre_mod.PreTokenizer:
    """llama.cpp's name for a parsed tokenizer.json's pre-tokenizer (``name`` None: unknown)."""
    return _analysed(data, path)[3]


def _analysed(data: dict, path: Path) -> tuple[list[str], pre_mod.Probe | None, FormatError | None, pre_mod.PreTokenizer]:
    """merges_of(data), the tokenizers-library probe (with the added tokens that are not
    normalized among its texts: their decode(encode()) is written), the error that kept the
    probe from loading (None if it loaded) and the pre-tokenizer llama.cpp would name. Made once
    per parse jsonfile keeps: doctor and the vocabulary writer analyse the same object (~0.25 s
    for a 128k-token vocabulary)."""
    return jsonfile.derived(data, "bpe-analysis", lambda: _analyse(data, path))


def _analyse(data: dict, path: Path):
    merges = merges_of(data, path)  # malformed merges are a FormatError before anything else reads them
    raw = [e["content"] for e in _added_tokens(data, path) if not _normalized(e)]
    try:
        probe: pre_mod.Probe | None = pre_mod.Probe(data, path, raw)
        load_error = None
    except FormatError as e:  # a hand-made file tokenizers cannot load: its split pattern may still name it
        probe, load_error = None, e
    return merges, probe, load_error, pre_mod.identify(probe, data)


# gguf-py writes a space inside a merge part as this character (the space itself separates the two parts)
_MERGE_SPACE = chr(ord(" ") + 256)


def merges_of(data: dict, path: Path) -> list[str]:
    """The BPE merges of a parsed tokenizer.json as the strings gguf-py's SpecialVocab(load_merges=True)
    makes: string-form merges as they are; list-form ``[a, b]`` -> ``"a b"``, with every space inside
    a part written as chr(ord(' ') + 256). [] if there are none."""
    merges = data["model"].get("merges")
    if not isinstance(merges, list) or not merges:
        return []
    kinds = set(map(type, merges))
    if kinds == {str}:
        return merges
    bad = FormatError(f"{path}: model.merges: expected strings or pairs of strings")
    if kinds != {list} or set(map(len, merges)) != {2}:
        raise bad
    try:
        joined = list(map(" ".join, merges))
    except TypeError:
        raise bad from None
    if "".join(joined).count(" ") != len(joined):  # some part has a space in it (rare): encode it as gguf-py does
        for i, s in enumerate(joined):
            if s.count(" ") != 1:
                joined[i] = " ".join(part.replace(" ", _MERGE_SPACE) for part in merges[i])
    return joined
