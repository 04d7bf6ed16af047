"""The two tokenizers verify compares: the GGUF's own (llama.cpp, through llama-cpp-python) and the
fine-tune's (transformers, else the ``tokenizers`` library on tokenizer.json). Both tokenize
rendered chat text the way ``apply_chat_template(tokenize=True)`` does: special tokens parsed,
nothing added (the template writes the BOS where the model wants one).

A GGUF whose tokenizer gives other ids than the fine-tune's for the same text is a conversion
fault (a wrong pre-tokenizer, a lost special token, merges out of order): verify compares the ids
of every rendered prompt and of the evaluation text (:func:`first_difference`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import InputError

log = logging.getLogger(__name__)


class LlamaTokens:
    """The tokenizer of a GGUF loaded in llama.cpp (a ``llama_cpp.Llama``)."""

    def __init__(self, llm, where: str = "the GGUF"):
        import llama_cpp

        self.llm = llm
        self.where = where
        self._vocab = llama_cpp.llama_model_get_vocab(llm.model)

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.llm.detokenize([int(i) for i in ids], special=True).decode("utf-8", errors="replace")

    def is_control(self, token_id: int) -> bool:
        import llama_cpp

        return bool(llama_cpp.llama_vocab_get_attr(self._vocab, int(token_id)) & llama_cpp.LLAMA_TOKEN_ATTR_CONTROL)

    def text(self, token_id: int) -> str:
        import llama_cpp

        return llama_cpp.llama_vocab_get_text(self._vocab, int(token_id)).decode("utf-8", errors="replace")

    def specials(self, meta: Mapping[str, Any]) -> dict[str, str]:
        """The special tokens by role (``bos_token`` ...) as the GGUF's metadata names them."""
        import gguf

        keys = {"bos_token": gguf.Keys.Tokenizer.BOS_ID, "eos_token": gguf.Keys.Tokenizer.EOS_ID,
                "unk_token": gguf.Keys.Tokenizer.UNK_ID, "pad_token": gguf.Keys.Tokenizer.PAD_ID,
                "sep_token": gguf.Keys.Tokenizer.SEP_ID}
        out = {}
        n = self.llm.n_vocab()
        for role, key in keys.items():
            v = meta.get(key)
            try:
                i = int(str(v))
            except (TypeError, ValueError):
                continue
            if 0 <= i < n:
                out[role] = self.text(i)
        return out


class HFTokens:
    """The fine-tune's tokenizer: transformers' ``AutoTokenizer`` for its folder (what training's
    ``apply_chat_template`` used), else ``tokenizers`` on its tokenizer.json."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.hf = None
        self.fast = None
        try:
            from transformers import AutoTokenizer
        except ImportError:
            AutoTokenizer = None
        if AutoTokenizer is not None:
            try:
                self.hf = AutoTokenizer.from_pretrained(str(self.folder))
            except (OSError, ValueError) as e:
                raise InputError(f"transformers could not load the fine-tune's tokenizer {self.folder}: {e}") from e
        else:
            try:
                from tokenizers import Tokenizer
            except ImportError as e:
                raise InputError("comparing tokenizers needs transformers or tokenizers: "
                                 "pip install 'lora2gguf[reference]'") from e
            path = self.folder / "tokenizer.json"
            try:
                self.fast = Tokenizer.from_file(str(path))
            except Exception as e:  # tokenizers raises its own Exception type
                raise InputError(f"{path}: tokenizers could not load it: {e}") from e
        self._control = self._control_ids()

    def _control_ids(self) -> set[int]:
        if self.hf is not None:
            ids = set(self.hf.all_special_ids)
            ids |= {i for i, t in self.hf.added_tokens_decoder.items() if t.special}
            return ids
        return {i for i, t in self.fast.get_added_tokens_decoder().items() if t.special}

    def encode(self, text: str) -> list[int]:
        if self.hf is not None:
            return [int(i) for i in self.hf(text, add_special_tokens=False)["input_ids"]]
        return list(self.fast.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        if self.hf is not None:
            return self.hf.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)
        return self.fast.decode(list(ids), skip_special_tokens=False)

    def is_control(self, token_id: int) -> bool:
        return int(token_id) in self._control

    @property
    def chat_template(self) -> str | None:
        t = getattr(self.hf, "chat_template", None) if self.hf is not None else None
        return t if isinstance(t, str) else None

    def specials(self) -> dict[str, str]:
        if self.hf is None:
            return {}
        out = {}
        for role in ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"):
            v = getattr(self.hf, role, None)
            if isinstance(v, str):
                out[role] = v
        return out

    def token_id(self, text: str | None) -> int | None:
        if text is None:
            return None
        if self.hf is not None:
            i = self.hf.convert_tokens_to_ids(text)
            return None if i is None or i == self.hf.unk_token_id and text != self.hf.unk_token else int(i)
        i = self.fast.token_to_id(text)
        return None if i is None else int(i)


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    """The first position where two id lists differ (the shorter one's length when one is a
    prefix of the other); None when they are equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def describe_difference(ref: Sequence[int], got: Sequence[int], ref_tok, got_tok) -> str:
    """Where two tokenizations of the same text part, in words (the pieces around that point)."""
    i = first_difference(ref, got)
    if i is None:
        return "same ids"

    def pieces(ids, tok):
        return [tok.decode([t]) for t in ids[max(0, i - 2):i + 3]]

    return (f"{len(got)} ids against the fine-tune's {len(ref)}; first difference at position {i}: "
            f"fine-tune {list(ref[i:i + 3])} {pieces(ref, ref_tok)!r}, GGUF {list(got[i:i + 3])} "
            f"{pieces(got, got_tok)!r}")
