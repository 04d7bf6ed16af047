"""Which reference verify compares against, and why (pure decisions; no model is loaded)."""

from __future__ import annotations

import pytest

from lora2gguf.errors import InputError, UnsupportedError
from lora2gguf.verify import logits as L

GiB = 2**30


@pytest.fixture
def dirs(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "adapter").mkdir()
    return str(tmp_path / "base"), str(tmp_path / "adapter")


def choose(dirs, mode="auto", n_params=1_000_000, memory=16 * GiB, fallback="m-BF16.gguf"):
    return L.choose_reference(mode, n_params=n_params, base_dir=dirs[0], adapter_dir=dirs[1],
                              fallback_file=fallback, n_tokens=400, vocab_size=201088, memory=memory)


def test_peft_in_float32_when_it_fits(dirs, monkeypatch):
    monkeypatch.setattr(L, "_have_reference_stack", lambda: None)
    r = choose(dirs)
    assert (r.kind, r.dtype) == ("peft", "float32") and "GiB available" in r.reason


def test_bfloat16_when_only_that_fits(dirs, monkeypatch):
    monkeypatch.setattr(L, "_have_reference_stack", lambda: None)
    # 3e9 params: 13.4 GiB in float32 (too much for 0.75 * 16 GiB), 6.7 GiB in bfloat16
    r = choose(dirs, n_params=3_000_000_000)
    assert (r.kind, r.dtype) == ("peft", "bfloat16")


def test_gguf_when_the_fine_tune_does_not_fit(dirs, monkeypatch):
    monkeypatch.setattr(L, "_have_reference_stack", lambda: None)
    r = choose(dirs, n_params=21_000_000_000, memory=24 * GiB)
    assert (r.kind, r.file) == ("gguf", "m-BF16.gguf")
    assert "GiB" in r.reason and "m-BF16.gguf" in r.reason and r.label == "m-BF16.gguf (llama.cpp)"


def test_gguf_when_torch_stack_missing(dirs, monkeypatch):
    monkeypatch.setattr(L, "_have_reference_stack", lambda: "peft")
    r = choose(dirs)
    assert r.kind == "gguf" and "peft not installed" in r.reason
    with pytest.raises(UnsupportedError, match="peft not installed"):
        choose(dirs, mode="peft")


def test_gguf_when_inputs_moved(tmp_path, monkeypatch):
    monkeypatch.setattr(L, "_have_reference_stack", lambda: None)
    r = choose((str(tmp_path / "gone"), str(tmp_path)))
    assert r.kind == "gguf" and "base folder" in r.reason


def test_gguf_asked_for_and_no_unquantized_file(dirs):
    assert choose(dirs, mode="gguf").kind == "gguf"
    with pytest.raises(InputError, match="no BF16/F16/F32 GGUF"):
        choose(dirs, mode="gguf", fallback=None)
    with pytest.raises(InputError, match="auto, peft or gguf"):
        choose(dirs, mode="best")


def test_ctx_size_rounds_up():
    assert [L.ctx_size(n) for n in (1, 256, 257, 700)] == [256, 256, 512, 768]


def test_declared_stop_tokens_from_metadata_text():
    meta = {"tokenizer.ggml.eos_token_id": "200002", "tokenizer.ggml.eot_token_id": "-1",
            "tokenizer.ggml.bos_token_id": "199998"}
    assert L.declared_stop_tokens(meta) == {"eos": 200002}
