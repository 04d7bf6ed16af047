"""A Hugging Face tokenizer folder -> GGUF tokenizer metadata (BPE `gpt2` model).

Tokens, token types and merges are read from tokenizer.json directly (no transformers needed; the
merges as the same strings gguf-py makes); special token ids, add_bos/add_eos and the chat template
go through gguf-py's SpecialVocab, the same reader llama.cpp's converter uses, so the keys are the
ones llama.cpp expects.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf

from .errors import FormatError, InputError, UnsupportedError
from .jsonfile import read_json_object

# pre-tokenizer regex (tokenizer.json, Split pattern) -> llama.cpp's pre-tokenizer name
PRE_TOKENIZERS: dict[str, str] = {
    (
        "[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]*[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
        "|[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]+[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
        "|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
    ): "gpt-4o",
}


@dataclass
class Vocab:
    tokens: list[str]
    types: list[int]
    pre: str
    added: dict[str, int]  # added token content -> id

    def id_of(self, text: str) -> int | None:
        return self.added.get(text)


def load_tokenizer_json(folder: Path) -> dict:
    path = Path(folder) / "tokenizer.json"
    data = read_json_object(path, missing="lora2gguf needs the fast tokenizer file to write the GGUF vocabulary",
                            hint="download it again", keep=True)
    if not isinstance(data.get("model"), dict):
        raise FormatError(f"{path}: no 'model' object; not a Hugging Face tokenizer.json")
    return data


def pre_tokenizer_name(data: dict, path: Path) -> str:
    def patterns(node):
        if isinstance(node, dict):
            if node.get("type") == "Split" and isinstance(node.get("pattern"), dict):
                yield node["pattern"].get("Regex") or node["pattern"].get("String")
            for v in node.values():
                yield from patterns(v)
        elif isinstance(node, list):
            for v in node:
                yield from patterns(v)

    found = [p for p in patterns(data.get("pre_tokenizer")) if p]
    for p in found:
        if p in PRE_TOKENIZERS:
            return PRE_TOKENIZERS[p]
    raise UnsupportedError(
        f"{path}: the pre-tokenizer (split pattern {found[0][:60] + '...' if found else 'none'}) is not one lora2gguf "
        "knows; llama.cpp would tokenize text differently from the fine-tune. Supported: "
        + ", ".join(sorted(set(PRE_TOKENIZERS.values())))
    )


def _bytelevel_post_processor(data: dict) -> bool:
    proc = data.get("post_processor") or {}
    procs = proc.get("processors", []) if proc.get("type") == "Sequence" else [proc]
    return any(isinstance(p, dict) and p.get("type") == "ByteLevel" for p in procs)


def _looks_special(token: str) -> bool:
    return (token.startswith("<|") and token.endswith("|>")) or token in ("<s>", "</s>", "<pad>", "<unk>", "<mask>")


def read_vocab(folder: Path, vocab_size: int) -> Vocab:
    folder = Path(folder)
    return vocab_of(load_tokenizer_json(folder), folder / "tokenizer.json", vocab_size)


def vocab_of(data: dict, path: Path, vocab_size: int) -> Vocab:
    """The tokens and token types of a parsed tokenizer.json (`path` is for messages)."""
    model = data["model"]
    if model.get("type") != "BPE":
        raise UnsupportedError(f"{path}: tokenizer model {model.get('type')!r}; only byte-level BPE is supported yet")
    pre = pre_tokenizer_name(data, path)
    reverse: dict[int, str] = {}
    for tok, i in model.get("vocab", {}).items():
        reverse[i] = tok
    added: dict[str, int] = {}
    special: set[int] = set()
    for entry in data.get("added_tokens") or []:
        reverse[entry["id"]] = entry["content"]
        added[entry["content"]] = entry["id"]
        if entry.get("special"):
            special.add(entry["id"])
    too_big = [i for i in reverse if i >= vocab_size]
    if too_big:
        raise InputError(
            f"{path}: token id {max(too_big)} ({reverse[max(too_big)]!r}) is outside the model's vocab_size {vocab_size}; "
            "the tokenizer does not belong to this model (or the embeddings were resized: not supported yet)"
        )
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        tok = reverse.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif tok in added:
            tokens.append(tok)
            types.append(gguf.TokenType.CONTROL if (i in special or _looks_special(tok)) else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(tok)
            types.append(gguf.TokenType.NORMAL)
    return Vocab(tokens, types, pre, added)


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


def write_vocab(writer: gguf.GGUFWriter, folder: Path, vocab_size: int) -> tuple[Vocab, gguf.SpecialVocab]:
    folder = Path(folder)
    path = folder / "tokenizer.json"
    # parsed once for tokens, types, merges and the post-processor (and kept from doctor's read;
    # SpecialVocab below parses it again for the added tokens and post-processor it reads)
    data = load_tokenizer_json(folder)
    vocab = vocab_of(data, path, vocab_size)  # checks the tokenizer
    merges = merges_of(data, path)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    # special token ids, add_bos/add_eos, chat template: gguf-py; the merges are ours unless
    # tokenizer.json has none (then gguf-py looks for merges.txt)
    special = gguf.SpecialVocab(folder, load_merges=not merges, n_vocab=vocab_size)
    if merges:
        special.merges = merges
    if not special.merges:
        raise FormatError(f"{path}: no BPE merges found")
    if _bytelevel_post_processor(data):
        # a ByteLevel post-processor adds no BOS/EOS: say so, or llama.cpp applies its own default
        special.add_special_token.setdefault("bos", False)
        special.add_special_token.setdefault("eos", False)
    special.add_to_gguf(writer, quiet=True)
    return vocab, special
