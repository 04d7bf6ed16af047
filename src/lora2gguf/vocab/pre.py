"""Which pre-tokenizer llama.cpp uses for a byte-level BPE tokenizer.json (``tokenizer.ggml.pre``).

llama.cpp's converter names the pre-tokenizer by a hash: it encodes a fixed text
(:data:`CHKTXT`) with the tokenizer (special tokens added, as transformers' ``encode`` does) and
looks the SHA-256 of ``str(ids)`` up in a table (:data:`CHKHSH`, the facts of its
``get_vocab_base_pre``); an unknown hash stops its conversion. lora2gguf computes the same hash
with the ``tokenizers`` library from tokenizer.json itself (no transformers), on a copy of the
tokenizer reduced to the pieces the fixed text can reach (about 0.1 s instead of loading a
200k-token tokenizer).

A tokenizer whose hash is not in the table (a vocabulary of one's own) is still known when its
pre-tokenizer is exactly one that a llama.cpp name stands for (:data:`PRE_TOKENIZERS`: the split
regex, byte-level without prefix space, the normalizer); that is reported as such.

transformers 5's tokenizer classes with a constructor of their own (``Qwen2Tokenizer``,
``GPT2Tokenizer``, ``LlamaTokenizer``) rebuild the pre-tokenizer from their own code when they
load a tokenizer.json, so the converter hashes what the class builds; lora2gguf reads what the
file says (the same for the published tokenizers of those classes).
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from ..errors import FormatError, UnsupportedError

#: The text llama.cpp's converter encodes to identify a pre-tokenizer.
CHKTXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n\U0001f680 (normal) \U0001f636\u200d\U0001f32b"
    "\ufe0f (multiple emojis concatenated) \u2705 \U0001f999\U0001f999 3 33 333 3333 33333 33333"
    "3 3333333 33333333 3.3 3..3 3...3 \u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1"
    "\u179f\u17a2\u17b6\u1785\U0001f601 ?\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e "
    "------======= \u043d\u0435\u0449\u043e \u043d\u0430 \u0411\u044a\u043b\u0433\u0430\u0440\u0441"
    "\u043a\u0438 \'\'\'\'\'\'```````\"\"\"\"......!!!!!!?????? I\'ve been \'told he\'s there, \'RE "
    "you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL"
)
#: sha256 of CHKTXT (UTF-8), to check it against the converter's.
CHKTXT_SHA256 = "a36179c1e2b1cfcfbfad1dc779addad2ffc778201e4cf0d538bddeafa2c526da"

def _facts() -> dict[str, Any]:
    """data/pre_tokenizers.json: llama.cpp's pre-tokenizer names, as data."""
    from importlib import resources

    return json.loads(resources.files("lora2gguf").joinpath("data/pre_tokenizers.json").read_text(encoding="utf-8"))


_FACTS = _facts()
#: chkhsh -> tokenizer.ggml.pre, as llama.cpp's converter (llama-cpp-python 0.3.36) has them; where
#: it lists a hash twice the later name wins, as in its sequence of ``if``s (data/pre_tokenizers.json
#: names the repository each hash was taken from).
CHKHSH: dict[str, str] = {e["hash"]: e["name"] for e in _FACTS["chkhsh"]}
#: split regex -> tokenizer.ggml.pre, for a tokenizer of one's own whose hash is not in CHKHSH
#: but whose pre-tokenizer is exactly that split (byte-level, no prefix space, one of the
#: normalizers of :data:`_NORMALIZERS`).
PRE_TOKENIZERS: dict[str, str] = {e["regex"]: e["name"] for e in _FACTS["split_patterns"]}
# the normalizers (tokenizer.json "normalizer" type, None for none) each name's models ship with
_NORMALIZERS: dict[str, tuple[str | None, ...]] = {k: tuple(v) for k, v in _FACTS["normalizers"].items()}
#: tokenizer kind -> tokenizer.ggml.model
TOKENIZER_MODELS: dict[str, str] = dict(_FACTS["tokenizer_models"])

HOW_HASH = "chkhsh"
HOW_PATTERN = "split pattern"


@dataclass(frozen=True)
class PreTokenizer:
    """What identifies a BPE tokenizer's pre-tokenizer: llama.cpp's name for it (None: unknown),
    the hash, how the name was found (:data:`HOW_HASH` or :data:`HOW_PATTERN`) and the split
    regexes the file has."""

    name: str | None
    chkhsh: str | None
    how: str | None
    patterns: tuple[str, ...]


def split_patterns(pre_tokenizer: Any) -> tuple[str, ...]:
    """The regexes (or strings) of every Split pre-tokenizer in a tokenizer.json pre_tokenizer."""
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("type") == "Split" and isinstance(node.get("pattern"), dict):
                p = node["pattern"].get("Regex") or node["pattern"].get("String")
                if isinstance(p, str):
                    found.append(p)
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(pre_tokenizer)
    return tuple(found)


def _by_pattern(data: Mapping[str, Any]) -> str | None:
    """The llama.cpp name of a pre-tokenizer that is exactly Split(known regex, isolated) then
    ByteLevel(no prefix space, no regex of its own), with that name's normalizer; else None."""
    pre = data.get("pre_tokenizer")
    if not isinstance(pre, dict) or pre.get("type") != "Sequence":
        return None
    steps = pre.get("pretokenizers")
    if not isinstance(steps, list) or len(steps) != 2 or not all(isinstance(s, dict) for s in steps):
        return None
    split, level = steps
    if split.get("type") != "Split" or split.get("behavior") != "Isolated" or split.get("invert"):
        return None
    name = PRE_TOKENIZERS.get((split.get("pattern") or {}).get("Regex"))
    if name is None or level.get("type") != "ByteLevel" or level.get("add_prefix_space") or level.get("use_regex", True):
        return None
    norm = data.get("normalizer")
    norm_type = norm.get("type") if isinstance(norm, dict) else None
    if norm is not None and not isinstance(norm, dict):
        return None
    return name if norm_type in _NORMALIZERS[name] else None


class Probe:
    """tokenizer.json as a ``tokenizers.Tokenizer`` for a few texts: its normalizer,
    pre-tokenizer, post-processor, decoder and added tokens, and of the BPE model only the
    pieces (and merges) that can occur inside those texts. BPE only ever joins pieces into
    substrings of a pre-tokenized word, so encoding one of the texts gives the ids the whole
    tokenizer gives. Tokenizers the reduction is not sure of (byte fallback, subword prefixes,
    dropout, an added token inside the text) are loaded whole."""

    def __init__(self, data: Mapping[str, Any], path: Path, texts: Iterable[str]):
        try:
            from tokenizers import Tokenizer
        except ImportError as e:  # a dependency of transformers; lora2gguf needs it for BPE tokenizers
            raise UnsupportedError("lora2gguf needs the 'tokenizers' package to read tokenizer.json: "
                                   "pip install tokenizers") from e
        self.path = path
        texts = [CHKTXT, *texts]
        model = data["model"]
        added = [e.get("content") for e in data.get("added_tokens") or [] if isinstance(e, dict)]
        added = [a for a in added if isinstance(a, str) and a]
        # an added token inside a text splits it where the reduction did not look: load the whole
        # model (substring tests: a regex of 256 added tokens takes 0.15 s to compile)
        whole = (model.get("type") != "BPE" or model.get("byte_fallback") or model.get("dropout")
                 or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix")
                 or _inside_another(added, texts))
        # added tokens with the fields tokenizers requires, at its defaults where the file leaves them out
        data = dict(data, added_tokens=[{"single_word": False, "lstrip": False, "rstrip": False,
                                         "normalized": not e.get("special", False), "special": False, **e}
                                        for e in data.get("added_tokens") or [] if isinstance(e, dict)])
        try:
            if whole:
                self.tokenizer = Tokenizer.from_str(json.dumps(data))
            else:
                shell = Tokenizer.from_str(json.dumps(dict(data, model=dict(model, vocab={}, merges=[]))))
                subs: set[str] = set()
                for text in texts:
                    if shell.normalizer is not None:
                        text = shell.normalizer.normalize_str(text)
                    words = [w for w, _ in shell.pre_tokenizer.pre_tokenize_str(text)] if shell.pre_tokenizer else [text]
                    for w in words:
                        n = len(w)
                        subs.update(w[i:j] for i in range(n) for j in range(i + 1, n + 1))
                vocab = {t: i for t, i in model.get("vocab", {}).items() if t in subs}
                if isinstance(model.get("unk_token"), str) and model["unk_token"] in model.get("vocab", {}):
                    vocab[model["unk_token"]] = model["vocab"][model["unk_token"]]
                merges = _merges_within(model.get("merges") or [], subs)
                self.tokenizer = Tokenizer.from_str(json.dumps(dict(data, model=dict(model, vocab=vocab, merges=merges))))
        except Exception as e:  # tokenizers raises plain Exceptions for a file it cannot build
            raise FormatError(f"{path}: the tokenizers library cannot load it ({e}); download it again, "
                              "or save it with AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)") from None

    def ids(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def roundtrip(self, text: str) -> str:
        """decode(encode(text)) as transformers 5 does it for a BPE tokenizer (special tokens kept,
        no clean-up of spaces)."""
        return self.tokenizer.decode(self.ids(text, add_special_tokens=False), skip_special_tokens=False)


def _inside_another(needles: list[str], texts: list[str]) -> bool:
    """Whether a needle occurs in a text other than itself: ``any(a in t and a != t for t in
    texts for a in needles)``, in one pass per needle over the texts joined by a character no
    needle holds (a vocabulary's ~1000 reserved tokens are both the needles and most texts:
    the pairs took 0.5 s). A needle occurs more often in the joined texts than it is one of
    them exactly when some other text holds it (matches cannot cross the separator, and a
    text equal to the needle holds it once)."""
    if not needles or not texts:
        return False
    held = set("".join(needles))
    sep = next(c for c in map(chr, itertools.count(1)) if c not in held)
    joined = sep.join(texts)
    as_text = collections.Counter(texts)
    return any(joined.count(a) > as_text[a] for a in needles)


def _merges_within(merges: list, subs: set[str]) -> list:
    """The merges (checked by merges_of: "a b" strings or [a, b] pairs) whose joined pair is in
    ``subs``. A string merge is "a b" split at its first space, so it joins into s in subs exactly
    when it is one of s's splits s[:k] + " " + s[k:] with no space in s[:k]: a set of those few
    thousand strings is tested instead of splitting 280k merges in Python."""
    if merges and isinstance(merges[0], str):
        splits = {s[:k] + " " + s[k:] for s in subs for k in range(len(s) + 1) if " " not in s[:k]}
        splits.update(s for s in subs if " " not in s)  # a merge with no space at all joins into itself
        return list(filter(splits.__contains__, merges))
    return list(itertools.compress(merges, map(subs.__contains__, map("".join, merges))))  # C-level passes


def chkhsh(probe: Probe) -> str:
    """llama.cpp's converter's hash of the ids of :data:`CHKTXT`, special tokens added by the
    post-processor (transformers 5's ``encode`` follows tokenizer.json's post-processor; it does
    not apply tokenizer_config.json's add_bos_token / add_eos_token)."""
    return hashlib.sha256(str(probe.ids(CHKTXT)).encode()).hexdigest()


def identify(probe: Probe | None, data: Mapping[str, Any]) -> PreTokenizer:
    """llama.cpp's name for the pre-tokenizer of a parsed tokenizer.json (name None: unknown).
    Without a probe (the tokenizers library cannot load the file) only the split pattern can
    name it."""
    h = chkhsh(probe) if probe is not None else None
    patterns = split_patterns(data.get("pre_tokenizer"))
    if h in CHKHSH:
        return PreTokenizer(CHKHSH[h], h, HOW_HASH, patterns)
    name = _by_pattern(data)
    return PreTokenizer(name, h, HOW_PATTERN if name else None, patterns)


def unknown_message(path: Path, pre: PreTokenizer) -> str:
    """What to tell a user whose tokenizer's pre-tokenizer llama.cpp does not know."""
    shown = (pre.patterns[0][:70] + ("..." if len(pre.patterns[0]) > 70 else "")) if pre.patterns else "none"
    return (f"{path}: llama.cpp does not recognise this tokenizer's pre-tokenizer (split pattern {shown!r}; "
            f"llama.cpp's check hash {(pre.chkhsh or '?')[:16]}... is not one its converter knows): llama.cpp would split "
            "text differently from the fine-tune. Use the tokenizer of a published model (the base's: "
            "--tokenizer base, if training did not change it), or a llama.cpp whose converter lists this hash. "
            "Known by their split pattern: " + ", ".join(sorted(set(PRE_TOKENIZERS.values()))))
