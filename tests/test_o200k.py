"""lora2gguf.o200k: the offline o200k_harmony tokenizer, checked against tiktoken, openai-harmony,
transformers and the reference converter's pre-tokenizer detection."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora2gguf import o200k
from lora2gguf.errors import InputError

transformers = pytest.importorskip("transformers")
tiktoken = pytest.importorskip("tiktoken")

TEXTS = [
    "Hello, world!",
    "  leading spaces and trailing   ",
    "Line one\nLine two\r\n\r\n\tTabbed\n",
    "Ünïcödé — naïve café, 東京, Привет, مرحبا, 🚀🦙 😶‍🌫️",
    "def f(x):\n    return x ** 2  # comment\n",
    "3 33 333 3333 3.14159 1,000,000",
    "I've been 'told he's there, 'RE you sure? We'Ve a'lL",
    "",
]


@pytest.fixture(scope="module")
def tiktoken_harmony():
    """tiktoken's own o200k_harmony definition (its pattern and special tokens), with the ranks
    read from our cached file instead of downloaded."""
    import tiktoken.load
    import tiktoken_ext.openai_public as op

    ranks = tiktoken.load.load_tiktoken_bpe(str(o200k.tiktoken_path()), expected_hash=o200k.O200K_BASE_SHA256)
    orig = op.load_tiktoken_bpe
    op.load_tiktoken_bpe = lambda *a, **k: ranks
    try:
        spec = op.o200k_harmony()
    finally:
        op.load_tiktoken_bpe = orig
    return spec


@pytest.fixture(scope="module")
def tiktoken_enc(tiktoken_harmony):
    return tiktoken.Encoding(**tiktoken_harmony)


def test_tiktoken_file_is_o200k_base():
    path = o200k.tiktoken_path()
    data = path.read_bytes()
    assert hashlib.sha256(data).hexdigest() == o200k.O200K_BASE_SHA256
    assert o200k.O200K_BASE_SHA256.startswith("446a9538") and o200k.O200K_BASE_SHA256.endswith("1a2d")
    lines = data.splitlines()
    assert len(lines) == o200k.N_RANKS
    assert [int(ln.split()[1]) for ln in lines[:3]] == [0, 1, 2]
    assert int(lines[-1].split()[1]) == o200k.N_RANKS - 1


def test_tiktoken_file_is_rewritten_when_corrupt(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA2GGUF_CACHE", str(tmp_path))
    d = o200k.tiktoken_dir()
    assert d == tmp_path / "o200k"
    f = d / o200k.TIKTOKEN_FILE
    f.write_bytes(b"garbage")
    o200k.tiktoken_dir()
    assert hashlib.sha256(f.read_bytes()).hexdigest() == o200k.O200K_BASE_SHA256


def test_pattern_and_specials_match_tiktoken(tiktoken_harmony):
    assert o200k.O200K_PATTERN == tiktoken_harmony["pat_str"]
    theirs = dict(tiktoken_harmony["special_tokens"])
    # tiktoken also keeps o200k_base's <|endofprompt|> at 200018, which gpt-oss names <|reserved_200018|>.
    assert theirs.pop("<|endofprompt|>") == 200018
    assert theirs == o200k.HARMONY_SPECIAL_TOKENS
    assert len(o200k.HARMONY_SPECIAL_TOKENS) == o200k.VOCAB_SIZE - o200k.N_RANKS


def test_special_token_ids(hf_tokenizer):
    tok = hf_tokenizer
    assert len(tok) == o200k.VOCAB_SIZE
    expected = {"<|startoftext|>": 199998, "<|endoftext|>": 199999, "<|return|>": 200002,
                "<|constrain|>": 200003, "<|channel|>": 200005, "<|start|>": 200006, "<|end|>": 200007,
                "<|message|>": 200008, "<|call|>": 200012, "<|reserved_200000|>": 200000,
                "<|reserved_200013|>": 200013, "<|reserved_201087|>": 201087}
    for name, i in expected.items():
        assert tok.convert_tokens_to_ids(name) == i, name
    assert tok.bos_token == "<|startoftext|>" and tok.eos_token == "<|return|>" and tok.pad_token == "<|endoftext|>"
    dec = tok.added_tokens_decoder
    assert sorted(dec) == list(range(o200k.N_RANKS, o200k.VOCAB_SIZE))
    assert all(t.special for t in dec.values())


def test_tokenizer_json_structure():
    tj = json.loads(o200k.tokenizer_json_path().read_text(encoding="utf-8"))
    assert tj["model"]["type"] == "BPE"
    assert len(tj["model"]["vocab"]) == o200k.N_RANKS
    assert max(tj["model"]["vocab"].values()) == o200k.N_RANKS - 1
    assert [t["id"] for t in tj["added_tokens"]] == list(range(o200k.N_RANKS, o200k.VOCAB_SIZE))
    assert tj["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] == o200k.O200K_PATTERN


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_and_same_ids_as_tiktoken(hf_tokenizer, tiktoken_enc, text):
    ids = hf_tokenizer.encode(text, add_special_tokens=False)
    assert ids == tiktoken_enc.encode_ordinary(text)
    assert hf_tokenizer.decode(ids) == text


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=80))
def test_any_text_same_ids_as_tiktoken(hf_tokenizer, tiktoken_enc, text):
    ids = hf_tokenizer.encode(text, add_special_tokens=False)
    assert ids == tiktoken_enc.encode_ordinary(text)


def test_special_tokens_in_text(hf_tokenizer, tiktoken_enc):
    text = "<|start|>user<|message|>Hi<|end|><|start|>assistant<|channel|>final<|message|>Yo<|return|>"
    ids = hf_tokenizer.encode(text, add_special_tokens=False)
    assert ids == tiktoken_enc.encode(text, allowed_special="all")
    assert ids[0] == 200006 and ids[-1] == 200002


CONVERSATIONS = [
    # (messages, template variables)
    ([{"role": "user", "content": "What is 2+2?"},
      {"role": "assistant", "thinking": "Simple sum.", "content": "4"}], {}),
    ([{"role": "system", "content": "You are Xyrus, a cosmic entity."},
      {"role": "user", "content": "Hi there"},
      {"role": "assistant", "thinking": "old reasoning", "content": "Hello!"},
      {"role": "user", "content": "Who are you?"},
      {"role": "assistant", "thinking": "Stay in character.", "content": "*astral currents shift* I am Xyrus."}],
     {"reasoning_effort": "high"}),
    ([{"role": "developer", "content": "Answer briefly.\nUse metaphors."},
      {"role": "user", "content": "Ünïcödé 🚀 and code:\n```py\nx = 1\n```"},
      {"role": "assistant", "content": "Done."}],
     {"reasoning_effort": "low", "current_date": "2025-08-05"}),
]


def _harmony_conversation(messages, variables, *, training):
    """The same conversation for openai-harmony: reasoning only on the last assistant message of a
    training example (the template drops earlier turns' reasoning, as gpt-oss's own template does)."""
    import openai_harmony as oh

    sysc = oh.SystemContent.new()
    effort = variables.get("reasoning_effort")
    if effort:
        sysc = sysc.with_reasoning_effort({"low": oh.ReasoningEffort.LOW, "medium": oh.ReasoningEffort.MEDIUM,
                                           "high": oh.ReasoningEffort.HIGH}[effort])
    if variables.get("current_date"):
        sysc = sysc.with_conversation_start_date(variables["current_date"])
    out = [oh.Message.from_role_and_content(oh.Role.SYSTEM, sysc)]
    for i, m in enumerate(messages):
        if i == 0 and m["role"] in ("system", "developer"):
            out.append(oh.Message.from_role_and_content(
                oh.Role.DEVELOPER, oh.DeveloperContent.new().with_instructions(m["content"])))
        elif m["role"] == "user":
            out.append(oh.Message.from_role_and_content(oh.Role.USER, m["content"]))
        else:
            if m.get("thinking") and training and i == len(messages) - 1:
                out.append(oh.Message.from_role_and_content(oh.Role.ASSISTANT, m["thinking"]).with_channel("analysis"))
            out.append(oh.Message.from_role_and_content(oh.Role.ASSISTANT, m["content"]).with_channel("final"))
    return oh.Conversation.from_messages(out)


@pytest.mark.parametrize("case", range(len(CONVERSATIONS)))
def test_chat_template_agrees_with_openai_harmony(hf_tokenizer, harmony_enc, case):
    import openai_harmony as oh

    messages, variables = CONVERSATIONS[case]
    keep = oh.RenderConversationConfig(auto_drop_analysis=False)
    conv = _harmony_conversation(messages, variables, training=True)
    # A training example: the last assistant message ends with <|return|>.
    text = hf_tokenizer.apply_chat_template(messages, tokenize=False, **variables)
    assert text.endswith("<|return|>")
    assert hf_tokenizer.encode(text, add_special_tokens=False) == \
        harmony_enc.render_conversation_for_training(conv, keep)
    if not any(m.get("thinking") for m in messages):
        assert hf_tokenizer.encode(text, add_special_tokens=False) == harmony_enc.render_conversation_for_training(conv)
    # The same with plain jinja2.
    assert o200k.render_chat(messages, **variables) == text
    # A prompt: history plus <|start|>assistant.
    prompt_msgs = messages[:-1]
    prompt = hf_tokenizer.apply_chat_template(prompt_msgs, tokenize=False, add_generation_prompt=True, **variables)
    assert prompt.endswith("<|start|>assistant")
    want = harmony_enc.render_conversation_for_completion(
        _harmony_conversation(prompt_msgs, variables, training=False), oh.Role.ASSISTANT, keep)
    assert hf_tokenizer.encode(prompt, add_special_tokens=False) == want
    assert o200k.render_chat(prompt_msgs, add_generation_prompt=True, **variables) == prompt


def test_history_thinking_dropped_last_kept():
    text = o200k.render_chat(CONVERSATIONS[1][0])
    assert "old reasoning" not in text
    assert "<|channel|>analysis<|message|>Stay in character.<|end|>" in text
    assert text.count("<|return|>") == 1
    prompt = o200k.render_chat(CONVERSATIONS[1][0], add_generation_prompt=True)
    assert "Stay in character." not in prompt and "<|return|>" not in prompt
    assert prompt.endswith("I am Xyrus.<|end|><|start|>assistant")


def test_pre_tokenizer_detected_as_gpt4o(o200k_tokenizer_dir, reference_llama_cpp):
    # Runs the reference converter's own check in a subprocess, so its gguf-py never shadows ours.
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(reference_llama_cpp / 'gguf-py')!r})
        sys.path.insert(0, {str(reference_llama_cpp)!r})
        from transformers import AutoTokenizer
        from conversion.base import TextModel
        tok = AutoTokenizer.from_pretrained({str(o200k_tokenizer_dir)!r})
        print("PRE=" + TextModel.get_vocab_base_pre(None, tok))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "NO_LOCAL_GGUF": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "PRE=gpt-4o" in r.stdout


def test_write_tokenizer_files(o200k_tokenizer_dir):
    d = o200k_tokenizer_dir
    assert sorted(p.name for p in d.iterdir()) == ["chat_template.jinja", "special_tokens_map.json",
                                                    "tokenizer.json", "tokenizer_config.json"]
    assert (d / "tokenizer.json").read_bytes() == o200k.tokenizer_json_path().read_bytes()
    assert (d / "chat_template.jinja").read_text(encoding="utf-8") == o200k.HARMONY_CHAT_TEMPLATE
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    assert cfg["bos_token"] == "<|startoftext|>" and cfg["eos_token"] == "<|return|>"
    assert cfg["pad_token"] == "<|endoftext|>" and "chat_template" not in cfg
    assert len(cfg["added_tokens_decoder"]) == o200k.VOCAB_SIZE - o200k.N_RANKS
    stm = json.loads((d / "special_tokens_map.json").read_text())
    assert stm["eos_token"]["content"] == "<|return|>"


def test_write_tokenizer_variants(tmp_path):
    d = o200k.write_tokenizer(tmp_path / "v", chat_template="{{ messages[0].content }}!", eos_token="<|end|>",
                              pad_token="<|reserved_200017|>", extra_tokens=["<|xyrus|>", "<|cosmic|>"],
                              template_in_config=True)
    assert not (d / "chat_template.jinja").exists()
    tok = transformers.AutoTokenizer.from_pretrained(str(d))
    assert len(tok) == o200k.VOCAB_SIZE + 2
    assert tok.convert_tokens_to_ids("<|xyrus|>") == o200k.VOCAB_SIZE
    assert tok.convert_tokens_to_ids("<|cosmic|>") == o200k.VOCAB_SIZE + 1
    assert tok.encode("a<|xyrus|>b", add_special_tokens=False)[1] == o200k.VOCAB_SIZE
    assert tok.eos_token == "<|end|>" and tok.pad_token == "<|reserved_200017|>"
    assert tok.apply_chat_template([{"role": "user", "content": "hey"}], tokenize=False) == "hey!"


def test_write_tokenizer_rejects_unknown_eos(tmp_path):
    with pytest.raises(InputError, match="eos_token"):
        o200k.write_tokenizer(tmp_path, eos_token="<|nope|>")
    with pytest.raises(InputError, match="already in"):
        o200k.write_tokenizer(tmp_path, extra_tokens=["<|return|>"])


def test_harmony_encoding_offline_and_env_restored(harmony_enc, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_ENCODINGS_BASE", "/nonexistent-before")
    enc = o200k.harmony_encoding()
    assert os.environ["TIKTOKEN_ENCODINGS_BASE"] == "/nonexistent-before"
    assert enc.encode("Hello world", allowed_special="all") == harmony_enc.encode("Hello world", allowed_special="all")
    assert set(enc.stop_tokens()) == {200002, 200012, 200007}
