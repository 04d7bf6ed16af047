"""The GGUF vocabulary of byte-level BPE tokenizers (Llama 3.x here, GPT-OSS; Qwen in
test_vocab_qwen.py) against
llama.cpp's own converter: tiny random transformers models of each family with the real
tokenizers rebuilt offline (lora2gguf.testing.tokenizers) beside them, converted by
convert_hf_to_gguf.py; every tokenizer.* key write_vocab writes must be the converter's, byte for
byte. A tokenizer whose pre-tokenizer llama.cpp does not know is refused by the converter, by
doctor (a blocker, before any tensor is read) and by write_vocab."""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import gguf
import pytest

from lora2gguf import doctor
from lora2gguf.doctor.vocab_checks import check_vocab
from lora2gguf.errors import UnsupportedError
from lora2gguf.inspect import inspect_tokenizer
from lora2gguf.testing import tokenizers as T
from lora2gguf.vocab import read_vocab
from lora2gguf.vocab import pre as pre_mod
from vocab_family_models import (GPT_OSS, LLAMA, ReferenceRuns, assert_probe_is_whole, compare_with_converter,
                                 model_config, ours, tiny_model)

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

#: Llama 3's split regex with one quantifier changed: no llama.cpp pre-tokenizer is this
ODD_PATTERN = T.LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}{1,2}")


@pytest.fixture(scope="session")
def bpe_tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("bpe_tokenizers")
    return {
        "llama3": T.llama3_tokenizer(root / "llama3"),
        "odd": T.llama3_tokenizer(root / "odd", tokenizer_json_hook=lambda tj: T.with_split_pattern(tj, ODD_PATTERN)),
    }


# name -> (family, tokenizer, rows, bos, eos (config.json), generation_config eos, options, expected pre)
CASES = {
    "llama3": ("llama", "llama3", T.LLAMA3_VOCAB_SIZE, 128000, list(T.LLAMA3_EOS_IDS), None, LLAMA, "llama-bpe"),
}


@pytest.fixture(scope="session")
def bpe_models(tmp_path_factory, bpe_tokenizers, reference_llama_cpp):
    """The tiny models, and llama.cpp's converter started on each (results awaited by the tests)."""
    root = tmp_path_factory.mktemp("bpe_models")
    runs = ReferenceRuns(reference_llama_cpp, root)
    models = {}
    for name, (family, tok, rows, bos, eos, gen_eos, _, _) in CASES.items():
        models[name] = tiny_model(root / name, family, bpe_tokenizers[tok], rows, bos=bos, eos=eos,
                                  generation_eos=gen_eos)
        runs.start(name, models[name])
    models["odd"] = tiny_model(root / "odd", "llama", bpe_tokenizers["odd"], T.LLAMA3_VOCAB_SIZE, bos=128000,
                               eos=list(T.LLAMA3_EOS_IDS))
    runs.start("odd", models["odd"])
    yield models, runs
    runs.close()


@pytest.mark.parametrize("name", sorted(CASES))
def test_tokenizer_keys_are_the_converters(name, bpe_models, tmp_path):
    models, runs = bpe_models
    _, _, rows, _, _, _, options, expected_pre = CASES[name]
    vocab, _ = compare_with_converter(models[name], runs.gguf(name), rows, options, tmp_path, expected_pre)
    assert vocab.pre_how == "chkhsh" and vocab.model == "gpt2"


def test_llama3_special_tokens_and_end_of_generation(bpe_models, tmp_path):
    models, runs = bpe_models
    (vocab, special), _ = ours(models["llama3"], T.LLAMA3_VOCAB_SIZE, LLAMA, tmp_path / "o.gguf",
                               config=model_config(models["llama3"]))
    assert special.special_token_ids["bos"] == 128000 and special.special_token_ids["eos"] == 128009
    assert special.add_special_token["bos"] is True and special.add_special_token["eos"] is False
    # generation_config.json lists three: every one is reported, and llama.cpp stops at each
    assert vocab.eog_ids == T.LLAMA3_EOS_IDS
    assert [vocab.tokens[i] for i in vocab.eog_ids] == ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"]
    assert vocab.types[128000] == gguf.TokenType.CONTROL and vocab.types[1000] == gguf.TokenType.NORMAL
    llama_cpp = pytest.importorskip("llama_cpp")
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(runs.gguf("llama3")).encode(), params)
    assert model
    try:
        v = llama_cpp.llama_model_get_vocab(model)
        assert all(llama_cpp.llama_vocab_is_eog(v, i) for i in vocab.eog_ids)
        assert not llama_cpp.llama_vocab_is_eog(v, 128006)  # <|start_header_id|>
    finally:
        llama_cpp.llama_model_free(model)


def test_unknown_pre_tokenizer_is_refused(bpe_models, tmp_path):
    """A split regex no llama.cpp pre-tokenizer implements: llama.cpp's converter refuses it,
    write_vocab raises UnsupportedError naming the file, doctor makes it a blocker without
    reading any tensor data."""
    models, runs = bpe_models
    folder = models["odd"]
    assert "pre-tokenizer was not recognized" in runs.failure("odd")
    with pytest.raises(UnsupportedError, match=re.escape(str(folder / "tokenizer.json"))):
        ours(folder, T.LLAMA3_VOCAB_SIZE, LLAMA, tmp_path / "o.gguf")
    found = check_vocab(inspect_tokenizer(folder), model_config(folder), LLAMA)
    blocker = next(f for f in found if f.code == "TOKENIZER_PRE_UNKNOWN")
    assert blocker.severity == "blocker" and str(folder / "tokenizer.json") in blocker.what and blocker.fix
    assert blocker.data["pre"] is None and blocker.data["split_patterns"] == [ODD_PATTERN]
    # through doctor, with a PEFT adapter on that base: the blocker comes before any tensor is read
    pytest.importorskip("peft")
    adapter = _peft_adapter(folder, tmp_path / "adapter")
    report = doctor.run(folder, adapter, free_bytes=10**12)
    assert "TOKENIZER_PRE_UNKNOWN" in {f.code for f in report.blocking()}
    assert report.bytes_read["base_weights"] < 100_000 < report.bytes_read["base_weights_total"]


def _peft_adapter(base: Path, dest: Path) -> Path:
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False))
    pm.save_pretrained(dest)
    return dest


def test_gpt_oss_pre_tokenizer_by_hash(o200k_tokenizer_dir):
    vocab = read_vocab(o200k_tokenizer_dir, 201_088, GPT_OSS)
    assert (vocab.pre, vocab.pre_how, vocab.chkhsh) == (
        "gpt-4o", "chkhsh", "ccc2ef013c104be7bae2965776d611e1d7a8a2a9c547dd93a682c9a9fc80352e")
    (info,) = check_vocab(inspect_tokenizer(o200k_tokenizer_dir), {"vocab_size": 201_088}, GPT_OSS,
                          generation_config={"eos_token_id": [200002, 199999, 200012]})
    assert info.code == "TOKENIZER_VOCAB" and info.data["pre"] == "gpt-4o" and info.data["pre_how"] == "chkhsh"
    assert info.data["eog_tokens"] == ["<|endoftext|>", "<|return|>", "<|call|>"]


def test_reduced_probe_gives_the_whole_tokenizers_ids(bpe_tokenizers):
    """The pre-tokenizer hash is computed on tokenizer.json reduced to the pieces the text can
    reach: the same ids as the whole tokenizer (tokenizers), and the same hash as transformers."""
    assert_probe_is_whole(bpe_tokenizers["llama3"])


def test_add_bos_eos_flags_do_not_change_the_hash(bpe_tokenizers, tmp_path):
    """transformers 5's encode follows tokenizer.json's post-processor, not tokenizer_config.json's
    add_bos_token / add_eos_token: with both set the ids (hence llama.cpp's hash) stay llama-bpe's."""
    from transformers import AutoTokenizer

    folder = tmp_path / "tok"
    shutil.copytree(bpe_tokenizers["llama3"], folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps(dict(cfg, add_bos_token=True, add_eos_token=True)))
    ids = AutoTokenizer.from_pretrained(folder).encode(pre_mod.CHKTXT)
    assert ids[0] == 128000 and ids[-1] != 128009
    vocab = read_vocab(folder, T.LLAMA3_VOCAB_SIZE, LLAMA)
    assert vocab.chkhsh == pre_mod.hashlib.sha256(str(ids).encode()).hexdigest() and vocab.pre == "llama-bpe"


@pytest.mark.parametrize("pattern, name", [(p, n) for p, n in pre_mod.PRE_TOKENIZERS.items()])
def test_own_vocabulary_known_by_split_pattern(pattern, name, tmp_path):
    """A byte-level BPE of one's own (hash unknown) whose pre-tokenizer is exactly a llama.cpp
    one: named by the split pattern, which doctor reports (info); with any other pattern, refused."""
    tok_dir = synth_bpe(tmp_path / "tok", pattern)
    vocab = read_vocab(tok_dir, 300, GPT_OSS)
    assert (vocab.pre, vocab.pre_how) == (name, "split pattern") and vocab.chkhsh not in pre_mod.CHKHSH
    found = check_vocab(inspect_tokenizer(tok_dir), {"vocab_size": 300}, GPT_OSS)
    assert "TOKENIZER_PRE_BY_PATTERN" in {f.code for f in found}
    odd = synth_bpe(tmp_path / "odd", pattern.replace(r"\s+(?!\S)", r"\s+(?!\S\S)"))
    with pytest.raises(UnsupportedError):
        read_vocab(odd, 300, GPT_OSS)


def synth_bpe(folder: Path, pattern: str) -> Path:
    """A small byte-level BPE tokenizer trained by the tokenizers library with this split pattern."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=290, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([f"hello world {i} the quick brown fox" for i in range(200)], trainer)
    folder.mkdir(parents=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return folder


def test_pre_tokenizer_facts_are_the_converters(reference_llama_cpp):
    """CHKTXT and the hash -> name table are the ones in the reference converter's source."""
    src = (reference_llama_cpp / "conversion" / "base.py").read_text(encoding="utf-8")
    body = src[src.index("def get_vocab_base_pre"):src.index("# Marker: End get_vocab_base_pre")]
    text = eval(re.search(r"\n\s+chktxt = (.*)\n", body).group(1))  # a string literal
    assert text == pre_mod.CHKTXT
    assert pre_mod.hashlib.sha256(text.encode()).hexdigest() == pre_mod.CHKTXT_SHA256
    table = {}
    for h, name in re.findall(r'if chkhsh == "([0-9a-f]{64})":\n(?:\s*#.*\n)*\s*res = "([^"]+)"', body):
        table[h] = name  # a sequence of ifs: the last match wins
    assert body.count("if chkhsh ==") == len(re.findall(r'if chkhsh == "', body)) > 90
    assert table == pre_mod.CHKHSH


def test_merges_within_keeps_exactly_the_merges_that_join_into_a_piece():
    """Probe's merge filter (a set of each piece's splits) against the rule it stands for: a
    string merge is split at its first space, a pair is joined; kept iff the join is a piece."""
    subs = {"ab", "abc", "a", "b", "c", "x", "a x", "ĠĠ", "y z"}
    strings = ["a b", "ab c", "a bc", "b c", "a  x", " x", "x ", "Ġ Ġ", "y z", "y  z", "c a", "abc d", "ab", "a b c"]
    rule = [m for m in strings if (lambda a, _, b: a + b)(*m.partition(" ")) in subs]
    assert pre_mod._merges_within(strings, subs) == rule
    assert rule == ["a b", "ab c", "a bc", "a  x", " x", "x ", "Ġ Ġ", "y  z", "ab"]
    pairs = [["a", "b"], ["ab", "c"], ["y", " z"], ["c", "a"], ["y ", "z"]]
    assert pre_mod._merges_within(pairs, subs) == [["a", "b"], ["ab", "c"], ["y", " z"], ["y ", "z"]]


def test_inside_another_is_the_pairwise_rule():
    """Probe's test for an added token inside another text (one count per token over the texts
    joined) against the rule it stands for, on random short strings over a small alphabet,
    texts that are tokens themselves included."""
    rng = random.Random(3)

    def word(lo, hi):
        return "".join(rng.choice("ab<|>\x01") for _ in range(rng.randint(lo, hi)))

    for _ in range(5000):
        needles = [word(1, 4) for _ in range(rng.randint(0, 5))]
        texts = [word(0, 7) for _ in range(rng.randint(0, 5))] + rng.sample(needles, len(needles) // 2)
        rule = any(a in t and a != t for t in texts for a in needles)
        assert pre_mod._inside_another(needles, texts) == rule, (needles, texts)
    assert pre_mod._inside_another(["<|a|>"], ["x <|a|> y"]) and not pre_mod._inside_another(["<|a|>"], ["<|a|>"])
