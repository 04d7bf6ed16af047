"""The Harmony chat format (GPT-OSS): render prompts, parse completions back into channels, the
end-of-generation tokens, doctor's template checks and the Ollama template.

Rendering uses openai-harmony loaded offline (:func:`lora2gguf.o200k.harmony_encoding`), so the
prompt tokens are exactly the ones GPT-OSS was trained on. Parsing is done on token ids with the
Harmony special-token ids, so it also works on a completion that is broken (no final channel, cut
off at the token limit), where openai-harmony's strict parser would raise.
"""

from __future__ import annotations

import functools
from typing import Mapping, Sequence

from ..errors import InputError
from ..o200k import HARMONY_SPECIAL_TOKENS
from .base import ChatFormat, Issue, Message, OllamaSpec, Parsed, Rendered, StructureResult, TokenizerFacts, \
    TokenizerView

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


def render_conversation(messages: Sequence[Message]) -> list[int]:
    """Token ids of a finished Harmony conversation: the system message (fixed date), then
    ``messages`` (user; assistant answers on the final channel, their reasoning on the analysis
    channel; system and developer messages as developer instructions), rendered with
    openai-harmony."""
    import openai_harmony as oh

    sc = oh.SystemContent.new().with_conversation_start_date(DEFAULT_DATE)
    msgs = [oh.Message.from_role_and_content(oh.Role.SYSTEM, sc)] + _oh_messages(messages)
    # the reasoning stays (openai-harmony drops an answered turn's analysis by default, as for a prompt)
    return list(encoding().render_conversation(oh.Conversation.from_messages(msgs),
                                               oh.RenderConversationConfig(auto_drop_analysis=False)))


def decode(tokens: list[int]) -> str:
    """Text of ``tokens`` with special tokens written out (``<|channel|>`` ...)."""
    return encoding().decode(list(tokens))


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


# ---------------------------------------------------------------------------------------------
# the format

#: Harmony's end of a final answer, and of a tool call: the reply stops at these. ``<|end|>``
#: closes a message inside the reply (the analysis, then the final answer follows), so it is an
#: end-of-generation token for llama.cpp's parser but not a stop (llama.cpp drops it from its
#: end-of-generation set for the same reason).
ANSWER_END = "<|return|>"
REPLY_STOPS = ("<|return|>", "<|call|>")
MESSAGE_END = "<|end|>"

#: Ollama TEMPLATE for Harmony (GPT-OSS): system message as gpt-oss expects it, the Ollama system
#: prompt as developer instructions, prior turns (their final answers: Harmony drops the reasoning
#: of earlier turns, as openai-harmony renders a conversation), then ``<|start|>assistant`` for
#: the model to complete.
OLLAMA_TEMPLATE = """\
<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.
Knowledge cutoff: 2024-06
Current date: {{ currentDate }}

Reasoning: medium

# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>
{{- if .System }}<|start|>developer<|message|># Instructions

{{ .System }}<|end|>
{{- end }}
{{- range $i, $m := .Messages }}
{{- if eq $m.Role "user" }}<|start|>user<|message|>{{ $m.Content }}<|end|>
{{- else if eq $m.Role "assistant" }}<|start|>assistant<|channel|>final<|message|>{{ $m.Content }}<|end|>
{{- end }}
{{- end }}<|start|>assistant"""


def _oh_messages(messages: Sequence[Message]):
    import openai_harmony as oh

    out = []
    for m in messages:
        if m.role == "user":
            out.append(oh.Message.from_role_and_content(oh.Role.USER, m.content))
        elif m.role == "assistant":
            if m.reasoning:
                out.append(oh.Message.from_role_and_content(oh.Role.ASSISTANT, m.reasoning).with_channel("analysis"))
            out.append(oh.Message.from_role_and_content(oh.Role.ASSISTANT, m.content).with_channel("final"))
        elif m.role in ("system", "developer"):
            out.append(oh.Message.from_role_and_content(
                oh.Role.DEVELOPER, oh.DeveloperContent.new().with_instructions(m.content)))
        else:
            raise InputError(f"Harmony has no role {m.role!r} for a message (user, assistant, system, developer)")
    return out


class HarmonyFormat(ChatFormat):
    """GPT-OSS's Harmony format. ``eog_tokens`` / ``eos_token``: the family's (arch/gpt_oss.py):
    the tokens that must be in the vocabulary and the EOS a GGUF should declare."""

    name = "harmony"

    def __init__(self, eog_tokens: Sequence[str] = (ANSWER_END, MESSAGE_END, "<|call|>"),
                 eos_token: str = ANSWER_END):
        self.eog_tokens = tuple(eog_tokens)
        self.eos_token = eos_token

    @property
    def label(self) -> str:
        return "Harmony"

    def render_prompt(self, user, *, system=None, developer=None, reasoning=None) -> Rendered:
        if isinstance(user, str):
            ids = render_prompt(user, system=system, developer=developer, reasoning=reasoning or "medium")
        else:
            import openai_harmony as oh

            sc = oh.SystemContent.new().with_conversation_start_date(DEFAULT_DATE)
            if system:
                sc = sc.with_model_identity(system)
            msgs = [oh.Message.from_role_and_content(oh.Role.SYSTEM, sc)] + _oh_messages(user)
            ids = list(encoding().render_conversation_for_completion(oh.Conversation.from_messages(msgs),
                                                                     oh.Role.ASSISTANT))
        return Rendered(decode(ids), ids)

    def render_conversation(self, messages: Sequence[Message]) -> Rendered:
        ids = render_conversation(messages)
        return Rendered(decode(ids), ids)

    def parse(self, tokens, tokenizer=None, *, stops=(), prompt="") -> Parsed:
        return parse_completion(list(tokens))

    def reference_tokens(self) -> TokenizerView:
        """The tokenizer the format renders with (openai-harmony's encoding)."""
        return HarmonyTokens()

    def reference_stops(self, declared: Mapping[str, int]) -> dict[str, int]:
        out = dict(declared)
        for t in REPLY_STOPS:
            if HARMONY_SPECIAL_TOKENS[t] not in out.values():
                out[t] = HARMONY_SPECIAL_TOKENS[t]
        return out

    def structure_check(self, parsed: Parsed, *, hit_limit: bool) -> StructureResult:
        problems = []
        if "analysis" not in parsed.channels:
            problems.append("no analysis message")
        if "final" not in parsed.channels:
            problems.append("no final message")
        if hit_limit:
            problems.append("ran to the token limit without a stop token")
        elif parsed.stop != ANSWER_END:
            problems.append(f"ended with {parsed.stop or 'no stop token'}, not {ANSWER_END}")
        problems += parsed.errors
        return StructureResult(not problems, "; ".join(problems) or f"analysis + final, stopped at {ANSWER_END}")

    def ollama(self, eog_tokens: Sequence[str]) -> OllamaSpec:
        stops = [t for t in (*eog_tokens, *self.eog_tokens) if t != MESSAGE_END]
        return OllamaSpec(OLLAMA_TEMPLATE, tuple(dict.fromkeys(stops)), None,
                          (f"{MESSAGE_END} closes the analysis message; the answer comes after it, so it is not a stop.",))

    def template_issues(self, tok: TokenizerFacts) -> list[Issue]:
        out: list[Issue] = []
        tpl = tok.template
        if tpl is None:
            out.append(Issue("CHAT_TEMPLATE_MISSING",
                             f"{tok.where}: no chat_template.jinja, chat_template.json or tokenizer_config.json "
                             "chat_template",
                             "without a template in the GGUF, llama.cpp and Ollama fall back to a generic format the "
                             "model was never trained on (GPT-OSS needs Harmony)",
                             "save the tokenizer with its template: tokenizer.save_pretrained(ADAPTER_DIR), or copy "
                             "chat_template.jinja from the base model"))
        else:
            missing = [m for m in ("<|channel|>", "<|message|>") if m not in tpl]
            if missing:
                out.append(Issue("CHAT_TEMPLATE_WRONG_FORMAT",
                                 f"{tok.where}/{tok.template_source}: the template never writes {', '.join(missing)}",
                                 "GPT-OSS is trained on the Harmony format (<|start|>role<|channel|>…<|message|>…); "
                                 "another format makes it ramble or never stop",
                                 "use the Harmony template of the base model (chat_template.jinja of openai/gpt-oss-20b)",
                                 {"format": self.name, "missing": missing, "source": tok.template_source}))
            if self.eog_tokens and not any(t in tpl for t in self.eog_tokens):
                out.append(Issue("CHAT_TEMPLATE_NO_EOG",
                                 f"{tok.where}/{tok.template_source}: the template writes none of "
                                 f"{', '.join(self.eog_tokens)}",
                                 "a model trained without turn-end tokens never emits one, so llama.cpp generates until "
                                 "the context is full", "use the base model's chat template",
                                 {"eog_tokens": list(self.eog_tokens)}))
        eos = tok.specials.get("eos_token")
        eos_id = tok.token_id(eos)
        missing = [t for t in self.eog_tokens if tok.token_id(t) is None]
        if missing:
            out.append(Issue("EOG_TOKEN_MISSING", f"{tok.where}: {', '.join(missing)} not in the vocabulary",
                             "llama.cpp stops generating at end-of-generation tokens found in the vocabulary; without "
                             "them a GPT-OSS model never stops", "use the base model's tokenizer.json",
                             {"missing": missing}))
        if eos is None or eos_id is None or not tok.is_special(eos):
            out.append(Issue("EOS_NOT_EOG",
                             f"{tok.where}: eos_token is {eos!r}"
                             + (" which is not in the vocabulary" if eos is not None and eos_id is None else "")
                             + (" which is not a special token" if eos_id is not None and not tok.is_special(eos) else ""),
                             "the GGUF's tokenizer.ggml.eos_token_id tells llama.cpp where an answer ends; a missing or "
                             "ordinary-text EOS lets generation run on forever",
                             f"set eos_token to {self.eos_token!r} in tokenizer_config.json "
                             f"(tokenizer.eos_token = {self.eos_token!r}; tokenizer.save_pretrained(DIR))",
                             {"eos_token": eos, "eos_id": eos_id, "expected": self.eos_token}))
        elif eos != self.eos_token:
            note = "" if eos in self.eog_tokens else " (not one of Harmony's end tokens)"
            out.append(Issue("EOS_NOT_ANSWER_END",
                             f"{tok.where}: eos_token is {eos!r} (id {eos_id}){note}; Harmony ends a final answer with "
                             f"{self.eos_token!r} (id {tok.token_id(self.eos_token)})",
                             "llama.cpp still stops at <|return|> / <|call|> (it recognises them by text), but "
                             "runtimes that only check EOS would run past the end of an answer",
                             f"set eos_token to {self.eos_token!r} in tokenizer_config.json",
                             {"format": self.name, "eos_token": eos, "eos_id": eos_id, "expected": self.eos_token}))
        return out


class HarmonyTokens:
    """openai-harmony's o200k_harmony encoding as a tokenizer view (the reference's tokens for
    Harmony prompts: what GPT-OSS was trained on)."""

    def encode(self, text: str) -> list[int]:
        return list(encoding().encode(text, allowed_special="all"))

    def decode(self, ids) -> str:
        return decode(list(ids))

    def is_control(self, token_id: int) -> bool:
        return int(token_id) >= min(HARMONY_SPECIAL_TOKENS.values())
