"""Shared, session-scoped fixtures: the offline o200k_harmony tokenizer and small synthetic GPT-OSS
bases and adapters (made with lora2gguf.synth under pytest's tmp_path_factory, once per session).

Treat the fixture folders as read-only; a test that needs to modify one copies it first
(``shutil.copytree``) or makes its own with ``synth.make_base``/``synth.make_adapter``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lora2gguf import synth

#: The reference llama.cpp tree (for facts to check against, never code to copy).
REFERENCE_LLAMA_CPP = Path(os.environ.get(
    "LORA2GGUF_REFERENCE_LLAMA_CPP",
    Path.home() / ".cache/lora2gguf/ref/llama_cpp_python-0.3.36/vendor/llama.cpp",
))

#: TINY in bf16 is about 52 MB (embed and lm_head are 25.7 MB each); this splits it in 2 shards.
TINY_SHARD_BYTES = 30_000_000


@pytest.fixture(scope="session")
def reference_llama_cpp() -> Path:
    """The reference llama.cpp folder (convert_hf_to_gguf.py, conversion/, gguf-py/); skips if absent."""
    if not (REFERENCE_LLAMA_CPP / "convert_hf_to_gguf.py").is_file():
        pytest.skip(f"reference llama.cpp not found at {REFERENCE_LLAMA_CPP}")
    return REFERENCE_LLAMA_CPP


@pytest.fixture(scope="session")
def o200k_tokenizer_dir(tmp_path_factory) -> Path:
    """A folder with gpt-oss's tokenizer files (tokenizer.json, tokenizer_config.json,
    special_tokens_map.json, chat_template.jinja)."""
    from lora2gguf import o200k
    return o200k.write_tokenizer(tmp_path_factory.mktemp("o200k_tokenizer"))


@pytest.fixture(scope="session")
def hf_tokenizer(o200k_tokenizer_dir):
    """transformers' tokenizer loaded from :func:`o200k_tokenizer_dir`."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(o200k_tokenizer_dir))


@pytest.fixture(scope="session")
def harmony_enc():
    """openai-harmony's GPT-OSS encoding, loaded offline."""
    pytest.importorskip("openai_harmony")
    from lora2gguf import o200k
    return o200k.harmony_encoding()


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory, o200k_tokenizer_dir) -> Path:
    """synth.TINY (2 layers, hidden 64, 4 experts, vocab 201088), bf16, in 2 safetensors shards,
    with the tokenizer files; seed 0, "peaked" init."""
    return synth.make_base(tmp_path_factory.mktemp("tiny_base"), synth.gpt_oss_config(**synth.TINY),
                           max_shard_bytes=TINY_SHARD_BYTES)


@pytest.fixture(scope="session")
def tiny_adapter(tmp_path_factory, tiny_base) -> Path:
    """A PEFT LoRA adapter on :func:`tiny_base`: r=4, alpha=8, q/k/v/o_proj plus the experts'
    gate_up_proj and down_proj (target_parameters), seeded non-zero A and B, tokenizer files
    copied from the base."""
    pytest.importorskip("peft")
    return synth.make_adapter(tiny_base, tmp_path_factory.mktemp("tiny_adapter"))


@pytest.fixture(scope="session")
def k256_base(tmp_path_factory, o200k_tokenizer_dir) -> Path:
    """synth.K256 (2 layers, hidden/intermediate 256, head_dim 64): widths that k-quants accept."""
    return synth.make_base(tmp_path_factory.mktemp("k256_base"), synth.gpt_oss_config(**synth.K256))
