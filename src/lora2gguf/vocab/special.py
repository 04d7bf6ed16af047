"""Special token ids, add_bos / add_eos / add_sep, the chat template and the normalizer flags of a
tokenizer folder, by the rules of the gguf-py that llama.cpp's converter runs with.

That is the gguf-py in llama.cpp's own tree (``SpecialVocab``); the ``gguf`` package on PyPI is
older and differs where it matters here: a ByteLevel post-processor means no BOS/EOS; the
post-processor wins over tokenizer_config.json's ``add_bos_token`` when they disagree; a
TemplateProcessing's leading token becomes the BOS when tokenizer_config names none; the
normalizer's lowercase / strip-accents flags are written. :class:`SpecialTokens` follows
llama.cpp's tree and takes the tokenizer.json already parsed (it is not read again).

The rules, in order: tokenizer.json's post-processor (ByteLevel: no BOS/EOS; RobertaProcessing:
BOS, EOS and SEP; TemplateProcessing: BOS when the single template starts with the BOS (or CLS)
token, EOS when it ends with the EOS token, a different last token becoming the EOS with the
old one kept as EOT/EOM, SEP from the pair template); then tokenizer_config.json: the chat
template (chat_template.jinja, chat_template.json, or its own ``chat_template``), ``add_X_token``
where the post-processor said nothing, and each ``X_token``'s id among tokenizer.json's added
tokens; then config.json's ``X_token_id`` for the types still unset. The first id found for a
type stays; ids outside the vocabulary are skipped.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import gguf

from ..errors import FormatError
from ..jsonfile import read_json_object

log = logging.getLogger(__name__)

#: The special-token types read by default (the converter's SpecialVocab's).
DEFAULT_TYPES = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")

_KEY_LOWERCASE = getattr(gguf.Keys.Tokenizer, "NORMALIZER_LOWERCASE", "tokenizer.ggml.normalizer.lowercase")
_KEY_STRIP_ACCENTS = getattr(gguf.Keys.Tokenizer, "NORMALIZER_STRIP_ACCENTS", "tokenizer.ggml.normalizer.strip_accents")


def _token_of(entry: Any) -> str | None:
    if isinstance(entry, str):
        return entry
    if isinstance(entry, dict) and isinstance(entry.get("content"), str):
        return entry["content"]
    return None


class SpecialTokens:
    """The attributes gguf-py's SpecialVocab has (``merges``, ``special_token_ids``,
    ``add_special_token``, ``chat_template``, ``special_token_types``, ``n_vocab``,
    ``normalizer_lowercase``, ``normalizer_strip_accents``), read from a folder by llama.cpp's
    tree's rules. ``tokenizer_json``: the folder's parsed tokenizer.json (None: the folder has
    none); ``tokenizer_config``: its parsed tokenizer_config.json (None: none); ``config``: the
    model's config.json (None: the folder's, if any)."""

    def __init__(self, folder: Path, *, tokenizer_json: Mapping[str, Any] | None,
                 tokenizer_config: Mapping[str, Any] | None, config: Mapping[str, Any] | None = None,
                 special_token_types: Sequence[str] | None = None, n_vocab: int | None = None):
        self.folder = Path(folder)
        self.n_vocab = n_vocab
        self.merges: list[str] = []
        self.special_token_ids: dict[str, int] = {}
        self.add_special_token: dict[str, bool] = {}
        self.chat_template: str | list | None = None
        self.normalizer_lowercase: bool | None = None
        self.normalizer_strip_accents: bool | None = None
        self.special_token_types: tuple[str, ...] = tuple(special_token_types or DEFAULT_TYPES)
        self._read(tokenizer_json, dict(tokenizer_config) if tokenizer_config is not None else None)
        if config is None and (self.folder / "config.json").is_file():
            config = read_json_object(self.folder / "config.json", missing="")
        if config is not None:
            self.from_config(config)

    def __repr__(self) -> str:
        return (f"<SpecialTokens with {len(self.merges)} merges, special tokens {self.special_token_ids or 'unset'}, "
                f"add special tokens {self.add_special_token or 'unset'}>")

    # ------------------------------------------------------------------ reading

    def set_special(self, typ: str, tid: Any, where: str = "") -> None:
        """gguf-py's rule: an integer id, kept if it is the first for ``typ`` and inside the vocabulary."""
        if not isinstance(tid, int) or isinstance(tid, bool):
            return
        if tid < 0:
            raise FormatError(f"{where or self.folder}: special token type {typ} has the negative id {tid}")
        if self.n_vocab is None or tid < self.n_vocab:
            self.special_token_ids.setdefault(typ, tid)

    def from_config(self, config: Mapping[str, Any]) -> None:
        """config.json's ``X_token_id`` (or its text_config's) for the types still unset."""
        text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
        for typ in self.special_token_types:
            tid = config.get(f"{typ}_token_id")
            if tid is None:
                tid = text.get(f"{typ}_token_id")
            self.set_special(typ, tid, "config.json")

    def _normalizer(self, node: Any) -> None:
        if not isinstance(node, dict):
            return
        kind = node.get("type")
        if kind == "Lowercase":
            self.normalizer_lowercase = True
        elif kind == "StripAccents":
            self.normalizer_strip_accents = True
        elif kind == "BertNormalizer":
            if "lowercase" in node:
                self.normalizer_lowercase = node["lowercase"]
            if "strip_accents" in node:
                self.normalizer_strip_accents = node["strip_accents"]
        elif kind == "Sequence":
            for n in node.get("normalizers", []):
                self._normalizer(n)

    def _read(self, tj: Mapping[str, Any] | None, tc: dict[str, Any] | None) -> None:
        added = (tj.get("added_tokens") or []) if tj else []
        if tj:
            if tj.get("normalizer"):
                self._normalizer(tj["normalizer"])
            self._post_processor(tj.get("post_processor"), tc)
        if not tc:
            return
        self.chat_template = self._template(tc)
        for typ in self.special_token_types:
            flag = tc.get(f"add_{typ}_token")
            if isinstance(flag, bool):
                if typ not in self.add_special_token:
                    self.add_special_token[typ] = flag
                elif self.add_special_token[typ] != flag:
                    log.debug("add_%s_token %s in tokenizer_config.json, %s by the post-processor: the latter wins",
                              typ, flag, self.add_special_token[typ])
            token = _token_of(tc.get(f"{typ}_token"))
            if token is None:
                continue
            tid = next((a.get("id") for a in added if isinstance(a, dict) and a.get("content") == token), None)
            self.set_special(typ, tid, str(self.folder / "tokenizer_config.json"))

    def _template(self, tc: Mapping[str, Any]) -> str | list | None:
        jinja, js = self.folder / "chat_template.jinja", self.folder / "chat_template.json"
        alt: Any = None
        if jinja.is_file():
            alt = jinja.read_text(encoding="utf-8")
            extra = sorted((self.folder / "additional_chat_templates").glob("*.jinja"))
            if extra:
                alt = [{"name": "default", "template": alt}] + [
                    {"name": p.stem, "template": p.read_text(encoding="utf-8")} for p in extra]
        elif js.is_file():
            try:
                alt = json.loads(js.read_text(encoding="utf-8")).get("chat_template")
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
                raise FormatError(f"{js}: not a JSON object with a chat_template ({e})") from None
        template = tc.get("chat_template", alt)
        if template is None or isinstance(template, (str, list)):
            return template
        log.warning("%s: chat_template is neither text nor a list of named templates; ignored",
                    self.folder / "tokenizer_config.json")
        return None

    def _post_processor(self, post: Any, tc: dict[str, Any] | None) -> None:
        if not isinstance(post, dict):
            return
        cfg = tc or {}
        bos, cls, eos, sep = (cfg.get(k) for k in ("bos_token", "cls_token", "eos_token", "sep_token"))
        if not bos and cls and tc:
            tc["bos_token"] = bos = cls
        if not eos and sep and tc:
            tc["eos_token"] = eos = sep
        add = self.add_special_token
        for proc in post.get("processors", [post]):
            if not isinstance(proc, dict):
                continue
            kind = proc.get("type")
            if kind == "ByteLevel":
                add.setdefault("bos", False)
                add.setdefault("eos", False)
            elif kind == "RobertaProcessing":
                add.update(bos=True, eos=True, sep=True)
                if not cls and tc:
                    tc["cls_token"] = cls = proc.get("cls", [bos])[0]
                if not sep and tc:
                    tc["sep_token"] = sep = proc.get("sep", [eos])[0]
            elif kind == "TemplateProcessing":
                bos, cls, eos, sep = self._template_processing(proc, tc, bos, cls, eos, sep)

    def _template_processing(self, proc: Mapping[str, Any], tc: dict[str, Any] | None, bos, cls, eos, sep):
        """gguf-py's crude reading of a TemplateProcessing: a special token first in the single
        template is the BOS, last is the EOS; one between A and B in the pair template is SEP."""
        single, pair = proc.get("single", []), proc.get("pair", [])
        add = self.add_special_token
        first = last = None
        if len(single) > 1:
            first = single[0].get("SpecialToken", {}).get("id")
            if first:
                if not tc:
                    bos = first
                elif first not in (bos, cls):
                    if not bos:
                        tc["bos_token"] = bos = first
                    if not cls:
                        tc["cls_token"] = cls = first
                add["bos"] = first in (bos, cls)
            last = single[-1].get("SpecialToken", {}).get("id")
            if last:
                if not tc:
                    eos = last
                elif last != eos:
                    if "eot" not in self.special_token_types:
                        self.special_token_types += ("eot",)
                        tc["eot_token"] = eos
                    elif "eom" not in self.special_token_types:
                        self.special_token_types += ("eom",)
                        tc["eom_token"] = eos
                    tc["eos_token"] = eos = last
                add["eos"] = last == eos
        if pair:
            start = 1 if first and pair[0].get("SpecialToken", {}).get("id") == first else 0
            stop = -1 if last and pair[-1].get("SpecialToken", {}).get("id") == last else None
            pair = pair[start:stop]
            if pair:
                a = pair[0].get("Sequence", {}).get("id")
                b = pair[-1].get("Sequence", {}).get("id")
                middle = pair[1:-1]
                if a == "A" and b == "B" and middle:
                    add_sep = False
                    entry = middle[0].get("SpecialToken", {}).get("id")
                    if entry and entry in (sep, eos) and not last:
                        add_sep = True
                    if len(middle) == 2:
                        entry = middle[1].get("SpecialToken", {}).get("id")
                        if entry and entry in (sep, eos):
                            add_sep = True
                    add["sep"] = add_sep
                    if add_sep and not sep and tc:
                        tc["sep_token"] = eos
        return bos, cls, eos, sep

    # ------------------------------------------------------------------ writing

    def add_to_gguf(self, writer: gguf.GGUFWriter, quiet: bool = True) -> None:
        """Write the merges, the special ids and add_X flags the writer has keys for, the chat
        template and the normalizer flags (gguf-py's order)."""
        if self.merges:
            writer.add_token_merges(self.merges)
        for typ, tid in self.special_token_ids.items():
            handler = getattr(writer, f"add_{typ}_token_id", None)
            if handler is None:
                log.debug("no GGUF key for special token type %s (id %s): skipped", typ, tid)
                continue
            handler(tid)
        for typ, value in self.add_special_token.items():
            handler = getattr(writer, f"add_add_{typ}_token", None)
            if handler is None:
                log.debug("no GGUF key for add_%s_token: skipped", typ)
                continue
            handler(value)
        if self.chat_template is not None:
            writer.add_chat_template(self.chat_template)
        if self.normalizer_lowercase is not None:
            writer.add_bool(_KEY_LOWERCASE, bool(self.normalizer_lowercase))
        if self.normalizer_strip_accents is not None:
            writer.add_bool(_KEY_STRIP_ACCENTS, bool(self.normalizer_strip_accents))


def merges_txt(folder: Path) -> list[str]:
    """merges.txt's merges as gguf-py reads them (a first line starting with '#' skipped; lines
    that are not two parts skipped); [] when there is no merges.txt."""
    path = Path(folder) / "merges.txt"
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    if lines and lines[0].strip().startswith("#"):
        lines = lines[1:]
    out = []
    for line in lines:
        parts = line.strip().split(None, 3)
        if not parts:
            continue
        if len(parts) == 2:
            out.append(f"{parts[0]} {parts[1]}")
        else:
            log.debug("%s: malformed line %r skipped", path, line)
    return out
