"""Tokenizer folders as the hub has them, rebuilt offline, for tests, the demo and the benchmark.

Nothing is downloaded:

- **Llama 3.x** (:func:`llama3_tokenizer`) and **Qwen3 / Qwen2.5** (:func:`qwen3_tokenizer`):
  the BPE ranks come from the MIT package ``quicktok-v1`` (its bundled ``llama3`` and ``qwen3``
  vocabularies), transformers' ``TikTokenConverter`` turns them into a ``tokenizer.json`` (the
  way :mod:`lora2gguf.o200k` builds GPT-OSS's), and the files around it (added tokens,
  post-processor, tokenizer_config.json, special_tokens_map.json) are written as the hub's
  repositories have them. The Llama 3 ranks are checked against the published SHA-256 of Meta's
  ``tokenizer.model``; both are checked by what llama.cpp's converter says of them (its
  pre-tokenizer hash names them ``llama-bpe`` and ``qwen2``, see tests/test_vocab_families.py).
- **SentencePiece** (:func:`sentencepiece_tokenizer`): a small BPE model trained by
  ``sentencepiece`` on a generated English text, with byte fallback, ``<unk>``/``<s>``/``</s>`` at
  0/1/2 as Llama 2 and Mistral v0.1-v0.3 ship it (Mistral's ``[INST]``... as control pieces with
  ``style="mistral"``), the ``tokenizer.json`` transformers converts from it, and the
  tokenizer_config.json of those repositories.

The chat templates are the published ones where they are short (Llama 3 Instruct's, Llama 2's,
Mistral's ``[INST]`` template) and a condensed ChatML template for Qwen3 (the real one adds tool
calls and reasoning-content handling; the tokens it uses are the same).

Builds are cached per process (a tokenizer.json takes about a second to build); the rank files
live in ``$LORA2GGUF_CACHE/tokenizers`` (see :func:`lora2gguf.cachedir.cache_root`).
Needs the ``reference`` extras (quicktok-v1, tiktoken, transformers, tokenizers) and
``sentencepiece``.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import random
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import InputError, UnsupportedError
from ..cachedir import atomic_write_bytes, cache_root
from ..o200k import tiktoken_rank_bytes

# --------------------------------------------------------------------------- facts

#: The pre-tokenizer split regexes (published in each model's tokenizer.json).
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")

#: Llama 3: 128,000 BPE ranks, then 256 special tokens (ids 128000..128255); config vocab_size 128256.
LLAMA3_N_RANKS = 128_000
LLAMA3_VOCAB_SIZE = 128_256
#: sha256 of Meta's Llama 3 ``original/tokenizer.model`` (a tiktoken rank file).
LLAMA3_RANKS_SHA256 = "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55"


def _llama31_specials() -> list[str]:
    """The 256 special tokens of Llama 3.1 / 3.2 / 3.3, in id order from 128000."""
    named = {0: "<|begin_of_text|>", 1: "<|end_of_text|>", 4: "<|finetune_right_pad_id|>",
             6: "<|start_header_id|>", 7: "<|end_header_id|>", 8: "<|eom_id|>", 9: "<|eot_id|>",
             10: "<|python_tag|>"}
    out, reserved = [], 0
    for k in range(256):
        if k in named:
            out.append(named[k])
        else:
            out.append(f"<|reserved_special_token_{reserved}|>")
            reserved += 1
    return out


LLAMA3_SPECIALS: tuple[str, ...] = tuple(_llama31_specials())
#: Llama 3.1 Instruct's generation_config.json / config.json eos_token_id.
LLAMA3_EOS_IDS = (128001, 128008, 128009)

#: Llama 3 Instruct's chat template (as Meta-Llama-3-8B-Instruct publishes it).
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

#: Qwen2.5 / Qwen3: 151,643 BPE ranks, then these added tokens (content, special) from id 151643;
#: config vocab_size 151936 (the rest of the embedding rows are unused).
QWEN3_N_RANKS = 151_643
QWEN3_VOCAB_SIZE = 151_936
QWEN3_ADDED: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True), ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True), ("<|quad_start|>", True),
    ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
    ("<|repo_name|>", False), ("<|file_sep|>", False), ("<tool_response>", False), ("</tool_response>", False),
    ("<think>", False), ("</think>", False),
)
#: Qwen3's generation_config.json eos_token_id (<|im_end|>, <|endoftext|>).
QWEN3_EOS_IDS = (151645, 151643)

#: A condensed Qwen3 ChatML template (the published one adds tools and reasoning content).
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}"
    "{%- endif %}"
)

#: Llama 2 Chat's template (as meta-llama/Llama-2-7b-chat-hf publishes it, without the default system prompt).
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)

#: Mistral 7B Instruct's [INST] template (v0.1/v0.2 form).
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

#: Mistral v0.3's control tokens after <unk>, <s>, </s> (ids 3..9 of its tokenizer.model).
MISTRAL_CONTROL = ("[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                   "[TOOL_RESULTS]", "[/TOOL_RESULTS]")

#: transformers' "no limit" model_max_length, as Llama 2's tokenizer_config.json has it.
NO_MAX_LENGTH = 1000000000000000019884624838656


# --------------------------------------------------------------------------- helpers


def _added(content: str, special: bool = True, normalized: bool = False) -> dict[str, Any]:
    return {"content": content, "lstrip": False, "normalized": normalized, "rstrip": False,
            "single_word": False, "special": special}


def _write_json(path: Path, obj: Any, indent: int | None = 2) -> None:
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=indent) + "\n", encoding="utf-8")


def _mkdir(dest: str | Path) -> Path:
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    return dest


def _rank_file(encoding: str, n_ranks: int, sha256: str | None) -> Path:
    """quicktok's ``encoding`` as a tiktoken rank file in the cache, at a path named by its content
    (tiktoken caches what it reads by path), checked against ``sha256`` when given."""
    data = tiktoken_rank_bytes(encoding, n_ranks)
    got = hashlib.sha256(data).hexdigest()
    if sha256 is not None and got != sha256:
        raise InputError(f"the {encoding} ranks rebuilt from quicktok-v1 have sha256 {got}, expected {sha256}; "
                         "install a quicktok-v1 whose bundled vocabulary is unchanged (0.4.x)")
    d = cache_root() / "tokenizers"
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{encoding}-{got[:16]}.tiktoken"
    if not path.is_file():
        atomic_write_bytes(path, data)
    return path


@functools.lru_cache(maxsize=4)
def _converted(encoding: str, n_ranks: int, sha256: str | None, pattern: str,
               added: tuple[tuple[str, bool], ...]) -> str:
    """tokenizer.json text: TikTokenConverter on quicktok's ranks, the added tokens (content,
    special) from id n_ranks on."""
    try:
        from tokenizers import AddedToken
        from transformers.convert_slow_tokenizer import TikTokenConverter
    except ImportError as e:
        raise UnsupportedError("rebuilding a tokenizer needs transformers and tokenizers: "
                               "pip install 'lora2gguf[reference]'") from e
    tok = TikTokenConverter(vocab_file=str(_rank_file(encoding, n_ranks, sha256)), pattern=pattern).converted()
    tok.add_tokens([AddedToken(c, special=s, normalized=False) for c, s in added])
    for i, (c, _) in enumerate(added):
        if tok.token_to_id(c) != n_ranks + i:
            raise InputError(f"{encoding} tokenizer build put {c} at id {tok.token_to_id(c)}, expected {n_ranks + i}")
    return tok.to_str()


def _template_processing(bos: str, bos_id: int) -> dict[str, Any]:
    """A TemplateProcessing post-processor that puts ``bos`` first (as transformers writes it)."""
    st = lambda type_id: {"SpecialToken": {"id": bos, "type_id": type_id}}  # noqa: E731
    return {"type": "TemplateProcessing",
            "single": [st(0), {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [st(0), {"Sequence": {"id": "A", "type_id": 0}}, st(1), {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}}}


def _finish(dest: Path, tj: dict[str, Any], config: dict[str, Any], special_map: dict[str, Any],
            extra_tokens: Sequence[tuple[str, bool]], first_extra_id: int,
            tokenizer_json_hook=None, config_hook=None) -> Path:
    """Append ``extra_tokens`` (content, special) as added tokens from ``first_extra_id`` (a chat
    fine-tune that added tokens and resized its embeddings), run the hooks, write the files."""
    decoder = config.setdefault("added_tokens_decoder", {})
    for k, (content, special) in enumerate(extra_tokens):
        i = first_extra_id + k
        tj["added_tokens"].append({"id": i, **_added(content, special)})
        decoder[str(i)] = _added(content, special)
    config["added_tokens_decoder"] = dict(sorted(decoder.items(), key=lambda kv: int(kv[0])))
    if tokenizer_json_hook is not None:
        tokenizer_json_hook(tj)
    if config_hook is not None:
        config_hook(config)
    _write_json(dest / "tokenizer.json", tj)
    _write_json(dest / "tokenizer_config.json", dict(sorted(config.items())))
    _write_json(dest / "special_tokens_map.json", special_map)
    return dest


# --------------------------------------------------------------------------- Llama 3


def llama3_tokenizer(dest: str | Path, *, instruct: bool = True, extra_tokens: Iterable[tuple[str, bool]] = (),
                     tokenizer_json_hook=None, config_hook=None) -> Path:
    """Llama 3.1 / 3.2 tokenizer files (tokenizer.json, tokenizer_config.json,
    special_tokens_map.json) as meta-llama's repositories have them: the ``llama-bpe`` split regex,
    ``ignore_merges``, a post-processor that adds ``<|begin_of_text|>``, the 256 special tokens;
    the Instruct variant (default) has ``<|eot_id|>`` as eos_token and the chat template, the base
    variant ``<|end_of_text|>`` and no template.

    ``extra_tokens`` (content, special) are added from id 128256 on; the hooks may edit the
    tokenizer.json / tokenizer_config.json dicts before they are written. Returns ``dest``.
    The model folder's generation_config.json has eos_token_id :data:`LLAMA3_EOS_IDS`."""
    dest = _mkdir(dest)
    tj = json.loads(_converted("llama3", LLAMA3_N_RANKS, LLAMA3_RANKS_SHA256, LLAMA3_PATTERN,
                               tuple((s, True) for s in LLAMA3_SPECIALS)))
    tj["model"].update(byte_fallback=False, ignore_merges=True)
    tj["pre_tokenizer"]["pretokenizers"][1].update(add_prefix_space=False, trim_offsets=True, use_regex=False)
    tj["post_processor"] = {"type": "Sequence", "processors": [
        {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        _template_processing("<|begin_of_text|>", LLAMA3_N_RANKS)]}
    tj["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    eos = "<|eot_id|>" if instruct else "<|end_of_text|>"
    config: dict[str, Any] = {
        "added_tokens_decoder": {str(LLAMA3_N_RANKS + k): _added(s) for k, s in enumerate(LLAMA3_SPECIALS)},
        "bos_token": "<|begin_of_text|>",
        "clean_up_tokenization_spaces": True,
        "eos_token": eos,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 131072,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    if instruct:
        config["chat_template"] = LLAMA3_CHAT_TEMPLATE
    special_map = {"bos_token": _added("<|begin_of_text|>"), "eos_token": _added(eos)}
    return _finish(dest, tj, config, special_map, list(extra_tokens), LLAMA3_VOCAB_SIZE, tokenizer_json_hook,
                   config_hook)


# --------------------------------------------------------------------------- Qwen3


def qwen3_tokenizer(dest: str | Path, *, extra_tokens: Iterable[tuple[str, bool]] = (),
                    tokenizer_json_hook=None, config_hook=None) -> Path:
    """Qwen3 (and Qwen2.5: the same vocabulary) tokenizer files as Qwen's repositories have them:
    NFC normalizer, the ``qwen2`` split regex, the 26 added tokens (ChatML ``<|im_start|>``,
    ``<|im_end|>``, ``<|endoftext|>``... special; ``<think>``, ``<tool_call>``, the FIM tokens not),
    ``<|im_end|>`` as eos_token, ``<|endoftext|>`` as pad_token, no bos_token, the chat template
    (condensed). ``extra_tokens`` are added from id 151669 on (within the 151,936 embedding rows).
    Returns ``dest``; the model folder's generation_config.json has :data:`QWEN3_EOS_IDS`."""
    dest = _mkdir(dest)
    tj = json.loads(_converted("qwen3", QWEN3_N_RANKS, None, QWEN2_PATTERN, QWEN3_ADDED))
    tj["normalizer"] = {"type": "NFC"}
    tj["model"].update(byte_fallback=False, ignore_merges=False, continuing_subword_prefix="", end_of_word_suffix="")
    tj["pre_tokenizer"]["pretokenizers"][1].update(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tj["post_processor"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    tj["decoder"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    config: dict[str, Any] = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {str(QWEN3_N_RANKS + k): _added(c, s) for k, (c, s) in enumerate(QWEN3_ADDED)},
        "additional_special_tokens": [c for c, s in QWEN3_ADDED if s and c != "<|endoftext|>"],
        "bos_token": None,
        "chat_template": QWEN3_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    special_map = {"additional_special_tokens": config["additional_special_tokens"],
                   "eos_token": _added("<|im_end|>"), "pad_token": _added("<|endoftext|>")}
    return _finish(dest, tj, config, special_map, list(extra_tokens), QWEN3_N_RANKS + len(QWEN3_ADDED),
                   tokenizer_json_hook, config_hook)


# --------------------------------------------------------------------------- SentencePiece

_WORDS = ("the quick brown fox jumps over a lazy dog while the model reads every token of its adapter and "
          "merges weights into one stream llama mistral answer question system user assistant tensor "
          "layer norm rope head vocabulary chat template hello world fine tune learning rate batch step "
          "number seven eleven thousand café naïve déjà vu 東京 北京 привет мир").split()


def _corpus(n_lines: int = 2000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 16))]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 99999)))
        lines.append(" ".join(words) + rng.choice([".", "?", "!", ",", ":", ""]))
    return lines


@functools.lru_cache(maxsize=4)
def _spm_model(vocab_size: int, control: tuple[str, ...]) -> bytes:
    try:
        import sentencepiece as spm
    except ImportError as e:
        raise UnsupportedError("training a SentencePiece model needs sentencepiece: pip install sentencepiece") from e
    buf = io.BytesIO()
    # Llama 2's trainer spec: BPE, byte fallback, digits split, identity normalization, a dummy
    # prefix, extra whitespace kept, <unk> <s> </s> at 0 1 2, no pad
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, allow_whitespace_only_pieces=True,
        character_coverage=1.0, num_threads=1, minloglevel=2, control_symbols=list(control), seed_sentencepiece_size=10000)
    return buf.getvalue()


@functools.lru_cache(maxsize=4)
def _spm_tokenizer_json(model: bytes, config_json: str) -> str:
    """The tokenizer.json transformers converts from a tokenizer.model (what the hub's Llama 2 and
    Mistral repositories carry beside it)."""
    import tempfile

    try:
        from transformers import AutoTokenizer
    except ImportError as e:
        raise UnsupportedError("converting a SentencePiece model needs transformers (and protobuf): "
                               "pip install 'lora2gguf[reference]'") from e
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "tokenizer.model").write_bytes(model)
        (Path(d) / "tokenizer_config.json").write_text(config_json, encoding="utf-8")
        tok = AutoTokenizer.from_pretrained(d)
        return tok.backend_tokenizer.to_str()


def sentencepiece_tokenizer(dest: str | Path, *, style: str = "llama2", vocab_size: int = 512,
                            tokenizer_json: bool = True, added_tokens: Mapping[str, tuple[int, bool]] | None = None,
                            added_tokens_json: bool = False, config_hook=None) -> Path:
    """A SentencePiece tokenizer folder: ``tokenizer.model`` (trained here, ``vocab_size`` pieces),
    tokenizer_config.json and special_tokens_map.json as Llama 2 (``style="llama2"``) or Mistral
    v0.3 (``style="mistral"``: ``[INST]``, ``[/INST]``, ``[TOOL_CALLS]``... as control pieces
    3..9) have them, and the tokenizer.json transformers converts from it (``tokenizer_json``).

    ``added_tokens``: content -> (id, special) added beyond the model's pieces (a fine-tune that
    added a pad token and resized), listed in tokenizer_config's added_tokens_decoder and
    tokenizer.json's added_tokens, and in added_tokens.json with ``added_tokens_json``."""
    if style not in ("llama2", "mistral"):
        raise InputError(f"style={style!r}: choose 'llama2' or 'mistral'")
    dest = _mkdir(dest)
    control = MISTRAL_CONTROL if style == "mistral" else ()
    model = _spm_model(vocab_size, control)
    (dest / "tokenizer.model").write_bytes(model)
    specials = {0: "<unk>", 1: "<s>", 2: "</s>", **{3 + k: c for k, c in enumerate(control)}}
    config: dict[str, Any] = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {str(i): _added(c) for i, c in specials.items()},
        "bos_token": "<s>",
        "chat_template": LLAMA2_CHAT_TEMPLATE if style == "llama2" else MISTRAL_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "legacy": style == "mistral",
        "model_max_length": NO_MAX_LENGTH,
        "pad_token": None,
        "sp_model_kwargs": {},
        "spaces_between_special_tokens": False,
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }
    if style == "llama2":
        config["padding_side"] = "right"
    else:
        config["additional_special_tokens"] = []
    if tokenizer_json:
        tj = json.loads(_spm_tokenizer_json(model, json.dumps(config)))
    added = dict(added_tokens or {})
    for content, (i, special) in sorted(added.items(), key=lambda kv: kv[1][0]):
        config["added_tokens_decoder"][str(i)] = _added(content, special)
        if tokenizer_json:
            tj["added_tokens"].append({"id": i, **_added(content, special)})
    if added_tokens_json and added:
        _write_json(dest / "added_tokens.json", {c: i for c, (i, _) in added.items()})
    if config_hook is not None:
        config_hook(config)
    if tokenizer_json:
        _write_json(dest / "tokenizer.json", tj)
    _write_json(dest / "tokenizer_config.json", config)
    _write_json(dest / "special_tokens_map.json",
                {"bos_token": _added("<s>"), "eos_token": _added("</s>"), "unk_token": _added("<unk>")})
    return dest


# --------------------------------------------------------------------------- variants


def with_split_pattern(tj: dict[str, Any], pattern: str) -> None:
    """A tokenizer_json_hook: replace every Split pre-tokenizer's regex with ``pattern`` (a
    pre-tokenizer llama.cpp does not know)."""
    def walk(node):
        if isinstance(node, dict):
            if node.get("type") == "Split" and isinstance(node.get("pattern"), dict):
                node["pattern"] = {"Regex": pattern}
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
    walk(tj.get("pre_tokenizer"))


# --------------------------------------------------------------------------- Gemma


def _unused(n: int) -> tuple[str, ...]:
    return tuple(f"<unused{i}>" for i in range(n))


#: Gemma's pieces after <pad> <eos> <bos> <unk> (ids 0..3), as user-defined SentencePiece pieces
#: from id 4: Gemma 2's (<start_of_turn> 106, <end_of_turn> 107) and Gemma 3's (105, 106, then
#: its image markers, which the real vocabulary has at 255999 / 256000)
GEMMA2_PIECES = ("<mask>", "<2mass>", "[@BOS@]", *_unused(99), "<start_of_turn>", "<end_of_turn>")
GEMMA3_PIECES = ("<mask>", "[multimodal]", *_unused(99), "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                 "<end_of_image>")
#: of those, the ones tokenizer_config.json marks special (the others are listed, not special)
GEMMA_SPECIAL = frozenset({"<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"})
#: Gemma 3's image token: an added token, the first id past the SentencePiece pieces
GEMMA3_IMAGE_TOKEN = "<image_soft_token>"

#: Gemma 2 Instruct's chat template (google/gemma-2-*-it)
GEMMA2_CHAT_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

#: Gemma 3 Instruct's chat template (google/gemma-3-*-it): a system message goes before the first user turn
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\n'}}\n"
    "{%- endif -%}\n"
)


@functools.lru_cache(maxsize=4)
def _gemma_spm_model(vocab_size: int, pieces: tuple[str, ...]) -> bytes:
    try:
        import sentencepiece as spm
    except ImportError as e:
        raise UnsupportedError("training a SentencePiece model needs sentencepiece: pip install sentencepiece") from e
    buf = io.BytesIO()
    # Gemma's trainer spec: BPE, byte fallback, digits split, identity normalization, no dummy
    # prefix, whitespace kept, <pad> <eos> <bos> <unk> at 0 1 2 3, its markers user-defined
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=False, pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>",
        bos_piece="<bos>", unk_piece="<unk>", allow_whitespace_only_pieces=True, character_coverage=1.0,
        num_threads=1, minloglevel=2, user_defined_symbols=list(pieces), seed_sentencepiece_size=10000)
    return buf.getvalue()


def gemma_tokenizer(dest: str | Path, *, generation: int = 3, vocab_size: int = 640,
                    tokenizer_json: bool = True) -> Path:
    """A Gemma 2 (``generation=2``) or Gemma 3 (``3``) tokenizer folder as google's instruct
    repositories have it: ``tokenizer.model`` (trained here, ``vocab_size`` pieces: ``<pad>``
    ``<eos>`` ``<bos>`` ``<unk>`` at 0..3, Gemma's markers from 4 with ``<start_of_turn>`` /
    ``<end_of_turn>`` at the real ids, no dummy prefix), tokenizer_config.json (``<eos>`` as
    eos_token, the chat template, the markers in added_tokens_decoder; Gemma 3's
    ``<image_soft_token>`` added at id ``vocab_size``), special_tokens_map.json and the
    tokenizer.json transformers converts (``tokenizer_json``). The model's embedding rows must
    exceed ``vocab_size`` for Gemma 3 (its config's are 262,208 for 262,144 pieces).
    The model's generation_config.json ends a turn with eos_token_id [1, id of <end_of_turn>]."""
    if generation not in (2, 3):
        raise InputError(f"generation={generation!r}: choose 2 or 3")
    dest = _mkdir(dest)
    pieces = GEMMA2_PIECES if generation == 2 else GEMMA3_PIECES
    model = _gemma_spm_model(vocab_size, pieces)
    (dest / "tokenizer.model").write_bytes(model)
    named = {0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unk>", **{4 + k: p for k, p in enumerate(pieces)}}
    if generation == 3:
        named[vocab_size] = GEMMA3_IMAGE_TOKEN
    config: dict[str, Any] = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {str(i): _added(c, c in GEMMA_SPECIAL or c == GEMMA3_IMAGE_TOKEN)
                                 for i, c in named.items()},
        "bos_token": "<bos>",
        "chat_template": GEMMA2_CHAT_TEMPLATE if generation == 2 else GEMMA3_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<eos>",
        "model_max_length": NO_MAX_LENGTH,
        "pad_token": "<pad>",
        "padding_side": "left",
        "sp_model_kwargs": {},
        "spaces_between_special_tokens": False,
        "tokenizer_class": "GemmaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }
    special_map = {"bos_token": _added("<bos>"), "eos_token": _added("<eos>"), "pad_token": _added("<pad>"),
                   "unk_token": _added("<unk>")}
    if generation == 2:
        config["additional_special_tokens"] = ["<start_of_turn>", "<end_of_turn>"]
        special_map["additional_special_tokens"] = ["<start_of_turn>", "<end_of_turn>"]
    if tokenizer_json:
        tj = json.loads(_spm_tokenizer_json(model, json.dumps(config)))
        have = {t["id"] for t in tj["added_tokens"]}
        for i, c in named.items():
            if i not in have:
                tj["added_tokens"].append({"id": i, **_added(c, c in GEMMA_SPECIAL or c == GEMMA3_IMAGE_TOKEN)})
        tj["added_tokens"].sort(key=lambda t: t["id"])
        _write_json(dest / "tokenizer.json", tj)
    _write_json(dest / "tokenizer_config.json", config)
    _write_json(dest / "special_tokens_map.json", special_map)
    return dest


# --------------------------------------------------------------------------- Phi-3

#: Phi-3's added tokens after the 32,000 Llama 2 pieces (content, rstrip); all marked special
PHI3_ADDED: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", False), ("<|assistant|>", True), ("<|placeholder1|>", True), ("<|placeholder2|>", True),
    ("<|placeholder3|>", True), ("<|placeholder4|>", True), ("<|system|>", True), ("<|end|>", True),
    ("<|placeholder5|>", True), ("<|placeholder6|>", True), ("<|user|>", True),
)
#: Phi-3's config vocab_size beyond the pieces (32,064 = 32,000 + 64)
PHI3_EXTRA_ROWS = 64

#: Phi-3-mini-4k-instruct's chat template
PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}"
    "{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)


def phi3_ids(vocab_size: int = 512) -> dict[str, int]:
    """The ids of Phi-3's added tokens in a :func:`phi3_tokenizer` of ``vocab_size`` pieces."""
    return {c: vocab_size + k for k, (c, _) in enumerate(PHI3_ADDED)}


def phi3_tokenizer(dest: str | Path, *, vocab_size: int = 512,
                   extra_tokens: Sequence[tuple[str, bool]] = ()) -> Path:
    """A Phi-3 tokenizer folder as microsoft/Phi-3-mini-4k-instruct has it: a Llama-2-style
    ``tokenizer.model`` (``vocab_size`` pieces), Phi-3's added tokens from id ``vocab_size``
    (:func:`phi3_ids`; special, most with rstrip), ``<|endoftext|>`` as eos and pad token, no BOS
    added, the chat template, and tokenizer.json. ``extra_tokens`` (content, special) follow them
    (a fine-tune's own tokens). The model folder's generation_config.json has eos_token_id
    [<|endoftext|>, <|assistant|>, <|end|>] and config.json's vocab_size is ``vocab_size + 64``."""
    ids = phi3_ids(vocab_size)
    added = {c: (ids[c], True) for c, _ in PHI3_ADDED}
    added.update({c: (vocab_size + len(PHI3_ADDED) + k, s) for k, (c, s) in enumerate(extra_tokens)})
    rstrip = {c for c, r in PHI3_ADDED if r}

    def hook(config: dict[str, Any]) -> None:
        config.update(add_bos_token=False, chat_template=PHI3_CHAT_TEMPLATE, eos_token="<|endoftext|>",
                      pad_token="<|endoftext|>", legacy=False, model_max_length=4096, padding_side="left")
        for entry in config["added_tokens_decoder"].values():
            entry["rstrip"] = entry["content"] in rstrip

    dest = sentencepiece_tokenizer(dest, style="llama2", vocab_size=vocab_size, added_tokens=added, config_hook=hook,
                                   tokenizer_json=False)
    # tokenizer.json as transformers converts the final tokenizer_config.json (no BOS added)
    config_text = (dest / "tokenizer_config.json").read_text(encoding="utf-8")
    tj = json.loads(_spm_tokenizer_json(_spm_model(vocab_size, ()), config_text))
    for entry in tj["added_tokens"]:
        entry["rstrip"] = entry["content"] in rstrip
    _write_json(dest / "tokenizer.json", tj)
    special_map = json.loads((dest / "special_tokens_map.json").read_text(encoding="utf-8"))
    special_map.update(eos_token=_added("<|endoftext|>"), pad_token=_added("<|endoftext|>"))
    _write_json(dest / "special_tokens_map.json", special_map)
    return dest
