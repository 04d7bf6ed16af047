"""Architecture knowledge is data: the pipeline modules name no family. For every registered
family, neither its key, its Hugging Face classes, its model types nor its GGUF architecture
name occur in plan, stream, adapter, vocab, doctor, verify or report (nor do the GPT-OSS /
Harmony markers the first version had there); a family lives in its arch/ module alone."""

from __future__ import annotations

import re
from pathlib import Path

import lora2gguf
from lora2gguf import arch

SRC = Path(lora2gguf.__file__).parent
PIPELINE = ["plan.py", "stream.py", "adapter.py", "layout.py", "merge.py", "lora.py", "hparams.py", "sources.py",
            "api.py", "quantize.py", "vocab", "doctor", "verify", "report"]
# what the first version had hard-wired outside arch/
MARKERS = ["gpt_oss", "GPT-OSS", "Harmony", "harmony", "o200k", "<|return|>", "201088"]


def _files() -> list[Path]:
    out = []
    for entry in PIPELINE:
        p = SRC / entry
        out += sorted(p.rglob("*.py")) if p.is_dir() else [p]
    return out


def _words(family) -> list[str]:
    words = [family.name, *family.hf_architectures, *family.model_types, family.gguf_arch_name]
    return sorted({w for w in words if w})


def test_every_registered_family_is_absent_from_the_pipeline():
    families = arch.known()
    assert {"gpt_oss", "llama", "mistral", "qwen2", "qwen3"} <= set(families)
    found = []
    for path in _files():
        text = path.read_text(encoding="utf-8")
        for fam in families.values():
            for w in _words(fam):
                # a whole word: "llama" must not match llama_cpp / llama.cpp, the runtime's name
                for m in re.finditer(rf"(?<![\w.-]){re.escape(w)}(?![\w.-])", text):
                    line = text.count("\n", 0, m.start()) + 1
                    found.append(f"{path.relative_to(SRC)}:{line}: {w}")
        for marker in MARKERS:
            if marker in text:
                found.append(f"{path.relative_to(SRC)}: {marker}")
    assert not found, "family knowledge outside arch/: " + "; ".join(found[:20])


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
