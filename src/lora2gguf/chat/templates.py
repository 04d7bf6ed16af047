"""Chat-template families lora2gguf knows by name, as data: how each writes a conversation, the
Ollama Go template that writes it the same way, and the stop strings Ollama needs.

A model's Jinja template is *identified* as one of them by rendering a few probe conversations
(a question; question, answer, follow-up; both again after a system message) and comparing the
text with this module's rendering of the same conversations: a family is claimed only when every
probe the template renders comes out identical (the BOS the template writes first is left out:
llama.cpp and Ollama add it). The system message is found the same way: where the template
puts it (a system turn of its own, the first or the last user message, Llama 2's ``<<SYS>>``),
text it always writes before it (Llama 3.1's knowledge-cutoff and date lines), and a default
one it writes when there is none (Qwen2.5's, SmolLM2's). A template that matches nothing gets
no Ollama TEMPLATE (the Modelfile says so).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

SYSTEM = "lora2gguf probe system"
Q1, A1, Q2 = "lora2gguf probe question", "lora2gguf probe answer", "lora2gguf probe follow-up"

#: (name, messages); every probe ends with a user message and asks for the assistant's reply
PROBES: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    ("ask", (("user", Q1),)),
    ("turns", (("user", Q1), ("assistant", A1), ("user", Q2))),
    ("sys_ask", (("system", SYSTEM), ("user", Q1))),
    ("sys_turns", (("system", SYSTEM), ("user", Q1), ("assistant", A1), ("user", Q2))),
)


@dataclass(frozen=True)
class SystemStyle:
    """Where a template puts the system message: ``where`` is "none" (it takes none), "block" (a
    turn of its own), "first_user" / "last_user" (prepended to that user message, ``sep``
    between) or "llama2" (``<<SYS>>`` in the first user message); ``prefix``: text always
    written before it; ``default``: the system text written when the conversation has none."""

    where: str
    prefix: str = ""
    default: str | None = None
    sep: str = "\n\n"


def _go_text(s: str) -> str:
    """Literal text for a Go template (``{{`` would open an action)."""
    return s.replace("{{", '{{ "{{" }}')


Msgs = Sequence[Mapping[str, str]]


@dataclass(frozen=True)
class TemplateFamily:
    key: str
    label: str
    #: Ollama stop strings beyond the turn end and the GGUF's end-of-generation tokens: what a
    #: runaway model would write next (the start of a new turn)
    stops: tuple[str, ...]
    #: system placements this family's templates use
    wheres: tuple[str, ...]
    render_fn: Callable[[Msgs, SystemStyle, Mapping[str, str]], str]
    go_fn: Callable[[SystemStyle, Mapping[str, str]], str]
    #: the content of a system turn in a rendering (families with "block" placement)
    block_re: re.Pattern | None = None

    def render(self, messages: Msgs, style: SystemStyle, specials: Mapping[str, str]) -> str:
        return self.render_fn(messages, style, specials)

    def styles(self, outs: Mapping[str, str | None]) -> list[SystemStyle]:
        """The system placements that could explain the probe renderings ``outs``."""
        sys_ok = outs.get("sys_ask") is not None and outs.get("sys_turns") is not None
        if self.block_re is not None:
            m = self.block_re.match(outs["ask"] or "")
            default = m.group(1) if m else None
            if not sys_ok:
                return [SystemStyle("none", default=default)]
            m = self.block_re.match(outs["sys_ask"] or "")
            if m is None or not m.group(1).endswith(SYSTEM):
                return []
            prefix = m.group(1)[: -len(SYSTEM)]
            if prefix and default != prefix:
                return []
            return [SystemStyle("block", prefix, default)]
        if not sys_ok:
            return [SystemStyle("none")]
        return [SystemStyle(w) for w in self.wheres if w != "none"]


@dataclass(frozen=True)
class Match:
    """A model template identified as ``family``, with its system placement."""

    family: TemplateFamily
    system: SystemStyle
    specials: Mapping[str, str]

    @property
    def key(self) -> str:
        return self.family.key

    @property
    def label(self) -> str:
        return self.family.label

    @property
    def stops(self) -> tuple[str, ...]:
        return self.family.stops

    def go_template(self) -> str:
        return self.family.go_fn(self.system, self.specials)

    def render(self, messages: Msgs) -> str:
        return self.family.render(messages, self.system, self.specials)


def _split(messages: Msgs) -> tuple[str | None, list[Mapping[str, str]]]:
    system = next((m["content"] for m in messages if m["role"] == "system"), None)
    return system, [m for m in messages if m["role"] != "system"]


def _block_system(system: str | None, style: SystemStyle) -> str | None:
    """The text of the system turn (None: no system turn)."""
    if style.where == "block" and system is not None:
        return style.prefix + system
    return style.default


# --------------------------------------------------------------------------- ChatML (Qwen, SmolLM2, Hermes)


def _chatml(messages: Msgs, style: SystemStyle, sp: Mapping[str, str]) -> str:
    system, rest = _split(messages)
    out = []
    block = _block_system(system, style)
    if block is not None:
        out.append(f"<|im_start|>system\n{block}<|im_end|>\n")
    out += [f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in rest]
    return "".join(out) + "<|im_start|>assistant\n"


def _chatml_go(style: SystemStyle, sp: Mapping[str, str]) -> str:
    if style.where == "block" and style.prefix:
        head = f"<|im_start|>system\n{_go_text(style.prefix)}{{{{ .System }}}}<|im_end|>\n"
    elif style.where == "block":
        head = "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
    elif style.default is not None:
        head = f"<|im_start|>system\n{_go_text(style.default)}<|im_end|>\n"
    else:
        head = ""
    return (head + '{{ range .Messages }}{{ if or (eq .Role "user") (eq .Role "assistant") }}'
            "<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}{{ end }}<|im_start|>assistant\n")


CHATML = TemplateFamily(
    "chatml", "ChatML", ("<|im_start|>",), ("none", "block"), _chatml, _chatml_go,
    re.compile(r"<\|im_start\|>system\n(.*?)<\|im_end\|>\n", re.S))


# --------------------------------------------------------------------------- Llama 3


def _llama3(messages: Msgs, style: SystemStyle, sp: Mapping[str, str]) -> str:
    system, rest = _split(messages)
    out = []
    block = _block_system(system.strip() if system is not None else None, style)
    if block is not None:
        out.append(f"<|start_header_id|>system<|end_header_id|>\n\n{block}<|eot_id|>")
    out += [f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>" for m in rest]
    return "".join(out) + "<|start_header_id|>assistant<|end_header_id|>\n\n"


def _llama3_go(style: SystemStyle, sp: Mapping[str, str]) -> str:
    if style.where == "block" and style.prefix:
        head = f"<|start_header_id|>system<|end_header_id|>\n\n{_go_text(style.prefix)}{{{{ .System }}}}<|eot_id|>"
    elif style.where == "block":
        head = "{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
    elif style.default is not None:
        head = f"<|start_header_id|>system<|end_header_id|>\n\n{_go_text(style.default)}<|eot_id|>"
    else:
        head = ""
    return (head + '{{ range .Messages }}{{ if or (eq .Role "user") (eq .Role "assistant") }}'
            "<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}{{ end }}"
            "<|start_header_id|>assistant<|end_header_id|>\n\n")


LLAMA3 = TemplateFamily(
    "llama3", "Llama 3", ("<|start_header_id|>", "<|end_header_id|>"), ("none", "block"), _llama3, _llama3_go,
    re.compile(r"<\|start_header_id\|>system<\|end_header_id\|>\n\n(.*?)<\|eot_id\|>", re.S))


# --------------------------------------------------------------------------- Mistral [INST], Llama 2


def _with_system(rest: list[Mapping[str, str]], system: str | None, style: SystemStyle) -> list[str]:
    """User contents with the system text prepended where ``style`` puts it."""
    users = [i for i, m in enumerate(rest) if m["role"] == "user"]
    texts = [m["content"] for m in rest]
    if system is not None and users and style.where in ("first_user", "last_user"):
        i = users[0] if style.where == "first_user" else users[-1]
        texts[i] = system + style.sep + texts[i]
    return texts


def _mistral_v1(messages: Msgs, style: SystemStyle, sp: Mapping[str, str]) -> str:
    system, rest = _split(messages)
    texts = _with_system(rest, system, style)
    out = []
    for m, t in zip(rest, texts):
        out.append(f"[INST] {t} [/INST]" if m["role"] == "user" else f"{t}{sp.get('eos_token', '')}")
    return "".join(out)


def _mistral_v3(messages: Msgs, style: SystemStyle, sp: Mapping[str, str]) -> str:
    system, rest = _split(messages)
    texts = _with_system(rest, system, style)
    out = []
    for m, t in zip(rest, texts):
        out.append(f"[INST] {t}[/INST]" if m["role"] == "user" else f" {t.strip()}{sp.get('eos_token', '')}")
    return "".join(out)


def _system_at(style: SystemStyle, content: str) -> str:
    """Go text for a user message's content with the system message where ``style`` puts it
    (``$i``: the message's index; ``$first``: no user message came before)."""
    sep = _go_text(style.sep)
    if style.where == "last_user":
        return f"{{{{ if and $.System (eq (len (slice $.Messages $i)) 1) }}}}{{{{ $.System }}}}{sep}{{{{ end }}}}{content}"
    if style.where == "first_user":
        return f"{{{{ if and $.System $first }}}}{{{{ $.System }}}}{sep}{{{{ end }}}}{content}"
    return content


def _mistral_go(close: str, answer: str):
    def go(style: SystemStyle, sp: Mapping[str, str]) -> str:
        eos = _go_text(sp.get("eos_token", ""))
        return ('{{ $first := true }}{{ range $i, $m := .Messages }}{{ if eq $m.Role "user" }}[INST] '
                + _system_at(style, "{{ $m.Content }}") + close + "{{ $first = false }}"
                + '{{ else if eq $m.Role "assistant" }}' + answer + eos + "{{ end }}{{ end }}")

    return go


MISTRAL_V1 = TemplateFamily("mistral-v1", "Mistral [INST]", ("[INST]",), ("none", "first_user", "last_user"),
                            _mistral_v1, _mistral_go(" [/INST]", "{{ $m.Content }}"))
MISTRAL_V3 = TemplateFamily("mistral-v3", "Mistral [INST]", ("[INST]",), ("none", "first_user", "last_user"),
                            _mistral_v3, _mistral_go("[/INST]", " {{ $m.Content }}"))


def _llama2(messages: Msgs, style: SystemStyle, sp: Mapping[str, str]) -> str:
    system, rest = _split(messages)
    bos, eos = sp.get("bos_token", ""), sp.get("eos_token", "")
    out = []
    first = True
    for m in rest:
        if m["role"] == "user":
            t = m["content"]
            if first and system is not None and style.where == "llama2":
                t = f"<<SYS>>\n{system}\n<</SYS>>\n\n{t}"
            out.append(("" if first else bos) + f"[INST] {t.strip()} [/INST]")
            first = False
        else:
            out.append(f" {m['content'].strip()} {eos}")
    return "".join(out)


def _llama2_go(style: SystemStyle, sp: Mapping[str, str]) -> str:
    bos, eos = _go_text(sp.get("bos_token", "")), _go_text(sp.get("eos_token", ""))
    sys = ("{{ if and $first $.System }}<<SYS>>\n{{ $.System }}\n<</SYS>>\n\n{{ end }}"
           if style.where == "llama2" else "")
    return ('{{ $first := true }}{{ range .Messages }}{{ if eq .Role "user" }}{{ if not $first }}' + bos
            + "{{ end }}[INST] " + sys + "{{ .Content }} [/INST]{{ $first = false }}"
            + '{{ else if eq .Role "assistant" }} {{ .Content }} ' + eos + "{{ end }}{{ end }}")


LLAMA2 = TemplateFamily("llama2", "Llama 2 [INST]", ("[INST]",), ("none", "llama2"), _llama2, _llama2_go)


# --------------------------------------------------------------------------- Gemma


def _gemma(messages: Msgs, style: SystemStyle, sp: Mapping[str, str]) -> str:
    system, rest = _split(messages)
    texts = _with_system(rest, system, style)
    out = []
    for m, t in zip(rest, texts):
        role = "model" if m["role"] == "assistant" else m["role"]
        out.append(f"<start_of_turn>{role}\n{t.strip()}<end_of_turn>\n")
    return "".join(out) + "<start_of_turn>model\n"


def _gemma_go(style: SystemStyle, sp: Mapping[str, str]) -> str:
    return ('{{ $first := true }}{{ range $i, $m := .Messages }}{{ if eq $m.Role "user" }}<start_of_turn>user\n'
            + _system_at(style, "{{ $m.Content }}") + "<end_of_turn>\n{{ $first = false }}"
            + '{{ else if eq $m.Role "assistant" }}<start_of_turn>model\n{{ $m.Content }}<end_of_turn>\n'
            "{{ end }}{{ end }}<start_of_turn>model\n")


GEMMA = TemplateFamily("gemma", "Gemma", ("<start_of_turn>",), ("none", "first_user"), _gemma, _gemma_go)

#: the known families, tried in this order
FAMILIES: tuple[TemplateFamily, ...] = (CHATML, LLAMA3, MISTRAL_V1, MISTRAL_V3, LLAMA2, GEMMA)


def probe_messages(name: str) -> list[dict[str, str]]:
    return [{"role": r, "content": c} for r, c in dict(PROBES)[name]]


def identify(run: Callable[[list[dict[str, Any]], bool], str], *, bos: str = "",
             specials: Mapping[str, str | None] | None = None) -> Match | None:
    """The family whose rendering equals ``run(messages, add_generation_prompt)`` (the model's
    template, BOS left out) on every probe it renders; None when none does or the template
    fails on the probes without a system message."""
    from .jinja import TemplateRenderError

    sp = {k: v for k, v in (specials or {}).items() if isinstance(v, str)}
    outs: dict[str, str | None] = {}
    for name, _ in PROBES:
        try:
            outs[name] = run(probe_messages(name), True)
        except TemplateRenderError:
            outs[name] = None
    if outs["ask"] is None or outs["turns"] is None:
        return None
    for fam in FAMILIES:
        for style in fam.styles(outs):
            if all(out == fam.render(probe_messages(name), style, sp) for name, out in outs.items() if out is not None):
                return Match(fam, style, sp)
    return None
