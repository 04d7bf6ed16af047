"""What the vocabulary writers share: the options a family passes in, the vocabulary value, and
llama.cpp's converter's rule for added tokens that look special."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from ..errors import InputError

#: Tokenizer kinds, each named by the file it reads:
#: ``sentencepiece``: tokenizer.model;
#: ``llama_hf``: a tokenizer.json converted from SentencePiece (byte-fallback BPE) without its
#: tokenizer.model (llama.cpp's converter's ``LlamaHfVocab``; refused here, see vocab.__init__);
#: ``bpe``: a byte-level BPE tokenizer.json (GGUF model ``gpt2``).
SENTENCEPIECE, LLAMA_HF, BPE = "sentencepiece", "llama_hf", "bpe"
KINDS = (SENTENCEPIECE, LLAMA_HF, BPE)


@dataclass(frozen=True)
class VocabOptions:
    """What a family module tells the vocabulary writer: the few ways llama.cpp's converter
    differs from family to family, as one value (the default: a BPE tokenizer.json alone).

    ``kinds``: the tokenizer kinds to try, in order; the first whose file the folder has wins
    (e.g. ``("sentencepiece", "llama_hf", "bpe")``; the default, a BPE tokenizer.json alone).
    ``space_prefix_from_config``: write ``tokenizer.ggml.add_space_prefix`` from
    tokenizer_config.json's ``add_prefix_space`` when it is set.
    ``space_prefix``: write ``tokenizer.ggml.add_space_prefix`` with this value.
    ``add_bos``: write ``tokenizer.ggml.add_bos_token`` with this value whatever the tokenizer
    says (a family module may decide it from the config, e.g. the vocabulary's size).
    ``fixed_special_ids``: special-token type -> id, written unless tokenizer_config.json names
    a token for that type (infill tokens a vocabulary has at fixed ids).
    ``added_types_from_special``: a SentencePiece vocabulary's added tokens (tokenizer_config.json's
    ``added_tokens_decoder``, then tokenizer.json's ``added_tokens``) are control tokens exactly
    when marked ``special`` and user-defined otherwise, their text as written (the converters
    with their own SentencePiece reader: no "looks special" rule, no ``\u2581`` rewrite)."""

    kinds: tuple[str, ...] = (BPE,)
    space_prefix_from_config: bool = False
    space_prefix: bool | None = None
    add_bos: bool | None = None
    fixed_special_ids: Mapping[str, int] = field(default_factory=dict)
    added_types_from_special: bool = False

    def __post_init__(self) -> None:
        bad = [k for k in self.kinds if k not in KINDS]
        if bad or not self.kinds:
            raise InputError(f"VocabOptions.kinds={self.kinds!r}: choose from {', '.join(KINDS)}")


@dataclass
class Vocab:
    """The GGUF vocabulary of a tokenizer folder, as llama.cpp's converter would write it.

    ``kind``: one of :data:`KINDS`; ``model``: tokenizer.ggml.model; ``pre``: tokenizer.ggml.pre;
    ``pre_how``: how ``pre`` was found ("chkhsh", "split pattern", or "sentencepiece");
    ``chkhsh``: llama.cpp's pre-tokenizer hash (BPE); ``scores``: SentencePiece scores (None for
    BPE); ``added``: added token content -> id; ``source``: the file the tokens came from;
    ``eog_ids``: every end-of-generation id the folder names (eos/eot/eom, generation_config's
    and config's eos_token_id), set by :func:`lora2gguf.vocab.write_vocab`; ``merges``: the BPE
    merges from tokenizer.json as gguf-py writes them ([] when there are none there)."""

    tokens: list[str]
    types: list[int]
    pre: str
    added: dict[str, int]
    kind: str = BPE
    model: str = "gpt2"
    scores: list[float] | None = None
    pre_how: str = "chkhsh"
    chkhsh: str | None = None
    source: Path | None = None
    eog_ids: tuple[int, ...] = ()
    merges: list[str] = field(default_factory=list)

    def id_of(self, text: str) -> int | None:
        """The id of an added token."""
        return self.added.get(text)


def looks_special(token: str) -> bool:
    """llama.cpp's converter's ``does_token_look_special``: added tokens that some models forget
    to mark special but that are control tokens."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<\uff5c") and token.endswith("\uff5c>"))
            or (token.startswith("<unused") and token.endswith(">")))


# SentencePiece's word-boundary mark; the converter writes it as a space in user-defined tokens
SPIECE_UNDERLINE = "\u2581"


def too_large(path: Path, token_id: int, token: str, vocab_size: int) -> InputError:
    return InputError(
        f"{path}: token id {token_id} ({token!r}) is outside the model's {vocab_size} embedding rows; the tokenizer "
        "does not belong to this model, or the fine-tune added tokens: then the adapter must carry the resized "
        "embeddings (resize_token_embeddings and modules_to_save=['embed_tokens','lm_head']) and the GGUF gets "
        "their rows")
