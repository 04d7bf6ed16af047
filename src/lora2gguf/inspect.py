"""The inspect stage: what the inputs are, read without touching the base's tensor data.

Reads config files, tokenizer files (hashed and parsed), the shard index and safetensors headers.
The only tensor data read is the adapter's own (small) tensors, for the zero / NaN check, and the
few-hundred-byte JSON quant-state tensors of a bitsandbytes base (they hold the logical shapes).
Every read is counted (:attr:`Inspection.bytes_read`), so a test can hold doctor to its promise of
reading under a megabyte of a 40 GB base.

Nothing here raises for a bad input: problems are recorded as ``errors`` for doctor's checks to
turn into findings (a typed error from :mod:`lora2gguf.errors` is kept as is).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .errors import FormatError, InputError, Lora2GGUFError
from .jsonfile import read_json_object
from .safetensors_io import Checkpoint, TensorInfo, read_raw, to_f32

log = logging.getLogger(__name__)

# files that make up a Hugging Face tokenizer, in the order they are shown
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)
SMALL_JSON_LIMIT = 64 * 1024 * 1024  # config-like JSON files larger than this are refused


@dataclass(frozen=True)
class FileHash:
    name: str
    size: int
    md5: str
    sha256: str


def hash_file(path: Path) -> FileHash:
    md5, sha = hashlib.md5(), hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            md5.update(chunk)
            sha.update(chunk)
            size += len(chunk)
    return FileHash(path.name, size, md5.hexdigest(), sha.hexdigest())


def _read_json(path: Path, counter: list[int]) -> Any:
    size = path.stat().st_size
    if size > SMALL_JSON_LIMIT:
        raise FormatError(f"{path}: {size} bytes, too large for a config file")
    raw = path.read_bytes()
    counter[0] += len(raw)
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise FormatError(f"{path}: not valid JSON ({e}); download the file again") from None


# --------------------------------------------------------------------------- tokenizer


@dataclass(frozen=True)
class TokenizerModel:
    """What tokenizer.json says, reduced to what the comparison needs."""

    model_type: str | None  # tokenizer.json's model type; "SentencePiece" for a tokenizer.model alone
    vocab: Mapping[str, int]  # model.vocab (BPE / WordPiece), the pieces of a tokenizer.model; empty for others
    merges: tuple[str, ...]  # "a b" strings
    added: Mapping[str, tuple[int, bool]]  # content -> (id, special)
    normalizer: Any
    pre_tokenizer: Any
    decoder: Any
    post_processor: Any

    @functools.cached_property
    def id_to_token(self) -> dict[int, str]:
        """id -> token (added tokens over the model's); computed once (a model is cached per
        content and never changed): callers must not modify it."""
        out = dict(zip(self.vocab.values(), self.vocab.keys()))
        out.update({i: t for t, (i, _) in self.added.items()})
        return out

    @functools.cached_property
    def size(self) -> int:
        ids = self.id_to_token
        return max(ids) + 1 if ids else 0


_TOKENIZER_CACHE: dict[str, TokenizerModel] = {}
_TOKENIZER_CACHE_SIZE = 4


def _parse_tokenizer_json(path: str, sha256: str) -> TokenizerModel:
    """Parsed tokenizer.json, cached by content hash (a 200k-token tokenizer.json is about 27 MB)."""
    hit = _TOKENIZER_CACHE.get(sha256)
    if hit is None:
        hit = _parse_tokenizer_json_uncached(path)
        if len(_TOKENIZER_CACHE) >= _TOKENIZER_CACHE_SIZE:
            _TOKENIZER_CACHE.pop(next(iter(_TOKENIZER_CACHE)))
        _TOKENIZER_CACHE[sha256] = hit
    return hit


def _parse_tokenizer_json_uncached(path: str) -> TokenizerModel:
    # kept: the build's vocabulary writer reads the same file next (jsonfile.forget() drops it)
    tj = read_json_object(Path(path), missing="the tokenizer file went away while being read",
                          hint="download the tokenizer again", keep=True)
    model = tj.get("model") or {}
    if not isinstance(model, dict):
        raise FormatError(f"{path}: 'model' is not an object")
    vocab = model.get("vocab") or {}
    if isinstance(vocab, list):  # Unigram: [[piece, score], ...]
        vocab = {str(p[0]): i for i, p in enumerate(vocab) if isinstance(p, list) and p}
    if not isinstance(vocab, dict) or not all(issubclass(t, int) for t in set(map(type, vocab.values()))):
        raise FormatError(f"{path}: model.vocab is not a map of tokens to integer ids")
    raw_merges = model.get("merges") or []
    if set(map(type, raw_merges)) == {list}:  # pairs (transformers >= 4.45): joined in one C-level pass
        merges = tuple(map(" ".join, raw_merges))
    else:
        merges = tuple(" ".join(m) if isinstance(m, list) else str(m) for m in raw_merges)
    added: dict[str, tuple[int, bool]] = {}
    for t in tj.get("added_tokens") or []:
        if not isinstance(t, dict) or not isinstance(t.get("id"), int) or not isinstance(t.get("content"), str):
            raise FormatError(f"{path}: an added_tokens entry lacks an integer id or a content string: {t!r}")
        added[t["content"]] = (t["id"], bool(t.get("special")))
    return TokenizerModel(model.get("type"), vocab, merges, added, tj.get("normalizer"), tj.get("pre_tokenizer"),
                          tj.get("decoder"), tj.get("post_processor"))


def _parse_sentencepiece(folder: Path, config: Mapping[str, Any], sha256: str) -> TokenizerModel:
    """A folder's tokenizer.model (no tokenizer.json beside it) reduced to what the comparison
    needs: piece -> id, and the added tokens of added_tokens.json and tokenizer_config.json's
    added_tokens_decoder (content -> (id, special))."""
    from .vocab.spm import pieces

    key = f"spm:{sha256}:{json.dumps(config.get('added_tokens_decoder'), sort_keys=True, default=str)}"
    hit = _TOKENIZER_CACHE.get(key)
    if hit is not None:
        return hit
    vocab = pieces(folder / "tokenizer.model")
    added: dict[str, tuple[int, bool]] = {}
    extra = folder / "added_tokens.json"
    if extra.is_file():
        data = read_json_object(extra, missing="")
        added.update({k: (v, False) for k, v in data.items() if isinstance(k, str) and isinstance(v, int)})
    decoder = config.get("added_tokens_decoder")
    for key_id, entry in (decoder.items() if isinstance(decoder, dict) else ()):
        if isinstance(entry, dict) and isinstance(entry.get("content"), str) and str(key_id).isdigit():
            added[entry["content"]] = (int(key_id), bool(entry.get("special")))
    model = TokenizerModel("SentencePiece", vocab, (), added, None, None, None, None)
    if len(_TOKENIZER_CACHE) >= _TOKENIZER_CACHE_SIZE:
        _TOKENIZER_CACHE.pop(next(iter(_TOKENIZER_CACHE)))
    _TOKENIZER_CACHE[key] = model
    return model


@dataclass
class TokenizerInfo:
    folder: Path
    hashes: dict[str, FileHash]
    config: dict[str, Any]  # tokenizer_config.json
    special_map: dict[str, Any]  # special_tokens_map.json
    chat_template: str | None
    chat_template_source: str | None  # file the template came from
    model: TokenizerModel | None
    errors: list[str] = field(default_factory=list)

    def special(self, role: str) -> str | None:
        """bos_token / eos_token / pad_token / unk_token, as tokenizer_config (or special_tokens_map) names it."""
        for source in (self.config, self.special_map):
            value = source.get(role)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                return value
        return None

    def token_id(self, token: str | None) -> int | None:
        if token is None or self.model is None:
            return None
        if token in self.model.added:
            return self.model.added[token][0]
        return self.model.vocab.get(token)

    def is_special(self, token: str) -> bool:
        return self.model is not None and token in self.model.added and self.model.added[token][1]


def inspect_tokenizer(folder: Path | str, counter: list[int] | None = None) -> TokenizerInfo | None:
    """The tokenizer files of a folder, hashed and parsed; None when the folder has none."""
    folder = Path(folder)
    counter = counter if counter is not None else [0]
    present = [n for n in TOKENIZER_FILES if (folder / n).is_file()]
    if not present:
        return None
    hashes: dict[str, FileHash] = {}
    errors: list[str] = []
    for name in present:
        try:
            hashes[name] = hash_file(folder / name)
            counter[0] += hashes[name].size
        except OSError as e:
            errors.append(f"{folder / name}: cannot read ({e.strerror})")
    config: dict[str, Any] = {}
    special_map: dict[str, Any] = {}
    for name, target in (("tokenizer_config.json", config), ("special_tokens_map.json", special_map)):
        if name in hashes:
            try:
                value = _read_json(folder / name, counter)
                if not isinstance(value, dict):
                    raise FormatError(f"{folder / name}: expected a JSON object")
                target.update(value)
            except Lora2GGUFError as e:
                errors.append(str(e))
    template, source = None, None
    if "chat_template.jinja" in hashes:
        raw = (folder / "chat_template.jinja").read_bytes()
        counter[0] += len(raw)
        try:
            template, source = raw.decode("utf-8"), "chat_template.jinja"
        except UnicodeDecodeError:
            errors.append(f"{folder / 'chat_template.jinja'}: not UTF-8 text")
    elif "chat_template.json" in hashes:
        try:
            value = _read_json(folder / "chat_template.json", counter)
            if isinstance(value, dict) and isinstance(value.get("chat_template"), str):
                template, source = value["chat_template"], "chat_template.json"
        except Lora2GGUFError as e:
            errors.append(str(e))
    if template is None:
        value = config.get("chat_template")
        if isinstance(value, str):
            template, source = value, "tokenizer_config.json"
        elif isinstance(value, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
            if isinstance(named.get("default"), str):
                template, source = named["default"], "tokenizer_config.json (default)"
    model = None
    if "tokenizer.json" in hashes:
        try:
            model = _parse_tokenizer_json(str(folder / "tokenizer.json"), hashes["tokenizer.json"].sha256)
            counter[0] += hashes["tokenizer.json"].size
        except Lora2GGUFError as e:
            errors.append(str(e))
    elif "tokenizer.model" in hashes:
        try:
            model = _parse_sentencepiece(folder, config, hashes["tokenizer.model"].sha256)
        except Lora2GGUFError as e:
            errors.append(str(e))
    elif "vocab.json" in hashes:
        errors.append(f"{folder}: has no tokenizer.json (only {', '.join(n for n in present)}); lora2gguf "
                      "compares and converts fast tokenizers and SentencePiece models: save one with "
                      "AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)")
    return TokenizerInfo(folder, hashes, config, special_map, template, source, model, errors)


# --------------------------------------------------------------------------- base model


@dataclass
class BaseInfo:
    folder: Path
    config: dict[str, Any] = field(default_factory=dict)
    generation_config: dict[str, Any] = field(default_factory=dict)
    checkpoint: Checkpoint | None = None
    # the base's tensors as the BF16 checkpoint names and shapes them (MXFP4 / bitsandbytes undone)
    logical_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    tokenizer: TokenizerInfo | None = None
    python_files: list[str] = field(default_factory=list)
    errors: list[Lora2GGUFError] = field(default_factory=list)
    # bytes of tensor data read beyond the headers (bitsandbytes quant-state JSON)
    tensor_bytes_read: int = 0

    @property
    def tensors(self) -> dict[str, TensorInfo]:
        return self.checkpoint.tensors if self.checkpoint is not None else {}

    @property
    def quantization_config(self) -> dict[str, Any]:
        q = self.config.get("quantization_config")
        return q if isinstance(q, dict) else {}


MXFP4_BLOCKS, MXFP4_SCALES = "_blocks", "_scales"
BNB_STATE = ".quant_state.bitsandbytes__"
BNB_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")


def logical_shapes(base: BaseInfo) -> dict[str, tuple[int, ...]]:
    """Name -> shape of the base's tensors as its BF16 checkpoint has them.

    MXFP4 ``X_blocks`` (E, out, G, 16) + ``X_scales`` (E, out, G) stand for ``X`` (E, G*32, out),
    as transformers' MXFP4 checkpoints store MoE experts. A bitsandbytes 4-bit weight stands
    for the shape its quant-state JSON records (a few hundred bytes, read here). LLM.int8's ``SCB``
    and ``weight_format`` are dropped. Other tensors are as stored.
    """
    tensors = base.tensors
    out: dict[str, tuple[int, ...]] = {}
    skip: set[str] = set()
    for name, info in tensors.items():
        if name.endswith(MXFP4_BLOCKS) and name[: -len(MXFP4_BLOCKS)] + MXFP4_SCALES in tensors and len(info.shape) == 4:
            e, rows, groups, half = info.shape
            out[name[: -len(MXFP4_BLOCKS)]] = (e, groups * half * 2, rows)
            skip.update({name, name[: -len(MXFP4_BLOCKS)] + MXFP4_SCALES})
        elif BNB_STATE in name:
            w = name.split(BNB_STATE)[0]
            skip.update({name, w, *(w + s for s in BNB_SUFFIXES)})
            try:
                raw = read_raw(info)
                base.tensor_bytes_read += info.nbytes
                meta = json.loads(raw.astype(np.uint8).tobytes().decode("utf-8"))
                out[w] = tuple(int(d) for d in meta["shape"])
            except (Lora2GGUFError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                base.errors.append(FormatError(f"{info.path}: bitsandbytes quant state {name!r} is not readable JSON "
                                               f"with a 'shape' ({e})"))
        elif name.endswith(".SCB") or name.endswith(".weight_format"):
            skip.add(name)
    for name, info in tensors.items():
        if name not in skip and name not in out:
            out[name] = info.shape
    return out


def inspect_base(folder: Path | str, counter: list[int] | None = None) -> BaseInfo:
    folder = Path(folder)
    counter = counter if counter is not None else [0]
    base = BaseInfo(folder)
    if not folder.is_dir():
        base.errors.append(InputError(f"{folder}: base model folder not found"))
        return base
    try:
        cfg = _read_json(folder / "config.json", counter) if (folder / "config.json").is_file() else None
        if cfg is None:
            base.errors.append(InputError(f"{folder}: no config.json; is this a Hugging Face model folder?"))
        elif not isinstance(cfg, dict):
            base.errors.append(FormatError(f"{folder / 'config.json'}: expected a JSON object"))
        else:
            base.config = cfg
    except Lora2GGUFError as e:
        base.errors.append(e)
    if (folder / "generation_config.json").is_file():
        try:
            g = _read_json(folder / "generation_config.json", counter)
            base.generation_config = g if isinstance(g, dict) else {}
        except Lora2GGUFError as e:
            base.errors.append(e)
    try:
        base.checkpoint = Checkpoint.open(folder)
    except Lora2GGUFError as e:
        base.errors.append(e)
    if base.checkpoint is not None:
        base.logical_shapes = logical_shapes(base)
    base.tokenizer = inspect_tokenizer(folder, counter)
    base.python_files = sorted(p.name for p in folder.glob("*.py"))
    return base


# --------------------------------------------------------------------------- adapter


@dataclass(frozen=True)
class TensorStats:
    name: str
    dtype: str
    shape: tuple[int, ...]
    all_zero: bool
    nonfinite: int  # count of NaN / Inf values
    absmax: float  # over the finite values


@dataclass
class AdapterInfo:
    folder: Path
    config: dict[str, Any] = field(default_factory=dict)
    checkpoint: Checkpoint | None = None
    stats: dict[str, TensorStats] = field(default_factory=dict)
    tokenizer: TokenizerInfo | None = None
    errors: list[Lora2GGUFError] = field(default_factory=list)
    tensor_bytes_read: int = 0


def tensor_stats(info: TensorInfo) -> TensorStats | None:
    """Zero / NaN / Inf summary of one (small) adapter tensor; None for non-float dtypes."""
    try:
        x = to_f32(read_raw(info), info.dtype, name=info.name)
    except InputError:
        return None
    finite = np.isfinite(x)
    nonfinite = int(x.size - np.count_nonzero(finite))
    absmax = float(np.abs(x[finite]).max()) if nonfinite < x.size and x.size else 0.0
    return TensorStats(info.name, info.dtype, info.shape, not np.any(x), nonfinite, absmax)


def inspect_adapter(folder: Path | str, counter: list[int] | None = None) -> AdapterInfo:
    from . import adapter as adapter_mod

    folder = Path(folder)
    counter = counter if counter is not None else [0]
    ad = AdapterInfo(folder)
    if not folder.is_dir():
        ad.errors.append(InputError(f"{folder}: adapter folder not found"))
        return ad
    try:
        ad.config = adapter_mod.read_config(folder)
        counter[0] += (folder / adapter_mod.CONFIG_NAME).stat().st_size
    except Lora2GGUFError as e:
        ad.errors.append(e)
    try:
        ad.checkpoint = Checkpoint.open(folder, single_name=adapter_mod.WEIGHTS_NAME,
                                        index_name="adapter_model.safetensors.index.json")
    except Lora2GGUFError as e:
        ad.errors.append(e)
    if ad.checkpoint is not None:
        for name, info in ad.checkpoint.tensors.items():
            st = tensor_stats(info)
            ad.tensor_bytes_read += info.nbytes
            if st is not None:
                ad.stats[name] = st
    ad.tokenizer = inspect_tokenizer(folder, counter)
    return ad


# --------------------------------------------------------------------------- both


@dataclass
class Inspection:
    base: BaseInfo
    adapter: AdapterInfo
    small_bytes_read: int  # config and tokenizer files (both folders)

    @property
    def base_weight_bytes_read(self) -> int:
        """Bytes read from the base's safetensors shards: headers plus bitsandbytes quant states."""
        ck = self.base.checkpoint
        return (ck.header_bytes_read if ck is not None else 0) + self.base.tensor_bytes_read

    @property
    def base_weight_bytes(self) -> int:
        ck = self.base.checkpoint
        return sum(p.stat().st_size for p in ck.files) if ck is not None else 0


def inspect(base_dir: Path | str, adapter_dir: Path | str, *, base: BaseInfo | None = None) -> Inspection:
    """Everything doctor's checks look at, read from the two folders. ``base``: the base's
    inspection made before (several adapters on one base inspect the base once)."""
    counter = [0]
    base = base if base is not None else inspect_base(base_dir, counter)
    adapter = inspect_adapter(adapter_dir, counter)
    log.debug("inspected %s and %s: %d small-file bytes, %d base weight bytes", base_dir, adapter_dir,
              counter[0], (base.checkpoint.header_bytes_read if base.checkpoint else 0) + base.tensor_bytes_read)
    return Inspection(base, adapter, counter[0])


def numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)
