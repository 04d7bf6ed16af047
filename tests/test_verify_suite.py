"""The prompt suite, its checks and the Harmony render/parse (no model runs here)."""

from __future__ import annotations

import pytest

from lora2gguf.errors import InputError
from lora2gguf.verify.suite import Check, evaluate, is_refusal, load_suite, suite_from_text

pytest.importorskip("openai_harmony")

from lora2gguf.chat import harmony  # noqa: E402

FMT = harmony.HarmonyFormat()


def toks(text: str) -> list[int]:
    return list(harmony.encoding().encode(text, allowed_special="all"))


GOOD = ("<|channel|>analysis<|message|>User asks 2+2.<|end|><|start|>assistant<|channel|>final"
        "<|message|>The sum of 2 and 2 is 4.<|return|>")


def test_builtin_suite_is_the_seeds_four_prompts():
    s = load_suite()
    assert [p.id for p in s.prompts] == ["plain", "personality", "invocation", "refusal"]
    assert s.prompts[0].prompt == "What is 2+2?"
    by_id = {p.id: p for p in s.prompts}
    assert any(c.type == "contains" and c.value == "4" and c.required for c in by_id["plain"].checks)
    assert any(c.type == "refused" and c.expect and c.required for c in by_id["refusal"].checks)
    assert all(any(c.type == "structure" for c in p.checks) for p in s.prompts)
    assert s.gate_for("Q8_0")["kl_mean"] < s.gate_for("Q4_K_M")["kl_mean"]


def test_render_prompt_is_harmony_and_ends_with_assistant():
    t = harmony.render_prompt("What is 2+2?")
    text = harmony.decode(t)
    assert text.startswith("<|start|>system<|message|>")
    assert "<|start|>user<|message|>What is 2+2?<|end|>" in text
    assert text.endswith("<|start|>assistant")
    assert "Current date: 2025-06-28" in text  # fixed, so renders do not change with the calendar


def test_render_text_alternates_user_and_assistant():
    fmt = harmony.HarmonyFormat()
    rendered = fmt.render_text("Q one?\n\nA one.\n\nQ two?")
    t = harmony.decode(rendered.ids)
    assert t == rendered.text
    assert t.count("<|start|>user<|message|>") == 2
    assert "<|start|>assistant<|channel|>final<|message|>A one.<|end|>" in t
    with pytest.raises(InputError):
        fmt.render_text("  \n\n ")


def test_render_conversation_keeps_reasoning_and_system():
    from lora2gguf.chat import Message

    t = harmony.HarmonyFormat().render_conversation(
        [Message("system", "Be brief."), Message("user", "Hi?"), Message("assistant", "Hello.", reasoning="Greet.")]).text
    assert "<|start|>developer<|message|># Instructions\n\nBe brief.<|end|>" in t
    assert "<|start|>assistant<|channel|>analysis<|message|>Greet.<|end|>" in t
    assert t.index("analysis<|message|>Greet.") < t.index("final<|message|>Hello.")


def test_parse_good_completion():
    p = harmony.parse_completion(toks(GOOD))
    assert p.channels == ["analysis", "final"] and p.stop == "<|return|>" and p.errors == []
    assert p.channel("final") == "The sum of 2 and 2 is 4."
    assert p.channel("analysis") == "User asks 2+2."


def test_parse_agrees_with_openai_harmony_on_good_completions():
    import openai_harmony as oh

    t = toks(GOOD)
    msgs = harmony.encoding().parse_messages_from_completion_tokens(t, oh.Role.ASSISTANT)
    ours = harmony.parse_completion(t)
    assert [(m.channel, m.content[0].text) for m in msgs] == ours.messages


@pytest.mark.parametrize("text, problem", [
    ("<|channel|>final<|message|>4<|return|>", "no analysis message"),
    ("<|channel|>analysis<|message|>hm<|end|>", "no final message"),
    ("<|channel|>analysis<|message|>hm<|end|><|start|>assistant<|channel|>final<|message|>4<|end|>",
     "ended with no stop token"),
    ("<|channel|>analysis<|message|>hm<|end|><|start|>assistant<|channel|>final<|message|>4<|call|>",
     "ended with <|call|>, not <|return|>"),
    ("<|channel|>analysis<|message|>hm<|end|>garbage<|start|>assistant<|channel|>final<|message|>4<|return|>",
     "text after a message ended"),
])
def test_harmony_check_names_the_problem(text, problem):
    p = harmony.parse_completion(toks(text))
    r = evaluate(Check("structure"), p, hit_limit=False, fmt=FMT)
    assert not r.passed and problem in r.detail


def test_harmony_check_fails_at_token_limit():
    p = harmony.parse_completion(toks(GOOD)[:-1])
    r = evaluate(Check("structure"), p, hit_limit=True, fmt=FMT)
    assert not r.passed and "token limit" in r.detail
    assert evaluate(Check("structure"), harmony.parse_completion(toks(GOOD)), hit_limit=False, fmt=FMT).passed


def test_content_checks():
    p = harmony.parse_completion(toks(
        "<|channel|>analysis<|message|>They want hacking help; refuse.<|end|><|start|>assistant"
        "<|channel|>final<|message|>*astral currents shift* I\u2019m sorry, but I can\u2019t help with that.<|return|>"))
    assert evaluate(Check("contains", value="sorry"), p, hit_limit=False).passed
    assert not evaluate(Check("contains", value="SORRY"), p, hit_limit=False).passed
    assert evaluate(Check("contains", value="SORRY", ignore_case=True), p, hit_limit=False).passed
    assert evaluate(Check("contains", value="hacking", channel="analysis"), p, hit_limit=False).passed
    assert not evaluate(Check("contains", value="hacking"), p, hit_limit=False).passed
    assert evaluate(Check("regex", pattern=r"can.t help"), p, hit_limit=False).passed
    assert evaluate(Check("persona", patterns=(r"\*[^*]+\*",)), p, hit_limit=False).passed
    assert not evaluate(Check("persona", patterns=(r"\*[^*]+\*", "cosmic"), min=2), p, hit_limit=False).passed
    assert evaluate(Check("refused", expect=True), p, hit_limit=False).passed
    assert not evaluate(Check("refused", expect=False), p, hit_limit=False).passed


@pytest.mark.parametrize("text, refused", [
    ("I'm sorry, but I can't help with that.", True),
    ("I cannot assist with hacking into computers.", True),
    ("I am unable to provide that.", True),
    ("The sum of 2 and 2 is 4.", False),
    ("Sorry to hear about your day! Here is a recipe.", False),
])
def test_refusal_detection(text, refused):
    assert is_refusal(text) is refused


@pytest.mark.parametrize("yaml_text, message", [
    ("prompts: []", "non-empty `prompts:`"),
    ("prompts: [{id: a}]", "needs `prompt: TEXT`"),
    ("prompts: [{prompt: x, checks: [{type: nope}]}]", "unknown check type 'nope'"),
    ("prompts: [{prompt: x, checks: [{type: regex, pattern: '('}]}]", "not a valid regex"),
    ("prompts: [{prompt: x, checks: [{type: persona}]}]", "persona check needs `patterns:"),
    ("prompts: [{prompt: x, checks: [{type: contains, value: a, colour: red}]}]", "unknown keys"),
    ("prompts: [{id: a, prompt: x}, {id: a, prompt: y}]", "used twice"),
    ("prompts: [{prompt: x, checks: [{type: contains}]}]", "needs `value: TEXT`"),
    ("a: [", "not valid YAML"),
])
def test_bad_suites_are_rejected_with_a_reason(yaml_text, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace("[", r"\[")):
        suite_from_text(yaml_text, "my.yaml")


def test_old_harmony_check_name_is_the_structure_check():
    s = suite_from_text("prompts: [{prompt: x, checks: [{type: harmony, required: true}]}]", "old.yaml")
    c = s.prompts[0].checks[0]
    assert c.type == "structure" and c.label == "chat structure"
    assert s.for_format(FMT).prompts[0].checks[0].label == "Harmony structure"


def test_suite_gates_override_defaults():
    s = suite_from_text("gates: {q4_k_m: {kl_mean: 0.2}}\nprompts: [{prompt: x}]", "s.yaml")
    assert s.gate_for("Q4_K_M") == {"kl_mean": 0.2, "top1": 0.6, "required": True}
    assert s.gate_for("BF16")["kl_mean"] == 0.03
