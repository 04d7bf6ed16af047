"""verify: prove each GGUF behaves like the fine-tune.

    from lora2gguf.verify import verify
    result = verify("out")          # reads out/run.json, updates it, writes the report
    if not result.passed: ...       # a required check failed (the CLI exits non-zero)

Numbers: next-token distributions of every GGUF (llama.cpp) on a fixed evaluation text against the
reference (the fine-tune through PEFT, or the unquantized GGUF): KL divergence, top-1 agreement,
perplexity (:mod:`.metrics`). Behaviour: the prompt suite (:mod:`.suite`), greedy and seeded
samples, on the reference and every GGUF (:mod:`.runner`), each check judged against the
reference's result (:mod:`.judge`): a GGUF fails a check where the fine-tune passes it and the
GGUF does not; a check the fine-tune fails too is a fact about the fine-tune, reported and not
counted (unless the suite marks it ``against: absolute``). Speed: llama.cpp tokens/s. Everything
goes into run.json's ``verify`` section; :mod:`lora2gguf.report` renders it.
"""

from __future__ import annotations

import datetime as _dt
import gc
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..chat import ChatFormat, chat_format
from ..errors import InputError, OutputError, VerifyError
from ..vocab import token_ids
from . import judge, metrics
from .logits import (choose_reference, ctx_size, default_threads, gguf_logits, load_reference_model, open_gguf,
                     reference_logits)
from .runner import GGUFEngine, PeftEngine, Prompts, measure_speed, run_suite
from .suite import Suite, load_suite
from .tokens import HFTokens, LlamaTokens, describe_difference, first_difference

log = logging.getLogger(__name__)

__all__ = ["verify", "VerifyResult", "EVAL_TEXT", "load_suite"]

ProgressFn = Callable[[str, int, int, str], None]

#: The built-in evaluation text: rendered as a conversation in the model's chat format (paragraphs
#: alternate user / assistant), a few hundred tokens. Plain, varied English, so no model is
#: favoured by it.
EVAL_TEXT = """\
Can you explain how a lighthouse keeper kept the light burning through a long winter night?

Before electricity, a keeper climbed the tower at dusk, trimmed the wick, polished the lens and \
filled the lamp with oil. Through the night they wound the clockwork that turned the lens, \
checked the flame every few hours and wrote the weather in a logbook. In a storm they might not \
sleep at all, because a dark light could cost a ship and its crew.

What did they do during the day?

Days were for maintenance. The brass had to be polished, the windows cleaned of salt, the oil \
carried up the stairs in heavy cans, and the paint on the tower renewed before the weather \
peeled it away. Many keepers also kept gardens, raised goats or chickens, and taught their \
children at home, since the nearest school could be a boat ride away.

Why are there so few keepers today?

Automation replaced them. Electric lamps with automatic bulb changers, solar panels and \
batteries, and remote monitoring made a resident keeper unnecessary. Satellite navigation also \
changed how ships find their way, so many lights were switched off or kept only as landmarks. \
Some towers became museums or guest houses, and a few volunteers still look after them.

Is it true that the lens could be seen from far away?

Yes. A large Fresnel lens gathers the light of a small flame into a narrow, bright beam. On a \
clear night the beam of a first-order lens could be seen more than twenty nautical miles away, \
limited mostly by the curve of the earth and the height of the tower."""


@dataclass
class VerifyResult:
    """What verify found. ``passed`` is False when a required check or gate failed."""

    out_dir: Path
    passed: bool
    failures: list[dict[str, Any]]
    record: dict[str, Any]
    report_md: Path | None = None
    report_html: Path | None = None
    modelfiles: list[Path] = field(default_factory=list)

    @property
    def section(self) -> dict[str, Any]:
        return self.record["verify"]

    @property
    def required_failed(self) -> bool:
        """True when a required check or gate failed (the CLI exits with VerifyError's code)."""
        return not self.passed

    @property
    def report_path(self) -> Path | None:
        return self.report_md

    @property
    def fine_tune_facts(self) -> list[dict[str, Any]]:
        """The checks the reference fails: facts about the fine-tune, not counted against the files."""
        return list(self.section.get("fine_tune_facts") or [])

    def summary(self) -> str:
        """A few lines for a terminal: one per file, the facts about the fine-tune, the failures
        and the report's path."""
        v = self.section
        lines = [f"verify: reference {v['reference']['label']}; {v['threads']} thread(s)"]
        for f in v["files"]:
            m, sp = f["metrics"], f["speed"]
            num = "reference" if m is None else f"KL {m['kl_mean']:.3g}, top-1 {m['top1']:.1%}"
            speed = f", {sp['pp_tokens_per_s']:.0f}/{sp['tg_tokens_per_s']:.1f} tok/s pp/tg" if sp else ""
            bad = sum(1 for x in self.failures if x["file"] == f["file"])
            lines.append(f"  {f['file']}: {num}{speed}; " + ("ok" if not bad else f"{bad} required check(s) failed"))
        facts = self.fine_tune_facts
        if facts:
            head = v.get("fine_tune_facts_heading") or {"title": "Facts about the fine-tune", "text": ""}
            lines.append(f"{head['title'].upper()}: {head['text']}")
            for x in facts:
                lines.append(f"  ! [{x['prompt']}] {x['fact']} ({x['check']}: {x['consequence']})")
        for x in self.failures:
            lines.append(f"  FAIL {x['file']}: {x['check']}" + (f" [{x['prompt']}]" if x.get("prompt") else "")
                         + f": {x['detail']}" + (f" ({x['why']})" if x.get("why") else ""))
        verdict = "passed" if self.passed else f"FAILED: {len(self.failures)} required check(s) failed"
        lines.append(verdict + (f"; report: {self.report_md}" if self.report_md else ""))
        return "\n".join(lines)


def _read_run(out_dir: Path) -> dict[str, Any]:
    path = out_dir / "run.json"
    if not path.is_file():
        raise InputError(f"{path} not found: run `lora2gguf build` into {out_dir} first "
                         "(verify reads the list of GGUF files from run.json)")
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path} is not readable JSON ({e}); rebuild with `lora2gguf build`") from e
    if not isinstance(rec, dict) or not isinstance(rec.get("outputs"), list) or not rec["outputs"]:
        raise InputError(f"{path} lists no outputs; rebuild with `lora2gguf build`")
    for o in rec["outputs"]:
        if not (out_dir / o.get("file", "")).is_file():
            raise InputError(f"{out_dir / o.get('file', '?')} is listed in run.json but missing; "
                             "rebuild, or remove it from run.json")
    return rec


def _write_run(out_dir: Path, rec: dict[str, Any]) -> None:
    path = out_dir / "run.json"
    tmp = path.with_name("run.json.partial")
    try:
        tmp.write_text(json.dumps(rec, indent=2, default=str), encoding="utf-8")
        tmp.replace(path)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e}") from e


_BYTES_PER_PARAM = {"F32": 4, "F16": 2, "BF16": 2}


def _n_params(output: dict[str, Any]) -> int:
    """Parameters of the model, from an unquantized output's size in run.json (no file read)."""
    return int(output["bytes"] // _BYTES_PER_PARAM.get(str(output.get("type", "")).upper(), 1))


def _gate(suite: Suite, out: dict[str, Any], m: dict[str, Any] | None) -> dict[str, Any]:
    g = suite.gate_for(out["type"])
    if m is None:
        return g | {"passed": None, "detail": "this file is the reference"}
    problems = []
    if m["kl_mean"] > g["kl_mean"]:
        problems.append(f"mean KL {m['kl_mean']:.3g} > {g['kl_mean']:g}")
    if m["top1"] < g["top1"]:
        problems.append(f"top-1 agreement {m['top1']:.1%} < {g['top1']:.0%}")
    detail = "; ".join(problems) or f"mean KL {m['kl_mean']:.3g} <= {g['kl_mean']:g}, top-1 {m['top1']:.1%} >= {g['top1']:.0%}"
    return g | {"passed": not problems, "detail": detail}


def _eval_text(text: str | os.PathLike[str] | None) -> tuple[str, str]:
    """(text, source): None is the built-in text; a Path, or a str naming an existing file, is read;
    any other str is the text itself."""
    if text is None:
        return EVAL_TEXT, "built-in"
    is_file = isinstance(text, os.PathLike) or ("\n" not in text and len(text) < 4096 and Path(text).is_file())
    if not is_file:
        return str(text), "given text"
    try:
        return Path(text).read_text(encoding="utf-8"), str(text)
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read the evaluation text {text}: {e}") from e


def _judge_checks(st: Suite, ref_runs: list[dict[str, Any]], runs: dict[str, list[dict[str, Any]]], ref,
                  failures: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """One row per (prompt, check): each model's greedy result and sample pass count, and each
    file's :class:`~.judge.Judgement`; the required checks a file fails are appended to
    ``failures``. Returns (rows, facts about the fine-tune: the checks the reference fails)."""
    subject = "the fine-tune itself" if ref.kind == "peft" else f"the reference {ref.file}"
    rows, facts = [], []
    for p in st.prompts:
        for ci, c in enumerate(p.checks):
            row = {"prompt": p.id, "check": c.label, "type": c.type, "required": c.required, "against": c.against,
                   "results": {}}
            for fname, gl in [("reference", ref_runs)] + list(runs.items()):
                mine = [g for g in gl if g["prompt"] == p.id]
                greedy = next(g for g in mine if g["mode"] == "greedy")
                samp = [g for g in mine if g["mode"] == "sample"]
                res = greedy["checks"][ci]
                row["results"][fname] = {"passed": res["passed"], "detail": res["detail"],
                                         "samples_passed": sum(g["checks"][ci]["passed"] for g in samp),
                                         "samples": len(samp)}
            ref_res = row["results"]["reference"]
            ref_res["outcome"] = judge.REFERENCE
            for fname in runs:
                r = row["results"][fname]
                j = judge.judge(c, ref_res, r)
                r.update(j.to_dict())
                if j.counts:
                    failures.append({"file": fname, "check": c.label, "prompt": p.id, "against": c.against,
                                     "detail": r["detail"], "why": j.reason})
            row["reference_fails"] = not ref_res["passed"]
            if row["reference_fails"]:
                if not c.required:
                    consequence = "optional: reported only"
                elif c.against == "absolute":
                    consequence = "required and absolute: counted against every GGUF that fails it"
                else:
                    consequence = "required, not counted against the GGUFs"
                facts.append({"prompt": p.id, "title": p.title, "check": c.label, "type": c.type,
                              "required": c.required, "against": c.against,
                              "fact": judge.fine_tune_fact(c, ref_res["detail"], subject=subject),
                              "detail": ref_res["detail"], "consequence": consequence,
                              "samples_passed": ref_res["samples_passed"], "samples": ref_res["samples"],
                              "files_also_failing": [f for f in runs if not row["results"][f]["passed"]]})
            rows.append(row)
    return rows, facts


def facts_heading(ref, n: int) -> dict[str, str]:
    """The title and the explanation over the facts about the fine-tune (one home for the words
    the console summary and both reports show). With a GGUF reference verify has no evidence
    about the fine-tune: the same checks are listed, not counted, and said to be unresolved."""
    absolute = ("unless the suite marks a check `against: absolute` (then every GGUF must pass it whatever the "
                "fine-tune does)")
    if ref.kind == "peft":
        return {"title": "Facts about the fine-tune",
                "text": f"The fine-tune itself (transformers + PEFT) fails {n} check(s). They say what the fine-tune "
                        "does, not that a conversion is broken: a GGUF is held to what the fine-tune does, so these "
                        f"count against no file, {absolute}."}
    return {"title": "Checks the reference GGUF fails",
            "text": f"The reference {ref.file} fails {n} check(s). verify did not run the fine-tune itself "
                    f"({ref.reason}), so it cannot tell whether these are facts about the fine-tune or faults of "
                    f"the conversion. They count against no file, {absolute}; verify with `--reference peft` where "
                    "the fine-tune fits in memory to tell."}


def rehash_outputs(out_dir: Path, rec: dict[str, Any]) -> list[dict[str, Any]]:
    """The full SHA-256 of every output against the one recorded when it was written: the run
    manifest's outputs (every stage's: GGUFs, merged shards, report files) and run.json's GGUFs.
    A stage whose output differs is forgotten in the manifest, so the next `lora2gguf build`
    redoes it. Returns one ``{file, stage, result, sha256, recorded}`` per file; raises
    VerifyError naming every file that differs or is missing (the last verify's report files
    excepted: this verify rewrites them)."""
    from ..gguf_out import sha256_file
    from ..runstate import RunState

    state = RunState.load(out_dir)
    checked = {r.file: r for r in state.rehash()}
    rows = [{"file": r.file, "stage": r.stage, "result": r.result, "sha256": r.sha256, "recorded": r.recorded}
            for r in checked.values()]
    for o in rec["outputs"]:
        name = o.get("file", "")
        if name in checked:
            r = checked[name]
            if r.result == "ok" and o.get("sha256") and o["sha256"] != r.sha256:
                rows.append({"file": name, "stage": "run.json", "result": "differs", "sha256": r.sha256,
                             "recorded": o["sha256"]})
            continue
        if not o.get("sha256"):
            rows.append({"file": name, "stage": None, "result": "no SHA-256 recorded", "sha256": None,
                         "recorded": None})
            continue
        path = out_dir / name
        try:
            sha = sha256_file(path)
        except OSError:
            rows.append({"file": name, "stage": "run.json", "result": "missing", "sha256": None,
                         "recorded": o["sha256"]})
            continue
        rows.append({"file": name, "stage": "run.json", "result": "ok" if sha == o["sha256"] else "differs",
                     "sha256": sha, "recorded": o["sha256"]})
    for r in rows:  # the report files of the last verify: this verify writes them again
        if r["stage"] == "verify" and r["result"] in ("differs", "missing"):
            r["result"] += " (rewritten by this verify)"
    bad = [r for r in rows if r["result"] in ("differs", "missing")]
    if bad:
        lines = []
        for r in bad:
            path = out_dir / r["file"] if not Path(r["file"]).is_absolute() else Path(r["file"])
            if r["result"] == "missing":
                lines.append(f"  {path}: missing (recorded by stage {r['stage']})")
            else:
                lines.append(f"  {path}: SHA-256 {r['sha256'][:16]}... is not the {str(r['recorded'])[:16]}... "
                             f"recorded when it was written ({r['stage']})")
        raise VerifyError(
            f"verify --rehash: {len(bad)} output(s) in {out_dir} changed after they were written:\n"
            + "\n".join(lines)
            + "\nTheir stages are marked for redoing: rerun the same `lora2gguf build` command to rewrite them, "
            "then verify again.")
    return rows


def _family(rec: dict[str, Any]):
    from ..arch import known

    return known().get(rec.get("architecture") or "")


def _record_specials(tech: dict[str, Any]) -> dict[str, str]:
    """Special tokens by role (``bos_token`` ...) as run.json recorded them."""
    out = {}
    for role, d in (tech.get("special_tokens") or {}).items():
        if isinstance(d, dict) and isinstance(d.get("token"), str):
            out[f"{role}_token"] = d["token"]
    return out


def declared_reference_stops(rec: dict[str, Any]) -> dict[str, int]:
    """The end-of-generation ids the fine-tune declares: its tokenizer's EOS (as run.json records
    it) and the ``eos_token_id`` transformers' generate stops on: the base's generation_config.json,
    or config.json's when there is none."""
    tech = rec.get("technical") or {}
    out: dict[str, int] = {}
    if isinstance(tech.get("eos_token_id"), int):
        out["eos"] = tech["eos_token_id"]
    for name in ("generation_config.json", "config.json"):
        path = Path(rec.get("base_dir") or "") / name
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        for i in token_ids(data.get("eos_token_id") if isinstance(data, dict) else None):
            if i not in out.values():
                out[f"{name} {i}"] = i
        break
    return out


@dataclass
class _FineTuneTokens:
    """The fine-tune's chat format and tokenizer (None with ``reason`` when it cannot be loaded:
    then each GGUF's own tokenizer is used and the comparison is not made)."""

    fmt: ChatFormat
    tokenizer: Any
    reason: str | None = None


def _fine_tune_tokens(rec: dict[str, Any]) -> _FineTuneTokens:
    tech = rec.get("technical") or {}
    fam = _family(rec)
    name = tech.get("chat_format") or (fam.chat_format if fam is not None else None)
    tok_dir = (rec.get("tokenizer") or {}).get("dir")
    fmt = chat_format(fam, name=name, template=tech.get("chat_template"), specials=_record_specials(tech),
                      where=str(tok_dir or "the fine-tune's tokenizer"))
    own = fmt.reference_tokens()
    if own is not None:
        return _FineTuneTokens(fmt, own)
    if not tok_dir or not Path(tok_dir).is_dir():
        return _FineTuneTokens(fmt, None, f"the tokenizer folder {tok_dir!r} from run.json is not there")
    try:
        view = HFTokens(tok_dir)
    except InputError as e:
        return _FineTuneTokens(fmt, None, str(e))
    fmt = chat_format(fam, name=name, template=view.chat_template or tech.get("chat_template"),
                      specials=view.specials() or _record_specials(tech), where=str(tok_dir))
    return _FineTuneTokens(fmt, view)


def _gguf_format(rec: dict[str, Any], meta: dict[str, Any], view: LlamaTokens, where: str) -> ChatFormat:
    """A GGUF's chat format: its family's, with the chat template and special tokens it carries."""
    fam = _family(rec)
    name = (rec.get("technical") or {}).get("chat_format") or (fam.chat_format if fam is not None else None)
    return chat_format(fam, name=name, template=meta.get("tokenizer.chat_template"), specials=view.specials(meta),
                       where=where)


def gguf_chat(path: Path, family) -> tuple[ChatFormat, LlamaTokens]:
    """A GGUF's chat format (``family``'s, with the template and special tokens the file carries)
    and llama.cpp's tokenizer of it (the vocabulary alone is loaded; close ``view.llm``)."""
    llm = open_gguf(path, n_ctx=256, n_threads=1, vocab_only=True)
    view = LlamaTokens(llm, Path(path).name)
    meta = dict(llm.metadata)
    return chat_format(family, template=meta.get("tokenizer.chat_template"), specials=view.specials(meta),
                       where=str(path)), view


def _compare_tokens(file: str, ref: dict[str, list[int]], got: dict[str, list[int]], ref_tok, got_tok,
                    failures: list[dict[str, Any]]) -> dict[str, Any]:
    """Compare the ids of every rendered text (prompt id, or "" for the evaluation text); each
    difference is a failure of ``file``."""
    bad = []
    for key, ids in ref.items():
        mine = got.get(key)
        if mine is None or first_difference(ids, mine) is None:
            continue
        what = f"prompt {key!r}" if key else "the evaluation text"
        detail = f"{what}: " + describe_difference(ids, mine, ref_tok, got_tok)
        bad.append({"prompt": key or None, "detail": detail})
        failures.append({"file": file, "check": "tokenization", "prompt": key or None, "against": "reference",
                         "detail": detail,
                         "why": "llama.cpp's tokenizer of this GGUF (its chat template and vocabulary) gives other ids "
                                "than the fine-tune's tokenizer for the same conversation: a conversion fault "
                                "(pre-tokenizer, special tokens, merges or the chat template)"})
    return {"checked": True, "same": not bad, "texts": len(ref), "differences": bad}


@dataclass(frozen=True)
class _Subject:
    """What verify runs in llama.cpp: a model GGUF, or a base GGUF with a LoRA GGUF applied."""

    label: str  # the file name, or "BASE + LORA" for a pair (the key of its runs and its row)
    path: Path
    type: str  # the model file's type (the base's for a pair): its numeric gate
    bytes: int | None
    lora: Path | None = None
    lora_type: str | None = None
    base_bytes_: int | None = None
    base_sha256: str | None = None
    lora_sha256: str | None = None

    @property
    def base_bytes(self) -> int | None:
        return self.base_bytes_ if self.base_bytes_ is not None else self.bytes

    def lora_record(self) -> dict[str, Any]:
        return {"base": self.path.name, "base_path": str(self.path), "base_type": self.type,
                "base_bytes": self.base_bytes_, "base_sha256": self.base_sha256,
                "adapter": self.lora.name if self.lora else None, "adapter_type": self.lora_type,
                "adapter_sha256": self.lora_sha256}


def _lora_subjects(out: Path, rec: dict[str, Any]) -> list[_Subject]:
    """Each base GGUF of run.json's ``lora`` section with the LoRA GGUF applied (lora_run)."""
    lo = rec.get("lora")
    if not isinstance(lo, dict) or not lo.get("file"):
        return []
    adapter = out / lo["file"]
    if not adapter.is_file():
        raise InputError(f"{adapter} is listed in run.json but missing; rebuild, or remove it from run.json")
    subs = []
    for b in lo.get("pairs") or []:
        path = Path(b["path"]) if b.get("path") else out / b["file"]
        if not path.is_file():
            raise InputError(f"{path}: the base GGUF the adapter {lo['file']} was checked against is missing; "
                             "rerun the command that paired them")
        subs.append(_Subject(f"{b['file']} + {lo['file']}", path, b.get("type") or "?", lo.get("bytes"),
                             adapter, lo.get("type"), b.get("bytes"), b.get("sha256"), lo.get("sha256")))
    return subs


def verify(out_dir: str | os.PathLike[str], *, text: str | os.PathLike[str] | None = None,
           suite: str | os.PathLike[str] | Suite | None = None, reference: str = "auto",
           samples: int | None = None, max_tokens: int | None = None, n_threads: int | None = None,
           speed: bool = True, report: bool = True, rehash: bool = False,
           progress: ProgressFn | None = None) -> VerifyResult:
    """Verify every GGUF listed in ``OUT_DIR/run.json`` and write the report.

    ``text``: the evaluation text, or a file holding it (default :data:`EVAL_TEXT`); ``suite``: a suite YAML
    file or a :class:`Suite` (default: the built-in one); ``reference``: "auto", "peft" or "gguf";
    ``samples``/``max_tokens`` override the suite's; ``n_threads``: llama.cpp threads (default:
    all CPUs this process may use); ``rehash``: first re-check the full SHA-256 of every output
    against the one recorded when it was written (:func:`rehash_outputs`; raises VerifyError naming
    a file that differs). Returns a :class:`VerifyResult`; run.json gets a ``verify`` section, and
    REPORT.md, report.html and a Modelfile per GGUF are written next to the files.
    """
    t_start = time.perf_counter()
    out = Path(out_dir)
    rec = _read_run(out)
    rehashed = rehash_outputs(out, rec) if rehash else None
    st = suite if isinstance(suite, Suite) else load_suite(suite)
    if samples is not None:
        st.samples = int(samples)
    if max_tokens is not None:
        st.max_tokens = int(max_tokens)
    threads = n_threads or default_threads()
    # what runs: every model GGUF on its own, and every base GGUF with the LoRA GGUF applied (a
    # LoRA GGUF and the bases it pairs with do not run alone: lora_run's roles)
    outputs = [o for o in rec["outputs"] if o.get("role") not in ("lora", "lora-base")]
    subjects = [_Subject(o["file"], out / o["file"], o.get("type") or "?", o.get("bytes")) for o in outputs]
    subjects += _lora_subjects(out, rec)
    if not subjects:
        raise InputError(f"{out / 'run.json'}: nothing to verify: no model GGUF, and no base GGUF paired with the "
                         "LoRA GGUF (`lora2gguf adapter ... --base-gguf FILE`)")
    unq = [o for o in outputs if o.get("type", "").upper() in ("BF16", "F16", "F32")]
    fallback = unq[0]["file"] if unq else None

    # --- the fine-tune's chat format and tokenizer: its prompts and evaluation text
    ft = _fine_tune_tokens(rec)
    ref_tok = ft.tokenizer
    if ref_tok is None:  # compare nothing; tokenize with the first unquantized GGUF instead
        first_path = out / fallback if fallback else subjects[0].path
        llm0 = open_gguf(first_path, n_ctx=256, n_threads=1, vocab_only=True)
        ref_tok = LlamaTokens(llm0, first_path.name)
    st = st.for_format(ft.fmt)
    eval_text, eval_source = _eval_text(text)
    rendered = ft.fmt.render_text(eval_text)
    toks = list(rendered.ids) if rendered.ids is not None else ref_tok.encode(rendered.text)
    ref_prompts = Prompts.render(ft.fmt, st, ref_tok, own_ids=True)
    first, _ = metrics.scored_rows(len(toks))

    n_params = _n_params(unq[0] if unq else {"bytes": subjects[0].base_bytes, "type": subjects[0].type})
    vocab = int((rec.get("technical") or {}).get("vocab_size") or 0) or max(toks) + 1
    ref = choose_reference(reference, n_params=n_params, base_dir=rec.get("base_dir"),
                           adapter_dir=rec.get("adapter_dir"), fallback_file=fallback,
                           n_tokens=len(toks), vocab_size=vocab)
    log.info("reference: %s (%s)", ref.label, ref.reason)

    # one progress count for the whole run: per model, each prompt run; per file, logits and speed
    runs_per_model = len(st.prompts) * (1 + st.samples)
    n_models = 1 + len(subjects) - (1 if ref.kind == "gguf" else 0)  # a GGUF reference runs once
    total_steps = runs_per_model * n_models + len(subjects) * (2 if speed else 1)
    done_steps = [0]

    def note(_done: int, _total: int, what: str) -> None:
        done_steps[0] += 1
        if progress:
            progress("verify", min(done_steps[0], total_steps), total_steps, what)

    def on_run(_stage: str, _done: int, _total: int, what: str) -> None:
        note(0, 0, what)

    # a prompt may come out longer in a GGUF whose tokenizer differs: leave room for that
    n_ctx = ctx_size(max(len(toks), ref_prompts.longest * 3 // 2 + 16) + st.max_tokens + 8)
    ref_texts = {"": toks, **ref_prompts.ids}
    failures: list[dict[str, Any]] = []

    def gguf_side(path: Path, eng: GGUFEngine, label: str | None = None
                  ) -> tuple[ChatFormat, LlamaTokens, Prompts, dict[str, Any]]:
        """A GGUF's own rendering and tokenization of the prompts and the evaluation text, compared
        with the fine-tune's."""
        view = eng.tokenizer
        fmt = _gguf_format(rec, eng.meta, view, str(path))
        prompts = Prompts.render(fmt, st.for_format(fmt), view)
        got = {"": view.encode(fmt.render_text(eval_text).text), **prompts.ids}
        if ft.tokenizer is None:
            cmp = {"checked": False, "reason": ft.reason}
        else:
            cmp = _compare_tokens(label or path.name, ref_texts, got, ft.tokenizer, view, failures)
        return fmt, view, prompts, cmp

    # --- the reference: logits and generations
    t0 = time.perf_counter()
    ref_tokenization = None
    if ref.kind == "peft":
        model = load_reference_model(rec["base_dir"], rec["adapter_dir"], ref.dtype)
        ref_logits = reference_logits(model, toks)
        stops = ft.fmt.reference_stops(declared_reference_stops(rec))
        ref_runs = run_suite(PeftEngine(model, stops), st, fmt=ft.fmt, prompts=ref_prompts, tokenizer=ref_tok,
                             progress=on_run, label="reference")
        del model
        gc.collect()
    else:
        ref_logits = gguf_logits(out / ref.file, toks, n_threads=threads)
        eng = GGUFEngine(out / ref.file, n_ctx=n_ctx, n_threads=threads)
        try:
            g_fmt, g_view, g_prompts, ref_tokenization = gguf_side(out / ref.file, eng)
            ref_runs = run_suite(eng, st, fmt=g_fmt, prompts=g_prompts, tokenizer=g_view, progress=on_run,
                                 label=ref.file)
        finally:
            eng.close()
    ref_seconds = time.perf_counter() - t0

    files: list[dict[str, Any]] = []
    runs: dict[str, list[dict[str, Any]]] = {}
    for i, sub in enumerate(subjects):
        path, lora = sub.path, sub.lora
        t0 = time.perf_counter()
        is_ref = ref.kind == "gguf" and lora is None and sub.label == ref.file
        m = None
        if not is_ref:
            m = metrics.compare(ref_logits, gguf_logits(path, toks, n_threads=threads, lora=lora), toks,
                                first).to_dict()
        note(i, len(subjects), f"{sub.label}: logits")
        gate = _gate(st, {"type": sub.type}, m)
        eng = GGUFEngine(path, n_ctx=n_ctx, n_threads=threads, lora=lora)
        try:
            if is_ref:
                tokenization, gens, g_fmt = ref_tokenization, ref_runs, None
            else:
                g_fmt, g_view, g_prompts, tokenization = gguf_side(path, eng, sub.label)
                gens = run_suite(eng, st, fmt=g_fmt, prompts=g_prompts, tokenizer=g_view, progress=on_run,
                                 label=sub.label)
            view = eng.tokenizer
            stops = {k: {"id": v, "token": view.decode([v])} for k, v in eng.stops.items()}
            chat = (g_fmt or _gguf_format(rec, eng.meta, view, str(path))).describe()
        finally:
            eng.close()
        runs[sub.label] = [g.to_dict() for g in gens]
        sp = None
        if speed:
            sp = measure_speed(path, toks, n_threads=threads, lora=lora)
            note(i, len(subjects), f"{sub.label}: speed")
        entry = {"file": sub.label, "type": sub.type if lora is None else f"{sub.type} + {sub.lora_type}",
                 "bytes": sub.bytes, "metrics": m, "gate": gate, "speed": sp, "stop_tokens": stops,
                 "tokenization": tokenization, "chat_format": chat, "seconds": round(time.perf_counter() - t0, 3)}
        if lora is not None:
            entry["lora"] = sub.lora_record()
        files.append(entry)
        if gate["passed"] is False and gate.get("required", True):
            failures.append({"file": sub.label, "check": "agreement with the reference", "prompt": None,
                             "against": "reference", "detail": gate["detail"],
                             "why": f"its next-token distributions are outside the {sub.type} gate"})
    if ft.tokenizer is None:
        ref_tok.llm.close()

    # --- checks, judged against the reference (judge): a file fails a check where the reference
    # passes it and the file does not; one the reference fails too is a fact about the fine-tune
    checks, fine_tune_facts = _judge_checks(st, [g.to_dict() for g in ref_runs], runs, ref, failures)

    section = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "threads": threads,
        "reference": ref.to_dict() | {"label": ref.label, "seconds": round(ref_seconds, 3)},
        "chat_format": ft.fmt.describe() | {"rendered_as": ft.fmt.evaluation_text_label,
                                            "tokenizer_compared": ft.tokenizer is not None,
                                            "not_compared_because": ft.reason},
        "eval": {"source": eval_source, "n_tokens": len(toks), "first_scored": first,
                 "n_scored": len(toks) - 1 - first,
                 "sha256": hashlib.sha256(json.dumps(toks).encode()).hexdigest()},
        "suite": {"name": st.name, "source": st.source, "max_tokens": st.max_tokens, "samples": st.samples,
                  "sampling": st.sampling,
                  "prompts": [{"id": p.id, "title": p.title, "prompt": p.prompt,
                               "checks": [c.to_dict() for c in p.checks]} for p in st.prompts]},
        "files": files,
        "reference_runs": [g.to_dict() for g in ref_runs],
        "runs": runs,
        "checks": checks,
        "fine_tune_facts": fine_tune_facts,
        "fine_tune_facts_heading": facts_heading(ref, len(fine_tune_facts)) if fine_tune_facts else None,
        "failures": failures,
        "passed": not failures,
    }
    if rehashed is not None:
        section["rehash"] = rehashed
    section["seconds"] = round(time.perf_counter() - t_start, 3)
    rec["verify"] = section
    rec.setdefault("stages", {})["verify"] = {"seconds": section["seconds"]}
    _write_run(out, rec)
    result = VerifyResult(out, not failures, failures, rec)
    if report:
        from .. import report as report_pkg

        paths = report_pkg.write_report(out, rec)
        result.report_md, result.report_html = paths.markdown, paths.html
        result.modelfiles = list(paths.modelfiles)
    return result
