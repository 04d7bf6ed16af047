"""doctor's check of the GGUF vocabulary the chosen tokenizer becomes, before any tensor is read:
which file it comes from (the family's order, as llama.cpp's converter tries them), whether
llama.cpp knows its pre-tokenizer, whether a tokenizer.model is one, whether every id fits the
embedding rows, and every end-of-generation id it names."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping

from ..errors import FormatError, InputError, Lora2GGUFError, UnsupportedError
from ..inspect import TokenizerInfo
from ..vocab import (BPE, KINDS, LLAMA_HF, SpecialTokens, VocabOptions, eog_ids, identify_pre, llama_hf_message,
                     load_sentencepiece, load_tokenizer_json, tokenizer_kind)
from ..vocab.pre import HOW_PATTERN, unknown_message
from . import findings as F

SAMPLES = 10

#: For a model whose family lora2gguf does not know: every kind, in the order llama.cpp's converter
#: tries them for most families (tokenizer.model first).
ANY_FAMILY = VocabOptions(kinds=KINDS)


def options_of(arch: Any, config: Any = None) -> VocabOptions:
    """The vocabulary options of a family for a config (its ``vocab_for``; the writer's defaults
    where it has none), or :data:`ANY_FAMILY` when the architecture is unknown (``arch`` None)."""
    if arch is None:
        return ANY_FAMILY
    options = arch.vocab_for(config or {}) if hasattr(arch, "vocab_for") else getattr(arch, "vocab_options", None)
    return options if isinstance(options, VocabOptions) else VocabOptions()


def _invalid(tok: TokenizerInfo, e: Lora2GGUFError) -> F.Finding:
    return F.make("TOKENIZER_INVALID", str(e), "the GGUF's vocabulary, merges and chat template come from these files",
                  "download the tokenizer files again, or copy those of the model you fine-tuned from",
                  {"folder": str(tok.folder)})


def check_vocab(tok: TokenizerInfo | None, config: Mapping[str, Any], options: VocabOptions | None = None, *,
                resized: bool = False, generation_config: Mapping[str, Any] | None = None,
                found: Iterable[F.Finding] = ()) -> list[F.Finding]:
    """Findings on the vocabulary ``tok`` (the tokenizer the GGUF gets) becomes for a model whose
    config.json is ``config``, with the family's ``options``. ``resized``: the adapter carries
    resized embeddings (the GGUF's rows are then its, not config's vocab_size); ``found``: the
    findings so far (a size problem already reported is not reported twice)."""
    if tok is None:
        return []
    options = options or VocabOptions()
    folder = Path(tok.folder)
    codes = {f.code for f in found}
    rows = config.get("vocab_size") if isinstance(config.get("vocab_size"), int) and not resized else None
    try:
        kind = tokenizer_kind(folder, options)
    except InputError as e:
        return [_invalid(tok, e)]
    if kind == LLAMA_HF:
        return [F.make("TOKENIZER_SENTENCEPIECE_MISSING", llama_hf_message(folder),
                       "llama.cpp's SentencePiece tokenizer needs each piece's score to split text as the fine-tune "
                       "did; tokenizer.json does not carry them",
                       f"copy tokenizer.model from the base model folder into {folder}, or --tokenizer base if "
                       "training did not change the tokenizer", {"folder": str(folder)})]

    out: list[F.Finding] = []
    data: dict[str, Any] | None = None
    if kind == BPE:
        if tok.model is None:  # tokenizer.json did not parse: TOKENIZER_INVALID says so already
            return []
        path = folder / "tokenizer.json"
        try:
            data = load_tokenizer_json(folder)
            pre = identify_pre(data, path)
        except (FormatError, UnsupportedError) as e:
            return [_invalid(tok, e)]
        info = {"kind": kind, "file": str(path), "model": "gpt2", "pre": pre.name, "pre_how": pre.how,
                "chkhsh": pre.chkhsh, "split_patterns": list(pre.patterns)}
        if pre.name is None:
            out.append(F.make(
                "TOKENIZER_PRE_UNKNOWN", unknown_message(path, pre),
                "llama.cpp splits text into words with the pre-tokenizer named in the GGUF; with another split the "
                "model sees token sequences it was never trained on (llama.cpp's own converter refuses this "
                "tokenizer for the same reason)",
                "give the GGUF the tokenizer of a published model (--tokenizer base if the adapter's is a re-save of "
                "it); if this tokenizer is published, a newer llama.cpp may list its hash", info))
            return out
        if pre.how == HOW_PATTERN:
            out.append(F.make(
                "TOKENIZER_PRE_BY_PATTERN",
                f"{path}: pre-tokenizer {pre.name!r} by its split pattern; llama.cpp's check hash "
                f"{(pre.chkhsh or '?')[:16]}... is not one its converter lists (a vocabulary of one's own)",
                "llama.cpp's pre-tokenizer " + repr(pre.name) + " is this exact split; llama.cpp's converter would "
                "refuse the file, lora2gguf writes the name the split stands for", "", info))
        size = tok.model.size
        id_to_token = tok.model.id_to_token
    else:
        path = folder / "tokenizer.model"
        try:
            sp = load_sentencepiece(path)
        except FormatError as e:
            return [_invalid(tok, e)]
        id_to_token = {i: sp.IdToPiece(i) for i in range(sp.vocab_size())}
        if tok.model is not None and tok.model.model_type == "SentencePiece":
            id_to_token.update({i: t for t, (i, _) in tok.model.added.items()})
        else:
            decoder = tok.config.get("added_tokens_decoder") or {}
            id_to_token.update({int(k): v["content"] for k, v in decoder.items()
                                if str(k).isdigit() and isinstance(v, dict) and isinstance(v.get("content"), str)})
        size = max(id_to_token) + 1 if id_to_token else 0
        info = {"kind": kind, "file": str(path), "model": "llama", "pre": "default", "pre_how": "sentencepiece"}
        if (folder / "tokenizer.json").is_file():
            info["note"] = "tokenizer.model is used, not tokenizer.json, as llama.cpp's converter does for this family"
    if rows is not None and size > rows and "TOKENIZER_TOO_LARGE" not in codes:
        over = sorted(i for i in id_to_token if i >= rows)
        out.append(F.make(
            "TOKENIZER_TOO_LARGE",
            f"{path}: the tokenizer has {size} ids but the model has {rows} embedding rows (config vocab_size); ids "
            f"past the end: {', '.join(f'{id_to_token[i]} ({i})' for i in over[:SAMPLES])}",
            "llama.cpp refuses a vocabulary larger than token_embd, and a trainer that added tokens without "
            "resize_token_embeddings never trained them",
            "remove the added tokens from the tokenizer, or retrain with model.resize_token_embeddings(len(tokenizer)) "
            "and modules_to_save=['embed_tokens','lm_head']",
            {"model_vocab": rows, "tokenizer_size": size, "ids_past_end": over[:50]}))
    n = max(rows or 0, size)
    try:
        special = SpecialTokens(folder, tokenizer_json=data if data is not None else (
            load_tokenizer_json(folder) if (folder / "tokenizer.json").is_file() else None),
            tokenizer_config=tok.config, config=config, n_vocab=n)
    except Lora2GGUFError as e:
        return out + [_invalid(tok, e)]
    eog = eog_ids(special, n, config, generation_config)
    info["eog_ids"] = list(eog)
    info["eog_tokens"] = [id_to_token.get(i) for i in eog]
    info["special_token_ids"] = dict(special.special_token_ids)
    shown = ", ".join(f"{i} {id_to_token.get(i)!r}" for i in eog) or "none"
    out.append(F.make(
        "TOKENIZER_VOCAB",
        f"{path}: tokenizer.ggml.model {info['model']}, tokenizer.ggml.pre {info['pre']}"
        + (f" (by {info['pre_how']})" if kind == BPE else "") + f"; end-of-generation ids: {shown}"
        + (f"; {info['note']}" if "note" in info else ""),
        "these decide how llama.cpp splits text and where it stops generating", "", info))
    return out
