"""What every chat format provides, and the values they exchange with doctor, verify and report.

A chat format knows how a conversation becomes text (and, for Harmony, token ids), how a
completion splits back into reasoning and answer, which tokens end a reply, whether a reply has
the structure the format asks for, what an Ollama Modelfile needs, and what in a tokenizer's
template would break the model. The pipeline asks the format; it never asks which format it is.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, Sequence

from ..errors import InputError

#: The channel names a parsed completion uses: the reasoning (Harmony's analysis channel, a
#: ``<think>`` block) and the answer. Suite checks name them (``channel: final|analysis|all``).
REASONING = "analysis"
ANSWER = "final"
#: :attr:`TokenizerFacts.eog`'s label of the id the GGUF declares as its EOS
EOS = "EOS"


class TokenizerView(Protocol):
    """What a chat format needs from a tokenizer (llama.cpp's for a GGUF, the fine-tune's for the
    reference, see :mod:`lora2gguf.verify.tokens`)."""

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, special tokens parsed, nothing added (no BOS)."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` with special tokens written out."""
        ...

    def is_control(self, token_id: int) -> bool:
        """Is ``token_id`` a special (control) token rather than text?"""
        ...


@dataclass
class Message:
    role: str
    content: str
    reasoning: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.reasoning is not None:
            d["reasoning_content"] = self.reasoning
        return d


@dataclass
class Rendered:
    """A rendered conversation: its text, and the format's own token ids where the format has a
    tokenizer of its own (Harmony: openai-harmony's rendering); None: tokenize ``text``."""

    text: str
    ids: list[int] | None = None


@dataclass
class Parsed:
    """A completion split into messages.

    ``messages`` are (channel, text) pairs in order (:data:`REASONING`, :data:`ANSWER`, or
    another Harmony channel); ``stop`` is the text of the token that ended the completion, or
    None when it ran out of tokens; ``errors`` lists structural problems found while parsing (a
    parse never raises); ``reasoning_expected``: the prompt asked for a reasoning block (a
    template with ``<think>`` blocks whose prompt did not close one)."""

    messages: list[tuple[str | None, str]] = field(default_factory=list)
    stop: str | None = None
    errors: list[str] = field(default_factory=list)
    reasoning_expected: bool = False

    def channel(self, name: str) -> str | None:
        """Text of the last message on channel ``name`` (None if there is none)."""
        found = [t for c, t in self.messages if c == name]
        return found[-1] if found else None

    @property
    def channels(self) -> list[str | None]:
        return [c for c, _ in self.messages]


@dataclass(frozen=True)
class StructureResult:
    passed: bool
    detail: str


@dataclass(frozen=True)
class Issue:
    """A problem doctor reports: its finding code (the codes, severities and titles live in
    :mod:`lora2gguf.doctor.findings`), what was seen, why it matters, how to fix it."""

    code: str
    what: str
    why: str = ""
    fix: str = ""
    data: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OllamaSpec:
    """What an Ollama Modelfile needs: a Go-template TEMPLATE (None: leave it to Ollama), the
    ``PARAMETER stop`` strings, a default SYSTEM message, and comment lines saying why."""

    template: str | None
    stops: tuple[str, ...]
    system: str | None = None
    comments: tuple[str, ...] = ()


@dataclass(frozen=True)
class TokenizerFacts:
    """What doctor knows of the tokenizer the GGUF gets, without running it: where it is, its
    chat template, special tokens by role (bos_token, eos_token ...) as text, the id of an added
    or special token by its text, and the end-of-generation ids, id -> where it comes from
    (:data:`EOS`: the GGUF's metadata declares it; else the base's generation_config.json or
    config.json ``eos_token_id``, which transformers stops on and the GGUF does not carry)."""

    where: str
    template: str | None
    template_source: str | None
    specials: Mapping[str, str | None]
    added: Mapping[str, tuple[int, bool]]  # added token text -> (id, special)
    vocab: Mapping[str, int]
    eog: Mapping[int, str]

    def token_id(self, text: str | None) -> int | None:
        if text is None:
            return None
        if text in self.added:
            return self.added[text][0]
        return self.vocab.get(text)

    def is_special(self, text: str | None) -> bool:
        return text is not None and text in self.added and self.added[text][1]

    def text_of(self, token_id: int) -> str | None:
        for t, (i, _) in self.added.items():
            if i == token_id:
                return t
        for t, i in self.vocab.items():
            if i == token_id:
                return t
        return None


class ChatFormat(ABC):
    """One chat format. Instances are made by :func:`lora2gguf.chat.chat_format`."""

    #: the format's key ("harmony", "jinja")
    name: str = ""

    @property
    @abstractmethod
    def label(self) -> str:
        """A name for people: "Harmony", "ChatML", "Llama 3", ..."""

    @property
    def structure_label(self) -> str:
        """The label of the suite's structure check for this format."""
        return f"{self.label} structure"

    @property
    def evaluation_text_label(self) -> str:
        """How the report describes the rendered evaluation text."""
        return f"a {self.label} conversation"

    @abstractmethod
    def render_prompt(self, user: str | Sequence[Message], *, system: str | None = None,
                      developer: str | None = None, reasoning: str | None = None) -> Rendered:
        """A conversation ready for the assistant's reply: one user message (or ``messages``),
        after an optional system message and developer instructions."""

    @abstractmethod
    def render_conversation(self, messages: Sequence[Message]) -> Rendered:
        """A finished conversation (system, user and assistant messages, an assistant's reasoning
        kept), as the model saw it in training: calibration data for an importance matrix."""

    def render_text(self, text: str) -> Rendered:
        """verify's evaluation text as a finished conversation: its blank-line-separated
        paragraphs alternate as user messages and assistant answers."""
        paras = [p.strip() for p in text.split("\n\n") if p.strip()]
        if not paras:
            raise InputError("the evaluation text is empty")
        return self.render_conversation([Message("user" if i % 2 == 0 else "assistant", p)
                                         for i, p in enumerate(paras)])

    @abstractmethod
    def parse(self, tokens: Sequence[int], tokenizer: TokenizerView | None, *, stops: Sequence[int] = (),
              prompt: str = "") -> Parsed:
        """Split a completion (the ids generated after the prompt) into reasoning and answer.
        ``stops``: the ids generation stopped on; ``prompt``: the rendered prompt's text (a
        template may open a reasoning block in it)."""

    def reference_tokens(self) -> TokenizerView | None:
        """A tokenizer of the format's own that the fine-tune's prompts are tokenized with
        (Harmony's openai-harmony encoding); None: the fine-tune's tokenizer."""
        return None

    def reference_stops(self, declared: Mapping[str, int]) -> dict[str, int]:
        """The ids the reference (the fine-tune) stops on: ``declared`` (its tokenizer's EOS,
        generation_config.json's eos_token_id) plus any the format itself ends replies with."""
        return dict(declared)

    @abstractmethod
    def structure_check(self, parsed: Parsed, *, hit_limit: bool) -> StructureResult:
        """Does the completion have the format's structure: a finished assistant turn (not cut
        off at the token limit), the channels the format asks for?"""

    @abstractmethod
    def ollama(self, eog_tokens: Sequence[str]) -> OllamaSpec:
        """The Modelfile's TEMPLATE, stops and comments; ``eog_tokens``: the text of the
        end-of-generation tokens the GGUF declares (EOS, EOT, EOM)."""

    @abstractmethod
    def template_issues(self, tok: TokenizerFacts) -> list[Issue]:
        """doctor's checks of the template and the end-of-generation tokens."""

    def describe(self) -> dict[str, Any]:
        """What run.json records about the format."""
        return {"name": self.name, "label": self.label}
