"""Test helpers for the vocabulary tests: tiny random transformers models of each family with a
tokenizer folder beside them, llama.cpp's converter run on them (several at once, in the
background), and the ``tokenizer.*`` keys of a GGUF file or of what write_vocab writes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping

import gguf

from gguf_kv_spans import decode, first_difference, kv_spans, writer_kv_spans
from lora2gguf.vocab import VocabOptions, write_vocab

# the options the family modules pass (llama.cpp's converter: LlamaModel.set_vocab tries
# SentencePiece, then LlamaHfVocab, then GPT-2 BPE, and writes add_prefix_space; Qwen2Model
# tries SentencePiece, then BPE)
LLAMA = VocabOptions(kinds=("sentencepiece", "llama_hf", "bpe"), space_prefix_from_config=True)
QWEN = VocabOptions(kinds=("sentencepiece", "bpe"))
GPT_OSS = VocabOptions()

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=1024)


def tiny_model(dest: Path, family: str, tokenizer_dir: Path, vocab_size: int, *, bos: int | None,
               eos: int | list[int], generation_eos: int | list[int] | None = None, tie: bool = True) -> Path:
    """A random ``family`` model (Llama, Mistral, Qwen2, Qwen3; hidden 64, 2 layers) of
    ``vocab_size`` rows saved by transformers in bfloat16, the tokenizer files of
    ``tokenizer_dir`` beside it, and a generation_config.json."""
    import torch
    import transformers as T

    classes = {"llama": (T.LlamaConfig, T.LlamaForCausalLM), "mistral": (T.MistralConfig, T.MistralForCausalLM),
               "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM), "qwen3": (T.Qwen3Config, T.Qwen3ForCausalLM)}
    config_cls, model_cls = classes[family]
    extra = {"head_dim": 16} if family == "qwen3" else {}
    cfg = config_cls(vocab_size=vocab_size, bos_token_id=bos, eos_token_id=eos, tie_word_embeddings=tie,
                     **SMALL, **extra)
    torch.manual_seed(0)
    model = model_cls(cfg).to(torch.bfloat16)
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)
    for f in Path(tokenizer_dir).iterdir():
        if f.is_file():
            shutil.copy(f, dest / f.name)
    gen = {"bos_token_id": bos, "eos_token_id": eos if generation_eos is None else generation_eos}
    (dest / "generation_config.json").write_text(json.dumps(gen))
    return dest


class ReferenceRuns:
    """llama.cpp's convert_hf_to_gguf.py (``--outtype bf16``) on several model folders at once."""

    def __init__(self, ref: Path, out_dir: Path):
        self.ref, self.out_dir = ref, out_dir
        self.procs: dict[str, tuple[subprocess.Popen, Path]] = {}
        self.done: dict[str, tuple[int, str]] = {}

    def start(self, name: str, model_dir: Path) -> None:
        env = dict(os.environ, PYTHONPATH=str(self.ref / "gguf-py"), NO_LOCAL_GGUF="")
        out = self.out_dir / f"{name}.gguf"
        proc = subprocess.Popen([sys.executable, str(self.ref / "convert_hf_to_gguf.py"), str(model_dir),
                                 "--outfile", str(out), "--outtype", "bf16"], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.procs[name] = (proc, out)

    def _wait(self, name: str) -> tuple[int, str]:
        if name not in self.done:
            proc, _ = self.procs[name]
            output, _ = proc.communicate(timeout=600)
            self.done[name] = (proc.returncode, output)
        return self.done[name]

    def gguf(self, name: str) -> Path:
        rc, output = self._wait(name)
        assert rc == 0, output[-3000:]
        return self.procs[name][1]

    def failure(self, name: str) -> str:
        rc, output = self._wait(name)
        assert rc != 0, f"llama.cpp's converter accepted {name}"
        return output

    def close(self) -> None:
        for proc, _ in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def tokenizer_keys(spans: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in spans.items() if k.startswith("tokenizer.")}


def ours(folder: Path, vocab_size: int, options: VocabOptions, tmp: Path, *, config=None, generation_config=None,
         arch: str = "llama"):
    """(write_vocab's result, the key spans it writes into a gguf-py GGUFWriter)."""
    writer = gguf.GGUFWriter(None, arch)
    result = write_vocab(writer, folder, vocab_size, options, config=config, generation_config=generation_config)
    return result, writer_kv_spans(writer, tmp)


def assert_same_tokenizer_keys(our_spans: Mapping[str, Any], ref_spans: Mapping[str, Any]) -> None:
    """Every tokenizer.* key the converter wrote, and no other, with the same type and bytes."""
    mine, theirs = tokenizer_keys(our_spans), tokenizer_keys(ref_spans)
    assert set(mine) == set(theirs), (sorted(set(mine) - set(theirs)), sorted(set(theirs) - set(mine)))
    for key in sorted(theirs):
        assert mine[key] == theirs[key], f"{key}: {first_difference(mine[key], theirs[key])}"
    # write_vocab touches no general.* key
    assert not any(k.startswith("general.") and k != "general.architecture" for k in our_spans)


def model_config(model_dir: Path) -> dict:
    return json.loads((Path(model_dir) / "config.json").read_text())


def compare_with_converter(model_dir: Path, ref_gguf: Path, rows: int, options: VocabOptions, tmp: Path,
                           expected_pre: str):
    """write_vocab on the tokenizer files of ``model_dir`` as an adapter folder has them (no
    config.json beside them: the base's is passed) against the converter's GGUF of that model:
    the same tokenizer.* keys, byte for byte, and the pre-tokenizer the converter named."""
    ref = kv_spans(ref_gguf)
    assert decode(*ref["tokenizer.ggml.pre"]) == expected_pre  # what llama.cpp's converter names it
    tok_dir = tmp / "tokenizer"
    tok_dir.mkdir()
    for f in Path(model_dir).iterdir():
        if f.name.startswith(("tokenizer", "special_tokens_map", "added_tokens")):
            shutil.copy(f, tok_dir / f.name)
    (vocab, special), mine = ours(tok_dir, rows, options, tmp / "ours.gguf", config=model_config(model_dir),
                                  arch=decode(*ref["general.architecture"]))
    assert vocab.pre == expected_pre
    assert_same_tokenizer_keys(mine, ref)
    assert len(vocab.tokens) == rows
    return vocab, special


def assert_probe_is_whole(folder: Path) -> None:
    """The reduced tokenizer the pre-tokenizer hash is computed on gives the ids of the whole
    tokenizer (tokenizers) and the hash transformers' encode gives; each added token comes back
    from decode(encode()) as the whole tokenizer gives it."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from lora2gguf.vocab import load_tokenizer_json
    from lora2gguf.vocab import pre as pre_mod

    data = load_tokenizer_json(folder)
    added = [e["content"] for e in data["added_tokens"]]
    probe = pre_mod.Probe(data, folder / "tokenizer.json", added)
    whole = Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert len(probe.tokenizer.get_vocab()) < 5000 < len(whole.get_vocab())
    assert probe.ids(pre_mod.CHKTXT) == whole.encode(pre_mod.CHKTXT).ids
    for text in added:
        assert probe.roundtrip(text) == whole.decode(whole.encode(text, add_special_tokens=False).ids,
                                                     skip_special_tokens=False) == text
    hf = AutoTokenizer.from_pretrained(folder)
    assert pre_mod.chkhsh(probe) == pre_mod.hashlib.sha256(str(hf.encode(pre_mod.CHKTXT)).encode()).hexdigest()


__all__ = ["LLAMA", "QWEN", "GPT_OSS", "ReferenceRuns", "assert_probe_is_whole", "assert_same_tokenizer_keys",
           "compare_with_converter",
           "kv_spans", "model_config", "ours", "tiny_model", "tokenizer_keys"]
