"""A Hugging Face tokenizer folder -> the GGUF vocabulary llama.cpp's converter writes for it,
key by key.

Two kinds of tokenizer (a family's :class:`VocabOptions` says which to try, in which order, as
llama.cpp's converter does for that family):

- a byte-level BPE ``tokenizer.json``: ``tokenizer.ggml.model = gpt2``, the pre-tokenizer named
  by llama.cpp's hash (:mod:`.pre`), tokens, token types and merges (:mod:`.bpe`);
- a SentencePiece ``tokenizer.model``: tokens, scores and types (:mod:`.spm`).

(Which families use which: their modules under arch/.)

Special token ids, add_bos/add_eos and the chat template are read by the rules of the gguf-py
llama.cpp's converter runs with (:mod:`.special`), so the keys are the ones llama.cpp expects; the
base model's config.json (which the converter finds beside the tokenizer, and an adapter folder
lacks) is passed in. Ids the tokenizer leaves free up to the model's embedding rows are ``[PAD{i}]``; a
token id at or past them is an InputError naming the file.

A family module passes its options::

    OPTIONS = VocabOptions(kinds=("sentencepiece", "llama_hf", "bpe"), space_prefix_from_config=True)
    vocab, special = write_vocab(writer, tokenizer_dir, n_embedding_rows, OPTIONS,
                                 config=base_config, generation_config=base_generation_config)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import gguf

from ..errors import FormatError, InputError, UnsupportedError
from ..jsonfile import read_json_object
from .bpe import _bytelevel_post_processor, identify_pre, load_tokenizer_json, merges_of, vocab_of
from .common import BPE, KINDS, LLAMA_HF, SENTENCEPIECE, Vocab, VocabOptions, looks_special
from .pre import CHKHSH, PRE_TOKENIZERS, PreTokenizer
from .special import SpecialTokens, merges_txt
from .spm import load_sentencepiece, sentencepiece_vocab

__all__ = [
    "BPE", "CHKHSH", "KINDS", "LLAMA_HF", "PRE_TOKENIZERS", "SENTENCEPIECE", "PreTokenizer", "SpecialTokens", "Vocab",
    "VocabOptions",
    "eog_ids", "token_ids", "identify_pre", "llama_hf_message", "load_sentencepiece", "load_tokenizer_json", "looks_special", "merges_of",
    "read_vocab", "sentencepiece_vocab", "tokenizer_config", "tokenizer_kind", "vocab_of", "write_vocab",
    "_bytelevel_post_processor",
]

# the file each kind reads
KIND_FILES = {SENTENCEPIECE: "tokenizer.model", LLAMA_HF: "tokenizer.json", BPE: "tokenizer.json"}


def tokenizer_config(folder: Path) -> dict[str, Any]:
    """The folder's tokenizer_config.json ({} when there is none)."""
    path = Path(folder) / "tokenizer_config.json"
    return read_json_object(path, missing="") if path.is_file() else {}


def _is_llama_hf(folder: Path) -> bool:
    """tokenizer.json is a SentencePiece model converted to BPE with byte fallback (what llama.cpp's
    converter reads with LlamaHfVocab): BPE, byte_fallback, a Sequence decoder."""
    if not (Path(folder) / "tokenizer.json").is_file():
        return False
    data = load_tokenizer_json(folder)
    model, decoder = data["model"], data.get("decoder") or {}
    return (model.get("type") == "BPE" and bool(model.get("byte_fallback"))
            and isinstance(decoder, dict) and decoder.get("type") == "Sequence")


def tokenizer_kind(folder: Path, options: VocabOptions | None = None) -> str:
    """The kind of tokenizer the GGUF vocabulary is made from: the first of ``options.kinds``
    whose file ``folder`` has (llama.cpp's converter's order for the family)."""
    folder = Path(folder)
    options = options or VocabOptions()
    for kind in options.kinds:
        if kind == SENTENCEPIECE and (folder / "tokenizer.model").is_file():
            return kind
        if kind == LLAMA_HF and _is_llama_hf(folder):
            return kind
        if kind == BPE and (folder / "tokenizer.json").is_file():
            return kind
    wanted = " or ".join(dict.fromkeys(KIND_FILES[k] for k in options.kinds))
    raise InputError(f"{folder}: no {wanted}; lora2gguf makes this model's GGUF vocabulary from it. Copy the "
                     "tokenizer files of the model you fine-tuned from (tokenizer.save_pretrained(DIR))")


def llama_hf_message(folder: Path) -> str:
    return (f"{Path(folder) / 'tokenizer.json'}: a SentencePiece tokenizer converted to tokenizer.json, without its "
            "tokenizer.model; llama.cpp's converter would write it with every score -1000, and llama.cpp's "
            "SentencePiece tokenizer chooses its merges by score. Copy tokenizer.model from the base model folder "
            f"into {folder} (transformers 5's save_pretrained does not write it), or use the base's tokenizer "
            "(--tokenizer base) if training did not change it")


def read_vocab(folder: Path, vocab_size: int, options: VocabOptions | None = None,
               tokenizer_cfg: Mapping[str, Any] | None = None) -> Vocab:
    """The tokens, types (and scores) of ``folder``'s tokenizer for a model with ``vocab_size``
    embedding rows. UnsupportedError when llama.cpp would not know it; FormatError for a file
    that is not what its name says; InputError for a token id at or past ``vocab_size``."""
    folder = Path(folder)
    cfg = tokenizer_config(folder) if tokenizer_cfg is None else tokenizer_cfg
    kind = tokenizer_kind(folder, options)
    if kind == SENTENCEPIECE:
        return sentencepiece_vocab(folder, vocab_size, cfg,
                                   added_types_from_special=bool(options and options.added_types_from_special))
    if kind == LLAMA_HF:
        raise UnsupportedError(llama_hf_message(folder))
    return vocab_of(load_tokenizer_json(folder), folder / "tokenizer.json", vocab_size)


def token_ids(value: Any) -> list[int]:
    """A config's token id field (``eos_token_id``: an int or a list of them) as a list."""
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def eog_ids(special: SpecialTokens, n_tokens: int, config: Mapping[str, Any] | None,
            generation_config: Mapping[str, Any] | None) -> tuple[int, ...]:
    """Every end-of-generation id the tokenizer and the model's configs name: eos / eot / eom,
    generation_config.json's and config.json's eos_token_id (an id or a list of several)."""
    ids = [special.special_token_ids[t] for t in ("eos", "eot", "eom") if t in special.special_token_ids]
    for cfg in (generation_config or {}, config or {}):
        ids += token_ids(cfg.get("eos_token_id"))
    return tuple(sorted({i for i in ids if 0 <= i < n_tokens}))


def write_vocab(writer: gguf.GGUFWriter, folder: Path, vocab_size: int, options: VocabOptions | None = None, *,
                config: Mapping[str, Any] | None = None,
                generation_config: Mapping[str, Any] | None = None) -> tuple[Vocab, SpecialTokens]:
    """Write the ``tokenizer.*`` keys of ``folder``'s tokenizer into ``writer``, as llama.cpp's
    converter writes them, for a GGUF with ``vocab_size`` embedding rows.

    ``options``: the family's (default: a BPE tokenizer.json alone). ``config``: the base
    model's config.json (its bos/eos/pad... ids fill the types the tokenizer files leave unset, as
    the converter reads config.json beside the tokenizer). ``generation_config``: the base's
    generation_config.json (default: the folder's, if any), for :attr:`Vocab.eog_ids`.
    Returns the vocabulary and its :class:`SpecialTokens` (special ids, add_bos/eos, template)."""
    folder = Path(folder)
    options = options or VocabOptions()
    cfg = tokenizer_config(folder)
    vocab = read_vocab(folder, vocab_size, options, cfg)  # checks the tokenizer
    if options.space_prefix_from_config and cfg.get("add_prefix_space") is not None:
        writer.add_add_space_prefix(bool(cfg["add_prefix_space"]))
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    tj = load_tokenizer_json(folder) if (folder / "tokenizer.json").is_file() else None
    if vocab.kind == BPE:
        special = SpecialTokens(folder, tokenizer_json=tj, tokenizer_config=cfg,
                                config=config, n_vocab=vocab_size)
        # the merges of tokenizer.json, else merges.txt's
        special.merges = vocab.merges or merges_txt(folder)
        if not special.merges:
            raise FormatError(f"{folder / 'tokenizer.json'}: no BPE merges (and no merges.txt)")
    else:
        special = SpecialTokens(folder, tokenizer_json=tj, tokenizer_config=cfg,
                                config=config, n_vocab=len(vocab.tokens))
    if options.fixed_special_ids:
        fixed = SpecialTokens(folder, tokenizer_json=tj, tokenizer_config=cfg, config=config,
                              special_token_types=tuple(options.fixed_special_ids), n_vocab=special.n_vocab)
        for typ, tid in options.fixed_special_ids.items():
            fixed.set_special(typ, tid, "VocabOptions.fixed_special_ids")
        for typ, tid in fixed.special_token_ids.items():
            special.special_token_ids.setdefault(typ, tid)
        for typ, value in fixed.add_special_token.items():
            special.add_special_token.setdefault(typ, value)
    if options.add_bos is not None:
        special.add_special_token["bos"] = options.add_bos
    special.add_to_gguf(writer)
    if options.space_prefix is not None:
        writer.add_add_space_prefix(options.space_prefix)
    if generation_config is None and (folder / "generation_config.json").is_file():
        generation_config = read_json_object(folder / "generation_config.json", missing="")
    vocab.eog_ids = eog_ids(special, len(vocab.tokens), config, generation_config)
    return vocab, special
