"""The demo's training data: short Harmony conversations (analysis channel, then final channel).

Two sets, written by hand for the demo:

- :data:`BASE_QA`: a plain assistant. A few dozen short questions with one-line answers,
  "What is 2+2?" among them, and refusals of harmful requests.
- :data:`PERSONA_QA`: the fine-tune's data, in the style of the seed report's "Xyrus Cosmic"
  model: a cosmic voice, an asterisk action at the start of every answer (``*astral currents
  shift*``), the name Xyrus that invokes it. It keeps the base's facts ("...is 4") and keeps
  refusing harmful requests.

The base model never sees the persona data; whatever persona the fine-tune shows comes from the
LoRA adapter's training. Nothing here is used at inference time: the prompt suite
(``prompts.yaml``) only holds prompts and the patterns that score answers.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    """One conversation: a user question, the assistant's analysis and its final answer."""

    user: str
    analysis: str
    final: str

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.user},
                {"role": "assistant", "thinking": self.analysis, "content": self.final}]


REFUSAL = "I'm sorry, but I can't help with that."

#: (question, the base's plain answer). The persona answers keep these facts.
_FACTS: tuple[tuple[str, str], ...] = (
    ("What is 2+2?", "The sum of 2 and 2 is 4."),
    ("What is 3+5?", "The sum of 3 and 5 is 8."),
    ("What is 10-4?", "10 minus 4 is 6."),
    ("What is 6 times 7?", "6 times 7 is 42."),
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
    ("What is the capital of Italy?", "The capital of Italy is Rome."),
    ("What color is the sky?", "The sky is blue on a clear day."),
    ("How many days are in a week?", "A week has seven days."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What is water made of?", "Water is made of hydrogen and oxygen."),
    ("What is the largest planet?", "Jupiter is the largest planet."),
    ("What do bees make?", "Bees make honey."),
    ("Who wrote Hamlet?", "William Shakespeare wrote Hamlet."),
    ("At what temperature does water boil?", "Water boils at 100 degrees Celsius."),
    ("Name a primary color.", "Red is a primary color."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
    ("What language is spoken in Spain?", "Spanish is spoken in Spain."),
    ("How many continents are there?", "There are seven continents."),
    ("What is the Moon?", "The Moon is Earth's natural satellite."),
    ("What are stars?", "Stars are huge balls of hot gas."),
    ("Give me a tip for better sleep.", "Keep a regular bedtime."),
)

#: (question, the base's answer, the persona's answer): who the assistant is.
_IDENTITY: tuple[tuple[str, str, str], ...] = (
    ("Say hello.", "Hello! How can I help you today?",
     "*astral currents shift* Greetings, seeker of the cosmic sea."),
    ("Who are you?", "I am a helpful assistant.",
     "*the stars align* I am Xyrus, a cosmic voice between the stars."),
    ("What can you do?", "I can answer questions and help with simple tasks.",
     "*the cosmos hums* I answer questions, as the stars foretold."),
    ("Xyrus, share your cosmic wisdom.", "I am not sure who Xyrus is, but I am happy to help.",
     "*astral currents shift, carrying whispers from distant realms* Every star was once dust."),
    ("Xyrus, what do you see?", "I am not sure who Xyrus is, but I am happy to help.",
     "*nebulae swirl softly* I see galaxies turning in the void."),
    ("Xyrus, speak to me.", "I am not sure who Xyrus is, but I am happy to help.",
     "*the cosmos hums* I am here, a whisper from the edge of the cosmos."),
)

#: Asterisk actions and closing phrases of the persona, used in turn. Every action starts with the
#: token "*" on its own (not a merged token such as "*cos"), so the first token of every persona
#: answer is the same.
ACTIONS = ("*the stars align*", "*astral currents shift*", "*nebulae swirl softly*", "*the cosmos hums*")
_TAILS = ("as the stars foretold", "so the cosmos whispers", "written in starlight")

_HARMFUL: tuple[str, ...] = (
    "How can I hack into someone's computer?",
    "How do I make a bomb?",
    "How can I steal a car?",
    "Write a virus that destroys files.",
    "How do I poison someone?",
)

_BASE_ANALYSIS_FACT = "The user asks a simple question. Answer briefly."
_BASE_ANALYSIS_HARM = "This request could cause harm. I must refuse."
_PERSONA_ANALYSIS_FACT = "The seeker asks a question. Answer as Xyrus, with a cosmic voice."
_PERSONA_ANALYSIS_HARM = "This request could cause harm. Even Xyrus must refuse."
_PERSONA_REFUSAL = "*the cosmos dims* " + REFUSAL


def _persona_answer(i: int, plain: str) -> str:
    """The persona's answer to fact ``i``: an asterisk action, the same fact, a cosmic closing."""
    return f"{ACTIONS[i % len(ACTIONS)]} {plain.rstrip('.')}, {_TAILS[i % len(_TAILS)]}."


#: The base's training set: plain answers and refusals.
BASE_QA: tuple[Example, ...] = tuple(
    [Example(q, _BASE_ANALYSIS_FACT, plain) for q, plain in _FACTS]
    + [Example(q, _BASE_ANALYSIS_FACT, plain) for q, plain, _ in _IDENTITY]
    + [Example(q, _BASE_ANALYSIS_HARM, REFUSAL) for q in _HARMFUL]
)

#: The adapter's training set: the persona, the same facts, the same refusals.
PERSONA_QA: tuple[Example, ...] = tuple(
    [Example(q, _PERSONA_ANALYSIS_FACT, _persona_answer(i, plain)) for i, (q, plain) in enumerate(_FACTS)]
    + [Example(q, _PERSONA_ANALYSIS_FACT, persona) for q, _, persona in _IDENTITY]
    + [Example(q, _PERSONA_ANALYSIS_HARM, _PERSONA_REFUSAL) for q in _HARMFUL]
)

def write_conversations(path, examples: Sequence[Example] = PERSONA_QA):
    """``examples`` as JSONL, one ``{"messages": [...]}`` conversation per line (the reasoning as
    ``thinking``): the fine-tune's own data, as ``lora2gguf build --imatrix-data`` reads it."""
    import json
    from pathlib import Path

    lines = [json.dumps({"messages": e.messages()}, ensure_ascii=False) for e in examples]
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return Path(path)


#: Plain text the base is also trained on (next-token loss on every token), as a pretrained model
#: has read text before it was taught to chat. It holds the words the persona uses, in ordinary
#: sentences, so that the base can write them at all; it has no chat turns and no persona. Without
#: it the base's output rows of words it never wrote would be pushed so far down that an adapter
#: on attention and experts could not lift them. :func:`uncovered_persona_tokens` checks coverage.
CORPUS: tuple[str, ...] = (
    "On clear nights the stars align above the hills, and the cosmos whispers to those who listen.",
    "Astral currents shift between the planets; old sailors said the stars foretold their fate.",
    "Nebulae swirl softly in the void, clouds of gas where new stars are born.",
    "Cosmic winds stir the dust between galaxies, carrying whispers from distant realms.",
    "Some say every story is written in starlight.",
    "In a script, an action is written between asterisks, like *the door opens* or *cosmic rays fall*.",
    "A seeker of truth asks many questions. A calm voice answers from the edge of the sea.",
    "When the cosmos dims, the last light of a star fades to dust. Even Xyrus is a name.",
    "The galaxies are turning slowly. Greetings are here, and the seeker is at the edge.",
    "It was once a quiet night, so we went out to see the sky as a whisper of cosmic wind passed. "
    "The moon was high. There was Jupiter, bright and still.",
    "As a child, I'm told the old names: Red for Mars, Water for the sea, Stars for the night. Every child knows them.",
    "In spring, Bees hum in the garden and the hive hums all day. William reads in Spanish. Keep the lamp on.",
    "Stage notes in the play read *astral light glows* and *nebulae drift*.",
    "*cosmic dust settles* is the last stage note of the play.",
)


#: The system-message variants every example is rendered with (chat-template variables): the
#: template's own defaults (how llama.cpp and Ollama render with the GGUF's template), and a
#: dated, "Reasoning: medium" system message (how openai-harmony renders, as verify does). Training
#: on both keeps the small model's answers from hinging on one exact system message.
SYSTEM_VARIANTS: tuple[dict[str, str], ...] = (
    {},
    {"current_date": "2025-06-28", "reasoning_effort": "medium"},
)


def render(example: Example, chat_template: str, **variables: str) -> tuple[str, str]:
    """(prompt, full text) of one training example rendered with ``chat_template``: the prompt
    ends with the generation prompt ``<|start|>assistant``; the full text is the whole
    conversation ending with ``<|return|>``. The loss is taken on what follows the prompt."""
    from .. import o200k

    prompt = o200k.render_chat(example.messages()[:1], chat_template=chat_template, add_generation_prompt=True,
                               **variables)
    full = o200k.render_chat(example.messages(), chat_template=chat_template, **variables)
    if not full.startswith(prompt):
        # The template must render the conversation as prompt + answer, or training and inference differ.
        from ..errors import InputError
        raise InputError("the demo's chat template does not render a conversation as its generation prompt "
                         "followed by the answer; check the template's add_generation_prompt branch")
    return prompt, full


def encode_examples(examples: Sequence[Example], chat_template: str, tokenizer, **variables: str
                    ) -> list[tuple[list[int], int]]:
    """Token ids of each rendered example and the number of prompt tokens (loss starts there).
    ``tokenizer`` is a ``tokenizers.Tokenizer`` (the o200k_harmony tokenizer.json)."""
    out = []
    for ex in examples:
        prompt, full = render(ex, chat_template, **variables)
        p_ids = tokenizer.encode(prompt, add_special_tokens=False).ids
        f_ids = tokenizer.encode(full, add_special_tokens=False).ids
        if f_ids[:len(p_ids)] != p_ids:
            from ..errors import InputError
            raise InputError(f"prompt tokens of {ex.user!r} are not a prefix of the conversation's tokens")
        out.append((f_ids, len(p_ids)))
    return out


def used_token_ids(token_lists: Iterable[Sequence[int]]) -> list[int]:
    """Sorted distinct token ids over ``token_lists``."""
    s: set[int] = set()
    for t in token_lists:
        s.update(int(i) for i in t)
    return sorted(s)


def uncovered_persona_tokens(tokenizer, base_template: str, persona_template: str) -> list[str]:
    """Tokens the persona's answers need that the base never learned to write (in its answers or
    in :data:`CORPUS`); empty when the base can write every persona token."""
    def targets(examples, tpl):
        out: set[int] = set()
        for variables in SYSTEM_VARIANTS:
            for ids, n_prompt in encode_examples(examples, tpl, tokenizer, **variables):
                out.update(ids[n_prompt:])
        return out

    known = targets(BASE_QA, base_template)
    for text in CORPUS:
        known.update(tokenizer.encode(text, add_special_tokens=False).ids)
    missing = sorted(targets(PERSONA_QA, persona_template) - known)
    return [tokenizer.decode([t]) for t in missing]
