"""Chat formats (lora2gguf.chat): the model's own Jinja template rendered exactly as transformers'
``apply_chat_template`` renders it, completions parsed (finished, cut off, reasoning blocks),
known template families identified, their Ollama templates rendering the same text (checked with
tests/gotemplate.py, an interpreter of Go's text/template), doctor's turn-end trap, and the
Modelfile per format. Harmony's render/parse tests are in test_verify_suite.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from lora2gguf import arch
from lora2gguf.chat import Message, chat_format, tokenizer_facts
from lora2gguf.chat.jinja import JinjaFormat, TemplateRenderError, _strip_bos, render
from lora2gguf.doctor import checks
from lora2gguf.doctor import findings as F
from lora2gguf.inspect import inspect_tokenizer

import chat_templates as T
from gotemplate import ollama_data, render as go_render

transformers = pytest.importorskip("transformers")

CONVERSATIONS = {
    "one question": [{"role": "user", "content": "What is 2+2?"}],
    "system and turns": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Hello! How can I help?"},
                         {"role": "user", "content": " Tell me a joke. "}],
    "turns": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
              {"role": "user", "content": "Bye"}],
    "answered with reasoning": [{"role": "user", "content": "2+2?"},
                                {"role": "assistant", "content": "<think>\nadd\n</think>\n\nIt is 4."}],
    "wrong order": [{"role": "assistant", "content": "Hello"}, {"role": "assistant", "content": "again"}],
}


@pytest.fixture(scope="session")
def word_tokenizers(tmp_path_factory):
    """name -> transformers tokenizer (word-level, every special token the templates use) with that
    template and its model's special tokens."""
    root = tmp_path_factory.mktemp("word_tokenizers")
    out = {}
    for name, (tpl, sp, _) in T.TEMPLATES.items():
        d = T.word_tokenizer_dir(root / name, template=tpl, specials=sp)
        out[name] = transformers.AutoTokenizer.from_pretrained(str(d))
    return out


def _hf(tok, messages, gen, **kw):
    try:
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen, **kw)
    except Exception as e:  # jinja2's TemplateError, as the template raised it
        return f"raises {type(e).__name__}"


def _ours(fmt, messages, gen, **kw):
    try:
        return fmt.render_messages(messages, add_generation_prompt=gen, **kw)
    except TemplateRenderError:
        return "raises TemplateError"


@pytest.mark.parametrize("name", list(T.TEMPLATES))
def test_rendering_equals_apply_chat_template(word_tokenizers, name):
    tpl, sp, _ = T.TEMPLATES[name]
    fmt = JinjaFormat(tpl, sp)
    raised = 0
    for conv in CONVERSATIONS.values():
        for gen in (True, False):
            want = _hf(word_tokenizers[name], conv, gen)
            assert _ours(fmt, conv, gen) == want, (name, conv, gen)
            raised += want.startswith("raises")
    assert raised < 2 * len(CONVERSATIONS)  # most conversations render


def test_rendering_options_as_transformers(word_tokenizers):
    tok = word_tokenizers["qwen3"]
    fmt = JinjaFormat(T.QWEN3, T.TEMPLATES["qwen3"][1])
    conv = CONVERSATIONS["one question"]
    off = _ours(fmt, conv, True, enable_thinking=False)
    assert off == _hf(tok, conv, True, enable_thinking=False) and off.endswith("<think>\n\n</think>\n\n")
    # reasoning given as a field, under each of the names transformers accepts
    for key in ("reasoning_content", "thinking", "reasoning"):
        conv = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4", key: "add"}]
        assert _ours(fmt, conv, False) == _hf(tok, conv, False)
        assert "<think>\nadd\n</think>\n\n4<|im_end|>" in _ours(fmt, conv, False)
    llama31 = JinjaFormat(T.LLAMA31_INSTRUCT, T.TEMPLATES["llama3.1"][1])
    conv = CONVERSATIONS["one question"]
    assert _ours(llama31, conv, True, date_string="01 Jan 2025") == _hf(
        word_tokenizers["llama3.1"], conv, True, date_string="01 Jan 2025")


def test_template_errors_are_typed_and_name_the_file():
    with pytest.raises(TemplateRenderError, match=r"my/tokenizer_config\.json.*roles must alternate"):
        render(T.MISTRAL_V1, CONVERSATIONS["wrong order"], add_generation_prompt=False,
               specials={"bos_token": "<s>", "eos_token": "</s>"}, where="my/tokenizer_config.json")
    with pytest.raises(TemplateRenderError, match="not valid Jinja"):
        render("{% for m in messages %}", [], add_generation_prompt=False)
    # the sandbox: no attribute access to Python internals
    with pytest.raises(TemplateRenderError):
        render("{{ messages.__class__.__mro__ }}", [], add_generation_prompt=False)


# --------------------------------------------------------------------------- real vocabularies


@pytest.fixture(scope="session")
def llama3(tmp_path_factory):
    """Llama 3.1 Instruct's tokenizer files (lora2gguf.testing.tokenizers), its chat template."""
    from lora2gguf.testing import tokenizers as toks

    d = toks.llama3_tokenizer(tmp_path_factory.mktemp("llama3") / "tok")
    assert json.loads((d / "tokenizer_config.json").read_text())["chat_template"] == T.LLAMA3_INSTRUCT
    return d


@pytest.fixture(scope="session")
def qwen3(tmp_path_factory):
    """Qwen3's tokenizer files with its chat template (reasoning blocks and all)."""
    from lora2gguf.testing import tokenizers as toks

    return toks.qwen3_tokenizer(tmp_path_factory.mktemp("qwen3") / "tok",
                                config_hook=lambda c: c.update(chat_template=T.QWEN3))


@pytest.fixture(scope="session")
def llama3_tokens(llama3):
    from lora2gguf.verify.tokens import HFTokens
    return HFTokens(llama3)


@pytest.fixture(scope="session")
def qwen3_tokens(qwen3):
    from lora2gguf.verify.tokens import HFTokens
    return HFTokens(qwen3)


@pytest.mark.parametrize("which", ["llama3", "qwen3"])
def test_token_ids_equal_apply_chat_template(request, which):
    """Our text, tokenized as verify tokenizes it (special tokens parsed, nothing added), gives the
    ids of apply_chat_template(tokenize=True) with the real vocabulary."""
    view = request.getfixturevalue(f"{which}_tokens")
    fmt = chat_format(arch.known()[{"llama3": "llama", "qwen3": "qwen3"}[which]], template=view.chat_template,
                      specials=view.specials())
    assert fmt.name == "jinja"
    for key in ("one question", "system and turns", "answered with reasoning"):
        conv = CONVERSATIONS[key]
        want = view.hf.apply_chat_template(conv, tokenize=True, add_generation_prompt=True)["input_ids"]
        text = fmt.render_messages(conv, add_generation_prompt=True)
        assert view.encode(text) == list(want), key
    r = fmt.render_prompt("What is 2+2?", system="Be brief.")
    assert r.ids is None and view.encode(r.text) == list(view.hf.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
        tokenize=True, add_generation_prompt=True)["input_ids"])


def test_render_text_alternates_user_and_assistant(llama3_tokens):
    fmt = JinjaFormat(T.LLAMA3_INSTRUCT, llama3_tokens.specials())
    text = fmt.render_text("Q one?\n\nA one.\n\nQ two?").text
    assert text == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nQ one?<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\nA one.<|eot_id|>"
                    "<|start_header_id|>user<|end_header_id|>\n\nQ two?<|eot_id|>")
    from lora2gguf.errors import InputError
    with pytest.raises(InputError, match="empty"):
        fmt.render_text(" \n\n ")


def test_a_system_message_the_template_rejects_is_named():
    fmt = JinjaFormat(T.GEMMA2, T.TEMPLATES["gemma2"][1], where="gemma/tokenizer_config.json")
    with pytest.raises(TemplateRenderError, match=r"gemma/tokenizer_config\.json.*System role not supported.*"
                                                  r"remove them from the suite"):
        fmt.render_prompt("Hi", system="Be brief.")
    assert fmt.render_prompt("Hi").text == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"


# --------------------------------------------------------------------------- parsing completions


def _ids(view, text):
    return view.encode(text)


def test_parse_finished_llama3_answer(llama3_tokens):
    v = llama3_tokens
    fmt = JinjaFormat(T.LLAMA3_INSTRUCT, v.specials())
    stops = [128001, 128009]
    p = fmt.parse(_ids(v, "The sum is 4.<|eot_id|>"), v, stops=stops)
    assert p.messages == [("final", "The sum is 4.")] and p.stop == "<|eot_id|>" and p.errors == []
    r = fmt.structure_check(p, hit_limit=False)
    assert r.passed and r.detail == "an answer, stopped at <|eot_id|>"


@pytest.mark.parametrize("completion, hit, problem", [
    ("The sum is", True, "ran to the token limit without a stop token"),
    ("The sum is 4.<|end_of_text|>", False, "ended with <|end_of_text|>, not the turn end <|eot_id|>"),
    ("4.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nmore", True,
     "the control token '<|eot_id|>' inside the reply, at token 2"),
    ("<|eot_id|>", False, "an empty answer"),
])
def test_parse_broken_llama3_answers(llama3_tokens, completion, hit, problem):
    """A turn end that is not a stop token (the trap: verify stops only where the GGUF declares),
    a cut-off answer, the wrong end token, an empty answer: each named."""
    v = llama3_tokens
    fmt = JinjaFormat(T.LLAMA3_INSTRUCT, v.specials())
    stops = [128001] if "inside" in problem else [128001, 128009]
    p = fmt.parse(_ids(v, completion), v, stops=stops)
    r = fmt.structure_check(p, hit_limit=hit)
    assert not r.passed and problem in r.detail, r.detail
    if "inside" in problem:
        assert p.channel("final") == "4."


QWEN3_STOPS = [151645, 151643]


def test_parse_qwen3_thinking(qwen3_tokens):
    v = qwen3_tokens
    fmt = JinjaFormat(T.QWEN3, v.specials())
    prompt = fmt.render_prompt("What is 2+2?").text
    assert prompt.endswith("<|im_start|>assistant\n") and fmt.think == ("<think>", "</think>")
    p = fmt.parse(_ids(v, "<think>\nTwo and two.\n</think>\n\nIt is 4.<|im_end|>"), v, stops=QWEN3_STOPS,
                  prompt=prompt)
    assert p.messages == [("analysis", "Two and two."), ("final", "It is 4.")] and p.reasoning_expected
    r = fmt.structure_check(p, hit_limit=False)
    assert r.passed and r.detail == "reasoning + answer, stopped at <|im_end|>"
    # no reasoning block although the prompt asked for one
    p = fmt.parse(_ids(v, "It is 4.<|im_end|>"), v, stops=QWEN3_STOPS, prompt=prompt)
    r = fmt.structure_check(p, hit_limit=False)
    assert not r.passed and "no reasoning block (<think>…</think>)" in r.detail
    # cut off while thinking
    p = fmt.parse(_ids(v, "<think>\nTwo and"), v, stops=QWEN3_STOPS, prompt=prompt)
    r = fmt.structure_check(p, hit_limit=True)
    assert p.channel("analysis") == "Two and" and p.channel("final") is None
    assert not r.passed and "token limit" in r.detail and "never closed with </think>" in r.detail
    assert "no answer" in r.detail


def test_parse_qwen3_without_thinking(qwen3_tokens):
    """enable_thinking=False (suite `reasoning: off`) pre-fills an empty block: no reasoning is
    expected, and the answer is the whole completion."""
    v = qwen3_tokens
    fmt = JinjaFormat(T.QWEN3, v.specials())
    prompt = fmt.render_prompt("What is 2+2?", reasoning="off").text
    assert prompt.endswith("<think>\n\n</think>\n\n")
    p = fmt.parse(_ids(v, "It is 4.<|im_end|>"), v, stops=QWEN3_STOPS, prompt=prompt)
    assert p.messages == [("final", "It is 4.")] and not p.reasoning_expected
    assert fmt.structure_check(p, hit_limit=False).passed


def test_parse_reasoning_opened_by_the_prompt(qwen3_tokens):
    """A template that opens the reasoning block in the generation prompt (DeepSeek-R1 style):
    the completion starts inside it."""
    v = qwen3_tokens
    tpl = T.QWEN3.replace("{{- '<|im_start|>assistant\\n' }}", "{{- '<|im_start|>assistant\\n<think>\\n' }}")
    fmt = JinjaFormat(tpl, v.specials())
    prompt = fmt.render_prompt("2+2?").text
    assert prompt.endswith("<think>\n")
    p = fmt.parse(_ids(v, "add\n</think>\n\n4<|im_end|>"), v, stops=QWEN3_STOPS, prompt=prompt)
    assert p.messages == [("analysis", "add"), ("final", "4")] and p.errors == []


# --------------------------------------------------------------------------- known families, Ollama


@pytest.mark.parametrize("name", list(T.TEMPLATES))
def test_known_family_is_identified(name):
    tpl, sp, want = T.TEMPLATES[name]
    fmt = JinjaFormat(tpl, sp)
    assert (fmt.known.key if fmt.known else None) == want
    if name == "smollm2":
        assert fmt.known.system.default == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    if name == "llama3.1":
        assert fmt.known.system.prefix == "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
    if name == "mistral-v3":
        assert fmt.known.system.where == "last_user"


def test_a_near_miss_is_not_claimed():
    """One character away from ChatML (no newline after the role) is not ChatML."""
    tpl = T.SMOLLM2.replace("message['role'] + '\n'", "message['role'] + ' '")
    assert tpl != T.SMOLLM2
    assert JinjaFormat(tpl, {"eos_token": "<|im_end|>"}).known is None


GO_CONVERSATIONS = [
    (None, [{"role": "user", "content": "Hi there"}]),
    ("Be brief.", [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                   {"role": "user", "content": "What is 2+2?"}]),
    (None, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Bye"}]),
]


@pytest.mark.parametrize("name", [n for n, (_, _, k) in T.TEMPLATES.items() if k])
def test_ollama_template_renders_as_the_model_template(name):
    """The Modelfile's Go template, run on the values Ollama gives it (the Modelfile's SYSTEM when
    the chat has none), writes what the model's own template writes after its BOS."""
    tpl, sp, _ = T.TEMPLATES[name]
    fmt = JinjaFormat(tpl, sp)
    spec = fmt.ollama([sp["eos_token"]])
    assert spec.template is not None
    checked = 0
    for system, msgs in GO_CONVERSATIONS:
        conv = ([{"role": "system", "content": system}] if system else []) + msgs
        try:
            want = fmt.render_messages(conv, add_generation_prompt=True)
        except TemplateRenderError:
            continue  # the model's template takes no system message
        want = _strip_bos(want, sp.get("bos_token") if "bos_token" in tpl else None)
        got = go_render(spec.template, ollama_data(msgs, system if system is not None else spec.system))
        assert got == want, (name, system)
        checked += 1
    assert checked >= 2


@pytest.mark.parametrize("name, stops, system", [
    ("llama3", ("<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"), None),
    ("qwen2.5", ("<|im_end|>", "<|im_start|>"), "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."),
    ("qwen3", ("<|im_end|>", "<|im_start|>"), None),
    ("mistral-v3", ("</s>", "[INST]"), None),
    ("llama2", ("</s>", "[INST]"), None),
    ("gemma2", ("<end_of_turn>", "<start_of_turn>", "<eos>"), None),
    ("alpaca", ("</s>",), None),
])
def test_ollama_stops_and_system(name, stops, system):
    tpl, sp, known = T.TEMPLATES[name]
    spec = JinjaFormat(tpl, sp).ollama([sp["eos_token"]])
    assert spec.stops == stops and spec.system == system
    if known is None:
        assert spec.template is None and "No TEMPLATE" in spec.comments[0] and "ollama show" in spec.comments[0]


def test_harmony_ollama_template_renders_as_openai_harmony():
    pytest.importorskip("openai_harmony")
    from lora2gguf.chat.harmony import OLLAMA_TEMPLATE, HarmonyFormat

    fmt = HarmonyFormat()
    date = lambda: "2025-06-28"  # noqa: E731 (the date openai-harmony renders with, fixed)
    want = fmt.render_prompt("What is 2+2?", developer="Be brief.").text
    assert go_render(OLLAMA_TEMPLATE, ollama_data([{"role": "user", "content": "What is 2+2?"}], "Be brief."),
                     currentDate=date) == want
    turns = [Message("user", "Hi"), Message("assistant", "Hello!", reasoning="greet"), Message("user", "2+2?")]
    want = fmt.render_prompt(turns).text
    got = go_render(OLLAMA_TEMPLATE, ollama_data([m.to_dict() | {"reasoning": m.reasoning or ""} for m in turns]),
                    currentDate=date)
    assert got == want and "greet" not in got  # the reasoning of earlier turns is dropped, as in Harmony


# --------------------------------------------------------------------------- Modelfiles


def _record(name: str, family: str = "llama") -> dict:
    tpl, sp, _ = T.TEMPLATES[name]
    roles = {k[:-len("_token")]: {"id": i, "token": t} for i, (k, t) in enumerate(sp.items())}
    return {"lora2gguf_version": "test", "architecture": family,
            "technical": {"chat_format": "jinja", "chat_template": tpl, "special_tokens": roles,
                          "eos_token": sp["eos_token"], "eog_tokens": {}}}


def _modelfile(rec: dict) -> tuple[str, str | None, list[str], str | None]:
    from lora2gguf.report import modelfile_text

    text = modelfile_text(rec, "m-Q4_K_M.gguf")
    assert "FROM ./m-Q4_K_M.gguf" in text.splitlines()
    tpl = re.search(r'^TEMPLATE """(.*?)"""$', text, flags=re.S | re.M)
    sysm = re.search(r'^SYSTEM """(.*?)"""$', text, flags=re.S | re.M)
    stops = re.findall(r'^PARAMETER stop "(.*)"$', text, flags=re.M)
    return text, tpl.group(1) if tpl else None, stops, sysm.group(1) if sysm else None


def test_modelfile_llama3():
    text, tpl, stops, system = _modelfile(_record("llama3.1"))
    assert stops == ["<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"] and system is None
    assert tpl.startswith("<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023")
    assert "# Llama 3 chat format" in text and "fixed at conversion" in text
    assert go_render(tpl, ollama_data([{"role": "user", "content": "Hi"}])) == _strip_bos(
        JinjaFormat(T.LLAMA31_INSTRUCT, T.TEMPLATES["llama3.1"][1]).render_prompt("Hi").text, "<|begin_of_text|>")


def test_modelfile_chatml_with_default_system():
    text, tpl, stops, system = _modelfile(_record("qwen2.5", "qwen2"))
    assert stops == ["<|im_end|>", "<|im_start|>"]
    assert system == "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    assert tpl.endswith("<|im_start|>assistant\n")


def test_modelfile_mistral_and_unknown():
    _, tpl, stops, _ = _modelfile(_record("mistral-v3", "mistral"))
    assert stops == ["</s>", "[INST]"] and "[INST] " in tpl
    text, tpl, stops, _ = _modelfile(_record("alpaca"))
    assert tpl is None and stops == ["</s>"]
    assert "# No TEMPLATE: it is not one of the template families lora2gguf knows" in text


# --------------------------------------------------------------------------- doctor


def _chat_findings(folder: Path, family: str = "llama", generation_config=None):
    tok = inspect_tokenizer(folder)
    return checks.check_chat(tok, arch.known()[family], generation_config)


@pytest.fixture(scope="session")
def llama3_base_tok(llama3, tmp_path_factory):
    """Llama 3 *base* tokenizer files (EOS <|end_of_text|>) with the Instruct chat template: a
    base fine-tuned on instruct-formatted chats."""
    d = tmp_path_factory.mktemp("llama3_base") / "tok"
    d.mkdir()
    (d / "tokenizer.json").symlink_to(llama3 / "tokenizer.json")
    cfg = json.loads((llama3 / "tokenizer_config.json").read_text())
    cfg["eos_token"] = "<|end_of_text|>"
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d


def test_llama3_base_eos_with_instruct_template_is_a_blocker(llama3_base_tok):
    found = _chat_findings(llama3_base_tok, generation_config={"eos_token_id": 128001})
    f = next(x for x in found if x.code == "TURN_END_NOT_EOG")
    assert f.severity == F.BLOCKER
    assert "<|eot_id|>" in f.what and "128009" in f.what and "128001 '<|end_of_text|>' (EOS)" in f.what
    assert f.data["turn_end"] == "<|eot_id|>" and f.data["turn_end_id"] == 128009
    assert "eos_token to '<|eot_id|>'" in f.fix and str(llama3_base_tok) in f.fix
    assert "generation_config.json" in f.fix


def test_generation_config_listing_the_turn_end_is_fine(llama3_base_tok):
    """No blocker; a warning that only the configs (not the GGUF's metadata) name it."""
    found = _chat_findings(llama3_base_tok, generation_config={"eos_token_id": [128001, 128008, 128009]})
    assert not [x for x in found if x.severity == F.BLOCKER]
    w = next(x for x in found if x.code == "TURN_END_NOT_IN_GGUF")
    assert w.severity == F.WARNING and "generation_config.json eos_token_id" in w.what and "'<|eot_id|>'" in w.fix
    info = next(x for x in found if x.code == "CHAT_FORMAT")
    assert "Llama 3" in info.what and "generation_config.json eos_token_id" in info.what
    # config.json's list counts as much (transformers reads it when there is no generation_config.json)
    found = checks.check_chat(inspect_tokenizer(llama3_base_tok), arch.known()["llama"], None,
                              {"eos_token_id": [128001, 128009]})
    assert {x.code for x in found} == {"TURN_END_NOT_IN_GGUF", "CHAT_FORMAT"}


def test_llama3_instruct_tokenizer_is_fine(llama3):
    found = _chat_findings(llama3)
    assert [x.code for x in found] == ["CHAT_FORMAT"]
    assert "an end-of-generation token (EOS)" in found[0].what


def test_qwen3_template_reports_reasoning_blocks(qwen3):
    found = _chat_findings(qwen3, "qwen3", {"eos_token_id": [151645, 151643]})
    assert [x.code for x in found] == ["CHAT_FORMAT"]
    assert "ChatML with reasoning blocks <think>…</think>" in found[0].what and "<|im_end|>" in found[0].what


@pytest.mark.parametrize("edit, code", [
    (lambda cfg: cfg.pop("chat_template"), "CHAT_TEMPLATE_MISSING"),
    (lambda cfg: cfg.update(chat_template="{{ raise_exception('no chats here') }}"), "CHAT_TEMPLATE_INVALID"),
    (lambda cfg: cfg.update(chat_template="{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n\n"
                                          "{% endfor %}"), "CHAT_TEMPLATE_NO_EOG"),
    (lambda cfg: cfg.update(eos_token="hello"), "EOS_NOT_EOG"),
])
def test_broken_templates_are_blockers(llama3, tmp_path, edit, code):
    d = tmp_path / "tok"
    d.mkdir()
    (d / "tokenizer.json").symlink_to(llama3 / "tokenizer.json")
    cfg = json.loads((llama3 / "tokenizer_config.json").read_text())
    edit(cfg)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    found = {x.code: x for x in _chat_findings(d)}
    assert code in found and found[code].severity == F.BLOCKER, sorted(found)
    assert str(d) in found[code].what
    if code == "CHAT_TEMPLATE_INVALID":
        assert "no chats here" in found[code].what


def test_tokenizer_facts_read_the_eog_ids(llama3_base_tok):
    facts = tokenizer_facts(inspect_tokenizer(llama3_base_tok), {"eos_token_id": [128001, 128009]})
    assert facts.eog == {128001: "EOS", 128009: "generation_config.json eos_token_id"}
    assert facts.token_id("<|eot_id|>") == 128009 and facts.is_special("<|eot_id|>")


# --------------------------------------------------------------------------- where knowledge lives


def test_pipeline_modules_name_no_chat_format():
    """doctor, verify and report ask the chat format; they do not name one (nor a family's tokens)."""
    src = Path(__file__).resolve().parents[1] / "src" / "lora2gguf"
    pattern = re.compile(r"gpt_oss|GPT-OSS|[Hh]armony|o200k|<\|return\|>|201088|<\|eot_id\|>|<\|im_end\|>|\[INST\]")
    hits = [f"{p.relative_to(src)}:{i}: {line.strip()}"
            for d in ("doctor", "verify", "report") for p in sorted((src / d).rglob("*.py"))
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if pattern.search(line)]
    assert hits == []
