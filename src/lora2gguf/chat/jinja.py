"""The model's own Jinja chat template as a chat format (ChatML, Llama 3, Mistral ``[INST]``,
Gemma, and any other template): prompts rendered the way transformers' ``apply_chat_template``
renders them, completions parsed by what the template writes around an assistant message.

Rendering follows transformers (``utils/chat_template_utils.py``) without importing it: a
sandboxed jinja2 environment with ``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols``
extension and a ``{% generation %}`` block, ``raise_exception``, ``strftime_now``, a ``tojson``
that does not escape HTML, ``namespace`` and ``dict``; the tokenizer's special tokens
(``bos_token``, ``eos_token``, ...) as variables; ``add_generation_prompt``. The result is text:
each model tokenizes it with its own tokenizer, special tokens parsed and nothing added, as
``apply_chat_template(tokenize=True)`` does.

What the format knows about a template it learns by rendering it: a conversation whose
assistant message is a sentinel shows what the template writes after an assistant's message
(the turn end: ``<|eot_id|>``, ``<|im_end|>\\n``, ``</s>``), and a template that writes
``<think>`` has reasoning blocks. Known template families (for Ollama) are in
:mod:`lora2gguf.chat.templates`.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from ..errors import InputError
from .base import (ANSWER, EOS, REASONING, ChatFormat, Issue, Message, OllamaSpec, Parsed, Rendered, StructureResult,
                   TokenizerFacts, TokenizerView)

#: what the probe conversations say (plain words: no template transforms them)
SENTINEL_USER = "lora2gguf probe question"
SENTINEL_ANSWER = "lora2gguf probe answer"

#: reasoning-block tags a template may write (Qwen3, DeepSeek-R1 distills, QwQ, SmolLM3)
THINK_TAGS: tuple[tuple[str, str], ...] = (("<think>", "</think>"),)

#: the special-token roles transformers passes to a template (``special_tokens_map``)
SPECIAL_ROLES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

#: a token-looking text at the start of a turn end when the tokenizer is not at hand
_TOKEN_RE = re.compile(r"<\|[^<>|\s]+\|>|<[^<>\s]+>|\[[^\[\]\s]+\]")


# ---------------------------------------------------------------------------------------------
# rendering, as transformers does it


@functools.lru_cache(maxsize=1)
def _environment():
    try:
        import jinja2
        from jinja2.ext import Extension, loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:  # a declared dependency; only a broken install lacks it
        raise InputError("rendering chat templates needs jinja2: pip install 'jinja2>=3.1'") from e

    class Generation(Extension):
        """transformers' ``{% generation %}...{% endgeneration %}`` block (it marks the
        assistant's tokens for training); rendering just writes its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class Namespace(jinja2.utils.Namespace):
        """``namespace()`` without underscore attributes (as transformers' TemplateNamespace)."""

        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"a chat template may not set {name!r} on a namespace")

    class TemplateDict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return _dt.datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = Namespace
    return env


@functools.lru_cache(maxsize=32)
def _compiled(source: str):
    return _environment().from_string(source)


class TemplateRenderError(InputError):
    """A chat template raised or could not be compiled."""


def render(source: str, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool,
           specials: Mapping[str, str | None] | None = None, where: str = "the chat template",
           **kwargs: Any) -> str:
    """``source`` rendered on ``messages`` as ``apply_chat_template(tokenize=False)`` renders it;
    raises TemplateRenderError naming ``where`` when the template fails."""
    import jinja2

    try:
        tpl = _compiled(source)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateRenderError(f"{where}: the chat template is not valid Jinja (line {e.lineno}: {e.message}); "
                                  "fix it or copy the base model's template") from None
    msgs = []
    for m in messages:
        d = {k: v for k, v in dict(m).items() if v is not None}
        reasoning = next((d[k] for k in ("reasoning_content", "thinking", "reasoning") if d.get(k) is not None), None)
        if reasoning is not None:  # transformers' aliases: templates read one name or another
            d = {"thinking": reasoning, **d, "reasoning_content": reasoning}
        msgs.append(d)
    variables = {role: value for role, value in (specials or {}).items() if value is not None}
    variables.update(kwargs)
    try:
        return tpl.render(messages=msgs, tools=None, documents=None, add_generation_prompt=add_generation_prompt,
                          **variables)
    except jinja2.TemplateError as e:
        raise TemplateRenderError(f"{where}: the chat template fails on a conversation of "
                                  f"{'/'.join(m.get('role', '?') for m in msgs)} messages: {e}") from None
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
        raise TemplateRenderError(f"{where}: the chat template fails on a conversation of "
                                  f"{'/'.join(m.get('role', '?') for m in msgs)} messages: "
                                  f"{type(e).__name__}: {e}") from None


# ---------------------------------------------------------------------------------------------
# what a template writes around an assistant message


@dataclass(frozen=True)
class Anatomy:
    """What a template writes, learnt from probe conversations.

    ``generation_prompt``: what ``add_generation_prompt`` appends after a user message
    (``<|im_start|>assistant\\n``); ``after_answer``: what follows an assistant message's content
    when the conversation ends there (``<|eot_id|>``, ``<|im_end|>\\n``, ``</s>``; "" when the
    template writes nothing); ``error``: why the probes failed (then the rest is empty)."""

    generation_prompt: str = ""
    after_answer: str = ""
    error: str | None = None

    def turn_end(self, candidates: Sequence[str] = ()) -> str | None:
        """The token that ends an assistant turn: the longest of ``candidates`` (the tokenizer's
        added tokens) that the text after an answer starts with (past spaces), else a
        token-looking text there (``<|...|>``, ``<...>``, ``[...]``); None when none."""
        after = self.after_answer.lstrip(" ")
        hits = [c for c in candidates if c and after.startswith(c)]
        if hits:
            return max(hits, key=len)
        m = _TOKEN_RE.match(after)
        return m.group(0) if m else None


def _strip_bos(text: str, bos: str | None) -> str:
    return text[len(bos):] if bos and text.startswith(bos) else text


class JinjaFormat(ChatFormat):
    """A model's own chat template. ``template``: its text (None: the tokenizer has none: only
    :meth:`template_issues` works); ``specials``: the special tokens by role (``bos_token``,
    ``eos_token``, ...), as the tokenizer has them; ``where``: the file or GGUF it came from,
    for messages."""

    name = "jinja"

    def __init__(self, template: str | None, specials: Mapping[str, str | None] | None = None, *,
                 where: str = "the chat template"):
        self.template = template
        self.specials = {k: v for k, v in (specials or {}).items() if k in SPECIAL_ROLES}
        self.where = where
        self.think = next(((o, c) for o, c in THINK_TAGS if template and o in template and c in template), None)

    # ---------------------------------------------------------------- rendering

    def _source(self) -> str:
        if self.template is None:
            raise InputError(f"{self.where}: no chat template; verify renders prompts with the model's own template. "
                             "Save the tokenizer with its template (tokenizer.save_pretrained(DIR)) and rebuild")
        return self.template

    def render_messages(self, messages: Sequence[Message | Mapping[str, Any]], *, add_generation_prompt: bool,
                        **kwargs: Any) -> str:
        msgs = [m.to_dict() if isinstance(m, Message) else dict(m) for m in messages]
        return render(self._source(), msgs, add_generation_prompt=add_generation_prompt, specials=self.specials,
                      where=self.where, **kwargs)

    def _kwargs(self, reasoning: str | None) -> dict[str, Any]:
        if self.think is None:
            return {}
        return {"enable_thinking": str(reasoning or "").lower() not in ("off", "none", "false", "no")}

    def render_prompt(self, user, *, system=None, developer=None, reasoning=None) -> Rendered:
        msgs: list[Message] = []
        sys_text = "\n\n".join(x for x in (system, developer) if x)
        if sys_text:
            msgs.append(Message("system", sys_text))
        msgs += [Message("user", user)] if isinstance(user, str) else list(user)
        try:
            return Rendered(self.render_messages(msgs, add_generation_prompt=True, **self._kwargs(reasoning)))
        except TemplateRenderError as e:
            if sys_text:
                raise TemplateRenderError(f"{e}. The suite gives a system message (`system:`/`developer:`); this "
                                          "template may not take one: remove them from the suite") from None
            raise

    def render_conversation(self, messages: Sequence[Message]) -> Rendered:
        return Rendered(self.render_messages(messages, add_generation_prompt=False, **self._kwargs(None)))

    # ---------------------------------------------------------------- anatomy

    @functools.cached_property
    def anatomy(self) -> Anatomy:
        if self.template is None:
            return Anatomy(error="no chat template")
        u = Message("user", SENTINEL_USER)
        try:
            alone = self.render_messages([u], add_generation_prompt=False)
            asking = self.render_messages([u], add_generation_prompt=True)
            answered = self.render_messages([u, Message("assistant", SENTINEL_ANSWER)], add_generation_prompt=False)
        except TemplateRenderError as e:
            return Anatomy(error=str(e))
        gen = asking[len(alone):] if asking.startswith(alone) else ""
        i = answered.rfind(SENTINEL_ANSWER)
        if i < 0:
            return Anatomy(gen, "", "the template does not write the assistant's message")
        return Anatomy(gen, answered[i + len(SENTINEL_ANSWER):])

    def turn_end(self, candidates: Sequence[str] = ()) -> str | None:
        return self.anatomy.turn_end(candidates)

    @functools.cached_property
    def known(self):
        """The known template family this template renders exactly as (None: not one we know)."""
        if self.template is None or self.anatomy.error:
            return None
        from .templates import identify

        # the BOS a template writes first is left out (llama.cpp and Ollama add it); a template that
        # never names bos_token writes none (SmolLM2's bos_token is <|im_start|>: its first turn)
        bos = self.specials.get("bos_token") if "bos_token" in self.template else None

        def run(msgs: list[dict[str, Any]], gen: bool) -> str:
            return _strip_bos(self.render_messages(msgs, add_generation_prompt=gen), bos)

        return identify(run, bos=bos or "", specials=self.specials)

    @property
    def label(self) -> str:
        k = self.known
        base = k.label if k is not None else "chat template"
        return base + (" with reasoning blocks" if self.think and k is not None else "")

    @property
    def structure_label(self) -> str:
        k = self.known
        return f"{k.label} structure" if k is not None else "chat structure"

    @property
    def evaluation_text_label(self) -> str:
        return f"a conversation in the model's chat template ({self.label})"

    # ---------------------------------------------------------------- completions

    def parse(self, tokens, tokenizer: TokenizerView | None, *, stops=(), prompt: str = "") -> Parsed:
        if tokenizer is None:
            raise InputError("parsing a completion in a Jinja chat format needs the model's tokenizer")
        toks = [int(t) for t in tokens]
        out = Parsed()
        stop_set = set(int(s) for s in stops)
        body = toks
        if toks and toks[-1] in stop_set:
            out.stop = tokenizer.decode([toks[-1]])
            body = toks[:-1]
        think_texts = set(self.think or ())
        for i, t in enumerate(body):
            if tokenizer.is_control(t):
                piece = tokenizer.decode([t])
                if piece in think_texts:
                    continue
                out.errors.append(f"the control token {piece!r} inside the reply, at token {i}")
                body = body[:i]
                break
        text = tokenizer.decode(body)
        reasoning, answer = None, text
        if self.think:
            o, c = self.think
            opened = prompt.rfind(o) > prompt.rfind(c)
            out.reasoning_expected = opened or not prompt.rstrip().endswith(c)
            s = (o + text) if opened else text
            head = s.lstrip()
            if head.startswith(o):
                inner = head[len(o):]
                j = inner.find(c)
                if j < 0:
                    reasoning, answer = inner.strip(), None
                    out.errors.append(f"the reasoning block is never closed with {c}")
                else:
                    reasoning, answer = inner[:j].strip(), inner[j + len(c):]
            elif c in s:
                j = s.find(c)
                reasoning, answer = s[:j].strip(), s[j + len(c):]
                out.errors.append(f"{c} without {o}")
        if reasoning is not None:
            out.messages.append((REASONING, reasoning))
        if answer is not None:
            out.messages.append((ANSWER, answer.strip()))
        return out

    def structure_check(self, parsed: Parsed, *, hit_limit: bool) -> StructureResult:
        problems = []
        end = self.turn_end()
        if hit_limit:
            problems.append("ran to the token limit without a stop token")
        elif parsed.stop is None:
            problems.append("ended without a stop token")
        elif end is not None and parsed.stop != end:
            problems.append(f"ended with {parsed.stop}, not the turn end {end}")
        if self.think and parsed.reasoning_expected and REASONING not in parsed.channels:
            problems.append(f"no reasoning block ({self.think[0]}…{self.think[1]})")
        answer = parsed.channel(ANSWER)
        if answer is None:
            problems.append("no answer")
        elif not answer:
            problems.append("an empty answer")
        problems += parsed.errors
        if problems:
            return StructureResult(False, "; ".join(problems))
        what = "reasoning + answer" if REASONING in parsed.channels else "an answer"
        return StructureResult(True, f"{what}, stopped at {parsed.stop}")

    # ---------------------------------------------------------------- Ollama

    def ollama(self, eog_tokens: Sequence[str]) -> OllamaSpec:
        end = self.turn_end(eog_tokens)
        k = self.known
        stops = [s for s in (end, *(k.stops if k is not None else ()), *eog_tokens) if s]
        stops = list(dict.fromkeys(stops))
        if k is None:
            why = (self.anatomy.error or "it is not one of the template families lora2gguf knows "
                   "(ChatML, Llama 3, Mistral [INST], Llama 2, Gemma)")
            return OllamaSpec(None, tuple(stops), None, (
                f"No TEMPLATE: {why}. Ollama then picks a template from the GGUF's embedded chat template; check the "
                "one it chose with `ollama show MODEL --template` before relying on it.",))
        comments = [f"{k.label} chat format: this TEMPLATE renders the conversations lora2gguf tried exactly as the "
                    "model's own chat template does."]
        if k.system.prefix:
            comments.append("The template always writes a system header starting with text fixed at conversion "
                            "time (a date, for Llama 3.1+): " + json.dumps(k.system.prefix))
        if self.think:
            comments.append(f"The model writes its reasoning in {self.think[0]}…{self.think[1]} before the answer.")
        return OllamaSpec(k.go_template(), tuple(stops), k.system.default if not k.system.prefix else None,
                          tuple(comments))

    # ---------------------------------------------------------------- doctor

    def template_issues(self, tok: TokenizerFacts) -> list[Issue]:
        out: list[Issue] = []
        if self.template is None:
            return [Issue("CHAT_TEMPLATE_MISSING",
                          f"{tok.where}: no chat_template.jinja, chat_template.json or tokenizer_config.json "
                          "chat_template",
                          "without a template in the GGUF, llama.cpp and Ollama fall back to a generic format the model "
                          "was never trained on, and verify cannot render prompts the way the fine-tune saw them",
                          "save the tokenizer with its template: tokenizer.save_pretrained(ADAPTER_DIR), or copy "
                          "chat_template.jinja from the model the adapter was trained with")]
        src = f"{tok.where}/{tok.template_source}" if tok.template_source else tok.where
        a = self.anatomy
        if a.error:
            return [Issue("CHAT_TEMPLATE_INVALID", f"{src}: {a.error}",
                          "llama.cpp, Ollama and verify render every prompt with this template; one that fails on a "
                          "plain user/assistant conversation breaks every chat",
                          "use the chat template of the model the adapter was trained with", {"error": a.error})]
        eos = tok.specials.get("eos_token")
        eos_id = tok.token_id(eos)
        if eos is None or eos_id is None or not tok.is_special(eos):
            out.append(Issue("EOS_NOT_EOG",
                             f"{tok.where}: eos_token is {eos!r}"
                             + (" which is not in the vocabulary" if eos is not None and eos_id is None else "")
                             + (" which is not a special token" if eos_id is not None and not tok.is_special(eos) else ""),
                             "the GGUF's tokenizer.ggml.eos_token_id tells llama.cpp where an answer ends; a missing or "
                             "ordinary-text EOS lets generation run on forever",
                             "set eos_token in tokenizer_config.json to the token the template ends an assistant turn "
                             "with (tokenizer.eos_token = ...; tokenizer.save_pretrained(DIR))",
                             {"eos_token": eos, "eos_id": eos_id}))
        end = a.turn_end([t for t in tok.added])
        end_id = tok.token_id(end)
        shown = json.dumps(a.after_answer[:40])
        if end is None or end_id is None:
            out.append(Issue("CHAT_TEMPLATE_NO_EOG",
                             f"{src}: after an assistant message the template writes {shown}, which does not start with "
                             "a token of the vocabulary" if a.after_answer else
                             f"{src}: the template writes nothing after an assistant message",
                             "a model learns to stop by producing the token that ends its turn in training; without one "
                             "it never emits an end-of-generation token and llama.cpp generates until the context is full",
                             "use the chat template of the model the adapter was trained with",
                             {"after_answer": a.after_answer}))
            return out
        eog = dict(tok.eog)
        listed = ", ".join(f"{i} {tok.text_of(i)!r} ({w})" for i, w in sorted(eog.items())) or "none"
        fix = (f"set eos_token to {end!r} in {tok.where}/tokenizer_config.json (tokenizer.eos_token = {end!r}; "
               "tokenizer.save_pretrained(DIR))")
        if end_id not in eog:
            out.append(Issue("TURN_END_NOT_EOG",
                             f"{src}: the template ends an assistant turn with {end!r} (id {end_id}), but the "
                             f"end-of-generation tokens are {listed}",
                             f"the fine-tune learnt to end its answers with {end!r}; llama.cpp, Ollama and LM Studio stop "
                             "at end-of-generation tokens, so the model would write its turn end and go on with a "
                             "made-up next turn until the token limit (the classic case: a Llama 3 base, EOS "
                             "<|end_of_text|>, fine-tuned with the Instruct template's <|eot_id|>)",
                             fix + f", or add {end_id} to eos_token_id in the base's generation_config.json",
                             {"turn_end": end, "turn_end_id": end_id, "eog": {str(i): w for i, w in eog.items()},
                              "eos_token": eos}))
        elif eog[end_id] != EOS:
            out.append(Issue("TURN_END_NOT_IN_GGUF",
                             f"{src}: the template ends an assistant turn with {end!r} (id {end_id}), an "
                             f"end-of-generation token through {eog[end_id]} only; the GGUF's metadata declares "
                             f"{eos!r} (id {eos_id}) as its EOS",
                             "transformers stops at it, and llama.cpp recognises a few turn-end tokens by their text, "
                             "but a runtime that stops only on the GGUF's declared end-of-generation ids runs past "
                             "the end of every answer (verify stops only on the declared ids, so it will show this)",
                             fix, {"turn_end": end, "turn_end_id": end_id, "eog": {str(i): w for i, w in eog.items()},
                                   "eos_token": eos}))
        k = self.known
        label = k.label if k is not None else "a chat template lora2gguf does not know by name"
        out.append(Issue("CHAT_FORMAT",
                         f"{src}: {label}{' with reasoning blocks ' + '…'.join(self.think) if self.think else ''}; an "
                         f"assistant turn ends with {end!r} (id {end_id})"
                         + (f", an end-of-generation token ({eog[end_id]})" if end_id in eog else ""),
                         "", "", {"label": label, "turn_end": end, "turn_end_id": end_id,
                                  "known": k.key if k is not None else None, "think": list(self.think or ())}))
        return out

    def describe(self) -> dict[str, Any]:
        k = self.known
        return {"name": self.name, "label": self.label, "known": k.key if k is not None else None,
                "turn_end": self.turn_end(), "think": list(self.think or ()), "where": self.where}
