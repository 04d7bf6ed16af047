"""Next-token logits: of a GGUF in llama.cpp (through llama-cpp-python), and of the reference.

The reference is the fine-tune itself, base + adapter applied *unmerged* through PEFT, run by
transformers (float32, or bfloat16 when float32 does not fit in memory). When torch, transformers
or PEFT are missing, or neither fits, the reference is the unquantized GGUF (BF16/F16/F32) run in
llama.cpp; :func:`choose_reference` says which and why, and the report shows it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import InputError, UnsupportedError

log = logging.getLogger(__name__)

#: fraction of the available memory a reference model may take
MEMORY_FRACTION = 0.75


def default_threads() -> int:
    """Threads for llama.cpp: the CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def ctx_size(n_tokens: int) -> int:
    """A context size covering ``n_tokens``, rounded up to a multiple of 256."""
    return max(256, -(-int(n_tokens) // 256) * 256)


@contextlib.contextmanager
def _quiet_stderr():
    """llama.cpp writes its load log to fd 2 even with verbose=False; keep it out of our output."""
    try:
        fd = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(fd, 2)
        os.close(fd)


def open_gguf(path: str | os.PathLike[str], *, n_ctx: int, n_threads: int | None = None,
              logits_all: bool = False, seed: int = 0, n_batch: int = 512, vocab_only: bool = False,
              lora: str | os.PathLike[str] | None = None, lora_scale: float = 1.0):
    """A ``llama_cpp.Llama`` for ``path`` (raises UnsupportedError without llama-cpp-python and
    InputError when llama.cpp cannot load the file). ``vocab_only``: the tokenizer alone.
    ``lora``: a GGUF LoRA adapter applied at load time (:func:`apply_lora`)."""
    try:
        import llama_cpp
    except ImportError as e:
        raise UnsupportedError("verify needs llama-cpp-python to run the GGUF files: "
                               "pip install llama-cpp-python") from e
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: GGUF file not found (was it moved after the build?)")
    if lora is not None and not Path(lora).is_file():
        raise InputError(f"{lora}: LoRA GGUF not found (was it moved after the build?)")
    try:
        with _quiet_stderr():
            llm = llama_cpp.Llama(model_path=str(p), n_ctx=n_ctx, n_threads=n_threads or default_threads(),
                                  n_threads_batch=n_threads or default_threads(), n_batch=min(n_batch, n_ctx),
                                  logits_all=logits_all, seed=seed, vocab_only=vocab_only, verbose=False)
    except (ValueError, RuntimeError) as e:
        raise InputError(f"llama.cpp could not load {p}: {e}; rebuild the file or check it with "
                         "`lora2gguf doctor`") from e
    if lora is not None:
        try:
            apply_lora(llm, lora, lora_scale, base=p)
        except BaseException:
            llm.close()
            raise
    return llm


def apply_lora(llm, path: str | os.PathLike[str], scale: float = 1.0, *, base: str | os.PathLike[str] = "") -> None:
    """Load the GGUF LoRA ``path`` onto ``llm``'s model and set it on its context (llama.cpp's
    llama_adapter_lora_init / llama_set_adapters_lora), the model mapped as usual. A failed load is
    a NULL pointer, which llama-cpp-python returns as a false ctypes pointer, not None (its own
    ``lora_path`` check misses it): checked here by truth value, and raised as InputError with the
    reason llama.cpp logs. The model owns the adapter and frees it with itself."""
    import ctypes

    import llama_cpp

    from .. import quantize

    messages: list[tuple[int, str]] = []

    @llama_cpp.llama_log_callback
    def _capture(level, text, user_data):  # noqa: ARG001
        messages.append((int(level), text.decode("utf-8", "replace")))

    llama_cpp.llama_log_set(_capture, ctypes.c_void_p(0))
    try:
        adapter = llama_cpp.llama_adapter_lora_init(llm.model, str(path).encode("utf-8"))
    finally:  # back to lora2gguf's silent callback if it was set, else llama-cpp-python's own
        if quantize._LOG_CB is not None:
            quantize.quiet_llama(force=True)
        else:
            from llama_cpp import _logger

            llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
    if not adapter:
        # GGML_LOG_LEVEL_ERROR is 4 in this ggml (it was 3 before DEBUG moved to 1)
        errors = [t.strip() for level, t in messages if level == 4 or "failed" in t.lower()]
        # "llama_adapter_lora_init_from_file_ptr: failed to apply lora adapter: <reason>"
        why = "; ".join(dict.fromkeys(e.split(": ", 1)[-1] for e in errors)) or "no reason logged"
        raise InputError(f"llama.cpp could not apply the LoRA adapter {path} to {base}: {why}")
    adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(adapter)
    scales = (ctypes.c_float * 1)(float(scale))
    if llama_cpp.llama_set_adapters_lora(llm.ctx, adapters, 1, scales):
        raise InputError(f"llama.cpp could not set the LoRA adapter {path} on a context of {base}")


def gguf_logits(path: str | os.PathLike[str], tokens: Sequence[int], *, n_threads: int | None = None,
                seed: int = 0, lora: str | os.PathLike[str] | None = None) -> np.ndarray:
    """Logits (``(len(tokens), n_vocab)``, float32) of the GGUF (with the LoRA GGUF ``lora`` applied)
    at every position of ``tokens``."""
    toks = [int(t) for t in tokens]
    if not toks:
        raise InputError("gguf_logits: no tokens")
    llm = open_gguf(path, n_ctx=ctx_size(len(toks)), n_threads=n_threads, logits_all=True, seed=seed, lora=lora)
    try:
        if max(toks) >= llm.n_vocab():
            raise InputError(f"{path}: token id {max(toks)} is outside its vocabulary of {llm.n_vocab()}")
        llm.reset()
        llm.eval(toks)
        return np.array(llm.scores[:len(toks)], dtype=np.float32, copy=True)
    finally:
        llm.close()


def gguf_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The GGUF's scalar metadata as llama.cpp reads it (key -> value as text; arrays such as the
    token list are left out). Uses llama.cpp's loader: gguf-py's reader parses every token string
    in Python, which takes tens of seconds for a 200k-token vocabulary."""
    llm = open_gguf(path, n_ctx=256, n_threads=1)
    try:
        return dict(llm.metadata)
    finally:
        llm.close()


def declared_stop_tokens(meta: dict[str, Any]) -> dict[str, int]:
    """The end-of-generation ids the GGUF declares in its metadata (EOS, EOT, EOM), role -> id.

    verify stops generation on these only, not on llama.cpp's by-text guesses, so a file whose
    metadata is wrong fails in verify as it would in a runtime that trusts the metadata."""
    import gguf

    keys = {"eos": gguf.Keys.Tokenizer.EOS_ID, "eot": gguf.Keys.Tokenizer.EOT_ID,
            "eom": gguf.Keys.Tokenizer.EOM_ID}
    out = {}
    for role, k in keys.items():
        v = meta.get(k)
        if v is None or str(v).strip() in ("", "-1"):
            continue
        out[role] = int(v)
    return out


# ---------------------------------------------------------------------------------------------
# the reference


@dataclass
class Reference:
    """What the GGUFs are compared against."""

    kind: str  # "peft" or "gguf"
    reason: str
    dtype: str | None = None  # torch dtype name for "peft"
    file: str | None = None  # GGUF file name for "gguf"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "reason": self.reason, "dtype": self.dtype, "file": self.file}

    @property
    def label(self) -> str:
        if self.kind == "peft":
            return f"fine-tune (PEFT, unmerged, {self.dtype})"
        return f"{self.file} (llama.cpp)"


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo in bytes (None where unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _have_reference_stack() -> str | None:
    missing = []
    for mod in ("torch", "transformers", "peft"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    return ", ".join(missing) or None


def choose_reference(mode: str, *, n_params: int, base_dir: str | None, adapter_dir: str | None,
                     fallback_file: str | None, n_tokens: int, vocab_size: int,
                     memory: int | None = None) -> Reference:
    """Pick the reference. ``mode``: "auto" (PEFT when possible, else the GGUF), "peft" (PEFT or
    raise), "gguf" (the unquantized GGUF). ``n_params``: parameters of the model (memory estimate)."""
    if mode not in ("auto", "peft", "gguf"):
        raise InputError(f"reference={mode!r}: use auto, peft or gguf")

    def fallback(reason: str) -> Reference:
        if mode == "peft":
            raise UnsupportedError(f"reference=peft impossible: {reason}")
        if fallback_file is None:
            raise InputError(f"no reference: {reason}, and run.json lists no BF16/F16/F32 GGUF to use instead")
        return Reference("gguf", reason + f"; compared against {fallback_file} instead", file=fallback_file)

    if mode == "gguf":
        return fallback("reference=gguf was asked for")
    missing = _have_reference_stack()
    if missing:
        return fallback(f"{missing} not installed (pip install 'lora2gguf[reference]')")
    for d, what in ((base_dir, "base"), (adapter_dir, "adapter")):
        if not d or not Path(d).is_dir():
            return fallback(f"the {what} folder {d!r} from run.json is not there")
    mem = available_memory() if memory is None else memory
    logits_bytes = 3 * n_tokens * vocab_size * 4
    for dtype, size in (("float32", 4), ("bfloat16", 2)):
        need = int(n_params * size * 1.2) + logits_bytes
        if mem is None or need <= MEMORY_FRACTION * mem:
            why = "transformers + PEFT installed"
            if mem is not None:
                why += f"; needs about {need / 2**30:.1f} GiB of {mem / 2**30:.1f} GiB available"
            return Reference("peft", why, dtype=dtype)
    return fallback(f"the fine-tune needs about {n_params * 2.4 / 2**30:.1f} GiB even in bfloat16, "
                    f"{mem / 2**30:.1f} GiB available")


def load_reference_model(base_dir: str | os.PathLike[str], adapter_dir: str | os.PathLike[str] | None,
                         dtype: str = "float32"):
    """base + adapter through PEFT, unmerged, eval mode (adapter None: the base alone)."""
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        raise UnsupportedError("the PEFT reference needs torch, transformers and peft: "
                               "pip install 'lora2gguf[reference]'") from e
    td = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(dtype)
    if td is None:
        raise InputError(f"reference dtype {dtype!r}: use float32 or bfloat16")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=td, attn_implementation="eager")
    except (OSError, ValueError) as e:
        raise InputError(f"transformers could not load the base {base_dir}: {e}") from e
    if adapter_dir is not None:
        from peft import PeftModel

        from ..adapter import saved_vocab_rows

        rows = saved_vocab_rows(adapter_dir)  # a fine-tune that added tokens: resized before training
        if rows is not None and rows != model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(rows, mean_resizing=False)
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    return model


def reference_logits(model, tokens: Sequence[int]) -> np.ndarray:
    """Logits (``(len(tokens), vocab)``, float32) of a loaded reference model."""
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.tensor([list(tokens)], dtype=torch.long)).logits[0]
    return out.to(torch.float32).numpy()
