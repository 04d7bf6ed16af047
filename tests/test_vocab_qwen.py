"""The GGUF vocabulary of Qwen's byte-level BPE tokenizer (Qwen2.5 and Qwen3 share it) against
llama.cpp's own converter, on tiny random Qwen2ForCausalLM and Qwen3ForCausalLM models with the
tokenizer rebuilt offline beside them: every tokenizer.* key the same, byte for byte; the
converter and write_vocab both name the pre-tokenizer ``qwen2``."""

from __future__ import annotations

import gguf
import pytest

from lora2gguf.testing import tokenizers as T
from vocab_family_models import (QWEN, ReferenceRuns, assert_probe_is_whole, compare_with_converter, model_config, ours,
                                 tiny_model)

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

FAMILIES = ("qwen2", "qwen3")


@pytest.fixture(scope="session")
def qwen_models(tmp_path_factory, reference_llama_cpp):
    root = tmp_path_factory.mktemp("qwen")
    tok = T.qwen3_tokenizer(root / "tokenizer")
    runs = ReferenceRuns(reference_llama_cpp, root)
    models = {}
    for family in FAMILIES:
        models[family] = tiny_model(root / family, family, tok, T.QWEN3_VOCAB_SIZE, bos=151643, eos=151645,
                                    generation_eos=list(T.QWEN3_EOS_IDS))
        runs.start(family, models[family])
    yield models, runs
    runs.close()


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_keys_are_the_converters(family, qwen_models, tmp_path):
    models, runs = qwen_models
    vocab, _ = compare_with_converter(models[family], runs.gguf(family), T.QWEN3_VOCAB_SIZE, QWEN, tmp_path, "qwen2")
    assert vocab.pre_how == "chkhsh"


def test_padding_rows_added_tokens_and_special_ids(qwen_models, tmp_path):
    models, _ = qwen_models
    folder = models["qwen3"]
    (vocab, special), _ = ours(folder, T.QWEN3_VOCAB_SIZE, QWEN, tmp_path / "o.gguf", config=model_config(folder))
    first_free = T.QWEN3_N_RANKS + len(T.QWEN3_ADDED)
    assert vocab.tokens[first_free] == f"[PAD{first_free}]" and vocab.types[-1] == gguf.TokenType.UNUSED
    assert vocab.types[vocab.added["<think>"]] == gguf.TokenType.USER_DEFINED  # not special, does not look it
    assert vocab.types[vocab.added["<|fim_prefix|>"]] == gguf.TokenType.CONTROL  # not special, looks special
    assert vocab.types[vocab.added["<|im_end|>"]] == gguf.TokenType.CONTROL
    # config.json's bos_token_id fills what tokenizer_config leaves unset, as the converter reads it
    assert special.special_token_ids == {"eos": 151645, "pad": 151643, "bos": 151643}
    assert special.add_special_token == {"bos": False, "eos": False}
    assert vocab.eog_ids == (151643, 151645)  # <|endoftext|>, <|im_end|> (generation_config.json)


def test_added_tokens_in_the_padding_rows(qwen_models, tmp_path):
    """A fine-tune that added tokens within Qwen's 151,936 embedding rows (no resize needed): they
    take the place of [PAD] rows, with their types."""
    extra = (("<|tool|>", True), ("<reply>", False))
    folder = T.qwen3_tokenizer(tmp_path / "tok", extra_tokens=extra)
    (vocab, _), _ = ours(folder, T.QWEN3_VOCAB_SIZE, QWEN, tmp_path / "o.gguf")
    first = T.QWEN3_N_RANKS + len(T.QWEN3_ADDED)
    assert vocab.tokens[first:first + 3] == ["<|tool|>", "<reply>", f"[PAD{first + 2}]"]
    assert vocab.types[first:first + 3] == [gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED,
                                            gguf.TokenType.UNUSED]


def test_reduced_probe_gives_the_whole_tokenizers_ids(qwen_models):
    assert_probe_is_whole(qwen_models[0]["qwen3"])
