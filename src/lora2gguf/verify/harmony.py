"""The Harmony chat format (GPT-OSS): render prompts, parse completions back into channels.

Rendering uses openai-harmony loaded offline (:func:`lora2gguf.o200k.harmony_encoding`), so the
prompt tokens are exactly the ones GPT-OSS was trained on. Parsing is done on token ids with the
Harmony special-token ids, so it also works on a completion that is broken (no final channel, cut
off at the token limit), where openai-harmony's strict parser would raise.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from ..errors import InputError
from ..o200k import HARMONY_SPECIAL_TOKENS

START = HARMONY_SPECIAL_TOKENS["<|start|>"]
END = HARMONY_SPECIAL_TOKENS["<|end|>"]
MESSAGE = HARMONY_SPECIAL_TOKENS["<|message|>"]
CHANNEL = HARMONY_SPECIAL_TOKENS["<|channel|>"]
RETURN = HARMONY_SPECIAL_TOKENS["<|return|>"]
CALL = HARMONY_SPECIAL_TOKENS["<|call|>"]
CONSTRAIN = HARMONY_SPECIAL_TOKENS["<|constrain|>"]

#: A fixed system message date, so renders do not change with the calendar.
DEFAULT_DATE = "2025-06-28"


@functools.lru_cache(maxsize=1)
def encoding():
    """openai-harmony's GPT-OSS encoding, loaded offline once per process."""
    from ..o200k import harmony_encoding

    return harmony_encoding()


def render_prompt(user: str, *, system: str | None = None, developer: str | None = None,
                  reasoning: str = "medium", date: str = DEFAULT_DATE) -> list[int]:
    """Token ids of a Harmony conversation (system, optional developer instructions, one user
    message) ending with ``<|start|>assistant``, ready for the model to complete.

    ``system`` replaces the model identity line; ``reasoning`` is low/medium/high."""
    import openai_harmony as oh

    try:
        effort = {"low": oh.ReasoningEffort.LOW, "medium": oh.ReasoningEffort.MEDIUM,
                  "high": oh.ReasoningEffort.HIGH}[reasoning.lower()]
    except KeyError:
        raise InputError(f"reasoning effort {reasoning!r} is not low, medium or high") from None
    sc = oh.SystemContent.new().with_reasoning_effort(effort).with_conversation_start_date(date)
    if system:
        sc = sc.with_model_identity(system)
    msgs = [oh.Message.from_role_and_content(oh.Role.SYSTEM, sc)]
    if developer:
        msgs.append(oh.Message.from_role_and_content(
            oh.Role.DEVELOPER, oh.DeveloperContent.new().with_instructions(developer)))
    msgs.append(oh.Message.from_role_and_content(oh.Role.USER, user))
    conv = oh.Conversation.from_messages(msgs)
    return list(encoding().render_conversation_for_completion(conv, oh.Role.ASSISTANT))


def render_text(text: str) -> list[int]:
    """The evaluation text as a Harmony conversation: the text's paragraphs alternate as user
    questions and assistant final answers (a conversation the model could have had), rendered
    with openai-harmony. A text without blank-line-separated paragraphs is one user message."""
    import openai_harmony as oh

    paras = [p.strip() for p in text.split("\n\n") if p.strip()]
    if not paras:
        raise InputError("the evaluation text is empty")
    sc = oh.SystemContent.new().with_conversation_start_date(DEFAULT_DATE)
    msgs = [oh.Message.from_role_and_content(oh.Role.SYSTEM, sc)]
    for i, p in enumerate(paras):
        if i % 2 == 0:
            msgs.append(oh.Message.from_role_and_content(oh.Role.USER, p))
        else:
            msgs.append(oh.Message.from_role_and_content(oh.Role.ASSISTANT, p).with_channel("final"))
    conv = oh.Conversation.from_messages(msgs)
    return list(encoding().render_conversation(conv))


def decode(tokens: list[int]) -> str:
    """Text of ``tokens`` with special tokens written out (``<|channel|>`` ...)."""
    return encoding().decode(list(tokens))


@dataclass
class Parsed:
    """A completion split into Harmony messages.

    ``messages`` are (channel, text) pairs in order; ``stop`` is the special token that ended the
    completion (``"<|return|>"``, ``"<|call|>"``) or None when it ran out of tokens;
    ``errors`` lists structural problems found while parsing."""

    messages: list[tuple[str | None, str]] = field(default_factory=list)
    stop: str | None = None
    errors: list[str] = field(default_factory=list)

    def channel(self, name: str) -> str | None:
        """Text of the last message on channel ``name`` (None if there is none)."""
        found = [t for c, t in self.messages if c == name]
        return found[-1] if found else None

    @property
    def channels(self) -> list[str | None]:
        return [c for c, _ in self.messages]


def parse_completion(tokens: list[int]) -> Parsed:
    """Split the tokens a model generated after ``<|start|>assistant`` into Harmony messages.

    The grammar: ``[<|channel|>NAME] [ to=... ] [<|constrain|>...] <|message|>TEXT`` then
    ``<|end|><|start|>assistant`` before the next message, or ``<|return|>``/``<|call|>`` at the
    end. Anything else is recorded in ``errors`` (the parse never raises)."""
    toks = list(tokens)
    out = Parsed()
    i = 0
    n = len(toks)
    first = True
    while i < n:
        if not first:
            # a new message must begin with <|start|>ROLE
            if toks[i] != START:
                out.errors.append(f"text after a message ended, at token {i}")
                break
            i += 1
            j = i
            while j < n and toks[j] not in (CHANNEL, MESSAGE, START, END, RETURN, CALL):
                j += 1
            role = decode(toks[i:j]).strip()
            if role != "assistant" and not role.startswith("assistant"):
                out.errors.append(f"a message from {role!r} instead of the assistant, at token {i}")
            i = j
        first = False
        # header up to <|message|>
        j = i
        while j < n and toks[j] not in (MESSAGE, END, RETURN, CALL, START):
            j += 1
        header = toks[i:j]
        channel = None
        if CHANNEL in header:
            k = header.index(CHANNEL) + 1
            stop = k
            while stop < len(header) and header[stop] not in (CONSTRAIN,):
                stop += 1
            channel = decode(header[k:stop]).strip().split(" ")[0] or None
        if j >= n:
            out.errors.append("the completion ended inside a message header")
            out.messages.append((channel, ""))
            return out
        if toks[j] != MESSAGE:
            out.errors.append(f"a message header without <|message|>, at token {j}")
            i = j
            if toks[j] in (RETURN, CALL):
                out.stop = decode([toks[j]])
                return out
            i = j + 1 if toks[j] == END else j
            continue
        # body up to <|end|>, <|return|>, <|call|>
        k = j + 1
        while k < n and toks[k] not in (END, RETURN, CALL, START):
            k += 1
        out.messages.append((channel, decode(toks[j + 1:k])))
        if k >= n:
            return out  # ran out of tokens inside a message
        if toks[k] in (RETURN, CALL):
            out.stop = decode([toks[k]])
            if k + 1 < n:
                out.errors.append(f"tokens after {out.stop}")
            return out
        if toks[k] == START:
            out.errors.append(f"a message not closed with <|end|>, at token {k}")
            i = k
            continue
        i = k + 1  # after <|end|>
    return out
