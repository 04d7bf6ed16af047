"""The GPT-OSS tokenizer (o200k_harmony), rebuilt offline.

GPT-OSS uses o200k_harmony: the 199,998 byte-level BPE ranks of ``o200k_base`` plus the Harmony
special tokens, ids 199998..201087 (vocabulary 201,088). Nothing is downloaded:

- the MIT package ``quicktok-v1`` carries the o200k vocabulary; dumping each rank's bytes as
  ``base64(bytes) rank`` lines reproduces ``o200k_base.tiktoken`` byte for byte, checked against
  its published sha256 (:func:`tiktoken_dir`);
- transformers' ``TikTokenConverter`` turns that file into a Hugging Face ``tokenizer.json``,
  built once and cached (:func:`write_tokenizer`);
- openai-harmony loads offline from the same folder (:func:`harmony_encoding`).

The cache lives in ``$LORA2GGUF_CACHE/o200k`` (default ``~/.cache/lora2gguf/o200k``).
quicktok, transformers/tokenizers and openai-harmony are optional extras, imported only by the
functions that need them.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from importlib import resources
from pathlib import Path
from typing import Any

from .cachedir import atomic_write_bytes, cache_root
from .errors import InputError, OutputError, UnsupportedError
from .gguf_out import sha256_file

log = logging.getLogger(__name__)

#: sha256 of OpenAI's published ``o200k_base.tiktoken`` (tiktoken checks the same hash).
O200K_BASE_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
#: Number of BPE ranks in o200k_base (ids 0..199997).
N_RANKS = 199_998
#: Vocabulary size of GPT-OSS (config ``vocab_size``; ids 0..201087).
VOCAB_SIZE = 201_088
#: File name openai-harmony and tiktoken look for.
TIKTOKEN_FILE = "o200k_base.tiktoken"

#: The o200k pre-tokenizer regex (a published fact of the encoding; tests compare it with
#: tiktoken's own definition).
O200K_PATTERN = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)

_NAMED_SPECIALS = {
    199998: "<|startoftext|>",
    199999: "<|endoftext|>",
    200002: "<|return|>",
    200003: "<|constrain|>",
    200005: "<|channel|>",
    200006: "<|start|>",
    200007: "<|end|>",
    200008: "<|message|>",
    200012: "<|call|>",
}

#: Every Harmony special token of gpt-oss, name -> id (ids 199998..201087; the ids without a
#: name of their own are ``<|reserved_N|>``).
HARMONY_SPECIAL_TOKENS: dict[str, int] = {
    _NAMED_SPECIALS.get(i, f"<|reserved_{i}|>"): i for i in range(N_RANKS, VOCAB_SIZE)
}

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|return|>"
PAD_TOKEN = "<|endoftext|>"
#: transformers' "no limit" value, as gpt-oss's tokenizer_config.json has it.
MODEL_MAX_LENGTH = 1000000000000000019884624838656

#: The Harmony chat template shipped with lora2gguf (see the file's header for its rules).
HARMONY_CHAT_TEMPLATE: str = (
    resources.files("lora2gguf").joinpath("data/harmony_chat_template.jinja").read_text(encoding="utf-8")
)

# Bump when the way tokenizer.json is built changes: the cached copy is then rebuilt.
_BUILD_VERSION = 1


def _o200k_cache() -> Path:
    d = cache_root() / "o200k"
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create the tokenizer cache folder {d}: {e}; set LORA2GGUF_CACHE "
                          "to a writable folder") from e
    return d


def tiktoken_rank_bytes(encoding: str, n_ranks: int) -> bytes:
    """A tiktoken rank file (one ``base64(token bytes) rank`` line per rank, ranks 0..n_ranks-1)
    rebuilt from one of quicktok-v1's bundled encodings (``o200k_base``, ``llama3``, ``qwen3``...)."""
    try:
        import quicktok
    except ImportError as e:
        raise UnsupportedError(f"the offline {encoding} tokenizer needs the package quicktok-v1: "
                               "pip install 'lora2gguf[reference]'") from e
    enc = quicktok.get_encoding(encoding)
    # decode_single_token_bytes(rank) is the rank's bytes (token_byte_values() is sorted by bytes,
    # not by rank, so it is not used).
    return b"".join(
        base64.b64encode(enc.decode_single_token_bytes(r)) + b" " + str(r).encode() + b"\n"
        for r in range(n_ranks)
    )


def o200k_base_bytes() -> bytes:
    """The text of ``o200k_base.tiktoken`` rebuilt from quicktok-v1's vocabulary (one
    ``base64(token bytes) rank`` line per rank), checked against :data:`O200K_BASE_SHA256`."""
    data = tiktoken_rank_bytes("o200k_base", N_RANKS)
    got = hashlib.sha256(data).hexdigest()
    if got != O200K_BASE_SHA256:
        import quicktok
        raise InputError(f"o200k_base rebuilt from quicktok-v1 {getattr(quicktok, '__version__', '?')} "
                         f"has sha256 {got}, expected {O200K_BASE_SHA256}; install a quicktok-v1 "
                         "whose o200k vocabulary is unchanged (0.4.x)")
    return data


def tiktoken_dir() -> Path:
    """The cache folder holding ``o200k_base.tiktoken`` (written once from quicktok-v1 and checked
    by sha256). Point ``TIKTOKEN_ENCODINGS_BASE`` at it to load openai-harmony offline."""
    d = _o200k_cache()
    path = d / TIKTOKEN_FILE
    if path.is_file() and sha256_file(path) == O200K_BASE_SHA256:
        return d
    if path.exists():
        log.warning("%s has the wrong sha256; rewriting it", path)
    log.info("writing %s from quicktok-v1", path)
    atomic_write_bytes(path, o200k_base_bytes())
    return d


def tiktoken_path() -> Path:
    """Path of the cached, checked ``o200k_base.tiktoken``."""
    return tiktoken_dir() / TIKTOKEN_FILE


def _build_stamp() -> str:
    return hashlib.sha256(
        json.dumps([_BUILD_VERSION, O200K_BASE_SHA256, O200K_PATTERN, sorted(HARMONY_SPECIAL_TOKENS.items())])
        .encode()
    ).hexdigest()


def tokenizer_json_path() -> Path:
    """The cached gpt-oss ``tokenizer.json`` (about 27 MB), built on first use with transformers'
    ``TikTokenConverter`` from the o200k ranks, the o200k pattern and the Harmony special tokens."""
    d = _o200k_cache()
    path = d / "tokenizer.json"
    stamp_path = d / "tokenizer.json.stamp"
    stamp = _build_stamp()
    if path.is_file() and stamp_path.is_file() and stamp_path.read_text().strip() == stamp:
        return path
    tk = tiktoken_path()
    try:
        from transformers.convert_slow_tokenizer import TikTokenConverter
    except ImportError as e:
        raise UnsupportedError("building tokenizer.json needs transformers and tokenizers: "
                               "pip install 'lora2gguf[reference]'") from e
    log.info("building the o200k_harmony tokenizer.json (once; cached in %s)", d)
    specials = sorted(HARMONY_SPECIAL_TOKENS, key=HARMONY_SPECIAL_TOKENS.__getitem__)
    tok = TikTokenConverter(vocab_file=str(tk), pattern=O200K_PATTERN,
                            extra_special_tokens=specials).converted()
    # Added tokens get consecutive ids after the ranks; check that they landed where they belong.
    for name in ("<|startoftext|>", "<|return|>", "<|call|>", "<|reserved_201087|>"):
        if tok.token_to_id(name) != HARMONY_SPECIAL_TOKENS[name]:
            raise InputError(f"tokenizer.json build put {name} at id {tok.token_to_id(name)}, "
                             f"expected {HARMONY_SPECIAL_TOKENS[name]}")
    fd, tmp = tempfile.mkstemp(dir=d, prefix="tokenizer.", suffix=".json.tmp")
    os.close(fd)
    try:
        tok.save(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    atomic_write_bytes(stamp_path, stamp.encode())
    return path


def _added_token(content: str, special: bool = True) -> dict[str, Any]:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": special}


def write_tokenizer(
    dest_dir: str | os.PathLike[str],
    *,
    chat_template: str | None = None,
    eos_token: str = EOS_TOKEN,
    pad_token: str | None = PAD_TOKEN,
    bos_token: str | None = BOS_TOKEN,
    extra_tokens: Iterable[str] = (),
    extra_tokens_special: bool = True,
    model_max_length: int = MODEL_MAX_LENGTH,
    template_in_config: bool = False,
    tokenizer_json_hook: Callable[[dict[str, Any]], None] | None = None,
) -> Path:
    """Write the gpt-oss tokenizer files into ``dest_dir`` as a Hugging Face gpt-oss repo has them:
    ``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json`` and
    ``chat_template.jinja``. Returns ``dest_dir``.

    Variants for tests:
    ``chat_template`` replaces :data:`HARMONY_CHAT_TEMPLATE`; ``eos_token``/``pad_token``/
    ``bos_token`` change the named special tokens (``None`` leaves pad/bos out);
    ``extra_tokens`` appends added tokens with ids from 201088 on (beyond the model's vocab, as a
    trainer that adds tokens without resizing does); ``template_in_config`` puts the template
    into tokenizer_config.json (older transformers style) instead of chat_template.jinja;
    ``tokenizer_json_hook`` may edit the parsed tokenizer.json dict before it is written.
    Without extra tokens or a hook, tokenizer.json is a byte copy of the cached build.
    """
    dest = Path(dest_dir)
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create tokenizer folder {dest}: {e}") from e
    extra = list(extra_tokens)
    src = tokenizer_json_path()
    known = dict(HARMONY_SPECIAL_TOKENS)
    for i, t in enumerate(extra):
        if t in known:
            raise InputError(f"extra token {t!r} is already in the o200k_harmony vocabulary (id {known[t]})")
        known[t] = VOCAB_SIZE + i
    for role, t in (("eos_token", eos_token), ("pad_token", pad_token), ("bos_token", bos_token)):
        if t is not None and t not in known:
            raise InputError(f"{role} {t!r} is not a special token of o200k_harmony nor one of extra_tokens")

    if not extra and tokenizer_json_hook is None:
        shutil.copyfile(src, dest / "tokenizer.json")
    else:
        tj = json.loads(src.read_text(encoding="utf-8"))
        for t in extra:
            tj["added_tokens"].append({"id": known[t], **_added_token(t, extra_tokens_special)})
        if tokenizer_json_hook is not None:
            tokenizer_json_hook(tj)
        (dest / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")

    decoder = {str(i): _added_token(t) for t, i in HARMONY_SPECIAL_TOKENS.items()}
    for t in extra:
        decoder[str(known[t])] = _added_token(t, extra_tokens_special)
    template = HARMONY_CHAT_TEMPLATE if chat_template is None else chat_template
    config: dict[str, Any] = {
        "added_tokens_decoder": decoder,
        "bos_token": bos_token,
        "clean_up_tokenization_spaces": False,
        "eos_token": eos_token,
        "extra_special_tokens": {},
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": model_max_length,
        "pad_token": pad_token,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    if bos_token is None:
        del config["bos_token"]
    if pad_token is None:
        del config["pad_token"]
    if template_in_config:
        config["chat_template"] = template
    (dest / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n",
                                                encoding="utf-8")
    stm = {k: _added_token(v) for k, v in (("bos_token", bos_token), ("eos_token", eos_token),
                                            ("pad_token", pad_token)) if v is not None}
    (dest / "special_tokens_map.json").write_text(json.dumps(stm, indent=2) + "\n", encoding="utf-8")
    tpl_path = dest / "chat_template.jinja"
    if template_in_config:
        tpl_path.unlink(missing_ok=True)
    else:
        tpl_path.write_text(template, encoding="utf-8")
    return dest


def harmony_encoding():
    """openai-harmony's ``HARMONY_GPT_OSS`` encoding, loaded offline from :func:`tiktoken_dir`
    (``TIKTOKEN_ENCODINGS_BASE`` is set while it loads, then restored)."""
    try:
        import openai_harmony as oh
    except ImportError as e:
        raise UnsupportedError("harmony_encoding() needs openai-harmony: pip install 'lora2gguf[reference]'") from e
    d = str(tiktoken_dir())
    old = os.environ.get("TIKTOKEN_ENCODINGS_BASE")
    os.environ["TIKTOKEN_ENCODINGS_BASE"] = d
    try:
        return oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)
    finally:
        if old is None:
            del os.environ["TIKTOKEN_ENCODINGS_BASE"]
        else:
            os.environ["TIKTOKEN_ENCODINGS_BASE"] = old


def render_chat(messages: list[dict[str, Any]], *, chat_template: str | None = None,
                add_generation_prompt: bool = False, **variables: Any) -> str:
    """Render ``messages`` with a chat template (default :data:`HARMONY_CHAT_TEMPLATE`) using plain
    jinja2, the way transformers does (trim_blocks, lstrip_blocks). Needs jinja2."""
    try:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:
        raise UnsupportedError("render_chat() needs jinja2") from e

    def raise_exception(message: str) -> None:
        raise InputError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        undefined=jinja2.Undefined)
    env.globals["raise_exception"] = raise_exception
    tpl = env.from_string(HARMONY_CHAT_TEMPLATE if chat_template is None else chat_template)
    return tpl.render(messages=copy.deepcopy(messages), add_generation_prompt=add_generation_prompt,
                      **variables)
