"""doctor's checks: functions over what :mod:`lora2gguf.inspect` saw, each returning findings.

The checks do not read files themselves; the few facts about the installed tools (llama.cpp's
library, transformers) are gathered once by :func:`probe_tools` and passed in.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import gguf

from .. import kernel
from ..errors import FormatError, InputError, UnsupportedError
from ..inspect import AdapterInfo, BaseInfo, TokenizerInfo
from . import findings as F

Finding = F.Finding

# --------------------------------------------------------------------------- base weight format

BNB_4BIT_RE = re.compile(r"\.quant_state\.bitsandbytes__(nf4|fp4)$")
BNB_4BIT_PARTS = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")
GPTQ_PARTS = (".qweight", ".qzeros", ".scales", ".g_idx")
FP8_SCALE_PARTS = (".weight_scale_inv", ".weight_scale", ".input_scale")
COMPRESSED_PARTS = (".weight_packed", ".weight_shape", ".weight_zero_point", ".weight_global_scale")


def _names(tensors: Iterable[str], limit: int = 8) -> str:
    tensors = list(tensors)
    shown = ", ".join(tensors[:limit])
    return shown + (f" and {len(tensors) - limit} more" if len(tensors) > limit else "")


def check_base_format(base: BaseInfo) -> list[Finding]:
    """Is the base real 16/32-bit weights? Names MXFP4, bitsandbytes, FP8, GPTQ/AWQ, compressed-tensors."""
    out: list[Finding] = []
    tensors = base.tensors
    qc = base.quantization_config
    method = str(qc.get("quant_method") or "").lower()
    names = sorted(tensors)
    where = str(base.folder)

    blocks = [n for n in names if n.endswith("_blocks") and n[:-7] + "_scales" in tensors]
    if blocks or method == "mxfp4":
        experts_only = all(".experts." in n for n in blocks)
        out.append(F.make(
            "BASE_MXFP4",
            f"{where}: {len(blocks)} MXFP4 tensors (*_blocks + *_scales: {_names(blocks)}); "
            f"config quantization_config.quant_method = {method or '(not set)'}",
            "MXFP4 is 4-bit; a LoRA merge needs the weights as numbers. The published BF16 copies of MXFP4 models are "
            "exactly the decoding of these blocks, so decoding them loses nothing",
            "nothing to do: lora2gguf decodes MXFP4 exactly to BF16 while it streams (same GGUF as from the BF16 "
            "base). If the adapter leaves the experts untouched, --keep-mxfp4 keeps them in ggml's MXFP4 layout "
            "(smaller, no re-quantization)",
            {"format": "mxfp4", "tensors": blocks, "experts_only": experts_only, "quant_method": method or None}))

    bnb4 = [n.split(".quant_state.")[0] for n in names if BNB_4BIT_RE.search(n)]
    if bnb4 or (method == "bitsandbytes" and qc.get("load_in_4bit")):
        kinds = sorted({m.group(1) for n in names if (m := BNB_4BIT_RE.search(n))}) or \
            [str(qc.get("bnb_4bit_quant_type") or "nf4")]
        nested = any(n.endswith(".nested_absmax") for n in names) or bool(qc.get("bnb_4bit_use_double_quant"))
        out.append(F.make(
            "BASE_BNB_4BIT",
            f"{where}: bitsandbytes 4-bit ({'/'.join(kinds)}{', double-quantized absmax' if nested else ''}) "
            f"weights: {_names(bnb4)}",
            "the 16-bit weights are gone; the merge would start from the 4-bit approximation and every GGUF "
            "inherits its error (the seed run's first bases were NF4 like this)",
            "use the BF16 base the 4-bit copy was made from (its publisher's BF16 release, or an official MXFP4 "
            "release, which decodes exactly); an adapter trained on the 4-bit copy merges correctly "
            "into it. Or --accept BASE_BNB_4BIT to let lora2gguf decode the 4-bit weights in numpy (lossy)",
            {"format": "bitsandbytes-4bit", "quant_types": kinds, "nested": nested, "tensors": bnb4[:200]}))

    scb = [n[: -len(".SCB")] for n in names if n.endswith(".SCB")]
    if scb or (method == "bitsandbytes" and qc.get("load_in_8bit")):
        out.append(F.make(
            "BASE_BNB_8BIT",
            f"{where}: bitsandbytes LLM.int8 weights (int8 + SCB row scales): {_names(scb)}",
            "int8 weights with per-row scales are an approximation of the 16-bit weights; a merge inherits the error",
            "use the BF16 base the 8-bit copy was made from; or --accept BASE_BNB_8BIT to decode int8 x SCB/127",
            {"format": "bitsandbytes-8bit", "tensors": scb[:200]}))

    fp8 = [n for n in names if tensors[n].dtype in ("F8_E4M3", "F8_E5M2")]
    fp8_scales = [n for n in names if n.endswith(".weight_scale_inv")]
    if fp8 or fp8_scales or method in ("fp8", "fbgemm_fp8"):
        out.append(F.make(
            "BASE_FP8",
            f"{where}: FP8 weights ({_names(fp8 or fp8_scales)}); quant_method = {method or '(not set)'}",
            "FP8 with block scales is not 16-bit; lora2gguf does not decode it yet",
            "use the model's BF16 release; or dequantize first with the model vendor's script and convert that",
            {"format": "fp8", "tensors": (fp8 or fp8_scales)[:200]}))

    qweights = [n[: -len(".qweight")] for n in names if n.endswith(".qweight")]
    if qweights or method in ("gptq", "awq"):
        is_awq = method == "awq" or (method != "gptq" and not any(n.endswith(".g_idx") for n in names)
                                     and "awq" in str(qc).lower())
        code = "BASE_AWQ" if is_awq else "BASE_GPTQ"
        out.append(F.make(
            code,
            f"{where}: {'AWQ' if is_awq else 'GPTQ'} packed int4 weights (qweight/qzeros/scales): {_names(qweights)}; "
            f"quant_method = {method or '(not set)'}",
            "packed integer weights with zero points are not 16-bit; lora2gguf does not decode them",
            "use the unquantized (BF16/FP16) release of the model the adapter was trained on",
            {"format": "awq" if is_awq else "gptq", "tensors": qweights[:200]}))

    packed = [n for n in names if n.endswith(COMPRESSED_PARTS)]
    if packed or method == "compressed-tensors":
        out.append(F.make(
            "BASE_COMPRESSED_TENSORS",
            f"{where}: compressed-tensors checkpoint ({_names(packed) or 'quant_method compressed-tensors'})",
            "compressed-tensors formats (packed ints, FP8, NVFP4) are not 16-bit; lora2gguf does not decode them",
            "use the unquantized release of the model, or decompress it with the compressed-tensors library first",
            {"format": "compressed-tensors", "tensors": packed[:200]}))

    known = {"mxfp4", "bitsandbytes", "fp8", "fbgemm_fp8", "gptq", "awq", "compressed-tensors", ""}
    if method not in known:
        out.append(F.make(
            "BASE_QUANTIZED_UNKNOWN",
            f"{where}/config.json: quantization_config.quant_method = {method!r}",
            "the weights are stored in a quantized form lora2gguf cannot read as numbers",
            "use the model's BF16 release",
            {"format": method}))
    return out


def check_base_errors(base: BaseInfo) -> list[Finding]:
    return [F.make("BASE_INVALID", str(e), "the base's config and weights are what the GGUF is made of",
                   "fix or download the file again (compare size and SHA-256 with the hub)",
                   {"error": type(e).__name__}) for e in base.errors]


# --------------------------------------------------------------------------- architecture and tools


@dataclass(frozen=True)
class Tools:
    """Versions and capabilities of the installed tools, as read from them."""

    llama_cpp_version: str | None
    llama_lib: str | None
    llama_arch_names: frozenset[str]  # arch names found as strings in libllama
    transformers_version: str | None
    transformers_model_types: frozenset[str] | None  # CONFIG_MAPPING_NAMES keys; None without transformers
    lora2gguf_version: str | None
    #: llama.cpp's llama-imatrix and llama-quantize (lora2gguf.llama_tools.LlamaTools.record), None: not found
    llama_tools: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"llama_cpp_python": self.llama_cpp_version, "libllama": self.llama_lib,
                "transformers": self.transformers_version, "lora2gguf": self.lora2gguf_version,
                "llama_tools": self.llama_tools}

    def tools_text(self) -> str:
        t = self.llama_tools
        if t is None:
            return ("llama-imatrix/llama-quantize not found (needed for importance matrices and per-tensor types: "
                    "scripts/setup.sh builds them, or --llama-cpp DIR)")
        version = "; ".join(t.get("version") or []) or "version unknown"
        return f"llama-imatrix and llama-quantize in {t['dir']} ({t['found_by']}; {version})"


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=64)
def _llama_knows(lib: str, mtime: float, name: str) -> bool:
    """Whether llama.cpp knows the architecture ``name``, asked of llama.cpp itself: it loads a
    header-only GGUF naming that architecture (vocab only) and says "unknown model architecture"
    when it does not know it; a known one fails later, at the missing vocabulary. (Searching
    libllama for the name as a string is not enough: the linker merges a short name into the tail
    of a longer one that ends with it.)"""
    import ctypes
    import tempfile

    import llama_cpp

    from ..quantize import quiet_llama

    messages: list[str] = []

    @llama_cpp.llama_log_callback
    def _capture(level, text, user_data):  # noqa: ARG001
        messages.append(text.decode("utf-8", "replace"))

    with tempfile.TemporaryDirectory(prefix="lora2gguf-probe-") as d:
        path = Path(d) / "probe.gguf"
        w = gguf.GGUFWriter(str(path), name)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        w.close()
        llama_cpp.llama_log_set(_capture, ctypes.c_void_p(0))
        try:
            params = llama_cpp.llama_model_default_params()
            params.vocab_only = True
            model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
            if model:
                llama_cpp.llama_model_free(model)
        finally:
            quiet_llama(force=True)
    return "unknown model architecture" not in "".join(messages)


ARCH_CACHE = "llama-archs.json"


def llama_arch_names(lib: Path, arch_names: Iterable[str]) -> frozenset[str]:
    """Which of ``arch_names`` the llama.cpp library ``lib`` knows (:func:`_llama_knows`). The
    answers are kept in lora2gguf's cache folder (:func:`lora2gguf.cachedir.cache_root`) per library
    file (path, size, modification time), so a run after the first does not load llama.cpp
    (~0.3 s) to ask again; a rebuilt or reinstalled library is asked anew. A cache that cannot be
    read or written is only not used."""
    import json

    from ..cachedir import atomic_write_bytes, cache_root

    st = lib.stat()
    key = f"{lib}|{st.st_size}|{st.st_mtime_ns}"
    path = cache_root() / ARCH_CACHE
    try:
        cached = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cached = {}
    cached = cached if isinstance(cached, dict) else {}
    known = dict(cached[key]) if isinstance(cached.get(key), dict) else {}
    wanted = sorted(set(arch_names))
    missing = [n for n in wanted if not isinstance(known.get(n), bool)]
    if missing:
        known.update({n: _llama_knows(str(lib), st.st_mtime, n) for n in missing})
        entries = {k: v for k, v in cached.items() if k.split("|")[0] != str(lib)}
        entries[key] = known  # one entry per library path: the newest
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, json.dumps(entries, indent=1, sort_keys=True).encode())
        except OSError:
            pass
    return frozenset(n for n in wanted if known[n])


def find_libllama() -> Path | None:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        for name in ("libllama.so", "libllama.dylib", "llama.dll"):
            for sub in ("lib", ""):
                p = Path(folder, sub, name)
                if p.is_file():
                    return p.resolve()
    return None


_MAPPING_RE = re.compile(r'\(\s*"([^"]+)"\s*,\s*"([^"]+)"\s*\)')


def transformers_model_types() -> frozenset[str] | None:
    """The model types of the installed transformers' CONFIG_MAPPING_NAMES.

    Importing transformers' auto classes imports torch (seconds), so unless it is already
    imported the table is read from its source: ``models/auto/auto_mappings.py`` (5.x) or
    ``models/auto/configuration_auto.py`` (4.x), where it is a literal list of pairs, plus the
    model folders (``models/<type>/configuration_<type>.py``) it is generated from.
    """
    import sys

    mod = sys.modules.get("transformers.models.auto.configuration_auto")
    if mod is not None and hasattr(mod, "CONFIG_MAPPING_NAMES"):
        return frozenset(mod.CONFIG_MAPPING_NAMES)
    spec = importlib.util.find_spec("transformers")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0]) / "models"
    types: set[str] = set()
    for fname in ("auto/auto_mappings.py", "auto/configuration_auto.py"):
        try:
            src = (root / fname).read_text(encoding="utf-8")
        except OSError:
            continue
        start = src.find("CONFIG_MAPPING_NAMES = OrderedDict(")
        if start >= 0:
            end = src.find("\n)", start)
            types.update(k for k, _ in _MAPPING_RE.findall(src[start:end if end > 0 else None]))
    if root.is_dir():
        types.update(p.parent.name for p in root.glob("*/configuration_*.py") if p.parent.name != "auto")
    return frozenset(types) or None


def probe_tools(arch_names: Iterable[str] = ()) -> Tools:
    """Read the installed versions, and which of ``arch_names`` the llama.cpp library knows.

    llama.cpp is asked itself (:func:`_llama_knows`). transformers is asked through its
    CONFIG_MAPPING_NAMES table, imported only if transformers is installed.
    """
    lib = find_libllama()
    names = frozenset()
    if lib is not None:
        names = llama_arch_names(lib, arch_names)
    tver = _version("transformers")
    types = transformers_model_types() if tver is not None else None
    return Tools(_version("llama_cpp_python") or _version("llama-cpp-python"), str(lib) if lib else None, names,
                 tver, types, _version("lora2gguf"), _llama_tools())


def _llama_tools() -> dict[str, Any] | None:
    from ..errors import InputError
    from ..llama_tools import find_tools

    try:
        return find_tools().record()
    except InputError:
        return None


def check_architecture(config: Mapping[str, Any], tools: Tools, where: str = "config.json"):
    """(findings, Architecture | None)."""
    from ..arch import for_config

    out: list[Finding] = []
    archs = config.get("architectures") or []
    model_type = config.get("model_type")
    try:
        arch = for_config(config, where=where)
    except UnsupportedError as e:
        out.append(F.make("ARCH_UNSUPPORTED", str(e),
                          "lora2gguf knows each architecture's tensor layout and metadata; without it the GGUF "
                          "cannot be written", "convert with llama.cpp's convert_hf_to_gguf.py after merging the "
                          "adapter with PEFT (merge_and_unload), or open an issue for the architecture",
                          {"architectures": archs, "model_type": model_type}))
        return out, None
    name = arch.gguf_arch_name
    if tools.llama_cpp_version is None or tools.llama_lib is None:
        out.append(F.make("LLAMACPP_MISSING", "llama_cpp (llama-cpp-python) is not importable or has no libllama",
                          "lora2gguf quantizes and verifies with llama.cpp's own code through llama-cpp-python",
                          "pip install llama-cpp-python (or the wheel your platform needs)"))
    elif name not in tools.llama_arch_names:
        out.append(F.make("LLAMACPP_ARCH_UNKNOWN",
                          f"llama-cpp-python {tools.llama_cpp_version} ({tools.llama_lib}) has no architecture "
                          f"named {name!r}",
                          "this llama.cpp cannot load, quantize or run the GGUF", "upgrade: pip install -U llama-cpp-python",
                          {"arch": name, "llama_cpp_python": tools.llama_cpp_version}))
    tknown = tools.transformers_model_types is not None and model_type in tools.transformers_model_types
    if not tknown:
        out.append(F.make("TRANSFORMERS_ARCH_UNKNOWN",
                          f"transformers {tools.transformers_version or '(not installed)'} does not know model_type "
                          f"{model_type!r}",
                          "only the optional reference checks (verify against transformers + PEFT) need it",
                          "pip install -U 'transformers>=4.55' to run reference checks; conversion does not need it",
                          {"model_type": model_type, "transformers": tools.transformers_version}))
    out.append(F.make("VERSIONS",
                      f"architecture {archs[0] if archs else model_type} -> lora2gguf {arch.name} -> GGUF {name}; "
                      f"lora2gguf {tools.lora2gguf_version}, llama-cpp-python {tools.llama_cpp_version} "
                      f"(knows {name}: {name in tools.llama_arch_names}), transformers "
                      f"{tools.transformers_version} (knows {model_type}: {tknown}); {tools.tools_text()}", "", "",
                      {**tools.to_dict(), "arch": arch.name, "gguf_arch": name,
                       "llama_knows_arch": name in tools.llama_arch_names, "transformers_knows_arch": tknown}))
    return out, arch


def check_base_plan(base: BaseInfo, arch) -> list[Finding]:
    """The family's plan for the base's shapes alone: a config that disagrees with its weights
    (hidden size, vocabulary, expert count), or a tensor the family does not know, is found here,
    before any tensor data is read."""
    from ..errors import Lora2GGUFError
    from ..plan import shape_plan

    if not base.logical_shapes:
        return []
    try:
        shape_plan(arch, arch.normalize_config(base.config), base.logical_shapes)
    except Lora2GGUFError as e:
        return [F.make("BASE_INVALID", str(e), "the GGUF's metadata comes from config.json and its tensors from the "
                       "shards; they must describe one model", "use the config.json that came with these weights "
                       "(download both again)", {"error": type(e).__name__})]
    except (KeyError, TypeError, ValueError) as e:
        return [F.make("BASE_INVALID", f"{base.folder / 'config.json'}: {type(e).__name__}: {e}",
                       "the GGUF's metadata comes from config.json", "fix config.json or download it again",
                       {"error": type(e).__name__})]
    return []


def check_remote_code(base: BaseInfo, adapter: AdapterInfo, tokenizers: Iterable[TokenizerInfo | None]) -> list[Finding]:
    """trust_remote_code / auto_map anywhere: reported, never executed."""
    hits: list[str] = []
    sources = [(base.folder / "config.json", base.config), (adapter.folder / "adapter_config.json", adapter.config)]
    sources += [(t.folder / "tokenizer_config.json", t.config) for t in tokenizers if t is not None]
    for path, cfg in sources:
        for key in ("auto_map", "trust_remote_code"):
            if cfg.get(key):
                hits.append(f"{path}: {key} = {cfg[key]!r}")
    if base.python_files:
        hits.append(f"{base.folder}: Python files {', '.join(base.python_files)}")
    if not hits:
        return []
    return [F.make("REMOTE_CODE", "\n".join(hits),
                   "lora2gguf never imports or runs code from a model folder; it converts with its own knowledge of "
                   "the architecture, so behaviour that lives only in that custom code is not in the GGUF",
                   "nothing to do if the architecture is supported natively; read the custom code to see what it "
                   "changes, and remove auto_map if it is not needed", {"entries": hits})]


# --------------------------------------------------------------------------- adapter


EMBED_RE = re.compile(r"(embed_tokens|lm_head|wte|embed_out)")


def resized_embeddings(adapter: AdapterInfo, base_vocab: int | None) -> bool:
    """Does the adapter save full embedding / lm_head tensors (modules_to_save, trainable tokens)?"""
    for name, info in (adapter.checkpoint.tensors.items() if adapter.checkpoint else ()):
        if EMBED_RE.search(name) and ".lora_" not in name and len(info.shape) == 2:
            if base_vocab is None or info.shape[0] != base_vocab or "modules_to_save" in name:
                return True
    return bool(adapter.config.get("trainable_token_indices"))


def _cache_repo_id(folder: Path) -> str:
    """'org/name' of a Hugging Face cache snapshot folder (.../models--org--name/snapshots/<commit>), else ''."""
    repo = Path(folder).parent.parent.name
    if Path(folder).parent.name == "snapshots" and repo.startswith("models--") and repo.count("--") >= 2:
        return repo[len("models--"):].replace("--", "/", 1)
    return ""


def _norm_name(name: str) -> str:
    """'org/some-model-7b-unsloth-bnb-4bit' -> 'some-model-7b': the model, without publisher and format."""
    s = str(name).rstrip("/").split("/")[-1].lower()
    for suffix in ("-unsloth-bnb-4bit", "-bnb-4bit", "-bnb-8bit", "-4bit", "-8bit", "-bf16", "-fp16", "-fp8",
                   "-mxfp4", "-gptq", "-awq", "-unsloth"):
        while s.endswith(suffix):
            s = s[: -len(suffix)]
    return s


def check_adapter(adapter: AdapterInfo, base: BaseInfo, arch) -> list[Finding]:
    from ..adapter import check_config, load_adapter, CONFIG_NAME

    out: list[Finding] = []
    ad_dir = adapter.folder
    for e in adapter.errors:
        code = "ADAPTER_UNSUPPORTED_FEATURE" if isinstance(e, UnsupportedError) else "ADAPTER_INVALID"
        out.append(F.make(code, str(e), "the adapter is what makes the GGUF your fine-tune",
                          "save the adapter with PEFT's save_pretrained (safe_serialization=True)",
                          {"error": type(e).__name__}))
    if not adapter.config or adapter.checkpoint is None:
        return out
    cfg = adapter.config
    try:
        check_config(cfg, ad_dir / CONFIG_NAME)
    except UnsupportedError as e:
        out.append(F.make("ADAPTER_UNSUPPORTED_FEATURE", str(e),
                          "lora2gguf merges LoRA on linear layers, embeddings and expert parameters; other parts "
                          "would be silently missing from the GGUF", "merge with PEFT (merge_and_unload) and convert "
                          "the merged model, or retrain without the feature", {"error": "UnsupportedError"}))
        return out
    except InputError as e:
        out.append(F.make("ADAPTER_INVALID", str(e), "the merge needs rank and alpha",
                          "fix adapter_config.json or save the adapter again"))
        return out

    # which base does the adapter name?
    named = cfg.get("base_model_name_or_path")
    base_names = [str(base.config.get("_name_or_path") or ""), base.folder.name, _cache_repo_id(base.folder)]
    base_names = [n for n in base_names if n]
    if named and not any(_norm_name(named) == _norm_name(n) for n in base_names):
        out.append(F.make("ADAPTER_BASE_NAME",
                          f"adapter_config.json base_model_name_or_path = {named!r}; the base is "
                          f"{' / '.join(repr(n) for n in base_names)}",
                          "an adapter is a difference to one particular model; on another one it changes the wrong "
                          "weights even when all shapes fit",
                          f"pass the base the adapter was trained on ({named}, or its BF16 / MXFP4 release)",
                          {"adapter_base": named, "base": base_names}))

    terms = None
    if arch is not None and base.logical_shapes:
        try:
            terms = load_adapter(ad_dir, {**arch.fused_shapes(base.logical_shapes), **base.logical_shapes}, arch)
        except UnsupportedError as e:
            out.append(F.make("ADAPTER_UNSUPPORTED_FEATURE", str(e),
                              "these adapter tensors would be missing from the GGUF",
                              "retrain without the feature, or merge with PEFT (merge_and_unload) where PEFT "
                              "supports it and convert the merged model",
                              {"error": "UnsupportedError"}))
        except FormatError as e:
            out.append(F.make("ADAPTER_INVALID", str(e), "the merge needs every LoRA pair complete and 2-D",
                              "save the adapter again with PEFT's save_pretrained", {"error": "FormatError"}))
        except InputError as e:
            out.append(F.make("ADAPTER_BASE_MISMATCH", str(e),
                              "a LoRA pair can only be added to the base tensor it was trained on, with the same shape",
                              f"use the base the adapter was trained on"
                              f"{f' ({named})' if named else ''}: same model size, layer count and expert count",
                              {"error": type(e).__name__, "adapter_base": named}))

    if terms is not None and (terms.replaced or terms.token_rows):
        lines = []
        for name, info in sorted(terms.replaced.items()):
            old = base.logical_shapes.get(name)
            resized = old is not None and tuple(old) != tuple(info.shape)
            lines.append(f"{name}: the adapter's full {list(info.shape)} weight replaces the base's {list(old or ())}"
                         + (f" (resized: {old[0]} -> {info.shape[0]} rows)" if resized else ""))
        for name, rows in sorted(terms.token_rows.items()):
            lines.append(f"{name}: {len(rows.indices)} rows trained (trainable_token_indices {list(rows.indices)[:10]}"
                         f"{' ...' if len(rows.indices) > 10 else ''})")
        try:
            from ..plan import shape_plan

            shapes = {**base.logical_shapes, **{n: tuple(i.shape) for n, i in terms.replaced.items()}}
            shape_plan(arch, arch.normalize_config(base.config), shapes, set(terms.replaced))
        except InputError as e:
            out.append(F.make("ADAPTER_BASE_MISMATCH", str(e),
                              "the token embedding and the output matrix must have one row per token",
                              "save the fine-tune with both embed_tokens and lm_head in modules_to_save (PEFT does "
                              "when the vocabulary was resized)", {"error": type(e).__name__}))
        out.append(F.make("ADAPTER_FULL_WEIGHTS", "\n".join(lines),
                          "the fine-tune trained these tensors whole (modules_to_save, added tokens) or some of their "
                          "rows (trainable tokens); the GGUF gets the adapter's values, with the LoRA deltas on top",
                          "nothing to do; the tokenizer with the added tokens (the adapter's) goes into the GGUF",
                          {"replaced": {n: list(i.shape) for n, i in terms.replaced.items()},
                           "token_rows": {n: list(r.indices) for n, r in terms.token_rows.items()}}))

    # numbers: all-zero and non-finite
    stats = adapter.stats
    nonfinite = {n: s.nonfinite for n, s in stats.items() if s.nonfinite}
    if nonfinite:
        out.append(F.make("ADAPTER_NONFINITE",
                          f"{ad_dir}: {len(nonfinite)} adapter tensors hold NaN/Inf: "
                          + ", ".join(f"{n} ({c} values)" for n, c in list(nonfinite.items())[:8]),
                          "a NaN in lora_A or lora_B spreads through the merge into every row it touches; the GGUF "
                          "would produce garbage", "retrain (or resume) from a checkpoint before the loss diverged; "
                          "check the learning rate and use bf16 rather than fp16 training",
                          {"tensors": nonfinite}))
    pairs: dict[str, dict[str, bool]] = {}
    for n, s in stats.items():
        for which in ("A", "B"):
            tag = f".lora_{which}."
            if tag in n:
                pairs.setdefault(n.split(tag)[0], {})[which] = s.all_zero
    zero_pairs = sorted(k for k, v in pairs.items() if any(v.values()))
    if pairs and len(zero_pairs) == len(pairs):
        out.append(F.make("ADAPTER_ZERO",
                          f"{ad_dir}: all {len(pairs)} LoRA pairs have an all-zero lora_A or lora_B "
                          f"(e.g. {zero_pairs[0]})",
                          "PEFT starts lora_B at zero; an adapter that is still all zero was never trained or was "
                          "saved before training, so the GGUF would be the base model unchanged",
                          "save the adapter after training (trainer.save_model / model.save_pretrained at the end); "
                          "check that the checkpoint folder is the last one",
                          {"pairs": len(pairs), "zero_pairs": zero_pairs[:50]}))
    elif zero_pairs:
        out.append(F.make("ADAPTER_PARTLY_ZERO",
                          f"{ad_dir}: {len(zero_pairs)} of {len(pairs)} LoRA pairs are all zero: {_names(zero_pairs, 5)}",
                          "those modules received no training; usually a frozen or unused target module",
                          "nothing to do if intended; otherwise check target_modules and the training data",
                          {"pairs": len(pairs), "zero_pairs": zero_pairs[:50]}))

    # summary
    rs = bool(cfg.get("use_rslora"))
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    scale = (alpha / math.sqrt(r) if rs else alpha / r) if isinstance(r, int) and r > 0 and isinstance(alpha, (int, float)) else None
    n_terms = sum(len(v) for v in terms.terms.values()) if terms is not None else None
    kinds = sorted({t.kind for ts in terms.terms.values() for t in ts}) if terms is not None else []
    out.append(F.make(
        "ADAPTER_SUMMARY",
        f"PEFT {cfg.get('peft_type')} (saved by peft {cfg.get('peft_version') or 'version not recorded'}), "
        f"r={r}, lora_alpha={alpha}, {'rsLoRA ' if rs else ''}scale={scale if scale is None else round(scale, 6)}, "
        f"target_modules={cfg.get('target_modules')}, target_parameters={cfg.get('target_parameters')}, "
        f"rank_pattern={cfg.get('rank_pattern') or {}}, alpha_pattern={cfg.get('alpha_pattern') or {}}; "
        f"{n_terms if n_terms is not None else '?'} LoRA pairs matched to base tensors ({', '.join(kinds) or '-'})",
        "", "",
        {"peft_type": cfg.get("peft_type"), "peft_version": cfg.get("peft_version"), "r": r, "lora_alpha": alpha,
         "use_rslora": rs, "scale": scale, "target_modules": cfg.get("target_modules"),
         "target_parameters": cfg.get("target_parameters"), "pairs_matched": n_terms, "kinds": kinds,
         "base_model_name_or_path": named,
         "touches_experts": any(k == "experts" for k in kinds)}))
    return out


# --------------------------------------------------------------------------- chat format


def check_chat(tok: TokenizerInfo | None, arch, generation_config: Mapping[str, Any] | None = None,
               config: Mapping[str, Any] | None = None) -> list[Finding]:
    """Chat template and end-of-generation tokens of the tokenizer the GGUF gets, checked by the
    family's chat format (:mod:`lora2gguf.chat`); ``generation_config`` / ``config``: the base's
    generation_config.json and config.json (their ``eos_token_id``)."""
    from ..chat import chat_format, tokenizer_facts

    if tok is None or arch is None:
        return []
    facts = tokenizer_facts(tok, generation_config, config)
    fmt = chat_format(arch, template=tok.chat_template, specials=facts.specials,
                      where=f"{tok.folder}/{tok.chat_template_source or 'tokenizer'}")
    return [F.make(i.code, i.what, i.why, i.fix, dict(i.data)) for i in fmt.template_issues(facts)]


# --------------------------------------------------------------------------- resources


# Rough throughputs for the time estimate (bytes per second); labelled as assumptions in the output.
READ_BPS = 300e6
MERGE_BPS = 150e6
QUANTIZE_BPS = 60e6


@dataclass
class OutputEstimate:
    name: str
    ggml_type: str
    bytes: int
    bytes_read: int
    seconds: float
    intermediate: bool = False


@dataclass
class Resources:
    outputs: list[OutputEstimate]
    bytes_needed: int
    free_bytes: int | None
    free_where: str | None
    peak_memory_bytes: int
    seconds: float
    unknown_types: list[str] = field(default_factory=list)
    #: a download still to come into the Hugging Face cache (lora2gguf.hub.Download), and whether
    #: the cache shares the outputs' filesystem (then both count against the same free space)
    download: Any = None
    download_shared: bool = False

    def to_dict(self) -> dict[str, Any]:
        out = {
            "outputs": [o.__dict__ for o in self.outputs], "bytes_needed": self.bytes_needed,
            "free_bytes": self.free_bytes, "free_where": self.free_where,
            "peak_memory_bytes": self.peak_memory_bytes, "seconds": round(self.seconds, 1),
            "assumptions": {"read_bytes_per_s": READ_BPS, "merge_bytes_per_s": MERGE_BPS,
                            "quantize_bytes_per_s": QUANTIZE_BPS},
        }
        if self.download is not None:
            out["download"] = self.download.to_dict() | {"same_filesystem_as_outputs": self.download_shared}
        return out


def ggml_type_for(output: str) -> gguf.GGMLQuantizationType | None:
    """The main ggml tensor type of a llama.cpp output type name ('BF16', 'Q4_K_M' -> Q4_K, 'MXFP4_MOE' -> MXFP4)."""
    from ..quantize import main_tensor_type

    name = output.upper()
    if name in ("F32", "F16", "BF16"):
        return gguf.GGMLQuantizationType[name]
    if "MOSTLY_" + name not in gguf.LlamaFileType.__members__:
        return None
    return gguf.GGMLQuantizationType.__members__.get(main_tensor_type(name))


# llama.cpp's quantizer (llama-quant.cpp) replaces a k-quant whose 256-wide block does not divide
# a tensor's rows by these types (2880-wide rows, for one, hit this for every tensor).
_FALLBACK = {"Q2_K": "IQ4_NL", "Q3_K": "IQ4_NL", "IQ4_XS": "IQ4_NL", "IQ2_XXS": "IQ4_NL", "IQ2_XS": "IQ4_NL",
             "IQ2_S": "IQ4_NL", "IQ3_XXS": "IQ4_NL", "IQ3_S": "IQ4_NL", "IQ1_S": "IQ4_NL", "IQ1_M": "IQ4_NL",
             "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def _tensor_bytes(n: int, ne0: int, qtype: gguf.GGMLQuantizationType) -> int:
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    if ne0 % block:
        fb = _FALLBACK.get(qtype.name)
        qtype = gguf.GGMLQuantizationType[fb] if fb else gguf.GGMLQuantizationType.F16
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        if ne0 % block:
            block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.F16]
    return n // block * type_size


# Q4_K_M and Q5_K_M give the output matrix, and attn_v / ffn_down in the "more bits" layers, Q6_K
# (llama.cpp's llama-quant.cpp); the other mixes are sized by their main type (a lower bound).
_MORE_BITS_MIXES = ("Q4_K_M", "Q5_K_M")
_MORE_BITS_TENSORS = {gguf.MODEL_TENSOR.ATTN_V, gguf.MODEL_TENSOR.FFN_DOWN, gguf.MODEL_TENSOR.FFN_DOWN_EXP}


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _gguf_bytes(tensors: Iterable[tuple[str, tuple[int, ...], Any, bool]], qtype: gguf.GGMLQuantizationType,
                mix: str | None = None, n_layers: int = 0) -> int:
    """Tensor-data bytes of the GGUF for (GGUF name, numpy shape, tensor kind, kept in F32): F32
    tensors stay F32, the rest gets ``qtype`` (or llama.cpp's fallback where the row length, the
    last axis, does not fit its block)."""
    from ..arch import block_id

    q6 = gguf.GGMLQuantizationType.Q6_K
    total = 0
    for name, shape, kind, f32 in tensors:
        n = math.prod(shape)
        if len(shape) <= 1 or f32:
            total += 4 * n
            continue
        t = qtype
        if mix in _MORE_BITS_MIXES:
            bid = block_id(name)
            if kind == gguf.MODEL_TENSOR.OUTPUT or (kind in _MORE_BITS_TENSORS and bid is not None
                                                    and _use_more_bits(bid, n_layers)):
                t = q6
        total += _tensor_bytes(n, shape[-1], t)
    return total


def gguf_tensors(base: BaseInfo, arch) -> list[tuple[str, tuple[int, ...], Any, bool]]:
    """(GGUF name, shape, kind, kept in F32) of every tensor the build would write, from the
    shapes alone (the family's plan); the HF shapes as they are when that cannot be planned."""
    from ..errors import Lora2GGUFError
    from ..plan import shape_plan

    if arch is not None and base.logical_shapes:
        try:
            plan = shape_plan(arch, arch.normalize_config(base.config), base.logical_shapes)
            return [(t.tensor.name, t.tensor.shape, t.kind, t.tensor.qtype == gguf.GGMLQuantizationType.F32)
                    for t in plan.tensors]
        except (Lora2GGUFError, KeyError, TypeError, ValueError):
            pass  # doctor reports the config / tensor problem elsewhere; size what is there
    return [(n, tuple(s), None, False) for n, s in base.logical_shapes.items()]


def metadata_bytes(tok: TokenizerInfo | None, n_tensors: int, n_gguf_tensors: int | None = None) -> int:
    """Approximate bytes of a GGUF's header: the tokenizer arrays (each token and merge a
    length-prefixed string, one int32 type per token), the chat template, tensor infos and
    alignment padding, plus 64 KiB for the other keys."""
    total = 64 * 1024
    if tok is not None and tok.model is not None:
        toks = tok.model.id_to_token
        merges = tok.model.merges
        total += 12 * len(toks) + len("".join(toks.values()).encode("utf-8", "surrogatepass"))
        total += 8 * len(merges) + len("".join(merges).encode("utf-8", "surrogatepass"))
    if tok is not None and tok.chat_template:
        total += len(tok.chat_template.encode("utf-8"))
    n = n_gguf_tensors or n_tensors
    return total + n * (96 + 32)


def estimate_resources(base: BaseInfo, adapter: AdapterInfo, arch, outputs: Iterable[str], *,
                       free_bytes: int | None, free_where: str | None,
                       tokenizer: TokenizerInfo | None = None) -> Resources:
    shapes = base.logical_shapes
    tensors = gguf_tensors(base, arch)
    n_blocks = int(base.config.get("num_hidden_layers") or 0) if isinstance(base.config.get("num_hidden_layers"), int) else 0
    base_bytes = sum(p.stat().st_size for p in base.checkpoint.files) if base.checkpoint else 0
    ad_bytes = adapter.checkpoint.total_bytes if adapter.checkpoint else 0
    outs: list[OutputEstimate] = []
    unknown = []
    wanted = [o.upper() for o in outputs]
    first16 = next((o for o in wanted if o in ("BF16", "F16", "F32")), None)
    if first16 is None and any(o not in ("BF16", "F16", "F32") for o in wanted):
        first16 = "BF16"
        intermediate = True
    else:
        intermediate = False
    full = None
    meta = metadata_bytes(tokenizer, len(shapes), len(tensors))
    for o in ([first16] if intermediate else []) + wanted:
        qt = ggml_type_for(o)
        if qt is None:
            unknown.append(o)
            continue
        size = _gguf_bytes(tensors, qt, o, n_blocks) + meta
        if o in ("BF16", "F16", "F32") and full is None:
            full = size
            read = base_bytes + ad_bytes
            secs = read / READ_BPS + size / MERGE_BPS
        else:
            read = full or 0
            secs = read / QUANTIZE_BPS
        outs.append(OutputEstimate(o, qt.name, size, read, secs, intermediate and o == first16 and not outs))
    peak = working_set_bytes(shapes, adapter)
    return Resources(outs, sum(o.bytes for o in outs), free_bytes, free_where, peak,
                     sum(o.seconds for o in outs), unknown)


def working_set_bytes(shapes: Mapping[str, tuple[int, ...]], adapter: AdapterInfo | None = None) -> int:
    """Expected peak memory of the streaming merge: each worker thread of the build holds one slab
    of a tensor's leading axis (the plan's slab size, 64 MiB of float32 rows) as float32 source,
    merged result and transformed output (x4 for headroom), plus that tensor's LoRA factors in
    float32, and the finished slabs waiting to be written (stream.LOOKAHEAD_BYTES)."""
    from ..plan import DEFAULT_SLAB_BYTES as slab_bytes
    from ..stream import LOOKAHEAD_BYTES, default_threads

    factors: dict[str, int] = {}
    if adapter is not None and adapter.checkpoint is not None:
        for name, info in adapter.checkpoint.tensors.items():
            module = name.split(".lora_")[0]
            factors[module] = factors.get(module, 0) + info.numel * 4
    biggest_factors = max(factors.values(), default=0)
    peak = 0
    for shape in shapes.values():
        if not shape:
            continue
        row = math.prod(shape[1:]) * 4
        rows = max(1, min(shape[0], slab_bytes // max(row, 1))) if len(shape) > 1 else 1
        peak = max(peak, rows * row * 4 if len(shape) > 1 else shape[0] * 4 * 4)
    total = sum(4 * math.prod(shape) for shape in shapes.values())  # the model's slabs, all of them
    return peak * default_threads() + min(LOOKAHEAD_BYTES, total) + biggest_factors


def free_space(out_dir: Path | None) -> tuple[int | None, str | None]:
    """Free bytes on the filesystem of out_dir (or its nearest existing parent)."""
    import shutil

    if out_dir is None:
        return None, None
    p = Path(out_dir).absolute()
    while not p.exists() and p.parent != p:
        p = p.parent
    try:
        return shutil.disk_usage(p).free, str(p)
    except OSError:
        return None, str(p)


def same_filesystem(a: str | Path | None, b: str | Path | None) -> bool:
    """Whether two paths (or their nearest existing parents) are on one filesystem."""
    def dev(p):
        p = Path(p).absolute()
        while not p.exists() and p.parent != p:
            p = p.parent
        return p.stat().st_dev

    if a is None or b is None:
        return False
    try:
        return dev(a) == dev(b)
    except OSError:
        return False


def _gb(n: int | None) -> str:
    return "?" if n is None else f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def check_resources(res: Resources) -> list[Finding]:
    out: list[Finding] = []
    for o in res.unknown_types:
        out.append(F.make("OUTPUT_TYPE_UNKNOWN", f"output type {o!r}",
                          "outputs are llama.cpp file types (BF16, F16, F32, Q8_0, Q6_K, Q5_K_M, Q4_K_M, MXFP4_MOE, ...)",
                          f"choose from: {', '.join(sorted(m[7:] for m in gguf.LlamaFileType.__members__ if m.startswith('MOSTLY_')))}",
                          {"type": o}))
    lines = [f"{o.name}{' (intermediate)' if o.intermediate else ''}: write ~{_gb(o.bytes)}, read {_gb(o.bytes_read)}, "
             f"~{o.seconds / 60:.1f} min" for o in res.outputs]
    lines.append(f"peak memory ~{_gb(res.peak_memory_bytes)}; free on {res.free_where or '(no output folder given)'}: "
                 f"{_gb(res.free_bytes)}")
    route = kernel.status()
    lines.append("merge: the compiled kernel" if route == "compiled" else
                 f"merge: in numpy, about 2x slower, the same bytes: {route[len('numpy ('):-1]}; with a C compiler "
                 "installed, reinstall lora2gguf to build its kernel")
    dl = res.download
    if dl is not None:
        lines.append(f"download: {dl.what}, {_gb(dl.bytes)} into the Hugging Face cache {dl.where}"
                     + (" (the outputs' filesystem: counted with them)" if res.download_shared
                        else f" ({_gb(dl.free_bytes)} free there)"))
    out.append(F.make("RESOURCES", "\n".join(lines), "", "", res.to_dict()))
    shared = dl.bytes if dl is not None and res.download_shared else 0
    need = res.bytes_needed + shared
    what = f"the outputs need ~{_gb(res.bytes_needed)} ({', '.join(f'{o.name} {_gb(o.bytes)}' for o in res.outputs)})"
    if shared:
        what += f" and the download of {dl.what} {_gb(shared)}"
    data = {"free_bytes": res.free_bytes, "bytes_needed": need}
    if shared:
        data |= {"outputs_bytes": res.bytes_needed, "download_bytes": shared}
    if res.free_bytes is not None:
        if res.free_bytes < need:
            out.append(F.make("DISK_SPACE",
                              f"{res.free_where}: {_gb(res.free_bytes)} free, {what}",
                              "a conversion that fills the disk fails after minutes of work"
                              + ("; nothing has been downloaded yet" if shared else ""),
                              f"free {_gb(need - res.free_bytes)} or more on that filesystem, choose another "
                              "output folder, or ask for fewer outputs"
                              + (" (or point HF_HUB_CACHE at another disk for the download)" if shared else ""),
                              data))
        elif res.free_bytes < need * 1.1:
            out.append(F.make("DISK_SPACE_LOW",
                              f"{res.free_where}: {_gb(res.free_bytes)} free for ~{_gb(need)} of outputs"
                              + (" and download" if shared else ""),
                              "the sizes are estimates; with under 10% margin the disk may still fill",
                              "free some space or choose another output folder", data))
    if dl is not None and not res.download_shared and dl.free_bytes is not None and dl.free_bytes < dl.bytes:
        out.append(F.make("DISK_SPACE",
                          f"{dl.where}: {_gb(dl.free_bytes)} free, the download of {dl.what} needs {_gb(dl.bytes)}",
                          "the download would fill the Hugging Face cache's disk; nothing has been downloaded yet",
                          f"free {_gb(dl.bytes - dl.free_bytes)} or more there, or point HF_HUB_CACHE (or HF_HOME) "
                          "at a disk with room", {"free_bytes": dl.free_bytes, "bytes_needed": dl.bytes,
                                                  "download_bytes": dl.bytes, "where": dl.where}))
    return out
