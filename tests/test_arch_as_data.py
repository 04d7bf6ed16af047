"""Architecture knowledge is data: outside arch/ (the families) and chat/ (the chat formats), no
module of lora2gguf names a model family or a chat format, in code, messages or docstrings. For
every registered family, neither its key, its Hugging Face classes and their stems, its model
types nor its GGUF architecture name occur there, nor do the display names and markers of
:data:`NAMES` (the GPT-OSS / Harmony markers the first version had in the pipeline among them),
in any letter case; a family lives in its arch/ module alone."""

from __future__ import annotations

import re
from pathlib import Path

import lora2gguf
from lora2gguf import arch

SRC = Path(lora2gguf.__file__).parent
#: folders that hold family or chat-format knowledge by design
OWNERS = {
    "arch": "the families, one module each",
    "chat": "the chat formats (Harmony, the model's Jinja template) and the templates they know by name",
    "testing": "tiny models and tokenizers of each family, for tests and benchmarks",
    "demo": "the demo: one GPT-OSS fine-tune end to end",
}
#: modules outside those folders that hold one family's facts on purpose
DATA_MODULES = {
    "synth.py": "tiny GPT-OSS bases and PEFT adapters for tests and benchmarks",
    "o200k.py": "GPT-OSS's o200k_harmony tokenizer rebuilt offline, for tests and the demo",
}
#: (module, exact text) a module may hold although it names a family or format, and why; an
#: entry whose text is gone fails the test (the list stays what the code needs)
ALLOWED = {
    ("doctor/findings.py", "CHAT_TEMPLATE_NOT_HARMONY"):
        "the first name of CHAT_TEMPLATE_WRONG_FORMAT, still accepted by --accept (findings.RENAMED)",
}
#: display names of families and chat formats, beyond what the registry holds (whole names)
NAMES = ["Llama 2", "Llama 3", "CodeLlama", "SmolLM", "Mistral", "Nemo", "tekken", "Mixtral", "Qwen", "Qwen2.5",
         "Qwen3", "Gemma", "CodeGemma", "Phi", "Phi-3", "Harmony", "ChatML"]
#: what the first version had hard-wired outside arch/, and other markers of one family or chat
#: format: found anywhere, inside identifiers and longer names too
MARKERS = ["gpt_oss", "gpt-oss", "gptoss", "harmony", "o200k", "201088", "201,088", "<|return|>", "<|channel|>",
           "<|eot_id|>", "<|im_start|>", "<|im_end|>", "[INST]", "<start_of_turn>", "<think>"]
#: the runtime's names: llama.cpp, its Python binding, its library, tools and source files are no
#: model family (identifiers such as llama_model_quantize are whole words of their own)
RUNTIME = re.compile(r"(?i)llama(?:\.cpp|[_-]cpp(?:[_-]python)?(?:\.Llama)?|\.(?:so|dylib|dll)\b"
                     r"|-[a-z]+\.(?:cpp|h|json)|-(?:quantize|imatrix|server|cli|perplexity|bench|tokenize|gguf-split"
                     r"|tools)\b)")


def _modules() -> list[Path]:
    """Every Python module of lora2gguf outside :data:`OWNERS` and :data:`DATA_MODULES`."""
    out = []
    for p in sorted(SRC.rglob("*.py")):
        rel = p.relative_to(SRC)
        if rel.parts[0] not in OWNERS and rel.as_posix() not in DATA_MODULES:
            out.append(p)
    return out


def _stems(hf_class: str) -> set[str]:
    """'Qwen2MoeForCausalLM' -> {'Qwen2Moe', 'Qwen'}: the class's model name and its family name."""
    stem = re.sub(r"For[A-Z]\w*$", "", hf_class)
    short = stem
    while (cut := re.sub(r"(\d+|Moe)$", "", short)) != short:
        short = cut
    return {s for s in (stem, short) if s}


def _patterns() -> list[re.Pattern]:
    """One pattern per name or marker, in any letter case. A name (the registry's and
    :data:`NAMES`) matches as a whole word: no letter, digit or underscore beside its ends; a
    marker (:data:`MARKERS`) matches anywhere."""
    words = {w.lower() for w in NAMES}
    for fam in arch.known().values():
        words |= {w.lower() for w in (fam.name, *fam.hf_architectures, *fam.model_types, fam.gguf_arch_name) if w}
        for cls in fam.hf_architectures:
            words |= {w.lower() for w in _stems(cls)}
    edge = "A-Za-z0-9_"
    out = [re.compile((rf"(?<![{edge}])" if w[0].isalnum() else "") + re.escape(w)
                      + (rf"(?![{edge}])" if w[-1].isalnum() else ""), re.IGNORECASE) for w in sorted(words)]
    return out + [re.compile(re.escape(m), re.IGNORECASE) for m in MARKERS]


def _found(text: str) -> list[re.Match]:
    """Every name or marker in ``text`` (the longest at each place), the runtime's names left out."""
    text = RUNTIME.sub(lambda m: " " * len(m.group()), text)
    at: dict[int, re.Match] = {}
    for pat in _patterns():
        for m in pat.finditer(text):
            if m.start() not in at or len(m.group()) > len(at[m.start()].group()):
                at[m.start()] = m
    return [at[i] for i in sorted(at)]


def test_the_scan_sees_what_it_must():
    """The matching itself: any case, display names, markers inside names; the runtime's names
    and identifiers that merely contain a family's name left alone."""
    for text in ("a GPT-OSS vocabulary", "the HARMONY format", "Llama 3's rope", "openai/gpt-oss-20b", "qwen2moe",
                 "CHAT_TEMPLATE_NOT_HARMONY", "is_gpt_oss(cfg)", "(Gemma's norms)", "a phi-3 model",
                 "MistralForCausalLM"):
        assert _found(text), text
    for text in ("llama.cpp's llama-quantize, llama_cpp.Llama, libllama.so, llama.dll, llama-cpp-python, --llama-cpp",
                 "llama-quant.cpp, llama-tools.json, llama_model_quantize, quiet_llama(), LLAMA_HF, LlamaTools",
                 "graphics, a philosophy, gpt2, CHAT_TEMPLATE_WRONG_FORMAT, llama_lib"):
        assert not _found(text), [m.group() for m in _found(text)]
    assert _stems("Qwen2MoeForCausalLM") == {"Qwen2Moe", "Qwen"} and _stems("GptOssForCausalLM") == {"GptOss"}


def test_every_registered_family_is_absent_from_the_pipeline():
    families = arch.known()
    assert {"gpt_oss", "llama", "mistral", "qwen2", "qwen3"} <= set(families)
    modules = _modules()
    names = {p.relative_to(SRC).as_posix() for p in modules}
    # the pipeline, the tools around it and the modules another engineer edits are all in the scan
    assert {"plan.py", "stream.py", "adapter.py", "lora_gguf.py", "lora_run.py", "inspect.py", "cli.py", "api.py",
            "quantize.py", "imatrix.py", "gguf_kv.py", "numerics.py", "vocab/__init__.py", "doctor/findings.py",
            "verify/__init__.py", "report/run_files.py"} <= names
    found, unused = [], set(ALLOWED)
    for path in modules:
        rel = path.relative_to(SRC).as_posix()
        text = path.read_text(encoding="utf-8")
        for (where, allowed), _why in ALLOWED.items():
            if where == rel and allowed in text:
                text = text.replace(allowed, " " * len(allowed))
                unused.discard((where, allowed))
        for m in _found(text):
            found.append(f"{rel}:{text.count(chr(10), 0, m.start()) + 1}: {m.group()}")
    assert not found, (f"family or chat-format knowledge outside arch/ and chat/ ({len(found)}): "
                       + "; ".join(found[:40]))
    assert not unused, f"ALLOWED entries no longer needed: {sorted(unused)}"


def test_a_family_is_one_module():
    """Each registered family is defined in one module under arch/ (not in the registry itself)."""
    import importlib
    import sys

    homes = {}
    for fam in arch.known().values():
        mods = [m for name, m in list(sys.modules.items()) if name.startswith("lora2gguf.arch.")
                and any(v is fam for v in vars(m).values())]
        assert len(mods) == 1, (fam.name, [m.__name__ for m in mods])
        homes[fam.name] = mods[0].__name__
    assert "lora2gguf.arch" not in homes.values()
    assert importlib.import_module("lora2gguf.arch").known() == arch.known()
