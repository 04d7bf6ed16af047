"""The adapter's tokenizer against the base's: per-file hashes, a semantic diff, and the decision
which tokenizer the GGUF gets, with the reason.

The rule (the seed report's fix, made explicit): by default the GGUF gets the adapter's tokenizer,
because the fine-tune was trained with it. When the two differ only in the chat template or in
special-token settings that is a warning; when token ids differ and the adapter carries no
resized embeddings it is a blocker, since the base's embedding rows would be read for the wrong
tokens.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..inspect import TokenizerInfo
from . import findings as F

ROLES = ("bos_token", "eos_token", "pad_token", "unk_token")
# tokenizer_config.json keys that change the ids a GGUF runtime feeds the model (beyond the named tokens)
SETTING_KEYS = ("add_bos_token", "add_eos_token", "add_prefix_space", "legacy")
# keys shown when they differ, without a warning: they do not reach the GGUF
# (a trainer's tokenizer.save_pretrained often changes them)
OTHER_KEYS = ("clean_up_tokenization_spaces", "model_max_length", "padding_side", "tokenizer_class")
SAMPLES = 10
DIFF_LINES = 40


@dataclass
class TokenizerDiff:
    files: dict[str, dict[str, Any]]  # name -> {"base": {md5, sha256, size} | None, "adapter": ..., "same": bool}
    vocab_size: tuple[int, int]
    changed_ids: list[dict[str, Any]]  # [{"id", "base", "adapter"}], first SAMPLES
    n_changed_ids: int
    merges: dict[str, Any]  # {"base": n, "adapter": n, "same": bool, "first_difference": index | None}
    added_tokens: list[dict[str, Any]]  # tokens whose id or special flag differ, or that exist on one side only
    specials: dict[str, dict[str, Any]]  # role -> {"base", "adapter", "base_id", "adapter_id"} (differing only)
    settings: dict[str, dict[str, Any]]  # tokenizer_config key -> {"base", "adapter"} (differing only)
    other_settings: dict[str, dict[str, Any]]  # differing keys that do not reach the GGUF
    template_same: bool
    template_diff: str  # short unified diff, "" when equal
    normalizer_same: bool
    pre_tokenizer_same: bool
    decoder_same: bool

    @property
    def identical_files(self) -> bool:
        return all(f["same"] for f in self.files.values())

    @property
    def ids_differ(self) -> bool:
        return (self.n_changed_ids > 0 or not self.merges["same"]
                or any(t["base_id"] != t["adapter_id"] for t in self.added_tokens))

    @property
    def processing_differs(self) -> bool:
        return not (self.normalizer_same and self.pre_tokenizer_same and self.decoder_same)

    @property
    def settings_differ(self) -> bool:
        return bool(self.specials or self.settings
                    or any(t["base_special"] != t["adapter_special"] for t in self.added_tokens))

    def to_dict(self) -> dict[str, Any]:
        return {
            "files": self.files, "vocab_size": {"base": self.vocab_size[0], "adapter": self.vocab_size[1]},
            "changed_ids": self.changed_ids, "n_changed_ids": self.n_changed_ids, "merges": self.merges,
            "added_tokens": self.added_tokens, "specials": self.specials, "settings": self.settings,
            "other_settings": self.other_settings,
            "chat_template": {"same": self.template_same, "diff": self.template_diff},
            "normalizer_same": self.normalizer_same, "pre_tokenizer_same": self.pre_tokenizer_same,
            "decoder_same": self.decoder_same,
        }


def _hash_dict(h) -> dict[str, Any] | None:
    return None if h is None else {"size": h.size, "md5": h.md5, "sha256": h.sha256}


def template_diff(a: str | None, b: str | None, *, limit: int = DIFF_LINES) -> str:
    """A short unified diff of two chat templates (base -> adapter)."""
    lines = list(difflib.unified_diff((a or "").splitlines(), (b or "").splitlines(), "base chat template",
                                      "adapter chat template", n=1, lineterm=""))
    if len(lines) > limit:
        lines = lines[:limit] + [f"... ({len(lines) - limit} more diff lines)"]
    return "\n".join(lines)


def _canon(x: Any) -> str:
    return json.dumps(x, sort_keys=True)


def diff(base: TokenizerInfo, adapter: TokenizerInfo) -> TokenizerDiff:
    names = [n for n in dict.fromkeys([*base.hashes, *adapter.hashes])]
    files = {}
    for n in names:
        hb, ha = base.hashes.get(n), adapter.hashes.get(n)
        files[n] = {"base": _hash_dict(hb), "adapter": _hash_dict(ha),
                    "same": hb is not None and ha is not None and hb.sha256 == ha.sha256}
    mb, ma = base.model, adapter.model
    changed: list[dict[str, Any]] = []
    n_changed = 0
    merges = {"base": 0, "adapter": 0, "same": True, "first_difference": None}
    added: list[dict[str, Any]] = []
    vocab_size = (mb.size if mb else 0, ma.size if ma else 0)
    # a tokenizer.model alone on one side (no merges, no text-processing settings to compare):
    # the pieces and added tokens are compared
    one_spm = mb is not None and ma is not None and (mb.model_type == "SentencePiece") != (ma.model_type == "SentencePiece")
    if mb is not None and ma is not None and mb is not ma:
        ib, ia = mb.id_to_token, ma.id_to_token
        for i in sorted(ib.keys() | ia.keys()):
            if ib.get(i) != ia.get(i):
                n_changed += 1
                if len(changed) < SAMPLES:
                    changed.append({"id": i, "base": ib.get(i), "adapter": ia.get(i)})
        merges = {"base": len(mb.merges), "adapter": len(ma.merges), "same": mb.merges == ma.merges or one_spm,
                  "first_difference": None}
        if not merges["same"]:
            first = next((k for k, (x, y) in enumerate(zip(mb.merges, ma.merges)) if x != y),
                         min(len(mb.merges), len(ma.merges)))
            merges["first_difference"] = first
        for tok in dict.fromkeys([*mb.added, *ma.added]):
            b, a = mb.added.get(tok), ma.added.get(tok)
            if b != a:
                added.append({"token": tok, "base_id": b[0] if b else None, "adapter_id": a[0] if a else None,
                              "base_special": b[1] if b else None, "adapter_special": a[1] if a else None})
    elif mb is not None and ma is not None:
        merges = {"base": len(mb.merges), "adapter": len(ma.merges), "same": True, "first_difference": None}
    specials = {}
    for role in ROLES:
        sb, sa = base.special(role), adapter.special(role)
        ib_, ia_ = base.token_id(sb), adapter.token_id(sa)
        if sb != sa or ib_ != ia_:
            specials[role] = {"base": sb, "adapter": sa, "base_id": ib_, "adapter_id": ia_}
    settings = {k: {"base": base.config.get(k), "adapter": adapter.config.get(k)}
                for k in SETTING_KEYS if base.config.get(k) != adapter.config.get(k)}
    other = {k: {"base": base.config.get(k), "adapter": adapter.config.get(k)}
             for k in OTHER_KEYS if base.config.get(k) != adapter.config.get(k)}
    same = lambda attr: (mb is None or ma is None or one_spm) or _canon(getattr(mb, attr)) == _canon(getattr(ma, attr))  # noqa: E731
    return TokenizerDiff(
        files=files, vocab_size=vocab_size, changed_ids=changed, n_changed_ids=n_changed, merges=merges,
        added_tokens=added[:50], specials=specials, settings=settings, other_settings=other,
        template_same=base.chat_template == adapter.chat_template,
        template_diff=template_diff(base.chat_template, adapter.chat_template),
        normalizer_same=same("normalizer"), pre_tokenizer_same=same("pre_tokenizer"), decoder_same=same("decoder"),
    )


@dataclass(frozen=True)
class TokenizerChoice:
    dir: Path | None
    source: str  # "adapter" | "base" | "none"
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"dir": str(self.dir) if self.dir else None, "source": self.source, "reason": self.reason}


@dataclass
class Decision:
    choice: TokenizerChoice
    findings: list[F.Finding] = field(default_factory=list)
    diff: TokenizerDiff | None = None


def _file_table(d: TokenizerDiff) -> str:
    """Per-file MD5 and SHA-256 (full, to compare with what the hub shows)."""
    rows = []
    for n, f in d.files.items():
        b, a = f["base"], f["adapter"]
        if f["same"]:
            rows.append(f"  {n}: identical, md5 {b['md5']} sha256 {b['sha256']}")
            continue
        rows.append(f"  {n}: differs")
        for side, h in (("base", b), ("adapter", a)):
            rows.append(f"    {side:8s} md5 {h['md5']} sha256 {h['sha256']}" if h else f"    {side:8s} (no such file)")
    return "\n".join(rows)


def decide(base: TokenizerInfo | None, adapter: TokenizerInfo | None, *, model_vocab: int | None,
           resized_embeddings: bool = False, prefer: str = "auto",
           adapter_dir: Path | None = None) -> Decision:
    """Which tokenizer the GGUF gets, and the findings that explain it.

    ``model_vocab`` is the base's embedding rows (config vocab_size); ``resized_embeddings`` says
    whether the adapter carries full embedding / lm_head tensors; ``prefer`` is "auto" (the
    adapter's when it has one), "adapter" or "base".
    """
    out: list[F.Finding] = []
    for tok, side in ((base, "base"), (adapter, "adapter")):
        if tok is not None and tok.errors:
            out.append(F.make("TOKENIZER_INVALID", "; ".join(tok.errors),
                              "the GGUF's vocabulary, merges and chat template come from these files",
                              f"download the {side}'s tokenizer files again, or save them with "
                              "AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)",
                              {"side": side, "folder": str(tok.folder)}))
    if base is None and adapter is None:
        out.append(F.make("TOKENIZER_MISSING", "neither folder holds tokenizer.json / tokenizer_config.json",
                          "a GGUF carries its tokenizer; without one llama.cpp cannot turn text into tokens",
                          "copy the tokenizer files of the model you fine-tuned from into the adapter folder "
                          "(tokenizer.save_pretrained(ADAPTER_DIR))"))
        return Decision(TokenizerChoice(None, "none", "no tokenizer found"), out)
    if adapter is None:
        out.append(F.make("TOKENIZER_FROM_BASE", f"{adapter_dir or 'the adapter folder'}: no tokenizer files (tokenizer.json, tokenizer_config.json)",
                          "the GGUF gets the base's tokenizer; that is right if training used it unchanged",
                          "if training changed the tokenizer or chat template, save it next to the adapter: "
                          "tokenizer.save_pretrained(ADAPTER_DIR)"))
        return Decision(TokenizerChoice(base.folder, "base", "the adapter folder has no tokenizer"), out)
    if base is None:
        return Decision(TokenizerChoice(adapter.folder, "adapter",
                                        "the base folder has no tokenizer; the adapter's is the one training used"), out)

    d = diff(base, adapter)
    data = {"diff": d.to_dict()}
    side = "base" if prefer == "base" else "adapter"
    chosen = base if side == "base" else adapter
    files = _file_table(d)
    if d.identical_files:
        out.append(F.make("TOKENIZER_SAME", f"all {len(d.files)} tokenizer files have the same SHA-256:\n{files}",
                          "nothing to choose: base and adapter agree", "", data))
        return Decision(TokenizerChoice(chosen.folder, side, "the adapter's and the base's tokenizer files are identical"),
                        out, d)

    # the chosen tokenizer must fit the model's embedding rows
    if model_vocab and chosen.model is not None and chosen.model.size > model_vocab and not resized_embeddings:
        over = sorted(((t, i) for t, (i, _) in chosen.model.added.items() if i >= model_vocab), key=lambda x: x[1])
        out.append(F.make(
            "TOKENIZER_TOO_LARGE",
            f"the {side}'s tokenizer has {chosen.model.size} ids but the model has {model_vocab} embedding rows "
            f"(config vocab_size); ids past the end: {', '.join(f'{t} ({i})' for t, i in over[:SAMPLES])}",
            "llama.cpp refuses a vocabulary larger than token_embd, and a trainer that added tokens without "
            "resize_token_embeddings never trained them",
            "remove the added tokens from the tokenizer, or retrain with model.resize_token_embeddings(len(tokenizer)) "
            "and modules_to_save=['embed_tokens','lm_head']",
            {"model_vocab": model_vocab, "tokenizer_size": chosen.model.size,
             "ids_past_end": [{"token": t, "id": i} for t, i in over[:50]]}))

    summary = []
    if d.n_changed_ids:
        summary.append(f"{d.n_changed_ids} ids map to different tokens (e.g. "
                       + ", ".join(f"{c['id']}: {c['base']!r} -> {c['adapter']!r}" for c in d.changed_ids[:3]) + ")")
    if not d.merges["same"]:
        summary.append(f"merges differ ({d.merges['base']} vs {d.merges['adapter']}, first at #{d.merges['first_difference']})")
    if d.added_tokens:
        summary.append("added tokens differ: " + ", ".join(
            f"{t['token']} (base {t['base_id']}, adapter {t['adapter_id']})" for t in d.added_tokens[:5]))
    if d.vocab_size[0] != d.vocab_size[1]:
        summary.append(f"vocabulary size base {d.vocab_size[0]}, adapter {d.vocab_size[1]}")
    for role, s in d.specials.items():
        summary.append(f"{role}: base {s['base']!r} ({s['base_id']}), adapter {s['adapter']!r} ({s['adapter_id']})")
    for k, s in d.settings.items():
        summary.append(f"{k}: base {s['base']!r}, adapter {s['adapter']!r}")
    for attr in ("normalizer", "pre_tokenizer", "decoder"):
        if not getattr(d, f"{attr}_same"):
            summary.append(f"{attr} differs")
    for k, s in d.other_settings.items():
        summary.append(f"{k}: base {s['base']!r}, adapter {s['adapter']!r} (does not reach the GGUF)")
    what = "\n".join(["tokenizer files:", files] + (["differences:"] + [f"  {s}" for s in summary] if summary else []))

    if d.ids_differ:
        if resized_embeddings:
            out.append(F.make("TOKENIZER_RESIZED", what,
                              "the adapter's tokenizer has other ids and the adapter saves full embedding / lm_head "
                              "tensors for them; the GGUF must get both together",
                              "keep the adapter's tokenizer (the default); make sure the saved embeddings are merged",
                              data))
            reason = "token ids differ and the adapter carries resized embeddings: the adapter's tokenizer goes with them"
        else:
            out.append(F.make("TOKENIZER_MISMATCH", what,
                              "the GGUF's embedding rows come from the base; with other token ids the model would "
                              "read the wrong rows for every changed token, and the seed run lost days to exactly "
                              "this (an adapter tokenizer whose MD5 differed from the base's)",
                              "fine-tune against the base's tokenizer, or give the exact base the adapter was trained "
                              "on; if the tokens were added on purpose, retrain with resize_token_embeddings and "
                              "modules_to_save=['embed_tokens','lm_head']. Accept (--accept TOKENIZER_MISMATCH) only "
                              "if you know the changed ids never occur", data))
            reason = (f"token ids differ ({'; '.join(summary[:2])}); the {side}'s tokenizer is used, "
                      "as training used it, but the embeddings do not match (blocker TOKENIZER_MISMATCH)")
    else:
        if not d.template_same:
            out.append(F.make("TEMPLATE_DIFFERS", f"{base.chat_template_source or '(none)'} (base) vs "
                              f"{adapter.chat_template_source or '(none)'} (adapter):\n{d.template_diff}",
                              "the GGUF's chat template decides how llama.cpp frames a conversation; the fine-tune "
                              "learned the adapter's framing",
                              f"nothing if the adapter's template is the one used in training (the default choice); "
                              f"otherwise --tokenizer base", data))
        if d.settings_differ or d.processing_differs:
            out.append(F.make("TOKENIZER_DIFFERS", what,
                              "token ids agree, but special tokens or text processing decide what llama.cpp feeds the "
                              "model and where it stops",
                              "nothing if the adapter's tokenizer is the one used in training (the default choice); "
                              "otherwise --tokenizer base", data))
        if d.template_same and not d.settings_differ and not d.processing_differs:
            out.append(F.make("TOKENIZER_EQUIVALENT", what,
                              "the files differ (a trainer re-saved them), but tokens, ids, special tokens, text "
                              "processing and chat template agree", "", data))
        reason = ("the token ids agree; the adapter's tokenizer carries the template and special-token settings "
                  "the fine-tune was trained with" if side == "adapter"
                  else "token ids agree; --tokenizer base asked for the base's")
    return Decision(TokenizerChoice(chosen.folder, side, reason), out, d)

