"""Runs the suite's prompts on a model (a GGUF in llama.cpp, or the PEFT reference) and measures
llama.cpp's speed on each GGUF.

Each model gets the prompts rendered by its chat format and tokenized by its own tokenizer
(:class:`Prompts`). Generation stops on the stop tokens the model declares (for a GGUF: the
EOS/EOT/EOM ids in its metadata, see :func:`lora2gguf.verify.logits.declared_stop_tokens`) or
at ``max_tokens``. Each prompt runs greedily and with ``samples`` seeded samples (seeds
1..samples); the completion is parsed by the chat format and the prompt's checks evaluated.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from ..chat import ChatFormat, Parsed, TokenizerView
from ..errors import InputError
from .logits import ctx_size, declared_stop_tokens, default_threads, open_gguf
from .suite import Suite, evaluate

log = logging.getLogger(__name__)


@dataclass
class Generation:
    prompt: str  # prompt id
    mode: str  # "greedy" or "sample"
    seed: int | None
    tokens: list[int]
    hit_limit: bool
    seconds: float
    parsed: Parsed = field(default_factory=Parsed)
    text: str = ""
    checks: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        p = self.parsed
        return {
            "prompt": self.prompt, "mode": self.mode, "seed": self.seed, "n_tokens": len(self.tokens),
            "hit_limit": self.hit_limit, "stop": p.stop, "seconds": round(self.seconds, 4),
            "analysis": p.channel("analysis"), "final": p.channel("final"),
            "channels": p.channels, "parse_errors": p.errors,
            "text": self.text, "checks": self.checks,
        }


@dataclass
class Prompts:
    """The suite's prompts for one model: prompt id -> rendered text and the ids its tokenizer
    gives (the format's own ids where it has a tokenizer of its own)."""

    texts: dict[str, str]
    ids: dict[str, list[int]]

    @classmethod
    def render(cls, fmt: ChatFormat, suite: Suite, tokenizer: TokenizerView | None, *,
               own_ids: bool = False) -> "Prompts":
        """``own_ids``: take the format's own ids where it has them (the reference's prompts),
        else tokenize the text with ``tokenizer``."""
        texts, ids = {}, {}
        for p in suite.prompts:
            r = fmt.render_prompt(p.prompt, system=suite.system, developer=suite.developer, reasoning=suite.reasoning)
            texts[p.id] = r.text
            if r.ids is not None and (own_ids or tokenizer is None):
                ids[p.id] = list(r.ids)
            elif tokenizer is None:
                raise InputError(f"no tokenizer to tokenize the {fmt.label} prompt {p.id!r} with")
            else:
                ids[p.id] = tokenizer.encode(r.text)
        return cls(texts, ids)

    @property
    def longest(self) -> int:
        return max((len(v) for v in self.ids.values()), default=0)


class GGUFEngine:
    """A GGUF in llama.cpp, for generation."""

    kind = "gguf"

    def __init__(self, path, *, n_ctx: int, n_threads: int | None = None, lora=None):
        self.path = path
        self.n_threads = n_threads or default_threads()
        self.llm = open_gguf(path, n_ctx=n_ctx, n_threads=self.n_threads, lora=lora)
        self.meta = dict(self.llm.metadata)
        self.stops = declared_stop_tokens(self.meta)

    @property
    def tokenizer(self):
        from .tokens import LlamaTokens

        return LlamaTokens(self.llm, str(self.path))

    def generate(self, prompt: Sequence[int], *, max_tokens: int, sampling: dict[str, Any] | None,
                 seed: int | None) -> tuple[list[int], bool, float]:
        stops = set(self.stops.values())
        kw: dict[str, Any] = {"temp": 0.0, "top_k": 1, "top_p": 1.0, "min_p": 0.0}
        if sampling is not None:
            kw = {"temp": float(sampling["temperature"]), "top_k": int(sampling["top_k"]),
                  "top_p": float(sampling["top_p"]), "min_p": float(sampling["min_p"])}
        self.llm.set_seed(int(seed or 0))
        self.llm.reset()
        out: list[int] = []
        t0 = time.perf_counter()
        hit_limit = True
        for tok in self.llm.generate(list(prompt), reset=True, repeat_penalty=1.0, **kw):
            out.append(int(tok))
            if tok in stops:
                hit_limit = False
                break
            if len(out) >= max_tokens:
                break
        return out, hit_limit, time.perf_counter() - t0

    def close(self) -> None:
        self.llm.close()


class PeftEngine:
    """The reference (transformers + PEFT, unmerged), for generation."""

    kind = "peft"

    def __init__(self, model, stops: dict[str, int]):
        self.model = model
        self.stops = dict(stops)

    def generate(self, prompt: Sequence[int], *, max_tokens: int, sampling: dict[str, Any] | None,
                 seed: int | None) -> tuple[list[int], bool, float]:
        import torch

        stops = sorted(set(self.stops.values()))
        kw: dict[str, Any] = {"do_sample": False}
        if sampling is not None:
            torch.manual_seed(int(seed or 0))
            kw = {"do_sample": True, "temperature": float(sampling["temperature"]),
                  "top_k": int(sampling["top_k"]), "top_p": float(sampling["top_p"]),
                  "min_p": float(sampling["min_p"]) or None}
        ids = torch.tensor([list(prompt)], dtype=torch.long)
        t0 = time.perf_counter()
        with torch.no_grad():
            g = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                    max_new_tokens=max_tokens, eos_token_id=stops, pad_token_id=stops[0],
                                    **kw)
        out = [int(t) for t in g[0, ids.shape[1]:]]
        # generate pads nothing for a single sequence; cut after the first stop just in case
        for i, t in enumerate(out):
            if t in stops:
                out = out[:i + 1]
                break
        hit_limit = not out or out[-1] not in stops
        return out, hit_limit, time.perf_counter() - t0

    def close(self) -> None:
        pass


def run_suite(engine, suite: Suite, *, fmt: ChatFormat, prompts: Prompts, tokenizer: TokenizerView | None,
              progress=None, label: str = "") -> list[Generation]:
    """Every prompt of ``suite`` on ``engine``: greedy, then ``suite.samples`` seeded samples, each
    parsed by ``fmt`` (with ``tokenizer``, the model's) and its checks evaluated."""
    gens: list[Generation] = []
    total = len(suite.prompts) * (1 + suite.samples)
    stops = sorted(set(engine.stops.values()))
    for p in suite.prompts:
        toks = prompts.ids[p.id]
        runs: list[tuple[str, int | None, dict | None]] = [("greedy", None, None)]
        runs += [("sample", s, suite.sampling) for s in range(1, suite.samples + 1)]
        for mode, seed, sampling in runs:
            out, hit, secs = engine.generate(toks, max_tokens=suite.max_tokens, sampling=sampling, seed=seed)
            parsed = fmt.parse(out, tokenizer, stops=stops, prompt=prompts.texts[p.id])
            text = tokenizer.decode(out) if tokenizer is not None else ""
            g = Generation(p.id, mode, seed, out, hit, secs, parsed, text)
            for c in p.checks:
                r = evaluate(c, parsed, hit_limit=hit, fmt=fmt)
                g.checks.append({"check": c.label, "type": c.type, "required": c.required,
                                 "passed": r.passed, "detail": r.detail})
            gens.append(g)
            if progress:
                progress("verify", len(gens), total, f"{label} {p.id} {mode}")
    return gens


def measure_speed(path, tokens: Sequence[int], *, n_threads: int | None = None, n_prompt: int = 128,
                  n_gen: int = 32, lora=None) -> dict[str, Any]:
    """llama.cpp prompt-processing and generation speed of a GGUF (with the LoRA GGUF ``lora``
    applied at runtime, which costs speed), tokens per second, the way llama-bench measures them:
    ``n_prompt`` tokens evaluated in one batch (pp), then ``n_gen`` tokens decoded one at a time (tg)."""
    threads = n_threads or default_threads()
    toks = [int(t) for t in tokens]
    while len(toks) < n_prompt:
        toks = toks + toks
    pp = toks[:n_prompt]
    llm = open_gguf(path, n_ctx=ctx_size(n_prompt + n_gen + 8), n_threads=threads, lora=lora)
    try:
        llm.reset()
        llm.eval(pp[:8])  # warm up (allocations, first-touch of the mmap)
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(pp)
        t_pp = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i in range(n_gen):
            llm.eval([pp[i % len(pp)]])
        t_tg = time.perf_counter() - t0
    finally:
        llm.close()
    return {"threads": threads, "n_prompt": n_prompt, "n_gen": n_gen,
            "pp_tokens_per_s": round(n_prompt / t_pp, 2), "tg_tokens_per_s": round(n_gen / t_tg, 2),
            "pp_seconds": round(t_pp, 4), "tg_seconds": round(t_tg, 4)}
