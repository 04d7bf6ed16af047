"""Resized vocabularies: a chat fine-tune that added tokens and resized its embeddings. write_vocab
is called with the number of embedding rows the GGUF will have: with the resized rows the added
tokens are written as llama.cpp's converter writes them (byte for byte, for a BPE tokenizer.json
and a SentencePiece tokenizer.model with added_tokens.json); with the base's rows a token id past
them is an InputError naming the file and the id, and a doctor blocker."""

from __future__ import annotations

import re

import gguf
import pytest

from lora2gguf.doctor.vocab_checks import check_vocab
from lora2gguf.errors import InputError
from lora2gguf.inspect import inspect_tokenizer
from lora2gguf.testing import tokenizers as T
from lora2gguf.vocab import read_vocab
from vocab_family_models import LLAMA, ReferenceRuns, compare_with_converter, tiny_model

pytest.importorskip("transformers")
pytest.importorskip("sentencepiece")

# added by the fine-tune: a special token, and a user-defined one with SentencePiece's word mark
LLAMA3_EXTRA = (("<|im_start|>", True), ("<|im_end|>", True), ("\u2581tool", False))
SPM_ROWS = 512
SPM_EXTRA = {"<pad>": (SPM_ROWS, True), "\u2581<sep>": (SPM_ROWS + 1, False)}

CASES = {
    # name -> (file named in the error, base rows, resized rows)
    "llama3": ("tokenizer.json", T.LLAMA3_VOCAB_SIZE, T.LLAMA3_VOCAB_SIZE + len(LLAMA3_EXTRA)),
    "llama2": ("tokenizer_config.json", SPM_ROWS, SPM_ROWS + len(SPM_EXTRA)),
}


@pytest.fixture(scope="session")
def resized_models(tmp_path_factory, reference_llama_cpp):
    root = tmp_path_factory.mktemp("resized")
    runs = ReferenceRuns(reference_llama_cpp, root)
    tok = T.llama3_tokenizer(root / "tok_llama3", extra_tokens=LLAMA3_EXTRA)
    models = {"llama3": tiny_model(root / "llama3", "llama", tok, CASES["llama3"][2], bos=128000,
                                   eos=list(T.LLAMA3_EOS_IDS))}
    runs.start("llama3", models["llama3"])
    tok = T.sentencepiece_tokenizer(root / "tok_llama2", vocab_size=SPM_ROWS, added_tokens=SPM_EXTRA,
                                    added_tokens_json=True)
    models["llama2"] = tiny_model(root / "llama2", "llama", tok, CASES["llama2"][2], bos=1, eos=2)
    runs.start("llama2", models["llama2"])
    yield models, runs
    runs.close()


@pytest.mark.parametrize("name", sorted(CASES))
def test_resized_rows_are_the_converters(name, resized_models, tmp_path):
    models, runs = resized_models
    _, _, rows = CASES[name]
    pre = "llama-bpe" if name == "llama3" else "default"
    vocab, _ = compare_with_converter(models[name], runs.gguf(name), rows, LLAMA, tmp_path, pre)
    base_rows = CASES[name][1]
    if name == "llama3":
        assert vocab.tokens[base_rows:] == ["<|im_start|>", "<|im_end|>", " tool"]
        assert vocab.types[base_rows:] == [gguf.TokenType.CONTROL, gguf.TokenType.CONTROL,
                                           gguf.TokenType.USER_DEFINED]
    else:
        assert vocab.tokens[base_rows:] == ["<pad>", " <sep>"]
        assert vocab.types[base_rows:] == [gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED]
        assert vocab.scores[base_rows:] == [-1000.0, -1000.0]


@pytest.mark.parametrize("name", sorted(CASES))
def test_base_rows_refuse_the_added_ids(name, resized_models):
    models, _ = resized_models
    folder = models[name]
    file, base_rows, rows = CASES[name]
    with pytest.raises(InputError, match=re.escape(str(folder / file)) + f".*token id {rows - 1}"):
        read_vocab(folder, base_rows, LLAMA)
    config = {"vocab_size": base_rows}
    found = check_vocab(inspect_tokenizer(folder), config, LLAMA)
    too_large = [f for f in found if f.code == "TOKENIZER_TOO_LARGE"]
    assert too_large and too_large[0].severity == "blocker" and too_large[0].data["ids_past_end"][-1] == rows - 1
    # the adapter carries resized embeddings: the GGUF's rows are its, and the size is not a problem
    assert not any(f.code == "TOKENIZER_TOO_LARGE" for f in check_vocab(inspect_tokenizer(folder), config, LLAMA,
                                                                      resized=True))
