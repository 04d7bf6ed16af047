"""The GGUF vocabulary of SentencePiece tokenizers (Llama 2, Mistral v0.1-v0.3) against
llama.cpp's own converter: a BPE tokenizer.model trained by sentencepiece (byte fallback,
<unk> <s> </s>, Mistral's control tokens) with the tokenizer.json transformers converts from it
and the repositories' tokenizer_config.json, beside tiny random LlamaForCausalLM and
MistralForCausalLM models. tokenizer.model wins over tokenizer.json (the converter's order for the
Llama family); a tokenizer.model that is not one is a FormatError naming it, and a doctor blocker."""

from __future__ import annotations

import json
import re
import shutil

import gguf
import pytest

from lora2gguf import doctor
from lora2gguf.doctor.vocab_checks import check_vocab
from lora2gguf.errors import FormatError, UnsupportedError
from lora2gguf.inspect import inspect_tokenizer
from lora2gguf.testing import tokenizers as T
from lora2gguf.vocab import read_vocab, tokenizer_kind, write_vocab
from vocab_family_models import (GPT_OSS, LLAMA, QWEN, ReferenceRuns, compare_with_converter, model_config, ours,
                                 tiny_model)

pytest.importorskip("sentencepiece")
pytest.importorskip("transformers")

ROWS = 512
FAMILY = {"llama2": "llama", "mistral": "mistral"}


@pytest.fixture(scope="session")
def spm_models(tmp_path_factory, reference_llama_cpp):
    root = tmp_path_factory.mktemp("spm")
    runs = ReferenceRuns(reference_llama_cpp, root)
    models = {}
    for style, family in FAMILY.items():
        tok = T.sentencepiece_tokenizer(root / f"tok_{style}", style=style, vocab_size=ROWS)
        models[style] = tiny_model(root / style, family, tok, ROWS, bos=1, eos=2, tie=False)
        runs.start(style, models[style])
    yield models, runs
    runs.close()


@pytest.mark.parametrize("style", sorted(FAMILY))
def test_tokenizer_keys_are_the_converters(style, spm_models, tmp_path):
    models, runs = spm_models
    vocab, special = compare_with_converter(models[style], runs.gguf(style), ROWS, LLAMA, tmp_path, "default")
    assert vocab.kind == "sentencepiece" and vocab.model == "llama" and vocab.scores is not None
    assert special.special_token_ids == {"bos": 1, "eos": 2, "unk": 0}
    assert special.add_special_token["bos"] is True and special.add_special_token["eos"] is False


def test_scores_and_types(spm_models):
    import sentencepiece

    models, _ = spm_models
    folder = models["mistral"]
    sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    vocab = read_vocab(folder, ROWS, LLAMA)
    # added_tokens_decoder marks <unk> <s> </s> and [INST]... special: control, score -1000
    assert vocab.tokens[:5] == ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"]
    assert vocab.types[:10] == [gguf.TokenType.CONTROL] * 10 and vocab.scores[:10] == [-1000.0] * 10
    first_byte = 3 + len(T.MISTRAL_CONTROL)
    assert vocab.tokens[first_byte] == "<0x00>" and vocab.types[first_byte] == gguf.TokenType.BYTE
    normal = max(i for i in range(first_byte + 256, ROWS) if vocab.types[i] == gguf.TokenType.NORMAL)
    assert vocab.scores[normal] == sp.GetScore(normal) < 0 and vocab.tokens[normal] == sp.IdToPiece(normal)


def test_tokenizer_model_wins_over_tokenizer_json(spm_models):
    """The folder has both files: the Llama and Qwen families try SentencePiece first, as the
    converter does; a family that only knows tokenizer.json (GPT-OSS) reads tokenizer.json, whose
    Metaspace pre-tokenizer llama.cpp's BPE does not know."""
    folder = spm_models[0]["llama2"]
    assert (folder / "tokenizer.json").is_file() and (folder / "tokenizer.model").is_file()
    assert tokenizer_kind(folder, LLAMA) == tokenizer_kind(folder, QWEN) == "sentencepiece"
    assert tokenizer_kind(folder, GPT_OSS) == "bpe"
    with pytest.raises(UnsupportedError, match=re.escape(str(folder / "tokenizer.json"))):
        read_vocab(folder, ROWS, GPT_OSS)


GARBAGE = {
    "random bytes": bytes(range(256)) * 8,
    "empty": b"",
    "JSON": b'{"model": {"type": "BPE"}}',
    "tiktoken ranks": b"IQ== 0\nIg== 1\nIw== 2\nJA== 3\n",
}


@pytest.mark.parametrize("kind", sorted(GARBAGE))
def test_a_tokenizer_model_that_is_not_one(kind, spm_models, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(spm_models[0]["llama2"], folder)
    (folder / "tokenizer.model").write_bytes(GARBAGE[kind])
    path = str(folder / "tokenizer.model")
    with pytest.raises(FormatError, match=re.escape(path) + ": not a SentencePiece model") as e:
        write_vocab(gguf.GGUFWriter(None, "llama"), folder, ROWS, LLAMA)
    assert e.value.__cause__ is None and e.value.__context__ is None  # no chained traceback
    if kind == "tiktoken ranks":
        assert "tiktoken rank file" in str(e.value)
    found = check_vocab(inspect_tokenizer(folder), model_config(folder), LLAMA)
    assert [(f.code, f.severity) for f in found] == [("TOKENIZER_INVALID", "blocker")] and path in found[0].what


def test_doctor_blocks_a_broken_tokenizer_model_before_reading_tensors(spm_models, tmp_path):
    pytest.importorskip("peft")
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    base = tmp_path / "base"
    shutil.copytree(spm_models[0]["llama2"], base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"],
                                                   init_lora_weights=False))
    pm.save_pretrained(tmp_path / "adapter")
    (base / "tokenizer.model").write_bytes(b"not a model")
    report = doctor.run(base, tmp_path / "adapter", free_bytes=10**12)
    invalid = [f for f in report.blocking() if f.code == "TOKENIZER_INVALID"]
    assert invalid and str(base / "tokenizer.model") in invalid[0].what
    assert report.bytes_read["base_weights"] < 10_000


def test_transformers_5_save_without_tokenizer_model(spm_models, tmp_path):
    """transformers 5's save_pretrained writes tokenizer.json without tokenizer.model; llama.cpp's
    converter would write that with every score -1000 (LlamaHfVocab): refused with what to do."""
    from transformers import AutoTokenizer

    saved = tmp_path / "adapter_tokenizer"
    AutoTokenizer.from_pretrained(spm_models[0]["llama2"]).save_pretrained(saved)
    assert not (saved / "tokenizer.model").exists() and (saved / "tokenizer.json").is_file()
    assert tokenizer_kind(saved, LLAMA) == "llama_hf"
    with pytest.raises(UnsupportedError, match="Copy tokenizer.model from the base model folder"):
        read_vocab(saved, ROWS, LLAMA)
    found = check_vocab(inspect_tokenizer(saved), {"vocab_size": ROWS}, LLAMA)
    assert [f.code for f in found] == ["TOKENIZER_SENTENCEPIECE_MISSING"] and found[0].severity == "blocker"
    shutil.copy(spm_models[0]["llama2"] / "tokenizer.model", saved)  # the fix it names
    assert read_vocab(saved, ROWS, LLAMA).kind == "sentencepiece"


def test_inspect_reads_a_sentencepiece_only_folder(spm_models, tmp_path):
    folder = tmp_path / "tok"
    folder.mkdir()
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(spm_models[0]["mistral"] / name, folder / name)
    info = inspect_tokenizer(folder)
    assert info.errors == [] and info.model.model_type == "SentencePiece"
    assert info.model.size == ROWS and info.token_id("[INST]") == 3 and info.is_special("[INST]")
    (vocab, _), _ = ours(folder, ROWS, LLAMA, tmp_path / "o.gguf", config=model_config(spm_models[0]["mistral"]))
    assert vocab.tokens[3] == "[INST]" and vocab.eog_ids == (2,)
    found = check_vocab(info, {"vocab_size": ROWS}, LLAMA)
    assert [f.code for f in found] == ["TOKENIZER_VOCAB"] and "tokenizer.ggml.model llama" in found[0].what


def test_doctor_reports_which_file_wins(spm_models):
    folder = spm_models[0]["llama2"]
    found = check_vocab(inspect_tokenizer(folder), model_config(folder), LLAMA, generation_config={"eos_token_id": 2})
    (info,) = found
    assert info.code == "TOKENIZER_VOCAB" and info.data["kind"] == "sentencepiece"
    assert info.data["file"] == str(folder / "tokenizer.model") and "not tokenizer.json" in info.what
    assert info.data["eog_ids"] == [2] and info.data["eog_tokens"] == ["</s>"]


def test_sentencepiece_only_base_against_a_tokenizer_json_adapter(spm_models, tmp_path):
    """A base with tokenizer.model alone, an adapter whose tokenizer transformers 5 re-saved as
    tokenizer.json: the pieces and ids agree, so doctor sees no mismatch (no merges or
    text-processing settings to compare on the SentencePiece side)."""
    from transformers import AutoTokenizer

    from lora2gguf.doctor.tokenizer_diff import decide

    base = tmp_path / "base"
    base.mkdir()
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(spm_models[0]["llama2"] / name, base / name)
    adapter = tmp_path / "adapter"
    AutoTokenizer.from_pretrained(spm_models[0]["llama2"]).save_pretrained(adapter)
    d = decide(inspect_tokenizer(base), inspect_tokenizer(adapter), model_vocab=ROWS)
    assert d.diff is not None and d.diff.n_changed_ids == 0 and d.diff.merges["same"]
    assert "TOKENIZER_MISMATCH" not in {f.code for f in d.findings}
    # and the adapter's would be refused for its missing tokenizer.model (the base has it)
    assert [f.code for f in check_vocab(inspect_tokenizer(adapter), {"vocab_size": ROWS}, LLAMA)] == [
        "TOKENIZER_SENTENCEPIECE_MISSING"]


def test_family_options_write_their_keys(spm_models, tmp_path):
    """The per-family differences are options: add_space_prefix from tokenizer_config (the Llama
    family), a forced add_space_prefix (Gemma) or add_bos (Llama at 49,152 tokens), fixed special
    ids unless tokenizer_config names one (CodeLlama, CodeGemma)."""
    from gguf_kv_spans import decode

    from lora2gguf.vocab import VocabOptions

    folder = tmp_path / "tok"
    shutil.copytree(spm_models[0]["llama2"], folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps(dict(cfg, add_prefix_space=False)))

    def keys(options):
        _, spans = ours(folder, ROWS, options, tmp_path / f"o{len(list(tmp_path.iterdir()))}.gguf")
        return {k: decode(*v) for k, v in spans.items() if not k.startswith(("tokenizer.ggml.tokens",
                "tokenizer.ggml.scores", "tokenizer.ggml.token_type", "tokenizer.chat_template"))}

    assert keys(LLAMA)["tokenizer.ggml.add_space_prefix"] is False
    assert "tokenizer.ggml.add_space_prefix" not in keys(QWEN)
    forced = keys(VocabOptions(kinds=("sentencepiece",), space_prefix=True, add_bos=False,
                               fixed_special_ids={"eot": 4, "pad": 3}))
    assert forced["tokenizer.ggml.add_space_prefix"] is True and forced["tokenizer.ggml.add_bos_token"] is False
    assert forced["tokenizer.ggml.eot_token_id"] == 4 and forced["tokenizer.ggml.padding_token_id"] == 3
    (folder / "tokenizer_config.json").write_text(json.dumps(dict(cfg, eot_token="</s>")))
    named = keys(VocabOptions(kinds=("sentencepiece",), fixed_special_ids={"eot": 4}))
    assert named["tokenizer.ggml.eot_token_id"] == 2  # tokenizer_config's eot_token wins over the fixed id
